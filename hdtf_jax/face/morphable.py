"""The morphable face model: schema, versioned .npz files, the default model, and its geometry.

A model is `M(shape, mouth, eyebrow) = mean + sum_i shape_i * shape_basis_i
+ sum_j [mouth, eyebrow]_j * expression_basis_j` over V vertices (PAPER.md §2). The default
model (`default_model()`, built by `python -m hdtf_jax.face.sculpt`) lives on the 468-vertex
topology of the face-mesh landmark detector (`hdtf_jax.face.landmarks`), so every vertex is
observed; its triangles and regions are computed by our own geometric rules (sculpt.py).

Model coordinates (right-handed): x to the image right (the subject's LEFT when frontal), y DOWN,
z AWAY from the camera (into the scene; the nose tip has the smallest z). Unit: the distance
between the two eye centres (inter-ocular distance, IOD) of the mean; the origin is the mean's
vertex centroid. "Left"/"right" in basis names mean the SUBJECT's left/right (left = +x).

Camera: per-clip scaled orthographic. Head pose per frame is 5 numbers
`pose = (yaw, pitch, roll, tx, ty)`, angles in radians, translation in pixels:

    R = Rz(roll) @ Rx(pitch) @ Ry(yaw)        (yaw applied to the head first, roll last)
    Ry(a) = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    Rx(a) = [[1, 0, 0], [0, c, -s], [0, s, c]]
    Rz(a) = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    pixel = scale * (R @ v)[:2] + (tx, ty)   (image x right, y down)

So with z away from the camera: positive yaw turns the nose towards the image left (the subject
turns to their right), positive pitch moves the nose down (head nods down), positive roll turns
the head clockwise on screen. (tx, ty) is where the model origin lands in the image; `scale` is
pixels per IOD, one value per clip (fitted with the shape).

Schema of a saved model (.npz, no pickles; `SCHEMA_VERSION` = 1):

    schema_version   ()          int, must equal SCHEMA_VERSION
    name             ()          str
    mean             (V, 3)      float32
    shape_basis      (S, V, 3)   float32, identity deformations (orthonormal in the default model)
    shape_std        (S,)        float32, prior standard deviation of each shape coefficient
    shape_names      (S,)        str
    expression_basis (E, V, 3)   float32, E = M + B: M mouth bases then B eyebrow bases;
                                 coefficient 1 = a strong but plausible expression
    expression_bounds (E, 2)     float32, [low, high] of each coefficient for fitting (the
                                 sculpted bases are one-sided blendshapes: [0, 2]; learned
                                 PCA bases: [-inf, inf])
    mouth_names      (M,)        str
    eyebrow_names    (B,)        str
    triangles        (F, 3)      int32, normals towards the camera in the mean: the corners run
                                 counter-clockwise on screen (image y down)
    mirror           (V,)        int32, index of each vertex's left/right mirror partner
    region/<name>    (n,)        int32 vertex indices; required: see REQUIRED_REGIONS

Regions (REQUIRED_REGIONS): `inner_face` (vertices not on the outer ring), `face_boundary`
(ordered ring, the convex hull of the frontal mean), `mouth` (lower-face vertices moved by mouth
bases), `inner_lips` (ordered ring around the mouth opening), `eyebrows`, `eyes` (eye-opening
rings and the vertices next to them). The default model also has `lips`, `rigid` (vertices no
expression moves much, for alignment), `eye_left_ring`, `eye_right_ring`, `eyebrow_left`,
`eyebrow_right` and `midline`.

Geometry (`vertices`, `rotation_matrix`, `pose_matrix`, `project`) is pure jnp, batched over
leading axes and jittable; model arrays enter as constants (close over the model, e.g.
`jax.jit(functools.partial(vertices, model))`).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from pathlib import Path
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

SCHEMA_VERSION = 1
DEFAULT_ASSET = "default_model.npz"
REQUIRED_REGIONS = ("inner_face", "face_boundary", "mouth", "inner_lips", "eyebrows", "eyes")
# The paper's expression bases (PAPER.md §2, supplement Fig. 3-4), in this order.
MOUTH_NAMES = (
    "jaw_open", "lips_together", "jaw_left", "jaw_right", "jaw_forward",
    "upper_lip_up_left", "upper_lip_up_right", "lower_lip_down_left", "lower_lip_down_right",
    "lip_close_upper", "lip_close_lower", "lip_stretch_left", "lip_stretch_right",
    "smile_left", "smile_right", "dimple_left", "dimple_right", "frown_left", "frown_right",
    "press_left", "press_right", "pucker", "funnel", "mouth_left", "mouth_right",
    "chin_raise_lower", "chin_raise_upper", "puff")
EYEBROW_NAMES = ("eyebrow_down_left", "eyebrow_up_left", "eyebrow_up_centre",
                 "eyebrow_down_right", "eyebrow_up_right")


@dataclasses.dataclass(frozen=True, eq=False)
class MorphableModel:
  """A linear face model (see the module docstring for the schema and conventions)."""
  mean: np.ndarray
  shape_basis: np.ndarray
  expression_basis: np.ndarray
  mouth_names: tuple[str, ...]
  eyebrow_names: tuple[str, ...]
  triangles: np.ndarray
  regions: Mapping[str, np.ndarray]
  shape_std: np.ndarray | None = None
  shape_names: tuple[str, ...] | None = None
  expression_bounds: np.ndarray | None = None
  mirror: np.ndarray | None = None
  name: str = "unnamed"
  version: int = SCHEMA_VERSION

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("mean", np.asarray(self.mean, np.float32))
    set_("shape_basis", np.asarray(self.shape_basis, np.float32))
    set_("expression_basis", np.asarray(self.expression_basis, np.float32))
    set_("triangles", np.asarray(self.triangles, np.int32))
    set_("mouth_names", tuple(str(n) for n in self.mouth_names))
    set_("eyebrow_names", tuple(str(n) for n in self.eyebrow_names))
    set_("regions", {k: np.asarray(v, np.int32) for k, v in self.regions.items()})
    n_shape = self.shape_basis.shape[0] if self.shape_basis.ndim == 3 else 0
    set_("shape_std", np.ones(n_shape, np.float32) if self.shape_std is None
         else np.asarray(self.shape_std, np.float32))
    set_("shape_names", tuple(f"shape_{i}" for i in range(n_shape)) if self.shape_names is None
         else tuple(str(n) for n in self.shape_names))
    if self.mirror is not None:
      set_("mirror", np.asarray(self.mirror, np.int32))
    n_expr = self.expression_basis.shape[0] if self.expression_basis.ndim == 3 else 0
    set_("expression_bounds",
         np.tile(np.array([-np.inf, np.inf], np.float32), (n_expr, 1))
         if self.expression_bounds is None else np.asarray(self.expression_bounds, np.float32))
    validate(self)

  @property
  def n_vertices(self) -> int:
    return self.mean.shape[0]

  @property
  def n_shape(self) -> int:
    return self.shape_basis.shape[0]

  @property
  def n_mouth(self) -> int:
    return len(self.mouth_names)

  @property
  def n_eyebrow(self) -> int:
    return len(self.eyebrow_names)

  @property
  def n_expression(self) -> int:
    return self.expression_basis.shape[0]

  @property
  def expression_names(self) -> tuple[str, ...]:
    return self.mouth_names + self.eyebrow_names

  @property
  def mouth_basis(self) -> np.ndarray:
    return self.expression_basis[:self.n_mouth]

  @property
  def eyebrow_basis(self) -> np.ndarray:
    return self.expression_basis[self.n_mouth:]

  def replace(self, **changes) -> "MorphableModel":
    return dataclasses.replace(self, **changes)

  def save(self, path: str | os.PathLike) -> Path:
    """Writes the versioned .npz (see the schema); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "schema_version": np.asarray(self.version, np.int32),
        "name": np.asarray(self.name),
        "mean": self.mean, "shape_basis": self.shape_basis, "shape_std": self.shape_std,
        "shape_names": np.asarray(self.shape_names, dtype=str).reshape(-1),
        "expression_basis": self.expression_basis,
        "expression_bounds": self.expression_bounds,
        "mouth_names": np.asarray(self.mouth_names, dtype=str).reshape(-1),
        "eyebrow_names": np.asarray(self.eyebrow_names, dtype=str).reshape(-1),
        "triangles": self.triangles,
    }
    if self.mirror is not None:
      arrays["mirror"] = self.mirror
    for k, v in self.regions.items():
      arrays[f"region/{k}"] = v
    with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz"
      np.savez_compressed(f, **arrays)
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> "MorphableModel":
    return load(path)


