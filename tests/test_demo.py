"""The demo end to end, scaled down: `python -m experiments.demo` with a 2-speaker demo source
(2 s videos) and tiny presets (stage 2 at 64 px, started from the warp as the demo preset is), then
checks of what a user gets: the mp4 (decodable, frame count = audio duration x fps, fps, an
audio stream as long as the driving audio, the mouth moving while the image corners stay still),
the evaluation files (finite numbers in every table), the frame strip, and that a rerun skips
every finished step.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hdtf_jax import audio, generate as gen, media

REPO = Path(__file__).resolve().parents[1]


def _warp_start() -> list[str]:
  """The demo preset's G_vid options beyond its sizes (how it starts from the warp), as
  overrides of the tiny preset: a few steps of tiny G_vid then behave like the demo's."""
  from experiments.configs import stage2
  demo, tiny = (stage2.get_config(p).model.generator for p in ("demo", "tiny"))
  sizes = ("encoder_widths", "num_res_blocks")
  return [f"--override=stage2:--config.model.generator.{k}={v}" for k, v in demo.items()
          if k not in sizes and v != tiny[k]]


FLAGS = [
    "--speakers=2", "--videos_per_speaker=1", "--seconds=2",
    "--stage1_preset=tiny", "--stage2_preset=tiny",
    # Stage 1: enough steps for G_ani to leave the mean parameters it starts at.
    "--override=stage1:--config.train.num_steps=100",
    "--override=stage1:--config.optim.hold_steps=80",
    "--override=stage1:--config.optim.decay_steps=20",
    "--override=stage1:--config.train.checkpoint_every=100",
    # Stage 2: 64 px (CPBD and the picture checks need more than 32), a few steps only.
    "--override=stage2:--config.model.image_size=64",
    "--override=stage2:--config.train.num_steps=4",
    "--override=stage2:--config.train.fast_compile=True",
    *_warp_start(),
    "--override=evaluate:--max_clips=2", "--override=evaluate:--max_frames=16",
    "--override=evaluate:--cpbd",
]


def _env(root: Path) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
          "HDTF_NUM_WORKERS": "0", "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}


def _demo(work: Path, *extra: str) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", "experiments.demo", f"--workdir={work}", *FLAGS,
                         *extra], cwd=REPO, env=_env(work.parent), capture_output=True,
                        text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  work = tmp_path_factory.mktemp("demo") / "run"
  return work, _demo(work).stdout


def test_mp4_has_the_audio_length_in_frames_and_sound(demo):
  work, out = demo
  video = work / "generate" / "astronaut.mp4"
  assert f"video: {video}" in out and "metrics" in out and "TensorBoard" in out
  wav = work / "generate" / "held_out.wav"
  duration = audio.load_audio(wav, 16000).size / 16000
  assert 0.5 < duration < 3.0
  info = media.probe_video(video)
  expected = audio.num_frames(duration, 25.0)
  assert info["fps"] == pytest.approx(25.0)
  assert info["num_frames"] == expected
  assert info["has_audio"] and info["audio_sample_rate"] == gen.MUX_RATE
  sound = audio.load_audio(video, 16000)
  # AAC works in 1024-sample frames (21 ms at 48 kHz): the track may be padded to a frame.
  assert abs(sound.size / 16000 - duration) < 0.03
  ref = audio.load_audio(wav, 16000)
  n = min(ref.size, sound.size)
  assert np.corrcoef(ref[:n], sound[:n])[0, 1] > 0.9  # the held-out speech, not silence
  frames, _ = media.read_video(video)
  assert frames.shape == (expected, 64, 64, 3)


