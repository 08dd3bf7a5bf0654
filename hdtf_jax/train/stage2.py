"""Stage-2 training of G_vid (PAPER.md §4): data, perceptual network, the sharded train step, eval,
the loop, and `generate` for inference.

One step, from one batch of (reference, driving) frame pairs with their parameter sets:
  1. F_app on device: `face.flow.flow_from_params` per pair at the hourglass resolution
     (image_size / 4 with the published widths), from the normalised-unit parameters;
  2. G_vid forward (training mode, BatchNorm over the GLOBAL batch: the batch mean of a sharded
     array is global under jit), kept as a VJP;
  3. D_vid's LSGAN loss on [driving, stop_gradient(generated)] (InstanceNorm only, so one call
     for both halves), which also gives the real features for feature matching;
  4. the generator's loss on the generated image -- LSGAN (x loss.gan) + VGG-19 perceptual
     (x loss.perceptual = 10) + D_vid feature matching (x loss.feature_matching = 10), plus
     pixel L1 / L2 terms (x loss.l1 / loss.l2; not in the paper, 0 in `paper`; the GAN and
     feature-matching weights may warm up, `adversarial_factor`) -- and its
     gradient with respect to the image, pulled back through the VJP of step 2;
  5. Adam updates of both (lr held, then decayed linearly to 0).
The step is jitted once per (config, mesh) with `NamedSharding`s (batch over the `data` axis,
params replicated or FSDP-sharded) and the state is donated. The VGG-19 variables are not
trained: they are an argument of the step, replicated.

Perceptual network: `loss.vgg_weights` names ImageNet weights (Keras .h5, torchvision .pth or
our .npz); a missing file fails before anything is built, with the path and how to obtain it.
`loss.vgg_random_init=True` (demo/tiny presets) uses a He-initialised random VGG-19 instead,
and every log says so (`RANDOM_VGG_LABEL`).

NaN/Inf: every step's losses are fetched (a few scalars); a non-finite value raises
`common.NonFiniteLossError` naming the step before anything is saved, so the last good
checkpoint stays the latest.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdtf_jax import losses, metrics, warp
from hdtf_jax.data import synthetic_video
from hdtf_jax.nn import patch_discriminator, video, vgg
from hdtf_jax.train import checkpoints, common, logs
from hdtf_jax.train import mesh as mesh_lib

STAGE = "stage 2"
PARAM_KEYS = ("shape", "scale", "mouth", "eyebrow", "pose")
BATCH_KEYS = ("reference", "driving", "ref_params", "drv_params")
RANDOM_VGG_LABEL = ("RANDOM-INIT VGG-19 (no pretrained weights: the perceptual loss compares "
                    "random features)")
GRID_COLUMNS = ("reference", "F_app warp", "M_f", "M_m", "generated", "ground truth")

log = logging.getLogger(__name__)
TrainState = common.GanTrainState


# ------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class Stage2Data:
  """What the loop needs from a source.

  train_iter: endless iterator of this process's batches (dict: reference, driving (B, S, S, 3)
    float32 in [0, 1], ref_params / drv_params dicts of (B, ...) normalised-unit parameters)
    with `get_state()` / `set_state()`.
  eval_examples: held-out pairs (same fields, no batch axis), in a fixed order; the first
    `data.val_batch_size` are the validation pairs logged during training.
  steps_per_epoch: training pairs per epoch / global batch.
  description: where the data comes from, for logs.
  """
  train_iter: Iterator[dict]
  eval_examples: list[dict]
  steps_per_epoch: int
  description: str


def model_inputs(batch: Mapping[str, Any]) -> dict:
  """The fields the step uses, float32."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"{STAGE}: batch lacks {missing}; it has {sorted(batch)}")
  out = {k: np.asarray(batch[k], np.float32) for k in ("reference", "driving")}
  for k in ("ref_params", "drv_params"):
    lacking = [p for p in PARAM_KEYS if p not in batch[k]]
    if lacking:
      raise ValueError(f"{STAGE}: batch[{k!r}] lacks {lacking} (needs {list(PARAM_KEYS)})")
    out[k] = {p: np.asarray(batch[k][p], np.float32) for p in PARAM_KEYS}
  return out


def _check_images(batch: Mapping[str, np.ndarray], size: int, what: str) -> None:
  for k in ("reference", "driving"):
    shape = np.shape(batch[k])
    if len(shape) != 4 or shape[1:] != (size, size, 3):
      raise ValueError(f"{STAGE}: {what} {k} frames are {shape}, the model wants "
                       f"(B, {size}, {size}, 3) (model.image_size={size})")