def validate(model: MorphableModel, source: str = "model") -> None:
  """Raises ValueError naming `source` and the misshaped or inconsistent field."""
  def fail(msg):
    raise ValueError(f"{source}: {msg}")
  if model.version != SCHEMA_VERSION:
    fail(f"schema_version {model.version} is not supported (expected {SCHEMA_VERSION})")
  if model.mean.ndim != 2 or model.mean.shape[1] != 3 or model.mean.shape[0] < 3:
    fail(f"'mean' must be (V, 3) with V >= 3, got {model.mean.shape}")
  v = model.mean.shape[0]
  for key in ("shape_basis", "expression_basis"):
    a = getattr(model, key)
    if a.ndim != 3 or a.shape[1:] != (v, 3):
      fail(f"{key!r} must be (n, {v}, 3), got {a.shape}")
  s, e = model.shape_basis.shape[0], model.expression_basis.shape[0]
  if e != len(model.mouth_names) + len(model.eyebrow_names):
    fail(f"'expression_basis' has {e} bases but mouth_names + eyebrow_names name "
         f"{len(model.mouth_names)} + {len(model.eyebrow_names)}")
  b = model.expression_bounds
  if b.shape != (e, 2) or np.isnan(b).any() or np.any(b[:, 0] > 0) or np.any(b[:, 1] < 0):
    fail(f"'expression_bounds' must be ({e}, 2) [low <= 0 <= high] rows, got {b.shape}")
  if model.shape_std.shape != (s,) or not np.all(model.shape_std > 0):
    fail(f"'shape_std' must be ({s},) and positive, got {model.shape_std.shape}")
  if len(model.shape_names) != s:
    fail(f"'shape_names' has {len(model.shape_names)} names for {s} shape bases")
  for key in ("mean", "shape_basis", "expression_basis"):
    if not np.all(np.isfinite(getattr(model, key))):
      fail(f"{key!r} holds NaN or inf")
  t = model.triangles
  if t.ndim != 2 or t.shape[1] != 3 or t.shape[0] == 0:
    fail(f"'triangles' must be (F, 3) with F > 0, got {t.shape}")
  if t.min() < 0 or t.max() >= v:
    fail(f"'triangles' index outside [0, {v})")
  missing = [r for r in REQUIRED_REGIONS if r not in model.regions]
  if missing:
    fail(f"missing regions {missing} (required: {list(REQUIRED_REGIONS)})")
  for k, idx in model.regions.items():
    if idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= v:
      fail(f"region {k!r} must be a non-empty 1-D array of indices in [0, {v}), got shape "
           f"{idx.shape}")
  if model.mirror is not None:
    m = model.mirror
    if m.shape != (v,) or m.min() < 0 or m.max() >= v or not np.array_equal(m[m], np.arange(v)):
      fail(f"'mirror' must be a ({v},) involution of vertex indices")


