"""Jitted triangle-mesh rasteriser: which triangle covers each pixel, and where in it.

Coordinates are the project's pixel convention (as `landmarks` and `warp`): x right, y down,
the centre of pixel (row r, column c) at (c, r). Resizing an image by s maps x to
(x + 0.5) * s - 0.5, and (2 x + 1) / width - 1 is the align_corners=False normalised coordinate.

Coverage rule: a pixel is covered by a triangle when all three barycentric weights of its
centre are >= 0 (edges and vertices count as inside; either winding). Degenerate triangles
(|area| <= `min_area`) cover nothing. Visibility: the covering triangle with the smallest
interpolated `z` wins (smaller z = nearer the camera, as in `landmarks` and `morphable`);
ties, and every pixel when `z` is None, go to the highest triangle index, as if triangles
were drawn in order ("last writer wins").

How (measured faster than a per-pixel x per-triangle test): every triangle's pixel bounding
box is enumerated into one flat candidate list of static length `max_candidates` (a
cumulative sum assigns each slot its triangle), candidates are tested, and one scatter-max of
a packed int32 key -- quantised nearness above the triangle index -- picks each pixel's
winner. Depth is resolved to (z range) / 2^(31 - ceil(log2 F)), about 1e-6 of the range for
a ~1000-triangle face mesh (at best 2^-24); closer calls count as ties.
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


def _corners(xy, triangles):
  """Corner coordinates of every triangle as six (F,) arrays: x0, y0, x1, y1, x2, y2.

  Kept as separate 1-D planes throughout: XLA's CPU loops over a trailing axis of 2 or 3
  are several times slower than over flat arrays.
  """
  x, y = xy[:, 0][triangles], xy[:, 1][triangles]
  return x[:, 0], y[:, 0], x[:, 1], y[:, 1], x[:, 2], y[:, 2]


def _bbox_pixels(c, height, width):
  """First column and row, and the number of columns and rows of pixel centres inside each
  triangle's bounding box, (F,) each. Centre c is in [lo, hi] <=> ceil(lo) <= c <= floor(hi)."""
  x0, y0, x1, y1, x2, y2 = c
  def span(lo, hi, size):
    first = jnp.clip(jnp.ceil(lo), 0, size).astype(jnp.int32)
    last = jnp.clip(jnp.floor(hi), -1, size - 1).astype(jnp.int32)
    return first, jnp.maximum(last - first + 1, 0)
  col0, ncol = span(jnp.minimum(jnp.minimum(x0, x1), x2), jnp.maximum(jnp.maximum(x0, x1), x2),
                    width)
  row0, nrow = span(jnp.minimum(jnp.minimum(y0, y1), y2), jnp.maximum(jnp.maximum(y0, y1), y2),
                    height)
  return col0, row0, ncol, nrow


def _edge_weights(c, px, py):
  """Unnormalised barycentric weights (edge functions) (w0, w1, w2) of points (px, py)."""
  x0, y0, x1, y1, x2, y2 = c
  # Each weight is measured relative to a vertex of its own edge, which keeps float32 exact
  # enough near the edges even for coordinates in the thousands.
  w0 = (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1)
  w1 = (x0 - x2) * (py - y2) - (y0 - y2) * (px - x2)
  w2 = (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)
  return w0, w1, w2


def _signed_area2(c):
  """Twice the signed area, with the same sign convention as `_edge_weights`."""
  x0, y0, x1, y1, x2, y2 = c
  return (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)


def candidates_needed(xy, triangles, height: int, width: int) -> int:
  """Sum of the triangles' pixel bounding-box areas: the `max_candidates` a mesh needs."""
  c = _corners(jnp.asarray(xy, jnp.float32), jnp.asarray(triangles, jnp.int32))
  _, _, ncol, nrow = _bbox_pixels(c, height, width)
  return int(np.asarray(jnp.sum(ncol * nrow)))


