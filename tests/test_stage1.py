"""Stage-1 training: synthetic source, sharded step (8 fake devices == 1 device), exact resume,
NaN stop, eval table and baselines against NumPy, any-length `predict`, the CLI.

Everything runs the `tiny` preset with `train.fast_compile` (short runs: compile time dominates).
One run is shared by the eval / predict / CLI tests (module fixture).
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.configs import stage1 as configs
from hdtf_jax.data import synthetic
from hdtf_jax.train import checkpoints, logs
from hdtf_jax.train import stage1

REPO = Path(__file__).resolve().parents[1]


def tiny(**train):
  c = configs.get_config("tiny")
  c.train.fast_compile = True
  c.train.update(train)
  return c


def leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class Interrupting:
  """Wraps a train iterator: raises `error` (or puts NaN in the audio) when drawing batch `at`."""

  def __init__(self, inner, at, error=None):
    self.inner, self.at, self.error = inner, at, error

  def __iter__(self):
    return self

  def __next__(self):
    index = self.inner.get_state()["index"]
    batch = next(self.inner)
    if index == self.at:
      if self.error is not None:
        raise self.error
      batch = dict(batch, audio=np.full_like(batch["audio"], np.nan))
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


# ------------------------------------------------------------------------------ synthetic data

def test_synthetic_source_is_deterministic_learnable_and_styled():
  cfg = synthetic.SyntheticConfig(num_train_speakers=6, num_test_speakers=2, clips_per_speaker=2,
                                  clip_seconds=6.0, reference_size=32)
  train = synthetic.SyntheticStage1Source(cfg, "train")
  test = synthetic.SyntheticStage1Source(cfg, "test")
  assert len(train) == 12 and len(test) == 4 and not set(train.speakers) & set(test.speakers)
  ex = train[3]
  assert ex["audio"].shape == (600, 15) and ex["mouth"].shape == (600, 28)
  assert ex["eyebrow"].shape == ex["pose"].shape == (600, 5) and ex["shape"].shape == (60,)
  assert ex["reference_frame"].shape == (32, 32, 3) and 0 <= ex["reference_frame"].min()
  again = synthetic.SyntheticStage1Source(cfg, "train")[3]
  for k in ("audio", "mouth", "eyebrow", "pose", "reference_frame"):
    np.testing.assert_array_equal(ex[k], again[k])

  # Audio is a noisy function of the speaker-normalised mouth: a linear read-out of the 15
  # features already predicts jaw-open / gain well, across speakers.
  feats, jaw = [], []
  for i in range(len(train)):
    e = train[i]
    gain = 1.0 + 0.35 * train.style(train.speakers[i // cfg.clips_per_speaker])[0]
    feats.append(np.c_[e["audio"], np.ones(600)])
    jaw.append(e["mouth"][:, 0] / gain)
  x, y = np.concatenate(feats), np.concatenate(jaw)
  fit = x @ np.linalg.lstsq(x, y, rcond=None)[0]
  assert np.corrcoef(fit, y)[0, 1] > 0.9

  # The style is visible in the identity inputs: two clips of one speaker look alike, two
  # speakers do not; the shape vector is linear in the style (noise 0.1).
  same = np.abs(train.reference_frame(0, 0) - train.reference_frame(0, 1)).mean()
  other = np.abs(train.reference_frame(0, 0) - train.reference_frame(1, 0)).mean()
  assert other > 3 * same
  styles = np.stack([train.style(s) for s in range(40)])
  shapes = np.stack([train.shape_vector(s) for s in range(40)])
  coef = np.linalg.lstsq(shapes, styles, rcond=None)[0]
  assert np.corrcoef((shapes @ coef).ravel(), styles.ravel())[0, 1] > 0.95

  it = synthetic.WindowIterator(train, window=64, batch_size=3, seed=1)
  next(it)
  state = it.get_state()
  b1 = next(it)
  it.set_state(state)
  b2 = next(it)
  assert b1["audio"].shape == (3, 64, 15) and b1["identity"].shape == (3,)
  np.testing.assert_array_equal(b1["mouth"], b2["mouth"])
  other_shard = synthetic.WindowIterator(train, window=64, batch_size=3, seed=1, shard_index=1,
                                         shard_count=2)
  other_shard.set_state(state)
  assert not np.array_equal(next(other_shard)["audio"], b1["audio"])
  with pytest.raises(ValueError, match="window 601"):
    synthetic.WindowIterator(train, window=601, batch_size=1, seed=0)
  with pytest.raises(ValueError, match="split"):
    synthetic.SyntheticStage1Source(cfg, "val")


# ------------------------------------------------------------------------------ sharded step

def test_step_on_8_fake_devices_matches_1_device():
  # Adam's eps is raised from 1e-8: biases in front of BatchNorm have a true gradient of 0, so
  # theirs is float noise that Adam would blow up to +-lr whatever the device count.
  code = textwrap.dedent("""
    import json, jax, numpy as np
    from experiments.configs import stage1 as configs
    from hdtf_jax.train import stage1, mesh as m
    c = configs.get_config('tiny'); c.train.fast_compile = True; c.data.batch_size = 8
    c.optim.eps = 1e-4
    data = stage1.make_data(c)
    batches = [stage1.model_inputs(next(data.train_iter), c.model) for _ in range(2)]
    out = {}
    host_state = None
    for n in (1, 8):
      mesh = m.make_mesh({'data': -1}, devices=jax.devices()[:n])
      prog = stage1.program(c, mesh, 20, 10)
      if host_state is None:
        host_state = jax.device_get(stage1.init_state(prog, 0, data.stats))
      state = jax.device_put(host_state, prog.shardings)
      for b in batches:  # two steps: BatchNorm running stats and Adam moments both move
        sharded = m.shard_batch(b, mesh)
        state, met = prog.step(state, sharded)
      shards = len(sharded['audio'].addressable_shards)
      out[n] = (jax.device_get(met), jax.device_get(state), shards)
    (m1, s1, k1), (m8, s8, k8) = out[1], out[8]
    loss_diff = max(abs(float(m1[k]) - float(m8[k])) / max(1.0, abs(float(m1[k]))) for k in m1)
    # Per leaf: max |a - b| relative to max(1, max |a|) (params ~0.1-1, Adam moments up to 100s).
    flat1 = jax.tree_util.tree_flatten_with_path(s1)[0]
    errs = [(float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a))))),
             jax.tree_util.keystr(k))
            for (k, a), b in zip(flat1, jax.tree_util.tree_leaves(s8))
            if np.issubdtype(np.asarray(a).dtype, np.floating)]
    worst = max(errs)
    moved = float(np.max(np.abs(jax.tree_util.tree_leaves(s1.g_params)[0]
                               - jax.tree_util.tree_leaves(host_state.g_params)[0])))
    print(json.dumps(dict(shards=[k1, k8], loss_diff=loss_diff, param_err=worst, moved=moved,
                          g_total=float(m1['g_total']), steps=int(s8.step))))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["shards"] == [1, 8] and out["steps"] == 2
  assert np.isfinite(out["g_total"]) and out["moved"] > 0
  assert out["loss_diff"] < 1e-4, out
  assert out["param_err"][0] < 1e-4, out


