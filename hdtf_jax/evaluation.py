"""Evaluation of a trained system on the held-out split: the paper's stage-1 and stage-2 tables
(PAPER.md §6) per stage and for the full pipeline (audio -> G_ani -> F_app -> G_vid -> frames),
written as Markdown, JSON and PNG plots.

    results = evaluate("runs/demo/stage1", "runs/demo/stage2", "runs/demo/eval")

Parts:
  * `stage1`, `stage2`: each stage's own eval (`stage1.evaluate_checkpoint` on held-out windows,
    `stage2.evaluate_checkpoint` on held-out frame pairs). An `eval_<step>.json` that the stage's
    `--mode=eval` already wrote for the latest checkpoint is reused (`reuse_stage_evals`).
  * `pipeline`: for each held-out clip (`hdtf/256` or `hdtf/512` test split, first
    `max_clips` clips with a face, first `max_frames` frames), the reference is the clip's first
    frame with a face and its fitted parameters (`generate.Reference.from_frame`); the clip's
    audio features go through `generate.animate` (G_ani, resampled to the clip's fps) and
    `generate.render` (F_app + G_vid). Scored against the clip itself:
      - stage-1 metrics (`metrics.stage1_metrics`) of the generated mouth / eyebrow / head-pose
        tracks against the fitted ones, at the video rate, frames without a face masked out;
        baseline "reference held" (the reference's parameters in every frame: no motion);
      - stage-2 metrics (`stage2.score_frames`: PSNR, SSIM, CPBD, mouth LMD) of the generated
        frames against the real ones; also G_vid driven by the clip's fitted parameters (stage 2
        alone on the same frames: the gap to the pipeline is what stage 1 costs) and the
        reference frame as the prediction.
    Stage-1 numbers are averaged over clips (CCA and temporal SSIM are per sequence), stage-2
    numbers over frames (LMD over the frames where the face mesh is found in both).
Outputs in `out_dir`: results.md, results.json, tracks.png (jaw-open, eyebrow, yaw: generated vs
fitted for a few clips), distributions.png (per-clip metrics), frames.png (real vs generated).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hdtf_jax import generate as gen

PARTS = ("stage1", "stage2", "pipeline")
STAGE1_COLUMNS = ("mse_mouth", "lmd3d_mouth", "ssim_eyebrow", "cca_head", "jaw_open_r")
STAGE2_COLUMNS = ("psnr", "ssim", "cpbd", "lmd")
PIPELINE_SYSTEMS = {
    "pipeline": "audio -> G_ani -> G_vid (full pipeline)",
    "fitted_params": "fitted params -> G_vid (stage 2 alone)",
    "reference_held": "reference params held (no motion)",
    "reference": "reference frame as prediction",
}
TRACKS = (("jaw-open", "mouth", 0), ("eyebrow", "eyebrow", 0), ("yaw", "pose", 0))


@dataclasses.dataclass
class EvalConfig:
  """What the full-pipeline part scores (caps keep it quick on a CPU)."""
  max_clips: int | None = 8          # held-out clips (None: all)
  max_frames: int | None = 100       # frames per clip from its start (None: the whole clip)
  batch_size: int = 8                # G_vid frames per jitted call
  cpbd: bool | None = None           # None: the stage-2 config's eval.cpbd
  lmd: bool | None = None            # None: the stage-2 config's eval.lmd
  fitted_params: bool = True         # also score G_vid driven by the fitted parameters
  plot_clips: int = 3                # clips in tracks.png / frames.png
  reuse_stage_evals: bool = True     # reuse a stage's eval_<step>.json of the latest checkpoint


def latest_step(workdir: str | Path) -> int | None:
  ckpt = Path(workdir) / "checkpoints"
  steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []
  return max(steps, default=None)


def _with_data(config, data_dir: str | None, tfds_name: str | None = None):
  import ml_collections
  c = ml_collections.ConfigDict(config.to_dict())
  if data_dir is not None:
    c.data.source, c.data.data_dir = "tfds", str(data_dir)
  if tfds_name is not None:
    c.data.tfds_name = tfds_name
  return c


# ------------------------------------------------------------------------------ per stage

def stage_eval(stage: int, workdir: str | Path, out_dir: Path, *, data_dir: str | None = None,
               reuse: bool = True) -> dict:
  """{step, source, results, ...} of one stage's own eval (reused or computed)."""
  from hdtf_jax.train import stage1, stage2
  workdir = Path(workdir)
  config = _with_data(gen.read_config(workdir, stage), data_dir)
  step = latest_step(workdir)
  saved = workdir / f"eval_{step}.json"
  if reuse and saved.is_file():
    record = json.loads(saved.read_text())
    record["source"] = str(saved)
  else:
    if config.data.source != "tfds":
      raise gen.GenerateError(f"stage-{stage} workdir {str(workdir)!r}: trained on "
                              f"data.source={config.data.source!r}; pass --data_dir to score it "
                              f"on the TFDS test split")
    path = out_dir / f"stage{stage}.json"
    lib = stage1 if stage == 1 else stage2
    lib.evaluate_checkpoint(config, workdir, out=path)
    record = json.loads(path.read_text())
    record["source"] = str(path)
  lib = stage1 if stage == 1 else stage2
  record["table"] = lib.markdown_table(record["results"])
  return record


