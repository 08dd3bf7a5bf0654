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
has no seams), and just outside the face the mesh flow at the nearest boundary point,
extended rigidly, fades into the region flows over `boundary_blend` face heights, so the
flow is continuous across the face outline as well. Covered pixels always take the mesh flow.

Coordinates: vertex positions are pixels of the OUTPUT (flow) resolution in the project
convention (x right, y down, pixel centres at integers, as `landmarks` and `warp`); use
`rescale_points` to move them between resolutions. Sizes in `FlowConfig` are relative to
the reference face, so one config serves every resolution.
"""
from __future__ import annotations

import dataclasses
import functools
import math
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
  raster_budget: float = 2.0     # rasteriser candidates per output pixel (raster.py)

  def __post_init__(self):
    if self.head_transform not in HEAD_TRANSFORMS:
      raise ValueError(f"FlowConfig.head_transform must be one of {HEAD_TRANSFORMS}, "
                       f"got {self.head_transform!r}")
    for name in ("head_side", "head_up", "head_down", "torso_width", "feather",
                 "boundary_blend", "raster_budget"):
      if not getattr(self, name) > 0:
        raise ValueError(f"FlowConfig.{name} must be > 0, got {getattr(self, name)}")


class FlowResult(NamedTuple):
  grid: jax.Array       # (H, W, 2) normalised (x, y) in the reference image, per driving pixel.
  masks: dict           # REGIONS -> (H, W) float32 weights; they sum to 1 at every pixel.
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


def _ring_nearest(px, py, ring):
  """Nearest point of the closed polyline `ring` (B, 2) to each point (px, py) (P,).

  Returns (segment index (P,), position along it in [0, 1] (P,), distance (P,)).
  x and y stay separate (P, B) planes: a trailing axis of 2 makes XLA's CPU loops ~10x slower.
  """
  ax, ay = ring[:, 0], ring[:, 1]
  abx, aby = jnp.roll(ax, -1) - ax, jnp.roll(ay, -1) - ay
  inv_len2 = 1.0 / jnp.maximum(abx * abx + aby * aby, 1e-12)
  apx, apy = px[:, None] - ax, py[:, None] - ay                     # (P, B)
  t = jnp.clip((apx * abx + apy * aby) * inv_len2, 0.0, 1.0)
  ex, ey = apx - t * abx, apy - t * aby
  dist2 = ex * ex + ey * ey
  best = jnp.min(dist2, axis=1)
  # First segment reaching the minimum; plain min-reductions beat argmin on CPU.
  seg = jnp.min(jnp.where(dist2 <= best[:, None], jnp.arange(ring.shape[0]), ring.shape[0]),
                axis=1)
  return seg, jnp.take_along_axis(t, seg[:, None], axis=1)[:, 0], jnp.sqrt(best)


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
  _check_inputs(ref_xy, drv_xy, triangles, boundary_ring, drv_z)
  cfg = config

  # Inner face: rasterise the driving mesh, interpolate the reference positions.
  budget = max(1, math.ceil(cfg.raster_budget * height * width))
  ras = raster_lib.rasterize(drv_xy, triangles, drv_z, height=height, width=width,
                             max_candidates=budget)
  covered = ras.tri >= 0
  mesh_src = raster_lib.interpolate(ras, triangles, ref_xy)

  py, px = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing="ij")
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

  # Outside the face: fade from the mesh flow at the nearest outline point (extended with
  # the head's linear part) into the region flow, so the outline leaves no seam.
  seg, frac, dist = _ring_nearest(px.reshape(-1), py.reshape(-1), drv_ring)
  nxt = (seg + 1) % drv_ring.shape[0]
  lerp = lambda v: (v[seg] * (1 - frac[:, None]) + v[nxt] * frac[:, None]).reshape(
      height, width, 2)
  on_drv, on_ref = lerp(drv_ring), lerp(ref_ring)
  ox, oy = linear(px - on_drv[..., 0], py - on_drv[..., 1])
  keep = 1.0 - _smoothstep(dist.reshape(height, width) / (cfg.boundary_blend * face_h))
  outside_src = jnp.stack([keep * (on_ref[..., 0] + ox) + (1 - keep) * region_x,
                           keep * (on_ref[..., 1] + oy) + (1 - keep) * region_y], axis=-1)

  src = jnp.where(covered[..., None], mesh_src, outside_src)
  grid = (2.0 * src + 1.0) / jnp.array([width, height], jnp.float32) - 1.0
  face = covered.astype(jnp.float32)
  masks = {"face": face, "head": (1 - face) * head_w, "torso": (1 - face) * torso_w,
           "background": (1 - face) * background_w}
  return FlowResult(grid=grid, masks=masks, overflow=ras.overflow)
