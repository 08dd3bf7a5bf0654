"""Stage-2 speed: G_vid inference frames/s and the full train step img/s, with FLOPs and memory.

For each image size (the `demo` preset at 128, the published widths at 256 and 512) and compute
dtype (float32; bfloat16 with float32 params), each case in a fresh subprocess:

  infer   jitted eval-mode G_vid on (reference, F_app) at batch `--batch` (default 1):
          frames/s, GFLOP per frame from XLA's cost analysis, achieved GFLOP/s;
  train   the whole stage-2 step of `hdtf_jax.train.stage2` (F_app from parameters on device,
          G_vid forward/backward, D_vid, VGG-19 perceptual to relu5_1 (relu3_1 for demo), Adam)
          at batch `--train-batch`: images/s, GFLOP per image, achieved GFLOP/s;
  peak memory: the child's peak host RSS on CPU, `peak_bytes_in_use` of the device on GPU.
Each row also records the 1-minute load average around it: figures taken while other work
shares the cores are slower than the machine can do.

Compared in the same run:
  torch   the same G_vid in PyTorch (the authors' framework; our re-statement of the
          architecture, NCHW and channels_last, best of the two reported), eval mode, no grad;
  conv    one large 3x3 convolution (1 x 128 x 128 x 256 -> 256) in JAX: what one kernel of
          this kind reaches on this machine, the ceiling for a conv network.

  .venv/bin/python -m benchmarks.stage2 [--sizes 128,256,512] [--dtypes float32,bfloat16]
      [--modes infer,train] [--batch 1] [--train-batch 1] [--no-torch]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `hdtf_jax` importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, print_table, write_json  # noqa: E402

PRESET_OF_SIZE = {128: "demo", 256: "256", 512: "paper"}


# ------------------------------------------------------------------------------ one case (child)

def _peak_memory_mb() -> float:
  import jax
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2 ** 20
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _flops(lowered) -> float:
  """FLOPs from XLA's cost analysis of the lowered, not yet optimised, HLO: it counts every
  convolution on every backend, while a GPU executable's analysis leaves out the convolutions
  that run as cuDNN custom calls (measured on an H200: 0.73 of G_vid's 235 GFLOP per 512 px
  frame). On CPU both give the same count."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan")))


def _config(size: int, dtype: str):
  from experiments.configs import stage2 as configs
  c = configs.get_config(PRESET_OF_SIZE[size])
  c.model.dtype = dtype
  c.loss.update(vgg_weights="", vgg_random_init=True)  # speed does not depend on the weights
  return c


def _timed(fn, repeats: int, min_time_s: float):
  from benchmarks.common import block, time_fn
  return time_fn(lambda: block(fn()), warmup=1, repeats=repeats, min_time_s=min_time_s)


def run_infer(size: int, dtype: str, batch: int, repeats: int) -> dict:
  import time
  import jax
  import jax.numpy as jnp
  import numpy as np
  from hdtf_jax.nn import video
  c = _config(size, dtype)
  gen = video.VideoGenerator(c.model)
  ref, grid = video.dummy_inputs(c.model, batch)
  rng = np.random.default_rng(0)
  ref = rng.random(ref.shape).astype(np.float32)
  grid = grid + rng.normal(0, 0.02, grid.shape).astype(np.float32)
  variables = jax.jit(gen.init)(jax.random.PRNGKey(0), ref, grid)
  fwd = jax.jit(lambda v, r, g: gen.apply(v, r, g)["image"])
  t0 = time.perf_counter()
  lowered = fwd.lower(variables, ref, grid)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = _flops(lowered) / batch
  ref, grid = jnp.asarray(ref), jnp.asarray(grid)
  t = _timed(lambda: compiled(variables, ref, grid), repeats, 5.0)
  s = t["median_ms"] / 1e3
  return {"mode": "infer", "size": size, "dtype": dtype, "batch": batch,
          "frames_per_s": batch / s, "ms_per_batch": t["median_ms"], "gflop_per_frame": flops / 1e9,
          "gflop_per_s": flops * batch / s / 1e9, "compile_s": compile_s,
          "peak_memory_mb": _peak_memory_mb()}


