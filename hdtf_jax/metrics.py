"""Evaluation metrics of the paper's tables (PAPER.md §6).

Video (stage 2): `psnr`, `ssim` (JAX, jittable, batched over leading dims) and `cpbd`
(NumPy/SciPy, one grey image at a time: it is data-dependent bookkeeping, not tensor math).
Animation (stage 1): `landmark_distance`, `lmd_3d`, `cca_score` (JAX) and `stage1_metrics`, which
returns the paper's four numbers under its names.

Images are channels-last: (..., H, W, C); give a grey image as (H, W, 1).
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from hdtf_jax import losses

Array = jax.Array


# ----------------------------------------------------------------------------- PSNR / SSIM

def _check_images(a, b, what: str) -> tuple[Array, Array]:
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"{what}: images have different shapes {a.shape} and {b.shape}")
  if a.ndim < 3:
    raise ValueError(f"{what}: images must be channels-last (..., H, W, C), got shape {a.shape}; "
                     "add a trailing axis for grey images")
  return a.astype(jnp.float32), b.astype(jnp.float32)


def psnr(a, b, data_range: float) -> Array:
  """Peak signal-to-noise ratio in dB per image: 10 log10(data_range^2 / MSE).

  a, b: (..., H, W, C) images; data_range: max - min of the value range (255 for uint8, 1 for
  [0, 1] floats; never guessed). Returns (...,): one value per image, as
  `skimage.metrics.peak_signal_noise_ratio` gives for each image; average them yourself (the
  paper's tables average per frame). Identical images give +inf.
  """
  a, b = _check_images(a, b, "psnr")
  mse = jnp.mean(jnp.square((a - b) / data_range), axis=(-3, -2, -1))
  return -10.0 * jnp.log10(mse)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
  """The normalised 1-D Gaussian of SSIM: radius int(truncate * sigma + 0.5) (11 taps for 1.5)."""
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (x / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def _separable_blur_valid(x: Array, window: np.ndarray) -> Array:
  """'Valid' blur of (N, H, W, C) with the window along H then W.

  A weighted sum of shifted slices rather than a depthwise conv: XLA fuses it into one pass,
  and on CPU it is ~25x faster than `conv_general_dilated` with feature groups.
  """
  k = window.shape[0]
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  x = sum(float(window[i]) * x[:, i:i + h] for i in range(k))
  return sum(float(window[i]) * x[:, :, i:i + w] for i in range(k))


def ssim(a, b, data_range: float, *, sigma: float = 1.5, truncate: float = 3.5,
         k1: float = 0.01, k2: float = 0.03) -> Array:
  """Mean structural similarity per image, as Wang et al. (2004) define it.

  Equals `skimage.metrics.structural_similarity(a, b, data_range=..., channel_axis=-1,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`, the setting papers report:
  an 11-tap Gaussian window (sigma 1.5), population (ddof=0) local statistics,
  C1 = (k1 L)^2, C2 = (k2 L)^2, the SSIM map averaged over the pixels at least a window radius
  from the border and over channels.

  a, b: (..., H, W, C) with H, W >= the window size. Returns (...,) one value per image.
  """
  a, b = _check_images(a, b, "ssim")
  window = gaussian_window(sigma, truncate)
  if min(a.shape[-3:-1]) < window.shape[0]:
    raise ValueError(f"ssim: images of {a.shape[-3:-1]} pixels are smaller than the "
                     f"{window.shape[0]}-tap window")
  lead, (h, w, c) = a.shape[:-3], a.shape[-3:]
  # Work in units of data_range so the constants are k^2 and magnitudes stay near 1.
  x = a.reshape((-1, h, w, c)) / data_range
  y = b.reshape((-1, h, w, c)) / data_range
  stats = _separable_blur_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), window)
  mu_x, mu_y, e_xx, e_yy, e_xy = jnp.split(stats, 5, axis=-1)
  var_x, var_y, cov = e_xx - mu_x ** 2, e_yy - mu_y ** 2, e_xy - mu_x * mu_y
  c1, c2 = k1 ** 2, k2 ** 2
  s = (((2 * mu_x * mu_y + c1) * (2 * cov + c2))
       / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
  return jnp.mean(s, axis=(-3, -2, -1)).reshape(lead)


# ----------------------------------------------------------------------------- CPBD

# Narvekar & Karam (2011) constants.
CPBD_BETA = 3.6             # slope of the probability-of-blur-detection psychometric function
CPBD_JNB_LOW_CONTRAST = 5   # just-noticeable-blur width (pixels) for block contrast <= 50
CPBD_JNB_HIGH_CONTRAST = 3  # ... and for contrast > 50 (8-bit grey levels)
CPBD_CONTRAST_SPLIT = 50
CPBD_P_JNB = 0.63           # CPBD = P(P_blur <= 63%), the detection probability at the JNB width
CPBD_MAX_HALF_WIDTH = 101   # an edge side is followed for at most 100 steps


def _luma_8bit(image: np.ndarray, data_range: float, quantize: bool) -> np.ndarray:
  image = np.asarray(image, np.float64)
  if image.ndim == 3 and image.shape[-1] in (1, 3):
    if image.shape[-1] == 3:  # ITU-R 601 luma, as PIL's 'L', OpenCV and MATLAB rgb2gray
      image = image @ np.array([0.299, 0.587, 0.114])
    else:
      image = image[..., 0]
  if image.ndim != 2:
    raise ValueError(f"cpbd: expected a (H, W) grey or (H, W, 1|3) image, got shape {image.shape}")
  image = image * (255.0 / data_range)
  if quantize:
    image = np.clip(np.floor(image + 0.5), 0, 255)
  return image


def _canny(image: np.ndarray, sigma: float, low: float, high: float) -> np.ndarray:
  """Canny edges: Gaussian smoothing, Sobel gradient, non-maximum suppression along the
  gradient (bilinear between the two neighbours it points between), hysteresis by 8-connected
  components. Thresholds are absolute gradient magnitudes of the smoothed image."""
  ones = np.ones_like(image)
  # Zero padding, renormalised by the blurred ones, so borders are not darkened.
  smooth = (ndimage.gaussian_filter(image, sigma, mode="constant", truncate=4.0)
            / (ndimage.gaussian_filter(ones, sigma, mode="constant", truncate=4.0) + 1e-12))
  gi, gj = ndimage.sobel(smooth, axis=0), ndimage.sobel(smooth, axis=1)
  mag = np.hypot(gi, gj)
  pad = np.pad(mag, 1)
  h, w = mag.shape
  at = lambda di, dj: pad[1 + di:1 + di + h, 1 + dj:1 + dj + w]
  si, sj = np.where(gi >= 0, 1, -1), np.where(gj >= 0, 1, -1)
  rows_major = np.abs(gi) >= np.abs(gj)  # step mostly along rows
  with np.errstate(divide="ignore", invalid="ignore"):
    frac = np.where(rows_major, np.abs(gj) / np.abs(gi), np.abs(gi) / np.abs(gj))
  frac = np.nan_to_num(frac)

  def neighbour(sign):
    # The magnitude one step along +/- the gradient, interpolated between the axis pixel and
    # the diagonal pixel the gradient points between.
    out = np.zeros_like(mag)
    for a in (-1, 1):
      for b in (-1, 1):
        di, dj = sign * a, sign * b
        axis_pixel = np.where(rows_major, at(di, 0), at(0, dj))
        val = (1 - frac) * axis_pixel + frac * at(di, dj)
        out = np.where((si == a) & (sj == b), val, out)
    return out

  keep = (mag >= neighbour(1)) & (mag >= neighbour(-1)) & (mag >= low) & (mag > 0)
  keep[[0, -1], :] = False
  keep[:, [0, -1]] = False
  labels, count = ndimage.label(keep, np.ones((3, 3), bool))
  strong = np.zeros(count + 1, bool)
  strong[np.unique(labels[keep & (mag >= high)])] = True
  strong[0] = False
  return strong[labels]


def _vertical_sobel_edges(image: np.ndarray) -> np.ndarray:
  """Vertical edges (horizontal gradient) for width measurement: the normalised Sobel response
  squared, thresholded and thinned to local maxima across rows or columns.

  The threshold, 2 sqrt(mean(strength^2)) compared with strength^2, is that of the reference
  Python `cpbd` package (after Octave's `edge(..., 'sobel')`), kept so numbers stay comparable.
  """
  smooth = ndimage.correlate1d(image, np.array([1.0, 2.0, 1.0]) / 4, axis=0, mode="reflect")
  strength2 = ndimage.correlate1d(smooth, np.array([-1.0, 0.0, 1.0]) / 2, axis=1,
                                  mode="reflect") ** 2
  strength2 = np.where(strength2 <= 2 * np.sqrt(np.mean(strength2)), 0.0, strength2)
  p = np.pad(strength2, 1)
  horiz = (strength2 > p[1:-1, :-2]) & (strength2 > p[1:-1, 2:])
  vert = (strength2 > p[:-2, 1:-1]) & (strength2 > p[2:, 1:-1])
  return horiz | vert


def _run_ending_at(b: np.ndarray) -> np.ndarray:
  """For a bool (H, L) array, how many consecutive True end at each column (inclusive)."""
  idx = np.arange(b.shape[1])
  last_false = np.maximum.accumulate(np.where(b, -1, idx), axis=1)
  return idx - last_false


def edge_widths(image: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Marziliano edge widths along the gradient direction; 0 where there is no measured edge.

  An edge pixel whose gradient angle (np.gradient, quantised to 45 degrees; a zero horizontal
  gradient counts as 0 degrees, as in the authors' code) is 0 or +-180 is followed left and
  right while the intensity keeps rising (0) or falling (180) strictly; width = steps on both
  sides + 2, each side capped at 101. Other directions and the one-pixel border get 0.
  """
  h, w = image.shape
  gy, gx = np.gradient(image)
  angle = np.where(gx != 0, np.degrees(np.arctan2(gy, gx)), 0.0)
  q = 45 * np.round(angle / 45)
  rising, falling = q == 0, np.abs(q) == 180
  d = np.diff(image, axis=1)  # d[:, c] = I[:, c + 1] - I[:, c]
  widths = np.zeros((h, w))
  for select, monotone in ((rising, d > 0), (falling, d < 0)):
    run_left = _run_ending_at(monotone)              # ends at c - 2: the pixels left of c - 1
    run_right = _run_ending_at(monotone[:, ::-1])[:, ::-1]  # starts at c + 1
    left = np.zeros((h, w), np.int64)
    right = np.zeros((h, w), np.int64)
    left[:, 2:] = run_left[:, :w - 2]
    right[:, :w - 2] = run_right[:, 1:]
    cap = CPBD_MAX_HALF_WIDTH - 1
    both = 2 + np.minimum(left, cap) + np.minimum(right, cap)
    widths = np.where(select, both, widths)
  inner = np.zeros((h, w), bool)
  inner[1:-1, 1:-1] = True
  return np.where(edges & inner, widths, 0.0)


def cpbd(image, *, data_range: float = 255.0, quantize: bool = True, block_size: int = 64,
         edge_block_fraction: float = 0.002, canny_sigma: float = 1.0,
         canny_thresholds: tuple[float, float] = (0.1, 0.2)) -> float:
  """Cumulative probability of blur detection (Narvekar & Karam, IEEE TIP 2011): higher = sharper.

  image: (H, W) grey or (H, W, 1|3) RGB (converted with ITU-R 601 luma), values in
    [0, data_range]; rescaled to 8-bit grey levels, and rounded to integers when `quantize`
    (the published numbers come from 8-bit frames; plateaus of equal levels stop an edge's
    width, so rounding matters).
  Steps: Canny edges pick the edge blocks (block_size^2 tiles with more than
    `edge_block_fraction` of their pixels on edges; the thresholds are absolute on the 0..255
    scale and default to the reference Python `cpbd` package's); vertical Sobel edges get a
    Marziliano width w along the gradient (`edge_widths`); per edge block the just-noticeable
    width is 5 for contrast (max - min) <= 50 else 3, and each edge's probability of blur
    detection is P = 1 - exp(-(w / w_JNB)^3.6), binned to percent; CPBD is the fraction of edges
    with P <= 63%. An image without edge blocks gives 0.0.
  """
  grey = _luma_8bit(image, data_range, quantize)
  h, w = grey.shape
  nh, nw = h // block_size, w // block_size
  if nh == 0 or nw == 0:
    raise ValueError(f"cpbd: image of {h}x{w} pixels is smaller than one {block_size}^2 block")
  canny_edges = _canny(grey, canny_sigma, *canny_thresholds)
  widths = edge_widths(grey, _vertical_sobel_edges(grey))

  tiles = lambda a: (a[:nh * block_size, :nw * block_size]
                     .reshape(nh, block_size, nw, block_size).swapaxes(1, 2)
                     .reshape(nh, nw, block_size * block_size))
  img_t, canny_t, width_t = tiles(grey), tiles(canny_edges), tiles(widths)
  is_edge_block = canny_t.sum(-1) > block_size * block_size * edge_block_fraction
  contrast = np.floor(img_t.max(-1) - img_t.min(-1))
  jnb = np.where(contrast <= CPBD_CONTRAST_SPLIT, CPBD_JNB_LOW_CONTRAST, CPBD_JNB_HIGH_CONTRAST)
  counted = is_edge_block[..., None] & (width_t > 0)
  p_blur = 1.0 - np.exp(-np.abs(width_t / jnb[..., None]) ** CPBD_BETA)
  percent = np.round(p_blur * 100)  # the histogram bin, as the reference implementation bins
  total = counted.sum()
  if total == 0:
    return 0.0
  return float((counted & (percent <= round(CPBD_P_JNB * 100))).sum() / total)


# ----------------------------------------------------------------------------- landmarks

def landmark_distance(pred, gt, mask=None, norm=None, reduce: bool = True) -> Array:
  """Landmark distance (LMD): Euclidean distance per point, averaged over points, then frames.

  pred, gt: (..., N, C) points (C = 2 or 3), e.g. (B, T, N, 2) tracked landmarks.
  mask: optional (N,) or (..., N) point weights (e.g. 1 on the mouth points).
  norm: optional scalar or (...,) per-frame normaliser (e.g. inter-ocular distance); each
    frame's mean distance is divided by it.
  reduce: True gives the mean over all frames (a scalar); False keeps (...,) per-frame values.
  """
  pred, gt = jnp.asarray(pred, jnp.float32), jnp.asarray(gt, jnp.float32)
  if pred.shape != gt.shape or pred.ndim < 2:
    raise ValueError(f"landmark_distance: points must be (..., N, C) of the same shape, got "
                     f"{pred.shape} and {gt.shape}")
  dist = jnp.sqrt(jnp.sum(jnp.square(pred - gt), axis=-1))  # (..., N)
  if mask is None:
    per_frame = jnp.mean(dist, axis=-1)
  else:
    m = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), dist.shape)
    per_frame = jnp.sum(dist * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1e-12)
  if norm is not None:
    per_frame = per_frame / jnp.asarray(norm, jnp.float32)
  return jnp.mean(per_frame) if reduce else per_frame


