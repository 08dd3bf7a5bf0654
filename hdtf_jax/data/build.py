"""The build driver: every clip of a raw-video folder -> a per-clip .npz cache, in parallel.

    result = build_clips(raw_dir, cache_dir, ClipConfig(...), clips, num_workers=4)
    write_report(result, out_dir, splits={"train": [...], "test": [...]})

- Parallel across clips with worker processes (spawned, so a parent that has loaded
  TensorFlow or JAX is safe); `num_workers` <= 1 runs in this process. Default:
  `$HDTF_NUM_WORKERS`, else min(cpu_count, 4).
- Resumable: a finished clip is `<cache_dir>/<clip>.npz`, written atomically, reused when its
  signature (settings + the clip's annotation: range, crop row, ratio, resolution) matches, so
  a build killed midway redoes only unfinished clips. A skipped clip leaves `<clip>.skip.json`,
  reused while its signature and its video file (size, mtime) are unchanged, so a fixed or
  newly downloaded file, or a corrected annotation, is retried.
- Robust: `ClipSkipped` reasons from `hdtf_jax.data.clips`, plus `error` for any other
  exception in a clip (its traceback goes in the report), never stop the build.
- Progress: an overall bar (clips) and one bar per clip in flight (frames), via tqdm.
- Report: `build_report.json` and `build_report.md` (built / reused / skipped per reason, hours,
  frames, list problems, per-split counts).
- Apache Beam: `beam_clip_examples` is the same per-clip work as a Beam transform (clips spread
  over the runner's workers, each worker keeping its own models and the same .npz cache), used
  by the TFDS builder when a Beam runner or options are given; `read_beam_outcomes` gathers
  what each worker recorded, for the same report.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import queue as queue_lib
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from hdtf_jax import audio as audio_lib
from hdtf_jax.data import clips as clips_lib
from hdtf_jax.data.hdtf_lists import ClipEntry, ListProblem

REPORT_NAME = "build_report"
ERROR_REASON = "error"  # an unexpected exception while processing a clip


@dataclasses.dataclass
class Outcome:
  """What happened to one clip. status: built | cached (reused) | skipped."""
  clip: str
  list_split: str
  status: str
  reason: str | None = None
  detail: str = ""
  frames: int = 0
  seconds: float = 0.0
  elapsed_s: float = 0.0
  worker: str = ""  # host:pid that processed it (Beam builds)

  @property
  def ok(self) -> bool:
    return self.status in ("built", "cached")


@dataclasses.dataclass
class BuildResult:
  outcomes: list[Outcome]
  cache_dir: Path
  config: clips_lib.ClipConfig
  problems: list[ListProblem] = dataclasses.field(default_factory=list)
  elapsed_s: float = 0.0
  num_workers: int = 1

  @property
  def ok_clips(self) -> list[str]:
    return [o.clip for o in self.outcomes if o.ok]

  def cache_path(self, clip: str) -> Path:
    return clip_path(self.cache_dir, clip)

  def summary(self) -> dict[str, Any]:
    ok = [o for o in self.outcomes if o.ok]
    built = [o for o in self.outcomes if o.status == "built"]
    skipped: dict[str, int] = {}
    for o in self.outcomes:
      if not o.ok:
        skipped[o.reason] = skipped.get(o.reason, 0) + 1
    work_s = sum(o.elapsed_s for o in built)
    return {
        "clips_listed": len(self.outcomes), "clips_ok": len(ok),
        "clips_built_now": len(built), "clips_reused": len(ok) - len(built),
        "clips_skipped": sum(skipped.values()), "skipped_by_reason": dict(sorted(skipped.items())),
        "hours": sum(o.seconds for o in ok) / 3600, "frames": sum(o.frames for o in ok),
        "list_problems": len(self.problems), "elapsed_s": self.elapsed_s,
        "num_workers": self.num_workers,
        "frames_per_s_per_worker": (sum(o.frames for o in built) / work_s) if work_s else None,
    }


def default_num_workers() -> int:
  env = os.environ.get("HDTF_NUM_WORKERS")
  if env:
    try:
      return max(0, int(env))
    except ValueError:
      raise ValueError(f"HDTF_NUM_WORKERS must be an integer, got {env!r}") from None
  return min(os.cpu_count() or 1, 4)


def clip_path(cache_dir: str | os.PathLike, clip: str) -> Path:
  return Path(cache_dir) / f"{clip}.npz"


def clip_signature(config: clips_lib.ClipConfig, entry: ClipEntry) -> str:
  """What a cached clip must have been made from: the settings and the clip's annotation."""
  fields = (entry.video, entry.start_s, entry.end_s, entry.resolution, entry.crop_xwyh,
            entry.crop_ratio)
  return f"{config.signature()}:{hashlib.sha256(repr(fields).encode()).hexdigest()[:12]}"


