"""Jitted triangle-mesh rasteriser: which triangle covers each pixel, and where in it.

Coordinates are the project's pixel convention (as `landmarks` and `warp`): x right, y down,
the centre of pixel (row r, column c) at (c, r). Resizing an image by s maps x to
(x + 0.5) * s - 0.5, and (2 x + 1) / width - 1 is the align_corners=False normalised coordinate.

Coverage rule: a pixel is covered by a triangle when all three barycentric weights of its
centre are >= 0 (edges and vertices count as inside; either winding). Degenerate triangles
(|area| <= `min_area`) cover nothing. Visibility: the covering triangle with the smallest
interpolated `z` wins (smaller z = nearer the camera, as in `landmarks`); ties, and every pixel when `z` is None,
go to the highest triangle index, as if triangles were drawn in order ("last writer wins").

How (measured faster than a per-pixel x per-triangle test and than fixed per-triangle tiles):
every triangle's pixel bounding box is enumerated into one flat candidate list of static
length `max_candidates` (a cumulative sum assigns each slot its triangle), candidates are
tested, and two scatter-max passes build the z-buffer and pick the winning triangle.
The list only has to hold the sum of the bounding-box areas (about 2x the covered area for
a fine mesh); when it is too short the highest-index triangles lose pixels and `overflow`
is set -- size it with `candidates_needed`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Raster(NamedTuple):
  tri: jax.Array        # (H, W) int32: covering triangle, -1 where none.
  bary: jax.Array       # (H, W, 3) float32: barycentric weights of the pixel centre (0 where none).
  overflow: jax.Array   # () bool: the candidate list was too short for this mesh.


def _bbox_pixels(tri_xy, height, width):
  """First column/row and the count of pixel centres inside each triangle's bounding box."""
  lo = jnp.min(tri_xy, axis=1)
  hi = jnp.max(tri_xy, axis=1)
  size = jnp.array([width, height])
  # Pixel centre c lies in [lo, hi]  <=>  ceil(lo) <= c <= floor(hi).
  first = jnp.clip(jnp.ceil(lo), 0, size).astype(jnp.int32)
  last = jnp.clip(jnp.floor(hi), -1, size - 1).astype(jnp.int32)
  extent = jnp.maximum(last - first + 1, 0)
  return first, extent


def _edge_weights(tri_xy, px, py):
  """Unnormalised barycentric weights (edge functions) of points (px, py); tri_xy (..., 3, 2)."""
  x0, y0 = tri_xy[..., 0, 0], tri_xy[..., 0, 1]
  x1, y1 = tri_xy[..., 1, 0], tri_xy[..., 1, 1]
  x2, y2 = tri_xy[..., 2, 0], tri_xy[..., 2, 1]
  # Each weight is measured relative to a vertex of its own edge, which keeps float32 exact
  # enough near the edges even for coordinates in the thousands.
  w0 = (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1)
  w1 = (x0 - x2) * (py - y2) - (y0 - y2) * (px - x2)
  w2 = (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)
  return jnp.stack([w0, w1, w2], axis=-1)


def _signed_area2(tri_xy):
  """Twice the signed area, with the same sign convention as `_edge_weights`."""
  e1 = tri_xy[:, 1] - tri_xy[:, 0]
  e2 = tri_xy[:, 2] - tri_xy[:, 0]
  return e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]


def candidates_needed(xy, triangles, height: int, width: int) -> int:
  """Sum of the triangles' pixel bounding-box areas: the `max_candidates` a mesh needs."""
  tri_xy = jnp.asarray(xy, jnp.float32)[jnp.asarray(triangles)]
  _, extent = _bbox_pixels(tri_xy, height, width)
  return int(np.asarray(jnp.sum(extent[:, 0] * extent[:, 1])))