def test_mouth_moves_while_the_corners_stay(demo):
  work, _ = demo
  frames, _ = media.read_video(work / "generate" / "astronaut.mp4")
  x = frames.astype(np.float32)
  # The mouth box from the reference's fitted mesh (mouth region vertices at 64 px).
  models = gen.load_models(work / "stage1", work / "stage2")
  ref = gen.prepare_reference(work / "generate" / "astronaut.png", models, min_face_px=96)
  one = {k: np.asarray(v)[None] for k, v in ref.params.items()}
  pts = gen.Preview(models, ref).mesh_points(one)[0]
  mouth = pts[np.asarray(models.face_model.regions["mouth"])]
  (x0, y0), (x1, y1) = np.floor(mouth.min(0)).astype(int), np.ceil(mouth.max(0)).astype(int)
  assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and y0 > 32  # the mouth is in the lower half
  step = np.abs(np.diff(x, axis=0))                       # frame-to-frame change (T-1, H, W, 3)
  mouth_change = step[:, y0:y1 + 1, x0:x1 + 1].mean()
  c = 6
  corners = np.concatenate([step[:, :c, :c], step[:, :c, -c:], step[:, -c:, :c],
                            step[:, -c:, -c:]], axis=1)
  corner_change = corners.mean()
  assert mouth_change > 1.0, mouth_change                 # grey levels per frame
  assert mouth_change > 4 * corner_change, (mouth_change, corner_change)


def test_evaluate_outputs_have_finite_numbers(demo):
  work, _ = demo
  ev = work / "eval"
  for name in ("results.md", "results.json", "tracks.png", "distributions.png", "frames.png"):
    assert (ev / name).stat().st_size > 100, name
  r = json.loads((ev / "results.json").read_text())
  assert r["steps"] == [100, 4]
  for stage, cols in (("stage1", ("mse_mouth", "lmd3d_mouth", "ssim_eyebrow", "cca_head")),
                      ("stage2", ("psnr", "ssim"))):
    model = r[stage]["results"]["model"]
    assert all(math.isfinite(model[k]) for k in cols), model
  p = r["pipeline"]
  assert p["num_clips"] == 2 and p["frames"] == sum(c["frames"] for c in p["clips"])
  assert all(c["frames"] == 15 for c in p["clips"])  # 16 minus the reference frame
  assert set(p["stage1"]) == {"pipeline", "reference_held"}
  assert set(p["stage2"]) == {"pipeline", "fitted_params", "reference"}
  for system, m in p["stage2"].items():
    for k in ("psnr", "ssim", "cpbd"):
      assert math.isfinite(m[k]), (system, k, m)
    assert 5 < m["psnr"] < 60 and 0 < m["ssim"] <= 1 and 0 <= m["cpbd"] <= 1
  for system, m in p["stage1"].items():
    for k in ("mse_mouth", "lmd3d_mouth", "ssim_eyebrow", "cca_head"):
      assert math.isfinite(m[k]), (system, k, m)
  # No motion, no head correlation (up to float rounding of a constant track).
  assert p["stage1"]["reference_held"]["cca_head"] < 1e-2
  # Per-clip stage-2 means average to the table (frame-weighted).
  w = np.array([c["frames"] for c in p["clips"]], float)
  psnr = np.array([c["stage2"]["pipeline"]["psnr"] for c in p["clips"]])
  assert p["stage2"]["pipeline"]["psnr"] == pytest.approx(float((w * psnr).sum() / w.sum()))
  md = (ev / "results.md").read_text()
  assert "Full pipeline" in md and "nan" not in md.lower()


def test_strip_and_rerun_skips_finished_steps(demo):
  work, _ = demo
  strip = work / "generate" / "astronaut_strip.png"
  import cv2
  img = cv2.imread(str(strip))
  assert img is not None and img.shape[0] == 104 + 4 and img.shape[1] == 6 * (104 + 2) + 2
  timings = json.loads((work / "demo_timings.json").read_text())
  assert {"source", "stage1 train", "stage2 train", "evaluate", "generate"} <= set(timings)
  mp4 = work / "generate" / "astronaut.mp4"
  before = mp4.stat().st_mtime_ns
  out = _demo(work).stdout
  assert out.count("skipped") >= 8 and "=== stage1 train: /" not in out
  assert mp4.stat().st_mtime_ns == before
