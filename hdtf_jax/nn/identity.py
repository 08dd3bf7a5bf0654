"""Identity (speaking-style) encoders for G_ani: what the AdaIN style MLP is conditioned on.

The paper feeds a pretrained VGG-Face embedding (512-d) of the reference frame. VGG-Face weights
cannot ship with this project, so the config switch `identity.kind` picks one of:

- `image` (default): a small trainable conv encoder on the reference face crop
  `(B, S, S, 3)`, values in [0, 1] (uint8 is rescaled), `S = identity.image_size`.
- `shape`: the reference's 3DMM shape vector `(B, identity.shape_dim)` through an MLP.
- `embedding`: a precomputed embedding `(B, identity.embed_dim)` (e.g. VGG-Face computed by the
  user), passed through unchanged.

Every kind returns `(B, identity.embed_dim)` float32.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from hdtf_jax.nn.blocks import conv2d

Dtype = Any
KINDS = ("image", "shape", "embedding")


class ImageIdentityEncoder(nn.Module):
  """Stride-2 conv + ReLU per width, global average pool, Dense -> embed_dim."""
  image_size: int = 128
  widths: Sequence[int] = (32, 64, 128, 256, 256)
  kernel_size: int = 3
  embed_dim: int = 512
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    s = self.image_size
    if image.ndim != 4 or image.shape[1:] != (s, s, 3):
      raise ValueError(f"identity image: expected shape (B, {s}, {s}, 3), got {image.shape}")
    if image.dtype == jnp.uint8:
      image = image.astype(jnp.float32) / 255.0
    h = image.astype(self.dtype)
    for i, w in enumerate(self.widths):
      h = nn.relu(conv2d(w, self.kernel_size, stride=2, dtype=self.dtype, name=f"conv{i}")(h))
    h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.embed_dim, dtype=self.dtype, name="out")(h).astype(jnp.float32)


class ShapeIdentityEncoder(nn.Module):
  """MLP on the 3DMM shape vector: (Dense-ReLU) per hidden width, then Dense -> embed_dim."""
  shape_dim: int = 60
  hidden: Sequence[int] = (256,)
  embed_dim: int = 512
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, shape: jax.Array) -> jax.Array:
    if shape.ndim != 2 or shape.shape[1] != self.shape_dim:
      raise ValueError(f"identity shape vector: expected (B, {self.shape_dim}), got {shape.shape}")
    h = shape.astype(self.dtype)
    for i, w in enumerate(self.hidden):
      h = nn.relu(nn.Dense(w, dtype=self.dtype, name=f"fc{i}")(h))
    return nn.Dense(self.embed_dim, dtype=self.dtype, name="out")(h).astype(jnp.float32)


class PrecomputedEmbedding(nn.Module):
  """A user-supplied embedding, checked and passed through (no parameters)."""
  embed_dim: int = 512

  def __call__(self, embedding: jax.Array) -> jax.Array:
    if embedding.ndim != 2 or embedding.shape[1] != self.embed_dim:
      raise ValueError(f"identity embedding: expected (B, {self.embed_dim}), got {embedding.shape}")
    return embedding.astype(jnp.float32)


def identity_encoder(cfg, dtype: Dtype = jnp.float32, name: str = "identity") -> nn.Module:
  """The encoder that `cfg.kind` names (`cfg` is the `identity` sub-config)."""
  if cfg.kind == "image":
    return ImageIdentityEncoder(cfg.image_size, tuple(cfg.image_widths), cfg.image_kernel_size,
                                cfg.embed_dim, dtype, name=name)
  if cfg.kind == "shape":
    return ShapeIdentityEncoder(cfg.shape_dim, tuple(cfg.shape_hidden), cfg.embed_dim, dtype,
                                name=name)
  if cfg.kind == "embedding":
    return PrecomputedEmbedding(cfg.embed_dim, name=name)
  raise ValueError(f"identity.kind must be one of {KINDS}, got {cfg.kind!r}")


def identity_input_shape(cfg, batch: int) -> tuple[int, ...]:
  """Shape of the identity input that `cfg.kind` expects, for a batch of `batch`."""
  if cfg.kind == "image":
    return (batch, cfg.image_size, cfg.image_size, 3)
  if cfg.kind == "shape":
    return (batch, cfg.shape_dim)
  if cfg.kind == "embedding":
    return (batch, cfg.embed_dim)
  raise ValueError(f"identity.kind must be one of {KINDS}, got {cfg.kind!r}")


def dummy_identity(cfg, batch: int) -> np.ndarray:
  """Zeros of the right shape and dtype, for `init`."""
  return np.zeros(identity_input_shape(cfg, batch), np.float32)
