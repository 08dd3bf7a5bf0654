"""JAX-side wrappers of the native CPU grid_sample kernel (grid_sample.cc): forward and backward.

`forward` / `backward` take one NHWC batch (image (N, H, W, C), grid
(N, Ho, Wo, 2)) in float32 or float64 and call the FFI targets that
`hdtf_jax.native.grid_sample_available()` registers (call it first). They are
what `hdtf_jax.warp.grid_sample` runs on CPU; the formulas are warp.py's.

Two wrappers make the custom calls compose like ordinary XLA ops:
* `jax.experimental.custom_partitioning`: under jit with arrays sharded over
  the batch axis, each device samples its own images (an opaque custom call
  would otherwise be replicated: every device all-gathers the inputs and
  samples the whole batch). Other axes are gathered (they are only split in
  odd layouts, and sampling needs whole images).
* `jax.custom_batching.custom_vmap`: custom_partitioning has no batching
  rule; vmap instead folds its axis into the batch and calls the kernel once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

FORWARD_TARGET = "hdtf_grid_sample_fwd"
BACKWARD_TARGET = "hdtf_grid_sample_bwd"


def _attrs(options):
  nearest, border, align_corners = options
  return dict(nearest=np.int32(nearest), border=np.int32(border),
              align_corners=np.int32(align_corners))


def _ffi_forward(image, grid, options):
  return jax.ffi.ffi_call(
      FORWARD_TARGET, jax.ShapeDtypeStruct(grid.shape[:-1] + image.shape[-1:], image.dtype),
      vmap_method="broadcast_all")(image, grid, **_attrs(options))


def _ffi_backward(image, grid, gout, options):
  return tuple(jax.ffi.ffi_call(
      BACKWARD_TARGET,
      (jax.ShapeDtypeStruct(image.shape, image.dtype), jax.ShapeDtypeStruct(grid.shape, grid.dtype)),
      vmap_method="broadcast_all")(image, grid, gout, **_attrs(options)))


def _batch_sharding(mesh, sharding, ndim: int = 4):
  """The batch axis's sharding of `sharding` (if any), every other axis whole."""
  spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
  return NamedSharding(mesh, PartitionSpec(spec[0] if spec else None, *([None] * (ndim - 1))))


def _partitioned(ffi_fn, n_args: int, rule: str, multiple_results: bool):
  """ffi_fn(*arrays, options) as a custom_partitioning op sharded over the batch axis."""
  op = custom_partitioning(ffi_fn, static_argnums=(n_args,))

  def infer(options, mesh, arg_shapes, result_shape):
    sh = _batch_sharding(mesh, arg_shapes[0].sharding)
    return (sh, sh) if multiple_results else sh

  def partition(options, mesh, arg_shapes, result_shape):
    sh = _batch_sharding(mesh, arg_shapes[0].sharding)
    lower = lambda *arrays: ffi_fn(*arrays, options)
    return mesh, lower, ((sh, sh) if multiple_results else sh), (sh,) * n_args

  op.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                   need_replication_factors=("h", "w", "c", "i", "j", "t"))
  return op


_forward_op = _partitioned(_ffi_forward, 2, "b h w c, b i j t -> b i j c", False)
_backward_op = _partitioned(_ffi_backward, 3, "b h w c, b i j t, b i j c -> b h w c, b i j t",
                            True)


def _fold_vmap(fn):
  """`fn(*arrays)` on 4-D arrays -> a custom_vmap whose rule folds vmap's axis into the batch."""
  wrapped = custom_vmap(fn)

  @wrapped.def_vmap
  def rule(axis_size, in_batched, *arrays):
    arrays = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
              for a, b in zip(arrays, in_batched)]
    out = wrapped(*[a.reshape((-1,) + a.shape[2:]) for a in arrays])
    unfold = lambda o: o.reshape((axis_size, -1) + o.shape[1:])
    if isinstance(out, (tuple, list)):
      return tuple(unfold(o) for o in out), (True,) * len(out)
    return unfold(out), True

  return wrapped


@functools.lru_cache(maxsize=None)
def _ops(options):
  fwd = _fold_vmap(lambda image, grid: _forward_op(image, grid, options))
  bwd = _fold_vmap(lambda image, grid, gout: tuple(_backward_op(image, grid, gout, options)))
  return fwd, bwd


def forward(image, grid, *, nearest: bool, border: bool, align_corners: bool):
  """grid_sample forward: image (N, H, W, C), grid (N, Ho, Wo, 2) -> (N, Ho, Wo, C)."""
  return _ops((bool(nearest), bool(border), bool(align_corners)))[0](image, grid)


def backward(image, grid, gout, *, nearest: bool, border: bool, align_corners: bool):
  """grid_sample cotangents: (d image, d grid) for output cotangent `gout`."""
  return _ops((bool(nearest), bool(border), bool(align_corners)))[1](image, grid, gout)
