"""Model ports (the Llama family: Llama, Qwen2, Mistral, Qwen3; DeiT/ViT) and their registry: which HF
architecture name builds which NNX model.

The ground floor of the model wing: this package imports nothing of gilora_jax above it. Reading a local folder
into a model is `gilora_jax.load_model` (the pipeline); converting HF safetensors is `models.convert`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from gilora_jax.models import deit, llama, qwen3

__all__ = ["ARCHITECTURES", "ModelSpec", "deit", "llama", "qwen3", "quant_sites", "spec_of"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One supported HF architecture: its config class, NNX model class, and the model file's `QUANT_SITES`
  (input site -> linear paths relative to a block; linears of one site share a Hessian)."""
  config_cls: type
  model_cls: type
  quant_sites: dict[str, tuple[str, ...]]


# HF `architectures` name -> port. The supported set of `gilora_jax.load_model`.
ARCHITECTURES: dict[str, ModelSpec] = {
    **{name: ModelSpec(llama.ModelConfig, llama.Llama, llama.QUANT_SITES)
       for name in llama.ARCHITECTURES if name != qwen3.ARCHITECTURE},
    qwen3.ARCHITECTURE: ModelSpec(qwen3.ModelConfig, qwen3.Qwen3, qwen3.QUANT_SITES),
    **{name: ModelSpec(deit.ModelConfig, deit.DeiT, deit.QUANT_SITES) for name in deit.ARCHITECTURES},
}


def spec_of(config: Any) -> ModelSpec:
  """The registry entry of a model config (anything with an `architecture` attribute)."""
  name = getattr(config, "architecture", None)
  if name not in ARCHITECTURES:
    raise ValueError(f"{type(config).__name__} architecture {name!r} is not supported; supported: "
                     f"{sorted(ARCHITECTURES)} (the ports in gilora_jax.models).")
  return ARCHITECTURES[name]


def quant_sites(model: nnx.Module) -> dict[str, tuple[str, ...]]:
  """The `QUANT_SITES` table of a model built by one of the ports."""
  config = getattr(model, "config", None)
  if config is None:
    raise ValueError(f"{type(model).__name__} has no config; supported models are the ports in gilora_jax.models "
                     f"(Llama, Qwen2, Mistral, Qwen3, DeiT/ViT).")
  return spec_of(config).quant_sites
