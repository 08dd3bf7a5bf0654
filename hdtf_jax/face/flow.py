"""Approximate dense flow F_app between a reference and a driving face (PAPER.md section 4).

F_app is a *backward* map: for every pixel of the driving frame, the point of the reference
image to sample (`grid`, normalised (x, y), align_corners=False, ready for
`hdtf_jax.warp.grid_sample`). Four regions, each defined in the reference frame and carried
into the driving frame by its own motion:

* inner face: the driving mesh is rasterised and each covered pixel takes the barycentric
  interpolation of the reference vertex positions (exact, piecewise affine);
* head (hair, ears, accessories): an ellipse around the reference face, enlarged by
  `FlowConfig.head_*`, that moves rigidly with the face boundary ring (a least-squares
  similarity or affine fit, reference -> driving, inverted);
* upper torso: a band below the chin, `torso_width` face widths wide, down to the image
  bottom, translated by the mean inner-face motion times `torso_damping`;
* background: static.

Region edges are feathered over `feather` face heights (partition of unity, so the flow
has no seams), and just outside the face the mesh flow at the nearest covered pixel
(found by jump flooding), extended rigidly, fades into the region flows over
`boundary_blend` face heights, so the flow is continuous across the face's silhouette as
well. Covered pixels always take the mesh flow.

Coordinates: vertex positions are pixels of the OUTPUT (flow) resolution in the project
convention (x right, y down, pixel centres at integers, as `landmarks` and `warp`); use
`rescale_points` to move them between resolutions. Sizes in `FlowConfig` are relative to
the reference face, so one config serves every resolution.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hdtf_jax.face import raster as raster_lib

HEAD_TRANSFORMS = ("similarity", "affine")
REGIONS = ("face", "head", "torso", "background")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """Region extents and blending of F_app. Lengths are in reference-face widths/heights."""
  head_side: float = 1.35        # head ellipse half-width / face half-width (ears, hair)
  head_up: float = 1.7           # head ellipse upper half-height / face half-height (hair)
  head_down: float = 1.05        # head ellipse lower half-height / face half-height
  head_transform: str = "similarity"  # rigid fit of the boundary ring: "similarity" | "affine"
  torso_width: float = 2.6       # torso band width / face width, centred on the face
  torso_top: float = -0.05       # torso top below the chin, in face heights (< 0: overlaps)
  torso_damping: float = 0.5     # torso moves by this fraction of the mean face motion
  feather: float = 0.12          # softness of region edges, in face heights
  boundary_blend: float = 0.15   # mesh flow fades into the region flows over this, face heights
  raster_budget: float = 1.5     # rasteriser candidates per output pixel (raster.py): enough
                                 # for a face up to ~3/4 of the frame width
  # flow_from_params only: model regions (ordered rings) whose openings are closed by a fan
  # of triangles to a centre set back by hole_depth ring widths (mouth cavity, eyeballs),
  # so the inside of an opening follows the mesh; regions the model lacks are skipped.
  fill_holes: tuple[str, ...] = ("inner_lips", "eye_left_ring", "eye_right_ring")
  hole_depth: float = 0.3

  def __post_init__(self):
    object.__setattr__(self, "fill_holes", tuple(self.fill_holes))  # hashable: a jit key
    if self.head_transform not in HEAD_TRANSFORMS:
      raise ValueError(f"FlowConfig.head_transform must be one of {HEAD_TRANSFORMS}, "
                       f"got {self.head_transform!r}")
    for name in ("head_side", "head_up", "head_down", "torso_width", "feather",
                 "boundary_blend", "raster_budget", "hole_depth"):
      if not getattr(self, name) > 0:
        raise ValueError(f"FlowConfig.{name} must be > 0, got {getattr(self, name)}")


class FlowResult(NamedTuple):
  grid: jax.Array       # (H, W, 2) normalised (x, y) in the reference image, per driving pixel.
  masks: dict           # REGIONS -> (H, W) float32 weights; they sum to 1 at every pixel.
                        # (Just outside the face the flow also blends in the mesh's.)
  overflow: jax.Array   # () bool: the rasteriser's candidate list was too short (raise budget).


def rescale_points(xy, from_hw, to_hw):
  """Moves pixel positions (..., 2) from an image of size from_hw to one of size to_hw."""
  scale = jnp.array([to_hw[1] / from_hw[1], to_hw[0] / from_hw[0]], jnp.float32)
  return (jnp.asarray(xy, jnp.float32) + 0.5) * scale - 0.5


def _smoothstep(x):
  x = jnp.clip(x, 0.0, 1.0)
  return x * x * (3.0 - 2.0 * x)


def _fit_transform(src, dst, kind: str):
  """Least-squares dst ~= src @ A.T + t over points (B, 2); returns (A (2, 2), t (2,))."""
  src_mean, dst_mean = src.mean(0), dst.mean(0)
  s, d = src - src_mean, dst - dst_mean
  if kind == "similarity":
    # Complex-number form: d ~= a * s with a = sum(d * conj(s)) / sum(|s|^2).
    norm = jnp.maximum(jnp.sum(s * s), 1e-12)
    re = jnp.sum(s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]) / norm
    im = jnp.sum(s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]) / norm
    a = jnp.array([[re, -im], [im, re]])
  else:
    a = jnp.linalg.solve(s.T @ s + 1e-9 * jnp.eye(2), s.T @ d).T
  return a, dst_mean - src_mean @ a.T


def _invert(a, t):
  a_inv = jnp.linalg.inv(a)
  return a_inv, -t @ a_inv.T


FAR = 1e6  # "no covered pixel found" coordinate: far away but finite (no inf - inf)


def _nearest_covered(covered, px, py, max_radius: int):
  """Nearest covered pixel (qx, qy) of every pixel and its distance, by jump flooding.

  Jump flooding (Rong & Tan 2006): each pass looks at the 8 pixels `step` away and keeps
  the nearest seed seen; steps halve from the largest power of two <= max_radius to 1, so
  seeds reach at least max_radius. Pixels reached by no seed get FAR. A few whole-image
  passes (a loop, so XLA compiles one pass), much cheaper than distances to every outline
  segment and exact at the face's real silhouette.
  """
  h, w = covered.shape
  top = 1 << max(0, int(max_radius).bit_length() - 1)
  passes = top.bit_length()

  def one_pass(i, q):
    qx, qy = q
    step = jnp.right_shift(top, i)
    # Pad by the largest step once per pass; neighbours are dynamic slices of the pad.
    pad = lambda a: jnp.pad(a, top, constant_values=FAR)
    bx, by = pad(qx), pad(qy)
    best = (px - qx) ** 2 + (py - qy) ** 2
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        if dy == dx == 0:
          continue
        at = (top + dy * step, top + dx * step)
        cx = jax.lax.dynamic_slice(bx, at, (h, w))
        cy = jax.lax.dynamic_slice(by, at, (h, w))
        d2 = (px - cx) ** 2 + (py - cy) ** 2
        closer = d2 < best
        qx, qy, best = jnp.where(closer, cx, qx), jnp.where(closer, cy, qy), jnp.minimum(d2, best)
    return qx, qy

  init = (jnp.where(covered, px, FAR), jnp.where(covered, py, FAR))
  qx, qy = jax.lax.fori_loop(0, passes, one_pass, init)
  return qx, qy, jnp.sqrt((px - qx) ** 2 + (py - qy) ** 2)


def _mesh_source(tri, ref_xy, drv_xy, triangles, px, py):
  """Reference position (x, y planes) of each pixel inside driving triangle `tri` (H, W).

  Each triangle's piecewise-affine map, written about its first corner
  (src = r0 + J (p - d0)), which stays accurate in float32 far from the image origin.
  """
  def corners(xy):
    x, y = xy[:, 0][triangles], xy[:, 1][triangles]
    return x[:, 0], y[:, 0], x[:, 1:] - x[:, :1], y[:, 1:] - y[:, :1]
  d0x, d0y, dx, dy = corners(drv_xy)
  r0x, r0y, rx, ry = corners(ref_xy)
  det = dx[:, 0] * dy[:, 1] - dx[:, 1] * dy[:, 0]
  inv = 1.0 / jnp.where(det == 0, 1.0, det)  # degenerate triangles never cover a pixel
  j00 = (rx[:, 0] * dy[:, 1] - rx[:, 1] * dy[:, 0]) * inv
  j01 = (rx[:, 1] * dx[:, 0] - rx[:, 0] * dx[:, 1]) * inv
  j10 = (ry[:, 0] * dy[:, 1] - ry[:, 1] * dy[:, 0]) * inv
  j11 = (ry[:, 1] * dx[:, 0] - ry[:, 0] * dx[:, 1]) * inv
  t = jnp.maximum(tri, 0)
  ux, uy = px - d0x[t], py - d0y[t]
  return r0x[t] + j00[t] * ux + j01[t] * uy, r0y[t] + j10[t] * ux + j11[t] * uy


def _check_inputs(ref_xy, drv_xy, triangles, boundary_ring, drv_z):
  if ref_xy.ndim != 2 or ref_xy.shape[-1] != 2 or ref_xy.shape != drv_xy.shape:
    raise ValueError(f"approximate_flow: ref_xy and drv_xy must both be (V, 2), got "
                     f"{ref_xy.shape} and {drv_xy.shape}")
  if triangles.ndim != 2 or triangles.shape[-1] != 3:
    raise ValueError(f"approximate_flow: triangles must be (F, 3), got {triangles.shape}")
  if boundary_ring.ndim != 1 or boundary_ring.shape[0] < 3:
    raise ValueError(f"approximate_flow: boundary_ring must be (B,) with B >= 3, got "
                     f"{boundary_ring.shape}")
  if drv_z is not None and drv_z.shape != ref_xy.shape[:1]:
    raise ValueError(f"approximate_flow: drv_z must be ({ref_xy.shape[0]},), got {drv_z.shape}")


@functools.partial(jax.jit, static_argnames=("height", "width", "config"))
def approximate_flow(ref_xy, drv_xy, triangles, boundary_ring, drv_z=None, *, height: int,
                     width: int, config: FlowConfig = FlowConfig()) -> FlowResult:
  """F_app for one driving frame (vmap / lax.map it for several).

  Args:
    ref_xy, drv_xy: (V, 2) vertex positions in the reference and the driving frame, in
      pixels of the height x width output (module doc).
    triangles: (F, 3) vertex indices of the face mesh.
    boundary_ring: (B,) vertex indices of the face outline, in order around the face.
    drv_z: optional (V,) driving depth for the z-buffer (smaller = nearer the camera);
      without it, overlapping triangles resolve to the highest index (raster.py).
    height, width: output size; config: FlowConfig.
  Returns:
    FlowResult(grid (H, W, 2), masks {face, head, torso, background} (H, W), overflow).
  """
  ref_xy = jnp.asarray(ref_xy, jnp.float32)
  drv_xy = jnp.asarray(drv_xy, jnp.float32)
  triangles = jnp.asarray(triangles, jnp.int32)
  boundary_ring = jnp.asarray(boundary_ring, jnp.int32)
  drv_z = None if drv_z is None else jnp.asarray(drv_z, jnp.float32)
  _check_inputs(ref_xy, drv_xy, triangles, boundary_ring, drv_z)
  cfg = config

  # Inner face: rasterise the driving mesh, interpolate the reference positions.
  budget = max(1, math.ceil(cfg.raster_budget * height * width))
  ras = raster_lib.rasterize(drv_xy, triangles, drv_z, height=height, width=width,
                             max_candidates=budget)
  covered = ras.tri >= 0
  py, px = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing="ij")
  mesh_x, mesh_y = _mesh_source(ras.tri, ref_xy, drv_xy, triangles, px, py)
  ref_ring, drv_ring = ref_xy[boundary_ring], drv_xy[boundary_ring]
  lo, hi = ref_ring.min(0), ref_ring.max(0)
  face_w, face_h = jnp.maximum(hi - lo, 1e-3)
  cx, cy = (lo + hi) / 2
  feather = cfg.feather * face_h

  # Head: rigid motion of the boundary ring; membership of the source point in the enlarged
  # reference ellipse (asymmetric: more room above for hair).
  a, t = _fit_transform(ref_ring, drv_ring, cfg.head_transform)
  a_inv, t_inv = _invert(a, t)
  linear = lambda x, y: (a_inv[0, 0] * x + a_inv[0, 1] * y, a_inv[1, 0] * x + a_inv[1, 1] * y)
  hx, hy = linear(px, py)
  hx, hy = hx + t_inv[0], hy + t_inv[1]
  rx, ry = hx - cx, hy - cy
  semi_y = jnp.where(ry < 0, cfg.head_up, cfg.head_down) * face_h / 2
  r = jnp.hypot(rx / (cfg.head_side * face_w / 2), ry / semi_y)
  # Distance outside the ellipse along the ray from its centre (exact for a circle).
  outside = jnp.hypot(rx, ry) * (1.0 - 1.0 / jnp.maximum(r, 1e-6))
  head_w = 1.0 - _smoothstep(outside / feather)

  # Torso: damped mean translation of the inner face; a band below the reference chin.
  shift = cfg.torso_damping * jnp.mean(ref_xy - drv_xy, axis=0)
  tx, ty = px + shift[0], py + shift[1]
  top = hi[1] + cfg.torso_top * face_h
  dx = jnp.maximum(jnp.abs(tx - cx) - cfg.torso_width * face_w / 2, 0.0)
  dy = jnp.maximum(top - ty, 0.0)
  torso_w = (1.0 - head_w) * (1.0 - _smoothstep(jnp.hypot(dx, dy) / feather))
  background_w = 1.0 - head_w - torso_w
  region_x = head_w * hx + torso_w * tx + background_w * px
  region_y = head_w * hy + torso_w * ty + background_w * py

  # Outside the face: fade from the mesh flow at the nearest covered pixel (extended with
  # the head's linear part) into the region flow, so the face's visible silhouette -- the
  # outline, or inner vertices under a turned head -- leaves no seam.
  reach = max(1, math.ceil(cfg.boundary_blend * max(height, width)))
  qx, qy, dist = _nearest_covered(covered, px, py, reach)
  found = dist < reach
  q = jnp.where(found, qy * width + qx, 0).astype(jnp.int32)
  ox, oy = linear(px - qx, py - qy)
  blend = jnp.minimum(cfg.boundary_blend * face_h, reach)
  keep = jnp.where(found, 1.0 - _smoothstep(dist / blend), 0.0)
  out_x = keep * (mesh_x.reshape(-1)[q].reshape(height, width) + ox) + (1 - keep) * region_x
  out_y = keep * (mesh_y.reshape(-1)[q].reshape(height, width) + oy) + (1 - keep) * region_y

  src_x = jnp.where(covered, mesh_x, out_x)
  src_y = jnp.where(covered, mesh_y, out_y)
  grid = jnp.stack([(2.0 * src_x + 1.0) / width - 1.0, (2.0 * src_y + 1.0) / height - 1.0], -1)
  face = covered.astype(jnp.float32)
  masks = {"face": face, "head": (1 - face) * head_w, "torso": (1 - face) * torso_w,
           "background": (1 - face) * background_w}
  return FlowResult(grid=grid, masks=masks, overflow=ras.overflow)


# ----------------------------------------------------------------------------- from parameters


def hole_fans(rings, n_vertices: int) -> np.ndarray:
  """Fan triangles closing each ring (sequence of (n,) index arrays) to a new centre vertex.

  Ring k's centre gets index n_vertices + k (see `with_hole_centres`).
  """
  fans = [np.stack([r, np.roll(r, -1), np.full_like(r, n_vertices + k)], 1)
          for k, r in enumerate(rings)]
  return np.concatenate(fans).astype(np.int32) if fans else np.zeros((0, 3), np.int32)


def with_hole_centres(xy, z, rings, depth: float):
  """Appends each ring's centre: xy its mean, z behind the ring by `depth` ring widths."""
  cxy = [xy[..., r, :].mean(-2) for r in rings]
  width = [jnp.ptp(xy[..., r, 0], axis=-1) for r in rings]
  cz = [z[..., r].max(-1) + depth * w for r, w in zip(rings, width)]
  return (jnp.concatenate([xy, jnp.stack(cxy, -2)], -2),
          jnp.concatenate([z, jnp.stack(cz, -1)], -1))


