"""TFDS builder for HDTF (Zhang et al., CVPR 2021): one example per annotated clip.

Configs: `512` (the paper's frames), `256`, and `params` (no frames: audio, landmarks, 3DMM
parameters and 4 reference frames at 256 -- what stage 1 trains on). Splits `train` / `test`
hold speakers out by identity (`hdtf_jax.data.hdtf_lists.split_clips`). Stored as array_record,
so `tfds.data_source("hdtf/params", data_dir=...)` gives random access without TensorFlow.

Build (any of):

    tfds build data_builders/hdtf --manual_dir=RAW --data_dir=DATA --config=params
    python -m data_builders.hdtf --manual_dir=RAW --data_dir=DATA --config=params \
        [--also_tfrecord]

(`tfds build` needs the `beam` extra, apache-beam and mlcroissant, which TFDS 4.9.x imports at
start-up; the second form runs the very same TFDS build command without those imports.) A report
`build_report.{json,md}` lands next to the dataset files. Per-clip work is cached as .npz
under `<download_dir>/hdtf_clips/` (or `$HDTF_CACHE_DIR`), so a killed build resumes where it
stopped.

Two ways to run the per-clip work, picked by whether the caller asked for Apache Beam:
- plain (no Beam runner or options given): a process pool on this machine
  (`hdtf_jax.data.build.build_clips`), workers `$HDTF_NUM_WORKERS`, else min(cpu_count, 4);
- Beam, when `tfds build` gets `--beam_pipeline_options=...` (or `DownloadConfig(beam_runner=
  ... or beam_options=...)`): every split is a Beam transform (`build.beam_clip_examples`), so
  the runner spreads the clips over its workers, e.g. locally
  `--beam_pipeline_options="runner=FnApiRunner,direct_num_workers=4,direct_running_mode=
  multi_processing"` (what `runner=DirectRunner` runs too, after first trying Beam's Prism
  runner, which fetches a binary from GitHub on first use), or Dataflow / Flink / Spark.
  The examples are the same as the plain build's (keys, order, arrays; tested), and so is
  the report (from per-clip records the workers write under `data_dir`). On a cluster,
  `manual_dir` and the clip cache must be paths every worker can read (a shared mount:
  ffmpeg reads local paths) and the workers need this package installed (e.g. Dataflow's
  `--setup_file`); `data_dir` may be any tf.io.gfile location. Needs the `beam` extra
  (`pip install 'hdtf-jax[beam]'`).

`tfds.load` (tf.data) cannot read array_record; `add_tfrecord_copy` (or `--also_tfrecord`)
writes the same records as tfrecord beside them, registered as an alternative format, then:
`tfds.load("hdtf/params", data_dir=..., builder_kwargs={"file_format": "tfrecord"})`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from hdtf_jax.data import build as build_lib
from hdtf_jax.data import clips as clips_lib
from hdtf_jax.data import hdtf_lists

_NUM_LANDMARKS = 468  # vertices of the face mesh (hdtf_jax.face.landmarks.NUM_MESH_POINTS)

_DESCRIPTION = """
HDTF: about 16 hours of 720p/1080p talking-face YouTube videos of 300+ speakers, cut into clips
by the authors' annotation lists, cropped to the face, resampled to 25 fps, with 16 kHz audio,
15-d audio features at 100 fps, a 468-point face mesh per frame and a 3DMM fit (60 shape,
28 mouth, 5 eyebrow, 5 pose parameters) per clip.
"""

_CITATION = """
@inproceedings{zhang2021flow,
  title={Flow-guided One-shot Talking Face Generation with a High-resolution Audio-visual Dataset},
  author={Zhang, Zhimeng and Li, Lincheng and Ding, Yu and Fan, Changjie},
  booktitle={CVPR},
  year={2021}
}
"""

_MANUAL = """
HDTF videos may not be redistributed: download them yourself, then point `--manual_dir` at one
folder holding the raw videos and the official annotation lists.

1. Annotation lists: from the authors' repository (github.com/MRzzm/HDTF, folder
   `HDTF_dataset`), copy the 15 files `{RD,WDA,WRA}_{video_url,resolution,annotion_time,
   crop_wh,crop_ratio}.txt` into the folder as they are (quirks are handled).
