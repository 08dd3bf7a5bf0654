"""Training across processes: two local JAX processes (`jax.distributed` over loopback, gloo
collectives, 4 fake CPU devices each) against one process on 8 fake CPU devices.

One run of `tests/multihost_worker.py` per process (the two of the 2-process run and the
single-process reference, all at once), each doing two stage-1 and two stage-2 train steps of
the tiny presets on the same global batches; the reference then restores the 2-process run's
orbax checkpoints and runs stage 2 with parameters split over an `fsdp` and a `model` axis.
"""
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from experiments.configs import stage1 as stage1_configs
from experiments.configs import stage2 as stage2_configs
from hdtf_jax.data import synthetic
from hdtf_jax.train import mesh as mesh_lib
from hdtf_jax.train import stage1, stage2

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "multihost_worker.py"
GLOBAL_BATCH = 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _stage2_batch(rng: np.random.Generator, size: int) -> dict:
  """Random frames and parameters near a centred, frontal face (F_app stays in the frame);
  the layouts only have to agree, not to learn anything."""
  def params():
    n = rng.standard_normal
    return {"shape": n((GLOBAL_BATCH, 60)).astype(np.float32),
            "scale": (0.23 + 0.02 * n(GLOBAL_BATCH)).astype(np.float32),
            "mouth": (0.5 * n((GLOBAL_BATCH, 28))).astype(np.float32),
            "eyebrow": (0.5 * n((GLOBAL_BATCH, 5))).astype(np.float32),
            "pose": (np.array([0, 0, 0, 0.5, 0.5]) + np.array([0.1, 0.1, 0.05, 0.03, 0.03])
                     * n((GLOBAL_BATCH, 5))).astype(np.float32)}
  frames = lambda: rng.uniform(0, 1, (GLOBAL_BATCH, size, size, 3)).astype(np.float32)
  return stage2.model_inputs({"reference": frames(), "driving": frames(),
                              "ref_params": params(), "drv_params": params()})


