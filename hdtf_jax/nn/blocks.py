"""Shared network building blocks: 1D residual blocks, AdaIN, the AdaIN style MLP, 2D residual blocks.

Layout is channels-last everywhere: 1D tensors are NWC `(batch, time, channels)`, 2D tensors are
NHWC. Convolutions (`conv.Conv`: nn.Conv with a weight gradient XLA:CPU runs fast) pad
`(k - 1) // 2` on both sides (odd kernels only), as the supplement's figures state, so a stride-1
conv keeps the length and a stride-2 conv gives `ceil(T / 2)`.

BatchNorm follows `train`: batch statistics (and `batch_stats` updates, so apply with
`mutable=['batch_stats']`) when training, running averages otherwise. No `axis_name` is used: under
`jit` with sharded inputs the statistics are already over the global batch. Flax's `momentum` is the
weight of the *old* running value, so the PyTorch default (0.1) is `momentum=0.9` here.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from hdtf_jax.nn.conv import Conv

Dtype = Any


def _check_odd(kernel_size: int, what: str) -> None:
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"{what}: kernel size must be a positive odd number, got {kernel_size}")


def conv1d(features: int, kernel_size: int, stride: int = 1, dtype: Dtype = jnp.float32,
           name: str | None = None) -> nn.Conv:
  """Conv1D on NWC input with symmetric `(k - 1) // 2` padding."""
  _check_odd(kernel_size, "conv1d")
  pad = (kernel_size - 1) // 2
  return Conv(features, (kernel_size,), strides=(stride,), padding=[(pad, pad)], dtype=dtype,
              name=name)


def conv2d(features: int, kernel_size: int, stride: int = 1, dtype: Dtype = jnp.float32,
           name: str | None = None) -> nn.Conv:
  """Conv2D on NHWC input with symmetric `(k - 1) // 2` padding."""
  _check_odd(kernel_size, "conv2d")
  pad = (kernel_size - 1) // 2
  return Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
              padding=[(pad, pad), (pad, pad)], dtype=dtype, name=name)


def batch_norm(train: bool, momentum: float, epsilon: float, dtype: Dtype,
               name: str | None = None) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                      dtype=dtype, name=name)


def activation(name: str, negative_slope: float = 0.2) -> Callable[[jax.Array], jax.Array]:
  """`relu` or `leaky_relu` (with `negative_slope`)."""
  if name == "relu":
    return nn.relu
  if name == "leaky_relu":
    return lambda x: nn.leaky_relu(x, negative_slope)
  raise ValueError(f"unknown activation {name!r}: expected 'relu' or 'leaky_relu'")


def upsample_linear_1d(x: jax.Array, factor: int = 2) -> jax.Array:
  """Linear interpolation along time by an integer factor (NWC).

  Half-pixel sample centres with the ends held, i.e. PyTorch's
  `Upsample(mode='linear', align_corners=False)`.
  """
  b, t, c = x.shape
  return jax.image.resize(x, (b, t * factor, c), method="linear").astype(x.dtype)


def adain(x: jax.Array, mean: jax.Array, std: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Adaptive instance norm over time: `(x - mean_t(x)) / sqrt(var_t(x) + eps) * std + mean`.

  x: (B, T, C); mean, std: (B, C) style statistics. Statistics are per sample and channel, over
  the time axis, computed in float32 (biased variance).
  """
  xf = x.astype(jnp.float32)
  mu = jnp.mean(xf, axis=1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mu), axis=1, keepdims=True)
  y = (xf - mu) * jax.lax.rsqrt(var + eps)
  y = y * std[:, None, :].astype(jnp.float32) + mean[:, None, :].astype(jnp.float32)
  return y.astype(x.dtype)


class Res1DBlock(nn.Module):
  """Residual 1D block: `x + conv(relu(bn(conv(x))))` (supplement Fig. 1a; Fig. 1b without BN).

  With the second conv's kernel and bias at zero the block is exactly the identity map. When the
  input width differs from `features`, the shortcut is a k1 conv instead of the identity.
  """
  features: int
  kernel_size: int = 5
  use_bn: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = conv1d(self.features, self.kernel_size, dtype=self.dtype, name="conv1")(x)
    if self.use_bn:
      h = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype, name="bn")(h)
    h = nn.relu(h)
    h = conv1d(self.features, self.kernel_size, dtype=self.dtype, name="conv2")(h)
    skip = x
    if x.shape[-1] != self.features:
      skip = conv1d(self.features, 1, dtype=self.dtype, name="skip")(x)
    return skip + h


class Res1DDown(nn.Module):
  """Halves the time axis: `conv_k1_s2(x) + relu(bn(conv_k_s2(x)))` (supplement Fig. 1d).

  The figure labels the shortcut's stride 0; it must be 2 for the sum to be defined.
  """
  features: int
  kernel_size: int = 3
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = conv1d(self.features, self.kernel_size, stride=2, dtype=self.dtype, name="conv")(x)
    h = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype, name="bn")(h)
    h = nn.relu(h)
    skip = conv1d(self.features, 1, stride=2, dtype=self.dtype, name="skip")(x)
    return skip + h


class Res1DUp(nn.Module):
  """Doubles the time axis: `up(x) + relu(bn(conv_k(up(x))))`, `up` = linear x2 (Fig. 1e).

  The shortcut is the upsampled input itself (a k1 conv only when widths differ).
  """
  features: int
  kernel_size: int = 3
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    up = upsample_linear_1d(x, 2)
    h = conv1d(self.features, self.kernel_size, dtype=self.dtype, name="conv")(up)
    h = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype, name="bn")(h)
    h = nn.relu(h)
    skip = up
    if x.shape[-1] != self.features:
      skip = conv1d(self.features, 1, dtype=self.dtype, name="skip")(up)
    return skip + h


class AdaINStyle(nn.Module):
  """AdaIN MLP (supplement Fig. 1c): trunk FC-ReLU-FC-ReLU, then FC heads for mean and std.

  Returns `(trunk, mean, std)`; the trunk output feeds the next style block (the figure chains
  them: in 512 -> 256 -> 256). `std = softplus(fc(trunk)) + std_floor` keeps the scale positive
  with a gradient everywhere (exp would be positive too, but grows without bound).
  """
  hidden: int = 256
  features: int = 256
  std_floor: float = 1e-4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(z))
    h = nn.relu(nn.Dense(self.features, dtype=self.dtype, name="fc2")(h))
    mean = nn.Dense(self.features, dtype=self.dtype, name="mean")(h)
    std = nn.softplus(nn.Dense(self.features, dtype=self.dtype, name="std")(h).astype(jnp.float32))
    return h, mean.astype(jnp.float32), std + self.std_floor


class ResBlock2D(nn.Module):
  """Pre-activation 2D residual block: `x + conv(act(norm(conv(act(norm(x))))))` (NHWC).

  `use_bn=False` drops the norms. With the second conv's kernel and bias at zero the block is the
  identity map; when widths differ the shortcut is a 1x1 conv.
  """
  features: int
  kernel_size: int = 3
  use_bn: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = x
    if self.use_bn:
      h = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype, name="bn1")(h)
    h = conv2d(self.features, self.kernel_size, dtype=self.dtype, name="conv1")(nn.relu(h))
    if self.use_bn:
      h = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype, name="bn2")(h)
    h = conv2d(self.features, self.kernel_size, dtype=self.dtype, name="conv2")(nn.relu(h))
    skip = x
    if x.shape[-1] != self.features:
      skip = conv2d(self.features, 1, dtype=self.dtype, name="skip")(x)
    return skip + h
