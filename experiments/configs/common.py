"""Config blocks shared by the stage-1 and stage-2 configs: the device mesh and the
multi-process start-up (`hdtf_jax.train.mesh`).

  # two hosts, 8 GPUs each, parameters and Adam moments split over pairs of GPUs:
  python -m experiments.stage2 --config=experiments/configs/stage2.py:paper \
      --config.distributed.coordinator_address=host0:1234 \
      --config.distributed.num_processes=2 --config.distributed.process_id=0 \
      --config.mesh.axes.fsdp=2 --workdir=gs://bucket/s2
  # (process_id=1 on the other host; on a TPU pod or under SLURM, leave them all unset)
"""
from __future__ import annotations

import ml_collections

from hdtf_jax.train import mesh as mesh_lib


def mesh_config() -> ml_collections.ConfigDict:
  """`axes`: name -> size (one may be -1: the rest of the devices); `data` splits batches,
  `fsdp` batches and large parameters, `model` large parameters on their output channels.
  `fsdp_min_size`: arrays with fewer elements stay replicated."""
  return ml_collections.ConfigDict(dict(axes={"data": -1}, fsdp_min_size=mesh_lib.FSDP_MIN_SIZE))


def distributed_config() -> ml_collections.ConfigDict:
  """`jax.distributed` start-up; None = the JAX_* environment variable, else JAX's cluster
  detection (TPU pods, SLURM, Open MPI, Kubernetes), else a single process."""
  c = ml_collections.ConfigDict()
  c.coordinator_address = ml_collections.config_dict.placeholder(str)  # "host:port" of process 0
  c.num_processes = ml_collections.config_dict.placeholder(int)         # 1: never start it
  c.process_id = ml_collections.config_dict.placeholder(int)
  c.local_device_ids = ml_collections.config_dict.placeholder(str)      # e.g. "0,1,2,3"
  return c