def make_data(config: ml_collections.ConfigDict) -> Stage2Data:
  """The source that `config.data.source` names: 'synthetic' or 'tfds' (`hdtf/256`, `hdtf/512`)."""
  d, size = config.data, config.model.image_size
  local = common.local_batch_size(d.batch_size, STAGE)
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  if d.source == "synthetic":
    syn = synthetic_video.SyntheticVideoConfig.from_dict(
        dict(d.synthetic.to_dict(), image_size=size))
    train_src = synthetic_video.SyntheticVideoSource(syn, "train")
    test_src = synthetic_video.SyntheticVideoSource(syn, "test")
    train_iter = synthetic_video.PairIterator(train_src, batch_size=local, seed=config.seed,
                                              **shard)
    eval_examples = synthetic_video.fixed_pairs(test_src, d.eval_pairs)
    pairs = len(train_src) * train_src.frames_per_identity
    description = (f"synthetic astronaut video ({len(train_src)} train / {len(test_src)} "
                   f"held-out identities, {train_src.frames_per_identity} frames each)")
  elif d.source == "tfds":
    train_iter, eval_examples, pairs = _tfds_data(config, local, shard)
    description = f"TFDS {d.tfds_name} ({d.data_dir or 'default data_dir'})"
  else:
    raise ValueError(f"data.source must be 'synthetic' or 'tfds', got {d.source!r}")
  if not eval_examples:
    raise ValueError(f"{STAGE}: no held-out pairs (data.eval_pairs={d.eval_pairs})")
  _check_images(synthetic_video.stack(eval_examples[:1]), size, "held-out")
  return Stage2Data(train_iter, eval_examples, max(1, pairs // d.batch_size), description)


def _tfds_data(config, local: int, shard: dict):
  import tensorflow_datasets as tfds
  from hdtf_jax.data import pipelines
  d, size = config.data, config.model.image_size
  try:
    train_src = tfds.data_source(d.tfds_name, split="train", data_dir=d.data_dir)
    test_src = tfds.data_source(d.tfds_name, split="test", data_dir=d.data_dir)
  except Exception as e:  # tfds raises its own types for a missing dataset
    raise FileNotFoundError(f"{STAGE}: cannot open TFDS {d.tfds_name!r} in data_dir "
                            f"{d.data_dir!r}: {e}") from e
  train_iter = iter(pipelines.stage2_dataset(train_src, image_size=size, batch_size=local,
                                             seed=config.seed, samples_per_clip=d.samples_per_clip,
                                             **shard))
  # Every process scores the same held-out pairs: one shard, a fixed seed, one pass.
  test = pipelines.stage2_dataset(test_src, image_size=size, batch_size=1, seed=12345,
                                  shard_index=0, shard_count=1, num_epochs=None,
                                  drop_remainder=False)
  examples = []
  for batch in test:
    examples.append(jax.tree_util.tree_map(lambda x: x[0], batch))
    if len(examples) >= d.eval_pairs:
      break
  scan = pipelines.ClipReader(train_src, ("face_found",))
  clips = sum(bool(scan[i]["face_found"].any()) for i in range(len(scan)))
  return train_iter, examples, clips * d.samples_per_clip


# ------------------------------------------------------------------------- perceptual network

@dataclasses.dataclass(frozen=True)
class Perceptual:
  """VGG-19 features for the perceptual loss: module, variables, and what the weights are."""
  module: vgg.VGG19Features
  variables: Any
  label: str
  pretrained: bool


def random_vgg19_params(seed: int) -> dict:
  """He-normal kernels, zero biases: activations keep their scale through the ReLU stack (the
  flax default, LeCun-normal, would shrink them ~2x per layer)."""
  rng = np.random.default_rng([seed, 19])
  params, cin = {}, 3
  for name, width in zip(vgg.CONV_NAMES, (w for block in vgg.VGG19_BLOCKS for w in block)):
    std = np.sqrt(2.0 / (9 * cin))
    params[name] = {"kernel": (rng.standard_normal((3, 3, cin, width)) * std).astype(np.float32),
                    "bias": np.zeros(width, np.float32)}
    cin = width
  return params


def perceptual_network(config: ml_collections.ConfigDict) -> Perceptual:
  """Loads `loss.vgg_weights` (FileNotFoundError with the path and how to get the file when it
  is missing), or builds the labelled random-init VGG when `loss.vgg_random_init`."""
  lc = config.loss
  dtype = jnp.dtype(config.model.dtype)
  layers = tuple(lc.vgg_layers)
  if len(lc.vgg_layer_weights) != len(layers):
    raise ValueError(f"{STAGE}: {len(lc.vgg_layer_weights)} loss.vgg_layer_weights for "
                     f"{len(layers)} loss.vgg_layers")
  if lc.vgg_weights:
    path = Path(lc.vgg_weights).expanduser()
    if not path.is_file():
      raise FileNotFoundError(
          f"{STAGE}: VGG-19 weights for the perceptual loss not found at {path} "
          f"(loss.vgg_weights). {vgg.HOW_TO_GET_WEIGHTS} Or, for a smoke run only, set "
          "--config.loss.vgg_weights='' --config.loss.vgg_random_init=True.")
    weights = vgg.load_vgg19_params(path)
    return Perceptual(weights.module(layers, dtype), weights.variables,
                      f"VGG-19 ImageNet weights from {path} ({weights.preprocess} input)", True)
  if not lc.vgg_random_init:
    raise ValueError(f"{STAGE}: set loss.vgg_weights to VGG-19 weights, or "
                     "loss.vgg_random_init=True for a random-init VGG (demo/tests only)")
  module = vgg.VGG19Features(layers=layers, preprocess="imagenet", dtype=dtype)
  return Perceptual(module, {"params": random_vgg19_params(config.seed)}, RANDOM_VGG_LABEL, False)


# ----------------------------------------------------------------------------------- F_app

def flow_config(config: ml_collections.ConfigDict):
  from hdtf_jax.face import flow
  values = {k: tuple(v) if isinstance(v, (list, tuple)) else v
            for k, v in config.flow.to_dict().items()}
  return flow.FlowConfig(**values)


def flow_size(model_config) -> int:
  return model_config.image_size // video.downscale(model_config)


def app_flow(face_model, ref_params: Mapping, drv_params: Mapping, size: int,
             config) -> tuple[jax.Array, jax.Array]:
  """F_app of each (reference, driving) pair: grids (B, size, size, 2) and overflow (B,).

  Parameters are batched dicts in normalised crop units (the dataset's); one pair at a time
  (lax.map keeps each rasteriser scatter as cheap as a single call).
  """
  from hdtf_jax.face import flow
  ref = synthetic_video.to_pixel_params(dict(ref_params), size)
  drv = synthetic_video.to_pixel_params(dict(drv_params), size)

  def one(pair):
    res = flow.flow_from_params(face_model, pair[0], pair[1], size, size, config)
    return res.grid, res.overflow
  return jax.lax.map(one, (ref, drv))


def warp_only(reference: jax.Array, flow_app: jax.Array) -> jax.Array:
  """The baseline: the reference warped by F_app (upsampled to the image; border padding)."""
  size = reference.shape[1]
  return warp.grid_sample(reference, video.upsample_grid(flow_app, size, size),
                          padding_mode="border")


# ------------------------------------------------------------------------- state and step

def generator_loss_terms(d_logits, d_feats, real_feats, vgg_fake, vgg_real, loss_config,
                         fake: jax.Array, real: jax.Array) -> dict[str, jax.Array]:
  """Unweighted generator terms; the total is sum(loss_config[name] * term).

  "l1" / "l2" are the mean absolute / squared pixel errors of the generated frames: not in the
  paper (weights `loss.l1` / `loss.l2`, 0 in `paper`), always logged. L2 is what PSNR scores:
  where the warp's edges are uncertain by a pixel, its optimum is their average (L1's is one
  of the two)."""
  err = fake.astype(jnp.float32) - real.astype(jnp.float32)
  return {"gan": losses.lsgan_generator_loss(d_logits),
          "feature_matching": losses.feature_matching_loss(real_feats, d_feats),
          "perceptual": sum(losses.perceptual_loss(a, b, tuple(loss_config.vgg_layer_weights))
                            for a, b in zip(vgg_fake, vgg_real)),
          "l1": jnp.mean(jnp.abs(err)), "l2": jnp.mean(jnp.square(err))}


ADVERSARIAL_TERMS = ("gan", "feature_matching")


def adversarial_factor(loss_config, step) -> jax.Array:
  """The factor on the adversarial terms' weights (`ADVERSARIAL_TERMS`) at `step` (0-based):
  0 for the first `loss.adversarial_warmup` steps, then rising linearly to 1 over
  `loss.adversarial_ramp` steps (both 0, as in the paper: always 1). Not in the paper (demo
  only): during the warm-up G_vid learns from the pixel and perceptual terms alone, so the
  young discriminator's gradients do not pull it off the warp it starts from; D_vid trains
  from step 0 either way."""
  warm = float(loss_config.get("adversarial_warmup", 0))
  ramp = float(loss_config.get("adversarial_ramp", 0))
  s = jnp.asarray(step, jnp.float32)
  if ramp <= 0:
    return (s >= warm).astype(jnp.float32)
  return jnp.clip((s - warm + 1.0) / ramp, 0.0, 1.0)


def _split_half(tree, n: int):
  return (jax.tree_util.tree_map(lambda x: x[:n], tree),
          jax.tree_util.tree_map(lambda x: x[n:], tree))


@dataclasses.dataclass(frozen=True)
class Program:
  """The jitted pieces of one stage-2 setup (see `program`).

  init(rng) -> TrainState, created with `shardings`.
  step(state, batch, vgg_variables) -> (state, metrics): batch = `model_inputs` sharded by
    `mesh_lib.shard_batch`; metrics are replicated scalars.
  forward(variables, reference, ref_params, drv_params) -> dict(image, mask_fg, mask_matting,
    flow_app, warp_app): eval-mode G_vid plus F_app and the warp-only baseline.
  """
  mesh: Any
  shardings: Any
  init: Callable
  step: Callable
  forward: Callable
  schedule: Callable


def program(config, mesh, hold: int, decay: int, perceptual: Perceptual) -> Program:
  """Builds (or reuses) the jitted init, train step and forward for `config` on `mesh`."""
  key = json.dumps({"model": config.model.to_dict(), "loss": config.loss.to_dict(),
                    "flow": config.flow.to_dict(), "optim": config.optim.to_dict(),
                    "hold": hold, "decay": decay, "fast": bool(config.train.fast_compile),
                    "layers": list(perceptual.module.layers),
                    "preprocess": perceptual.module.preprocess,
                    "fsdp_min_size": config.mesh.get("fsdp_min_size", mesh_lib.FSDP_MIN_SIZE)},
                   sort_keys=True, default=str)
  return _program(key, mesh)


@functools.lru_cache(maxsize=4)
def _program(key: str, mesh) -> Program:
  from hdtf_jax.face import morphable
  spec = json.loads(key)
  model_cfg = ml_collections.ConfigDict(spec["model"])
  loss_cfg, o = ml_collections.ConfigDict(spec["loss"]), ml_collections.ConfigDict(spec["optim"])
  fcfg = flow_config(ml_collections.ConfigDict({"flow": spec["flow"]}))
  g_tx, schedule = common.hold_decay_adam(o.lr, o.b1, o.b2, spec["hold"], spec["decay"], o.eps)
  d_tx, _ = common.hold_decay_adam(o.lr if o.d_lr is None else o.d_lr, o.b1, o.b2,
                                   spec["hold"], spec["decay"], o.eps)
  gen = video.VideoGenerator(model_cfg)
  disc = patch_discriminator.patch_discriminator(model_cfg)
  vgg_net = vgg.VGG19Features(layers=tuple(spec["layers"]), preprocess=spec["preprocess"],
                              dtype=jnp.dtype(model_cfg.dtype))
  face_model = morphable.default_model()
  fsize = flow_size(model_cfg)
  scales = int(loss_cfg.perceptual_scales)

  dummy_ref, dummy_grid = video.dummy_inputs(model_cfg, batch=1)  # NumPy: outside the trace

  def init(rng):
    ref, grid = dummy_ref, dummy_grid
    g_rng, d_rng = jax.random.split(rng)
    variables = gen.init(g_rng, ref, grid, train=False)
    d_params = disc.init(d_rng, ref)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), g_params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}), d_params=d_params,
                      g_opt_state=g_tx.init(variables["params"]), d_opt_state=d_tx.init(d_params))

  shardings = mesh_lib.param_sharding(  # params and Adam moments alike (mesh.fsdp_min_size)
      jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32)), mesh, spec["fsdp_min_size"])

  def features(vgg_vars, images):
    return vgg.pyramid_features(vgg_net, vgg_vars, images, scales)

  def step(state: TrainState, batch, vgg_vars):
    ref, real = batch["reference"], batch["driving"]
    f_app, overflow = app_flow(face_model, batch["ref_params"], batch["drv_params"], fsize, fcfg)
    f_app = jax.lax.stop_gradient(f_app)

    def gen_forward(g_params):
      out, mutated = gen.apply({"params": g_params, "batch_stats": state.batch_stats}, ref, f_app,
                               train=True, mutable=["batch_stats"])
      return out["image"], (out, mutated.get("batch_stats", {}))

    fake, g_vjp, (out, batch_stats) = jax.vjp(gen_forward, state.g_params, has_aux=True)
    n = real.shape[0]

    def d_loss(d_params):
      logits, feats = disc.apply({"params": d_params},
                                 jnp.concatenate([real, jax.lax.stop_gradient(fake)]))
      (real_logits, fake_logits), (real_feats, _) = _split_half(logits, n), _split_half(feats, n)
      return losses.lsgan_discriminator_loss(real_logits, fake_logits), real_feats

    (d_total, real_feats), d_grads = jax.value_and_grad(d_loss, has_aux=True)(state.d_params)
    vgg_real = features(vgg_vars, real)
    adv = adversarial_factor(loss_cfg, state.step)

    def image_loss(image):
      logits, feats = disc.apply({"params": state.d_params}, image)
      terms = generator_loss_terms(logits, feats, real_feats, features(vgg_vars, image),
                                   vgg_real, loss_cfg, image, real)
      return sum(loss_cfg.get(k, 0.0) * (adv if k in ADVERSARIAL_TERMS else 1.0) * v
                 for k, v in terms.items()), terms

    (g_total, g_terms), d_image = jax.value_and_grad(image_loss, has_aux=True)(fake)
    (g_grads,) = g_vjp(d_image)
    g_updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, state.g_params)
    d_updates, d_opt_state = d_tx.update(d_grads, state.d_opt_state, state.d_params)
    new_state = state.replace(
        step=state.step + 1, g_params=optax.apply_updates(state.g_params, g_updates),
        batch_stats=batch_stats, d_params=optax.apply_updates(state.d_params, d_updates),
        g_opt_state=g_opt_state, d_opt_state=d_opt_state)
    out_metrics = {**g_terms, "d_lsgan": d_total, "g_total": g_total,
                   "g_grad_norm": optax.tree.norm(g_grads),
                   "d_grad_norm": optax.tree.norm(d_grads), "lr": schedule(state.step),
                   "adversarial_factor": adv,
                   "psnr": jnp.mean(metrics.psnr(fake, real, 1.0)),
                   "mask_fg": jnp.mean(out["mask_fg"]), "mask_matting": jnp.mean(out["mask_matting"]),
                   "flow_overflow": jnp.mean(overflow.astype(jnp.float32))}
    if "mask_pixel" in out:
      out_metrics["mask_pixel"] = jnp.mean(out["mask_pixel"])
    return new_state, out_metrics

  batch_sh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  fast = common.FAST_COMPILE if spec["fast"] else None

  return Program(
      mesh=mesh, shardings=shardings, schedule=schedule,
      init=jax.jit(init, out_shardings=shardings, compiler_options=common.FAST_COMPILE),
      step=jax.jit(step, in_shardings=(shardings, batch_sh, rep), out_shardings=(shardings, rep),
                   donate_argnums=(0,), compiler_options=fast),
      forward=_forward(_forward_key(spec["model"], spec["flow"], spec["fast"]), mesh))


