"""How much does quantizing the built-in LM hurt? A quick per-method perplexity probe (not the CLI).

Every linear of every block is replaced by `Q + L R` from `gilora_jax.quantize_layer`, with Hessians `XᵀX` from
the *float* model's taps on calib.txt (not the sequential, quantized-inputs protocol of a real run), and
perplexity is measured on the first `eval_windows` 256-token windows of eval.txt. Writes one JSON line per
method to workdir/metrics.jsonl.

  python experiments/probe_builtin_quant.py --bits 3 --group_size 32 --rank 16 --workdir runs/probe_quant
"""
import dataclasses
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for gilora_jax
import _builtin  # noqa: E402  pylint: disable=wrong-import-position


@dataclasses.dataclass(frozen=True)
class Args:
  """Per-method perplexity of the built-in LM after quantizing all its linears.

  python experiments/probe_builtin_quant.py --bits 3 --group_size 32 --rank 16 --workdir runs/probe_quant
  """
  bits: int = 3
  group_size: int = 32                      # 0 = one grid per output channel
  rank: int = 16
  methods: tuple[str, ...] = ("rtn", "gptq", "gptq+olrc", "gilora")
  eval_windows: int = 64
  workdir: pathlib.Path = pathlib.Path("runs/probe_quant")


def main(a: Args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  from gilora_jax import assets, load_model, quantize_layer  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import qwen3  # pylint: disable=import-outside-toplevel

  writer = _builtin.JsonlWriter(a.workdir)
  model, tok = load_model(assets.QWEN3_SHAKESPEARE), AutoTokenizer.from_pretrained(assets.QWEN3_SHAKESPEARE)

  def windows(split, n=None):
    ids = np.asarray(tok(assets.lm_text(split))["input_ids"], np.int32)
    return ids[: len(ids) // 256 * 256].reshape(-1, 256)[:n]

  calib, evals = windows("calib"), windows("eval", a.eval_windows)
  nll = jax.jit(lambda m, x: optax.softmax_cross_entropy_with_integer_labels(m(x)[:, :-1], x[:, 1:]).mean())

  def ppl(m):
    return float(np.exp(np.mean([nll(m, evals[i:i + 16]) for i in range(0, len(evals), 16)])))

  result = {"float": ppl(model)}
  writer.write(method="float", eval_ppl=round(result["float"], 3))
  hessians, x = {}, model.embed(jnp.asarray(calib))
  for i, block in enumerate(model.layers):
    x, taps = block(x)
    for site, t in taps.items():
      t = t.reshape(-1, t.shape[-1]).astype(jnp.float32)
      hessians[i, site] = t.T @ t
  for method in a.methods:
    t0, m = time.time(), nnx.clone(model)
    for i, block in enumerate(m.layers):
      for site, names in qwen3.QUANT_SITES.items():
        for name in names:
          linear = block
          for part in name.split("."):
            linear = getattr(linear, part)
          r = quantize_layer(linear.kernel[...], hessians[i, site], method=method, bits=a.bits, rank=a.rank,
                             group_size=a.group_size or None)
          linear.kernel[...] = (r.Q + r.L @ r.R).astype(linear.kernel[...].dtype)
    result[method] = ppl(m)
    writer.write(method=method, bits=a.bits, group_size=a.group_size, rank=a.rank, eval_ppl=round(result[method], 3),
                 seconds=round(time.time() - t0, 1))
  writer.close()
  return result


if __name__ == "__main__":
  main(_builtin.parse_args(Args))
