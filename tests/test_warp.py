"""grid_sample and flow helpers against an independent NumPy loop reference.

The reference below is written from PyTorch's documented grid_sample formula
(unnormalise, clamp for "border", floor + four corner weights or round-half-
even for "nearest", zeros outside for "zeros"), one output pixel at a time.
"""
import itertools
import math

import jax
import jax.numpy as jnp
import matplotlib.colors
import numpy as np
import pytest
import skimage.data

from hdtf_jax import warp as W


def ref_grid_sample(image, grid, mode, padding_mode, align_corners):
  image = np.asarray(image, np.float64)
  grid = np.asarray(grid, np.float64)
  n, h, w, c = image.shape
  _, ho, wo, _ = grid.shape
  out = np.zeros((n, ho, wo, c))

  def unnorm(g, size):
    if align_corners:
      return (g + 1) / 2 * (size - 1)
    return ((g + 1) * size - 1) / 2

  def read(b, y, x):
    if 0 <= x < w and 0 <= y < h:
      return image[b, y, x]
    return np.zeros(c)

  for b, i, j in itertools.product(range(n), range(ho), range(wo)):
    x = unnorm(grid[b, i, j, 0], w)
    y = unnorm(grid[b, i, j, 1], h)
    if padding_mode == "border":
      x = min(max(x, 0.0), w - 1.0)
      y = min(max(y, 0.0), h - 1.0)
    if mode == "nearest":
      out[b, i, j] = read(b, int(np.rint(y)), int(np.rint(x)))  # rint: half to even
      continue
    x0, y0 = math.floor(x), math.floor(y)
    ax, ay = x - x0, y - y0
    out[b, i, j] = (read(b, y0, x0) * (1 - ax) * (1 - ay) + read(b, y0, x0 + 1) * ax * (1 - ay)
                    + read(b, y0 + 1, x0) * (1 - ax) * ay + read(b, y0 + 1, x0 + 1) * ax * ay)
  return out


def astronaut(size):
  """The real 512x512 portrait, box-downscaled to size x size, float in [0, 1], (1, s, s, 3)."""
  img = skimage.data.astronaut().astype(np.float64) / 255
  f = 512 // size
  return img.reshape(size, f, size, f, 3).mean(axis=(1, 3))[None]


def random_grid(rng, n, ho, wo, spread=1.3):
  """Normalised points reaching `spread` beyond [-1, 1] on every side."""
  return rng.uniform(-spread, spread, size=(n, ho, wo, 2))


CASES = list(itertools.product(["bilinear", "nearest"], ["zeros", "border"], [False, True]))


@pytest.mark.parametrize("mode,padding_mode,align_corners", CASES)
@pytest.mark.parametrize("shape", [(1, 5, 7, 1), (2, 6, 4, 3)])
def test_values_match_reference(shape, mode, padding_mode, align_corners):
  rng = np.random.default_rng(0)
  n, h, w, c = shape
  image = rng.normal(size=shape).astype(np.float32)
  grid = random_grid(rng, n, 4, 9).astype(np.float32)
  # Points exactly on pixel centres, on the image edges and on half-pixels too.
  xs = np.linspace(-1.25, 1.25, 11, dtype=np.float32)
  grid[:, 0, :, 0] = xs[:9]
  grid[:, 1, :, 1] = xs[2:]
  got = W.grid_sample(image, grid, mode=mode, padding_mode=padding_mode,
                      align_corners=align_corners)
  want = ref_grid_sample(image, grid, mode, padding_mode, align_corners)
  assert got.shape == (n, 4, 9, c)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


@pytest.mark.parametrize("mode,padding_mode,align_corners", CASES)
def test_values_on_real_image(mode, padding_mode, align_corners):
  rng = np.random.default_rng(1)
  image = astronaut(32).astype(np.float32)
  grid = random_grid(rng, 1, 12, 20, spread=1.1).astype(np.float32)
  got = W.grid_sample(image, grid, mode=mode, padding_mode=padding_mode,
                      align_corners=align_corners)
  want = ref_grid_sample(image, grid, mode, padding_mode, align_corners)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_nearest_rounds_half_to_even():
  # Pixel coordinates 0.5, 1.5, 2.5 (align_corners=True on width 5) -> 0, 2, 2.
  image = np.arange(5, dtype=np.float32).reshape(1, 1, 5, 1)
  x = np.array([0.5, 1.5, 2.5]) / 4 * 2 - 1
  grid = np.stack([x, np.zeros(3)], -1).reshape(1, 1, 3, 2).astype(np.float32)
  got = W.grid_sample(image, grid, mode="nearest", align_corners=True)
  np.testing.assert_array_equal(np.asarray(got).ravel(), [0, 2, 2])


