"""One process of the multi-process training test (`tests/test_multihost.py`).

  python tests/multihost_worker.py --batches=B.pkl --out=DIR --num_processes=2 --process_id=I \
      --port=P        # one of the two processes of the 2-process run (4 CPU devices each)
  python tests/multihost_worker.py --batches=B.pkl --out=DIR --reference_of=DIR2
                      # the single-process reference on 8 CPU devices; then restores DIR2's
                      # checkpoints and runs stage 2 on a {data: 4, fsdp: 2} mesh

Both run two stage-1 and two stage-2 train steps (tiny presets) on the same global batches
(`B.pkl`: each process feeds its rows), save the train states with orbax (every process calls
save), log one scalar (only process 0 may write) and write what they saw to DIR as
`<role>_p<process>.json` plus, from process 0, `<role>_params.npz` (whole arrays).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

# Cross-process collectives on CPU (also what `mesh.initialize_distributed` picks by default).
jax.config.update("jax_cpu_collectives_implementation", "gloo")

from experiments.configs import stage1 as stage1_configs  # noqa: E402
from experiments.configs import stage2 as stage2_configs  # noqa: E402
from hdtf_jax.train import checkpoints, logs, stage1, stage2  # noqa: E402
from hdtf_jax.train import mesh as mesh_lib  # noqa: E402

HOLD, DECAY = 20, 10  # the tiny presets' schedule


def configs(args):
  c1 = stage1_configs.get_config("tiny")
  c2 = stage2_configs.get_config("tiny")
  for c in (c1, c2):
    c.train.fast_compile = True
    c.data.batch_size = 8
    if args.num_processes > 1:
      c.distributed.update(coordinator_address=f"localhost:{args.port}",
                           num_processes=args.num_processes, process_id=args.process_id)
  # Adam turns float noise in a zero gradient (conv biases in front of BatchNorm) into a full
  # +-lr step whatever the layout; a larger epsilon keeps such parameters still.
  c1.optim.eps, c2.optim.eps = 1e-4, 1e-3
  return c1, c2


def flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(mesh_lib.to_host(tree))[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def rows(tree):
  """This process's rows of a global batch."""
  pi, pc = jax.process_index(), jax.process_count()

  def take(x):
    n = np.shape(x)[0]
    return np.asarray(x)[pi * n // pc:(pi + 1) * n // pc]
  return jax.tree_util.tree_map(take, tree)


def floats(m) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(m).items()}


def run_stage1(c, mesh, data, workdir: Path):
  prog = stage1.program(c, mesh, HOLD, DECAY)
  state = stage1.init_state(prog, 0, data["stage1_stats"])
  metrics = []
  for b in data["stage1"]:
    state, m = prog.step(state, mesh_lib.shard_batch(rows(stage1.model_inputs(b, c.model)), mesh))
    metrics.append(floats(m))
  save(workdir, state, len(metrics))
  return state, metrics


def run_stage2(c, mesh, data, workdir: Path | None):
  perceptual = stage2.perceptual_network(c)
  prog = stage2.program(c, mesh, HOLD, DECAY, perceptual)
  state = stage2.init_state(prog, 0)
  vgg_vars = stage2.replicate(perceptual.variables, mesh)
  metrics = []
  for b in data["stage2"]:
    state, m = prog.step(state, mesh_lib.shard_batch(rows(b), mesh), vgg_vars)
    metrics.append(floats(m))
  if workdir is not None:
    save(workdir, state, len(metrics))
  return state, metrics


def save(workdir: Path, state, step: int) -> None:
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints")
  ckpt.save(step, state, {"index": step}, {"processes": jax.process_count()}, force=True)
  ckpt.close()


