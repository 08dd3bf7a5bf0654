"""hdtf_jax.data.clips (one clip) and hdtf_jax.data.build (the driver) on generated mp4s.

The raw videos are a real face (skimage's astronaut) drifting over a static background, with
real speech (tests/data/speech_16k.wav), made by data_builders/hdtf/make_dummy_data.py.
Independent references: the face tracked directly on the raw frames (no crop) for the
coordinate mapping, `hdtf_jax.face.morphable.project` for the 3DMM re-projection.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_builders.hdtf.make_dummy_data import write_face_video
from hdtf_jax import audio as audio_lib
from hdtf_jax import media
from hdtf_jax.data import build, clips
from hdtf_jax.data.hdtf_lists import ClipEntry
from hdtf_jax.face import morphable

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO / "tests" / "data" / "speech_16k.wav"
H, W, FPS = 180, 240, 30           # raw video: 30 fps, so the clip is resampled to 25
CROP = (58, 110, 22, 110)          # x w y h around the face (its mesh spans ~55 px)
CONFIG = clips.ClipConfig(frame_size=96, reference_size=64, jpeg_quality=90)


def entry(name="Face1_0", video="Face1", start=0.2, end=1.2, resolution=H, crop=CROP, ratio=None):
  return ClipEntry(name=name, video=video, split="WRA", identity=video.rstrip("0123456789"),
                   clip_index=int(name.rsplit("_", 1)[1]), start_s=start, end_s=end,
                   url="https://example.org/v", resolution=resolution, crop_xwyh=crop,
                   crop_ratio=ratio)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("raw")
  speech = audio_lib.load_audio(SPEECH, 16000)
  kw = dict(height=H, width=W, fps=FPS, seconds=1.5, face_px=150, centre=(0.5, 0.45))
  write_face_video(d / "Face1.mp4", audio=speech[:24000], **kw)
  write_face_video(d / "Silent1.mp4", **kw)
  import skimage.data
  import cv2
  coffee = cv2.resize(skimage.data.coffee(), (W, H), interpolation=cv2.INTER_AREA)
  media.write_video(d / "Scenery1.mp4", np.stack([coffee] * 20), 25, audio=speech[:13000])
  (d / "Broken1.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
  return d


@pytest.fixture(scope="module")
def tools():
  return clips.ClipTools(CONFIG)


@pytest.fixture(scope="module")
def by_crop_wh(raw_dir, tools):
  return clips.process_clip(entry(), raw_dir, CONFIG, tools)


@pytest.fixture(scope="module")
def by_landmarks(raw_dir, tools):
  # Listed at 720 but the file is 180 high: the listed box does not apply, crop by landmarks.
  return clips.process_clip(entry(resolution=720, ratio=1.4), raw_dir, CONFIG, tools)


def test_shapes_dtypes_and_alignment(by_crop_wh):
  ex = by_crop_wh
  t = audio_lib.num_frames(1.0, 25)  # 1 s at 25 fps, from a 30 fps source
  assert t == 25
  s = CONFIG.frame_size
  assert ex["audio_features"].shape == (4 * t, 15) and ex["audio_features"].dtype == np.float32
  assert ex["waveform"].shape == (t * 16000 // 25,) and ex["waveform"].dtype == np.int16
  assert ex["landmarks"].shape == (t, 468, 3) and ex["landmarks"].dtype == np.float32
  assert ex["face_found"].shape == (t,) and ex["face_found"].all()
  assert ex["shape"].shape == (60,) and ex["scale"].shape == ()
  for key, d in (("mouth", 28), ("eyebrow", 5), ("pose", 5)):
    assert ex[key].shape == (t, d) and ex[key].dtype == np.float32
  assert ex["fit_residual"].shape == (t,)
  assert len(ex["frames"]) == t and "reference_frames" not in ex
  assert clips.decode_jpeg(ex["frames"][0]).shape == (s, s, 3)
  assert ex["crop_method"] == "crop_wh" and tuple(ex["crop_box"]) == CROP
  assert ex["source_resolution"] == H and ex["fps"] == 25.0
  # Normalised coordinates: the face sits inside the crop.
  xy = ex["landmarks"][..., :2]
  assert 0.05 < xy.min() and xy.max() < 0.95
  # The waveform is the clip's range of the speech file (0.2 .. 1.2 s), as 16-bit PCM.
  speech = audio_lib.load_audio(SPEECH, 16000)[3200:19200]
  np.testing.assert_allclose(ex["waveform"] / 32767.0, speech, atol=0.02)


def reprojection_rmse_px(ex: dict, size: int) -> np.ndarray:
  """Per frame: RMSE in pixels of a `size` crop between the stored landmarks and the default
  model rendered with the stored (normalised) parameters."""
  model = morphable.default_model()
  verts = morphable.vertices(model, ex["shape"], ex["mouth"], ex["eyebrow"])
  pose = ex["pose"].copy()
  pose[:, 3:5] = clips.to_pixels(pose[:, 3:5], size)
  pred = np.asarray(morphable.project(verts, pose, ex["scale"] * size))
  obs = clips.to_pixels(ex["landmarks"], size)[..., :2]
  return np.sqrt(np.mean(np.sum((pred - obs) ** 2, -1), -1))


def test_fit_reprojects_detected_landmarks(by_crop_wh):
  ex = by_crop_wh
  size = 256  # report the error in pixels of a 256 crop
  rmse = reprojection_rmse_px(ex, size)
  assert rmse.mean() < 1.5, rmse
  np.testing.assert_allclose(rmse, ex["fit_residual"] * size, rtol=1e-3, atol=1e-3)


def _to_source(ex, size=CONFIG.frame_size):
  """Normalised crop landmarks -> source pixels (crop box (x, w, y, h), square)."""
  x, w, y, h = ex["crop_box"]
  u = ex["landmarks"][..., :2]
  return np.stack([x + u[..., 0] * w - 0.5, y + u[..., 1] * h - 0.5], -1)


def test_crop_by_crop_wh_vs_by_landmarks(raw_dir, by_crop_wh, by_landmarks):
  from hdtf_jax.face.landmarks import FaceLandmarker, track_video
  ex = by_landmarks
  assert ex["crop_method"] == "landmarks"
  x, w, y, h = (int(v) for v in ex["crop_box"])
  assert w == h and 0 <= x and x + w <= W and 0 <= y and y + h <= H
  # Independent reference: track the raw (uncropped) frames at 25 fps.
  frames, _ = media.read_video(raw_dir / "Face1.mp4", fps=25, start_s=0.2, end_s=1.2)
  ref = track_video(frames[:25], FaceLandmarker(detector="full_range", min_detection_score=0.7))
  pts = ref.points[ref.found][..., :2]
  lo, hi = pts.min((0, 1)), pts.max((0, 1))
  side = (hi - lo).max() * 1.4
  assert abs(w - side) < 0.1 * side  # the union box, enlarged by the ratio
  centre = np.array([x + w / 2 - 0.5, y + h / 2 - 0.5])
  np.testing.assert_allclose(centre, (lo + hi) / 2, atol=0.06 * side)
  # Both crops, mapped back to source pixels, land on the face tracked in the raw frames.
  face = (hi - lo).max()
  for crop_ex in (by_crop_wh, by_landmarks):
    err = np.linalg.norm(_to_source(crop_ex) - ref.points[..., :2], axis=-1).mean()
    assert err < 0.04 * face, err


@pytest.mark.parametrize("video, kwargs, reason", [
    ("Broken1", {}, "corrupt_video"),
    ("Silent1", {}, "no_audio"),
    ("Face1", {"start": 1.0, "end": 4.0}, "range_past_end"),
    ("Face1", {"start": 2.0, "end": 2.5}, "range_past_end"),
    ("Scenery1", {"crop": None}, "no_face"),
    ("Scenery1", {}, "no_face"),
    ("Absent1", {}, "missing_video"),
    ("../Face1", {}, "unsafe_name"),
])
def test_skip_reasons(raw_dir, tools, video, kwargs, reason):
  e = entry(name=f"{video}_0", video=video, **kwargs)
  with pytest.raises(clips.ClipSkipped) as info:
    clips.process_clip(e, raw_dir, CONFIG, tools)
  assert info.value.reason == reason


def test_square_box_and_fit_box():
  assert clips.square_box(10, 20, 50, 40, 1.5, 200, 100) == (0, 60, 0, 60)
  assert clips.square_box(90, 40, 110, 60, 2.0, 200, 100) == (80, 40, 30, 40)
  assert clips.square_box(0, 0, 300, 80, 1.2, 200, 100) == (100, 100, 0, 100)  # capped
  assert clips.fit_box((180, 50, -5, 40), 200, 100) == (150, 50, 0, 40)


def test_coordinates_round_trip():
  px = np.array([[-0.5, -0.5, 3.0], [95.5, 47.25, -2.0]], np.float32)
  u = clips.to_normalised(px, 96)
  np.testing.assert_allclose(u[0], [0, 0, 3 / 96], atol=1e-7)
  np.testing.assert_allclose(u[1, :2], [1.0, 47.75 / 96], atol=1e-7)
  np.testing.assert_allclose(clips.to_pixels(u, 96), px, atol=1e-5)


def test_fit_length_ladder():
  assert [clips.fit_length(t, 128) for t in (1, 128, 129, 600, 1500)] == [128, 128, 256, 768,
                                                                          1792]


def test_cache_round_trip(tmp_path, by_crop_wh):
  path = clips.save_clip(tmp_path / "c.npz", by_crop_wh, "sig1")
  back = clips.load_clip(path, "sig1")
  assert back.keys() == by_crop_wh.keys()
  assert back["frames"] == by_crop_wh["frames"] and back["clip"] == "Face1_0"
  np.testing.assert_array_equal(back["landmarks"], by_crop_wh["landmarks"])
  with pytest.raises(ValueError, match="other settings"):
    clips.load_clip(path, "sig2")
  (tmp_path / "bad.npz").write_bytes(b"junk")
  with pytest.raises(ValueError, match="unreadable"):
    clips.load_clip(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------- the driver


def _entries():
  # Face1_1 ends 0.3 s after the 1.5 s video: within end_tolerance_s, so clamped.
  return [entry("Face1_0", end=0.6), entry("Face1_1", start=1.0, end=1.8),
          entry("Silent1_0", "Silent1"), entry("Broken1_0", "Broken1")]


def test_build_report_and_resume(tmp_path, raw_dir):
  cache = tmp_path / "cache"
  result = build.build_clips(raw_dir, cache, CONFIG, _entries(), num_workers=0, progress=False)
  status = {o.clip: (o.status, o.reason) for o in result.outcomes}
  assert status == {"Face1_0": ("built", None), "Face1_1": ("built", None),
                    "Silent1_0": ("skipped", "no_audio"), "Broken1_0": ("skipped", "corrupt_video")}
  json_path, md_path = build.write_report(result, tmp_path / "out",
                                          {"train": ["Face1_0", "Silent1_0"], "test": ["Face1_1"]})
  report = json.loads(json_path.read_text())
  s = report["summary"]
  assert (s["clips_ok"], s["clips_skipped"], s["frames"]) == (2, 2, 10 + 13)
  assert s["skipped_by_reason"] == {"corrupt_video": 1, "no_audio": 1}
  assert s["hours"] == pytest.approx(23 / 25 / 3600)
  assert report["splits"] == {"train": {"listed": 2, "built": 1}, "test": {"listed": 1, "built": 1}}
  assert "no_audio" in md_path.read_text()
  clamped = clips.load_clip(cache / "Face1_1.npz")
  assert clamped["end_s"] == pytest.approx(1.5, abs=0.05)
  assert clamped["landmarks"].shape[0] == 13 and clamped["audio_features"].shape[0] == 52
  stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npz")}
  again = build.build_clips(raw_dir, cache, CONFIG, _entries(), num_workers=0, progress=False)
  assert [o.status for o in again.outcomes] == ["cached", "cached", "skipped", "skipped"]
  assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npz")} == stamps
  # A corrected annotation (another range) is not taken from the cache.
  moved = [entry("Face1_0", start=0.1, end=0.6)]
  redo = build.build_clips(raw_dir, cache, CONFIG, moved, num_workers=0, progress=False)
  assert redo.outcomes[0].status == "built" and redo.outcomes[0].frames == 13
  # Other settings (params mode: reference frames only): nothing is reused.
  params = clips.ClipConfig(store_frames=False, reference_size=64, reference_frames=3)
  other = build.build_clips(raw_dir, cache, params, _entries()[:1], num_workers=0,
                            progress=False)
  assert other.outcomes[0].status == "built"
  ex = clips.load_clip(cache / "Face1_0.npz", build.clip_signature(params, _entries()[0]))
  assert "frames" not in ex and len(ex["reference_frames"]) == 3
  assert clips.decode_jpeg(ex["reference_frames"][2]).shape == (64, 64, 3)


_KILL_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from hdtf_jax.data import build, clips
from tests.test_clips import CONFIG, _entries
build.build_clips(Path({raw!r}), Path({cache!r}), CONFIG, _entries(), num_workers=0,
                  progress=False)
"""


