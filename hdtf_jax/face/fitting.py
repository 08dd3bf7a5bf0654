"""Fit the morphable model to landmark tracks: per-clip shape + scale, per-frame pose + expression.

Objective (scaled-orthographic camera of `morphable`; residuals in pixels / landmark_sigma_px):

    sum_t,v |scale * (R_t w_tv)[:2] + T_t - x_tv|^2 / sigma^2   (+ z_weight^2 * the z term)
    + shape_prior * |shape / shape_std|^2 + sum_t mouth_prior * |mouth_t|^2
    + eyebrow_prior * |eyebrow_t|^2 + sum_t temporal_* * |theta_t - theta_t-1|^2

with w_t = mean + shape_basis . shape + expression_basis . [mouth_t, eyebrow_t], expression
coefficients kept inside the model's `expression_bounds`. Translations T_t (and the unknown depth
offset of 3-column landmarks) are eliminated exactly by centring prediction and observation over
the vertices, and recovered in closed form at the end. Per frame the solver sees 3 angles + E
expression coefficients; per clip, scale + S shape coefficients.

1. Start: per frame, the least-squares affine camera from the mean to the landmarks, made a
   scaled rotation; the clip scale (the median) becomes the working unit.
2. Warm-up (`warmup_iterations`): Levenberg-Marquardt on the head angles of every frame at once,
   each frame accepting or rejecting its own step, shape and expressions held at zero (letting
   expressions move before the shape would let them soak up the identity).
3. Joint Levenberg-Marquardt (`iterations`) over everything: the normal equations have one
   block per frame plus the shared (scale, shape) block; the frame blocks are eliminated (Schur
   complement, one GEMM over all frames), the shared system is solved and the frames are
   back-substituted. Bounds: coefficients at a bound whose gradient pushes outward are held
   (active set); steps are clipped into the bounds.

Every term of the normal equations is the inner product of a 3x3 matrix (built from R, dR/dangle
and the depth weights) with a moment of the stacked bases U = [mean, shape, expression]: the
basis Gram tensor sum_v U_k U_l^T (precomputed per model) and the observation moments
sum_v U_k o^T (one GEMM per clip). An iteration therefore never touches the 468 vertices; its cost
is a few small GEMMs and one 36x36 Cholesky per frame.

Temporal smoothness couples neighbouring frames Jacobi-style: a frame is pulled towards its
neighbours' estimates of the previous iteration (each iteration warm-starts from the last); the
joint accept/reject test uses the exact coupled cost. Frames with `found == False` do not enter
the fit; their parameters are linearly interpolated (held at the ends) and their residual is NaN.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hdtf_jax.face import morphable
from hdtf_jax.face.morphable import MorphableModel


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Iteration counts and weights. Weights are relative to the landmark term, whose residuals
  are pixels divided by `landmark_sigma_px`."""
  warmup_iterations: int = 2       # per-frame LM iterations of the head angles alone
  iterations: int = 10             # joint LM iterations (all parameters)
  landmark_sigma_px: float = 1.0
  z_weight: float = 0.0            # weight of landmark depth (3-column input) relative to x, y
  shape_prior: float = 1.0         # on shape / shape_std
  mouth_prior: float = 10.0
  eyebrow_prior: float = 10.0
  temporal_expression: float = 1.0  # on frame-to-frame expression differences
  temporal_pose: float = 100.0      # on frame-to-frame angle differences (radians)
  damping: float = 1e-3            # initial Levenberg-Marquardt damping (relative to diag)


class FitResult(NamedTuple):
  """Fitted parameters of one clip (T frames); a pytree of jnp arrays."""
  shape: jax.Array        # (S,)
  scale: jax.Array        # ()   pixels per model unit
  mouth: jax.Array        # (T, M)
  eyebrow: jax.Array      # (T, B)
  pose: jax.Array         # (T, 5) yaw, pitch, roll (radians), tx, ty (pixels)
  residual_px: jax.Array  # (T,) RMS 2-D landmark error per frame, NaN where not found


