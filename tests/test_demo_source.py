"""The demo source (a small HDTF-like manual_dir) and its speech synthesiser.

One tiny demo (2 speakers x 1 video, ~2-3 s) is generated once per module; a second run with
the same seed (through the command line) and a third with another seed check determinism.
References are independent where possible: librosa's pYIN and LPC for pitch and formants,
the FaceLandmarker for where the face is, NumPy loops for frame RMS.
"""
import hashlib
import math

import librosa
import numpy as np
import pytest

from hdtf_jax import audio, media
from hdtf_jax.data import demo_source, hdtf_lists, speech_synth
from hdtf_jax.face import morphable

SMALL = dict(speakers=2, videos_per_speaker=1, seconds=2.5, seed=0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo_seed0")
  summary = demo_source.make_demo_source(out, demo_source.DemoConfig(**SMALL))
  return out, summary, dict(np.load(out / "ground_truth.npz"))


def _hashes(folder):
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.iterdir()) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
  out, _, _ = demo
  again = tmp_path / "again"
  argv = ["--out", str(again), "--seed", "0", "--speakers", "2", "--clips-per-speaker", "1",
          "--seconds", "2.5"]
  demo_source.main(argv)
  assert _hashes(again) == _hashes(out)
  other = tmp_path / "other"
  demo_source.make_demo_source(other, demo_source.DemoConfig(**dict(SMALL, seed=1)))
  a, b = _hashes(out), _hashes(other)
  mp4s = [k for k in a if k.endswith(".mp4")]
  assert len(mp4s) == 2 and set(mp4s) <= set(b)
  assert all(a[k] != b[k] for k in mp4s) and a["ground_truth.npz"] != b["ground_truth.npz"]


def test_lists_parse_with_the_expected_quirks(demo):
  out, summary, gt = demo
  lists = hdtf_lists.read_lists(out)
  names = [v["name"] for v in summary["videos"]]
  assert names == ["DemoEileen0", "DemoCarl0"]
  ghost = summary["no_time_line"]
  assert set(lists.videos) == set(names) | {ghost} and not (out / f"{ghost}.mp4").exists()
  assert [(p.file, p.reason) for p in lists.problems] == [
      ("WDA_annotion_time.txt", "video has no time line")]
  expected = sum(len(v["ranges"]) for v in summary["videos"])
  assert len(lists.clips) == expected == 3 and list(gt["clips"]) == [c.name for c in lists.clips]
  assert {c.identity for c in lists.clips} == {"DemoEileen", "DemoCarl"}
  parts = hdtf_lists.split_clips(lists.clips)
  assert len(parts["train"]) + len(parts["test"]) == 3 and parts["test"]
  # The quirks are really in the bytes.
  raw = {p.name: p.read_bytes() for p in out.glob("*.txt")}
  assert raw["WDA_video_url.txt"].startswith(b"\xef\xbb\xbf")
  assert sum(b" \n" in v for v in raw.values()) >= 2
  assert any(v and not v.endswith(b"\n") for v in raw.values())
  # Crop rows: all but the first clip of the last video; the second video is listed at 2x.
  by_name = {c.name: c for c in lists.clips}
  assert by_name["DemoCarl0_0"].crop_xwyh is None and by_name["DemoCarl0_0"].crop_ratio > 1
  assert lists.videos["DemoEileen0"].resolution == 360
  assert lists.videos["DemoCarl0"].resolution == 720
  for c in lists.clips:
    box = gt[f"{c.name}/crop_xwyh"]
    if c.crop_xwyh is not None:
      np.testing.assert_allclose(c.crop_xwyh, box * c.resolution / 360, atol=1)
    # The square box holds the face in every frame of the clip, with margin.
    first, end = gt[f"{c.name}/frames"]
    assert end - first == pytest.approx(c.duration_s * 30, abs=1)
    faces = gt[f"{c.video}/face_box"][first:end]
    x, w, y, h = box
    assert w == h and x >= 0 and y >= 0 and x + w <= 640 and y + h <= 360
    assert faces[:, 0].min() > x and faces[:, 2].max() < x + w
    assert faces[:, 1].min() > y and faces[:, 3].max() < y + h


