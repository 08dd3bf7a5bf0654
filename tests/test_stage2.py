"""Stage-2 training: synthetic source, F_app on device, the train step (losses, sharding, resume,
NaN guard), the VGG-weights check, eval table, against independent references (skimage,
`hdtf_jax.data.clips` coordinates, per-pair `flow_from_params`)."""
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import skimage.metrics

from experiments.configs import stage2 as configs
from hdtf_jax import warp
from hdtf_jax.data import clips, synthetic_video
from hdtf_jax.train import common, logs, stage2

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("s2cache"))


# The demo preset's start-from-the-warp options (mask biases, pixel skip) and pixel L1, so the
# step, resume, eval and generate tests below cover them too (the tiny preset has the paper's).
WARP_START = dict(fg_bias_init=3.0, matting_bias_init=3.0, pixel_skip="residual")


def tiny_config(cache_dir, **train):
  c = configs.get_config("tiny")
  c.data.synthetic.cache_dir = cache_dir
  c.model.generator.update(**WARP_START)
  # The demo preset's extra terms: pixel L1 / MSE, and GAN + feature matching warming up (off
  # at step 0, half weight at 1, full from 2).
  c.loss.update(l1=2.0, l2=20.0, adversarial_warmup=1, adversarial_ramp=2)
  c.train.fast_compile = True  # smoke runs: compile time dominates
  c.train.update(**train)
  return c


@pytest.fixture(scope="module")
def data(cache_dir):
  return stage2.make_data(tiny_config(cache_dir))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir, data):
  """A tiny run of 4 steps, checkpoints at 2 and 4; (config, workdir, result)."""
  workdir = tmp_path_factory.mktemp("s2run")
  c = tiny_config(cache_dir, num_steps=4, checkpoint_every=2, log_every=1, eval_every=4)
  data.train_iter.set_state({"index": 0})
  result = stage2.train(c, workdir, data=data, progress=False)
  return c, workdir, result


def _restore(c, workdir, step=None):
  return jax.device_get(stage2.restore_state(c, workdir, step=step))


# ------------------------------------------------------------------------------ data and F_app

def test_pixel_params_follow_the_dataset_convention():
  rng = np.random.default_rng(0)
  params = {"shape": rng.normal(size=60).astype(np.float32), "scale": np.float32(0.23),
            "mouth": np.zeros(28, np.float32), "eyebrow": np.zeros(5, np.float32),
            "pose": np.array([0.1, -0.2, 0.05, 0.47, 0.52], np.float32)}
  for size in (32, 128, 512):
    px = synthetic_video.to_pixel_params(params, size)
    np.testing.assert_allclose(px["pose"][3:], clips.to_pixels(params["pose"][3:], size),
                               rtol=1e-6)
    np.testing.assert_allclose(px["scale"], params["scale"] * size, rtol=1e-6)
    np.testing.assert_array_equal(px["pose"][:3], params["pose"][:3])


def test_app_flow_is_per_pair_flow_and_identity_without_motion(data):
  from hdtf_jax.face import flow, morphable
  model = morphable.default_model()
  batch = stage2.model_inputs(synthetic_video.stack(data.eval_examples[:3]))
  size = 16
  grids, overflow = jax.jit(lambda r, d: stage2.app_flow(model, r, d, size, flow.FlowConfig()))(
      batch["ref_params"], batch["drv_params"])
  assert grids.shape == (3, size, size, 2) and not np.asarray(overflow).any()
  for i in range(3):
    one = lambda p: synthetic_video.to_pixel_params({k: v[i] for k, v in p.items()}, size)
    ref = flow.flow_from_params(model, one(batch["ref_params"]), one(batch["drv_params"]), size,
                                size).grid
    np.testing.assert_allclose(grids[i], ref, atol=1e-5)
  same, _ = stage2.app_flow(model, batch["ref_params"], batch["ref_params"], size,
                            flow.FlowConfig())
  np.testing.assert_allclose(same, np.broadcast_to(warp.identity_grid(size, size), same.shape),
                             atol=1e-4)


