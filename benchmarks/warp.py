"""grid_sample speed: hdtf_jax.warp vs a memory copy and PyTorch, same run.

For each shape (N, H, W, C) it times, after warm-up, the median of repeated
runs of
  fwd     grid_sample(image, grid) (bilinear, zeros, align_corners=False)
  fwd+bwd value and gradients w.r.t. image and grid of <grid_sample(...), g>
for both CPU implementations of hdtf_jax.warp.grid_sample:
  native  the C++ kernel (hdtf_jax/native, an XLA FFI custom call)
  xla     the pure-XLA path (what accelerators, and CPUs without a compiler, run)
("path" says which one grid_sample picks by default for the shape) and
compares with
  copy    a jitted `x + 0` moving the same number of bytes (read + write,
          fresh output buffer, like every XLA op): the memory floor
  torch   torch.nn.functional.grid_sample (NCHW, same settings), when torch
          is importable, with torch.set_num_threads = JAX's CPU thread count
          and OMP_WAIT_POLICY=PASSIVE (spinning OpenMP workers would otherwise
          keep both cores busy after each torch call and slow whichever
          contender runs next).
Rounds interleave the contenders so background load hits them alike.

`floor_bound` = torch_ms / copy_ms is the largest speedup over PyTorch that any
sampler could reach on this machine: one that reads its inputs and writes its
output cannot beat the copy of the same bytes. A "5x faster than PyTorch"
target is out of reach wherever floor_bound < 5.

Fresh output buffers cost page faults on every call, for the copy as much as
for the samplers; `--hugepages` reruns the benchmark with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (malloc backs large buffers with
transparent huge pages), which lowers that cost for every contender.

  .venv/bin/python -m benchmarks.warp [--shapes 8x256x256x64,2x512x512x3] [--hugepages]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Before torch (if any) starts its OpenMP runtime; see the docstring.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HUGEPAGES = "glibc.malloc.hugetlb=1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import block, print_table, time_fn, write_json  # noqa: E402
from hdtf_jax import native, warp  # noqa: E402

DEFAULT_SHAPES = "8x256x256x64,2x512x512x3"


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
  shapes = []
  for item in text.split(","):
    dims = tuple(int(d) for d in item.lower().split("x"))
    if len(dims) != 4 or min(dims) < 1:
      raise ValueError(f"--shapes: expected NxHxWxC items, got {item!r}")
    shapes.append(dims)
  return shapes


def make_inputs(shape, seed: int = 0):
  """A face-warp-like grid: identity + smooth motion of ~3% of the width + jitter.

  Some points leave the image, as real flows do at the borders.
  """
  n, h, w, c = shape
  rng = np.random.default_rng(seed)
  image = rng.normal(size=shape).astype(np.float32)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  amp = 0.03 * w
  dx = amp * np.sin(3 * np.pi * yy / h)[None] + rng.normal(scale=0.5, size=(n, h, w))
  dy = amp * np.cos(4 * np.pi * xx / w)[None] + rng.normal(scale=0.5, size=(n, h, w))
  flow = np.stack([dx, dy], axis=-1).astype(np.float32)
  grid = np.asarray(warp.flow_to_grid(jnp.asarray(flow)))
  cotangent = rng.normal(size=shape).astype(np.float32)
  return image, grid, cotangent


def jax_thread_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - not Linux
    return os.cpu_count() or 1


def interleaved_medians(fns: dict, rounds: int, repeats: int, warmup: int) -> dict:
  """Median ms of each zero-arg blocking fn; rounds alternate between the fns."""
  for fn in fns.values():
    time_fn(fn, warmup=warmup, repeats=1)
  runs = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      runs[name].append(time_fn(fn, warmup=0, repeats=repeats)["median_ms"])
  return {name: statistics.median(v) for name, v in runs.items()}


def torch_contenders(image, grid, cotangent, threads: int):
  try:
    import torch
  except ImportError:
    return None, "torch not importable: no PyTorch comparison in this run"
  torch.set_num_threads(threads)
  ti = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
  tg = torch.from_numpy(np.array(grid))
  tc = torch.from_numpy(np.ascontiguousarray(cotangent.transpose(0, 3, 1, 2)))
  sample = lambda a, b: torch.nn.functional.grid_sample(
      a, b, mode="bilinear", padding_mode="zeros", align_corners=False)

  def fwd():
    with torch.no_grad():
      return sample(ti, tg)

  def fwd_bwd():
    a = ti.detach().requires_grad_(True)
    b = tg.detach().requires_grad_(True)
    out = sample(a, b)
    out.backward(tc)
    return out, a.grad, b.grad

  note = f"torch {torch.__version__}, torch.set_num_threads({threads})"
  return (fwd, fwd_bwd), note


def jax_contenders(native: bool):
  """Jitted fwd and fwd+bwd of hdtf_jax's grid_sample, native CPU kernel or the XLA path."""
  sample = lambda a, b: warp._grid_sample(a, b, "bilinear", "zeros", False, native)
  fwd = jax.jit(sample)
  fwd_bwd = jax.jit(jax.value_and_grad(lambda a, b, g: jnp.vdot(sample(a, b), g),
                                       argnums=(0, 1)))
  return fwd, fwd_bwd


