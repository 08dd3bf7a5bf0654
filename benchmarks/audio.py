"""Audio decoding and 15-d feature throughput, against what a user would reach for: librosa.

Decoding: `hdtf_jax.audio.load_audio` (bundled ffmpeg, one subprocess) vs
`librosa.load(sr=16000, mono=True)` (libsndfile + soxr) on the same 44.1 kHz
stereo wav / mp3, plus AAC (m4a, as in YouTube downloads), which librosa cannot
open without a system ffmpeg for audioread.
Features: `audio_features` (MFCC + pYIN at 0.2-semitone bins) vs librosa's
defaults for the same job (librosa.feature.mfcc + librosa.pyin, 0.1-semitone
bins) on the same audio. Figures are seconds of audio handled per wall-clock
second (x real time).

  .venv/bin/python -m benchmarks.audio [--seconds 60] [--repeats 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/audio.py`
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import print_table, time_fn, write_json
from hdtf_jax import audio, media

SPEECH = Path(__file__).resolve().parents[1] / "tests" / "data" / "speech_16k.wav"


def _test_audio(seconds: float, folder: Path) -> dict[str, Path]:
  """`seconds` of speech (the test clip, repeated) as 44.1 kHz stereo wav, mp3 and m4a."""
  import soundfile as sf
  y, sr = sf.read(SPEECH, dtype="float32")
  y = np.tile(y, int(np.ceil(seconds * sr / y.size)))[:int(seconds * sr)]
  mono = folder / "speech_16k.wav"
  sf.write(mono, y, sr)
  paths = {"wav": folder / "speech_44k_stereo.wav"}
  media.run_ffmpeg(["-y", "-i", mono, "-ac", "2", "-ar", "44100", "-c:a", "pcm_s16le",
                    paths["wav"]], path=paths["wav"])
  for fmt, codec in (("mp3", "libmp3lame"), ("m4a", "aac")):
    paths[fmt] = folder / f"speech_44k_stereo.{fmt}"
    media.run_ffmpeg(["-y", "-i", paths["wav"], "-c:a", codec, "-b:a", "128k", paths[fmt]],
                     path=paths[fmt])
  return paths


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=60.0, help="length of the test audio")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and few repeats (benchmarks/run_all.py --quick)")
  args = parser.parse_args(argv)
  if args.quick:
    args.seconds, args.repeats = 10.0, 1

  import librosa
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    paths = _test_audio(args.seconds, Path(tmp))
    for fmt, path in paths.items():
      t = time_fn(lambda: audio.load_audio(path, 16000), warmup=1, repeats=args.repeats)
      rows.append({"task": f"decode {fmt} 44.1k stereo -> 16k mono", "impl": "hdtf_jax.load_audio",
                   "median_ms": t["median_ms"], "min_ms": t["min_ms"],
                   "x_realtime": args.seconds / t["median_ms"] * 1e3})
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          librosa.load(path, sr=16000, mono=True)
          t = time_fn(lambda: librosa.load(path, sr=16000, mono=True), warmup=0,
                      repeats=args.repeats)
        rows.append({"task": f"decode {fmt} 44.1k stereo -> 16k mono", "impl": "librosa.load",
                     "median_ms": t["median_ms"], "min_ms": t["min_ms"],
                     "x_realtime": args.seconds / t["median_ms"] * 1e3})
      except Exception as e:  # m4a: librosa needs audioread + a system ffmpeg
        rows.append({"task": f"decode {fmt} 44.1k stereo -> 16k mono", "impl": "librosa.load",
                     "median_ms": float("nan"), "x_realtime": float("nan"),
                     "note": f"fails: {type(e).__name__}"})
    wave = audio.load_audio(paths["wav"], 16000)

  cfg = audio.AudioFeatureConfig()
  audio.audio_features(wave[:16000], cfg)  # numba compiles pYIN's kernels once

  def librosa_defaults():
    librosa.feature.mfcc(y=wave, sr=16000, n_mfcc=13, n_fft=512, hop_length=160,
                         win_length=400, n_mels=40)
    librosa.pyin(wave, fmin=65, fmax=600, sr=16000, frame_length=1024, hop_length=160)

  for name, fn in (("hdtf_jax.audio_features (15-d)", lambda: audio.audio_features(wave, cfg)),
                   ("  of which mfcc", lambda: audio.mfcc(wave, cfg)),
                   ("  of which pitch", lambda: audio.pitch(wave, cfg)),
                   ("librosa mfcc + pyin defaults", librosa_defaults)):
    t = time_fn(fn, warmup=0, repeats=args.repeats)
    rows.append({"task": f"features of {args.seconds:g} s at 100 fps", "impl": name,
                 "median_ms": t["median_ms"], "min_ms": t["min_ms"],
                 "x_realtime": args.seconds / t["median_ms"] * 1e3})

  print_table(rows, ["task", "impl", "median_ms", "min_ms", "x_realtime", "note"])
  write_json("audio", {"seconds_of_audio": args.seconds, "rows": rows}, args.out)


if __name__ == "__main__":
  main()
