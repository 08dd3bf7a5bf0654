"""A drop-in `flax.linen.Conv` whose weight gradient runs fast on XLA:CPU.

XLA:CPU's convolution forward and input gradient use Eigen's fast path, but its weight gradient
(the "backward-filter" conv, with batch and features swapped in its dimension numbers) does not:
measured on G_vid's convs at 128 px it is 3-45x the forward, e.g. 80-150 ms for a 7x7 conv with
1 or 3 output channels at full resolution whose forward takes 2-4 ms. The same sum

    dW[t, ci, co] = sum over (n, output position p) of  x_padded[n, s * p + t, ci] g[n, p, co]

written as a *channels-last forward* conv goes to Eigen:

  * "batch_conv" (Cout <= 16): Cin as the batch, N as the features, g as a kernel dilated by the
    stride; 7x7 -> 3 at 128 px: ~10 ms instead of 80-150.
  * "columns" (2D, Cout >= 128, output >= 64 px): one 1D conv over the height per kernel
    column, with (N, W') as the features; 3x3 256 -> 256 at 64 px: ~120 ms instead of ~380.
  * otherwise XLA's own (no faster form measured). See `weight_grad_method`.

`conv_general_dilated` keeps `lax.conv_general_dilated`'s signature (it is what `nn.Conv` calls)
and picks per platform with `jax.lax.platform_dependent`: on CPU a custom-VJP conv whose forward
and input gradient are XLA's own and whose weight gradient is one of the forms above; on every
other platform XLA's native conv, untouched (GPU/TPU lowerings contain no trace of the CPU branch,
so they keep cuDNN's / the TPU's kernels). Cases the forms do not cover (dilation, feature groups,
negative padding, other layouts, explicit precision) always use the native conv.

The environment variable `HDTF_JAX_CONV=xla` (read when a function is traced) makes every
platform use XLA's native conv, for A/B timings or to rule this module out.

`Conv` is `nn.Conv` with that function: same name, same parameters and initialisers, so
parameter trees and checkpoints do not change.

Limitation: the CPU branch is a `custom_vjp`, so forward-mode differentiation (`jax.jvp`,
`jacfwd`) through the convs that take it is not supported; reverse mode (`grad`, `vjp`) is. Convs
whose shapes pick "native" are plain `lax.conv_general_dilated` calls.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _is_channels_last(dimension_numbers: Any, ndim: int) -> bool:
  """True for N...C inputs / ...IO kernels / N...C outputs (flax's layout), in any spelling."""
  if dimension_numbers is None:
    return False  # lax's default is NCHW / OIHW
  dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
  spatial = tuple(range(1, ndim - 1))
  return (dn.lhs_spec == (0, ndim - 1) + spatial and dn.out_spec == dn.lhs_spec
          and dn.rhs_spec == (ndim - 1, ndim - 2) + tuple(range(ndim - 2)))


def _grad_as_batch_conv(xp: jax.Array, g: jax.Array, strides: Sequence[int]) -> jax.Array:
  """dW with Cin as the batch, N as the features and g as a stride-dilated kernel.

  dW[t, ci, co] = sum_{n, p} xp[n, s * p + t, ci] g[n, p, co] is then one channels-last forward
  conv of (Cin, spatial..., N) by (out spatial..., N, Cout), which XLA:CPU gives to Eigen. Fast
  when Cout is small (Eigen's contraction is over positions; few outputs per position).
  """
  nd = xp.ndim - 2
  lhs = jnp.transpose(xp, (nd + 1, *range(1, nd + 1), 0))         # (Cin, spatial..., N)
  rhs = jnp.transpose(g, (*range(1, nd + 1), 0, nd + 1))           # (out spatial..., N, Cout)
  spec = "HWD"[:nd]
  dw = lax.conv_general_dilated(lhs, rhs, (1,) * nd, "VALID", rhs_dilation=tuple(strides),
                                dimension_numbers=(f"N{spec}C", f"{spec}IO", f"N{spec}C"),
                                preferred_element_type=jnp.float32)
  return jnp.transpose(dw, (*range(1, nd + 1), 0, nd + 1))         # (k..., Cin, Cout)


def _grad_by_columns(xp: jax.Array, g: jax.Array, kw: int, strides: Sequence[int]) -> jax.Array:
  """2D dW as `kw` 1D convs over the height, one per kernel column, with (N, W') as the features.

  For kernel column j, x's columns j, j + s, ... line up with g's: a 1D forward conv of
  (Cin, Hp, N*W') by (H', N*W', Cout) gives dW[:, j] (kh, Cin, Cout). The long feature axis
  (N*W') suits Eigen when Cout and the image are large.
  """
  n, ho, wo, co = g.shape
  ci, (sh, sw) = xp.shape[-1], strides
  rhs = jnp.transpose(g, (1, 0, 2, 3)).reshape(ho, n * wo, co)
  cols = []
  for j in range(kw):
    xs = lax.slice(xp, (0, 0, j, 0), (n, xp.shape[1], j + sw * (wo - 1) + 1, ci), (1, 1, sw, 1))
    lhs = jnp.transpose(xs, (3, 1, 0, 2)).reshape(ci, xp.shape[1], n * wo)
    cols.append(lax.conv_general_dilated(lhs, rhs, (1,), "VALID", rhs_dilation=(sh,),
                                         dimension_numbers=("NWC", "WIO", "NWC"),
                                         preferred_element_type=jnp.float32))
  return jnp.transpose(jnp.stack(cols), (2, 0, 1, 3))              # (kh, kw, Cin, Cout)


def weight_grad_method(x_shape: Sequence[int], kernel_shape: Sequence[int],
                       out_shape: Sequence[int]) -> str:
  """Which weight-gradient form runs fastest on XLA:CPU for these shapes ("native",
  "batch_conv" or "columns"), from per-conv timings of G_vid / D_vid at 128-512 px."""
  cout, spatial = kernel_shape[-1], out_shape[1:-1]
  if cout <= 16:
    return "batch_conv"   # e.g. 7x7 -> 3 at 128 px: 80-150 ms native, ~10 ms
  if len(spatial) == 2 and cout >= 128 and min(spatial) >= 64:
    return "columns"      # e.g. 3x3 256 -> 256 at 64 px: 380 ms native, 120 ms
  return "native"


def _weight_grad(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                 strides: Sequence[int], pads: Sequence[tuple[int, int]], dtype: Any,
                 method: str) -> jax.Array:
  """dL/dW of a channels-last conv by `method` (see `weight_grad_method`), accumulated in f32."""
  nd = x.ndim - 2
  k, out = kernel_shape[:nd], g.shape[1:-1]
  # Pad, then keep exactly the rows the conv reads (stride > 1 can leave a tail unused).
  xp = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  xp = xp[(slice(None), *(slice(0, kk + s * (o - 1)) for kk, s, o in zip(k, strides, out)))]
  if method == "columns":
    return _grad_by_columns(xp, g, k[1], strides).astype(dtype)
  return _grad_as_batch_conv(xp, g, strides).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_conv(x, w, strides, pads, dimension_numbers):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=dimension_numbers)


