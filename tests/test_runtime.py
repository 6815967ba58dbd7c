"""gilora_jax.runtime.tune_cpu_malloc: jitted calls stop page-faulting once it is on; opt-outs are respected.

The page-fault counts are measured in fresh subprocesses (the policy is process-wide and must be set before
XLA's threads allocate; the pytest process itself runs with GILORA_MALLOC_TUNING=0, see conftest.py).
"""
import json
import os
import platform
import subprocess
import sys

import pytest

from gilora_jax import runtime

_PROBE = r"""
import json, resource, sys
from gilora_jax import runtime
tuned = runtime.tune_cpu_malloc()
import jax, jax.numpy as jnp
# A 64 MiB output and a 64 MiB scratch per call: above glibc's largest mmap threshold (32 MiB).
f = jax.jit(lambda x: jnp.cumsum(x * 2.0, axis=0) + 1.0)
x = jnp.ones((4096, 4096), jnp.float32)
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


def _probe(**env_overrides):
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != runtime.OPT_OUT_ENV}
  env.update(env_overrides)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True,
                       timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_calls_do_not_page_fault():
  tuned = _probe()
  assert tuned["tuned"] is True
  # 128 MiB of fresh buffers per call would be ~32 k faults of 4 KiB pages; reused heap blocks give none.
  assert tuned["faults"] < 2000, tuned
  default = _probe(**{runtime.OPT_OUT_ENV: "0"})
  assert default["tuned"] is False
  if default["faults"] >= 10 * 2000:  # glibc's defaults fault every call here (not on a box with THP "always")
    assert tuned["faults"] * 10 < default["faults"], (tuned, default)


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