2. Videos: for every line `<name> <url>` of `<S>_video_url.txt`, download the video at the
   height listed in `<S>_resolution.txt`, e.g. with yt-dlp:

       yt-dlp -f "bv*[height=720]+ba/b[height=720]" --merge-output-format mp4 \\
           -o "<manual_dir>/<name>.%(ext)s" "<url>"

   (use the listed height: the `crop_wh` boxes refer to it; a video of another height is
   cropped by its landmark box instead). Save each as `<name>.mp4` (`.mkv`, `.webm`, `.mov`
   also work) directly in the folder. Missing, broken or silent videos are skipped and listed
   in the build report.
"""


@dataclasses.dataclass(eq=False)
class HdtfConfig(tfds.core.BuilderConfig):
  """A TFDS config: how each clip is processed (`hdtf_jax.data.clips.ClipConfig`, one place
  for those settings and their meaning) plus how clips are split and built."""
  clip: clips_lib.ClipConfig = dataclasses.field(default_factory=clips_lib.ClipConfig)
  test_fraction: float = 0.05
  seed: int = 0
  num_workers: int | None = None  # None: $HDTF_NUM_WORKERS, else min(cpu_count, 4)


def _bytes_tensor(shape, dtype):
  return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)


class Builder(tfds.core.GeneratorBasedBuilder):
  """HDTF talking-face clips, preprocessed (crop, 25 fps, audio features, landmarks, 3DMM)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: configs 512, 256, params."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL
  BUILDER_CONFIGS = [
      HdtfConfig(name="512", description="512x512 JPEG frames (the paper's resolution)."),
      HdtfConfig(name="256", clip=clips_lib.ClipConfig(frame_size=256),
                 description="256x256 JPEG frames."),
      HdtfConfig(name="params", clip=clips_lib.ClipConfig(store_frames=False),
                 description="No frames: audio, landmarks, 3DMM parameters and 4 reference "
                             "frames at 256x256 (stage-1 training; small)."),
  ]

  def __init__(self, *, file_format=None, **kwargs):
    """`file_format`: array_record by default (random access for grain via tfds.data_source);
    for a prepared dataset, any format it holds (see `add_tfrecord_copy`)."""
    super().__init__(**kwargs)  # the format is restored from disk, else TFDS's default
    formats = tfds.core.file_adapters.FileFormat
    if not self.is_prepared():
      self.info.set_file_format(file_format or formats.ARRAY_RECORD, override=True)
    elif file_format is not None:
      wanted = formats.from_value(file_format)
      # The restored proto lists the alternatives (DatasetInfo's own list is not refreshed).
      held = {self.info.file_format.value, *self.info.as_proto.alternative_file_formats}
      if wanted.value not in held:
        raise ValueError(f"{self.data_dir} holds {sorted(held)}, not {wanted.value}; "
                         f"add a tfrecord copy with add_tfrecord_copy()")
      if wanted != self.info.file_format:
        self.info.set_file_format(wanted, override=True, override_if_initialized=True)

  def _info(self) -> tfds.core.DatasetInfo:
    from hdtf_jax.face.morphable import default_model
    model = default_model()
    cfg = self.builder_config
    n_feat = cfg.clip.audio_config.num_features
    features = {
        "clip": tfds.features.Text(), "video": tfds.features.Text(),
        "list_split": tfds.features.Text(), "clip_index": tfds.features.Scalar(np.int32),
        "identity": tfds.features.Text(), "url": tfds.features.Text(),
        "source_resolution": tfds.features.Scalar(np.int32),
        "fps": tfds.features.Scalar(np.float32),
        "start_s": tfds.features.Scalar(np.float32), "end_s": tfds.features.Scalar(np.float32),
        "crop_box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
        "crop_method": tfds.features.Text(),
        "audio_features": _bytes_tensor((None, n_feat), np.float32),
        "waveform": _bytes_tensor((None,), np.int16),
        "landmarks": _bytes_tensor((None, _NUM_LANDMARKS, 3), np.float32),
        "face_found": _bytes_tensor((None,), np.bool_),
        "shape": tfds.features.Tensor(shape=(model.n_shape,), dtype=np.float32),
        "scale": tfds.features.Scalar(np.float32),
        "mouth": _bytes_tensor((None, model.n_mouth), np.float32),
        "eyebrow": _bytes_tensor((None, model.n_eyebrow), np.float32),
        "pose": _bytes_tensor((None, 5), np.float32),
        "fit_residual": _bytes_tensor((None,), np.float32),
    }
    if cfg.clip.store_frames:
      features["frames"] = tfds.features.Sequence(tfds.features.Image(
          shape=(cfg.clip.frame_size, cfg.clip.frame_size, 3), encoding_format="jpeg"))
    else:
      features["reference_frames"] = tfds.features.Sequence(tfds.features.Image(
          shape=(cfg.clip.reference_size, cfg.clip.reference_size, 3), encoding_format="jpeg"),
          length=cfg.clip.reference_frames)
    return self.dataset_info_from_configs(
        description=_DESCRIPTION, features=tfds.features.FeaturesDict(features),
        homepage="https://github.com/MRzzm/HDTF", citation=_CITATION,
        supervised_keys=None)

  def _generate_splits(self, dl_manager, download_config):
    # Beam exactly when the caller asked for it: `tfds build --beam_pipeline_options=...` sets
    # download_config.beam_options; a plain build never needs apache_beam.
    self._use_beam = (download_config.beam_runner is not None
                      or download_config.beam_options is not None)
    self._started = time.perf_counter()
    return super()._generate_splits(dl_manager, download_config)

  def _cache_dir(self, dl_manager) -> Path:
    root = (os.environ.get("HDTF_CACHE_DIR")
            or os.fspath(Path(dl_manager.download_dir) / "hdtf_clips"))
    cfg = self.builder_config
    return Path(root) / f"{cfg.name}-{cfg.clip.signature()}"

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    raw_dir = Path(dl_manager.manual_dir)
    lists = hdtf_lists.read_lists(raw_dir)
    parts = hdtf_lists.split_clips(lists.clips, cfg.test_fraction, cfg.seed)
    clip_cfg = cfg.clip
    cache_dir = self._cache_dir(dl_manager)
    if getattr(self, "_use_beam", False):
      return self._beam_split_generators(raw_dir, cache_dir, clip_cfg, lists, parts)
    result = build_lib.build_clips(raw_dir, cache_dir, clip_cfg, lists.clips,
                                   num_workers=cfg.num_workers, problems=lists.problems)
    # self.data_dir is the (still incomplete) version folder: the report moves with the data.
    json_path, _ = build_lib.write_report(
        result, self.data_dir, {k: [c.name for c in v] for k, v in parts.items()})
    ok = set(result.ok_clips)
    generators = {}
    for split, members in parts.items():
      chosen = [c for c in members if c.name in ok]
      if chosen:  # TFDS cannot write an empty split
        generators[split] = self._generate_examples(cache_dir, chosen, clip_cfg)
    if not generators:
      raise RuntimeError(f"no clip of {raw_dir} could be built; see {json_path}")
    return generators

  def _beam_split_generators(self, raw_dir, cache_dir, clip_cfg, lists, parts):
    """One Beam transform per split (see the module docstring); the report is written by
    `_process_pipeline_result` from the outcomes the workers record."""
    from etils import epath
    from hdtf_jax import audio as audio_lib
    audio_lib.warm_up()  # local workers then only read librosa's numba cache (no compile race)
    outcome_dir = os.fspath(epath.Path(self.data_dir) / build_lib.OUTCOMES_DIR)  # also gs://
    drop = ("reference_frames",) if self.builder_config.clip.store_frames else ("frames",)
    self._beam_build = dict(raw_dir=raw_dir, cache_dir=cache_dir, clip_cfg=clip_cfg,
                            lists=lists, parts=parts, outcome_dir=outcome_dir)
    # Unlike the plain build, which splits will end up empty is only known afterwards.
    return {split: build_lib.beam_clip_examples(raw_dir, cache_dir, clip_cfg, members,
                                                outcome_dir, drop)
            for split, members in parts.items() if members}

  def _process_pipeline_result(self, pipeline_result) -> None:
    """After a Beam build: the same report as the plain build's, from the workers' records."""
    from etils import epath
    b = getattr(self, "_beam_build", None)
    if b is None:
      return
    outcomes = build_lib.read_beam_outcomes(b["outcome_dir"], b["lists"].clips)
    workers = {o.worker for o in outcomes if o.status == "built"}
    result = build_lib.BuildResult(outcomes, b["cache_dir"], b["clip_cfg"], b["lists"].problems,
                                   time.perf_counter() - self._started, max(1, len(workers)))
    build_lib.write_report(result, self.data_dir,
                           {k: [c.name for c in v] for k, v in b["parts"].items()})
    epath.Path(b["outcome_dir"]).rmtree(missing_ok=True)

  def _generate_examples(self, cache_dir: Path, entries: list, clip_cfg):
    store_frames = self.builder_config.clip.store_frames
    for entry in entries:
      ex = clips_lib.load_clip(build_lib.clip_path(cache_dir, entry.name),
                               build_lib.clip_signature(clip_cfg, entry))
      ex.pop("reference_frames" if store_frames else "frames", None)
      yield entry.name, ex


