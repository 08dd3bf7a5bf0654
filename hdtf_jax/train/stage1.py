"""Stage-1 training of G_ani (PAPER.md §3): train state, the sharded train step, eval, the loop,
and `predict` for sequences of any length.

One step updates G_ani and the three discriminators from ONE generator forward pass: G's loss
(mouth L1, eyebrow/head 1 - temporal SSIM, LSGAN terms against the current D_mou/D_ebro/D_hed) and
each D's LSGAN loss on (real, stop_gradient(fake)) with the same fakes. That is the usual
"G step, then D step on fake.detach()" of GAN code, without a second forward.

The step is jitted once with `NamedSharding`s over a mesh (`mesh.axes`, batch over `data`): the
same code runs on 1 CPU device and on a slice; BatchNorm statistics are over the global batch
because the batch mean of a sharded array is global under jit. The state is donated. Jitted
pieces are cached per (networks, losses, optimiser, mesh), so a second run in one process (a
resume, a test) does not compile again.

Audio features are normalised per feature with statistics of a few training batches, kept in the
state (`stats`) with the mean training parameters (the "mean parameters" eval baseline), so a
checkpoint alone is enough for `predict` and `--mode=eval`.

NaN/Inf: every step's losses are fetched to the host (a few scalars per step); a non-finite
loss raises `NonFiniteLossError` naming the step before anything is saved, so the last good
checkpoint stays the latest.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdtf_jax import losses, metrics
from hdtf_jax.audio import resample_track
from hdtf_jax.data import synthetic
from hdtf_jax.nn import animation, discriminators
from hdtf_jax.nn import identity as identity_lib
from hdtf_jax.train import checkpoints, logs
from hdtf_jax.train.common import FAST_COMPILE, NonFiniteLossError, alive, check_finite
from hdtf_jax.train import common
from hdtf_jax.train import mesh as mesh_lib

PARTS = ("mouth", "eyebrow", "head")  # G_ani's outputs; the data calls head pose `pose`
TARGET_KEY = {"mouth": "mouth", "eyebrow": "eyebrow", "head": "pose"}
IDENTITY_KEY = {"image": "reference_frame", "shape": "shape", "embedding": "embedding"}
log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  g_params: Any
  batch_stats: Any
  d_params: Any          # {'mouth', 'eyebrow', 'head'} -> discriminator params
  g_opt_state: Any
  d_opt_state: Any
  stats: Any             # `compute_stats`: audio_mean/std (15,), mouth/eyebrow/head_mean


# ------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class Stage1Data:
  """What the loop needs from a source.

  train_iter: endless iterator of this process's batches (dict of numpy arrays: audio, mouth,
    eyebrow, pose, shape, reference_frame, identity) with `get_state()` / `set_state()`.
  eval_examples: single held-out windows (same fields, no batch axis), in a fixed order.
  stats: `compute_stats` of a few training batches.
  steps_per_epoch: training windows per epoch / global batch (for epoch-based schedules).
  """
  train_iter: Iterator[dict]
  eval_examples: list[dict]
  stats: dict[str, np.ndarray]
  steps_per_epoch: int


def compute_stats(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Per-feature audio mean/std (std floored at 1e-3) and mean mouth/eyebrow/head parameters."""
  cat = lambda k: np.concatenate([np.asarray(b[k], np.float64).reshape(-1, np.shape(b[k])[-1])
                                  for b in batches])
  audio = cat("audio")
  return {"audio_mean": audio.mean(0).astype(np.float32),
          "audio_std": np.maximum(audio.std(0), 1e-3).astype(np.float32),
          **{f"{p}_mean": cat(TARGET_KEY[p]).mean(0).astype(np.float32) for p in PARTS}}


