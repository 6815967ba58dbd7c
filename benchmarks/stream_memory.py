"""Peak memory of `gilora quantize` on a model of Qwen3-8B's shape, cut to a few blocks: is it independent of the
number of blocks (streaming: one float block resident at a time)?

Builds (once, cached under --workdir) random-initialised bf16 HF folders of Qwen3-8B's shape (hidden 4096,
intermediate 12288, 32 heads, 8 kv heads, head dim 128, vocab 151936, untied head) with each of --blocks blocks and
a character-level tokenizer, then runs `gilora quantize --method gptq --bits 4 --group-size 128 --symmetric` on
each in a child process and reads the child's own peak RSS (`os.wait4`). On a 2-core CPU one forward of an 8B
block over 128 × 2048 tokens takes over ten minutes, so the calibration here is --nsamples × --seqlen (default
4 × 128 tokens); the activations' share of a 128 × 2048 run is projected from their size.

  python benchmarks/stream_memory.py                    # 2 and 4 blocks, ~5 minutes on 2 cores
  python benchmarks/stream_memory.py --blocks 2 4 8

One JSON line on stdout (appended to --out): per block count the peak RSS, the growth per block, the parts of
the peak (weights outside the blocks, one block in bf16 and float32, its quantized copy, the activations).
"""
import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--blocks", type=int, nargs="+", default=[2, 4])
  p.add_argument("--nsamples", type=int, default=4)
  p.add_argument("--seqlen", type=int, default=128)
  p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/gilora_stream_memory"))
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "stream_memory.jsonl")
  return p.parse_args(argv)


def log(msg):
  print(f"[stream_memory] {msg}", file=sys.stderr, flush=True)


def build(folder: pathlib.Path, blocks: int) -> dict:
  """A random bf16 Qwen3-8B-shaped folder with `blocks` blocks (cached); returns its config."""
  sys.path.insert(0, str(REPO))
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import convert, qwen3  # pylint: disable=import-outside-toplevel
  from tests.pipeline import tiny  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(qwen3.ModelConfig.qwen3_8b(), num_hidden_layers=blocks, param_dtype="bfloat16")
  if not (folder / "config.json").exists():
    log(f"building a random bf16 Qwen3-8B-shaped model with {blocks} blocks in {folder}")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def fill(path, s):  # float32 draws (float64 ones of the embedding alone would take 5 GB)
      if str(path[-1].key) == "scale":
        return jnp.ones(s.shape, s.dtype)
      return jnp.asarray((0.02 * rng.standard_normal(s.shape, dtype=np.float32)).astype(s.dtype))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
    convert.save_hf(nnx.merge(graphdef, state), folder)
    tiny.save_char_tokenizer(folder)
    (folder / "calib.txt").write_text(tiny.text(20000, seed=1))
  return json.loads((folder / "config.json").read_text())


def main(argv=None):
  a = parse_args(argv)
  a.workdir.mkdir(parents=True, exist_ok=True)
  load_before = os.getloadavg()[0]
  rows = []
  for n in a.blocks:
    folder = a.workdir / f"qwen3-8b-{n}blocks"
    cfg = build(folder, n)
    log(f"{folder.name}: gilora quantize, {a.nsamples} × {a.seqlen} calibration tokens")
    # The child's own peak: run it through a tiny wrapper that reports its child's ru_maxrss.
    wrapper = ("import os, resource, subprocess, sys, json; p = subprocess.run(sys.argv[1:], capture_output=True); "
               "sys.stderr.buffer.write(p.stderr[-4000:]); sys.stdout.buffer.write(p.stdout); "
               "print(json.dumps({'peak_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    cmd = [sys.executable, "-m", "gilora_jax.cli", "quantize", "--model", str(folder), "--out",
           str(a.workdir / f"out-{n}"), "--overwrite", "--method", "gptq", "--bits", "4", "--group-size", "128",
           "--symmetric", "--rank", "0", "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--batch-size",
           str(a.nsamples)]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, check=False)
    seconds = time.perf_counter() - t0
    lines = p.stdout.decode().strip().splitlines()
    if p.returncode or len(lines) < 2:
      raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr.decode()[-3000:]}")
    summary, peak = json.loads(lines[-2]), json.loads(lines[-1])["peak_kb"] / 2**20
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    rows.append({"blocks": n, "peak_rss_gb": round(peak, 3), "seconds": round(seconds, 1),
                 "safetensors_gb": round(weights / 2**30, 3),
                 "stages": {k: v for k, v in summary["stages"].items() if k != "blocks"}})
    log(f"{n} blocks: peak RSS {peak:.2f} GiB, {seconds:.0f} s (weights on disk {weights / 2**30:.2f} GiB)")
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  hd, nh, kh = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
  block_params = d * (nh * hd + 2 * kh * hd) + nh * hd * d + 3 * d * f
  outside_params = 2 * v * d  # embedding and untied head (norms are negligible)
  parts = {"outside_blocks_bf16_gb": outside_params * 2 / 2**30, "one_block_bf16_gb": block_params * 2 / 2**30,
           "one_block_f32_gb": block_params * 4 / 2**30,
           "one_block_4bit_gb": block_params * (0.5 + 2 * 4 / 128) / 2**30,
           "activations_here_gb": a.nsamples * a.seqlen * d * 4 * 2 / 2**30,
           "activations_128x2048_gb": 128 * 2048 * d * 4 * 2 / 2**30}
  growth = ((rows[-1]["peak_rss_gb"] - rows[0]["peak_rss_gb"]) / (rows[-1]["blocks"] - rows[0]["blocks"])
            if len(rows) > 1 else None)
  rec = {"bench": "stream_memory", "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "shape": "Qwen3-8B (bf16 on disk and in memory, computed in float32)", "nsamples": a.nsamples, "seqlen": a.seqlen,
         "runs": rows, "peak_growth_per_block_gb": growth, "parts_gb": {k: round(x, 3) for k, x in parts.items()},
         "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]}
  line = json.dumps(rec)
  print(line)
  a.out.parent.mkdir(parents=True, exist_ok=True)
  with open(a.out, "a", encoding="utf-8") as fh:
    fh.write(line + "\n")
  return rec


if __name__ == "__main__":
  main()
