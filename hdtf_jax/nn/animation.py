"""G_ani, the style-specific audio-to-animation generator (paper §3, supplement Fig. 1).

    audio (B, T, 15) --conv k1--> N x Res1D(BN) --> [Res1D -> AdaIN(style_i)] x 3 = f_audio_ref
    identity --encoder--> 512-d --AdaIN MLP chain--> (mean_i, std_i) per AdaIN
    f_audio_ref --> M x Res1D(BN) --> conv k1 --> mouth (B, T, 28)
    f_audio_ref --pad--> L x Res1DDown --> L x Res1DUp --crop--> conv k1 heads --> eyebrow, head (5, 5)

Only the long-time temporal decoder needs `T` divisible by `2**num_levels`; it pads the time axis
at the end (`generator.pad_mode`: 'reflect' mirrors the last frames so the padded tail keeps
plausible motion; 'edge' holds the last frame) and crops back, so any `T >= 1` works. The AdaIN
statistics and the mouth branch never see padded frames.

All sizes come from the config (`paper_config`, `demo_config`, `tiny_config`), which also holds the
discriminator settings (see `hdtf_jax.nn.discriminators`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np

from hdtf_jax.nn import blocks
from hdtf_jax.nn import identity as identity_lib

PAD_MODES = ("reflect", "edge")


# ----------------------------------------------------------------------------------------- presets

def paper_config() -> ml_collections.ConfigDict:
  """Stage-1 networks at the paper's sizes (supplement Fig. 1-2)."""
  c = ml_collections.ConfigDict()
  c.audio_dim = 15            # 13 MFCC + 2 pitch per frame
  c.mouth_dim = 28
  c.eyebrow_dim = 5
  c.head_dim = 5
  c.dtype = "float32"         # compute dtype; params and outputs stay float32
  c.bn_momentum = 0.9         # flax convention: weight of the old running value (PyTorch 0.1)
  c.bn_epsilon = 1e-5
  c.generator = ml_collections.ConfigDict(dict(
      width=256, kernel_size=5,
      num_audio_blocks=18,    # Res1D(BN) blocks of the audio feature extractor
      num_style_blocks=3,     # Res1D blocks each followed by AdaIN
      num_mouth_blocks=8,
      num_levels=4,           # down blocks = up blocks of the long-time decoder
      temporal_kernel_size=3,
      pad_mode="reflect"))
  c.style = ml_collections.ConfigDict(dict(
      hidden=256,             # AdaIN MLP trunk: in -> hidden -> generator.width
      adain_eps=1e-5,         # added to the instance variance over time
      std_floor=1e-4))        # std = softplus(.) + std_floor
  c.identity = ml_collections.ConfigDict(dict(
      kind="image", embed_dim=512,
      image_size=128, image_widths=(32, 64, 128, 256, 256), image_kernel_size=3,
      shape_dim=60, shape_hidden=(256,)))
  c.discriminator = ml_collections.ConfigDict(dict(
      width=256, num_down=6, down_kernel_size=5, num_mid=2, mid_kernel_size=3,
      # None: as many output channels as the judged parameters (28 or 5), as in the supplement.
      out_channels=ml_collections.config_dict.placeholder(int),
      activation="relu", negative_slope=0.2))
  return c


def demo_config() -> ml_collections.ConfigDict:
  """Small enough to learn something on a laptop CPU in minutes (widths 64, few blocks)."""
  c = paper_config()
  c.generator.update(width=64, num_audio_blocks=3, num_style_blocks=3, num_mouth_blocks=2)
  c.style.hidden = 64
  c.identity.update(embed_dim=128, image_size=64, image_widths=(16, 32, 64, 64), shape_hidden=(128,))
  c.discriminator.update(width=64, num_mid=1)
  return c


def tiny_config() -> ml_collections.ConfigDict:
  """Widths 16-32, 1-2 blocks per stage: for tests and 2-core smoke runs."""
  c = paper_config()
  c.generator.update(width=16, num_audio_blocks=2, num_style_blocks=2, num_mouth_blocks=1)
  c.style.hidden = 32
  c.identity.update(embed_dim=32, image_size=32, image_widths=(8, 16), shape_hidden=(32,))
  c.discriminator.update(width=16, num_mid=1)
  return c


# ------------------------------------------------------------------------------------------ helpers

def pad_to_multiple(x: jax.Array, multiple: int, axis: int = 1, mode: str = "reflect") -> jax.Array:
  """Pads `axis` at the end up to the next multiple of `multiple` ('reflect' or 'edge')."""
  if multiple < 1:
    raise ValueError(f"pad_to_multiple: multiple must be >= 1, got {multiple}")
  if mode not in PAD_MODES:
    raise ValueError(f"pad_to_multiple: mode must be one of {PAD_MODES}, got {mode!r}")
  n = x.shape[axis]
  extra = -n % multiple
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  if mode == "reflect" and n == 1:
    mode = "edge"  # nothing to mirror
  return jnp.pad(x, widths, mode=mode)


