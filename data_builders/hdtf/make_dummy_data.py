"""Makes `dummy_data/`: a tiny HDTF-like manual_dir for the builder test (committed, < 1 MB).

    python -m data_builders.hdtf.make_dummy_data [--out data_builders/hdtf/dummy_data]

Videos are a real face (`skimage.data.astronaut()`, flipped / recoloured for a second speaker)
drifting over a static background, with espeak-ng speech muxed in (espeak-ng is needed only to
regenerate the files, never to use them). Annotation files follow the official format with its
quirks: a UTF-8 BOM, trailing spaces, a missing final newline, a video with a url but no time
line, a reversed time range, a clip without a crop row, resolution `0`, a name that would escape
the folder. The clips cover every skip reason of the build:

    Radio1_0, Radio1_1   built   (raw height == listed 240: crop by crop_wh)   -> test split
    AstroNaut0_0         built   (listed 720, raw 270: crop by landmark box x1.3)  -> train
    EileenCollins1_0     built   (listed resolution 0: landmark box x1.2)         -> train
    EileenCollins1_1     skipped range_past_end
    Corrupt1_0           skipped corrupt_video
    Mute1_0              skipped no_audio
    Scenery1_0           skipped no_face
    Missing1_0           skipped missing_video

`write_face_video` is also what `tests/test_clips.py` uses to make its clips.
"""
from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np

from hdtf_jax import media

DEFAULT_OUT = Path(__file__).resolve().parent / "dummy_data"
# The region of astronaut() holding the head and helmet (rows, cols), square.
_FACE_REGION = (slice(0, 300), slice(90, 390))


def face_patch(side: int, *, flip: bool = False, tint=(1.0, 1.0, 1.0)) -> np.ndarray:
  """astronaut()'s head as a (side, side, 3) uint8 patch, optionally mirrored and recoloured."""
  import skimage.data
  patch = skimage.data.astronaut()[_FACE_REGION]
  if flip:
    patch = patch[:, ::-1]
  patch = np.clip(patch.astype(np.float32) * np.asarray(tint, np.float32), 0, 255)
  return cv2.resize(patch.astype(np.uint8), (side, side), interpolation=cv2.INTER_AREA)