_REQUIRED_KEYS = ("schema_version", "name", "mean", "shape_basis", "expression_basis",
                  "mouth_names", "eyebrow_names", "triangles")


def load(path: str | os.PathLike) -> MorphableModel:
  """Reads and validates a model .npz; errors name the file and the missing/misshaped key."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"morphable model file {str(path)!r} does not exist")
  try:
    data = np.load(path, allow_pickle=False)
    arrays = {k: data[k] for k in data.files}
  except Exception as err:  # zip / format errors from numpy
    raise ValueError(f"{path}: not a readable .npz morphable model ({err})") from err
  missing = [k for k in _REQUIRED_KEYS if k not in arrays]
  if missing:
    raise ValueError(f"{path}: missing keys {missing} (a morphable model needs "
                     f"{list(_REQUIRED_KEYS)} and region/<name> arrays)")
  version = int(arrays["schema_version"])
  if version != SCHEMA_VERSION:
    raise ValueError(f"{path}: schema_version {version} is not supported (expected "
                     f"{SCHEMA_VERSION})")
  names = lambda k: tuple(str(n) for n in np.atleast_1d(arrays[k])) if k in arrays else None
  regions = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("region/")}
  try:
    return MorphableModel(
        mean=arrays["mean"], shape_basis=arrays["shape_basis"],
        expression_basis=arrays["expression_basis"],
        mouth_names=names("mouth_names"), eyebrow_names=names("eyebrow_names"),
        triangles=arrays["triangles"], regions=regions, shape_std=arrays.get("shape_std"),
        expression_bounds=arrays.get("expression_bounds"),
        shape_names=names("shape_names"), mirror=arrays.get("mirror"),
        name=str(arrays["name"]), version=version)
  except ValueError as err:
    raise ValueError(f"{path}: {err}") from None


def default_model_path() -> Path:
  return Path(str(importlib.resources.files("hdtf_jax.face") / "assets" / DEFAULT_ASSET))


@functools.lru_cache(maxsize=1)
def default_model() -> MorphableModel:
  """The packaged default model (468-vertex face-mesh topology), loaded once."""
  path = default_model_path()
  if not path.is_file():
    raise FileNotFoundError(
        f"the default model asset {str(path)!r} is missing; rebuild it with "
        f"`python -m hdtf_jax.face.sculpt --out {path}`")
  return load(path)


# ----------------------------------------------------------------------------- geometry


def vertices(model: MorphableModel, shape, mouth, eyebrow) -> jnp.ndarray:
  """Mesh vertices (..., V, 3) for coefficients shape (..., S), mouth (..., M), eyebrow (..., B).

  Leading axes broadcast (e.g. one shape (S,) with per-frame mouth (T, M)).
  """
  expression = jnp.concatenate(_match_batch(mouth, eyebrow), axis=-1)
  out = (jnp.asarray(model.mean)
         + jnp.einsum("...s,svc->...vc", jnp.asarray(shape), jnp.asarray(model.shape_basis))
         + jnp.einsum("...e,evc->...vc", expression, jnp.asarray(model.expression_basis)))
  return out


def _match_batch(a, b):
  """Broadcasts the leading axes of two coefficient arrays, keeping their own last axis."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  lead = jnp.broadcast_shapes(a.shape[:-1], b.shape[:-1])
  return (jnp.broadcast_to(a, lead + a.shape[-1:]), jnp.broadcast_to(b, lead + b.shape[-1:]))