def _global_batches() -> dict:
  """Two global batches per stage and stage 1's audio statistics: stage 1 from the tiny
  preset's synthetic source, stage 2 random (`_stage2_batch`)."""
  c1 = stage1_configs.get_config("tiny")
  src = synthetic.SyntheticStage1Source(
      synthetic.SyntheticConfig.from_dict(c1.data.synthetic.to_dict()), "train")
  it = synthetic.WindowIterator(src, window=c1.data.window, batch_size=GLOBAL_BATCH, seed=0)
  s1 = [next(it) for _ in range(2)]
  rng = np.random.default_rng(0)
  size = stage2_configs.get_config("tiny").model.image_size
  return {"stage1": s1, "stage1_stats": stage1.compute_stats(s1),
          "stage2": [_stage2_batch(rng, size) for _ in range(2)]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  batches = tmp / "batches.pkl"
  batches.write_bytes(pickle.dumps(_global_batches()))
  multi, single = tmp / "multi", tmp / "single"
  base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    base.pop(k, None)
  env4 = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  env8 = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  cmd = [sys.executable, str(WORKER), f"--batches={batches}"]
  port = _free_port()
  procs = [subprocess.Popen(cmd + [f"--out={multi}", "--num_processes=2", f"--process_id={i}",
                                   f"--port={port}"], env=env4, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  procs.append(subprocess.Popen(cmd + [f"--out={single}", f"--reference_of={multi}"], env=env8,
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True))
  start, errors = time.time(), []
  for name, p in zip(("process 0", "process 1", "single process"), procs):
    try:
      _, err = p.communicate(timeout=max(1.0, 600 - (time.time() - start)))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      _, err = p.communicate()
      errors.append(f"{name} timed out; its last progress: {err.strip().splitlines()[-1:]}")
    if p.returncode:
      errors.append(f"{name} exited {p.returncode}:\n{err[-3000:]}")
  assert not errors, "\n".join(errors)
  read = lambda path: json.loads(path.read_text())
  return {"multi": [read(multi / f"multi_p{i}.json") for i in range(2)],
          "single": read(single / "single_p0.json"),
          "multi_params": dict(np.load(multi / "multi_params.npz")),
          "single_params": dict(np.load(single / "single_params.npz")),
          "multi_dir": multi}


def _close_metrics(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b) == 2
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (k, x[k], y[k])


def _assert_states_close(a: dict, b: dict, prefix: str, other_prefix: str | None = None) -> None:
  """Per leaf under `prefix`, max |a - b| / max(1, max |a|): parameters and BatchNorm
  statistics within 5e-5 (a few % of the two steps' movement, 2 x lr = 8e-4), Adam moments
  within 1e-3 (gradients summed in another order; the second moment squares that)."""
  other_prefix = other_prefix or prefix
  keys = [k for k in a if k.startswith(prefix) and np.issubdtype(a[k].dtype, np.floating)]
  assert any("opt_state" in k for k in keys) and any("g_params" in k for k in keys)
  for k in keys:
    x, y = a[k], b[other_prefix + k[len(prefix):]]
    assert x.shape == y.shape, k
    err = float(np.max(np.abs(x - y)) / max(1.0, float(np.max(np.abs(x)))))
    assert err < (1e-3 if "opt_state" in k else 5e-5), (k, err)


def test_two_processes_match_one_process_on_eight_devices(runs):
  for i, info in enumerate(runs["multi"]):
    assert (info["process_index"], info["process_count"]) == (i, 2)
    assert (info["devices"], info["local_devices"]) == (8, 4)
  assert (runs["single"]["process_count"], runs["single"]["devices"]) == (1, 8)
  # stage1.make_data: each process loads its half of the global batch from its own shard, and
  # both compute the same audio statistics (they are part of the replicated train state).
  l0, l1 = runs["multi"][0]["loader"], runs["multi"][1]["loader"]
  assert l0["rows"] == l1["rows"] == 4
  assert not np.allclose(l0["first_audio"], l1["first_audio"])
  assert l0["stats"] == l1["stats"]
  p0, p1, single = runs["multi"][0]["metrics"], runs["multi"][1]["metrics"], runs["single"]["metrics"]
  assert p0 == p1  # replicated scalars: both processes see the same numbers
  for stage in ("stage1", "stage2"):  # every loss, grad norm (and PSNR) of both steps
    _close_metrics(single[stage], p0[stage])
  multi, ref = runs["multi_params"], runs["single_params"]
  for prefix in ("s1", "s2"):  # whole train states
    _assert_states_close(ref, multi, prefix)
  assert int(multi["s1.step"]) == int(multi["s2.step"]) == 2


def test_two_process_checkpoint_restores_in_one_process(runs):
  assert runs["single"]["restored_steps"] == [2, 2]
  multi, ref = runs["multi_params"], runs["single_params"]
  for stage in ("1", "2"):
    keys = [k for k in multi if k.startswith(f"s{stage}")]
    assert keys
    for k in keys:  # the very same numbers
      np.testing.assert_array_equal(ref[f"r{stage}" + k[2:]], multi[k], err_msg=k)
  d = runs["multi_dir"]
  assert (d / "s1" / "checkpoints" / "2").is_dir() and (d / "s2" / "checkpoints" / "2").is_dir()
  # Logs: process 0 writes, process 1 does not.
  records = [json.loads(line) for line in (d / "logs_p0" / "metrics.jsonl").read_text().splitlines()]
  assert records[0]["train/g_total"] == pytest.approx(runs["multi"][0]["metrics"]["stage1"][-1]["g_total"])
  assert not (d / "logs_p1").exists()


def test_fsdp_matches_data_parallel(runs):
  """Stage 2 with G_vid/D_vid parameters and Adam moments split over `fsdp` (mesh
  {data: 4, fsdp: 2}, mesh.fsdp_min_size=1024) gives the losses and states of {data: 8}."""
  info = runs["single"]["fsdp"]
  assert info["split_leaves"].get("fsdp", 0) > 10, info["split_leaves"]
  assert info["g_bytes_per_device"] < 0.75 * info["g_bytes"]
  _close_metrics(runs["single"]["metrics"]["stage2"], info["metrics"])
  _assert_states_close(runs["single_params"], runs["single_params"], "s2", "fsdp")


def test_parameter_rules_split_large_arrays_over_fsdp_and_model():
  """The layout rules alone (abstract mesh, nothing compiled): `model` takes the last
  (output-channel) dimension, `fsdp` the largest remaining divisible one, small arrays stay
  replicated, and an Adam moment gets its parameter's layout."""
  import jax
  from jax.sharding import AbstractMesh, AxisType
  mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
  sd = lambda *s: jax.ShapeDtypeStruct(s, np.float32)
  tree = {"kernel": sd(3, 3, 64, 128), "odd": sd(3, 3, 5, 7), "bias": sd(64),
          "mu": {"kernel": sd(3, 3, 64, 128)}}
  specs = jax.tree_util.tree_map(lambda s: tuple(s.spec),
                                 mesh_lib.param_sharding(tree, mesh, min_size=100))
  assert specs["kernel"] == (None, None, "fsdp", "model") == specs["mu"]["kernel"]
  assert specs["odd"] == () and specs["bias"] == ()  # nothing divides / too small
  data_only = AbstractMesh((8,), ("data",), axis_types=(AxisType.Auto,))
  assert tuple(mesh_lib.param_sharding(tree, data_only, 100)["kernel"].spec) == ()


def test_initialize_distributed_falls_back_to_one_process_and_names_missing_values():
  code = textwrap.dedent("""
    import json, os, jax
    from hdtf_jax.train import mesh
    out = {"one": mesh.initialize_distributed(num_processes=1)}
    os.environ["JAX_NUM_PROCESSES"] = "2"  # two processes but no coordinator: a clear error
    try:
      mesh.initialize_distributed()
      out["missing"] = "no error"
    except ValueError as e:
      out["missing"] = str(e)
    del os.environ["JAX_NUM_PROCESSES"]
    out["auto"] = mesh.initialize_distributed()  # nothing set, no cluster: one process
    out["count"] = jax.process_count()
    print(json.dumps(out))
  """)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_",
                                                                    "JAX_PROCESS_ID", "SLURM_",
                                                                    "OMPI_"))}
  res = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-2000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["one"] is False and out["auto"] is False and out["count"] == 1
  assert "distributed start-up" in out["missing"] and "coordinator_address" in out["missing"]