def train_case(size: int, dtype: str, batch: int):
  """(config, program, state, sharded batch, VGG variables) of one stage-2 train step on random
  images and parameter pairs of the default model's mean face (also used by benchmarks/profile)."""
  import numpy as np
  from hdtf_jax.data import synthetic_video
  from hdtf_jax.face import morphable
  from hdtf_jax.train import mesh as mesh_lib
  from hdtf_jax.train import stage2
  c = _config(size, dtype)
  c.data.batch_size = batch
  perceptual = stage2.perceptual_network(c)
  mesh = mesh_lib.make_mesh({"data": -1})
  prog = stage2.program(c, mesh, 1000, 1000, perceptual)
  state = stage2.init_state(prog, 0)
  vgg_vars = stage2.replicate(perceptual.variables, mesh)
  # A batch of parameter pairs of the default model's mean face with random motion.
  model = morphable.default_model()
  rng = np.random.default_rng(0)
  base = {"shape": np.zeros(model.n_shape, np.float32), "scale": np.float32(0.2),
          "mouth": np.zeros(model.n_mouth, np.float32),
          "eyebrow": np.zeros(model.n_eyebrow, np.float32),
          "pose": np.array([0, 0, 0, 0.5, 0.45], np.float32)}
  params = synthetic_video.random_params(model, base, 2 * batch, rng)
  images = rng.random((2, batch, size, size, 3)).astype(np.float32)
  batch_np = {"reference": images[0], "driving": images[1],
              "ref_params": {k: v[:batch] for k, v in params.items()},
              "drv_params": {k: v[batch:] for k, v in params.items()}}
  sharded = mesh_lib.shard_batch(batch_np, mesh)
  return c, prog, state, sharded, vgg_vars


def run_train(size: int, dtype: str, batch: int, repeats: int) -> dict:
  import time
  c, prog, state, sharded, vgg_vars = train_case(size, dtype, batch)
  t0 = time.perf_counter()
  lowered = prog.step.lower(state, sharded, vgg_vars)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = _flops(lowered) / batch
  box = [state]

  def one():
    box[0], m = compiled(box[0], sharded, vgg_vars)
    return m
  t = _timed(one, repeats, 5.0)
  s = t["median_ms"] / 1e3
  return {"mode": "train", "size": size, "dtype": dtype, "batch": batch,
          "images_per_s": batch / s, "ms_per_batch": t["median_ms"],
          "gflop_per_image": flops / 1e9, "gflop_per_s": flops * batch / s / 1e9,
          "compile_s": compile_s, "peak_memory_mb": _peak_memory_mb(),
          "vgg_layers": list(c.loss.vgg_layers)}


