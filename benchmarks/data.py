"""HDTF dataset build and input-pipeline speed.

    python -m benchmarks.data [--cores 1] [--seconds 5] [--build-only] [--out benchmarks/results/data.json]

1. End-to-end clip processing (`hdtf_jax.data.clips.process_clip`, config 512) in frames/s per
   core, warm (models loaded, fit compiled), on
   - the builder's dummy_data (small 240/270p clips), and
   - a synthetic 1080p clip (astronaut pasted into 1920x1080, `--seconds` long, speech audio),
     cropped by its crop_wh row and, separately, by the landmark box (a second, subsampled
     decode pass: `clips.landmark_box`),
   with a breakdown: decode (ffmpeg, raw frames), decode + crop + resize (ffmpeg), landmarks
   (tracking) vs detecting every frame (what one would write without a tracker), the landmark
   box pass, fit, audio (decode + features), JPEG encode, and `other`: the end-to-end time
   left over (the probe, ffmpeg start-ups, glue), all in CPU ms per output frame.
2. The projected time for all of HDTF (~1.5 M frames) on 16 cores.
3. Pipelines: samples/s of stage 1 (windows) and stage 2 (frame pairs) on a build of
   dummy_data, against plain `tfds.data_source` decoding of the same records.

The process (and the ffmpeg it starts) is pinned to `--cores` CPUs with one thread per library,
so "per core" means one core. The machine may be shared: figures are medians of a few runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

HDTF_FRAMES = 1.5e6
DUMMY = ROOT / "data_builders" / "hdtf" / "dummy_data"
SPEECH = ROOT / "tests" / "data" / "speech_16k.wav"


def _pin(cores: int) -> None:
  os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ["OMP_NUM_THREADS"] = str(cores)
  available = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, set(available[:cores]))


CPU_TIMES: dict[str, float] = {}  # CPU seconds (this process + finished children) per stage


def _cpu() -> float:
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def _timed(fn, repeats: int = 3, name: str | None = None):
  """(median wall seconds, last result) of fn() after one warm-up call; the median CPU seconds
  (ours plus the ffmpeg children's) go to CPU_TIMES[name]: on a shared machine they, not wall
  time, say what one core does."""
  import statistics
  out = fn()
  times, cpus = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), _cpu()
    out = fn()
    times.append(time.perf_counter() - t0)
    cpus.append(_cpu() - c0)
  if name:
    CPU_TIMES[name] = statistics.median(cpus)
  return statistics.median(times), out


def make_1080p(path: Path, seconds: float) -> Path:
  from data_builders.hdtf.make_dummy_data import write_face_video
  from hdtf_jax import audio as audio_lib
  import numpy as np
  speech = audio_lib.load_audio(SPEECH, 16000)
  wave = np.tile(speech, int(np.ceil(seconds * 16000 / speech.size)))[:int(seconds * 16000)]
  return write_face_video(path, height=1080, width=1920, fps=25, seconds=seconds, face_px=700,
                          centre=(0.55, 0.45), drift_px=40, audio=wave, crf=20)


def clip_breakdown(path: Path, entry, config, tools, repeats: int) -> dict:
  """One clip (warm): end-to-end wall and CPU time, and CPU milliseconds per output frame of
  each stage run on its own."""
  import numpy as np
  from hdtf_jax import audio as audio_lib
  from hdtf_jax import media
  from hdtf_jax.data import clips
  from hdtf_jax.face.landmarks import track_video
  info, start, end = clips.probe(path, entry, config)
  t = audio_lib.num_frames(end - start, config.fps)
  box, method = clips.choose_crop(path, entry, start, end, info, config, tools)
  r = {"clip": entry.name, "frames": t, "size": f"{info['width']}x{info['height']}",
       "crop": method}
  def e2e():
    clips.clear_probe_cache()  # as for a video's first clip
    return clips.process_clip(entry, path.parent, config, tools)

  r["wall_s"], ex = _timed(e2e, repeats, "e2e")
  r["cpu_s"] = CPU_TIMES["e2e"]
  r["frames_per_s"] = t / r["wall_s"]
  r["frames_per_cpu_s"] = t / r["cpu_s"]

  def stage(name, fn, reps=repeats):
    _, out = _timed(fn, reps, name)
    r[f"{name}_ms"] = 1e3 * CPU_TIMES[name] / t
    return out

  decode = lambda **kw: sum(1 for _ in media.iter_video_frames(
      path, fps=config.fps, start_s=start, end_s=end, **kw))
  stage("decode_raw", decode)
  stage("decode_crop_resize", lambda: decode(crop=box, size=config.decode_size))
  frames = list(media.iter_video_frames(path, fps=config.fps, start_s=start, end_s=end,
                                        crop=box, size=config.decode_size))
  stage("landmarks_track", lambda: track_video(frames, tools.crop_landmarker))
  lm = tools.crop_landmarker
  stage("landmarks_detect_all", lambda: [lm.detect_landmarks(f) for f in frames],
        max(1, repeats - 1))
  if method == "landmarks":
    ratio = entry.crop_ratio or config.default_crop_ratio
    stage("box_pass", lambda: clips.landmark_box(path, start, end, info, ratio, config, tools))
  stage("fit", lambda: clips.fit_params(ex["landmarks"], ex["face_found"], config, tools))
  wave = stage("audio_decode", lambda: audio_lib.load_audio(path, 16000, start_s=start,
                                                             end_s=end))
  stage("audio_features", lambda: audio_lib.audio_features(wave, config.audio_config))
  stage("jpeg_encode", lambda: [clips.encode_jpeg(f, config.jpeg_quality) for f in frames])
  parts = ["decode_crop_resize", "landmarks_track", "fit", "audio_decode", "audio_features",
           "jpeg_encode"] + (["box_pass"] if method == "landmarks" else [])
  r["other_ms"] = 1e3 * r["cpu_s"] / t - sum(r[f"{p}_ms"] for p in parts)
  r["fit_rmse_px_at_256"] = float(np.nanmean(ex["fit_residual"]) * 256)
  return r


def build_benchmark(cores: int, seconds: float, repeats: int) -> list[dict]:
  from hdtf_jax.data import clips
  from hdtf_jax.data.hdtf_lists import ClipEntry, read_lists
  config = clips.ClipConfig(frame_size=512)
  tools = clips.ClipTools(config)
  rows = []
  lists = read_lists(DUMMY)
  for e in lists.clips:
    if e.name in ("Radio1_0", "AstroNaut0_0"):  # one crop_wh clip, one landmark-box clip
      rows.append({"source": "dummy_data", **clip_breakdown(DUMMY / f"{e.video}.mp4", e, config,
                                                             tools, repeats)})
  with tempfile.TemporaryDirectory() as tmp:
    path = make_1080p(Path(tmp) / "Synth1080.mp4", seconds)
    make = lambda res, crop: ClipEntry(
        name="Synth1080_0", video="Synth1080", split="WRA", identity="Synth", clip_index=0,
        start_s=0.0, end_s=seconds, url=None, resolution=res, crop_xwyh=crop, crop_ratio=1.2)
    by_landmarks = make(720, None)  # listed at another height: crop by the landmark box
    info, start, end = clips.probe(path, by_landmarks, config)
    box = clips.landmark_box(path, start, end, info, 1.2, config, tools)
    for e in (make(1080, box), by_landmarks):  # the same box, listed as a crop_wh row
      rows.append({"source": f"1080p synthetic {seconds:g} s",
                   **clip_breakdown(path, e, config, tools, repeats)})
  return rows


def pipeline_benchmark(num_batches: int) -> list[dict]:
  import numpy as np
  import tensorflow_datasets as tfds
  from data_builders.hdtf import hdtf_dataset_builder as hdtf
  from hdtf_jax.data import pipelines
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    os.environ["HDTF_CACHE_DIR"] = os.path.join(tmp, "cache")
    os.environ["HDTF_NUM_WORKERS"] = "0"
    for name in ("params", "256"):
      hdtf.Builder(config=name, data_dir=tmp).download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=str(DUMMY)))
    s1 = tfds.data_source("hdtf/params", split="train", data_dir=tmp)
    s2 = tfds.data_source("hdtf/256", split="train", data_dir=tmp)

    def rate(ds, batch):
      it = iter(ds)
      next(it)
      t0 = time.perf_counter()
      for _ in range(num_batches):
        next(it)
      return num_batches * batch / (time.perf_counter() - t0)

    for threads in (1, 2):
      ds = pipelines.stage1_dataset(s1, window=64, stride=16, batch_size=8, seed=0,
                                    shard_index=0, shard_count=1, num_threads=threads)
      rows.append({"pipeline": "stage1 (W=64, B=8, params)", "threads": threads,
                   "samples_per_s": rate(ds, 8)})
      ds = pipelines.stage2_dataset(s2, image_size=256, batch_size=4, seed=0, shard_index=0,
                                    shard_count=1, num_threads=threads)
      rows.append({"pipeline": "stage2 (256, B=4)", "threads": threads,
                   "samples_per_s": rate(ds, 4)})
    # What one would write without ClipReader: decode whole records with tfds, pick frames.
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    n = 8
    for _ in range(n):
      ex = s2[int(rng.integers(len(s2)))]
      _ = (ex["frames"][0].astype(np.float32) / 255, ex["frames"][1].astype(np.float32) / 255)
    rows.append({"pipeline": "stage2 via tfds.data_source full decode", "threads": 1,
                 "samples_per_s": n / (time.perf_counter() - t0)})
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cores", type=int, default=1)
  parser.add_argument("--seconds", type=float, default=5.0, help="length of the 1080p clip")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--out", default=None)
  parser.add_argument("--build-only", action="store_true", help="skip the input pipelines")
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and few repeats (benchmarks/run_all.py --quick)")
  args = parser.parse_args(argv)
  if args.quick:
    args.seconds, args.repeats, args.batches = 1.0, 1, 4
  _pin(args.cores)
  import cv2
  cv2.setNumThreads(args.cores)
  from benchmarks.common import print_table, write_json
  build_rows = build_benchmark(args.cores, args.seconds, args.repeats)
  print("\nClip processing (config 512, warm): end to end, then CPU ms per frame by stage")
  print_table(build_rows, ["source", "size", "crop", "frames", "wall_s", "cpu_s",
                           "frames_per_s", "frames_per_cpu_s"])
  print()
  print_table(build_rows, ["size", "crop", "decode_raw_ms", "decode_crop_resize_ms", "box_pass_ms",
                           "landmarks_track_ms", "landmarks_detect_all_ms", "fit_ms",
                           "audio_decode_ms", "audio_features_ms", "jpeg_encode_ms", "other_ms",
                           "fit_rmse_px_at_256"])
  hd = [r for r in build_rows if r["source"].startswith("1080p")]
  # Per core: CPU time, since a shared machine's wall time also counts other people's work.
  per_core = min(r["frames_per_cpu_s"] for r in hd)
  projection = {"frames": HDTF_FRAMES, "cores": 16, "frames_per_s_per_core": per_core,
                "hours": HDTF_FRAMES / (per_core * 16) / 3600}
  print(f"\nAll of HDTF ({HDTF_FRAMES:.2g} frames) on 16 cores at {per_core:.1f} frames/s per core "
        f"(slower 1080p case): {projection['hours']:.2f} h")
  pipe_rows = [] if args.build_only else pipeline_benchmark(args.batches)
  if pipe_rows:
    print("\nInput pipelines:")
    print_table(pipe_rows)
  write_json("data", {"cores": args.cores, "build": build_rows, "projection": projection,
                      "pipelines": pipe_rows}, args.out)


if __name__ == "__main__":
  main()
