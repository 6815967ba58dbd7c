"""Peak host memory of the start of a streamed run: reading an 8B model's weights outside its blocks (embedding,
head, final norm: 2.3 GiB in bf16) and writing them to the run's `outside` folder.

  python benchmarks/outside_memory.py [--workdir /tmp/gilora_outside_memory]

Builds (once, cached) a random bf16 Qwen3-8B-shaped folder with one block (`stream_memory.build`), then in this
process (malloc tuned as the `gilora` command tunes it) samples the resident set every 5 ms. One JSON line on stdout: the resident memory before, after and at
the peak of each step, in GiB, beside the bytes of the weights read.
"""
import argparse
import json
import pathlib
import shutil
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import stream_memory  # noqa: E402  pylint: disable=wrong-import-position


def _rss_gb() -> float:
  with open("/proc/self/status", encoding="ascii") as f:
    return int(f.read().split("VmRSS:")[1].split()[0]) / 2**20


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/gilora_outside_memory"))
  a = p.parse_args(argv)
  folder = a.workdir / "qwen3_8b_1block"
  stream_memory.build(folder, 1)
  from gilora_jax import runtime  # pylint: disable=import-outside-toplevel
  runtime.tune_cpu_malloc()  # as the gilora command does, before any JAX computation
  import jax  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import convert  # pylint: disable=import-outside-toplevel
  from gilora_jax.pipeline import partial as partial_lib  # pylint: disable=import-outside-toplevel
  peak, stop = [_rss_gb()], threading.Event()

  def sample():
    while not stop.is_set():
      peak[0] = max(peak[0], _rss_gb())
      time.sleep(0.005)
  threading.Thread(target=sample, daemon=True).start()
  row = {}
  before, t = _rss_gb(), time.perf_counter()
  outside = convert.LazyHF(str(folder), param_dtype="stored").load(skip="layers")
  jax.block_until_ready(jax.tree.leaves(outside))
  row["read"] = {"before_gb": round(before, 3), "after_gb": round(_rss_gb(), 3), "peak_gb": round(peak[0], 3),
                 "seconds": round(time.perf_counter() - t, 1)}
  run_dir = a.workdir / "partial"
  shutil.rmtree(run_dir, ignore_errors=True)
  run_dir.mkdir(parents=True)
  before, peak[0], t = _rss_gb(), _rss_gb(), time.perf_counter()
  partial_lib.save_outside(str(run_dir), outside)
  row["write"] = {"before_gb": round(before, 3), "after_gb": round(_rss_gb(), 3), "peak_gb": round(peak[0], 3),
                  "seconds": round(time.perf_counter() - t, 1)}
  stop.set()
  row["weights_gb"] = round(sum(x.nbytes for x in jax.tree.leaves(outside) if isinstance(x, jax.Array)) / 2**30, 3)
  print(json.dumps(row))


if __name__ == "__main__":
  main()
