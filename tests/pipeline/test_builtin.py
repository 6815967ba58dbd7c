"""The built-in Shakespeare LM at 3 bits: the methods rank as the papers predict, on held-out Hamlet."""
import pytest

from gilora_jax import cli


@pytest.mark.slow
def test_builtin_lm_perplexity_ordering():
  lm, _ = cli._builtin_folders()  # pylint: disable=protected-access
  if lm is None:
    pytest.skip("the built-in LM is not in this checkout (gilora_jax/assets/qwen3-shakespeare lands from `assets`)")
  rows = cli.builtin_comparison(lm, None, bits=3, rank=16, nsamples=32, seqlen=256, eval_seqlen=256,
                                protocol="quantized", seed=0, runs=cli.BUILTIN_RUNS[:4])
  ppl = {r["label"]: r["perplexity"] for r in rows}
  assert ppl["float"] < ppl["gilora"] < ppl["gptq+olrc"] < ppl["gptq"] < ppl["rtn"], ppl