def _skip_path(cache_dir: Path, clip: str) -> Path:
  return cache_dir / f"{clip}.skip.json"


def _video_stamp(raw_dir: Path, video: str) -> list[int] | None:
  """(size, mtime_ns) of the clip's raw file, or None when there is none (or the name is bad)."""
  try:
    path = clips_lib.find_video(raw_dir, video)
  except clips_lib.ClipSkipped:
    return None
  st = path.stat()
  return [st.st_size, st.st_mtime_ns]


def cached_outcome(entry: ClipEntry, raw_dir: Path, cache_dir: Path,
                   config: clips_lib.ClipConfig) -> Outcome | None:
  """The outcome of an earlier run that may be reused, or None if the clip must be (re)done."""
  signature = clip_signature(config, entry)
  path = clip_path(cache_dir, entry.name)
  if path.is_file():
    try:
      with np.load(path, allow_pickle=False) as z:  # lazy: reads only these two members
        if str(z["_signature"]) == signature:
          frames = int(z["face_found"].shape[0])
          return Outcome(entry.name, entry.split, "cached", frames=frames,
                         seconds=frames / config.fps)
    except Exception:  # a damaged file is simply rebuilt
      pass
  skip = _skip_path(cache_dir, entry.name)
  if skip.is_file():
    try:
      rec = json.loads(skip.read_text())
      if (rec["signature"] == signature
          and rec["video_stamp"] == _video_stamp(raw_dir, entry.video)):
        return Outcome(entry.name, entry.split, "skipped", rec["reason"], rec["detail"])
    except (ValueError, KeyError):
      pass
  return None


# ----------------------------------------------------------------------------- one clip


_TOOLS = threading.local()  # per thread: the landmarkers (LiteRT interpreters) are not shareable
_QUEUE = None


def _init_worker(queue, jax_cache_dir: str) -> None:
  """Runs first in each worker process: one thread per library (the pool is the parallelism),
  and a persistent XLA compilation cache so each fit shape compiles once per machine."""
  global _QUEUE
  _QUEUE = queue
  _single_threaded(jax_cache_dir)


def _single_threaded(jax_cache_dir: str) -> None:
  # XLA reads XLA_FLAGS when its CPU backend starts (first computation), so this works as long
  # as nothing has run on JAX in this process yet.
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                     "intra_op_parallelism_threads=1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("OMP_NUM_THREADS", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import cv2
  cv2.setNumThreads(1)
  import jax
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # else the caller's choice stands
    jax.config.update("jax_compilation_cache_dir", jax_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _tools(config: clips_lib.ClipConfig) -> clips_lib.ClipTools:
  key = config.signature()
  tools = getattr(_TOOLS, "by_signature", None)
  if tools is None:
    tools = _TOOLS.by_signature = {}
  if key not in tools:
    tools[key] = clips_lib.ClipTools(config)
  return tools[key]


def process_to_cache(entry: ClipEntry, raw_dir: Path, cache_dir: Path,
                     config: clips_lib.ClipConfig, progress=None) -> Outcome:
  """Processes one clip into the cache; every failure becomes a skipped Outcome."""
  t0 = time.perf_counter()
  signature = clip_signature(config, entry)
  try:
    example = clips_lib.process_clip(entry, raw_dir, config, _tools(config), progress)
  except clips_lib.ClipSkipped as e:
    outcome = Outcome(entry.name, entry.split, "skipped", e.reason, e.detail)
  except Exception as e:  # a bug or an unforeseen input must not end the whole build
    detail = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
    outcome = Outcome(entry.name, entry.split, "skipped", ERROR_REASON, detail)
  else:
    clips_lib.save_clip(clip_path(cache_dir, entry.name), example, signature)
    _skip_path(cache_dir, entry.name).unlink(missing_ok=True)
    frames = int(example["face_found"].shape[0])
    outcome = Outcome(entry.name, entry.split, "built", frames=frames,
                      seconds=frames / config.fps)
  if outcome.status == "skipped" and outcome.reason != ERROR_REASON:
    rec = {"reason": outcome.reason, "detail": outcome.detail, "signature": signature,
           "video_stamp": _video_stamp(raw_dir, entry.video)}
    tmp = cache_dir / f".{entry.name}.skip.{os.getpid()}.part"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, _skip_path(cache_dir, entry.name))
  outcome.elapsed_s = time.perf_counter() - t0
  return outcome


