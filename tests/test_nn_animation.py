"""Stage-1 networks: G_ani, its building blocks and the parameter discriminators.

References are independent: NumPy loops for convolutions, BatchNorm, AdaIN and linear upsampling,
`np.pad` for padding, and a by-hand parameter count of the paper's architecture.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdtf_jax.nn import animation, blocks, discriminators, identity

KEY = jax.random.PRNGKey(0)


# ------------------------------------------------------------------------------ NumPy references

def np_conv1d(x, kernel, bias, stride=1):
  """x (B, T, Cin), kernel (k, Cin, Cout): zero padding (k-1)//2, loops over taps."""
  k = kernel.shape[0]
  p = (k - 1) // 2
  xp = np.pad(x, ((0, 0), (p, p), (0, 0)))
  t_out = (x.shape[1] + 2 * p - k) // stride + 1
  out = np.zeros((x.shape[0], t_out, kernel.shape[2]))
  for t in range(t_out):
    for j in range(k):
      out[:, t] += xp[:, t * stride + j] @ kernel[j]
  return out + bias


def np_bn(x, scale, bias, mean, var, eps):
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_upsample2(x):
  """Linear x2 with half-pixel centres: output i samples input position (i + 0.5) / 2 - 0.5."""
  t = x.shape[1]
  out = np.zeros((x.shape[0], 2 * t, x.shape[2]))
  for i in range(2 * t):
    s = min(max((i + 0.5) / 2 - 0.5, 0.0), t - 1)
    lo = int(np.floor(s))
    hi = min(lo + 1, t - 1)
    out[:, i] = (1 - (s - lo)) * x[:, lo] + (s - lo) * x[:, hi]
  return out


def np_adain(x, mean, std, eps):
  mu = x.mean(axis=1, keepdims=True)
  sd = np.sqrt(x.var(axis=1, keepdims=True) + eps)
  return (x - mu) / sd * std[:, None] + mean[:, None]


def random_variables(model, *inputs, seed=0):
  """Variables shaped like `model.init(...)`, filled by NumPy (no init compile: fast on 2 cores).

  Kernels ~ N(0, 1/fan_in), biases 0, BN scale 1 and running stats (0, 1).
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, KEY, *inputs)

  def fill(path, s):
    name = str(path[-1])
    if "kernel" in name:
      return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    if "scale" in name or "var" in name:
      return np.ones(s.shape, np.float32)
    return np.zeros(s.shape, np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def randomize(tree, seed):
  """Replaces every leaf with Gaussian noise (BN variances kept positive)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (np.abs(rng.normal(1, .3, x.shape)) if "var" in str(path[-1])
                       else rng.normal(0, .3, x.shape)).astype(np.float32), tree)


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tiny():
  cfg = animation.tiny_config()
  model = animation.AnimationGenerator(cfg)
  variables = random_variables(model, *animation.dummy_inputs(cfg, 2, 16))
  fwd = jax.jit(lambda v, a, i: model.apply(v, a, i, train=False))
  rng = np.random.default_rng(0)
  ident = rng.uniform(0, 1, identity.identity_input_shape(cfg.identity, 2)).astype(np.float32)
  return cfg, model, variables, fwd, ident


def audio_of(t, batch=2, seed=1):
  return np.random.default_rng(seed).normal(size=(batch, t, 15)).astype(np.float32)


# ---------------------------------------------------------------------------------- generator

@pytest.mark.parametrize("t", [1, 37])
def test_output_shapes_and_dtypes(tiny, t):
  cfg, _, variables, fwd, ident = tiny
  out = fwd(variables, audio_of(t), ident)
  assert set(out) == {"mouth", "eyebrow", "head"}
  assert out["mouth"].shape == (2, t, 28)
  assert out["eyebrow"].shape == (2, t, 5) and out["head"].shape == (2, t, 5)
  for v in out.values():
    assert v.dtype == jnp.float32 and np.isfinite(np.asarray(v)).all()


def test_sixty_seconds_in_one_call(tiny):
  _, _, variables, fwd, ident = tiny
  out = fwd(variables, audio_of(6000, batch=2), ident)
  assert out["mouth"].shape == (2, 6000, 28) and out["head"].shape == (2, 6000, 5)
  assert np.isfinite(np.asarray(out["eyebrow"])).all()


