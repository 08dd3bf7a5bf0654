"""hdtf_jax.nn.conv: the CPU weight-gradient forms equal XLA's conv gradients; Conv is nn.Conv."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hdtf_jax.nn import conv as conv_lib

NHWC = ("NHWC", "HWIO", "NHWC")
NWC = ("NWC", "WIO", "NWC")

# (x shape, kernel shape, strides, padding): the kinds of conv the networks use.
CASES = [
    ((2, 9, 9, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),      # 3x3 'same'
    ((2, 9, 9, 3), (3, 3, 3, 5), (2, 2), ((1, 1), (1, 1))),      # stride 2, odd size
    ((1, 12, 10, 4), (7, 7, 4, 3), (1, 1), ((3, 3), (3, 3))),    # 7x7 -> 3 (G_vid's out conv)
    ((2, 8, 8, 4), (1, 1, 4, 6), (2, 2), ((0, 0), (0, 0))),      # 1x1 stride 2 (shortcut)
    ((2, 11, 11, 3), (4, 4, 3, 5), (1, 1), "VALID"),             # D_vid's 4x4 valid
    ((1, 10, 10, 2), (3, 3, 2, 4), (1, 1), "SAME"),
    ((1, 9, 9, 2), (5, 5, 2, 4), (2, 2), ((2, 1), (0, 2))),      # asymmetric explicit
]


def _native_grads(x, w, strides, padding, g, dn=NHWC):
  f = lambda x_, w_: lax.conv_general_dilated(x_, w_, strides, padding, dimension_numbers=dn)
  return jax.vjp(f, x, w)[1](g)


def _pads(x, w, strides, padding):
  if isinstance(padding, str):
    return lax.padtype_to_pads(x.shape[1:-1], w.shape[:-2], strides, padding)
  return padding


def _rand(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


@pytest.mark.parametrize("method", ["batch_conv", "columns"])
@pytest.mark.parametrize("case", CASES)
def test_weight_grad_forms_equal_xla(case, method):
  xs, ws, strides, padding = case
  x, w = _rand(xs, 0), _rand(ws, 1)
  y = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
  g = _rand(y.shape, 2)
  _, dw_ref = _native_grads(x, w, strides, padding, g)
  dw = conv_lib._weight_grad(x, g, w.shape, strides, _pads(x, w, strides, padding), w.dtype,
                             method)
  assert dw.shape == dw_ref.shape
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(dw_ref))))


def test_weight_grad_1d():
  x, w = _rand((3, 17, 4), 0), _rand((5, 4, 2), 1)
  for strides in ((1,), (2,)):
    y = lax.conv_general_dilated(x, w, strides, ((2, 2),), dimension_numbers=NWC)
    g = _rand(y.shape, 2)
    _, dw_ref = _native_grads(x, w, strides, ((2, 2),), g, NWC)
    dw = conv_lib._weight_grad(x, g, w.shape, strides, ((2, 2),), w.dtype, "batch_conv")
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_conv_general_dilated_value_and_grads(case):
  """The function nn.Conv calls: same output and (x, w) gradients as lax's, on this CPU."""
  xs, ws, strides, padding = case
  x, w = _rand(xs, 3), _rand(ws, 4)
  loss = lambda f: lambda x_, w_: jnp.sum(jnp.sin(f(x_, w_, strides, padding,
                                                    dimension_numbers=NHWC)))
  ref = jax.jit(jax.value_and_grad(loss(lax.conv_general_dilated), argnums=(0, 1)))(x, w)
  got = jax.jit(jax.value_and_grad(loss(conv_lib.conv_general_dilated), argnums=(0, 1)))(x, w)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_methods_picked_for_the_measured_shapes():
  m = conv_lib.weight_grad_method
  assert m((1, 128, 128, 32), (7, 7, 32, 3), (1, 128, 128, 3)) == "batch_conv"
  assert m((1, 64, 64, 256), (3, 3, 256, 256), (1, 64, 64, 256)) == "columns"
  assert m((1, 64, 64, 128), (3, 3, 128, 64), (1, 64, 64, 64)) == "native"
  assert m((1, 64, 256), (3, 256, 256), (1, 64, 256)) == "native"  # 1D: no column form