# ----------------------------------------------------------------------------- pipeline

def test_source(data_dir: str | None, tfds_name: str):
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(tfds_name, split="test", data_dir=data_dir)
  except Exception as e:  # tfds raises its own types for a missing dataset
    raise gen.GenerateError(f"cannot open TFDS {tfds_name!r} (test split) in data_dir "
                            f"{data_dir!r}: {str(e).splitlines()[0][:200]}") from None


def _clip_params(ex: Mapping[str, Any], i: int) -> dict[str, np.ndarray]:
  return {"shape": ex["shape"], "scale": np.float32(ex["scale"]), "mouth": ex["mouth"][i],
          "eyebrow": ex["eyebrow"][i], "pose": ex["pose"][i]}


def _tracks(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"mouth": np.asarray(params["mouth"], np.float32),
          "eyebrow": np.asarray(params["eyebrow"], np.float32),
          "head": np.asarray(params["pose"], np.float32)}


class ClipScorer:
  """The stage-1 metrics of one clip's tracks (jitted once per track length)."""

  def __init__(self, models: gen.Models):
    from hdtf_jax.train import stage1
    c1 = models.stage1_config
    self.vertices = stage1.mouth_vertices_fn(c1.model) if c1.eval.get("lmd3d", True) else None
    self.c1, self.c2 = float(c1.eval.ssim_c1), float(c1.eval.ssim_c2)

  def __call__(self, pred: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
               mask: np.ndarray) -> dict[str, float]:
    import jax
    from hdtf_jax import metrics
    from hdtf_jax.train import stage1
    m = metrics.stage1_metrics({k: v[None] for k, v in pred.items()},
                               {k: v[None] for k, v in truth.items()},
                               mouth_vertices_fn=self.vertices, mask=mask[None].astype(np.float32),
                               ssim_c1=self.c1, ssim_c2=self.c2)
    out = {k: float(v) for k, v in jax.device_get(m).items()}
    out["jaw_open_r"] = stage1.pearson(pred["mouth"][mask, 0], truth["mouth"][mask, 0])
    return out


