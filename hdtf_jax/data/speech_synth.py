"""Parametric voiced speech driven by mouth parameters: the demo source's sound track.

The point is a sound track whose content follows the visible mouth, so an audio-to-mouth model
(stage 1) has something real to learn. A classic source-filter synthesiser (Klatt-style):

* articulation: three numbers per video frame read off the morphable model's mouth
  coefficients (`articulation_from_mouth`): jaw (`jaw_open`), stretch (mean of
  `lip_stretch_left/right`) and rounding (`pucker` + half of `funnel`). `mouth_from_articulation`
  is the inverse used to animate a face, so the two stay consistent.
* source: a glottal pulse train at the speaker's pitch (declining over each phrase, with accents),
  cycle-to-cycle jitter (period) and shimmer (amplitude), low-passed to a -12 dB/octave glottal
  flow and differentiated (lip radiation, +6 dB/octave), plus breath noise.
* filter: four cascaded two-pole resonators (Klatt's unit-DC-gain form) whose formants follow
  the lips: F1 rises with jaw opening, F2 with lip stretch and falls with rounding, F3 likewise
  (`formants`); F4 fixed. Coefficients change every `block_ms` (filter state carried over).
* loudness: the output is gain-corrected per 10 ms so its RMS follows `loudness_envelope`, a
  linear ramp of jaw opening above `Voice.closed_threshold`: silent where the mouth is closed.

`speech_articulation` plans what a speaker says: phrases of consonant-vowel syllables (vowels
a/e/i/o/u as jaw-stretch-rounding targets, consonant closures, bilabials pressing the lips) at a
speaking rate, separated by pauses, smoothed like real articulators.

Everything is NumPy/SciPy and deterministic given the seed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import signal
from scipy.ndimage import gaussian_filter1d

from hdtf_jax.face.morphable import MOUTH_NAMES

# Vowel targets: (jaw, stretch, rounding), each in [0, 1].
VOWELS = {"a": (0.95, 0.25, 0.0), "e": (0.6, 0.7, 0.0), "i": (0.35, 1.0, 0.0),
          "o": (0.65, 0.0, 0.75), "u": (0.35, 0.0, 1.0)}
# Consonants: (jaw during the closure, lips pressed together?). Bilabials press the lips.
CONSONANTS = {"b": (0.0, True), "m": (0.0, True), "p": (0.0, True), "d": (0.05, False),
              "t": (0.05, False), "n": (0.05, False), "l": (0.1, False), "k": (0.08, False),
              "s": (0.03, False), "r": (0.12, False)}
# Mouth coefficients each articulator drives (name -> gain), see `mouth_from_articulation`.
_JAW, _STRETCH, _ROUND = "jaw_open", ("lip_stretch_left", "lip_stretch_right"), "pucker"
_FUNNEL, _PRESS = "funnel", "lips_together"


@dataclasses.dataclass(frozen=True)
class Voice:
  """A speaker's voice. Frequencies in Hz; relative quantities are fractions."""
  f0_hz: float = 120.0           # pitch one second into a phrase (it falls as a phrase goes on)
  intonation: float = 0.12       # phrase accent / declination swing, fraction of f0
  jitter: float = 0.01           # cycle-to-cycle period perturbation (relative std)
  shimmer: float = 0.06          # cycle-to-cycle amplitude perturbation (relative std)
  breathiness: float = 0.04      # aspiration noise relative to the voiced source's RMS
  formant_scale: float = 1.0     # vocal-tract length factor (shorter tract > 1)
  closed_threshold: float = 0.08  # jaw opening (mouth coefficient) at or below which: silence
  full_open: float = 0.8         # jaw opening at full loudness
  loudness: float = 0.12         # RMS of the wave at full loudness (peaks ~3-4x higher)
  noise_floor: float = 3e-4      # RMS of the room noise under everything

  def __post_init__(self):
    if not 40 <= self.f0_hz <= 500:
      raise ValueError(f"Voice.f0_hz must be in [40, 500] Hz, got {self.f0_hz}")
    if not 0 <= self.closed_threshold < self.full_open:
      raise ValueError(f"Voice needs 0 <= closed_threshold < full_open, got "
                       f"{self.closed_threshold}, {self.full_open}")
    for name in ("intonation", "jitter", "shimmer", "breathiness", "noise_floor"):
      if getattr(self, name) < 0:
        raise ValueError(f"Voice.{name} must be >= 0, got {getattr(self, name)}")
    if self.formant_scale <= 0 or self.loudness <= 0:
      raise ValueError(f"Voice.formant_scale and loudness must be > 0, got "
                       f"{self.formant_scale}, {self.loudness}")


