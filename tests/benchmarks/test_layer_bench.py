"""Smoke test: benchmarks/layer.py runs end to end on a tiny layer and writes one complete JSON record."""
import importlib.util
import json
import pathlib


_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name="layer"):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", _DIR / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_layer_bench_smoke(tmp_path):
  out = tmp_path / "layer.jsonl"
  rec = _load().main(["--d", "256", "--n-tokens", "512", "--reps", "1", "--no-peer", "--out", str(out)])
  assert rec["malloc_tuned"] is False  # GILORA_MALLOC_TUNING=0 (tests/conftest.py): the pytest process is left alone
  assert json.loads(out.read_text().splitlines()[-1]) == json.loads(json.dumps(rec))
  assert rec["ours_warm_s"] > 0 and rec["roofline_s"] > 0
  # our sweep's own flops (one Cholesky, no inverse) are fewer than the roofline's, at the same rate
  assert 0 < rec["own_floor_s"] < rec["roofline_s"]
  assert rec["ours_over_own_floor"] == rec["ours_warm_s"] / rec["own_floor_s"]
  # GPTQ must beat round-to-nearest on the layer output by a wide margin on this correlated, heavy-tailed X.
  assert rec["ours_rel_err"] < 0.7 * rec["rtn_rel_err"]


def test_layer_stages_smoke(tmp_path):
  out = tmp_path / "stages.jsonl"
  from gilora_jax.quant import _gptq_blocked  # pylint: disable=import-outside-toplevel
  before = dict(vars(_gptq_blocked))
  rec = _load("layer_stages").main(["--d", "256", "--n-tokens", "512", "--reps", "1", "--out", str(out)])
  assert json.loads(out.read_text().splitlines()[-1]) == json.loads(json.dumps(rec))
  assert all(rec[k] > 0 for k in ("checks_s", "factor_s", "sweep_s", "quantize_layer_s", "sweep_left_s",
                                  "sweep_segments_s", "matmul_micro_gflops", "matmul_long_gflops"))
  # The timing wrappers are taken off again: the driver's stages are the module's own functions afterwards.
  assert dict(vars(_gptq_blocked)) == before


def test_peer_device_follows_jax():
  """--peer-device auto runs llm-compressor where JAX runs; cuda without a GPU is refused with a message."""
  import jax  # pylint: disable=import-outside-toplevel
  import pytest  # pylint: disable=import-outside-toplevel
  torch = pytest.importorskip("torch")
  bench = _load()
  gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  assert bench.peer_device("auto") == ("cuda" if gpu else "cpu")
  assert bench.peer_device("cpu") == "cpu"
  if not torch.cuda.is_available():
    with pytest.raises(SystemExit, match="torch sees no GPU"):
      bench.peer_device("cuda")


def test_cpu_overlap_smoke(tmp_path):
  out = tmp_path / "overlap.jsonl"
  rec = _load("cpu_overlap").main(["--d", "256", "--rows", "64", "--reps", "2", "--out", str(out)])
  assert json.loads(out.read_text().splitlines()[-1]) == json.loads(json.dumps(rec))
  assert all(rec[k] > 0 for k in ("chain_s", "matmul_s", "one_jit_s", "dispatched_s"))
  total = rec["chain_s"] + rec["matmul_s"]
  assert rec["overlap_one_jit"] == total / rec["one_jit_s"] and rec["overlap_perfect"] >= 1
