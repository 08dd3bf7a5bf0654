"""One-shot generation: a reference image and driving audio (or tracked parameters) -> an mp4.

    models = load_models("runs/s1", "runs/s2")
    generate_video("face.jpg", "speech.wav", "out.mp4", models)

The pipeline (PAPER.md §2; issue #7), one small function per step:
  1. `load_models`: both stages' configs (the `config.json` each training run saved in its
     workdir) and inference variables; the two stages must fit together.
  2. `prepare_reference`: detect faces (the largest one; a warning when there are several),
     crop with the dataset's rule (`clips.square_box` of the face-mesh box enlarged by the
     crop ratio), landmarks on the crop, 3DMM fit (`fitting.fit_image`), parameters in the
     dataset's normalised crop units (`hdtf_jax.data.clips`).
  3. `animate`: 15-d audio features at 100 fps -> G_ani (`stage1.predict`, chunked with
     overlap, any length) -> Gaussian smoothing over time -> resampled to the video fps
     -> driving parameters. Reenactment replaces tracks by a real video's (`reenact_params`).
  4. `render`: F_app + G_vid in jitted fixed-size batches, uint8 frames one at a time.
  5. `generate_video`: frames streamed into `media.VideoWriter` (H.264, audio muxed, written
     under a temporary name and renamed only on success), optional paste-back into the source
     image and side-by-side preview.

Conventions:
  * Driving parameters are dicts of (T, ...) arrays: shape (T, 60), scale (T,), mouth (T, 28),
    eyebrow (T, 5), pose (T, 5) (yaw, pitch, roll radians; tx, ty and scale in normalised
    crop units), the shape and scale repeated from the reference.
  * G_ani's outputs are parameters in the reference's crop frame; the head / eyebrow
    multipliers scale the deviation from the reference's pose / eyebrow
    (`drv = ref + k * (pred - ref)`), and `keep_head_still` holds the reference's pose.
  * Smoothing (`smoothing`, seconds): a Gaussian over time on the 100 fps tracks before they
    are resampled to the video rate (its default, 20 ms, is half a frame at 25 fps: it
    removes what the decimation would alias and keeps the lip motion).
  * Pose from another face (`--pose-from`, `--params-from`) is applied RELATIVE to that
    video's first frame: its angle changes are added to the reference's angles, its shifts
    are converted from its face scale to the reference's and added to the reference's shift.
    So the reference keeps its own framing whatever the other video's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import cv2
import numpy as np

from hdtf_jax import audio as audio_lib
from hdtf_jax import media
from hdtf_jax.data import clips

PARAM_KEYS = ("shape", "scale", "mouth", "eyebrow", "pose")
DEFAULT_CROP_RATIO = clips.ClipConfig.default_crop_ratio   # the dataset's landmark-box ratio
FIT_SIZE = clips.ClipConfig.fit_size                       # crop side (px) landmarks + fit use
SAMPLE_RATE = clips.ClipConfig.sample_rate                 # audio-feature input rate
FEATURE_FPS = clips.ClipConfig.feature_fps                 # G_ani's rate (100)
MUX_RATE = 48000            # the sound track's rate in the mp4 (AAC frames of 21 ms)
MIN_FACE_PX = 128           # faces smaller than this (mesh box, longest side) are refused
DEFAULT_SMOOTHING_S = 0.02  # Gaussian sigma over time of the driving tracks, seconds
TRACK_SIZE = 512            # `--pose-from` videos are analysed at this longest side
# G_vid frames per jitted call: on CPU one frame per call measured fastest (128 px: 15 vs 11
# frames/s at batch 8, `python -m benchmarks.generate`: big batches leave the caches), on an
# accelerator batches fill the device.
BATCH_CPU, BATCH_ACCELERATOR = 1, 8


class GenerateError(ValueError):
  """Bad input to generation; the message is one line naming the file and the problem."""


# ------------------------------------------------------------------------------------ models

@dataclasses.dataclass
class Models:
  """Everything generation needs from training: both configs, inference variables, 3DMM."""
  stage1_config: Any            # ml_collections.ConfigDict of the stage-1 run
  stage2_config: Any            # ... of the stage-2 run
  stage1_variables: Any         # `stage1.inference_variables`
  stage2_variables: Any         # `stage2.inference_variables`
  face_model: Any               # hdtf_jax.face.morphable.MorphableModel
  stage1_workdir: Path | None = None
  stage2_workdir: Path | None = None
  steps: tuple[int | None, int | None] = (None, None)

  @property
  def image_size(self) -> int:
    return int(self.stage2_config.model.image_size)


def stage_of_config(config: Mapping) -> int | None:
  """1 for a stage-1 (G_ani) config, 2 for a stage-2 (G_vid) one, None for neither."""
  model = config.get("model") or {}
  if "audio_dim" in model and "mouth_dim" in model:
    return 1
  if "image_size" in model and "flow" in config:
    return 2
  return None


def read_config(workdir: str | os.PathLike, stage: int):
  """The config a training run saved as `workdir/config.json` (GenerateError when the workdir,
  its config or its checkpoints are missing, or it belongs to the other stage)."""
  import ml_collections
  workdir = Path(workdir)
  what = f"stage-{stage} workdir {str(workdir)!r}"
  if not workdir.is_dir():
    raise GenerateError(f"{what}: no such directory")
  path = workdir / "config.json"
  if not path.is_file():
    raise GenerateError(f"{what}: no config.json (written by `python -m experiments.stage{stage}`"
                        f" when training starts)")
  try:
    raw = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise GenerateError(f"{path}: unreadable config ({e})") from None
  found = stage_of_config(raw) if isinstance(raw, dict) else None
  if found is None:
    raise GenerateError(f"{path}: not a stage-1 or stage-2 training config")
  if found != stage:
    raise GenerateError(f"{what} holds a stage-{found} run (G_{'ani' if found == 1 else 'vid'}); "
                        f"pass it as --stage{found}")
  ckpt = workdir / "checkpoints"
  if not ckpt.is_dir() or not any(p.name.isdigit() for p in ckpt.iterdir()):
    raise GenerateError(f"{what}: no checkpoint in {ckpt}")
  return ml_collections.ConfigDict(raw)


def check_compatible(stage1_config, stage2_config, face_model, *, preset: str | None = None,
                     names: tuple[str, str] = ("stage 1", "stage 2")) -> None:
  """GenerateError when the stages cannot drive each other, or `preset` does not match."""
  m1 = stage1_config.model
  want_audio = audio_lib.AudioFeatureConfig().num_features
  if m1.audio_dim != want_audio:
    raise GenerateError(f"{names[0]}: G_ani takes {m1.audio_dim}-d audio features, generation "
                        f"computes {want_audio}-d ones")
  dims = {"mouth": (m1.mouth_dim, face_model.n_mouth), "eyebrow": (m1.eyebrow_dim,
                                                                   face_model.n_eyebrow),
          "head pose": (m1.head_dim, 5)}
  for part, (g, f) in dims.items():
    if g != f:
      raise GenerateError(f"{names[0]}: G_ani predicts {g} {part} parameters, stage 2's face "
                          f"model has {f}: the stages do not fit together")
  if m1.identity.kind == "embedding":
    raise GenerateError(f"{names[0]}: G_ani was trained on precomputed identity embeddings "
                        f"(identity.kind='embedding'), which generation cannot compute")
  if preset is not None:
    p1, p2 = stage1_config.get("preset", ""), stage2_config.get("preset", "")
    # Stage 1 has no "256" preset: with --preset 256 only stage 2 is checked.
    if p2 != preset or (preset in ("paper", "demo", "tiny") and p1 != preset):
      raise GenerateError(f"--preset {preset}: {names[0]} was trained with preset {p1!r}, "
                          f"{names[1]} with {p2!r}")


def load_models(stage1_workdir: str | os.PathLike, stage2_workdir: str | os.PathLike, *,
                step: int | tuple[int | None, int | None] | None = None,
                preset: str | None = None) -> Models:
  """Both stages' latest checkpoints (or `step`, one int for both or a pair) and configs."""
  from hdtf_jax.face import morphable
  from hdtf_jax.train import stage1, stage2
  s1, s2 = step if isinstance(step, tuple) else (step, step)
  c1, c2 = read_config(stage1_workdir, 1), read_config(stage2_workdir, 2)
  face_model = morphable.default_model()
  check_compatible(c1, c2, face_model, preset=preset,
                   names=(f"stage-1 workdir {str(stage1_workdir)!r}",
                          f"stage-2 workdir {str(stage2_workdir)!r}"))
  states = []
  for restore, c, wd, at, n in ((stage1.restore_state, c1, stage1_workdir, s1, 1),
                                (stage2.restore_state, c2, stage2_workdir, s2, 2)):
    try:
      states.append(restore(c, wd, step=at))
    except FileNotFoundError as e:
      raise GenerateError(f"stage-{n} workdir {str(wd)!r}: {e}") from None
    except Exception as e:  # orbax: a checkpoint of another config (shapes, tree) or step
      first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      raise GenerateError(f"stage-{n} workdir {str(wd)!r}: checkpoint does not match its "
                          f"config.json or step {at}: {first}") from None
  import jax
  return Models(c1, c2, stage1.inference_variables(states[0]),
                stage2.inference_variables(states[1]), face_model, Path(stage1_workdir),
                Path(stage2_workdir), tuple(int(jax.device_get(s.step)) for s in states))


