"""Evaluate a trained system on the held-out split: both stages' tables and the full pipeline
(audio -> G_ani -> F_app -> G_vid -> frames), see `hdtf_jax.evaluation`.

  python -m experiments.evaluate --workdir=runs/demo
  # = --stage1=runs/demo/stage1 --stage2=runs/demo/stage2 --out=runs/demo/eval
  python -m experiments.evaluate --stage1=runs/s1 --stage2=runs/s2 --out=runs/eval \
      --data_dir=~/tfds --max_clips=32 --max_frames=0 --parts=pipeline

Writes `<out>/results.md`, `results.json`, `tracks.png`, `distributions.png`, `frames.png`.
Bad input (missing workdir or checkpoint, a workdir of the other stage, no dataset) exits with
code 2 and one line on stderr.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/evaluate.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

from hdtf_jax import evaluation

_D = evaluation.EvalConfig()
_WORKDIR = flags.DEFINE_string("workdir", None, "demo-style run directory: stage1/, stage2/ "
                               "inside it, results to <workdir>/eval")
_STAGE1 = flags.DEFINE_string("stage1", None, "stage-1 run directory (default <workdir>/stage1)")
_STAGE2 = flags.DEFINE_string("stage2", None, "stage-2 run directory (default <workdir>/stage2)")
_OUT = flags.DEFINE_string("out", None, "output directory (default <workdir>/eval)")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the stage-2 run's)")
_TFDS_NAME = flags.DEFINE_string("tfds_name", None, "hdtf/256 or hdtf/512 (default: the "
                                 "stage-2 run's)")
_PARTS = flags.DEFINE_list("parts", list(evaluation.PARTS), "stage1, stage2, pipeline")
_MAX_CLIPS = flags.DEFINE_integer("max_clips", _D.max_clips, "held-out clips (0: all)")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", _D.max_frames, "frames per clip (0: all)")
_BATCH = flags.DEFINE_integer("batch_size", _D.batch_size, "G_vid frames per jitted call")
_CPBD = flags.DEFINE_bool("cpbd", None, "CPBD (default: the stage-2 config's eval.cpbd)")
_LMD = flags.DEFINE_bool("lmd", None, "mouth LMD (default: the stage-2 config's eval.lmd)")
_FITTED = flags.DEFINE_bool("fitted_params", _D.fitted_params,
                            "also score G_vid driven by the fitted parameters")
_REUSE = flags.DEFINE_bool("reuse", _D.reuse_stage_evals,
                           "reuse a stage's eval_<step>.json of its latest checkpoint")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and tfds log every read at INFO
  work = Path(_WORKDIR.value) if _WORKDIR.value else None
  if work is None and not (_STAGE1.value and _STAGE2.value and _OUT.value):
    raise app.UsageError("give --workdir, or all of --stage1, --stage2 and --out")
  stage1 = _STAGE1.value or str(work / "stage1")
  stage2 = _STAGE2.value or str(work / "stage2")
  out = _OUT.value or str(work / "eval")
  config = evaluation.EvalConfig(
      max_clips=_MAX_CLIPS.value or None, max_frames=_MAX_FRAMES.value or None,
      batch_size=_BATCH.value, cpbd=_CPBD.value, lmd=_LMD.value, fitted_params=_FITTED.value,
      reuse_stage_evals=_REUSE.value)
  try:
    results = evaluation.evaluate(stage1, stage2, out, data_dir=_DATA_DIR.value,
                                  tfds_name=_TFDS_NAME.value, parts=_PARTS.value, config=config)
  except (evaluation.gen.GenerateError, FileNotFoundError) as e:  # missing run, data, dataset
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  print(evaluation.markdown(results))
  print(f"wrote {out}/results.md, results.json and plots")
  return 0


if __name__ == "__main__":
  app.run(main)