def _forward_key(model: dict, flow: dict, fast: bool) -> str:
  return json.dumps({"model": model, "flow": flow, "fast": bool(fast)}, sort_keys=True,
                    default=str)


def forward_fn(config, mesh) -> Callable:
  """The jitted eval forward of `Program.forward` for `config` on `mesh`, without building the
  training step (inference needs no VGG or optimiser)."""
  return _forward(_forward_key(config.model.to_dict(), config.flow.to_dict(),
                               config.train.fast_compile), mesh)


@functools.lru_cache(maxsize=8)
def _forward(key: str, mesh) -> Callable:
  """Jitted eval-mode G_vid with F_app and the warp-only baseline (shared by programs that
  differ only in losses or optimiser)."""
  from hdtf_jax.face import morphable
  spec = json.loads(key)
  model_cfg = ml_collections.ConfigDict(spec["model"])
  fcfg = flow_config(ml_collections.ConfigDict({"flow": spec["flow"]}))
  gen, face_model, fsize = video.VideoGenerator(model_cfg), morphable.default_model(), \
      flow_size(model_cfg)

  def forward(variables, reference, ref_params, drv_params):
    f_app, _ = app_flow(face_model, ref_params, drv_params, fsize, fcfg)
    out = gen.apply(variables, reference, f_app, train=False)
    return {"image": out["image"], "mask_fg": out["mask_fg"],
            "mask_matting": out["mask_matting"], "flow_app": f_app,
            "warp_app": warp_only(reference, f_app)}
  return jax.jit(forward, out_shardings=mesh_lib.replicated(mesh),
                 compiler_options=common.FAST_COMPILE if spec["fast"] else None)


