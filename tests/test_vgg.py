"""VGG-19 features and weight converters against Keras (and PyTorch when installed)."""
import sys

import h5py
import jax
import numpy as np
import pytest
import skimage.data
import skimage.transform

from hdtf_jax.nn import vgg

# Keras' TensorFlow backend trips a NumPy 2 deprecation on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 48  # smallest size that keeps relu5_1 at 3x3
KERAS_LAYERS = ("block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1")


@pytest.fixture(scope="module")
def astronaut():
  img = skimage.transform.resize(skimage.data.astronaut(), (SIZE, SIZE), anti_aliasing=True)
  return img[None].astype(np.float32)  # (1, SIZE, SIZE, 3) in [0, 1]


@pytest.fixture(scope="module")
def keras_vgg():
  keras = pytest.importorskip("keras")
  model = keras.applications.VGG19(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
  rng = np.random.default_rng(0)
  for layer in model.layers:  # Keras inits biases to 0; random ones catch bias bugs
    if layer.name in vgg.CONV_NAMES:
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype(np.float32)])
  taps = keras.Model(model.input, [model.get_layer(n).output for n in KERAS_LAYERS])
  return model, taps


def _keras_features(taps, x):
  return [np.asarray(y) for y in taps(x, training=False)]


def _assert_features_close(ours, ref):
  assert len(ours) == len(ref)
  for a, b in zip(ours, ref):
    a = np.asarray(a)
    assert a.shape == b.shape
    scale = np.abs(b).max()
    assert scale > 0
    np.testing.assert_allclose(a / scale, b / scale, atol=2e-5)


def _write_classic_h5(path, model):
  """The layout of Keras' published *_notop.h5 (Keras' own legacy writer if present)."""
  try:
    from keras.src.legacy.saving import legacy_h5_format
  except ImportError:
    legacy_h5_format = None
  with h5py.File(path, "w") as f:
    if legacy_h5_format is not None:
      legacy_h5_format.save_weights_to_hdf5_group(f, model)
      return
    names = [layer.name for layer in model.layers]
    f.attrs["layer_names"] = [n.encode() for n in names]
    for layer in model.layers:
      g = f.create_group(layer.name)
      wnames = [f"{layer.name}/{k}:0" for k in ("kernel", "bias")][:len(layer.get_weights())]
      g.attrs["weight_names"] = [n.encode() for n in wnames]
      for n, w in zip(wnames, layer.get_weights()):
        g.create_dataset(n, data=w)