def make_data(config: ml_collections.ConfigDict) -> Stage1Data:
  """The source that `config.data.source` names: 'synthetic' or 'tfds' (`hdtf/params`)."""
  d = config.data
  local = common.local_batch_size(d.batch_size, "stage 1")
  own = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  if d.source == "synthetic":
    syn = synthetic.SyntheticConfig.from_dict(d.synthetic.to_dict())
    train_src = synthetic.SyntheticStage1Source(syn, "train")
    make_iter = lambda seed, shard=own: synthetic.WindowIterator(
        train_src, window=d.window, batch_size=local, seed=seed, **shard)
    test_clips = synthetic.SyntheticStage1Source(syn, "test")
    windows = train_src.num_windows(d.window, d.stride)
  elif d.source == "tfds":
    import tensorflow_datasets as tfds
    from hdtf_jax.data import pipelines
    try:
      train_src = tfds.data_source(d.tfds_name, split="train", data_dir=d.data_dir)
      test_src = tfds.data_source(d.tfds_name, split="test", data_dir=d.data_dir)
    except Exception as e:  # tfds raises its own types for a missing dataset
      raise FileNotFoundError(f"stage 1: cannot open TFDS {d.tfds_name!r} in data_dir "
                              f"{d.data_dir!r}: {e}") from e
    size = config.model.identity.image_size if config.model.identity.kind == "image" else None
    make_iter = lambda seed, shard=own: iter(pipelines.stage1_dataset(
        train_src, window=d.window, stride=d.stride, batch_size=local, seed=seed,
        reference_size=size, **shard))
    test_clips = TfdsClips(test_src, size)
    lengths = TfdsClips(train_src, size).audio_lengths()
    windows = len(pipelines.stage1_windows(lengths, d.window, d.stride))
  else:
    raise ValueError(f"data.source must be 'synthetic' or 'tfds', got {d.source!r}")
  # The statistics go into the (replicated) train state, so every process computes them from
  # the same batches: shard 0 of 1, not its own shard.
  stats_iter = make_iter(config.seed + 7_777_777, dict(shard_index=0, shard_count=1))
  stats = compute_stats([next(stats_iter) for _ in range(max(1, d.stats_batches))])
  eval_examples = synthetic.eval_windows(test_clips, d.eval_window, d.max_eval_windows)
  return Stage1Data(make_iter(config.seed), eval_examples, stats,
                    max(1, windows // d.batch_size))


class TfdsClips:
  """Clips of an `hdtf/params` split as 100 fps tracks with the synthetic source's fields (for
  eval windows): parameters upsampled like `pipelines.stage1_dataset`, the first reference frame."""

  def __init__(self, source, reference_size: int | None = None):
    from hdtf_jax.data import pipelines
    self._p = pipelines
    names = set(source.dataset_info.features)
    self._ref_key = "reference_frames" if "reference_frames" in names else "frames"
    self.reader = pipelines.ClipReader(source, pipelines.STAGE1_FEATURES + (self._ref_key, "clip"))
    scan = pipelines.ClipReader(source, ("identity", "audio_features"))
    self._scan = [scan[i] for i in range(len(scan))]
    self.ids = pipelines.identity_table([e["identity"] for e in self._scan])
    self.reference_size = reference_size

  def audio_lengths(self) -> list[int]:
    return [int(e["audio_features"].shape[0]) for e in self._scan]

  def __len__(self) -> int:
    return len(self.reader)

  def __getitem__(self, i: int) -> dict:
    ex = self.reader[i]
    ta = int(ex["audio_features"].shape[0])
    up = lambda x: resample_track(np.asarray(x, np.float32), float(ex["fps"]), 100.0,
                                  num_frames=ta)
    ref = self._p.to_float_image(self._p.decode_jpeg(ex[self._ref_key][0]), self.reference_size)
    return dict(audio=np.asarray(ex["audio_features"], np.float32), mouth=up(ex["mouth"]),
                eyebrow=up(ex["eyebrow"]), pose=up(ex["pose"]),
                shape=np.asarray(ex["shape"], np.float32), reference_frame=ref,
                identity=np.int32(self.ids[ex["identity"]]), clip=ex["clip"])


def model_inputs(batch: Mapping[str, np.ndarray], model_config) -> dict[str, np.ndarray]:
  """The arrays the step uses: audio, mouth, eyebrow, pose and `identity` (per identity.kind)."""
  key = IDENTITY_KEY.get(model_config.identity.kind)
  if key is None or key not in batch:
    raise ValueError(f"stage 1: identity.kind={model_config.identity.kind!r} needs a {key!r} "
                     f"field in the batch; it has {sorted(batch)}")
  return {"audio": batch["audio"], "mouth": batch["mouth"], "eyebrow": batch["eyebrow"],
          "pose": batch["pose"], "identity": batch[key]}


def prepare_identity(identity: jax.Array, model_config) -> jax.Array:
  """Reference frames (any size, uint8 or [0, 1]) resized to `identity.image_size`; other
  kinds unchanged."""
  if model_config.identity.kind != "image":
    return identity
  if identity.dtype == jnp.uint8:
    identity = identity.astype(jnp.float32) / 255.0
  s = model_config.identity.image_size
  if identity.shape[1:3] != (s, s):
    identity = jax.image.resize(identity, (identity.shape[0], s, s, identity.shape[-1]),
                                "linear", antialias=True)
  return identity


def normalise_audio(audio: jax.Array, stats: Mapping[str, jax.Array]) -> jax.Array:
  return (audio - stats["audio_mean"]) / stats["audio_std"]


# ------------------------------------------------------------------------- state and step

def resolve_steps(config, steps_per_epoch: int) -> tuple[int, int, int]:
  """(hold, decay, total) steps from `optim.*_steps`, else `*_epochs * steps_per_epoch`."""
  return common.resolve_steps(config.optim, config.train, steps_per_epoch, "stage 1")


# G_ani's k1 output convs: (module, layer) per output.
OUTPUT_HEADS = {"mouth": ("mouth_decoder", "out"), "eyebrow": ("temporal_decoder", "eyebrow_out"),
                "head": ("temporal_decoder", "head_out")}


def init_output_heads(params, stats: Mapping[str, jax.Array], kernel_scale: float):
  """Starts G_ani at the mean parameters: each output conv's bias is the training mean of its
  parameters and its kernel is scaled by `kernel_scale`.

  Why: freshly initialised, the residual trunks give outputs of order 10 while the parameters
  are of order 0.1; temporal SSIM is nearly flat that far from the targets (it falls off like
  1 / |prediction|), so the eyebrow and head branches never start learning. The mouth L1 pulls
  its branch in anyway; starting every branch near the data is simply faster.
  """
  params = dict(params)
  for part, (module, layer) in OUTPUT_HEADS.items():
    head = dict(params[module][layer])
    head["kernel"] = head["kernel"] * kernel_scale
    head["bias"] = jnp.asarray(stats[f"{part}_mean"], head["bias"].dtype)
    params[module] = {**params[module], layer: head}
  return params


def generator_loss_terms(out, target, d_logits, loss_config) -> dict[str, jax.Array]:
  """Unweighted generator terms; the total is sum(loss_config[name] * term)."""
  ssim = functools.partial(losses.temporal_ssim_loss, c1=loss_config.ssim_c1,
                           c2=loss_config.ssim_c2)
  terms = {"mouth_l1": losses.l1_loss(out["mouth"], target["mouth"]),
           "eyebrow_ssim": ssim(out["eyebrow"], target["eyebrow"]),
           "head_ssim": ssim(out["head"], target["head"])}
  terms.update({f"gan_{p}": losses.lsgan_generator_loss(d_logits[p]) for p in PARTS})
  return terms


@dataclasses.dataclass(frozen=True)
class Program:
  """The jitted pieces of one stage-1 setup (see `program`).

  init(rng, stats) -> TrainState, created with `shardings`.
  step(state, batch) -> (state, metrics): batch = `model_inputs` sharded by
    `mesh_lib.shard_batch`; metrics are replicated scalars (every term, totals, grad norms, lr).
  """
  mesh: Any
  shardings: Any
  abstract: Any          # the state's shapes, dtypes and shardings (a restore template)
  init: Callable
  step: Callable
  schedule: Callable


def program(config, mesh, hold: int, decay: int) -> Program:
  """Builds (or reuses) the jitted init and train step for `config` on `mesh`."""
  key = json.dumps({"model": config.model.to_dict(), "loss": config.loss.to_dict(),
                    "optim": config.optim.to_dict(), "hold": hold, "decay": decay,
                    "head_scale": config.train.output_kernel_scale,
                    "fast": bool(config.train.fast_compile),
                    "fsdp_min_size": config.mesh.get("fsdp_min_size", mesh_lib.FSDP_MIN_SIZE)},
                   sort_keys=True, default=str)
  return _program(key, mesh)


@functools.lru_cache(maxsize=4)
def _program(key: str, mesh) -> Program:
  spec = json.loads(key)
  model_cfg = ml_collections.ConfigDict(spec["model"])
  loss_cfg, o = ml_collections.ConfigDict(spec["loss"]), ml_collections.ConfigDict(spec["optim"])
  g_tx, schedule = common.hold_decay_adam(o.lr, o.b1, o.b2, spec["hold"], spec["decay"], o.eps)
  d_tx, _ = common.hold_decay_adam(o.lr if o.d_lr is None else o.d_lr, o.b1, o.b2,
                                   spec["hold"], spec["decay"], o.eps)
  gen = animation.AnimationGenerator(model_cfg)
  discs = discriminators.discriminators_from_config(model_cfg)
  dims = {p: getattr(model_cfg, f"{p}_dim") for p in PARTS}

  def init(rng, stats):
    audio, ident = animation.dummy_inputs(model_cfg, batch=1, length=64)
    g_rng, *d_rngs = jax.random.split(rng, 1 + len(PARTS))
    variables = gen.init(g_rng, audio, ident, train=False)
    g_params = init_output_heads(variables["params"], stats, spec["head_scale"])
    d_params = {p: discs[p].init(r, jnp.zeros((1, 64, dims[p])), audio)["params"]
                for p, r in zip(PARTS, d_rngs)}
    return TrainState(step=jnp.zeros((), jnp.int32), g_params=g_params,
                      batch_stats=variables.get("batch_stats", {}), d_params=d_params,
                      g_opt_state=g_tx.init(g_params), d_opt_state=d_tx.init(d_params),
                      stats=stats)

  stats_shape = {"audio_mean": model_cfg.audio_dim, "audio_std": model_cfg.audio_dim,
                 **{f"{p}_mean": dims[p] for p in PARTS}}
  stats_abstract = {k: jax.ShapeDtypeStruct((n,), jnp.float32) for k, n in stats_shape.items()}
  shapes = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32), stats_abstract)
  shardings = mesh_lib.param_sharding(shapes, mesh, spec["fsdp_min_size"])
  abstract = jax.tree_util.tree_map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)

  def step(state: TrainState, batch):
    audio = normalise_audio(batch["audio"], state.stats)
    ident = prepare_identity(batch["identity"], model_cfg)
    real = {p: batch[TARGET_KEY[p]] for p in PARTS}

    def g_loss(g_params):
      out, mutated = gen.apply({"params": g_params, "batch_stats": state.batch_stats}, audio, ident,
                               train=True, mutable=["batch_stats"])
      d_logits = {p: discs[p].apply({"params": state.d_params[p]}, out[p], audio)[0]
                  for p in PARTS}
      terms = generator_loss_terms(out, real, d_logits, loss_cfg)
      return sum(loss_cfg[k] * v for k, v in terms.items()), (terms, out, mutated["batch_stats"])

    (g_total, (g_terms, out, batch_stats)), g_grads = jax.value_and_grad(
        g_loss, has_aux=True)(state.g_params)
    fake = jax.lax.stop_gradient(out)
    both_audio = jnp.concatenate([audio, audio])
    n = audio.shape[0]

    def d_loss(d_params):
      terms = {}
      for p in PARTS:  # real and fake in one call (no normalisation layers in D)
        logits = discs[p].apply({"params": d_params[p]}, jnp.concatenate([real[p], fake[p]]),
                                both_audio)[0]
        terms[f"d_{p}"] = losses.lsgan_discriminator_loss(logits[:n], logits[n:])
      return sum(terms.values()), terms

    (d_total, d_terms), d_grads = jax.value_and_grad(d_loss, has_aux=True)(state.d_params)
    g_updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, state.g_params)
    d_updates, d_opt_state = d_tx.update(d_grads, state.d_opt_state, state.d_params)
    new_state = state.replace(
        step=state.step + 1, g_params=optax.apply_updates(state.g_params, g_updates),
        batch_stats=batch_stats, d_params=optax.apply_updates(state.d_params, d_updates),
        g_opt_state=g_opt_state, d_opt_state=d_opt_state)
    out_metrics = {**g_terms, **d_terms, "g_total": g_total, "d_total": d_total,
                   "g_grad_norm": _global_norm(g_grads),
                   "d_grad_norm": _global_norm(d_grads), "lr": schedule(state.step)}
    return new_state, out_metrics

  return Program(
      mesh=mesh, shardings=shardings, abstract=abstract, schedule=schedule,
      init=jax.jit(init, out_shardings=shardings, compiler_options=FAST_COMPILE),
      step=jax.jit(step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,),
                   compiler_options=FAST_COMPILE if spec["fast"] else None))


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def init_state(prog: Program, seed: int, stats: Mapping[str, np.ndarray]) -> TrainState:
  return prog.init(jax.random.PRNGKey(seed), {k: jnp.asarray(v, jnp.float32)
                                              for k, v in stats.items()})