@pytest.mark.parametrize("align_corners", [False, True])
def test_identity_grid_reproduces_image(align_corners):
  image = astronaut(64).astype(np.float32)
  grid = W.identity_grid(64, 64, align_corners=align_corners)[None]
  assert grid.shape == (1, 64, 64, 2)
  for mode in ("bilinear", "nearest"):
    out = W.grid_sample(image, grid, mode=mode, align_corners=align_corners)
    np.testing.assert_allclose(np.asarray(out), image, atol=1e-5)
  # Corners of the identity grid: pixel centres, not the image edges, unless align_corners.
  edge = 1.0 if align_corners else 1 - 1 / 64
  np.testing.assert_allclose(grid[0, 0, 0], [-edge, -edge], atol=1e-7)
  np.testing.assert_allclose(grid[0, -1, -1], [edge, edge], atol=1e-7)


def test_mixed_conventions_do_not_reproduce_the_image():
  # The released-code trap: a grid normalised with (size - 1) sampled with
  # align_corners=False reads pixel p at p * S / (S - 1) - 0.5.
  image = astronaut(64).astype(np.float32)
  grid = W.identity_grid(64, 64, align_corners=True)[None]
  out = np.asarray(W.grid_sample(image, grid, align_corners=False))
  assert np.abs(out - image).max() > 0.1
  # Centre column 31 is read at 31 * 64 / 63 - 0.5 = 30.99: the same pixel, nearly.
  np.testing.assert_allclose(out[0, 31, 31], image[0, 31, 31], atol=0.02)
  np.testing.assert_allclose(out[0, 0, 0], 0.25 * image[0, 0, 0], atol=1e-5)  # half zeros


def test_integer_translation_shifts_real_image():
  image = astronaut(64).astype(np.float32)
  flow = np.zeros((1, 64, 64, 2), np.float32)
  flow[..., 0], flow[..., 1] = 3, -2  # out[y, x] = image[y - 2, x + 3]
  out = np.asarray(W.warp(image, flow))
  np.testing.assert_allclose(out[:, 2:, :-3], image[:, :-2, 3:], atol=1e-5)
  assert np.all(out[:, :2] == 0) and np.all(out[:, :, -3:] == 0)


def _fd_check(padding_mode, align_corners, mode="bilinear"):
  """Analytic gradients vs central differences of the NumPy reference, in float64."""
  rng = np.random.default_rng(2)
  image = rng.normal(size=(2, 5, 6, 3))
  grid = random_grid(rng, 2, 3, 4, spread=1.2)
  cot = rng.normal(size=(2, 3, 4, 3))
  with jax.enable_x64(True):
    loss = lambda im, g: jnp.sum(W.grid_sample(
        im, g, mode=mode, padding_mode=padding_mode, align_corners=align_corners) * cot)
    g_img, g_grid = jax.grad(loss, argnums=(0, 1))(jnp.asarray(image), jnp.asarray(grid))
    assert g_img.dtype == jnp.float64
  ref = lambda im, g: np.sum(ref_grid_sample(im, g, mode, padding_mode, align_corners) * cot)
  eps = 1e-6
  fd_img = np.zeros_like(image)
  for idx in np.ndindex(image.shape):
    d = np.zeros_like(image)
    d[idx] = eps
    fd_img[idx] = (ref(image + d, grid) - ref(image - d, grid)) / (2 * eps)
  fd_grid = np.zeros_like(grid)
  for idx in np.ndindex(grid.shape):
    d = np.zeros_like(grid)
    d[idx] = eps
    fd_grid[idx] = (ref(image, grid + d) - ref(image, grid - d)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(g_img), fd_img, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_grid), fd_grid, atol=1e-5)
  return fd_grid


