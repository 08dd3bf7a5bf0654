"""Losses against NumPy references, closed forms and known values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdtf_jax import losses


def _np_temporal_ssim(x, y, c1, c2):
  """Independent loop reference: SSIM per (sequence, parameter) over time, then the mean."""
  vals = []
  for b in range(x.shape[0]):
    for d in range(x.shape[2]):
      xs, ys = x[b, :, d].astype(np.float64), y[b, :, d].astype(np.float64)
      mx, my = xs.mean(), ys.mean()
      vx, vy = xs.var(), ys.var()  # ddof = 0
      cov = np.mean((xs - mx) * (ys - my))
      vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
  return np.mean(vals)


@pytest.fixture(scope="module")
def seqs():
  rng = np.random.default_rng(0)
  t = np.linspace(0, 8, 120)[None, :, None]
  base = np.sin(t * rng.uniform(0.5, 3, (3, 1, 5)) + rng.uniform(0, 6, (3, 1, 5)))
  other = 0.7 * base + 0.2 * rng.normal(size=base.shape)
  return base.astype(np.float32), other.astype(np.float32)


def test_l1_plain_masked_and_lists():
  rng = np.random.default_rng(1)
  p, t = rng.normal(size=(2, 2, 6, 4)).astype(np.float32)
  np.testing.assert_allclose(losses.l1_loss(p, t), np.abs(p - t).mean(), rtol=1e-6)
  frame_mask = np.zeros((2, 6), np.float32)
  frame_mask[:, :3] = 1  # per-frame mask, broadcast over the parameters
  np.testing.assert_allclose(losses.l1_loss(p, t, frame_mask), np.abs(p - t)[:, :3].mean(),
                             rtol=1e-6)
  assert float(losses.l1_loss(p, t, np.zeros((2, 6)))) == 0.0  # all masked: 0, not NaN
  np.testing.assert_allclose(losses.l1_loss([p, 2 * p], [t, 2 * t]), 3 * np.abs(p - t).mean(),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="shapes"):
    losses.l1_loss(p, t[:, :5])


def test_lsgan_known_values():
  fake = jnp.array([0.0, 1.0, 2.0])
  assert float(losses.lsgan_generator_loss(fake)) == pytest.approx(2 / 3)
  assert float(losses.lsgan_discriminator_loss(jnp.ones(4), jnp.zeros(4))) == 0.0
  assert float(losses.lsgan_discriminator_loss(jnp.zeros(2), jnp.ones(3))) == pytest.approx(2.0)
  # Two heads (scales) add up; real 0.5 -> 0.25, fake 0.5 -> 0.25 per head.
  real = [jnp.full((2, 8, 1), 0.5), jnp.full((2, 4, 1), 0.5)]
  fake_l = [jnp.full((2, 8, 1), 0.5), jnp.full((2, 4, 1), 0.5)]
  assert float(jax.jit(losses.lsgan_discriminator_loss)(real, fake_l)) == pytest.approx(1.0)
  assert float(losses.lsgan_generator_loss(fake_l)) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="heads"):
    losses.lsgan_discriminator_loss(real, fake_l[:1])


def test_temporal_ssim_identical_and_reference(seqs):
  x, y = seqs
  assert float(losses.temporal_ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
  assert float(losses.temporal_ssim_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
  const = np.full((2, 50, 5), 0.3, np.float32)  # constant tracks: the constants keep it finite
  assert float(losses.temporal_ssim(const, const)) == pytest.approx(1.0, abs=1e-6)
  for c1, c2 in [(losses.DEFAULT_C1, losses.DEFAULT_C2), (0.01, 0.1)]:
    got = jax.jit(lambda a, b: losses.temporal_ssim(a, b, c1=c1, c2=c2))(x, y)
    np.testing.assert_allclose(got, _np_temporal_ssim(x, y, c1, c2), rtol=1e-5)


@pytest.mark.parametrize("scale,shift", [(2.0, 0.0), (0.5, 1.0), (1.0, 0.5)])
def test_temporal_ssim_closed_form_affine(seqs, scale, shift):
  x, _ = seqs
  x = x + 1.5  # nonzero means so the luminance term is exercised
  y = scale * x + shift
  # y = a x + b: mu_y = a mu_x + b, var_y = a^2 var_x, cov = a var_x.
  mu, var = x.astype(np.float64).mean(1), x.astype(np.float64).var(1)
  muy = scale * mu + shift
  c1, c2 = 1e-4, 9e-4
  expect = ((2 * mu * muy + c1) * (2 * scale * var + c2)
            / ((mu ** 2 + muy ** 2 + c1) * ((1 + scale ** 2) * var + c2))).mean()
  np.testing.assert_allclose(losses.temporal_ssim(x, y, c1=c1, c2=c2), expect, rtol=1e-5)
  if shift == 0.0:  # pure scaling, negligible constants: 4 a^2 / (1 + a^2)^2
    np.testing.assert_allclose(losses.temporal_ssim(x, y, c1=0.0, c2=0.0),
                               4 * scale ** 2 / (1 + scale ** 2) ** 2, rtol=1e-5)


def test_temporal_ssim_mask_equals_truncation_and_grads_finite(seqs):
  x, y = seqs
  mask = np.zeros(x.shape[:2], np.float32)
  mask[0, :70], mask[1, :100], mask[2, :] = 1, 1, 1
  truncated = np.mean([_np_temporal_ssim(x[i:i + 1, :n], y[i:i + 1, :n], 1e-4, 9e-4)
                       for i, n in enumerate([70, 100, 120])])
  np.testing.assert_allclose(losses.temporal_ssim(x, y, mask=mask), truncated, rtol=1e-5)
  mask[1] = 0  # a fully padded sequence is left out, not counted as 0
  truncated = np.mean([_np_temporal_ssim(x[i:i + 1, :n], y[i:i + 1, :n], 1e-4, 9e-4)
                       for i, n in [(0, 70), (2, 120)]])
  np.testing.assert_allclose(losses.temporal_ssim(x, y, mask=mask), truncated, rtol=1e-5)
  for a in (x, np.zeros_like(x)):  # identical and constant inputs: no NaN gradients
    g = jax.grad(lambda p: losses.temporal_ssim_loss(p, a))(jnp.asarray(a))
    assert np.all(np.isfinite(g))
  with pytest.raises(ValueError, match="mask"):
    losses.temporal_ssim(x, y, mask=mask[:, :10])


def test_feature_matching_values_and_stop_gradient():
  rng = np.random.default_rng(2)
  real = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(2, 32, 8), (2, 16, 8), (2, 8, 4)]]
  assert float(losses.feature_matching_loss(real, real)) == 0.0
  fake = [r + 0.5 for r in real]
  assert float(losses.feature_matching_loss(real, fake)) == pytest.approx(1.5, rel=1e-6)
  assert float(losses.feature_matching_loss(real, fake, weights=[1, 0, 3])) == pytest.approx(2.0)
  # Two discriminators, nested lists: the terms add up.
  nested = losses.feature_matching_loss([real, real[:1]], [fake, fake[:1]])
  assert float(nested) == pytest.approx(2.0)
  g_real, g_fake = jax.grad(losses.feature_matching_loss, argnums=(0, 1))(real, fake)
  assert all(float(jnp.abs(g).sum()) == 0.0 for g in g_real)
  np.testing.assert_allclose(g_fake[2], np.full(real[2].shape, 1 / real[2].size), rtol=1e-6)
  with pytest.raises(ValueError, match="structures"):
    losses.feature_matching_loss(real, fake[:2])
  with pytest.raises(ValueError, match="weights"):
    losses.feature_matching_loss(real, fake, weights=[1.0])


def test_perceptual_loss_weights_and_target_constant():
  rng = np.random.default_rng(3)
  a = [jnp.asarray(rng.normal(size=(1, 16, 16, 4)), jnp.float32),
       jnp.asarray(rng.normal(size=(1, 8, 8, 8)), jnp.float32)]
  b = [x * 0.5 for x in a]
  ref = sum(w * np.abs(np.asarray(x) - np.asarray(y)).mean() for w, x, y in zip([1.0, 3.0], a, b))
  np.testing.assert_allclose(jax.jit(losses.perceptual_loss)(a, b, [1.0, 3.0]), ref, rtol=1e-6)
  assert float(losses.perceptual_loss(a, a)) == 0.0
  g_b = jax.grad(losses.perceptual_loss, argnums=1)(a, b)
  assert all(float(jnp.abs(g).sum()) == 0.0 for g in g_b)
