"""The command line of the training stages (`experiments/stage1.py`, `experiments/stage2.py`).

Flags: --config (file:preset, any field overridable as --config.a.b=value), --workdir, --mode
(train | eval), --step (eval: checkpoint step). Before anything touches a device, `jax.distributed`
starts from the config's `distributed` block (see experiments/configs/common.py); then the
stage's `train` (resumes from `<workdir>/checkpoints`) or `evaluate_checkpoint` runs. A missing
file or a non-finite loss ends with one line on stderr and exit status 1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

from absl import app, flags, logging
from ml_collections import config_flags

from hdtf_jax.train import mesh as mesh_lib

MODES = ("train", "eval")
# Config sections a checkpoint's parameter tree depends on: resuming or evaluating a workdir with
# different values would fail deep inside orbax (tree mismatch) or silently mix two models.
MODEL_SECTIONS = ("model", "flow")


class WorkdirMismatch(ValueError):
  """The workdir holds a run made with other model settings than the given config."""


def _flatten(tree, prefix: str = "") -> dict:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def check_workdir_config(config, workdir: str | Path, name: str = "") -> None:
  """Raise WorkdirMismatch (one line) when `workdir/config.json`, saved by an earlier training run,
  names other model settings than `config`: a preset or override changed since that run."""
  path = Path(workdir) / "config.json"
  prefix = f"{name}: " if name else ""
  if not path.is_file():
    return
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise WorkdirMismatch(f"{prefix}{path} is unreadable ({e}); move it away or use another workdir")
  now = json.loads(config.to_json_best_effort())
  diffs = []
  for section in MODEL_SECTIONS:
    a, b = _flatten(saved.get(section, {}), section), _flatten(now.get(section, {}), section)
    diffs += [f"{k}={a.get(k)!r} (now {b.get(k)!r})" for k in sorted(set(a) | set(b))
              if a.get(k) != b.get(k)]
  if diffs:
    shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    raise WorkdirMismatch(f"{prefix}{workdir} was trained with {shown}; pass the same preset "
                          "and overrides, or use another workdir")


def run(stage: ModuleType, config, workdir: str, mode: str = "train",
        step: int | None = None) -> dict:
  """`stage.train(config, workdir)` or `stage.evaluate_checkpoint(config, workdir, step=step)`,
  after checking that the workdir's earlier run used the same model settings."""
  check_workdir_config(config, workdir)
  if mode == "train":
    return stage.train(config, workdir)
  if mode == "eval":
    return stage.evaluate_checkpoint(config, workdir, step=step)
  raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def main(name: str, stage: ModuleType, config_example: str) -> None:
  """Defines the flags and runs `stage` under absl (call from the entry's `__main__`)."""
  config = config_flags.DEFINE_config_file(
      "config", None, f"{name} config file and preset, e.g. {config_example}", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, eval files)")
  mode = flags.DEFINE_enum("mode", "train", list(MODES), "train (and resume) or evaluate")
  step = flags.DEFINE_integer("step", None, "eval: checkpoint step (default: the latest)")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax and tfds log every save and read at INFO
    c = config.value
    mesh_lib.initialize_distributed(**c.get("distributed", {}))
    logging.info("%s %s, preset %s, workdir %s", name, mode.value, c.preset, workdir.value)
    try:
      run(stage, c, workdir.value, mode.value, step.value)
    except (FileNotFoundError, FloatingPointError, WorkdirMismatch) as e:  # say it in one line
      sys.exit(str(e) if str(e).startswith(name) else f"{name}: {e}")

  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main)