def _as_hw(size, name):
  hw = (int(size),) * 2 if isinstance(size, numbers.Integral) else tuple(int(v) for v in size)
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f"flow_from_params: {name} must be an int or (height, width), got {size!r}")
  return hw


PARAM_KEYS = ("shape", "mouth", "eyebrow", "pose", "scale")


def mesh_points(model, params, image_size, flow_size):
  """Projected vertices (..., V, 2) in flow pixels and camera depth (..., V) for `params`.

  `params` holds shape (S,), mouth (..., M), eyebrow (..., B), pose (..., 5) and scale (...)
  as in `hdtf_jax.face.morphable`, whose pixels are those of an image_size image.
  """
  from hdtf_jax.face import morphable
  missing = [k for k in PARAM_KEYS if k not in params]
  if missing:
    raise ValueError(f"flow_from_params: parameters lack {missing} (need {list(PARAM_KEYS)})")
  verts = morphable.vertices(model, params["shape"], params["mouth"], params["eyebrow"])
  pose, scale = jnp.asarray(params["pose"]), jnp.asarray(params["scale"])
  xy = morphable.project(verts, pose, scale)
  depth_row = morphable.pose_matrix(pose)[..., 2, :]
  z = scale[..., None] * jnp.einsum("...vc,...c->...v", verts, depth_row)
  image_hw, flow_hw = _as_hw(image_size, "image_size"), _as_hw(flow_size, "flow_size")
  ratio = flow_hw[1] / image_hw[1]
  return rescale_points(xy, image_hw, flow_hw), z * ratio


