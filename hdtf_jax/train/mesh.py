"""Device mesh, shardings and multi-host start-up.

One code path from one CPU device to a multi-host GPU/TPU slice: the train step
is jitted with `NamedSharding`s over a `Mesh` whose axes come from the config
(`mesh.data` = -1 takes every device not used by the other axes). Batches are
sharded over `data` (and `fsdp` if present); parameters are replicated unless
a rule in the config shards them.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")  # the axes a batch is split over


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts `jax.distributed` when more than one process is configured.

  Values come from arguments, else the environment (`JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); on TPU pods and SLURM JAX detects them
  itself when `num_processes` is left unset and `HDTF_JAX_DISTRIBUTED=auto`.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes or int(env.get("JAX_NUM_PROCESSES", "0")) or None
  if process_id is None and "JAX_PROCESS_ID" in env:
    process_id = int(env["JAX_PROCESS_ID"])
  if env.get("HDTF_JAX_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
  elif num_processes and num_processes > 1:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with named axis sizes; one size may be -1.

  `make_mesh({'data': -1})` is plain data parallelism; `{'data': -1, 'fsdp': 2}`
  also shards parameters over pairs of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = dict(axes or {"data": -1})
  sizes = list(axes.values())
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh axes {axes}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1])) if sizes else 1
  if len(devices) % known:
    raise ValueError(f"mesh axes {axes} do not divide {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh axes {dict(zip(axes, sizes))} need {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  try:
    device_array = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # not every backend has a topology-aware layout (e.g. fake CPU devices)
    device_array = np.asarray(devices).reshape(sizes)
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


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch (this process's rows) -> global sharded jax.Arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def param_sharding(params: Any, mesh: Mesh, min_size: int = 2 ** 18) -> Any:
  """Shardings for a parameter pytree: replicated, or (with an `fsdp` axis) large
  arrays split along their largest divisible dimension so memory scales down."""
  if "fsdp" not in mesh.axis_names or mesh.shape["fsdp"] == 1:
    return jax.tree_util.tree_map(lambda _: replicated(mesh), params)
  n = mesh.shape["fsdp"]

  def rule(x):
    shape = np.shape(x)
    if np.prod(shape) < min_size:
      return replicated(mesh)
    for dim in np.argsort(shape)[::-1]:
      if shape[dim] % n == 0:
        spec = [None] * len(shape)
        spec[dim] = "fsdp"
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree_util.tree_map(rule, params)
