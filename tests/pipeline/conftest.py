"""Fixtures of the pipeline tests (the tiny HF folders are session fixtures in tests/conftest.py)."""
import numpy as np
import pytest

from gilora_jax.models import qwen3
from gilora_jax.pipeline import calib

from .tiny import LM_CONFIG
from .tiny import random_model as _random_model


@pytest.fixture
def random_model():
  """`random_model(model_cls, cfg, seed=0)`: a model with random weights, built without XLA compilations."""
  return _random_model


@pytest.fixture(scope="module")
def lm():
  """A 2-block random Qwen3 (the tiny LM config), built once per module."""
  return _random_model(qwen3.Qwen3, qwen3.ModelConfig(**LM_CONFIG), seed=3)


@pytest.fixture(scope="module")
def lm_calib():
  """Two calibration batches of 2 × 24 random token ids for `lm`."""
  ids = np.random.default_rng(5).integers(0, LM_CONFIG["vocab_size"], size=(4, 24)).astype(np.int32)
  return calib.batches(ids, 2)
