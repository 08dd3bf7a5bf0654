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

import functools
import os
import sys

if __package__ in (None, ""):  # `python experiments/stage2.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import stage_cli
from hdtf_jax.train import stage2

# run(config, workdir, mode="train", step=None): the same, from Python.
run = functools.partial(stage_cli.run, stage2)

if __name__ == "__main__":
  stage_cli.main("stage 2", stage2, "experiments/configs/stage2.py:demo")