def init_state(prog: Program, seed: int) -> TrainState:
  return prog.init(jax.random.PRNGKey(seed))


def inference_variables(state: TrainState) -> dict:
  """What G_vid needs at inference: its params and BatchNorm statistics."""
  return {"params": state.g_params, "batch_stats": state.batch_stats}


def replicate(tree, mesh):
  return jax.device_put(tree, mesh_lib.replicated(mesh))


# ------------------------------------------------------------------------------------- eval

@functools.lru_cache(maxsize=1)
def _landmarker():
  from hdtf_jax.face import landmarks
  return landmarks.FaceLandmarker()


def mouth_points() -> np.ndarray:
  """Indices of the mouth region of the 468-point mesh (the default model's topology)."""
  from hdtf_jax.face import morphable
  return np.asarray(morphable.default_model().regions["mouth"])


def mouth_landmarks(frames) -> list[np.ndarray | None]:
  """The face mesh's mouth points (pixels, (K, 2)) of each frame (uint8, or float in [0, 1]);
  None where no face is found. Computed once per frame set, so several systems can be scored
  against the same true frames (`hdtf_jax.evaluation`)."""
  lm, idx = _landmarker(), mouth_points()
  out = []
  for x in frames:
    u8 = x if x.dtype == np.uint8 else (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)
    found = lm.detect_landmarks(u8)
    out.append(None if found is None else found.points[idx, :2])
  return out