@dataclasses.dataclass(frozen=True)
class Speaking:
  """How a speaker talks: rate, phrasing and how wide they move their mouth."""
  syllables_per_s: float = 4.5
  phrase_syllables: tuple[int, int] = (3, 8)      # syllables per phrase, inclusive range
  pause_s: tuple[float, float] = (0.25, 0.6)      # silence between phrases
  jaw_gain: float = 0.8          # mouth coefficient `jaw_open` for a fully open vowel
  lip_gain: float = 0.6          # coefficient of stretch / rounding at full target
  smoothing_s: float = 0.03      # articulator inertia (Gaussian sigma)

  def __post_init__(self):
    lo, hi = self.phrase_syllables
    if self.syllables_per_s <= 0 or not 1 <= lo <= hi:
      raise ValueError(f"Speaking needs syllables_per_s > 0 and 1 <= phrase_syllables[0] <= "
                       f"[1], got {self.syllables_per_s}, {self.phrase_syllables}")
    if not 0 <= self.pause_s[0] <= self.pause_s[1] or self.jaw_gain <= 0 or self.lip_gain < 0:
      raise ValueError(f"Speaking: bad pause_s {self.pause_s} or gains {self.jaw_gain}, "
                       f"{self.lip_gain}")


# ----------------------------------------------------------------------------- articulation


def speech_articulation(num_frames: int, fps: float, speaking: Speaking = Speaking(),
                        seed: int | Sequence[int] = 0) -> tuple[dict[str, np.ndarray], str]:
  """Plans `num_frames` video frames of talking: articulator tracks and the syllables said.

  Returns ({"jaw", "stretch", "round", "press"} -> (T,) float32 in [0, 1], text) where text
  spells the syllables with phrases separated by " | ". The clip starts and ends in a pause.
  """
  if num_frames < 1 or fps <= 0:
    raise ValueError(f"speech_articulation: need num_frames >= 1 and fps > 0, got "
                     f"{num_frames}, {fps}")
  rng = np.random.default_rng(seed)
  rate = 200.0  # plan on a fine grid, then sample the video frames
  n = int(math.ceil(num_frames / fps * rate)) + 1
  jaw, stretch, rnd, press = (np.zeros(n) for _ in range(4))
  words, t = [], rng.uniform(*speaking.pause_s) * rate * 0.5
  vowels, consonants = list(VOWELS), list(CONSONANTS)
  while True:
    count = int(rng.integers(speaking.phrase_syllables[0], speaking.phrase_syllables[1] + 1))
    phrase = []
    for _ in range(count):
      dur = rate / speaking.syllables_per_s * rng.uniform(0.75, 1.3)
      if t + dur >= n - 1:
        break
      c, v = consonants[rng.integers(len(consonants))], vowels[rng.integers(len(vowels))]
      closure_jaw, bilabial = CONSONANTS[c]
      stress = rng.uniform(0.75, 1.0)
      a, b, e = int(t), int(t + 0.3 * dur), int(t + dur)  # closure, then the vowel
      jaw[a:b] = closure_jaw
      press[a:b] = 1.0 if bilabial else 0.0
      vj, vs, vr = VOWELS[v]
      jaw[b:e], stretch[b:e], rnd[b:e] = vj * stress, vs, vr
      phrase.append(c + v)
      t += dur
    if phrase:
      words.append("-".join(phrase))
    t += rng.uniform(*speaking.pause_s) * rate
    if t >= n - 1 or not phrase:
      break
  sigma = speaking.smoothing_s * rate
  tracks = {k: gaussian_filter1d(v, sigma, mode="nearest")
            for k, v in (("jaw", jaw), ("stretch", stretch), ("round", rnd), ("press", press))}
  at = np.arange(num_frames) / fps * rate
  grid = np.arange(n)
  out = {k: np.clip(np.interp(at, grid, v), 0.0, 1.0).astype(np.float32) for k, v in tracks.items()}
  return out, " | ".join(words)


