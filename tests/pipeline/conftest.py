"""Fixtures of the pipeline tests (the tiny HF folders are session fixtures in tests/conftest.py)."""
import pytest

from .tiny import random_model as _random_model


@pytest.fixture
def random_model():
  """`random_model(model_cls, cfg, seed=0)`: a model with random weights, built without XLA compilations."""
  return _random_model