def _worker_task(entry: ClipEntry, raw_dir: Path, cache_dir: Path,
                 config: clips_lib.ClipConfig) -> Outcome:
  last = [0.0]

  def progress(stage: str, done: int, total: int) -> None:
    now = time.monotonic()
    if _QUEUE is not None and (now - last[0] > 0.2 or done >= total):
      last[0] = now
      _QUEUE.put((entry.name, stage, done, total))

  return process_to_cache(entry, raw_dir, cache_dir, config, progress)


# ----------------------------------------------------------------------------- progress bars


class _Bars:
  """One overall bar plus one bar per clip in flight (tqdm; silent when disabled)."""

  def __init__(self, total: int, enabled: bool):
    from tqdm.auto import tqdm
    self._tqdm, self.enabled = tqdm, enabled
    self.overall = tqdm(total=total, desc="HDTF clips", unit="clip", disable=not enabled,
                        position=0, dynamic_ncols=True)
    self.clip_bars: dict[str, Any] = {}
    self.counts = {"ok": 0, "skipped": 0}

  def update_clip(self, clip: str, stage: str, done: int, total: int) -> None:
    if not self.enabled:
      return
    bar = self.clip_bars.get(clip)
    if bar is None:
      bar = self._tqdm(total=total, desc=f"  {clip}", unit="frame", leave=False,
                       position=len(self.clip_bars) + 1, dynamic_ncols=True)
      self.clip_bars[clip] = bar
    if bar.total != total:
      bar.reset(total=total)
    bar.set_postfix_str(stage, refresh=False)
    bar.n = done
    bar.refresh()

  def finish_clip(self, outcome: Outcome) -> None:
    bar = self.clip_bars.pop(outcome.clip, None)
    if bar is not None:
      bar.close()
    self.counts["ok" if outcome.ok else "skipped"] += 1
    self.overall.set_postfix(self.counts, refresh=False)
    self.overall.update(1)

  def close(self) -> None:
    for bar in self.clip_bars.values():
      bar.close()
    self.overall.close()


# ----------------------------------------------------------------------------- the driver


def build_clips(raw_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                config: clips_lib.ClipConfig, clips: Sequence[ClipEntry], *,
                num_workers: int | None = None, progress: bool = True,
                problems: Iterable[ListProblem] = ()) -> BuildResult:
  """Processes every clip not already in `cache_dir`; returns all outcomes in `clips` order."""
  raw_dir, cache_dir = Path(raw_dir), Path(cache_dir)
  if not raw_dir.is_dir():
    raise FileNotFoundError(f"raw-video folder {raw_dir} does not exist")
  cache_dir.mkdir(parents=True, exist_ok=True)
  for stale in cache_dir.glob(".*.part"):  # temporaries of a build killed while writing
    stale.unlink(missing_ok=True)
  names = [c.name for c in clips]
  if len(set(names)) != len(names):
    raise ValueError("clip names must be unique")
  num_workers = default_num_workers() if num_workers is None else num_workers
  t0 = time.perf_counter()
  outcomes: dict[str, Outcome] = {}
  todo = []
  for entry in clips:
    done = cached_outcome(entry, raw_dir, cache_dir, config)
    if done is None:
      todo.append(entry)
    else:
      outcomes[entry.name] = done
  bars = _Bars(len(clips), progress)
  for o in outcomes.values():
    bars.finish_clip(o)
  try:
    if num_workers <= 1 or len(todo) <= 1:
      for entry in todo:
        cb = lambda stage, d, t, n=entry.name: bars.update_clip(n, stage, d, t)
        outcome = process_to_cache(entry, raw_dir, cache_dir, config, cb)
        outcomes[entry.name] = outcome
        bars.finish_clip(outcome)
    else:
      _run_pool(todo, raw_dir, cache_dir, config, min(num_workers, len(todo)), outcomes, bars)
  finally:
    bars.close()
  return BuildResult([outcomes[n] for n in names], cache_dir, config, list(problems),
                     time.perf_counter() - t0, max(1, num_workers))