class _Arrays(NamedTuple):
  """Model arrays prepared for the solver. U stacks the centred [mean, shape bases, expression
  bases] (K = 1 + S + E rows); every term of the normal equations is an inner product of a 3x3
  matrix with a moment of U, so an iteration never touches the V vertices."""
  basis: jax.Array        # (K, 3V) coordinate-major, centred over vertices
  gram: jax.Array         # (K, K, 9): gram[k, l, 3c + d] = sum_v U[k, c, v] U[l, d, v]
  gram_lk: jax.Array      # (K, K * 9): gram[k, l] at row l, for a @ gram_lk = sum_l a_l gram[:, l]
  centroid: jax.Array     # (K, 3) mean over vertices of the raw (uncentred) rows
  shape_std: jax.Array    # (S,)
  lower: jax.Array        # (E,) expression bounds
  upper: jax.Array        # (E,)


@functools.lru_cache(maxsize=8)
def _prepare(model: MorphableModel) -> _Arrays:
  u = np.concatenate([model.mean[None], model.shape_basis, model.expression_basis]).astype(
      np.float64)                                               # (K, V, 3)
  centroid = u.mean(1)
  u_c = u - centroid[:, None]
  gram = np.einsum("kvc,lvd->klcd", u_c, u_c).reshape(len(u), len(u), 9)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  gram_lk = np.swapaxes(gram, 0, 1).reshape(len(u), -1)
  return _Arrays(f32(np.swapaxes(u_c, 1, 2).reshape(len(u), -1)), f32(gram), f32(gram_lk),
                 f32(centroid),
                 f32(model.shape_std), f32(model.expression_bounds[:, 0]),
                 f32(model.expression_bounds[:, 1]))


def _mm3(a, b):
  """Batched 3x3 matrix product as a broadcast multiply-sum (tiny dots are slow on CPU)."""
  return jnp.sum(a[..., :, :, None] * b[..., None, :, :], -2)