def mouth_from_articulation(articulation: dict, speaking: Speaking = Speaking(),
                            mouth_names: Sequence[str] = MOUTH_NAMES) -> np.ndarray:
  """Articulator tracks (T,) -> mouth coefficients (T, M) (added to a face's rest expression)."""
  names = list(mouth_names)
  _require(names, [_JAW, *_STRETCH, _ROUND, _FUNNEL, _PRESS])
  jaw = np.asarray(articulation["jaw"], np.float32)
  out = np.zeros((jaw.shape[0], len(names)), np.float32)
  out[:, names.index(_JAW)] = speaking.jaw_gain * jaw
  for k in _STRETCH:
    out[:, names.index(k)] = speaking.lip_gain * np.asarray(articulation["stretch"])
  out[:, names.index(_ROUND)] = speaking.lip_gain * np.asarray(articulation["round"])
  out[:, names.index(_FUNNEL)] = 0.5 * speaking.lip_gain * np.asarray(articulation["round"])
  out[:, names.index(_PRESS)] = 0.5 * np.asarray(articulation.get("press", 0.0 * jaw))
  return out


def articulation_from_mouth(mouth, mouth_names: Sequence[str] = MOUTH_NAMES
                            ) -> dict[str, np.ndarray]:
  """Mouth coefficients (T, M) -> {"jaw", "stretch", "round"} (T,), in coefficient units."""
  mouth = np.asarray(mouth, np.float32)
  names = list(mouth_names)
  if mouth.ndim != 2 or mouth.shape[1] != len(names):
    raise ValueError(f"mouth must be (T, {len(names)}), got {mouth.shape}")
  _require(names, [_JAW, *_STRETCH, _ROUND, _FUNNEL])
  col = lambda k: mouth[:, names.index(k)]
  return {"jaw": col(_JAW), "stretch": 0.5 * (col(_STRETCH[0]) + col(_STRETCH[1])),
          "round": col(_ROUND) + 0.5 * col(_FUNNEL)}


def _require(names: list[str], wanted: list[str]) -> None:
  missing = [k for k in wanted if k not in names]
  if missing:
    raise ValueError(f"mouth coefficients lack {missing} (have {names})")


# ----------------------------------------------------------------------------- synthesis


def loudness_envelope(jaw, voice: Voice = Voice()) -> np.ndarray:
  """Target RMS (in units of `voice.loudness`) for a jaw-opening track: 0 at or below
  `closed_threshold`, rising linearly to 1 at `full_open`."""
  jaw = np.asarray(jaw, np.float64)
  return np.clip((jaw - voice.closed_threshold) / (voice.full_open - voice.closed_threshold),
                 0.0, 1.0)


def formants(jaw, stretch, rounding, voice: Voice = Voice()) -> np.ndarray:
  """Formant frequencies (..., 4) in Hz for articulators in coefficient units (jaw ~0..1)."""
  jaw, stretch, rounding = (np.clip(np.asarray(v, np.float64), 0.0, 1.5)
                            for v in (jaw, stretch, rounding))
  f1 = 280.0 + 560.0 * jaw - 40.0 * rounding
  f2 = 1400.0 + 700.0 * stretch - 700.0 * rounding
  f3 = 2450.0 + 250.0 * stretch - 300.0 * rounding
  f4 = np.full_like(f1, 3500.0)
  return voice.formant_scale * np.stack([f1, f2, f3, f4], -1)