def rotation_matrix(angles) -> jnp.ndarray:
  """(..., 3) (yaw, pitch, roll) radians -> (..., 3, 3) R = Rz(roll) @ Rx(pitch) @ Ry(yaw)."""
  angles = jnp.asarray(angles)
  cy, cp, cr = (jnp.cos(angles[..., i]) for i in range(3))
  sy, sp, sr = (jnp.sin(angles[..., i]) for i in range(3))
  # Product written out: Rz(r) Rx(p) Ry(y).
  r00 = cr * cy - sr * sp * sy
  r01 = -sr * cp
  r02 = cr * sy + sr * sp * cy
  r10 = sr * cy + cr * sp * sy
  r11 = cr * cp
  r12 = sr * sy - cr * sp * cy
  r20 = -cp * sy
  r21 = sp
  r22 = cp * cy
  return jnp.stack([jnp.stack([r00, r01, r02], -1), jnp.stack([r10, r11, r12], -1),
                    jnp.stack([r20, r21, r22], -1)], -2)


def pose_matrix(pose) -> jnp.ndarray:
  """(..., 5) head pose (yaw, pitch, roll, tx, ty) -> (..., 3, 3) rotation; (tx, ty) are pixels."""
  pose = jnp.asarray(pose)
  if pose.shape[-1] != 5:
    raise ValueError(f"pose must have 5 values (yaw, pitch, roll, tx, ty), got {pose.shape}")
  return rotation_matrix(pose[..., :3])


def project(verts, pose, scale) -> jnp.ndarray:
  """Scaled orthographic projection: (..., V, 3) vertices -> (..., V, 2) pixels.

  pixel = scale * (R(pose) @ v)[:2] + pose[3:5]; `scale` (...) is pixels per model unit.
  """
  pose = jnp.asarray(pose)
  rot = pose_matrix(pose)
  scale = jnp.asarray(scale)[..., None, None]
  return scale * jnp.einsum("...vc,...kc->...vk", jnp.asarray(verts), rot[..., :2, :]) \
      + pose[..., None, 3:5]


