"""QPEFT: fine-tune the low-rank factors L, R of a quantized model (`Q + L R`, Q frozen) with optax.

`core` holds the math (the trainable filter, initialisations, SRR's γ, losses, the optax chain and the jitted
steps); `train` the loop around it (data, held-apart evaluation, resumable orbax checkpoints, JSONL curves, the
PNG plot) and `finetune_folder`, the engine of `gilora finetune`.
"""
from gilora_jax.finetune.core import INITS, TrainConfig, preserved_multipliers, scale_gradient
from gilora_jax.finetune.train import FinetuneResult, finetune, finetune_folder, init_factors

__all__ = ["INITS", "FinetuneResult", "TrainConfig", "finetune", "finetune_folder", "init_factors",
           "preserved_multipliers", "scale_gradient"]