def inference_variables(state: TrainState) -> dict:
  """What `predict` needs: G_ani's params and batch stats, and the audio normalisation."""
  return {"params": state.g_params, "batch_stats": state.batch_stats,
          "stats": {"audio_mean": state.stats["audio_mean"], "audio_std": state.stats["audio_std"]}}


# ---------------------------------------------------------------------------------- predict

@functools.lru_cache(maxsize=8)
def _forward(model_json: str, mesh=None):
  """Jitted eval-mode G_ani on (variables, raw audio (B, T, 15), identity)."""
  model_config = ml_collections.ConfigDict(json.loads(model_json))
  gen = animation.AnimationGenerator(model_config)

  def forward(variables, audio, identity):
    audio = normalise_audio(audio, variables["stats"])
    return gen.apply({"params": variables["params"], "batch_stats": variables["batch_stats"]},
                     audio, prepare_identity(identity, model_config), train=False)
  return jax.jit(forward, out_shardings=None if mesh is None else mesh_lib.replicated(mesh))


def predict(variables: Mapping, audio_features, identity_input, *,
            model_config: ml_collections.ConfigDict, chunk: int = 1000,
            overlap: int | None = None, max_batch: int = 16) -> dict[str, np.ndarray]:
  """G_ani on a whole clip of any length: audio (T, 15) at 100 fps -> mouth (T, 28),
  eyebrow (T, 5), head (T, 5) numpy float32.

  variables: `inference_variables(state)`. identity_input: one reference frame (S, S, 3), shape
  vector (60,) or embedding (E,), as `model_config.identity.kind` says (a leading 1 is allowed).
  T <= chunk runs in one call. Longer input runs as windows of `chunk` frames (the training
  window length keeps AdaIN's statistics over time as in training) every `chunk - overlap`
  frames, the last one aligned to the end, batched up to `max_batch` at a time (powers of two:
  a few compiled shapes for every length); overlapping outputs are blended with linear ramps of
  `overlap` frames (default chunk // 5).
  """
  overlap = chunk // 5 if overlap is None else overlap
  audio = np.asarray(audio_features, np.float32)
  if audio.ndim != 2 or audio.shape[1] != model_config.audio_dim or audio.shape[0] < 1:
    raise ValueError(f"predict: audio must be (T>=1, {model_config.audio_dim}), got {audio.shape}")
  if not 0 <= overlap < chunk or max_batch < 1:
    raise ValueError(f"predict: need 0 <= overlap < chunk and max_batch >= 1, got overlap="
                     f"{overlap}, chunk={chunk}, max_batch={max_batch}")
  ident = np.asarray(identity_input)
  want = identity_lib.identity_input_shape(model_config.identity, 1)[1:]
  if ident.shape == want or (model_config.identity.kind == "image" and ident.ndim == 3):
    ident = ident[None]
  if ident.shape[0] != 1 or (model_config.identity.kind != "image" and ident.shape[1:] != want):
    raise ValueError(f"predict: one identity input like {want} expected, got {ident.shape}")
  forward = _forward(model_config.to_json())
  t = audio.shape[0]
  if t <= chunk:
    return {k: np.asarray(v[0]) for k, v in forward(variables, audio[None], ident).items()}

  hop = chunk - overlap
  starts = list(range(0, t - chunk + 1, hop))
  if starts[-1] + chunk < t:
    starts.append(t - chunk)
  ramp = np.minimum(np.arange(1, chunk + 1), np.arange(chunk, 0, -1)) / (overlap + 1)
  weight = np.minimum(ramp, 1.0).astype(np.float32)[:, None]
  acc = {p: np.zeros((t, getattr(model_config, f"{p}_dim")), np.float32) for p in PARTS}
  norm = np.zeros((t, 1), np.float32)
  # Batches of a power of two <= max_batch: a handful of compiled shapes for any length.
  batch = min(max_batch, 1 << (len(starts) - 1).bit_length())
  idents = np.repeat(ident, batch, axis=0)
  for g in range(0, len(starts), batch):
    group = starts[g:g + batch]
    windows = np.stack([audio[s:s + chunk] for s in group])
    if len(group) < batch:  # pad the last batch (repeats are computed and dropped)
      windows = np.concatenate([windows, np.repeat(windows[-1:], batch - len(group), 0)])
    out = jax.device_get(forward(variables, windows, idents))
    for i, s in enumerate(group):
      for p in PARTS:
        acc[p][s:s + chunk] += out[p][i] * weight
      norm[s:s + chunk] += weight
  return {p: acc[p] / norm for p in PARTS}


