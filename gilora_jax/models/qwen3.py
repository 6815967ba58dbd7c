"""Dense Qwen3 causal LM: the Llama-family port (`gilora_jax.models.llama`) with Qwen3's defaults and names.

Qwen3 is Llama plus a per-head RMSNorm on q and k, so the model lives in `llama.py`; this module keeps the
public names that code and checkpoints use (`qwen3.Qwen3`, `qwen3.ModelConfig` with the Qwen3 presets,
`qwen3.QUANT_SITES`, `qwen3.ARCHITECTURE`, `qwen3.forward`, `qwen3.greedy_generate`, `qwen3.generate`, ...).
`ModelConfig` here is `llama.ModelConfig` with Qwen3's defaults (architecture "Qwen3ForCausalLM", q/k norm,
head_dim 128, theta 1e6, eps 1e-6), so a checkpoint written before the generalisation (its stored config has
none of the new fields) restores unchanged.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from gilora_jax.models import hf_config, llama
from gilora_jax.models.llama import (QUANT_SITES, Attention, DecoderLayer, LayerCache, MLP, RMSNorm, apply_rope,
                                     causal_mask, forward, generate, greedy_generate, init_cache)

__all__ = ["ARCHITECTURE", "Attention", "DecoderLayer", "LayerCache", "MLP", "ModelConfig", "QUANT_SITES", "Qwen3",
           "RMSNorm", "apply_rope", "causal_mask", "forward", "generate", "greedy_generate", "init_cache"]

ARCHITECTURE = "Qwen3ForCausalLM"


@dataclasses.dataclass(frozen=True)
class ModelConfig(llama.ModelConfig):
  """`llama.ModelConfig` with Qwen3's defaults; the fields and their order are the same."""
  head_dim: int | None = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  max_position_embeddings: int = 40960
  architecture: str = ARCHITECTURE
  qk_norm: bool = True

  # Official dense sizes (Qwen/Qwen3-*/config.json). Every one has vocab 151936, theta 1e6, eps 1e-6, head_dim 128.
  @classmethod
  def _official(cls, layers, hidden, mlp, heads, kv_heads, tied, **kw) -> ModelConfig:
    return cls(vocab_size=151936, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
               bos_token_id=151643, eos_token_id=(151645,), **kw)

  @classmethod
  def qwen3_0_6b(cls, **kw) -> ModelConfig:
    return cls._official(28, 1024, 3072, 16, 8, True, **kw)

  @classmethod
  def qwen3_1_7b(cls, **kw) -> ModelConfig:
    return cls._official(28, 2048, 6144, 16, 8, True, **kw)

  @classmethod
  def qwen3_4b(cls, **kw) -> ModelConfig:
    return cls._official(36, 2560, 9728, 32, 8, True, **kw)

  @classmethod
  def qwen3_8b(cls, **kw) -> ModelConfig:
    return cls._official(36, 4096, 12288, 32, 8, False, **kw)

  @classmethod
  def qwen3_14b(cls, **kw) -> ModelConfig:
    return cls._official(40, 5120, 17408, 40, 8, False, **kw)

  @classmethod
  def qwen3_32b(cls, **kw) -> ModelConfig:
    return cls._official(64, 5120, 25600, 64, 8, False, **kw)

  @classmethod
  def from_hf_config(cls, path_or_dict: str | os.PathLike | dict[str, Any], *, dtype: str = "float32",
                     param_dtype: str | None = None) -> ModelConfig:
    """Reads a HF Qwen3 `config.json` (a folder, the file itself, or the parsed dict); other model types are
    refused (read them with `llama.ModelConfig.from_hf_config`)."""
    hf, where = hf_config.read_config(path_or_dict)
    if hf.get("model_type") != "qwen3":
      raise ValueError(f"{where} is a {hf.get('model_type')!r} config (architectures {hf.get('architectures')}), "
                       f"not a dense Qwen3 ('qwen3'); pass the folder of a Qwen3ForCausalLM checkpoint.")
    return cls._from_hf(hf, where, ARCHITECTURE, dtype=dtype, param_dtype=param_dtype)


class Qwen3(llama.Llama):
  """Qwen3ForCausalLM: `llama.Llama` under its own name. `model(input_ids)` maps int32 (B, T) to logits
  (B, T, V) in `cfg.dtype`."""
