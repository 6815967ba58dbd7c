"""gilora_jax.runtime: malloc tuning (jitted calls stop page-faulting; opt-outs respected), the LAPACK pin, and
results that do not depend on the thread count.

The page-fault counts are measured in fresh subprocesses (the policy is process-wide and must be set before
XLA's threads allocate; the pytest process itself runs with GILORA_MALLOC_TUNING=0, see conftest.py).
"""
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from gilora_jax import runtime

_PROBE = r"""
import json, resource, sys
from gilora_jax import runtime
tuned = runtime.tune_cpu_malloc()
import jax, jax.numpy as jnp
# Two fresh 36 MiB outputs per call, each above glibc's largest mmap threshold (32 MiB); elementwise, so the
# probe's time is the allocations' (a cumsum here cost 10 s more per probe on a 2-core CPU)
f = jax.jit(lambda x: (x * 2.0 + 1.0, x * 3.0))
x = jnp.ones((4096, 2304), jnp.float32)
# glibc's heap settles within the first few dozen calls (seen here: up to 24 calls still growing the heap by a
# new block, more in some runs than others), so warm up well past that before counting.
for _ in range(60):
  jax.block_until_ready(f(x))
faults = []
for _ in range(3):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"tuned": tuned, "faults": min(faults)}))
"""

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="the tuning is for glibc's malloc")


def _env():
  return {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}


def _probe(**env_overrides):
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != runtime.OPT_OUT_ENV}
  env.update(env_overrides)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True,
                       timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@glibc_only
def test_tuned_calls_do_not_page_fault():
  tuned = _probe()
  assert tuned["tuned"] is True
  # 72 MiB of fresh buffers per call would be ~18 k faults of 4 KiB pages; reused heap blocks give none.
  assert tuned["faults"] < 2000, tuned
  default = _probe(**{runtime.OPT_OUT_ENV: "0"})
  assert default["tuned"] is False
  if default["faults"] >= 5 * 2000:  # glibc's defaults fault every call here (not on a box with THP "always")
    assert tuned["faults"] * 5 < default["faults"], (tuned, default)


@pytest.mark.parametrize("env", [{runtime.OPT_OUT_ENV: "0"}, {runtime.OPT_OUT_ENV: "off"}, {"MALLOC_ARENA_MAX": "4"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}])
def test_opt_outs_leave_malloc_alone(monkeypatch, env):
  for k in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD", runtime.OPT_OUT_ENV):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setattr(runtime, "_applied", None)
  assert runtime.tune_cpu_malloc() is False
  assert runtime.tune_cpu_malloc() is False  # cached, still off


_DETERMINISM_PROBE = r"""
import os, sys
if sys.argv[1] == "1":
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, before XLA sizes its thread pool
import jax, numpy as np
from gilora_jax.quant import hessian, lowrank
rng = np.random.default_rng(0)
x = jax.numpy.asarray(rng.standard_t(4, (4096, 192)).astype(np.float32))
H = jax.jit(hessian.update)(hessian.init(192), x).xtx  # jitted, as in the pipeline: x.T is then a view
E = jax.numpy.asarray(rng.standard_normal((192, 96)).astype(np.float32))
lr, _ = jax.jit(lowrank.olrc, static_argnums=2)(E, H + np.float32(1.0) * jax.numpy.eye(192), 8)
# a Gram side of 1024: OLrC's top-r from the block Krylov iteration (linalg.top_eigh_auto), not the dense eigh
x2 = jax.numpy.asarray(rng.standard_t(4, (2048, 1040)).astype(np.float32))
H2 = jax.jit(hessian.update)(hessian.init(1040), x2).xtx
E2 = jax.numpy.asarray(rng.standard_normal((1040, 1024)).astype(np.float32))
lr2, opt2 = jax.jit(lowrank.olrc, static_argnums=2)(E2, H2 + np.float32(1.0) * jax.numpy.eye(1040), 32)
np.savez(sys.argv[2], H=np.asarray(H), L=np.asarray(lr.L), R=np.asarray(lr.R), L2=np.asarray(lr2.L),
         R2=np.asarray(lr2.R), opt2=np.asarray(opt2))
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores to compare one thread with several")
def test_hessian_and_olrc_do_not_depend_on_the_thread_count(tmp_path):
  """H = XᵀX and OLrC's products are bit-identical with one core and with all of them (x.T @ x was not: XLA:CPU
  split its token sum over threads), with the dense eigh and with the block Krylov top-r of a 1024-wide Gram."""
  out = {}
  for n in ("1", "all"):
    path = str(tmp_path / f"{n}.npz")
    subprocess.run([sys.executable, "-c", _DETERMINISM_PROBE, n, path], check=True, env=_env(), timeout=300)
    with np.load(path) as z:
      out[n] = {k: z[k] for k in z.files}
  for k in out["1"]:
    np.testing.assert_array_equal(out["1"][k], out["all"][k], err_msg=k)


def test_pin_lapack_sets_the_openblas_variables_before_lapack_loads():
  code = ("import os, sys; from gilora_jax import runtime; ok = runtime.pin_lapack(); "
          "print(ok, os.environ.get('OPENBLAS_CORETYPE'), os.environ.get('OPENBLAS_NUM_THREADS')); "
          "import jax.numpy as jnp; jnp.linalg.cholesky(jnp.eye(2)); print(runtime.pin_lapack())")
  env = {k: v for k, v in _env().items() if not k.startswith("OPENBLAS")}
  lines = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout.split("\n")
  x86 = platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux")
  with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
    avx2 = "avx2" in f.read()
  if x86 and avx2:
    assert lines[0] == "True Haswell 1"
  assert lines[1] == "False"  # too late once LAPACK is loaded: it says so instead of pretending
  env["GILORA_PIN_LAPACK"] = "0"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                       timeout=120).stdout
  assert out.startswith("False None None")


def test_a_repeated_run_compiles_nothing_new(tmp_path):
  """The gilora command's persistent compilation cache: the first run fills it, the same run again only reads it
  (every program a hit, no new entry)."""
  from tests.quant import problems  # pylint: disable=import-outside-toplevel
  W, _, H = problems.layer(seed=0, d_in=256, d_out=128, n=600)
  np.savez(tmp_path / "in.npz", W=W.astype(np.float32), H=H.astype(np.float32))
  cache = tmp_path / "cache"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def run(cache_env):
    # every program cached, however fast it compiled: otherwise one near the 0.1 s threshold may be written by
    # either run, depending on the machine's load
    env = {**os.environ, "PYTHONPATH": repo, "GILORA_COMPILATION_CACHE": cache_env,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    p = subprocess.run([sys.executable, "-m", "gilora_jax.cli", "quantize-layer", str(tmp_path / "in.npz"), "--out",
                        str(tmp_path / "q.npz"), "--overwrite", "--method", "gptq+olrc", "--rank", "8",
                        "--group-size", "128"], env=env, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    return sorted(os.listdir(cache)) if cache.exists() else []
  first = run(str(cache))
  assert first, "the first run cached nothing"
  assert run(str(cache)) == first


@pytest.mark.parametrize("off", ["0", "off", "False"])
def test_the_compilation_cache_switched_off_is_left_alone(monkeypatch, off):
  """GILORA_COMPILATION_CACHE=0 (as the gilora command reads it at start): no folder, JAX's setting untouched."""
  import jax  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv(runtime.CACHE_ENV, off)
  before = jax.config.jax_compilation_cache_dir
  assert runtime.enable_compilation_cache() is None
  assert jax.config.jax_compilation_cache_dir == before
