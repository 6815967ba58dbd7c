"""experiments/paper_tables.py: the resumable store, the tables' arithmetic and the RESULTS.md splice (no
quantization here: the rows are made up, so every expected cell is known)."""
import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "paper_tables.py"


@pytest.fixture(scope="module")
def pt():
  spec = importlib.util.spec_from_file_location("paper_tables", _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _row(layer, method, rank, rel_err, bound=None, bits=3, settings="paper", model="m"):
  return dict(model=model, layer=layer, settings=settings, method=method, bits=bits, rank=rank, rel_err=rel_err,
              upper_bound=bound)


def test_results_resume_skips_finished_rows(pt, tmp_path):
  keys = ("model", "method", "rank")
  store = pt.Results(tmp_path, keys)
  store.add(model="a", method="gptq", rank=0, rel_err=0.5)
  assert store.done(model="a", method="gptq", rank=0) and not store.done(model="a", method="gptq", rank=8)
  again = pt.Results(tmp_path, keys)  # a rerun reads what the first one finished
  assert again.done(model="a", method="gptq", rank=0) and len(again.rows) == 1
  again.add(model="a", method="gilora", rank=8, rel_err=0.1)
  lines = (tmp_path / "results.jsonl").read_text().splitlines()
  assert [json.loads(x)["method"] for x in lines] == ["gptq", "gilora"]


def test_layer_table_is_the_median_ratio_to_gptq_per_layer(pt):
  rows = [_row("l0", "gptq", 0, 0.2), _row("l0", "gilora", 8, 0.1, bound=0.4),
          _row("l1", "gptq", 0, 0.4), _row("l1", "gilora", 8, 0.1, bound=1.2),
          _row("l2", "gptq", 0, 1.0), _row("l2", "gilora", 8, 0.9, bound=2.0),
          _row("l3", "gptq", 0, 9.0)]  # a layer still running (no gilora row yet): left out of every cell
  text, series = pt.layer_tables(rows)
  assert "(3 layers;" in text
  # per-layer ratios 0.5, 0.25, 0.9: median 0.5, worst 0.9; bounds / gptq 2, 3, 2: median 2
  assert "| gilora |  | 0.500 (0.900) |" in text
  assert "| gilora's Cor. 3.9 bound | – | 2.00 |" in text
  assert "GPTQ's own median rel_err 0.400" in text
  assert series[("m", "paper", 3)]["gilora"] == ([8], [0.5])
  assert series[("m", "paper", 3)]["gilora bound"] == ([8], [2.0])


def test_model_table_places_rank_free_methods_in_every_column(pt):
  rows = [dict(model="lm", settings=None, method="float", bits=None, rank=None, metric="perplexity", perplexity=10.0),
          dict(model="lm", settings="default", method="gptq", bits=3, rank=0, metric="perplexity", perplexity=12.0),
          dict(model="lm", settings="default", method="gilora", bits=3, rank=16, metric="perplexity",
               perplexity=11.0),
          dict(model="lm", settings="default", method="gilora", bits=3, rank=32, metric="perplexity",
               perplexity=10.5)]
  text = pt.model_tables(rows)
  assert "float 10.00" in text
  assert "| method | 3-bit r16 | 3-bit r32 |" in text
  assert "| gptq | 12.00 | 12.00 |" in text and "| gilora | 11.00 | 10.50 |" in text


def test_splice_replaces_only_its_own_section(pt, tmp_path):
  md = tmp_path / "RESULTS.md"
  md.write_text("# Results\n\nkept above\n", encoding="utf-8")
  pt.splice(str(md), "layers", "first")
  md.write_text(md.read_text() + "\nkept below\n", encoding="utf-8")
  pt.splice(str(md), "layers", "second")
  pt.splice(str(md), "models", "other")
  pt.splice(str(md), pt.section("models", ["builtin-lm", "builtin-deit"]), "built-ins")
  pt.splice(str(md), pt.section("models", ["smollm2-135m-instruct"]), "smollm2")
  pt.splice(str(md), pt.section("models", ["builtin-lm", "builtin-deit"]), "built-ins again")
  text = md.read_text()
  assert "first" not in text and text.count("second") == 1 and "other" in text
  assert "smollm2" in text and "built-ins again" in text and "built-ins\n" not in text
  assert text.startswith("# Results\n\nkept above\n") and "kept below" in text


def test_bad_arguments_exit_with_one_line(pt):
  with pytest.raises(SystemExit, match="--methods: unknown"):
    pt.main(pt.Args(methods=("gptq", "nope")))
  with pytest.raises(SystemExit, match="--settings: unknown"):
    pt.main(pt.Args(settings=("best",)))
  with pytest.raises(SystemExit, match="is not a model folder"):
    pt.parse_models(["/nonexistent/folder"])


def test_the_cross_sweep_varies_rank_at_one_bit_width_and_bits_at_one_rank(pt):
  rows = pt.plan(pt.Args(methods=("gptq", "gilora"), settings=("paper",), bits=("2", "3", "4")))
  assert ("paper", "gptq", 2, 0) in rows and ("paper", "gptq", 4, 0) in rows
  gilora = {(b, r) for _, m, b, r in rows if m == "gilora"}
  assert gilora == {(3, 8), (3, 16), (3, 32), (3, 64), (2, 32), (4, 32)}
  full = pt.plan(pt.Args(methods=("gilora",), settings=("paper",), bits=("2", "3"), sweep="full"))
  assert len(full) == 2 * 4  # every (bits, rank > 0) pair
  models = pt.plan(pt.Args(table="models", methods=("srr",), settings=("default",), bits=("3",)))
  assert {r for *_, r in models} == {16, 32, 64}


def test_a_workdir_keeps_one_protocol(pt, tmp_path):
  (tmp_path / "args_models.json").write_text(json.dumps({"nsamples": 32, "seqlen": 256}), encoding="utf-8")
  with pytest.raises(SystemExit, match="--nsamples 32; pass those, or another --workdir"):
    pt.main(pt.Args(table="models", models=("builtin-lm",), nsamples=64, workdir=tmp_path))
