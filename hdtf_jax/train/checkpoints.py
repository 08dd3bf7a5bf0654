"""Orbax checkpoints of a train state together with the data iterator's position.

A run killed at any moment resumes from the last saved step with the same
parameters, optimizer state, RNG and the same next batch: the iterator state is
saved beside the model (as JSON) in the same orbax step directory.

Several processes: every process calls `save`, `restore` and `close` (orbax writes each
array's shards from the processes that hold them and syncs them); the JSON items are written
by process 0. That suffices for the iterator position because the loaders' per-process shards
are equally long and advance in lockstep, so every process's position is the same.
"""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _encode(data_state: Any) -> Any:
  if isinstance(data_state, bytes):  # grain's DataLoader iterator state is bytes
    return {"__bytes__": base64.b64encode(data_state).decode()}
  return data_state


def _decode(data_state: Any) -> Any:
  if isinstance(data_state, dict) and set(data_state) == {"__bytes__"}:
    return base64.b64decode(data_state["__bytes__"])
  return data_state


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints, saving every `save_every` steps.

  `save(step, state, data_state, force=True)` saves regardless of the interval
  (used at exit and before stopping on a NaN).
  """

  def __init__(self, directory: str | Path, max_to_keep: int = 3, save_every: int = 1000,
               async_save: bool = False):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=max(1, save_every), create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any = None, meta: dict | None = None,
           force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state),
            "data": ocp.args.JsonSave({"iterator": _encode(data_state)}),
            "meta": ocp.args.JsonSave(meta or {})}
    saved = self._manager.save(step, args=ocp.args.Composite(**args), force=force)
    return bool(saved)

  def restore(self, state_template: Any, step: int | None = None) -> tuple[Any, Any, dict] | None:
    """(state, data_state, meta) of `step` (default: latest), or None without checkpoints.

    `state_template` gives structure, shapes, dtypes and shardings (e.g. the
    freshly initialised state, or `jax.eval_shape` of it with shardings).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_template)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored["state"], _decode((restored["data"] or {}).get("iterator")), restored["meta"] or {}

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      return {}
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"] or {}

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
