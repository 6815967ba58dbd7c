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


def test_every_flag_has_help_and_the_library_default():
  """One source for every default: each layer flag shows LayerConfig's default, quantize_layer's signature uses
  the same, and no flag of any command lacks a help text."""
  import argparse  # pylint: disable=import-outside-toplevel
  import inspect  # pylint: disable=import-outside-toplevel
  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  from gilora_jax import config  # pylint: disable=import-outside-toplevel
  parser = cli.build_parser()
  subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # pylint: disable=protected-access
  for name, sub in subs.choices.items():
    for action in sub._actions:  # pylint: disable=protected-access
      if action.dest != "help":
        assert action.help, (name, action.option_strings)
  quantize = subs.choices["quantize"]
  helps = {a.dest: a.help for a in quantize._actions}  # pylint: disable=protected-access
  for name in config.FIELDS:
    default = config.default(name)
    shown = ("on" if default else "off") if isinstance(default, bool) else "unset" if default is None else str(default)
    assert f"(default {shown}" in helps[name], (name, helps[name])
  assert "(default 32; the built-in comparison: 16)" in helps["rank"]
  signature = inspect.signature(gj.quantize_layer).parameters
  for name in ("method", "bits", "rank", "group_size", "symmetric", "loops", "damp", "act_order", "seed"):
    assert signature[name].default == config.default(name), name


def test_rules_reach_any_option(tmp_path):
  """--rule keys are the flat option names (hyphens allowed), typed like the flags."""
  rules = cli._parse_rules([r"layers\.0\..*=bits:4,bidup-order:both,mse:true", ".*down_proj=skip",  # pylint: disable=protected-access
                            ".*q_proj=srr_k:none,damp:0.05"])
  assert dict(rules[0].set) == {"bits": 4, "bidup_order": "both", "mse": True} and rules[1].skip
  assert dict(rules[2].set) == {"srr_k": None, "damp": 0.05}
  cfg = __import__("gilora_jax").config.QuantConfig(rules=rules)
  assert cfg.for_module("layers.0.mlp.up_proj").refine.order == "both"
  assert cfg.for_module("layers.1.mlp.down_proj") is None
