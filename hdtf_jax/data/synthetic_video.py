"""A synthetic stage-2 source: a real portrait animated by the morphable model, for tests and demos.

Until the HDTF demo dataset exists, stage 2 trains on pairs of frames rendered from ONE real
photo, scikit-image's astronaut (cropped around the face as HDTF crops, `face.flow.astronaut_face`):

* the 468-point mesh is detected on the photo (`face.landmarks`) and the morphable model fitted
  to it (`face.fitting.fit_image`): the photo's parameters p0;
* identities: the photo and its mirror image (mirrored landmarks, own fit), each under a few
  colour transforms (hue rotations, gains); `train` and `test` hold different identities;
* per identity a bank of frames: random parameter sets p (head pose, jaw and other mouth bases,
  eyebrows), each rendered as the photo warped by a "true" flow from p0 to p, plus a dark mouth
  cavity inside the inner-lip ring of p (an opening the photo does not show);
* a sample is a pair (reference frame i, driving frame j) of one identity, with both parameter
  sets, exactly as `hdtf_jax.data.pipelines.stage2_dataset` gives real pairs.

The true flow is `face.flow.flow_from_params` at full resolution with a DIFFERENT region
configuration (`TRUE_FLOW`: wider head region, hair and torso following the head more closely)
from the default one the model's F_app uses, and F_app knows nothing of the cavity: so warping
the reference by F_app (the warp-only baseline) is good but not exact, and G_vid has something to
learn (refine the flow with M_f, paint the mouth with g and M_m), as on real video.

Parameters use the dataset's units (`hdtf_jax.data.clips`): angles in radians, scale and
translation in NORMALISED crop units (pixel = u * size - 0.5). Images are float32 in [0, 1].
Everything is a deterministic function of the config; the batch iterator has `get_state` /
`set_state` like grain's.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from hdtf_jax.data import synthetic

PARAM_KEYS = ("shape", "scale", "mouth", "eyebrow", "pose")
SPLITS = ("train", "test")
CACHE_VERSION = 1
# The "true" motion of the regions F_app only approximates (see the module docstring).
TRUE_FLOW = dict(head_side=1.6, head_up=2.0, head_down=1.15, torso_damping=0.9, feather=0.2,
                 boundary_blend=0.25)
CAVITY_RGB = (0.22, 0.06, 0.07)  # the inside of an open mouth


@dataclasses.dataclass(frozen=True)
class SyntheticVideoConfig:
  """Sizes of the synthetic stage-2 corpus.

  Identities 0 .. train_identities-1 are `train`, the next `test_identities` are `test`.
  `motion` scales the random head pose and expression ranges. `fit_size` is the crop side the
  landmarks are detected and fitted at (parameters are resolution independent). `cache_dir`
  (optional) keeps fitted parameters and rendered banks between processes.
  """
  image_size: int = 128
  frames_per_identity: int = 48
  train_identities: int = 4
  test_identities: int = 2
  motion: float = 1.0
  seed: int = 0
  fit_size: int = 256
  cache_dir: str | None = None

  def __post_init__(self):
    if self.image_size < 16 or self.frames_per_identity < 2:
      raise ValueError(f"synthetic video: need image_size >= 16 and >= 2 frames per identity, "
                       f"got {self}")
    if self.train_identities < 1 or self.test_identities < 0:
      raise ValueError(f"synthetic video: need >= 1 train identity, got {self}")

  @classmethod
  def from_dict(cls, values: Any) -> "SyntheticVideoConfig":
    return synthetic.dataclass_from_dict(cls, values, "synthetic video config")


# ----------------------------------------------------------------------------- parameters


def to_pixel_params(params: dict, size: float) -> dict:
  """Normalised-unit parameters -> the pixel units of `hdtf_jax.face.morphable` at side `size`
  (scale * size; tx, ty: u * size - 0.5). Works on NumPy and JAX arrays, batched or not."""
  pose = params["pose"]
  shift = pose[..., 3:5] * size - 0.5
  if isinstance(pose, np.ndarray):
    pose = np.concatenate([pose[..., :3], shift], -1)
  else:
    import jax.numpy as jnp
    pose = jnp.concatenate([pose[..., :3], shift], -1)
  return dict(params, scale=params["scale"] * size, pose=pose)


def _model_digest(model) -> str:
  h = hashlib.sha1()
  for a in (model.mean, model.shape_basis, model.expression_basis, model.triangles):
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:12]


def _mirror_points(points: np.ndarray, mirror: np.ndarray, size: int) -> np.ndarray:
  """Landmarks of the horizontally flipped image: x -> size - 1 - x, left/right swapped."""
  out = points[mirror].copy()
  out[:, 0] = size - 1 - out[:, 0]
  return out


def _fit(model, points: np.ndarray, size: int) -> dict[str, np.ndarray]:
  """fit_image on pixel landmarks (V, 3) -> normalised-unit parameters."""
  from hdtf_jax.face import fitting
  r = fitting.fit_image(model, points[:, :2])
  pose = np.asarray(r.pose[0], np.float32).copy()
  pose[3:5] = (pose[3:5] + 0.5) / size
  return {"shape": np.asarray(r.shape, np.float32), "scale": np.float32(float(r.scale) / size),
          "mouth": np.asarray(r.mouth[0], np.float32),
          "eyebrow": np.asarray(r.eyebrow[0], np.float32), "pose": pose}


@functools.lru_cache(maxsize=4)
def _photo(size: int) -> np.ndarray:
  from hdtf_jax.face import flow
  return flow.astronaut_face(size)[0]


@functools.lru_cache(maxsize=2)
def _photo_fits_cached(fit_size: int, cache_dir: str | None) -> tuple[dict, dict]:
  from hdtf_jax.face import flow, morphable
  model = morphable.default_model()
  path = None
  if cache_dir:
    path = Path(cache_dir) / f"astronaut_fit_{fit_size}_{_model_digest(model)}.npz"
    if path.is_file():
      with np.load(path) as z:
        return tuple({k: z[f"{side}/{k}"] for k in PARAM_KEYS} for side in ("photo", "mirror"))
  _, points = flow.astronaut_face(fit_size)
  fits = (_fit(model, points, fit_size),
          _fit(model, _mirror_points(points, np.asarray(model.mirror), fit_size), fit_size))
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{side}/{k}": f[k] for side, f in zip(("photo", "mirror"), fits)
                      for k in PARAM_KEYS})
  return fits


def photo_params(fit_size: int = 256, cache_dir: str | None = None) -> tuple[dict, dict]:
  """Fitted parameters (normalised units) of the astronaut photo and of its mirror image."""
  return _photo_fits_cached(int(fit_size), cache_dir)


def colour_matrix(k: int) -> np.ndarray:
  """Identity k's colour transform: hue rotation by k golden angles and a gain (k=0: none)."""
  theta = k * 2.399963
  a = np.ones(3) / np.sqrt(3.0)
  cross = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
  rot = np.cos(theta) * np.eye(3) + (1 - np.cos(theta)) * np.outer(a, a) + np.sin(theta) * cross
  return (rot * (1.0 + 0.12 * np.sin(1.7 * k))).astype(np.float32)


