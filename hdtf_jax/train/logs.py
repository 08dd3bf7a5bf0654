"""Metrics and pictures of a run: TensorBoard event files, JSONL, PNG.

Every scalar goes to both `<workdir>/metrics.jsonl` (one JSON object per step,
easy to grep and plot) and TensorBoard; every picture to TensorBoard and to
`<workdir>/images/<name>_<step>.png`. Only JAX process 0 writes.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np


def _to_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0)
    image = (image * 255.0 + 0.5).astype(np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
  """Tiles images (H, W, 1|3, float in [0, 1] or uint8) into one uint8 RGB grid;
  images in a row may differ in size and are centred in their cell."""
  rows = [[_to_uint8(im) for im in row] for row in rows]
  cell_h = max(im.shape[0] for row in rows for im in row)
  cell_w = max(im.shape[1] for row in rows for im in row)
  ncols = max(len(row) for row in rows)
  grid = np.full((len(rows) * (cell_h + pad) + pad, ncols * (cell_w + pad) + pad, 3), 255, np.uint8)
  for r, row in enumerate(rows):
    for c, im in enumerate(row):
      y = pad + r * (cell_h + pad) + (cell_h - im.shape[0]) // 2
      x = pad + c * (cell_w + pad) + (cell_w - im.shape[1]) // 2
      grid[y:y + im.shape[0], x:x + im.shape[1]] = im
  return grid


def plot_tracks(tracks: Mapping[str, Sequence[np.ndarray]], fps: float = 100.0,
                labels: Sequence[str] = ("prediction", "ground truth"), max_dims: int = 4,
                title: str = "") -> np.ndarray:
  """Line plots of parameter tracks: {group: [pred (T, D), gt (T, D)]} -> RGB uint8.
  One row per group, the first `max_dims` dimensions as columns."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = list(tracks)
  ncols = max(min(max_dims, np.asarray(tracks[g][0]).shape[-1]) for g in groups)
  fig, axes = plt.subplots(len(groups), ncols, figsize=(3.2 * ncols, 2.2 * len(groups)),
                           squeeze=False)
  for r, g in enumerate(groups):
    series = [np.asarray(s) for s in tracks[g]]
    t = np.arange(series[0].shape[0]) / fps
    for c in range(ncols):
      ax = axes[r][c]
      if c >= series[0].shape[-1]:
        ax.axis("off")
        continue
      for s, label in zip(series, labels):
        ax.plot(t, s[:, c], lw=1.0, label=label)
      ax.set_title(f"{g}[{c}]", fontsize=8)
      ax.tick_params(labelsize=6)
  axes[0][0].legend(fontsize=6)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return image


def save_png(path: str | Path, image: np.ndarray) -> Path:
  import cv2
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  cv2.imwrite(str(path), cv2.cvtColor(_to_uint8(image), cv2.COLOR_RGB2BGR))
  return path


class MetricLogger:
  """Writes scalars and images of a run; a no-op on processes other than 0."""

  def __init__(self, workdir: str | Path, enabled: bool | None = None, tensorboard: bool = True):
    self.workdir = Path(workdir)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

  def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    clean = {f"{prefix}{k}": float(v) for k, v in values.items()}
    record = {"step": int(step), "time": time.time(),
              **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))

  def image(self, step: int, name: str, image: np.ndarray) -> Path | None:
    if not self.enabled:
      return None
    image = _to_uint8(image)
    path = save_png(self.workdir / "images" / f"{name.replace('/', '_')}_{int(step):07d}.png", image)
    if self._tb is not None:
      self._tb.add_image(name, image, int(step), dataformats="HWC")
    return path

  def text(self, step: int, name: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(name, text, int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


def read_jsonl(path: str | Path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