def convert_external_model(mean, shape_basis, expression_basis=None, *, correspondence,
                           mouth_names: Sequence[str] | None = None,
                           eyebrow_names: Sequence[str] | None = None,
                           shape_std=None, template: MorphableModel | None = None,
                           name: str = "external") -> MorphableModel:
  """Brings a user's own basis (e.g. LSFM/BFM-derived) into this schema on the template topology.

  Args:
    mean: (N, 3) mean of the external mesh (any unit, any rigid placement).
    shape_basis: (S, N, 3) identity bases in the same unit.
    expression_basis: optional (E, N, 3); if None the template's expression bases are kept.
    correspondence: where each of the template's V vertices lies on the external mesh: either
      (V,) vertex indices, or a pair (indices (V, 3), barycentric weights (V, 3)).
    mouth_names, eyebrow_names: split of an external expression basis (E = M + B).
    shape_std: (S,) prior standard deviations in the external unit (default: ones).
    template: supplies triangles, regions, mirror (default: `default_model()`).

  The external geometry is similarity-aligned to the template mean (Procrustes), so the result
  uses the template's frame and unit (IOD); bases are rotated and scaled alike.
  """
  template = default_model() if template is None else template
  mean = np.asarray(mean, np.float64)
  shape_basis = np.asarray(shape_basis, np.float64)
  if mean.ndim != 2 or mean.shape[1] != 3:
    raise ValueError(f"convert_external_model: mean must be (N, 3), got {mean.shape}")
  n = mean.shape[0]
  if shape_basis.ndim != 3 or shape_basis.shape[1:] != (n, 3):
    raise ValueError(f"convert_external_model: shape_basis must be (S, {n}, 3), got "
                     f"{shape_basis.shape}")
  idx, w = _correspondence(correspondence, template.n_vertices, n)
  sample = lambda a: np.einsum("...vkc,vk->...vc", a[..., idx, :], w)
  m = sample(mean)
  scale, rot, offset = similarity_transform(m, template.mean.astype(np.float64))
  transform_basis = lambda b: scale * np.einsum("...vc,kc->...vk", sample(b), rot)
  new_mean = scale * m @ rot.T + offset
  new_shape = transform_basis(shape_basis)
  std = np.ones(shape_basis.shape[0]) if shape_std is None else np.asarray(shape_std, np.float64)
  bounds = None
  if expression_basis is None:
    expr, mouth, brow = (template.expression_basis, template.mouth_names,
                         template.eyebrow_names)
    bounds = template.expression_bounds
  else:
    expression_basis = np.asarray(expression_basis, np.float64)
    if expression_basis.ndim != 3 or expression_basis.shape[1:] != (n, 3):
      raise ValueError(f"convert_external_model: expression_basis must be (E, {n}, 3), got "
                       f"{expression_basis.shape}")
    if mouth_names is None or eyebrow_names is None:
      raise ValueError("convert_external_model: an expression_basis needs mouth_names and "
                       "eyebrow_names (its first len(mouth_names) bases are mouth bases)")
    expr, mouth, brow = transform_basis(expression_basis), mouth_names, eyebrow_names
  return MorphableModel(
      mean=new_mean, shape_basis=new_shape, shape_std=std, expression_basis=expr,
      expression_bounds=bounds, mouth_names=tuple(mouth), eyebrow_names=tuple(brow), triangles=template.triangles,
      regions=template.regions, mirror=template.mirror, name=name)


def _correspondence(corr, v: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """-> indices (V, 3) and weights (V, 3) from (V,) indices or an (indices, weights) pair."""
  if isinstance(corr, (tuple, list)) and len(corr) == 2:
    idx, w = np.asarray(corr[0]), np.asarray(corr[1], np.float64)
    if idx.shape != (v, 3) or w.shape != (v, 3):
      raise ValueError(f"correspondence: barycentric indices and weights must both be ({v}, 3), "
                       f"got {idx.shape} and {w.shape}")
    if not np.allclose(w.sum(1), 1.0, atol=1e-4):
      raise ValueError("correspondence: barycentric weights must sum to 1 per vertex")
  else:
    idx = np.asarray(corr)
    if idx.shape != (v,):
      raise ValueError(f"correspondence must be ({v},) vertex indices or a pair of ({v}, 3) "
                       f"arrays, got shape {idx.shape}")
    idx = np.repeat(idx[:, None], 3, 1)
    w = np.tile([1.0, 0.0, 0.0], (v, 1))
  if not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= n:
    raise ValueError(f"correspondence: indices must be integers in [0, {n})")
  return idx.astype(np.int64), w


def similarity_transform(src, dst, weights=None) -> tuple[float, np.ndarray, np.ndarray]:
  """Least-squares s, R, t with dst ~ s * src @ R.T + t (Umeyama; R a proper rotation)."""
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  w = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64)
  w = w / w.sum()
  ms, md = w @ src, w @ dst
  a, b = src - ms, dst - md
  cov = (b * w[:, None]).T @ a
  u, sv, vt = np.linalg.svd(cov)
  d = np.ones(3)
  d[2] = np.sign(np.linalg.det(u @ vt)) or 1.0
  rot = u @ np.diag(d) @ vt
  scale = float((sv * d).sum() / (w @ (a ** 2).sum(1)))
  return scale, rot, md - scale * rot @ ms