def test_padding_touches_only_the_temporal_decoder(tiny):
  _, _, variables, fwd, ident = tiny
  edge_cfg = animation.tiny_config()
  edge_cfg.generator.pad_mode = "edge"
  edge = jax.jit(animation.AnimationGenerator(edge_cfg).apply)
  a = audio_of(37)  # padded to 48 inside the temporal decoder
  r, e = fwd(variables, a, ident), edge(variables, a, ident)
  np.testing.assert_array_equal(r["mouth"], e["mouth"])  # mouth branch never sees padding
  assert np.abs(np.asarray(r["eyebrow"]) - np.asarray(e["eyebrow"])).max() > 1e-6


def test_pad_to_multiple_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 21, 3)).astype(np.float32)
  for mode in ("reflect", "edge"):
    y = animation.pad_to_multiple(jnp.asarray(x), 16, axis=1, mode=mode)
    np.testing.assert_array_equal(y, np.pad(x, ((0, 0), (0, 11), (0, 0)), mode=mode))
  assert animation.pad_to_multiple(jnp.asarray(x[:, :16]), 16).shape == (2, 16, 3)
  np.testing.assert_array_equal(animation.pad_to_multiple(jnp.ones((1, 1, 2)), 16), np.ones((1, 16, 2)))
  with pytest.raises(ValueError, match="mode"):
    animation.pad_to_multiple(jnp.asarray(x), 16, mode="wrap")
  with pytest.raises(ValueError, match="multiple"):
    animation.pad_to_multiple(jnp.asarray(x), 0)


def test_bn_train_and_eval_modes(tiny):
  _, model, variables, fwd, ident = tiny
  a = audio_of(32)
  e1, e2 = fwd(variables, a, ident), fwd(variables, a, ident)
  for k in e1:
    np.testing.assert_array_equal(e1[k], e2[k])  # eval is deterministic
  train_fwd = jax.jit(lambda v, a, i: model.apply(v, a, i, train=True, mutable=["batch_stats"]))
  t_out, updates = train_fwd(variables, a, ident)
  assert np.abs(np.asarray(t_out["mouth"]) - np.asarray(e1["mouth"])).max() > 1e-3
  old = jax.tree.leaves(variables["batch_stats"])
  new = jax.tree.leaves(updates["batch_stats"])
  assert len(old) == len(new) and all(np.abs(np.asarray(o) - np.asarray(n)).max() > 0
                                      for o, n in zip(old, new))


def test_identity_acts_only_through_adain(tiny):
  _, _, variables, fwd, ident = tiny
  other = np.random.default_rng(7).uniform(0, 1, ident.shape).astype(np.float32)
  a = audio_of(40)
  o1, o2 = fwd(variables, a, ident), fwd(variables, a, other)
  assert np.abs(np.asarray(o1["head"]) - np.asarray(o2["head"])).max() > 1e-5
  params = dict(variables["params"])
  enc = dict(params["style_encoder"])
  for name in [n for n in enc if n.startswith("adain_mlp_")]:
    enc[name] = jax.tree.map(jnp.zeros_like, enc[name])
  params["style_encoder"] = enc
  zeroed = {**variables, "params": params}
  z1, z2 = fwd(zeroed, a, ident), fwd(zeroed, a, other)
  for k in z1:
    np.testing.assert_array_equal(z1[k], z2[k])


@pytest.mark.parametrize("kind", ["shape", "embedding"])
def test_other_identity_kinds(kind):
  cfg = animation.tiny_config()
  cfg.identity.kind = kind
  model = animation.AnimationGenerator(cfg)
  a, i = animation.dummy_inputs(cfg, 2, 16)
  assert i.shape == ((2, 60) if kind == "shape" else (2, 32))
  variables = random_variables(model, a, i)
  has_identity_params = "identity" in variables["params"]["style_encoder"]
  assert has_identity_params == (kind == "shape")
  rng = np.random.default_rng(3)
  i1, i2 = rng.normal(size=i.shape), rng.normal(size=i.shape)
  f = jax.jit(model.apply)
  out1, out2 = f(variables, audio_of(20), i1), f(variables, audio_of(20), i2)
  assert out1["eyebrow"].shape == (2, 20, 5)
  assert np.abs(np.asarray(out1["head"]) - np.asarray(out2["head"])).max() > 1e-6


def test_bad_inputs_raise_clear_errors(tiny):
  cfg, model, variables, _, ident = tiny
  with pytest.raises(ValueError, match="audio"):
    model.apply(variables, np.zeros((2, 10, 13), np.float32), ident)
  with pytest.raises(ValueError, match="identity image"):
    model.apply(variables, audio_of(10), np.zeros((2, 64, 64, 3), np.float32))
  with pytest.raises(ValueError, match="batch"):
    model.apply(variables, audio_of(10, batch=3), ident)
  bad = animation.tiny_config()
  bad.identity.kind = "vggface"
  with pytest.raises(ValueError, match="identity.kind"):
    animation.AnimationGenerator(bad).init(KEY, audio_of(16), ident)
  with pytest.raises(ValueError, match="odd"):
    blocks.conv1d(8, 4)


