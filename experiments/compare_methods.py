"""Quantize a model with several methods and write the quality table (perplexity or top-1) to a workdir.

The same comparison as `gilora quantize` without --model, with every knob exposed and results kept as JSONL:

  PYTHONPATH=. python experiments/compare_methods.py                           # the built-in LM and DeiT, 3 bits
  PYTHONPATH=. python experiments/compare_methods.py --lm DIR --vit '' --bits 4 --rank 32 --protocol fp

Writes workdir/args.json and workdir/results.jsonl (one line per model × method, with the float baseline).
"""
import argparse
import dataclasses
import json
import pathlib
import sys

from gilora_jax.pipeline import apply, run


@dataclasses.dataclass(frozen=True)
class Args:
  lm: str = "builtin"            # LM folder ("builtin": the shipped Shakespeare Qwen3; "": none)
  vit: str = "builtin"           # classifier folder ("builtin": the shipped digits DeiT; "": none)
  bits: int = 3
  rank: int = 16
  nsamples: int = 32             # LM calibration windows
  vit_nsamples: int = 128        # DeiT calibration images
  seqlen: int = 256
  eval_seqlen: int = 256
  protocol: str = "quantized"
  seed: int = 0
  workdir: str = "runs/compare_methods"


def main(a: Args) -> list[dict]:
  lm_builtin, vit_builtin = run.builtin_folders()
  lm = lm_builtin if a.lm == "builtin" else a.lm or None
  vit = vit_builtin if a.vit == "builtin" else a.vit or None
  config = apply.make_config(bits=a.bits, rank=a.rank, seed=a.seed, protocol=a.protocol)
  rows = run.builtin_comparison(lm, vit, config=config, nsamples=a.nsamples, seqlen=a.seqlen,
                                eval_seqlen=a.eval_seqlen, vit_nsamples=a.vit_nsamples, table=print)
  out = pathlib.Path(a.workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "args.json").write_text(json.dumps(dataclasses.asdict(a), indent=2), encoding="utf-8")
  (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return rows


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  for f in dataclasses.fields(Args):
    p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
  main(Args(**vars(p.parse_args())))
  sys.exit(0)