def flow_from_params(model, ref_params, drv_params, image_size, flow_size,
                     config: FlowConfig = FlowConfig()) -> FlowResult:
  """F_app from morphable-model parameters: one reference, one or T driving frames.

  Args:
    model: a `hdtf_jax.face.morphable.MorphableModel`.
    ref_params, drv_params: dicts with shape (S,), mouth (M,), eyebrow (B,), pose (5,) and
      scale (); driving entries may carry a leading frame axis T (mouth (T, M), pose (T, 5),
      scale (T,) ...) -- then every FlowResult field gets that leading axis.
    image_size: int or (H, W) of the image the parameters' pixels refer to (e.g. 512).
    flow_size: int or (h, w) of the flow to produce (e.g. 128).
    config: FlowConfig (also names the openings to fill, see `FlowConfig.fill_holes`).
  """
  image_hw, flow_hw = _as_hw(image_size, "image_size"), _as_hw(flow_size, "flow_size")
  if np.shape(ref_params.get("pose")) != (5,):
    raise ValueError(f"flow_from_params: ref_params['pose'] must be (5,) -- one reference "
                     f"frame -- got {np.shape(ref_params.get('pose'))}")
  return _flow_from_params(model, ref_params, drv_params, image_hw, flow_hw, config)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _flow_from_params(model, ref_params, drv_params, image_hw, flow_hw, config):
  rings = [np.asarray(model.regions[k]) for k in config.fill_holes if k in model.regions]
  triangles = np.concatenate([hole_fans(rings, model.n_vertices), model.triangles])
  boundary = np.asarray(model.regions["face_boundary"])
  ref_xy, ref_z = mesh_points(model, ref_params, image_hw, flow_hw)
  drv_xy, drv_z = mesh_points(model, drv_params, image_hw, flow_hw)
  if rings:  # fans first: where a sliver of a closed opening overlaps the lips, lips win
    ref_xy, _ = with_hole_centres(ref_xy, ref_z, rings, config.hole_depth)
    drv_xy, drv_z = with_hole_centres(drv_xy, drv_z, rings, config.hole_depth)
  one = lambda xy, z: approximate_flow(ref_xy, xy, triangles, boundary, z, height=flow_hw[0],
                                       width=flow_hw[1], config=config)
  if drv_xy.ndim == 2:
    return one(drv_xy, drv_z)
  # lax.map keeps each frame's scatters as cheap as a single call (vmap batches them slower).
  return jax.lax.map(lambda a: one(*a), (drv_xy, drv_z))


