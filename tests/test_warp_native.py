"""The native CPU grid_sample (hdtf_jax/native) against the XLA path and the NumPy reference.

tests/test_warp.py already runs every grid_sample through the native kernel
(the CPU default) against its NumPy loop reference and finite differences;
this file checks the kernel against the XLA path it replaces (values and both
gradients, every mode, padding and align_corners, odd shapes, points
outside, the multi-threaded and partial-buffer backward), dtypes, vmap, the
fallback, the accelerator lowering and batch sharding over 8 devices.
"""
import itertools
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdtf_jax import native, warp as W
from test_warp import random_grid, ref_grid_sample

ROOT = Path(__file__).resolve().parents[1]
CASES = list(itertools.product(["bilinear", "nearest"], ["zeros", "border"], [False, True]))


@pytest.fixture(scope="module", autouse=True)
def built():
  # g++ is on every machine the suite runs on: the build must work, not skip.
  assert native.grid_sample_available(), "native grid_sample did not build (see the warning)"


def both_paths(image, grid, cot, mode, padding_mode, align_corners):
  """(output, d image, d grid) from the native kernel and from the XLA path."""
  results = []
  for use_native in (True, False):
    f = lambda a, b: W._grid_sample(a, b, mode, padding_mode, align_corners, use_native)
    out, vjp = jax.vjp(f, image, grid)
    results.append((out, *vjp(cot)))
  return results


def inputs(rng, n, h, w, c, ho, wo, spread=1.3, dtype=np.float32):
  image = rng.normal(size=(n, h, w, c)).astype(dtype)
  grid = random_grid(rng, n, ho, wo, spread).astype(dtype)
  cot = rng.normal(size=(n, ho, wo, c)).astype(dtype)
  return jnp.asarray(image), jnp.asarray(grid), jnp.asarray(cot)


@pytest.mark.parametrize("mode,padding_mode,align_corners", CASES)
@pytest.mark.parametrize("shape", [
    (1, 5, 7, 3, 6, 4),     # batch 1, non-square, C=3 (compile-time C)
    (2, 6, 4, 5, 3, 9),     # C=5 (run-time C)
    (3, 9, 8, 1, 7, 5),     # odd batch, C=1
    (2, 7, 4, 2, 3, 9),     # C=2 (flows)
    (1, 6, 5, 4, 5, 4),     # C=4 (RGBA)
])
def test_native_matches_xla_path_values_and_gradients(shape, mode, padding_mode, align_corners):
  n, h, w, c, ho, wo = shape
  image, grid, cot = inputs(np.random.default_rng(0), n, h, w, c, ho, wo)
  # Exact pixel centres, edges and half-pixels too (floor / rounding ties).
  grid = grid.at[:, 0, :, 0].set(jnp.linspace(-1.25, 1.25, wo))
  (out, d_img, d_grid), (x_out, x_img, x_grid) = both_paths(
      image, grid, cot, mode, padding_mode, align_corners)
  np.testing.assert_allclose(out, x_out, atol=1e-6)
  np.testing.assert_allclose(out, ref_grid_sample(image, grid, mode, padding_mode,
                                                  align_corners), atol=2e-5)
  np.testing.assert_allclose(d_img, x_img, atol=1e-5)
  np.testing.assert_allclose(d_grid, x_grid, atol=1e-4, rtol=1e-5)
  if mode == "bilinear":
    assert np.abs(np.asarray(d_grid)).max() > 0.1  # not vacuous
  else:
    assert np.all(np.asarray(d_grid) == 0)


