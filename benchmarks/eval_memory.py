"""Peak memory of `gilora eval` (perplexity) on a large-vocabulary LM, against the weights it holds.

Builds (once, cached under --workdir) a random-initialised Qwen3 of Qwen3-0.6B's shape cut to --blocks blocks
(default 4: 218 M parameters, vocab 151,936, tied embeddings) with a character-level tokenizer, writes a text of
enough tokens for two batches, and runs `gilora eval --seqlen L --batch-size B` in a child process, reading its
peak resident memory from the kernel (`ru_maxrss` of the child). A second child only loads the model, so
`peak_over_loaded_gb` is what evaluation adds to a process that holds the model; `peak_over_weights_gb`
subtracts the weights' bytes alone.

  python benchmarks/eval_memory.py                              # seqlen 2048, batch 8: the issue's target
  python benchmarks/eval_memory.py --seqlen 256 --batch-size 2  # a quick run

Target (issue 11): evaluation at --seqlen 2048 --batch-size 8 within 3 GB above the weights. Before chunking, the
full-vocabulary logits alone were B·L·V·4 bytes (10 GB here) and the run peaked at 11–16.5 GB.
One JSON line on stdout, appended to --out.
"""
import argparse
import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--blocks", type=int, default=4)
  p.add_argument("--seqlen", type=int, default=2048)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/gilora_eval_memory"))
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "eval_memory.jsonl")
  return p.parse_args(argv)


def log(msg):
  print(f"[eval_memory] {msg}", file=sys.stderr, flush=True)


def build(folder: pathlib.Path, blocks: int, n_chars: int) -> int:
  """The random model folder (cached) and its text; returns the weights' bytes."""
  sys.path.insert(0, str(REPO))
  from gilora_jax.models import convert, qwen3  # pylint: disable=import-outside-toplevel
  from tests.pipeline import tiny  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(qwen3.ModelConfig.qwen3_0_6b(), num_hidden_layers=blocks)
  if not (folder / "config.json").exists():
    log(f"building a random Qwen3-0.6B-shaped model with {blocks} blocks in {folder}")
    model = tiny.random_model(qwen3.Qwen3, cfg, seed=0, scale=0.02)
    convert.save_hf(model, folder)
    tiny.save_char_tokenizer(folder)
  text = folder / "eval.txt"
  if not text.exists() or len(text.read_text()) < n_chars:
    text.write_text(tiny.text(n_chars, seed=2))
  return os.path.getsize(folder / "model.safetensors")


def child_peak(cmd: list[str]) -> tuple[float, float, str]:
  """(peak RSS of the child in GB, seconds, its stdout); the child must be the only one run since the last call."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  t0 = time.perf_counter()
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - t0
  if p.returncode:
    raise SystemExit(f"{cmd} failed:\n{p.stderr[-3000:]}")
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, seconds, p.stdout  # KiB -> GiB


def main(argv=None):
  a = parse_args(argv)
  folder = a.workdir / f"qwen3-0.6b-{a.blocks}blocks"
  weights = build(folder, a.blocks, 2 * a.batch_size * a.seqlen + 16)
  load_before = os.getloadavg()[0]
  # The loading child first: ru_maxrss of RUSAGE_CHILDREN is the max over all children waited for so far.
  loaded_gb, _, _ = child_peak([sys.executable, "-c", "import sys; from gilora_jax import load_model; "
                                "load_model(sys.argv[1])", str(folder)])
  peak_gb, seconds, out = child_peak([sys.executable, "-m", "gilora_jax.cli", "eval", "--model", str(folder),
                                      "--seqlen", str(a.seqlen), "--batch-size", str(a.batch_size)])
  result = json.loads(out.strip().splitlines()[-1])
  rec = {"bench": "eval_memory", "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "blocks": a.blocks,
         "params_m": round(weights / 4 / 1e6, 1), "vocab": 151936, "seqlen": a.seqlen, "batch_size": a.batch_size,
         "weights_gb": round(weights / 2**30, 3), "loaded_rss_gb": round(loaded_gb, 3), "peak_rss_gb": round(peak_gb, 3),
         "peak_over_weights_gb": round(peak_gb - weights / 2**30, 3), "peak_over_loaded_gb": round(peak_gb - loaded_gb, 3),
         "full_logits_gb": round(a.batch_size * a.seqlen * 151936 * 4 / 2**30, 3), "seconds": round(seconds, 1),
         "perplexity": result["perplexity"], "tokens": result["tokens"], "loadavg_1m_before": load_before,
         "loadavg_1m_after": os.getloadavg()[0]}
  line = json.dumps(rec)
  print(line)
  a.out.parent.mkdir(parents=True, exist_ok=True)
  with open(a.out, "a", encoding="utf-8") as f:
    f.write(line + "\n")
  log(f"peak {peak_gb:.2f} GB = weights {weights / 2**30:.2f} GB + {peak_gb - weights / 2**30:.2f} GB "
      f"(a process holding the model: {loaded_gb:.2f} GB); the full logits alone would be {rec['full_logits_gb']} GB")
  return rec


if __name__ == "__main__":
  main()