# ----------------------------------------------------------------------------- picture sheet


def _pose_from_rotation(rot):
  """(yaw, pitch, roll) of R = Rz(roll) Rx(pitch) Ry(yaw) (morphable's convention)."""
  pitch = np.arcsin(np.clip(rot[2, 1], -1, 1))
  return np.arctan2(-rot[2, 0], rot[2, 2]), pitch, np.arctan2(-rot[0, 1], rot[1, 1])


def params_from_points(model, points, shape_ridge: float = 1.0) -> dict:
  """Neutral-expression parameters placing `model` on detected 3D points (V, 3) in pixels.

  Pose and scale from a similarity (Umeyama) fit of the mean; shape from ridge-regularised
  least squares on the remaining x, y residual. Mouth and eyebrow are zero. For the sheet and
  tests; `hdtf_jax.face.fitting` is the full fit.
  """
  from hdtf_jax.face import morphable
  points = np.asarray(points, np.float64)
  if points.shape != model.mean.shape:
    raise ValueError(f"params_from_points: points must be {model.mean.shape}, got {points.shape}")
  scale, rot, offset = morphable.similarity_transform(model.mean, points)
  # Shape: residual (x, y) ~ scale * R[:2] @ basis, per coefficient.
  basis = scale * np.einsum("svc,kc->svk", model.shape_basis, rot[:2]).reshape(model.n_shape, -1)
  resid = (points[:, :2] - (scale * model.mean @ rot[:2].T + offset[:2])).reshape(-1)
  shape = np.linalg.solve(basis @ basis.T + shape_ridge * np.eye(model.n_shape), basis @ resid)
  return {"shape": shape.astype(np.float32), "mouth": np.zeros(model.n_mouth, np.float32),
          "eyebrow": np.zeros(model.n_eyebrow, np.float32),
          "pose": np.array([*_pose_from_rotation(rot), *offset[:2]], np.float32),
          "scale": np.float32(scale)}