def background(height: int, width: int, seed: int = 0) -> np.ndarray:
  """A static smooth colour gradient with soft blobs (no faces)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  base = np.stack([60 + 80 * xx / width, 90 + 40 * yy / height, 120 - 50 * xx / width], -1)
  for _ in range(6):
    cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 40)
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    base += rng.uniform(-40, 40, 3) * blob[..., None]
  return np.clip(base, 0, 255).astype(np.uint8)


def face_frames(height: int, width: int, fps: float, seconds: float, *, face_px: int,
                centre=(0.5, 0.45), drift_px: float = 12.0, flip: bool = False,
                tint=(1.0, 1.0, 1.0), seed: int = 0) -> np.ndarray:
  """(T, H, W, 3) uint8: the face patch moving on a slow Lissajous path around `centre`."""
  patch = face_patch(face_px, flip=flip, tint=tint)
  bg = background(height, width, seed)
  n = int(round(seconds * fps))
  frames = np.empty((n, height, width, 3), np.uint8)
  for t in range(n):
    phase = 2 * math.pi * t / max(n, 1)
    cx = centre[0] * width + drift_px * math.sin(phase)
    cy = centre[1] * height + 0.5 * drift_px * math.sin(2 * phase)
    m = np.float32([[1, 0, cx - face_px / 2], [0, 1, cy - face_px / 2]])
    warped = cv2.warpAffine(patch, m, (width, height), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    mask = cv2.warpAffine(np.ones((face_px, face_px), np.float32), m, (width, height),
                          flags=cv2.INTER_LINEAR)[..., None]
    frames[t] = (bg * (1 - mask) + warped * mask).astype(np.uint8)
  return frames


def speech(text: str, sample_rate: int = 16000, seconds: float | None = None) -> np.ndarray:
  """espeak-ng speech as float32 mono at `sample_rate`, padded / cut to `seconds`."""
  exe = shutil.which("espeak-ng")
  if exe is None:
    raise FileNotFoundError("espeak-ng is needed to regenerate the dummy data "
                            "(apt-get install espeak-ng)")
  with tempfile.TemporaryDirectory() as tmp:
    wav = Path(tmp) / "speech.wav"
    subprocess.run([exe, "-v", "en-us", "-s", "170", "-w", str(wav), text], check=True)
    from hdtf_jax import audio
    wave = audio.load_audio(wav, sample_rate)
  if seconds is not None:
    n = int(round(seconds * sample_rate))
    wave = np.pad(wave, (0, max(0, n - wave.size)))[:n]
  return wave


def tone(seconds: float, sample_rate: int = 16000, f0: float = 140.0) -> np.ndarray:
  """A voiced-like harmonic tone with a 4 Hz syllable envelope (no external tools)."""
  t = np.arange(int(round(seconds * sample_rate))) / sample_rate
  wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
  env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
  return (0.2 * wave * env).astype(np.float32)


def write_face_video(path, *, height: int, width: int, fps: float, seconds: float, face_px: int,
                     audio: np.ndarray | None = None, sample_rate: int = 16000,
                     crf: int = 30, **frame_kwargs) -> Path:
  """Writes a moving-face mp4 (H.264, AAC when `audio` is given)."""
  frames = face_frames(height, width, fps, seconds, face_px=face_px, **frame_kwargs)
  return media.write_video(path, frames, fps, audio=audio, audio_rate=sample_rate, crf=crf,
                           preset="slow")


def _write(path: Path, lines: list[str], *, bom: bool = False, final_newline: bool = True) -> None:
  text = "\n".join(lines) + ("\n" if final_newline else "")
  path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())


def write_lists(out: Path) -> None:
  """The annotation files, with the official quirks (see the module docstring)."""
  url = "https://www.youtube.com/watch?v="
  # RD: crop by crop_wh (raw height 240 == listed 240).
  _write(out / "RD_video_url.txt", [f"Radio1 {url}dummyRD0001&t=6s "])
  _write(out / "RD_resolution.txt", ["Radio1.mp4 240"])
  _write(out / "RD_annotion_time.txt", ["Radio1.mp4 00:00-00:01 00:01-00:02 "], bom=True)
  _write(out / "RD_crop_wh.txt", ["Radio1_0.mp4 113 110 36 110", "Radio1_1.mp4 113 110 36 110"])
  _write(out / "RD_crop_ratio.txt", ["Radio1_0.mp4 1.2", "Radio1_1.mp4 1.2"],
         final_newline=False)
  # WDA: listed 720 but the file is 270 high -> landmark box; a url-only video; a reversed range.
  _write(out / "WDA_video_url.txt", [f"AstroNaut0 {url}dummyWDA001",
                                     f"GhostSpeaker {url}dummyWDA002",
                                     f"BadRange {url}dummyWDA003"])
  _write(out / "WDA_resolution.txt", ["AstroNaut0.mp4 720 ", "GhostSpeaker.mp4 720",
                                      "BadRange.mp4 720"])
  _write(out / "WDA_annotion_time.txt", ["AstroNaut0.mp4 00:00-00:02", "BadRange.mp4 00:05-00:03"],
         final_newline=False)
  _write(out / "WDA_crop_wh.txt", [])  # no crop rows at all
  _write(out / "WDA_crop_ratio.txt", ["AstroNaut0_0.mp4 1.3"])
  # WRA: resolution 0, a range past the end, corrupt / silent / faceless / missing files, `../`.
  _write(out / "WRA_video_url.txt", [f"EileenCollins1 {url}dummyWRA001",
                                     f"Corrupt1 {url}dummyWRA002",
                                     f"Mute1 {url}dummyWRA003", f"Scenery1 {url}dummyWRA004",
                                     f"Missing1 {url}dummyWRA005", f"../Evil1 {url}dummyWRA006"])
  _write(out / "WRA_resolution.txt", ["EileenCollins1.mp4 0", "Corrupt1.mp4 240", "Mute1.mp4 240",
                                      "Scenery1.mp4 240", "Missing1.mp4 240"])
  _write(out / "WRA_annotion_time.txt", [
      "EileenCollins1.mp4 00:00-00:01 00:02-00:09", "Corrupt1.mp4 00:00-00:01",
      "Mute1.mp4 00:00-00:01", "Scenery1.mp4 00:00-00:01", "Missing1.mp4 00:00-00:01",
      "../Evil1.mp4 00:00-00:01"])
  _write(out / "WRA_crop_wh.txt", ["Mute1_0.mp4 97 110 37 110"])
  _write(out / "WRA_crop_ratio.txt", ["EileenCollins1_0.mp4 1.2", "EileenCollins1_1.mp4 1.2"])


def make(out: Path = DEFAULT_OUT) -> None:
  out.mkdir(parents=True, exist_ok=True)
  for old in out.glob("*"):
    if old.suffix in (".mp4", ".txt"):
      old.unlink()
  write_lists(out)
  sr = 16000
  write_face_video(out / "Radio1.mp4", height=240, width=320, fps=30, seconds=2.2, face_px=170,
                   centre=(0.55, 0.45), audio=speech("Welcome back to the radio hour.", sr, 2.2))
  write_face_video(out / "AstroNaut0.mp4", height=270, width=480, fps=25, seconds=2.2,
                   face_px=160, centre=(0.35, 0.5),
                   audio=speech("Good morning, I am a dummy astronaut.", sr, 2.2), seed=1)
  write_face_video(out / "EileenCollins1.mp4", height=240, width=320, fps=25, seconds=1.6,
                   face_px=160, centre=(0.45, 0.5), flip=True, tint=(0.9, 1.0, 1.15),
                   audio=speech("Hello from orbit.", sr, 1.6), seed=2)
  write_face_video(out / "Mute1.mp4", height=240, width=320, fps=25, seconds=1.2, face_px=160,
                   centre=(0.5, 0.45), seed=3)
  import skimage.data
  scenery = cv2.resize(skimage.data.coffee(), (320, 240), interpolation=cv2.INTER_AREA)
  frames = np.stack([np.roll(scenery, 2 * t, axis=1) for t in range(30)])
  media.write_video(out / "Scenery1.mp4", frames, 25, audio=tone(1.2, sr), audio_rate=sr, crf=34,
                    preset="slow")
  (out / "Corrupt1.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
  total = sum(p.stat().st_size for p in out.iterdir())
  print(f"wrote {out} ({total / 1024:.0f} KiB)")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
  make(parser.parse_args(argv).out)


if __name__ == "__main__":
  main()
