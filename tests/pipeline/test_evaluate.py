"""Evaluation: perplexity against transformers on the same windows, windowing, the chunked NLL."""
import os

import numpy as np
import pytest

from gilora_jax.pipeline import data, evaluate
from gilora_jax import load_model

TORCH_REASON = "PyTorch CPU is the reference for the perplexity parity test (pip install -e .[test])"


def test_perplexity_matches_transformers(lm_folder):
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  from transformers import AutoTokenizer, Qwen3ForCausalLM  # pylint: disable=import-outside-toplevel
  tok = AutoTokenizer.from_pretrained(lm_folder)
  with open(os.path.join(lm_folder, "eval.txt"), encoding="utf-8") as f:
    ids = data.tokenize(tok, f.read())
  seqlen = 128
  ours = evaluate.perplexity(load_model(lm_folder), ids, seqlen, batch_size=4)
  # The GPTQ reference loop (llama_eval): each window scored alone, loss · seqlen summed, / (nsamples · seqlen).
  pt = Qwen3ForCausalLM.from_pretrained(lm_folder, dtype=torch.float32).eval()
  w = evaluate.windows(ids, seqlen)
  nlls = []
  with torch.no_grad():
    for row in w:
      x = torch.as_tensor(row[None].astype(np.int64))
      nlls.append(pt(x, labels=x).loss.double() * seqlen)
  ref = float(torch.exp(torch.stack(nlls).sum() / (len(w) * seqlen)))
  assert ours["windows"] == len(w) == len(ids) // seqlen and ours["tokens"] == len(w) * (seqlen - 1)
  assert ours["perplexity"] == pytest.approx(ref, rel=1e-5)


def test_chunked_nll_equals_the_full_logits_one(lm_folder, monkeypatch):
  """The NLL from logits chunks and micro-batches equals log_softmax over the whole (B, T, V) logits."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import qwen3  # pylint: disable=import-outside-toplevel
  model = load_model(lm_folder)
  ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 33)).astype(np.int32)
  logits = np.asarray(qwen3.forward(model, ids), np.float64)[:, :-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0].sum(1)
  for rows, chunk in ((4, 32), (1, 5), (2, 7), (4, 1)):
    got = np.asarray(evaluate.window_nll(model, jnp.asarray(ids), rows, chunk))
    np.testing.assert_allclose(got, want, rtol=2e-6)
  # The planner keeps a chunk of logits and a micro-batch's attention scores within their budgets.
  monkeypatch.setattr(evaluate, "LOGITS_BUDGET", 4 * 101 * 10)
  monkeypatch.setattr(evaluate, "SCORES_BUDGET", 2 * 4 * 33 * 33)
  rows, chunk = evaluate.plan(model, 4, 33)
  assert (rows, chunk) == (2, 20)
  full = evaluate.perplexity(model, ids.reshape(-1), 33, batch_size=4)
  assert full["nll"] == pytest.approx(float(want.sum()) / (4 * 32), rel=2e-6)


def test_windows_drop_the_tail_and_reject_short_text():
  w = evaluate.windows(np.arange(10), 4)
  np.testing.assert_array_equal(w, [[0, 1, 2, 3], [4, 5, 6, 7]])
  with pytest.raises(ValueError, match="fewer than one window"):
    evaluate.windows(np.arange(3), 4)