def astronaut_face(size: int = 256, face_fraction: float = 0.55):
  """scikit-image's astronaut portrait cropped square around the face (as HDTF crops) and
  resized to `size`, with the face-mesh points detected on it; (image uint8, points (468, 3))."""
  import cv2
  import skimage.data
  from hdtf_jax.face import landmarks as lmk
  image = skimage.data.astronaut()
  found = lmk.FaceLandmarker().detect_landmarks(image, source="astronaut")
  if found is None:
    raise ValueError("astronaut: no face found")
  x0, y0, x1, y1 = found.box
  side = max(x1 - x0, y1 - y0) / face_fraction
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + 0.1 * side  # room for hair above, neck below
  s = size / side
  # Affine crop: image pixel p -> (p - corner + 0.5) * s - 0.5 (pixel centres at integers).
  m = np.array([[s, 0, (side / 2 - cx + 0.5) * s - 0.5], [0, s, (side / 2 - cy + 0.5) * s - 0.5]])
  crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
  points = found.points.astype(np.float64)
  points = np.concatenate([points[:, :2] @ m[:, :2].T + m[:, 2], points[:, 2:] * s], 1)
  return crop, points


SHEET_MOTIONS = {  # name -> (mouth / eyebrow coefficients by name, pose deltas)
    "jaw open": ({"jaw_open": 1.0}, {}),
    "yaw +0.35": ({}, {"yaw": 0.35}),
    "pitch +0.25, smile": ({"smile_left": 0.8, "smile_right": 0.8}, {"pitch": 0.25}),
    "roll -0.2, brows up, shift": ({"eyebrow_up_left": 1.0, "eyebrow_up_right": 1.0,
                                    "eyebrow_up_centre": 1.0}, {"roll": -0.2, "tx": 12.0}),
}


