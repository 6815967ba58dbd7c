"""Writes tests/export/data/gptqmodel-w4g32/: a folder quantized by GPTQModel itself, for the import test.

Two steps, two environments (GPTQModel needs a newer torch than the project's pin; README, "the GPTQ reload
environment"):

  .venv/bin/python -c "from tests.pipeline.tiny import make_lm; make_lm('/tmp/tiny_lm', num_layers=2, seed=3)"
  gptq-env/bin/python tests/export/data/make_gptqmodel_fixture.py /tmp/tiny_lm tests/export/data/gptqmodel-w4g32

GPTQModel 7.7 quantizes the tiny random Qwen3 on CPU (4-bit, groups of 32, symmetric, its defaults otherwise) on
16 windows of 64 tokens of its calib.txt and saves it; then, from that saved folder as transformers + gptqmodel load
it, every quantized linear's `dequantize_weight()` and the logits of two 16-token inputs go to reference.npz.
(GPTQModel also writes a logs/ folder into the current directory: run it from a scratch folder, or delete it.)
"""
import os
import sys

os.cpu_count = lambda: 4  # gptqmodel 7.7's CPU thread pools refuse machines with fewer than 3 cores

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from gptqmodel import GPTQModel, QuantizeConfig  # noqa: E402


def main(src: str, out: str) -> None:
  tok = transformers.AutoTokenizer.from_pretrained(src)
  with open(os.path.join(src, "calib.txt"), encoding="utf-8") as f:
    ids = tok(f.read())["input_ids"]
  calib = [{"input_ids": ids[i:i + 64], "attention_mask": [1] * 64} for i in range(0, 64 * 16, 64)]
  model = GPTQModel.load(src, QuantizeConfig(bits=4, group_size=32, sym=True, desc_act=False), device="cpu")
  model.quantize(calib, batch_size=4)
  model.save(out)
  for name in os.listdir(out):
    if name.endswith(".csv"):
      os.remove(os.path.join(out, name))  # its log, not part of the checkpoint
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval()
  x = np.random.default_rng(0).integers(0, hf.config.vocab_size, (2, 16))
  ref = {}
  for name, module in hf.named_modules():
    if hasattr(module, "dequantize_weight"):
      ref[f"weight/{name}"] = module.dequantize_weight().float().numpy().astype(np.float16)  # (d_in, d_out)
  with torch.no_grad():
    ref["logits"] = hf(input_ids=torch.from_numpy(x)).logits.float().numpy()
  np.savez_compressed(os.path.join(out, "reference.npz"), x=x.astype(np.int32), **ref)
  print(f"wrote {out}: {len([k for k in ref if k.startswith('weight/')])} quantized linears")


if __name__ == "__main__":
  main(*sys.argv[1:3])