def sharding_summary(state) -> dict:
  """How many leaves are split over each mesh axis, and the bytes this process holds of the
  generator's parameters."""
  axes: dict[str, int] = {}
  for x in jax.tree_util.tree_leaves(state):
    for a in {a for s in x.sharding.spec if s for a in ((s,) if isinstance(s, str) else s)}:
      axes[a] = axes.get(a, 0) + 1
  per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(
      state.g_params))
  return {"split_leaves": axes, "g_bytes_per_device": int(per_device),
          "g_bytes": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(state.g_params)))}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batches", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--reference_of", default=None, help="the 2-process run's --out, to restore")
  p.add_argument("--wait_s", type=float, default=400.0)
  args = p.parse_args()
  c1, c2 = configs(args)
  multi = mesh_lib.initialize_distributed(**c1.distributed)
  role = "multi" if multi else "single"
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  pi = jax.process_index()
  data = pickle.loads(Path(args.batches).read_bytes())
  t0 = time.perf_counter()

  def lap(name: str) -> None:  # progress on stderr: a test that times out shows where
    info["seconds"][name] = round(time.perf_counter() - t0, 1)
    print(f"{role} process {pi}: {name} done at {info['seconds'][name]} s", file=sys.stderr,
          flush=True)

  info = {"seconds": {}, "process_index": pi, "process_count": jax.process_count(),
          "devices": jax.device_count(), "local_devices": jax.local_device_count()}
  lap("start")
  if multi:  # the loader: this process's shard of the training windows, shared statistics
    loader = stage1.make_data(c1)
    first = next(loader.train_iter)
    info["loader"] = {"rows": int(first["audio"].shape[0]),
                      "first_audio": np.asarray(first["audio"][:, :4, 0], float).tolist(),
                      "stats": {k: np.asarray(v, float).tolist() for k, v in loader.stats.items()}}
    lap("loader")
  mesh = mesh_lib.make_mesh(c1.mesh.axes.to_dict())
  s1, m1 = run_stage1(c1, mesh, data, out / "s1")
  lap("stage1")
  s2, m2 = run_stage2(c2, mesh, data, out / "s2")
  lap("stage2")
  info["metrics"] = {"stage1": m1, "stage2": m2}
  logger = logs.MetricLogger(out / f"logs_p{pi}", tensorboard=False)
  logger.scalars(1, m1[-1], prefix="train/")
  logger.close()
  arrays = {f"s1{k}": v for k, v in flat(s1).items()}
  arrays.update({f"s2{k}": v for k, v in flat(s2).items()})

  if not multi:
    for name, axes in (("fsdp", {"data": 4, "fsdp": 2}),):
      c = stage2_configs.get_config("tiny")
      c.update_from_flattened_dict({"train.fast_compile": True, "data.batch_size": 8,
                                    "optim.eps": 1e-3, "mesh.fsdp_min_size": 1024})
      c.mesh.axes = ml_collections.ConfigDict(axes)
      state, metrics = run_stage2(c, mesh_lib.make_mesh(axes), data, None)
      info[name] = {"metrics": metrics, **sharding_summary(state)}
      arrays.update({f"{name}{k}": v for k, v in flat(state).items()})
      lap(name)
    if args.reference_of:  # restore the 2-process run's checkpoints in this single process
      other = Path(args.reference_of)
      deadline = time.time() + args.wait_s
      while not (other / "multi_p0.json").exists() or not (other / "multi_p1.json").exists():
        if time.time() > deadline:
          raise TimeoutError(f"no 2-process results in {other} after {args.wait_s} s")
        time.sleep(0.5)
      r1 = stage1.restore_state(c1, other / "s1")
      r2 = stage2.restore_state(c2, other / "s2")
      arrays.update({f"r1{k}": v for k, v in flat(r1).items()})
      arrays.update({f"r2{k}": v for k, v in flat(r2).items()})
      info["restored_steps"] = [int(r1.step), int(r2.step)]
      lap("restore")

  if pi == 0:
    np.savez(out / f"{role}_params.npz", **arrays)
  # Last: the file the reference waits for (and the test reads).
  (out / f"{role}_p{pi}.json.tmp").write_text(json.dumps(info))
  os.replace(out / f"{role}_p{pi}.json.tmp", out / f"{role}_p{pi}.json")


if __name__ == "__main__":
  main()
