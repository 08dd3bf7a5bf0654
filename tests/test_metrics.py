"""Metrics against scikit-image, scikit-learn, NumPy loops and closed forms, on real images."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.feature
import skimage.filters
import skimage.metrics
from sklearn.cross_decomposition import CCA

from hdtf_jax import losses, metrics


@pytest.fixture(scope="module")
def astronaut():
  img = skimage.data.astronaut()
  rng = np.random.default_rng(0)
  noisy = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
  blurred = skimage.filters.gaussian(img, sigma=2, channel_axis=-1, preserve_range=True)
  return img, noisy, np.round(blurred).astype(np.uint8)


def _grey(img):
  return np.floor(img.astype(np.float64) @ [0.299, 0.587, 0.114] + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- PSNR / SSIM

def test_psnr_ssim_match_skimage_batched(astronaut):
  img, noisy, blurred = astronaut
  ours_psnr = jax.jit(metrics.psnr, static_argnums=2)(np.stack([img, img]),
                                                        np.stack([noisy, blurred]), 255.0)
  ours_ssim = jax.jit(metrics.ssim, static_argnums=2)(np.stack([img, img]),
                                                        np.stack([noisy, blurred]), 255.0)
  assert ours_psnr.shape == ours_ssim.shape == (2,)
  for i, other in enumerate([noisy, blurred]):
    ref_psnr = skimage.metrics.peak_signal_noise_ratio(img, other, data_range=255)
    ref_ssim = skimage.metrics.structural_similarity(
        img, other, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False)
    assert abs(float(ours_psnr[i]) - ref_psnr) < 1e-3
    assert abs(float(ours_ssim[i]) - ref_ssim) < 1e-3
  # Noise at sigma 20 scores lower than a sigma-2 blur on both, and the values are sensible.
  assert 20 < float(ours_psnr[0]) < float(ours_psnr[1]) < 30
  assert 0.3 < float(ours_ssim[0]) < float(ours_ssim[1]) < 0.9


def test_ssim_grey_float_and_identity(astronaut):
  img, _, blurred = astronaut
  a, b = _grey(img)[100:300, 150:350] / 255.0, _grey(blurred)[100:300, 150:350] / 255.0
  ref = skimage.metrics.structural_similarity(a, b, data_range=1.0, gaussian_weights=True,
                                              sigma=1.5, use_sample_covariance=False)
  assert abs(float(metrics.ssim(a[..., None], b[..., None], 1.0)) - ref) < 1e-3
  assert float(metrics.ssim(a[..., None], a[..., None], 1.0)) == pytest.approx(1.0, abs=1e-5)
  assert np.isinf(float(metrics.psnr(a[..., None], a[..., None], 1.0)))
  with pytest.raises(ValueError, match="channels-last"):
    metrics.ssim(a, b, 1.0)
  with pytest.raises(ValueError, match="window"):
    metrics.ssim(a[:8, :8, None], b[:8, :8, None], 1.0)
  with pytest.raises(ValueError, match="shapes"):
    metrics.psnr(a[..., None], b[1:, :, None], 1.0)


# ----------------------------------------------------------------------------- CPBD

def _loop_edge_widths(image, edges):
  """Independent reference: walk each edge pixel's row pixel by pixel (Marziliano)."""
  h, w = image.shape
  gy, gx = np.gradient(image)
  out = np.zeros_like(image)
  for r in range(1, h - 1):
    for c in range(1, w - 1):
      if not edges[r, c]:
        continue
      angle = np.degrees(np.arctan2(gy[r, c], gx[r, c])) if gx[r, c] != 0 else 0.0
      q = 45 * np.round(angle / 45)
      if q == 0:
        sign = 1.0
      elif abs(q) == 180:
        sign = -1.0
      else:
        continue
      left = 1  # pixels c-1, c-2, ... while the intensity keeps moving against the edge
      while (left <= 100 and c - 1 - left >= 0
             and sign * (image[r, c - left] - image[r, c - 1 - left]) > 0):
        left += 1
      right = 1
      while (right <= 100 and c + 1 + right < w
             and sign * (image[r, c + 1 + right] - image[r, c + right]) > 0):
        right += 1
      out[r, c] = left + right
  return out


def test_edge_widths_match_loop_reference(astronaut):
  grey = _grey(astronaut[0]).astype(np.float64)[40:136, 180:276]
  blurred = np.round(skimage.filters.gaussian(grey, sigma=1.5, preserve_range=True))
  for image in (grey, blurred):
    edges = metrics._vertical_sobel_edges(image)
    assert edges.sum() > 200
    np.testing.assert_array_equal(metrics.edge_widths(image, edges),
                                  _loop_edge_widths(image, edges))


def test_canny_matches_skimage(astronaut):
  grey = _grey(astronaut[0]).astype(np.float64)
  for image in (grey, np.round(skimage.filters.gaussian(grey, sigma=2, preserve_range=True))):
    ours = metrics._canny(image, 1.0, 0.1, 0.2)
    ref = skimage.feature.canny(image, sigma=1.0, low_threshold=0.1, high_threshold=0.2)
    assert np.mean(ours == ref) > 0.999


