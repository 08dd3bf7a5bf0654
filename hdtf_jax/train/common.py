"""Pieces shared by the stage-1 and stage-2 training loops.

- `GanTrainState`: one generator (params + BatchNorm statistics) and its discriminator(s), with
  an optimiser state each; a flax struct, so it is a pytree that orbax saves and jit donates.
- `hold_decay_adam`: Adam on the paper's schedule (constant, then linear decay to 0).
- `resolve_steps`: the schedule's step counts from `optim.*_steps` or epochs.
- NaN guard: `check_finite` raises `NonFiniteLossError` naming the step and the bad terms; the
  loops call it before saving anything, so the last good checkpoint stays the latest.
- `alive`: whether a state's buffers survived (a donated state is gone if its step raised).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax
import jax
import optax

from hdtf_jax.train import schedules

# Compile-once pieces (init) do not need an optimised binary: much faster to compile on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


class NonFiniteLossError(FloatingPointError):
  """A loss was NaN or Inf; `step` is the 1-based step whose update produced it."""

  def __init__(self, stage: str, step: int, names: Sequence[str], last_checkpoint: int | None):
    self.stage, self.step = stage, step
    self.names, self.last_checkpoint = tuple(names), last_checkpoint
    super().__init__(f"{stage}: non-finite loss at step {step} ({', '.join(names)}); stopped "
                     f"without saving, last good checkpoint: step {last_checkpoint}")


def check_finite(values: Mapping[str, float], step: int, stage: str,
                 last_checkpoint: int | None) -> None:
  """Raises NonFiniteLossError if any of the host scalars `values` is NaN or Inf."""
  bad = sorted(k for k, v in values.items() if not math.isfinite(v))
  if bad:
    raise NonFiniteLossError(stage, step, bad, last_checkpoint)


@flax.struct.dataclass
class GanTrainState:
  step: Any              # () int32, updates done
  g_params: Any
  batch_stats: Any       # the generator's BatchNorm running statistics ({} without BN)
  d_params: Any
  g_opt_state: Any
  d_opt_state: Any


def hold_decay_adam(lr: float, b1: float, b2: float, hold: int, decay: int,
                    eps: float = 1e-8) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam whose rate is `lr` for `hold` steps, then decays linearly to 0 over `decay`."""
  schedule = schedules.hold_then_linear_decay(lr, hold, decay)
  return optax.adam(schedule, b1, b2, eps), schedule


def resolve_steps(optim, train, steps_per_epoch: int, stage: str) -> tuple[int, int, int]:
  """(hold, decay, total) steps from `optim.hold_steps` / `decay_steps`, else
  `optim.hold_epochs` / `decay_epochs` times `steps_per_epoch`; total is `train.num_steps` or
  hold + decay."""
  hold = optim.hold_steps if optim.hold_steps is not None else optim.hold_epochs * steps_per_epoch
  decay = (optim.decay_steps if optim.decay_steps is not None
           else optim.decay_epochs * steps_per_epoch)
  total = train.num_steps if train.num_steps is not None else hold + decay
  if hold < 0 or decay < 0 or total < 1:
    raise ValueError(f"{stage}: bad schedule hold={hold}, decay={decay}, total={total}")
  return int(hold), int(decay), int(total)


def local_batch_size(global_batch: int, stage: str) -> int:
  """This process's share of a global batch (processes split batches evenly)."""
  count = jax.process_count()
  if global_batch % count:
    raise ValueError(f"{stage}: data.batch_size {global_batch} is not divisible by {count} "
                     "processes")
  return global_batch // count


def alive(state: Any) -> bool:
  """False when the state's buffers were donated to a step that did not return."""
  return not any(x.is_deleted() for x in jax.tree_util.tree_leaves(state)
                 if isinstance(x, jax.Array))


def prefixed(values: Mapping[str, float], prefix: str) -> dict[str, float]:
  return {f"{prefix}{k}": v for k, v in values.items()}