def test_synthetic_pairs_are_deterministic_and_f_app_explains_them(data):
  it = data.train_iter
  it.set_state({"index": 5})
  a = next(it)
  it.set_state({"index": 5})
  b = next(it)
  assert it.get_state() == {"index": 6}
  for k in ("reference", "driving"):
    np.testing.assert_array_equal(a[k], b[k])
  assert a["reference"].shape == (4, 32, 32, 3) and a["reference"].dtype == np.float32
  assert set(a["ref_params"]) == set(stage2.PARAM_KEYS) and a["drv_params"]["pose"].shape == (4, 5)
  # Test identities differ from train identities, and F_app carries real information about the
  # driving frame: on held-out pairs the warp-only baseline beats the unwarped reference.
  assert not set(e["identity"] for e in data.eval_examples) & {0, 1}
  truth = np.stack([e["driving"] for e in data.eval_examples])
  ref = np.stack([e["reference"] for e in data.eval_examples])
  batch = stage2.model_inputs(synthetic_video.stack(data.eval_examples))
  from hdtf_jax.face import flow, morphable
  grids, _ = stage2.app_flow(morphable.default_model(), batch["ref_params"], batch["drv_params"],
                             8, flow.FlowConfig())
  warped = np.asarray(stage2.warp_only(jnp.asarray(ref), grids))
  psnr = lambda p: np.mean([skimage.metrics.peak_signal_noise_ratio(t, x, data_range=1.0)
                            for t, x in zip(truth, p)])
  assert psnr(warped) > psnr(ref) + 2.0


# ------------------------------------------------------------------------ start from the warp

def _generator_outputs(data, **generator):
  """Init-time G_vid (tiny widths) on 4 held-out pairs: (config, params, outputs, reference)."""
  from hdtf_jax.face import flow, morphable
  from hdtf_jax.nn import video
  cfg = video.tiny_config()
  cfg.generator.update(**generator)
  batch = stage2.model_inputs(synthetic_video.stack(data.eval_examples[:4]))
  f_app, _ = stage2.app_flow(morphable.default_model(), batch["ref_params"], batch["drv_params"],
                             stage2.flow_size(cfg), flow.FlowConfig())
  gen = video.VideoGenerator(cfg)
  variables = gen.init(jax.random.PRNGKey(0), batch["reference"], f_app)
  out = jax.device_get(gen.apply(variables, batch["reference"], f_app))
  return cfg, variables["params"], out, batch["reference"]


def test_mask_bias_init_starts_the_masks_near_one(data):
  _, params, out, _ = _generator_outputs(data, fg_bias_init=3.0, matting_bias_init=3.0)
  np.testing.assert_array_equal(params["head_fg"]["bias"], [3.0])
  np.testing.assert_array_equal(params["head_matting"]["bias"], [3.0])
  assert np.all(params["head_g"]["bias"] == 0)  # the feature head keeps flax's zero bias
  # Logits = 3 + (random kernel . hourglass features): most mask values near sigmoid(3) = 0.953.
  for k in ("mask_fg", "mask_matting"):
    assert 0.85 < np.median(out[k]) < 0.995, (k, np.median(out[k]))
  # The paper's (default) heads: zero bias, masks around 0.5, no skip.
  _, params, out, _ = _generator_outputs(data)
  np.testing.assert_array_equal(params["head_fg"]["bias"], [0.0])
  assert 0.2 < np.median(out["mask_fg"]) < 0.8
  assert "mask_pixel" not in out and "out_mask" not in params["decoder"]


def test_residual_pixel_skip_is_exactly_the_warp_at_init(data):
  """"residual": image = clip(warp(reference, F, border) + correction), the correction's conv
  zero at init and fed [decoder features, warp]: the warp-only prediction with G_vid's own F."""
  cfg, params, out, ref = _generator_outputs(data, pixel_skip="residual")
  warped = np.asarray(stage2.warp_only(jnp.asarray(ref), jnp.asarray(out["flow"])))
  np.testing.assert_allclose(out["image"], warped, atol=1e-6)
  assert np.abs(warped - ref).max() > 0.05  # F moved the picture: not a trivial identity
  kernel = params["decoder"]["out"]["kernel"]
  assert kernel.shape == (7, 7, cfg.generator.encoder_widths[0] + 3, 3) and not kernel.any()
  assert "mask_pixel" not in out


