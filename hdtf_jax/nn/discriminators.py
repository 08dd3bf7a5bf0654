"""Stage-1 parameter discriminators D_mou, D_ebro, D_hed (supplement Fig. 2).

One structure, used three times, on a parameter sequence concatenated with the audio features
(28 + 15 = 43 or 5 + 15 = 20 channels), NWC:

    conv k1 -> width, act, num_down x (conv k5 s2, act), num_mid x (conv k3, act), conv k1 -> out

Every stride-2 conv pads 2, so the output length is `T` halved `num_down` times, rounding up
(T=1000 -> 16). No normalisation layers, as in the figure.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from hdtf_jax.nn import blocks

Dtype = Any


def output_length(length: int, num_down: int, kernel_size: int = 5) -> int:
  """Time length after `num_down` stride-2 convs with `(k - 1) // 2` padding."""
  pad = (kernel_size - 1) // 2
  for _ in range(num_down):
    length = (length + 2 * pad - kernel_size) // 2 + 1
  return length


class ParameterDiscriminator(nn.Module):
  """`__call__(params (B, T, P), audio (B, T, A))` -> (logits (B, T', out_channels), features).

  `features` lists the activations after every hidden conv (for feature matching).
  """
  out_channels: int
  width: int = 256
  num_down: int = 6
  down_kernel_size: int = 5
  num_mid: int = 2
  mid_kernel_size: int = 3
  activation: str = "relu"
  negative_slope: float = 0.2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, params: jax.Array, audio: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    if params.ndim != 3 or audio.ndim != 3 or params.shape[:2] != audio.shape[:2]:
      raise ValueError("discriminator: params and audio must be (B, T, C) with the same B and T, "
                       f"got {params.shape} and {audio.shape}")
    act = blocks.activation(self.activation, self.negative_slope)
    h = jnp.concatenate([params, audio], axis=-1).astype(self.dtype)
    feats = []
    h = act(blocks.conv1d(self.width, 1, dtype=self.dtype, name="conv_in")(h))
    feats.append(h)
    for i in range(self.num_down):
      h = act(blocks.conv1d(self.width, self.down_kernel_size, stride=2, dtype=self.dtype,
                            name=f"down_{i}")(h))
      feats.append(h)
    for i in range(self.num_mid):
      h = act(blocks.conv1d(self.width, self.mid_kernel_size, dtype=self.dtype, name=f"mid_{i}")(h))
      feats.append(h)
    logits = blocks.conv1d(self.out_channels, 1, dtype=self.dtype, name="out")(h)
    return logits.astype(jnp.float32), feats


def parameter_discriminator(cfg: ml_collections.ConfigDict, param_dim: int,
                            name: str | None = None) -> ParameterDiscriminator:
  """One discriminator for a `param_dim`-channel sequence, from a stage-1 config."""
  d = cfg.discriminator
  out = param_dim if d.out_channels is None else d.out_channels
  return ParameterDiscriminator(out, d.width, d.num_down, d.down_kernel_size, d.num_mid,
                                d.mid_kernel_size, d.activation, d.negative_slope,
                                jnp.dtype(cfg.dtype), name=name)


def discriminators_from_config(cfg: ml_collections.ConfigDict) -> dict[str, ParameterDiscriminator]:
  """D_mou, D_ebro, D_hed keyed like G_ani's outputs: 'mouth', 'eyebrow', 'head'."""
  return {"mouth": parameter_discriminator(cfg, cfg.mouth_dim),
          "eyebrow": parameter_discriminator(cfg, cfg.eyebrow_dim),
          "head": parameter_discriminator(cfg, cfg.head_dim)}
