"""The built-in models ship, load offline through both our ports and transformers, and are genuinely trained."""
import json

import jax
import numpy as np
import optax
import pytest

from gilora_jax import assets

LM, VIT = assets.QWEN3_SHAKESPEARE, assets.DEIT_DIGITS
WINDOW = 256


def _window_ppl(model, ids: np.ndarray, n_windows: int) -> float:
  """exp(mean NLL) over the first `n_windows` non-overlapping WINDOW-token windows (the model card's protocol)."""
  x = ids[: n_windows * WINDOW].reshape(n_windows, WINDOW)
  logits = jax.jit(lambda m, x: m(x))(model, x)
  return float(np.exp(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()))


@pytest.fixture(scope="module")
def lm():
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  return load_model(LM), AutoTokenizer.from_pretrained(LM)


def test_files_are_present_and_small():
  for folder, names in ((LM, ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                              "eval.txt", "calib.txt", "README.md")),
                        (VIT, ("config.json", "model.safetensors", "preprocessor_config.json", "digits_test.npz",
                               "README.md"))):
    for name in names:
      assert (folder / name).is_file(), folder / name
  total = sum(p.stat().st_size for p in assets.ASSETS.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
  assert total < 6 * 2**20, f"assets are {total / 2**20:.2f} MiB"


def test_tokenizer_round_trips_and_has_eos(lm):
  _, tok = lm
  text = assets.lm_text("eval")[:5000] + "Thou art  \u00e9 \u65e5\u672c\n"
  assert tok.decode(tok(text)["input_ids"]) == text
  assert tok.eos_token == "<|endoftext|>"
  assert tok.eos_token_id == json.loads((LM / "config.json").read_text())["eos_token_id"]


def test_lm_is_trained_and_eval_is_held_out(lm):
  model, tok = lm
  ids = {s: np.asarray(tok(assets.lm_text(s))["input_ids"], np.int32) for s in ("eval", "calib")}
  ppl = {s: _window_ppl(model, v, 16) for s, v in ids.items()}
  vocab = json.loads((LM / "config.json").read_text())["vocab_size"]
  assert ppl["eval"] < vocab / 10, ppl            # far from uniform (ppl = vocab)
  assert ppl["calib"] < ppl["eval"], ppl          # calib comes from training works, eval (Hamlet) does not
  assert "Hamlet" in assets.lm_text("eval")[:200] or "HAMLET" in assets.lm_text("eval")[:200]


def test_lm_matches_transformers(lm):
  torch = pytest.importorskip("torch")
  from transformers import Qwen3ForCausalLM  # pylint: disable=import-outside-toplevel
  model, tok = lm
  ids = np.asarray(tok(assets.lm_text("calib")[:2000])["input_ids"][:64], np.int32)[None]
  ref = Qwen3ForCausalLM.from_pretrained(LM, dtype=torch.float32).eval()
  with torch.no_grad():
    want = ref(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(ids)), want, atol=1e-4, rtol=1e-4)


def test_deit_classifies_held_out_digits():
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import deit  # pylint: disable=import-outside-toplevel
  images, labels = assets.digits("test")
  assert images.shape == (359, 8, 8, 3) and images.dtype == np.uint8
  model = load_model(VIT)
  pred = np.asarray(jax.jit(lambda m, x: m(x))(model, deit.preprocess(images, VIT))).argmax(-1)
  assert (pred == labels).mean() > 0.9
  calib_images, calib_labels = assets.digits("calib")
  assert calib_images.shape == (128, 8, 8, 3) and calib_labels.shape == (128,)