@pytest.mark.parametrize("padding_mode,align_corners",
                         list(itertools.product(["zeros", "border"], [False, True])))
def test_bilinear_gradients_match_finite_differences(padding_mode, align_corners):
  fd_grid = _fd_check(padding_mode, align_corners)
  assert np.abs(fd_grid).max() > 0.1  # the check is not vacuous


def test_gradients_when_the_backward_takes_many_steps(monkeypatch):
  # The XLA path's backward walks the points in steps of
  # _BACKWARD_STEP_ELEMENTS // C plus a remainder; make the steps tiny so both
  # paths run on a small case (the native CPU kernel, the default, is off here).
  monkeypatch.setenv("HDTF_JAX_NATIVE_WARP", "0")
  monkeypatch.setattr(W, "_BACKWARD_STEP_ELEMENTS", 15)  # 5 points per step, 24 points
  jax.clear_caches()
  try:
    _fd_check("zeros", False)
    _fd_check("border", True)
  finally:
    jax.clear_caches()


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("c", [5, W._SMALL_C + 4])
def test_accelerator_backward_matches_cpu_backward(mode, c):
  # Accelerators run the backward in one step with multiply+reduce dots; only
  # the CPU variant runs in the tests above, so compare the two here, for both
  # CPU forms of the dots (unrolled for a few channels, batched matmul beyond).
  rng = np.random.default_rng(10)
  n, h, w = 2, 6, 7
  rows = jnp.asarray(rng.normal(size=(n * h * w, c)), jnp.float32)
  points = jnp.asarray(random_grid(rng, n, 4, 3).reshape(-1, 2), jnp.float32)
  gout = jnp.asarray(rng.normal(size=(points.shape[0], c)), jnp.float32)
  run = lambda step, cpu: W._backward_in_steps(
      rows, points, gout, hw_out=12, h=h, w=w, mode=mode, padding_mode="zeros",
      align_corners=False, step=step, cpu=cpu)
  for got, want in zip(run(points.shape[0], False), run(5, True)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_nearest_gradients_match_finite_differences():
  fd_grid = _fd_check("zeros", False, mode="nearest")
  assert np.all(fd_grid == 0)


def test_border_gradient_is_zero_outside():
  image = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 4, 2)), jnp.float32)
  grid = jnp.asarray([[[[-1.5, 0.1], [0.2, 1.7], [0.3, -0.2]]]], jnp.float32)
  g = jax.grad(lambda gr: W.grid_sample(image, gr, padding_mode="border").sum())(grid)
  assert g[0, 0, 0, 0] == 0 and g[0, 0, 1, 1] == 0
  assert g[0, 0, 0, 1] != 0 and g[0, 0, 2, 0] != 0


def test_resize_flow_matches_opencv_bilinear():
  """resize_flow resamples like OpenCV's INTER_LINEAR (half-pixel centres, no
  antialias: PyTorch's bilinear with align_corners=False), then rescales values.
  (The full comparison with PyTorch's grid_sample runs in benchmarks/warp.py.)"""
  import cv2
  rng = np.random.default_rng(4)
  flow = rng.normal(size=(1, 16, 20, 2)).astype(np.float32)
  for h, w in [(32, 48), (8, 10)]:
    want = cv2.resize(flow[0], (w, h), interpolation=cv2.INTER_LINEAR)[None]
    got = W.resize_flow(jnp.asarray(flow), h, w, align_corners=False)
    np.testing.assert_allclose(got, want * np.asarray([w / 20, h / 16]), atol=1e-4)


def test_jit_and_vmap_compose():
  rng = np.random.default_rng(5)
  image = jnp.asarray(rng.normal(size=(3, 1, 8, 8, 2)), jnp.float32)
  grid = jnp.asarray(random_grid(rng, 3, 4, 4)[:, None], jnp.float32)
  batched = jax.jit(jax.vmap(W.grid_sample))(image, grid)
  loss = lambda im, g: jnp.sum(W.grid_sample(im, g) ** 2)
  grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(image, grid)
  for k in range(3):
    np.testing.assert_allclose(batched[k], W.grid_sample(image[k], grid[k]), atol=1e-6)
    single = jax.grad(loss, argnums=(0, 1))(image[k], grid[k])
    np.testing.assert_allclose(grads[0][k], single[0], atol=1e-5)
    np.testing.assert_allclose(grads[1][k], single[1], atol=1e-4)


