"""The pipeline on a Llama folder written by transformers itself (save_pretrained, safetensors), not by save_hf:
load_model matches transformers, and quantize_model runs on it and stays close to the float model."""
import numpy as np
import pytest

import gilora_jax as gj
from gilora_jax.models import llama
from gilora_jax.nn import QuantizedLinear
from gilora_jax.pipeline import apply, calib
from flax import nnx

from .tiny import LM_CONFIG


@pytest.fixture(scope="module")
def hf_llama_folder(tmp_path_factory):
  torch = pytest.importorskip("torch", reason="transformers' LlamaForCausalLM writes and checks the folder")
  from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel
  # 64×64 linears like the other pipeline tests' models, so quantize_layer's stages compile once for the suite.
  cfg = LlamaConfig(**{k: LM_CONFIG[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                 "max_position_embeddings")},
                    tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
  torch.manual_seed(0)
  pt = LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # norms start at 1: perturb them so a mapping bug shows
    for name, p in pt.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn(p.shape))
  folder = tmp_path_factory.mktemp("hf_llama")
  pt.save_pretrained(folder, safe_serialization=True)
  return torch, pt, str(folder)


def test_load_model_and_quantize_model_on_a_transformers_llama_folder(hf_llama_folder):
  torch, pt, folder = hf_llama_folder
  model = gj.load_model(folder)
  assert isinstance(model, llama.Llama) and model.config.architecture == "LlamaForCausalLM"
  assert model.lm_head is None  # tied
  ids = np.random.default_rng(0).integers(0, LM_CONFIG["vocab_size"], (2, 24)).astype(np.int32)
  with torch.no_grad():
    ref = pt(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  logits = np.asarray(llama.forward(model, ids))
  assert np.max(np.abs(logits - ref)) <= 1e-4

  out = apply.quantize_model(model, calib.batches(ids, 2), method="gptq", bits=4)
  quantized = [m for _, m in nnx.iter_modules(out.model) if isinstance(m, QuantizedLinear)]
  assert len(quantized) == 2 * 7 and len(out.records) == 2 * 7
  q_logits = np.asarray(llama.forward(out.model, ids))
  assert 0 < np.max(np.abs(q_logits - logits)) < 0.2 * np.max(np.abs(logits))
