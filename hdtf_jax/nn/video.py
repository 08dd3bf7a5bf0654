"""G_vid, the flow-guided video generator (paper §4, supplement Fig. 5, the released inference code).

    reference (B, H, W, 3) --encoder--> f_ref (B, h, w, C)          h, w = H / s, W / s
    [ref_s, F_app - identity, warp(ref_s, F_app)] --hourglass--> M_f, M_m (sigmoid), g (C channels)
    F     = F_app * M_f + identity * (1 - M_f)
    f_hat = warp(f_ref, F) * M_m + g * (1 - M_m)
    f_hat --residual blocks--> --(upsample x2, conv) per encoder stage--> conv -> sigmoid -> image

`s = 2 ** (len(encoder_widths) - 1)` (4 with the published widths 64, 128, 256); `ref_s` is the
reference area-averaged to h x w.

Flow convention: F_app and F are grid_sample *grids* (B, h, w, 2) of normalised (x, y) in [-1, 1]
with align_corners=False (`hdtf_jax.warp`), so a grid means the same picture points at every
resolution. The hourglass is fed the *offsets* F_app - identity rather than the absolute grid: zero
means "no motion" everywhere, which keeps the input translation-equivariant (the released code
fed the absolute grid, i.e. also a position code).

Mixed precision: convs and norms compute in `config.dtype` (e.g. bfloat16) with float32 params,
but the masks, flows, warps and the matting composition run in float32: a bfloat16 grid
coordinate is off by up to half a pixel at 128 px. Outputs are float32.

Options that start G_vid from the warp (off in `paper`; the demo preset uses them, see
`demo_config`):
* `generator.fg_bias_init` / `matting_bias_init`: the initial bias of the M_f / M_m heads' logits
  (0 = flax's default, masks ~0.5 at init; +3 gives ~0.95, i.e. F ~ F_app and
  f_hat ~ warp(f_ref, F) from the first step).
* `generator.pixel_skip` (a departure from the paper's figure): the output also takes the
  reference warped by F at full resolution (F upsampled, `pixel_skip_padding`), `warp` below:
    "blend":    the decoder also predicts a full-resolution mask M_p (its own k x k conv on the
                last decoder features, zero kernel, bias `pixel_skip_bias_init`) and
                image = M_p * warp + (1 - M_p) * decoder RGB;
    "residual": the decoder's last conv sees [its features, warp] and predicts a correction,
                image = clip(warp + correction, 0, 1), the conv zero at init.
  Either way the generator starts as (close to) the warp-only baseline with its own F and can
  learn where the warp is wrong (the mouth interior, occlusions), instead of first having to
  rebuild a sharp warp through the encoder-decoder bottleneck. Measured on the demo data (100
  steps): "blend" stays near the warp (M_p rises to ~0.99); "residual" does worse (its
  correction takes the GAN / random-VGG gradients in full and adds texture noise).

Ablations (paper Table 3): `use_flow=False` feeds the identity grid in place of F_app, so
F = identity and no M_f head exists (mask_fg is returned as 0); `use_matting=False` drops the M_m
and g heads (M_m = 1).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hdtf_jax import warp
from hdtf_jax.nn import hourglass as hg_lib
from hdtf_jax.nn.conv import Conv
from hdtf_jax.nn.hourglass import NormSpec

DOWNSAMPLE_MODES = ("stride", "pool")
PIXEL_SKIP_MODES = ("none", "blend", "residual")


# ----------------------------------------------------------------------------------------- presets

def paper_config(image_size: int = 512) -> ml_collections.ConfigDict:
  """G_vid and D_vid at the published sizes.

  Encoder/decoder widths and kernels from supplement Fig. 5 (stride-2 convs, linear upsampling);
  hourglass, residual-block count and norm from the released inference code (a FOMM-style
  encoder-decoder hourglass, width 64, max 512, 5 levels; 2 residual blocks; BatchNorm);
  D_vid is FOMM's patch discriminator (widths 64-512, 4x4 convs, one scale).
  """
  c = ml_collections.ConfigDict()
  c.image_size = image_size
  c.channels = 3
  c.dtype = "float32"          # compute dtype; params and outputs stay float32
  c.remat = False              # rematerialise hourglass / residual / up blocks (saves memory at 512)
  c.norm = ml_collections.ConfigDict(dict(
      kind="batch",            # batch | instance | group | none
      groups=32, momentum=0.9, epsilon=1e-5))
  c.use_flow = True            # False: ablation "w/o F_app"
  c.use_matting = True         # False: ablation "w/o matting" (M_m = 1)
  c.padding_mode = "zeros"     # grid_sample padding for warps ("zeros" | "border")
  c.generator = ml_collections.ConfigDict(dict(
      encoder_widths=(64, 128, 256),  # stem, then one x2-down stage per further width
      stem_kernel=7,
      downsample="stride",     # "stride" (Fig. 5) | "pool" (conv + avg-pool, released code)
      num_res_blocks=2,
      upsample="bilinear",     # Fig. 5 says linear; the released code used nearest
      head_kernel=7,           # M_f, M_m and g heads
      out_kernel=7,
      # Not in the paper (module doc): initial mask-logit biases and the pixel-level skip.
      fg_bias_init=0.0,        # M_f head bias at init (0: flax default; sigmoid(3) = 0.95)
      matting_bias_init=0.0,   # M_m head bias at init
      pixel_skip="none",       # "none" (paper) | "blend" | "residual" (module doc)
      pixel_skip_bias_init=3.0,  # "blend": M_p bias at init (kernel zero: M_p = sigmoid(bias))
      pixel_skip_padding="border"))  # grid_sample padding of the skip's warp
  c.hourglass = ml_collections.ConfigDict(dict(
      kind="unet",             # "unet" (released code) | "stacked" (Newell et al.)
      width=64, max_width=512, depth=5, upsample="nearest",  # unet
      num_stacks=2, num_blocks=1))                           # stacked (uses width and depth too)
  c.discriminator = ml_collections.ConfigDict(dict(
      widths=(64, 128, 256, 512), kernel_size=4, padding="VALID", negative_slope=0.2,
      num_scales=1))
  return c


def config_256() -> ml_collections.ConfigDict:
  """Published widths at 256 x 256 (hourglass one level shallower: 64 -> 4 px at the bottom)."""
  c = paper_config(256)
  c.hourglass.depth = 4
  return c


def demo_config() -> ml_collections.ConfigDict:
  """128 px, half widths: trains on one small GPU or slowly on a CPU. Starts from the warp
  (masks M_f, M_m ~ 0.95 at init and the pixel skip, see the module doc): in a few hundred CPU
  steps an encoder-decoder cannot learn to reproduce a sharp warp by itself."""
  c = paper_config(128)
  c.generator.update(encoder_widths=(32, 64, 128), num_res_blocks=1, fg_bias_init=3.0,
                     matting_bias_init=3.0, pixel_skip="blend")
  c.hourglass.update(width=32, max_width=128, depth=3, num_stacks=1)
  c.discriminator.widths = (32, 64, 128, 256)
  return c


def tiny_config() -> ml_collections.ConfigDict:
  """32 px, widths 8-32: for tests and 2-core smoke runs."""
  c = paper_config(32)
  c.generator.update(encoder_widths=(8, 16, 32), num_res_blocks=1)
  c.hourglass.update(width=8, max_width=16, depth=2, num_stacks=1)
  c.discriminator.widths = (8, 16)
  return c


def norm_spec(cfg: ml_collections.ConfigDict) -> NormSpec:
  return NormSpec(cfg.norm.kind, cfg.norm.groups, cfg.norm.momentum, cfg.norm.epsilon)


def downscale(cfg: ml_collections.ConfigDict) -> int:
  """Image size / feature size: 2 per encoder stage after the stem."""
  return 2 ** (len(cfg.generator.encoder_widths) - 1)


def dummy_inputs(cfg: ml_collections.ConfigDict, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(reference, F_app) for `init`: a grey image and the identity grid."""
  size, s = cfg.image_size, downscale(cfg)
  ref = np.full((batch, size, size, cfg.channels), 0.5, np.float32)
  grid = np.broadcast_to(np.asarray(warp.identity_grid(size // s, size // s)),
                         (batch, size // s, size // s, 2))
  return ref, np.array(grid)


# ------------------------------------------------------------------------------------------ helpers

def area_downsample(x: jax.Array, factor: int) -> jax.Array:
  """Mean over factor x factor blocks (exact anti-aliased downsampling by an integer)."""
  n, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"area_downsample: {h}x{w} is not divisible by {factor}")
  return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def compose_features(f_ref: jax.Array, flow: jax.Array, grid_identity: jax.Array,
                     m_f: jax.Array, m_m: jax.Array, g: jax.Array,
                     padding_mode: str = "zeros") -> tuple[jax.Array, jax.Array]:
  """The matting operation of G_vid. Returns (f_hat, F).

  f_ref (B, h, w, C); flow = F_app and grid_identity: normalised grids (B or 1, h, w, 2);
  m_f, m_m (B, h, w, 1) in [0, 1]; g (B, h, w, C).
    F = flow * m_f + identity * (1 - m_f);  f_hat = warp(f_ref, F) * m_m + g * (1 - m_m)
  """
  grid = flow * m_f + grid_identity * (1 - m_f)
  grid = jnp.broadcast_to(grid, f_ref.shape[:3] + (2,))
  warped = warp.grid_sample(f_ref, grid, padding_mode=padding_mode, align_corners=False)
  return warped * m_m + g * (1 - m_m), grid


def upsample_grid(grid: jax.Array, height: int, width: int) -> jax.Array:
  """Normalised grid (B, h, w, 2) -> (B, height, width, 2): offsets resized bilinearly.

  Normalised offsets need no rescaling; resizing offsets instead of positions keeps the
  identity exact at the borders.
  """
  n, h, w, _ = grid.shape
  offsets = grid - warp.identity_grid(h, w, dtype=grid.dtype)
  offsets = jax.image.resize(offsets, (n, height, width, 2), "bilinear")
  return offsets + warp.identity_grid(height, width, dtype=grid.dtype)


def _maybe_remat(cls, remat: bool):
  # static_argnums counts self: `train` (argument 2) must stay a Python bool.
  return nn.remat(cls, static_argnums=(2,)) if remat else cls


# ------------------------------------------------------------------------------------------ modules

class Encoder(nn.Module):
  """Conv k x k -> widths[0], then per further width a x2-down conv3x3 stage (norm + ReLU each)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    cfg, g = self.config, self.config.generator
    dtype, norm = jnp.dtype(cfg.dtype), norm_spec(cfg)
    if g.downsample not in DOWNSAMPLE_MODES:
      raise ValueError(f"generator.downsample must be one of {DOWNSAMPLE_MODES}, "
                       f"got {g.downsample!r}")
    block = _maybe_remat(hg_lib.ConvNormAct, cfg.remat)
    x = block(g.encoder_widths[0], g.stem_kernel, norm=norm, dtype=dtype, name="stem")(x, train)
    for i, w in enumerate(g.encoder_widths[1:]):
      stride = 2 if g.downsample == "stride" else 1
      x = block(w, 3, stride, norm=norm, dtype=dtype, name=f"down_{i}")(x, train)
      if g.downsample == "pool":
        x = hg_lib.avg_pool2(x)
    return x


class Decoder(nn.Module):
  """Residual blocks, then per encoder stage (upsample x2, conv3x3, norm, ReLU), conv, sigmoid.

  `__call__(x, skip=None, train)`: `skip` is the full-resolution warped reference of
  `generator.pixel_skip` (None without it). Returns (image (B, H, W, C), M_p (B, H, W, 1) for
  "blend", else None)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, jax.Array | None]:
    cfg, g = self.config, self.config.generator
    dtype, norm = jnp.dtype(cfg.dtype), norm_spec(cfg)
    res = _maybe_remat(hg_lib.ResBlock, cfg.remat)
    up = _maybe_remat(hg_lib.ConvNormAct, cfg.remat)
    for i in range(g.num_res_blocks):
      x = res(3, norm=norm, dtype=dtype, name=f"res_{i}")(x, train)
    for i, w in enumerate(reversed(g.encoder_widths[:-1])):
      x = up(w, 3, norm=norm, dtype=dtype, name=f"up_{i}")(hg_lib.upsample2(x, g.upsample), train)
    mode, pad = pixel_skip_mode(cfg), g.out_kernel // 2
    conv = lambda c, name, **init: Conv(c, (g.out_kernel, g.out_kernel),
                                        padding=((pad, pad), (pad, pad)), dtype=dtype,
                                        name=name, **init)
    if mode == "residual":
      # Zero conv: the image is exactly the warp at init; the correction gets all the gradient.
      zero = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)
      delta = conv(cfg.channels, "out", **zero)(jnp.concatenate([x, skip.astype(dtype)], -1))
      return jnp.clip(skip + delta.astype(jnp.float32), 0.0, 1.0), None
    image = nn.sigmoid(conv(cfg.channels, "out")(x).astype(jnp.float32))
    if mode == "none":
      return image, None
    # "blend": zero kernel, constant bias, so M_p = sigmoid(bias) everywhere at init.
    mask = conv(1, "out_mask", kernel_init=nn.initializers.zeros,
                bias_init=nn.initializers.constant(g.pixel_skip_bias_init))(x)
    mask = nn.sigmoid(mask.astype(jnp.float32))
    return mask * skip + (1 - mask) * image, mask


def pixel_skip_mode(cfg: ml_collections.ConfigDict) -> str:
  mode = cfg.generator.get("pixel_skip", "none")
  mode = {False: "none", True: "blend"}.get(mode, mode) if isinstance(mode, bool) else mode
  if mode not in PIXEL_SKIP_MODES:
    raise ValueError(f"generator.pixel_skip must be one of {PIXEL_SKIP_MODES}, got {mode!r}")
  return mode


class VideoGenerator(nn.Module):
  """G_vid. `__call__(reference (B, H, W, 3) in [0, 1], flow_app (B, H/s, W/s, 2), train=False)`
  -> dict of float32 arrays:
    image (B, H, W, 3) in [0, 1]; mask_fg, mask_matting (B, h, w, 1); flow: F (B, h, w, 2), a
    normalised grid; warped_ref (B, H, W, 3): the reference warped by F (upsampled), for logging.
  With `train=True` and BatchNorm, apply with `mutable=['batch_stats']`.
  """
  config: ml_collections.ConfigDict

  def _check_inputs(self, reference, flow_app):
    cfg, s = self.config, downscale(self.config)
    size = cfg.image_size
    if reference.ndim != 4 or reference.shape[1:] != (size, size, cfg.channels):
      raise ValueError(f"VideoGenerator: reference must be (B, {size}, {size}, {cfg.channels}) "
                       f"(config.image_size={size}), got {reference.shape}")
    want = (reference.shape[0], size // s, size // s, 2)
    if flow_app.shape != want:
      raise ValueError(f"VideoGenerator: flow_app must be a normalised grid of shape {want} "
                       f"(1/{s} of the image), got {flow_app.shape}")
    depth = cfg.hourglass.depth if cfg.use_flow or cfg.use_matting else 0
    if size % (s * 2 ** depth):
      raise ValueError(f"VideoGenerator: image_size {size} must be divisible by {s} * "
                       f"2**hourglass.depth = {s * 2 ** depth}")

  @nn.compact
  def __call__(self, reference: jax.Array, flow_app: jax.Array,
               train: bool = False) -> dict[str, jax.Array]:
    cfg, g = self.config, self.config.generator
    self._check_inputs(reference, flow_app)
    dtype, norm, s = jnp.dtype(cfg.dtype), norm_spec(cfg), downscale(cfg)
    reference = reference.astype(jnp.float32)
    b, size = reference.shape[0], cfg.image_size
    h = w = size // s
    identity = warp.identity_grid(h, w)[None]
    flow_app = flow_app.astype(jnp.float32) if cfg.use_flow else jnp.broadcast_to(
        identity, (b, h, w, 2))

    f_ref = Encoder(cfg, name="encoder")(reference.astype(dtype), train).astype(jnp.float32)
    channels = f_ref.shape[-1]

    m_f = jnp.zeros((b, h, w, 1), jnp.float32)
    m_m = jnp.ones((b, h, w, 1), jnp.float32)
    g_map = jnp.zeros_like(f_ref)
    if cfg.use_flow or cfg.use_matting:
      ref_small = area_downsample(reference, s)
      warped_small = warp.grid_sample(ref_small, flow_app, padding_mode=cfg.padding_mode)
      hg_in = jnp.concatenate([ref_small, flow_app - identity, warped_small], axis=-1)
      feats = hg_lib.make_hourglass(cfg.hourglass, norm, dtype, cfg.remat)(hg_in.astype(dtype),
                                                                            train)
      def head(c, name, bias=0.0):
        pad = g.head_kernel // 2
        return Conv(c, (g.head_kernel, g.head_kernel), padding=((pad, pad), (pad, pad)),
                    dtype=dtype, bias_init=nn.initializers.constant(bias),
                    name=name)(feats).astype(jnp.float32)
      if cfg.use_flow:
        m_f = nn.sigmoid(head(1, "head_fg", g.get("fg_bias_init", 0.0)))
      if cfg.use_matting:
        m_m = nn.sigmoid(head(1, "head_matting", g.get("matting_bias_init", 0.0)))
        g_map = head(channels, "head_g")

    f_hat, grid = compose_features(f_ref, flow_app, identity, m_f, m_m, g_map, cfg.padding_mode)
    big_grid = upsample_grid(grid, size, size)
    warped_ref = warp.grid_sample(reference, big_grid, padding_mode=cfg.padding_mode)
    skip = None
    if pixel_skip_mode(cfg) != "none":
      skip = warped_ref if g.pixel_skip_padding == cfg.padding_mode else warp.grid_sample(
          reference, big_grid, padding_mode=g.pixel_skip_padding)
    image, m_p = Decoder(cfg, name="decoder")(f_hat.astype(dtype), skip, train)
    out = dict(image=image, mask_fg=m_f, mask_matting=m_m, flow=grid, warped_ref=warped_ref)
    if m_p is not None:
      out["mask_pixel"] = m_p
    return out