def driving_params(model, ref: dict, expression: dict, pose: dict) -> dict:
  """`ref` with named expression coefficients set and pose entries (yaw, pitch, roll, tx, ty)
  added (angles in radians, shifts in pixels)."""
  names = list(model.expression_names)
  unknown = [k for k in expression if k not in names]
  if unknown:
    raise ValueError(f"driving_params: the model has no expression basis {unknown}")
  coeff = np.concatenate([ref["mouth"], ref["eyebrow"]]).astype(np.float32)
  for k, v in expression.items():
    coeff[names.index(k)] = v
  delta = np.zeros(5, np.float32)
  for k, v in pose.items():
    delta[("yaw", "pitch", "roll", "tx", "ty").index(k)] = v
  return dict(ref, mouth=coeff[:model.n_mouth], eyebrow=coeff[model.n_mouth:],
              pose=np.asarray(ref["pose"], np.float32) + delta)


def warp_image(image, grid):
  """uint8 (H, W, 3) image sampled at a normalised grid (h, w, 2) -> uint8 (H, W, 3).

  The grid is resized to the image first: normalised (align_corners=False) positions mean
  the same point at every resolution, so a low-resolution F_app warps a sharp image.
  """
  from hdtf_jax import warp
  h, w = image.shape[:2]
  grid = jax.image.resize(jnp.asarray(grid, jnp.float32), (h, w, 2), "linear")
  out = warp.grid_sample(jnp.asarray(image, jnp.float32)[None] / 255, grid[None],
                         padding_mode="border")[0]
  return np.asarray(jnp.clip(out * 255 + 0.5, 0, 255)).astype(np.uint8)


