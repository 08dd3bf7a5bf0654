"""Where the train steps and generation spend their time: per-part splits and a JAX profiler trace.

Stage 2 (default, `--stage 2`):

The whole step (`hdtf_jax.train.stage2`: F_app from parameters on device, G_vid forward and
backward, D_vid on real and fake, VGG-19 perceptual features of both, Adam) is timed, and each
part is timed again on its own, jitted alone, on the same shapes:

  flow_app        F_app of every (reference, driving) pair from their 3DMM parameters
  gvid_fwd        G_vid forward (train mode)
  gvid_fwd_bwd    G_vid forward + backward (gradients of all its parameters)
  vgg_fwd_bwd     VGG-19 features of generated + real frames, backward to the generated ones
  dvid_fwd_bwd    D_vid on generated + real frames, gradients of its parameters and its input

Shares are of the whole step (they need not sum to 1: XLA fuses across parts in the real step,
and the optimizer update and loss arithmetic are left out). `--trace DIR` also writes a
`jax.profiler` trace of a few whole steps (open with TensorBoard's profile plugin / XProf).

`--compare-conv` times the whole step and G_vid forward + backward with XLA's own conv gradients
(`HDTF_JAX_CONV=xla`) against `hdtf_jax.nn.conv`'s CPU weight gradients, both compiled in one
process and called in turns (medians; fair on a shared, loaded machine).

Stage 1 (`--stage 1 [--preset paper]`, the config's batch and window, 2 x 256 for paper as in
benchmarks/stage1.py): the whole fused step (G_ani forward + backward, the three discriminators'
updates, Adam), and alone: data (next batch from the synthetic source to the device), G_ani
forward (train mode), G_ani forward + backward (through the three discriminators, as its loss
does), the three discriminators' forward + backward on real + fake.

Generation (`--generate [--presets demo/demo]`): `generate.generate_video` end to end on the
astronaut image and `--seconds` of a synthetic voice (random-init weights, a first call compiles),
split into face fit, audio features, G_ani, F_app + G_vid, and H.264 encode (time the loop spends
blocked writing frames to ffmpeg, plus its close/mux).

  .venv/bin/python -m benchmarks.profile [--size 128] [--batch 1] [--trace DIR]
  .venv/bin/python -m benchmarks.profile --size 128 --compare-conv [--repeats 10]
  .venv/bin/python -m benchmarks.profile --stage 1 [--preset paper] [--trace DIR]
  .venv/bin/python -m benchmarks.profile --generate [--presets demo/demo] [--seconds 4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import block, print_table, time_fn, write_json  # noqa: E402
from benchmarks.stage2 import train_case  # noqa: E402


def profile_stage2(size: int, batch: int, dtype: str, repeats: int, trace: str | None) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from hdtf_jax.face import morphable
  from hdtf_jax.nn import patch_discriminator, video
  from hdtf_jax.train import stage2

  c, prog, state, sharded, vgg_vars = train_case(size, dtype, batch)
  gen = video.VideoGenerator(c.model)
  disc = patch_discriminator.patch_discriminator(c.model)
  vgg = stage2.perceptual_network(c).module
  face_model = morphable.default_model()
  fsize, fcfg = stage2.flow_size(c.model), stage2.flow_config(c)
  g_vars = {"params": state.g_params, **({"batch_stats": state.batch_stats}
                                         if state.batch_stats else {})}
  reference, driving = sharded["reference"], sharded["driving"]

  flow_fn = jax.jit(lambda r, d: stage2.app_flow(face_model, r, d, fsize, fcfg)[0])
  f_app = block(flow_fn(sharded["ref_params"], sharded["drv_params"]))

  def g_apply(params, ref, grid):
    v = dict(g_vars, params=params)
    out, _ = gen.apply(v, ref, grid, train=True, mutable=["batch_stats"])
    return out["image"]

  g_fwd = jax.jit(g_apply)
  g_fwd_bwd = jax.jit(jax.grad(lambda p, r, g: jnp.mean(g_apply(p, r, g) ** 2)))
  both = jnp.concatenate([driving, driving], axis=0)

  def vgg_loss(fake, real):
    feats = vgg.apply(vgg_vars, jnp.concatenate([fake, real], axis=0))
    return sum(jnp.mean(jnp.abs(f[:batch] - jax.lax.stop_gradient(f[batch:]))) for f in feats)
  vgg_fwd_bwd = jax.jit(jax.grad(vgg_loss))

  def d_loss(d_params, images):
    logits, feats = disc.apply({"params": d_params}, images)
    logits = logits if isinstance(logits, (list, tuple)) else [logits]
    return sum(jnp.mean(x ** 2) for x in logits) + sum(jnp.mean(f) for f in jax.tree_util.tree_leaves(feats))
  d_fwd_bwd = jax.jit(jax.grad(d_loss, argnums=(0, 1)))

  # The step donates its state: keep copies of the parameters for the parts timed alone.
  g_params = jax.tree_util.tree_map(jnp.copy, state.g_params)
  d_params = jax.tree_util.tree_map(jnp.copy, state.d_params)
  box = [state]

  def whole():
    box[0], m = prog.step(box[0], sharded, vgg_vars)
    return m

  parts = {
      "whole step": whole,
      "flow_app": lambda: flow_fn(sharded["ref_params"], sharded["drv_params"]),
      "gvid_fwd": lambda: g_fwd(g_params, reference, f_app),
      "gvid_fwd_bwd": lambda: g_fwd_bwd(g_params, reference, f_app),
      "vgg_fwd_bwd": lambda: vgg_fwd_bwd(driving, driving),
      "dvid_fwd_bwd": lambda: d_fwd_bwd(d_params, both),
  }
  rows = _time_parts(parts, repeats, size=size, batch=batch, dtype=dtype)
  _trace(trace, whole, "stage-2")
  return rows


def _time_parts(parts: dict, repeats: int, **fields) -> list[dict]:
  """Median ms of each part (the first is the whole step); shares of the first."""
  rows, whole_ms = [], None
  for name, fn in parts.items():
    t = time_fn(lambda: block(fn()), warmup=1, repeats=repeats)
    whole_ms = t["median_ms"] if whole_ms is None else whole_ms
    rows.append({"part": name, **fields, "median_ms": t["median_ms"],
                 "share_of_step": t["median_ms"] / whole_ms})
  return rows


def compare_conv(size: int, batch: int, dtype: str, rounds: int) -> list[dict]:
  """The stage-2 step and G_vid forward + backward with XLA's own conv gradients
  (`HDTF_JAX_CONV=xla`) vs `hdtf_jax.nn.conv`'s CPU weight gradients ("auto"): both compiled in
  this process (caches cleared between), then called in turns, `rounds` times; medians."""
  import os
  import statistics
  import time
  import jax
  import jax.numpy as jnp
  from hdtf_jax.face import morphable
  from hdtf_jax.nn import video
  from hdtf_jax.train import stage2

  c, prog, state, sharded, vgg_vars = train_case(size, dtype, batch)
  gen = video.VideoGenerator(c.model)
  fsize, fcfg = stage2.flow_size(c.model), stage2.flow_config(c)
  face_model = morphable.default_model()
  flow_fn = jax.jit(lambda r, d: stage2.app_flow(face_model, r, d, fsize, fcfg)[0])
  f_app = block(flow_fn(sharded["ref_params"], sharded["drv_params"]))
  g_vars = {"params": state.g_params, **({"batch_stats": state.batch_stats}
                                         if state.batch_stats else {})}

  def g_loss(params, ref, grid):
    out, _ = gen.apply(dict(g_vars, params=params), ref, grid, train=True,
                       mutable=["batch_stats"])
    return jnp.mean(out["image"] ** 2)

  g_params = jax.tree_util.tree_map(jnp.copy, state.g_params)
  args = (g_params, sharded["reference"], f_app)
  before = os.environ.get("HDTF_JAX_CONV")
  variants, states, steps, grads = ("xla", "auto"), {}, {}, {}
  try:
    for v in variants:  # the switch is read at trace time: trace and compile each afresh
      os.environ["HDTF_JAX_CONV"] = v
      jax.clear_caches()
      states[v] = jax.tree_util.tree_map(jnp.copy, state)
      steps[v] = jax.jit(prog.step.__wrapped__, donate_argnums=0).lower(
          states[v], sharded, vgg_vars).compile()
      grads[v] = jax.jit(jax.grad(g_loss)).lower(*args).compile()
  finally:
    os.environ.pop("HDTF_JAX_CONV") if before is None else os.environ.update(HDTF_JAX_CONV=before)
  times = {(part, v): [] for part in ("whole step", "gvid_fwd_bwd") for v in variants}
  loads = []
  for r in range(rounds + 1):  # round 0 warms up
    loads.append(os.getloadavg()[0])
    for v in variants:
      t0 = time.perf_counter()
      states[v], m = steps[v](states[v], sharded, vgg_vars)
      block((states[v], m))
      t1 = time.perf_counter()
      block(grads[v](*args))
      if r:
        times[("whole step", v)].append((t1 - t0) * 1e3)
        times[("gvid_fwd_bwd", v)].append((time.perf_counter() - t1) * 1e3)
  load = statistics.fmean(loads)
  return [{"part": part, "size": size, "batch": batch, "dtype": dtype,
           "xla_conv_ms": statistics.median(times[(part, "xla")]),
           "conv_py_ms": statistics.median(times[(part, "auto")]),
           "speedup": statistics.median(times[(part, "xla")]) / statistics.median(
               times[(part, "auto")]), "rounds": rounds, "load_avg": load}
          for part in ("whole step", "gvid_fwd_bwd")]


def _trace(trace: str | None, whole, what: str) -> None:
  """A `jax.profiler` trace of 3 whole steps into directory `trace` (if given)."""
  if trace:
    import jax
    with jax.profiler.trace(trace):
      for _ in range(3):
        block(whole())
    print(f"wrote a jax.profiler trace of 3 whole {what} steps to {trace}")


def profile_stage1(preset: str, repeats: int, trace: str | None) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from benchmarks.stage1 import DEFAULT_SHAPES
  from experiments.configs import stage1 as configs
  from hdtf_jax import losses
  from hdtf_jax.nn import animation, discriminators
  from hdtf_jax.train import mesh as mesh_lib
  from hdtf_jax.train import stage1

  config = configs.get_config(preset)
  b, w = DEFAULT_SHAPES.get(preset, (config.data.batch_size, config.data.window))
  config.data.update(batch_size=b, window=w, stats_batches=1)
  config.data.synthetic.clip_seconds = max(config.data.synthetic.clip_seconds, w / 100 + 1)
  mesh = mesh_lib.make_mesh({"data": -1})
  data = stage1.make_data(config)
  prog = stage1.program(config, mesh, 100, 100)
  batch = mesh_lib.shard_batch(stage1.model_inputs(next(data.train_iter), config.model), mesh)
  state = stage1.init_state(prog, 0, data.stats)
  gen = animation.AnimationGenerator(config.model)
  discs = discriminators.discriminators_from_config(config.model)
  parts_ = stage1.PARTS
  # The step donates its state: copies for the parts timed alone.
  g_params, d_params, batch_stats, stats = jax.tree_util.tree_map(
      jnp.copy, (state.g_params, state.d_params, state.batch_stats, state.stats))

  def g_apply(params, batch):
    audio = stage1.normalise_audio(batch["audio"], stats)
    ident = stage1.prepare_identity(batch["identity"], config.model)
    out, _ = gen.apply({"params": params, "batch_stats": batch_stats}, audio, ident, train=True,
                       mutable=["batch_stats"])
    return out, audio

  g_fwd = jax.jit(lambda p, bt: g_apply(p, bt)[0])

  def g_loss(params, batch):
    out, audio = g_apply(params, batch)
    return sum(jnp.mean(discs[k].apply({"params": d_params[k]}, out[k], audio)[0] ** 2)
               + jnp.mean(jnp.abs(out[k] - batch[stage1.TARGET_KEY[k]])) for k in parts_)
  g_fwd_bwd = jax.jit(jax.grad(g_loss))
  fake = jax.tree_util.tree_map(jnp.copy, g_fwd(g_params, batch))

  def d_loss(params, batch, fake):
    audio = stage1.normalise_audio(batch["audio"], stats)
    both = jnp.concatenate([audio, audio])
    total = 0.0
    for k in parts_:
      logits = discs[k].apply({"params": params[k]}, jnp.concatenate(
          [batch[stage1.TARGET_KEY[k]], fake[k]]), both)[0]
      total += losses.lsgan_discriminator_loss(logits[:b], logits[b:])
    return total
  d_fwd_bwd = jax.jit(jax.grad(d_loss))
  box = [state]

  def whole():
    box[0], m = prog.step(box[0], batch)
    return m

  parts = {
      "whole step": whole,
      "data": lambda: mesh_lib.shard_batch(stage1.model_inputs(next(data.train_iter),
                                                               config.model), mesh),
      "gani_fwd": lambda: g_fwd(g_params, batch),
      "gani_fwd_bwd": lambda: g_fwd_bwd(g_params, batch),
      "discs_fwd_bwd": lambda: d_fwd_bwd(d_params, batch, fake),
  }
  rows = _time_parts(parts, repeats, stage=1, preset=preset, batch=b, window=w)
  _trace(trace, whole, "stage-1")
  return rows


def profile_generate(presets: str, seconds: float, batch: int) -> list[dict]:
  import tempfile
  import cv2
  import skimage.data
  from benchmarks.generate import _models, _voice
  from hdtf_jax import generate as G
  image = cv2.resize(skimage.data.astronaut(), (1024, 1024), interpolation=cv2.INTER_CUBIC)
  rows = []
  with tempfile.TemporaryDirectory() as d:
    tmp = Path(d)
    audio = _voice(tmp / "voice.wav", seconds)
    for pair in presets.split(","):
      p1, p2 = pair.split("/")
      models, _ = _models(p1, p2, image)
      G.generate_video(image, audio, tmp / "cold.mp4", models, batch_size=batch)  # compiles
      s = G.generate_video(image, audio, tmp / "out.mp4", models, batch_size=batch)
      t, total = s["timings"], s["seconds"]
      named = {"face fit": t["face_fit_s"], "audio features": t["audio_features_s"],
               "G_ani": t["animate_s"], "F_app + G_vid": t["render_s"],
               "H.264 encode (blocked on ffmpeg)": t["encode_s"]}
      named["other"] = total - sum(named.values())
      rows.append({"part": "end to end", "presets": pair, "size": models.image_size,
                   "frames": s["frames"], "seconds": total, "share": 1.0})
      rows += [{"part": k, "presets": pair, "size": models.image_size, "frames": s["frames"],
                "seconds": v, "share": v / total} for k, v in named.items()]
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--stage", type=int, default=2, choices=(1, 2))
  ap.add_argument("--generate", action="store_true", help="profile generation instead")
  ap.add_argument("--preset", default="paper", help="--stage 1: stage-1 config preset")
  ap.add_argument("--presets", default="demo/demo", help="--generate: stage1/stage2 pairs")
  ap.add_argument("--seconds", type=float, default=4.0, help="--generate: audio length")
  ap.add_argument("--compare-conv", action="store_true",
                  help="stage 2: XLA's conv gradients vs hdtf_jax.nn.conv's, in turns")
  ap.add_argument("--size", type=int, default=128, choices=(128, 256, 512))
  ap.add_argument("--batch", type=int, default=None,
                  help="stage 2: batch (default 1); --generate: G_vid frames per call (default 8)")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--trace", default=None, help="directory for a jax.profiler trace")
  ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
  ap.add_argument("--quick", action="store_true", help="fewer repeats (run_all's smoke mode)")
  args = ap.parse_args(argv)
  repeats = 2 if args.quick else args.repeats
  if args.generate:
    rows, name = profile_generate(args.presets, args.seconds, args.batch or 8), "profile_generate"
  elif args.compare_conv:
    rows, name = compare_conv(args.size, args.batch or 1, args.dtype, max(repeats, 3)), \
        "profile_conv"
  elif args.stage == 1:
    rows, name = profile_stage1(args.preset, repeats, args.trace), "profile_stage1"
  else:
    rows, name = profile_stage2(args.size, args.batch or 1, args.dtype, repeats, args.trace), \
        "profile"
  print_table(rows)
  write_json(name, rows, args.out)


if __name__ == "__main__":
  main()