def test_gradients_reach_every_parameter(tiny):
  _, model, variables, _, ident = tiny
  a = audio_of(48)
  rng = np.random.default_rng(5)
  target = {"mouth": rng.normal(size=(2, 48, 28)), "eyebrow": rng.normal(size=(2, 48, 5)),
            "head": rng.normal(size=(2, 48, 5))}

  def loss(params):
    out, _ = model.apply({**variables, "params": params}, a, ident, train=True,
                         mutable=["batch_stats"])
    return sum(jnp.mean((out[k] - target[k]) ** 2) for k in out)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) == len(jax.tree.leaves(variables["params"]))
  dead = [jax.tree_util.keystr(p) for p, g in flat if not np.abs(np.asarray(g)).max() > 0]
  assert not dead, dead


def test_bfloat16_compute_gives_float32_outputs():
  cfg = animation.tiny_config()
  cfg.dtype = "bfloat16"
  model = animation.AnimationGenerator(cfg)
  variables = random_variables(model, *animation.dummy_inputs(cfg, 1, 16))
  shapes = jax.eval_shape(model.init, KEY, *animation.dummy_inputs(cfg, 1, 16))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))  # params stay float32
  out = jax.jit(model.apply)(variables, audio_of(24, batch=1), np.full((1, 32, 32, 3), .5, np.float32))
  assert all(v.dtype == jnp.float32 and np.isfinite(np.asarray(v)).all() for v in out.values())


# ------------------------------------------------------------------------------------- blocks

def test_adain_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(3, 50, 8)).astype(np.float32)
  mean, std = rng.normal(size=(3, 8)).astype(np.float32), rng.uniform(.5, 2, (3, 8)).astype(np.float32)
  y = np.asarray(blocks.adain(jnp.asarray(x), mean, std, eps=1e-5))
  np.testing.assert_allclose(y, np_adain(x.astype(np.float64), mean, std, 1e-5), atol=1e-4)
  # Output statistics over time are the style's (up to the eps in the variance).
  np.testing.assert_allclose(y.mean(axis=1), mean, atol=1e-4)
  np.testing.assert_allclose(y.std(axis=1), std, rtol=1e-3)


def test_adain_style_mlp_chains_and_keeps_std_positive():
  mlp = blocks.AdaINStyle(hidden=16, features=8, std_floor=1e-4)
  z = np.random.default_rng(0).normal(size=(4, 24)).astype(np.float32)
  v = jax.jit(mlp.init)(KEY, z)
  assert v["params"]["fc1"]["kernel"].shape == (24, 16) and v["params"]["std"]["kernel"].shape == (8, 8)
  v = {"params": {**v["params"], "std": {"kernel": jnp.zeros((8, 8)), "bias": jnp.full((8,), -50.)}}}
  trunk, mean, std = jax.jit(mlp.apply)(v, z)
  assert trunk.shape == mean.shape == std.shape == (4, 8)
  np.testing.assert_allclose(std, 1e-4, rtol=1e-3)  # softplus(-50) ~ 0: floor holds


def test_res1d_block_matches_numpy_and_zero_branch_is_identity():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 19, 6)).astype(np.float32)
  block = blocks.Res1DBlock(6, kernel_size=5, use_bn=True, bn_epsilon=1e-3)
  v = randomize(jax.eval_shape(block.init, KEY, x), 2)
  y = jax.jit(block.apply)(v, x)
  p, s = v["params"], v["batch_stats"]["bn"]
  h = np_conv1d(x, p["conv1"]["kernel"], p["conv1"]["bias"])
  h = np.maximum(np_bn(h, p["bn"]["scale"], p["bn"]["bias"], s["mean"], s["var"], 1e-3), 0)
  ref = x + np_conv1d(h, p["conv2"]["kernel"], p["conv2"]["bias"])
  np.testing.assert_allclose(y, ref, atol=1e-4)
  # Documented: second conv at zero -> exact identity, in train and eval mode.
  z = {**v, "params": {**p, "conv2": jax.tree.map(jnp.zeros_like, p["conv2"])}}
  np.testing.assert_array_equal(jax.jit(block.apply)(z, x), x)
  train_apply = jax.jit(lambda v, x: block.apply(v, x, train=True, mutable=["batch_stats"])[0])
  np.testing.assert_array_equal(train_apply(z, x), x)
  # Width change: k1 projection on the shortcut.
  wide = blocks.Res1DBlock(10, use_bn=False)
  v = jax.eval_shape(wide.init, KEY, x)
  assert v["params"]["skip"]["kernel"].shape == (1, 6, 10)
  assert jax.eval_shape(wide.apply, v, x).shape == (2, 19, 10)