def identity_image(k: int, size: int) -> np.ndarray:
  """Identity k's photo, float32 (size, size, 3): mirrored when k is odd, colour-transformed."""
  img = _photo(size).astype(np.float32) / 255.0
  if k % 2:
    img = img[:, ::-1]
  out = (img - 0.5) @ colour_matrix(k).T + 0.5
  return np.clip(out, 0.0, 1.0).astype(np.float32)


def random_params(model, base: dict, count: int, rng: np.random.Generator,
                  motion: float = 1.0) -> dict[str, np.ndarray]:
  """`count` parameter sets around `base` (the first one is `base` itself), stacked (count, ...)."""
  n_mouth = base["mouth"].shape[0]
  out = {k: np.repeat(np.asarray(base[k])[None], count, 0).astype(np.float32) for k in PARAM_KEYS}
  m = count - 1
  if m <= 0:
    return out
  mouth = np.zeros((m, n_mouth), np.float32)
  mouth[:, 0] = rng.uniform(0.0, 0.8 * motion, m)                  # jaw open
  for row in mouth:                                                 # a few other bases
    row[rng.choice(np.arange(1, n_mouth), 3, replace=False)] = rng.uniform(0, 0.6 * motion, 3)
  eyebrow = rng.uniform(0, 0.8 * motion, (m, base["eyebrow"].shape[0])).astype(np.float32)
  eyebrow *= rng.random((m, 1)) < 0.5
  pose = out["pose"][1:].copy()
  pose[:, :3] += rng.uniform(-1, 1, (m, 3)) * np.array([0.3, 0.2, 0.15]) * motion
  pose[:, 3:] += rng.uniform(-1, 1, (m, 2)) * 0.04 * motion
  out["mouth"][1:] = np.clip(base["mouth"] + mouth, 0.0, 2.0)
  out["eyebrow"][1:] = np.clip(base["eyebrow"] + eyebrow, 0.0, 2.0)
  out["pose"][1:] = pose
  return out


def render_frames(model, image: np.ndarray, base: dict, params: dict) -> np.ndarray:
  """Frames (T, S, S, 3) float32: `image` (whose parameters are `base`) warped by the true flow
  to each parameter set of `params` (stacked), with the mouth cavity painted in."""
  import cv2
  import jax.numpy as jnp
  from hdtf_jax import warp
  from hdtf_jax.face import flow
  size = image.shape[0]
  cfg = flow.FlowConfig(**TRUE_FLOW)
  base_px, drv_px = to_pixel_params(base, size), to_pixel_params(params, size)
  grids = flow.flow_from_params(model, base_px, drv_px, size, size, cfg).grid
  frames = np.array(warp.grid_sample(jnp.broadcast_to(jnp.asarray(image), (grids.shape[0],)
                                                        + image.shape), grids,
                                       padding_mode="border"))
  xy, _ = flow.mesh_points(model, drv_px, size, size)
  ring = np.asarray(xy)[:, np.asarray(model.regions["inner_lips"])]
  cavity = np.asarray(CAVITY_RGB, np.float32)
  for t in range(frames.shape[0]):
    mask = np.zeros((size, size), np.uint8)
    pts = np.round((ring[t] + 0.5) * 16 - 8).astype(np.int32)  # 4 fractional bits, centres at .0
    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA, shift=4)
    a = (mask.astype(np.float32) / 255.0)[..., None]
    frames[t] = frames[t] * (1 - a) + cavity * a
  return np.clip(frames, 0.0, 1.0)