def test_blend_pixel_skip_is_the_warp_at_init(data):
  """"blend": image = M_p * warp(reference, F, border) + (1 - M_p) * decoder, M_p = sigmoid(bias)
  at init: within 1 - M_p of the warp-only prediction with G_vid's own F (stage2.warp_only)."""
  cfg, params, out, ref = _generator_outputs(data, pixel_skip="blend", pixel_skip_bias_init=3.0)
  m = 1 / (1 + np.exp(-3.0))
  np.testing.assert_allclose(out["mask_pixel"], m, rtol=1e-6)
  assert out["mask_pixel"].shape == (4, 32, 32, 1)
  warped = np.asarray(stage2.warp_only(jnp.asarray(ref), jnp.asarray(out["flow"])))
  gap = np.abs(out["image"] - warped)
  assert gap.max() <= (1 - m) + 1e-6 and gap.max() > 1e-3  # the decoder's share is there
  # Decoder output = (image - M_p * warp) / (1 - M_p) is a sigmoid, i.e. in (0, 1).
  dec = (out["image"] - m * warped) / (1 - m)
  assert dec.min() > -1e-4 and dec.max() < 1 + 1e-4
  _, _, out, ref = _generator_outputs(data, pixel_skip="blend", pixel_skip_bias_init=30.0)
  warped = np.asarray(stage2.warp_only(jnp.asarray(ref), jnp.asarray(out["flow"])))
  np.testing.assert_allclose(out["image"], warped, atol=1e-5)


def test_mouth_boxes_hold_the_lips_below_the_eyes(data):
  """The box around the driving parameters' projected lips (+ margin): holds every lips point,
  is a small part of the frame and lies below the eyes (an independent part of the mesh)."""
  from hdtf_jax.face import flow, morphable
  model, size = morphable.default_model(), 32
  drv = synthetic_video.stack([e["drv_params"] for e in data.eval_examples[:4]])
  boxes = stage2.mouth_boxes(drv, size)
  pts, _ = flow.mesh_points(model, synthetic_video.to_pixel_params(drv, size), size, size)
  pts = np.asarray(pts)
  for box, p in zip(boxes, pts):
    ys, xs = np.nonzero(box)
    lips, eyes = p[np.asarray(model.regions["lips"])], p[np.asarray(model.regions["eyes"])]
    assert xs.min() <= lips[:, 0].min() and xs.max() >= lips[:, 0].max() - 1
    assert ys.min() <= lips[:, 1].min() and ys.max() >= lips[:, 1].max() - 1
    assert 0.01 < box.mean() < 0.25, box.mean()
    assert ys.min() > eyes[:, 1].mean()
  # region_psnr of the whole frame is the frame PSNR; of a box, that of its pixels.
  rng = np.random.default_rng(5)
  a, b = rng.uniform(size=(2, 2, 8, 8, 3))
  whole = np.ones((2, 8, 8), bool)
  frames = np.mean([skimage.metrics.peak_signal_noise_ratio(x, y, data_range=1.0)
                    for x, y in zip(a, b)])
  assert stage2.region_psnr(b, a, whole) == pytest.approx(frames, abs=1e-9)
  box = np.zeros((2, 8, 8), bool)
  box[:, 2:5, 3:7] = True
  crop = np.mean([skimage.metrics.peak_signal_noise_ratio(x[2:5, 3:7], y[2:5, 3:7], data_range=1.0)
                  for x, y in zip(a, b)])
  assert stage2.region_psnr(b, a, box) == pytest.approx(crop, abs=1e-9)
  assert np.isnan(stage2.region_psnr(b, a, np.zeros_like(box)))


def test_adversarial_factor_warms_up_then_ramps():
  loss = ml_collections.ConfigDict(dict(adversarial_warmup=3, adversarial_ramp=2))
  got = [float(stage2.adversarial_factor(loss, s)) for s in range(7)]
  assert got == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
  loss.adversarial_ramp = 0
  assert [float(stage2.adversarial_factor(loss, s)) for s in range(5)] == [0, 0, 0, 1, 1]
  paper = configs.get_config("paper").loss  # the paper: full weight from step 0
  assert float(stage2.adversarial_factor(paper, 0)) == 1.0


