"""llama.ModelConfig against transformers 5.23's config classes: what a config.json leaves out resolves to each
family's own default, the top-level/rope-dict precedence of llama3's original context, and the
use_sliding_window check."""
import dataclasses
import json
import os

import numpy as np
import pytest

from gilora_jax import load_model
from gilora_jax.models import llama

CONFIG_CLS = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
              "Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config"}
# 64 heads: every family's default kv-head count (Llama: heads, Mistral 8, Qwen 32) divides them and differs; a given
# head_dim (16) other than hidden / heads (8), and a window, so that dropping each key changes the resolved value.
BASE = dict(vocab_size=64, hidden_size=512, intermediate_size=128, num_hidden_layers=2, num_attention_heads=64,
            num_key_value_heads=4, head_dim=16, max_position_embeddings=512, sliding_window=100, bos_token_id=5,
            eos_token_id=6, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
# transformers (and so torch, the parity tests' reference) is the reference here; skip where it is not installed.
pytestmark = pytest.mark.usefixtures("torch")
LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _transformers_config(arch: str, hf: dict):
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  return getattr(transformers, CONFIG_CLS[arch])(**{k: v for k, v in hf.items() if k != "model_type"})


def _ours(arch: str, hf: dict) -> llama.ModelConfig:
  return llama.ModelConfig.from_hf_config({**hf, "model_type": llama.FAMILY[arch].model_type})


def _resolved(cfg) -> dict:
  """What the model is built with, read the way transformers' modeling code reads its config."""
  if isinstance(cfg, llama.ModelConfig):
    return dict(num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.resolved_head_dim,
                max_position_embeddings=cfg.max_position_embeddings, sliding_window=cfg.sliding_window,
                rope_theta=cfg.rope_theta, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                original_max_position_embeddings=cfg.original_max_position_embeddings
                if cfg.rope_type == "llama3" else None)
  eos = cfg.eos_token_id
  return dict(num_key_value_heads=cfg.num_key_value_heads,
              head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
              max_position_embeddings=cfg.max_position_embeddings,
              sliding_window=None if cfg.model_type == "llama" else cfg.sliding_window,  # LlamaModel reads none
              rope_theta=cfg.rope_parameters["rope_theta"], bos_token_id=cfg.bos_token_id,
              eos_token_id=() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
              original_max_position_embeddings=cfg.rope_parameters.get("original_max_position_embeddings"))


def _drop(hf: dict, key: str) -> dict:
  hf = {k: v for k, v in hf.items() if k != key}
  if key == "rope_theta":
    hf["rope_parameters"] = {k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"}
  return hf


@pytest.mark.parametrize("arch", list(CONFIG_CLS))
@pytest.mark.parametrize("key", ["num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
                                 "rope_theta", "bos_token_id", "eos_token_id"])
def test_a_missing_key_resolves_to_the_familys_transformers_default(arch, key):
  hf = _drop(BASE, key)
  assert _resolved(_ours(arch, hf)) == _resolved(_transformers_config(arch, hf))


@pytest.mark.parametrize("arch", list(CONFIG_CLS))
@pytest.mark.parametrize("key", ["num_key_value_heads", "head_dim", "sliding_window"])
def test_a_null_key_resolves_as_transformers_does(arch, key):
  hf = {**BASE, key: None}
  if arch == "MistralForCausalLM" and key == "num_key_value_heads" or arch == "Qwen3ForCausalLM" and key == "head_dim":
    pytest.skip("transformers refuses this null (a typed field)")
  assert _resolved(_ours(arch, hf)) == _resolved(_transformers_config(arch, hf))


@pytest.mark.parametrize("arch", list(CONFIG_CLS))
@pytest.mark.parametrize("layout", ["v5", "v4"])
@pytest.mark.parametrize("top,in_rope,max_pos", [
    (None, None, None), (None, None, 1024), (256, None, 1024), (None, 128, 1024), (256, 128, 1024)])
def test_llama3_original_context_resolves_as_transformers_does(arch, layout, top, in_rope, max_pos):
  """In 5.23 a top-level original_max_position_embeddings is set on the config only after the RoPE parameters
  are standardised, so it never reaches them (for these four classes): the rope dict's value, else
  max_position_embeddings (the family's default when that is missing too)."""
  rope = {**LLAMA3, **({} if in_rope is None else {"original_max_position_embeddings": in_rope})}
  hf = {k: v for k, v in BASE.items() if k not in ("rope_parameters", "max_position_embeddings")}
  hf.update({} if max_pos is None else {"max_position_embeddings": max_pos},
            **({} if top is None else {"original_max_position_embeddings": top}))
  if layout == "v5":
    hf["rope_parameters"] = rope
  else:
    hf.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
  assert _resolved(_ours(arch, hf)) == _resolved(_transformers_config(arch, hf))


@pytest.mark.parametrize("config_cls,overrides,drop", [
    ("Qwen3Config", dict(head_dim=128), "head_dim"),  # Qwen3's default head_dim is 128, not hidden / heads
    ("MistralConfig", dict(num_attention_heads=16, num_key_value_heads=8), "num_key_value_heads"),  # Mistral's 8
    ("LlamaConfig", dict(max_position_embeddings=2048, head_dim=32, rope_parameters=dict(LLAMA3)),
     "max_position_embeddings"),  # Llama's 2048 is also llama3 RoPE's original context, so the frequencies
])
def test_a_folder_without_the_key_gives_transformers_logits(torch, tmp_path, rng, config_cls, overrides, drop):
  """transformers writes every resolved key into config.json; delete one and load the folder both ways."""
  import transformers  # pylint: disable=import-outside-toplevel
  kw = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128)
  torch.manual_seed(0)
  pt = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(**{**kw, **overrides}))
  with torch.no_grad():
    for p in pt.parameters():
      p.add_(0.1 * torch.randn(p.shape))
  pt.save_pretrained(str(tmp_path))
  path = os.path.join(tmp_path, "config.json")
  with open(path, encoding="utf-8") as f:
    hf = json.load(f)
  hf.pop(drop)
  if drop == "max_position_embeddings":
    hf["rope_parameters"].pop("original_max_position_embeddings")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(hf, f)
  pt = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert getattr(pt.config, drop) == overrides.get(drop, kw.get(drop))  # the default is the value it was built with
  ids = rng.integers(0, 101, (1, 600 if drop == "max_position_embeddings" else 9))
  with torch.no_grad():
    ref = pt(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(llama.forward(load_model(str(tmp_path)), ids)), ref, atol=1e-4, rtol=0)

