"""Qwen3 port vs transformers' Qwen3ForCausalLM on tiny random checkpoints (float32, CPU)."""
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gilora_jax.models import qwen3
from gilora_jax import load_model

VARIANTS = ["gqa_tied", "mha_untied_bias"]  # tests/models/conftest.py QWEN3_VARIANTS


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# Eager NNX calls compile every primitive separately (seconds on a busy CPU); jit each submodule call instead.
_run = jax.jit(lambda module, method, *args: getattr(module, method)(*args), static_argnums=1)

LINEARS = [path for paths in qwen3.QUANT_SITES.values() for path in paths]


@pytest.mark.parametrize("variant", VARIANTS)
def test_submodules_and_logits_match_transformers(hf_qwen3, capture, torch, variant, rng):
  pt, folder = hf_qwen3(variant)
  model = load_model(folder)
  ids = rng.integers(0, pt.config.vocab_size, (2, 7))
  hooked = ["model.embed_tokens", "model.layers.0", "model.layers.0.self_attn", "model.layers.0.mlp",
            "model.layers.1"] + [f"model.layers.0.{p}" for p in LINEARS]
  with capture(pt, hooked) as cap, torch.no_grad():
    ref_logits = pt(torch.tensor(ids)).logits.numpy()
  d = cap.data
  b, t = ids.shape
  positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))

  assert _max_abs(_run(model, "embed", ids), d["model.embed_tokens"][1]) == 0.0
  attn = model.layers[0].self_attn
  attn_out, _, _ = _run(attn, "__call__", d["model.layers.0.self_attn"][0], positions, qwen3.causal_mask(b, t))
  assert _max_abs(attn_out, d["model.layers.0.self_attn"][1]) <= 1e-5
  mlp_out, _ = _run(model.layers[0].mlp, "__call__", d["model.layers.0.mlp"][0])
  assert _max_abs(mlp_out, d["model.layers.0.mlp"][1]) <= 1e-5
  layer_out, _ = _run(model.layers[1], "__call__", d["model.layers.1"][0])
  assert _max_abs(layer_out, d["model.layers.1"][1]) <= 1e-5
  assert _max_abs(qwen3.forward(model, ids), ref_logits) <= 1e-4
  # embed -> blocks one at a time -> head, as a calibration driver runs it, gives the same logits.
  x = _run(model, "embed", ids)
  for block in model.layers:
    x, _ = _run(block, "__call__", x)
  assert _max_abs(_run(model, "head", x), ref_logits) <= 1e-4

  # Every tap is exactly what HF's corresponding linears read, and every QUANT_SITES path resolves on the block.
  _, taps = _run(model.layers[0], "__call__", d["model.layers.0"][0])
  assert set(taps) == set(qwen3.QUANT_SITES)
  for site, paths in qwen3.QUANT_SITES.items():
    for path in paths:
      assert isinstance(functools.reduce(getattr, path.split("."), model.layers[0]), nnx.Linear)
      assert _max_abs(taps[site], d[f"model.layers.0.{path}"][0]) <= 1e-5, (site, path)


def _hf_generate(torch, pt, ids, mask, n, **kw):  # pylint: disable=redefined-outer-name
  with torch.no_grad():
    return pt.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n, do_sample=False,
                       **kw).numpy()


def test_greedy_generate_matches_transformers_and_compiles_decode_once(hf_qwen3, torch, rng, caplog):
  pt, folder = hf_qwen3("gqa_tied")
  model = load_model(folder)
  vocab = pt.config.vocab_size
  # Row 1 is two tokens shorter and left-padded, as HF expects for batched generation.
  ids = rng.integers(1, vocab, (2, 6))
  ids[1, :2] = 0
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  n = 12
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    ours = qwen3.greedy_generate(model, ids, n, attention_mask=mask, eos_token_id=(), pad_token_id=0)
  ref = _hf_generate(torch, pt, ids, mask, n, eos_token_id=None, pad_token_id=0)
  assert ref.shape == (2, 6 + n)
  np.testing.assert_array_equal(ours, ref)
  # 11 decode steps, at most one compilation: the slot index is traced and the cache has a fixed size.
  assert sum("Compiling jit(_decode_step)" in r.getMessage() for r in caplog.records) <= 1


