"""Learning-rate schedules of the paper: a constant rate, then a linear decay to 0."""
from __future__ import annotations

import optax


def hold_then_linear_decay(lr: float, hold_steps: int, decay_steps: int) -> optax.Schedule:
  """`lr` for `hold_steps`, then linearly to 0 over `decay_steps` (the paper's
  50 + 50 epochs for stage 1, 75 + 75 for stage 2)."""
  if decay_steps <= 0:
    return optax.constant_schedule(lr)
  return optax.join_schedules(
      [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, decay_steps)], [hold_steps])