def dummy_inputs(cfg: ml_collections.ConfigDict, batch: int = 1,
                 length: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Zero `(audio, identity)` of the shapes the config expects, for `init`."""
  audio = np.zeros((batch, length, cfg.audio_dim), np.float32)
  return audio, identity_lib.dummy_identity(cfg.identity, batch)


def _bn_kwargs(cfg) -> dict:
  return dict(bn_momentum=cfg.bn_momentum, bn_epsilon=cfg.bn_epsilon, dtype=jnp.dtype(cfg.dtype))


# ------------------------------------------------------------------------------------------ modules

class StyleEncoder(nn.Module):
  """Identity input -> embedding -> chained AdaIN MLPs -> one (mean, std) per AdaIN, each (B, C)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, identity: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    z = identity_lib.identity_encoder(cfg.identity, dtype, name="identity")(identity)
    styles = []
    for i in range(cfg.generator.num_style_blocks):
      z, mean, std = blocks.AdaINStyle(cfg.style.hidden, cfg.generator.width, cfg.style.std_floor,
                                       dtype, name=f"adain_mlp_{i}")(z)
      styles.append((mean, std))
    return styles


class AudioEncoder(nn.Module):
  """Audio features (B, T, audio_dim) + styles -> f_audio_ref (B, T, width)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, audio: jax.Array, styles, train: bool = False) -> jax.Array:
    cfg, g = self.config, self.config.generator
    h = blocks.conv1d(g.width, 1, dtype=jnp.dtype(cfg.dtype), name="conv_in")(audio)
    for i in range(g.num_audio_blocks):
      h = blocks.Res1DBlock(g.width, g.kernel_size, True, **_bn_kwargs(cfg),
                            name=f"block_{i}")(h, train)
    for i, (mean, std) in enumerate(styles):
      # Fig. 1f: these blocks carry no BatchNorm; AdaIN normalises right after them.
      h = blocks.Res1DBlock(g.width, g.kernel_size, False, **_bn_kwargs(cfg),
                            name=f"style_block_{i}")(h, train)
      h = blocks.adain(h, mean, std, cfg.style.adain_eps)
    return h


class MouthDecoder(nn.Module):
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
    cfg, g = self.config, self.config.generator
    for i in range(g.num_mouth_blocks):
      h = blocks.Res1DBlock(g.width, g.kernel_size, True, **_bn_kwargs(cfg),
                            name=f"block_{i}")(h, train)
    return blocks.conv1d(cfg.mouth_dim, 1, dtype=jnp.dtype(cfg.dtype), name="out")(h)


class LongTimeDecoder(nn.Module):
  """Down/up temporal decoder with eyebrow and head-pose heads; pads and crops time internally."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, h: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    cfg, g = self.config, self.config.generator
    dtype = jnp.dtype(cfg.dtype)
    t = h.shape[1]
    h = pad_to_multiple(h, 2 ** g.num_levels, axis=1, mode=g.pad_mode)
    for i in range(g.num_levels):
      h = blocks.Res1DDown(g.width, g.temporal_kernel_size, **_bn_kwargs(cfg), name=f"down_{i}")(
          h, train)
    for i in range(g.num_levels):
      h = blocks.Res1DUp(g.width, g.temporal_kernel_size, **_bn_kwargs(cfg), name=f"up_{i}")(
          h, train)
    h = h[:, :t]
    eyebrow = blocks.conv1d(cfg.eyebrow_dim, 1, dtype=dtype, name="eyebrow_out")(h)
    head = blocks.conv1d(cfg.head_dim, 1, dtype=dtype, name="head_out")(h)
    return eyebrow, head


class AnimationGenerator(nn.Module):
  """G_ani. `__call__(audio (B, T, audio_dim), identity, train=False)` ->
  dict(mouth (B, T, 28), eyebrow (B, T, 5), head (B, T, 5)), float32.

  `identity` is what `config.identity.kind` names (see `hdtf_jax.nn.identity`). With `train=True`
  apply with `mutable=['batch_stats']`.
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, audio: jax.Array, identity: jax.Array,
               train: bool = False) -> dict[str, jax.Array]:
    cfg = self.config
    if audio.ndim != 3 or audio.shape[-1] != cfg.audio_dim or audio.shape[1] < 1:
      raise ValueError(f"G_ani audio: expected (B, T>=1, {cfg.audio_dim}), got {audio.shape}")
    if identity.shape[0] != audio.shape[0]:
      raise ValueError(f"G_ani: identity batch {identity.shape[0]} != audio batch {audio.shape[0]}")
    dtype = jnp.dtype(cfg.dtype)
    styles = StyleEncoder(cfg, name="style_encoder")(identity)
    feats = AudioEncoder(cfg, name="audio_encoder")(audio.astype(dtype), styles, train)
    mouth = MouthDecoder(cfg, name="mouth_decoder")(feats, train)
    eyebrow, head = LongTimeDecoder(cfg, name="temporal_decoder")(feats, train)
    return {"mouth": mouth.astype(jnp.float32), "eyebrow": eyebrow.astype(jnp.float32),
            "head": head.astype(jnp.float32)}
