"""Mesh/sharding helpers, orbax checkpoints with iterator state, logs, schedules."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdtf_jax.train import checkpoints, logs, mesh, schedules


def test_mesh_on_eight_fake_devices():
  code = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from hdtf_jax.train import mesh as m
    out = {}
    dp = m.make_mesh({'data': -1})
    out['dp'] = dict(dp.shape)
    two = m.make_mesh({'data': -1, 'fsdp': 2})
    out['two'] = dict(two.shape)
    batch = {'x': np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    g = m.shard_batch(batch, two)['x']
    out['global_shape'] = list(g.shape)
    out['shards'] = len(g.addressable_shards)
    out['shard_rows'] = g.addressable_shards[0].data.shape[0]
    out['sum_ok'] = float(jax.jit(jnp.sum)(g)) == float(batch['x'].sum())
    params = {'big': jnp.zeros((512, 1024)), 'small': jnp.zeros((3,))}
    sh = m.param_sharding(params, two)
    out['big_spec'] = str(sh['big'].spec)
    out['small_spec'] = str(sh['small'].spec)
    out['n_batch_shards'] = m.num_batch_shards(two)
    try:
      m.make_mesh({'data': 3})
      out['bad'] = 'no error'
    except ValueError as e:
      out['bad'] = str(e)
    print(json.dumps(out))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["dp"] == {"data": 8}
  assert out["two"] == {"data": 4, "fsdp": 2}
  assert out["global_shape"] == [16, 3] and out["shards"] == 8 and out["shard_rows"] == 2
  assert out["sum_ok"]
  assert "fsdp" in out["big_spec"] and "fsdp" not in out["small_spec"]
  assert out["n_batch_shards"] == 8
  assert "do not divide 8 devices" in out["bad"]


def test_checkpointer_round_trip_and_retention(tmp_path):
  ckpt = checkpoints.Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_every=5)
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.asarray(0),
           "rng": jax.random.key_data(jax.random.PRNGKey(3))}
  for step in range(0, 16):
    new = jax.tree_util.tree_map(lambda x: x + step, state)
    ckpt.save(step, new, data_state={"epoch": 1, "index": step}, meta={"preset": "tiny"})
  ckpt.save(16, jax.tree_util.tree_map(lambda x: x + 16, state), data_state=b"\x00\x01grain",
            force=True)
  ckpt.wait()
  assert ckpt.all_steps() == [15, 16]  # every 5 steps + the forced one, last two kept
  restored, data_state, meta = ckpt.restore(state, step=15)
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(6.0).reshape(2, 3) + 15)
  assert data_state == {"epoch": 1, "index": 15} and meta == {"preset": "tiny"}
  restored, data_state, _ = ckpt.restore(state)
  assert int(restored["step"]) == 16 and data_state == b"\x00\x01grain"
  ckpt.close()
  assert checkpoints.Checkpointer(tmp_path / "empty").restore(state) is None


def test_logger_writes_jsonl_tensorboard_and_png(tmp_path):
  logger = logs.MetricLogger(tmp_path)
  logger.scalars(1, {"loss": 0.5, "lr": 1e-3})
  logger.scalars(2, {"loss": float("nan")})
  grid = logs.image_grid([[np.zeros((8, 8, 3)), np.ones((4, 6, 1))], [np.full((8, 8, 3), 128, np.uint8)]])
  assert grid.shape == (2 * 10 + 2, 2 * 10 + 2, 3) and grid.dtype == np.uint8
  png = logger.image(2, "val/grid", grid)
  plot = logs.plot_tracks({"mouth": [np.random.rand(50, 3), np.random.rand(50, 3)]}, fps=25)
  assert plot.ndim == 3 and plot.shape[-1] == 3 and plot.std() > 0
  logger.close()
  records = logs.read_jsonl(tmp_path / "metrics.jsonl")
  assert records[0]["loss"] == 0.5 and records[1]["loss"] == "nan"
  assert png.exists()
  # An independent reader (TensorFlow's) sees the scalars in the event file.
  import tensorflow as tf
  events = list((tmp_path / "tensorboard").glob("events.*"))
  assert events
  seen = {}
  for e in tf.compat.v1.train.summary_iterator(str(events[0])):
    for v in e.summary.value:
      seen[(v.tag, e.step)] = v.simple_value
  assert seen[("loss", 1)] == pytest.approx(0.5) and seen[("lr", 1)] == pytest.approx(1e-3)


def test_hold_then_linear_decay():
  s = schedules.hold_then_linear_decay(5e-4, hold_steps=10, decay_steps=10)
  assert float(s(0)) == pytest.approx(5e-4) and float(s(9)) == pytest.approx(5e-4)
  assert float(s(15)) == pytest.approx(2.5e-4) and float(s(20)) == pytest.approx(0.0)
  assert float(schedules.hold_then_linear_decay(1.0, 3, 0)(100)) == 1.0
