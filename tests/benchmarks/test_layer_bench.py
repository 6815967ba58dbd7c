"""Smoke test: benchmarks/layer.py runs end to end on a tiny layer and writes one complete JSON record."""
import importlib.util
import json
import pathlib


_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "layer.py"


def _load():
  spec = importlib.util.spec_from_file_location("bench_layer", _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_layer_bench_smoke(tmp_path):
  out = tmp_path / "layer.jsonl"
  rec = _load().main(["--d", "256", "--n-tokens", "512", "--reps", "1", "--no-peer", "--out", str(out)])
  assert json.loads(out.read_text().splitlines()[-1]) == json.loads(json.dumps(rec))
  assert rec["ours_warm_s"] > 0 and rec["roofline_s"] > 0
  # GPTQ must beat round-to-nearest on the layer output by a wide margin on this correlated, heavy-tailed X.
  assert rec["ours_rel_err"] < 0.7 * rec["rtn_rel_err"]
