"""Where the stage-2 train step spends its time: a per-part split and a JAX profiler trace.

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

  .venv/bin/python -m benchmarks.profile [--size 128] [--batch 1] [--trace DIR]
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
  rows, whole_ms = [], None
  for name, fn in parts.items():
    t = time_fn(lambda: block(fn()), warmup=1, repeats=repeats)
    whole_ms = t["median_ms"] if whole_ms is None else whole_ms
    rows.append({"part": name, "size": size, "batch": batch, "dtype": dtype,
                 "median_ms": t["median_ms"], "share_of_step": t["median_ms"] / whole_ms})
  if trace:
    with jax.profiler.trace(trace):
      for _ in range(3):
        block(whole())
    print(f"wrote a jax.profiler trace of 3 whole steps to {trace}")
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", type=int, default=128, choices=(128, 256, 512))
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--trace", default=None, help="directory for a jax.profiler trace")
  ap.add_argument("--quick", action="store_true", help="fewer repeats (run_all's smoke mode)")
  args = ap.parse_args(argv)
  rows = profile_stage2(args.size, args.batch, args.dtype, 2 if args.quick else args.repeats,
                        args.trace)
  print_table(rows)
  write_json("profile", rows)


if __name__ == "__main__":
  main()
