"""Stage 1: train or evaluate G_ani, the audio-to-animation generator.

  python -m experiments.stage1 --config=experiments/configs/stage1.py:demo --workdir=runs/s1
  python -m experiments.stage1 --config=experiments/configs/stage1.py:demo --workdir=runs/s1 \
      --mode=eval
  # any field can be overridden: --config.data.source=tfds --config.data.data_dir=~/tfds
  # several processes or hosts: --config.distributed.* and --config.mesh.* (experiments/configs/common.py)

`train` resumes from `<workdir>/checkpoints` when there is one; `eval` prints the Markdown table
of the paper's metrics (model and baselines) and writes `<workdir>/eval_<step>.json`.
"""
from __future__ import annotations

import functools
import os
import sys

if __package__ in (None, ""):  # `python experiments/stage1.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import stage_cli
from hdtf_jax.train import stage1

# run(config, workdir, mode="train", step=None): the same, from Python.
run = functools.partial(stage_cli.run, stage1)

if __name__ == "__main__":
  stage_cli.main("stage 1", stage1, "experiments/configs/stage1.py:demo")