@functools.partial(jax.jit, static_argnames=("height", "width", "max_candidates", "min_area"))
def rasterize(xy, triangles, z=None, *, height: int, width: int, max_candidates: int,
              min_area: float = 1e-6) -> Raster:
  """Rasterises a 2D triangle mesh onto a height x width pixel grid.

  Args:
    xy: (V, 2) vertex positions in pixels (x right, y down; see module doc).
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
  if height * width >= 1 << 24:
    raise ValueError(f"rasterize: {height}x{width} is too large (at most 2^24 pixels)")
  if num_tri >= 1 << 23:
    raise ValueError(f"rasterize: {num_tri} triangles leave too few key bits for depth "
                     f"(at most {(1 << 23) - 1})")
  c = _corners(xy, triangles)
  area2 = _signed_area2(c)
  col0, row0, ncol, nrow = _bbox_pixels(c, height, width)
  count = jnp.where(jnp.abs(area2) > 2.0 * min_area, ncol * nrow, 0)
  end = jnp.cumsum(count)
  start = end - count
  overflow = end[-1] > max_candidates

  # Slot k belongs to the triangle whose [start, end) holds k: mark each start, cumsum.
  slot = jnp.arange(max_candidates, dtype=jnp.int32)
  marks = jnp.zeros(max_candidates + 1, jnp.int32).at[jnp.minimum(start, max_candidates)].add(1)
  # associative_scan: XLA's CPU cumsum (a reduce-window) is ~4x slower at this length.
  owner = jnp.clip(jax.lax.associative_scan(jnp.add, marks[:max_candidates]) - 1, 0, num_tri - 1)
  used = slot < jnp.minimum(end[-1], max_candidates)
  # Slot -> row and column in its box. Float division is exact here (offsets < 2^22) and
  # several times faster than integer // and % on CPU.
  local = (slot - start[owner]).astype(jnp.float32)
  box_w = jnp.maximum(ncol, 1).astype(jnp.float32)[owner]
  dy = jnp.floor((local + 0.5) / box_w)
  col = col0.astype(jnp.float32)[owner] + (local - dy * box_w)
  row = row0.astype(jnp.float32)[owner] + dy

  cc = [v[owner] for v in c]
  sign = jnp.sign(area2)[owner]
  w = [e * sign for e in _edge_weights(cc, col, row)]
  inside = used & (w[0] >= 0) & (w[1] >= 0) & (w[2] >= 0)
  # One scatter-max of a packed int32 key (quantised nearness, then triangle index) does the
  # z-test and the tie-break at once: half the scatters of a float z-buffer plus a second pass.
  id_bits = max(1, (num_tri - 1).bit_length())
  key = owner
  if z is not None:
    # At most 2^24 levels: float32 counts them exactly, so the shifted key cannot overflow.
    levels = min((1 << (31 - id_bits)) - 1, (1 << 24) - 1)
    z = jnp.asarray(z, jnp.float32)
    z_lo, z_hi = jnp.min(z), jnp.max(z)
    n = (z_hi - z[triangles]) * (levels / jnp.maximum(z_hi - z_lo, 1e-30))  # levels, 1 = near
    # Nearness is affine over a triangle: n0 + gx (x - x0) + gy (y - y0), per-triangle planes.
    x0, y0, x1, y1, x2, y2 = c
    dn1, dn2 = n[:, 1] - n[:, 0], n[:, 2] - n[:, 0]
    inv = 1.0 / jnp.where(area2 == 0, 1.0, area2)
    gx = (dn1 * (y2 - y0) - (y1 - y0) * dn2) * inv
    gy = ((x1 - x0) * dn2 - dn1 * (x2 - x0)) * inv
    near = n[:, 0][owner] + gx[owner] * (col - cc[0]) + gy[owner] * (row - cc[1])
    key = key | (jnp.clip(jnp.floor(near), 0, levels).astype(jnp.int32) << id_bits)
  # Pixel index H*W is a dump slot for candidates that cover nothing.
  pix = jnp.where(inside, (row * width + col).astype(jnp.int32), height * width)
  best = jnp.full(height * width + 1, -1, jnp.int32).at[pix].max(jnp.where(inside, key, -1))
  tri = jnp.where(best >= 0, best & ((1 << id_bits) - 1), -1)[:-1].reshape(height, width)

  # Barycentric weights of each pixel centre in its winning triangle.
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing="ij")
  safe = jnp.maximum(tri, 0)
  w = _edge_weights([v[safe] for v in c], cols, rows)
  scale = jnp.where(tri >= 0, 1.0 / jnp.where(tri >= 0, area2[safe], 1.0), 0.0)
  bary = jnp.stack([e * scale for e in w], axis=-1)
  return Raster(tri=tri, bary=bary, overflow=overflow)


def interpolate(raster: Raster, triangles, values) -> jax.Array:
  """Barycentric interpolation of per-vertex `values` (V, C) -> (H, W, C); 0 where uncovered."""
  triangles = jnp.asarray(triangles, jnp.int32)
  corner = jnp.asarray(values)[triangles[jnp.maximum(raster.tri, 0)]]   # (H, W, 3, C)
  return jnp.einsum("hwk,hwkc->hwc", raster.bary, corner)
