"""Calibration data and per-site Hessians.

A calibration set is a list of `CalibBatch`es, each `inputs` (what `model.embed` takes: token ids (B, T) int32 or
pixel values (B, C, H, W) float32) and an optional token `mask` (B, T) that marks real tokens. Batches are kept
as model *inputs* (small); only one block's activations are ever materialised (see `apply.quantize_model`).

Padding: rows must be right-padded (a row's real tokens come first). Under the causal mask a real token then
never attends to a pad, so the block outputs at real positions do not depend on the padding, and
`accumulate` leaves pads out of every Hessian.

`accumulate` folds a block's taps into one `hessian.HessianStats` per input site (optax-style `init`/`update`,
float32 sums), so the linears that share an input (q/k/v, gate/up) share one H.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import numpy as np

from gilora_jax.quant import hessian


class CalibBatch(NamedTuple):
  """One calibration batch: model inputs and an optional (B, T) token mask (True = real token)."""
  inputs: np.ndarray
  mask: np.ndarray | None = None


def init_stats(sites: Mapping[str, int]) -> dict[str, hessian.HessianStats]:
  """Empty statistics for each input site: {site: d_in}."""
  return {site: hessian.init(d) for site, d in sites.items()}


def accumulate(stats: dict[str, hessian.HessianStats], taps: Mapping[str, jax.Array],
               mask: jax.Array | None) -> dict[str, hessian.HessianStats]:
  """Adds one batch's taps (site -> (B, T, d_in)) to the statistics; tokens with mask 0 are left out."""
  return {site: hessian.update(s, taps[site], mask) for site, s in stats.items()}


def token_windows(ids: np.ndarray, nsamples: int, seqlen: int, seed: int = 0) -> np.ndarray:
  """`nsamples` random windows of `seqlen` tokens from one token stream (the GPTQ reference's calibration
  sampling: uniform random start positions, with a NumPy generator seeded by `seed`), as (nsamples, seqlen) int32.

  Raises ValueError when the stream is shorter than one window.
  """
  ids = np.asarray(ids).reshape(-1)
  if ids.size < seqlen:
    raise ValueError(f"the calibration text has {ids.size} tokens, fewer than one window of seqlen={seqlen}; "
                     f"pass a longer text or a smaller --seqlen.")
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, ids.size - seqlen + 1, size=nsamples)
  return np.stack([ids[s:s + seqlen] for s in starts]).astype(np.int32)


def batches(inputs: np.ndarray, batch_size: int, mask: np.ndarray | None = None) -> list[CalibBatch]:
  """Splits (N, ...) inputs (and an optional (N, T) mask) into consecutive `CalibBatch`es of `batch_size` rows."""
  n = len(inputs)
  if n == 0:
    raise ValueError("no calibration samples")
  return [CalibBatch(inputs[i:i + batch_size], None if mask is None else mask[i:i + batch_size])
          for i in range(0, n, batch_size)]


def check_batches(calib: Sequence[CalibBatch]) -> None:
  """Raises ValueError, before any work, for an empty calibration set, an empty batch, a batch with no real
  token, or left padding (`check_right_padded`)."""
  if not calib:
    raise ValueError("quantize_model needs at least one calibration batch.")
  for k, b in enumerate(calib):
    if np.size(b.inputs) == 0:
      raise ValueError(f"calibration batch {k} is empty (inputs of shape {np.shape(b.inputs)}); every window needs "
                       f"at least one token (seqlen ≥ 1) and every batch one sample.")
  if all(b.mask is not None and not np.asarray(b.mask, bool).any() for b in calib):
    raise ValueError("every calibration token is masked out as padding; no layer would see any data.")
  check_right_padded(calib)


def check_right_padded(calib: Sequence[CalibBatch]) -> None:
  """Raises ValueError if a mask row has a real token after a pad (left padding is not supported)."""
  for b in calib:
    if b.mask is None:
      continue
    m = np.asarray(b.mask, bool)
    if m.ndim != 2 or m.shape != np.shape(b.inputs)[:2]:
      raise ValueError(f"mask must be (B, T) like the token ids; got {m.shape} for inputs {np.shape(b.inputs)}.")
    if (np.diff(m.astype(np.int8), axis=1) > 0).any():
      raise ValueError("calibration rows must be right-padded (real tokens first, then pads): a real token after a "
                       "pad would attend to it under the causal mask.")