def lmd_3d(pred_vertices, gt_vertices, vertex_indices=None, reduce: bool = True) -> Array:
  """LMD-3D: `landmark_distance` on 3-D mesh vertices (the paper's LMD-3D(mouth)).

  pred_vertices, gt_vertices: (..., V, 3) vertices, e.g. of M(c_s, c_e) per frame.
  vertex_indices: optional indices of the vertices to score (the mouth region) when whole
    meshes are given.
  """
  pred_vertices, gt_vertices = jnp.asarray(pred_vertices), jnp.asarray(gt_vertices)
  if pred_vertices.shape[-1:] != (3,):
    raise ValueError(f"lmd_3d: vertices must be (..., V, 3), got {pred_vertices.shape}")
  if vertex_indices is not None:
    idx = jnp.asarray(vertex_indices)
    pred_vertices = jnp.take(pred_vertices, idx, axis=-2)
    gt_vertices = jnp.take(gt_vertices, idx, axis=-2)
  return landmark_distance(pred_vertices, gt_vertices, reduce=reduce)


# ----------------------------------------------------------------------------- CCA

def cca_score(x, y, n_components: int | None = None, mask=None) -> Array:
  """Mean canonical correlation between two multivariate time series (head-motion CCA).

  x: (..., T, Dx), y: (..., T, Dy), e.g. predicted and ground-truth head pose (T, 5).
  n_components: how many of the largest canonical correlations to average (static; default
    min(Dx, Dy)).
  mask: optional (..., T) frame weights (padded frames 0).
  Returns (...,): for each pair of sequences the mean of the top canonical correlations, i.e.
  the singular values of U_x^T U_y where U are orthonormal bases of the centred (weighted)
  data. Directions with no variance (rank deficiency below float precision) add 0.
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  if x.ndim < 2 or x.shape[:-1] != y.shape[:-1]:
    raise ValueError(f"cca_score: x and y must be (..., T, D) with the same leading dims, got "
                     f"{x.shape} and {y.shape}")
  k_max = min(x.shape[-1], y.shape[-1])
  k = k_max if n_components is None else int(n_components)
  if not 1 <= k <= k_max:
    raise ValueError(f"cca_score: n_components must be in [1, {k_max}], got {n_components}")
  w = jnp.ones(x.shape[:-1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  if w.shape != x.shape[:-1]:
    raise ValueError(f"cca_score: mask must be {x.shape[:-1]}, got {w.shape}")
  w = w[..., None]
  n = jnp.maximum(jnp.sum(w, axis=-2, keepdims=True), 1e-12)

  def basis(v):
    centred = (v - jnp.sum(w * v, axis=-2, keepdims=True) / n) * jnp.sqrt(w)
    u, s, _ = jnp.linalg.svd(centred, full_matrices=False)
    tol = max(v.shape[-2], v.shape[-1]) * jnp.finfo(jnp.float32).eps * s[..., :1] * 10
    return u * (s > tol)[..., None, :]  # drop directions without variance

  ux, uy = basis(x), basis(y)
  cross = jnp.matmul(jnp.swapaxes(ux, -1, -2), uy, precision=jax.lax.Precision.HIGHEST)  # no TF32
  rho = jnp.linalg.svd(cross, compute_uv=False)  # descending
  return jnp.mean(jnp.clip(rho[..., :k], 0.0, 1.0), axis=-1)


# ----------------------------------------------------------------------------- stage 1

def stage1_metrics(pred: Mapping[str, Array], gt: Mapping[str, Array], *,
                   mouth_vertices_fn: Callable[[Array], Array] | None = None,
                   mask=None, ssim_c1: float = losses.DEFAULT_C1,
                   ssim_c2: float = losses.DEFAULT_C2,
                   cca_components: int | None = None) -> dict[str, Array]:
  """The paper's audio-to-animation table (PAPER.md §6) for a batch of sequences.

  pred, gt: dicts with "mouth" (B, T, 28), "eyebrow" (B, T, 5), "head" (B, T, 5).
  mouth_vertices_fn: maps mouth parameters (B, T, 28) to mouth-region vertices (B, T, V, 3)
    (close over the identity's shape and the morphable model); without it `lmd3d_mouth` is
    left out of the result.
  mask: optional (B, T) valid-frame weights.
  Returns float32 scalars:
    mse_mouth    mean squared error of the mouth parameters (over frames and the 28 params);
    lmd3d_mouth  mean Euclidean distance between predicted and true mouth vertices (`lmd_3d`);
    ssim_eyebrow temporal SSIM of the eyebrow parameters, exactly the training loss's
                 `losses.temporal_ssim` (per sequence and parameter, then averaged);
    cca_head     mean canonical correlation of the head-pose tracks (`cca_score`), per
                 sequence, averaged over the batch.
  """
  for key in ("mouth", "eyebrow", "head"):
    if key not in pred or key not in gt:
      raise ValueError(f"stage1_metrics: pred and gt need a {key!r} entry, got {sorted(pred)} "
                       f"and {sorted(gt)}")
    if jnp.shape(pred[key]) != jnp.shape(gt[key]) or jnp.ndim(pred[key]) != 3:
      raise ValueError(f"stage1_metrics: {key!r} must be (B, T, D) in both, got "
                       f"{jnp.shape(pred[key])} and {jnp.shape(gt[key])}")
  mouth_p = jnp.asarray(pred["mouth"], jnp.float32)
  mouth_g = jnp.asarray(gt["mouth"], jnp.float32)
  out = {"mse_mouth": losses.masked_mean(jnp.square(mouth_p - mouth_g), mask)}
  if mouth_vertices_fn is not None:
    per_frame = lmd_3d(mouth_vertices_fn(mouth_p), mouth_vertices_fn(mouth_g), reduce=False)
    out["lmd3d_mouth"] = losses.masked_mean(per_frame, mask)
  out["ssim_eyebrow"] = losses.temporal_ssim(pred["eyebrow"], gt["eyebrow"], c1=ssim_c1,
                                             c2=ssim_c2, mask=mask)
  cca = cca_score(pred["head"], gt["head"], cca_components, mask=mask)  # (B,)
  valid = None if mask is None else (jnp.sum(jnp.asarray(mask), axis=-1) > 0)
  out["cca_head"] = losses.masked_mean(cca, valid)
  return out
