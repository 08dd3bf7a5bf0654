"""One-shot generation (`hdtf_jax.generate`, `hdtf-jax generate`): the mp4 (frame count, fps,
audio duration), paste-back and preview sizes, reenactment from tracked parameters, the
driving-parameter rules, and every bad input (GenerateError naming the file; exit code 2).

Both stages are the `tiny` presets trained for two steps (module fixture); stage 2 trains on a
few astronaut pairs built here, so the fixture needs no synthetic video.
"""
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import soundfile as sf

from experiments.configs import stage1 as configs1
from experiments.configs import stage2 as configs2
from hdtf_jax import audio as audio_lib
from hdtf_jax import cli, media
from hdtf_jax import generate as G
from hdtf_jax.face import landmarks as lm
from hdtf_jax.train import stage1, stage2

SR = 16000
AUDIO_S = 1.3


# ------------------------------------------------------------------------------ fixtures

class _Pairs:
  """Endless batches of the one astronaut pair set (stage-2 train iterator protocol)."""

  def __init__(self, batch):
    self.batch, self.index = batch, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.index += 1
    return self.batch

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def _astronaut_pairs(size=32, n=4):
  from hdtf_jax.face import flow, morphable
  image, points = flow.astronaut_face(size)
  p = flow.params_from_points(morphable.default_model(), points)
  ref = dict(p, scale=np.float32(p["scale"] / size),
             pose=np.concatenate([p["pose"][:3], (p["pose"][3:] + 0.5) / size]).astype(np.float32))
  rows = []
  for i in range(n):
    drv = dict(ref, pose=ref["pose"] + np.float32([0.05 * i, 0, 0, 0.01 * i, 0]))
    img = image.astype(np.float32) / 255
    rows.append({"reference": img, "driving": img, "ref_params": ref, "drv_params": drv})
  from hdtf_jax.data import synthetic_video
  return synthetic_video.stack(rows), rows


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen_runs")
  c1 = configs1.get_config("tiny")
  c1.train.update(fast_compile=True, num_steps=2, checkpoint_every=2)
  stage1.train(c1, root / "s1", progress=False)
  c2 = configs2.get_config("tiny")
  c2.train.update(fast_compile=True, num_steps=2, checkpoint_every=2)
  batch, rows = _astronaut_pairs()
  data = stage2.Stage2Data(_Pairs(batch), rows, 1, "astronaut pairs (test)")
  stage2.train(c2, root / "s2", data=data, progress=False)
  return root / "s1", root / "s2"


@pytest.fixture(scope="module")
def models(workdirs):
  return G.load_models(*workdirs)


def _write_rgb(path, img):
  cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
  return path