class FrameScorer:
  """The stage-2 metrics of frames against one clip's real frames, as `stage2.score_frames`
  computes them (PSNR, SSIM, CPBD of the prediction, mouth LMD over frames with a face mesh in
  both), with the real frames' landmarks found once for every system scored."""

  def __init__(self, truth: np.ndarray, *, cpbd: bool, lmd: bool):
    from hdtf_jax.train import stage2
    self.truth, self.lmd = truth, lmd
    self.cpbd = cpbd and min(truth.shape[1:3]) >= 64
    self.truth_points = stage2.mouth_landmarks(truth) if lmd else None

  def __call__(self, pred: np.ndarray, static: bool = False) -> dict[str, float]:
    """pred: (T, S, S, 3) frames (uint8 or [0, 1]), or with `static` one frame for all."""
    from hdtf_jax import metrics
    from hdtf_jax.train import stage2
    x = pred.astype(np.float32) / 255.0 if pred.dtype == np.uint8 else pred.astype(np.float32)
    frames = np.broadcast_to(x, self.truth.shape) if static else x
    out = stage2.score_frames(frames, self.truth, cpbd=False, lmd=False)
    if self.cpbd:
      values = [metrics.cpbd(f, data_range=1.0) for f in ([x] if static else x)]
      out["cpbd"] = float(np.mean(values))
    if self.lmd:
      mine = stage2.mouth_landmarks([x]) * len(self.truth) if static else stage2.mouth_landmarks(x)
      out["lmd"], out["lmd_pairs"] = stage2.mouth_lmd_of_points(mine, self.truth_points)
    return out


def evaluate_pipeline(models: gen.Models, data_dir: str | None, tfds_name: str | None = None,
                      config: EvalConfig = EvalConfig(), progress: bool = True) -> dict:
  """The full pipeline on the held-out clips (module docstring). Returns {clips: [per clip],
  stage1: {system: metrics}, stage2: {system: metrics}, ...} plus `_arrays` for the plots."""
  from hdtf_jax.data import pipelines
  c2 = models.stage2_config
  tfds_name = tfds_name or c2.data.tfds_name
  source = test_source(data_dir, tfds_name)
  if "frames" not in source.dataset_info.features:
    raise gen.GenerateError(f"{tfds_name}: stores no frames; the full pipeline needs hdtf/256 "
                            f"or hdtf/512")
  reader = pipelines.ClipReader(source, ("clip", "identity", "fps", "audio_features", "frames",
                                         "face_found") + pipelines.PARAM_KEYS)
  scan = pipelines.ClipReader(source, ("clip", "face_found"))
  order = sorted(range(len(scan)), key=lambda i: scan[i]["clip"])
  chosen = [i for i in order if scan[i]["face_found"].any()][:config.max_clips]
  if not chosen:
    raise gen.GenerateError(f"{tfds_name}: no held-out clip with a face in {data_dir!r}")
  cpbd = bool(c2.eval.cpbd if config.cpbd is None else config.cpbd)
  lmd = bool(c2.eval.lmd if config.lmd is None else config.lmd)
  size = models.image_size
  scorer = ClipScorer(models)
  clips, arrays = [], []
  t_start = time.perf_counter()
  for n, index in enumerate(chosen):
    ex = reader[index]
    fps = float(ex["fps"])
    found = np.asarray(ex["face_found"], bool)
    t = len(found) if config.max_frames is None else min(len(found), config.max_frames)
    i0 = int(np.flatnonzero(found)[0])
    # Frames are scored without the reference frame itself (a copy of the input).
    keep = np.array([i for i in range(t) if i != i0], np.int64)
    if keep.size == 0:
      continue
    reference = gen.Reference.from_frame(pipelines.decode_jpeg(ex["frames"][i0]),
                                         _clip_params(ex, i0), models, name=ex["clip"])
    audio = np.asarray(ex["audio_features"], np.float32)
    audio = audio[:max(1, int(round(t * gen.FEATURE_FPS / fps)))]
    drv = gen.animate(models, audio, reference, fps=fps, num_frames=t)
    fitted = {k: (np.broadcast_to(ex[k], (t,) + np.shape(ex[k])) if k in ("shape", "scale")
                  else np.asarray(ex[k][:t], np.float32)) for k in pipelines.PARAM_KEYS}
    held = gen.driving_params(reference, *(np.broadcast_to(reference.params[k], (t,) +
                                                           reference.params[k].shape)
                                           for k in ("mouth", "eyebrow", "pose")))
    mask = found[:t]
    truth_tracks = _tracks(fitted)
    s1 = {"pipeline": scorer(_tracks(drv), truth_tracks, mask),
          "reference_held": scorer(_tracks(held), truth_tracks, mask)}
    truth = np.stack([pipelines.to_float_image(pipelines.decode_jpeg(ex["frames"][i]), size)
                      for i in keep])
    frame_scorer = FrameScorer(truth, cpbd=cpbd, lmd=lmd)
    generated = np.stack(list(gen.render(models, reference, drv, batch_size=config.batch_size)))
    s2 = {"pipeline": frame_scorer(generated[keep])}
    if config.fitted_params:
      s2["fitted_params"] = frame_scorer(np.stack(list(
          gen.render(models, reference, fitted, batch_size=config.batch_size)))[keep])
    s2["reference"] = frame_scorer(reference.image, static=True)
    clips.append({"clip": ex["clip"], "identity": ex["identity"], "frames": len(keep),
                  "frames_with_face": int(mask.sum()), "fps": fps, "reference_frame": i0,
                  "stage1": s1, "stage2": s2})
    shown = keep[np.linspace(0, len(keep) - 1, min(6, len(keep))).round().astype(int)]
    arrays.append({"drv": _tracks(drv), "fitted": truth_tracks, "fps": fps, "clip": ex["clip"],
                   "truth": truth[np.searchsorted(keep, shown)], "generated": generated[shown]})
    if progress:
      print(f"  pipeline clip {n + 1}/{len(chosen)} {ex['clip']}: {t} frames, "
            f"PSNR {s2['pipeline']['psnr']:.2f} dB, mse_mouth {s1['pipeline']['mse_mouth']:.4f} "
            f"({time.perf_counter() - t_start:.0f} s)", flush=True)
  if not clips:
    raise gen.GenerateError(f"{tfds_name}: the held-out clips have no frame to score beside "
                            f"their reference frame (max_frames={config.max_frames})")
  return {"data": f"{tfds_name} test split ({data_dir or 'default data_dir'})",
          "num_clips": len(clips), "frames": int(sum(c["frames"] for c in clips)),
          "image_size": size, "cpbd": cpbd, "lmd": lmd,
          "stage1": aggregate_stage1(clips), "stage2": aggregate_stage2(clips), "clips": clips,
          "seconds": time.perf_counter() - t_start, "_arrays": arrays}


