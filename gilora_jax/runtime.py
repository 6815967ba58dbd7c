"""Process-level settings of CPU runs: a malloc policy that makes them faster (``tune_cpu_malloc``, changes no
result) and a LAPACK pin that makes their results the same on every x86-64 machine (``pin_lapack``).

``tune_cpu_malloc``: XLA:CPU allocates every output and one scratch block per call with ``malloc``. glibc serves
blocks above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns them with ``munmap`` on free,
so each call of a jitted stage on a 4096-wide layer touches a few hundred MiB of new pages: ~0.1 M page faults,
each zeroing a 4 KiB page in the kernel, on the critical path of the call. On a 2-core box that was about 0.3 s
of a 1.5 s ``quantize_layer(method="gptq")`` on a 4096² layer (``benchmarks/layer.py --no-malloc-tuning`` shows
it). With one malloc arena, no mmap'd blocks and no trimming, freed blocks stay in the heap and the next call
reuses them: no page faults after the first call.

The cost: the process keeps its peak heap (freed memory is reused, not returned to the OS), and all threads
share one arena (more lock contention for heavily multi-threaded small allocations). The heap also takes a few
dozen calls to settle: until the freed blocks line up with the calls' sizes, some calls still extend it (the
test's probe of a 64 MiB jitted call settles within 7 to 24 calls here, at about twice the resident memory of
glibc's defaults: 0.9–1.05 GiB against 0.44 GiB). Quantization jobs hold
their peak anyway. The ``gilora`` command and the benchmarks call it; library users may call it first thing
(before the first JAX computation, so that XLA's worker threads are created under the new arena policy) or set
the equivalent environment variables ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest free top-of-heap kept (2 GiB)

# Environment variables through which a user has already chosen a malloc policy: we then leave it alone.
_USER_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                    "MALLOC_TOP_PAD_", "GLIBC_TUNABLES", "LD_PRELOAD")
OPT_OUT_ENV = "GILORA_MALLOC_TUNING"

_applied: bool | None = None


def tune_cpu_malloc() -> bool:
  """Keeps freed large blocks in glibc's heap so jitted calls stop page-faulting (see the module docstring).

  Returns True when the policy is in effect (now or from an earlier call), False when it was not applied: not
  Linux with glibc, ``GILORA_MALLOC_TUNING=0`` in the environment, a malloc policy already chosen through the
  environment (``MALLOC_*``, ``GLIBC_TUNABLES``, an ``LD_PRELOAD``-ed allocator), or ``mallopt`` refused.
  Idempotent; it never raises.
  """
  global _applied  # pylint: disable=global-statement
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    log.debug("malloc tuning off (%s=%s)", OPT_OUT_ENV, os.environ[OPT_OUT_ENV])
    return False
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return False
  chosen = [k for k in _USER_MALLOC_ENV if os.environ.get(k)]
  if chosen:
    log.debug("malloc tuning skipped: the environment already sets %s", ", ".join(chosen))
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))
  except (OSError, AttributeError) as e:
    log.debug("malloc tuning unavailable: %s", e)
    return False
  if ok and "jax" in sys.modules:
    try:
      from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
      started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a private API: only for the hint below
      started = False
    if started:
      log.info("malloc tuning applied after JAX started its backend: threads that already allocated keep their "
               "own arenas; call gilora_jax.runtime.tune_cpu_malloc() before the first JAX computation.")
  _applied = ok
  return ok


# SciPy's OpenBLAS (what JAX's CPU Cholesky, eigh and triangular solves call) picks its kernels by CPU model and
# splits work over threads: the same H factorises differently on a Zen 4 or AVX-512 Intel host (SkylakeX kernels)
# and on a Zen 5 (Haswell kernels), or with another core count, and GPTQ's codes follow (the README's table moved
# by 0.14 perplexity between two machines of one kind). Pinning both costs nothing measurable on the built-in job
# and a 4096² GPTQ layer; one thread makes a 4096² eigendecomposition (gilora's) ~1.7x slower on 2 cores, and
# Haswell kernels are ~20 % slower than SkylakeX ones on AVX-512 hosts. GILORA_PIN_LAPACK=0 opts out.
_LAPACK_PIN = (("OPENBLAS_CORETYPE", "Haswell"), ("OPENBLAS_NUM_THREADS", "1"))
PIN_OPT_OUT_ENV = "GILORA_PIN_LAPACK"


def _x86_flags() -> set[str]:
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def pin_lapack() -> bool:
  """Fixes OpenBLAS's kernel family (Haswell: AVX2 + FMA) and thread count (1) for JAX's CPU LAPACK calls, so
  that factorisations, and the codes after them, do not depend on the host's CPU model or core count.

  Must run before the first LAPACK call of the process (SciPy's OpenBLAS reads these variables when it loads); the
  ``gilora`` command calls it first thing, library users may too. Returns True when the pin is in effect; False
  off x86-64 Linux, on CPUs without AVX2/FMA, once SciPy's LAPACK is loaded, or with ``GILORA_PIN_LAPACK=0``.
  Variables the user has set win (``setdefault``). What it cannot pin: the code XLA generates for the host's
  instruction set (README: how much the figures move).
  """
  if os.environ.get(PIN_OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  if any(m == "scipy.linalg" or m.startswith("scipy.linalg.") for m in sys.modules):
    log.debug("LAPACK pin skipped: SciPy's LAPACK is already loaded")
    return False
  if not {"avx2", "fma"} <= _x86_flags():
    return False
  for k, v in _LAPACK_PIN:
    os.environ.setdefault(k, v)
  return True


# JAX's persistent compilation cache: a run compiles each distinct jitted shape once (a block's stages, every
# layer's quantizer), and without the cache a resumed or repeated run pays all of that again (the first block of
# a 0.6B-shaped model took ~10 s more than the next ones, on 2 cores). XLA keys entries by the program, the
# compiler version and the device, so an entry never serves another program.
CACHE_ENV = "GILORA_COMPILATION_CACHE"


def default_cache_dir() -> str:
  """``$XDG_CACHE_HOME/gilora_jax/jax`` (``~/.cache/gilora_jax/jax``)."""
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                      "gilora_jax", "jax")


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Points JAX's persistent compilation cache at `path` (default: ``GILORA_COMPILATION_CACHE`` if it names a
  folder, else ``default_cache_dir()``) unless the user configured one (``JAX_COMPILATION_CACHE_DIR``) or
  switched it off (``GILORA_COMPILATION_CACHE=0``). Caches every compilation of at least 0.1 s (or
  ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``). Returns the folder
  in use, or None. Never raises: an unwritable folder only costs the cache."""
  env = os.environ.get(CACHE_ENV, "").strip()
  if env.lower() in ("0", "false", "no", "off"):
    return None
  import jax  # pylint: disable=import-outside-toplevel
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir or os.environ["JAX_COMPILATION_CACHE_DIR"]
  path = path or env or default_cache_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    log.warning("compilation cache off: cannot create %s (%s); set %s to a writable folder or 0", path, e, CACHE_ENV)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's threshold wins
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def release_free_memory() -> None:
  """Returns the heap's free pages to the OS (glibc ``malloc_trim(0)``, which also releases free pages inside
  the heap). With ``tune_cpu_malloc``'s policy nothing is trimmed on its own, so the host copies a model load
  frees stay resident: after loading a 0.87 GB model, 1.67 GB resident became 1.32 GB. A no-op off glibc."""
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, heartbeat_timeout_s: int = 100,
                     initialization_timeout_s: int = 300) -> bool:
  """Joins a multi-host run (``jax.distributed.initialize``) before any JAX computation; returns True if it did.

  With ``coordinator`` ("HOST:PORT", process 0's address), ``num_processes`` and ``process_id`` given, those are
  used; with none of them, JAX's own detection runs where a cluster environment is present (TPU pods, SLURM,
  ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``) and nothing happens on a lone machine.
  On CPU the cross-process collectives go through gloo. A process that stops answering for
  ``heartbeat_timeout_s`` makes the others fail with the coordination service's error instead of waiting forever.

  Raises ValueError for a partial set of the three options, or values out of range.
  """
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  env = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  if not any(v is not None for v in given.values()):
    if not any(os.environ.get(k) for k in env) and not _cluster_detected():
      return False
  elif any(v is None for v in given.values()):
    missing = ", ".join("--" + k.replace("_", "-") for k, v in given.items() if v is None)
    raise ValueError(f"a multi-host run needs --coordinator, --num-processes and --process-id together; missing "
                     f"{missing} (or set none of them and let JAX detect the cluster).")
  else:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process-id {process_id} with --num-processes {num_processes}: process ids run from 0 to "
                       f"{max(num_processes - 1, 0)}.")
    if ":" not in coordinator:
      raise ValueError(f"--coordinator {coordinator!r}: give HOST:PORT of process 0 (e.g. 10.0.0.1:1234).")
  import jax  # pylint: disable=import-outside-toplevel
  # CPU devices' cross-process collectives (a CPU run; on GPU/TPU hosts it only concerns the host backend)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=initialization_timeout_s,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  log.info("joined a %d-process run as process %d", jax.process_count(), jax.process_index())
  return True


def _cluster_detected() -> bool:
  """TPU pod or SLURM job environments, where ``jax.distributed.initialize()`` finds its peers by itself."""
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
              or (os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1))

