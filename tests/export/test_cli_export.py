"""`gilora export OUT --format ... --to DIR` on a gilora checkpoint, then `gilora generate` on what it wrote."""
import json
import os

import compressed_tensors  # noqa: F401  pylint: disable=unused-import  (the test extra pins it: missing must fail)
import pytest

from gilora_jax import cli

from .conftest import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(qlm, lm_folder, tmp_path_factory):
  """A quantized checkpoint as `gilora quantize` leaves it (its side files, `meta["source"]`), without a run."""
  return save_checkpoint(qlm, tmp_path_factory.mktemp("cli") / "q", source=lm_folder)


def _run(capsys, *argv):
  rc = cli.main(list(argv))
  cap = capsys.readouterr()
  return rc, [json.loads(x) for x in cap.out.splitlines() if x.startswith("{")], cap.err


def test_export_then_generate_from_the_exported_folder(checkpoint, tmp_path, capsys):
  to = str(tmp_path / "ct")
  rc, lines, err = _run(capsys, "export", checkpoint, "--format", "ct", "--to", to)
  assert rc == 0, err
  assert lines[0]["out"] == to and lines[0]["format"] == "ct" and len(lines[0]["check"]) == 2
  assert os.path.isfile(os.path.join(to, "tokenizer.json")) and os.path.isdir(os.path.join(to, "adapter"))
  rc, gen, err = _run(capsys, "generate", "--model", to, "--prompt", "the king", "--max-new-tokens", "3")
  assert rc == 0, err
  rc, ref, err = _run(capsys, "generate", "--model", checkpoint, "--prompt", "the king", "--max-new-tokens", "3")
  assert gen[0]["completion"] == ref[0]["completion"]  # float32 export: the same numbers, the same greedy tokens


def test_export_errors_are_one_line(checkpoint, tmp_path, capsys):
  rc, _, err = _run(capsys, "export", checkpoint, "--format", "ct", "--merge-adapter", "--to", str(tmp_path / "x"))
  assert rc == 2 and err.startswith("gilora: error: merge_adapter: a ct base is quantized") and len(err.splitlines()) == 1
  rc, _, err = _run(capsys, "export", checkpoint, "--format", "gptq", "--gptq-format", "v1", "--to",
                    str(tmp_path / "x"), "--no-check")
  assert rc == 2 and "zero points of this asymmetric model are 0" in err
  assert not os.path.exists(tmp_path / "x")
