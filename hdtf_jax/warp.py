"""Grid-sample warping and dense-flow helpers (JAX, jittable, differentiable).

Conventions used throughout hdtf-jax
-----------------------------------
* Images and feature maps are NHWC. Flows are (N, H, W, 2) in pixels, ordered
  (dx, dy), and are *backward* flows: ``warp(image, flow)[y, x] =
  image[y + dy, x + dx]`` (the output pixel looks up where it comes from).
* Grids are (N, Ho, Wo, 2) holding normalised (x, y) in [-1, 1], x indexing
  width, exactly as ``torch.nn.functional.grid_sample`` reads them.
* The project uses ``align_corners=False`` everywhere. -1 and +1 then name the
  outer *edges* of the border pixels, so a normalised position means the same
  point of the picture at every resolution: a flow computed at 128x128 and
  turned into a grid warps a 512x512 feature map correctly. It is also
  PyTorch's default and the half-pixel-centre convention of
  ``jax.image.resize``, so resizing and warping agree.
* Trap (PAPER.md section 4): the authors' released code (like PIRender and
  DINet) normalises grids with ``(size - 1)`` -- the align_corners=True
  formula -- but calls grid_sample with align_corners=False. Pixel p is then
  read at p * S / (S - 1) - 0.5: even a zero flow resamples the picture, a
  pixel smaller, blended with the padding at the borders. Build grids with
  ``flow_to_grid``/``identity_grid`` using the same ``align_corners`` you pass
  to ``grid_sample`` and the pair is consistent; the tests check that the
  identity grid reproduces the image exactly, and that the mixed pair does not.

Sampling formula (PyTorch's, reproduced exactly): a normalised coordinate g on
an axis of size S becomes the pixel coordinate ``((g + 1) * S - 1) / 2``
(align_corners=False) or ``(g + 1) / 2 * (S - 1)`` (True). "border" padding
clamps that coordinate to [0, S - 1] (the gradient is zero where it clamps,
boundaries included); "zeros" padding reads 0 for any corner outside the
image. Bilinear mixes the four corners around the point; nearest rounds half
to even (like ``nearbyint``) and has zero gradient with respect to the grid.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MODES = ("bilinear", "nearest")
PADDING_MODES = ("zeros", "border")


def _check_options(mode: str, padding_mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"grid_sample: mode must be one of {MODES}, got {mode!r}")
  if padding_mode not in PADDING_MODES:
    raise ValueError(
        f"grid_sample: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")


def _unnormalize(g, size: int, align_corners: bool):
  """Normalised [-1, 1] coordinate -> pixel coordinate (pixel centres at integers)."""
  if align_corners:
    return (g + 1) * ((size - 1) / 2)
  return ((g + 1) * size - 1) / 2


def _normalize(p, size: int, align_corners: bool):
  """Inverse of `_unnormalize`."""
  if align_corners:
    return p * (2 / max(size - 1, 1)) - 1
  return (2 * p + 1) / size - 1


def _clip_border(p, size: int):
  """Clamps to [0, size-1]; also returns the clamp's derivative, 0 at the ends (as PyTorch)."""
  inside = (p > 0) & (p < size - 1)
  return jnp.where(inside, p, jnp.where(p <= 0, 0, size - 1).astype(p.dtype)), inside


def _check_shapes(image, grid):
  if image.ndim != 4:
    raise ValueError(f"grid_sample: image must be NHWC (4-D), got shape {image.shape}")
  if grid.ndim != 4 or grid.shape[-1] != 2:
    raise ValueError(f"grid_sample: grid must be (N, Ho, Wo, 2), got shape {grid.shape}")
  if grid.shape[0] != image.shape[0]:
    raise ValueError(
        f"grid_sample: batch sizes differ: image {image.shape[0]} vs grid {grid.shape[0]}")
  if image.shape[1] == 0 or image.shape[2] == 0:
    raise ValueError(f"grid_sample: image has no pixels to sample, shape {image.shape}")


class _Taps(NamedTuple):
  """Where P sample points read: K taps each (4 bilinear corners or 1 nearest pixel).

  rows:  K arrays (P,) of int32 rows of the image viewed as (N*H*W, C); always
         in range (clamped), so gathers and scatters need no bounds checks.
  weights: K arrays (P,) of bilinear weights, already 0 for taps outside the image.
  inside:  K arrays (P,) of bool, the tap is inside the image (for the grid gradient).
  (Tuples, not stacked (K, P) arrays: on XLA:CPU a stack is a concatenate
  fusion that runs on one thread; for C=3 the backward spent a third of its
  time building the three stacks.)
  fx, fy:  (P,) fractional parts of the pixel coordinates (bilinear only).
  dpx, dpy: (P,) d(pixel coordinate)/d(normalised coordinate), 0 where
         "border" clamps.
  """
  rows: tuple
  weights: tuple
  inside: tuple
  fx: jax.Array
  fy: jax.Array
  dpx: jax.Array
  dpy: jax.Array