@pytest.mark.parametrize("profile,expect", [
    ([0, 128, 255], 1.0),           # width 2: P_blur = 0.21 -> sharp
    ([0, 5, 25, 38, 40], 1.0),      # width 4, contrast 40 <= 50: JNB 5, P = 0.36 -> sharp
    ([0, 25, 125, 190, 200], 0.0),  # width 4, contrast 200: JNB 3, P = 0.94 -> blurred
    ([0, 10, 40, 128, 215, 245, 255], 0.0),  # width 6: P = 1.0 -> blurred
])
def test_cpbd_closed_form_vertical_edges(profile, expect):
  # One vertical edge in a 64x64 block; the profile rises once, its steepest step unique.
  row = np.concatenate([np.full(30, profile[0]), profile, np.full(34 - len(profile), profile[-1])])
  image = np.tile(row, (64, 1)).astype(np.uint8)
  as_float = image.astype(float)
  widths = metrics.edge_widths(as_float, metrics._vertical_sobel_edges(as_float))
  assert set(np.unique(widths[widths > 0])) == {len(profile) - 1}
  assert metrics.cpbd(image) == expect
  assert metrics.cpbd(image[:, ::-1]) == expect  # falling edges are measured the same way


def test_cpbd_ranks_sharp_above_blurred_real_image(astronaut):
  img = astronaut[0]
  grey = _grey(img)
  scores = [metrics.cpbd(grey)]
  for sigma in (0.5, 1.0, 1.5, 2.0, 3.0):
    scores.append(metrics.cpbd(np.round(skimage.filters.gaussian(grey, sigma=sigma,
                                                                 preserve_range=True))))
  assert all(a > b for a, b in zip(scores, scores[1:-1])), scores
  assert scores[-1] <= scores[-2]
  assert 0.3 < scores[0] < 0.5 and scores[-1] < 0.01
  # RGB input goes through the same luma; [0, 1] floats with data_range 1 give the same number.
  assert metrics.cpbd(img) == scores[0]
  assert metrics.cpbd(img / 255.0, data_range=1.0) == scores[0]
  assert metrics.cpbd(np.zeros((64, 64))) == 0.0
  with pytest.raises(ValueError, match="block"):
    metrics.cpbd(grey[:32, :32])
  with pytest.raises(ValueError, match="grey"):
    metrics.cpbd(np.zeros((2, 64, 64, 3)))


# ----------------------------------------------------------------------------- LMD

def test_landmark_distance_against_loops():
  rng = np.random.default_rng(4)
  pred, gt = rng.normal(size=(2, 5, 10, 2)), rng.normal(size=(2, 5, 10, 2))
  per_frame = np.array([[np.mean([np.linalg.norm(pred[b, t, n] - gt[b, t, n]) for n in range(10)])
                         for t in range(5)] for b in range(2)])
  np.testing.assert_allclose(metrics.landmark_distance(pred, gt), per_frame.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics.landmark_distance(pred, gt, reduce=False), per_frame,
                             rtol=1e-5)
  mouth = np.zeros(10)
  mouth[6:] = 1
  mouth_ref = np.linalg.norm(pred[..., 6:, :] - gt[..., 6:, :], axis=-1).mean()
  np.testing.assert_allclose(metrics.landmark_distance(pred, gt, mask=mouth), mouth_ref, rtol=1e-5)
  iod = rng.uniform(1, 2, size=(2, 5))
  np.testing.assert_allclose(metrics.landmark_distance(pred, gt, norm=iod),
                             (per_frame / iod).mean(), rtol=1e-5)
  # 3-D: a pure translation by (3, 4, 0) of the selected vertices is a distance of 5.
  verts = rng.normal(size=(3, 7, 20, 3))
  moved = verts.copy()
  moved[..., [2, 5, 9], :] += [3.0, 4.0, 0.0]
  assert float(metrics.lmd_3d(moved, verts, vertex_indices=[2, 5, 9])) == pytest.approx(5.0)
  assert float(metrics.lmd_3d(moved, verts)) == pytest.approx(5.0 * 3 / 20)
  with pytest.raises(ValueError, match="3"):
    metrics.lmd_3d(pred, gt)


# ----------------------------------------------------------------------------- CCA

@pytest.fixture(scope="module")
def pose_tracks():
  rng = np.random.default_rng(5)
  t = np.linspace(0, 12, 300)[:, None]
  x = np.sin(t * [0.7, 1.3, 2.1, 0.4, 3.0] + [0, 1, 2, 3, 4]) + 0.1 * rng.normal(size=(300, 5))
  y = 0.5 * x @ rng.normal(size=(5, 5)) + 0.6 * rng.normal(size=(300, 5))
  return x, y


