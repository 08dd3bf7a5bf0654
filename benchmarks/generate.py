"""End-to-end speed of one-shot generation (`hdtf_jax.generate.generate_video`) on CPU.

For each (stage-1, stage-2) preset pair -- tiny/tiny (32 px), demo/demo (128 px), paper/256
(256 px) -- with freshly initialised weights (`generate.init_models`: speed does not depend on
training; G_ani's output heads are set to the reference's parameters so the head stays in the
picture), on `skimage.data.astronaut()` upscaled 2x and `--seconds` of a synthetic voice:

  end to end  `generate_video` after a first call on the same audio that compiles everything
              (its time is `first_call_s`): frames/s and the
              split over face fit (detection + landmarks + 3DMM fit), audio features (MFCC +
              pYIN), G_ani (+ smoothing, resampling), F_app + G_vid (jitted batches of
              `--batch`), H.264 encode + mux;
  render      F_app + G_vid alone, batched (`render(batch_size=--batch)`, the next batch
              dispatched while the previous is handed out) vs the naive way a user would do it:
              one frame per call (`batch_size=1`), same jitted function; best of two runs
              each, taken in turns.

Context only: the HDTF authors quote about 2 frames/s for their pipeline on a GPU at 512 x 512
(issue #7); these figures are CPU figures at smaller sizes, not a comparison.

  .venv/bin/python -m benchmarks.generate [--presets tiny/tiny,demo/demo,paper/256]
      [--seconds 4] [--batch 8]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `hdtf_jax` importable
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_json  # noqa: E402

AUTHORS_FPS = 2.0  # issue #7: the authors' pipeline, GPU, 512 px (context only)


def _voice(path: Path, seconds: float, sr: int = 16000) -> Path:
  import numpy as np
  import soundfile as sf
  t = np.arange(int(round(seconds * sr))) / sr
  env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
  wave = 0.2 * env * sum(np.sin(2 * np.pi * 150 * k * t) / k for k in (1, 2, 3))
  sf.write(path, wave.astype(np.float32), sr)
  return path


def _models(p1: str, p2: str, image):
  """Random-init models whose G_ani starts at the reference's parameters."""
  import jax.numpy as jnp
  from experiments.configs import stage1 as configs1
  from experiments.configs import stage2 as configs2
  from hdtf_jax import generate as G
  from hdtf_jax.train import stage1
  models = G.init_models(configs1.get_config(p1), configs2.get_config(p2), seed=0)
  ref = G.prepare_reference(image, models)
  stats = {"mouth_mean": ref.params["mouth"], "eyebrow_mean": ref.params["eyebrow"],
           "head_mean": ref.params["pose"]}
  v = dict(models.stage1_variables)
  v["params"] = stage1.init_output_heads(v["params"], {k: jnp.asarray(x) for k, x in stats.items()},
                                         0.01)
  models.stage1_variables = v
  return models, ref


def _render_fps(models, ref, drv, batches: tuple[int, ...], repeats: int = 2) -> list[float]:
  """Frames/s of `render` at each batch size, best of `repeats` runs taken in turns (so a
  change of load on shared cores hits every batch size alike)."""
  from hdtf_jax import generate as G
  n = len(drv["pose"])
  for b in batches:  # compile
    list(G.render(models, ref, {k: x[:b] for k, x in drv.items()}, batch_size=b))
  best = [0.0] * len(batches)
  for _ in range(repeats):
    for i, b in enumerate(batches):
      t0 = time.perf_counter()
      for _ in G.render(models, ref, drv, batch_size=b):
        pass
      best[i] = max(best[i], n / (time.perf_counter() - t0))
  return best


def run_pair(p1: str, p2: str, image, audio: Path, batch: int, tmp: Path) -> dict:
  from hdtf_jax import generate as G
  tick = time.perf_counter()
  models, ref = _models(p1, p2, image)
  setup_s = time.perf_counter() - tick
  # The first call compiles (G_ani for this audio length, G_vid, the fit): timed apart.
  cold = G.generate_video(image, audio, tmp / "cold.mp4", models, batch_size=batch)["seconds"]
  cpu0, load0 = time.process_time(), os.getloadavg()[0]
  s = G.generate_video(image, audio, tmp / "out.mp4", models, batch_size=batch)
  cpu = time.process_time() - cpu0
  t = s["timings"]
  from hdtf_jax import audio as audio_lib
  wave = audio_lib.load_audio(audio, G.SAMPLE_RATE)
  feats = audio_lib.audio_features(wave)
  drv = G.animate(models, feats, ref, num_frames=s["frames"])
  sizes = sorted({1, 2, 4, batch})
  fps = dict(zip(sizes, _render_fps(models, ref, drv, tuple(sizes))))
  naive, batched = fps[1], fps[batch]
  frames = s["frames"]
  return {"presets": f"{p1}/{p2}", "size": models.image_size, "frames": frames,
          "end_to_end_fps": s["frames_per_s"], "cpu_s_per_frame": cpu / frames,
          "face_fit_s": t["face_fit_s"], "audio_features_s": t["audio_features_s"],
          "g_ani_s": t["animate_s"], "f_app_g_vid_s": t["render_s"], "encode_s": t["encode_s"],
          "render_fps_batched": batched, "render_fps_frame_at_a_time": naive,
          "batching_speedup": batched / naive,
          "render_fps_by_batch": {str(b): v for b, v in fps.items()}, "setup_s": setup_s, "first_call_s": cold, "batch": batch,
          "load_avg": (load0 + os.getloadavg()[0]) / 2}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--presets", default="tiny/tiny,demo/demo,paper/256",
                      help="comma-separated stage1/stage2 preset pairs")
  parser.add_argument("--seconds", type=float, default=4.0, help="audio length")
  parser.add_argument("--batch", type=int, default=8, help="G_vid frames per call (batched)")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
  args = parser.parse_args(argv)
  import cv2
  import skimage.data
  image = cv2.resize(skimage.data.astronaut(), (1024, 1024), interpolation=cv2.INTER_CUBIC)
  rows = []
  with tempfile.TemporaryDirectory() as d:
    tmp = Path(d)
    audio = _voice(tmp / "voice.wav", args.seconds)
    for pair in args.presets.split(","):
      p1, p2 = pair.split("/")
      rows.append(run_pair(p1, p2, image, audio, args.batch, tmp))
      print_table(rows[-1:], ["presets", "size", "frames", "end_to_end_fps", "face_fit_s",
                              "audio_features_s", "g_ani_s", "f_app_g_vid_s", "encode_s",
                              "render_fps_batched", "render_fps_frame_at_a_time", "first_call_s",
                              "load_avg"])
  print(f"\nPeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB. Context "
        f"only: the authors quote ~{AUTHORS_FPS:g} frames/s for their pipeline (GPU, 512 px).")
  write_json("generate", {"seconds": args.seconds, "rows": rows,
                          "authors_fps_context": AUTHORS_FPS}, args.out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
