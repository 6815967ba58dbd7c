"""Where the `write_outside` stage of `gilora quantize` goes: the weights outside the blocks (embedding, final
norm; the head is tied) of the Qwen3-0.6B-shaped folder of `model.py`, read and written piece by piece with the
pipeline's own calls, and orbax's compressed write (its default) beside ours (uncompressed).

  PYTHONPATH=$PWD python benchmarks/outside_write.py [--workdir /tmp/gilora_model_bench] [--reps 2]

Each step is timed alone (best of --reps, arrays ready before the clock stops). One JSON line is printed and
appended to --out (`benchmarks/results/outside_write.jsonl`). The page cache is whatever the machine has: the
folder was just built or read, so the read is a warm one.
"""
import argparse
import datetime
import os
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import model as model_bench  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/gilora_model_bench"))
  p.add_argument("--blocks", type=int, default=4)
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--out", type=pathlib.Path,
                 default=pathlib.Path(__file__).parent / "results" / "outside_write.jsonl")
  a = p.parse_args(argv)
  from gilora_jax import runtime  # pylint: disable=import-outside-toplevel
  runtime.tune_cpu_malloc()  # as the gilora command does, before any JAX computation
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gilora_jax import nn  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import convert  # pylint: disable=import-outside-toplevel
  from gilora_jax.pipeline import ckpt, files  # pylint: disable=import-outside-toplevel
  from gilora_jax.pipeline import partial as partial_lib  # pylint: disable=import-outside-toplevel

  folder = model_bench.build(a.workdir, a.blocks, tiny=False)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="outside_write_", dir=a.workdir))
  times = {}

  def timed(name, fn):
    best, out = None, None
    for _ in range(a.reps):
      t0 = time.perf_counter()
      out = fn()
      jax.block_until_ready(jax.tree.leaves(out) if out is not None else None)
      best = min(best or 1e9, time.perf_counter() - t0)
    times[name] = round(best, 3)
    return out

  load0 = os.getloadavg()[0]
  lazy = convert.LazyHF(folder, param_dtype="stored")
  outside = timed("read_outside", lambda: lazy.load(skip="layers"))
  shell = nn.clone(outside)
  shell.layers = nnx.List([])
  tree = nnx.to_pure_dict(nnx.state(shell))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
  n = iter(range(10**6))

  def orbax_default():  # StandardCheckpointer, orbax's defaults: zstd
    path = tmp / f"default_{next(n)}"
    with ckpt._checkpointer() as c:  # pylint: disable=protected-access
      c.save(path, tree)
      c.wait_until_finished()
    return path

  def ours():  # the pipeline's writer (no compression)
    path = tmp / f"ours_{next(n)}"
    with ckpt._writer() as c:  # pylint: disable=protected-access
      c.save(path, args=ocp.args.PyTreeSave(tree))
    return path

  compressed, plain = timed("save_orbax_default", orbax_default), timed("save_ours", ours)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  for name, path in (("restore_compressed", compressed), ("restore_ours", plain)):
    with ckpt._checkpointer() as c:  # pylint: disable=protected-access
      back = timed(name, lambda path=path, c=c: c.restore(path, target))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(back),
                                                                            jax.tree.leaves(tree)))
  timed("manifest_sha256", lambda: files.manifest(str(plain)))
  timed("save_outside_whole", lambda: partial_lib.save_outside(str(tmp / f"partial_{next(n)}"), outside))
  size = lambda path: sum(f.stat().st_size for f in path.rglob("*") if f.is_file())  # noqa: E731
  layer_bench = model_bench._layer  # pylint: disable=protected-access  (machine_facts, _git_commit, emit)
  rec = {"bench": "outside_write", "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "model": folder.name, "outside_bytes": nbytes, "reps": a.reps, "seconds": times,
         "bytes_on_disk": {"orbax_default": size(compressed), "ours": size(plain)},
         "loadavg_1m_before": load0, "loadavg_1m_after": os.getloadavg()[0], "orbax": ocp.__version__,
         "gilora_commit": layer_bench._git_commit(pathlib.Path(__file__).resolve().parent.parent),  # pylint: disable=protected-access
         **layer_bench.machine_facts()}
  shutil.rmtree(tmp, ignore_errors=True)
  return layer_bench.emit(rec, a.out)


if __name__ == "__main__":
  main()
