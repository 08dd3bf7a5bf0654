"""The whole system on built-in demo data, one command on a fresh machine.

    python -m experiments.demo --workdir runs/demo

Steps (each one skipped when its output already exists, so a rerun resumes):
  1. generate the HDTF-like demo `manual_dir` from real face photos
     (`hdtf_jax.data.demo_source`),
  2. build it as the TFDS dataset `hdtf/params` (and `hdtf/256` for stage 2),
  3. train and evaluate stage 1 (G_ani, `demo` preset),
  4. train and evaluate stage 2 (G_vid, `demo` preset).
Every step runs as its own process (the same commands a user would type), so a
failure names the step and the command to rerun it by hand.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "where everything goes")
_SEED = flags.DEFINE_integer("seed", 0, "demo source seed")
_STAGES = flags.DEFINE_list("stages", ["source", "data", "stage1", "stage2"],
                            "steps to run (source, data, stage1, stage2)")
_STAGE1_PRESET = flags.DEFINE_string("stage1_preset", "demo", "experiments/configs/stage1.py preset")
_STAGE2_PRESET = flags.DEFINE_string("stage2_preset", "demo", "experiments/configs/stage2.py preset")
_EXTRA = flags.DEFINE_multi_string("override", [], "extra config overrides, e.g. "
                                   "'stage1:--config.train.num_steps=100'")

REPO = Path(__file__).resolve().parent.parent


def _run(name: str, cmd: list[str]) -> None:
  print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
  t0 = time.time()
  res = subprocess.run(cmd, cwd=REPO)
  if res.returncode != 0:
    raise SystemExit(f"demo step '{name}' failed (exit {res.returncode}); rerun it with:\n  "
                     f"{shlex.join(cmd)}")
  print(f"=== {name}: done in {time.time() - t0:.0f} s", flush=True)


def _overrides(stage: str) -> list[str]:
  return [o.split(":", 1)[1] for o in _EXTRA.value if o.startswith(stage + ":")]


def main(argv):
  del argv
  work = Path(_WORKDIR.value).absolute()
  work.mkdir(parents=True, exist_ok=True)
  source, data = work / "source", work / "tfds"
  py = sys.executable
  stages = set(_STAGES.value)
  if not (REPO / "experiments" / "stage2.py").exists():
    stages.discard("stage2")  # stage 2 is not part of this checkout yet

  if "source" in stages:
    if (source / "WDA_annotion_time.txt").exists() or (source / "WRA_annotion_time.txt").exists():
      print(f"=== source: {source} exists, skipped")
    else:
      _run("source", [py, "-m", "hdtf_jax.data.demo_source", "--out", str(source),
                      "--seed", str(_SEED.value)])

  configs = ["params"] + (["256"] if "stage2" in stages else [])
  if "data" in stages:
    for config in configs:
      if list((data / "hdtf" / config).glob("*/dataset_info.json")):
        print(f"=== data hdtf/{config}: exists, skipped")
        continue
      _run(f"data hdtf/{config}", [py, "-m", "data_builders.hdtf", f"--manual_dir={source}",
                                   f"--data_dir={data}", f"--config={config}"])

  runs = {}
  for stage, preset in (("stage1", _STAGE1_PRESET.value), ("stage2", _STAGE2_PRESET.value)):
    if stage not in stages:
      continue
    run_dir = work / stage
    base = [py, "-m", f"experiments.{stage}", f"--config=experiments/configs/{stage}.py:{preset}",
            f"--workdir={run_dir}", "--config.data.source=tfds", f"--config.data.data_dir={data}",
            *_overrides(stage)]
    _run(f"{stage} train", base + ["--mode=train"])
    _run(f"{stage} eval", base + ["--mode=eval"])
    runs[stage] = run_dir

  print("\nDemo finished.")
  print(f"  demo source (raw videos + annotation lists): {source}")
  print(f"  TFDS data_dir: {data}  (tfds.data_source('hdtf/params', data_dir=...))")
  for stage, run_dir in runs.items():
    print(f"  {stage}: checkpoints, metrics.jsonl, eval tables and images in {run_dir}")
  if runs:
    print(f"  TensorBoard: tensorboard --logdir {work}")


if __name__ == "__main__":
  app.run(main)
