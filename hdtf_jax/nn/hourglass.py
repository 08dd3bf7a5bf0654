"""Stage-2 2D building blocks: switchable normalisation, residual blocks and two hourglasses.

G_vid predicts its masks with an hourglass at 1/4 resolution. Two kinds, picked by
`config.hourglass.kind`:

  * "unet": the encoder-decoder hourglass of the authors' released inference code (and of
    FOMM): `depth` x [conv3x3-norm-ReLU-avgpool2] down, `depth` x [upsample2-conv3x3-norm-ReLU]
    up, each up output concatenated with the skip of the same size. Widths
    min(max_width, width * 2**(i+1)); output channels `width + in_channels`.
  * "stacked": Newell et al.'s stacked hourglass (the paper's words): `num_stacks` recursive
    hourglasses of pre-activation bottleneck residual modules (max-pool down, nearest up, additive
    skips, `num_blocks` modules per step), joined by 1x1 convs; output channels `width`.

All blocks are NHWC Flax Linen modules taking `(x, train)`; `train` only matters for BatchNorm.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from hdtf_jax.nn.conv import Conv

Dtype = Any
NORMS = ("batch", "instance", "group", "none")
UPSAMPLE_METHODS = ("nearest", "bilinear")
HOURGLASS_KINDS = ("unet", "stacked")


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """Which normalisation follows each conv. Hashable, so it can sit on modules under nn.remat.

  kind: "batch" (running stats; apply with mutable=['batch_stats'] when training), "instance",
  "group" (gcd(groups, channels) groups) or "none". momentum follows flax (PyTorch's 0.1 = 0.9).
  """
  kind: str = "batch"
  groups: int = 32
  momentum: float = 0.9
  epsilon: float = 1e-5

  def __post_init__(self):
    if self.kind not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.kind!r}")

  def make(self, train: bool, dtype: Dtype, name: str | None = None) -> Callable[[jax.Array], jax.Array]:
    if self.kind == "batch":
      return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                          epsilon=self.epsilon, dtype=dtype, name=name)
    if self.kind == "instance":
      return nn.InstanceNorm(epsilon=self.epsilon, dtype=dtype, name=name)
    if self.kind == "group":
      return _GroupNorm(self.groups, self.epsilon, dtype, name=name)
    return lambda x: x


class _GroupNorm(nn.Module):
  """GroupNorm whose group count adapts to the channel count (gcd), so any width works."""
  groups: int
  epsilon: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    return nn.GroupNorm(num_groups=math.gcd(self.groups, x.shape[-1]), epsilon=self.epsilon,
                        dtype=self.dtype)(x)


def conv(features: int, kernel_size: int, stride: int = 1, dtype: Dtype = jnp.float32,
         name: str | None = None) -> nn.Conv:
  """Square conv with PyTorch-style symmetric padding (k // 2), float32 params (`conv.Conv`:
  nn.Conv's parameters, a weight gradient XLA:CPU runs fast)."""
  pad = kernel_size // 2
  return Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
              padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


def _bilinear2_axis(x: jax.Array, axis: int) -> jax.Array:
  """x2 linear upsampling along one axis with half-pixel centres and clamped edges:
  out[2i] = .75 x[i] + .25 x[i-1], out[2i+1] = .75 x[i] + .25 x[i+1]."""
  n = x.shape[axis]
  part = lambda a, b: jax.lax.slice_in_dim(x, a, b, axis=axis)
  prev = jnp.concatenate([part(0, 1), part(0, n - 1)], axis)
  nxt = jnp.concatenate([part(1, n), part(n - 1, n)], axis)
  out = jnp.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], axis + 1)
  shape = list(x.shape)
  shape[axis] *= 2
  return out.reshape(shape)


def upsample2(x: jax.Array, method: str) -> jax.Array:
  """x2 spatial upsampling; 'bilinear' uses half-pixel centres (PyTorch align_corners=False).

  Bilinear is written as two fixed 2-tap stencils (the same numbers as
  `jax.image.resize(..., "bilinear")`, which XLA runs ~4x slower on CPU: it was a quarter of
  G_vid's time at 512).
  """
  if method not in UPSAMPLE_METHODS:
    raise ValueError(f"upsample method must be one of {UPSAMPLE_METHODS}, got {method!r}")
  if method == "nearest":
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return _bilinear2_axis(_bilinear2_axis(x, 1), 2).astype(x.dtype)


