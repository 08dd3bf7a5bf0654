"""Runs every benchmark and gathers their figures into one JSON and one Markdown table.

  .venv/bin/python -m benchmarks.run_all [--quick] [--only warp,stage1] [--update-readme]
  .venv/bin/python -m benchmarks.run_all --collect-only --update-readme   # no runs, re-tabulate

Each benchmark (`benchmarks/<name>.py`) runs as its own subprocess (so one crash or hang costs
only its row) and writes `benchmarks/results/<name>.json`; `--quick` passes each its quick
mode (small sizes, few repeats: for checking the suite, not for quoting). The figures then go
to `benchmarks/results/all.json` and `all.md`: the machine (CPU model, cores, GPU), then one
row per figure -- warp vs PyTorch, F_app, landmarks, 3DMM fitting, data pipelines, stage-1 and
stage-2 train and inference throughput, peak memory, preprocessing frames/s per core and the
projected time to preprocess all of HDTF (15.8 h at 25 fps) on 1, 16 and 64 workers -- each
saying whether it comes from a quick run.

`--update-readme` rewrites the table between `<!-- performance-table:begin -->` and
`<!-- performance-table:end -->` in README.md. Rows are matched by their first cell: a figure
from a full run replaces the row's "ours" and "alternative" cells, a quick-run figure only
fills the "quick run" column (so it never overwrites a full measurement); rows that no run
produced stay as they are, new figures are appended.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `python benchmarks/run_all.py`
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("warp", "audio", "face_landmarks", "face_fitting", "face_flow", "data", "stage1",
              "stage2", "generate")
# Quick arguments for a benchmark without a --quick flag of its own.
QUICK_FALLBACK = {"generate": ["--presets", "tiny/tiny", "--seconds", "2"]}
HDTF_HOURS = 15.8
HDTF_FRAMES = HDTF_HOURS * 3600 * 25  # ~1.42 M frames at 25 fps
WORKERS = (1, 16, 64)
BEGIN, END = "<!-- performance-table:begin -->", "<!-- performance-table:end -->"
HEADER = ("| figure | ours (full run) | alternative, same run | quick run (`run_all --quick`) |\n"
          "|---|---|---|---|")


# ----------------------------------------------------------------------------------- running

def machine_description() -> dict[str, Any]:
  """CPU model, cores and GPU name(s) (nvidia-smi, else a JAX accelerator), without starting
  JAX in this process."""
  cpu = ""
  try:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "")
  except OSError:
    pass
  info: dict[str, Any] = {"cpu": cpu or os.uname().machine, "cores": os.cpu_count(), "gpu": None}
  if shutil.which("nvidia-smi"):
    try:
      out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30).stdout
      names = [n.strip() for n in out.splitlines() if n.strip()]
      info["gpu"] = ", ".join(names) or None
    except (OSError, subprocess.SubprocessError):
      pass
  return info


def machine_label(m: dict | None) -> str:
  if not m:
    return "unknown machine"
  label = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"
  gpu = m.get("gpu") or next((d for d in m.get("jax_devices", []) if "cpu" not in d.lower()), None)
  return label + (f", {gpu}" if gpu else ", no GPU")


def has_quick_flag(name: str) -> bool:
  return "--quick" in (ROOT / "benchmarks" / f"{name}.py").read_text()


def run_benchmark(name: str, quick: bool, timeout: float, results_dir: Path) -> dict:
  """Runs `python -m benchmarks.<name>` (quick or not); returns its status and wall time and
  marks its JSON with `quick` and the machine."""
  script = ROOT / "benchmarks" / f"{name}.py"
  if not script.exists():
    return {"status": "missing"}
  out = results_dir / f"{name}.json"
  cmd = [sys.executable, "-m", f"benchmarks.{name}", f"--out={out}"]
  if quick:
    cmd += ["--quick"] if has_quick_flag(name) else QUICK_FALLBACK.get(name, [])
  if out.exists():
    out.unlink()  # a failed run must not leave the previous figures looking fresh
  t0 = time.perf_counter()
  try:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"status": "timeout", "wall_s": time.perf_counter() - t0, "command": " ".join(cmd)}
  wall = time.perf_counter() - t0
  status = {"wall_s": wall, "command": " ".join(cmd[1:])}
  if res.returncode or not out.exists():
    tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
    return {**status, "status": "failed", "error": " | ".join(tail)}
  payload = json.loads(out.read_text())
  payload["quick"] = quick
  payload.setdefault("machine", {}).update(
      {k: v for k, v in machine_description().items() if v is not None})
  out.write_text(json.dumps(payload, indent=2, default=float))
  return {**status, "status": "ok"}


# ------------------------------------------------------------------------------- figures

def _f(x: Any, digits: int = 3) -> str:
  """3 significant digits; whole numbers from 1000 up (2048, not 2.05e+03)."""
  try:
    x = float(x)
  except (TypeError, ValueError):
    return str(x)
  return f"{x:.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"


def _fig(key: str, value: str, alternative: str = "") -> dict:
  return {"key": key, "value": value, "alternative": alternative}


def warp_figures(r: dict) -> list[dict]:
  out = []
  no_torch = (r.get("notes") or {}).get("torch", "") if "torch not" in str(
      (r.get("notes") or {}).get("torch", "")) else ""
  for row in r.get("rows", []):
    value = f"{_f(row['jax_ms'])} ms"
    if row.get("x_copy") is not None:
      value += f" ({_f(row['x_copy'])}x a copy of the same bytes)"
    alt = ""
    if row.get("torch_ms") is not None:
      alt = f"PyTorch `grid_sample` {_f(row['torch_ms'])} ms (ours {_f(row.get('speedup_vs_torch'))}x)"
      if row.get("floor_bound") is not None:  # torch / copy: the most any sampler could reach
        alt += f"; copy-floor bound {_f(row['floor_bound'])}x"
    elif no_torch:
      alt = no_torch
    out.append(_fig(f"grid_sample {row['pass']}, {row['shape']}", value, alt))
  return out


def audio_figures(r: dict) -> list[dict]:
  rows = r.get("rows", [])
  ours = next((x for x in rows if x.get("impl", "").startswith("hdtf_jax.audio_features")), None)
  ref = next((x for x in rows if x.get("impl", "").startswith("librosa mfcc")), None)
  if not ours:
    return []
  alt = f"librosa MFCC + pYIN defaults {_f(ref['x_realtime'])}x real time" if ref else ""
  return [_fig("audio features (15-d, 100 fps)", f"{_f(ours['x_realtime'])}x real time", alt)]


def landmarks_figures(r: dict) -> list[dict]:
  out = []
  for run in r.get("runs", []):
    rows = {x["case"]: x for x in run.get("rows", [])}
    track = rows.get("track + One-Euro") or rows.get("track (raw)")
    naive = rows.get("naive: detect + mesh every frame")
    if track:
      out.append(_fig(f"landmarks, tracking {run['frame_size']} ({r.get('threads', 1)} thread)",
                      f"{_f(track['fps'])} frames/s",
                      f"detect + mesh every frame {_f(naive['fps'])} frames/s" if naive else ""))
  return out


def fitting_figures(r: dict) -> list[dict]:
  rows = r.get("rows", [])
  ours = next((x for x in rows if x.get("input") == "synthetic" and "fit_clip" in x["method"]),
              None)
  ref = next((x for x in rows if x.get("input") == "synthetic" and "scipy" in x["method"]), None)
  if not ours:
    return []
  value = (f"{_f(ours['frames_per_s'])} frames/s ({_f(ours.get('frames_per_cpu_s'))} per CPU-s), "
           f"{_f(ours['rmse_px'], 2)} px RMSE")
  alt = f"scipy `least_squares` per frame {_f(ref['frames_per_s'])} frames/s" if ref else ""
  return [_fig("3DMM fit, batched, synthetic clip", value, alt)]


def flow_figures(r: dict) -> list[dict]:
  out = []
  rows = r.get("rows", [])
  for size in sorted({x["size"] for x in rows}):
    at = [x for x in rows if x["size"] == size]
    ours = next((x for x in at if x["method"].startswith("ours")), None)
    others = [x for x in at if not x["method"].startswith("ours")]
    if ours:
      alt = "; ".join(f"{x['method']} {_f(x['fps_cpu'])}" for x in others)
      out.append(_fig(f"F_app at {size}x{size}", f"{_f(ours['fps_cpu'])} frames per CPU-s "
                      f"({_f(ours['fps'])} wall)", alt))
  return out


def data_figures(r: dict) -> list[dict]:
  out = []
  proj = r.get("projection") or {}
  if proj.get("frames_per_s_per_core"):
    out.append(_fig("preprocessing (dataset build), 1080p, per core",
                    f"{_f(proj['frames_per_s_per_core'])} frames per CPU-s"))
  for row in r.get("pipelines", []):
    out.append(_fig(f"input pipeline {row['pipeline']}, {row['threads']} thread(s)",
                    f"{_f(row['samples_per_s'])} samples/s"))
  return out


def projection_figures(rate: float | None) -> list[dict]:
  """Hours to preprocess all of HDTF at `rate` frames/s per worker (one core each)."""
  if not rate:
    return []
  return [_fig(f"preprocess all of HDTF ({HDTF_HOURS} h, {HDTF_FRAMES / 1e6:.2f} M frames) on "
               f"{n} worker{'s' if n > 1 else ''}", f"{_f(HDTF_FRAMES / (rate * n) / 3600)} h")
          for n in WORKERS]


def stage1_figures(r: dict) -> list[dict]:
  """One row per preset and shape: our variant ("... (ours)") against the others."""
  out = []
  for part, unit in (("train", "steps/s"), ("inference", "x real time")):
    groups: dict[tuple, list[dict]] = {}
    for row in r.get(part, []):
      groups.setdefault((row["preset"], row.get("batch"), row.get("window")), []).append(row)
    for (preset, b, w), rows in groups.items():
      ours = next((x for x in rows if "(ours)" in x["variant"]), rows[0])
      rate = (lambda x: f"{_f(x.get('steps_per_s'))} steps/s") if part == "train" else (
          lambda x: f"{_f(x.get('x_realtime'))}x real time")
      alt = "; ".join(f"{x['variant']} {rate(x)}" for x in rows if x is not ours)
      key = (f"stage-1 train step, {preset} B={b} T={w}" if part == "train"
             else f"stage-1 inference, {preset}")
      out.append(_fig(key, f"{rate(ours)} ({ours['variant']})", alt))
  return out


def stage2_figures(r: dict) -> list[dict]:
  out = []
  torch = {(x.get("size"), x.get("dtype"), x.get("batch")): x for x in r.get("rows", [])
           if x["mode"] == "torch"}
  rows = [x for x in r.get("rows", []) if not x.get("error")]
  for row in rows:
    mode = row["mode"]
    if mode == "torch":
      continue
    mem = f", peak {_f(row['peak_memory_mb'])} MB" if row.get("peak_memory_mb") else ""
    if mode.startswith("conv"):
      out.append(_fig("one 3x3 conv 1x128x128x256->256 (ceiling)",
                      f"{_f(row.get('gflop_per_s'))} GFLOP/s"))
      continue
    rate = row.get("frames_per_s") if mode == "infer" else row.get("images_per_s")
    unit = "frames/s" if mode == "infer" else "images/s"
    key = (f"G_vid {'inference' if mode == 'infer' else 'train step'}, {row.get('size')} px, "
           f"{row.get('dtype')}, batch {row.get('batch')}")
    alt = ""
    t = torch.get((row.get("size"), row.get("dtype"), row.get("batch")))
    if mode == "infer" and t:
      alt = (f"no PyTorch comparison ({t['error']})" if t.get("error")
             else f"a PyTorch G_vid {_f(t.get('frames_per_s'))} frames/s")
    out.append(_fig(key, f"{_f(rate)} {unit}{mem}", alt))
  return out


def generate_figures(r: dict) -> list[dict]:
  out = []
  for row in r.get("rows", []):
    alt = ""
    if row.get("render_fps_frame_at_a_time") is not None:
      alt = f"render one frame per call {_f(row['render_fps_frame_at_a_time'])} frames/s"
    out.append(_fig(f"generation end to end, {row.get('presets')} ({row.get('size')} px)",
                    f"{_f(row.get('end_to_end_fps'))} frames/s", alt))
  return out


FIGURES: dict[str, Callable[[dict], list[dict]]] = {
    "warp": warp_figures, "audio": audio_figures, "face_landmarks": landmarks_figures,
    "face_fitting": fitting_figures, "face_flow": flow_figures, "data": data_figures,
    "stage1": stage1_figures, "stage2": stage2_figures, "generate": generate_figures}


def collect(results_dir: Path, status: dict[str, dict] | None = None) -> dict:
  """all.json's content from the benchmarks' JSON files in `results_dir`."""
  status = status or {}
  out: dict[str, Any] = {"machine": machine_description(), "date": time.strftime("%Y-%m-%d %H:%M"),
                         "benchmarks": {}, "figures": []}
  for name in BENCHMARKS:
    path = results_dir / f"{name}.json"
    entry: dict[str, Any] = dict(status.get(name, {}))
    if path.exists():
      try:
        payload = json.loads(path.read_text())
        figures = FIGURES[name](payload.get("results", {}))
      except (ValueError, KeyError, TypeError) as e:  # a benchmark's format changed: say so
        entry.update(status="unreadable", error=f"{path.name}: {type(e).__name__}: {e}")
        out["benchmarks"][name] = entry
        continue
      quick = bool(payload.get("quick", False))
      label = machine_label(payload.get("machine"))
      if name == "data":
        proj = payload.get("results", {}).get("projection") or {}
        figures += projection_figures(proj.get("frames_per_s_per_core"))
      for f in figures:
        f.update(benchmark=name, quick=quick, machine=label, date=payload.get("date"))
      out["figures"] += figures
      entry.update(quick=quick, machine=label, date=payload.get("date"), figures=len(figures))
      entry.setdefault("status", "ok")
    else:
      entry.setdefault("status", "no results")
    out["benchmarks"][name] = entry
  return out


# ----------------------------------------------------------------------------- tables

def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def markdown(summary: dict) -> str:
  """all.md: the machine, one row per figure, and the benchmarks that gave none."""
  m = summary["machine"]
  lines = [f"Machine: {machine_label(m)}. Collected {summary['date']}.", "",
           "| benchmark | figure | value | alternative, same run | run |", "|---|---|---|---|---|"]
  for f in summary["figures"]:
    run = "quick" if f.get("quick") else "full"
    lines.append(f"| {f['benchmark']} | {_cell(f['key'])} | {_cell(f['value'])} | "
                 f"{_cell(f.get('alternative') or '-')} | {run}, {f.get('date') or '?'} |")
  missing = {k: v for k, v in summary["benchmarks"].items() if v.get("status") != "ok"}
  if missing:
    lines += ["", "Not measured: " + "; ".join(
        f"{k} ({v.get('status')}{': ' + v['error'] if v.get('error') else ''})"
        for k, v in missing.items())]
  return "\n".join(lines) + "\n"


def _parse_rows(block: str) -> tuple[list[str], list[list[str]]]:
  """(lines outside the table, rows as cell lists) of a marked README block."""
  other, rows = [], []
  for line in block.strip("\n").splitlines():
    s = line.strip()
    if s.startswith("|") and not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", s):
      cells = [c.strip() for c in re.split(r"(?<!\\)\|", s)[1:-1]]
      if cells and cells[0] != "figure":
        rows.append((cells + ["-"] * 4)[:4])
    elif not s.startswith("|"):
      other.append(line)
  return other, rows


def update_readme_text(text: str, summary: dict) -> str:
  """README text with the marked table merged with `summary`'s figures (see module doc)."""
  if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
    raise ValueError(f"README: need exactly one {BEGIN} ... {END} block")
  head, rest = text.split(BEGIN)
  block, tail = rest.split(END)
  other, rows = _parse_rows(block)
  index = {r[0]: r for r in rows}
  for f in summary["figures"]:
    key = _cell(f["key"])
    row = index.get(key)
    if row is None:
      row = [key, "-", "-", "-"]
      rows.append(row)
      index[key] = row
    where = f"{f.get('machine', '?')}, {(f.get('date') or '?')[:10]}"
    if f.get("quick"):
      row[3] = _cell(f"{f['value']} ({where})")
    else:
      row[1] = _cell(f"{f['value']} ({where})")
      row[2] = _cell(f.get("alternative") or "-")
  table = "\n".join([HEADER] + ["| " + " | ".join(r) + " |" for r in rows])
  notes = "\n".join(other).strip()
  body = table + ("\n\n" + notes if notes else "")
  return f"{head}{BEGIN}\n{body}\n{END}{tail}"


