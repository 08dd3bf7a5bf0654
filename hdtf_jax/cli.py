"""The `hdtf-jax` console script: `hdtf-jax generate ...` (one-shot talking-face generation).

    hdtf-jax generate --image face.jpg --audio speech.wav --stage1 runs/s1 --stage2 runs/s2 \
        --out out.mp4 [--fps 25] [--head-scale 1] [--eyebrow-scale 1] [--keep-head-still]
        [--pose-from VIDEO | --params-from FILE] [--paste-back | --preview]

Bad input (no face, unreadable image or audio, audio shorter than a frame, a workdir of the
other stage, a mismatched preset, an unwritable output, ...) exits with code 2 and one line
on stderr. `python -m experiments.generate` takes the same options.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Sequence


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  from hdtf_jax import generate as gen
  p = parser
  p.add_argument("--image", required=True,
                 help="reference image with one face (JPEG/PNG/WebP; the largest face is used)")
  p.add_argument("--audio", default=None,
                 help="driving audio, any format ffmpeg reads (optional with --params-from)")
  p.add_argument("--stage1", required=True, metavar="WORKDIR", help="stage-1 (G_ani) run directory")
  p.add_argument("--stage2", required=True, metavar="WORKDIR", help="stage-2 (G_vid) run directory")
  p.add_argument("--out", required=True, help="output mp4 (written atomically)")
  p.add_argument("--fps", type=float, default=25.0, help="video frame rate (default 25)")
  p.add_argument("--preset", default=None,
                 help="expected model preset (paper/256/demo/tiny): refuse checkpoints of another")
  p.add_argument("--seed", type=int, default=0,
                 help="recorded in the summary; the pipeline has no random step")
  p.add_argument("--head-scale", type=float, default=1.0,
                 help="multiplies the head motion (deviation from the reference's pose)")
  p.add_argument("--eyebrow-scale", type=float, default=1.0,
                 help="multiplies the eyebrow motion (deviation from the reference's)")
  p.add_argument("--keep-head-still", action="store_true", help="hold the reference's head pose")
  p.add_argument("--smoothing", type=float, default=gen.DEFAULT_SMOOTHING_S,
                 help="Gaussian sigma over time of the driving tracks, seconds (0: off)")
  drive = p.add_mutually_exclusive_group()
  drive.add_argument("--pose-from", metavar="VIDEO", default=None,
                     help="head pose from this video's tracked face (relative to its first "
                          "frame); mouth and eyebrows still from the audio")
  drive.add_argument("--params-from", metavar="FILE", default=None,
                     help="mouth, eyebrow and pose from a *_params.npz of "
                          "`python -m hdtf_jax.face.track` (audio only muxed)")
  look = p.add_mutually_exclusive_group()
  look.add_argument("--paste-back", action="store_true",
                    help="blend the generated face crop back into the full source image")
  look.add_argument("--preview", action="store_true",
                    help="write reference | driving mesh | output side by side")
  p.add_argument("--crop-ratio", type=float, default=gen.DEFAULT_CROP_RATIO,
                 help="face-box enlargement of the crop (the dataset's default)")
  p.add_argument("--min-face-px", type=float, default=gen.MIN_FACE_PX,
                 help="refuse faces smaller than this (pixels, longest side)")
  p.add_argument("--batch-size", type=int, default=None,
                 help=f"G_vid frames per jitted call (default {gen.BATCH_CPU} on CPU, "
                      f"{gen.BATCH_ACCELERATOR} on GPU/TPU)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="hdtf-jax", description="HDTF-JAX tools.")
  sub = parser.add_subparsers(dest="command", required=True)
  add_generate_arguments(sub.add_parser(
      "generate", help="reference image + audio -> talking-face mp4",
      description="One-shot generation: reference image + driving audio -> talking-face mp4."))
  return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
  print(f"warning: {message}", file=sys.stderr if file is None else file)


def run_generate(args: argparse.Namespace) -> int:
  """Runs `generate` for parsed arguments; 0 on success, 2 (one line on stderr) on bad input."""
  from hdtf_jax import generate as gen
  warnings.showwarning = _one_line_warnings
  try:
    gen.check_inputs(args.image, args.audio, args.out, fps=args.fps,
                     params_from=args.params_from)
    models = gen.load_models(args.stage1, args.stage2, preset=args.preset)
    summary = gen.generate_video(
        args.image, args.audio, args.out, models, fps=args.fps, head_scale=args.head_scale,
        eyebrow_scale=args.eyebrow_scale, keep_head_still=args.keep_head_still,
        smoothing=args.smoothing, pose_from=args.pose_from, params_from=args.params_from,
        paste_back=args.paste_back, preview=args.preview, batch_size=args.batch_size,
        crop_ratio=args.crop_ratio, min_face_px=args.min_face_px,
        progress=not args.no_progress)
  except gen.GenerateError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  summary["seed"] = args.seed
  print(f"wrote {summary['path']}: {summary['frames']} frames at {summary['fps']:g} fps, "
        f"{summary['size'][1]}x{summary['size'][0]}, {summary['seconds']:.1f} s "
        f"({summary['frames_per_s']:.2f} frames/s end to end)")
  print(json.dumps({k: summary[k] for k in ("timings", "crop", "driven_by", "seed")}))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "generate":
    return run_generate(args)
  return 2  # unreachable: argparse requires a known command


if __name__ == "__main__":
  raise SystemExit(main())
