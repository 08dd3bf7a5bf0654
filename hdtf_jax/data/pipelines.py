"""Grain input pipelines over the HDTF TFDS dataset (random access, checkpointable, sharded).

    source = tfds.data_source("hdtf/params", split="train", data_dir=...)
    ds = stage1_dataset(source, window=1000, stride=128, batch_size=128, seed=0)
    it = iter(ds); batch = next(it); state = it.get_state()   # ...; it.set_state(state)

- Records are read through `ClipReader`: only the features a pipeline needs are decoded, and
  JPEG frames stay encoded until the one or two that a sample uses are decoded with cv2 (so a
  512 clip of 1500 frames costs two JPEG decodes, not 1500).
- Stage 1: every window of `window` audio frames (100 fps) at `stride` in every clip long
  enough; 3DMM parameters are upsampled from the video rate to the audio-feature rate
  (`hdtf_jax.audio.resample_track`, so 25 -> 100 fps gives exactly Ta = 4 T frames) and cut
  with the same window. One reference frame per sample, drawn at random (by seed and index).
- Stage 2: `samples_per_clip` (reference, driving) frame pairs per clip and epoch, drawn among
  frames with a face; images resized to `image_size`, floats in [0, 1].
- Determinism: shuffles and draws are functions of (seed, epoch, index) only (grain's index
  shuffle, reseeded every epoch); the iterator state is a small dict (`get_state` /
  `set_state`) to save with the model.
- Sharding: the sample list is cut to a multiple of `shard_count` and process `shard_index`
  takes every `shard_count`-th sample (defaults: `jax.process_index()` / `process_count()`),
  so shards are disjoint and equally long.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from hdtf_jax import audio as audio_lib

STAGE1_FEATURES = ("identity", "fps", "audio_features", "mouth", "eyebrow", "pose", "shape",
                   "scale")
PARAM_KEYS = ("shape", "scale", "mouth", "eyebrow", "pose")
_IMAGE_SEQUENCES = ("frames", "reference_frames")


# ----------------------------------------------------------------------------- reading records


class ClipReader:
  """Random access to some features of the clips in a TFDS data source.

  `source` is what `tfds.data_source(...)` returns (any split). Text comes back as `str`,
  tensors as NumPy arrays, and `frames` / `reference_frames` as lists of JPEG bytes
  (decode with `decode_jpeg`). Picklable, so grain worker processes can use it too.
  """

  def __init__(self, source, features: Sequence[str]):
    import tensorflow_datasets as tfds
    info = source.dataset_info
    missing = [k for k in features if k not in info.features]
    if missing:
      raise ValueError(f"dataset {info.full_name} has no feature(s) {missing}; it has "
                       f"{sorted(info.features)}")
    specs = {}
    for key in features:
      if key in _IMAGE_SEQUENCES:  # same serialized form as images: keep the bytes
        specs[key] = tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))
      else:
        specs[key] = info.features[key]
    self.features = tuple(features)
    self.name = info.full_name
    self._records = source.data_source  # the raw array_record source: bytes per index
    self._spec = tfds.features.FeaturesDict(specs)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._spec.deserialize_example_np(self._records[int(index)])
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in example.items()}


def decode_jpeg(data: bytes) -> np.ndarray:
  """JPEG bytes -> RGB uint8 (H, W, 3)."""
  img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if img is None:
    raise ValueError(f"not a decodable JPEG ({len(data)} bytes)")
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def to_float_image(img: np.ndarray, size: int | None = None) -> np.ndarray:
  """uint8 RGB -> float32 [0, 1], resized to (size, size) (area filter when shrinking)."""
  if size is not None and img.shape[:2] != (size, size):
    shrink = img.shape[0] > size
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink
                     else cv2.INTER_LINEAR)
  return img.astype(np.float32) * (1.0 / 255.0)


def _shards(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  return shard_index, shard_count


def _shard(items: list, shard_index: int, shard_count: int) -> list:
  """Every shard_count-th item from shard_index, after cutting to a multiple of shard_count."""
  usable = len(items) - len(items) % shard_count
  return items[:usable][shard_index::shard_count]


def _finish(ds, batch_size: int, num_threads: int, drop_remainder: bool):
  import grain
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  options = grain.ReadOptions(num_threads=num_threads,
                              prefetch_buffer_size=max(2 * batch_size, 2 * num_threads, 4))
  return ds.to_iter_dataset(options).batch(batch_size, drop_remainder=drop_remainder)


def identity_table(identities: Sequence[str]) -> dict[str, int]:
  """Identity name -> id (sorted names, so ids only depend on which identities exist)."""
  return {name: i for i, name in enumerate(sorted(set(identities)))}


# ----------------------------------------------------------------------------- stage 1


def stage1_windows(lengths: Sequence[int], window: int, stride: int) -> list[tuple[int, int]]:
  """(clip, start) of every full window; a clip shorter than `window` gives none."""
  if window < 1 or stride < 1:
    raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
  return [(clip, start) for clip, n in enumerate(lengths)
          for start in range(0, n - window + 1, stride)]


class _Stage1Sample:
  """Window (clip, start) -> sample dict; picklable for grain."""

  def __init__(self, reader: ClipReader, ids: Mapping[str, int], window: int,
               feature_fps: float, reference_key: str, reference_size: int | None):
    self.reader, self.ids = reader, dict(ids)
    self.window, self.feature_fps = window, feature_fps
    self.reference_key, self.reference_size = reference_key, reference_size

  def __call__(self, item: tuple[int, int], rng: np.random.Generator) -> dict[str, Any]:
    clip, start = item
    ex = self.reader[clip]
    ta = ex["audio_features"].shape[0]
    stop = start + self.window
    out = {"audio": ex["audio_features"][start:stop]}
    for key in ("mouth", "eyebrow", "pose"):
      out[key] = audio_lib.resample_track(ex[key], float(ex["fps"]), self.feature_fps,
                                          num_frames=ta)[start:stop]
    out["shape"] = ex["shape"]
    out["scale"] = np.float32(ex["scale"])
    frames = ex[self.reference_key]
    ref = decode_jpeg(frames[int(rng.integers(len(frames)))])
    out["reference_frame"] = to_float_image(ref, self.reference_size)
    out["identity"] = np.int32(self.ids[ex["identity"]])
    out["clip"] = np.int32(clip)
    out["start"] = np.int32(start)
    return out


def stage1_dataset(source, *, window: int = 1000, stride: int = 128, batch_size: int,
                   seed: int = 0, shard_index: int | None = None, shard_count: int | None = None,
                   num_epochs: int | None = None, feature_fps: float = 100.0,
                   reference_size: int | None = None, num_threads: int = 2,
                   drop_remainder: bool = True):
  """Batches of stage-1 windows (see the module docstring); a grain IterDataset.

  Batch: audio (B, W, 15), mouth (B, W, 28), eyebrow (B, W, 5), pose (B, W, 5), shape (B, 60),
  scale (B,), reference_frame (B, R, R, 3) float32 in [0, 1] (R: the stored size, or
  `reference_size`), identity (B,) int32 (`identity_table` of the source), clip / start (B,)
  int32 (record index and first audio frame). `num_epochs=None` repeats forever.
  """
  import grain
  shard_index, shard_count = _shards(shard_index, shard_count)
  names = set(source.dataset_info.features)
  reference_key = "reference_frames" if "reference_frames" in names else "frames"
  reader = ClipReader(source, STAGE1_FEATURES + (reference_key,))
  scan = ClipReader(source, ("identity", "audio_features"))
  lengths, identities = [], []
  for i in range(len(scan)):
    ex = scan[i]
    lengths.append(ex["audio_features"].shape[0])
    identities.append(ex["identity"])
  windows = _shard(stage1_windows(lengths, window, stride), shard_index, shard_count)
  if not windows:
    raise ValueError(f"{reader.name}: no clip holds a window of {window} audio frames for shard "
                     f"{shard_index}/{shard_count} (longest clip: {max(lengths, default=0)})")
  sample = _Stage1Sample(reader, identity_table(identities), window, feature_fps,
                         reference_key, reference_size)
  ds = grain.MapDataset.source(windows).shuffle(seed=seed).repeat(num_epochs)
  ds = ds.random_map(sample, seed=seed)
  return _finish(ds, batch_size, num_threads, drop_remainder)


# ----------------------------------------------------------------------------- stage 2


class _Stage2Sample:
  """Clip index -> (reference, driving) pair; picklable for grain."""

  def __init__(self, reader: ClipReader, found: Sequence[np.ndarray], ids: Mapping[str, int],
               image_size: int):
    self.reader, self.found = reader, list(found)
    self.ids, self.image_size = dict(ids), image_size

  def __call__(self, clip: int, rng: np.random.Generator) -> dict[str, Any]:
    ex = self.reader[clip]
    candidates = np.flatnonzero(self.found[clip])
    ref_i, drv_i = (rng.choice(candidates, 2, replace=False) if candidates.size > 1
                    else (candidates[0], candidates[0]))
    jpegs = ex["frames"]

    def params(i):
      return {"shape": ex["shape"], "scale": np.float32(ex["scale"]), "mouth": ex["mouth"][i],
              "eyebrow": ex["eyebrow"][i], "pose": ex["pose"][i]}

    return {"reference": to_float_image(decode_jpeg(jpegs[ref_i]), self.image_size),
            "driving": to_float_image(decode_jpeg(jpegs[drv_i]), self.image_size),
            "ref_params": params(ref_i), "drv_params": params(drv_i),
            "identity": np.int32(self.ids[ex["identity"]]), "clip": np.int32(clip),
            "ref_index": np.int32(ref_i), "drv_index": np.int32(drv_i)}


def stage2_dataset(source, *, image_size: int, batch_size: int, seed: int = 0,
                   shard_index: int | None = None, shard_count: int | None = None,
                   num_epochs: int | None = None, samples_per_clip: int = 1,
                   num_threads: int = 2, drop_remainder: bool = True):
  """Batches of stage-2 frame pairs (see the module docstring); a grain IterDataset.

  Batch: reference / driving (B, S, S, 3) float32 in [0, 1], ref_params / drv_params dicts
  (shape (B, 60), scale (B,), mouth (B, 28), eyebrow (B, 5), pose (B, 5)), identity, clip,
  ref_index, drv_index (B,) int32. Needs a config with frames (`hdtf/256`, `hdtf/512`).
  """
  import grain
  if "frames" not in source.dataset_info.features:
    raise ValueError(f"{source.dataset_info.full_name} stores no frames: stage 2 needs "
                     f"hdtf/256 or hdtf/512")
  if samples_per_clip < 1:
    raise ValueError(f"samples_per_clip must be >= 1, got {samples_per_clip}")
  shard_index, shard_count = _shards(shard_index, shard_count)
  reader = ClipReader(source, ("identity", "frames") + PARAM_KEYS)
  scan = ClipReader(source, ("identity", "face_found"))
  found, identities = [], []
  for i in range(len(scan)):
    ex = scan[i]
    found.append(ex["face_found"])
    identities.append(ex["identity"])
  clips = [i for i, f in enumerate(found) if f.any()] * samples_per_clip
  items = _shard(clips, shard_index, shard_count)
  if not items:
    raise ValueError(f"{reader.name}: no clip with a face for shard {shard_index}/{shard_count}")
  sample = _Stage2Sample(reader, found, identity_table(identities), image_size)
  ds = grain.MapDataset.source(items).shuffle(seed=seed).repeat(num_epochs)
  ds = ds.random_map(sample, seed=seed)
  return _finish(ds, batch_size, num_threads, drop_remainder)