def region_colours(masks) -> np.ndarray:
  """Region weights -> uint8 RGB: face red, head green, torso blue, background grey."""
  colours = {"face": (230, 60, 60), "head": (60, 200, 60), "torso": (60, 90, 230),
             "background": (128, 128, 128)}
  rgb = sum(np.asarray(masks[k])[..., None] * np.array(c, np.float32) for k, c in colours.items())
  return np.clip(rgb, 0, 255).astype(np.uint8)


def make_sheet(path, model=None, image_size: int = 256, flow_size: int = 128,
               config: FlowConfig = FlowConfig(), face=None):
  """Writes a PNG: per motion, the reference, F_app as colour, the warped frame, the regions.

  `face`: optional (image, points) as `astronaut_face(image_size)` returns (saves detecting).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from hdtf_jax import warp
  from hdtf_jax.face import morphable
  model = morphable.default_model() if model is None else model
  image, points = astronaut_face(image_size) if face is None else face
  if image.shape[:2] != (image_size, image_size):
    raise ValueError(f"make_sheet: face image is {image.shape[:2]}, expected {image_size}^2")
  ref = params_from_points(model, points)
  drv = [driving_params(model, ref, *m) for m in SHEET_MOTIONS.values()]
  stacked = {k: np.stack([d[k] for d in drv]) for k in PARAM_KEYS}
  res = flow_from_params(model, ref, stacked, image_size, flow_size, config)
  flows = warp.grid_to_flow(res.grid) * (image_size / flow_size)
  colour = warp.flow_to_color(flows)
  ref_xy, _ = mesh_points(model, ref, image_size, image_size)
  drv_xy, _ = mesh_points(model, stacked, image_size, image_size)
  fig, axes = plt.subplots(len(drv), 4, figsize=(12, 3 * len(drv)))
  for i, name in enumerate(SHEET_MOTIONS):
    panels = [(image, "reference + its mesh"), (colour[i], f"F_app: {name}"),
              (warp_image(image, res.grid[i]), "warped by F_app + driving mesh"),
              (region_colours({k: v[i] for k, v in res.masks.items()}),
               "face / head / torso / background")]
    for j, (img, title) in enumerate(panels):
      axes[i, j].imshow(img, interpolation="nearest")
      axes[i, j].set_title(title, fontsize=9)
      axes[i, j].axis("off")
    axes[i, 0].triplot(ref_xy[:, 0], ref_xy[:, 1], model.triangles, lw=0.2, color="w")
    axes[i, 2].triplot(drv_xy[i, :, 0], drv_xy[i, :, 1], model.triangles, lw=0.2, color="y")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def main(argv=None):
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sheet", required=True, help="output PNG path")
  parser.add_argument("--model", help="morphable model .npz (default: the packaged one)")
  parser.add_argument("--image-size", type=int, default=256)
  parser.add_argument("--flow-size", type=int, default=128)
  args = parser.parse_args(argv)
  from hdtf_jax.face import morphable
  model = morphable.load(args.model) if args.model else None
  print(make_sheet(args.sheet, model, args.image_size, args.flow_size))


if __name__ == "__main__":
  main()