def init_models(stage1_config, stage2_config, *, seed: int = 0) -> Models:
  """Models with freshly initialised (untrained) weights: for benchmarks and smoke runs."""
  import jax
  import jax.numpy as jnp
  from hdtf_jax.face import morphable
  from hdtf_jax.nn import animation, video
  face_model = morphable.default_model()
  check_compatible(stage1_config, stage2_config, face_model)
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  m1 = stage1_config.model
  v1 = animation.AnimationGenerator(m1).init(k1, *animation.dummy_inputs(m1, 1, 64), train=False)
  v1 = {"params": v1["params"], "batch_stats": v1.get("batch_stats", {}),
        "stats": {"audio_mean": jnp.zeros(m1.audio_dim), "audio_std": jnp.ones(m1.audio_dim)}}
  m2 = stage2_config.model
  v2 = video.VideoGenerator(m2).init(k2, *video.dummy_inputs(m2, 1), train=False)
  v2 = {"params": v2["params"], "batch_stats": v2.get("batch_stats", {})}
  return Models(stage1_config, stage2_config, v1, v2, face_model)


# --------------------------------------------------------------------------------- reference

@dataclasses.dataclass
class Reference:
  """The reference face: image (S, S, 3) float32 in [0, 1] at the stage-2 size, its parameters
  (normalised crop units), G_ani's identity input, and where the crop lies in the source."""
  image: np.ndarray
  params: dict[str, np.ndarray]
  identity: np.ndarray
  crop: tuple[int, int, int, int] | None = None   # (x, w, y, h) in the source image
  source: np.ndarray | None = None                # the source image (uint8), for paste-back
  name: str = "image"

  @classmethod
  def from_frame(cls, frame: np.ndarray, params: Mapping[str, Any], models: Models,
                 name: str = "frame") -> "Reference":
    """A dataset frame (square crop, uint8 or float in [0, 1]) whose parameters are known."""
    x = np.asarray(frame)
    if x.ndim != 3 or x.shape[0] != x.shape[1] or x.shape[2] != 3:
      raise GenerateError(f"{name}: a square RGB frame is needed, got shape {x.shape}")
    u8 = x if x.dtype == np.uint8 else media.to_uint8(x)
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
      raise GenerateError(f"{name}: parameters lack {missing}")
    p = {k: np.asarray(params[k], np.float32) for k in PARAM_KEYS}
    return cls(image=_resized_float(u8, models.image_size), params=p,
               identity=identity_input(u8, p, models), crop=None, source=None, name=name)