def test_videos_decode_with_sound_of_the_right_length(demo):
  out, summary, gt = demo
  for v in summary["videos"]:
    info = media.probe_video(out / f"{v['name']}.mp4")
    t = int(gt[f"{v['name']}/num_frames"])
    assert (info["width"], info["height"], info["num_frames"]) == (640, 360, t)
    assert info["fps"] == pytest.approx(30.0) and info["has_audio"]
    wave = audio.load_audio(out / f"{v['name']}.mp4", 16000)
    assert wave.size / 16000 == pytest.approx(t / 30.0, abs=0.05)
    # Whole seconds of annotation fit inside the video (no range past the end).
    assert max(b for _, b in v["ranges"]) <= t / 30.0


def _mesh_points(gt, video, t):
  model = morphable.default_model()
  verts = morphable.vertices(model, gt[f"{video}/shape"], gt[f"{video}/mouth"][t],
                             gt[f"{video}/eyebrow"][t])
  return np.asarray(morphable.project(verts, gt[f"{video}/pose"][t], gt[f"{video}/scale"]))


def test_face_detected_where_the_ground_truth_puts_it(demo):
  from hdtf_jax.face.landmarks import FaceLandmarker
  out, _, gt = demo
  landmarker = FaceLandmarker()
  for clip in gt["clips"]:
    video = str(gt[f"{clip}/video"])
    first, end = gt[f"{clip}/frames"]
    t = int((first + end) // 2)
    frames, _ = media.read_video(out / f"{video}.mp4", start_s=t / 30.0, end_s=(t + 1) / 30.0)
    x, w, y, h = gt[f"{clip}/crop_xwyh"]
    found = landmarker.detect_landmarks(np.ascontiguousarray(frames[0, y:y + h, x:x + w]))
    assert found is not None, clip
    detected = found.points[:, :2] + [x, y]
    truth = _mesh_points(gt, video, t)  # the model shares the detector's 468-point topology
    face_width = np.ptp(truth[:, 0])
    err = np.linalg.norm(detected - truth, axis=1).mean() / face_width
    assert err < 0.05, (clip, err)


def test_mouth_moves_background_stays(demo):
  out, summary, gt = demo
  for v in summary["videos"]:
    name = v["name"]
    frames, _ = media.read_video(out / f"{name}.mp4")
    frames = frames.astype(np.float32)
    std = frames.std(0).mean(-1)  # per-pixel std over time
    ring = morphable.default_model().regions["lips"]
    lips = np.stack([_mesh_points(gt, name, t)[ring] for t in range(0, len(frames), 10)])
    (x0, y0), (x1, y1) = (lips.reshape(-1, 2).min(0).astype(int),
                          lips.reshape(-1, 2).max(0).astype(int))
    moving = std[y0:y1, x0:x1].mean()
    # Outside the animated portrait (face, hair, torso and their surroundings): static.
    px, py = gt[f"{name}/patch_origin"]
    outside = np.ones(std.shape, bool)
    outside[py:, px:px + 256] = False
    assert std[outside].mean() < 0.8 and np.percentile(std[outside], 99) < 3, name
    assert moving > 6 and moving > 10 * std[outside].mean(), (name, moving)


def test_audio_loudness_follows_the_jaw(demo):
  out, summary, gt = demo
  for v in summary["videos"]:
    name = v["name"]
    wave = audio.load_audio(out / f"{name}.mp4", 16000)
    jaw = gt[f"{name}/articulation"][:, 0]
    rms = speech_synth.frame_rms(wave, 16000, 30.0, jaw.shape[0])
    r = np.corrcoef(rms, jaw)[0, 1]
    assert r > 0.7, (name, r)
    closed, open_ = rms[jaw < 0.02], rms[jaw > 0.5]
    assert closed.size and open_.size and closed.mean() < 0.1 * open_.mean()


# ----------------------------------------------------------------------------- speech_synth


def _vowel(jaw=0.6, stretch=0.0, rnd=0.0, seconds=1.0, **voice):
  mouth = np.zeros((int(30 * seconds), len(morphable.MOUTH_NAMES)), np.float32)
  names = list(morphable.MOUTH_NAMES)
  mouth[:, names.index("jaw_open")] = jaw
  mouth[:, names.index("lip_stretch_left")] = mouth[:, names.index("lip_stretch_right")] = stretch
  mouth[:, names.index("pucker")] = rnd
  v = speech_synth.Voice(**dict(dict(jitter=0.0, shimmer=0.0, breathiness=0.0), **voice))
  return speech_synth.synthesize(mouth, 30.0, v, seed=0), v


def _lpc_formants(wave, sr=16000, order=16):
  seg = wave[len(wave) // 4: 3 * len(wave) // 4].astype(np.float64)
  roots = np.roots(librosa.lpc(seg * np.hanning(seg.size), order=order))
  roots = roots[np.imag(roots) > 0]
  freq = np.angle(roots) * sr / (2 * np.pi)
  bw = -np.log(np.abs(roots)) * sr / np.pi
  return np.sort(freq[(freq > 150) & (bw < 500)])


def test_synth_pitch_matches_pyin():
  for f0 in (110.0, 210.0):
    wave, _ = _vowel(f0_hz=f0, intonation=0.0)
    est, voiced, _ = librosa.pyin(wave, fmin=60, fmax=400, sr=16000)
    assert voiced.mean() > 0.8
    assert np.nanmedian(est) == pytest.approx(f0, rel=0.03)


def test_synth_formants_follow_the_lips():
  f_open = _lpc_formants(_vowel(jaw=0.9)[0])
  f_half = _lpc_formants(_vowel(jaw=0.4)[0])
  want_open, want_half = speech_synth.formants(0.9, 0, 0), speech_synth.formants(0.4, 0, 0)
  assert f_open[0] == pytest.approx(want_open[0], rel=0.1)
  assert f_half[0] == pytest.approx(want_half[0], rel=0.1)
  assert f_open[0] - f_half[0] > 200  # F1 rises with the jaw
  f_spread = _lpc_formants(_vowel(jaw=0.5, stretch=1.0)[0])
  f_round = _lpc_formants(_vowel(jaw=0.5, rnd=1.0)[0])
  assert f_spread[1] == pytest.approx(speech_synth.formants(0.5, 1.0, 0)[1], rel=0.1)
  assert f_round[1] == pytest.approx(speech_synth.formants(0.5, 0, 1.0)[1], rel=0.1)
  assert f_spread[1] - f_round[1] > 1000  # F2 high for spread lips, low for rounded


def test_synth_silent_when_closed_and_loudness_linear_in_jaw():
  quiet, v = _vowel(jaw=0.05)
  assert np.sqrt(np.mean(quiet ** 2)) < 3 * v.noise_floor
  levels = [np.sqrt(np.mean(_vowel(jaw=j)[0][4000:12000] ** 2)) for j in (0.3, 0.55, 0.8)]
  want = [v.loudness * speech_synth.loudness_envelope(j, v) for j in (0.3, 0.55, 0.8)]
  np.testing.assert_allclose(levels, want, rtol=0.05)


def test_frame_rms_matches_a_loop():
  rng = np.random.default_rng(0)
  wave = rng.normal(size=16000 + 123)
  got = speech_synth.frame_rms(wave, 16000, 30.0)
  n = math.ceil(wave.size / 16000 * 30)
  want = []
  for i in range(n):
    a, b = round(i * 16000 / 30), min(round((i + 1) * 16000 / 30), wave.size)
    want.append(np.sqrt(np.mean(wave[a:b] ** 2)))
  np.testing.assert_allclose(got, want, rtol=1e-9)


def test_articulation_round_trip_and_plan():
  art, text = speech_synth.speech_articulation(150, 30.0, seed=3)
  assert text and all(k in art for k in ("jaw", "stretch", "round", "press"))
  assert art["jaw"][0] < 0.05 and art["jaw"].max() > 0.6  # starts in a pause, opens wide
  sp = speech_synth.Speaking(jaw_gain=0.7, lip_gain=0.5)
  back = speech_synth.articulation_from_mouth(speech_synth.mouth_from_articulation(art, sp))
  np.testing.assert_allclose(back["jaw"], 0.7 * art["jaw"], atol=1e-6)
  np.testing.assert_allclose(back["stretch"], 0.5 * art["stretch"], atol=1e-6)
  np.testing.assert_allclose(back["round"], 1.25 * 0.5 * art["round"], atol=1e-6)


def test_bad_input_is_reported():
  with pytest.raises(ValueError, match="even frame size"):
    demo_source.DemoConfig(width=641)
  with pytest.raises(ValueError, match="patch_size"):
    demo_source.DemoConfig(patch_size=400)
  with pytest.raises(ValueError, match="unknown source photo"):
    demo_source.source_photo("mona_lisa")
  with pytest.raises(ValueError, match=r"mouth must be \(T, 28\)"):
    speech_synth.synthesize(np.zeros((10, 3)), 30.0)
  with pytest.raises(ValueError, match="f0_hz"):
    speech_synth.Voice(f0_hz=5.0)