@pytest.mark.parametrize("arch", list(CONFIG_CLS))
@pytest.mark.parametrize("max_window_layers", [0, 1, 2])
def test_use_sliding_window_is_refused_only_where_transformers_slides_a_layer(arch, max_window_layers):
  """Llama and Mistral have no such key (transformers ignores it); Qwen2/Qwen3 slide layers >= max_window_layers."""
  hf = {**BASE, "use_sliding_window": True, "max_window_layers": max_window_layers}
  ref = _transformers_config(arch, hf)
  slides = "sliding_attention" in (getattr(ref, "layer_types", None) or ())
  if slides:
    with pytest.raises(ValueError, match=f"use_sliding_window=true with sliding layers .* not supported for {arch}"):
      _ours(arch, hf)
  else:
    assert _resolved(_ours(arch, hf)) == _resolved(ref) | (
        {"sliding_window": None} if llama.FAMILY[arch].layer_windows else {})  # Qwen: no layer reads the window
  assert slides == (llama.FAMILY[arch].layer_windows and max_window_layers < 2)


SMALL = dict(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1)


@pytest.mark.parametrize("arch", list(CONFIG_CLS))
def test_fields_keep_what_was_given_so_replace_recomputes_the_rest(arch):
  fam = llama.FAMILY[arch]
  cfg = llama.ModelConfig(**SMALL, architecture=arch, qk_norm=fam.qk_norm, qkv_bias=fam.qkv_bias, rope_type="llama3",
                          rope_factor=8.0, max_position_embeddings=64)
  assert cfg.head_dim is None and cfg.rope_original_max_position_embeddings is None
  wider = dataclasses.replace(cfg, hidden_size=32, max_position_embeddings=128)
  assert wider.resolved_head_dim == (128 if arch == "Qwen3ForCausalLM" else 16)  # Qwen3Config's default: 128
  assert wider.original_max_position_embeddings == 128
  given = dataclasses.replace(cfg, head_dim=4, rope_original_max_position_embeddings=32)
  assert dataclasses.replace(given, hidden_size=32).resolved_head_dim == 4
  assert dataclasses.replace(given, max_position_embeddings=128).original_max_position_embeddings == 32


@pytest.mark.parametrize("arch", list(CONFIG_CLS))
@pytest.mark.parametrize("rope", [dict(), dict(rope_type="linear", rope_factor=2.0), dict(
    rope_type="llama3", rope_factor=8.0), dict(rope_type="llama3", rope_factor=8.0, head_dim=4,
                                               rope_original_max_position_embeddings=32)])
def test_to_hf_config_and_back_is_the_same_config(arch, rope):
  """Also what transformers makes of the dict: the same resolved values."""
  fam = llama.FAMILY[arch]
  cfg = llama.ModelConfig(**SMALL, architecture=arch, qk_norm=fam.qk_norm, qkv_bias=fam.qkv_bias,
                          max_position_embeddings=64, sliding_window=5 if fam.sliding_window else None, **rope)
  hf = cfg.to_hf_config()
  assert llama.ModelConfig.from_hf_config(hf) == cfg
  assert _resolved(cfg) == _resolved(_transformers_config(arch, hf))