def test_res1d_down_and_up_match_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 12, 4)).astype(np.float32)
  down = blocks.Res1DDown(4, kernel_size=3)
  v = randomize(jax.eval_shape(down.init, KEY, x), 3)
  p, s = v["params"], v["batch_stats"]["bn"]
  h = np_conv1d(x, p["conv"]["kernel"], p["conv"]["bias"], stride=2)
  h = np.maximum(np_bn(h, p["bn"]["scale"], p["bn"]["bias"], s["mean"], s["var"], 1e-5), 0)
  ref = h + np_conv1d(x, p["skip"]["kernel"], p["skip"]["bias"], stride=2)
  y = jax.jit(down.apply)(v, x)
  assert y.shape == (2, 6, 4)
  np.testing.assert_allclose(y, ref, atol=1e-4)

  up = blocks.Res1DUp(4, kernel_size=3)
  v = randomize(jax.eval_shape(up.init, KEY, x), 4)
  p, s = v["params"], v["batch_stats"]["bn"]
  u = np_upsample2(x)
  h = np_conv1d(u, p["conv"]["kernel"], p["conv"]["bias"])
  ref = u + np.maximum(np_bn(h, p["bn"]["scale"], p["bn"]["bias"], s["mean"], s["var"], 1e-5), 0)
  y = jax.jit(up.apply)(v, x)
  assert y.shape == (2, 24, 4)
  np.testing.assert_allclose(y, ref, atol=1e-4)
  # Linear x2 of a ramp reproduces the ramp inside the clamped ends.
  ramp = np.arange(6, dtype=np.float32)[None, :, None]
  np.testing.assert_allclose(blocks.upsample_linear_1d(jnp.asarray(ramp))[0, 1:-1, 0],
                             np.arange(1, 11) * 0.5 - 0.25, atol=1e-6)


def test_res_block_2d_zero_branch_is_identity():
  x = np.random.default_rng(3).normal(size=(2, 9, 9, 5)).astype(np.float32)
  block = blocks.ResBlock2D(5)
  v = random_variables(block, x)
  train_apply = jax.jit(lambda v, x: block.apply(v, x, train=True, mutable=["batch_stats"])[0])
  y = train_apply(v, x)
  assert y.shape == x.shape and np.abs(np.asarray(y) - x).max() > 1e-3
  p = {**v["params"], "conv2": jax.tree.map(jnp.zeros_like, v["params"]["conv2"])}
  np.testing.assert_array_equal(train_apply({**v, "params": p}, x), x)
  wide = blocks.ResBlock2D(8, use_bn=False)
  v = jax.eval_shape(wide.init, KEY, x)
  assert v["params"]["skip"]["kernel"].shape == (1, 1, 5, 8)
  assert jax.eval_shape(wide.apply, v, x).shape == (2, 9, 9, 8)


# ------------------------------------------------------------------------------ discriminators

def test_discriminator_lengths_channels_and_features():
  cfg = animation.tiny_config()
  ds = discriminators.discriminators_from_config(cfg)
  rng = np.random.default_rng(4)
  audio = rng.normal(size=(2, 1000, 15)).astype(np.float32)
  # By hand: ceil-halving six times, 1000 -> 500 -> 250 -> 125 -> 63 -> 32 -> 16.
  assert discriminators.output_length(1000, 6) == 16
  for name, p_dim in [("mouth", 28), ("eyebrow", 5)]:
    d = ds[name]
    seq = rng.normal(size=(2, 1000, p_dim)).astype(np.float32)
    v = random_variables(d, seq[:, :64], audio[:, :64])
    assert v["params"]["conv_in"]["kernel"].shape == (1, p_dim + 15, 16)  # 43 or 20 channels in
    logits, feats = jax.jit(d.apply)(v, seq, audio)
    assert logits.shape == (2, 16, p_dim) and logits.dtype == jnp.float32
    assert [f.shape[1] for f in feats] == [1000, 500, 250, 125, 63, 32, 16, 16]
    assert all(float(f.min()) >= 0 for f in feats)  # ReLU after every hidden conv
  cfg.discriminator.update(out_channels=1, activation="leaky_relu")
  d = discriminators.parameter_discriminator(cfg, 5)
  v = random_variables(d, np.zeros((1, 40, 5), np.float32), audio[:1, :40])
  logits, feats = jax.jit(d.apply)(v, rng.normal(size=(1, 40, 5)), audio[:1, :40])
  assert logits.shape == (1, discriminators.output_length(40, 6), 1)
  assert any(float(f.min()) < 0 for f in feats)
  with pytest.raises(ValueError, match="same B and T"):
    d.apply(v, np.zeros((1, 39, 5)), audio[:1, :40])


