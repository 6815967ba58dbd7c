"""Evaluation: perplexity of a causal LM on a text, top-1 accuracy of an image classifier on images.

Perplexity follows the GPTQ reference (IST-DASLab/gptq `datautils.py`/`llama_eval`): the whole text is tokenized
once, the token stream is cut into ⌊n / seqlen⌋ non-overlapping windows (the tail is dropped), each window is
scored independently from an empty context, and the first token of each window has no prediction. The reported
value is exp of the mean token NLL over all windows' tokens 1..seqlen−1, which equals the reference's
`exp(Σ_w loss_w · seqlen / (nsamples · seqlen))`, so numbers compare with published tables.

Memory. A batch's full-vocabulary logits are never materialised: the final hidden states go through the lm head
a chunk of positions at a time inside the jitted step, each chunk reduced to its tokens' NLL before the next
(`plan` sizes the chunk to ~256 MiB of logits), and the rows of a batch run in micro-batches small enough that
one micro-batch's attention scores stay near 256 MiB. Peak memory is the weights plus one micro-batch's
activations, whatever the batch size and vocabulary (Qwen3's 151,936 logits × 2048 positions × 8 rows would be
10 GB in float32). Readers of texts and images are in `pipeline.data`.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


LOGITS_BUDGET = 1 << 26  # float32 elements of one chunk of logits (256 MiB)
SCORES_BUDGET = 1 << 26  # float32 elements of one micro-batch's attention scores (256 MiB)



# ------------------------------------------------------------------------------------------------ perplexity


def windows(ids: np.ndarray, seqlen: int) -> np.ndarray:
  """(⌊n / seqlen⌋, seqlen) non-overlapping windows; ValueError when the text is shorter than one window."""
  if seqlen < 2:
    raise ValueError(f"seqlen={seqlen} must be at least 2 (the first token of a window has no prediction).")
  n = ids.size // seqlen
  if n == 0:
    raise ValueError(f"the text has {ids.size} tokens, fewer than one window of seqlen={seqlen}; pass a longer "
                     f"text or a smaller --seqlen.")
  return ids[:n * seqlen].reshape(n, seqlen)


def plan(model, batch: int, seqlen: int) -> tuple[int, int]:
  """(rows per micro-batch, positions per logits chunk) within the budgets above; rows divides the batch."""
  cfg = model.config
  per_row = cfg.num_attention_heads * seqlen * seqlen
  rows = max(1, min(batch, SCORES_BUDGET // max(per_row, 1)))
  while batch % rows:
    rows -= 1
  chunk = max(1, min(seqlen - 1, LOGITS_BUDGET // (rows * cfg.vocab_size)))
  return rows, chunk


@functools.partial(jax.jit, static_argnames=("rows", "chunk"))
def window_nll(model, ids, rows: int, chunk: int):
  """Summed NLL of tokens 1..T−1 of each row, (B, T) -> (B,) float32, in micro-batches of `rows` rows and logits
  chunks of `chunk` positions (module docstring): the same values as log_softmax over the full logits."""
  B, T = ids.shape
  n = T - 1

  def micro(ids_r):  # (rows, T) -> (rows,)
    x = model.embed(ids_r)
    for layer in model.layers:
      x, _ = layer(x)
    pad = -n % chunk
    xs = jnp.pad(x[:, :-1], ((0, 0), (0, pad), (0, 0)))  # (rows, n + pad, D)
    ts = jnp.pad(ids_r[:, 1:], ((0, 0), (0, pad)))
    xs = xs.reshape(rows, -1, chunk, x.shape[-1]).swapaxes(0, 1)  # (n_chunks, rows, chunk, D)
    ts = ts.reshape(rows, -1, chunk).swapaxes(0, 1)

    def chunk_nll(args):
      xc, tc = args
      logits = model.head(xc).astype(jnp.float32)  # (rows, chunk, V): the only logits alive at a time
      shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
      lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
      return lse - jnp.take_along_axis(shifted, tc[..., None], axis=-1)[..., 0]

    nll = jax.lax.map(chunk_nll, (xs, ts))  # (n_chunks, rows, chunk)
    return nll.swapaxes(0, 1).reshape(rows, -1)[:, :n].sum(axis=1)

  return jax.lax.map(micro, ids.reshape(B // rows, rows, T)).reshape(B)


def perplexity(model, ids: np.ndarray, seqlen: int, batch_size: int = 8) -> dict[str, Any]:
  """GPTQ-protocol perplexity of a causal LM over a token stream; {"perplexity", "nll", "tokens", "windows"}.

  `tokens` counts the scored tokens, windows · (seqlen − 1). Memory stays at the weights plus one micro-batch's
  activations (module docstring); `batch_size` windows are dispatched per step.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be at least 1.")
  w = windows(np.asarray(ids), seqlen)
  total = 0.0
  for i in range(0, len(w), batch_size):
    batch = w[i:i + batch_size]
    rows, chunk = plan(model, len(batch), seqlen)
    total += float(np.sum(np.asarray(window_nll(model, jnp.asarray(batch), rows, chunk), np.float64)))
  tokens = w.shape[0] * (seqlen - 1)
  nll = total / tokens
  return {"perplexity": float(np.exp(nll)), "nll": nll, "tokens": tokens, "windows": int(w.shape[0])}


# ------------------------------------------------------------------------------------------------ top-1


@functools.partial(jax.jit)
def _predict(model, pixel_values):
  return jnp.argmax(model(pixel_values), axis=-1)


def top1(model, images: np.ndarray, labels: np.ndarray, preprocessor_config: Any,
         batch_size: int = 128) -> dict[str, Any]:
  """Top-1 accuracy of a classifier; images are preprocessed with `deit.preprocess` and the model's config."""
  from gilora_jax.models import deit  # pylint: disable=import-outside-toplevel
  pixels = deit.preprocess(images, preprocessor_config)
  correct = 0
  for i in range(0, len(pixels), batch_size):
    correct += int(np.sum(np.asarray(_predict(model, jnp.asarray(pixels[i:i + batch_size]))) ==
                          labels[i:i + batch_size]))
  return {"top1": correct / len(labels), "images": int(len(labels))}
