"""hdtf_jax.data.pipelines on a real build of data_builders/hdtf/dummy_data (hdtf/params, hdtf/256).

Read back through `tfds.data_source` (array_record): shapes, dtypes, audio/video alignment,
identity hold-out, the 3DMM re-render of the landmarks, the report; then the grain pipelines:
window counts, alignment against np.interp, determinism, shard disjointness, iterator state.
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
from hdtf_jax.data import pipelines

REPO = Path(__file__).resolve().parents[1]
DUMMY = REPO / "data_builders" / "hdtf" / "dummy_data"
TRAIN = {"AstroNaut0_0": 50, "EileenCollins1_0": 25}   # clip -> T at 25 fps
TEST = {"Radio1_0": 25, "Radio1_1": 25}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("hdtf")
  env = {"HDTF_CACHE_DIR": str(root / "cache"), "HDTF_NUM_WORKERS": "0"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    for name in ("params", "256"):
      builder = hdtf.Builder(config=name, data_dir=str(root / "data"))
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=str(DUMMY)))
  finally:
    for k, v in old.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
  return root


def source(data_dir, name="params", split="train"):
  return tfds.data_source(f"hdtf/{name}", split=split, data_dir=str(data_dir / "data"))


def test_records_shapes_dtypes_alignment(data_dir):
  for name in ("params", "256"):
    for split, expected in (("train", TRAIN), ("test", TEST)):
      src = source(data_dir, name, split)
      got = {}
      for i in range(len(src)):
        ex = src[i]
        t = ex["landmarks"].shape[0]
        got[ex["clip"].decode()] = t
        assert ex["audio_features"].shape == (4 * t, 15)
        assert ex["audio_features"].dtype == np.float32
        assert ex["waveform"].shape == (t * 640,) and ex["waveform"].dtype == np.int16
        assert ex["landmarks"].shape == (t, 468, 3) and ex["landmarks"].dtype == np.float32
        assert ex["face_found"].dtype == np.bool_ and ex["face_found"].all()
        assert ex["shape"].shape == (60,) and np.shape(ex["scale"]) == ()
        assert ex["mouth"].shape == (t, 28) and ex["eyebrow"].shape == (t, 5)
        assert ex["pose"].shape == (t, 5) and ex["fit_residual"].shape == (t,)
        assert ex["fps"] == 25.0 and ex["list_split"].decode() in ("RD", "WDA", "WRA")
        xy = ex["landmarks"][..., :2]
        assert 0 < xy.min() and xy.max() < 1
        if name == "params":
          refs = np.stack(ex["reference_frames"])
          assert refs.shape == (4, 256, 256, 3) and refs.dtype == np.uint8 and "frames" not in ex
        else:
          frames = np.stack(ex["frames"])
          assert frames.shape == (t, 256, 256, 3) and frames.dtype == np.uint8
      assert got == expected


def test_identity_held_out_and_report(data_dir):
  ids = {s: {source(data_dir, "params", s)[i]["identity"].decode()
             for i in range(len(source(data_dir, "params", s)))} for s in ("train", "test")}
  assert ids == {"train": {"AstroNaut", "EileenCollins"}, "test": {"Radio1"}}
  builder_dir = data_dir / "data" / "hdtf" / "params" / "1.0.0"
  report = json.loads((builder_dir / "build_report.json").read_text())
  assert report["summary"]["clips_ok"] == 4 and report["summary"]["frames"] == 125
  assert report["summary"]["skipped_by_reason"] == {
      "corrupt_video": 1, "missing_video": 1, "no_audio": 1, "no_face": 1, "range_past_end": 1}
  assert report["splits"]["test"] == {"listed": 2, "built": 2}
  assert (builder_dir / "build_report.md").is_file()


def test_parameters_rerender_detected_landmarks(data_dir):
  from tests.test_clips import reprojection_rmse_px
  for split in ("train", "test"):
    src = source(data_dir, "params", split)
    for i in range(len(src)):
      ex = src[i]
      rmse = reprojection_rmse_px(ex, 256)
      assert rmse.mean() < 1.5, (ex["clip"], rmse.mean())


def _all_windows(ds):
  return [(int(c), int(s)) for b in ds for c, s in zip(b["clip"], b["start"])]


def test_stage1_windows_alignment_and_dtypes(data_dir):
  src = source(data_dir)
  ds = pipelines.stage1_dataset(src, window=32, stride=16, batch_size=4, seed=0, shard_index=0,
                                shard_count=1, num_epochs=1, drop_remainder=False)
  lengths = {i: src[i]["audio_features"].shape[0] for i in range(len(src))}
  expected = {(c, s) for c, n in lengths.items() for s in range(0, n - 32 + 1, 16)}
  assert len(expected) == 11 + 5  # 200 and 100 audio frames
  windows = _all_windows(ds)
  assert sorted(windows) == sorted(expected)
  batch = next(iter(ds))
  assert batch["audio"].shape == (4, 32, 15) and batch["mouth"].shape == (4, 32, 28)
  assert batch["eyebrow"].shape == (4, 32, 5) and batch["pose"].shape == (4, 32, 5)
  assert batch["shape"].shape == (4, 60) and batch["identity"].dtype == np.int32
  ref = batch["reference_frame"]
  assert ref.shape == (4, 256, 256, 3) and ref.dtype == np.float32
  assert 0 <= ref.min() and ref.max() <= 1
  for b, (c, s) in enumerate(zip(batch["clip"], batch["start"])):
    ex = src[int(c)]
    np.testing.assert_array_equal(batch["audio"][b], ex["audio_features"][s:s + 32])
    # Parameters at 100 fps: audio frame j sits at video frame j / 4 (linear interpolation).
    pos = np.arange(s, s + 32) / 4.0
    for key in ("mouth", "pose"):
      want = np.stack([np.interp(pos, np.arange(ex[key].shape[0]), ex[key][:, d])
                       for d in range(ex[key].shape[1])], -1)
      np.testing.assert_allclose(batch[key][b], want, atol=1e-5)
    refs = np.stack(ex["reference_frames"]).astype(np.float32) / 255
    assert min(np.abs(r - ref[b]).max() for r in refs) < 1e-6


def test_stage1_determinism_sharding_and_state(data_dir):
  src = source(data_dir)
  make = lambda seed, **kw: pipelines.stage1_dataset(
      src, window=32, stride=16, batch_size=2, seed=seed, num_epochs=1, **kw)
  a = _all_windows(make(3, shard_index=0, shard_count=1))
  assert a == _all_windows(make(3, shard_index=0, shard_count=1))
  assert a != _all_windows(make(4, shard_index=0, shard_count=1))
  s0 = _all_windows(make(3, shard_index=0, shard_count=3))
  s1 = _all_windows(make(3, shard_index=1, shard_count=3))
  s2 = _all_windows(make(3, shard_index=2, shard_count=3))
  assert len(s0) == len(s1) == len(s2) == 4  # 16 windows cut to 15, 5 each, whole batches of 2
  assert not (set(s0) & set(s1) or set(s0) & set(s2) or set(s1) & set(s2))
  # Iterator state round trip (infinite repetition: state crosses the epoch boundary).
  ds = pipelines.stage1_dataset(src, window=32, stride=16, batch_size=3, seed=7,
                                shard_index=0, shard_count=1)
  it = iter(ds)
  for _ in range(6):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  want = [next(it) for _ in range(2)]
  resumed = iter(ds)
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])


def test_stage2_pairs(data_dir):
  src = source(data_dir, "256", "train")
  ds = pipelines.stage2_dataset(src, image_size=128, batch_size=2, seed=0, shard_index=0,
                                shard_count=1, samples_per_clip=3)
  it = iter(ds)
  batch = next(it)
  assert batch["reference"].shape == (2, 128, 128, 3) and batch["driving"].dtype == np.float32
  assert set(batch["ref_params"]) == {"shape", "scale", "mouth", "eyebrow", "pose"}
  assert batch["drv_params"]["mouth"].shape == (2, 28)
  assert batch["ref_params"]["shape"].shape == (2, 60)
  for b in range(2):
    ex = src[int(batch["clip"][b])]
    r, d = int(batch["ref_index"][b]), int(batch["drv_index"][b])
    assert r != d
    np.testing.assert_array_equal(batch["drv_params"]["pose"][b], ex["pose"][d])
    np.testing.assert_array_equal(batch["ref_params"]["mouth"][b], ex["mouth"][r])
    want = pipelines.to_float_image(ex["frames"][r], 128)
    np.testing.assert_allclose(batch["reference"][b], want, atol=1e-6)
  with pytest.raises(ValueError, match="stores no frames"):
    pipelines.stage2_dataset(source(data_dir), image_size=64, batch_size=1, shard_index=0,
                             shard_count=1)
  with pytest.raises(ValueError, match="no feature"):
    pipelines.ClipReader(src, ("nonexistent",))


def test_tfrecord_copy_for_tfds_load(data_dir, tmp_path):
  import shutil
  copy = tmp_path / "data"
  shutil.copytree(data_dir / "data" / "hdtf" / "params", copy / "hdtf" / "params")
  written = hdtf.add_tfrecord_copy(copy / "hdtf" / "params" / "1.0.0")
  assert len(written) == 2
  ds = tfds.load("hdtf/params", split="test", data_dir=str(copy),
                 builder_kwargs={"file_format": "tfrecord"})
  got = {ex["clip"].decode(): ex for ex in tfds.as_numpy(ds)}
  src = tfds.data_source("hdtf/params", split="test", data_dir=str(copy))
  for i in range(len(src)):
    ex = src[i]
    np.testing.assert_array_equal(got[ex["clip"].decode()]["mouth"], ex["mouth"])


def test_command_line_build_resumes_from_cache(data_dir, tmp_path):
  # Same flags as `tfds build data_builders/hdtf ...`; the clip cache is the fixture's, so
  # the command only packs the cached clips.
  env = {**os.environ, "HDTF_CACHE_DIR": str(data_dir / "cache"), "HDTF_NUM_WORKERS": "0",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  out = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "data_builders.hdtf", f"--manual_dir={DUMMY}",
       f"--data_dir={out}", "--config=params"], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "hdtf" / "params" / "1.0.0" / "build_report.json").read_text())
  assert report["summary"]["clips_reused"] == 4 and report["summary"]["clips_built_now"] == 0
  assert len(tfds.data_source("hdtf/params", split="train", data_dir=str(out))) == 2
