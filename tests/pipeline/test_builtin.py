"""The built-in Shakespeare LM at 3 bits: the methods rank as the papers predict, on held-out Hamlet."""
import pytest

from gilora_jax.pipeline import apply, run


@pytest.mark.slow
def test_builtin_lm_perplexity_ordering():
  lm, _ = run.builtin_folders()
  if lm is None:
    pytest.skip("the built-in LM is not in this checkout (gilora_jax/assets/qwen3-shakespeare lands from `assets`)")
  rows = run.builtin_comparison(lm, None, config=apply.make_config(bits=3, rank=16), nsamples=32, seqlen=256,
                                eval_seqlen=256, runs=run.BUILTIN_RUNS[:4])
  ppl = {r["label"]: r["perplexity"] for r in rows}
  assert ppl["float"] < ppl["gilora"] < ppl["gptq+olrc"] < ppl["gptq"] < ppl["rtn"], ppl
