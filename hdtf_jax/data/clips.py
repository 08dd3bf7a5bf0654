"""Processing of ONE HDTF clip: raw video + time range -> a dict of NumPy arrays (no TFDS here).

Steps, in order (cheap checks first, so a bad clip fails fast):
  1. find `<video>.<ext>` in the raw folder (names that could escape it are refused);
  2. probe it: unreadable -> `corrupt_video`; no audio stream -> `no_audio`; a range starting
     after the end, or ending more than `end_tolerance_s` after it -> `range_past_end`
     (a smaller overrun is clamped);
  3. crop box (x, w, y, h) in source pixels: the listed `crop_wh` row when the raw video's height
     equals the listed resolution; otherwise the union of the face-mesh boxes over the clip,
     enlarged by the clip's `crop_ratio` (default `default_crop_ratio`), made square and
     clamped inside the frame. The union is estimated from a subsample (`landmark_box`:
     `box_fps`, reference frames only, at most `box_height` rows, plus `box_margin`), within a
     few pixels of the union over every frame at full size, for a fraction of a full decode;
  4. decode the clip once, cut, resampled to `fps`, cropped and resized by ffmpeg, and in the
     same pass: track the 468-point mesh (detect once, then follow), JPEG-encode the frames
     (or only `reference_frames` evenly spaced ones) -> `no_face` when fewer than
     `min_face_fraction` of the frames have a face;
  5. audio: the range decoded to `sample_rate` mono, padded with silence to exactly
     T / fps seconds, 15-d features at `feature_fps` (`hdtf_jax.audio`), so Ta = 4 T at 25/100;
  6. 3DMM fit of the tracked landmarks (`hdtf_jax.face.fitting.fit_clip`, the default model).

Coordinates (resolution independent): landmarks, pose (tx, ty), scale and the fit residual are in
NORMALISED crop units: u = (pixel + 0.5) / size, so 0 and 1 are the crop's outer edges whatever
its resolution (pixel centres follow OpenCV: the top-left pixel's centre is pixel 0). z and scale
are divided by `size`. `to_pixels` / `to_normalised` convert; a 3DMM projection in pixels at
size S is `pixel = scale * S * (R v)[:2] + pose[3:5] * S - 0.5`. Landmarks are NaN where
`face_found` is False; the fit bridges such frames.

Failures are `ClipSkipped(reason, detail)` with `reason` one of `SKIP_REASONS`; the build driver
(`hdtf_jax.data.build`) records them and carries on.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import cv2
import numpy as np

from hdtf_jax import audio as audio_lib
from hdtf_jax import media
from hdtf_jax.data.hdtf_lists import ClipEntry, check_name

CACHE_VERSION = 2
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".m4v", ".avi", ".flv", ".ts")
SKIP_REASONS = {
    "unsafe_name": "the video name could resolve outside the raw-video folder",
    "missing_video": "no raw video file for the clip in the raw-video folder",
    "corrupt_video": "ffmpeg cannot read or decode the video",
    "no_audio": "the video has no audio stream",
    "range_past_end": "the clip's time range lies (partly) past the end of the video",
    "no_face": "no face in enough of the clip's frames",
}
ProgressFn = Callable[[str, int, int], None]


class ClipSkipped(Exception):
  """A clip that cannot be built; `reason` is a key of SKIP_REASONS, `detail` says why."""

  def __init__(self, reason: str, detail: str):
    if reason not in SKIP_REASONS:
      raise ValueError(f"unknown skip reason {reason!r}")
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Processing settings of one clip (all sizes in pixels, rates in Hz).

  frame_size: side of the stored square frames; with `store_frames=False` the clip is decoded at
    `reference_size` instead and only `reference_frames` frames are kept.
  fps: output video frame rate (the paper does not state one; HDTF mixes 25 and 30).
  jpeg_quality: cv2 JPEG quality of stored frames.
  reference_frames, reference_size: K evenly spaced frames kept (at this size) in params mode.
  sample_rate, feature_fps: waveform rate and audio-feature rate (`hdtf_jax.audio`).
  default_crop_ratio: landmark-box enlargement when a clip has no crop_ratio row.
  box_fps: frame rate of the raw-frame pass that finds the landmark union box.
  box_height: that pass decodes taller videos scaled down to this many rows (faces in HDTF's
    720p/1080p videos stay hundreds of pixels tall; the mesh sees a 192-px crop anyway).
  box_margin: the sampled union box grows by this fraction of its longer side on every side
    (frames between samples may reach a little further).
  end_tolerance_s: a range may end this far past the video's end (clamped), no further.
  min_face_fraction: fewer frames with a face than this fraction -> skipped as `no_face`.
  min_detection_score: detector threshold (raw frames use the full-range detector).
  fit_size: crop side (px) the 3DMM is fitted at; results are normalised afterwards.
  fit_bucket: frame counts are padded up to `fit_length` (multiples of this on a geometric
    ladder, four steps per doubling), so the jitted fit compiles for few distinct shapes.
  deinterlace: run ffmpeg's yadif first (HDTF's preprocessing; YouTube files are progressive).
  """
  frame_size: int = 512
  store_frames: bool = True
  fps: float = 25.0
  jpeg_quality: int = 90
  reference_frames: int = 4
  reference_size: int = 256
  sample_rate: int = 16000
  feature_fps: float = 100.0
  default_crop_ratio: float = 1.2
  box_fps: float = 5.0
  box_height: int = 540
  box_margin: float = 0.01
  end_tolerance_s: float = 1.0
  min_face_fraction: float = 0.5
  min_detection_score: float = 0.7
  fit_size: int = 256
  fit_bucket: int = 128
  deinterlace: bool = False

  def __post_init__(self):
    for name in ("frame_size", "reference_size", "sample_rate", "fit_size", "fit_bucket",
                 "box_height"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ClipConfig.{name} must be positive, got {getattr(self, name)}")
    for name in ("fps", "feature_fps", "box_fps", "default_crop_ratio"):
      if not getattr(self, name) > 0:
        raise ValueError(f"ClipConfig.{name} must be positive, got {getattr(self, name)}")
    if not self.box_margin >= 0:
      raise ValueError(f"ClipConfig.box_margin must be >= 0, got {self.box_margin}")
    if not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f"ClipConfig.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
    if self.reference_frames < 1:
      raise ValueError(f"ClipConfig.reference_frames must be >= 1, got {self.reference_frames}")

  @property
  def decode_size(self) -> int:
    """Side of the square frames the clip is decoded, tracked and stored at."""
    return self.frame_size if self.store_frames else self.reference_size

  @property
  def audio_config(self) -> audio_lib.AudioFeatureConfig:
    return audio_lib.AudioFeatureConfig(sample_rate=self.sample_rate, fps=self.feature_fps,
                                        pitch_fps=self.feature_fps)

  def signature(self) -> str:
    """Hash of the settings, the cache version and the face-model file: a cached clip is
    reused only if it matches (bump CACHE_VERSION when processing code changes its output)."""
    text = json.dumps({"v": CACHE_VERSION, "model": _model_digest(), **dataclasses.asdict(self)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _model_digest() -> str:
  import importlib.resources
  path = importlib.resources.files("hdtf_jax.face") / "assets" / "default_model.npz"
  return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "none"


# ----------------------------------------------------------------------------- coordinates


def to_normalised(pixels, size: float) -> np.ndarray:
  """(..., 2 or 3) pixel coordinates at crop side `size` -> normalised crop units."""
  p = np.asarray(pixels, np.float32)
  out = p / size
  out[..., :2] += 0.5 / size
  return out


def to_pixels(normalised, size: float) -> np.ndarray:
  """Inverse of `to_normalised`: normalised crop units -> pixels at crop side `size`."""
  u = np.asarray(normalised, np.float32)
  out = u * size
  out[..., :2] -= 0.5
  return out


# ----------------------------------------------------------------------------- crop boxes


def square_box(x0: float, y0: float, x1: float, y1: float, ratio: float, width: int,
               height: int) -> tuple[int, int, int, int]:
  """(x, w, y, h) of the square centred on a box, side = longest side * ratio, inside the frame.

  The side is capped at the frame's shorter side; the square is shifted (not shrunk) to fit.
  """
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  side = int(round(max(x1 - x0, y1 - y0) * ratio))
  side = max(2, min(side, width, height))
  x = int(np.clip(round(cx - side / 2 + 0.5), 0, width - side))  # +0.5: centres -> edges
  y = int(np.clip(round(cy - side / 2 + 0.5), 0, height - side))
  return x, side, y, side


def fit_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
  """A listed (x, w, y, h) box clamped inside a width x height frame (shifted, then cut)."""
  x, w, y, h = box
  w, h = min(w, width), min(h, height)
  return min(max(x, 0), width - w), w, min(max(y, 0), height - h), h


# ----------------------------------------------------------------------------- small helpers


def find_video(raw_dir: str | os.PathLike, video: str) -> Path:
  """The raw file `<video>.<ext>` in `raw_dir` (first of VIDEO_EXTENSIONS that exists)."""
  try:
    check_name(video)
  except ValueError as e:
    raise ClipSkipped("unsafe_name", str(e)) from None
  raw_dir = Path(raw_dir)
  for ext in VIDEO_EXTENSIONS:
    path = raw_dir / f"{video}{ext}"
    if path.is_file():
      return path
  raise ClipSkipped("missing_video", f"no {video}{{{','.join(VIDEO_EXTENSIONS)}}} in {raw_dir}")


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
  """RGB uint8 -> JPEG bytes (cv2 / libjpeg-turbo)."""
  ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                         [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  if not ok:
    raise ValueError(f"JPEG encoding failed for a frame of shape {frame.shape}")
  return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
  """JPEG bytes -> RGB uint8 (H, W, 3)."""
  img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if img is None:
    raise ValueError(f"not a decodable image ({len(data)} bytes)")
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _noop_progress(stage: str, done: int, total: int) -> None:
  del stage, done, total


class ClipTools:
  """Per-process models, built on first use: crop / raw-frame landmarkers, face model, fit."""

  def __init__(self, config: ClipConfig):
    self.config = config
    self._crop_lm = self._raw_lm = self._model = None

  @property
  def crop_landmarker(self):
    if self._crop_lm is None:
      from hdtf_jax.face.landmarks import FaceLandmarker
      # Faces fill a crop: the short-range detector is the right one there.
      self._crop_lm = FaceLandmarker(min_detection_score=self.config.min_detection_score)
    return self._crop_lm

  @property
  def raw_landmarker(self):
    if self._raw_lm is None:
      from hdtf_jax.face.landmarks import FaceLandmarker
      # Raw 720p/1080p frames hold small faces: the full-range detector finds them.
      self._raw_lm = FaceLandmarker(detector="full_range",
                                    min_detection_score=self.config.min_detection_score)
    return self._raw_lm

  @property
  def model(self):
    if self._model is None:
      from hdtf_jax.face.morphable import default_model
      self._model = default_model()
    return self._model


# ----------------------------------------------------------------------------- the steps


@functools.lru_cache(maxsize=16)
def _probe_file(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
  del mtime_ns, size  # cache key only: a replaced file is probed again
  return media.probe_video(path, exact_frame_count=False)


def clear_probe_cache() -> None:
  """Forgets the probes kept for the videos this process has seen (benchmarks call it)."""
  _probe_file.cache_clear()


def probe(path: Path, entry: ClipEntry, config: ClipConfig) -> tuple[dict[str, Any], float, float]:
  """Source info and the clip's (start_s, end_s), end clamped to the video; or ClipSkipped.

  The probe of a file is kept per process (HDTF videos hold several clips, and a worker often
  gets more than one of a video): one ffmpeg start fewer per further clip."""
  try:
    st = os.stat(path)
    info = dict(_probe_file(os.fspath(path), st.st_mtime_ns, st.st_size))
  except (media.FFmpegError, ValueError) as e:
    raise ClipSkipped("corrupt_video", str(e)) from None
  if not info["has_audio"]:
    raise ClipSkipped("no_audio", f"{path.name} has no audio stream")
  duration = info["duration"]
  start, end = entry.start_s, entry.end_s
  if duration is not None:
    if start >= duration or end > duration + config.end_tolerance_s:
      raise ClipSkipped("range_past_end", f"range {start:g}-{end:g} s of {path.name}, which "
                                          f"lasts {duration:.2f} s")
    end = min(end, duration)
  if end - start < 1.0 / config.fps:
    raise ClipSkipped("range_past_end", f"range {start:g}-{end:g} s of {path.name} holds no frame")
  return info, start, end


# ffmpeg input options of the box pass: decode reference frames only. Nothing depends on a
# non-reference frame, so skipping them never damages the rest (decoders without the option,
# e.g. some VP9/AV1 ones, just decode everything); a sample then lands on the nearest kept frame.
BOX_DECODE_OPTIONS = ("-skip_frame", "noref")


def landmark_box(path: Path, start: float, end: float, info: Mapping[str, Any], ratio: float,
                 config: ClipConfig, tools: ClipTools, progress: ProgressFn = _noop_progress
                 ) -> tuple[int, int, int, int]:
  """Union of the mesh boxes over the clip, squared and enlarged by `ratio`.

  The union comes from a subsample: frames at `box_fps`, picked among the reference frames
  only (`BOX_DECODE_OPTIONS`) and scaled to at most `box_height` rows, tracked (detect, then
  follow) with the full-range detector; it grows by `box_margin` of its longer side on every
  side for the frames in between. tests/test_clips.py compares it with the union over every
  frame at full size.
  """
  from hdtf_jax.face.landmarks import track_video
  total = audio_lib.num_frames(end - start, config.box_fps)
  width, height = info["width"], info["height"]
  size = None
  if height > config.box_height:
    size = (config.box_height, max(2, 2 * round(width * config.box_height / height / 2)))

  def frames(options):
    it = media.iter_video_frames(path, fps=config.box_fps, start_s=start, end_s=end, size=size,
                                 scale_flags="area", deinterlace=config.deinterlace,
                                 decode_options=options, source_info=dict(info))
    for i, frame in enumerate(it):
      progress("box", i + 1, total)
      yield frame

  track = None
  for options in (BOX_DECODE_OPTIONS, ()):  # a range holding no reference frame: decode all
    try:
      track = track_video(frames(options), tools.raw_landmarker, fps=config.box_fps,
                          smoothing=None, source=str(path))
      break
    except media.FFmpegError as e:
      raise ClipSkipped("corrupt_video", str(e)) from None
    except ValueError as e:  # no frames at all
      if options == ():
        raise ClipSkipped("range_past_end", str(e)) from None
  if not track.found.any():
    raise ClipSkipped("no_face", f"no face in {track.found.size} frames of {path.name} sampled at "
                                 f"{config.box_fps:g} fps over {start:g}-{end:g} s")
  b = track.boxes[track.found].astype(np.float64)
  if size is not None:  # back to source pixels (pixel centres at integers in both)
    sx, sy = size[1] / width, size[0] / height
    b = (b + 0.5) / np.array([sx, sy, sx, sy]) - 0.5
  x0, y0 = b[:, 0].min(), b[:, 1].min()
  x1, y1 = b[:, 2].max(), b[:, 3].max()
  m = config.box_margin * max(x1 - x0, y1 - y0)
  return square_box(x0 - m, y0 - m, x1 + m, y1 + m, ratio, width, height)


def choose_crop(path: Path, entry: ClipEntry, start: float, end: float, info: Mapping[str, Any],
                config: ClipConfig, tools: ClipTools, progress: ProgressFn = _noop_progress
                ) -> tuple[tuple[int, int, int, int], str]:
  """(x, w, y, h) and the method: "crop_wh" when the file has the listed resolution, else
  "landmarks" (see the module docstring)."""
  if entry.crop_xwyh is not None and entry.resolution == info["height"]:
    return fit_box(entry.crop_xwyh, info["width"], info["height"]), "crop_wh"
  ratio = entry.crop_ratio or config.default_crop_ratio
  return landmark_box(path, start, end, info, ratio, config, tools, progress), "landmarks"


def track_crops(path: Path, start: float, end: float, box: tuple[int, int, int, int],
                num_frames: int, config: ClipConfig, tools: ClipTools,
                progress: ProgressFn = _noop_progress,
                source_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """One decode pass over the cropped clip: mesh track + JPEG frames (or reference frames).

  Returns landmarks (T, 468, 3) normalised, found (T,), frames (list of JPEG bytes or None) and
  reference_frames (list of JPEG bytes) with exactly `num_frames` = T frames (a decoder that
  comes up a frame or two short repeats the last one). `source_info`: the file's probe, if known.
  """
  from hdtf_jax.face.landmarks import track_video
  size = config.decode_size
  ref_idx = [int(i) for i in np.linspace(0, num_frames - 1, config.reference_frames).round()]
  frames: list[bytes] = []
  refs: dict[int, bytes] = {}
  flags = "area" if box[1] > size else "bicubic"  # area for reductions, bicubic to enlarge

  def stream() -> Iterator[np.ndarray]:
    it = media.iter_video_frames(path, fps=config.fps, size=size, start_s=start, end_s=end,
                                 crop=box, deinterlace=config.deinterlace, scale_flags=flags,
                                 source_info=source_info)
    for i, frame in enumerate(it):
      if i >= num_frames:
        it.close()
        return
      if config.store_frames:
        frames.append(encode_jpeg(frame, config.jpeg_quality))
      if i in ref_idx:
        ref = frame if size == config.reference_size else cv2.resize(
            frame, (config.reference_size,) * 2, interpolation=cv2.INTER_AREA)
        refs[i] = encode_jpeg(ref, config.jpeg_quality)
      progress("frames", i + 1, num_frames)
      yield frame

  try:
    track = track_video(stream(), tools.crop_landmarker, fps=config.fps, source=str(path))
  except media.FFmpegError as e:
    raise ClipSkipped("corrupt_video", str(e)) from None
  except ValueError as e:
    raise ClipSkipped("corrupt_video", f"no frames decoded from {path.name}: {e}") from None
  n = track.found.size
  short = num_frames - n
  if short > max(2, round(0.02 * num_frames)):
    raise ClipSkipped("range_past_end", f"decoded {n} of {num_frames} frames from {path.name}")
  points, found = track.points, track.found
  if short > 0:  # pad the last frame or two (ffmpeg's fps filter may stop early)
    points = np.concatenate([points, np.repeat(points[-1:], short, 0)])
    found = np.concatenate([found, np.repeat(found[-1:], short)])
    if config.store_frames:
      frames += [frames[-1]] * short
  for i in ref_idx:  # reference frames past the decoded end: use the last one kept
    if i not in refs:
      refs[i] = refs[max(k for k in refs)] if refs else encode_jpeg(
          np.zeros((config.reference_size,) * 2 + (3,), np.uint8), config.jpeg_quality)
  return {"landmarks": to_normalised(points, size), "found": found.astype(bool),
          "frames": frames if config.store_frames else None,
          "reference_frames": [refs[i] for i in ref_idx]}


def audio_track(path: Path, start: float, end: float, num_frames: int, config: ClipConfig
                ) -> tuple[np.ndarray, np.ndarray]:
  """int16 waveform of exactly T / fps seconds and its (Ta, 15) float32 features."""
  try:
    wave = audio_lib.load_audio(path, config.sample_rate, start_s=start, end_s=end)
  except media.FFmpegError as e:
    raise ClipSkipped("corrupt_video", f"audio: {e}") from None
  except ValueError as e:
    raise ClipSkipped("no_audio", str(e)) from None
  n = int(round(num_frames * config.sample_rate / config.fps))
  wave = np.pad(wave, (0, max(0, n - wave.size)))[:n]  # silence past the end of the track
  features = audio_lib.audio_features(wave, config.audio_config)
  expected = audio_lib.num_frames(num_frames / config.fps, config.feature_fps)
  if features.shape[0] != expected:
    raise AssertionError(f"audio features have {features.shape[0]} frames, expected {expected}")
  pcm = np.round(np.clip(wave, -1.0, 1.0) * 32767.0).astype(np.int16)
  return pcm, features


def fit_length(t: int, bucket: int) -> int:
  """Padded frame count for the fit: bucket * m with m in 1, 2, 3, 4, 6, 7, 8, 10, 12, 14, 16,
  20, 23, 27, 32, ... (2^(k/4) rounded up), so few distinct shapes ever get compiled."""
  n = max(1, -(-t // bucket))
  if n <= 4:
    return n * bucket
  m = math.ceil(2 ** (math.ceil(4 * math.log2(n) - 1e-9) / 4) - 1e-9)
  return max(m, n) * bucket


def fit_params(landmarks: np.ndarray, found: np.ndarray, config: ClipConfig,
               tools: ClipTools) -> dict[str, np.ndarray]:
  """3DMM fit of normalised landmarks (T, 468, 3); parameters returned in normalised units."""
  from hdtf_jax.face import fitting
  t = landmarks.shape[0]
  padded = fit_length(t, config.fit_bucket)
  px = to_pixels(np.nan_to_num(landmarks), config.fit_size)
  px = np.concatenate([px, np.repeat(px[-1:], padded - t, 0)])
  mask = np.concatenate([found, np.zeros(padded - t, bool)])
  result = fitting.fit_clip(tools.model, px, mask)
  size = float(config.fit_size)
  params = normalised_fit(result, size)
  params.update({k: params[k][:t] for k in ("mouth", "eyebrow", "pose")})
  params["fit_residual"] = np.asarray(result.residual_px, np.float32)[:t] / size
  return params


def normalised_fit(result, size: float) -> dict[str, np.ndarray]:
  """A `fitting` result in pixels at crop side `size` -> parameters in normalised crop units
  (pose shifts get the +0.5 pixel-centre offset of `to_normalised`, scale / size); per-frame
  arrays keep their frame axis. Shared by the dataset and generation's reference fit."""
  pose = np.array(result.pose, np.float32)
  pose[..., 3:5] = (pose[..., 3:5] + 0.5) / size
  return {"shape": np.asarray(result.shape, np.float32),
          "scale": np.float32(np.asarray(result.scale) / size),
          "mouth": np.asarray(result.mouth, np.float32),
          "eyebrow": np.asarray(result.eyebrow, np.float32), "pose": pose}


def process_clip(entry: ClipEntry, raw_dir: str | os.PathLike, config: ClipConfig,
                 tools: ClipTools | None = None, progress: ProgressFn | None = None
                 ) -> dict[str, Any]:
  """Builds one clip; returns the example dict (see `example_keys`) or raises ClipSkipped."""
  tools = tools or ClipTools(config)
  progress = progress or _noop_progress
  path = find_video(raw_dir, entry.video)
  info, start, end = probe(path, entry, config)
  t = audio_lib.num_frames(end - start, config.fps)
  box, method = choose_crop(path, entry, start, end, info, config, tools, progress)
  track = track_crops(path, start, end, box, t, config, tools, progress, source_info=info)
  found = track["found"]
  if found.mean() < config.min_face_fraction:
    raise ClipSkipped("no_face", f"a face in {int(found.sum())} of {t} frames of the "
                                 f"{method} crop {box} (need {config.min_face_fraction:.0%})")
  progress("audio", 0, 1)
  waveform, features = audio_track(path, start, end, t, config)
  progress("fit", 0, 1)
  params = fit_params(track["landmarks"], found, config, tools)
  progress("fit", 1, 1)
  example = {
      "clip": entry.name, "video": entry.video, "list_split": entry.split,
      "clip_index": np.int32(entry.clip_index), "identity": entry.identity,
      "url": entry.url or "", "source_resolution": np.int32(info["height"]),
      "fps": np.float32(config.fps), "audio_features": features, "waveform": waveform,
      "landmarks": track["landmarks"], "face_found": found, **params,
      "crop_box": np.asarray(box, np.int32), "crop_method": method,
      "start_s": np.float32(start), "end_s": np.float32(end),
  }
  if config.store_frames:
    example["frames"] = track["frames"]
  else:
    example["reference_frames"] = track["reference_frames"]
  return example


# ----------------------------------------------------------------------------- the cache


_BYTE_LISTS = ("frames", "reference_frames")


def save_clip(path: str | os.PathLike, example: Mapping[str, Any], signature: str) -> Path:
  """Writes an example as .npz atomically (temp file + rename: a kill never leaves half a file)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {"_signature": np.asarray(signature)}
  for key, value in example.items():
    if key in _BYTE_LISTS:
      arrays[f"{key}/data"] = np.frombuffer(b"".join(value), np.uint8)
      arrays[f"{key}/sizes"] = np.asarray([len(v) for v in value], np.int64)
    else:
      arrays[key] = np.asarray(value)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)
  return path


def load_clip(path: str | os.PathLike, signature: str | None = None) -> dict[str, Any]:
  """Reads `save_clip`'s file; ValueError if it is damaged or was made with other settings."""
  path = Path(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except Exception as e:  # zipfile / numpy errors of a damaged file
    raise ValueError(f"cached clip {str(path)!r} is unreadable: {e}") from None
  if signature is not None and str(data.get("_signature")) != signature:
    raise ValueError(f"cached clip {str(path)!r} was made with other settings")
  out: dict[str, Any] = {}
  for key, value in data.items():
    if key == "_signature" or key.endswith("/sizes"):
      continue
    if key.endswith("/data"):
      name = key[:-5]
      ends = np.cumsum(data[f"{name}/sizes"])
      blob = value.tobytes()
      out[name] = [blob[e - s:e] for s, e in zip(data[f"{name}/sizes"], ends)]
    elif value.dtype.kind == "U":
      out[key] = str(value)
    else:
      out[key] = value
  return out