def _cpu_conv_fwd(x, w, strides, pads, dimension_numbers):
  return _cpu_conv(x, w, strides, pads, dimension_numbers), (x, w)


def _cpu_conv_bwd(strides, pads, dimension_numbers, res, g):
  x, w = res
  native = lambda x_, w_: lax.conv_general_dilated(x_, w_, strides, pads,
                                                    dimension_numbers=dimension_numbers)
  method = weight_grad_method(x.shape, w.shape, g.shape)
  # Input gradient: XLA's own transpose (a forward conv, which XLA:CPU runs fast).
  dx, = jax.vjp(lambda x_: native(x_, w), x)[1](g)
  return dx, _weight_grad(x, g, w.shape, strides, pads, w.dtype, method)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with the fast CPU weight gradient (module docstring)."""
  native = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  nd = lhs.ndim - 2
  simple = (all(d in (None, 1) for d in (lhs_dilation or (1,)))
            and all(d in (None, 1) for d in (rhs_dilation or (1,)))
            and feature_group_count == 1 and batch_group_count == 1
            and precision is None and preferred_element_type is None
            and lhs.dtype == rhs.dtype and _is_channels_last(dimension_numbers, lhs.ndim)
            and os.environ.get("HDTF_JAX_CONV", "auto") != "xla")
  if not simple:
    return native(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    pads = tuple(lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:nd], strides, padding))
  else:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  out_shape = (lhs.shape[0], *((n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(
      lhs.shape[1:-1], pads, rhs.shape[:nd], strides)), rhs.shape[-1])
  if (any(lo < 0 or hi < 0 for lo, hi in pads) or min(out_shape) < 1
      or weight_grad_method(lhs.shape, rhs.shape, out_shape) == "native"):
    return native(lhs, rhs)  # no custom VJP where it would not pay
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return lax.platform_dependent(
      lhs, rhs, cpu=lambda x, w: _cpu_conv(x, w, strides, pads, dn),
      default=lambda x, w: native(x, w))


class Conv(nn.Conv):
  """`nn.Conv` computing with `conv_general_dilated` above; parameters identical to nn.Conv's."""
  conv_general_dilated: Any = conv_general_dilated
