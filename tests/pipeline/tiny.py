"""Tiny models and data for the pipeline tests, built at test time with NumPy (no hub, no torch needed).

* `make_lm(folder)`: a Qwen3 (hidden 64, 2 blocks by default) with random weights as a local HF folder (convert.save_hf),
  plus a character-level tokenizer (tokenizers WordLevel over bytes-as-chars) saved beside it and a text file.
* `make_vit(folder)`: a 2-block DeiT (32×32 images, patch 8) as a local HF folder with a preprocessor config.
"""
import json
import os
import string

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gilora_jax.models import convert, deit, qwen3

CHARS = string.printable  # 100 characters; id 100 is the EOS token


def random_model(model_cls, cfg, seed=0, scale=0.2):
  """`model_cls(cfg)` with N(0, scale²) weights drawn by NumPy (no XLA init kernels); norms stay at ones."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  flat = nnx.to_pure_dict(state)

  def fill(path, s):
    name = str(path[-1].key)
    if name == "scale":  # RMSNorm/LayerNorm weights near 1, as in a trained model
      return jnp.asarray((1 + 0.1 * rng.standard_normal(s.shape)).astype(s.dtype))
    return jnp.asarray((scale * rng.standard_normal(s.shape)).astype(s.dtype))
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, flat))
  return nnx.merge(graphdef, state)


def save_char_tokenizer(folder):
  """A character-level fast tokenizer (one id per printable character) that AutoTokenizer loads offline."""
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  vocab = {c: i for i, c in enumerate(CHARS)}
  vocab["<eos>"] = len(CHARS)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
  tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
  tok.decoder = decoders.Fuse()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>")
  fast.save_pretrained(folder)


def text(n_chars, seed=0):
  """Deterministic pseudo-English: random words from a small vocabulary, so the char LM sees repeated structure."""
  rng = np.random.default_rng(seed)
  words = ["the", "king", "queen", "lord", "thou", "art", "my", "good", "night", "and", "to", "be", "or", "not"]
  out, n = [], 0
  while n < n_chars:
    w = words[rng.integers(len(words))] + (".\n" if rng.random() < 0.1 else " ")
    out.append(w)
    n += len(w)
  return "".join(out)[:n_chars]


# Every linear of both tiny models is 64×64, so quantize_layer's jitted stages compile once for the whole suite.
LM_CONFIG = dict(vocab_size=len(CHARS) + 1, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=16, rope_theta=1e4, tie_word_embeddings=False,
                 max_position_embeddings=256, eos_token_id=(len(CHARS),))


def make_lm(folder, num_layers=2, seed=0, param_dtype="float32"):
  cfg = qwen3.ModelConfig(**{**LM_CONFIG, "num_hidden_layers": num_layers, "param_dtype": param_dtype})
  model = random_model(qwen3.Qwen3, cfg, seed=seed)
  convert.save_hf(model, folder)
  save_char_tokenizer(folder)
  with open(os.path.join(folder, "calib.txt"), "w", encoding="utf-8") as f:
    f.write(text(4000, seed=1))
  with open(os.path.join(folder, "eval.txt"), "w", encoding="utf-8") as f:
    f.write(text(3000, seed=2))
  return model


VIT_CONFIG = dict(architecture="DeiTForImageClassificationWithTeacher", hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8, num_labels=4,
                  layer_norm_eps=1e-6)


def make_vit(folder, seed=0):
  cfg = deit.ModelConfig(**VIT_CONFIG)
  model = random_model(deit.DeiT, cfg, seed=seed)
  convert.save_hf(model, folder)
  with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as f:
    json.dump({"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 3, "do_center_crop": False,
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
               "image_std": [0.5] * 3}, f)
  return model


