"""Builds, caches and registers hdtf_jax's native CPU kernels as XLA FFI targets.

The C++ sources ship with the package; the first use compiles them with the
system C++ compiler (``$CXX``, else g++ or c++) into a cache directory
(``$XDG_CACHE_HOME/hdtf_jax/native``, default ``~/.cache/hdtf_jax/native``),
keyed by a hash of the source, the compiler and its version, the flags and
the jaxlib version, and loads the result with ctypes, the way
``torch.utils.cpp_extension.load`` does. No ``-march=native``: a cache may be
shared by machines with different CPUs; on x86-64 CPUs with AVX2/FMA (the
x86-64-v3 level, read from /proc/cpuinfo) it builds with
``-march=x86-64-v3`` under a key that says so, which vectorises the
per-point coordinate arithmetic 8 floats wide. Concurrent first uses (pytest-xdist
workers) serialise on a lock file and publish by atomic rename.

If there is no compiler or the build fails, `grid_sample_available` returns
False after one warning line and callers keep the XLA path;
``HDTF_JAX_NATIVE_WARP=0`` forces that path without building anything.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

ENV_SWITCH = "HDTF_JAX_NATIVE_WARP"
SOURCE = Path(__file__).with_name("grid_sample.cc")
# -fno-trapping-math lets the compiler if-convert (and so vectorise) the
# branch-free coordinate loops; results are unchanged (no code reads FP traps).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-trapping-math",
         "-Wno-return-type")
# CPU flags of the x86-64-v3 level (Linux /proc/cpuinfo names).
X86_64_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})
# FFI target name -> exported C symbol.
TARGETS = {"hdtf_grid_sample_fwd": "HdtfGridSampleForward",
           "hdtf_grid_sample_bwd": "HdtfGridSampleBackward"}

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once tried; "lib": the loaded library (kept alive)


def enabled_by_env() -> bool:
  return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "hdtf_jax" / "native"


def _compiler() -> tuple[str, str]:
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if not cxx:
    raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60,
                             check=True).stdout.splitlines()[0]
  except (OSError, subprocess.SubprocessError, IndexError) as e:
    raise RuntimeError(f"C++ compiler {cxx!r} does not run: {e}") from None
  return cxx, version


def isa_flags() -> tuple[str, ...]:
  """-march=x86-64-v3 where this CPU has that level's features, else nothing (baseline)."""
  if platform.machine() not in ("x86_64", "AMD64"):
    return ()
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((set(line.split(":", 1)[1].split()) for line in f
                    if line.startswith("flags")), set())
  except OSError:
    return ()
  return ("-march=x86-64-v3",) if X86_64_V3 <= flags else ()


def build() -> Path:
  """Path of the compiled library, compiling it first if the cache lacks it."""
  import fcntl  # POSIX only: elsewhere the failure below means the XLA path

  import jax
  import jaxlib

  cxx, version = _compiler()
  include = jax.ffi.include_dir()
  source = SOURCE.read_bytes()
  flags = FLAGS + isa_flags()
  key = hashlib.sha256(b"\0".join([
      source, cxx.encode(), version.encode(), " ".join(flags).encode(),
      jaxlib.__version__.encode(), platform.machine().encode()])).hexdigest()[:20]
  directory = cache_dir()
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError:
    directory = Path(tempfile.gettempdir()) / f"hdtf_jax-native-{os.getuid()}"
    directory.mkdir(parents=True, exist_ok=True)
  target = directory / f"{SOURCE.stem}-{key}.so"
  if target.exists():
    return target
  with open(directory / f".{target.name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
    if target.exists():
      return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    cmd = [cxx, *flags, f"-I{include}", str(SOURCE), "-o", str(tmp)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
      raise RuntimeError(f"compiling {SOURCE.name} failed: {e}") from None
    if proc.returncode != 0:
      tmp.unlink(missing_ok=True)
      last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
      raise RuntimeError(f"compiling {SOURCE.name} failed (exit {proc.returncode}): {last}")
    os.replace(tmp, target)
  return target


def _load() -> ctypes.CDLL:
  import jax

  lib = ctypes.CDLL(str(build()))
  for name, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return lib


def grid_sample_available() -> bool:
  """True when the native CPU grid_sample targets are registered (built on first call)."""
  if not enabled_by_env():
    return False
  with _lock:
    if "ok" not in _state:
      try:
        _state["lib"] = _load()
        _state["ok"] = True
      except Exception as e:  # any failure: keep the XLA path, say why once
        warnings.warn(f"hdtf_jax: native CPU grid_sample unavailable, using the XLA path: {e}",
                      RuntimeWarning, stacklevel=2)
        _state["ok"] = False
    return _state["ok"]
