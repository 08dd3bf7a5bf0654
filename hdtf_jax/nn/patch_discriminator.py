"""D_vid: the First-Order-Motion-Model patch discriminator (paper §4: one scale).

Per down block i: conv k x k (no padding by default, as FOMM) -> InstanceNorm (all blocks but the
first) -> LeakyReLU(0.2) -> 2x2 average pool (all blocks but the last). A final 1x1 conv gives one
logit per patch. With VALID padding a side of n pixels becomes (n - k + 1) // 2 after a pooled
block and n - k + 1 after the last one (see `output_size`).

`num_scales > 1` adds discriminators (own params) on an image pyramid (2x2 area averages).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from hdtf_jax.nn.conv import Conv

Dtype = Any
PADDINGS = ("VALID", "SAME")


def output_size(size: int, num_blocks: int, kernel_size: int = 4, padding: str = "VALID") -> int:
  """Side of the logit map for an input side `size` (one scale)."""
  for i in range(num_blocks):
    if padding == "VALID":
      size = size - kernel_size + 1
    if i < num_blocks - 1:
      size //= 2
  return size


class _DownBlock(nn.Module):
  features: int
  kernel_size: int
  padding: str
  norm: bool
  pool: bool
  negative_slope: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    x = Conv(self.features, (k, k), padding=self.padding, dtype=self.dtype, name="conv")(x)
    if self.norm:
      x = nn.InstanceNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)
    x = nn.leaky_relu(x, self.negative_slope)
    if self.pool:
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    return x


class _SingleScale(nn.Module):
  widths: Sequence[int]
  kernel_size: int
  padding: str
  negative_slope: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    features = []
    last = len(self.widths) - 1
    for i, w in enumerate(self.widths):
      x = _DownBlock(w, self.kernel_size, self.padding, norm=i > 0, pool=i < last,
                     negative_slope=self.negative_slope, dtype=self.dtype, name=f"down_{i}")(x)
      features.append(x.astype(jnp.float32))
    logits = Conv(1, (1, 1), dtype=self.dtype, name="out")(x)
    return logits.astype(jnp.float32), features


class PatchDiscriminator(nn.Module):
  """`__call__(images (B, H, W, C))` -> (logits, features), float32.

  num_scales == 1: logits (B, h, w, 1) and features, the list of every down block's output.
  num_scales > 1: logits is a list (finest scale first) and features one flat list over all
  scales, finest first, so feature matching can treat it like the one-scale list and the GAN loss
  can map over `jax.tree.leaves(logits)`.
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  kernel_size: int = 4
  padding: str = "VALID"
  negative_slope: float = 0.2
  num_scales: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array):
    if images.ndim != 4:
      raise ValueError(f"PatchDiscriminator expects NHWC images, got shape {images.shape}")
    if self.padding not in PADDINGS:
      raise ValueError(f"PatchDiscriminator: padding must be one of {PADDINGS}, got {self.padding!r}")
    if self.num_scales < 1 or not self.widths:
      raise ValueError("PatchDiscriminator needs num_scales >= 1 and at least one width")
    smallest = min(images.shape[1:3]) // 2 ** (self.num_scales - 1)
    if output_size(smallest, len(self.widths), self.kernel_size, self.padding) < 1:
      raise ValueError(f"PatchDiscriminator: images {images.shape[1]}x{images.shape[2]} are too "
                       f"small for {len(self.widths)} blocks and {self.num_scales} scales")
    all_logits, all_features = [], []
    x = images.astype(self.dtype)
    for s in range(self.num_scales):
      if s:
        n, h, w, c = x.shape
        x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
      logits, features = _SingleScale(self.widths, self.kernel_size, self.padding,
                                      self.negative_slope, self.dtype, name=f"scale_{s}")(x)
      all_logits.append(logits)
      all_features.extend(features)
    if self.num_scales == 1:
      return all_logits[0], all_features
    return all_logits, all_features


def patch_discriminator(cfg: ml_collections.ConfigDict) -> PatchDiscriminator:
  """D_vid from a stage-2 config (`hdtf_jax.nn.video.paper_config().discriminator` and `dtype`)."""
  d = cfg.discriminator
  return PatchDiscriminator(widths=tuple(d.widths), kernel_size=d.kernel_size, padding=d.padding,
                            negative_slope=d.negative_slope, num_scales=d.num_scales,
                            dtype=jnp.dtype(cfg.dtype))