def _voice(seconds):
  """A 150 Hz buzz with a 3 Hz syllable envelope."""
  t = np.arange(int(round(seconds * SR))) / SR
  env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
  return (0.2 * env * sum(np.sin(2 * np.pi * 150 * k * t) / k for k in (1, 2, 3))).astype(np.float32)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  d = tmp_path_factory.mktemp("gen_inputs")
  astro = skimage.data.astronaut()
  big = cv2.resize(astro, (1024, 1024), interpolation=cv2.INTER_CUBIC)  # face ~210 px
  two = np.zeros((1024, 1536, 3), np.uint8)
  two[:, :1024] = big
  two[256:768, 1024:] = astro  # a second, smaller face (~105 px) on the right
  sf.write(d / "voice.wav", _voice(AUDIO_S), SR)
  sf.write(d / "short.wav", _voice(0.02), SR)  # half a frame at 25 fps
  (d / "noise.wav").write_bytes(b"RIFF not really a wave file" * 10)
  (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  return {"dir": d, "image": _write_rgb(d / "astronaut.png", big), "big": big,
          "small": _write_rgb(d / "small.png", astro),
          "blank": _write_rgb(d / "blank.png", np.full((400, 400, 3), 127, np.uint8)),
          "two": _write_rgb(d / "two.png", two), "bad_image": d / "bad.png",
          "audio": d / "voice.wav", "short_audio": d / "short.wav", "bad_audio": d / "noise.wav"}


@pytest.fixture(scope="module")
def reference(models, inputs):
  return G.prepare_reference(inputs["image"], models)


# ------------------------------------------------------------------------------ the video

def test_video_has_one_frame_per_audio_frame_and_the_audio(models, inputs, reference, tmp_path):
  out = tmp_path / "out.mp4"
  summary = G.generate_video(inputs["image"], inputs["audio"], out, models, reference=reference)
  expected = audio_lib.num_frames(AUDIO_S, 25.0)
  assert expected == 33 and summary["frames"] == expected
  info = media.probe_video(out)
  assert info["num_frames"] == expected and info["fps"] == pytest.approx(25.0)
  assert (info["width"], info["height"]) == (32, 32) and info["has_audio"]
  frames, _ = media.read_video(out)
  assert frames.shape == (expected, 32, 32, 3) and frames.std() > 1
  sound = audio_lib.load_audio(out, SR)
  assert abs(sound.size / SR - AUDIO_S) <= 1 / 25.0
  # The muxed track is the driving audio (correlation of the envelopes, AAC in between).
  src = _voice(AUDIO_S)
  n = min(src.size, sound.size)
  env = lambda x: np.abs(x[:n]).reshape(-1, 160).mean(1)
  assert np.corrcoef(env(src), env(sound))[0, 1] > 0.9
  assert not [p for p in tmp_path.iterdir() if p.name != "out.mp4"]  # no temporaries left


def test_reference_crop_is_the_dataset_rule_around_the_face(reference, inputs, models):
  x, w, y, h = reference.crop
  assert w == h and 200 < w < 330  # the mesh box (~210 px) enlarged 1.2x
  # The face (nose tip, mesh point 1) is near the crop's centre.
  pts = G.detect_face(inputs["big"], "astronaut")
  nose = pts[1, :2]
  assert abs(nose[0] - (x + w / 2)) < 0.15 * w and abs(nose[1] - (y + h / 2)) < 0.2 * h
  assert reference.image.shape == (32, 32, 3) and reference.image.dtype == np.float32
  assert reference.identity.shape == (32, 32, 3)  # tiny G_ani: identity image of 32 px
  p = reference.params
  # Normalised crop units: the head centre (tx, ty) inside the crop, scale ~ face / crop side.
  assert 0.3 < p["pose"][3] < 0.7 and 0.3 < p["pose"][4] < 0.7 and 0 < p["scale"] < 1
  assert np.abs(p["pose"][:3]).max() < 0.5


def test_paste_back_keeps_the_source_size_and_background(models, inputs, reference, tmp_path):
  out = tmp_path / "pasted.mp4"
  G.generate_video(inputs["image"], inputs["audio"], out, models, reference=reference,
                   paste_back=True, fps=30.0)
  info = media.probe_video(out)
  assert (info["height"], info["width"]) == inputs["big"].shape[:2]
  assert info["fps"] == pytest.approx(30.0)
  assert info["num_frames"] == audio_lib.num_frames(AUDIO_S, 30.0) == 39
  frames, _ = media.read_video(out, end_s=0.1)
  x, w, y, h = reference.crop
  src = inputs["big"].astype(np.float32)
  outside = np.abs(frames[0, :y - 8].astype(np.float32) - src[:y - 8]).mean()
  inside = np.abs(frames[0, y + h // 4:y + 3 * h // 4, x + w // 4:x + 3 * w // 4]
                  - src[y + h // 4:y + 3 * h // 4, x + w // 4:x + 3 * w // 4]).mean()
  assert outside < 3.0 and inside > 10.0  # source kept outside; tiny G_vid's blur inside


def test_paste_back_pads_odd_sizes_and_feathers(models, reference):
  odd = G.Reference(reference.image, reference.params, reference.identity, (10, 40, 20, 40),
                    np.zeros((101, 75, 3), np.uint8), "odd")
  paste = G.PasteBack(odd)
  frame = paste(np.full((32, 32, 3), 200, np.uint8))
  assert frame.shape == (102, 76, 3)
  assert frame[40, 30].min() == 200 and frame[0, 0].max() == 0  # centre pasted, corner kept
  m = G.feather_mask(40)
  assert m.shape == (40, 40, 1) and m[20, 20, 0] == 1 and m[0, 0, 0] < 0.01 and m.min() >= 0


def test_preview_is_three_panels(models, inputs, reference, tmp_path):
  out = tmp_path / "preview.mp4"
  G.generate_video(inputs["image"], inputs["audio"], out, models, reference=reference,
                   preview=True)
  info = media.probe_video(out)
  assert (info["width"], info["height"]) == (96, 32) and info["num_frames"] == 33
  frames, _ = media.read_video(out, end_s=0.1)
  ref = np.rint(reference.image * 255)
  assert np.abs(frames[0, :, :32] - ref).mean() < 6  # the reference panel (codec error)
  assert np.abs(frames[0, :, 32:64].astype(np.float32) - ref * 0.5).max() > 60  # mesh drawn


def test_render_matches_stage2_generate(models, reference):
  drv = {k: np.stack([reference.params[k]] * 5) for k in G.PARAM_KEYS}
  drv["pose"] = drv["pose"] + np.linspace(0, 0.2, 5)[:, None] * np.float32([1, 0, 0, 0, 0])
  frames = np.stack(list(G.render(models, reference, drv, batch_size=3)))
  want = stage2.generate(models.stage2_variables, reference.image, reference.params, drv,
                         config=models.stage2_config, batch_size=2)
  assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
  assert np.abs(frames.astype(int) - np.rint(want * 255)).max() <= 1


# ------------------------------------------------------------------------------ driving rules

def test_animate_frame_count_multipliers_and_still_head(models, reference):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(730, 15)).astype(np.float32)  # 7.3 s: longer than a G_ani window
  base = G.animate(models, feats, reference)
  t = audio_lib.num_frames(7.3, 25.0)
  assert base["mouth"].shape == (t, 28) and base["pose"].shape == (t, 5)
  assert base["shape"].shape == (t, 60) and base["scale"].shape == (t,)
  ref_pose, ref_brow = reference.params["pose"], reference.params["eyebrow"]
  double = G.animate(models, feats, reference, head_scale=2.0, eyebrow_scale=0.0)
  np.testing.assert_allclose(double["pose"] - ref_pose, 2 * (base["pose"] - ref_pose), atol=1e-5)
  np.testing.assert_allclose(double["eyebrow"], np.broadcast_to(ref_brow, (t, 5)), atol=1e-6)
  np.testing.assert_allclose(double["mouth"], base["mouth"], atol=1e-6)
  still = G.animate(models, feats, reference, keep_head_still=True)
  np.testing.assert_array_equal(still["pose"], np.broadcast_to(ref_pose, (t, 5)))
  # Smoothing: 0 leaves G_ani's 100 fps track as resampled; more smoothing, less motion.
  raw = G.animate(models, feats, reference, smoothing=0.0, fps=100.0)
  pred = stage1.predict(models.stage1_variables, feats, reference.identity,
                        model_config=models.stage1_config.model,
                        chunk=models.stage1_config.data.window)
  np.testing.assert_allclose(raw["mouth"], pred["mouth"], atol=1e-6)
  smooth = G.animate(models, feats, reference, smoothing=0.1, fps=100.0)
  assert np.diff(smooth["mouth"], axis=0).std() < 0.5 * np.diff(raw["mouth"], axis=0).std()


def test_relative_pose_adds_changes_in_reference_units(reference):
  pose = np.zeros((3, 5), np.float32)
  pose[:, 3:] = [[100, 80], [110, 80], [100, 60]]  # pixels of the tracked video
  pose[:, 0] = [0.1, 0.3, 0.1]  # yaw
  tracked = G.TrackedParams(np.zeros((3, 28)), np.zeros((3, 5)), pose, 200.0, 25.0, "t")
  out = G.relative_pose(tracked, reference)
  ref = reference.params["pose"]
  k = float(reference.params["scale"]) / 200.0
  np.testing.assert_allclose(out[0], ref, atol=1e-6)  # first frame = the reference's pose
  np.testing.assert_allclose(out[1], ref + [0.2, 0, 0, 10 * k, 0], atol=1e-6)
  np.testing.assert_allclose(out[2], ref + [0, 0, 0, 0, -20 * k], atol=1e-6)


def _params_npz(path, t=20, fps=25.0, move=True):
  mouth = np.zeros((t, 28), np.float32)
  pose = np.tile(np.float32([0, 0, 0, 256, 256]), (t, 1))
  if move:
    mouth[:, 0] = np.linspace(0, 1, t)  # jaw opens
    pose[:, 0] = np.linspace(0, 0.3, t)  # head turns
  np.savez(path, mouth=mouth, eyebrow=np.zeros((t, 5), np.float32), pose=pose,
           scale=np.float32(300.0), fps=np.float32(fps), shape=np.zeros(60, np.float32))
  return path


def test_reenactment_from_a_params_file(models, inputs, reference, tmp_path):
  npz = _params_npz(tmp_path / "clip_params.npz")
  out = tmp_path / "reenacted.mp4"
  summary = G.generate_video(inputs["image"], None, out, models, params_from=npz,
                             reference=reference, smoothing=0.0)
  info = media.probe_video(out)
  assert summary["frames"] == info["num_frames"] == 20 and not info["has_audio"]
  assert summary["driven_by"] == "params"
  tracked = G.load_params_file(npz, models.face_model)
  drv = G.reenact_params(tracked, reference, fps=25.0, num_frames=20, smoothing=0.0)
  np.testing.assert_allclose(drv["mouth"][:, 0], np.linspace(0, 1, 20), atol=1e-6)
  np.testing.assert_allclose(drv["pose"][:, 0] - reference.params["pose"][0],
                             np.linspace(0, 0.3, 20), atol=1e-6)
  # The frames follow the parameters: the last (head turned, jaw open) differs from the first
  # far more than in a video whose parameters are held (codec noise only). Relative, since the
  # 2-step tiny G_vid passes only part of the warp through.
  frames, _ = media.read_video(out)
  still = tmp_path / "still.mp4"
  G.generate_video(inputs["image"], None, still, models,
                   params_from=_params_npz(tmp_path / "still.npz", move=False),
                   reference=reference, smoothing=0.0)
  still_frames, _ = media.read_video(still)
  moved = np.abs(frames[-1].astype(int) - frames[0]).mean()
  held = np.abs(still_frames[-1].astype(int) - still_frames[0]).mean()
  assert moved > 0.1 and moved > 4 * held, (moved, held)
  # With audio: the audio sets the length (33 frames), the file's last frame is held.
  out2 = tmp_path / "reenacted_audio.mp4"
  s2 = G.generate_video(inputs["image"], inputs["audio"], out2, models, params_from=npz,
                        reference=reference)
  assert s2["frames"] == media.probe_video(out2)["num_frames"] == 33


def test_pose_from_a_video_follows_its_head_turn(models, inputs, reference, tmp_path):
  """A 12-frame video of the astronaut turned in the image plane (roll) and shifted right:
  tracked roll changes = minus the applied angles (the model's roll turns the face clockwise
  on screen; OpenCV's angle counter-clockwise), x shift ~ the applied pixels; the video then
  drives the head of a generated clip whose length the audio sets."""
  img = inputs["big"][::2, ::2].copy()  # 512 px, the analysis size
  nose = G.detect_face(inputs["big"], "astronaut")[1, :2] / 2
  angles, shifts = np.linspace(0, 0.15, 12), np.linspace(0, 12, 12)
  frames = []
  for a, dx in zip(angles, shifts):
    m = cv2.getRotationMatrix2D(tuple(float(v) for v in nose), float(np.degrees(a)), 1.0)
    m[0, 2] += dx
    frames.append(cv2.warpAffine(img, m, (512, 512), borderMode=cv2.BORDER_REFLECT))
  video = media.write_video(tmp_path / "turn.mp4", np.stack(frames), 25.0)
  tracked = G.track_params(video, models.face_model, fps=25.0)
  assert len(tracked) == 12
  delta = tracked.pose - tracked.pose[0]
  np.testing.assert_allclose(delta[:, 2], -angles, atol=0.03)
  assert abs(delta[-1, 3] - 12) < 3 and np.abs(delta[:, :2]).max() < 0.06
  out = tmp_path / "posed.mp4"
  summary = G.generate_video(inputs["image"], inputs["audio"], out, models, pose_from=video,
                             reference=reference)
  assert summary["frames"] == media.probe_video(out)["num_frames"] == 33
  assert summary["driven_by"] == "audio+pose"


# ------------------------------------------------------------------------------ bad input

def test_two_faces_warn_and_the_largest_is_used(models, inputs):
  with pytest.warns(lm.SeveralFacesWarning, match="2 faces"):
    ref = G.prepare_reference(inputs["two"], models)
  x, w, y, h = ref.crop
  assert x + w <= 1024 and w > 200  # the big face on the left, not the small one at x >= 1024


def _cli(workdirs, inputs, tmp_path, **over):
  args = {"--image": inputs["image"], "--audio": inputs["audio"], "--stage1": workdirs[0],
          "--stage2": workdirs[1], "--out": tmp_path / "cli.mp4"}
  args.update(over)
  argv = ["generate", "--no-progress"]
  for k, v in args.items():
    argv += [k] if v is True else [k, str(v)]
  return argv


BAD = {  # case -> (cli options, the file the message names, words in the message)
    "no_face": (lambda i, w, t: {"--image": i["blank"]}, "blank.png", "no face"),
    "face_too_small": (lambda i, w, t: {"--image": i["small"]}, "small.png", "at least 128 px"),
    "unreadable_image": (lambda i, w, t: {"--image": i["bad_image"]}, "bad.png", "not a readable"),
    "missing_image": (lambda i, w, t: {"--image": t / "nope.jpg"}, "nope.jpg", "no such"),
    "unreadable_audio": (lambda i, w, t: {"--audio": i["bad_audio"]}, "noise.wav", "not readable"),
    "short_audio": (lambda i, w, t: {"--audio": i["short_audio"]}, "short.wav",
                    "shorter than one video frame"),
    "stage1_as_stage2": (lambda i, w, t: {"--stage2": w[0]}, "s1", "stage-1 run"),
    "stage2_as_stage1": (lambda i, w, t: {"--stage1": w[1]}, "s2", "stage-2 run"),
    "preset": (lambda i, w, t: {"--preset": "demo"}, "s1", "preset 'tiny'"),
    "output_not_writable": (lambda i, w, t: {"--out": i["image"] / "x.mp4"}, "astronaut.png",
                            "cannot create the output folder"),
    "bad_params_file": (lambda i, w, t: {"--params-from": i["audio"]}, "voice.wav",
                        "not a readable .npz"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2(case, workdirs, inputs, tmp_path, capsys):
  over, named, words = BAD[case]
  argv = _cli(workdirs, inputs, tmp_path, **over(inputs, workdirs, tmp_path))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  last = err[-1]
  assert last.startswith("error: ") and named in last and words in last, err
  assert "Traceback" not in "\n".join(err)
  assert not (tmp_path / "cli.mp4").exists()


def test_library_raises_generate_error_naming_the_file(models, inputs, tmp_path):
  out = tmp_path / "x.mp4"
  for image, audio, named in ((inputs["blank"], inputs["audio"], "blank.png"),
                              (inputs["image"], inputs["short_audio"], "short.wav"),
                              (inputs["image"], tmp_path / "missing.wav", "missing.wav")):
    with pytest.raises(G.GenerateError, match=named.replace(".", r"\.")):
      G.generate_video(image, audio, out, models)
  assert issubclass(G.GenerateError, ValueError) and not out.exists()


def test_incompatible_stages_are_refused(workdirs, tmp_path):
  s1 = tmp_path / "s1"
  shutil.copytree(workdirs[0], s1)
  cfg = json.loads((s1 / "config.json").read_text())
  cfg["model"]["mouth_dim"] = 20
  (s1 / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(G.GenerateError, match="do not fit together"):
    G.load_models(s1, workdirs[1])
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text((workdirs[1] / "config.json").read_text())
  with pytest.raises(G.GenerateError, match="no checkpoint"):
    G.load_models(workdirs[0], empty)


def test_failure_mid_way_leaves_no_file_under_the_final_name(models, inputs, reference, tmp_path,
                                                             monkeypatch):
  out = tmp_path / "out.mp4"
  out.write_bytes(b"an older video")
  real_render = G.render

  def failing(*args, **kwargs):
    for i, frame in enumerate(real_render(*args, **kwargs)):
      if i == 10:
        raise RuntimeError("device lost")
      yield frame
  monkeypatch.setattr(G, "render", failing)
  with pytest.raises(RuntimeError, match="device lost"):
    G.generate_video(inputs["image"], inputs["audio"], out, models, reference=reference)
  assert out.read_bytes() == b"an older video"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temporaries


def test_console_script_exits_2_with_one_line(workdirs, inputs, tmp_path):
  exe = Path(sys.executable).with_name("hdtf-jax")
  assert exe.is_file(), "pip install -e . creates the console script"
  proc = subprocess.run([str(exe), *_cli(workdirs, inputs, tmp_path, **{"--stage1": workdirs[1]})],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "stage-2 run" in lines[0] and "Traceback" not in proc.stderr
  same = subprocess.run([sys.executable, "-m", "experiments.generate", "--help"],
                        capture_output=True, text=True, timeout=300,
                        cwd=Path(__file__).resolve().parents[1])
  assert same.returncode == 0 and "--pose-from" in same.stdout