def test_l1_term_matches_numpy():
  rng = np.random.default_rng(3)
  fake, real = (rng.uniform(size=(2, 8, 8, 3)).astype(np.float32) for _ in range(2))
  logits = [jnp.asarray(rng.normal(size=(2, 3, 3, 1)).astype(np.float32))]
  feats = [jnp.asarray(rng.normal(size=(2, 4, 4, 5)).astype(np.float32))]
  vgg_f = [{"relu1_1": jnp.asarray(fake)}]
  vgg_r = [{"relu1_1": jnp.asarray(real)}]
  loss_cfg = configs.get_config("tiny").loss
  loss_cfg.vgg_layers, loss_cfg.vgg_layer_weights = ("relu1_1",), (1.0,)
  terms = stage2.generator_loss_terms(logits, feats, feats, vgg_f, vgg_r, loss_cfg,
                                      jnp.asarray(fake), jnp.asarray(real))
  assert float(terms["l1"]) == pytest.approx(np.mean(np.abs(fake - real)), rel=1e-6)
  assert float(terms["l2"]) == pytest.approx(np.mean((fake - real) ** 2), rel=1e-5)
  paper_loss = configs.get_config("paper").loss
  assert paper_loss.l1 == paper_loss.l2 == 0.0  # the paper has no pixel term
  demo = configs.get_config("demo").model.generator
  paper = configs.get_config("paper").model.generator
  assert demo.pixel_skip == "blend" and paper.pixel_skip == "none"
  assert paper.fg_bias_init == paper.matting_bias_init == 0.0


# ------------------------------------------------------------------------------ perceptual net

def test_missing_vgg_weights_fail_before_training(tmp_path, cache_dir):
  c = tiny_config(cache_dir)
  missing = tmp_path / "nowhere" / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
  c.loss.update(vgg_weights=str(missing), vgg_random_init=False)

  class Untouchable:
    def __getattr__(self, name):
      raise AssertionError("data was touched before the VGG check")

  with pytest.raises(FileNotFoundError) as e:
    stage2.train(c, tmp_path / "run", data=Untouchable(), progress=False)
  assert str(missing) in str(e.value)
  assert "keras.applications.VGG19" in str(e.value) and "vgg19-dcbb9e9d.pth" in str(e.value)
  assert not (tmp_path / "run").exists()
  c.loss.update(vgg_weights="", vgg_random_init=False)
  with pytest.raises(ValueError, match="vgg_random_init"):
    stage2.perceptual_network(c)


def test_random_vgg_keeps_activation_scale():
  c = configs.get_config("tiny")
  c.loss.vgg_layers = ("relu1_1", "relu3_1", "relu5_1")
  c.loss.vgg_layer_weights = (1.0, 1.0, 1.0)
  p = stage2.perceptual_network(c)
  assert not p.pretrained and "RANDOM-INIT" in p.label
  x = jnp.asarray(np.random.default_rng(0).random((1, 64, 64, 3)), jnp.float32)
  rms = [float(jnp.sqrt(jnp.mean(f ** 2))) for f in p.module.apply(p.variables, x)]
  assert rms[-1] > 0.2 * rms[0], rms  # He init: no collapse through 13 conv layers


# ------------------------------------------------------------------------------ the step

def test_train_logs_losses_labels_random_vgg_and_weights_terms(trained):
  c, workdir, result = trained
  assert result["step"] == 4
  records = logs.read_jsonl(workdir / "metrics.jsonl")
  train = [r for r in records if "train/g_total" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  assert [r["train/adversarial_factor"] for r in train] == [0.0, 0.5, 1.0, 1.0]
  for r in train:
    assert r["train/vgg_pretrained"] == 0.0 and r["train/flow_overflow"] == 0.0
    adv = r["train/adversarial_factor"]
    total = (adv * (c.loss.gan * r["train/gan"]
                    + c.loss.feature_matching * r["train/feature_matching"])
             + c.loss.perceptual * r["train/perceptual"] + c.loss.l1 * r["train/l1"]
             + c.loss.l2 * r["train/l2"])
    assert c.loss.l1 > 0 and r["train/l1"] > 0 and c.loss.l2 > 0 and r["train/l2"] > 0
    assert r["train/g_total"] == pytest.approx(total, rel=1e-5)
    assert 0.0 < r["train/mask_fg"] < 1.0 and 0.0 < r["train/mask_matting"] < 1.0
    assert "train/mask_pixel" not in r  # "residual" skip: no M_p
  val = [r for r in records if "val/model/psnr" in r]
  assert val and val[-1]["val/vgg_pretrained"] == 0.0 and "val/warp_only/psnr" in val[-1]
  grid = sorted((workdir / "images").glob("val_grid_*.png"))[-1]
  import cv2
  img = cv2.imread(str(grid))
  n = c.data.val_batch_size
  assert img.shape[:2] == (n * 34 + 2, len(stage2.GRID_COLUMNS) * 34 + 2)  # 32 px + 2 px pads
  meta = __import__("hdtf_jax.train.checkpoints", fromlist=["x"]).Checkpointer(
      workdir / "checkpoints").read_meta()
  assert meta["perceptual_vgg"] == stage2.RANDOM_VGG_LABEL


def test_resume_continues_exactly(trained, tmp_path, cache_dir, data):
  c, workdir, _ = trained
  straight = _restore(c, workdir)
  # Restart from the step-2 checkpoint of a copy and run to 4 again.
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "checkpoints" / "4")
  c2 = tiny_config(cache_dir, num_steps=4, checkpoint_every=2, log_every=1, eval_every=0)
  data.train_iter.set_state({"index": 0})  # resume must restore the iterator itself
  stage2.train(c2, copy, data=data, progress=False)
  resumed = _restore(c2, copy)
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit


