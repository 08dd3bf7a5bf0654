"""A video file -> tracked landmarks + fitted 3DMM parameters + a preview video.

    python -m hdtf_jax.face.track VIDEO --out DIR [--size 512] [--fps 25] [--max-seconds S]

Writes `DIR/<stem>_params.npz` (landmarks (T, 468, 3) in pixels of the analysed
frames, found (T,), shape, scale, mouth, eyebrow, pose, residual_px, fps, size)
and `DIR/<stem>_preview.mp4`: the frame with the detected landmarks (green) |
the fitted model's mesh re-projected (red), with the source's audio when it has
one. Frames are analysed at `--size` (the longer side is scaled to it) so pixel
errors are comparable across inputs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np


def analyse_frames(frames: np.ndarray, fps: float, *, num_threads: int = 1):
  """(T, H, W, 3) uint8 -> (track result, fit result, projected mesh (T, V, 2))."""
  from hdtf_jax.face import fitting, landmarks, morphable

  landmarker = landmarks.FaceLandmarker(num_threads=num_threads)
  track = landmarks.track_video(frames, landmarker, fps=fps)
  if not track.found.any():
    raise ValueError("no face found in any frame")
  model = morphable.default_model()
  fit = fitting.fit_clip(model, track.points, track.found)
  verts = morphable.vertices(model, fit.shape, fit.mouth, fit.eyebrow)
  mesh = np.asarray(morphable.project(verts, fit.pose, fit.scale))
  return track, fit, mesh, model


def draw_preview(frame: np.ndarray, points: np.ndarray | None, mesh: np.ndarray,
                 triangles: np.ndarray) -> np.ndarray:
  """Side by side: detected landmarks | fitted mesh edges, both over the frame."""
  left = frame.copy()
  if points is not None and np.isfinite(points).all():
    for x, y in points[:, :2]:
      cv2.circle(left, (int(round(x)), int(round(y))), 1, (0, 255, 0), -1, cv2.LINE_AA)
  right = frame.copy()
  polys = [np.round(mesh[t][:, :2]).astype(np.int32) for t in triangles]
  cv2.polylines(right, polys, True, (255, 60, 60), 1, cv2.LINE_AA)
  return np.concatenate([left, right], axis=1)


def run(video: str | Path, out_dir: str | Path, *, size: int = 512, fps: float = 25.0,
        max_seconds: float | None = None, num_threads: int = 1) -> dict:
  from hdtf_jax import media

  video, out_dir = Path(video), Path(out_dir)
  info = media.probe_video(video)
  scale = size / max(info["width"], info["height"])
  h, w = (int(round(info["height"] * scale / 2)) * 2, int(round(info["width"] * scale / 2)) * 2)
  frames, _ = media.read_video(video, fps=fps, size=(h, w), end_s=max_seconds)
  t0 = time.perf_counter()
  track, fit, mesh, model = analyse_frames(frames, fps, num_threads=num_threads)
  seconds = time.perf_counter() - t0
  out_dir.mkdir(parents=True, exist_ok=True)
  params_path = out_dir / f"{video.stem}_params.npz"
  np.savez(params_path, landmarks=track.points, found=track.found,
           shape=np.asarray(fit.shape), scale=np.asarray(fit.scale), mouth=np.asarray(fit.mouth),
           eyebrow=np.asarray(fit.eyebrow), pose=np.asarray(fit.pose),
           residual_px=np.asarray(fit.residual_px), fps=np.float32(fps), size=np.int32(size))
  audio = None
  if info.get("has_audio"):
    from hdtf_jax import audio as audio_lib
    audio = audio_lib.load_audio(video, 16000, end_s=max_seconds)
  preview = np.stack([draw_preview(f, p if ok else None, m, model.triangles)
                      for f, p, ok, m in zip(frames, track.points, track.found, mesh)])
  preview_path = out_dir / f"{video.stem}_preview.mp4"
  media.write_video(preview_path, preview, fps, audio=audio, audio_rate=16000)
  found = track.found
  residual = np.asarray(fit.residual_px)[found]
  return {"frames": int(len(frames)), "found": int(found.sum()),
          "rmse_px": float(np.sqrt(np.mean(residual ** 2))) if residual.size else float("nan"),
          "analysis_fps": len(frames) / seconds, "size": [h, w],
          "params": str(params_path), "preview": str(preview_path)}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("video")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--size", type=int, default=512, help="analysis size of the longer side")
  parser.add_argument("--fps", type=float, default=25.0)
  parser.add_argument("--max-seconds", type=float, default=None)
  parser.add_argument("--threads", type=int, default=1, help="LiteRT threads")
  args = parser.parse_args(argv)
  try:
    summary = run(args.video, args.out, size=args.size, fps=args.fps,
                  max_seconds=args.max_seconds, num_threads=args.threads)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {args.video}: {e}", file=sys.stderr)
    return 2
  print(f"{summary['found']}/{summary['frames']} frames with a face, fit RMSE "
        f"{summary['rmse_px']:.2f} px at {summary['size'][1]}x{summary['size'][0]}, "
        f"{summary['analysis_fps']:.1f} frames/s (landmarks + fit, incl. compile)")
  print(f"parameters: {summary['params']}\npreview:    {summary['preview']}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