def test_discriminator_gradients_reach_every_parameter():
  d = discriminators.discriminators_from_config(animation.tiny_config())["head"]
  rng = np.random.default_rng(6)
  seq, audio = rng.normal(size=(2, 128, 5)), rng.normal(size=(2, 128, 15))
  v = random_variables(d, seq, audio)
  grads = jax.jit(jax.grad(lambda p: jnp.mean((d.apply({"params": p}, seq, audio)[0] - 1) ** 2)))(
      v["params"])
  assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------------------- paper preset

def paper_param_count_by_hand():
  """The paper's G_ani (Fig. 1, our 128px image identity encoder) and D_mou (Fig. 2), by hand."""
  conv = lambda cin, cout, k: k * cin * cout + cout  # 1D kernel + bias
  conv2d = lambda cin, cout, k: k * k * cin * cout + cout
  dense = lambda cin, cout: cin * cout + cout
  bn = lambda c: 2 * c                               # scale + bias (running stats not params)
  w = 256
  res_bn = 2 * conv(w, w, 5) + bn(w)
  audio = conv(15, w, 1) + 18 * res_bn + 3 * 2 * conv(w, w, 5)
  image = (conv2d(3, 32, 3) + conv2d(32, 64, 3) + conv2d(64, 128, 3) + conv2d(128, 256, 3)
           + conv2d(256, 256, 3) + dense(256, 512))
  adain_mlps = sum(dense(cin, 256) + dense(256, 256) + 2 * dense(256, 256) for cin in (512, 256, 256))
  mouth = 8 * res_bn + conv(w, 28, 1)
  temporal = 4 * (conv(w, w, 3) + bn(w) + conv(w, w, 1)) + 4 * (conv(w, w, 3) + bn(w)) + 2 * conv(w, 5, 1)
  d_mou = conv(43, w, 1) + 6 * conv(w, w, 5) + 2 * conv(w, w, 3) + conv(w, 28, 1)
  return audio + image + adain_mlps + mouth + temporal, d_mou


def test_paper_parameter_count():
  cfg = animation.paper_config()
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  shapes = jax.eval_shape(animation.AnimationGenerator(cfg).init, KEY,
                          *animation.dummy_inputs(cfg, 1, 16))
  d = discriminators.discriminators_from_config(cfg)["mouth"]
  d_shapes = jax.eval_shape(d.init, KEY, np.zeros((1, 64, 28)), np.zeros((1, 64, 15)))
  g_hand, d_hand = paper_param_count_by_hand()
  n_g, n_d = count(shapes["params"]), count(d_shapes["params"])
  print(f"paper G_ani params: {n_g:,}  D_mou params: {n_d:,}")
  assert n_g == g_hand and n_d == d_hand
  assert 15e6 < n_g < 35e6 and 1e6 < n_d < 5e6


def test_paper_preset_jit_forward():
  cfg = animation.paper_config()
  model = animation.AnimationGenerator(cfg)
  variables = random_variables(model, *animation.dummy_inputs(cfg, 1, 16))
  rng = np.random.default_rng(8)
  audio = rng.normal(size=(2, 1000, 15)).astype(np.float32)
  image = rng.uniform(0, 1, (2, 128, 128, 3)).astype(np.float32)
  fwd = jax.jit(lambda v, a, i: model.apply(v, a, i))
  t0 = time.perf_counter()
  out = jax.block_until_ready(fwd(variables, audio, image))
  t1 = time.perf_counter()
  jax.block_until_ready(fwd(variables, audio, image))
  t2 = time.perf_counter()
  print(f"paper G_ani B=2 T=1000: compile+run {t1 - t0:.2f}s, run {t2 - t1:.2f}s")
  assert out["mouth"].shape == (2, 1000, 28) and out["head"].shape == (2, 1000, 5)
  assert np.isfinite(np.asarray(out["mouth"])).all()
