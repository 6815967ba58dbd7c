"""gilora_jax: near-optimal low-bit plus low-rank post-training quantization in JAX/Flax.

Every linear weight becomes ``W ≈ Q + L R`` with ``Q`` on a b-bit grid and ``L R`` a rank-r
correction, chosen to minimise the layer-wise output error ``‖X W − X (Q + L R)‖²_F``.
"""
from gilora_jax.config import LayerConfig, QuantConfig
from gilora_jax.layer import METHODS, LayerReport, LayerResult, quantize_layer

__all__ = ["LayerConfig", "LayerReport", "LayerResult", "METHODS", "QuantConfig", "quantize_layer", "load_model"]
__version__ = "0.1.0"


def __getattr__(name):
  # The model ports pull in flax/transformers; keep `import gilora_jax` light for math-only users.
  if name == "load_model":
    from gilora_jax.pipeline.load import load_model  # pylint: disable=import-outside-toplevel
    return load_model
  raise AttributeError(f"module 'gilora_jax' has no attribute {name!r}")
