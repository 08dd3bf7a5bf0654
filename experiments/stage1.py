"""Stage 1: train or evaluate G_ani, the audio-to-animation generator.

  python -m experiments.stage1 --config=experiments/configs/stage1.py:demo --workdir=runs/s1
  python -m experiments.stage1 --config=experiments/configs/stage1.py:demo --workdir=runs/s1 \
      --mode=eval
  # any field can be overridden: --config.data.source=tfds --config.data.data_dir=~/tfds

`train` resumes from `<workdir>/checkpoints` when there is one; `eval` prints the Markdown table
of the paper's metrics (model and baselines) and writes `<workdir>/eval_<step>.json`.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python experiments/stage1.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging
from ml_collections import config_flags

from hdtf_jax.train import mesh as mesh_lib
from hdtf_jax.train import stage1

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "stage-1 config file and preset, e.g. experiments/configs/stage1.py:demo",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, eval JSON)")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and resume) or evaluate")
_STEP = flags.DEFINE_integer("step", None, "eval: checkpoint step (default: the latest)")


def run(config, workdir: str, mode: str = "train", step: int | None = None) -> dict:
  if mode == "train":
    return stage1.train(config, workdir)
  if mode == "eval":
    return stage1.evaluate_checkpoint(config, workdir, step=step)
  raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and tfds log every save and read at INFO
  mesh_lib.initialize_distributed()
  logging.info("stage 1 %s, preset %s, workdir %s", _MODE.value, _CONFIG.value.preset,
               _WORKDIR.value)
  run(_CONFIG.value, _WORKDIR.value, _MODE.value, _STEP.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