def bench_shape(shape, rounds: int, repeats: int, warmup: int, threads: int):
  image, grid, cotangent = make_inputs(shape)
  ji, jg, jc = jnp.asarray(image), jnp.asarray(grid), jnp.asarray(cotangent)
  # What grid_sample itself picks for this shape, and whether the native kernel built.
  default_native = warp._use_native(ji, jg)
  paths = {"xla": jax_contenders(False)}
  if native.grid_sample_available():
    paths["native"] = jax_contenders(True)

  f32 = 4
  bytes_fwd = (image.size + grid.size + image.size) * f32  # image + grid in, output out
  # forward's traffic, then cotangent + image + grid in, image and grid gradients out
  bytes_bwd = bytes_fwd + (cotangent.size + image.size + grid.size * 2 + image.size) * f32
  copy_src = {kind: jnp.zeros(nbytes // (2 * f32), jnp.float32)
              for kind, nbytes in (("fwd", bytes_fwd), ("fwd+bwd", bytes_bwd))}
  copy = jax.jit(lambda x: x + 0)

  contenders = {
      "copy fwd": lambda: block(copy(copy_src["fwd"])),
      "copy fwd+bwd": lambda: block(copy(copy_src["fwd+bwd"])),
  }
  for name, (fwd, fwd_bwd) in paths.items():
    contenders[f"{name} fwd"] = lambda fwd=fwd: block(fwd(ji, jg))
    contenders[f"{name} fwd+bwd"] = lambda fwd_bwd=fwd_bwd: block(fwd_bwd(ji, jg, jc))
  torch_fns, torch_note = torch_contenders(image, grid, cotangent, threads)
  max_diff = {}
  if torch_fns:
    contenders["torch fwd"], contenders["torch fwd+bwd"] = torch_fns
    # Same numbers, or the comparison means nothing.
    t_out = torch_fns[0]().numpy().transpose(0, 2, 3, 1)
    for name, (fwd, _) in paths.items():
      max_diff[name] = float(np.abs(np.asarray(fwd(ji, jg)) - t_out).max())
  ms = interleaved_medians(contenders, rounds, repeats, warmup)

  rows = []
  for kind, nbytes in (("fwd", bytes_fwd), ("fwd+bwd", bytes_bwd)):
    default = "native" if default_native else "xla"
    t = ms[f"{default} {kind}"]
    copy_ms = ms[f"copy {kind}"]
    # jax_ms / x_copy / speedup_vs_torch: the path grid_sample takes by default.
    row = {"shape": "x".join(map(str, shape)), "pass": kind, "path": default, "jax_ms": t,
           "GB/s": nbytes / t / 1e6, "copy_ms": copy_ms, "x_copy": t / copy_ms}
    for name in paths:
      row[f"{name}_ms"] = ms[f"{name} {kind}"]
      row[f"{name}_x_copy"] = ms[f"{name} {kind}"] / copy_ms
    if torch_fns:
      row["torch_ms"] = ms[f"torch {kind}"]
      row["speedup_vs_torch"] = ms[f"torch {kind}"] / t
      for name in paths:
        row[f"{name}_vs_torch"] = ms[f"torch {kind}"] / ms[f"{name} {kind}"]
      row["floor_bound"] = ms[f"torch {kind}"] / copy_ms
    rows.append(row)
  return rows, torch_note, max_diff


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=DEFAULT_SHAPES)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3, help="runs per round")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results)")
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and few repeats (benchmarks/run_all.py --quick)")
  parser.add_argument("--hugepages", action="store_true",
                      help=f"rerun under GLIBC_TUNABLES={HUGEPAGES} (see the docstring)")
  args = parser.parse_args(argv)
  if args.hugepages and HUGEPAGES not in os.environ.get("GLIBC_TUNABLES", ""):
    # glibc reads its tunables at start-up only: start over with them set.
    env = dict(os.environ, GLIBC_TUNABLES=":".join(
        x for x in (os.environ.get("GLIBC_TUNABLES"), HUGEPAGES) if x))
    argv = sys.argv[1:] if argv is None else list(argv)
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)
  if args.quick:
    args.rounds, args.repeats, args.warmup = 1, 1, 1

  threads = jax_thread_count()
  print(f"JAX {jax.__version__} on {jax.default_backend()} with {threads} CPU threads; "
        f"median over {args.rounds} interleaved rounds x {args.repeats} runs")
  all_rows, notes = [], {}
  for shape in parse_shapes(args.shapes):
    rows, torch_note, max_diff = bench_shape(shape, args.rounds, args.repeats, args.warmup,
                                             threads)
    all_rows += rows
    notes["torch"] = torch_note
    for name, diff in max_diff.items():
      notes[f"max |{name} - torch| {rows[0]['shape']}"] = diff
  if not native.enabled_by_env():
    notes["native"] = f"native CPU kernel off ({native.ENV_SWITCH}=0): XLA path only"
  elif native.grid_sample_available():
    notes["native"] = "native CPU kernel built (hdtf_jax/native)"
  else:
    notes["native"] = "native CPU kernel unavailable (see the warning): XLA path only"
  notes["GLIBC_TUNABLES"] = os.environ.get("GLIBC_TUNABLES", "")
  print(notes["torch"] + (f"; GLIBC_TUNABLES={notes['GLIBC_TUNABLES']}"
                          if notes["GLIBC_TUNABLES"] else "") + "; " + notes["native"])
  paths = [p for p in ("native", "xla") if f"{p}_ms" in all_rows[0]]
  columns = ["shape", "pass", "path", "copy_ms"]
  for p in paths:
    columns += [f"{p}_ms", f"{p}_x_copy"]
  if "torch_ms" in all_rows[0]:
    columns += ["torch_ms"] + [f"{p}_vs_torch" for p in paths] + ["floor_bound"]
  print_table(all_rows, columns)
  print("path: what grid_sample uses by default for the shape (jax_ms, x_copy, speedup_vs_torch "
        "in the JSON)")
  if "torch_ms" in all_rows[0]:
    print("floor_bound = torch_ms / copy_ms: the most any sampler could beat PyTorch by here")
  for key, value in notes.items():
    if key.startswith("max |"):
      print(f"{key}: {value:.2e}")
  write_json("warp", {"rows": all_rows, "notes": notes, "jax_threads": threads,
                      "rounds": args.rounds, "repeats": args.repeats}, args.out)


if __name__ == "__main__":
  main()