def aggregate_stage1(clips: Sequence[Mapping]) -> dict[str, dict[str, float]]:
  """Mean over clips of each system's per-clip stage-1 metrics."""
  out: dict[str, dict[str, float]] = {}
  for system in clips[0]["stage1"]:
    keys = clips[0]["stage1"][system]
    out[system] = {k: float(np.mean([c["stage1"][system][k] for c in clips])) for k in keys}
  return out


def aggregate_stage2(clips: Sequence[Mapping]) -> dict[str, dict[str, float]]:
  """Frame-weighted mean over clips (LMD weighted by the frames it was measured on)."""
  out: dict[str, dict[str, float]] = {}
  for system in clips[0]["stage2"]:
    rows = [(c["stage2"][system], c["frames"]) for c in clips]
    agg = {}
    for k in rows[0][0]:
      if k == "lmd_pairs":
        continue
      if k == "lmd":
        pairs = [(r["lmd"], r.get("lmd_pairs", 0)) for r, _ in rows if r.get("lmd_pairs", 0)]
        agg[k] = (float(sum(v * w for v, w in pairs) / sum(w for _, w in pairs)) if pairs
                  else float("nan"))
        agg["lmd_pairs"] = int(sum(w for _, w in pairs))
      else:
        agg[k] = float(sum(r[k] * w for r, w in rows) / sum(w for _, w in rows))
    out[system] = agg
  return out


# --------------------------------------------------------------------------------- output