# ------------------------------------------------------------------------------------- eval

def mouth_vertices_fn(model_config) -> Callable | None:
  """Mouth-region vertices of the default morphable model for mouth parameters (..., 28), or None
  when the model (asset) is missing or has another number of mouth bases.

  The shape coefficients cancel in a predicted-minus-true vertex difference (the model is
  linear), so vertices are `morphable.vertices` on the mean face (shape 0, eyebrow 0), mouth
  region only (computed for that region alone: the same numbers, less memory).
  """
  try:
    from hdtf_jax.face import morphable
    model = morphable.default_model()
  except (ImportError, FileNotFoundError, ValueError, OSError) as e:
    log.warning("LMD-3D left out: no morphable model (%s)", e)
    return None
  if model.n_mouth != model_config.mouth_dim:
    log.warning("LMD-3D left out: the model has %d mouth bases, G_ani %d", model.n_mouth,
                model_config.mouth_dim)
    return None
  idx = np.asarray(model.regions["mouth"])
  mean = jnp.asarray(model.mean[idx])
  basis = jnp.asarray(model.mouth_basis[:, idx])
  return lambda mouth: mean + jnp.einsum("...m,mvc->...vc", mouth, basis)


def other_speaker_pairs(identities: Sequence[int]) -> np.ndarray | None:
  """For window i, the next window (cyclically) of a different identity; None with one identity."""
  ids = np.asarray(identities)
  n = len(ids)
  if n == 0 or len(np.unique(ids)) < 2:
    return None
  pairs = np.empty(n, np.int64)
  for i in range(n):
    j = (i + 1) % n
    while ids[j] == ids[i]:
      j = (j + 1) % n
    pairs[i] = j
  return pairs