def _numpy_cca(x, y):
  """Classical CCA: eigenvalues of Cxx^-1 Cxy Cyy^-1 Cyx are the squared correlations."""
  x, y = x - x.mean(0), y - y.mean(0)
  cxx, cyy, cxy = x.T @ x, y.T @ y, x.T @ y
  ev = np.linalg.eigvals(np.linalg.solve(cxx, cxy) @ np.linalg.solve(cyy, cxy.T))
  return np.sqrt(np.sort(np.clip(ev.real, 0, 1))[::-1])


def test_cca_matches_sklearn_and_numpy(pose_tracks):
  x, y = pose_tracks
  rho = _numpy_cca(x, y)
  for k in (1, 3, 5):
    sk = CCA(n_components=k, max_iter=5000, tol=1e-10).fit(x, y)
    xs, ys = sk.transform(x, y)
    sk_mean = np.mean([np.corrcoef(xs[:, i], ys[:, i])[0, 1] for i in range(k)])
    ours = float(metrics.cca_score(x, y, k))
    assert ours == pytest.approx(sk_mean, abs=1e-4)
    assert ours == pytest.approx(rho[:k].mean(), abs=1e-4)


def test_cca_properties(pose_tracks):
  x, y = pose_tracks
  assert float(metrics.cca_score(x, x)) == pytest.approx(1.0, abs=1e-4)
  mix = np.random.default_rng(6).normal(size=(5, 5))
  assert float(metrics.cca_score(x, x @ mix + 2.0)) == pytest.approx(1.0, abs=1e-4)
  # Batched, jitted, and a mask equals cutting the padding off.
  batch = jax.jit(metrics.cca_score)(np.stack([x, y]), np.stack([y, x]))
  np.testing.assert_allclose(batch, [_numpy_cca(x, y).mean()] * 2, atol=1e-4)
  mask = np.zeros(300)
  mask[:180] = 1
  np.testing.assert_allclose(metrics.cca_score(x, y, mask=mask),
                             _numpy_cca(x[:180], y[:180]).mean(),
                             atol=1e-4)
  # A pose component that never moves adds a zero correlation, not NaN.
  frozen = x.copy()
  frozen[:, 4] = 0.25
  score = float(metrics.cca_score(frozen, y))
  assert np.isfinite(score)
  assert score == pytest.approx(_numpy_cca(frozen[:, :4], y).sum() / 5, abs=1e-4)
  with pytest.raises(ValueError, match="n_components"):
    metrics.cca_score(x, y, 6)


# ----------------------------------------------------------------------------- stage 1

def test_stage1_metrics_combines_the_parts(pose_tracks):
  x, y = pose_tracks
  rng = np.random.default_rng(7)
  gt = {"mouth": rng.normal(size=(2, 300, 28)), "eyebrow": rng.normal(size=(2, 300, 5)),
        "head": np.stack([x, y])}
  pred = {"mouth": gt["mouth"] + 0.1, "eyebrow": 0.5 * gt["eyebrow"],
          "head": np.stack([y, x]) * 2.0}
  basis = rng.normal(size=(28, 12, 3)) * 0.1  # a linear "mouth vertices" map, 12 vertices
  to_vertices = lambda m: jnp.einsum("btk,kvc->btvc", m, basis)
  out = metrics.stage1_metrics(pred, gt, mouth_vertices_fn=to_vertices)
  assert set(out) == {"mse_mouth", "lmd3d_mouth", "ssim_eyebrow", "cca_head"}
  assert float(out["mse_mouth"]) == pytest.approx(0.01, rel=1e-4)
  offset = np.linalg.norm(np.einsum("k,kvc->vc", np.full(28, 0.1), basis), axis=-1).mean()
  assert float(out["lmd3d_mouth"]) == pytest.approx(offset, rel=1e-4)
  assert float(out["ssim_eyebrow"]) == pytest.approx(
      float(losses.temporal_ssim(pred["eyebrow"], gt["eyebrow"])), rel=1e-6)
  assert float(out["cca_head"]) == pytest.approx(_numpy_cca(x, y).mean(), abs=1e-4)
  assert "lmd3d_mouth" not in metrics.stage1_metrics(pred, gt)
  # Jitted with a frame mask: padded frames are ignored by every metric.
  mask = np.ones((2, 300))
  mask[1, 200:] = 0
  noisy = {k: v.copy() for k, v in pred.items()}
  for v in noisy.values():
    v[1, 200:] = 1e3  # garbage in the padding
  masked = jax.jit(lambda p, g, m: metrics.stage1_metrics(p, g, mask=m))(noisy, gt, mask)
  assert float(masked["mse_mouth"]) == pytest.approx(0.01, rel=1e-4)
  assert float(masked["cca_head"]) == pytest.approx(
      (_numpy_cca(x, y).mean() + _numpy_cca(y[:200], x[:200]).mean()) / 2, abs=1e-4)
  with pytest.raises(ValueError, match="head"):
    metrics.stage1_metrics({"mouth": pred["mouth"], "eyebrow": pred["eyebrow"]}, gt)