@pytest.mark.parametrize("n,c", [(1, 8), (2, 8), (3, 8), (1, 3), (2, 4)])
def test_multithreaded_chunks_match_xla_path(n, c):
  # Large enough for several work items per call (they run on XLA's intra-op
  # threads; with fewer images than threads, as n=1 on 2 cores, the backward
  # scatters parts of an image into private buffers and sums them), most
  # points inside.
  image, grid, cot = inputs(np.random.default_rng(1), n, 64, 48, c, 96, 80, spread=1.05)
  (out, d_img, d_grid), (x_out, x_img, x_grid) = both_paths(
      image, grid, cot, "bilinear", "zeros", False)
  np.testing.assert_allclose(out, x_out, atol=1e-5)
  np.testing.assert_allclose(d_img, x_img, atol=1e-4)
  np.testing.assert_allclose(d_grid, x_grid, atol=1e-3, rtol=1e-4)


def test_far_outside_and_nonfinite_free_points():
  # Points far outside read zeros (zeros padding) or the border pixel, with zero gradient.
  image = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 5, 3)), jnp.float32)
  grid = jnp.asarray([[[[1e6, 0.0], [-1e6, 3e7], [0.2, -40.0]]]], jnp.float32)
  for padding_mode in ("zeros", "border"):
    (out, _, d_grid), (x_out, _, x_grid) = both_paths(
        image, grid, jnp.ones((1, 1, 3, 3)), "bilinear", padding_mode, False)
    np.testing.assert_allclose(out, x_out, atol=1e-6)
    np.testing.assert_allclose(d_grid, x_grid, atol=1e-6)
    if padding_mode == "zeros":
      assert np.all(np.asarray(out) == 0)


def test_float64_bfloat16_and_mixed_dtypes():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    image, grid, cot = inputs(rng, 2, 5, 6, 3, 4, 3, dtype=np.float64)
    (out, d_img, d_grid), (x_out, x_img, x_grid) = both_paths(
        image, grid, cot, "bilinear", "border", True)
    assert out.dtype == d_img.dtype == d_grid.dtype == jnp.float64
    np.testing.assert_allclose(out, x_out, atol=1e-12)
    np.testing.assert_allclose(d_grid, x_grid, atol=1e-10)
  image, grid, _ = inputs(rng, 2, 8, 8, 3, 5, 5, spread=1.0)
  out16 = W.grid_sample(image.astype(jnp.bfloat16), grid.astype(jnp.bfloat16))
  assert out16.dtype == jnp.bfloat16
  # The kernel samples bfloat16 in float32: as close to the float32 result as bfloat16 allows.
  want = W.grid_sample(image, grid.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(out16.astype(np.float32), want, atol=2e-2, rtol=1e-2)
  g16 = jax.grad(lambda a: W.grid_sample(a, grid.astype(jnp.bfloat16)).astype(jnp.float32).sum())(
      image.astype(jnp.bfloat16))
  assert g16.dtype == jnp.bfloat16
  assert W.grid_sample(image.astype(jnp.bfloat16), grid).dtype == jnp.float32  # promotion


def test_vmap_folds_into_one_call():
  rng = np.random.default_rng(4)
  image = jnp.asarray(rng.normal(size=(3, 2, 6, 7, 3)), jnp.float32)
  grid = jnp.asarray(random_grid(rng, 3 * 2, 4, 5).reshape(3, 2, 4, 5, 2), jnp.float32)
  loss = lambda a, b: jnp.sum(W.grid_sample(a, b) ** 2)
  batched = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1))))
  values, (g_img, g_grid) = batched(image, grid)
  # An unbatched image with a batched grid broadcasts.
  shared = jax.vmap(W.grid_sample, in_axes=(None, 0))(image[0], grid)
  for k in range(3):
    v, (gi, gg) = jax.value_and_grad(loss, argnums=(0, 1))(image[k], grid[k])
    np.testing.assert_allclose(values[k], v, rtol=1e-5)
    np.testing.assert_allclose(g_img[k], gi, atol=1e-5)
    np.testing.assert_allclose(g_grid[k], gg, atol=1e-4)
    np.testing.assert_allclose(shared[k], W.grid_sample(image[0], grid[k]), atol=1e-6)
  hlo = jax.jit(jax.vmap(W.grid_sample)).lower(image, grid).compile().as_text()
  assert hlo.count('custom_call_target="hdtf_grid_sample_fwd"') == 1


