"""A data-driven morphable model from landmark tracks (PCA), on a template's topology.

    model = learn_model([track_clip1, track_clip2, ...])   # each (T, V, 3) landmark pixels

1. Every frame is similarity-aligned (Procrustes: rotation, scale, translation) to the current
   mean using only the template's `rigid` vertices (those no expression moves), so expressions
   do not tilt the alignment; the mean is re-estimated and brought back into the template's frame
   and unit (IOD) a few times.
2. Identity: the mean aligned shape of each clip. Shape bases are the principal components of
   the clip means (at most #clips - 1 of them), unit norm, with `shape_std` the components'
   standard deviations.
3. Expression: what remains per frame (aligned shape minus its clip's mean). Mouth bases are the
   principal components of that motion restricted to the `mouth` region, eyebrow bases those
   restricted to `eyebrows` (zero elsewhere); each is scaled to one standard deviation, so a
   coefficient of 1 is a typical motion. Learned expression coefficients are signed (bounds
   [-inf, inf]), unlike the sculpted blendshapes.

The template (default: `default_model()`) supplies triangles, regions and the mirror map.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from hdtf_jax.face.morphable import MorphableModel, default_model


def rigid_vertices(template: MorphableModel) -> np.ndarray:
  """The template's `rigid` region, else inner_face minus mouth, eyebrows and eyes."""
  if "rigid" in template.regions:
    return template.regions["rigid"]
  moving = np.concatenate([template.regions[k] for k in ("mouth", "eyebrows", "eyes")])
  return np.setdiff1d(template.regions["inner_face"], moving)


def align_batch(shapes, reference, subset) -> np.ndarray:
  """Similarity-aligns every (..., V, 3) shape to `reference` (V, 3), fitted on `subset`."""
  src = shapes[..., subset, :]
  dst = reference[subset]
  ms, md = src.mean(-2, keepdims=True), dst.mean(0)
  a, b = src - ms, dst - md
  cov = np.einsum("vc,...vd->...cd", b, a)               # sum_v b a^T
  u, sv, vt = np.linalg.svd(cov)
  d = np.sign(np.linalg.det(u @ vt))
  fix = np.ones(sv.shape)
  fix[..., 2] = d
  rot = u @ (fix[..., :, None] * vt)
  scale = (sv * fix).sum(-1) / (a ** 2).sum((-2, -1))
  out = scale[..., None, None] * np.einsum("...vc,...kc->...vk", shapes - ms, rot) + md
  return out


def _pca(data: np.ndarray, n: int):
  """Top-n principal directions (unit rows) and standard deviations of centred data (N, D)."""
  n = min(n, *data.shape)
  # Eigen-decomposition of the smaller Gram matrix (much cheaper than an SVD of tall data).
  if data.shape[0] >= data.shape[1]:
    evals, evecs = np.linalg.eigh(data.T @ data)
    dirs = evecs[:, ::-1].T
  else:
    evals, evecs = np.linalg.eigh(data @ data.T)
    dirs = (data.T @ evecs[:, ::-1]).T
    dirs /= np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-30)
  evals = np.maximum(evals[::-1], 0.0)
  std = np.sqrt(evals[:n] / max(len(data) - 1, 1))
  keep = std > 1e-6 * max(std[0] if len(std) else 0.0, 1e-30)
  return dirs[:n][keep], std[keep]


def _region_pca(motion, region, n):
  """PCA of (N, V, 3) motion restricted to the `region` vertices; bases zero elsewhere, scaled to
  one standard deviation."""
  v = motion.shape[1]
  sub = motion[:, region].reshape(len(motion), -1)
  dirs, std = _pca(sub, n)
  bases = np.zeros((len(dirs), v, 3))
  bases[:, region] = (dirs * std[:, None]).reshape(len(dirs), len(region), 3)
  return bases


def learn_model(tracks: Sequence[np.ndarray], n_shape: int = 60, n_mouth: int = 28,
                n_eyebrow: int = 5, template: MorphableModel | None = None,
                iterations: int = 3, name: str = "learned") -> MorphableModel:
  """Learns mean, shape and expression bases from landmark tracks (one (T, V, 3) array per
  clip, pixels; frames holding NaN are skipped). Needs at least two clips (identity)."""
  template = default_model() if template is None else template
  v = template.n_vertices
  clips = []
  for i, track in enumerate(tracks):
    track = np.asarray(track, np.float64)
    if track.ndim != 3 or track.shape[1:] != (v, 3):
      raise ValueError(f"learn_model: track {i} must be (T, {v}, 3), got {track.shape}")
    track = track[np.all(np.isfinite(track), axis=(1, 2))]
    if len(track):
      clips.append(track)
  if len(clips) < 2:
    raise ValueError(f"learn_model: need at least 2 clips with found frames to learn identity, "
                     f"got {len(clips)}")
  rigid = rigid_vertices(template)
  target = template.mean.astype(np.float64)
  reference = target
  for _ in range(iterations):
    aligned = [align_batch(c, reference, rigid) for c in clips]
    identities = np.stack([a.mean(0) for a in aligned])
    reference = align_batch(identities.mean(0), target, rigid)
  aligned = [align_batch(c, reference, rigid) for c in clips]
  identities = np.stack([a.mean(0) for a in aligned])
  mean = identities.mean(0)
  dirs, shape_std = _pca((identities - mean).reshape(len(clips), -1),
                         min(n_shape, len(clips) - 1))
  motion = np.concatenate([a - a.mean(0) for a in aligned])
  mouth = _region_pca(motion, template.regions["mouth"], n_mouth)
  brows = _region_pca(motion, template.regions["eyebrows"], n_eyebrow)
  expression = np.concatenate([mouth, brows])
  return MorphableModel(
      mean=mean - mean.mean(0), shape_basis=dirs.reshape(len(dirs), v, 3), shape_std=shape_std,
      shape_names=tuple(f"shape_pc{i}" for i in range(len(dirs))),
      expression_basis=expression,
      mouth_names=tuple(f"mouth_pc{i}" for i in range(len(mouth))),
      eyebrow_names=tuple(f"eyebrow_pc{i}" for i in range(len(brows))),
      triangles=template.triangles, regions=template.regions, mirror=template.mirror,
      name=name)
