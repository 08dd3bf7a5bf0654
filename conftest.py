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