@pytest.mark.parametrize("layout", ["keras3", "classic"])
def test_keras_h5_matches_keras_features(tmp_path, keras_vgg, astronaut, layout):
  model, taps = keras_vgg
  if layout == "keras3":
    path = tmp_path / "vgg.weights.h5"
    model.save_weights(str(path))
  else:
    path = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    _write_classic_h5(path, model)
  with h5py.File(path) as f:  # the two layouts really differ
    assert ("layer_names" in f.attrs) == (layout == "classic")
  weights = vgg.load_vgg19_params(path)
  assert weights.preprocess == "caffe"
  assert list(weights.params) == list(vgg.CONV_NAMES)
  for layer in model.layers:
    if layer.name in vgg.CONV_NAMES:
      kernel, bias = layer.get_weights()
      np.testing.assert_array_equal(weights.params[layer.name]["kernel"], kernel)
      np.testing.assert_array_equal(weights.params[layer.name]["bias"], bias)

  keras = pytest.importorskip("keras")
  ref = _keras_features(taps, keras.applications.vgg19.preprocess_input(astronaut * 255.0))
  ours = jax.jit(weights.module().apply)(weights.variables, astronaut)
  _assert_features_close(ours, ref)
  assert [o.shape[1] for o in ours] == [SIZE, SIZE // 2, SIZE // 4, SIZE // 8, SIZE // 16]


def test_imagenet_preprocessing_and_layer_subset(keras_vgg, astronaut, tmp_path):
  model, taps = keras_vgg
  path = tmp_path / "w.weights.h5"
  model.save_weights(str(path))
  weights = vgg.load_keras_h5(path)
  normalised = (astronaut - np.array(vgg.IMAGENET_MEAN)) / np.array(vgg.IMAGENET_STD)
  ref = _keras_features(taps, normalised.astype(np.float32))
  ours = vgg.VGG19Features(preprocess="imagenet").apply(weights.variables, astronaut)
  _assert_features_close(ours, ref)
  # A shallower subset uses the same full params tree, in the requested order.
  sub = vgg.VGG19Features(layers=("relu2_1", "relu1_1"), preprocess="imagenet")
  a, b = sub.apply(weights.variables, astronaut)
  _assert_features_close([b, a], ref[:2])
  assert set(jax.eval_shape(sub.init, jax.random.key(0), astronaut)["params"]) == {
      "block1_conv1", "block1_conv2", "block2_conv1"}


def test_init_param_tree_matches_vgg19_architecture():
  full = vgg.VGG19Features(layers=("relu5_4",))
  shapes = jax.eval_shape(full.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
  assert list(shapes) == list(vgg.CONV_NAMES)
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert total == 20_024_384  # VGG-19 without the classifier, as Keras reports it


def test_torchvision_layout(keras_vgg):
  """A torchvision-layout (OIHW) state dict converts to the same HWIO params and
  features as the Keras weights it was made from (NumPy arrays: no torch needed)."""
  model, _ = keras_vgg
  sd = {}
  for idx, layer in zip(vgg.TORCHVISION_CONV_INDICES, vgg.CONV_NAMES):
    kernel, bias = model.get_layer(layer).get_weights()
    sd[f"features.{idx}.weight"] = kernel.transpose(3, 2, 0, 1).copy()
    sd[f"features.{idx}.bias"] = bias
  params = vgg.convert_torchvision_state_dict(sd)
  for layer in vgg.CONV_NAMES:
    kernel, bias = model.get_layer(layer).get_weights()
    np.testing.assert_array_equal(np.asarray(params[layer]["kernel"]), kernel)
    np.testing.assert_array_equal(np.asarray(params[layer]["bias"]), bias)
  bare = vgg.convert_torchvision_state_dict({k[len("features."):]: v for k, v in sd.items()})
  jax.tree.map(np.testing.assert_array_equal, bare, params)
  with pytest.raises(ValueError, match="lacks"):
    vgg.convert_torchvision_state_dict({})


def test_torch_missing_gives_clear_error(tmp_path, monkeypatch):
  path = tmp_path / "vgg19.pth"
  path.write_bytes(b"not really")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="PyTorch"):
    vgg.load_vgg19_params(path)


def test_npz_roundtrip(tmp_path, keras_vgg, astronaut):
  model, _ = keras_vgg
  model.save_weights(str(tmp_path / "k.weights.h5"))
  weights = vgg.load_vgg19_params(tmp_path / "k.weights.h5")
  vgg.save_npz(tmp_path / "vgg.npz", weights)
  back = vgg.load_vgg19_params(tmp_path / "vgg.npz")
  assert back.preprocess == "caffe"
  jax.tree.map(np.testing.assert_array_equal, back.params, weights.params)


def test_missing_and_bad_files(tmp_path):
  missing = tmp_path / "nope.h5"
  with pytest.raises(FileNotFoundError, match="nope.h5") as err:
    vgg.load_vgg19_params(missing)
  assert "include_top=False" in str(err.value) and "vgg19-dcbb9e9d.pth" in str(err.value)
  bad = tmp_path / "weights.bin"
  bad.write_bytes(b"x")
  with pytest.raises(ValueError, match="weights.bin"):
    vgg.load_vgg19_params(bad)
  empty = tmp_path / "empty.h5"
  h5py.File(empty, "w").close()
  with pytest.raises(ValueError, match="empty.h5"):
    vgg.load_vgg19_params(empty)
  with pytest.raises(ValueError, match="relu6_1"):
    vgg.VGG19Features(layers=("relu6_1",)).init(jax.random.key(0), np.zeros((1, 32, 32, 3)))


def test_pyramid_features_shapes():
  module = vgg.VGG19Features(layers=("relu1_1", "relu2_1"))
  x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  variables = module.init(jax.random.key(0), x)
  levels = vgg.pyramid_features(module, variables, x, num_scales=3)
  assert [[f.shape for f in level] for level in levels] == [
      [(2, 32, 32, 64), (2, 16, 16, 128)], [(2, 16, 16, 64), (2, 8, 8, 128)],
      [(2, 8, 8, 64), (2, 4, 4, 128)]]
  # The half-size level is the 2x2 area average of the input.
  half = vgg.image_pyramid(x, 2)[1]
  np.testing.assert_allclose(half[0, 3, 5], x[0, 6:8, 10:12].mean(axis=(0, 1)), rtol=1e-6)
