"""experiments/stage_cli.py: a workdir trained with other model settings is refused in one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import stage_cli
from experiments.configs import stage1 as stage1_configs
from experiments.configs import stage2 as stage2_configs

REPO = Path(__file__).resolve().parents[1]


def _save(config, workdir: Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def test_same_model_settings_pass_and_training_fields_may_change(tmp_path):
  c = stage2_configs.get_config("tiny")
  _save(c, tmp_path)
  c.train.num_steps = 123          # schedule, data and logging are free to change on resume
  c.data.batch_size = 8
  stage_cli.check_workdir_config(c, tmp_path, "stage2")
  stage_cli.check_workdir_config(c, tmp_path / "fresh", "stage2")  # no earlier run: nothing to check


def test_changed_model_setting_is_named_with_both_values(tmp_path):
  c = stage2_configs.get_config("tiny")
  _save(c, tmp_path)
  c.model.generator.pixel_skip = "residual" if c.model.generator.pixel_skip != "residual" else "blend"
  with pytest.raises(stage_cli.WorkdirMismatch) as e:
    stage_cli.check_workdir_config(c, tmp_path, "stage2")
  msg = str(e.value)
  assert "\n" not in msg and "model.generator.pixel_skip=" in msg and str(tmp_path) in msg
  # Another preset: many fields differ, the message stays one line and counts the rest.
  with pytest.raises(stage_cli.WorkdirMismatch, match=r"and \d+ more"):
    stage_cli.check_workdir_config(stage2_configs.get_config("demo"), tmp_path, "stage2")


def test_cli_refuses_a_workdir_of_another_preset_with_one_line(tmp_path):
  _save(stage1_configs.get_config("demo"), tmp_path)
  res = subprocess.run([sys.executable, "-m", "experiments.stage1",
                        "--config=experiments/configs/stage1.py:tiny", f"--workdir={tmp_path}",
                        "--mode=eval"], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert res.returncode == 1
  lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
  assert lines[-1].startswith("stage 1: ") and "was trained with" in lines[-1], res.stderr[-2000:]
  assert "Traceback" not in res.stderr
  assert json.loads((tmp_path / "config.json").read_text())["preset"] == "demo"  # left untouched