_BANDWIDTHS = np.array([80.0, 100.0, 150.0, 250.0])


def _pitch_track(envelope: np.ndarray, voice: Voice, sample_rate: int, rng) -> np.ndarray:
  """f0 per sample: a fall over each phrase (declination), slow random accents (~4 per s)."""
  n = envelope.shape[0]
  voiced = envelope > 0
  # Seconds since the current phrase started (a pause resets it).
  starts = np.flatnonzero(voiced & ~np.concatenate([[False], voiced[:-1]]))
  last = np.zeros(n, np.int64)
  last[starts] = starts
  since = (np.arange(n) - np.maximum.accumulate(last)) / sample_rate
  knots_per_s = 4.0
  knots = gaussian_filter1d(rng.normal(0.0, 1.0, int(n / sample_rate * knots_per_s) + 3), 1.0)
  knots /= max(knots.std(), 1e-6)
  accents = np.interp(np.arange(n) / sample_rate * knots_per_s, np.arange(knots.size), knots)
  rel = voice.intonation * (0.5 * accents + 0.5 - 0.5 * since)
  return voice.f0_hz * np.exp(np.clip(rel, -0.5, 0.5))


def _glottal_source(f0: np.ndarray, voice: Voice, sample_rate: int, rng) -> np.ndarray:
  """Pulse train with jitter and shimmer, shaped into a glottal-flow derivative."""
  n = f0.shape[0]
  pulses = np.zeros(n + 2)
  t = 0.0
  while t < n:
    i = int(t)
    amp = 1.0 + voice.shimmer * rng.normal()
    frac = t - i  # split each pulse over two samples: sub-sample timing keeps pitch smooth
    pulses[i] += amp * (1 - frac)
    pulses[i + 1] += amp * frac
    t += sample_rate / f0[i] * (1.0 + voice.jitter * rng.normal())
  r = math.exp(-math.pi * 100.0 / sample_rate)  # double pole at 0 Hz, 100 Hz bandwidth
  flow = signal.lfilter([1.0], np.convolve([1.0, -r], [1.0, -r]), pulses[:n])
  return np.diff(flow, prepend=0.0)


def _resonator_coefficients(freq: np.ndarray, bw: np.ndarray, sample_rate: int):
  """Klatt's resonator y = A x + B y1 + C y2 (unit gain at 0 Hz) as (b, a) rows."""
  r = np.exp(-np.pi * bw / sample_rate)
  c = -r * r
  b = 2.0 * r * np.cos(2.0 * np.pi * freq / sample_rate)
  a0 = 1.0 - b - c
  return a0, b, c


def _vocal_tract(source: np.ndarray, freqs: np.ndarray, sample_rate: int, block: int) -> np.ndarray:
  """Cascade of time-varying resonators; freqs (num_blocks, 4) Hz, one row per `block` samples."""
  out = source.copy()
  for k in range(freqs.shape[1]):
    a0, b, c = _resonator_coefficients(freqs[:, k], np.full(freqs.shape[0], _BANDWIDTHS[k]),
                                       sample_rate)
    zi = np.zeros(2)
    y = np.empty_like(out)
    for j in range(freqs.shape[0]):
      s = slice(j * block, (j + 1) * block)
      if s.start >= out.shape[0]:
        break
      y[s], zi = signal.lfilter([a0[j]], [1.0, -b[j], -c[j]], out[s], zi=zi)
    out = y
  return out