def test_killed_build_resumes_without_redoing_finished_clips(tmp_path, raw_dir, by_crop_wh):
  cache = tmp_path / "cache"
  script = _KILL_SCRIPT.format(repo=str(REPO), raw=str(raw_dir), cache=str(cache))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = cache / "Face1_0.npz"
  deadline = time.monotonic() + 120
  while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # dies while the second clip is in progress
  proc.wait()
  assert first.exists()
  assert not (cache / "Face1_1.npz").exists()
  stamp = first.stat().st_mtime_ns
  result = build.build_clips(raw_dir, cache, CONFIG, _entries(), num_workers=0, progress=False)
  assert [o.status for o in result.outcomes][:2] == ["cached", "built"]
  assert first.stat().st_mtime_ns == stamp
  assert not list(cache.glob(".*.part"))


def test_parallel_workers_match_in_process(tmp_path, raw_dir, by_crop_wh):
  entries = [entry(), entry("Silent1_0", "Silent1")]  # one clip per worker process
  par = build.build_clips(raw_dir, tmp_path / "b", CONFIG, entries, num_workers=2,
                          progress=False)
  assert [(o.status, o.reason) for o in par.outcomes] == [("built", None),
                                                          ("skipped", "no_audio")]
  b = clips.load_clip(tmp_path / "b" / "Face1_0.npz")
  np.testing.assert_allclose(b["landmarks"], by_crop_wh["landmarks"], atol=1e-5)
  np.testing.assert_allclose(b["mouth"], by_crop_wh["mouth"], atol=1e-3)
  assert b["frames"] == by_crop_wh["frames"]