def mouth_lmd_of_points(pred_points: Sequence, true_points: Sequence) -> tuple[float, int]:
  """Mean mouth-landmark distance over the pairs where both have points, and how many pairs."""
  dists = [float(metrics.landmark_distance(a, b)) for a, b in zip(pred_points, true_points)
           if a is not None and b is not None]
  return (float(np.mean(dists)) if dists else float("nan")), len(dists)


def mouth_lmd(pred: np.ndarray, true: np.ndarray) -> tuple[float, int]:
  """Mean mouth-landmark distance (pixels of these frames) over the pairs where the face mesh is
  found in both the predicted and the true frame, and how many pairs that is."""
  return mouth_lmd_of_points(mouth_landmarks(pred), mouth_landmarks(true))


@jax.jit
def _psnr_ssim(pred, true):
  return metrics.psnr(pred, true, 1.0), metrics.ssim(pred, true, 1.0)


MOUTH_BOX_MARGIN = 3  # pixels of the scored frames around the lips' box


def mouth_boxes(drv_params: Mapping, size: int, margin: int = MOUTH_BOX_MARGIN) -> np.ndarray:
  """(N, size, size) bool: per driving parameter set (batched, normalised crop units), the box
  around the morphable model's "lips" vertices projected with those parameters (where the
  mouth is in the true frame), grown by `margin` pixels and clipped to the frame."""
  from hdtf_jax.face import flow, morphable
  model = morphable.default_model()
  pts, _ = flow.mesh_points(model, synthetic_video.to_pixel_params(dict(drv_params), size),
                            size, size)
  pts = np.asarray(pts)[:, np.asarray(model.regions["lips"])]
  lo, hi = pts.min(1) - margin, pts.max(1) + margin  # (N, 2) x, y
  yy, xx = np.mgrid[:size, :size]
  return ((xx >= lo[:, None, None, 0]) & (xx <= hi[:, None, None, 0])
          & (yy >= lo[:, None, None, 1]) & (yy <= hi[:, None, None, 1]))


def region_psnr(pred: np.ndarray, true: np.ndarray, region: np.ndarray) -> float:
  """Mean over frames of the PSNR (data range 1) of the pixels in `region` (N, H, W) bool;
  frames with an empty region are left out (NaN when all are)."""
  se = np.square(np.asarray(pred, np.float64) - np.asarray(true, np.float64)).mean(-1)
  count = region.sum((1, 2))
  keep = count > 0
  if not keep.any():
    return float("nan")
  mse = (se * region).sum((1, 2))[keep] / count[keep]
  return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def score_frames(pred: np.ndarray, true: np.ndarray, *, cpbd: bool, lmd: bool,
                 mouth: np.ndarray | None = None) -> dict[str, float]:
  """The paper's video metrics, averaged per frame: PSNR, SSIM (data range 1), CPBD (of the
  predicted frames; needs >= 64 px) and mouth LMD (pixels; pairs with a face in both). With
  `mouth` ((N, H, W) bool, e.g. `mouth_boxes`) also "psnr_mouth", the PSNR of those pixels
  (not in the paper: where the warp cannot be right, the opening mouth)."""
  p, s = jax.device_get(_psnr_ssim(jnp.asarray(pred), jnp.asarray(true)))
  out = {"psnr": float(np.mean(p)), "ssim": float(np.mean(s))}
  if mouth is not None:
    out["psnr_mouth"] = region_psnr(pred, true, mouth)
  if cpbd and min(pred.shape[1:3]) >= 64:
    out["cpbd"] = float(np.mean([metrics.cpbd(x, data_range=1.0) for x in pred]))
  if lmd:
    out["lmd"], out["lmd_pairs"] = mouth_lmd(pred, true)
  return out