def _run_pool(todo, raw_dir, cache_dir, config, workers, outcomes, bars) -> None:
  # Workers must only read librosa's numba cache: first compiles racing in several
  # processes can crash one of them (see hdtf_jax.audio.warm_up).
  audio_lib.warm_up()
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()

  def drain():
    while True:
      try:
        bars.update_clip(*queue.get_nowait())
      except queue_lib.Empty:
        return

  jax_cache = os.fspath(cache_dir.parent / "xla_cache")
  with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                              initargs=(queue, jax_cache)) as pool:
    futures = {pool.submit(_worker_task, e, raw_dir, cache_dir, config): e for e in todo}
    pending = set(futures)
    while pending:
      finished, pending = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
      drain()
      for fut in finished:
        entry = futures[fut]
        try:
          outcome = fut.result()
        except Exception as e:  # the worker process died (e.g. out of memory)
          outcome = Outcome(entry.name, entry.split, "skipped", ERROR_REASON,
                            f"worker failed: {type(e).__name__}: {e}")
        outcomes[entry.name] = outcome
        bars.finish_clip(outcome)
  queue.close()


# ----------------------------------------------------------------------------- Apache Beam


OUTCOMES_DIR = ".beam_outcomes"  # per-clip outcome records of a Beam build (then the report)


def beam_clip_examples(raw_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                       config: clips_lib.ClipConfig, clips: Sequence[ClipEntry],
                       outcome_dir: str, drop: Sequence[str] = ()):
  """A `beam.PTransform` (pipeline root -> (clip name, example dict)) doing `build_clips`'s
  work on a Beam runner: the clips are spread over the workers (Reshuffle), each worker
  processes its clips as `process_to_cache` does (same .npz cache, reused when present, so
  a rerun on one machine resumes) and yields the cached example without the keys in `drop`.
  Every clip's `Outcome` is written as `<outcome_dir>/<clip>.json` (any tf.io.gfile / epath
  location) for `read_beam_outcomes`. `raw_dir` and `cache_dir` must be paths that every
  worker can read and write (one machine, or a shared mount on a cluster)."""
  import apache_beam as beam  # only Beam builds need it (the `beam` extra)
  return (beam.Create(list(clips))
          | "SpreadClips" >> beam.Reshuffle()
          | "ProcessClip" >> beam.FlatMap(
              _beam_clip, raw_dir=os.fspath(raw_dir), cache_dir=os.fspath(cache_dir),
              config=config, outcome_dir=os.fspath(outcome_dir), drop=tuple(drop)))


_BEAM_READY: list[bool] = []


def _beam_clip(entry: ClipEntry, raw_dir: str, cache_dir: str, config: clips_lib.ClipConfig,
               outcome_dir: str, drop: tuple[str, ...]) -> Iterable[tuple[str, dict]]:
  from apache_beam.metrics import Metrics
  from etils import epath
  raw, cache = Path(raw_dir), Path(cache_dir)
  if not _BEAM_READY:  # once per worker process: the pool workers' settings
    cache.mkdir(parents=True, exist_ok=True)
    _single_threaded(os.fspath(cache.parent / "xla_cache"))
    _BEAM_READY.append(True)
  outcome = cached_outcome(entry, raw, cache, config)
  if outcome is None:
    outcome = process_to_cache(entry, raw, cache, config)
  outcome.worker = f"{socket.gethostname()}:{os.getpid()}"
  Metrics.counter("hdtf", outcome.status if outcome.ok else f"skipped_{outcome.reason}").inc()
  if outcome.ok:
    Metrics.counter("hdtf", "frames").inc(outcome.frames)
  record = epath.Path(outcome_dir) / f"{entry.name}.json"
  record.parent.mkdir(parents=True, exist_ok=True)
  record.write_text(json.dumps(dataclasses.asdict(outcome)))  # a retried bundle rewrites it
  if outcome.ok:
    example = clips_lib.load_clip(clip_path(cache, entry.name), clip_signature(config, entry))
    for key in drop:
      example.pop(key, None)
    yield entry.name, example


