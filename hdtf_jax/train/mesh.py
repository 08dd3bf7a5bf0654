"""Device mesh, shardings and multi-process start-up.

One code path from one CPU device to a multi-host GPU/TPU slice: the train step
is jitted with `NamedSharding`s over a `Mesh` of every device of every process,
whose axes come from the config (`mesh.axes`; a size of -1 takes every device
not used by the other axes):
  data   batches are split over it (plain data parallelism);
  fsdp   batches are split over it too, and so are large parameters and their
         optimizer moments (each on its largest divisible dimension): memory per
         device shrinks with the axis while the step stays data parallel;
  model  large parameters are split on their last (output-channel) dimension,
         the batch is not: tensor parallelism, left to XLA's SPMD partitioner.
Every process feeds its own rows of a global batch (`shard_batch`).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")  # the axes a batch is split over
FSDP_MIN_SIZE = 2 ** 18       # arrays with fewer elements stay replicated (not worth a gather)
log = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _device_ids(ids: Any) -> list[int] | None:
  if ids is None or ids == "":
    return None
  if isinstance(ids, str):
    return [int(i) for i in ids.split(",") if i.strip()]
  if isinstance(ids, int):
    return [ids]
  return [int(i) for i in ids]


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: str | Sequence[int] | int | None = None) -> bool:
  """Starts `jax.distributed` (before anything touches a device); True when multi-process.

  Each value comes from its argument (the config's `distributed` block), else the
  environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`,
  `JAX_LOCAL_DEVICE_IDS`), else JAX's cluster detection (Cloud TPU pods, SLURM, Open MPI,
  Kubernetes), which also fills whatever is missing when some are given. With nothing set
  and no cluster found, the run is single-process; `num_processes=1` skips detection (e.g.
  a plain `python` inside a multi-task SLURM allocation). Cross-process collectives on CPU
  use gloo unless another implementation was chosen.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  local_device_ids = _device_ids(local_device_ids)
  if num_processes == 1:
    return False
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"distributed.num_processes must be >= 1, got {num_processes}")
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id,
                                         local_device_ids))
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
  except ValueError as e:
    # JAX raises ValueError when no cluster is detected and values are missing.
    if explicit:
      raise ValueError(f"distributed start-up: {e} (set distributed.coordinator_address, "
                       "num_processes and process_id, or the JAX_* environment variables)") from e
    return False
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over `devices` (default: all devices of all processes) with named axis sizes; one
  size may be -1.

  `make_mesh({'data': -1})` is plain data parallelism; `{'data': -1, 'fsdp': 2}` also shards
  parameters over pairs of devices. Where the backend has no topology-aware layout (fake CPU
  devices), devices are laid out process by process, so each process's devices are one
  contiguous block of the leading (`data`) axis and its batch rows one contiguous block.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = dict(axes or {"data": -1})
  sizes = list(axes.values())
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh axes {axes}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1])) if sizes else 1
  if known < 1 or len(devices) % known:
    raise ValueError(f"mesh axes {axes} do not divide {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh axes {dict(zip(axes, sizes))} need {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  try:
    device_array = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # not every backend has a topology-aware layout (e.g. fake CPU devices)
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    device_array = np.asarray(ordered).reshape(sizes)
  return Mesh(device_array, tuple(axes))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in DATA_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def mesh_process_count(mesh: Mesh) -> int:
  """How many processes hold devices of `mesh`."""
  return len({d.process_index for d in mesh.devices.flat})


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """This process's rows of a global batch (numpy pytree) -> global sharded jax.Arrays.

  Every process passes the same number of rows; the global batch is the processes' rows in
  process order (`jax.make_array_from_process_local_data`). One process: the whole batch.
  """
  sharding = batch_sharding(mesh)
  processes = mesh_process_count(mesh)
  local_shards = num_batch_shards(mesh) // processes

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % max(local_shards, 1):
      raise ValueError(f"shard_batch: this process's {x.shape[0] if x.ndim else 0} rows do not "
                       f"split over its {local_shards} batch shards (mesh {dict(mesh.shape)}, "
                       f"{processes} processes)")
    global_shape = (x.shape[0] * processes,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree_util.tree_map(put, batch)


def to_host(tree: Any) -> Any:
  """Whole numpy arrays of a pytree of global arrays on every process (gathers the shards
  other processes hold; a no-op copy in a single process)."""
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree_util.tree_map(get, tree)


def param_sharding(params: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
  """Shardings for a parameter (or whole train-state) pytree.

  Arrays of at least `min_size` elements are split on their last dimension over `model` (if
  the mesh has it and it divides), then on their largest remaining divisible dimension over
  `fsdp`; everything else is replicated. Adam's moments have their parameter's shape, so a
  train state gets the same layout for both.
  """
  sizes = {a: mesh.shape[a] for a in ("fsdp", "model") if mesh.shape.get(a, 1) > 1}
  if not sizes:
    return jax.tree_util.tree_map(lambda _: replicated(mesh), params)

  def rule(x):
    shape = tuple(np.shape(x))
    if not shape or np.prod(shape) < min_size:
      return replicated(mesh)
    spec: list[str | None] = [None] * len(shape)
    if "model" in sizes and shape[-1] % sizes["model"] == 0:
      spec[-1] = "model"
    if "fsdp" in sizes:
      for dim in np.argsort(shape, kind="stable")[::-1]:
        if spec[dim] is None and shape[dim] % sizes["fsdp"] == 0:
          spec[dim] = "fsdp"
          break
    return NamedSharding(mesh, P(*spec)) if any(spec) else replicated(mesh)

  return jax.tree_util.tree_map(rule, params)