@pytest.mark.parametrize("align_corners", [False, True])
def test_flow_grid_round_trip(align_corners):
  rng = np.random.default_rng(6)
  flow = jnp.asarray(rng.normal(scale=4, size=(2, 9, 13, 2)), jnp.float32)
  grid = W.flow_to_grid(flow, align_corners=align_corners)
  np.testing.assert_allclose(W.grid_to_flow(grid, align_corners=align_corners), flow,
                             atol=1e-4)
  zero = W.flow_to_grid(jnp.zeros((1, 9, 13, 2)), align_corners=align_corners)
  np.testing.assert_allclose(zero[0], W.identity_grid(9, 13, align_corners=align_corners),
                             atol=1e-6)
  # One pixel of flow is 2/W (2/(W-1) with align_corners) in normalised units.
  unit = W.flow_to_grid(jnp.ones((1, 9, 13, 2)), align_corners=align_corners) - zero
  np.testing.assert_allclose(unit[0, 0, 0], [2 / (13 - align_corners), 2 / (9 - align_corners)],
                             rtol=1e-5)


def test_flow_helpers_take_any_leading_dims():
  rng = np.random.default_rng(9)
  flow = jnp.asarray(rng.normal(size=(2, 3, 6, 5, 2)), jnp.float32)
  single = W.flow_to_grid(flow[1, 2])  # (H, W, 2), unbatched
  np.testing.assert_allclose(single, W.flow_to_grid(flow)[1, 2], atol=1e-6)
  np.testing.assert_allclose(W.grid_to_flow(single), flow[1, 2], atol=1e-5)
  resized = W.resize_flow(flow, 12, 10)
  assert resized.shape == (2, 3, 12, 10, 2)
  np.testing.assert_allclose(resized[1, 2], W.resize_flow(flow[1, 2][None], 12, 10)[0],
                             atol=1e-6)
  assert W.compose_flows(flow, flow).shape == flow.shape


def test_compose_with_inverse_translation_is_zero():
  shift = np.zeros((1, 16, 20, 2), np.float32)
  shift[..., 0], shift[..., 1] = 2.5, -1.25
  composed = W.compose_flows(jnp.asarray(shift), jnp.asarray(-shift))
  np.testing.assert_allclose(composed, 0, atol=1e-5)


def test_compose_matches_warping_twice():
  # Warp an image that holds its own pixel coordinates: bilinear sampling is
  # exact on it, so warping twice must equal one warp by the composed flow.
  yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
  coords = np.stack([xx, yy], -1)[None]
  f_ab = np.stack([1.5 + 0.03 * yy, -1.0 + 0.02 * xx], -1)[None].astype(np.float32)
  f_bc = np.stack([-0.05 * xx, 1.0 + 0.01 * yy], -1)[None].astype(np.float32)
  twice = np.asarray(W.warp(W.warp(coords, f_ab), f_bc))
  composed = W.compose_flows(f_ab, f_bc)
  once = np.asarray(W.warp(coords, composed))
  inner = (slice(None), slice(6, -6), slice(6, -6))
  np.testing.assert_allclose(twice[inner], once[inner], atol=1e-3)
  np.testing.assert_allclose(once[inner], (coords + composed)[inner], atol=1e-3)
  # The order matters: the other order is a different flow here.
  other = np.asarray(W.compose_flows(f_bc, f_ab))
  assert np.abs(other - np.asarray(composed))[inner].max() > 0.1


@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_flow_scales_values(align_corners):
  flow = np.zeros((2, 16, 16, 2), np.float32)
  flow[..., 0], flow[..., 1] = 3.0, -2.0
  out = W.resize_flow(jnp.asarray(flow), 32, 48, align_corners=align_corners)
  assert out.shape == (2, 32, 48, 2)
  if align_corners:
    want = [3.0 * 47 / 15, -2.0 * 31 / 15]
  else:
    want = [3.0 * 3, -2.0 * 2]
  np.testing.assert_allclose(out[0, 5, 7], want, rtol=1e-5)
  np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), rtol=1e-5)