# ------------------------------------------------------------------------------ resume, NaN

@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 6-step tiny run, checkpoints every 3 steps."""
  workdir = tmp_path_factory.mktemp("stage1_run")
  result = stage1.train(tiny(num_steps=6, checkpoint_every=3), workdir, progress=False)
  return workdir, result


def _restore(config, workdir, step=None):
  return stage1.restore_state(config, workdir, step=step)


def test_resume_after_interrupt_or_kill_equals_straight_run(run, tmp_path):
  workdir, result = run
  assert result["step"] == 6
  straight = _restore(tiny(), workdir)
  assert int(straight.step) == 6
  assert checkpoints.Checkpointer(workdir / "checkpoints").all_steps() == [3, 6]

  # Ctrl-C while drawing batch 4 (after 4 steps): the exit save is at step 4 with the iterator
  # position of step 4; a fresh run resumes from it.
  config = tiny(num_steps=6, checkpoint_every=3)
  data = stage1.make_data(config)
  data.train_iter = Interrupting(data.train_iter, at=4, error=KeyboardInterrupt())
  with pytest.raises(KeyboardInterrupt):
    stage1.train(config, tmp_path / "ctrl_c", data=data, progress=False)
  assert checkpoints.Checkpointer(tmp_path / "ctrl_c" / "checkpoints").all_steps() == [3, 4]
  assert stage1.train(tiny(num_steps=6, checkpoint_every=3), tmp_path / "ctrl_c",
                      progress=False)["step"] == 6
  leaves_equal(_restore(tiny(), tmp_path / "ctrl_c"), straight)

  # A hard kill after step 3 leaves only the periodic checkpoint: resume from it.
  killed = tmp_path / "killed"
  shutil.copytree(workdir / "checkpoints" / "3", killed / "checkpoints" / "3")
  stage1.train(tiny(num_steps=6, checkpoint_every=3), killed, progress=False)
  leaves_equal(_restore(tiny(), killed), straight)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny(num_steps=10, checkpoint_every=2, log_every=2)
  data = stage1.make_data(config)
  data.train_iter = Interrupting(data.train_iter, at=4)  # NaN audio in the 5th batch
  with pytest.raises(FloatingPointError, match="non-finite loss at step 5") as err:
    stage1.train(config, tmp_path, data=data, progress=False)
  assert err.value.step == 5 and err.value.last_checkpoint == 4 and "g_total" in err.value.names
  assert checkpoints.Checkpointer(tmp_path / "checkpoints").all_steps() == [2, 4]
  state = _restore(tiny(), tmp_path)
  assert int(state.step) == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))
  logged = [r["step"] for r in logs.read_jsonl(tmp_path / "metrics.jsonl") if "train/g_total" in r]
  assert logged == [2, 4]  # every loss of the finite steps, nothing of step 5


# ------------------------------------------------------------------------------ eval

def _np_ssim(x, y, c1=1e-4, c2=9e-4):
  """Temporal SSIM per window and parameter by the formula, in float64."""
  mx, my = x.mean(1), y.mean(1)
  vx, vy = x.var(1), y.var(1)
  cov = ((x - mx[:, None]) * (y - my[:, None])).mean(1)
  return ((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean()


def test_eval_prints_table_writes_json_and_baselines_match_numpy(run, capsys):
  from experiments import stage1 as main
  workdir, _ = run
  config = tiny()
  results = main.run(config, str(workdir), mode="eval")
  table = capsys.readouterr().out
  assert "| system | mse_mouth |" in table and "| mean_params |" in table
  assert "| other_speaker |" in table and "| model |" in table
  saved = json.loads((workdir / "eval_6.json").read_text())
  assert saved["step"] == 6 and set(saved["results"]) == {"model", "mean_params", "other_speaker"}
  assert list((workdir / "images").glob("eval_tracks_*.png"))

  # Independent recomputation of both baselines on the same held-out windows.
  syn = synthetic.SyntheticConfig.from_dict(config.data.synthetic.to_dict())
  windows = synthetic.eval_windows(synthetic.SyntheticStage1Source(syn, "test"),
                                   config.data.eval_window, config.data.max_eval_windows)
  gt = {p: np.stack([w[k] for w in windows]).astype(np.float64)
        for p, k in stage1.TARGET_KEY.items()}
  ids = np.array([int(w["identity"]) for w in windows])
  stats = jax.device_get(_restore(config, workdir).stats)
  mean = {p: np.broadcast_to(np.asarray(stats[f"{p}_mean"], np.float64), gt[p].shape) for p in gt}
  mp = results["mean_params"]
  np.testing.assert_allclose(mp["mse_mouth"], np.mean((mean["mouth"] - gt["mouth"]) ** 2),
                             rtol=1e-4)
  np.testing.assert_allclose(mp["ssim_eyebrow"], _np_ssim(mean["eyebrow"], gt["eyebrow"]),
                             rtol=1e-3, atol=1e-6)
  assert mp["cca_head"] == pytest.approx(0.0, abs=1e-6) and mp["jaw_open_r"] == 0.0
  pairs = np.array([next(j % len(ids) for j in range(i + 1, i + len(ids) + 1)
                         if ids[j % len(ids)] != ids[i]) for i in range(len(ids))])
  other = {p: v[pairs] for p, v in gt.items()}
  os_ = results["other_speaker"]
  np.testing.assert_allclose(os_["mse_mouth"], np.mean((other["mouth"] - gt["mouth"]) ** 2),
                             rtol=1e-4)
  np.testing.assert_allclose(os_["ssim_eyebrow"], _np_ssim(other["eyebrow"], gt["eyebrow"]),
                             rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(os_["jaw_open_r"],
                             np.corrcoef(other["mouth"][..., 0].ravel(),
                                         gt["mouth"][..., 0].ravel())[0, 1], rtol=1e-6)
  if "lmd3d_mouth" in os_:  # LMD-3D through the morphable model's own `vertices`
    from hdtf_jax.face import morphable
    model = morphable.default_model()
    idx = model.regions["mouth"]
    verts = lambda mouth: np.asarray(morphable.vertices(
        model, np.zeros(model.n_shape), mouth, np.zeros(model.n_eyebrow)))[..., idx, :]
    dist = np.linalg.norm(verts(other["mouth"]) - verts(gt["mouth"]), axis=-1).mean()
    np.testing.assert_allclose(os_["lmd3d_mouth"], dist, rtol=1e-3)


# ------------------------------------------------------------------------------ predict

def test_predict_any_length_matches_the_model_on_each_chunk(run):
  workdir, _ = run
  config = tiny()
  variables = stage1.inference_variables(_restore(config, workdir))
  rng = np.random.default_rng(0)
  audio = rng.normal(0, 1, (6000, 15)).astype(np.float32)
  ident = rng.uniform(0, 1, (40, 40, 3)).astype(np.float32)  # resized to 32 inside
  chunk, overlap = 64, 16
  out = stage1.predict(variables, audio, ident, model_config=config.model, chunk=chunk,
                       overlap=overlap, max_batch=8)
  assert {k: v.shape for k, v in out.items()} == {"mouth": (6000, 28), "eyebrow": (6000, 5),
                                                    "head": (6000, 5)}
  assert all(np.isfinite(v).all() for v in out.values())
  # Frames covered by one window only equal G_ani on that window: the first chunk - overlap
  # frames, and the end-aligned last window past the end of the last regular one.
  hop = chunk - overlap
  solo_end = 6000 - ((6000 - chunk) // hop * hop + chunk)
  assert solo_end == 32
  first = stage1.predict(variables, audio[:chunk], ident, model_config=config.model, chunk=chunk)
  last = stage1.predict(variables, audio[-chunk:], ident[None], model_config=config.model,
                        chunk=chunk)
  for p in out:
    np.testing.assert_allclose(out[p][:hop], first[p][:hop], atol=1e-6)
    np.testing.assert_allclose(out[p][-solo_end:], last[p][-solo_end:], atol=1e-6)
  # Where two windows overlap, the output is their blend with linear ramps of `overlap` frames.
  second = stage1.predict(variables, audio[hop:hop + chunk], ident, model_config=config.model,
                          chunk=chunk)
  ramp = np.minimum(np.minimum(np.arange(1, chunk + 1), np.arange(chunk, 0, -1)) / (overlap + 1), 1)
  wa, wb = ramp[hop:chunk, None], ramp[:chunk - hop, None]
  for p in out:
    blend = (wa * first[p][hop:chunk] + wb * second[p][:chunk - hop]) / (wa + wb)
    np.testing.assert_allclose(out[p][hop:chunk], blend, atol=1e-6)
  # A short clip runs whole and matches the jitted forward on a batch of one.
  short = stage1.predict(variables, audio[:37], ident, model_config=config.model, chunk=chunk)
  assert short["mouth"].shape == (37, 28)
  with pytest.raises(ValueError, match="audio must be"):
    stage1.predict(variables, audio[:, :14], ident, model_config=config.model)
  with pytest.raises(ValueError, match="overlap"):
    stage1.predict(variables, audio, ident, model_config=config.model, chunk=64, overlap=64)


# ------------------------------------------------------------------------------ CLI

def test_cli_eval_mode_and_missing_checkpoint(run, tmp_path):
  workdir, _ = run
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  cmd = [sys.executable, "-m", "experiments.stage1",
         "--config=experiments/configs/stage1.py:tiny", "--mode=eval"]
  res = subprocess.run(cmd + [f"--workdir={workdir}"], env=env, capture_output=True, text=True,
                       timeout=600, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "| model |" in res.stdout and "| other_speaker |" in res.stdout
  res = subprocess.run(cmd + [f"--workdir={tmp_path / 'nothing'}"], env=env,
                       capture_output=True, text=True, timeout=600, cwd=REPO)
  assert res.returncode != 0 and "no checkpoint directory" in res.stderr
