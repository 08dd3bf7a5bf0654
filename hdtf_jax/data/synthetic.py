"""A synthetic stage-1 source with learnable structure: tests, benchmarks, `data.source='synthetic'`.

Every speaker has a hidden style vector `z` (4 numbers in [-1, 1]) that sets how wide they open
their mouth, how much their eyebrows and head move and their voice pitch; their reference frame
(a coloured blob on a coloured background) and their 3DMM shape vector are fixed functions of `z`,
so a model can read the style from either identity input, also for speakers it never saw.

A clip, generated at 25 fps and linearly upsampled to 100 fps like the real parameters:
- articulation: a run of syllables, each a viseme (a prototype 3-vector: jaw open, rounding,
  stretch) held 3-7 frames, with pauses; smoothed. `mouth = gain(z) * B @ articulation` (28 params,
  mouth[..., 0] is jaw open = gain * articulation[0]).
- audio (15 features at 100 fps) = `tanh(A @ [articulation, voicing, pitch(z) + intonation] + b)`
  plus Gaussian noise (`audio_noise`): a known noisy function of the speaker-normalised mouth
  parameters, so mouth = style x f^-1(audio).
- eyebrow (5) and head pose (5): speaker-scaled mixes of the slow speech-energy envelope and
  the intonation (predictable from audio), plus for the head a slow sway at a speaker frequency with
  a random phase per clip (style, not predictable frame by frame).

Everything is a deterministic function of (`seed`, speaker, clip), generated on demand. The window
iterator has `get_state`/`set_state` like grain's, so checkpoints resume it exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
from scipy.ndimage import gaussian_filter1d

from hdtf_jax.audio import resample_track

AUDIO_DIM, MOUTH_DIM, EYEBROW_DIM, POSE_DIM, SHAPE_DIM = 15, 28, 5, 5, 60
STYLE_DIM = 4
PARAM_FPS, FEATURE_FPS = 25.0, 100.0
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Sizes of the synthetic corpus. Speakers `0..num_train_speakers-1` are `train`, the next
  `num_test_speakers` are `test` (held out by identity, like the real split)."""
  num_train_speakers: int = 24
  num_test_speakers: int = 6
  clips_per_speaker: int = 3
  clip_seconds: float = 20.0
  reference_size: int = 64     # side of the reference frame, pixels
  audio_noise: float = 0.1     # std of the noise added to the audio features
  seed: int = 0                # the corpus; independent of the training seed

  def __post_init__(self):
    if self.num_train_speakers < 1 or self.num_test_speakers < 0 or self.clips_per_speaker < 1:
      raise ValueError(f"synthetic: need >= 1 train speaker and clip per speaker, got {self}")
    if self.clip_seconds * FEATURE_FPS < 16 or self.reference_size < 4:
      raise ValueError(f"synthetic: clips must be >= 0.16 s and images >= 4 px, got {self}")

  @classmethod
  def from_dict(cls, values: Any) -> "SyntheticConfig":
    return dataclass_from_dict(cls, values, "synthetic config")


def dataclass_from_dict(cls, values: Any, what: str):
  """`cls(**values)` that names unknown keys (a typo in a config override) instead of a
  TypeError from deep inside."""
  values = dict(values or {})
  unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"{what}: unknown keys {sorted(unknown)}")
  return cls(**values)


def _corpus_constants(seed: int) -> dict[str, np.ndarray]:
  """Fixed mixing matrices shared by every speaker of a corpus."""
  rng = np.random.default_rng([seed, 7919])
  visemes = rng.uniform([0.15, -0.6, -0.6], [1.0, 0.6, 0.6], size=(8, 3))
  mouth_mix = rng.normal(0.0, 0.25, size=(MOUTH_DIM, 3))
  mouth_mix[0] = (1.0, 0.0, 0.0)  # mouth[..., 0] is jaw open
  return dict(
      visemes=visemes.astype(np.float32),
      mouth_mix=mouth_mix.astype(np.float32),
      audio_mix=rng.normal(0.0, 1.0, size=(AUDIO_DIM, 5)).astype(np.float32),
      audio_bias=rng.normal(0.0, 0.3, size=AUDIO_DIM).astype(np.float32),
      eyebrow_mix=rng.normal(0.0, 1.0, size=(EYEBROW_DIM, 2)).astype(np.float32),
      head_mix=rng.normal(0.0, 1.0, size=(POSE_DIM, 2)).astype(np.float32),
      head_sway=rng.normal(0.0, 1.0, size=POSE_DIM).astype(np.float32),
      shape_mix=rng.normal(0.0, 1.0, size=(SHAPE_DIM, STYLE_DIM)).astype(np.float32))


# Head pose is (yaw, pitch, roll, tx, ty): radians, then normalised crop units.
_POSE_SCALE = np.array([0.12, 0.08, 0.05, 0.02, 0.02], np.float32)


