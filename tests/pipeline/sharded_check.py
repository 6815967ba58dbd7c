"""Runs in a subprocess with 4 host CPU devices (tests/pipeline/test_sharding.py): the same computations without
a mesh (one device) and on meshes of the 4, printed as one JSON object for the test to judge.

`python -m tests.pipeline.sharded_check LM_FOLDER` (XLA_FLAGS=--xla_force_host_platform_device_count=4).
"""
import json
import os
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

import gilora_jax as gj
from gilora_jax import sharding
from gilora_jax.config import QuantConfig, from_flat
from gilora_jax.models import qwen3
from gilora_jax.nn import QuantizedLinear
from gilora_jax.pipeline import apply, calib, run

from .tiny import LM_CONFIG, random_model

# (d_in, d_out, group size, methods): a wide layer (OLrC's input side), a tall one (its output side), one whose
# d_out 4 devices do not divide (the replicated fallback), and one whose 1024-wide Gram takes OLrC's block Krylov
# top-r (linalg.top_eigh_auto) on the shards
LAYER_CASES = [(64, 96, 32, ("gptq", "gptq+olrc", "gilora", "srr")), (96, 64, 32, ("gptq+olrc",)),
               (64, 30, None, ("gptq",)), (1040, 1024, None, ("gptq+olrc",))]
OPTIONS = {"gptq": {"act_order": True}, "gptq+olrc": {"rank": 8}, "gilora": {"rank": 8, "loops": 1},
           "srr": {"rank": 8}}
# (method, protocol) of the whole-model runs on MESH, each against the single-device run: both protocols, both
# with codes identical to one device. (gilora under the quantized protocol, not run here to keep the suite's time:
# 13 of 28672 packed code bytes flipped, on rounding boundaries of the differently ordered Hessian sums.)
MESH = "data=2,model=2"
MODEL_CASES = [("gptq", "quantized"), ("gilora", "fp")]


def _problem(d_in, d_out, seed=0):
  rng = np.random.default_rng(seed)
  X = rng.standard_normal((512, d_in)).astype(np.float32) @ rng.standard_normal((d_in, d_in)).astype(np.float32)
  return rng.standard_normal((d_in, d_out)).astype(np.float32), (X.T @ X / 512).astype(np.float32)


def layers(mesh):
  """Every method on a wide and a tall layer (both OLrC sides) and one whose d_out 4 devices do not divide."""
  out = []
  for d_in, d_out, group, methods in LAYER_CASES:
    W, H = _problem(d_in, d_out)
    for method in methods:
      kw = OPTIONS[method]
      opts = dict(method=method, bits=3, group_size=group, diagnostics="errors", **kw)
      one = gj.quantize_layer(W, H, **opts)
      Ws = sharding.place(W, sharding.columns(mesh, W.shape))
      many = gj.quantize_layer(Ws, sharding.place(H, sharding.replicated(mesh)), **opts)
      eff = lambda r: np.asarray(r.Q) + np.asarray(r.L) @ np.asarray(r.R)  # noqa: E731
      out.append({"shape": [d_in, d_out], "method": method, **kw,
                  "codes_identical": bool((np.asarray(one.codes) == np.asarray(many.codes)).all()),
                  "rel_err": [one.report.rel_err, many.report.rel_err],
                  "max_abs_diff_QLR": float(np.abs(eff(one) - eff(many)).max()),
                  "codes_sharded": not many.codes.sharding.is_fully_replicated})
  return out


def _codes(model):
  return {str(p): np.asarray(m.codes[...]) for p, m in nnx.iter_graph(model) if isinstance(m, QuantizedLinear)}


def _compare(ref, out):
  a, b = _codes(ref.model), _codes(out.model)
  differing = sum(int((a[k] != b[k]).sum()) for k in a)
  errs = max(abs(r.rel_err - s.rel_err) / r.rel_err for r, s in zip(ref.records, out.records))
  return {"packed_code_bytes": sum(v.size for v in a.values()), "differing": differing, "max_rel_err_diff": errs}


def models():
  """The tiny LM through quantize_model on each mesh against the single-device run, both protocols."""
  lm = random_model(qwen3.Qwen3, qwen3.ModelConfig(**LM_CONFIG), seed=3)
  ids = np.random.default_rng(5).integers(0, LM_CONFIG["vocab_size"], size=(8, 24)).astype(np.int32)
  mask = np.ones(ids.shape, bool)
  mask[1, 20:] = False
  cb = calib.batches(ids, 4, mask)
  out = []
  for method, protocol in MODEL_CASES:
    opts = dict(method=method, bits=3, group_size=32, protocol=protocol, rank=8 if method == "gilora" else 0)
    ref = apply.quantize_model(lm, cb, **opts)
    res = apply.quantize_model(lm, cb, mesh=sharding.make_mesh(MESH), **opts)
    out.append({"method": method, "protocol": protocol, "mesh": MESH, **_compare(ref, res)})
  try:
    apply.quantize_model(lm, calib.batches(ids[:6], 3), method="gptq", mesh=sharding.make_mesh(MESH))
    bad_batch = None
  except sharding.MeshError as e:
    bad_batch = str(e)
  return out, bad_batch