# ----------------------------------------------------------------------------- the source


class SyntheticVideoSource:
  """The identities of one split with their frame banks.

  frames (N, F, S, S, 3) uint8; params: dict of (N, F, ...) float32 (normalised units);
  identities: the global identity index of each of the N identities.
  """

  def __init__(self, config: SyntheticVideoConfig, split: str):
    if split not in SPLITS:
      raise ValueError(f"synthetic video: split must be one of {SPLITS}, got {split!r}")
    from hdtf_jax.face import morphable
    self.config, self.split = config, split
    c = config
    first = 0 if split == "train" else c.train_identities
    count = c.train_identities if split == "train" else c.test_identities
    if count < 1:
      raise ValueError(f"synthetic video: the {split} split has no identities ({c})")
    self.identities = list(range(first, first + count))
    model = morphable.default_model()
    banks = [self._bank(model, k) for k in self.identities]
    self.frames = np.stack([b[0] for b in banks])
    self.params = {key: np.stack([b[1][key] for b in banks]) for key in PARAM_KEYS}

  def _bank(self, model, k: int) -> tuple[np.ndarray, dict]:
    c = self.config
    key = json.dumps({"v": CACHE_VERSION, "k": k, "model": _model_digest(model),
                      "true_flow": TRUE_FLOW, **{f.name: getattr(c, f.name)
                                                for f in dataclasses.fields(c)
                                                if f.name not in ("cache_dir", "train_identities",
                                                                  "test_identities")}},
                     sort_keys=True)
    path = None
    if c.cache_dir:
      digest = hashlib.sha1(key.encode()).hexdigest()[:16]
      path = Path(c.cache_dir) / f"synthetic_video_{digest}.npz"
      if path.is_file():
        with np.load(path) as z:
          return z["frames"], {p: z[p] for p in PARAM_KEYS}
    base = photo_params(c.fit_size, c.cache_dir)[k % 2]
    rng = np.random.default_rng([c.seed, k, 31])
    params = random_params(model, base, c.frames_per_identity, rng, c.motion)
    frames = render_frames(model, identity_image(k, c.image_size), base, params)
    frames = (frames * 255.0 + 0.5).astype(np.uint8)
    if path is not None:
      path.parent.mkdir(parents=True, exist_ok=True)
      np.savez(path, frames=frames, **params)
    return frames, params

  def __len__(self) -> int:
    """Number of identities."""
    return len(self.identities)

  @property
  def frames_per_identity(self) -> int:
    return self.frames.shape[1]

  def pair(self, ident: int, ref: int, drv: int) -> dict[str, Any]:
    """One sample: identity `ident` (0-based in this split), reference frame `ref`, driving
    frame `drv`; the fields of `pipelines.stage2_dataset`."""
    params = lambda i: {k: self.params[k][ident, i] for k in PARAM_KEYS}
    img = lambda i: self.frames[ident, i].astype(np.float32) * (1.0 / 255.0)
    return {"reference": img(ref), "driving": img(drv), "ref_params": params(ref),
            "drv_params": params(drv), "identity": np.int32(self.identities[ident]),
            "ref_index": np.int32(ref), "drv_index": np.int32(drv)}

  def random_pair(self, rng: np.random.Generator) -> dict[str, Any]:
    n = self.frames_per_identity
    ref, drv = rng.choice(n, 2, replace=False)
    return self.pair(int(rng.integers(len(self))), int(ref), int(drv))


def stack(samples: list[dict]) -> dict:
  """List of samples -> one batch (nested dicts stacked leaf by leaf)."""
  first = samples[0]
  return {k: stack([s[k] for s in samples]) if isinstance(first[k], dict)
          else np.stack([s[k] for s in samples]) for k in first}


class PairIterator(synthetic.SeededBatchIterator):
  """Endless random pairs; batches are this process's rows."""

  what = "synthetic video"
  salt = 11

  def __init__(self, source: SyntheticVideoSource, *, batch_size: int, seed: int,
               shard_index: int = 0, shard_count: int = 1):
    super().__init__(batch_size=batch_size, seed=seed, shard_index=shard_index,
                     shard_count=shard_count)
    self.source = source

  def _batch(self, rng: np.random.Generator) -> dict:
    return stack([self.source.random_pair(rng) for _ in range(self.batch_size)])


def fixed_pairs(source: SyntheticVideoSource, count: int, seed: int = 1234) -> list[dict]:
  """`count` pairs in a fixed order (every identity in turn), for eval and the validation batch."""
  rng = np.random.default_rng([seed, 97])
  n = source.frames_per_identity
  out = []
  for i in range(count):
    ref, drv = rng.choice(n, 2, replace=False)
    out.append(source.pair(i % len(source), int(ref), int(drv)))
  return out