def test_env_var_forces_the_xla_path_with_the_same_numbers(monkeypatch):
  image, grid, cot = inputs(np.random.default_rng(5), 2, 7, 6, 3, 5, 4)
  loss = lambda a, b: jnp.vdot(W.grid_sample(a, b, padding_mode="border"), cot)
  lowered = lambda: jax.jit(jax.grad(loss, argnums=(0, 1))).lower(image, grid).as_text()
  assert "hdtf_grid_sample_bwd" in lowered()
  native_grads = jax.grad(loss, argnums=(0, 1))(image, grid)
  monkeypatch.setenv(native.ENV_SWITCH, "0")
  jax.clear_caches()  # grid_sample decides at trace time
  try:
    assert "hdtf_grid_sample" not in lowered()
    for got, want in zip(jax.grad(loss, argnums=(0, 1))(image, grid), native_grads):
      np.testing.assert_allclose(got, want, atol=1e-5)
  finally:
    jax.clear_caches()


def test_accelerator_lowering_has_no_custom_call():
  image, grid, cot = inputs(np.random.default_rng(6), 1, 4, 4, 3, 2, 2)
  fn = jax.jit(jax.value_and_grad(lambda a, b: jnp.vdot(W.grid_sample(a, b), cot),
                                  argnums=(0, 1)))
  cuda = fn.trace(image, grid).lower(lowering_platforms=("cuda",)).as_text()
  assert "custom_call" not in cuda and "hdtf_grid_sample" not in cuda
  assert "hdtf_grid_sample_fwd" in fn.lower(image, grid).as_text()  # CPU keeps it


def test_failed_build_falls_back_with_one_warning(monkeypatch, tmp_path):
  monkeypatch.setattr(native, "_state", {})
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert not native.grid_sample_available()
    assert not native.grid_sample_available()  # tried once, warned once
  assert len(caught) == 1 and "using the XLA path" in str(caught[0].message)
  assert "\n" not in str(caught[0].message)


def test_build_is_cached_under_a_key():
  first = native.build()
  mtime = first.stat().st_mtime_ns
  assert native.build() == first and first.stat().st_mtime_ns == mtime  # not rebuilt
  assert first.parent == native.cache_dir() and first.suffix == ".so"


SHARDED = textwrap.dedent("""
  import numpy as np, jax, jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from hdtf_jax import native, warp as W
  assert native.grid_sample_available() and len(jax.devices()) == 8
  rng = np.random.default_rng(7)
  image = rng.normal(size=(8, 12, 10, 3)).astype(np.float32)
  grid = rng.uniform(-1.1, 1.1, size=(8, 9, 11, 2)).astype(np.float32)
  cot = rng.normal(size=(8, 9, 11, 3)).astype(np.float32)
  fn = jax.jit(jax.value_and_grad(lambda a, b: jnp.vdot(W.grid_sample(a, b), cot),
                                  argnums=(0, 1)))
  want = fn(image, grid)
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), P("batch"))
  args = [jax.device_put(x, sharding) for x in (image, grid)]
  got = fn(*args)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-4)
  assert got[1][0].sharding.spec == P("batch") and got[1][1].sharding.spec == P("batch")
  hlo = fn.lower(*args).compile().as_text()
  # Each device samples its own image: no gathered inputs around the custom calls.
  assert "f32[1,9,11,3]{3,2,1,0} custom-call(" in hlo, hlo
  assert "all-gather" not in hlo
  # Explicit mesh axes (sharding in the types): grid_sample runs per shard (shard_map).
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    args = [jax.device_put(x, NamedSharding(mesh, P("batch"))) for x in (image, grid)]
    got = fn(*args)
    hlo = fn.lower(*args).compile().as_text()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-4)
  assert "f32[1,9,11,3]{3,2,1,0} custom-call(" in hlo and "all-gather" not in hlo, hlo
  print("ok")
""")


def test_sharded_jit_over_8_devices_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