def load_image(image: Any, name: str | None = None) -> tuple[np.ndarray, str]:
  """A path (any format Pillow reads, EXIF rotation applied) or an array -> RGB uint8, name."""
  if isinstance(image, np.ndarray):
    x = image
    name = name or "image"
    if x.ndim == 2:
      x = np.repeat(x[..., None], 3, -1)
    if x.ndim != 3 or x.shape[2] not in (3, 4) or x.shape[0] < 1 or x.shape[1] < 1:
      raise GenerateError(f"{name}: expected an (H, W, 3) RGB image, got shape {x.shape}")
    if x.dtype != np.uint8:
      if not np.issubdtype(x.dtype, np.floating):
        raise GenerateError(f"{name}: expected uint8 or float [0, 1] pixels, got {x.dtype}")
      x = media.to_uint8(x)
    return np.ascontiguousarray(x[..., :3]), name
  from PIL import Image, ImageOps, UnidentifiedImageError
  path = str(image)
  name = name or path
  if not os.path.isfile(path):
    raise GenerateError(f"{name}: no such image file")
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)
      return np.asarray(im.convert("RGB")).copy(), name
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise GenerateError(f"{name}: not a readable image ({type(e).__name__})") from None


def _resized(img: np.ndarray, size: int) -> np.ndarray:
  if img.shape[:2] == (size, size):
    return img
  interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC
  return cv2.resize(img, (size, size), interpolation=interp)


def _resized_float(img: np.ndarray, size: int) -> np.ndarray:
  return _resized(img, size).astype(np.float32) * (1.0 / 255.0)


def identity_input(crop: np.ndarray, params: Mapping[str, np.ndarray], models: Models) -> np.ndarray:
  """What G_ani's `identity.kind` takes: the crop at identity.image_size, or the shape."""
  ident = models.stage1_config.model.identity
  if ident.kind == "image":
    return _resized_float(crop, int(ident.image_size))
  if ident.kind == "shape":
    return np.asarray(params["shape"], np.float32)
  raise GenerateError(f"G_ani's identity.kind={ident.kind!r} cannot be computed from an image")


_LANDMARKERS: dict[str, Any] = {}


def _landmarker(detector: str):
  """One FaceLandmarker per detector per process (the TFLite models load once)."""
  if detector not in _LANDMARKERS:
    from hdtf_jax.face.landmarks import FaceLandmarker
    _LANDMARKERS[detector] = FaceLandmarker(detector=detector)
  return _LANDMARKERS[detector]


def detect_face(image: np.ndarray, name: str, *, min_face_px: float = MIN_FACE_PX):
  """Mesh (468, 3) pixels of the largest face; warns when there are several; GenerateError for
  none or a face smaller than `min_face_px` (longest side of the mesh box)."""
  from hdtf_jax.face import landmarks as lm
  # Full-range first (it also finds small faces, like the dataset on raw frames); short-range
  # when that finds nothing (a face filling the picture).
  for detector in ("full_range", "short_range"):
    faces = _landmarker(detector).detect_faces(image)
    if faces:
      break
  if not faces:
    raise GenerateError(f"{name}: no face found")
  lm.warn_if_several_faces(faces, name)
  found = _landmarker(detector).landmarks(image, lm.largest_face(faces))
  if found is None:
    raise GenerateError(f"{name}: a face was detected but its landmarks were not found")
  x0, y0, x1, y1 = found.box
  size = max(x1 - x0, y1 - y0)
  if size < min_face_px:
    raise GenerateError(f"{name}: the face is {size:.0f} px, at least {min_face_px:.0f} px is "
                        f"needed (use a larger image, or lower --min-face-px)")
  return found.points