@functools.partial(jax.jit, static_argnames=("height", "width", "max_candidates", "min_area"))
def rasterize(xy, triangles, z=None, *, height: int, width: int, max_candidates: int,
              min_area: float = 1e-6) -> Raster:
  """Rasterises a 2D triangle mesh onto a height x width pixel grid.

  Args:
    xy: (V, 2) vertex positions in continuous pixels (x right, y down; see module doc).
    triangles: (F, 3) integer vertex indices.
    z: optional (V,) depth, smaller = nearer; None means the highest triangle index wins.
    height, width: output size in pixels.
    max_candidates: static length of the bounding-box candidate list (see module doc).
    min_area: triangles with |area| at or below this (pixels^2) are skipped.
  Returns:
    Raster(tri, bary, overflow).
  """
  xy = jnp.asarray(xy, jnp.float32)
  triangles = jnp.asarray(triangles, jnp.int32)
  num_tri = triangles.shape[0]
  tri_xy = xy[triangles]                                       # (F, 3, 2)
  area2 = _signed_area2(tri_xy)
  valid_tri = jnp.abs(area2) > 2.0 * min_area
  first, extent = _bbox_pixels(tri_xy, height, width)
  count = jnp.where(valid_tri, extent[:, 0] * extent[:, 1], 0)
  end = jnp.cumsum(count)
  start = end - count
  overflow = end[-1] > max_candidates

  # Slot k belongs to the triangle whose [start, end) holds k: mark each start, cumsum.
  slot = jnp.arange(max_candidates, dtype=jnp.int32)
  marks = jnp.zeros(max_candidates + 1, jnp.int32).at[jnp.minimum(start, max_candidates)].add(1)
  owner = jnp.clip(jnp.cumsum(marks[:max_candidates]) - 1, 0, num_tri - 1)
  used = slot < jnp.minimum(end[-1], max_candidates)
  local = slot - start[owner]
  box_w = jnp.maximum(extent[owner, 0], 1)
  col = first[owner, 0] + local % box_w
  row = first[owner, 1] + local // box_w

  cand_xy = tri_xy[owner]
  w = _edge_weights(cand_xy, col, row) * jnp.sign(area2[owner])[:, None]
  inside = used & jnp.all(w >= 0, axis=-1)
  if z is None:
    depth = jnp.zeros(max_candidates, jnp.float32)
  else:
    tri_z = jnp.asarray(z, jnp.float32)[triangles][owner]    # (N, 3)
    # Negated so that one scatter-max serves both rules: the nearest (smallest z) wins.
    depth = -jnp.sum(w * tri_z, axis=-1) / jnp.abs(area2[owner])

  # Pixel index H*W is a dump slot for candidates that cover nothing.
  pix = jnp.where(inside, row * width + col, height * width)
  zbuf = jnp.full(height * width + 1, -jnp.inf, jnp.float32).at[pix].max(depth)
  front = inside & (depth >= zbuf[pix])
  winner = jnp.full(height * width + 1, -1, jnp.int32).at[pix].max(jnp.where(front, owner, -1))
  tri = winner[:-1].reshape(height, width)

  # Barycentric weights of each pixel centre in its winning triangle.
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                           jnp.arange(width, dtype=jnp.float32), indexing="ij")
  safe = jnp.maximum(tri, 0)
  bary = _edge_weights(tri_xy[safe], cols, rows) / area2[safe][..., None]
  bary = jnp.where((tri >= 0)[..., None], bary, 0.0)
  return Raster(tri=tri, bary=bary, overflow=overflow)


def interpolate(raster: Raster, triangles, values) -> jax.Array:
  """Barycentric interpolation of per-vertex `values` (V, C) -> (H, W, C); 0 where uncovered."""
  triangles = jnp.asarray(triangles, jnp.int32)
  corner = jnp.asarray(values)[triangles[jnp.maximum(raster.tri, 0)]]   # (H, W, 3, C)
  return jnp.einsum("hwk,hwkc->hwc", raster.bary, corner)
