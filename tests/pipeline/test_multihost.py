"""Multi-host (runtime.init_distributed): two `gilora` processes joined by a localhost coordinator (gloo
collectives on CPU) survive a dead peer and resume to the one-process result. Its own file, so that pytest-xdist
runs it beside test_sharding.py's 4-device subprocess instead of after it.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "GILORA_MALLOC_TUNING": "0"}


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


RUN = ["--method", "gptq", "--bits", "3", "--group-size", "32", "--nsamples", "8", "--seqlen", "32",
       "--batch-size", "4"]


def _gilora(*args, env=None):
  return subprocess.Popen([sys.executable, "-m", "gilora_jax.cli", "quantize", *map(str, args)], cwd=REPO,
                          env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two(lm_folder, out, port, heartbeat=100):
  flags = [*RUN, "--model", lm_folder, "--out", out, "--coordinator", f"localhost:{port}", "--num-processes", "2",
           "--heartbeat-timeout", heartbeat]
  return [_gilora(*flags, "--process-id", i) for i in (0, 1)]


def _codes(folder):
  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gilora_jax.nn import QuantizedLinear  # pylint: disable=import-outside-toplevel
  model = gj.load_model(folder)
  return {str(p): np.asarray(m.codes[...]) for p, m in nnx.iter_graph(model) if isinstance(m, QuantizedLinear)}


@pytest.mark.slow
def test_two_processes_survive_a_dead_peer_and_resume_to_the_one_process_result(lm_folder, tmp_path):
  """Two CPU processes joined by a localhost coordinator (gloo collectives): process 1 is SIGKILLed after the
  first block's shard is written; process 0 stops within the heartbeat timeout with an error naming the dead task
  (not a hang); the same two commands again resume from the shard and end with the codes of one process running
  the same 2-device mesh (data-parallel Hessians sum in another order than on one device, so the bit-for-bit
  reference is the same mesh in one process; the 1-device comparison is the four_devices tests')."""
  one = _gilora(*RUN, "--model", lm_folder, "--out", tmp_path / "one", "--mesh", "data=2",
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  _, err = one.communicate(timeout=300)
  assert one.returncode == 0, err[-2000:]
  out = str(tmp_path / "two")
  p0, p1 = _two(lm_folder, out, _free_port(), heartbeat=5)
  shard = os.path.join(out + ".partial", "block_00000")
  deadline = time.monotonic() + 300
  while not os.path.isdir(shard) and p0.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  if not os.path.isdir(shard):
    p1.kill()
    pytest.fail(f"no block shard appeared: {p0.communicate()[1][-2000:]} {p1.communicate()[1][-1000:]}")
  p1.send_signal(signal.SIGKILL)
  killed = time.monotonic()
  _, err = p0.communicate(timeout=120)
  assert p0.returncode != 0 and time.monotonic() - killed < 60, err[-2000:]
  assert "heartbeat timeout" in err or "process probably died" in err, err[-2000:]
  p1.communicate()
  assert not os.path.exists(out)

  procs = _two(lm_folder, out, _free_port())
  results = [p.communicate(timeout=300) for p in procs]
  for p, (stdout, stderr) in zip(procs, results):
    assert p.returncode == 0, stderr[-2000:]
  assert "resuming" in results[0][1] and "from block 1 of 2" in results[0][1]
  summary = json.loads(results[0][0].strip().splitlines()[-1])
  assert summary["resumed_from_block"] == 1 and summary["layers"] == 14
  a, b = _codes(str(tmp_path / "one")), _codes(out)
  assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
