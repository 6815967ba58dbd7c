"""The Llama-family port vs transformers' Llama/Qwen2/Mistral ForCausalLM on tiny random checkpoints (float32, CPU).

Qwen3 (the same port with q/k norms) is tests/models/test_qwen3.py; here every other switch of llama.py is covered
by one variant (tests/models/conftest.py LLAMA_VARIANTS).
"""
import dataclasses
import functools
import os

import jax
import numpy as np
import pytest
from flax import nnx

from gilora_jax import load_model
from gilora_jax.models import ARCHITECTURES, convert, llama, qwen3

VARIANTS = ["llama3_tied", "llama_linear_bias", "qwen2_tied", "mistral_window"]
LINEARS = [path for paths in llama.QUANT_SITES.values() for path in paths]

_run = jax.jit(lambda module, method, *args: getattr(module, method)(*args), static_argnums=1)


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_taps_match_transformers(hf_llama, capture, torch, variant, rng):
  pt, folder = hf_llama(variant)
  model = load_model(folder)
  assert type(model) is llama.Llama and model.config.architecture == pt.config.architectures[0]
  ids = rng.integers(0, pt.config.vocab_size, (2, 9))  # 9 > Mistral's window of 3
  with capture(pt, ["model.layers.0"] + [f"model.layers.0.{p}" for p in LINEARS]) as cap, torch.no_grad():
    ref = pt(torch.tensor(ids)).logits.numpy()
  assert _max_abs(llama.forward(model, ids), ref) <= 1e-4
  x = _run(model, "embed", ids)  # the calibration path: embed -> blocks one at a time -> head
  for block in model.layers:
    x, _ = _run(block, "__call__", x)
  assert _max_abs(_run(model, "head", x), ref) <= 1e-4
  _, taps = _run(model.layers[0], "__call__", cap.data["model.layers.0"][0])
  for site, paths in llama.QUANT_SITES.items():
    for path in paths:
      linear = functools.reduce(getattr, path.split("."), model.layers[0])
      hf_linear = functools.reduce(getattr, path.split("."), pt.model.layers[0])
      assert isinstance(linear, nnx.Linear) and (linear.bias is None) == (hf_linear.bias is None), path
      assert _max_abs(taps[site], cap.data[f"model.layers.0.{path}"][0]) <= 1e-5, (site, path)


@pytest.mark.parametrize("variant", ["llama3_tied", "mistral_window"])
def test_greedy_generate_matches_transformers(hf_llama, torch, variant, rng):
  """Left-padded batch, 10 new tokens: the prefill and the cached decode steps (Mistral: past its window)."""
  pt, folder = hf_llama(variant)
  model = load_model(folder)
  ids = rng.integers(1, pt.config.vocab_size, (2, 6))
  ids[1, :2] = 0
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  ours = llama.greedy_generate(model, ids, 10, attention_mask=mask, eos_token_id=(), pad_token_id=0)
  with torch.no_grad():
    ref = pt.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=10, do_sample=False,
                      eos_token_id=None, pad_token_id=0).numpy()
  np.testing.assert_array_equal(ours, ref)


def test_save_hf_writes_folders_transformers_loads_for_every_architecture(hf_llama, torch, tmp_path, rng):
  """Our config.json (rope_parameters, biases, window) and weights load into the same transformers model."""
  import transformers  # pylint: disable=import-outside-toplevel
  ids = torch.tensor(rng.integers(0, 11, (1, 7)))
  for variant in VARIANTS:
    pt, folder = hf_llama(variant)
    model = load_model(folder)
    assert llama.ModelConfig.from_hf_config(model.config.to_hf_config()) == model.config
    convert.save_hf(model, tmp_path / variant)
    back = getattr(transformers, model.config.architecture).from_pretrained(str(tmp_path / variant)).eval()
    assert dict(back.config.rope_parameters) == dict(pt.config.rope_parameters)
    with torch.no_grad():
      assert _max_abs(back(ids).logits, pt(ids).logits) == 0.0, variant


# Model-card parameter counts (billions), computed from one block scaled to all of them.
@pytest.mark.parametrize("preset,total", [
    ("llama3_2_1b", 1.236), ("llama3_2_3b", 3.213), ("llama3_1_8b", 8.030), ("smollm2_135m", 0.1345),
    ("smollm2_360m", 0.3618), ("smollm2_1_7b", 1.711), ("qwen2_5_0_5b", 0.494), ("qwen2_5_1_5b", 1.544),
    ("qwen2_5_7b", 7.616), ("mistral_7b_v0_1", 7.242), ("mistral_7b_v0_3", 7.248)])
def test_presets_have_the_model_card_parameter_counts(preset, total):
  cfg = getattr(llama.ModelConfig, preset)()
  one = nnx.eval_shape(lambda: llama.Llama(dataclasses.replace(cfg, num_hidden_layers=1), rngs=nnx.Rngs(0)))
  per_block = sum(x.size for x in jax.tree.leaves(nnx.state(one.layers[0])))
  n = (sum(x.size for x in jax.tree.leaves(nnx.state(one))) + (cfg.num_hidden_layers - 1) * per_block) / 1e9
  assert abs(n - total) < 0.002 * max(1, total), n
  assert llama.ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("preset", ["llama3_1_8b", "llama3_2_1b"])
