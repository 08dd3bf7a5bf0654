"""Frames per second of F_app (hdtf_jax.face.flow) on one CPU core, against what else one might use.

Driving frames: the default morphable model placed in a face-sized box, with jaw, smile,
eyebrow and head-pose tracks (T frames), one reference frame. Compared in the same run:

* ours: `flow_from_params` over T frames (lax.map), `approximate_flow` called per frame,
  vmapped over frames, and the rasteriser alone;
* the authors' released shortcut: per-vertex flow spread over the grid by nearest vertex
  (`scipy.interpolate.griddata(method="nearest")`), rows below the face get the mean flow;
* scipy `griddata(method="linear")`: piecewise-linear over a Delaunay triangulation of the
  driving vertices (the convex hull, not the face mesh);
* an OpenCV rasteriser: triangle ids drawn far-to-near with `cv2.fillConvexPoly`, then each
  pixel mapped by its triangle's affine map in NumPy (mesh part only, no regions).

`face_err_px` is the mean distance (flow pixels) between a method's source positions and
ours on pixels the face mesh covers, where ours is exact (piecewise affine). `fps` is from
wall time, `fps_cpu` from process CPU time (the same on an idle machine; on a shared one
it is the figure to trust).

  taskset -c 0 .venv/bin/python -m benchmarks.face_flow [--sizes 128,256] [--frames 32]

The script pins itself to one core and single-threaded XLA / OpenCV unless --all-cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `hdtf_jax` importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SINGLE_CORE = "--all-cores" not in sys.argv
if SINGLE_CORE:  # before jax starts its thread pools
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                             " intra_op_parallelism_threads=1").strip()
  os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from scipy.interpolate import griddata

from benchmarks.common import block, print_table, time_fn, write_json
from hdtf_jax.face import flow as F
from hdtf_jax.face import morphable, raster


def driving_tracks(model, frames: int, image_size: int, face_fraction: float = 0.5):
  """Reference parameters and T driving frames of plausible talking-head motion."""
  span = np.ptp(model.mean[:, 0])
  ref = {"shape": np.zeros(model.n_shape, np.float32),
         "mouth": np.zeros(model.n_mouth, np.float32),
         "eyebrow": np.zeros(model.n_eyebrow, np.float32),
         "pose": np.array([0, 0, 0, image_size / 2, image_size * 0.45], np.float32),
         "scale": np.float32(face_fraction * image_size / span)}
  t = np.linspace(0, 2 * np.pi, frames, endpoint=False, dtype=np.float32)
  names = list(model.expression_names)
  expr = np.zeros((frames, len(names)), np.float32)
  for name, amp, freq in (("jaw_open", 0.8, 3), ("smile_left", 0.4, 1), ("smile_right", 0.4, 1),
                          ("eyebrow_up_centre", 0.5, 2)):
    if name in names:
      expr[:, names.index(name)] = amp * (0.5 + 0.5 * np.sin(freq * t))
  pose = ref["pose"] + np.stack([0.3 * np.sin(t), 0.15 * np.sin(2 * t), 0.1 * np.cos(t),
                                 0.04 * image_size * np.sin(t), 0.02 * image_size * np.cos(t)], 1)
  drv = {"shape": ref["shape"], "mouth": expr[:, :model.n_mouth],
         "eyebrow": expr[:, model.n_mouth:], "pose": pose.astype(np.float32),
         "scale": np.full(frames, ref["scale"], np.float32)}
  return ref, drv


def pixel_grid(size):
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
  return xs, ys


def authors_nearest(ref_xy, drv_xy, size):
  """Per-vertex backward flow spread by nearest vertex; rows below the face get the mean."""
  xs, ys = pixel_grid(size)
  vflow = ref_xy - drv_xy
  flow = griddata(drv_xy, vflow, (xs, ys), method="nearest")
  flow[ys[:, 0] > drv_xy[:, 1].max()] = vflow.mean(0)
  return np.stack([xs, ys], -1) + flow


def scipy_linear(ref_xy, drv_xy, size):
  xs, ys = pixel_grid(size)
  flow = griddata(drv_xy, ref_xy - drv_xy, (xs, ys), method="linear", fill_value=0.0)
  return np.stack([xs, ys], -1) + flow


def opencv_raster(ref_xy, drv_xy, drv_z, triangles, size):
  """Triangle ids by cv2.fillConvexPoly (far to near, 1/16 px precision), then affine maps."""
  ids = np.zeros((size, size), np.int32)
  order = np.argsort(-drv_z[triangles].mean(1))  # larger z is further: draw it first
  fixed = np.round(drv_xy * 16).astype(np.int32)
  for f in order:
    cv2.fillConvexPoly(ids, fixed[triangles[f]], int(f) + 1, lineType=cv2.LINE_8, shift=4)
  # Affine map of each triangle: [x, y, 1] in the driving frame -> reference position.
  d = np.concatenate([drv_xy[triangles], np.ones(triangles.shape[:1] + (3, 1))], -1)
  ok = np.abs(np.linalg.det(d)) > 1e-9
  maps = np.zeros((len(triangles), 3, 2))
  maps[ok] = np.linalg.solve(d[ok], ref_xy[triangles][ok])
  xs, ys = pixel_grid(size)
  homog = np.stack([xs, ys, np.ones_like(xs)], -1)
  src = np.einsum("hwk,hwkc->hwc", homog, maps[np.maximum(ids - 1, 0)])
  return np.where((ids > 0)[..., None], src, np.stack([xs, ys], -1))


def cpu_ms(fn, repeats: int) -> float:
  """Median process CPU time of fn() in ms: robust to other jobs on a shared machine (the
  process is single-threaded here, so CPU time is the time it needs)."""
  times = []
  for _ in range(repeats):
    t0 = time.process_time()
    fn()
    times.append((time.process_time() - t0) * 1e3)
  return statistics.median(times)


def source_pixels(grid):
  g = np.asarray(grid, np.float64)
  return ((g + 1) * np.array([g.shape[-2], g.shape[-3]]) - 1) / 2


def measure(model, size: int, frames: int, repeats: int, config: F.FlowConfig) -> list[dict]:
  ref, drv = driving_tracks(model, frames, size)
  ref_xy, _ = F.mesh_points(model, ref, size, size)
  drv_xy, drv_z = F.mesh_points(model, drv, size, size)
  ref_xy, drv_xy, drv_z = (np.asarray(a, np.float64) for a in (ref_xy, drv_xy, drv_z))
  tri, ring = model.triangles, model.regions["face_boundary"]
  budget = int(np.ceil(config.raster_budget * size * size))
  needed = max(raster.candidates_needed(d, tri, size, size) for d in drv_xy)

  batched = lambda: block(F.flow_from_params(model, ref, drv, size, size, config))
  core = jax.jit(lambda d, z: F.approximate_flow(ref_xy, d, tri, ring, z, height=size,
                                                 width=size, config=config))
  per_frame = lambda: [block(core(drv_xy[i], drv_z[i])) for i in range(frames)]
  vmapped_fn = jax.jit(jax.vmap(core))
  vmapped = lambda: block(vmapped_fn(drv_xy, drv_z))
  ras_fn = jax.jit(lambda d, z: raster.rasterize(d, tri, z, height=size, width=size,
                                                 max_candidates=budget))
  ras_only = lambda: [block(ras_fn(drv_xy[i], drv_z[i])) for i in range(frames)]

  ours = source_pixels(F.flow_from_params(model, ref, drv, size, size, config).grid)
  covered = np.stack([np.asarray(ras_fn(drv_xy[i], drv_z[i]).tri) >= 0 for i in range(frames)])
  cases = [
      ("ours: flow_from_params, T frames (lax.map)", batched, ours),
      ("ours: approximate_flow, per frame", per_frame, None),
      ("ours: approximate_flow, vmap over T", vmapped, None),
      ("ours: rasteriser only, per frame", ras_only, None),
      ("authors: nearest vertex (scipy griddata)",
       lambda: [authors_nearest(ref_xy, drv_xy[i], size) for i in range(frames)], None),
      ("scipy griddata linear (Delaunay hull)",
       lambda: [scipy_linear(ref_xy, drv_xy[i], size) for i in range(frames)], None),
      ("OpenCV fillConvexPoly raster + NumPy (mesh only)",
       lambda: [opencv_raster(ref_xy, drv_xy[i], drv_z[i], tri, size) for i in range(frames)],
       None),
  ]
  rows = []
  for name, fn, _ in cases:
    timing = time_fn(fn, warmup=1, repeats=repeats)
    cpu = cpu_ms(fn, repeats)
    out = fn()
    if isinstance(out, list) and out and isinstance(out[0], np.ndarray):
      src = np.stack(out)
    elif name.startswith("ours: flow_from_params"):
      src = ours
    else:
      src = None
    err = (float(np.linalg.norm(src - ours, axis=-1)[covered].mean()) if src is not None
           else float("nan"))
    rows.append({"size": size, "method": name, "frames": frames,
                 "ms_per_frame": timing["median_ms"] / frames,
                 "fps": 1e3 * frames / timing["median_ms"],
                 "cpu_ms_per_frame": cpu / frames, "fps_cpu": 1e3 * frames / cpu,
                 "face_err_px": err})
  rows[0]["raster_candidates_needed"] = needed
  rows[0]["raster_candidates"] = budget
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="128,256")
  parser.add_argument("--frames", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--model", help="morphable model .npz (default: the packaged one)")
  parser.add_argument("--all-cores", action="store_true", help="do not pin to one core")
  parser.add_argument("--out", help="JSON path (default benchmarks/results/face_flow.json)")
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and few repeats (benchmarks/run_all.py --quick)")
  args = parser.parse_args(argv)
  if args.quick:
    args.sizes, args.frames, args.repeats = "128", 8, 2
  if SINGLE_CORE:
    cv2.setNumThreads(1)
  model = morphable.load(args.model) if args.model else morphable.default_model()
  config = F.FlowConfig()
  rows = []
  for size in (int(s) for s in args.sizes.split(",")):
    rows += measure(model, size, args.frames, args.repeats, config)
  print_table(rows, ["size", "method", "ms_per_frame", "fps", "fps_cpu", "face_err_px"])
  write_json("face_flow", {"single_core": SINGLE_CORE, "triangles": int(len(model.triangles)),
                           "config": vars(config) | {"fill_holes": list(config.fill_holes)},
                           "rows": rows}, args.out)


if __name__ == "__main__":
  main()
