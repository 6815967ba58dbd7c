"""`load_model`: the one entry point from a local folder (a HF checkpoint or a gilora checkpoint) to an NNX model."""
from __future__ import annotations

import os

from flax import nnx

from gilora_jax.models import convert
from gilora_jax.pipeline import ckpt


def load_model(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
               verify: bool = True) -> nnx.Module:
  """The NNX model stored in a local folder; never downloads.

  * A checkpoint written by `gilora_jax.pipeline.ckpt.save_model` is restored as saved (dtype arguments are
    ignored), after every file is checked against the SHA-256 recorded at save time (`verify=False` skips that).
  * Otherwise the folder must be a HF checkpoint (config.json + safetensors). Its config.json "architectures"
    picks the port: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM (`llama.Llama`),
    Qwen3ForCausalLM (`qwen3.Qwen3`), DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher or ViTForImageClassification (`deit.DeiT`); anything else raises a
    ValueError listing these. Weights are cast to `param_dtype` (default `dtype`), compute runs in `dtype`.
  * A HF folder quantized as compressed-tensors `pack-quantized` or GPTQ (`gilora export`, llm-compressor,
    GPTQModel) gets a `QuantizedLinear` at every quantized linear, with the stored codes, scales and zeros, and the
    PEFT adapter in `path/adapter/` (if any) as its L R (`gilora_jax.export.reader`).
  """
  folder = convert.local_folder(path)
  if ckpt.looks_like_checkpoint(folder):
    return ckpt.restore_model(folder, verify_files=verify)
  from gilora_jax.export import reader  # pylint: disable=import-outside-toplevel
  if reader.quant_method(folder):  # compressed-tensors or GPTQ: QuantizedLinears (+ the adapter in adapter/)
    return reader.load(folder, dtype=param_dtype or dtype)
  return convert.load_hf(folder, dtype=dtype, param_dtype=param_dtype)
