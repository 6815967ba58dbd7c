"""The `gilora quantize-layer` command: JSON line, output arrays, clear errors."""
import json
import re

import numpy as np
import pytest

from gilora_jax import cli
from tests.quant import problems


def test_quantize_layer_roundtrip(tmp_path, capsys):
  W, _, H = problems.layer(seed=0, d_in=64, d_out=32, n=300, decay=10)
  np.savez(tmp_path / "in.npz", W=W.astype(np.float32), H=H.astype(np.float32))
  rc = cli.main(["quantize-layer", str(tmp_path / "in.npz"), "--method", "gilora", "--bits", "3", "--rank", "4",
                 "--group-size", "16", "--loops", "1", "--out", str(tmp_path / "out" / "q.npz")])
  assert rc == 0
  rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0 < rec["rel_err"] < 1 and rec["seconds"] > 0 and rec["method"] == "gilora"
  with np.load(tmp_path / "out" / "q.npz") as z:
    assert z["codes"].dtype == np.uint8 and z["L"].shape == (64, 4) and z["R"].shape == (4, 32)
    E = W - z["Q"] - z["L"] @ z["R"]
    np.testing.assert_allclose(np.sum(E * (H @ E)) / np.sum(W * (H @ W)), rec["rel_err"], rtol=1e-3)


@pytest.mark.parametrize("content, match", [(None, "does not exist"), ({"W": np.ones((4, 4))}, "lacks \\['H'\\]"),
                                            ("garbage", "not a readable .npz")])
def test_quantize_layer_bad_input(tmp_path, capsys, content, match):
  path = tmp_path / "in.npz"
  if isinstance(content, dict):
    np.savez(path, **content)
  elif content == "garbage":
    path.write_bytes(b"not an npz")
  rc = cli.main(["quantize-layer", str(path), "--out", str(tmp_path / "o.npz")])
  assert rc == 2
  assert re.search(match, capsys.readouterr().err)


def test_quantize_layer_reports_validation_errors(tmp_path, capsys):
  np.savez(tmp_path / "in.npz", W=np.ones((8, 4), np.float32), H=np.eye(8, dtype=np.float32))
  rc = cli.main(["quantize-layer", str(tmp_path / "in.npz"), "--group-size", "3", "--out", str(tmp_path / "o.npz")])
  assert rc == 2 and "does not divide d_in=8" in capsys.readouterr().err


def test_quantize_layer_flags_and_out_suffix(tmp_path, capsys):
  """--sym, --act-order and --damp reach quantize_layer; an --out without .npz names the file actually written."""
  W, _, H = problems.layer(seed=1, d_in=64, d_out=16, n=300)
  np.savez(tmp_path / "in.npz", W=W.astype(np.float32), H=H.astype(np.float32))
  rc = cli.main(["quantize-layer", str(tmp_path / "in.npz"), "--method", "gptq", "--bits", "4", "--group-size", "16",
                 "--sym", "--act-order", "--damp", "0.05", "--out", str(tmp_path / "q")])
  assert rc == 0
  rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rec["out"] == str(tmp_path / "q.npz") and rec["damp"] == 0.05
  with np.load(rec["out"]) as z:
    np.testing.assert_array_equal(z["zeros"], 8.0)  # symmetric 4-bit grid: zero point (maxq + 1) / 2
    assert z["scales"].shape == (4, 16)