def pearson(a: np.ndarray, b: np.ndarray) -> float:
  """Pearson correlation of two flattened arrays; 0 when either is constant."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  sa, sb = a.std(), b.std()
  if sa < 1e-12 or sb < 1e-12:
    return 0.0
  return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))


@functools.lru_cache(maxsize=4)
def _window_metrics(c1: float, c2: float, lmd3d_json: str):
  """Jitted per-window `metrics.stage1_metrics` over a batch of windows (vmap of batch-of-one)."""
  verts = mouth_vertices_fn(ml_collections.ConfigDict(json.loads(lmd3d_json))) \
      if lmd3d_json else None

  def one_window(pred, gt):
    return metrics.stage1_metrics({k: v[None] for k, v in pred.items()},
                                  {k: v[None] for k, v in gt.items()},
                                  mouth_vertices_fn=verts, ssim_c1=c1, ssim_c2=c2)
  return jax.jit(jax.vmap(one_window))


class Evaluator:
  """The paper's stage-1 metrics on fixed held-out windows (`metrics.stage1_metrics` per window,
  averaged over windows), for the model and two baselines computed the same way:
  `mean_params` (the training mean: no motion) and `other_speaker` (the ground truth of a window
  of another identity). Adds `jaw_open_r`: Pearson r of mouth[..., 0] over all frames."""

  def __init__(self, config, mesh, examples: list[dict], use_lmd3d: bool = True):
    if not examples:
      raise ValueError("stage 1 eval: no held-out windows (clips shorter than data.eval_window?)")
    self.config, self.mesh, self.examples = config, mesh, examples
    self._identity_key = IDENTITY_KEY[config.model.identity.kind]
    if self._identity_key not in examples[0]:
      raise ValueError(f"stage 1 eval: identity.kind={config.model.identity.kind!r} needs "
                       f"{self._identity_key!r} in the eval windows, they have "
                       f"{sorted(examples[0])}")
    shards = mesh_lib.num_batch_shards(mesh)
    self.batch_size = -(-config.data.eval_batch_size // shards) * shards
    self.gt = {p: np.stack([e[TARGET_KEY[p]] for e in examples]) for p in PARTS}
    self.identities = np.array([int(e["identity"]) for e in examples])
    self._forward = _forward(config.model.to_json(), mesh)
    self._metrics = _window_metrics(config.eval.ssim_c1, config.eval.ssim_c2,
                                    config.model.to_json() if use_lmd3d else "")

  def predictions(self, variables) -> dict[str, np.ndarray]:
    """G_ani (eval mode) on every window: dict of (N, W, D)."""
    n, b = len(self.examples), self.batch_size
    pi, pc = jax.process_index(), jax.process_count()
    outs = {p: [] for p in PARTS}
    for start in range(0, n, b):
      rows = [self.examples[min(i, n - 1)] for i in range(start, start + b)]  # pad with the last
      rows = rows[pi * b // pc:(pi + 1) * b // pc]  # this process's share
      sharded = mesh_lib.shard_batch(
          {"audio": np.stack([r["audio"] for r in rows]),
           "identity": np.stack([r[self._identity_key] for r in rows])}, self.mesh)
      out = jax.device_get(self._forward(variables, sharded["audio"], sharded["identity"]))
      for p in PARTS:
        outs[p].append(out[p][:min(b, n - start)])
    return {p: np.concatenate(v) for p, v in outs.items()}

  def score(self, pred: Mapping[str, np.ndarray]) -> dict[str, float]:
    n, b = len(self.examples), self.batch_size
    per_window: dict[str, list] = {}
    for start in range(0, n, b):
      idx = np.minimum(np.arange(start, start + b), n - 1)
      m = jax.device_get(self._metrics({p: np.asarray(pred[p][idx], np.float32) for p in PARTS},
                                       {p: self.gt[p][idx] for p in PARTS}))
      for k, v in m.items():
        per_window.setdefault(k, []).append(np.asarray(v)[:min(b, n - start)])
    result = {k: float(np.mean(np.concatenate(v))) for k, v in per_window.items()}
    result["jaw_open_r"] = pearson(pred["mouth"][..., 0], self.gt["mouth"][..., 0])
    return result

  def baselines(self, stats: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    out = {"mean_params": self.score(
        {p: np.broadcast_to(np.asarray(stats[f"{p}_mean"]), self.gt[p].shape) for p in PARTS})}
    pairs = other_speaker_pairs(self.identities)
    if pairs is not None:
      out["other_speaker"] = self.score({p: self.gt[p][pairs] for p in PARTS})
    return out

  def track_plot(self, pred: Mapping[str, np.ndarray], title: str = "",
                 index: int = 0) -> np.ndarray:
    """Predicted vs true tracks of eval window `index` (the first by default: a fixed clip)."""
    return logs.plot_tracks({p: [pred[p][index], self.gt[p][index]] for p in PARTS},
                            fps=100.0, title=title)


METRIC_COLUMNS = ("mse_mouth", "lmd3d_mouth", "ssim_eyebrow", "cca_head", "jaw_open_r")


def markdown_table(results: Mapping[str, Mapping[str, float]]) -> str:
  cols = [c for c in METRIC_COLUMNS if any(c in r for r in results.values())]
  lines = ["| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name, r in results.items():
    lines.append(f"| {name} | " + " | ".join(f"{r[c]:.4f}" if c in r else "-" for c in cols) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------- loop

def _host_stats(state: TrainState) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in jax.device_get(state.stats).items()}


class _StopOnSigterm:
  """While installed, SIGTERM (preemption, `kill`) ends the loop after the current step, so the
  exit checkpoint is written; only possible from the main thread."""

  def __init__(self):
    self.requested = False
    self._installed = threading.current_thread() is threading.main_thread()
    if self._installed:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    log.warning("stage 1: SIGTERM, stopping after this step")
    self.requested = True

  def restore(self) -> None:
    if self._installed:
      # None: the old handler was not set from Python; the default is the closest.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, data: Stage1Data | None = None,
          progress: bool = True) -> dict:
  """Trains (or resumes) stage 1 in `workdir`; returns {step, train: last losses, eval: metrics}.

  Saves to `workdir/checkpoints` every `train.checkpoint_every` steps and at exit (also on
  Ctrl-C and SIGTERM; not after a non-finite loss), logs every loss to `workdir/metrics.jsonl` and
  TensorBoard, eval metrics every `train.eval_every` steps and at the end, track plots to
  `workdir/images`. `data` defaults to `make_data(config)`.
  """
  from tqdm.auto import tqdm

  workdir = Path(workdir)
  mesh = mesh_lib.make_mesh(config.mesh.axes.to_dict())
  data = data or make_data(config)
  hold, decay, total = resolve_steps(config, data.steps_per_epoch)
  prog = program(config, mesh, hold, decay)
  t = config.train
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
                                  save_every=t.checkpoint_every, async_save=t.async_checkpoints)
  restored = ckpt.restore(prog.abstract)
  if restored is not None:
    state, data_state, _ = restored
    data.train_iter.set_state(data_state)
  else:
    state = init_state(prog, config.seed, data.stats)
  step = int(jax.device_get(state.step))
  logger = logs.MetricLogger(workdir)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  evaluator = Evaluator(config, mesh, data.eval_examples, config.eval.lmd3d)
  meta = {"preset": config.preset, "total_steps": total}
  synced = data.train_iter.get_state()  # the iterator position that matches `state`
  last: dict[str, float] = {}
  results: dict = {}
  bar = tqdm(total=total, initial=step, desc="stage1", disable=not progress or jax.process_index())
  nonfinite = False
  stop = _StopOnSigterm()
  try:
    if restored is None:
      for name, r in evaluator.baselines(_host_stats(state)).items():
        logger.scalars(0, r, prefix=f"eval/{name}/")
    tick, tick_step = time.perf_counter(), step
    while step < total and not stop.requested:
      batch = model_inputs(next(data.train_iter), config.model)
      pending = data.train_iter.get_state()
      state, m = prog.step(state, mesh_lib.shard_batch(batch, mesh))
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      check_finite(m, step + 1, "stage 1", ckpt.latest_step())
      step, synced, last = step + 1, pending, m
      bar.update(1)
      if step % t.log_every == 0 or step == total:
        now = time.perf_counter()
        m["steps_per_s"] = (step - tick_step) / max(now - tick, 1e-9)
        tick, tick_step = now, step
        logger.scalars(step, m, prefix="train/")
        bar.set_postfix(g=f"{m['g_total']:.3f}", d=f"{m['d_total']:.3f}")
      if step % t.checkpoint_every == 0:
        ckpt.save(step, state, synced, meta, force=True)
      if (t.eval_every and step % t.eval_every == 0) or step == total:
        results = _evaluate(evaluator, state, logger, step, total, config)
  except NonFiniteLossError:
    nonfinite = True
    raise
  finally:  # save at exit (also on Ctrl-C / SIGTERM), never after a non-finite loss
    stop.restore()
    bar.close()
    if not nonfinite and ckpt.latest_step() != step and alive(state):
      ckpt.save(step, state, synced, meta, force=True)
    ckpt.close()
    logger.close()
  return {"step": step, "train": last, "eval": results}


def _evaluate(evaluator: Evaluator, state: TrainState, logger, step: int, total: int,
              config) -> dict:
  pred = evaluator.predictions(inference_variables(state))
  result = evaluator.score(pred)
  logger.scalars(step, result, prefix="eval/model/")
  plot_every = config.train.plot_every or config.train.eval_every
  if not plot_every or step % plot_every == 0 or step == total:
    logger.image(step, "eval/tracks", evaluator.track_plot(pred, f"step {step}"))
  logger.flush()
  return result


def restore_state(config, workdir: str | Path, *, step: int | None = None) -> TrainState:
  """The train state of `workdir/checkpoints` (latest or `step`), sharded over `mesh.axes`."""
  ckpt_dir = Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"stage 1: no checkpoint directory {ckpt_dir}")
  mesh = mesh_lib.make_mesh(config.mesh.axes.to_dict())
  hold, decay, _ = resolve_steps(config, 1)  # the schedule does not change the state's shapes
  ckpt = checkpoints.Checkpointer(ckpt_dir)
  try:
    restored = ckpt.restore(program(config, mesh, hold, decay).abstract, step)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"stage 1: no checkpoint in {ckpt_dir}")
  return restored[0]


def evaluate_checkpoint(config, workdir: str | Path, *, step: int | None = None,
                        data: Stage1Data | None = None, out: str | Path | None = None) -> dict:
  """`--mode=eval`: the model of `workdir/checkpoints` (latest or `step`) and the baselines on the
  held-out windows; prints a Markdown table, writes JSON (default `workdir/eval_<step>.json`)
  and a track plot. Returns {system: {metric: value}}."""
  workdir = Path(workdir)
  state = restore_state(config, workdir, step=step)
  data = data or make_data(config)
  mesh = mesh_lib.make_mesh(config.mesh.axes.to_dict())
  evaluator = Evaluator(config, mesh, data.eval_examples, config.eval.lmd3d)
  pred = evaluator.predictions(inference_variables(state))
  results = {"model": evaluator.score(pred), **evaluator.baselines(_host_stats(state))}
  done = int(jax.device_get(state.step))
  print(f"Stage-1 eval at step {done}: {len(data.eval_examples)} held-out windows of "
        f"{config.data.eval_window} frames\n\n{markdown_table(results)}")
  if jax.process_index() == 0:
    path = Path(out) if out else workdir / f"eval_{done}.json"
    path.write_text(json.dumps({"step": done, "windows": len(data.eval_examples),
                                "window": config.data.eval_window, "results": results}, indent=2))
    logs.save_png(workdir / "images" / f"eval_tracks_{done:07d}.png",
                  evaluator.track_plot(pred, f"step {done}"))
  return results
