"""G_vid (VideoGenerator), its hourglasses and D_vid (PatchDiscriminator)."""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform

from hdtf_jax import warp
from hdtf_jax.nn import patch_discriminator as pd
from hdtf_jax.nn import video


@functools.lru_cache(maxsize=None)
def _astronaut(size):
  """The face region of a real portrait, size x size, float32 in [0, 1]."""
  return skimage.transform.resize(skimage.data.astronaut()[:400, 60:460], (size, size),
                                  anti_aliasing=True).astype(np.float32)


def _inputs(cfg, batch=2, seed=0, motion=0.1):
  """Astronaut crops as references and a smooth random F_app grid around the identity."""
  size, s = cfg.image_size, video.downscale(cfg)
  img = _astronaut(size)
  ref = np.stack([img, img[:, ::-1]])[:batch]
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-motion, motion, (batch, 3, 3, 2)).astype(np.float32)
  offsets = np.asarray(jax.image.resize(coarse, (batch, size // s, size // s, 2), "bilinear"))
  return ref, np.asarray(warp.identity_grid(size // s, size // s))[None] + offsets


def _numpy_init(module, *args, seed=0):
  """Variables of the right shapes drawn with NumPy: N(0, 1/fan_in) kernels, small random biases,
  unit norm scales. Skips compiling a random initialiser per shape, the slowest part on CPU."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], "key", "")
    if name == "kernel":
      x = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "bias":
      x = 0.1 * rng.normal(size=leaf.shape)
    elif name in ("scale", "var"):
      x = np.ones(leaf.shape)
    else:
      x = np.zeros(leaf.shape)
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _init(cfg, ref, grid):
  return _numpy_init(video.VideoGenerator(cfg), ref, grid)


def _apply(cfg, *args, **kwargs):
  """Jitted apply: one compile instead of one per eager op, much faster on CPU."""
  return jax.jit(video.VideoGenerator(cfg).apply, static_argnames=("train", "mutable"))(
      *args, **kwargs)


# ------------------------------------------------------------------------------ matting operation

def _np_grid_sample(img, grid):
  """PyTorch grid_sample, bilinear, zeros padding, align_corners=False, by loops."""
  n, h, w, c = img.shape
  _, ho, wo, _ = grid.shape
  out = np.zeros((n, ho, wo, c), np.float64)
  for b in range(n):
    for i in range(ho):
      for j in range(wo):
        x = ((grid[b, i, j, 0] + 1) * w - 1) / 2
        y = ((grid[b, i, j, 1] + 1) * h - 1) / 2
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
          if 0 <= yy < h and 0 <= xx < w:
            out[b, i, j] += img[b, yy, xx] * (1 - abs(x - xx)) * (1 - abs(y - yy))
  return out


def test_compose_features_matches_numpy():
  rng = np.random.default_rng(1)
  b, h, w, c = 2, 5, 6, 4
  f_ref = rng.normal(size=(b, h, w, c)).astype(np.float32)
  ident = np.asarray(warp.identity_grid(h, w))[None]
  flow = (ident + rng.uniform(-0.4, 0.4, (b, h, w, 2))).astype(np.float32)
  m_f = rng.uniform(size=(b, h, w, 1)).astype(np.float32)
  m_m = rng.uniform(size=(b, h, w, 1)).astype(np.float32)
  g = rng.normal(size=(b, h, w, c)).astype(np.float32)
  f_hat, grid = video.compose_features(f_ref, flow, ident, m_f, m_m, g)
  want_grid = flow * m_f + ident * (1 - m_f)
  want = _np_grid_sample(f_ref, want_grid) * m_m + g * (1 - m_m)
  np.testing.assert_allclose(grid, want_grid, atol=1e-6)
  np.testing.assert_allclose(f_hat, want, atol=1e-5)


def test_identity_flow_with_unit_masks_returns_features():
  rng = np.random.default_rng(2)
  f_ref = rng.normal(size=(1, 8, 12, 5)).astype(np.float32)
  ident = warp.identity_grid(8, 12)[None]
  ones = np.ones((1, 8, 12, 1), np.float32)
  f_hat, grid = video.compose_features(f_ref, ident, ident, ones, ones, np.zeros_like(f_ref))
  np.testing.assert_allclose(f_hat, f_ref, atol=1e-6)
  np.testing.assert_allclose(grid[0], ident[0], atol=0)


def test_identity_f_app_gives_identity_flow_and_unwarped_reference():
  cfg = video.tiny_config()
  ref, grid = _inputs(cfg)
  ident = np.broadcast_to(warp.identity_grid(*grid.shape[1:3]), grid.shape)
  variables = _init(cfg, ref, grid)
  out = _apply(cfg, variables, ref, np.array(ident))
  np.testing.assert_allclose(out["flow"], ident, atol=1e-6)  # whatever M_f is
  np.testing.assert_allclose(out["warped_ref"], ref, atol=1e-5)
  # upsample_grid keeps a non-trivial grid's offsets: a uniform shift stays uniform.
  shifted = video.upsample_grid(jnp.asarray(ident) + 0.25, 32, 32)
  np.testing.assert_allclose(shifted - warp.identity_grid(32, 32), 0.25, atol=1e-6)


# ---------------------------------------------------------------------------------- the generator

@pytest.mark.parametrize("kind", ["unet", "stacked"])
def test_tiny_shapes_and_ranges(kind):
  cfg = video.tiny_config()
  cfg.hourglass.kind = kind
  ref, grid = _inputs(cfg)
  variables = _init(cfg, ref, grid)
  assert set(variables["params"]) == {"encoder", "hourglass", "head_fg", "head_matting", "head_g",
                                      "decoder"}
  out, state = _apply(cfg, variables, ref, grid, train=True, mutable=("batch_stats",))
  shapes = {k: v.shape for k, v in out.items()}
  assert shapes == {"image": (2, 32, 32, 3), "mask_fg": (2, 8, 8, 1), "mask_matting": (2, 8, 8, 1),
                    "flow": (2, 8, 8, 2), "warped_ref": (2, 32, 32, 3)}
  assert all(v.dtype == jnp.float32 for v in out.values())
  for k in ("image", "mask_fg", "mask_matting"):
    assert 0 <= float(out[k].min()) and float(out[k].max()) <= 1
  # BatchNorm running statistics moved in train mode.
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state["batch_stats"],
                       variables["batch_stats"])
  assert max(jax.tree.leaves(moved)) > 0


def test_released_code_variants_keep_shapes_and_params():
  """downsample='pool' (conv + avg-pool) and nearest upsampling: same convs, same shapes."""
  cfg = video.tiny_config()
  ref, grid = _inputs(cfg)
  variant = video.tiny_config()
  variant.generator.update(downsample="pool", upsample="nearest")
  for c in (cfg, variant):
    out = jax.eval_shape(lambda v: video.VideoGenerator(c).apply(v, ref, grid), _init(c, ref, grid))
    assert out["image"].shape == ref.shape and out["flow"].shape == grid.shape
  assert (jax.tree.map(jnp.shape, _init(cfg, ref, grid))
          == jax.tree.map(jnp.shape, _init(variant, ref, grid)))
  variant.generator.downsample = "maxpool"
  with pytest.raises(ValueError, match="downsample"):
    _init(variant, ref, grid)


def test_ablation_switches_change_the_graph():
  ref, grid = _inputs(video.tiny_config())
  _, grid2 = _inputs(video.tiny_config(), seed=7)

  def run(**switches):
    cfg = video.tiny_config()
    cfg.update(switches)
    variables = _init(cfg, ref, grid)
    apply = jax.jit(video.VideoGenerator(cfg).apply)
    return variables["params"], apply(variables, ref, grid), apply(variables, ref, grid2)

  params, a, b = run()
  assert float(jnp.abs(a["image"] - b["image"]).max()) > 1e-4  # F_app matters

  params, a, b = run(use_flow=False)
  assert "head_fg" not in params and "head_matting" in params
  np.testing.assert_array_equal(a["image"], b["image"])  # F_app ignored entirely
  np.testing.assert_array_equal(a["mask_fg"], 0)
  np.testing.assert_allclose(a["flow"], np.broadcast_to(warp.identity_grid(8, 8), grid.shape),
                             atol=1e-6)

  params, a, b = run(use_matting=False)
  assert "head_fg" in params and "head_matting" not in params and "head_g" not in params
  np.testing.assert_array_equal(a["mask_matting"], 1)

  params, a, _ = run(use_flow=False, use_matting=False)
  assert set(params) == {"encoder", "decoder"}


def test_bfloat16_compute_is_close_to_float32():
  cfg = video.tiny_config()
  ref, grid = _inputs(cfg)
  variables = _init(cfg, ref, grid)
  full = _apply(cfg, variables, ref, grid)
  cfg16 = video.tiny_config()
  cfg16.dtype = "bfloat16"
  variables16 = jax.eval_shape(video.VideoGenerator(cfg16).init, jax.random.key(0), ref, grid)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables16))  # params stay f32
  half = _apply(cfg16, variables, ref, grid)
  for k in ("image", "mask_fg", "mask_matting", "flow", "warped_ref"):
    assert half[k].dtype == jnp.float32
    err = np.abs(np.asarray(half[k]) - np.asarray(full[k]))
    print(f"bf16 vs f32 {k}: max {err.max():.2e} mean {err.mean():.2e}")
    assert err.mean() < 5e-3 and err.max() < 3e-2


def test_gradients_reach_all_params_and_remat_matches():
  cfg = video.tiny_config()
  ref, grid = _inputs(cfg)
  variables = _init(cfg, ref, grid)
  weights = np.random.default_rng(3).normal(size=ref.shape).astype(np.float32)

  def loss(params, remat):
    c = video.tiny_config()
    c.remat = remat
    out, _ = video.VideoGenerator(c).apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, ref, grid, train=True,
        mutable=["batch_stats"])
    return jnp.sum(out["image"] * weights)

  value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables["params"], False)
  norms = jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda g: float(jnp.abs(g).sum()),
                                                            grads))[0]
  dead = [jax.tree_util.keystr(path) for path, n in norms if not n > 0]
  assert not dead, f"no gradient reaches {dead}"
  value_r, grads_r = jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables["params"], True)
  np.testing.assert_allclose(value_r, value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), grads_r, grads)


@pytest.mark.parametrize("norm", ["instance", "group", "none"])
def test_norm_switch(norm):
  cfg = video.tiny_config()
  cfg.norm.kind = norm
  ref, grid = _inputs(cfg)
  variables = _init(cfg, ref, grid)
  assert "batch_stats" not in variables
  out = _apply(cfg, variables, ref, grid, train=True)
  assert out["image"].shape == ref.shape and bool(jnp.isfinite(out["image"]).all())


def test_bad_inputs_raise():
  cfg = video.tiny_config()
  ref, grid = _inputs(cfg)
  model = video.VideoGenerator(cfg)
  with pytest.raises(ValueError, match="flow_app"):
    model.init(jax.random.key(0), ref, grid[:, :4])
  with pytest.raises(ValueError, match="image_size"):
    model.init(jax.random.key(0), ref[:, :16, :16], grid)
  bad = video.tiny_config()
  bad.hourglass.depth = 4  # 8 px features cannot be halved 4 times
  with pytest.raises(ValueError, match="hourglass"):
    video.VideoGenerator(bad).init(jax.random.key(0), ref, grid)
  bad = video.tiny_config()
  bad.norm.kind = "layer"
  with pytest.raises(ValueError, match="norm"):
    video.VideoGenerator(bad).init(jax.random.key(0), ref, grid)


# ---------------------------------------------------------------------------------- the critic

def test_patch_discriminator_shapes_by_hand():
  x = np.random.default_rng(4).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  d = pd.PatchDiscriminator(widths=(8, 16, 32, 64))
  variables = _numpy_init(d, x)
  logits, feats = jax.jit(d.apply)(variables, x)
  # 64 -conv4-> 61 -pool-> 30 -> 27 -> 13 -> 10 -> 5 -> 2 (last block: no pool)
  assert [f.shape for f in feats] == [(2, 30, 30, 8), (2, 13, 13, 16), (2, 5, 5, 32), (2, 2, 2, 64)]
  assert logits.shape == (2, 2, 2, 1)
  assert pd.output_size(64, 4) == 2
  assert "norm" not in variables["params"]["scale_0"]["down_0"]  # first block: no norm
  assert "norm" in variables["params"]["scale_0"]["down_1"]

  # Block 0 by NumPy: valid 4x4 correlation, LeakyReLU(0.2), 2x2 mean.
  p = variables["params"]["scale_0"]["down_0"]["conv"]
  win = np.lib.stride_tricks.sliding_window_view(x, (4, 4), axis=(1, 2))  # (2,61,61,3,4,4)
  conv = np.einsum("nhwcij,ijco->nhwo", win, np.asarray(p["kernel"])) + np.asarray(p["bias"])
  act = np.where(conv > 0, conv, 0.2 * conv)[:, :60, :60]
  want = act.reshape(2, 30, 2, 30, 2, 8).mean(axis=(2, 4))
  np.testing.assert_allclose(feats[0], want, rtol=1e-4, atol=1e-5)

  # Two scales: separate params, lists of logits; the second sees the 32 px pyramid level.
  d2 = pd.PatchDiscriminator(widths=(8, 16, 32), num_scales=2)
  v2 = _numpy_init(d2, x)
  logits2, feats2 = jax.jit(d2.apply)(v2, x)
  assert set(v2["params"]) == {"scale_0", "scale_1"}
  assert [l.shape for l in logits2] == [(2, 10, 10, 1), (2, 2, 2, 1)]  # 64: 30,13,10  32: 14,5,2
  assert [f.shape[1] for f in feats2] == [30, 13, 10, 14, 5, 2]
  with pytest.raises(ValueError, match="too small"):
    jax.eval_shape(pd.PatchDiscriminator(widths=(8, 16, 32, 64)).init, jax.random.key(0),
                   x[:, :16, :16])


# ------------------------------------------------------------------------------- the paper preset

def _conv(k, cin, cout):
  return k * k * cin * cout + cout


def _numpy_param_count_generator(cfg):
  """Parameter count of G_vid worked out on paper from the config (BatchNorm: scale + bias)."""
  g, h = cfg.generator, cfg.hourglass
  bn = lambda c: 2 * c
  ew = g.encoder_widths
  n = _conv(g.stem_kernel, 3, ew[0]) + bn(ew[0])
  for cin, cout in zip(ew[:-1], ew[1:]):
    n += _conv(3, cin, cout) + bn(cout)
  assert h.kind == "unet"
  hg_in = 3 + 2 + 3
  downs = [min(h.max_width, h.width * 2 ** (i + 1)) for i in range(h.depth)]
  ins = [hg_in] + downs
  for cin, cout in zip(ins[:-1], downs):
    n += _conv(3, cin, cout) + bn(cout)
  cin = downs[-1]
  for i in reversed(range(h.depth)):
    cout = min(h.max_width, h.width * 2 ** i)
    n += _conv(3, cin, cout) + bn(cout)
    cin = cout + ins[i]  # concatenated skip
  n += 2 * _conv(g.head_kernel, cin, 1) + _conv(g.head_kernel, cin, ew[-1])
  n += g.num_res_blocks * 2 * (_conv(3, ew[-1], ew[-1]) + bn(ew[-1]))
  for cin, cout in zip(ew[::-1][:-1], ew[::-1][1:]):
    n += _conv(3, cin, cout) + bn(cout)
  return n + _conv(g.out_kernel, ew[0], 3)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_paper_preset_param_counts():
  cfg = video.paper_config()
  ref, grid = video.dummy_inputs(cfg)
  shapes = jax.eval_shape(video.VideoGenerator(cfg).init, jax.random.key(0), ref, grid)
  ours, by_hand = _count(shapes["params"]), _numpy_param_count_generator(cfg)
  print(f"G_vid paper preset: {ours:,} params (by hand {by_hand:,})")
  assert ours == by_hand

  w = cfg.discriminator.widths
  d_hand = _conv(4, 3, w[0]) + sum(_conv(4, a, b) + 2 * b for a, b in zip(w[:-1], w[1:]))
  d_hand += _conv(1, w[-1], 1)
  d_shapes = jax.eval_shape(pd.patch_discriminator(cfg).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32))
  print(f"D_vid paper preset: {_count(d_shapes['params']):,} params (by hand {d_hand:,})")
  assert _count(d_shapes["params"]) == d_hand


def test_paper_widths_jit_forward_256():
  cfg = video.paper_config(image_size=256)
  ref, grid = _inputs(cfg, batch=1)
  model = video.VideoGenerator(cfg)
  variables = _numpy_init(model, ref, grid)
  forward = jax.jit(model.apply)
  t0 = time.perf_counter()
  out = jax.block_until_ready(forward(variables, ref, grid))
  t1 = time.perf_counter()
  jax.block_until_ready(forward(variables, ref, grid))
  t2 = time.perf_counter()
  print(f"paper widths @256, batch 1: compile+run {t1 - t0:.2f} s, run {t2 - t1:.2f} s")
  assert out["image"].shape == (1, 256, 256, 3) and bool(jnp.isfinite(out["image"]).all())
