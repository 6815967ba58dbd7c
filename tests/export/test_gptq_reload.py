"""The GPTQ export's reload check: transformers + optimum + gptqmodel, run by the interpreter of a separate
environment (their releases need a newer torch than the test environment's pin), loads the folder and its logits,
with and without the peft adapter, must equal our model's with the written values.

The reload itself runs only where ``GILORA_GPTQ_PYTHON`` names such an interpreter (README: "the GPTQ reload
environment"); CI has none, so there it is skipped, and the refusals below (which need no such environment) run.
"""
import os
import sys

import pytest

from gilora_jax import cli
from gilora_jax import export as ex
from gilora_jax.export import check as check_lib

from .conftest import tiny_lm

GPTQ_PYTHON = os.environ.get(check_lib.GPTQ_PYTHON_ENV)


@pytest.mark.slow
@pytest.mark.skipif(not GPTQ_PYTHON, reason=f"set {check_lib.GPTQ_PYTHON_ENV} to the python of an environment with "
                    f"gptqmodel + optimum to run the GPTQ reload")
@pytest.mark.parametrize("bits, symmetric, zero_format", [(4, True, "gptq"), (3, False, "gptq_v2"),
                                                         (2, False, "gptq_v2"), (8, False, "gptq_v2")])
def test_transformers_with_gptqmodel_reloads_our_gptq_folder(tmp_path, bits, symmetric, zero_format):
  model = tiny_lm(bits=bits, symmetric=symmetric)
  s = ex.export(model, tmp_path / "q", format="gptq", gptq_python=GPTQ_PYTHON)
  assert s["gptq_format"] == zero_format
  line = s["check"][1]
  assert line.startswith(f"gptq reload ({GPTQ_PYTHON}") and "base: max|Δ|" in line and "base + adapter" in line, line


def test_a_gptq_reload_interpreter_without_the_packages_is_one_clear_line(tmp_path, capsys):
  """This environment has no gptqmodel: pointing the check at it fails the export, naming what to install, and
  leaves nothing behind; an interpreter that does not exist is refused before anything is written."""
  model = tiny_lm(bits=4, symmetric=True)
  with pytest.raises(check_lib.ExportCheckError, match=r"lacks the GPTQ reload's packages \(missing: .*gptqmodel\); "
                     r"install them there: python3 -m venv gptq-env"):
    ex.export(model, tmp_path / "q", format="gptq", gptq_python=sys.executable)
  assert not os.path.exists(tmp_path / "q") and not [p for p in os.listdir(tmp_path) if p.startswith(".q.tmp")]
  with pytest.raises(ValueError, match="--gptq-python /nonexistent/python: no such interpreter"):
    ex.export(model, tmp_path / "q", format="gptq", gptq_python="/nonexistent/python")
  assert not os.path.exists(tmp_path / "q")
  # without it (and without the variable) the GPTQ check is the decode alone, as before
  env = os.environ.pop(check_lib.GPTQ_PYTHON_ENV, None)
  try:
    s = ex.export(model, tmp_path / "q", format="gptq")
  finally:
    if env is not None:
      os.environ[check_lib.GPTQ_PYTHON_ENV] = env
  assert s["check"] == ["decode: every code, zero, scale and factor bit-identical"]


def test_the_cli_passes_gptq_python_on(checkpoint_dir, tmp_path, capsys):
  rc = cli.main(["export", checkpoint_dir, "--format", "gptq", "--gptq-python", "/nonexistent/python", "--to",
                 str(tmp_path / "g")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "--gptq-python /nonexistent/python: no such interpreter" in err[0]


@pytest.fixture
def checkpoint_dir(tmp_path):
  from .conftest import save_checkpoint  # pylint: disable=import-outside-toplevel
  return save_checkpoint(tiny_lm(bits=4, symmetric=True), tmp_path / "ckpt")