def crop_landmarks(crop: np.ndarray, points_in_crop: np.ndarray, name: str) -> np.ndarray:
  """The mesh on a face crop, its ROI from points already known there (the tracker's 'follow'
  step, run twice: the second ROI comes from the crop's own mesh)."""
  from hdtf_jax.face import landmarks as lm
  landmarker = _landmarker("short_range")
  points = points_in_crop
  for _ in range(2):
    found = landmarker.landmarks(crop, lm.Roi.from_landmarks(points, landmarker.roi_scale))
    if found is None:
      raise GenerateError(f"{name}: no face landmarks on the face crop")
    points = found.points
  return points


def fit_reference(points_px: np.ndarray, size: int, face_model) -> dict[str, np.ndarray]:
  """3DMM fit of one crop's mesh (pixels at crop side `size`) -> normalised parameters, the
  dataset's conversion (`clips.normalised_fit`)."""
  from hdtf_jax.face import fitting
  params = clips.normalised_fit(fitting.fit_image(face_model, points_px), size)
  params.update({k: params[k][0] for k in ("mouth", "eyebrow", "pose")})
  return params


def prepare_reference(image: Any, models: Models, *, crop_ratio: float = DEFAULT_CROP_RATIO,
                      min_face_px: float = MIN_FACE_PX, name: str | None = None) -> Reference:
  """Source image (path or uint8 array) -> `Reference`: largest face, the dataset's crop,
  landmarks on the crop at `FIT_SIZE`, 3DMM fit."""
  img, name = load_image(image, name)
  if not crop_ratio > 0:
    raise GenerateError(f"{name}: crop ratio must be positive, got {crop_ratio}")
  points = detect_face(img, name, min_face_px=min_face_px)
  h, w = img.shape[:2]
  x0, y0 = points[:, :2].min(0)
  x1, y1 = points[:, :2].max(0)
  box = clips.square_box(x0, y0, x1, y1, crop_ratio, w, h)
  x, side, y, _ = box
  crop = img[y:y + side, x:x + side]
  crop_fit = _resized(crop, FIT_SIZE)
  s = FIT_SIZE / side  # source pixel p -> crop pixel (p - corner + 0.5) * s - 0.5
  in_crop = np.concatenate([(points[:, :2] - [x, y] + 0.5) * s - 0.5, points[:, 2:] * s], 1)
  params = fit_reference(crop_landmarks(crop_fit, in_crop, name), FIT_SIZE, models.face_model)
  return Reference(image=_resized_float(crop, models.image_size), params=params,
                   identity=identity_input(crop_fit, params, models), crop=box, source=img,
                   name=name)


# ---------------------------------------------------------------------------------- driving

def smooth_track(x: np.ndarray, fps: float, sigma_s: float) -> np.ndarray:
  """Gaussian smoothing over time (axis 0) with sigma `sigma_s` seconds; edges held."""
  sigma = sigma_s * fps
  if sigma < 0.3 or len(x) < 2:  # below ~0.3 frames the kernel is a delta
    return np.asarray(x, np.float32)
  from scipy.ndimage import gaussian_filter1d
  return gaussian_filter1d(np.asarray(x, np.float32), sigma, axis=0, mode="nearest")


def driving_params(reference: Reference, mouth: np.ndarray, eyebrow: np.ndarray,
                   pose: np.ndarray, *, head_scale: float = 1.0, eyebrow_scale: float = 1.0,
                   keep_head_still: bool = False) -> dict[str, np.ndarray]:
  """Per-frame parameter dict (see the module docstring) from mouth / eyebrow / pose tracks at
  the video rate; the multipliers scale the deviation from the reference."""
  ref = reference.params
  t = len(mouth)
  ref_pose = np.asarray(ref["pose"], np.float32)
  ref_brow = np.asarray(ref["eyebrow"], np.float32)
  pose = np.broadcast_to(ref_pose, (t, 5)) if keep_head_still else \
      ref_pose + head_scale * (np.asarray(pose, np.float32) - ref_pose)
  brow = ref_brow + eyebrow_scale * (np.asarray(eyebrow, np.float32) - ref_brow)
  return {"shape": np.broadcast_to(np.asarray(ref["shape"], np.float32), (t,) + ref["shape"].shape),
          "scale": np.full((t,), ref["scale"], np.float32),
          "mouth": np.asarray(mouth, np.float32), "eyebrow": brow.astype(np.float32),
          "pose": np.ascontiguousarray(pose, np.float32)}