def test_resize_flow_linear_field_and_resolution_independence():
  # An affine flow stays the same motion: value at new centre x' equals the old
  # flow at x = (x' + 0.5) * 16 / 64 - 0.5, times 64 / 16.
  xs = np.arange(16, dtype=np.float32)
  flow = np.zeros((1, 16, 16, 2), np.float32)
  flow[..., 0] = 0.25 * xs[None, :] + 1
  big = np.asarray(W.resize_flow(jnp.asarray(flow), 64, 64))
  x_new = np.arange(64)
  x_old = (x_new + 0.5) * 16 / 64 - 0.5
  want = (0.25 * x_old + 1) * 4
  np.testing.assert_allclose(big[0, 10, 4:-4, 0], want[4:-4], rtol=1e-5)
  # A 1-pixel shift at 16x16 is a 4-pixel shift at 64x64: warping the big image
  # by the resized flow is the exact integer shift.
  image = astronaut(64).astype(np.float32)
  small = np.zeros((1, 16, 16, 2), np.float32)
  small[..., 0] = 1.0
  out = np.asarray(W.warp(image, W.resize_flow(jnp.asarray(small), 64, 64)))
  np.testing.assert_allclose(out[:, :, :-4], image[:, :, 4:], atol=1e-5)


def test_flow_to_color_matches_hsv_reference():
  rng = np.random.default_rng(8)
  flow = rng.normal(size=(2, 5, 6, 2))
  flow[0, 0, 0] = 0
  got = W.flow_to_color(flow)
  assert got.dtype == np.uint8 and got.shape == (2, 5, 6, 3)
  mag = np.hypot(flow[..., 0], flow[..., 1])
  hsv = np.stack([(np.arctan2(-flow[..., 1], flow[..., 0]) / (2 * np.pi)) % 1,
                  mag / mag.max(), np.ones_like(mag)], -1)
  want = matplotlib.colors.hsv_to_rgb(hsv) * 255
  assert np.abs(got.astype(float) - want).max() <= 1.0
  np.testing.assert_array_equal(got[0, 0, 0], [255, 255, 255])  # still is white
  right = W.flow_to_color(np.array([[[1.0, 0.0]]]))
  np.testing.assert_array_equal(right[0, 0], [255, 0, 0])  # +x is red


def test_bad_input_raises_clear_errors():
  image = jnp.zeros((1, 4, 4, 1))
  grid = jnp.zeros((1, 2, 2, 2))
  with pytest.raises(ValueError, match="mode"):
    W.grid_sample(image, grid, mode="bicubic")
  with pytest.raises(ValueError, match="padding_mode"):
    W.grid_sample(image, grid, padding_mode="reflection")
  with pytest.raises(ValueError, match="NHWC"):
    W.grid_sample(image[0], grid)
  with pytest.raises(ValueError, match="batch"):
    W.grid_sample(jnp.zeros((2, 4, 4, 1)), grid)
  with pytest.raises(ValueError, match="flow"):
    W.warp(image, jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="flow_to_color"):
    W.flow_to_color(np.zeros((4, 4, 3)))
  with pytest.raises(ValueError, match="no pixels"):
    W.grid_sample(jnp.zeros((1, 0, 4, 1)), grid)
  with pytest.raises(ValueError, match="grid_to_flow: grid"):
    W.grid_to_flow(jnp.zeros((1, 4, 4)))


def test_empty_grid_gives_empty_output_and_zero_gradient():
  image = jnp.ones((1, 4, 4, 2))
  grid = jnp.zeros((1, 0, 3, 2))
  assert W.grid_sample(image, grid).shape == (1, 0, 3, 2)
  g_img, g_grid = jax.grad(lambda a, b: W.grid_sample(a, b).sum(), argnums=(0, 1))(image, grid)
  assert g_img.shape == image.shape and float(jnp.abs(g_img).max()) == 0
  assert g_grid.shape == grid.shape
