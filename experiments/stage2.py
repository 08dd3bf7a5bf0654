"""Stage 2: train or evaluate G_vid, the flow-guided video generator.

  python -m experiments.stage2 --config=experiments/configs/stage2.py:demo --workdir=runs/s2
  python -m experiments.stage2 --config=experiments/configs/stage2.py:demo --workdir=runs/s2 \
      --mode=eval
  # ablations (paper Table 3), each in its own workdir, then named at eval time:
  python -m experiments.stage2 --config=experiments/configs/stage2.py:demo \
      --config.model.use_flow=False --workdir=runs/s2_no_flow
  python -m experiments.stage2 --config=experiments/configs/stage2.py:demo --workdir=runs/s2 \
      --mode=eval --config.eval.no_flow_workdir=runs/s2_no_flow
  # real data and weights: --config=...:paper --config.data.source=tfds \
  #   --config.data.data_dir=~/tfds --config.loss.vgg_weights=~/vgg19.npz

`train` resumes from `<workdir>/checkpoints` when there is one; `eval` prints the Markdown table
(model, ablations, warp-only baseline, reference frame) and writes `<workdir>/eval_<step>.json`
and `.md`.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python experiments/stage2.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging
from ml_collections import config_flags

from hdtf_jax.train import mesh as mesh_lib
from hdtf_jax.train import stage2

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "stage-2 config file and preset, e.g. experiments/configs/stage2.py:demo",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, eval files)")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and resume) or evaluate")
_STEP = flags.DEFINE_integer("step", None, "eval: checkpoint step (default: the latest)")


def run(config, workdir: str, mode: str = "train", step: int | None = None) -> dict:
  if mode == "train":
    return stage2.train(config, workdir)
  if mode == "eval":
    return stage2.evaluate_checkpoint(config, workdir, step=step)
  raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  mesh_lib.initialize_distributed()
  logging.info("stage 2 %s, preset %s, workdir %s", _MODE.value, _CONFIG.value.preset,
               _WORKDIR.value)
  run(_CONFIG.value, _WORKDIR.value, _MODE.value, _STEP.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
