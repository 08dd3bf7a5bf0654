"""Stage-1 speed: train steps/s and samples/s per preset, and G_ani inference on 60 s of audio.

  python -m benchmarks.stage1                       # tiny (config batch/window) and paper (2 x 256)
  python -m benchmarks.stage1 --presets=paper --batch=8 --window=1000

Train step: our fused step (one jit: G forward, G and D updates from the same fakes) against the
loop a GAN user would port, two jitted calls per step (G update, then D update on the fakes).
Inference: `stage1.predict` (chunked, one compiled shape for every length) against one whole-
sequence call (compiled for each new length: first call and steady state reported).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import optax

from benchmarks.common import block, print_table, time_fn, write_json
from experiments.configs import stage1 as configs
from hdtf_jax import losses
from hdtf_jax.nn import animation, discriminators
from hdtf_jax.train import mesh as mesh_lib
from hdtf_jax.train import stage1

DEFAULT_SHAPES = {"paper": (2, 256)}  # (batch, window) on CPU: the paper's 128 x 1000 is GPU work


def two_call_step(config, prog):
  """The alternating loop: jit 1 updates G (and returns the fakes), jit 2 updates D."""
  gen = animation.AnimationGenerator(config.model)
  discs = discriminators.discriminators_from_config(config.model)
  o = config.optim
  g_tx = optax.adam(prog.schedule, o.b1, o.b2, o.eps)
  d_tx = optax.adam(prog.schedule, o.b1, o.b2, o.eps)

  @jax.jit
  def g_step(state, batch):
    audio = stage1.normalise_audio(batch["audio"], state.stats)
    ident = stage1.prepare_identity(batch["identity"], config.model)
    real = {p: batch[stage1.TARGET_KEY[p]] for p in stage1.PARTS}

    def loss(g_params):
      out, mut = gen.apply({"params": g_params, "batch_stats": state.batch_stats}, audio, ident,
                           train=True, mutable=["batch_stats"])
      logits = {p: discs[p].apply({"params": state.d_params[p]}, out[p], audio)[0]
                for p in stage1.PARTS}
      terms = stage1.generator_loss_terms(out, real, logits, config.loss)
      return sum(config.loss[k] * v for k, v in terms.items()), (out, mut["batch_stats"])

    (_, (out, bs)), grads = jax.value_and_grad(loss, has_aux=True)(state.g_params)
    updates, opt = g_tx.update(grads, state.g_opt_state, state.g_params)
    return state.replace(g_params=optax.apply_updates(state.g_params, updates), batch_stats=bs,
                         g_opt_state=opt), jax.lax.stop_gradient(out)

  @jax.jit
  def d_step(state, batch, fake):
    audio = stage1.normalise_audio(batch["audio"], state.stats)

    def loss(d_params):
      total = 0.0
      for p in stage1.PARTS:
        real = discs[p].apply({"params": d_params[p]}, batch[stage1.TARGET_KEY[p]], audio)[0]
        fk = discs[p].apply({"params": d_params[p]}, fake[p], audio)[0]
        total = total + losses.lsgan_discriminator_loss(real, fk)
      return total

    grads = jax.grad(loss)(state.d_params)
    updates, opt = d_tx.update(grads, state.d_opt_state, state.d_params)
    return state.replace(d_params=optax.apply_updates(state.d_params, updates), d_opt_state=opt,
                         step=state.step + 1)

  def step(state, batch):
    state, fake = g_step(state, batch)
    return d_step(state, batch, fake)
  return step


def bench_train(preset: str, batch: int | None, window: int | None, repeats: int) -> list[dict]:
  config = configs.get_config(preset)
  default_b, default_w = DEFAULT_SHAPES.get(preset, (config.data.batch_size, config.data.window))
  b, w = batch or default_b, window or default_w
  config.data.update(batch_size=b, window=w, stats_batches=1)
  config.data.synthetic.clip_seconds = max(config.data.synthetic.clip_seconds, w / 100 + 1)
  mesh = mesh_lib.make_mesh({"data": -1})
  data = stage1.make_data(config)
  prog = stage1.program(config, mesh, 100, 100)
  batch_np = stage1.model_inputs(next(data.train_iter), config.model)
  sharded = mesh_lib.shard_batch(batch_np, mesh)
  rows = []
  for name, make in (("fused step (ours)", lambda: prog.step),
                     ("two jitted calls (G, then D)", lambda: two_call_step(config, prog))):
    fn = make()
    holder = {"state": stage1.init_state(prog, 0, data.stats)}
    t0 = time.perf_counter()
    holder["state"] = block(fn(holder["state"], sharded))
    if isinstance(holder["state"], tuple):
      holder["state"] = holder["state"][0]
    first_s = time.perf_counter() - t0

    def run():
      out = fn(holder["state"], sharded)
      holder["state"] = block(out[0] if isinstance(out, tuple) else out)

    t = time_fn(run, warmup=1, repeats=repeats)
    rows.append({"preset": preset, "variant": name, "batch": b, "window": w,
                 "compile_plus_first_s": first_s, "step_ms": t["median_ms"],
                 "steps_per_s": 1e3 / t["median_ms"], "samples_per_s": b * 1e3 / t["median_ms"],
                 "frames_per_s": b * w * 1e3 / t["median_ms"]})
  return rows


def bench_inference(preset: str, seconds: float, repeats: int) -> list[dict]:
  config = configs.get_config(preset)
  config.data.update(batch_size=2, stats_batches=1)
  mesh = mesh_lib.make_mesh({"data": -1})
  data = stage1.make_data(config)
  prog = stage1.program(config, mesh, 100, 100)
  variables = stage1.inference_variables(stage1.init_state(prog, 0, data.stats))
  t = int(seconds * 100)
  audio = np.random.default_rng(0).normal(0, 1, (t, 15)).astype(np.float32)
  ident = np.asarray(data.eval_examples[0][stage1.IDENTITY_KEY[config.model.identity.kind]])
  chunk = config.data.window
  rows = []
  t0 = time.perf_counter()
  stage1.predict(variables, audio, ident, model_config=config.model, chunk=chunk)
  first = time.perf_counter() - t0
  r = time_fn(lambda: stage1.predict(variables, audio, ident, model_config=config.model,
                                     chunk=chunk, overlap=chunk // 5), warmup=0, repeats=repeats)
  rows.append({"preset": preset, "variant": f"predict, chunks of {chunk} (ours)",
               "audio_s": seconds,
               "first_call_s": first, "steady_ms": r["median_ms"],
               "x_realtime": seconds * 1e3 / r["median_ms"]})
  forward = stage1._forward(config.model.to_json())
  whole = lambda x: block(forward(variables, x[None], ident[None]))
  t0 = time.perf_counter()
  whole(audio)
  first = time.perf_counter() - t0
  r = time_fn(lambda: whole(audio), warmup=0, repeats=repeats)
  t0 = time.perf_counter()
  whole(audio[:-1])  # one frame shorter: a new shape, a new compile
  other = time.perf_counter() - t0
  rows.append({"preset": preset, "variant": "one whole-sequence call", "audio_s": seconds,
               "first_call_s": first, "steady_ms": r["median_ms"],
               "x_realtime": seconds * 1e3 / r["median_ms"], "new_length_call_s": other})
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="tiny,paper")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default per preset)")
  parser.add_argument("--window", type=int, default=None,
                      help="frames per window (default per preset)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--audio_seconds", type=float, default=60.0)
  parser.add_argument("--out", default=None)
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and few repeats (benchmarks/run_all.py --quick)")
  args = parser.parse_args(argv)
  if args.quick:
    args.presets, args.repeats, args.audio_seconds = "tiny", 2, 10.0
  train_rows, infer_rows = [], []
  for preset in args.presets.split(","):
    train_rows += bench_train(preset, args.batch, args.window, args.repeats)
    infer_rows += bench_inference(preset, args.audio_seconds, max(1, args.repeats // 2))
  device = jax.devices()[0].device_kind
  print(f"\nTrain step ({device})")
  print_table(train_rows, ["preset", "variant", "batch", "window", "compile_plus_first_s",
                           "step_ms", "steps_per_s", "samples_per_s"])
  print(f"\nInference on {args.audio_seconds:g} s of audio ({device})")
  print_table(infer_rows, ["preset", "variant", "first_call_s", "steady_ms", "x_realtime",
                           "new_length_call_s"])
  write_json("stage1", {"device": device, "train": train_rows, "inference": infer_rows}, args.out)


if __name__ == "__main__":
  main()
