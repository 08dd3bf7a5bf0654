"""TFDS builder test on dummy_data (4 clips built, 5 skipped, speaker Radio1 held out).

Built here as tfrecord so the standard test reads it with `as_dataset` (tf.data); the default
array_record files and `tfds.data_source` are covered by tests/test_pipelines.py.
"""
import os
import tempfile

import tensorflow_datasets as tfds

from data_builders.hdtf import hdtf_dataset_builder


class HdtfTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = hdtf_dataset_builder.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["params"]  # 256 is built and read in tests/test_pipelines.py
  SPLITS = {"train": 2, "test": 2}  # AstroNaut0_0, EileenCollins1_0 | Radio1_0, Radio1_1
  SKIP_CHECKSUMS = True  # manual download: no urls
  # The builder hands local paths to ffmpeg and numpy; tf.io.gfile cannot serve those.
  MOCK_OUT_FORBIDDEN_OS_FUNCTIONS = False

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # The test's download_dir is dummy_data itself: keep the clip cache out of the repo.
    cls._cache = tempfile.TemporaryDirectory()
    cls._env = {k: os.environ.get(k) for k in ("HDTF_CACHE_DIR", "HDTF_NUM_WORKERS")}
    os.environ["HDTF_CACHE_DIR"] = cls._cache.name
    os.environ["HDTF_NUM_WORKERS"] = "0"  # in-process: the fit compiles once per test process

  @classmethod
  def tearDownClass(cls):
    for k, v in cls._env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    cls._cache.cleanup()
    super().tearDownClass()

  def _make_builder(self, config=None):
    return self.dataset_class(data_dir=self.tmp_dir, config=config, version=self.VERSION,
                              file_format="tfrecord")


if __name__ == "__main__":
  tfds.testing.test_main()
