"""A built-in example layer: deterministic, realistic enough to show every method's trade-offs offline.

The inputs mimic a transformer linear layer's calibration activations: Student-t(4) tokens (heavy tails make
GPTQ's error feedback matter), a decaying spectrum mixed by a random rotation (so H is dense and low-rank
corrections pay), and a few outlier features 20× larger than the rest (as in LLM residual streams).
"""
from __future__ import annotations

import numpy as np


def example_layer(seed: int = 0, d_in: int = 512, d_out: int = 384, n_tokens: int = 4096):
  """Returns ``(W (d_in, d_out), H (d_in, d_in))`` as float32 NumPy arrays; ``H = XᵀX`` of the inputs."""
  rng = np.random.default_rng(seed)
  X = rng.standard_t(4, size=(n_tokens, d_in))
  spectrum = np.exp(-np.arange(d_in) / (d_in / 16)) + 0.05
  rot, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
  X = (X * spectrum) @ rot.T
  X[:, rng.choice(d_in, 4, replace=False)] *= 20.0
  W = rng.standard_t(5, size=(d_in, d_out)) * (0.5 / np.sqrt(d_in))
  return W.astype(np.float32), (X.T @ X).astype(np.float32)