def forward_examples(prog: Program, variables, examples: Sequence[dict],
                     batch_size: int) -> dict[str, np.ndarray]:
  """Eval-mode forward on every example: image, masks, F_app, warp-only, all (N, ...).

  Batches of `batch_size` rounded up to a multiple of the batch shards, the last one padded
  with copies of the last example; each process feeds its share of the rows.
  """
  n = len(examples)
  shards = mesh_lib.num_batch_shards(prog.mesh)
  b = -(-batch_size // shards) * shards
  pi, pc = jax.process_index(), jax.process_count()
  parts: dict[str, list] = {}
  for start in range(0, n, b):
    rows = [examples[min(i, n - 1)] for i in range(start, start + b)]
    rows = model_inputs(synthetic_video.stack(rows[pi * b // pc:(pi + 1) * b // pc]))
    sharded = mesh_lib.shard_batch(rows, prog.mesh)
    out = jax.device_get(prog.forward(variables, sharded["reference"], sharded["ref_params"],
                                      sharded["drv_params"]))
    for k, v in out.items():
      parts.setdefault(k, []).append(np.asarray(v)[:min(b, n - start)])
  return {k: np.concatenate(v) for k, v in parts.items()}


class Evaluator:
  """Scores G_vid and the baselines on fixed held-out pairs: the model, `warp_only` (reference
  warped by F_app) and `reference` (the reference frame as the prediction), computed the same way."""

  def __init__(self, config, prog: Program, examples: list[dict]):
    if not examples:
      raise ValueError(f"{STAGE} eval: no held-out pairs")
    self.config, self.prog, self.examples = config, prog, examples
    self.truth = np.stack([e["driving"] for e in examples]).astype(np.float32)
    self.reference = np.stack([e["reference"] for e in examples]).astype(np.float32)
    drv = synthetic_video.stack([e["drv_params"] for e in examples])
    self.mouth = mouth_boxes(drv, self.truth.shape[1])

  def outputs(self, variables) -> dict[str, np.ndarray]:
    return forward_examples(self.prog, variables, self.examples, self.config.data.eval_batch_size)

  def score(self, pred: np.ndarray) -> dict[str, float]:
    e = self.config.eval
    return score_frames(pred, self.truth, cpbd=e.cpbd, lmd=e.lmd, mouth=self.mouth)

  def baselines(self, outputs: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {"warp_only": self.score(outputs["warp_app"]), "reference": self.score(self.reference)}

  def truth_cpbd(self) -> float | None:
    if not self.config.eval.cpbd or min(self.truth.shape[1:3]) < 64:
      return None
    return float(np.mean([metrics.cpbd(x, data_range=1.0) for x in self.truth]))


def image_grid(batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> np.ndarray:
  """One row per pair: reference | F_app warp | M_f | M_m | generated | ground truth."""
  size = batch["reference"].shape[1]
  up = lambda m: np.repeat(np.repeat(m, size // m.shape[0], 0), size // m.shape[1], 1)
  rows = []
  for i in range(batch["reference"].shape[0]):
    rows.append([batch["reference"][i], outputs["warp_app"][i], up(outputs["mask_fg"][i]),
                 up(outputs["mask_matting"][i]), outputs["image"][i], batch["driving"][i]])
  return logs.image_grid(rows)


METRIC_COLUMNS = ("psnr", "psnr_mouth", "ssim", "cpbd", "lmd")
SYSTEMS = (("model", "G_vid"), ("no_flow", "G_vid w/o F_app"),
           ("no_matting", "G_vid w/o matting"), ("warp_only", "warp-only (reference warped by F_app)"),
           ("reference", "reference frame as prediction"))


def markdown_table(results: Mapping[str, Any]) -> str:
  """Rows in SYSTEMS order; a system whose result is a string (e.g. 'not trained') says so."""
  cols = [c for c in METRIC_COLUMNS
          if any(isinstance(r, dict) and c in r for r in results.values())]
  lines = ["| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  names = dict(SYSTEMS)
  for key in [k for k, _ in SYSTEMS if k in results] + [k for k in results if k not in names]:
    r = results[key]
    if isinstance(r, str):
      cells = [r] + ["-"] * (len(cols) - 1)
    else:
      cells = [f"{r[c]:.4f}" if c in r else "-" for c in cols]
    lines.append(f"| {names.get(key, key)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------- loop

def _metric_floats(m) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(m).items()}


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, data: Stage2Data | None = None,
          progress: bool = True) -> dict:
  """Trains (or resumes) stage 2 in `workdir`; returns {step, train: last losses, eval: metrics}.

  The perceptual network is loaded first (a missing `loss.vgg_weights` fails before anything
  else). Saves to `workdir/checkpoints` every `train.checkpoint_every` steps and at exit (also
  on Ctrl-C; not after a non-finite loss), logs every loss to `workdir/metrics.jsonl` and
  TensorBoard, validation PSNR/SSIM and the image grid every `train.eval_every` steps and at
  the end (PNG in `workdir/images`). `data` defaults to `make_data(config)`.
  """
  from tqdm.auto import tqdm

  workdir = Path(workdir)
  perceptual = perceptual_network(config)
  log.warning("%s perceptual loss: %s", STAGE, perceptual.label)
  mesh = mesh_lib.make_mesh(config.mesh.axes.to_dict())
  data = data or make_data(config)
  hold, decay, total = common.resolve_steps(config.optim, config.train, data.steps_per_epoch, STAGE)
  prog = program(config, mesh, hold, decay, perceptual)
  vgg_vars = replicate(perceptual.variables, mesh)
  state = init_state(prog, config.seed)
  t = config.train
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
                                  save_every=t.checkpoint_every, async_save=t.async_checkpoints)
  restored = ckpt.restore(state)
  if restored is not None:
    state, data_state, _ = restored
    data.train_iter.set_state(data_state)
  step = int(jax.device_get(state.step))
  logger = logs.MetricLogger(workdir)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  logger.text(step, "perceptual_vgg", perceptual.label)
  logger.text(step, "data", data.description)
  val = data.eval_examples[:max(1, config.data.val_batch_size)]
  meta = {"preset": config.preset, "total_steps": total, "perceptual_vgg": perceptual.label}
  synced = data.train_iter.get_state()  # the iterator position that matches `state`
  last: dict[str, float] = {}
  results: dict = {}
  bar = tqdm(total=total, initial=step, desc="stage2", disable=not progress or jax.process_index())
  nonfinite = False
  try:
    tick, tick_step = time.perf_counter(), step
    while step < total:
      batch = model_inputs(next(data.train_iter))
      pending = data.train_iter.get_state()
      state, m = prog.step(state, mesh_lib.shard_batch(batch, mesh), vgg_vars)
      m = _metric_floats(m)
      common.check_finite({k: v for k, v in m.items() if k != "lr"}, step + 1, STAGE,
                          ckpt.latest_step())
      step, synced, last = step + 1, pending, m
      bar.update(1)
      if step % t.log_every == 0 or step == total:
        now = time.perf_counter()
        m["steps_per_s"] = (step - tick_step) / max(now - tick, 1e-9)
        m["vgg_pretrained"] = float(perceptual.pretrained)
        tick, tick_step = now, step
        logger.scalars(step, m, prefix="train/")
        bar.set_postfix(g=f"{m['g_total']:.3f}", d=f"{m['d_lsgan']:.3f}", psnr=f"{m['psnr']:.2f}")
      if step % t.checkpoint_every == 0:
        ckpt.save(step, state, synced, meta, force=True)
      if (t.eval_every and step % t.eval_every == 0) or step == total:
        results = _validate(prog, state, val, logger, step, perceptual)
  except common.NonFiniteLossError:
    nonfinite = True
    raise
  finally:  # save at exit (also on Ctrl-C), never after a non-finite loss
    bar.close()
    if not nonfinite and ckpt.latest_step() != step and common.alive(state):
      ckpt.save(step, state, synced, meta, force=True)
    ckpt.close()
    logger.close()
  return {"step": step, "train": last, "eval": results}


def _validate(prog: Program, state: TrainState, val: Sequence[dict], logger, step: int,
              perceptual: Perceptual) -> dict:
  """PSNR/SSIM of the model and the warp-only baseline on the validation pairs, and the grid."""
  out = forward_examples(prog, inference_variables(state), val, len(val))
  val = model_inputs(synthetic_video.stack(list(val)))
  result = score_frames(out["image"], val["driving"], cpbd=False, lmd=False)
  base = score_frames(out["warp_app"], val["driving"], cpbd=False, lmd=False)
  logger.scalars(step, {**common.prefixed(result, "model/"), **common.prefixed(base, "warp_only/"),
                        "vgg_pretrained": float(perceptual.pretrained)}, prefix="val/")
  logger.image(step, "val/grid", image_grid(val, out))
  logger.flush()
  return result


def restore_state(config, workdir: str | Path, *, steps_per_epoch: int = 1,
                  step: int | None = None, perceptual: Perceptual | None = None) -> TrainState:
  """The train state of `workdir/checkpoints` (latest or `step`), sharded over `mesh.axes`."""
  ckpt_dir = Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"{STAGE}: no checkpoint directory {ckpt_dir}")
  mesh = mesh_lib.make_mesh(config.mesh.axes.to_dict())
  hold, decay, _ = common.resolve_steps(config.optim, config.train, steps_per_epoch, STAGE)
  prog = program(config, mesh, hold, decay, perceptual or _eval_perceptual(config))
  template = init_state(prog, config.seed)
  ckpt = checkpoints.Checkpointer(ckpt_dir)
  try:
    restored = ckpt.restore(template, step)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"{STAGE}: no checkpoint in {ckpt_dir}")
  return restored[0]


def _eval_perceptual(config) -> Perceptual:
  """Evaluation never runs the VGG: a random one stands in for the program's shape key."""
  c = ml_collections.ConfigDict(config.to_dict())
  if not c.loss.vgg_weights or not Path(c.loss.vgg_weights).expanduser().is_file():
    c.loss.vgg_weights, c.loss.vgg_random_init = "", True
  return perceptual_network(c)


def _trained_with(workdir: Path) -> str:
  """The perceptual-network label recorded in the latest checkpoint's meta."""
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints")
  try:
    return ckpt.read_meta().get("perceptual_vgg", "unknown")
  finally:
    ckpt.close()


def _ablation_config(config, use_flow: bool, use_matting: bool):
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.use_flow, c.model.use_matting = use_flow, use_matting
  return c


def evaluate_checkpoint(config, workdir: str | Path, *, step: int | None = None,
                        data: Stage2Data | None = None, out: str | Path | None = None) -> dict:
  """`--mode=eval`: the model of `workdir/checkpoints` (latest or `step`), the ablations (their
  workdirs from `eval.no_flow_workdir` / `eval.no_matting_workdir`, else "not trained"), the
  warp-only baseline and the reference frame, on the held-out pairs; prints a Markdown table,
  writes JSON and Markdown (default `workdir/eval_<step>.{json,md}`) and an image grid.
  Returns {system: {metric: value} or 'not trained'}."""
  workdir = Path(workdir)
  data = data or make_data(config)
  perceptual = _eval_perceptual(config)
  mesh = mesh_lib.make_mesh(config.mesh.axes.to_dict())

  def load(cfg, wd, at=None):
    hold, decay, _ = common.resolve_steps(cfg.optim, cfg.train, data.steps_per_epoch, STAGE)
    prog = program(cfg, mesh, hold, decay, perceptual)
    return prog, restore_state(cfg, wd, steps_per_epoch=data.steps_per_epoch, step=at,
                               perceptual=perceptual)

  prog, state = load(config, workdir, step)
  evaluator = Evaluator(config, prog, data.eval_examples)
  outputs = evaluator.outputs(inference_variables(state))
  results: dict[str, Any] = {"model": evaluator.score(outputs["image"])}
  for key, wd, flags in (("no_flow", config.eval.no_flow_workdir, (False, True)),
                         ("no_matting", config.eval.no_matting_workdir, (True, False))):
    if not wd:
      results[key] = "not trained"
      continue
    a_prog, a_state = load(_ablation_config(config, *flags), wd)
    a_eval = Evaluator(config, a_prog, data.eval_examples)
    results[key] = a_eval.score(a_eval.outputs(inference_variables(a_state))["image"])
  results.update(evaluator.baselines(outputs))
  done = int(jax.device_get(state.step))
  truth_cpbd = evaluator.truth_cpbd()
  header = (f"Stage-2 eval at step {done}: {len(data.eval_examples)} held-out pairs of "
            f"{data.description}, {config.model.image_size} px; perceptual loss: "
            f"{_trained_with(workdir)}. PSNR/SSIM on [0, 1] frames")
  if truth_cpbd is not None:
    header += f"; CPBD of the predicted frames (ground truth: {truth_cpbd:.4f})"
  header += ("; psnr_mouth: PSNR of the box around the driving parameters' lips "
             f"(+{MOUTH_BOX_MARGIN} px)")
  if config.eval.lmd:
    header += "; LMD: mouth face-mesh points, pixels, pairs with a face found in both"
  header += "."
  table = markdown_table(results)
  print(f"{header}\n\n{table}")
  if jax.process_index() == 0:
    path = Path(out) if out else workdir / f"eval_{done}.json"
    path.write_text(json.dumps({"step": done, "pairs": len(data.eval_examples),
                                "image_size": config.model.image_size, "data": data.description,
                                "ground_truth_cpbd": truth_cpbd, "results": results}, indent=2))
    path.with_suffix(".md").write_text(f"{header}\n\n{table}\n")
    n = min(len(data.eval_examples), config.data.val_batch_size)
    batch = {"reference": evaluator.reference[:n], "driving": evaluator.truth[:n]}
    logs.save_png(workdir / "images" / f"eval_grid_{done:07d}.png",
                  image_grid(batch, {k: v[:n] for k, v in outputs.items()}))
  return results


# -------------------------------------------------------------------------------- inference

def generate(variables, reference: np.ndarray, ref_params: Mapping, drv_params: Mapping, *,
             config: ml_collections.ConfigDict, batch_size: int = 8) -> np.ndarray:
  """Frames (T, S, S, 3) float32 of one reference image (S, S, 3) driven by T parameter sets.

  ref_params: one set (shape (60,), scale (), mouth (28,), eyebrow (5,), pose (5,)), driving
  params the same with a leading T axis, both in normalised crop units. Runs in chunks of
  `batch_size` (the last padded), one compiled shape for every length.
  """
  mesh = mesh_lib.make_mesh(config.mesh.axes.to_dict())
  forward = forward_fn(config, mesh)
  size = config.model.image_size
  reference = np.asarray(reference, np.float32)
  if reference.shape != (size, size, 3):
    raise ValueError(f"generate: reference must be ({size}, {size}, 3), got {reference.shape}")
  t = int(np.shape(drv_params["pose"])[0])
  shards = mesh_lib.num_batch_shards(mesh)
  b = -(-batch_size // shards) * shards
  frames = []
  for start in range(0, t, b):
    idx = np.minimum(np.arange(start, start + b), t - 1)
    batch = {"reference": np.repeat(reference[None], b, 0),
             "ref_params": {k: np.repeat(np.asarray(ref_params[k], np.float32)[None], b, 0)
                            for k in PARAM_KEYS},
             "drv_params": {k: np.asarray(drv_params[k], np.float32)[idx] for k in PARAM_KEYS}}
    s = mesh_lib.shard_batch(batch, mesh)
    out = forward(variables, s["reference"], s["ref_params"], s["drv_params"])
    frames.append(np.asarray(jax.device_get(out["image"]))[:min(b, t - start)])
  return np.concatenate(frames)