def _full_rate_box(path, start, end, ratio):
  """Reference for `clips.landmark_box`: the union of the mesh boxes over EVERY frame of the
  range at full size (no subsampling, no skipped frames, no margin), squared and enlarged."""
  from hdtf_jax.face.landmarks import FaceLandmarker, track_video
  info = media.probe_video(path, exact_frame_count=False)
  track = track_video(media.iter_video_frames(path, start_s=start, end_s=end),
                      FaceLandmarker(detector="full_range", min_detection_score=0.7),
                      smoothing=None)
  b = track.boxes[track.found]
  return info, clips.square_box(b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max(),
                                ratio, info["width"], info["height"])


def test_landmark_box_from_a_subsample_matches_the_full_rate_box(raw_dir):
  """The box pass (box_fps, reference frames only, scaled to box_height rows, box_margin) finds
  the every-frame full-size box within a few pixels: on the 'carphone' sequence (a man talking
  in a moving car, 176x144, 29.97 fps), on the demo source's 480x270 AstroNaut0 (scaled to
  135 rows here, to use the downscaled path) and on the test's 180-row Face1 (scaled to 90)."""
  carphone = media.sample_talking_head_path()
  demo = REPO / "data_builders" / "hdtf" / "dummy_data" / "AstroNaut0.mp4"
  for path, end, box_height in ((carphone, 4.0, 540), (demo, 2.0, 135),
                                (raw_dir / "Face1.mp4", 1.5, 90)):
    info, ref = _full_rate_box(path, 0.0, end, 1.2)
    config = clips.ClipConfig(frame_size=96, box_height=box_height)
    box = clips.landmark_box(path, 0.0, end, info, 1.2, config, clips.ClipTools(config))
    side = ref[1]
    assert box[1] == box[3] and abs(box[1] - side) <= max(2, 0.03 * side), (path.name, box, ref)
    np.testing.assert_allclose(np.array(box)[[0, 2]], np.array(ref)[[0, 2]],
                               atol=max(2, 0.02 * side), err_msg=path.name)


def test_probe_is_kept_per_file_until_it_changes(raw_dir, monkeypatch):
  calls = []
  real = media.probe_video
  monkeypatch.setattr(media, "probe_video", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
  clips.clear_probe_cache()
  path = raw_dir / "Face1.mp4"
  first, _, _ = clips.probe(path, entry(), CONFIG)
  first["width"] = -1  # callers get copies: editing one does not change the kept probe
  again, _, end = clips.probe(path, entry(name="Face1_1", start=0.5, end=1.4), CONFIG)
  assert len(calls) == 1 and again["width"] == W and end == pytest.approx(1.4)
  stat = path.stat()
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a replaced file
  clips.probe(path, entry(), CONFIG)
  assert len(calls) == 2
  clips.clear_probe_cache()
