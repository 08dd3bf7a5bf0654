"""The HDTF builder end to end on a tiny demo source (2 speakers, 3 clips, 100 frames).

- the real `tfds build data_builders/hdtf` console command (config params), read back with
  `tfds.data_source`;
- the same command on Apache Beam (FnApiRunner, 2 worker processes) gives the same dataset:
  same splits, keys, order and arrays, and the same report;
- config `256` built in-process: frame shapes, per-frame parameters, 4 audio frames per video
  frame, landmarks inside the crop; its frames at the reference indices and its landmarks equal
  the params build's reference frames and landmarks (both decode and track at 256).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_builders.hdtf import hdtf_dataset_builder as hdtf
from hdtf_jax.data import demo_source

REPO = Path(__file__).resolve().parents[1]
TFDS = Path(sys.executable).parent / "tfds"  # the venv's console script
BEAM = "runner=FnApiRunner,direct_num_workers=2,direct_running_mode=multi_processing"
CLIPS = {"train": ["DemoEileen0_0"], "test": ["DemoCarl0_0", "DemoCarl0_1"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("hdtf_build")
  demo_source.make_demo_source(root / "raw", demo_source.DemoConfig(
      speakers=2, videos_per_speaker=1, seconds=2.0, seed=0))
  return root


def _env(cache: Path) -> dict:
  # One thread per library as in the build's workers; all runs share one XLA cache, so the
  # fit compiles once for the whole module.
  return {**os.environ, "HDTF_CACHE_DIR": str(cache), "HDTF_NUM_WORKERS": "0",
          "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1",
          "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
          "JAX_COMPILATION_CACHE_DIR": str(cache.parent / "xla_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}


def _tfds_build(root: Path, name: str, *extra: str) -> Path:
  out = root / name
  proc = subprocess.run(
      [str(TFDS), "build", "data_builders/hdtf", "--config=params",
       f"--manual_dir={root / 'raw'}", f"--data_dir={out}", *extra],
      cwd=REPO, env=_env(root / f"cache_{name}"), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out


@pytest.fixture(scope="module")
def plain(root):
  return _tfds_build(root, "plain")


@pytest.fixture(scope="module")
def beam(root, plain):
  del plain  # built first: the Beam workers then find the fit compiled in the XLA cache
  return _tfds_build(root, "beam", f"--beam_pipeline_options={BEAM}")


def _records(data_dir: Path, name: str, split: str) -> list[dict]:
  src = tfds.data_source(f"hdtf/{name}", split=split, data_dir=str(data_dir))
  return [src[i] for i in range(len(src))]


def _report(data_dir: Path, name: str = "params") -> dict:
  return json.loads((data_dir / "hdtf" / name / "1.0.0" / "build_report.json").read_text())


def test_tfds_build_command_then_data_source(plain):
  for split, names in CLIPS.items():
    recs = _records(plain, "params", split)
    assert sorted(r["clip"].decode() for r in recs) == sorted(names)
    for r in recs:
      t = r["landmarks"].shape[0]
      assert t in (25, 50)  # 1 s and 2 s clips at 25 fps
      assert r["audio_features"].shape == (4 * t, 15)
      assert r["waveform"].shape == (640 * t,) and r["waveform"].dtype == np.int16
      assert np.stack(r["reference_frames"]).shape == (4, 256, 256, 3)
      assert r["mouth"].shape == (t, 28) and r["pose"].shape == (t, 5)
      assert r["face_found"].mean() > 0.9
  summary = _report(plain)["summary"]
  assert summary["clips_ok"] == 3 and summary["clips_built_now"] == 3
  assert summary["frames"] == 100


def test_beam_build_equals_plain_build(plain, beam):
  for split in CLIPS:
    a, b = _records(plain, "params", split), _records(beam, "params", split)
    # Same keys in the same order (both writers shuffle by the hashed key).
    assert [r["clip"] for r in a] == [r["clip"] for r in b]
    for ra, rb in zip(a, b):
      assert ra.keys() == rb.keys()
      for key in ra:
        # Bit-identical, JPEG reference frames included (libjpeg-turbo is deterministic).
        np.testing.assert_array_equal(np.asarray(ra[key]), np.asarray(rb[key]), err_msg=key)
  ra, rb = _report(plain), _report(beam)
  assert [(c["clip"], c["status"], c["frames"]) for c in ra["clips"]] == [
      (c["clip"], c["status"], c["frames"]) for c in rb["clips"]]
  assert rb["splits"] == ra["splits"] and rb["summary"]["frames"] == 100
  # The clips were processed by the Beam workers (not the launching process).
  workers = {c["worker"] for c in rb["clips"]}
  assert "" not in workers and 1 <= len(workers) <= 2
  assert not (beam / "hdtf" / "params" / "1.0.0" / ".beam_outcomes").exists()


def test_256_config(root, plain):
  data = root / "d256"
  env = {"HDTF_CACHE_DIR": str(root / "cache_256"), "HDTF_NUM_WORKERS": "0"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    hdtf.Builder(config="256", data_dir=str(data)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root / "raw")))
  finally:
    for k, v in old.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
  for split, names in CLIPS.items():
    recs = {r["clip"].decode(): r for r in _records(data, "256", split)}
    params = {r["clip"].decode(): r for r in _records(plain, "params", split)}
    assert sorted(recs) == sorted(names)
    for name, r in recs.items():
      t = r["landmarks"].shape[0]
      r["frames"] = np.stack(r["frames"])
      assert r["frames"].shape == (t, 256, 256, 3) and r["frames"].dtype == np.uint8
      assert r["audio_features"].shape == (4 * t, 15)
      for key, width in (("mouth", 28), ("eyebrow", 5), ("pose", 5)):
        assert r[key].shape == (t, width) and r[key].dtype == np.float32
        assert np.isfinite(r[key]).all()
      assert r["fit_residual"].shape == (t,)
      found = r["face_found"]
      assert found.mean() > 0.9
      xy = r["landmarks"][found][..., :2]
      assert xy.min() > 0 and xy.max() < 1  # normalised crop units: inside the crop
      side = xy.max(axis=1) - xy.min(axis=1)  # the face fills a good part of the crop
      assert 0.3 < side.min() and side.max() < 0.95
      x, w, y, h = r["crop_box"]
      assert x >= 0 and y >= 0 and x + w <= 640 and y + h <= 360
      # Frames move (the speaker talks and sways) but stay the same scene.
      f = r["frames"].astype(np.float32)
      assert 0.5 < np.abs(f[1:] - f[:-1]).mean() < 20
      # params decodes and tracks at 256 too: its reference frames are these frames.
      p = params[name]
      idx = np.linspace(0, t - 1, 4).round().astype(int)
      np.testing.assert_array_equal(np.stack(p["reference_frames"]), r["frames"][idx])
      np.testing.assert_array_equal(p["landmarks"], r["landmarks"])
      np.testing.assert_array_equal(p["audio_features"], r["audio_features"])