class SyntheticStage1Source:
  """Random access to the clips of one split: `source[i]` is a dict with
  audio (Ta, 15), mouth (Ta, 28), eyebrow (Ta, 5), pose (Ta, 5) float32 at 100 fps,
  shape (60,), reference_frame (R, R, 3) float32 in [0, 1], identity int32 (the speaker),
  clip str. Field names follow `hdtf_jax.data.pipelines.stage1_dataset`."""

  def __init__(self, config: SyntheticConfig = SyntheticConfig(), split: str = "train"):
    if split not in SPLITS:
      raise ValueError(f"synthetic: split must be one of {SPLITS}, got {split!r}")
    self.config, self.split = config, split
    first = 0 if split == "train" else config.num_train_speakers
    count = config.num_train_speakers if split == "train" else config.num_test_speakers
    if count < 1:
      raise ValueError(f"synthetic: split {split!r} has no speakers ({config})")
    self.speakers = list(range(first, first + count))
    self._const = _corpus_constants(config.seed)
    self._cache: dict[int, dict[str, Any]] = {}

  @property
  def clip_frames(self) -> int:
    """Frames per clip at 100 fps (4x the 25 fps parameter frames)."""
    return 4 * int(round(self.config.clip_seconds * PARAM_FPS))

  def __len__(self) -> int:
    return len(self.speakers) * self.config.clips_per_speaker

  def num_windows(self, window: int, stride: int) -> int:
    """How many windows of `window` frames a `stride` walk over every clip gives (an epoch)."""
    if window > self.clip_frames:
      return 0
    return len(self) * ((self.clip_frames - window) // stride + 1)

  def style(self, speaker: int) -> np.ndarray:
    return np.random.default_rng([self.config.seed, speaker, 1]).uniform(
        -1.0, 1.0, STYLE_DIM).astype(np.float32)

  def reference_frame(self, speaker: int, clip: int = 0) -> np.ndarray:
    """The speaker's look: background colour, blob colour and size from the style (+ per-clip
    jitter and pixel noise, like different frames of one person)."""
    z = self.style(speaker)
    r = self.config.reference_size
    rng = np.random.default_rng([self.config.seed, speaker, clip, 2])
    yy, xx = np.mgrid[0:r, 0:r].astype(np.float32) / r
    cx, cy = 0.5 + rng.normal(0, 0.02, 2)
    radius = 0.25 + 0.08 * z[3]
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius ** 2))[..., None]
    background = 0.5 + 0.35 * z[:3]
    face = 0.5 - 0.35 * z[[1, 2, 0]]
    image = background * (1 - blob) + face * blob + rng.normal(0, 0.02, (r, r, 3))
    return np.clip(image, 0.0, 1.0).astype(np.float32)

  def shape_vector(self, speaker: int) -> np.ndarray:
    z = self.style(speaker)
    noise = np.random.default_rng([self.config.seed, speaker, 3]).normal(0, 0.1, SHAPE_DIM)
    return (0.5 * self._const["shape_mix"] @ z + noise).astype(np.float32)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f"synthetic {self.split}: clip {index} out of range [0, {len(self)})")
    if index not in self._cache:
      if len(self._cache) > 256:  # bound memory for big corpora
        self._cache.clear()
      self._cache[index] = self._make_clip(index)
    return self._cache[index]

  def _make_clip(self, index: int) -> dict[str, Any]:
    c, cfg = self._const, self.config
    speaker = self.speakers[index // cfg.clips_per_speaker]
    clip = index % cfg.clips_per_speaker
    z = self.style(speaker)
    rng = np.random.default_rng([cfg.seed, speaker, clip, 4])
    n = self.clip_frames // 4

    # Articulation at 25 fps: visemes held 3-7 frames, 15% pauses.
    artic = np.zeros((n, 3), np.float32)
    voicing = np.zeros(n, np.float32)
    t = 0
    while t < n:
      if rng.random() < 0.15:
        d = int(rng.integers(5, 15))
      else:
        d = int(rng.integers(3, 8))
        artic[t:t + d] = c["visemes"][rng.integers(len(c["visemes"]))] * rng.uniform(0.7, 1.0)
        voicing[t:t + d] = 1.0
      t += d
    artic = gaussian_filter1d(artic, 1.2, axis=0)
    voicing = gaussian_filter1d(voicing, 1.2)
    intonation = gaussian_filter1d(rng.normal(0, 1, n), 6.0) * 4.0 * voicing
    energy = gaussian_filter1d(artic[:, 0] * voicing, 8.0)
    energy = (energy - energy.mean()) / (energy.std() + 1e-6)

    up = lambda x: resample_track(np.asarray(x, np.float32), PARAM_FPS, FEATURE_FPS)
    artic, voicing, intonation, energy = up(artic), up(voicing), up(intonation), up(energy)
    ta = artic.shape[0]
    seconds = np.arange(ta, dtype=np.float32) / FEATURE_FPS

    pitch = 0.8 * z[3] + intonation
    drive = np.concatenate([artic, voicing[:, None], pitch[:, None]], axis=1)
    audio = np.tanh(drive @ c["audio_mix"].T + c["audio_bias"])
    audio = audio + rng.normal(0, cfg.audio_noise, audio.shape)

    mouth = (1.0 + 0.35 * z[0]) * artic @ c["mouth_mix"].T
    slow = np.stack([energy, intonation], axis=1)
    eyebrow = 0.15 * (1.0 + 0.5 * z[1]) * slow @ c["eyebrow_mix"].T
    phase = rng.uniform(0, 2 * np.pi)
    sway = np.sin(2 * np.pi * (0.2 + 0.1 * z[3]) * seconds + phase)
    head = (slow @ c["head_mix"].T * 0.5 + 0.7 * sway[:, None] * c["head_sway"])
    pose = (1.0 + 0.5 * z[2]) * head * _POSE_SCALE
    return dict(audio=audio.astype(np.float32), mouth=mouth.astype(np.float32),
                eyebrow=eyebrow.astype(np.float32), pose=pose.astype(np.float32),
                shape=self.shape_vector(speaker),
                reference_frame=self.reference_frame(speaker, clip),
                identity=np.int32(speaker), clip=f"synthetic_{speaker}_{clip}")


_WINDOWED = ("audio", "mouth", "eyebrow", "pose")
_PER_CLIP = ("shape", "reference_frame", "identity")


def window(example: dict[str, Any], start: int, length: int) -> dict[str, np.ndarray]:
  """One training example: the time tracks cut to [start, start + length), per-clip fields kept."""
  out = {k: example[k][start:start + length] for k in _WINDOWED}
  out.update({k: np.asarray(example[k]) for k in _PER_CLIP})
  return out


def stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class SeededBatchIterator(Iterator[dict]):
  """Endless batches where batch k is a pure function of (seed, shard_index, k), so the state is
  just k (saved with checkpoints, like grain's iterator state). Subclasses give `_batch(rng)`;
  `salt` separates the random streams of different sources."""

  what = "synthetic"
  salt = 0

  def __init__(self, *, batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1):
    if batch_size < 1 or not 0 <= shard_index < shard_count:
      raise ValueError(f"{self.what}: bad batch_size {batch_size} or shard "
                       f"{shard_index}/{shard_count}")
    self.batch_size, self.seed, self.shard_index = batch_size, seed, shard_index
    self._index = 0

  def _batch(self, rng: np.random.Generator) -> dict:
    raise NotImplementedError

  def __next__(self) -> dict:
    rng = np.random.default_rng([self.seed, self.shard_index, self._index, self.salt])
    self._index += 1
    return self._batch(rng)

  def get_state(self) -> dict[str, int]:
    return {"index": self._index}

  def set_state(self, state: dict[str, int]) -> None:
    if not isinstance(state, dict) or "index" not in state:
      raise ValueError(f"{self.what} iterator: state must be {{'index': int}}, got {state!r}")
    self._index = int(state["index"])


class WindowIterator(SeededBatchIterator):
  """Endless random windows. Batches are this process's rows: dict(audio (B, W, 15), mouth
  (B, W, 28), eyebrow (B, W, 5), pose (B, W, 5), shape (B, 60), reference_frame (B, R, R, 3),
  identity (B,)), as `pipelines.stage1_dataset` gives them."""

  salt = 5

  def __init__(self, source: SyntheticStage1Source, *, window: int, batch_size: int, seed: int,
               shard_index: int = 0, shard_count: int = 1):
    if window < 1 or window > source.clip_frames:
      raise ValueError(f"synthetic: window {window} must be in [1, {source.clip_frames}] "
                       f"(clip length at 100 fps)")
    super().__init__(batch_size=batch_size, seed=seed, shard_index=shard_index,
                     shard_count=shard_count)
    self.source, self.window = source, window

  def _batch(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    clips = rng.integers(len(self.source), size=self.batch_size)
    starts = rng.integers(self.source.clip_frames - self.window + 1, size=self.batch_size)
    return stack([window(self.source[int(i)], int(s), self.window) for i, s in zip(clips, starts)])


def eval_windows(source, window_length: int, max_windows: int | None = None) -> list[dict]:
  """Non-overlapping windows of every clip in order (deterministic), each a single example.

  Works on any source whose items have the fields of `SyntheticStage1Source` (100 fps tracks,
  e.g. `hdtf_jax.train.stage1.TfdsClips`). Clips shorter than `window_length` are skipped.
  """
  out = []
  for i in range(len(source)):
    example = source[i]
    for start in range(0, example["audio"].shape[0] - window_length + 1, window_length):
      out.append(window(example, start, window_length))
      if max_windows is not None and len(out) >= max_windows:
        return out
  return out
