"""The ``gilora`` command line.

  gilora quantize-layer IN.npz --method M --bits B [--rank R --group-size G --sym --loops N --damp F
                        --act-order] --out OUT.npz
  gilora quantize       with no --model: quantize the built-in example layer with every method and print the
                        comparison (rel_err against Paper A's bounds, seconds)

Every command prints one JSON object per result line on stdout; progress and logs go to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

import numpy as np

log = logging.getLogger("gilora")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--method", default="gilora", help="rtn, gptq, gptq+lorc, gptq+olrc, gilora, srr (default gilora)")
  p.add_argument("--bits", type=int, default=3, help="bit width, 2..8 (default 3)")
  p.add_argument("--rank", type=int, default=32, help="rank of the low-rank term (default 32)")
  p.add_argument("--group-size", type=int, default=None, help="input rows per grid (default: per output channel)")
  p.add_argument("--sym", action="store_true", help="symmetric grids")
  p.add_argument("--loops", type=int, default=0, help="Bid-Up/OLrC refinement loops (default 0)")
  p.add_argument("--damp", type=float, default=0.01, help="relative damping of H (default 0.01)")
  p.add_argument("--act-order", action="store_true", help="visit input rows by decreasing H_ii")
  p.add_argument("--seed", type=int, default=0)


def _quant_kwargs(a: argparse.Namespace) -> dict:
  return dict(method=a.method, bits=a.bits, rank=a.rank, group_size=a.group_size, symmetric=a.sym, loops=a.loops,
              damp=a.damp, act_order=a.act_order, seed=a.seed)


def _fail(msg: str) -> int:
  print(f"gilora: error: {msg}", file=sys.stderr)
  return 2


def cmd_quantize_layer(a: argparse.Namespace) -> int:
  """Quantize the W and H stored in an .npz; write Q, L, R, codes, scales, zeros; print a JSON line."""
  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(a.input)
  if not path.is_file():
    return _fail(f"{path} does not exist; pass an .npz holding arrays 'W' (d_in, d_out) and 'H' (d_in, d_in).")
  try:
    with np.load(path) as z:
      missing = {"W", "H"} - set(z.files)
      if missing:
        return _fail(f"{path} lacks {sorted(missing)} (it holds {z.files}); save W as the (d_in, d_out) kernel and "
                     f"H = XᵀX as 'W' and 'H'.")
      W, H = z["W"], z["H"]
  except (OSError, ValueError) as e:
    return _fail(f"{path} is not a readable .npz ({e}).")
  try:
    res = gj.quantize_layer(W, H, **_quant_kwargs(a))
  except ValueError as e:
    return _fail(str(e))
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez(out, Q=np.asarray(res.Q), L=np.asarray(res.L), R=np.asarray(res.R), codes=np.asarray(res.codes),
           scales=np.asarray(res.scales), zeros=np.asarray(res.zeros))
  print(json.dumps({"input": str(path), "out": str(out), "d_in": int(W.shape[0]), "d_out": int(W.shape[1]),
                    **res.info}))
  return 0


EXAMPLE_RUNS = (  # (label, quantize_layer kwargs) for the built-in comparison
    ("rtn", dict(method="rtn")),
    ("gptq", dict(method="gptq")),
    ("gptq+lorc", dict(method="gptq+lorc")),
    ("gptq+olrc", dict(method="gptq+olrc")),
    ("gilora", dict(method="gilora")),
    ("gilora+2loops", dict(method="gilora", loops=2)),
    ("srr", dict(method="srr")),
)


def cmd_quantize_example(a: argparse.Namespace) -> int:
  """The built-in example layer, every method at the same bits and rank; a table on stderr, JSONL on stdout."""
  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  from gilora_jax.examples import example_layer  # pylint: disable=import-outside-toplevel
  W, H = example_layer()
  print(f"built-in example layer: W {W.shape[0]}×{W.shape[1]}, {a.bits}-bit, rank {a.rank}"
        f"{'' if a.group_size is None else f', group {a.group_size}'}", file=sys.stderr)
  print(f"{'method':<15}{'rel_err':>10}{'upper bound':>13}{'lower est.':>12}{'seconds':>9}", file=sys.stderr)
  for label, kw in EXAMPLE_RUNS:
    res = gj.quantize_layer(W, H, **{**_quant_kwargs(a), "loops": 0, **kw})
    i = res.info
    print(f"{label:<15}{i['rel_err']:>10.5f}{i['upper_bound']:>13.5f}{i['lower_estimate']:>12.2e}"
          f"{i['seconds']:>9.2f}", file=sys.stderr)
    print(json.dumps({"layer": "example", "label": label, **i}))
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="gilora", description="Low-bit plus low-rank post-training quantization.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("quantize-layer", help="quantize one layer from an .npz holding W and H")
  p.add_argument("input", help=".npz with 'W' (d_in, d_out) and 'H' (d_in, d_in)")
  p.add_argument("--out", required=True, help="output .npz (Q, L, R, codes, scales, zeros)")
  _add_quant_args(p)
  p.set_defaults(func=cmd_quantize_layer)
  p = sub.add_parser("quantize", help="quantize a model; without --model, the built-in example")
  _add_quant_args(p)
  p.set_defaults(func=cmd_quantize_example)
  a = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
  return a.func(a)


if __name__ == "__main__":
  sys.exit(main())