# ------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="each benchmark's quick mode")
  parser.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHMARKS))
  parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
  parser.add_argument("--collect-only", action="store_true", help="run nothing, re-tabulate")
  parser.add_argument("--results", default=str(RESULTS_DIR), help="benchmark JSON directory")
  parser.add_argument("--update-readme", action="store_true")
  parser.add_argument("--readme", default=str(ROOT / "README.md"))
  args = parser.parse_args(argv)
  names = args.only.split(",") if args.only else list(BENCHMARKS)
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
  results_dir = Path(args.results)
  results_dir.mkdir(parents=True, exist_ok=True)
  status: dict[str, dict] = {}
  if not args.collect_only:
    for name in names:
      print(f"{name}: running{' (quick)' if args.quick else ''} ...", flush=True)
      status[name] = run_benchmark(name, args.quick, args.timeout, results_dir)
      s = status[name]
      print(f"{name}: {s['status']}" + (f" in {s['wall_s']:.0f} s" if "wall_s" in s else "")
            + (f" -- {s['error']}" if s.get("error") else ""), flush=True)
  summary = collect(results_dir, status)
  (results_dir / "all.json").write_text(json.dumps(summary, indent=2, default=float))
  table = markdown(summary)
  (results_dir / "all.md").write_text(table)
  print("\n" + table)
  print(f"wrote {results_dir / 'all.json'} and {results_dir / 'all.md'}")
  if args.update_readme:
    readme = Path(args.readme)
    readme.write_text(update_readme_text(readme.read_text(), summary))
    print(f"updated the performance table in {readme}")
  return 0 if all(s.get("status") == "ok" for s in status.values()) else 1


if __name__ == "__main__":
  raise SystemExit(main())