def _rotation_and_grads(angles):
  """R = Rz(roll) Rx(pitch) Ry(yaw) (T, 3, 3) and dR/d(yaw, pitch, roll) (T, 3, 3, 3)."""
  c, s = jnp.cos(angles), jnp.sin(angles)
  zero, one = jnp.zeros_like(c[:, 0]), jnp.ones_like(c[:, 0])
  mat = lambda rows: jnp.stack([jnp.stack(r, -1) for r in rows], -2)
  cy, cp, cr, sy, sp, sr = c[:, 0], c[:, 1], c[:, 2], s[:, 0], s[:, 1], s[:, 2]
  ry = mat([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
  rx = mat([[one, zero, zero], [zero, cp, -sp], [zero, sp, cp]])
  rz = mat([[cr, -sr, zero], [sr, cr, zero], [zero, zero, one]])
  dry = mat([[-sy, zero, cy], [zero, zero, zero], [-cy, zero, -sy]])
  drx = mat([[zero, zero, zero], [zero, -sp, -cp], [zero, cp, -sp]])
  drz = mat([[-sr, -cr, zero], [cr, -sr, zero], [zero, zero, zero]])
  zx = _mm3(rz, rx)
  rot = _mm3(zx, ry)
  grads = jnp.stack([_mm3(zx, dry), _mm3(_mm3(rz, drx), ry), _mm3(_mm3(drz, rx), ry)], 1)
  return rot, grads


def _euler_from_rotation(rot):
  """Inverse of `morphable.rotation_matrix` (pitch within +-90 degrees)."""
  pitch = jnp.arcsin(jnp.clip(rot[..., 2, 1], -1.0, 1.0))
  yaw = jnp.arctan2(-rot[..., 2, 0], rot[..., 2, 2])
  roll = jnp.arctan2(-rot[..., 0, 1], rot[..., 1, 1])
  return jnp.stack([yaw, pitch, roll], -1)


def _initial_pose(mean_gram, mean_obs):
  """Per frame: the least-squares affine camera from the centred mean to the centred landmarks
  (from the moments sum_v m m^T (3, 3) and sum_v m o^T (3, 3)), made a scaled rotation."""
  affine = jnp.linalg.solve(mean_gram, mean_obs[:, :2]).T      # (2, 3)
  u, sv, vt = jnp.linalg.svd(affine, full_matrices=False)
  rows = u @ vt                                                # nearest orthonormal rows
  rot = jnp.concatenate([rows, jnp.cross(rows[0], rows[1])[None]], 0)
  return _euler_from_rotation(rot), sv.mean()


def _inner(a, b):
  """<A, B> = sum_cd A_cd B_cd over a trailing axis of 9 (flattened 3x3), broadcasting."""
  return jnp.sum(a * b, -1)


class _Frames(NamedTuple):
  """Gauss-Newton pieces of every frame (F = 3 + E frame unknowns, 1 + S shared unknowns)."""
  cost: jax.Array    # (T,)
  h_ff: jax.Array    # (T, F, F)
  g_f: jax.Array     # (T, F)
  h_fs: jax.Array    # (T, F, 1 + S)
  h_sc: jax.Array    # (T, 1 + S) row (scale, [scale, shape]) of the shared block
  g_s: jax.Array     # (T, 1 + S)
  metric: jax.Array  # (T, 9) R^T D R, for the shape-shape block


def _frames(theta, shape, scale, obs_moments, obs_energy, arrays: _Arrays, depth) -> _Frames:
  """Normal equations of all frames from moments. Residual r_v = scale R w_v - o_v in camera
  space, weighted by D = diag(depth); w = sum_k a_k U_k with a = (1, shape, expression)."""
  t_frames, n_e = theta.shape[0], theta.shape[1] - 3
  n_s = shape.shape[0]
  k = 1 + n_s + n_e
  a = jnp.concatenate([jnp.ones((t_frames, 1)), jnp.broadcast_to(shape, (t_frames, n_s)),
                       theta[:, 3:]], 1)                                        # (T, K)
  phi = (a @ arrays.gram_lk).reshape(t_frames, k, 9)                 # sum_v U_k w^T
  c_ww = jnp.sum(a[:, :, None] * phi, 1)                              # sum_v w w^T
  c_wo = jnp.sum(a[:, :, None] * obs_moments, 1)                      # sum_v w o^T
  rot, drot = _rotation_and_grads(theta[:, :3])                      # (T,3,3), (T,3,3,3)
  flat = lambda x: x.reshape(x.shape[:-2] + (9,))
  rt_d = jnp.swapaxes(rot, -1, -2) * depth                            # R^T D
  drt_d = jnp.swapaxes(drot, -1, -2) * depth                          # dR_a^T D
  metric = flat(_mm3(rt_d, rot))                                      # R^T D R     (T, 9)
  rd = flat(rt_d)
  m_ang = flat(_mm3(rt_d[:, None], drot))                             # R^T D dR_a  (T, 3, 9)
  n_ang = flat(_mm3(drt_d[:, :, None], drot[:, None]))                # dR_a^T D dR_b (T,3,3,9)
  drd_r = flat(_mm3(drt_d, rot[:, None]))                             # dR_a^T D R  (T, 3, 9)
  drd = flat(drt_d)                                                   # dR_a^T D    (T, 3, 9)
  s2 = scale ** 2
  e_sl = slice(1 + n_s, k)
  s_sl = slice(1, 1 + n_s)
  phi_e, phi_s = phi[:, e_sl], phi[:, s_sl]
  cost = s2 * _inner(metric, c_ww) - 2 * scale * _inner(rd, c_wo) + obs_energy
  h_aa = s2 * _inner(n_ang, c_ww[:, None, None])
  h_ea = s2 * _inner(phi_e[:, :, None], m_ang[:, None])               # (T, E, 3)
  gram_e = arrays.gram[e_sl, e_sl].reshape(-1, 9)
  h_ee = s2 * (metric @ gram_e.T).reshape(t_frames, n_e, n_e)
  h_ff = jnp.concatenate([jnp.concatenate([h_aa, jnp.swapaxes(h_ea, 1, 2)], 2),
                          jnp.concatenate([h_ea, h_ee], 2)], 1)
  g_a = s2 * _inner(drd_r, c_ww[:, None]) - scale * _inner(drd, c_wo[:, None])
  g_e = s2 * _inner(phi_e, metric[:, None]) - scale * _inner(obs_moments[:, e_sl], rd[:, None])
  g_f = jnp.concatenate([g_a, g_e], 1)
  # Frame-shared coupling (scale first, then shape).
  h_a_scale = scale * _inner(m_ang, c_ww[:, None])                    # (T, 3)
  h_e_scale = scale * _inner(phi_e, metric[:, None])                  # (T, E)
  h_a_shape = s2 * _inner(phi_s[:, None], m_ang[:, :, None])          # (T, 3, S)
  gram_es = arrays.gram[e_sl, s_sl].reshape(-1, 9)
  h_e_shape = s2 * (metric @ gram_es.T).reshape(t_frames, n_e, n_s)
  h_fs = jnp.concatenate([
      jnp.concatenate([h_a_scale, h_e_scale], 1)[:, :, None],
      jnp.concatenate([h_a_shape, h_e_shape], 1)], 2)
  h_sc = jnp.concatenate([_inner(metric, c_ww)[:, None],
                          scale * _inner(phi_s, metric[:, None])], 1)
  g_s = jnp.concatenate([(scale * _inner(metric, c_ww) - _inner(rd, c_wo))[:, None],
                         s2 * _inner(phi_s, metric[:, None])
                         - scale * _inner(obs_moments[:, s_sl], rd[:, None])], 1)
  return _Frames(cost, h_ff, g_f, h_fs, h_sc, g_s, metric)


def _frames_cost(theta, shape, scale, obs_moments, obs_energy, arrays: _Arrays, depth):
  """Per-frame data cost only (cheaper than `_frames`)."""
  t_frames, n_s = theta.shape[0], shape.shape[0]
  k = arrays.gram.shape[0]
  a = jnp.concatenate([jnp.ones((t_frames, 1)), jnp.broadcast_to(shape, (t_frames, n_s)),
                       theta[:, 3:]], 1)
  phi = (a @ arrays.gram_lk).reshape(t_frames, k, 9)
  c_ww = jnp.sum(a[:, :, None] * phi, 1)
  c_wo = jnp.sum(a[:, :, None] * obs_moments, 1)
  rot = morphable.rotation_matrix(theta[:, :3])
  rt_d = jnp.swapaxes(rot, -1, -2) * depth
  metric = _mm3(rt_d, rot).reshape(t_frames, 9)
  rd = rt_d.reshape(t_frames, 9)
  return scale ** 2 * _inner(metric, c_ww) - 2 * scale * _inner(rd, c_wo) + obs_energy


def _neighbour_terms(theta, mask):
  """Sum of found neighbours' values and their count, per frame: (T, P) -> (T, P), (T,)."""
  m = mask.astype(theta.dtype)
  prev_v = jnp.concatenate([jnp.zeros_like(theta[:1]), theta[:-1] * m[:-1, None]], 0)
  next_v = jnp.concatenate([theta[1:] * m[1:, None], jnp.zeros_like(theta[:1])], 0)
  prev_m = jnp.concatenate([jnp.zeros(1, m.dtype), m[:-1]])
  next_m = jnp.concatenate([m[1:], jnp.zeros(1, m.dtype)])
  return prev_v + next_v, prev_m + next_m


def _regulariser(theta, mask, prior, temporal):
  """Prior + exact temporal cost over pairs of consecutive found frames."""
  m = mask.astype(theta.dtype)
  pair = m[1:] * m[:-1]
  diff = theta[1:] - theta[:-1]
  return (jnp.sum(m[:, None] * prior * theta ** 2)
          + jnp.sum(pair[:, None] * temporal * diff ** 2))


def _free_mask(theta, g, lower, upper):
  """1 for unknowns a step may move: angles, and coefficients not held at a bound (T, F)."""
  e = theta[:, 3:]
  held = ((e <= lower + 1e-6) & (g[:, 3:] > 0)) | ((e >= upper - 1e-6) & (g[:, 3:] < 0))
  return jnp.concatenate([jnp.ones_like(theta[:, :3], bool), ~held], 1).astype(theta.dtype)


def _clip(theta, arrays):
  return jnp.concatenate([theta[..., :3], jnp.clip(theta[..., 3:], arrays.lower, arrays.upper)],
                         -1)


def _regularised(h, g, theta, nbr_sum, nbr_count, prior, temporal, arrays, pose_only):
  """Adds prior and (Jacobi) temporal terms; holds coefficients at an active bound (and all
  coefficients when `pose_only`)."""
  eye = jnp.eye(h.shape[-1])
  reg = prior + temporal * nbr_count[:, None]                  # (T, F)
  h = h + reg[:, :, None] * eye
  g = g + prior * theta + temporal * (nbr_count[:, None] * theta - nbr_sum)
  free = _free_mask(theta, g, arrays.lower, arrays.upper)
  free = free * jnp.where(pose_only, jnp.arange(h.shape[-1]) < 3, True).astype(free.dtype)
  h = h * free[:, :, None] * free[:, None, :] + (1.0 - free)[:, :, None] * eye
  return h, g * free, free


def _damp(h, lam):
  """Levenberg-Marquardt: scale the diagonal by (1 + lam); lam () or (T,)."""
  lam = jnp.reshape(lam, jnp.shape(lam) + (1, 1))
  return h + lam * h * jnp.eye(h.shape[-1])


def _step(carry, warm, obs_moments, obs_energy, mask, arrays, depth, prior, temporal,
          shape_prior):
  """One Levenberg-Marquardt iteration. Joint (warm False): the per-frame blocks are eliminated
  (Schur complement) onto (scale, shape), the shared system solved, the frames back-substituted,
  and the step accepted if the exact total cost falls. Warm-up (warm True): only the head
  angles move (expressions would soak up the identity while the shape is still the mean), and
  every frame accepts or rejects its own step."""
  theta, shape, scale, lam, lam_shared = carry
  nbr_sum, nbr_count = _neighbour_terms(theta, mask)
  m = mask.astype(theta.dtype)
  joint = 1.0 - warm.astype(theta.dtype)
  fr = _frames(theta, shape, scale, obs_moments, obs_energy, arrays, depth)
  h, g, free = _regularised(fr.h_ff, fr.g_f, theta, nbr_sum, nbr_count, prior, temporal,
                            arrays, warm)
  h = _damp(h, lam)
  h_fs = fr.h_fs * free[:, :, None] * (m * joint)[:, None, None]
  g = g * m[:, None]
  # Per frame L L^T = H_ff and Z = L^-1 [H_fs | g]; then sum_t H_fs^T H_ff^-1 [H_fs | g] is
  # Z^T Z summed over frames: one GEMM over (frames x frame unknowns).
  chol = jnp.linalg.cholesky(h)
  z = jax.lax.linalg.triangular_solve(chol, jnp.concatenate([h_fs, g[:, :, None]], 2),
                                      left_side=True, lower=True)       # (T, F, 2 + S)
  zf = z.reshape(-1, z.shape[-1])
  reduced = zf.T @ zf
  n_s = shape.shape[0]
  h_sc = (fr.h_sc * m[:, None]).sum(0)
  gram_ss = arrays.gram[1:1 + n_s, 1:1 + n_s].reshape(-1, 9)
  h_ss = jnp.zeros((n_s + 1, n_s + 1)).at[0].set(h_sc).at[:, 0].set(h_sc)
  h_ss = h_ss.at[1:, 1:].set(scale ** 2 * (gram_ss @ (fr.metric * m[:, None]).sum(0)).reshape(
      n_s, n_s))
  w_shape = shape_prior / arrays.shape_std ** 2
  h_ss = _damp(h_ss + jnp.diag(jnp.concatenate([jnp.zeros(1), w_shape])), lam_shared)
  g_s = (fr.g_s * m[:, None]).sum(0) + jnp.concatenate([jnp.zeros(1), w_shape * shape])
  d_shared = -joint * jnp.linalg.solve(h_ss - reduced[:-1, :-1], g_s - reduced[:-1, -1])
  # Back-substitution: d_f = -H_ff^-1 (g + H_fs d_shared) = -L^-T (z_g + Z_fs d_shared).
  rhs = z[:, :, -1] + z[:, :, :-1] @ d_shared
  d_frames = -jax.lax.linalg.triangular_solve(chol, rhs[:, :, None], left_side=True,
                                              lower=True, transpose_a=True)[:, :, 0]
  new_theta = _interpolate_missing(_clip(theta + d_frames, arrays), mask)
  new_scale, new_shape = scale + d_shared[0], shape + d_shared[1:]
  new_costs = _frames_cost(new_theta, new_shape, new_scale, obs_moments, obs_energy, arrays,
                           depth)
  # Warm-up: each frame's own cost, neighbours held at their previous values.
  local = lambda x: jnp.sum(prior * x ** 2 + temporal * (nbr_count[:, None] * x ** 2
                                                         - 2 * x * nbr_sum), 1)
  frame_better = new_costs + local(new_theta) < fr.cost + local(theta)
  total = lambda th, sh, costs: (jnp.sum(costs * m) + _regulariser(th, mask, prior, temporal)
                                 + jnp.sum(w_shape * sh ** 2))
  all_better = total(new_theta, new_shape, new_costs) < total(theta, shape, fr.cost)
  better = jnp.where(warm, frame_better, all_better)
  shared_better = all_better & ~warm
  pick = lambda ok, a, b: jnp.where(ok, a, b)
  return (pick(better[:, None], new_theta, theta), pick(shared_better, new_shape, shape),
          pick(shared_better, new_scale, scale), pick(better, lam * 0.3, lam * 10.0),
          pick(shared_better, lam_shared * 0.3, jnp.where(warm, lam_shared, lam_shared * 10.0)))


def _interpolate_missing(values, mask):
  """Linear interpolation of (T, P) values over frames where mask is False (edges held)."""
  t = jnp.arange(values.shape[0], dtype=values.dtype)
  n_found = jnp.sum(mask)
  order = jnp.argsort(jnp.where(mask, t, jnp.inf))               # found frames first, in order
  rank = jnp.arange(values.shape[0])
  last = jnp.maximum(n_found - 1, 0)
  xp = jnp.where(rank < n_found, t[order], t[order[last]] + 1.0 + rank)  # keep xp increasing

  def col(v):
    fp = jnp.where(rank < n_found, v[order], v[order[last]])
    return jnp.interp(t, xp, fp)
  return jnp.where(mask[:, None], values, jax.vmap(col, in_axes=1, out_axes=1)(values))


@functools.partial(jax.jit, static_argnames=("config", "n_mouth", "use_z"))
def _fit_core(arrays: _Arrays, landmarks, found, config: FitConfig, n_mouth: int, use_z: bool):
  t_frames, n_vertices = landmarks.shape[:2]
  k = arrays.gram.shape[0]
  n_s = arrays.shape_std.shape[0]
  e = k - 1 - n_s
  mask = found & jnp.all(jnp.isfinite(landmarks), axis=(1, 2))
  obs = jnp.swapaxes(jnp.where(mask[:, None, None], landmarks, 0.0), 1, 2)   # (T, 3, V)
  if not use_z:
    obs = obs.at[:, 2].set(0.0)
  obs_mean = obs.mean(2)
  obs_c = obs - obs_mean[:, :, None]
  depth = jnp.array([1.0, 1.0, config.z_weight ** 2 if use_z else 0.0], jnp.float32)
  # Moments of the (centred) observations with every basis row: the only pass over vertices.
  raw_moments = (arrays.basis.reshape(k * 3, n_vertices)
                 @ obs_c.reshape(t_frames * 3, n_vertices).T)            # (3K, 3T)
  raw_moments = raw_moments.reshape(k, 3, t_frames, 3).transpose(2, 0, 1, 3)   # (T, K, 3, 3)
  angles, scales = jax.vmap(_initial_pose, in_axes=(None, 0))(
      arrays.gram[0, 0].reshape(3, 3), raw_moments[:, 0])
  # Work in units of the initial scale (model units ~ observation units) for float32 health;
  # pixel-space weights scale by (sigma / unit)^2.
  unit = jnp.nanmedian(jnp.where(mask, scales, jnp.nan))
  obs_moments = raw_moments.reshape(t_frames, k, 9) / unit
  obs_energy = jnp.sum(obs_c ** 2 * depth[:, None], axis=(1, 2)) / unit ** 2
  to_units = (config.landmark_sigma_px / unit) ** 2
  prior = to_units * jnp.concatenate([jnp.zeros(3), jnp.full(n_mouth, config.mouth_prior),
                                      jnp.full(e - n_mouth, config.eyebrow_prior)])
  temporal = to_units * jnp.concatenate([jnp.full(3, config.temporal_pose),
                                         jnp.full(e, config.temporal_expression)])
  shape_prior = to_units * config.shape_prior

  theta = _interpolate_missing(_clip(jnp.concatenate([angles, jnp.zeros((t_frames, e))], 1),
                                     arrays), mask)
  shape = jnp.zeros(n_s)
  scale = jnp.ones(())

  def body(it, carry):
    return _step(carry, it < config.warmup_iterations, obs_moments, obs_energy, mask, arrays,
                 depth, prior, temporal, shape_prior)
  damping = jnp.asarray(config.damping, jnp.float32)
  theta, shape, scale, _, _ = jax.lax.fori_loop(
      0, config.warmup_iterations + config.iterations, body,
      (theta, shape, scale, jnp.full((t_frames,), damping), damping))

  # Translation in closed form: observed centroid minus the projected model centroid.
  scale_px = scale * unit
  a = jnp.concatenate([jnp.ones((t_frames, 1)), jnp.broadcast_to(shape, (t_frames, n_s)),
                       theta[:, 3:]], 1)
  rot = morphable.rotation_matrix(theta[:, :3])
  centroid = a @ arrays.centroid                                   # (T, 3)
  trans = obs_mean[:, :2] - scale_px * jnp.einsum("tc,tkc->tk", centroid, rot[:, :2])
  pose = jnp.concatenate([theta[:, :3], _interpolate_missing(trans, mask)], 1)
  verts = (a @ arrays.basis).reshape(t_frames, 3, n_vertices) + centroid[:, :, None]
  pred = morphable.project(jnp.swapaxes(verts, 1, 2), pose, scale_px)
  err = jnp.sqrt(jnp.mean(jnp.sum((pred - landmarks[..., :2]) ** 2, -1), -1))
  return FitResult(shape=shape, scale=scale_px, mouth=theta[:, 3:3 + n_mouth],
                   eyebrow=theta[:, 3 + n_mouth:], pose=pose,
                   residual_px=jnp.where(mask, err, jnp.nan))


def fit_clip(model: MorphableModel, landmarks, found=None, config: FitConfig = FitConfig(),
             pad_to: int = 16) -> FitResult:
  """Fits one clip: landmarks (T, V, 2|3) pixels (x right, y down; z in x's scale if given),
  found (T,) bool (default: all frames; frames holding NaN count as lost).

  The clip is padded with lost frames up to a multiple of `pad_to`, so clips of similar length
  share one compilation; the result covers the T input frames. Returns jnp arrays.
  """
  landmarks = np.asarray(landmarks, np.float32)
  if landmarks.ndim != 3 or landmarks.shape[1] != model.n_vertices or \
     landmarks.shape[2] not in (2, 3):
    raise ValueError(f"fit_clip: landmarks must be (T, {model.n_vertices}, 2 or 3), got "
                     f"{landmarks.shape}")
  t = landmarks.shape[0]
  found = np.ones(t, bool) if found is None else np.asarray(found, bool)
  if found.shape != (t,):
    raise ValueError(f"fit_clip: found must be ({t},), got {found.shape}")
  if not (found & np.all(np.isfinite(landmarks), axis=(1, 2))).any():
    raise ValueError("fit_clip: no frame has a face (found is all False or landmarks are NaN)")
  use_z = landmarks.shape[2] == 3 and config.z_weight > 0
  if landmarks.shape[2] == 2:
    landmarks = np.concatenate([landmarks, np.zeros_like(landmarks[..., :1])], -1)
  padded = -(-t // pad_to) * pad_to
  landmarks = np.concatenate([landmarks, np.zeros((padded - t,) + landmarks.shape[1:],
                                                  np.float32)])
  found = np.concatenate([found, np.zeros(padded - t, bool)])
  out = _fit_core(_prepare(model), jnp.asarray(landmarks), jnp.asarray(found), config,
                  model.n_mouth, use_z)
  return FitResult(out.shape, out.scale, *(x[:t] for x in out[2:]))


def fit_image(model: MorphableModel, landmarks, config: FitConfig = FitConfig(),
              pad_to: int = 16) -> FitResult:
  """Fits a single image's landmarks (V, 2|3): a one-frame clip (T = 1 in the result)."""
  landmarks = np.asarray(landmarks, np.float32)
  if landmarks.ndim != 2:
    raise ValueError(f"fit_image: landmarks must be (V, 2 or 3), got {landmarks.shape}")
  return fit_clip(model, landmarks[None], None, config, pad_to)