def test_llama3_rope_frequencies_match_transformers(torch, preset):  # pylint: disable=unused-argument
  """At the published sizes (factor 8 / 32, context 8192), where the tiny parity variant cannot reach."""
  from transformers import LlamaConfig  # pylint: disable=import-outside-toplevel
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=import-outside-toplevel
  cfg = getattr(llama.ModelConfig, preset)()
  want, scaling = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**cfg.to_hf_config()))
  attn = nnx.eval_shape(lambda: llama.Attention(cfg, rngs=nnx.Rngs(0)))
  np.testing.assert_allclose(llama.rope_inv_freq(*attn.rope), want.numpy(), rtol=1e-6)
  assert scaling == 1.0


BASE = dict(model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, rope_theta=1e4)


@pytest.mark.parametrize("change,message", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     r"rope_type 'yarn' is not supported; supported: default, linear, llama3"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     r"rope_type 'dynamic' is not supported; supported: default, linear, llama3"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     r"rope_type 'llama3' needs \['low_freq_factor', 'high_freq_factor'\]"),
    (dict(hidden_size=9, num_attention_heads=2), r"hidden_size=9 is not divisible by num_attention_heads=2 and there "
                                                 r"is no head_dim; add the checkpoint's head_dim"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0),
     r"use_sliding_window=true with sliding layers \(1 of 1\) is not supported for Qwen2ForCausalLM"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    (dict(model_type="gpt2"), r"'gpt2' config .* not one of the Llama family"),
])
def test_bad_configs_are_one_line_errors_that_name_the_fix(change, message):
  with pytest.raises(ValueError, match=message) as e:
    llama.ModelConfig.from_hf_config({**BASE, **change})
  assert "\n" not in str(e.value)


def test_switches_are_checked_against_the_architecture():
  kw = dict(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)
  with pytest.raises(ValueError, match="LlamaForCausalLM has no q/k RMSNorm; set qk_norm=False"):
    llama.ModelConfig(**kw, qk_norm=True)
  with pytest.raises(ValueError, match="sliding_window=4 needs architecture MistralForCausalLM"):
    llama.ModelConfig(**kw, sliding_window=4)
  with pytest.raises(ValueError, match="Qwen2ForCausalLM always has q/k/v-only biases; set qkv_bias=True"):
    llama.ModelConfig(**kw, architecture="Qwen2ForCausalLM")
  with pytest.raises(ValueError, match="MistralForCausalLM has no mlp_bias switch; set mlp_bias=False"):
    llama.ModelConfig(**kw, architecture="MistralForCausalLM", mlp_bias=True)
  with pytest.raises(ValueError, match="hidden_size=9 is not divisible by num_attention_heads=2; set head_dim"):
    llama.ModelConfig(**{**kw, "hidden_size": 9})
  with pytest.raises(ValueError, match="rope_type 'ntk' is not supported"):
    llama.ModelConfig(**kw, rope_type="ntk")
  assert llama.ModelConfig(**kw).head_dim is None and llama.ModelConfig(**kw).resolved_head_dim == 4  # hidden / heads


def test_qwen3_keeps_its_names_defaults_and_old_checkpoint_configs():
  assert qwen3.ARCHITECTURE == "Qwen3ForCausalLM" and qwen3.QUANT_SITES is llama.QUANT_SITES
  assert issubclass(qwen3.Qwen3, llama.Llama) and issubclass(qwen3.ModelConfig, llama.ModelConfig)
  assert ARCHITECTURES["Qwen3ForCausalLM"].model_cls is qwen3.Qwen3
  assert {a: ARCHITECTURES[a].model_cls for a in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")} == \
      dict.fromkeys(("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"), llama.Llama)
  # A checkpoint's config as stored before the generalisation (dataclasses.asdict of the old Qwen3 ModelConfig).
  old = dict(vocab_size=13, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
             attention_bias=False, max_position_embeddings=64, bos_token_id=None, eos_token_id=(), pad_token_id=None,
             dtype="float32", param_dtype="float32")
  cfg = qwen3.ModelConfig(**old)
  assert cfg.architecture == "Qwen3ForCausalLM" and cfg.qk_norm and cfg.rope_type == "default"
  model = nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))
  assert model.layers[0].self_attn.q_norm is not None
  with pytest.raises(ValueError, match="'llama' config .* not a dense Qwen3"):
    qwen3.ModelConfig.from_hf_config(BASE)


@pytest.mark.parametrize("size", ["135m", "360m", "1_7b"])
def test_smollm2_presets_carry_their_own_special_tokens(size):
  """The base models end text with <|endoftext|> (id 0, also their bos); the Instruct ones with <|im_end|> (2),
  after <|im_start|> (1). Otherwise the two are the same model."""
  base = getattr(llama.ModelConfig, f"smollm2_{size}")()
  instruct = getattr(llama.ModelConfig, f"smollm2_{size}_instruct")()
  assert (base.bos_token_id, base.eos_token_id, base.pad_token_id) == (0, (0,), None)
  assert (instruct.bos_token_id, instruct.eos_token_id, instruct.pad_token_id) == (1, (2,), 2)
  assert dataclasses.replace(instruct, bos_token_id=0, eos_token_id=(0,), pad_token_id=None) == base


def test_smollm2_instruct_preset_is_the_converted_folders_config():
  """runs/smollm2-135m-instruct (experiments/smollm2.py, from the Instruct GGUF; not in git) where it exists."""
  folder = os.path.join(os.path.dirname(__file__), "..", "..", "runs", "smollm2-135m-instruct")
  if not os.path.exists(os.path.join(folder, "config.json")):
    pytest.skip("run experiments/smollm2.py to convert SmolLM2-135M-Instruct")
  cfg = llama.ModelConfig.from_hf_config(folder)
  assert cfg.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)  # GGUF stores it in float32
  assert dataclasses.replace(cfg, head_dim=None, rms_norm_eps=1e-5) == llama.ModelConfig.smollm2_135m_instruct()
