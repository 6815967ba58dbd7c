"""The built-in models and data, so that gilora works with no downloads (see README.md beside this file).

* `QWEN3_SHAKESPEARE`: a 1.2M-parameter Qwen3-architecture causal LM trained by this project on public-domain
  Shakespeare, as a local HF folder (config.json, model.safetensors, tokenizer) plus `calib.txt` (a slice of
  the training works) and `eval.txt` (Hamlet, held out from training).
* `DEIT_DIGITS`: a small DeiT trained on scikit-learn's 8x8 digits, as a local HF folder plus
  `digits_test.npz` (the held-out test split and a calibration slice of the train split).

Both folders load with `gilora_jax.load_model(folder)` and with `transformers`' `from_pretrained(folder)`.
"""
from __future__ import annotations

import pathlib

import numpy as np

ASSETS = pathlib.Path(__file__).resolve().parent
QWEN3_SHAKESPEARE = ASSETS / "qwen3-shakespeare"
DEIT_DIGITS = ASSETS / "deit-digits"


def lm_text(split: str) -> str:
  """The built-in LM's text: "calib" (~64 KB of training works) or "eval" (Hamlet, never seen in training)."""
  if split not in ("calib", "eval"):
    raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
  return (QWEN3_SHAKESPEARE / f"{split}.txt").read_text(encoding="utf-8")


def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, 8, 8, 3), labels int32 (N,)) of the built-in DeiT: "test" (359) or "calib" (128, train).

  Feed the images to `gilora_jax.models.deit.preprocess(images, DEIT_DIGITS)` to get its pixel_values.
  """
  if split not in ("calib", "test"):
    raise ValueError(f"split must be 'calib' or 'test', got {split!r}")
  with np.load(DEIT_DIGITS / "digits_test.npz") as z:
    images, labels = (z["images"], z["labels"]) if split == "test" else (z["calib_images"], z["calib_labels"])
  return np.repeat(images[..., None], 3, axis=-1), labels.astype(np.int32)
