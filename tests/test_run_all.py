"""benchmarks/run_all.py's tables on fake benchmark JSON (no benchmark runs): figures, the
HDTF preprocessing projection, all.md, and the README merge (quick figures never replace
full ones)."""
import json
from pathlib import Path

import pytest

from benchmarks import run_all

ROOT = Path(__file__).resolve().parent.parent
MACHINE = {"cpu": "Fake CPU 9000", "cores": 64, "gpu": "NVIDIA H100 80GB HBM3"}


def _write(directory: Path, name: str, results: dict, quick: bool) -> None:
  payload = {"benchmark": name, "machine": MACHINE, "date": "2025-01-02 03:04:05",
             "results": results, "quick": quick}
  (directory / f"{name}.json").write_text(json.dumps(payload))


@pytest.fixture()
def summary(tmp_path):
  _write(tmp_path, "warp", {"rows": [
      {"shape": "8x256x256x64", "pass": "fwd", "jax_ms": 40.0, "x_copy": 1.1, "torch_ms": 160.0,
       "speedup_vs_torch": 4.0}]}, quick=False)
  _write(tmp_path, "data", {"projection": {"frames_per_s_per_core": 100.0}, "pipelines": [
      {"pipeline": "stage1 (W=64, B=8, params)", "threads": 2, "samples_per_s": 321.0}]},
         quick=True)
  _write(tmp_path, "stage1", {"train": [
      {"preset": "tiny", "variant": "fused step (ours)", "batch": 4, "window": 64,
       "steps_per_s": 200.0},
      {"preset": "tiny", "variant": "two jitted calls (G, then D)", "batch": 4, "window": 64,
       "steps_per_s": 50.0}], "inference": []}, quick=True)
  _write(tmp_path, "stage2", {"rows": [
      {"mode": "infer", "size": 512, "dtype": "bfloat16", "batch": 8, "frames_per_s": 310.0,
       "peak_memory_mb": 2048.0},
      {"mode": "torch", "size": 512, "dtype": "bfloat16", "batch": 8, "frames_per_s": 150.0},
      {"mode": "train", "size": 512, "dtype": "bfloat16", "batch": 8, "error": "OOM"}]},
         quick=False)
  (tmp_path / "audio.json").write_text("{not json")
  return run_all.collect(tmp_path, {"face_flow": {"status": "timeout"}})


def test_figures_projection_and_markdown(summary):
  figs = {f["key"]: f for f in summary["figures"]}
  warp = figs["grid_sample fwd, 8x256x256x64"]
  assert warp["value"].startswith("40 ms") and "160 ms" in warp["alternative"]
  assert not warp["quick"] and "Fake CPU 9000, 64 cores, NVIDIA H100" in warp["machine"]
  # All of HDTF: 15.8 h x 3600 s x 25 fps = 1.422 M frames at 100 frames/s per worker.
  hours = {n: float(figs[k]["value"].split()[0]) for n in run_all.WORKERS
           for k in figs if k.startswith("preprocess all of HDTF") and k.endswith(
               f"on {n} worker{'s' if n > 1 else ''}")}
  assert hours == {1: pytest.approx(3.95, abs=0.005), 16: pytest.approx(0.247, abs=0.0005),
                   64: pytest.approx(0.0617, abs=0.00005)}
  s1 = figs["stage-1 train step, tiny B=4 T=64"]
  assert s1["value"].startswith("200 steps/s") and "50 steps/s" in s1["alternative"]
  assert s1["quick"]
  g = figs["G_vid inference, 512 px, bfloat16, batch 8"]
  assert "310 frames/s" in g["value"] and "peak 2048 MB" in g["value"] and "150" in g["alternative"]
  assert not any(k.startswith("G_vid train step") for k in figs)  # the failed case gives no row
  status = summary["benchmarks"]
  assert status["audio"]["status"] == "unreadable" and status["face_flow"]["status"] == "timeout"
  assert status["warp"]["status"] == "ok" and status["generate"]["status"] == "no results"
  md = run_all.markdown(summary)
  assert md.count("| quick,") == 1 + 1 + 3 + 1 and "| full," in md  # data (2 + 3), stage1 (1)
  assert "Not measured: audio (unreadable" in md and "face_flow (timeout)" in md


def test_readme_merge_keeps_full_figures_and_adds_quick_ones(summary):
  text = "\n".join([
      "# x", "", "intro", run_all.BEGIN,
      "| figure | ours (full run) | alternative, same run | quick run (`run_all --quick`) |",
      "|---|---|---|---|",
      "| stage-1 train step, tiny B=4 T=64 | 112 steps/s (old full run) | two calls 29 | - |",
      "| grid_sample fwd, 8x256x256x64 | 85 ms | PyTorch 168 ms | - |",
      "| hand-measured row | 1 s | - | - |",
      "", "a note inside the block", run_all.END, "", "after"])
  out = run_all.update_readme_text(text, summary)
  rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in out.splitlines()
          if line.startswith("| ") and not line.startswith("| figure")}
  s1 = rows["stage-1 train step, tiny B=4 T=64"]
  assert s1[1] == "112 steps/s (old full run)" and s1[2] == "two calls 29"  # full figure kept
  assert s1[3].startswith("200 steps/s")  # the quick figure in its own column
  warp = rows["grid_sample fwd, 8x256x256x64"]
  assert warp[1].startswith("40 ms") and "Fake CPU 9000" in warp[1] and "160 ms" in warp[2]
  assert rows["hand-measured row"][1] == "1 s"
  assert any(k.startswith("preprocess all of HDTF") for k in rows)  # new figures appended
  assert "a note inside the block" in out and out.endswith("after")
  assert out.count(run_all.BEGIN) == 1 and out.count(run_all.END) == 1
  assert run_all.update_readme_text(out, summary) == out  # idempotent
  with pytest.raises(ValueError, match="performance-table:begin"):
    run_all.update_readme_text("no markers", summary)


def test_real_readme_has_one_marked_table_that_merges(summary):
  text = (ROOT / "README.md").read_text()
  out = run_all.update_readme_text(text, summary)
  row = next(line for line in text.splitlines()
             if line.startswith("| grid_sample fwd+bwd, 8x256x256x64 |"))
  assert row in out  # untouched full figure (the fake summary has no such row)
  assert "| stage-1 train step, tiny B=4 T=64 | 112 steps/s" in out
