"""F_app (hdtf_jax.face.flow) and its rasteriser (hdtf_jax.face.raster).

The rasteriser is checked against an independent NumPy loop (per pixel, per triangle,
barycentrics by solving the 2x2 system in float64, same coverage and visibility rule);
the flow against transforms whose exact answer is known in closed form.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import Delaunay

from hdtf_jax import warp
from hdtf_jax.face import flow as flow_lib
from hdtf_jax.face import raster

H = W = 64


def ellipse_mesh(height=H, width=W, ring=24, inner=120, seed=0):
  """A face-like mesh: an ordered outline ring plus random interior points, Delaunay."""
  rng = np.random.default_rng(seed)
  cx, cy, rx, ry = width * 0.5, height * 0.45, width * 0.22, height * 0.28
  ang = np.linspace(0, 2 * np.pi, ring, endpoint=False)
  outline = np.stack([cx + rx * np.cos(ang), cy + ry * np.sin(ang)], 1)
  t = rng.uniform(0, 2 * np.pi, inner)
  r = np.sqrt(rng.uniform(0, 0.85, inner))
  pts = np.stack([cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)], 1)
  xy = np.concatenate([outline, pts]).astype(np.float32)
  return xy, Delaunay(xy).simplices.astype(np.int32), np.arange(ring, dtype=np.int32)


def pixel_grid(height=H, width=W):
  return np.stack(np.meshgrid(np.arange(width), np.arange(height)), -1).astype(np.float64)


def source_pixels(grid):
  """Normalised align_corners=False grid -> source pixel positions (centres at integers)."""
  g = np.asarray(grid, np.float64)
  return ((g + 1) * np.array([g.shape[1], g.shape[0]]) - 1) / 2


def loop_rasterize(xy, tri, z, height, width):
  """Reference: winner triangle and its barycentrics per pixel, float64.

  Triangles are drawn one at a time in order (each solved for every pixel centre with its
  own 2x2 inverse); a pixel takes a covering triangle when it is at least as near as
  what is there (smaller z nearer), so ties and depth-free meshes go to the later triangle.
  """
  xy = np.asarray(xy, np.float64)
  p = pixel_grid(height, width)
  out = -np.ones((height, width), int)
  bary = np.zeros((height, width, 3))
  near = np.full((height, width), np.inf)
  margin = np.full((height, width), np.inf)  # how close a decision was (ties are ambiguous)
  for f, t in enumerate(tri):
    a, b, q = xy[t]
    m = np.array([[a[0] - q[0], b[0] - q[0]], [a[1] - q[1], b[1] - q[1]]])
    if abs(np.linalg.det(m)) <= 2e-6:
      continue
    l12 = (p - q) @ np.linalg.inv(m).T
    w = np.concatenate([l12, 1 - l12.sum(-1, keepdims=True)], -1)
    inside = (w >= 0).all(-1)
    margin = np.minimum(margin, np.abs(w).min(-1))
    d = np.zeros((height, width)) if z is None else w @ z[t]
    if z is not None:
      margin = np.where(inside & (out >= 0), np.minimum(margin, np.abs(d - near)), margin)
    take = inside & (d <= near)
    near, out, bary = np.where(take, d, near), np.where(take, f, out), np.where(
        take[..., None], w, bary)
  return out, bary, margin


@pytest.mark.parametrize("use_z", [False, True])
def test_rasterize_matches_numpy_loop(use_z):
  rng = np.random.default_rng(1)
  size = 32
  xy = rng.uniform(-3, size + 3, (40, 2)).astype(np.float32)
  tri = Delaunay(xy).simplices.astype(np.int32)
  # Extra random triangles overlap the Delaunay ones, so visibility matters.
  tri = np.concatenate([tri, rng.integers(0, 40, (20, 3))]).astype(np.int32)
  z = rng.uniform(0, 1, 40).astype(np.float32) if use_z else None
  need = raster.candidates_needed(xy, tri, size, size)
  got = raster.rasterize(xy, tri, z, height=size, width=size, max_candidates=need)
  want, want_bary, margin = loop_rasterize(xy, tri, z, size, size)
  assert not bool(got.overflow)
  assert (want >= 0).mean() > 0.8  # the test mesh covers most of the image
  differ = np.asarray(got.tri) != want
  # Only float32-vs-float64 ties (a pixel centre on an edge, equal depths) may differ.
  assert differ.sum() <= 3 and np.all(margin[differ] < 1e-4)
  same = ~differ & (want >= 0)
  np.testing.assert_allclose(np.asarray(got.bary)[same], want_bary[same], atol=2e-5)
  assert np.all(np.asarray(got.bary)[want < 0] == 0)


def test_interpolate_reproduces_affine_function():
  xy, tri, _ = ellipse_mesh()
  need = raster.candidates_needed(xy, tri, H, W)
  ras = raster.rasterize(xy, tri, height=H, width=W, max_candidates=need)
  values = np.stack([3 * xy[:, 0] - xy[:, 1] + 5, 0.5 * xy[:, 1]], 1)
  got = np.asarray(raster.interpolate(ras, tri, values))
  pix = pixel_grid()
  want = np.stack([3 * pix[..., 0] - pix[..., 1] + 5, 0.5 * pix[..., 1]], -1)
  covered = np.asarray(ras.tri) >= 0
  assert covered.sum() > 500
  np.testing.assert_allclose(got[covered], want[covered], atol=2e-4)


def test_z_buffer_picks_nearest_whatever_the_order():
  xy = np.array([[2, 2], [28, 2], [2, 28], [4, 4], [30, 4], [4, 30]], np.float32)
  tri = np.array([[0, 1, 2], [3, 4, 5]], np.int32)
  z_first_near = np.array([0, 0, 0, 1, 1, 1], np.float32)
  r = raster.rasterize(xy, tri, z_first_near, height=32, width=32, max_candidates=2048)
  assert int(r.tri[10, 10]) == 0  # both cover it; triangle 0 is nearer
  r = raster.rasterize(xy, tri, 1 - z_first_near, height=32, width=32, max_candidates=2048)
  assert int(r.tri[10, 10]) == 1
  r = raster.rasterize(xy, tri, height=32, width=32, max_candidates=2048)
  assert int(r.tri[10, 10]) == 1  # no depth: the last triangle drawn wins


def test_overflow_is_reported():
  xy, tri, _ = ellipse_mesh()
  need = raster.candidates_needed(xy, tri, H, W)
  assert not bool(raster.rasterize(xy, tri, height=H, width=W, max_candidates=need).overflow)
  short = raster.rasterize(xy, tri, height=H, width=W, max_candidates=need // 2)
  assert bool(short.overflow)
  assert (np.asarray(short.tri) >= 0).sum() > 0


def flow(ref, drv, tri, ring, config=flow_lib.FlowConfig(), height=H, width=W, **kw):
  return flow_lib.approximate_flow(ref, drv, tri, ring, height=height, width=width,
                                   config=config, **kw)


def test_identity_motion_gives_identity_grid():
  xy, tri, ring = ellipse_mesh()
  res = flow(xy, xy, tri, ring)
  np.testing.assert_allclose(res.grid, warp.identity_grid(H, W), atol=1e-5)
  total = sum(np.asarray(m) for m in res.masks.values())
  np.testing.assert_allclose(total, 1.0, atol=1e-6)
  for name in flow_lib.REGIONS:  # every region is present in this framing
    assert float(res.masks[name].max()) > 0.99, name


def similarity(xy, angle, scale, shift, centre):
  rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  return ((xy - centre) @ rot.T + centre + shift), rot


@pytest.mark.parametrize("kind", flow_lib.HEAD_TRANSFORMS)
def test_similarity_motion_is_followed_exactly_by_face_and_head(kind):
  xy, tri, ring = ellipse_mesh()
  centre, shift = np.array([32.0, 29.0]), np.array([2.5, -1.5])
  drv, rot = similarity(xy, 0.12, 1.08, shift, centre)
  res = flow(xy, drv.astype(np.float32), tri, ring, flow_lib.FlowConfig(head_transform=kind))
  want = (pixel_grid() - centre - shift) @ np.linalg.inv(rot).T + centre
  err = np.abs(source_pixels(res.grid) - want).max(-1)
  face = np.asarray(res.masks["face"]) > 0
  head = np.asarray(res.masks["head"]) == 1.0
  assert face.sum() > 800 and head.sum() > 300
  assert err[face].max() < 1e-3 and err[head].max() < 1e-3
  background = np.asarray(res.masks["background"]) == 1.0
  assert background.sum() > 100
  np.testing.assert_allclose(source_pixels(res.grid)[background], pixel_grid()[background],
                             atol=1e-4)


@pytest.mark.parametrize("damping", [0.5])
def test_translation_moves_torso_by_damped_mean_motion(damping):
  xy, tri, ring = ellipse_mesh()
  shift = np.array([3.0, 2.0], np.float32)
  res = flow(xy, xy + shift, tri, ring, flow_lib.FlowConfig(torso_damping=damping))
  offset = source_pixels(res.grid) - pixel_grid()
  face = np.asarray(res.masks["face"]) > 0
  # Beyond the outline's blend zone (boundary_blend face heights) the torso is on its own.
  face_h = np.ptp(xy[ring, 1])
  far = ndimage.distance_transform_edt(~face) > 0.15 * face_h + 1
  torso = (np.asarray(res.masks["torso"]) == 1.0) & far
  assert torso.sum() > 100
  np.testing.assert_allclose(offset[torso], np.broadcast_to(-damping * shift, offset[torso].shape),
                             atol=1e-4)
  np.testing.assert_allclose(offset[face], np.broadcast_to(-shift, offset[face].shape), atol=1e-4)


def max_step(src):
  """Largest change of the source position between neighbouring pixels, in pixels."""
  return max(np.abs(np.diff(src, axis=0)).max(), np.abs(np.diff(src, axis=1)).max())


def test_nonrigid_motion_has_no_seams():
  """Open a 'jaw' (lower vertices move down up to 8 px, and sideways): F_app stays continuous.

  A continuous map has the same steepest step (px per px) at every resolution, while a
  seam's jump grows with it; so the flow at 2x resolution must not be steeper, whereas a
  deliberately seamed map (mesh flow inside, identity outside) doubles its step.
  """
  xy, tri, ring = ellipse_mesh()
  drv = xy.copy()
  low = np.clip((xy[:, 1] - 29.0) / 18.0, 0, None)
  drv[:, 1] += 8.0 * low ** 2
  drv[:, 0] += 2.0 * low  # sideways too, so no region's own motion matches the mesh
  steps, seamed = [], []
  for size in (H, 2 * H):
    up = lambda p: np.asarray(flow_lib.rescale_points(p, (H, W), (size, size)))
    res = flow(up(xy), up(drv), tri, ring, height=size, width=size)
    src = source_pixels(res.grid)
    steps.append(max_step(src))
    face = np.asarray(res.masks["face"])[..., None] > 0
    seamed.append(max_step(np.where(face, src, pixel_grid(size, size))))
  assert steps[1] < 1.1 * steps[0] and steps[0] < 4.0, steps
  assert seamed[1] > 1.8 * seamed[0], seamed  # the test can tell a seam
  face = np.asarray(flow(xy, drv, tri, ring).masks["face"]) > 0
  moved = np.abs(source_pixels(flow(xy, drv, tri, ring).grid) - pixel_grid()).max(-1)
  assert moved[face].max() > 6.0  # the motion is there


def test_vmap_over_frames_matches_single_calls():
  xy, tri, ring = ellipse_mesh()
  drvs = np.stack([xy + [1.0, 0.0], xy + [0.0, -2.0], similarity(xy, 0.1, 1.0, 0, 32)[0]])
  drvs = drvs.astype(np.float32)
  batched = jax.vmap(lambda d: flow(xy, d, tri, ring))(drvs)
  for i, d in enumerate(drvs):
    np.testing.assert_allclose(batched.grid[i], flow(xy, d, tri, ring).grid, atol=1e-6)


def test_rescale_points_keeps_normalised_positions():
  xy = np.array([[0.0, 0.0], [63.0, 31.0], [10.5, 20.25]], np.float32)
  small = np.asarray(flow_lib.rescale_points(xy, (32, 64), (16, 48)))
  norm = lambda p, hw: (2 * p + 1) / np.array([hw[1], hw[0]]) - 1
  np.testing.assert_allclose(norm(small, (16, 48)), norm(xy, (32, 64)), atol=1e-6)


def test_bad_inputs_raise_clear_errors():
  xy, tri, ring = ellipse_mesh()
  with pytest.raises(ValueError, match="drv_xy"):
    flow(xy, xy[:-1], tri, ring)
  with pytest.raises(ValueError, match="triangles"):
    flow(xy, xy, tri[:, :2], ring)
  with pytest.raises(ValueError, match="boundary_ring"):
    flow(xy, xy, tri, ring[:2])
  with pytest.raises(ValueError, match="drv_z"):
    flow(xy, xy, tri, ring, drv_z=np.zeros(3, np.float32))
  with pytest.raises(ValueError, match="head_transform"):
    flow_lib.FlowConfig(head_transform="projective")
  with pytest.raises(ValueError, match="feather"):
    flow_lib.FlowConfig(feather=0.0)


def test_nearest_covered_matches_exact_distance_transform():
  rng = np.random.default_rng(3)
  covered = rng.uniform(size=(48, 40)) > 0.995
  covered[20:30, 10:25] = True  # a blob as well as scattered seeds
  py, px = np.mgrid[0:48, 0:40].astype(np.float32)
  qx, qy, dist = (np.asarray(a) for a in flow_lib._nearest_covered(
      jnp.asarray(covered), jnp.asarray(px), jnp.asarray(py), 64))
  exact = ndimage.distance_transform_edt(~covered)
  assert covered[qy.astype(int), qx.astype(int)].all()  # every pixel points at a seed
  np.testing.assert_allclose(dist, np.hypot(px - qx, py - qy), atol=1e-4)
  err = dist - exact
  assert err.min() > -1e-4  # never closer than the true nearest seed
  assert np.mean(err < 1e-4) > 0.99 and err.max() < 1.0  # jump flooding: rare, small misses


# ------------------------------------------------------------- from morphable-model parameters


@pytest.fixture(scope="module")
def model():
  from hdtf_jax.face import morphable
  return morphable.default_model()


@pytest.fixture(scope="module")
def detected():
  """256x256 face crop of the astronaut portrait and the face-mesh points detected on it."""
  return flow_lib.astronaut_face(256)


@pytest.fixture(scope="module")
def astronaut(model, detected):
  """The crop and parameters placing the model on it."""
  image, points = detected
  return image, flow_lib.params_from_points(model, points)


def test_params_fit_places_mesh_on_the_detected_face(model, detected):
  _, points = detected
  xy, _ = flow_lib.mesh_points(model, flow_lib.params_from_points(model, points), 256, 256)
  assert np.abs(np.asarray(xy) - points[:, :2]).mean() < 1.5  # pixels of a 256 crop


def test_params_identity_and_batching(model, astronaut):
  _, ref = astronaut
  res = flow_lib.flow_from_params(model, ref, ref, 256, 64)
  np.testing.assert_allclose(res.grid, warp.identity_grid(64, 64), atol=1e-5)
  assert not bool(res.overflow)
  drv = [flow_lib.driving_params(model, ref, {"jaw_open": 0.7}, {"yaw": -0.2}),
         flow_lib.driving_params(model, ref, {}, {"roll": 0.1, "ty": 5.0})]
  stacked = {k: np.stack([d[k] for d in drv]) for k in flow_lib.PARAM_KEYS}
  batched = flow_lib.flow_from_params(model, ref, stacked, 256, 64)
  assert batched.grid.shape == (2, 64, 64, 2)
  for i, d in enumerate(drv):
    single = flow_lib.flow_from_params(model, ref, d, 256, 64)
    np.testing.assert_allclose(batched.grid[i], single.grid, atol=1e-6)
    np.testing.assert_allclose(batched.masks["face"][i], single.masks["face"])


def test_open_mouth_is_filled_by_the_mesh(model, astronaut):
  from matplotlib.path import Path
  _, ref = astronaut
  drv = flow_lib.driving_params(model, ref, {"jaw_open": 1.0}, {})
  xy, _ = flow_lib.mesh_points(model, drv, 256, 64)
  lips = np.asarray(xy)[model.regions["inner_lips"]]
  py, px = np.mgrid[0:64, 0:64]
  opening = Path(lips).contains_points(np.stack([px.ravel(), py.ravel()], 1)).reshape(64, 64)
  assert opening.sum() >= 10  # the jaw really opens the mouth
  filled = flow_lib.flow_from_params(model, ref, drv, 256, 64)
  assert np.all(np.asarray(filled.masks["face"])[opening] == 1)
  holes = flow_lib.flow_from_params(model, ref, drv, 256, 64, flow_lib.FlowConfig(fill_holes=()))
  assert np.mean(np.asarray(holes.masks["face"])[opening]) < 0.5


def template_shift(before, after, centre, half=6, search=40):
  """Where the patch of `before` around `centre` went in `after` (normalised correlation)."""
  import cv2
  pad = half + search
  a, b = (np.pad(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), pad, mode="edge") for x in (before, after))
  cx, cy = np.round(centre).astype(int) + pad
  r = half + search
  score = cv2.matchTemplate(b[cy - r:cy + r, cx - r:cx + r],
                            a[cy - half:cy + half, cx - half:cx + half], cv2.TM_CCOEFF_NORMED)
  _, best, _, loc = cv2.minMaxLoc(score)
  return np.array(loc) - search, best


def test_warping_the_astronaut_opens_the_jaw_and_turns_the_nose(model, astronaut):
  """F_app (64x64) from parameter pairs warps the real 256x256 photo as the mesh moves."""
  image, ref = astronaut
  ref_xy = np.asarray(flow_lib.mesh_points(model, ref, 256, 256)[0])
  ring = model.regions["face_boundary"]
  chin = ring[np.argmax(ref_xy[ring, 1])]
  nose = np.argmin(model.mean[:, 2])
  moves = {"jaw": ({"jaw_open": 1.0}, {}), "yaw": ({}, {"yaw": 0.35})}  # T=2: compiled already
  drv = {k: flow_lib.driving_params(model, ref, *m) for k, m in moves.items()}
  stacked = {k: np.stack([d[k] for d in drv.values()]) for k in flow_lib.PARAM_KEYS}
  res = flow_lib.flow_from_params(model, ref, stacked, 256, 64)
  drv_xy = np.asarray(flow_lib.mesh_points(model, stacked, 256, 256)[0])
  warped = {k: flow_lib.warp_image(image, res.grid[i]) for i, k in enumerate(moves)}

  chin_shift, score = template_shift(image, warped["jaw"], ref_xy[chin])
  assert score > 0.9 and chin_shift[1] > 15  # the chin moved down, in pixels of the photo
  np.testing.assert_allclose(chin_shift, drv_xy[0, chin] - ref_xy[chin], atol=2.5)
  still, _ = template_shift(image, warped["jaw"], ref_xy[nose])
  np.testing.assert_array_equal(still, [0, 0])  # jaw opening leaves the nose alone
  nose_shift, score = template_shift(image, warped["yaw"], ref_xy[nose])
  expected = drv_xy[1, nose] - ref_xy[nose]
  assert score > 0.9 and expected[0] < -8  # positive yaw turns the nose to the image left
  np.testing.assert_allclose(nose_shift, expected, atol=2.5)


def test_picture_sheet(model, detected, tmp_path):
  import matplotlib.image
  path = flow_lib.make_sheet(tmp_path / "sheet.png", model, image_size=256, flow_size=64,
                             face=detected)
  sheet = matplotlib.image.imread(path)
  assert sheet.shape[0] > 400 and sheet.shape[1] > 400
  assert sheet[..., :3].std() > 0.1  # pictures, not a blank page


def test_bad_parameters_raise_clear_errors(model, astronaut):
  _, ref = astronaut
  with pytest.raises(ValueError, match="pose"):
    flow_lib.flow_from_params(model, ref, {k: v for k, v in ref.items() if k != "pose"}, 256, 64)
  with pytest.raises(ValueError, match="flow_size"):
    flow_lib.flow_from_params(model, ref, ref, 256, (64,))
  with pytest.raises(ValueError, match="no expression basis"):
    flow_lib.driving_params(model, ref, {"wink": 1.0}, {})