def read_beam_outcomes(outcome_dir: str, clips: Sequence[ClipEntry]) -> list[Outcome]:
  """The outcomes `beam_clip_examples` recorded, in `clips` order (a clip without a record,
  which a finished pipeline should not leave, counts as skipped with reason `error`)."""
  from etils import epath
  folder = epath.Path(outcome_dir)
  outcomes = []
  for entry in clips:
    path = folder / f"{entry.name}.json"
    if path.exists():
      outcomes.append(Outcome(**json.loads(path.read_text())))
    else:
      outcomes.append(Outcome(entry.name, entry.split, "skipped", ERROR_REASON,
                              "no outcome recorded by the Beam pipeline"))
  return outcomes


# ----------------------------------------------------------------------------- report


def write_report(result: BuildResult, out_dir: str | os.PathLike,
                 splits: Mapping[str, Sequence[str]] | None = None) -> tuple[Any, Any]:
  """Writes `build_report.json` and `build_report.md` in `out_dir`; returns their paths.

  `splits` maps split names to clip names; the report counts the clips built in each.
  """
  from etils import epath
  out_dir = epath.Path(out_dir)  # a local folder or any tf.io.gfile location (gs://...)
  out_dir.mkdir(parents=True, exist_ok=True)
  summary = result.summary()
  ok = set(result.ok_clips)
  split_counts = {}
  for name, members in (splits or {}).items():
    members = list(members)
    split_counts[name] = {"listed": len(members), "built": sum(m in ok for m in members)}
  payload = {
      "summary": summary, "splits": split_counts,
      "config": dataclasses.asdict(result.config), "cache_dir": str(result.cache_dir),
      "clips": [dataclasses.asdict(o) for o in result.outcomes],
      "list_problems": [str(p) for p in result.problems],
      "skip_reasons": {**clips_lib.SKIP_REASONS,
                       ERROR_REASON: "an unexpected error while processing the clip"},
  }
  json_path = out_dir / f"{REPORT_NAME}.json"
  json_path.write_text(json.dumps(payload, indent=2, default=float))
  md_path = out_dir / f"{REPORT_NAME}.md"
  md_path.write_text(_markdown(payload))
  return json_path, md_path


def _markdown(p: Mapping[str, Any]) -> str:
  s = p["summary"]
  lines = ["# HDTF build report", "",
           f"- clips listed: {s['clips_listed']}; built: {s['clips_ok']} "
           f"({s['clips_built_now']} now, {s['clips_reused']} reused from the cache); "
           f"skipped: {s['clips_skipped']}",
           f"- video: {s['hours']:.3f} h, {s['frames']} frames; build time {s['elapsed_s']:.1f} s "
           f"with {s['num_workers']} worker(s)"]
  if s["frames_per_s_per_worker"]:
    lines.append(f"- speed: {s['frames_per_s_per_worker']:.1f} frames/s per worker")
  for name, c in p["splits"].items():
    lines.append(f"- split `{name}`: {c['built']} of {c['listed']} listed clips")
  lines.append(f"- annotation problems: {s['list_problems']}")
  if s["skipped_by_reason"]:
    lines += ["", "## Skipped by reason", "", "| reason | clips | meaning |", "|---|---|---|"]
    for reason, n in s["skipped_by_reason"].items():
      lines.append(f"| {reason} | {n} | {p['skip_reasons'].get(reason, '')} |")
    lines += ["", "## Skipped clips", "", "| clip | reason | detail |", "|---|---|---|"]
    for c in p["clips"]:
      if c["status"] == "skipped":
        detail = c["detail"].splitlines()[0] if c["detail"] else ""
        lines.append(f"| {c['clip']} | {c['reason']} | {detail.replace('|', '/')} |")
  if p["list_problems"]:
    lines += ["", "## Annotation problems", ""] + [f"- `{x}`" for x in p["list_problems"]]
  return "\n".join(lines) + "\n"
