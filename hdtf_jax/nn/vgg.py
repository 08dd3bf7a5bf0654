"""VGG-19 feature extractor for the perceptual loss, plus weight converters.

`VGG19Features` is the convolutional part of VGG-19 (16 3x3 convs in five blocks,
2x2 max-pooling between blocks). It returns the ReLU outputs named `reluB_I`
(block B, conv I), e.g. relu1_1 ... relu5_1, for [0, 1] RGB images in NHWC.

Weights are never downloaded. Two published sources are supported:
  * Keras: `vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5` (the classic h5
    layout) or a Keras 3 `*.weights.h5`. Read with h5py, no TensorFlow. These
    were converted from Caffe, so they expect Caffe preprocessing (BGR, 0-255,
    mean subtracted): `preprocess="caffe"`.
  * torchvision: `vgg19-dcbb9e9d.pth` (needs torch). These expect ImageNet
    mean/std normalisation of RGB in [0, 1]: `preprocess="imagenet"`.
Converted params can be cached with `save_npz`, which also stores the
preprocessing, so `load_vgg19_params` always hands back the right one.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Output channels of each conv, per block (VGG-19, configuration "E").
VGG19_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512),
    (512, 512, 512, 512))
CONV_NAMES: tuple[str, ...] = tuple(
    f"block{b + 1}_conv{i + 1}" for b, block in enumerate(VGG19_BLOCKS)
    for i in range(len(block)))
DEFAULT_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
PREPROCESSING = ("imagenet", "caffe", "none")

# Indices of the convs inside torchvision's `vgg19().features` Sequential.
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30,
                            32, 34)

HOW_TO_GET_WEIGHTS = (
    "We never download weights. Either (a) in Python with TensorFlow/Keras: "
    "`keras.applications.VGG19(weights='imagenet', include_top=False)"
    ".save_weights('vgg19.weights.h5')`, or use Keras' cached "
    "~/.keras/models/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5; or "
    "(b) download torchvision's "
    "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth yourself. Then "
    "optionally convert once with hdtf_jax.nn.vgg.save_npz.")


def _parse_layer(name: str) -> tuple[int, int]:
  """'relu3_1' -> (block index 0-based, conv index 0-based), validated."""
  try:
    prefix, rest = name[:4], name[4:]
    block, conv = (int(v) for v in rest.split("_"))
    if prefix != "relu":
      raise ValueError
  except ValueError:
    raise ValueError(f"VGG-19 layer {name!r} is not of the form 'reluB_I'") from None
  if not (1 <= block <= len(VGG19_BLOCKS) and 1 <= conv <= len(VGG19_BLOCKS[block - 1])):
    raise ValueError(f"VGG-19 has no layer {name!r}")
  return block - 1, conv - 1


def preprocess_images(images: jax.Array, mode: str) -> jax.Array:
  """Maps [0, 1] RGB images to the input range the weights were trained on."""
  if mode == "imagenet":
    return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  if mode == "caffe":
    return images[..., ::-1] * 255.0 - jnp.asarray(CAFFE_MEAN_BGR)
  if mode == "none":
    return images
  raise ValueError(f"unknown VGG preprocessing {mode!r}; expected one of {PREPROCESSING}")


class VGG19Features(nn.Module):
  """ReLU feature maps of VGG-19 for NHWC images in [0, 1].

  Only the convs up to the deepest requested layer are built, so a full
  converted params tree also works for shallower `layers` (extra entries unused).
  Returns a list of arrays in the order of `layers`.
  """
  layers: Sequence[str] = DEFAULT_LAYERS
  preprocess: str = "imagenet"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"VGG19Features expects (N, H, W, 3) images, got {images.shape}")
    wanted = {_parse_layer(name): name for name in self.layers}
    last = max(wanted)
    found: dict[str, jax.Array] = {}
    x = preprocess_images(images.astype(jnp.float32), self.preprocess).astype(self.dtype)
    for b, block in enumerate(VGG19_BLOCKS):
      if b > last[0]:
        break
      if b > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for i, width in enumerate(block):
        if (b, i) > last:
          break
        x = nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype,
                    name=f"block{b + 1}_conv{i + 1}")(x)
        x = nn.relu(x)
        if (b, i) in wanted:
          found[wanted[(b, i)]] = x
    return [found[name] for name in self.layers]


def image_pyramid(images: jax.Array, num_scales: int) -> list[jax.Array]:
  """[images, images/2, images/4, ...] by 2x2 area averaging (needs even sizes)."""
  out = [images]
  for _ in range(num_scales - 1):
    x = out[-1]
    n, h, w, c = x.shape
    if h % 2 or w % 2:
      raise ValueError(f"image_pyramid: size {h}x{w} is not divisible by 2")
    out.append(x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)))
  return out


def pyramid_features(module: VGG19Features, variables: Mapping[str, Any],
                     images: jax.Array, num_scales: int) -> list[list[jax.Array]]:
  """VGG features of each level of `image_pyramid(images, num_scales)`."""
  return [module.apply(variables, x) for x in image_pyramid(images, num_scales)]


@dataclasses.dataclass(frozen=True)
class VGG19Weights:
  """Converted VGG-19 params plus the input preprocessing they were trained with."""
  params: dict[str, dict[str, np.ndarray]]
  preprocess: str

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params}

  def module(self, layers: Sequence[str] = DEFAULT_LAYERS, dtype: Any = jnp.float32) -> VGG19Features:
    return VGG19Features(layers=tuple(layers), preprocess=self.preprocess, dtype=dtype)


def _check_params(params: Mapping[str, Mapping[str, np.ndarray]], source: str) -> dict:
  """Validates names and shapes against the VGG-19 architecture."""
  missing = [n for n in CONV_NAMES if n not in params]
  if missing:
    raise ValueError(f"{source}: VGG-19 weights lack layers {missing}")
  out, cin = {}, 3
  for name, width in zip(CONV_NAMES, (w for block in VGG19_BLOCKS for w in block)):
    kernel = np.asarray(params[name]["kernel"], np.float32)
    bias = np.asarray(params[name]["bias"], np.float32)
    if kernel.shape != (3, 3, cin, width) or bias.shape != (width,):
      raise ValueError(f"{source}: {name} has kernel {kernel.shape} / bias {bias.shape}, "
                       f"expected {(3, 3, cin, width)} / {(width,)}")
    out[name] = {"kernel": kernel, "bias": bias}
    cin = width
  return out


def _require_file(path: str | os.PathLike) -> Path:
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"VGG-19 weights not found at {path}. {HOW_TO_GET_WEIGHTS}")
  return path


def _kernel_and_bias(arrays: Sequence[np.ndarray], source: str) -> dict[str, np.ndarray]:
  """Keras stores [kernel (3,3,in,out), bias]; pick them by rank to be safe."""
  kernels = [a for a in arrays if a.ndim == 4]
  biases = [a for a in arrays if a.ndim == 1]
  if len(kernels) != 1 or len(biases) != 1:
    raise ValueError(f"{source}: expected one kernel and one bias, got shapes "
                     f"{[a.shape for a in arrays]}")
  return {"kernel": kernels[0], "bias": biases[0]}


def _as_str(v) -> str:
  return v.decode("utf8") if isinstance(v, bytes) else str(v)


def load_keras_h5(path: str | os.PathLike) -> VGG19Weights:
  """Reads Keras VGG-19 weights (classic or Keras 3 h5 layout) with h5py."""
  path = _require_file(path)
  try:
    import h5py
  except ImportError as e:  # pragma: no cover - h5py ships with tensorflow
    raise ImportError(f"reading {path} needs h5py (pip install h5py)") from e
  params = {}
  with h5py.File(path, "r") as f:
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" in root.attrs:  # classic: one group per layer, weight_names attr
      for layer in map(_as_str, root.attrs["layer_names"]):
        if layer in CONV_NAMES:
          group = root[layer]
          names = [_as_str(n) for n in group.attrs["weight_names"]]
          params[layer] = _kernel_and_bias([group[n][()] for n in names], f"{path}:{layer}")
    elif "layers" in root:  # Keras 3: layers/<auto name>/vars/{0,1}, real name in attrs
      for group in root["layers"].values():
        if "vars" not in group:
          continue
        layer = _as_str(group["vars"].attrs.get("name", ""))
        if layer in CONV_NAMES:
          v = group["vars"]
          params[layer] = _kernel_and_bias([v[k][()] for k in sorted(v, key=int)],
                                           f"{path}:{layer}")
    else:
      raise ValueError(f"{path}: not a Keras weights file (no 'layer_names' attribute "
                       "and no 'layers' group)")
  return VGG19Weights(_check_params(params, str(path)), "caffe")


def convert_torchvision_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """torchvision `vgg19().state_dict()` (OIHW) -> our params (HWIO).

  Accepts torch tensors or NumPy arrays; keys may be 'features.N.weight' or,
  for a bare `features` module, 'N.weight'.
  """
  prefix = "features." if any(k.startswith("features.") for k in state_dict) else ""
  params = {}
  for name, idx in zip(CONV_NAMES, TORCHVISION_CONV_INDICES):
    try:
      w, b = state_dict[f"{prefix}{idx}.weight"], state_dict[f"{prefix}{idx}.bias"]
    except KeyError:
      raise ValueError(f"state dict lacks {prefix}{idx}.weight/bias ({name}); "
                       "is it a torchvision VGG-19?") from None
    w = np.asarray(w.detach().cpu().numpy() if hasattr(w, "detach") else w)
    b = np.asarray(b.detach().cpu().numpy() if hasattr(b, "detach") else b)
    params[name] = {"kernel": w.transpose(2, 3, 1, 0), "bias": b}  # OIHW -> HWIO
  return _check_params(params, "torchvision state dict")


def load_torchvision_pth(path: str | os.PathLike) -> VGG19Weights:
  """Reads torchvision's vgg19-dcbb9e9d.pth; needs torch installed."""
  path = _require_file(path)
  try:
    import torch
  except ImportError:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch), or convert it "
                      "elsewhere with hdtf_jax.nn.vgg.save_npz and load the .npz") from None
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  return VGG19Weights(convert_torchvision_state_dict(state_dict), "imagenet")


