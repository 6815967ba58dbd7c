"""The one configuration: every leaf has one flat name, defaults in one place, JSON round trips, rules on any field,
errors that carry the option's name (rendered as the library's keyword or the CLI's flag)."""
import dataclasses
import json

import numpy as np
import pytest

from gilora_jax import config
from gilora_jax.config import GPTQOptions, LayerConfig, QuantConfig, RefineOptions, Rule, SRROptions
from gilora_jax.quant.grid import GridSpec, OptionError


def _leaves(cls, prefix=""):
  out = []
  for f in dataclasses.fields(cls):
    default = f.default if f.default is not dataclasses.MISSING else None
    if dataclasses.is_dataclass(default):
      out += _leaves(type(default), prefix + f.name + ".")
    else:
      out.append(prefix + f.name)
  return out


def test_every_leaf_has_exactly_one_flat_name():
  paths = [path for path, _ in config.FIELDS.values()]
  assert sorted(paths) == sorted(_leaves(LayerConfig)) and len(set(paths)) == len(paths)
  for name in config.FIELDS:
    assert config.default(name) == LayerConfig().flat()[name]


def test_replace_by_flat_names_and_json_round_trip():
  cfg = LayerConfig().replace(bits=4, group_size=128, loops=2, bidup_order="both", srr_k=3, act_order=True, mse=True)
  assert cfg.grid == GridSpec(bits=4, group_size=128, mse=True)
  assert cfg.refine == RefineOptions(loops=2, order="both") and cfg.srr == SRROptions(k=3)
  assert cfg.gptq == GPTQOptions(act_order=True)
  assert LayerConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
  q = QuantConfig(layer=cfg, protocol="fp", rules=(Rule(r".*down_proj", bits=8, rank=0), Rule(r".*q_proj", skip=True)))
  assert QuantConfig.from_json(json.loads(json.dumps(q.to_json()))) == q
  hash(q)  # hashable: safe as a jit static argument or a cache key


def test_integers_are_checked_not_truncated():
  assert LayerConfig().replace(rank=np.int64(8)).rank == 8
  for bad, match in ((dict(rank=3.7), "rank=3.7 must be an integer"), (dict(bits=True), "not a bool"),
                     (dict(rank=None), "rank=None must be an integer"), (dict(damp="x"), "damp='x' must be")):
    with pytest.raises(OptionError, match=match):
      LayerConfig().replace(**bad)
  with pytest.raises(TypeError, match="unknown option"):
    LayerConfig().replace(blocksize=64)


@pytest.mark.parametrize("flat, name", [(dict(method="awq"), "method"), (dict(bits=9), "bits"), (dict(loops=-1), "loops"),
                                        (dict(damp=0.0), "damp"), (dict(block_size=0), "block_size"),
                                        (dict(srr_k=40), "srr_k"), (dict(factor="qr"), "factor"),
                                        (dict(shrink=1.5), "shrink"), (dict(group_size=0), "group_size"),
                                        (dict(shrink=0.9), "shrink")])  # a fixed shrink under the default mse
def test_validation_names_the_option(flat, name):
  with pytest.raises(OptionError) as e:
    LayerConfig().replace(**flat).validate()
  assert e.value.name == name and str(e.value).startswith(f"{name}=")
  assert e.value.render(cli=True).startswith(config.flag(name) + " ")


def test_shape_checks_name_the_layer_and_the_fix():
  cfg = LayerConfig().replace(rank=100)
  with pytest.raises(OptionError, match=r"rank=100 exceeds min\(d_in, d_out\)=64 .* of layers.0.q; use rank ≤ 64"):
    cfg.validate_shape(64, 96, where="layers.0.q")
  with pytest.raises(OptionError, match="group_size=48 does not divide d_in=64 of layers.1.k"):
    LayerConfig().replace(group_size=48).validate_shape(64, 64, where="layers.1.k")
  LayerConfig().replace(method="gptq", rank=1000).validate_shape(64, 64)  # gptq has no low-rank term


def test_rules_first_match_wins_and_are_validated():
  q = QuantConfig(rules=(Rule(r"layers\.0\..*", bits=4), Rule(r".*", bits=2), Rule(r".*v_proj", skip=True)))
  assert q.for_module("layers.0.self_attn.v_proj").grid.bits == 4  # first match
  assert q.for_module("layers.1.self_attn.v_proj").grid.bits == 2
  with pytest.raises(TypeError, match="unknown option"):
    Rule(".*", bitz=4)
  with pytest.raises(TypeError, match="takes no options"):
    Rule(".*", skip=True, bits=4)
  with pytest.raises(OptionError, match="not a valid regular expression"):
    QuantConfig(rules=(Rule("(", bits=4),)).validate()
  with pytest.raises(OptionError, match=r"bits=12 .*in the rule for '.\*down'"):
    QuantConfig(rules=(Rule(".*down", bits=12),)).validate()
  with pytest.raises(OptionError, match="protocol"):
    QuantConfig(protocol="both").validate()