def animate(models: Models, audio_features: np.ndarray, reference: Reference, *,
            fps: float = 25.0, head_scale: float = 1.0, eyebrow_scale: float = 1.0,
            keep_head_still: bool = False, smoothing: float = DEFAULT_SMOOTHING_S,
            num_frames: int | None = None) -> dict[str, np.ndarray]:
  """Audio features (Ta, 15) at 100 fps -> driving parameters at `fps` (T frames,
  default `audio.num_frames(Ta / 100, fps)`; pass the exact count when the duration is known)."""
  from hdtf_jax.train import stage1
  c1 = models.stage1_config
  feats = np.asarray(audio_features, np.float32)
  pred = stage1.predict(models.stage1_variables, feats, reference.identity,
                        model_config=c1.model, chunk=int(c1.data.window))
  t = num_frames or audio_lib.num_frames(len(feats) / FEATURE_FPS, fps)
  tracks = {k: audio_lib.resample_track(smooth_track(v, FEATURE_FPS, smoothing), FEATURE_FPS, fps,
                                        num_frames=t) for k, v in pred.items()}
  return driving_params(reference, tracks["mouth"], tracks["eyebrow"], tracks["head"],
                        head_scale=head_scale, eyebrow_scale=eyebrow_scale,
                        keep_head_still=keep_head_still)


# ------------------------------------------------------------------------------- reenactment

@dataclasses.dataclass
class TrackedParams:
  """Parameters tracked from a real video (`python -m hdtf_jax.face.track` or `track_params`):
  mouth (T, M), eyebrow (T, B), pose (T, 5) with tx, ty in pixels of the analysed frames,
  scale () pixels per model unit, at `fps`."""
  mouth: np.ndarray
  eyebrow: np.ndarray
  pose: np.ndarray
  scale: float
  fps: float
  source: str

  def __len__(self) -> int:
    return len(self.pose)


