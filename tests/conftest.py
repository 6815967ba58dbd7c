"""Shared pytest configuration: strict numerics, a PRNG-key fixture, float64 on demand."""
import os
import tempfile

# Tests run on CPU; keep XLA from grabbing every core's worth of threads for tiny problems.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The gilora command tunes glibc malloc for the whole process (gilora_jax/runtime.py); keep pytest's own process
# (and the CLI subprocesses it starts) on the defaults. tests/test_runtime.py checks the tuning in a subprocess.
os.environ.setdefault("GILORA_MALLOC_TUNING", "0")
# The gilora command keeps a persistent compilation cache (runtime.enable_compilation_cache): the suite's runs share
# one for the session, in a temporary folder, never the user's ~/.cache.
os.environ.setdefault("GILORA_COMPILATION_CACHE", tempfile.mkdtemp(prefix="gilora_jax_test_cache_"))

# The suite's programs are tiny and its time is mostly XLA compiling them: compile with LLVM's optimizations off
# (JAX's own switch; it sets xla_backend_optimization_level=0, leaves the HLO passes and the arithmetic as they
# are). 12.5 -> 10.5 min for the suite on a 2-core CPU, every pinned figure unchanged. Subprocesses inherit it;
# tests/benchmarks/test_model_bench.py runs the gilora command with the default, optimizing compile, as users do.
# JAX_DISABLE_MOST_OPTIMIZATIONS=false pytest runs the whole suite that way.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

import jax  # noqa: E402

from gilora_jax import runtime  # noqa: E402

# The same LAPACK kernels and thread count on every machine, as the gilora command does, before anything loads
# SciPy's LAPACK: figures pinned by the tests (the built-in comparison's) then do not depend on the host.
runtime.pin_lapack()
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "float32")


def pytest_xdist_auto_num_workers(config):  # pylint: disable=unused-argument
  """`-n auto` (pyproject's addopts): one worker per usable core, at most 4. Each worker imports JAX, torch and
  transformers (~1 GB), and several tests start subprocesses of their own (4 host devices, two hosts)."""
  return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@pytest.fixture
def key():
  """A fresh PRNG key per test."""
  return jax.random.key(0)


@pytest.fixture
def rng():
  """A seeded NumPy generator per test."""
  return np.random.default_rng(0)


@pytest.fixture
def x64():
  """Run the test body with float64 enabled (jax.enable_x64 context)."""
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="session")
def lm_folder(tmp_path_factory):
  """A tiny random Qwen3 HF folder with a character tokenizer, calib.txt and eval.txt (tests/pipeline/tiny.py)."""
  from tests.pipeline.tiny import make_lm  # pylint: disable=import-outside-toplevel
  folder = str(tmp_path_factory.mktemp("tiny_lm"))
  make_lm(folder)
  return folder


@pytest.fixture(scope="session")
def vit_folder(tmp_path_factory):
  """A tiny random DeiT HF folder with a preprocessor config (tests/pipeline/tiny.py)."""
  from tests.pipeline.tiny import make_vit  # pylint: disable=import-outside-toplevel
  folder = str(tmp_path_factory.mktemp("tiny_vit"))
  make_vit(folder)
  return folder
