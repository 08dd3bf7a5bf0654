"""Test-wide settings: CPU-only JAX, quiet TensorFlow, one numba cache per test worker."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# librosa's numba kernels are cached on disk; pytest-xdist workers compiling them for the
# first time at once (a fresh venv, as in CI) race on that cache and can segfault. Each
# worker gets its own cache; within a worker, hdtf_jax.data.build warms it before it
# starts build processes (hdtf_jax.audio.warm_up).
if "NUMBA_CACHE_DIR" not in os.environ:
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"hdtf-jax-numba-{worker}-")


def pytest_configure(config):
  """Compile (and cache) the numba kernels every worker needs before any test runs: ours
  (hdtf_jax.audio) and librosa's pYIN, which tests use as the reference. Subprocesses that tests
  start (dataset builds, CLIs) then only read a complete cache in this worker's NUMBA_CACHE_DIR,
  and no numba compile happens later in a process that already runs XLA or TensorFlow."""
  if not os.environ.get("PYTEST_XDIST_WORKER") and config.getoption("numprocesses", None):
    return  # the xdist controller runs no tests; its workers warm up themselves
  import numpy as np
  import librosa
  from hdtf_jax import audio

  audio.warm_up()
  t = np.arange(4000, dtype=np.float32) / 16000
  librosa.pyin(0.1 * np.sin(2 * np.pi * 220.0 * t), fmin=65, fmax=600, sr=16000,
               frame_length=1024, hop_length=160)