def test_nan_guard_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir,
                                                                          data):
  c = tiny_config(cache_dir, num_steps=6, checkpoint_every=2, log_every=1, eval_every=0)

  class Poisoned:
    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __next__(self):
      batch = next(self.inner)
      self.count += 1
      if self.count == 3:
        batch = dict(batch, driving=np.full_like(batch["driving"], np.nan))
      return batch

    def get_state(self):
      return self.inner.get_state()

    def set_state(self, s):
      self.inner.set_state(s)

  data.train_iter.set_state({"index": 0})
  poisoned = stage2.Stage2Data(Poisoned(data.train_iter), data.eval_examples,
                               data.steps_per_epoch, "poisoned")
  with pytest.raises(common.NonFiniteLossError) as e:
    stage2.train(c, tmp_path, data=poisoned, progress=False)
  assert e.value.step == 3 and e.value.last_checkpoint == 2
  assert "g_total" in e.value.names
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2]


def test_eight_fake_devices_match_one_device(tmp_path, cache_dir, data):
  """Two steps with the batch split over 8 fake CPU devices (BatchNorm over the global batch)
  give the parameters of the same two steps on one device."""
  rows = data.eval_examples[:8]
  batches = [stage2.model_inputs(synthetic_video.stack(r)) for r in (rows, rows[::-1])]
  (tmp_path / "batches.pkl").write_bytes(pickle.dumps(batches))
  code = textwrap.dedent(f"""
    import json, pickle, sys, numpy as np, jax
    sys.path.insert(0, {str(ROOT)!r})
    from experiments.configs import stage2 as configs
    from hdtf_jax.train import stage2, mesh as mesh_lib
    c = configs.get_config("tiny")
    c.model.generator.update({WARP_START!r})
    c.loss.l1 = 2.0
    c.train.fast_compile = True
    # Adam turns rounding noise in a zero gradient (a conv bias before BatchNorm) into a full
    # +-lr step; a larger epsilon keeps such parameters still, so the comparison is meaningful.
    c.optim.eps = 1e-3
    batches = pickle.loads(open({str(tmp_path / "batches.pkl")!r}, "rb").read())
    perceptual = stage2.perceptual_network(c)
    out = {{}}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
      mesh = mesh_lib.make_mesh({{"data": -1}}, devices)
      prog = stage2.program(c, mesh, 20, 10, perceptual)
      state = stage2.init_state(prog, 0)
      vgg_vars = stage2.replicate(perceptual.variables, mesh)
      ms = []
      for i, b in enumerate(batches):
        state, m = prog.step(state, mesh_lib.shard_batch(b, mesh), vgg_vars)
        ms.append({{k: float(v) for k, v in jax.device_get(m).items()}})
        if i == 0:
          out[name + "_stats"] = jax.device_get(state.batch_stats)
      out[name] = jax.device_get(state)
      out[name + "_metrics"] = ms
    leaves = lambda t: [np.asarray(x) for x in jax.tree_util.tree_leaves(t)]
    diff = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(leaves(a), leaves(b)))
    print(json.dumps({{"n_devices": len(jax.devices()), "metrics": [out["one_metrics"],
                      out["eight_metrics"]], "stats_diff": diff(out["one_stats"], out["eight_stats"]),
                      "g_diff": diff(out["one"].g_params, out["eight"].g_params),
                      "d_diff": diff(out["one"].d_params, out["eight"].d_params),
                      "g_moved": diff(out["one"].g_params, stage2.init_state(prog, 0).g_params)}}))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["n_devices"] == 8
  one, eight = out["metrics"]
  for a, b in zip(one, eight):  # every loss, grad norm and PSNR of both steps
    for k in a:
      assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a[k], b[k])
  assert out["stats_diff"] < 1e-5  # BatchNorm statistics of the global batch
  assert out["g_moved"] > 1e-4
  # Float32 reduction order differs between the layouts; the rest is a tenth of one lr step.
  assert out["g_diff"] < 4e-5 and out["d_diff"] < 4e-5, out


# ------------------------------------------------------------------------------ eval

def test_eval_table_matches_skimage_and_writes_files(trained, data):
  c, workdir, _ = trained
  results = stage2.evaluate_checkpoint(c, workdir, data=data)
  assert results["no_flow"] == "not trained" and results["no_matting"] == "not trained"
  truth = np.stack([e["driving"] for e in data.eval_examples])
  ref = np.stack([e["reference"] for e in data.eval_examples])
  psnr = np.mean([skimage.metrics.peak_signal_noise_ratio(t, r, data_range=1.0)
                  for t, r in zip(truth, ref)])
  ssim = np.mean([skimage.metrics.structural_similarity(
      t, r, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False) for t, r in zip(truth, ref)])
  assert results["reference"]["psnr"] == pytest.approx(psnr, abs=1e-3)
  assert results["reference"]["ssim"] == pytest.approx(ssim, abs=1e-4)
  assert results["warp_only"]["psnr"] > results["reference"]["psnr"]
  assert np.isfinite(results["model"]["psnr"])
  # psnr_mouth: skimage's PSNR of the pixels in each pair's mouth box, averaged over pairs.
  drv = synthetic_video.stack([e["drv_params"] for e in data.eval_examples])
  boxes = stage2.mouth_boxes(drv, truth.shape[1])
  mouth = np.mean([skimage.metrics.peak_signal_noise_ratio(t[b], r[b], data_range=1.0)
                   for t, r, b in zip(truth, ref, boxes)])
  assert results["reference"]["psnr_mouth"] == pytest.approx(mouth, abs=1e-3)
  saved = json.loads((workdir / "eval_4.json").read_text())
  assert saved["results"]["reference"]["psnr"] == pytest.approx(psnr, abs=1e-3)
  md = (workdir / "eval_4.md").read_text()
  for row in ("G_vid w/o F_app | not trained", "warp-only", "reference frame as prediction",
              "RANDOM-INIT"):
    assert row in md
  assert list((workdir / "images").glob("eval_grid_*.png"))


def test_generate_matches_eval_forward(trained, data):
  c, workdir, _ = trained
  state = stage2.restore_state(c, workdir)
  variables = stage2.inference_variables(state)
  ex = data.eval_examples[:3]
  ref = ex[0]["reference"]
  ref_params = ex[0]["ref_params"]
  drv = {k: np.stack([e["drv_params"][k] for e in ex]) for k in stage2.PARAM_KEYS}
  frames = stage2.generate(variables, ref, ref_params, drv, config=c, batch_size=2)
  assert frames.shape == (3, 32, 32, 3) and frames.min() >= 0 and frames.max() <= 1
  same = [dict(e, reference=ref, ref_params=ref_params) for e in ex]
  prog = stage2.program(c, stage2.mesh_lib.make_mesh({"data": -1}), 20, 10,
                        stage2.perceptual_network(c))
  out = stage2.forward_examples(prog, variables, same, 4)
  np.testing.assert_allclose(frames, out["image"], atol=1e-5)


# ------------------------------------------------------------------------------ speed-ups

def test_fast_bilinear_upsample_matches_opencv():
  """hourglass.upsample2 (two 2-tap stencils, for speed) = OpenCV's INTER_LINEAR x2 (half-pixel
  centres, i.e. PyTorch's bilinear with align_corners=False), edges included."""
  import cv2
  from hdtf_jax.nn import hourglass
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  ours = np.asarray(hourglass.upsample2(jnp.asarray(x), "bilinear"))
  ref = np.stack([cv2.resize(im, (14, 10), interpolation=cv2.INTER_LINEAR) for im in x])
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  resized = jax.image.resize(jnp.asarray(x), (2, 10, 14, 3), "bilinear")
  np.testing.assert_allclose(ours, resized, atol=1e-6)
