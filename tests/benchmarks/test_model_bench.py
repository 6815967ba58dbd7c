"""Smoke test: benchmarks/model.py runs `gilora quantize` end to end on a tiny Qwen3 and writes one complete record."""
import importlib.util
import json
import os
import pathlib

_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name="model"):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", _DIR / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_model_bench_smoke(tmp_path, monkeypatch):
  # the gilora child compiles as a user's run does (the suite compiles unoptimized elsewhere: tests/conftest.py)
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "false")
  out = tmp_path / "model.jsonl"
  rec = _load().main(["--tiny", "--blocks", "1", "--nsamples", "4", "--seqlen", "64", "--eval-samples", "2",
                      "--matmul-d", "256", "--reps", "1", "--no-peer", "--workdir",
                      str(tmp_path / "work"), "--out", str(out)])
  assert json.loads(out.read_text().splitlines()[-1]) == json.loads(json.dumps(rec))
  assert rec["ours_wall_s"] > 0 and rec["ours_peak_rss_gb"] > 0.1  # a Python process with JAX loaded
  assert rec["ours_wall_s"] >= rec["ours_quantize_s"] > 0  # the child's wall time includes its quantize_model call
  assert rec["ours_stages"] is None or isinstance(rec["ours_stages"], dict)
  assert rec["peer_wall_s"] is None and rec["err_ratio_ours_over_peer"] is None  # --no-peer
  # cold by default: the child compiled into a fresh cache of the workdir, never the user's ~/.cache
  assert rec["ours_compile_cache"] == "cold" and rec["ours_compile_cache_entries_before"] == 0
  assert os.listdir(tmp_path / "work" / "compile-cache-cold")
  # every linear of the block, each with an output error in (0, 1); the mean is theirs
  assert [r["path"].split(".", 2)[-1] for r in rec["layers"]] == [
      "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
      "mlp.up_proj", "mlp.down_proj"]
  assert all(0 < r["ours"] < 1 and r["peer"] is None for r in rec["layers"])
  assert rec["ours_mean_rel_err"] == sum(r["ours"] for r in rec["layers"]) / 7
  fl = rec["floor"]
  assert fl["forwards_per_block"] == 2  # the quantized protocol: one float pass for H, one quantized for the next
  assert fl["floor_s"] > 0 and rec["ours_over_floor"] == rec["ours_wall_s"] / fl["floor_s"]
  parts = ("forward", "hessian", "sweep", "cholesky")
  assert abs(sum(fl[f"{k}_gflop"] for k in parts) - fl["total_gflop"]) < 1e-9 * fl["total_gflop"]


def test_floor_counts():
  """The floor's flop counts on a shape small enough to write out by hand: 1 block, d = f = 128, 1 head of 128."""
  cfg = dict(hidden_size=128, intermediate_size=128, num_attention_heads=1, num_key_value_heads=1, head_dim=128,
             num_hidden_layers=1)
  fl = _load().floor(cfg, nsamples=2, seqlen=64, forwards=1, rate=1e9)
  d, n = 128, 2 * 64
  assert fl["forward_gflop"] * 1e9 == 2 * 7 * d * d * n + 4 * 2 * 64**2 * d
  assert fl["hessian_gflop"] * 1e9 == 4 * 2 * n * d**2  # four input sites
  assert fl["sweep_gflop"] * 1e9 == 7 * d**3  # seven linears
  assert abs(fl["cholesky_gflop"] * 1e9 - 4 * d**3 / 3) < 1e-3
  assert fl["floor_s"] == fl["total_gflop"]  # at 1 Gflop/s