# ----------------------------------------------------------------------------- tf.data access


def add_tfrecord_copy(builder_dir: str | os.PathLike) -> list[Path]:
  """Writes every array_record shard of a prepared dataset again as tfrecord (same records)
  and registers `tfrecord` as an alternative file format, so `tfds.load(...,
  read_config=tfds.ReadConfig(file_format="tfrecord"))` works. Returns the new files."""
  import tensorflow as tf
  from array_record.python.array_record_module import ArrayRecordReader
  builder_dir = Path(builder_dir)
  shards = sorted(builder_dir.glob("*.array_record-*"))
  if not shards:
    raise FileNotFoundError(f"no array_record shards in {builder_dir}")
  written = []
  for shard in shards:
    out = shard.with_name(shard.name.replace(".array_record-", ".tfrecord-"))
    reader = ArrayRecordReader(str(shard))
    try:
      tmp = out.with_name(f".{out.name}.part")
      with tf.io.TFRecordWriter(str(tmp)) as writer:
        for i in range(reader.num_records()):
          writer.write(reader.read([i])[0])
      os.replace(tmp, out)
    finally:
      reader.close()
    written.append(out)
  info = tfds.builder_from_directory(os.fspath(builder_dir)).info
  if tfds.core.file_adapters.FileFormat.TFRECORD not in info.alternative_file_formats:
    info.add_alternative_file_format("tfrecord")
    info.write_to_directory(os.fspath(builder_dir))
  return written


def main(argv: list[str] | None = None) -> None:
  """`tfds build` for this folder, without the CLI's apache_beam import (so `beam` is needed
  only with `--beam_pipeline_options`); `--also_tfrecord` adds the tfrecord copy afterwards."""
  from absl import app
  from tensorflow_datasets.scripts.cli import build as tfds_build
  from tensorflow_datasets.scripts.cli import cli_utils

  argv = list(sys.argv if argv is None else argv)
  also_tfrecord = "--also_tfrecord" in argv
  argv = [a for a in argv if a != "--also_tfrecord"]
  if not any(not a.startswith("-") for a in argv[1:]):
    argv.insert(1, "hdtf")  # the dataset to build: this one (registered by this import)
  parse = cli_utils.make_flags_parser(tfds_build.Args, description="Build the HDTF dataset.")

  def run(args) -> None:
    args.execute()
    if also_tfrecord:
      data_dir = args.paths.data_dir
      names = [args.generation.config] if args.generation.config else [
          c.name for c in Builder.BUILDER_CONFIGS]
      for name in names:
        builder = Builder(config=name, data_dir=os.fspath(data_dir))
        if builder.is_prepared():
          add_tfrecord_copy(builder.data_dir)

  app.run(run, argv=argv, flags_parser=parse)