def load_params_file(path: str | os.PathLike, face_model) -> TrackedParams:
  """A `*_params.npz` of `python -m hdtf_jax.face.track` (mouth, eyebrow, pose, scale, fps)."""
  name = str(path)
  if not os.path.isfile(name):
    raise GenerateError(f"{name}: no such parameter file")
  try:
    with np.load(name, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except Exception as e:  # zipfile / numpy errors of a damaged or foreign file
    raise GenerateError(f"{name}: not a readable .npz ({type(e).__name__})") from None
  missing = [k for k in ("mouth", "eyebrow", "pose", "scale", "fps") if k not in data]
  if missing:
    raise GenerateError(f"{name}: lacks {missing} (write it with python -m hdtf_jax.face.track)")
  t = len(data["pose"])
  want = {"mouth": (t, face_model.n_mouth), "eyebrow": (t, face_model.n_eyebrow), "pose": (t, 5)}
  for k, shape in want.items():
    if data[k].shape != shape or t < 1:
      raise GenerateError(f"{name}: {k} is {data[k].shape}, expected {shape} with T >= 1")
  fps, scale = float(data["fps"]), float(np.asarray(data["scale"]).reshape(-1)[0])
  arrays = [data[k] for k in ("mouth", "eyebrow", "pose")]
  if not (fps > 0 and scale > 0 and all(np.isfinite(a).all() for a in arrays)):
    raise GenerateError(f"{name}: fps and scale must be positive and the tracks finite")
  return TrackedParams(*(a.astype(np.float32) for a in arrays), scale, fps, name)


def track_params(video: str | os.PathLike, face_model, *, fps: float = 25.0,
                 size: int = TRACK_SIZE, max_frames: int | None = None) -> TrackedParams:
  """Tracks a video's face and fits the 3DMM (as `hdtf_jax.face.track`), streaming the frames
  (the longer side scaled to `size`); at most `max_frames` frames are read."""
  from hdtf_jax.face import fitting, landmarks
  name = str(video)
  try:
    info = media.probe_video(name, exact_frame_count=False)
  except (FileNotFoundError, IsADirectoryError):
    raise GenerateError(f"{name}: no such video file") from None
  except ValueError as e:  # FFmpegError, no video stream
    raise GenerateError(f"{name}: not a readable video ({str(e).splitlines()[0][:160]})") from None
  k = size / max(info["width"], info["height"])
  hw = (max(2, int(round(info["height"] * k / 2)) * 2), max(2, int(round(info["width"] * k / 2)) * 2))
  end = None if max_frames is None else (max_frames + 0.5) / fps

  def frames():
    for i, f in enumerate(media.iter_video_frames(name, fps=fps, size=hw, end_s=end)):
      if max_frames is not None and i >= max_frames:
        return
      yield f
  try:
    track = landmarks.track_video(frames(), _landmarker("short_range"), fps=fps, source=name)
  except ValueError as e:
    raise GenerateError(f"{name}: {str(e).splitlines()[0][:160]}") from None
  if not track.found.any():
    raise GenerateError(f"{name}: no face found in any frame")
  fit = fitting.fit_clip(face_model, track.points, track.found)
  return TrackedParams(np.asarray(fit.mouth, np.float32), np.asarray(fit.eyebrow, np.float32),
                       np.asarray(fit.pose, np.float32), float(fit.scale), fps, name)


def relative_pose(tracked: TrackedParams, reference: Reference) -> np.ndarray:
  """The tracked pose as changes from its first frame, added to the reference's pose; shifts
  are converted from the tracked face's scale to the reference's (pixels -> model units ->
  normalised crop units)."""
  pose = np.asarray(tracked.pose, np.float32)
  delta = pose - pose[:1]
  delta[:, 3:5] *= float(reference.params["scale"]) / tracked.scale
  return np.asarray(reference.params["pose"], np.float32) + delta


def reenact_params(tracked: TrackedParams, reference: Reference, *, fps: float, num_frames: int,
                   smoothing: float = DEFAULT_SMOOTHING_S) -> dict[str, np.ndarray]:
  """mouth, eyebrow, pose (relative, see `relative_pose`) of a tracked video at `fps`, exactly
  `num_frames` frames (past the tracked end the last frame is held)."""
  tracks = {"mouth": tracked.mouth, "eyebrow": tracked.eyebrow,
            "pose": relative_pose(tracked, reference)}
  return {k: audio_lib.resample_track(smooth_track(v, tracked.fps, smoothing), tracked.fps, fps,
                                      num_frames=num_frames) for k, v in tracks.items()}


# ---------------------------------------------------------------------------------- rendering

_RENDERERS: dict[str, Any] = {}


def _renderer(config):
  """(jitted uint8 frames of F_app + G_vid, mesh) for a stage-2 config; the eval forward of
  `stage2.forward_fn` with its unused outputs (masks, warp-only) dropped by XLA."""
  key = config.to_json()
  if key not in _RENDERERS:
    import jax
    import jax.numpy as jnp
    from hdtf_jax.train import mesh as mesh_lib
    from hdtf_jax.train import stage2
    from hdtf_jax.train import common
    mesh = mesh_lib.make_mesh(config.mesh.axes.to_dict())
    # The Python function under the jit (a nested jit may not carry compiler options).
    forward = stage2.forward_fn(config, mesh).__wrapped__

    def frames(variables, reference, ref_params, drv_params):
      image = forward(variables, reference, ref_params, drv_params)["image"]
      return jnp.round(jnp.clip(image, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    fast = common.FAST_COMPILE if config.train.get("fast_compile") else None
    _RENDERERS[key] = (jax.jit(frames, out_shardings=mesh_lib.replicated(mesh),
                               compiler_options=fast), mesh)
  return _RENDERERS[key]


def default_batch_size() -> int:
  import jax
  return BATCH_CPU if jax.default_backend() == "cpu" else BATCH_ACCELERATOR


def render(models: Models, reference: Reference, drv_params: Mapping[str, np.ndarray], *,
           batch_size: int | None = None) -> Iterator[np.ndarray]:
  """uint8 frames (S, S, 3), one per driving frame, in order. G_vid runs on fixed batches of
  `batch_size` (default `default_batch_size()`; the last batch padded: one compiled shape);
  batch k + 1 is dispatched before batch k is handed out, so the device works while the
  caller encodes."""
  from hdtf_jax.train import mesh as mesh_lib
  fn, mesh = _renderer(models.stage2_config)
  shards = mesh_lib.num_batch_shards(mesh)
  b = -(-max(1, batch_size or default_batch_size()) // shards) * shards
  t = int(np.shape(drv_params["pose"])[0])
  size = models.image_size
  if reference.image.shape != (size, size, 3):
    raise GenerateError(f"{reference.name}: reference is {reference.image.shape}, G_vid needs "
                        f"({size}, {size}, 3)")
  fixed = mesh_lib.shard_batch({
      "reference": np.repeat(reference.image[None].astype(np.float32), b, 0),
      "ref_params": {k: np.repeat(np.asarray(reference.params[k], np.float32)[None], b, 0)
                     for k in PARAM_KEYS}}, mesh)
  pending = None
  for start in range(0, t, b):
    idx = np.minimum(np.arange(start, start + b), t - 1)
    drv = mesh_lib.shard_batch({k: np.asarray(drv_params[k], np.float32)[idx]
                                for k in PARAM_KEYS}, mesh)
    out = fn(models.stage2_variables, fixed["reference"], fixed["ref_params"], drv)
    if pending is not None:
      yield from _host_frames(*pending)
    pending = (out, min(b, t - start))
  if pending is not None:
    yield from _host_frames(*pending)


def _host_frames(out, n: int) -> Iterator[np.ndarray]:
  import jax
  frames = np.asarray(jax.device_get(out))
  for i in range(n):
    yield frames[i]


# ----------------------------------------------------------------- paste-back and preview

def feather_mask(side: int, feather: float = 0.1) -> np.ndarray:
  """(side, side, 1) float32: 1 inside, a smooth ramp to 0 over the outer `feather` * side."""
  band = max(1.0, feather * side)
  d = np.minimum(np.arange(side), np.arange(side)[::-1]).astype(np.float32) + 0.5
  r = np.clip(d / band, 0.0, 1.0)
  r = r * r * (3 - 2 * r)  # smoothstep
  return (r[:, None] * r[None, :])[..., None]


class PasteBack:
  """Puts generated crops back into the source image at the reference's crop box, blended
  with a feathered mask. Frames keep the source's size (odd sides padded by one edge pixel:
  H.264 needs even sides)."""

  def __init__(self, reference: Reference, feather: float = 0.1):
    if reference.source is None or reference.crop is None:
      raise GenerateError(f"{reference.name}: paste-back needs a reference prepared from a "
                          f"source image")
    src = reference.source
    pad = ((0, src.shape[0] % 2), (0, src.shape[1] % 2), (0, 0))
    self.base = np.pad(src, pad, mode="edge")
    self.x, self.side, self.y, _ = reference.crop
    self.mask = feather_mask(self.side, feather)
    self.under = self.base[self.y:self.y + self.side, self.x:self.x + self.side].astype(np.float32)

  def __call__(self, frame: np.ndarray) -> np.ndarray:
    interp = cv2.INTER_AREA if frame.shape[0] > self.side else cv2.INTER_CUBIC
    up = cv2.resize(frame, (self.side, self.side), interpolation=interp).astype(np.float32)
    out = self.base.copy()
    blend = self.under + self.mask * (up - self.under)
    out[self.y:self.y + self.side, self.x:self.x + self.side] = np.clip(blend + 0.5, 0, 255)
    return out


class Preview:
  """reference | driving mesh drawn over the reference | output, side by side."""

  def __init__(self, models: Models, reference: Reference):
    self.models = models
    self.size = models.image_size
    self.ref_u8 = media.to_uint8(reference.image)
    self.dim = (self.ref_u8 * 0.5).astype(np.uint8)
    self.triangles = np.asarray(models.face_model.triangles)

  def mesh_points(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N, V, 2) pixels at the stage-2 size of the driving params (normalised units)."""
    from hdtf_jax.face import morphable
    m, s = self.models.face_model, self.size
    verts = morphable.vertices(m, params["shape"], params["mouth"], params["eyebrow"])
    pose = np.asarray(params["pose"], np.float32).copy()
    pose[:, 3:5] = pose[:, 3:5] * s - 0.5
    return np.asarray(morphable.project(verts, pose, np.asarray(params["scale"]) * s))

  def __call__(self, frame: np.ndarray, points: np.ndarray) -> np.ndarray:
    mesh = self.dim.copy()
    k = 16  # sub-pixel drawing: shift of 4 bits
    polys = [np.round(points[t] * k).astype(np.int32) for t in self.triangles]
    cv2.polylines(mesh, polys, True, (255, 80, 80), 1, cv2.LINE_AA, shift=4)
    return np.concatenate([self.ref_u8, mesh, frame], axis=1)


# ----------------------------------------------------------------------------------- the video

def load_driving_audio(path: str | os.PathLike, fps: float) -> tuple[np.ndarray, float]:
  """Mono wave at SAMPLE_RATE and its duration; GenerateError when unreadable or shorter than
  one video frame."""
  name = str(path)
  try:
    wave = audio_lib.load_audio(name, SAMPLE_RATE, strict=True)
  except (FileNotFoundError, IsADirectoryError):
    raise GenerateError(f"{name}: no such audio file") from None
  except ValueError as e:  # FFmpegError, no audio stream
    detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    raise GenerateError(f"{name}: not readable audio ({detail})") from None
  duration = wave.size / SAMPLE_RATE
  if duration * fps < 1.0:
    raise GenerateError(f"{name}: the audio lasts {duration * 1000:.0f} ms, shorter than one "
                        f"video frame at {fps:g} fps")
  if not np.isfinite(wave).all():
    raise GenerateError(f"{name}: the audio decodes to NaN or infinite samples")
  return wave, duration


def check_output(path: str | os.PathLike) -> Path:
  """The output path, its folder created; GenerateError when it cannot be written there."""
  out = Path(path)
  if out.is_dir():
    raise GenerateError(f"{out}: is a directory, an output file name is needed")
  parent = out.parent if str(out.parent) else Path(".")
  try:
    parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise GenerateError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
  if not os.access(parent, os.W_OK | os.X_OK):
    raise GenerateError(f"{out}: the output folder {str(parent)!r} is not writable")
  return out


def check_inputs(image: Any, audio_path: str | os.PathLike | None, out_path: str | os.PathLike,
                 *, fps: float = 25.0, params_from: str | os.PathLike | None = None) -> None:
  """The cheap checks of `generate_video` (readable image and audio, long enough audio, a
  writable output), run before the models load so bad input fails in a second."""
  if not fps > 0:
    raise GenerateError(f"fps must be positive, got {fps}")
  check_output(out_path)
  load_image(image)
  if audio_path is not None:
    load_driving_audio(audio_path, fps)
  elif params_from is None:
    raise GenerateError("driving audio is needed (or --params-from a tracked parameter file)")
  if params_from is not None and not os.path.isfile(params_from):
    raise GenerateError(f"{params_from}: no such parameter file")


def generate_video(image: Any, audio_path: str | os.PathLike | None, out_path: str | os.PathLike,
                   models: Models, *, fps: float = 25.0, head_scale: float = 1.0,
                   eyebrow_scale: float = 1.0, keep_head_still: bool = False,
                   smoothing: float = DEFAULT_SMOOTHING_S, pose_from: str | None = None,
                   params_from: str | None = None, paste_back: bool = False,
                   preview: bool = False, batch_size: int | None = None,
                   crop_ratio: float = DEFAULT_CROP_RATIO, min_face_px: float = MIN_FACE_PX,
                   crf: int = 18, encoder_preset: str = "medium", progress: bool = False,
                   reference: Reference | None = None) -> dict:
  """The whole pipeline into `out_path` (H.264 mp4, the audio muxed); returns a summary:
  path, frames, fps, size, seconds, frames_per_s and per-step seconds (`timings`).

  Driving: audio through G_ani (default); `pose_from` a video whose tracked head pose replaces
  G_ani's; `params_from` a `*_params.npz` that drives mouth, eyebrow and pose (`audio_path`
  is then optional and only muxed). `paste_back` writes the source image with the generated
  crop blended in; `preview` writes reference | mesh | output (exclusive options).
  """
  if not fps > 0:
    raise GenerateError(f"fps must be positive, got {fps}")
  if paste_back and preview:
    raise GenerateError("--paste-back and --preview cannot be combined (different frame sizes)")
  if pose_from and params_from:
    raise GenerateError("--pose-from and --params-from cannot be combined (--params-from "
                        "already drives the pose)")
  if audio_path is None and params_from is None:
    raise GenerateError("driving audio is needed (or --params-from a tracked parameter file)")
  timings: dict[str, float] = {}
  t_start = time.perf_counter()
  out = check_output(out_path)

  tick = time.perf_counter()
  if reference is None:
    reference = prepare_reference(image, models, crop_ratio=crop_ratio, min_face_px=min_face_px)
  timings["face_fit_s"] = time.perf_counter() - tick

  tick = time.perf_counter()
  wave, duration = (None, None) if audio_path is None else load_driving_audio(audio_path, fps)
  tracked = None if params_from is None else load_params_file(params_from, models.face_model)
  if duration is not None:
    t = audio_lib.num_frames(duration, fps)
  else:
    t = audio_lib.num_frames(len(tracked) / tracked.fps, fps)
  feats = None
  if params_from is None:
    feats = audio_lib.audio_features(wave, audio_lib.AudioFeatureConfig(
        sample_rate=SAMPLE_RATE, fps=FEATURE_FPS, pitch_fps=FEATURE_FPS))
  timings["audio_features_s"] = time.perf_counter() - tick

  tick = time.perf_counter()
  scales = dict(head_scale=head_scale, eyebrow_scale=eyebrow_scale,
                keep_head_still=keep_head_still)
  if params_from is not None:
    tr = reenact_params(tracked, reference, fps=fps, num_frames=t, smoothing=smoothing)
    drv = driving_params(reference, tr["mouth"], tr["eyebrow"], tr["pose"], **scales)
  else:
    drv = animate(models, feats, reference, fps=fps, smoothing=smoothing, num_frames=t, **scales)
    if pose_from is not None:
      pose_track = track_params(pose_from, models.face_model, fps=fps, max_frames=t)
      pose = reenact_params(pose_track, reference, fps=fps, num_frames=t,
                            smoothing=smoothing)["pose"]
      drv = driving_params(reference, drv["mouth"], drv["eyebrow"], pose, **scales)
  timings["animate_s"] = time.perf_counter() - tick

  mux = None
  if audio_path is not None:
    mux = audio_lib.load_audio(str(audio_path), MUX_RATE)
  finish = PasteBack(reference) if paste_back else None
  side = Preview(models, reference) if preview else None
  timings["render_s"] = timings["encode_s"] = 0.0
  batch_size = batch_size or default_batch_size()
  from tqdm.auto import tqdm
  writer = media.VideoWriter(out, fps, audio=mux, audio_rate=MUX_RATE, crf=crf,
                             preset=encoder_preset)
  bar = tqdm(total=t, unit="frame", desc="generate", disable=not progress)
  try:
    frames = render(models, reference, drv, batch_size=batch_size)
    points = None
    for i in range(t):
      tick = time.perf_counter()
      frame = next(frames)
      if side is not None:
        if i % batch_size == 0:
          sl = slice(i, min(t, i + batch_size))
          points = side.mesh_points({k: v[sl] for k, v in drv.items()})
        frame = side(frame, points[i % batch_size])
      elif finish is not None:
        frame = finish(frame)
      timings["render_s"] += time.perf_counter() - tick
      tick = time.perf_counter()
      writer.write(frame)
      timings["encode_s"] += time.perf_counter() - tick
      bar.update(1)
    tick = time.perf_counter()
    writer.close()
    timings["encode_s"] += time.perf_counter() - tick
  except BaseException:
    writer.abort()  # nothing under the final name; temporaries removed
    raise
  finally:
    bar.close()
  seconds = time.perf_counter() - t_start
  frame_seconds = timings["render_s"] + timings["encode_s"]
  return {"path": str(out), "frames": t, "fps": fps, "size": list(writer.shape),
          "audio_seconds": duration, "crop": None if reference.crop is None else
          list(reference.crop), "seconds": seconds, "frames_per_s": t / max(seconds, 1e-9),
          "render_frames_per_s": t / max(frame_seconds, 1e-9), "timings": timings,
          "driven_by": "params" if params_from else ("audio+pose" if pose_from else "audio")}