def avg_pool2(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class ConvNormAct(nn.Module):
  """conv -> norm -> ReLU."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  norm: NormSpec = NormSpec()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = conv(self.features, self.kernel_size, self.stride, self.dtype, name="conv")(x)
    return nn.relu(self.norm.make(train, self.dtype, name="norm")(x))


class ResBlock(nn.Module):
  """Pre-activation residual block: x + conv(relu(norm(conv(relu(norm(x)))))), same width."""
  kernel_size: int = 3
  norm: NormSpec = NormSpec()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    h = nn.relu(self.norm.make(train, self.dtype, name="norm1")(x))
    h = conv(c, self.kernel_size, dtype=self.dtype, name="conv1")(h)
    h = nn.relu(self.norm.make(train, self.dtype, name="norm2")(h))
    h = conv(c, self.kernel_size, dtype=self.dtype, name="conv2")(h)
    return x + h


class Bottleneck(nn.Module):
  """Newell's residual module: pre-activation 1x1 (C/2) -> 3x3 (C/2) -> 1x1 (C), 1x1 skip if needed."""
  features: int
  norm: NormSpec = NormSpec()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    mid = max(self.features // 2, 1)
    h = nn.relu(self.norm.make(train, self.dtype, name="norm1")(x))
    h = conv(mid, 1, dtype=self.dtype, name="conv1")(h)
    h = nn.relu(self.norm.make(train, self.dtype, name="norm2")(h))
    h = conv(mid, 3, dtype=self.dtype, name="conv2")(h)
    h = nn.relu(self.norm.make(train, self.dtype, name="norm3")(h))
    h = conv(self.features, 1, dtype=self.dtype, name="conv3")(h)
    skip = x if x.shape[-1] == self.features else conv(self.features, 1, dtype=self.dtype,
                                                        name="skip")(x)
    return skip + h


class UNetHourglass(nn.Module):
  """Encoder-decoder with concatenated skips (the released G_vid code's hourglass)."""
  width: int = 64
  max_width: int = 512
  depth: int = 5
  upsample: str = "nearest"
  norm: NormSpec = NormSpec()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_divisible(x, self.depth, "UNetHourglass")
    widths = [min(self.max_width, self.width * 2 ** (i + 1)) for i in range(self.depth)]
    skips = [x]
    for i, w in enumerate(widths):
      h = ConvNormAct(w, 3, norm=self.norm, dtype=self.dtype, name=f"down_{i}")(skips[-1], train)
      skips.append(avg_pool2(h))
    h = skips.pop()
    for i in reversed(range(self.depth)):
      w = min(self.max_width, self.width * 2 ** i)
      h = ConvNormAct(w, 3, norm=self.norm, dtype=self.dtype, name=f"up_{i}")(
          upsample2(h, self.upsample), train)
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
    return h


class _NewellHourglass(nn.Module):
  """One recursive hourglass of `depth` levels at constant width."""
  features: int
  depth: int
  num_blocks: int
  norm: NormSpec
  dtype: Dtype

  def _blocks(self, x, train, prefix):
    for i in range(self.num_blocks):
      x = Bottleneck(self.features, self.norm, self.dtype, name=f"{prefix}_{i}")(x, train)
    return x

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    up = self._blocks(x, train, "skip")
    low = self._blocks(nn.max_pool(x, (2, 2), strides=(2, 2)), train, "down")
    if self.depth > 1:
      low = _NewellHourglass(self.features, self.depth - 1, self.num_blocks, self.norm, self.dtype,
                             name="inner")(low, train)
    else:
      low = self._blocks(low, train, "bottom")
    low = self._blocks(low, train, "up")
    return up + upsample2(low, "nearest")


class StackedHourglass(nn.Module):
  """Newell et al.: stem conv, then `num_stacks` hourglasses, each followed by residual modules
  and a 1x1 conv; intermediate stacks feed back through a 1x1 conv added to their input."""
  width: int = 128
  depth: int = 4
  num_stacks: int = 2
  num_blocks: int = 1
  norm: NormSpec = NormSpec()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_divisible(x, self.depth, "StackedHourglass")
    x = ConvNormAct(self.width, 7, norm=self.norm, dtype=self.dtype, name="stem")(x, train)
    for s in range(self.num_stacks):
      y = _NewellHourglass(self.width, self.depth, self.num_blocks, self.norm, self.dtype,
                           name=f"hourglass_{s}")(x, train)
      for i in range(self.num_blocks):
        y = Bottleneck(self.width, self.norm, self.dtype, name=f"stack_{s}_block_{i}")(y, train)
      y = ConvNormAct(self.width, 1, norm=self.norm, dtype=self.dtype, name=f"stack_{s}_out")(
          y, train)
      if s < self.num_stacks - 1:
        x = x + conv(self.width, 1, dtype=self.dtype, name=f"stack_{s}_merge")(y)
    return y


def _check_divisible(x: jax.Array, depth: int, what: str) -> None:
  h, w = x.shape[1:3]
  if depth < 1 or h % 2 ** depth or w % 2 ** depth:
    raise ValueError(f"{what}: input {h}x{w} must be divisible by 2**depth = {2 ** depth} "
                     f"(depth={depth} >= 1)")


def hourglass_out_channels(hg, in_channels: int) -> int:
  """Channels of the hourglass output for config `hg` and `in_channels` input channels."""
  return hg.width + in_channels if hg.kind == "unet" else hg.width


def make_hourglass(hg, norm: NormSpec, dtype: Dtype, remat: bool = False,
                   name: str = "hourglass") -> nn.Module:
  """Builds the hourglass named by `hg.kind` from a config (see module docstring)."""
  if hg.kind not in HOURGLASS_KINDS:
    raise ValueError(f"hourglass.kind must be one of {HOURGLASS_KINDS}, got {hg.kind!r}")
  if hg.kind == "unet":
    cls = nn.remat(UNetHourglass, static_argnums=(2,)) if remat else UNetHourglass
    return cls(width=hg.width, max_width=hg.max_width, depth=hg.depth, upsample=hg.upsample,
               norm=norm, dtype=dtype, name=name)
  cls = nn.remat(StackedHourglass, static_argnums=(2,)) if remat else StackedHourglass
  return cls(width=hg.width, depth=hg.depth, num_stacks=hg.num_stacks, num_blocks=hg.num_blocks,
             norm=norm, dtype=dtype, name=name)
