"""Session fixtures: tiny HF folders (see tiny.py)."""
import pytest

from .tiny import make_lm, make_vit


@pytest.fixture(scope="session")
def lm_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tiny_lm"))
  make_lm(folder)
  return folder


@pytest.fixture(scope="session")
def vit_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tiny_vit"))
  make_vit(folder)
  return folder