def _taps(points, hw_out: int, h: int, w: int, mode: str, padding_mode: str,
          align_corners: bool) -> _Taps:
  """Taps of the flattened (N*Ho*Wo, 2) grid `points` on N images of H x W.

  Point i belongs to image i // (Ho*Wo). Only P-sized index arithmetic: no C
  factor.
  """
  gx, gy = points[:, 0], points[:, 1]
  px = _unnormalize(gx, w, align_corners)
  py = _unnormalize(gy, h, align_corners)
  dpx = jnp.full_like(px, (w - 1) / 2 if align_corners else w / 2)
  dpy = jnp.full_like(py, (h - 1) / 2 if align_corners else h / 2)
  if padding_mode == "border":
    px, in_x = _clip_border(px, w)
    py, in_y = _clip_border(py, h)
    dpx, dpy = jnp.where(in_x, dpx, 0), jnp.where(in_y, dpy, 0)
  else:
    # Far-outside points read only zeros anyway; clamping keeps the int32
    # conversion below safe for huge coordinates without changing any result.
    px, py = jnp.clip(px, -2, w + 1), jnp.clip(py, -2, h + 1)
  image_row = (lax.iota(jnp.int32, points.shape[0]) // hw_out) * (h * w)

  def tap(ix, iy):
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    return image_row + jnp.clip(iy, 0, h - 1) * w + jnp.clip(ix, 0, w - 1), inside

  if mode == "nearest":
    # jnp.round rounds half to even, like PyTorch's nearbyint.
    row, inside = tap(jnp.round(px).astype(jnp.int32), jnp.round(py).astype(jnp.int32))
    zero = jnp.zeros_like(px)
    return _Taps((row,), (inside.astype(px.dtype),), (inside,), zero, zero, zero, zero)
  x0f, y0f = jnp.floor(px), jnp.floor(py)
  fx, fy = px - x0f, py - y0f
  x0, y0 = x0f.astype(jnp.int32), y0f.astype(jnp.int32)
  rows, insides, weights = [], [], []
  # Corner order: (x0, y0), (x1, y0), (x0, y1), (x1, y1).
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      row, inside = tap(x0 + dx, y0 + dy)
      rows.append(row)
      insides.append(inside)
      weights.append(jnp.where(inside, wx * wy, 0))
  return _Taps(tuple(rows), tuple(weights), tuple(insides), fx, fy, dpx, dpy)


def _gather_mix(rows, taps: _Taps):
  """sum_k weights[k] * rows[taps.rows[k]] -> (P, C): whole C-vectors per gather."""
  out = None
  for k in range(len(taps.rows)):
    term = rows.at[taps.rows[k]].get(mode="promise_in_bounds") * taps.weights[k][:, None]
    out = term if out is None else out + term
  return out


def _forward(rows, points, hw_out: int, h: int, w: int, mode: str, padding_mode: str,
             align_corners: bool):
  """grid_sample on flat views: rows (N*H*W, C), points (N*Ho*Wo, 2) -> (N*Ho*Wo, C)."""
  def sample(rows, points):
    taps = _taps(points, hw_out, h, w, mode, padding_mode, align_corners)
    return _gather_mix(rows, taps)

  def sample_on_cpu(rows, points):
    # A conditional with two identical branches is a fusion boundary XLA:CPU
    # keeps (its predicate is data, so it cannot fold it away). It keeps the
    # gathers and the weighted sum in one loop fusion: otherwise a reducing
    # consumer (a loss) pulls the sum into its own fusion and the four gathers
    # become full-size temporaries, 5-10x slower. Under vmap it turns into a
    # select of two identical values, which XLA merges. Accelerators skip it:
    # there a data-dependent branch would wait for the device.
    return lax.cond(points[0, 0] > 0, sample, sample, rows, points)

  if points.shape[0] == 0:
    return sample(rows, points)
  return lax.platform_dependent(rows, points, cpu=sample_on_cpu, default=sample)


def _explicit_spec(x):
  """`x`'s PartitionSpec if it is sharded over Explicit mesh axes (sharding in its type), else None."""
  try:
    spec = jax.typeof(x).sharding.spec
  except AttributeError:
    return None
  return spec if any(axis is not None for axis in spec) else None


def _per_shard(fn, image, grid):
  """fn(image, grid) with explicitly sharded inputs: one call per batch shard (shard_map).

  Inside, both paths see plain local arrays; the flat gathers of the XLA path
  have no sharding rule for a batch split across devices.
  """
  from jax.sharding import PartitionSpec, reshard
  spec = _explicit_spec(image) or _explicit_spec(grid)
  batch = PartitionSpec(spec[0], None, None, None)
  image, grid = reshard(image, batch), reshard(grid, batch)
  # check_vma=False: the custom call outputs carry no varying-axes type.
  return jax.shard_map(fn, in_specs=(batch, batch), out_specs=batch, check_vma=False)(image, grid)


# Elements (points x C) of the cotangent handled per step of the backward loop
# on CPU. Each step's temporaries (4 corners x points x C) then stay in cache
# instead of being materialised as full-size arrays, which costs page faults
# and memory traffic several times the useful work (see benchmarks/warp.py).
# Accelerators take all points in one step: many small steps would be many
# small kernel launches there.
_BACKWARD_STEP_ELEMENTS = 16 * 1024
# Up to this many channels the CPU backward forms the grid gradient's dot
# products as unrolled multiply-adds instead of a batched matrix product.
_SMALL_C = 8


def _grid_cotangent(s, taps: _Taps):
  """d loss / d grid (P, 2) from s[k] = <gout, value at corner k> (0 outside)."""
  gx = (1 - taps.fy) * (s[1] - s[0]) + taps.fy * (s[3] - s[2])
  gy = (1 - taps.fx) * (s[2] - s[0]) + taps.fx * (s[3] - s[1])
  return jnp.stack([gx * taps.dpx, gy * taps.dpy], axis=-1)


def _backward(rows, points, gout, hw_out: int, h: int, w: int, mode: str, padding_mode: str,
              align_corners: bool):
  """Cotangents of `_forward`: (d rows (N*H*W, C), d points (N*Ho*Wo, 2)).

  One pass over the points in steps: each step scatters weights[k] * gout
  into the corner rows (the transpose of the gather) and, for bilinear, dots
  gout with the same corners' values for the grid gradient. The taps are
  computed once up front: computed inside the loop, XLA would recompute them
  in every one of the step's dozen fusions.
  """
  m, c = gout.shape
  if m == 0:
    return jnp.zeros_like(rows), jnp.zeros((0, 2), gout.dtype)
  cpu_step = max(1, min(m, _BACKWARD_STEP_ELEMENTS // max(c, 1)))
  in_steps = lambda step, cpu: functools.partial(
      _backward_in_steps, hw_out=hw_out, h=h, w=w, mode=mode, padding_mode=padding_mode,
      align_corners=align_corners, step=step, cpu=cpu)
  return lax.platform_dependent(rows, points, gout, cpu=in_steps(cpu_step, True),
                                default=in_steps(m, False))


def _backward_in_steps(rows, points, gout, *, hw_out: int, h: int, w: int, mode: str,
                       padding_mode: str, align_corners: bool, step: int, cpu: bool):
  """`_backward`, walking the points `step` at a time.

  `cpu` picks the dot products' form: XLA:CPU is fastest with a batched
  matrix product over small cached blocks, other backends with multiply +
  reduce, which they fuse with the gathers.
  """
  m, c = gout.shape
  bilinear = mode == "bilinear"
  all_taps = _taps(points, hw_out, h, w, mode, padding_mode, align_corners)

  def add_points(carry, start, size):
    d_rows, d_points = carry
    g = lax.dynamic_slice_in_dim(gout, start, size)
    taps = jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, size), all_taps)
    for k in range(len(taps.rows)):
      d_rows = d_rows.at[taps.rows[k]].add(g * taps.weights[k][:, None],
                                           mode="promise_in_bounds")
    if bilinear:
      values = [rows.at[taps.rows[k]].get(mode="promise_in_bounds") for k in range(4)]
      if cpu and c > _SMALL_C:
        dots = list(jnp.einsum("pkc,pc->kp", jnp.stack(values, axis=1), g))
      elif cpu:
        # A few channels: a batched matrix product of (4, C) x (C,) blocks is
        # mostly overhead; unrolled multiply-adds are one loop per corner.
        dots = [sum(v[:, j] * g[:, j] for j in range(c)) for v in values]
      else:
        dots = [jnp.sum(v * g, axis=1) for v in values]
      dots = [jnp.where(inside, d, 0) for inside, d in zip(taps.inside, dots)]
      d_points = lax.dynamic_update_slice_in_dim(
          d_points, _grid_cotangent(dots, taps), start, axis=0)
    return d_rows, d_points

  carry = (jnp.zeros_like(rows), jnp.zeros((m, 2), gout.dtype))
  full_steps = m // step
  carry = lax.fori_loop(0, full_steps, lambda i, cr: add_points(cr, i * step, step), carry)
  if m % step:
    carry = add_points(carry, full_steps * step, m % step)
  return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _grid_sample(image, grid, mode, padding_mode, align_corners, native):
  """`native`: the CPU branch uses the native kernel (see `_use_native`)."""
  return _grid_sample_fwd(image, grid, mode, padding_mode, align_corners, native)[0]


def _flat(image, grid):
  n, h, w, c = image.shape
  _, ho, wo, _ = grid.shape
  return image.reshape(n * h * w, c), grid.reshape(n * ho * wo, 2), ho * wo, h, w


def _xla_forward(image, grid, mode, padding_mode, align_corners):
  rows, points, hw_out, h, w = _flat(image, grid)
  out = _forward(rows, points, hw_out, h, w, mode, padding_mode, align_corners)
  return out.reshape(grid.shape[:3] + image.shape[3:])


def _xla_backward(image, grid, gout, mode, padding_mode, align_corners):
  rows, points, hw_out, h, w = _flat(image, grid)
  d_rows, d_points = _backward(rows, points, gout.reshape(-1, image.shape[3]), hw_out, h, w,
                               mode, padding_mode, align_corners)
  return d_rows.reshape(image.shape), d_points.reshape(grid.shape)


def _use_native(image, grid) -> bool:
  """Whether the CPU branch takes the native kernel (hdtf_jax/native; decided at trace time).

  For every channel count, as measured with benchmarks/warp.py on 2 cores: at
  C=3 it runs 2-2.5x faster than the XLA path forward and 2.5-3x forward+
  backward (XLA's gathers load one scalar per element, its scatters run on
  one thread); at C=64 the forwards are on par (both near the copy floor)
  and forward+backward is 1.3-1.5x faster. Skipped where only accelerators
  run (the default backend is not the CPU), for empty arrays and beyond the
  kernel's 32-bit offsets.
  """
  from hdtf_jax import native
  _, h, w, c = image.shape
  fits = h * w * c < 2**31 and max(h, w) < 2**22  # the kernel's 32-bit offsets
  return (image.size > 0 and grid.size > 0 and fits and jax.default_backend() == "cpu"
          and native.grid_sample_available())


def _native_options(mode, padding_mode, align_corners):
  return dict(nearest=mode == "nearest", border=padding_mode == "border",
              align_corners=bool(align_corners))


def _native_dtype(dtype):
  """The kernel computes in float32 or float64; narrower floats round-trip through float32."""
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _native_forward(image, grid, mode, padding_mode, align_corners):
  from hdtf_jax.native import grid_sample as native_grid_sample
  dtype = _native_dtype(image.dtype)
  out = native_grid_sample.forward(image.astype(dtype), grid.astype(dtype),
                                   **_native_options(mode, padding_mode, align_corners))
  return out.astype(image.dtype)


def _native_backward(image, grid, gout, mode, padding_mode, align_corners):
  from hdtf_jax.native import grid_sample as native_grid_sample
  dtype = _native_dtype(image.dtype)
  d_image, d_grid = native_grid_sample.backward(
      image.astype(dtype), grid.astype(dtype), gout.astype(dtype),
      **_native_options(mode, padding_mode, align_corners))
  return d_image.astype(image.dtype), d_grid.astype(grid.dtype)


def _run(native: bool, xla_fn, native_fn, *args, **options):
  """xla_fn(*args, **options); with `native`, native_fn on CPU instead (accelerators keep
  the XLA path: the custom call exists only on CPU)."""
  xla = functools.partial(xla_fn, **options)
  if not native:
    return xla(*args)
  return lax.platform_dependent(*args, cpu=functools.partial(native_fn, **options), default=xla)


def _grid_sample_fwd(image, grid, mode, padding_mode, align_corners, native):
  out = _run(native, _xla_forward, _native_forward, image, grid, mode=mode,
             padding_mode=padding_mode, align_corners=align_corners)
  return out, (image, grid)


def _grid_sample_bwd(mode, padding_mode, align_corners, native, residuals, gout):
  image, grid = residuals
  return _run(native, _xla_backward, _native_backward, image, grid, gout, mode=mode,
              padding_mode=padding_mode, align_corners=align_corners)


_grid_sample.defvjp(_grid_sample_fwd, _grid_sample_bwd)


@functools.partial(jax.jit, static_argnames=("mode", "padding_mode", "align_corners"))
def grid_sample(image, grid, *, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = False):
  """Samples `image` (N, H, W, C) at `grid` (N, Ho, Wo, 2) -> (N, Ho, Wo, C).

  Same values and gradients as ``torch.nn.functional.grid_sample`` for the
  given mode ("bilinear" | "nearest"), padding_mode ("zeros" | "border") and
  align_corners (see the module docstring), but channels-last. Computed in
  the promoted floating dtype of `image` and `grid`.
  Differentiable with respect to both `image` and `grid` through a custom
  VJP. On CPU both passes run a native kernel (hdtf_jax/native: C++ built at
  first use, an XLA custom call split over XLA's threads; set
  HDTF_JAX_NATIVE_WARP=0 for the XLA path); accelerators run the XLA path,
  where the image gradient is a scatter walked in cache-sized steps and the
  grid gradient comes from the same four corners in the same pass.
  """
  _check_options(mode, padding_mode)
  _check_shapes(image, grid)
  dtype = jnp.result_type(image.dtype, grid.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  image, grid = image.astype(dtype), grid.astype(dtype)
  sample = lambda image, grid: _grid_sample(image, grid, mode, padding_mode, align_corners,
                                            _use_native(image, grid))
  if _explicit_spec(image) is not None or _explicit_spec(grid) is not None:
    return _per_shard(sample, image, grid)
  return sample(image, grid)


def identity_grid(height: int, width: int, *, align_corners: bool = False,
                  dtype=jnp.float32):
  """(height, width, 2) normalised (x, y) of every pixel centre: grid_sample's no-op grid."""
  xs = _normalize(jnp.arange(width, dtype=dtype), width, align_corners)
  ys = _normalize(jnp.arange(height, dtype=dtype), height, align_corners)
  gx, gy = jnp.meshgrid(xs, ys, indexing="xy")
  return jnp.stack([gx, gy], axis=-1).astype(dtype)


def _check_flow(flow, name: str, what: str = "flow"):
  if flow.ndim < 3 or flow.shape[-1] != 2:
    raise ValueError(f"{name}: {what} must be (..., H, W, 2) with (x, y) last, got {flow.shape}")


def flow_to_grid(flow, *, align_corners: bool = False):
  """Backward pixel flow (..., H, W, 2) -> normalised sampling grid for `grid_sample`.

  Pixel units are those of the flow's own H x W. With align_corners=False the
  grid may sample an image of any other size at the corresponding points.
  """
  _check_flow(flow, "flow_to_grid")
  h, w = flow.shape[-3:-1]
  dtype = flow.dtype if jnp.issubdtype(flow.dtype, jnp.floating) else jnp.float32
  pos_x = jnp.arange(w, dtype=dtype) + flow[..., 0].astype(dtype)
  pos_y = jnp.arange(h, dtype=dtype)[:, None] + flow[..., 1].astype(dtype)
  return jnp.stack([_normalize(pos_x, w, align_corners), _normalize(pos_y, h, align_corners)],
                   axis=-1)


def grid_to_flow(grid, *, align_corners: bool = False):
  """Inverse of `flow_to_grid`: normalised grid (..., H, W, 2) -> pixel flow (dx, dy)."""
  _check_flow(grid, "grid_to_flow", "grid")
  h, w = grid.shape[-3:-1]
  px = _unnormalize(grid[..., 0], w, align_corners)
  py = _unnormalize(grid[..., 1], h, align_corners)
  return jnp.stack([px - jnp.arange(w, dtype=grid.dtype),
                    py - jnp.arange(h, dtype=grid.dtype)[:, None]], axis=-1)


def warp(image, flow, *, mode: str = "bilinear", padding_mode: str = "zeros",
         align_corners: bool = False):
  """Warps `image` (N, H, W, C) by a backward pixel flow (N, Ho, Wo, 2): out[p] = image[p + flow[p]].

  The output has the flow's spatial size; flow pixels are in the flow's own
  resolution (see `flow_to_grid`).
  """
  grid = flow_to_grid(flow, align_corners=align_corners)
  return grid_sample(image, grid, mode=mode, padding_mode=padding_mode,
                     align_corners=align_corners)


def _as_batch(flow):
  """(..., H, W, 2) -> (N, H, W, 2) and a function restoring the leading dims."""
  lead = flow.shape[:-3]
  return flow.reshape((-1,) + flow.shape[-3:]), lambda x: x.reshape(lead + x.shape[1:])


def compose_flows(f_ab, f_bc, *, align_corners: bool = False):
  """Composes backward flows: warp(warp(a, f_ab), f_bc) ~= warp(a, compose_flows(f_ab, f_bc)).

  Order: `f_ab` is applied to the image first (it brings frame a to frame b),
  then `f_bc` (b to c). Since backward flows look up sources, the result is
  f_bc(q) + f_ab(q + f_bc(q)): f_ab is sampled where f_bc points, with border
  padding so that flows are extended, not zeroed, outside the frame.
  Both flows are (..., H, W, 2) of the same shape.
  """
  _check_flow(f_ab, "compose_flows")
  _check_flow(f_bc, "compose_flows")
  if f_ab.shape != f_bc.shape:
    raise ValueError(f"compose_flows: shapes differ: {f_ab.shape} vs {f_bc.shape}")
  (f_ab, _), (f_bc, restore) = _as_batch(f_ab), _as_batch(f_bc)
  return restore(f_bc + warp(f_ab, f_bc, padding_mode="border", align_corners=align_corners))


def resize_flow(flow, height: int, width: int, *, align_corners: bool = False):
  """Resizes a pixel flow (..., H, W, 2) to (..., height, width, 2), rescaling its values.

  Values are resampled bilinearly without antialiasing, exactly like
  ``torch.nn.functional.interpolate(mode="bilinear", align_corners=...)``
  (half-pixel centres by default); dx is scaled by width / W and dy by
  height / H ((size-1) ratios for align_corners=True), so the resized flow
  describes the same motion in the new pixel units.
  """
  _check_flow(flow, "resize_flow")
  if height < 1 or width < 1:
    raise ValueError(f"resize_flow: target size must be positive, got {height}x{width}")
  flow, restore = _as_batch(flow)
  n, h, w, _ = flow.shape
  grid = jnp.broadcast_to(identity_grid(height, width, align_corners=align_corners,
                                        dtype=flow.dtype), (n, height, width, 2))
  resized = grid_sample(flow, grid, padding_mode="border", align_corners=align_corners)
  if align_corners:
    sx = (width - 1) / (w - 1) if w > 1 else 1.0
    sy = (height - 1) / (h - 1) if h > 1 else 1.0
  else:
    sx, sy = width / w, height / h
  return restore(resized * jnp.asarray([sx, sy], dtype=resized.dtype))


def flow_to_color(flow, *, max_magnitude: float | None = None) -> np.ndarray:
  """Pixel flow (..., H, W, 2) -> uint8 RGB (..., H, W, 3) for viewing.

  Hue encodes direction (0 deg = +x, red; counter-clockwise in image terms
  through yellow, green, cyan, blue, magenta), saturation the magnitude
  relative to `max_magnitude` (default: the largest magnitude present, so the
  fastest pixel is fully saturated), value is 1: zero motion is white.
  """
  flow = np.asarray(flow, dtype=np.float64)
  if flow.ndim < 3 or flow.shape[-1] != 2:
    raise ValueError(f"flow_to_color: flow must be (..., H, W, 2), got {flow.shape}")
  dx, dy = flow[..., 0], flow[..., 1]
  magnitude = np.hypot(dx, dy)
  if max_magnitude is None:
    max_magnitude = float(magnitude.max()) if magnitude.size else 0.0
  saturation = np.clip(magnitude / max(max_magnitude, 1e-12), 0.0, 1.0)
  # Image y points down; negate it so the wheel turns the way a viewer expects.
  hue = (np.arctan2(-dy, dx) / (2 * np.pi)) % 1.0
  # HSV -> RGB with V = 1: each channel is 1 - S * clamp(distance to its hue sector).
  k = (np.stack([5.0, 3.0, 1.0], axis=-1) + hue[..., None] * 6) % 6
  ramp = np.clip(np.minimum(k, 4 - k), 0.0, 1.0)
  rgb = 1.0 - saturation[..., None] * ramp
  return np.round(rgb * 255).astype(np.uint8)