def test_greedy_generate_stops_at_eos_and_pads_like_transformers(hf_qwen3, torch, rng):
  pt, folder = hf_qwen3("gqa_tied")
  model = load_model(folder)
  ids = rng.integers(1, 101, (2, 6))  # same shapes as above: the jitted prefill/decode are reused
  mask = np.ones_like(ids)
  free = qwen3.greedy_generate(model, ids, 12, eos_token_id=())
  eos = int(free[1, 6 + 3])  # row 1's 4th new token: row 1 finishes early, row 0 maybe not
  ours = qwen3.greedy_generate(model, ids, 12, eos_token_id=eos, pad_token_id=0)
  ref = _hf_generate(torch, pt, ids, mask, 12, eos_token_id=eos, pad_token_id=0)
  np.testing.assert_array_equal(ours, ref)
  first_eos = 6 + int(np.argmax(ours[1, 6:] == eos))
  assert first_eos < ours.shape[1] - 1 and (ours[1, first_eos + 1:] == 0).all()


def test_generate_text_through_a_local_tokenizer(hf_qwen3, torch, tmp_path):
  """Prompt in, text out, on the MHA/untied/biased variant (the batched test above covers GQA/tied)."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer, PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  pt, folder = hf_qwen3("mha_untied_bias")
  word_level = Tokenizer(models.WordLevel({f"w{i}": i for i in range(11)}, unk_token="w0"))
  word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="w0").save_pretrained(tmp_path)
  tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
  prompt = "w5 w7 w2 w3"
  text = qwen3.generate(load_model(folder), tokenizer, prompt, max_new_tokens=8)
  ids = np.asarray([[5, 7, 2, 3]])
  ref = _hf_generate(torch, pt, ids, np.ones_like(ids), 8, eos_token_id=None, pad_token_id=0)
  assert text == tokenizer.decode(ref[0, 4:].tolist(), skip_special_tokens=True)
  assert len(text.split()) == 8


def test_bfloat16_forward_is_close_to_float32(hf_qwen3, rng):
  _, folder = hf_qwen3("gqa_tied")
  f32, bf16 = load_model(folder), load_model(folder, dtype="bfloat16")
  assert bf16.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
  ids = rng.integers(0, 101, (2, 8))
  ref, out = qwen3.forward(f32, ids), qwen3.forward(bf16, ids)
  assert out.dtype == jnp.bfloat16
  assert _max_abs(out, ref) <= 0.03 * float(jnp.max(jnp.abs(ref)))


# Model-card parameter counts (billions): total and non-embedding (embedding + untied lm head excluded).
@pytest.mark.parametrize("preset,total,non_embedding", [
    ("qwen3_0_6b", 0.6, 0.44), ("qwen3_1_7b", 1.7, 1.4), ("qwen3_4b", 4.0, 3.6), ("qwen3_8b", 8.2, 6.95),
    ("qwen3_14b", 14.8, 13.2), ("qwen3_32b", 32.8, 31.2)])
def test_presets_have_the_model_card_parameter_counts(preset, total, non_embedding):
  cfg = getattr(qwen3.ModelConfig, preset)()
  # Build one block abstractly and scale it: tracing 28-64 blocks' initialisers would take seconds each.
  one = nnx.eval_shape(lambda: qwen3.Qwen3(dataclasses.replace(cfg, num_hidden_layers=1), rngs=nnx.Rngs(0)))
  per_block = sum(x.size for x in jax.tree.leaves(nnx.state(one.layers[0])))
  n = (sum(x.size for x in jax.tree.leaves(nnx.state(one))) + (cfg.num_hidden_layers - 1) * per_block) / 1e9
  embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2) / 1e9
  assert abs(n - total) < 0.051 and abs(n - embeddings - non_embedding) < 0.051, (n, n - embeddings)
  assert cfg.head_dim == 128 and cfg.rope_theta == 1e6


def test_config_reads_both_rope_theta_layouts_and_rejects_others():
  base = dict(model_type="qwen3", vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=4)
  assert qwen3.ModelConfig.from_hf_config({**base, "rope_theta": 5e6}).rope_theta == 5e6  # transformers 4.x
  v5 = {**base, "rope_theta": None, "rope_parameters": {"rope_theta": 2e4, "rope_type": "default"}}
  assert qwen3.ModelConfig.from_hf_config(v5).rope_theta == 2e4
  with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
    qwen3.ModelConfig.from_hf_config({**base, "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn"}})
  with pytest.raises(ValueError, match="'llama' config .* not a dense Qwen3"):
    qwen3.ModelConfig.from_hf_config({**base, "model_type": "llama", "rope_theta": 1e4})