def save_npz(path: str | os.PathLike, weights: VGG19Weights) -> None:
  """Stores params as 'blockB_convI/kernel' arrays plus the preprocessing."""
  arrays = {f"{layer}/{k}": np.asarray(v) for layer, d in weights.params.items()
            for k, v in d.items()}
  np.savez(path, __preprocess__=np.asarray(weights.preprocess), **arrays)


def load_npz(path: str | os.PathLike) -> VGG19Weights:
  path = _require_file(path)
  with np.load(path) as data:
    if "__preprocess__" not in data:
      raise ValueError(f"{path}: not written by hdtf_jax.nn.vgg.save_npz (no __preprocess__)")
    preprocess = str(data["__preprocess__"])
    params: dict[str, dict[str, np.ndarray]] = {}
    for key in data.files:
      if key != "__preprocess__":
        layer, kind = key.split("/")
        params.setdefault(layer, {})[kind] = data[key]
  if preprocess not in PREPROCESSING:
    raise ValueError(f"{path}: unknown preprocessing {preprocess!r}")
  return VGG19Weights(_check_params(params, str(path)), preprocess)


def load_vgg19_params(path: str | os.PathLike) -> VGG19Weights:
  """Loads VGG-19 weights from .h5 (Keras), .pth/.pt (torchvision) or .npz (ours)."""
  path = Path(path)
  suffix = path.suffix.lower()
  loaders = {".h5": load_keras_h5, ".hdf5": load_keras_h5,
             ".pth": load_torchvision_pth, ".pt": load_torchvision_pth, ".npz": load_npz}
  if suffix not in loaders:
    raise ValueError(f"{path}: unknown VGG-19 weights format {suffix!r}; expected one of "
                     f"{sorted(loaders)}")
  return loaders[suffix](_require_file(path))