def _fmt(v: Any) -> str:
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, float) and not math.isfinite(v):
    return "n/a"
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def table(results: Mapping[str, Mapping[str, float]], columns: Sequence[str],
          names: Mapping[str, str] | None = None) -> str:
  cols = [c for c in columns if any(c in r for r in results.values())]
  lines = ["| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for key, r in results.items():
    cells = [_fmt(r[c]) if c in r else "-" for c in cols]
    lines.append(f"| {(names or {}).get(key, key)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown(results: Mapping[str, Any]) -> str:
  lines = [f"# Evaluation", "", f"Stage 1: `{results['stage1_workdir']}` (step "
           f"{results['steps'][0]}); stage 2: `{results['stage2_workdir']}` (step "
           f"{results['steps'][1]}). {results['seconds']:.0f} s.", ""]
  for stage, name in (("stage1", "Stage 1 (G_ani) on held-out windows"),
                      ("stage2", "Stage 2 (G_vid) on held-out frame pairs")):
    if stage in results:
      r = results[stage]
      lines += [f"## {name}", "", f"From `{r['source']}` (step {r['step']}).", "", r["table"], ""]
  p = results.get("pipeline")
  if p:
    lines += ["## Full pipeline: audio -> G_ani -> F_app -> G_vid", "",
              f"{p['num_clips']} held-out clips of {p['data']}, {p['frames']} frames "
              f"(at most {results['config']['max_frames']} per clip), {p['image_size']} px; "
              "reference = each clip's first frame with a face and its fitted parameters.", "",
              "Animation (generated vs fitted parameters at the video rate, mean over clips):", "",
              table(p["stage1"], STAGE1_COLUMNS, PIPELINE_SYSTEMS), "",
              "Video (generated vs real frames, mean over frames; PSNR/SSIM on [0, 1]; CPBD of "
              "the generated frames; LMD: mouth face-mesh points, pixels):", "",
              table(p["stage2"], STAGE2_COLUMNS, PIPELINE_SYSTEMS), "",
              "Per clip (full pipeline):", "",
              "| clip | frames | " + " | ".join(STAGE1_COLUMNS[:4]) + " | psnr | ssim |",
              "|---" * 8 + "|"]
    for c in p["clips"]:
      a, b = c["stage1"]["pipeline"], c["stage2"]["pipeline"]
      lines.append(f"| {c['clip']} | {c['frames']} | " + " | ".join(
          _fmt(a.get(k, float("nan"))) for k in STAGE1_COLUMNS[:4]) +
          f" | {_fmt(b['psnr'])} | {_fmt(b['ssim'])} |")
    lines += ["", "Plots: `tracks.png` (jaw-open, eyebrow, yaw: generated vs fitted), "
              "`distributions.png` (per-clip metrics), `frames.png` (real vs generated).", ""]
  return "\n".join(lines)


def plot_tracks(arrays: Sequence[Mapping], path: Path, max_clips: int = 3) -> Path:
  """Rows: clips; columns: jaw-open, eyebrow[0], yaw; generated vs fitted over time."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from hdtf_jax.train import logs
  rows = list(arrays[:max_clips])
  fig, axes = plt.subplots(len(rows), len(TRACKS), figsize=(3.4 * len(TRACKS), 2.1 * len(rows)),
                           squeeze=False)
  for r, a in enumerate(rows):
    for c, (label, key, dim) in enumerate(TRACKS):
      k = "head" if key == "pose" else key
      ax = axes[r][c]
      t = np.arange(len(a["fitted"][k])) / a["fps"]
      ax.plot(t, a["fitted"][k][:, dim], lw=1.0, label="fitted (real)")
      ax.plot(t, a["drv"][k][:, dim], lw=1.0, label="generated")
      ax.set_title(f"{a['clip']}: {label}", fontsize=8)
      ax.tick_params(labelsize=6)
  axes[0][0].legend(fontsize=6)
  axes[-1][0].set_xlabel("s", fontsize=7)
  fig.tight_layout()
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return logs.save_png(path, image)


def plot_distributions(clips: Sequence[Mapping], path: Path) -> Path:
  """One panel per metric: each system's per-clip values (points) and their mean (bar)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from hdtf_jax.train import logs
  panels = [("stage1", k) for k in STAGE1_COLUMNS] + [("stage2", k) for k in STAGE2_COLUMNS]
  panels = [(s, k) for s, k in panels if k in clips[0][s]["pipeline"]]
  cols = 3
  fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(3.6 * cols,
                                                                   2.3 * -(-len(panels) // cols)),
                           squeeze=False)
  for ax, (stage, key) in zip(axes.ravel(), panels):
    systems = [s for s in clips[0][stage] if key in clips[0][stage][s]]
    for x, system in enumerate(systems):
      v = np.array([c[stage][system][key] for c in clips], np.float64)
      v = v[np.isfinite(v)]
      if v.size:
        ax.bar(x, v.mean(), color="0.85")
        ax.plot(np.full(v.size, x) + np.linspace(-0.2, 0.2, v.size), v, "o", ms=3)
    ax.set_xticks(range(len(systems)), [s.replace("_", "\n") for s in systems], fontsize=6)
    ax.set_title(key, fontsize=8)
    ax.tick_params(labelsize=6)
  for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return logs.save_png(path, image)


def plot_frames(arrays: Sequence[Mapping], path: Path, max_clips: int = 3) -> Path:
  """Per clip two rows: real frames, then the pipeline's frames at the same times."""
  from hdtf_jax.train import logs
  rows = []
  for a in arrays[:max_clips]:
    rows += [list(a["truth"]), list(a["generated"])]
  return logs.save_png(path, logs.image_grid(rows))


def _json_safe(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items() if not str(k).startswith("_")}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x


def evaluate(stage1_workdir: str | Path, stage2_workdir: str | Path, out_dir: str | Path, *,
             data_dir: str | None = None, tfds_name: str | None = None,
             parts: Sequence[str] = PARTS, config: EvalConfig = EvalConfig(),
             progress: bool = True) -> dict:
  """Runs `parts` and writes `out_dir`/results.{md,json} and the plots; returns the results."""
  unknown = set(parts) - set(PARTS)
  if unknown:
    raise gen.GenerateError(f"unknown evaluation parts {sorted(unknown)}; known: {PARTS}")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  results: dict[str, Any] = {"stage1_workdir": str(stage1_workdir),
                             "stage2_workdir": str(stage2_workdir),
                             "config": dataclasses.asdict(config), "parts": list(parts)}
  for stage in (1, 2):
    if f"stage{stage}" in parts:
      wd = stage1_workdir if stage == 1 else stage2_workdir
      results[f"stage{stage}"] = stage_eval(stage, wd, out, data_dir=data_dir,
                                            reuse=config.reuse_stage_evals)
  models = gen.load_models(stage1_workdir, stage2_workdir)
  results["steps"] = list(models.steps)
  if "pipeline" in parts:
    p = evaluate_pipeline(models, data_dir or models.stage2_config.data.data_dir, tfds_name,
                          config, progress=progress)
    arrays = p.pop("_arrays")
    results["pipeline"] = p
    plot_tracks(arrays, out / "tracks.png", config.plot_clips)
    plot_distributions(p["clips"], out / "distributions.png")
    plot_frames(arrays, out / "frames.png", config.plot_clips)
  results["seconds"] = time.perf_counter() - t0
  (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1) + "\n")
  (out / "results.md").write_text(markdown(results))
  return results


# ---------------------------------------------------------------------------------- strip

def video_strip_png(video: str | Path, out_png: str | Path, count: int = 6,
                    height: int = 128) -> Path:
  """`count` evenly spaced frames of `video` side by side (each `height` px high), as a PNG."""
  import cv2
  from hdtf_jax import media
  from hdtf_jax.train import logs
  frames, _ = media.read_video(video)
  if len(frames) == 0:
    raise gen.GenerateError(f"{video}: no frames")
  picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
  scaled = [cv2.resize(frames[i], (round(frames[i].shape[1] * height / frames[i].shape[0]),
                                   height), interpolation=cv2.INTER_AREA) for i in picks]
  return logs.save_png(out_png, logs.image_grid([scaled]))