def test_bfloat16_grads_match_flax():
  """Conv vs nn.Conv, bf16 compute with f32 params: gradients to bf16 rounding."""
  x = _rand((2, 16, 16, 8), 5)
  kw = dict(features=3, kernel_size=(7, 7), padding=((3, 3), (3, 3)), dtype=jnp.bfloat16)
  params = nn.Conv(**kw).init(jax.random.PRNGKey(0), x)
  loss = lambda mod: lambda p, x_: jnp.sum(jnp.square(mod.apply(p, x_).astype(jnp.float32)))
  ref = jax.grad(loss(nn.Conv(**kw)), argnums=(0, 1))(params, x)
  got = jax.grad(loss(conv_lib.Conv(**kw)), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2,
                               atol=2e-2 * float(jnp.max(jnp.abs(b.astype(jnp.float32)))))


def test_conv_module_has_nn_conv_parameters():
  x = _rand((1, 8, 8, 3), 6)
  for kw in (dict(features=4, kernel_size=(3, 3)), dict(features=2, kernel_size=(4, 4),
                                                        padding="VALID", use_bias=False)):
    a = nn.Conv(**kw).init(jax.random.PRNGKey(1), x)
    b = conv_lib.Conv(**kw).init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(u, v)
    np.testing.assert_allclose(conv_lib.Conv(**kw).apply(b, x), nn.Conv(**kw).apply(a, x),
                               rtol=1e-6, atol=1e-6)

  class Net(nn.Module):  # unnamed convs keep nn.Conv's automatic names
    @nn.compact
    def __call__(self, x):
      return conv_lib.Conv(2, (3, 3))(conv_lib.Conv(2, (3, 3))(x))
  assert set(Net().init(jax.random.PRNGKey(0), x)["params"]) == {"Conv_0", "Conv_1"}


def test_dilated_and_grouped_convs_fall_back_to_lax():
  x, w = _rand((1, 9, 9, 4), 7), _rand((3, 3, 2, 4), 8)
  f = lambda mod: lambda x_, w_: jnp.sum(mod(x_, w_, (1, 1), "SAME", rhs_dilation=(2, 2),
                                             dimension_numbers=NHWC, feature_group_count=2) ** 2)
  ref = jax.grad(f(lax.conv_general_dilated), argnums=(0, 1))(x, w)
  got = jax.grad(f(conv_lib.conv_general_dilated), argnums=(0, 1))(x, w)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _grad_text(fn, platform: str) -> str:
  x, w = jnp.ones((1, 16, 16, 4)), jnp.ones((7, 7, 4, 3))
  loss = lambda x_, w_: jnp.sum(fn(x_, w_, (1, 1), ((3, 3), (3, 3)), dimension_numbers=NHWC) ** 2)
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, w).lower(
      lowering_platforms=(platform,))
  return lowered.as_text()


def test_gpu_lowering_is_xlas_native_conv():
  """Lowered for CUDA (no GPU needed), the gradient has exactly lax's convolutions and none of the
  CPU branch's transposes; lowered for CPU it has the CPU branch."""
  convs = lambda t: sorted(re.findall(
      r"stablehlo\.convolution\([^)]*\) (dim_numbers.*?window = \{[^}]*\})", t))
  for platform in ("cuda", "rocm", "tpu"):
    ours, native = _grad_text(conv_lib.conv_general_dilated, platform), _grad_text(
        lax.conv_general_dilated, platform)
    assert "stablehlo.transpose" not in ours
    assert convs(ours) == convs(native) and len(convs(ours)) == 3
  cpu = _grad_text(conv_lib.conv_general_dilated, "cpu")
  assert "stablehlo.transpose" in cpu and convs(cpu) != convs(_grad_text(
      lax.conv_general_dilated, "cpu"))


def test_env_switch_forces_xla(monkeypatch):
  monkeypatch.setenv("HDTF_JAX_CONV", "xla")
  cpu = _grad_text(conv_lib.conv_general_dilated, "cpu")
  assert cpu == _grad_text(lax.conv_general_dilated, "cpu")


def test_native_shapes_stay_plain_lax():
  """Where the native weight gradient is kept, no custom VJP is staged (jvp works)."""
  x, w = _rand((1, 8, 8, 32), 9), _rand((3, 3, 32, 32), 10)
  f = lambda x_: conv_lib.conv_general_dilated(x_, w, (1, 1), "SAME", dimension_numbers=NHWC)
  assert "custom_vjp" not in str(jax.make_jaxpr(f)(x))
  _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
  ref = lax.conv_general_dilated(jnp.ones_like(x), w, (1, 1), "SAME", dimension_numbers=NHWC)
  np.testing.assert_allclose(tangent, ref, rtol=1e-5, atol=1e-4)
  small = lambda x_: conv_lib.conv_general_dilated(x_, w[..., :3], (1, 1), "SAME",
                                                   dimension_numbers=NHWC)
  assert "custom_vjp" in str(jax.make_jaxpr(small)(x))
