"""Training losses for both stages (PAPER.md §3, §4): pure, jittable, batched JAX functions.

Conventions shared by every function here:
- Each returns a float32 scalar.
- "Several heads" (multi-scale discriminators, several discriminators, VGG layers) come as a
  list (or tuple, or any pytree) of arrays; the loss is the SUM of the per-head losses, each
  head's loss being a mean over its own elements. So one head gives the plain mean, and adding a
  scale adds a term, as in First-Order-Motion-Model and pix2pixHD (per-term weights are the
  caller's business: they are the paper's lambdas).
- Masks are 0/1 (or fractional) weights; a masked mean is sum(w * x) / sum(w), and 0 when every
  weight is 0 (so padded batches never produce NaN).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayOrList = Any  # an array, or a list/tuple/pytree of arrays

# Temporal-SSIM constants: SSIM's usual K1 = 0.01, K2 = 0.03 with a dynamic range of 1, i.e. the
# scale of expression coefficients (blendshape-like weights in about [0, 1]) and of head angles
# in radians. They only keep the ratio finite for constant sequences; see `temporal_ssim`.
DEFAULT_C1 = 1e-4
DEFAULT_C2 = 9e-4


def _leaves(x: ArrayOrList) -> list[Array]:
  leaves = jax.tree_util.tree_leaves(x)
  if not leaves:
    raise ValueError("expected an array or a non-empty list of arrays, got an empty container")
  return leaves


def _paired_leaves(a: ArrayOrList, b: ArrayOrList, what: str) -> list[tuple[Array, Array]]:
  sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
  if sa != sb:
    raise ValueError(f"{what}: the two inputs have different structures: {sa} vs {sb}")
  pairs = list(zip(_leaves(a), _leaves(b)))
  for i, (x, y) in enumerate(pairs):
    if x.shape != y.shape:
      raise ValueError(f"{what}: entry {i} has shapes {x.shape} and {y.shape}; they must match")
  return pairs


def masked_mean(values: Array, mask: Array | None) -> Array:
  """Mean of `values`; with `mask` (broadcastable, or missing the last axis) a weighted mean."""
  values = values.astype(jnp.float32)
  if mask is None:
    return jnp.mean(values)
  mask = jnp.asarray(mask, jnp.float32)
  if mask.ndim == values.ndim - 1:
    mask = mask[..., None]  # a per-frame mask for (..., T, D) values
  try:
    mask = jnp.broadcast_to(mask, values.shape)
  except ValueError as e:
    raise ValueError(f"mask of shape {mask.shape} does not broadcast to {values.shape}") from e
  total = jnp.sum(mask)
  return jnp.where(total > 0, jnp.sum(values * mask) / jnp.where(total > 0, total, 1.0), 0.0)


def l1_loss(pred: ArrayOrList, target: ArrayOrList, mask: Array | None = None) -> Array:
  """Mean absolute error; summed over entries when given lists.

  pred, target: arrays of the same shape, e.g. (B, T, 28) mouth parameters (or matching lists).
  mask: optional weights, same shape or broadcastable, or `pred.shape[:-1]` (per frame, e.g.
    (B, T) to ignore padded frames); applied to every entry of a list.
  """
  pairs = _paired_leaves(pred, target, "l1_loss")
  return sum(masked_mean(jnp.abs(p - t), mask) for p, t in pairs)


def lsgan_generator_loss(fake_logits: ArrayOrList) -> Array:
  """Least-squares GAN generator loss: mean((D(fake) - 1)^2), summed over heads.

  fake_logits: any shape, e.g. (B, T', C) from a parameter discriminator or (B, H', W', 1)
  patch logits; or a list of them. No 1/2 factor (see `lsgan_discriminator_loss`).
  """
  return sum(jnp.mean(jnp.square(f.astype(jnp.float32) - 1.0)) for f in _leaves(fake_logits))


def lsgan_discriminator_loss(real_logits: ArrayOrList, fake_logits: ArrayOrList) -> Array:
  """Least-squares GAN discriminator loss: mean((D(real) - 1)^2) + mean(D(fake)^2), summed
  over heads.

  The 1/2 of Mao et al. (2017) is left out, as in First-Order-Motion-Model whose patch
  discriminator stage 2 uses: with Adam a constant factor on the loss barely changes the steps,
  and without it the generator and discriminator terms have the same scale. `fake_logits` should
  come from stop-gradient generator outputs (the caller's job). Real and fake heads must pair up;
  their shapes may differ (e.g. different batch sizes).
  """
  real, fake = _leaves(real_logits), _leaves(fake_logits)
  if len(real) != len(fake):
    raise ValueError(f"lsgan_discriminator_loss: {len(real)} real heads but {len(fake)} fake heads")
  return sum(jnp.mean(jnp.square(r.astype(jnp.float32) - 1.0))
             + jnp.mean(jnp.square(f.astype(jnp.float32))) for r, f in zip(real, fake))


def temporal_ssim_map(pred: Array, target: Array, *, c1: float = DEFAULT_C1,
                      c2: float = DEFAULT_C2, mask: Array | None = None) -> Array:
  """Per-sequence, per-parameter SSIM over time: (..., T, D) -> (..., D).

  For every parameter the means, variances (ddof=0, i.e. divided by the number of frames, as in
  Wang et al.'s SSIM) and covariance over time give
      ((2 mu_x mu_y + c1)(2 cov_xy + c2)) / ((mu_x^2 + mu_y^2 + c1)(var_x + var_y + c2)).
  mask: optional (..., T) frame weights; statistics become weighted (padded frames excluded).
  """
  if pred.shape != target.shape or pred.ndim < 2:
    raise ValueError(f"temporal_ssim: pred and target must both be (..., T, D), got {pred.shape} "
                     f"and {target.shape}")
  x, y = pred.astype(jnp.float32), target.astype(jnp.float32)
  if mask is None:
    w = jnp.ones(x.shape[:-1] + (1,), jnp.float32)
  else:
    if mask.shape != x.shape[:-1]:
      raise ValueError(f"temporal_ssim: mask must be {x.shape[:-1]} (..., T), got {mask.shape}")
    w = jnp.asarray(mask, jnp.float32)[..., None]
  n = jnp.maximum(jnp.sum(w, axis=-2), 1e-12)  # (..., 1)
  mean = lambda v: jnp.sum(w * v, axis=-2) / n
  mu_x, mu_y = mean(x), mean(y)
  dx, dy = x - mu_x[..., None, :], y - mu_y[..., None, :]
  var_x, var_y, cov = mean(dx * dx), mean(dy * dy), mean(dx * dy)
  return (((2 * mu_x * mu_y + c1) * (2 * cov + c2))
          / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))


def temporal_ssim(pred: Array, target: Array, *, c1: float = DEFAULT_C1, c2: float = DEFAULT_C2,
                  mask: Array | None = None) -> Array:
  """Temporal SSIM of parameter sequences (PAPER.md §3), averaged over parameters and batch.

  pred, target: (B, T, D) (any leading batch dims, or just (T, D)), e.g. eyebrow (D=5) or head
    pose (D=5) tracks over a window.
  c1, c2: stabilisers. Parameters are not images in [0, 1], so there is no natural dynamic
    range; the defaults (1e-4, 9e-4) are SSIM's (0.01 L)^2, (0.03 L)^2 for L = 1, the scale of
    expression coefficients and radians. They matter most when a sequence is nearly constant:
    the structure term is then about c2 / (var_target + c2). Larger values make the loss more
    forgiving of small wiggles; scale them with your parameters' range.
  mask: optional (B, T) frame weights; sequences whose mask is all zero are left out of the
    average (0 if none is left).
  Returns a scalar in [-1, 1]; 1 for identical sequences.
  """
  s = temporal_ssim_map(pred, target, c1=c1, c2=c2, mask=mask)  # (..., D)
  if mask is None:
    return jnp.mean(s)
  valid = (jnp.sum(jnp.asarray(mask, jnp.float32), axis=-1) > 0).astype(jnp.float32)  # (...,)
  return masked_mean(s, valid[..., None] * jnp.ones_like(s))


def temporal_ssim_loss(pred: Array, target: Array, *, c1: float = DEFAULT_C1,
                       c2: float = DEFAULT_C2, mask: Array | None = None) -> Array:
  """1 - temporal_ssim: the eyebrow and head-pose reconstruction loss of stage 1."""
  return 1.0 - temporal_ssim(pred, target, c1=c1, c2=c2, mask=mask)


def feature_matching_loss(real_feats: ArrayOrList, fake_feats: ArrayOrList,
                          weights: Sequence[float] | None = None) -> Array:
  """Discriminator feature matching: sum over layers of mean |D_l(real) - D_l(fake)|.

  real_feats, fake_feats: the discriminator's intermediate activations on the real and the
    generated input, as lists of arrays (one per layer) with matching shapes; a list of such
    lists (several discriminators or scales) is flattened in order. The real side is wrapped in
    stop_gradient, so only the generator is pulled towards the real statistics.
  weights: optional per-layer factors (one per flattened entry); default 1 each. Summing (rather
    than averaging) over layers follows First-Order-Motion-Model, whose stage-2 discriminator
    this matches; the paper's lambda (10) multiplies the result.
  """
  pairs = _paired_leaves(real_feats, fake_feats, "feature_matching_loss")
  weights = _check_weights(weights, len(pairs), "feature_matching_loss")
  return sum(w * jnp.mean(jnp.abs(jax.lax.stop_gradient(r).astype(jnp.float32)
                                  - f.astype(jnp.float32)))
             for w, (r, f) in zip(weights, pairs))


def perceptual_loss(feats_a: ArrayOrList, feats_b: ArrayOrList,
                    weights: Sequence[float] | None = None) -> Array:
  """Perceptual (VGG) loss: sum over layers of weight_l * mean |a_l - b_l|.

  feats_a: features of the generated image, e.g. the VGG-19 relu1_1 ... relu5_1 activations
    from `hdtf_jax.nn.vgg` as a list of (B, H_l, W_l, C_l) arrays.
  feats_b: the same layers for the target image; treated as constants (stop_gradient).
  weights: per-layer factors, default 1 each (the paper's lambda = 10 multiplies the result).
  """
  pairs = _paired_leaves(feats_a, feats_b, "perceptual_loss")
  weights = _check_weights(weights, len(pairs), "perceptual_loss")
  return sum(w * jnp.mean(jnp.abs(a.astype(jnp.float32)
                                  - jax.lax.stop_gradient(b).astype(jnp.float32)))
             for w, (a, b) in zip(weights, pairs))


def _check_weights(weights: Sequence[float] | None, n: int, what: str) -> Sequence[float]:
  if weights is None:
    return [1.0] * n
  if len(weights) != n:
    raise ValueError(f"{what}: {len(weights)} weights given for {n} feature layers")
  return weights