def frame_rms(wave, sample_rate: int, fps: float, num_frames: int | None = None) -> np.ndarray:
  """RMS of the wave over each frame interval [i / fps, (i + 1) / fps) (the project's timing
  convention); `num_frames` defaults to ceil(duration * fps). Frames past the end are 0."""
  wave = np.asarray(wave, np.float64)
  if num_frames is None:
    num_frames = math.ceil(round(wave.shape[0] / sample_rate * fps, 6))
  edges = np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(np.int64)
  edges = np.minimum(edges, wave.shape[0])
  csum = np.concatenate([[0.0], np.cumsum(wave * wave)])
  count = np.maximum(edges[1:] - edges[:-1], 1)
  return np.sqrt(np.maximum(csum[edges[1:]] - csum[edges[:-1]], 0.0) / count)


def synthesize(mouth, fps: float, voice: Voice = Voice(), *, sample_rate: int = 16000,
               seed: int | Sequence[int] = 0, mouth_names: Sequence[str] = MOUTH_NAMES,
               num_samples: int | None = None, block_ms: float = 5.0) -> np.ndarray:
  """Voiced speech for a mouth-coefficient track.

  Args:
    mouth: (T, M) mouth coefficients at `fps` (the articulation over the face's rest
      expression, e.g. `mouth_from_articulation`), frame i covering [i / fps, (i + 1) / fps).
    fps: frame rate of `mouth`.
    voice: the speaker's `Voice`.
    sample_rate: Hz of the output.
    seed: jitter, shimmer, breath and accents.
    mouth_names: names of the M coefficients (default: the paper's 28).
    num_samples: output length (default: T / fps seconds).
    block_ms: how often the formant filters are updated.
  Returns:
    float32 (num_samples,) mono wave in [-1, 1].
  """
  art = articulation_from_mouth(mouth, mouth_names)
  if fps <= 0 or sample_rate < 8000:
    raise ValueError(f"synthesize: need fps > 0 and sample_rate >= 8000, got {fps}, "
                     f"{sample_rate}")
  t_frames = art["jaw"].shape[0]
  n = int(round(t_frames / fps * sample_rate)) if num_samples is None else int(num_samples)
  if n < 1:
    raise ValueError(f"synthesize: nothing to synthesise ({t_frames} frames, {n} samples)")
  rng = np.random.default_rng(seed)
  # Articulators per sample: frame i's value sits at the frame centre (i + 0.5) / fps.
  at = (np.arange(n) + 0.5) / sample_rate * fps - 0.5
  per_sample = {k: np.interp(at, np.arange(t_frames), v) for k, v in art.items()}
  envelope = loudness_envelope(per_sample["jaw"], voice)

  f0 = _pitch_track(envelope, voice, sample_rate, rng)
  source = _glottal_source(f0, voice, sample_rate, rng)
  source /= max(np.sqrt(np.mean(source ** 2)), 1e-12)
  source += voice.breathiness * rng.normal(0.0, 1.0, n)

  block = max(1, int(round(block_ms * 1e-3 * sample_rate)))
  centres = np.minimum(np.arange(0, n, block) + block // 2, n - 1)
  freqs = formants(per_sample["jaw"][centres], per_sample["stretch"][centres],
                   per_sample["round"][centres], voice)
  np.minimum(freqs, 0.45 * sample_rate, out=freqs)
  wave = _vocal_tract(source, freqs, sample_rate, block)

  # Gain control: the RMS over each 10 ms follows the envelope exactly (smoothly interpolated).
  hop = max(1, sample_rate // 100)
  rms = frame_rms(wave, sample_rate, sample_rate / hop)
  padded = np.pad(envelope, (0, rms.shape[0] * hop - n), mode="edge")
  target = voice.loudness * padded.reshape(-1, hop).mean(1)
  gain = target / np.maximum(rms, 1e-9)
  gain_centres = (np.arange(rms.shape[0]) + 0.5) * hop
  wave = wave * np.interp(np.arange(n), gain_centres, gain) * (envelope > 0)
  wave += voice.noise_floor * rng.normal(0.0, 1.0, n)
  return np.clip(wave, -1.0, 1.0).astype(np.float32)