def run_conv(repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  x = jnp.ones((1, 128, 128, 256), jnp.float32)
  w = jnp.full((3, 3, 256, 256), 0.01, jnp.float32)
  f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  lowered = f.lower(x, w)
  compiled = lowered.compile()
  flops = _flops(lowered)
  t = _timed(lambda: compiled(x, w), repeats, 3.0)
  return {"mode": "conv3x3", "size": 128, "dtype": "float32", "batch": 1,
          "ms_per_batch": t["median_ms"], "gflop_per_s": flops / (t["median_ms"] / 1e3) / 1e9,
          "peak_memory_mb": _peak_memory_mb()}


def run_torch(size: int, dtype: str, batch: int, repeats: int) -> dict:
  import time
  import torch
  from benchmarks.common import time_fn
  from experiments.configs import stage2 as configs
  c = configs.get_config(PRESET_OF_SIZE[size]).model
  torch.manual_seed(0)
  best = None
  for layout in ("channels_last", "nchw"):
    net = TorchGVid(c).eval()
    ref = torch.rand(batch, 3, size, size)
    s = size // 4
    grid = torch.stack(torch.meshgrid(torch.linspace(-1 + 1 / s, 1 - 1 / s, s),
                                      torch.linspace(-1 + 1 / s, 1 - 1 / s, s),
                                      indexing="xy"), -1)[None].repeat(batch, 1, 1, 1)
    if layout == "channels_last":
      net = net.to(memory_format=torch.channels_last)
      ref = ref.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def fwd():
      with torch.inference_mode(), autocast:
        return net(ref, grid)
    t0 = time.perf_counter()
    fwd()
    first_s = time.perf_counter() - t0
    t = time_fn(fwd, warmup=1, repeats=repeats, min_time_s=5.0)
    if best is None or t["median_ms"] < best["ms_per_batch"]:
      best = {"mode": "torch_infer", "size": size, "dtype": dtype, "batch": batch,
              "layout": layout, "frames_per_s": batch / (t["median_ms"] / 1e3),
              "ms_per_batch": t["median_ms"], "first_call_s": first_s,
              "torch_threads": torch.get_num_threads()}
  best["peak_memory_mb"] = _peak_memory_mb()
  return best


def _torch_modules():
  import torch
  import torch.nn.functional as F
  from torch import nn

  def cna(cin, cout, k, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2), nn.BatchNorm2d(cout), nn.ReLU())

  class Res(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.n1, self.c1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1)
      self.n2, self.c2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
      return x + self.c2(F.relu(self.n2(self.c1(F.relu(self.n1(x))))))

  class UNet(nn.Module):
    def __init__(self, cin, width, max_width, depth):
      super().__init__()
      widths = [min(max_width, width * 2 ** (i + 1)) for i in range(depth)]
      ins = [cin] + widths[:-1]
      self.down = nn.ModuleList(cna(i, o, 3) for i, o in zip(ins, widths))
      up_out = [min(max_width, width * 2 ** i) for i in range(depth)]
      up_in = [widths[-1]] + [up_out[i + 1] + ins[i + 1] for i in reversed(range(depth - 1))]
      self.up = nn.ModuleList(cna(i, o, 3) for i, o in zip(up_in, reversed(up_out)))

    def forward(self, x):
      skips = [x]
      for d in self.down:
        skips.append(F.avg_pool2d(d(skips[-1]), 2))
      h = skips.pop()
      for u in self.up:
        h = torch.cat([u(F.interpolate(h, scale_factor=2, mode="nearest")), skips.pop()], 1)
      return h

  class GVid(nn.Module):
    """G_vid as `hdtf_jax.nn.video` builds it (encoder, U-Net hourglass, heads, matting,
    residual blocks, bilinear upsample + conv decoder), for timing only."""

    def __init__(self, cfg):
      super().__init__()
      g, hg = cfg.generator, cfg.hourglass
      w = list(g.encoder_widths)
      self.enc = nn.Sequential(cna(3, w[0], g.stem_kernel),
                               *[cna(a, b, 3, 2) for a, b in zip(w[:-1], w[1:])])
      self.hg = UNet(8, hg.width, hg.max_width, hg.depth)
      hc = hg.width + 8
      self.head_fg = nn.Conv2d(hc, 1, g.head_kernel, 1, g.head_kernel // 2)
      self.head_m = nn.Conv2d(hc, 1, g.head_kernel, 1, g.head_kernel // 2)
      self.head_g = nn.Conv2d(hc, w[-1], g.head_kernel, 1, g.head_kernel // 2)
      self.res = nn.Sequential(*[Res(w[-1]) for _ in range(g.num_res_blocks)])
      self.up = nn.ModuleList(cna(a, b, 3) for a, b in zip(w[::-1][:-1], w[::-1][1:]))
      self.out = nn.Conv2d(w[0], 3, g.out_kernel, 1, g.out_kernel // 2)
      self.scale = 2 ** (len(w) - 1)

    def forward(self, ref, grid):
      f = self.enc(ref)
      small = F.avg_pool2d(ref, self.scale)
      ident = torch.stack(torch.meshgrid(
          torch.linspace(-1 + 1 / f.shape[3], 1 - 1 / f.shape[3], f.shape[3]),
          torch.linspace(-1 + 1 / f.shape[2], 1 - 1 / f.shape[2], f.shape[2]),
          indexing="xy"), -1)[None]
      warped = F.grid_sample(small, grid, align_corners=False)
      feats = self.hg(torch.cat([small, (grid - ident).permute(0, 3, 1, 2), warped], 1))
      m_f, m_m = torch.sigmoid(self.head_fg(feats)), torch.sigmoid(self.head_m(feats))
      flow = grid * m_f.permute(0, 2, 3, 1) + ident * (1 - m_f.permute(0, 2, 3, 1))
      x = F.grid_sample(f, flow, align_corners=False) * m_m + self.head_g(feats) * (1 - m_m)
      x = self.res(x)
      for u in self.up:
        x = u(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
      big = F.interpolate((flow - ident).permute(0, 3, 1, 2), size=ref.shape[2:],
                          mode="bilinear", align_corners=False)
      big_ident = torch.stack(torch.meshgrid(
          torch.linspace(-1 + 1 / ref.shape[3], 1 - 1 / ref.shape[3], ref.shape[3]),
          torch.linspace(-1 + 1 / ref.shape[2], 1 - 1 / ref.shape[2], ref.shape[2]),
          indexing="xy"), -1)[None]
      warped_ref = F.grid_sample(ref, big.permute(0, 2, 3, 1) + big_ident, align_corners=False)
      return torch.sigmoid(self.out(x)), warped_ref

  return GVid


def TorchGVid(cfg):  # noqa: N802 - a class factory (torch is imported lazily)
  return _torch_modules()(cfg)


def child(spec: dict) -> dict:
  load = os.getloadavg()[0]
  row = _child(spec)
  row["load_avg_1min"] = round(max(load, os.getloadavg()[0]), 2)  # other work on the machine
  return row


def _child(spec: dict) -> dict:
  mode = spec["mode"]
  if mode == "infer":
    return run_infer(spec["size"], spec["dtype"], spec["batch"], spec["repeats"])
  if mode == "train":
    return run_train(spec["size"], spec["dtype"], spec["batch"], spec["repeats"])
  if mode == "torch":
    return run_torch(spec["size"], spec["dtype"], spec["batch"], spec["repeats"])
  if mode == "conv":
    return run_conv(spec["repeats"])
  raise ValueError(f"unknown mode {mode!r}")


# ------------------------------------------------------------------------------ driver

def run_case(spec: dict, timeout: int) -> dict:
  """One case in a fresh interpreter, so peak memory and compile caches are its own."""
  cmd = [sys.executable, "-m", "benchmarks.stage2", "--child", json.dumps(spec)]
  root = Path(__file__).resolve().parent.parent
  try:
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**spec, "error": f"timed out after {timeout} s"}
  if res.returncode != 0:
    return {**spec, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else
            f"exit {res.returncode}"}
  return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="128,256,512")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--modes", default="infer,train")
  parser.add_argument("--batch", type=int, default=1, help="inference batch")
  parser.add_argument("--train-batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per case")
  parser.add_argument("--out", default=None)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and few repeats (benchmarks/run_all.py --quick)")
  args = parser.parse_args(argv)
  if args.quick:
    args.sizes, args.dtypes, args.repeats = "128", "float32", 1
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return
  sizes = [int(s) for s in args.sizes.split(",")]
  dtypes = args.dtypes.split(",")
  modes = args.modes.split(",")
  specs = [{"mode": "conv", "repeats": args.repeats}]
  for size in sizes:
    for dtype in dtypes:
      if "infer" in modes:
        specs.append({"mode": "infer", "size": size, "dtype": dtype, "batch": args.batch,
                      "repeats": args.repeats})
        if not args.no_torch:
          specs.append({"mode": "torch", "size": size, "dtype": dtype, "batch": args.batch,
                        "repeats": args.repeats})
      if "train" in modes:
        specs.append({"mode": "train", "size": size, "dtype": dtype, "batch": args.train_batch,
                      "repeats": args.repeats})
  rows = []
  for spec in specs:
    row = run_case(spec, args.timeout)
    rows.append(row)
    print(json.dumps(row), flush=True)
  print()
  print_table(rows, ["mode", "size", "dtype", "batch", "frames_per_s", "images_per_s",
                     "ms_per_batch", "gflop_per_frame", "gflop_per_image", "gflop_per_s",
                     "peak_memory_mb", "layout", "load_avg_1min", "error"])
  info = machine()
  write_json("stage2", {"device": info.get("jax_devices", ["?"])[0], "rows": rows,
                        "notes": "torch rows: our PyTorch re-statement of G_vid, best layout; "
                                 "conv3x3: one 1x128x128x256->256 conv in JAX (ceiling)"},
             args.out)


if __name__ == "__main__":
  main()
