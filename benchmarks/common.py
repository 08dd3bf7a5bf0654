"""Shared helpers for the benchmark scripts: timing, machine description, JSON output.

Every benchmark prints a small table and writes `benchmarks/results/<name>.json`
(or `--out`), so `benchmarks/run_all.py` and the README table can be regenerated.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
  """Describes where the figures were measured (CPU model, cores, accelerator)."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
  try:
    import jax
    info["jax"] = jax.__version__
    info["jax_backend"] = jax.default_backend()
    info["jax_devices"] = [d.device_kind for d in jax.devices()]
  except Exception:  # pragma: no cover - jax is a dependency, but keep this helper import-safe
    pass
  return info


def block(x):
  """Waits for JAX arrays (and pytrees of them); returns x unchanged."""
  try:
    import jax
    return jax.block_until_ready(x)
  except ImportError:  # pragma: no cover
    return x


def time_fn(fn: Callable[[], Any], warmup: int = 2, repeats: int = 10,
            min_time_s: float = 0.0) -> dict[str, float]:
  """Median / min / mean wall time in milliseconds of `fn()` after `warmup` calls.

  `fn` must block until its work is done (wrap JAX calls with `block`).
  """
  for _ in range(warmup):
    fn()
  times = []
  start = time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - start) < min_time_s:
    t0 = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t0) * 1e3)
  return {"median_ms": statistics.median(times), "min_ms": min(times),
          "mean_ms": statistics.fmean(times), "runs": len(times)}


def write_json(name: str, results: Any, out: str | os.PathLike | None = None) -> Path:
  path = Path(out) if out else RESULTS_DIR / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {"benchmark": name, "machine": machine(),
             "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
  path.write_text(json.dumps(payload, indent=2, default=float))
  print(f"wrote {path}")
  return path


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
  if not rows:
    return
  columns = columns or list(rows[0].keys())
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  for r in rows:
    print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