def folder(lm_folder):
  """`quantize_folder` (streaming, each weight read as the slices its devices hold) on a mesh vs no mesh."""
  cfg = QuantConfig(layer=from_flat(method="gptq", bits=3, group_size=32))
  tmp = tempfile.mkdtemp()
  kw = dict(config=cfg, nsamples=8, seqlen=32, batch_size=4)
  run.quantize_folder(lm_folder, os.path.join(tmp, "one"), **kw)
  run.quantize_folder(lm_folder, os.path.join(tmp, "many"), mesh=sharding.make_mesh("model=4"), **kw)
  a, b = gj.load_model(os.path.join(tmp, "one")), gj.load_model(os.path.join(tmp, "many"))
  ca, cb = _codes(a), _codes(b)
  return {"differing": sum(int((ca[k] != cb[k]).sum()) for k in ca), "layers": len(ca)}


def finetunes():
  """QPEFT data-parallel on data=4 against one device: the curves, the trained factors, the frozen base."""
  from gilora_jax.finetune import TrainConfig, finetune, train  # pylint: disable=import-outside-toplevel
  lm = random_model(qwen3.Qwen3, qwen3.ModelConfig(**LM_CONFIG), seed=3)
  ids = np.random.default_rng(5).integers(0, LM_CONFIG["vocab_size"], size=(8, 24)).astype(np.int32)
  q = apply.quantize_model(lm, calib.batches(ids, 4), method="gptq+olrc", bits=3, rank=4)
  records = [r._asdict() for r in q.records]
  data = train.lm_data(np.random.default_rng(0).integers(0, LM_CONFIG["vocab_size"], 1500).astype(np.int32), 16)
  kw = dict(init="olrc", cfg=TrainConfig(steps=4, warmup=1, lr=1e-2), batch_size=4, records=records, eval_every=2,
            eval_batch_size=5)  # 9 held-apart windows: a batch of 5 (replicated: 5 rows do not divide) and of 4
  one = finetune(q.model, data, **kw)
  many = finetune(q.model, data, mesh=sharding.make_mesh("data=4"), **kw)
  flat = lambda m: {".".join(str(getattr(p, "key", p)) for p in k): np.asarray(v) for k, v in  # noqa: E731
                    jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(m)))[0]}
  a, b, q0 = flat(one.model), flat(many.model), flat(q.model)
  factors = [k for k in a if k.endswith((".L", ".R"))]
  products = lambda f: {k[:-2]: f[k[:-2] + ".L"] @ f[k[:-2] + ".R"] for k in factors}  # noqa: E731  (the init rebalances L, R)
  rel = lambda x, y: abs(x - y) / max(abs(x), 1e-30)  # noqa: E731
  curve_diff = max(rel(r[k], s[k]) for r, s in zip(one.curves, many.curves) for k in r
                   if k not in ("step", "seconds", "lr"))
  try:
    finetune(q.model, data, mesh=sharding.make_mesh("data=4"), **{**kw, "batch_size": 6})
    bad = None
  except sharding.MeshError as e:
    bad = str(e)
  return {"steps": [[r["step"] for r in one.curves], [r["step"] for r in many.curves]],
          "max_rel_curve_diff": curve_diff, "factors": len(factors),
          "max_factor_diff": max(float(np.abs(a[k] - b[k]).max()) for k in factors),
          "factors_moved": sum(not np.allclose(p, products(q0)[k], atol=1e-6) for k, p in products(a).items()),
          "frozen_identical": all(np.array_equal(a[k], b[k]) for k in a if k not in factors),
          "factors_sharding_replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(
              nnx.state(many.model)) if isinstance(x, jax.Array)),
          "batch_split": train._batch(data.train[:4], sharding.make_mesh(  # pylint: disable=protected-access
              "data=4")).sharding.spec == sharding.batch(sharding.make_mesh("data=4"), (4, 16)).spec,
          "bad_batch": bad}


def main():
  assert jax.device_count() == 4, jax.devices()
  mesh = sharding.make_mesh("data=2,model=2")
  model_runs, bad_batch = models()
  print(json.dumps({"layers": layers(mesh), "models": model_runs, "bad_batch": bad_batch,
                    "folder": folder(sys.argv[1]), "finetune": finetunes()}))


if __name__ == "__main__":
  main()
