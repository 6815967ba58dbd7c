"""Tiny random HF checkpoints built at test time (no hub, no committed binaries), and PyTorch capture helpers.

torch is imported lazily so that the torch-free tests of this folder still run on a machine without it.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

TORCH_REASON = "PyTorch CPU is the reference for the parity tests (pip install -e .[test])"


def _perturb(pt_model, seed: int):
  """Adds noise to every parameter: norms start at 1/0 and tokens at 0, which would hide mapping bugs."""
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in pt_model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return pt_model


def _qwen3_config(**overrides):
  from transformers import Qwen3Config  # pylint: disable=import-outside-toplevel
  kw = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
            max_position_embeddings=128)
  kw.update(overrides)
  return Qwen3Config(**kw)


# name -> Qwen3Config overrides. head_dim * heads != hidden on purpose (catches the head_dim bug).
QWEN3_VARIANTS = {
    "gqa_tied": {},
    "mha_untied_bias": dict(vocab_size=11, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                            head_dim=16, rope_theta=1e4, tie_word_embeddings=False, attention_bias=True),
}

# name -> (transformers config class, overrides of the tiny Llama-family config), one per switch of llama.py:
# llama3 RoPE + tied + GQA + head_dim != hidden / heads; linear RoPE + q/k/v/o and MLP biases + untied + MHA;
# Qwen2's q/k/v-only bias; Mistral's sliding window (3 < the test sequences, so it cuts).
LLAMA_VARIANTS = {
    "llama3_tied": ("LlamaConfig", dict(head_dim=32, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_linear_bias": ("LlamaConfig", dict(vocab_size=11, num_key_value_heads=4, attention_bias=True,
                                              mlp_bias=True, rope_parameters=dict(rope_type="linear", rope_theta=1e4,
                                                                                  factor=4.0))),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rms_norm_eps=1e-6,
                                       rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "mistral_window": ("MistralConfig", dict(head_dim=32, sliding_window=3)),
}


def _llama_config(name: str):
  import transformers  # pylint: disable=import-outside-toplevel
  cls, overrides = LLAMA_VARIANTS[name]
  kw = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=128)
  return getattr(transformers, cls)(**{**kw, **overrides})


DEIT_VARIANTS = ("DeiTForImageClassificationWithTeacher", "DeiTForImageClassification", "ViTForImageClassification")


@pytest.fixture(scope="session")
def torch():
  """The torch module; tests that take this fixture skip (with the reason) where torch is not installed."""
  return pytest.importorskip("torch", reason=TORCH_REASON)


@pytest.fixture(scope="session")
def hf_qwen3(tmp_path_factory, torch):  # pylint: disable=redefined-outer-name
  """variant name -> (torch model in eval mode, folder it was saved to with save_pretrained)."""
  from transformers import Qwen3ForCausalLM  # pylint: disable=import-outside-toplevel
  cache = {}

  def get(name: str):
    if name not in cache:
      torch.manual_seed(0)
      pt = _perturb(Qwen3ForCausalLM(_qwen3_config(**QWEN3_VARIANTS[name])).eval(), seed=1)
      folder = str(tmp_path_factory.mktemp(f"qwen3_{name}"))
      pt.save_pretrained(folder)
      cache[name] = pt, folder
    return cache[name]
  return get


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory, torch):  # pylint: disable=redefined-outer-name
  """LLAMA_VARIANTS name -> (torch model in eval mode, folder it was saved to with save_pretrained)."""
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  cache = {}

  def get(name: str):
    if name not in cache:
      torch.manual_seed(0)
      pt = _perturb(AutoModelForCausalLM.from_config(_llama_config(name)).eval(), seed=1)
      folder = str(tmp_path_factory.mktemp(f"llama_{name}"))
      pt.save_pretrained(folder)
      cache[name] = pt, folder
    return cache[name]
  return get


@pytest.fixture(scope="session")
def hf_deit(tmp_path_factory, torch):  # pylint: disable=redefined-outer-name
  """architecture name -> (torch model in eval mode, folder saved with save_pretrained)."""
  import transformers  # pylint: disable=import-outside-toplevel
  cache = {}

  def get(arch: str):
    if arch not in cache:
      config_cls = transformers.ViTConfig if arch.startswith("ViT") else transformers.DeiTConfig
      cfg = config_cls(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                       image_size=32, patch_size=8, num_labels=10, layer_norm_eps=1e-6)
      torch.manual_seed(0)
      pt = _perturb(getattr(transformers, arch)(cfg).eval(), seed=2)
      folder = str(tmp_path_factory.mktemp(arch))
      pt.save_pretrained(folder)
      cache[arch] = pt, folder
    return cache[arch]
  return get


class Capture:
  """Records (first input, output) of named torch submodules during a forward pass, via forward hooks."""

  def __init__(self, pt_model, names):
    self.data, self._handles = {}, []
    modules = dict(pt_model.named_modules())
    for name in names:
      self._handles.append(modules[name].register_forward_hook(self._hook(name), with_kwargs=True))

  def _hook(self, name):
    def fn(module, args, kwargs, output):  # pylint: disable=unused-argument
      x = args[0] if args else kwargs["hidden_states"]
      out = output[0] if isinstance(output, tuple) else output
      self.data[name] = (x.detach().numpy(), out.detach().numpy())
    return fn

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for h in self._handles:
      h.remove()


def _random_model(model_cls, cfg, seed: int = 0):
  """`model_cls(cfg)` with N(0, 0.2²) weights drawn by NumPy: eager NNX init compiles an XLA kernel per weight
  shape (truncated normal, seconds each on a busy CPU), while `nnx.eval_shape` plus NumPy compiles nothing."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  pure = jax.tree.map(lambda s: jnp.asarray((0.2 * rng.standard_normal(s.shape)).astype(s.dtype)),
                      nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


@pytest.fixture
def random_model():
  """`random_model(model_cls, cfg, seed=0)`: a model with random weights, built without XLA compilations."""
  return _random_model


@pytest.fixture
def capture():
  """The `Capture` class, for tests to record torch submodule inputs/outputs."""
  return Capture


@pytest.fixture
def rewrite_config():
  """The `rewrite_config` helper."""
  return _rewrite_config


def _rewrite_config(folder: str, **changes):
  """Edits config.json in place (None deletes a key)."""
  path = os.path.join(folder, "config.json")
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  for k, v in changes.items():
    if v is None:
      cfg.pop(k, None)
    else:
      cfg[k] = v
  with open(path, "w", encoding="utf-8") as f:
    json.dump(cfg, f)

