"""quantize_layer's contract: bad input gets a ValueError that names the fix; damping escalates, then fails."""
import logging

import jax.numpy as jnp
import numpy as np
import pytest

import gilora_jax as gj
from tests.quant import problems


@pytest.fixture(scope="module")
def layer():
  W, _, H = problems.layer(seed=0, d_in=32, d_out=16, n=200)
  return W.astype(np.float32), H.astype(np.float32)


def _with(a, idx, value):
  a = a.copy()
  a[idx] = value
  return a


@pytest.mark.parametrize("mutate, kwargs, match", [
    (lambda W, H: (_with(W, (0, 0), np.nan), H), {}, "W contains 1 NaN/Inf"),
    (lambda W, H: (W, _with(H, (1, 2), np.inf)), {}, "H contains 1 NaN/Inf"),
    (lambda W, H: (W, H[:8]), {}, "square"),
    (lambda W, H: (W[:20], H), {}, "d_in=20"),
    (lambda W, H: (W, H[:20, :20]), {}, "H is 20×20 but W has d_in=32"),
    (lambda W, H: (W.T, H), {}, "pass the \\(d_in, d_out\\) kernel"),
    (lambda W, H: (W[0], H), {}, "2-D"),
    (lambda W, H: (W, _with(H, (0, 1), 1e6)), {}, "not symmetric"),
    (lambda W, H: (W, H), {"rank": 17}, "rank=17 exceeds min\\(d_in, d_out\\)=16"),
    (lambda W, H: (W, H), {"group_size": 5}, "group_size=5 does not divide d_in=32"),
    (lambda W, H: (W, H), {"bits": 1}, "outside 2..8"),
    (lambda W, H: (W, H), {"bits": 9}, "outside 2..8"),
    (lambda W, H: (W, H), {"damp": 0.0}, "damp"),
    (lambda W, H: (W, H), {"method": "awq"}, "method='awq' is unknown"),
    (lambda W, H: (W, H), {"method": "srr", "srr_k": 40}, "srr_k=40"),
    (lambda W, H: (W, H), {"loops": -1}, "loops"),
    # wrong types are named, not truncated (rank=3.7 would silently become 3) or failed on deep inside
    (lambda W, H: (W, H), {"rank": 3.7}, "rank=3.7 must be an integer"),
    (lambda W, H: (W, H), {"rank": None}, "rank=None must be an integer"),
    (lambda W, H: (W, H), {"bits": 3.0}, "bits=3.0 must be an integer"),
    (lambda W, H: (W, H), {"bits": True}, "not a bool"),
    (lambda W, H: (W, H), {"group_size": 16.0}, "group_size=16.0 must be an integer"),
    (lambda W, H: (W, H), {"loops": 1.5}, "loops=1.5 must be an integer"),
    (lambda W, H: (W, H), {"block_size": 0}, "block_size=0 must be a positive integer"),
    (lambda W, H: (W, H), {"damp": float("inf")}, "positive and finite"),
    (lambda W, H: (W, H), {"damp": None}, "damp=None must be a positive number"),
])
def test_bad_input_names_the_fix(layer, mutate, kwargs, match):
  W, H = mutate(*layer)
  with pytest.raises(ValueError, match=match):
    gj.quantize_layer(W, H, **{"method": "gilora", "bits": 3, "rank": 4, **kwargs})


def test_numpy_integer_options_are_accepted(layer):
  """Options read from NumPy arrays or configs (np.int64) mean the same as Python ints."""
  kwargs = dict(method="gptq+olrc", bits=3, rank=4, group_size=16, loops=1)
  a = gj.quantize_layer(*layer, **kwargs)
  b = gj.quantize_layer(*layer, **{k: (np.int64(v) if isinstance(v, int) else v) for k, v in kwargs.items()})
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  assert b.L.shape == (32, 4)


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq+olrc"])
def test_float32_overflow_fails_loudly(layer, method):
  """Finite W near float32's limit makes the grid's step infinite: an error that names the fix, not NaN output."""
  W, H = layer
  W = np.where(W >= 0, 3e38, -3e38).astype(np.float32)
  with pytest.raises(ValueError, match="overflowed float32.*Rescale W"):
    gj.quantize_layer(W, H, method=method, bits=4, rank=4)


def test_gilora_reports_the_lambda_of_its_intrinsic_pass():
  """The bound is stated for the sweep's own objective, so gilora reports the λ its intrinsic pass damped with:
  by default damp times the mean diagonal of the deflated Hessian it factors, damp · Σ_{i>r} σ_i² / N; with
  intrinsic_damp="augmented" Paper A's damp · (tr H + Σ_{i≤r} σ_i²) / (N + r); never damp · mean diag H."""
  W, _, H = problems.layer(seed=2, d_in=48, d_out=24, n=400, decay=10)
  r = 4
  e = np.sort(np.linalg.eigvalsh(H.astype(np.float64)))[::-1]
  info = gj.quantize_layer(W, H, method="gilora", bits=3, rank=r).report
  np.testing.assert_allclose(info.lam, 0.01 * e[r:].sum() / 48, rtol=1e-4)
  paper = gj.quantize_layer(W, H, method="gilora", bits=3, rank=r, intrinsic_damp="augmented").report
  np.testing.assert_allclose(paper.lam, 0.01 * (np.trace(H) + e[:r].sum()) / (48 + r), rtol=1e-4)
  plain = gj.quantize_layer(W, H, method="gptq+olrc", bits=3, rank=r).report
  np.testing.assert_allclose(plain.lam, 0.01 * np.mean(np.diag(H)), rtol=1e-5)
  assert paper.lam > plain.lam * 1.05 > info.lam * 1.05  # the three differ on a decaying spectrum
  # the damped objective's λ (refinement, final OLrC, reported objective) stays GPTQ's: only the sweep's moves
  assert info.damp == plain.damp == 0.01


def test_gilora_deflated_lambda_falls_back_when_h_has_no_energy_outside_v_r():
  """rank H ≤ r: the deflated Hessian's diagonal is round-off, so its λ would vanish (and no damping escalation
  could rescue a factor of it); the augmented λ is used instead, and the call succeeds with a finite result."""
  rng = np.random.default_rng(0)
  X = rng.standard_normal((200, 3)) @ rng.standard_normal((3, 16))  # rank 3
  H = (X.T @ X).astype(np.float32)
  W = rng.standard_normal((16, 8)).astype(np.float32)
  a = gj.quantize_layer(W, H, method="gilora", bits=3, rank=4, diagnostics="errors").report
  b = gj.quantize_layer(W, H, method="gilora", bits=3, rank=4, diagnostics="errors", intrinsic_damp="augmented").report
  assert a.lam == pytest.approx(b.lam, rel=1e-6) and a.lam > 0
  assert np.isfinite(a.rel_err)


def test_unknown_option_is_a_type_error(layer):
  with pytest.raises(TypeError, match="unknown option"):
    gj.quantize_layer(*layer, method="gptq", bits=3, blocksize=64)


def test_rank_deficient_hessian_is_handled(caplog):
  """Fewer tokens than features: H is singular; damping makes it PD, results are finite."""
  W, _, H = problems.layer(seed=1, d_in=64, d_out=16, n=20)
  with caplog.at_level(logging.WARNING):
    res = gj.quantize_layer(W, H, method="gilora", bits=3, rank=4, diagnostics="full")
  assert np.isfinite(res.report.rel_err) and np.all(np.isfinite(np.asarray(res.Q)))


def _rank_deficient(seed=0, n=8, d_in=24, d_out=40):
  """H = XᵀX of fewer tokens than features in float32: PSD up to round-off, singular to working precision."""
  rng = np.random.default_rng(seed)
  X = rng.standard_normal((n, d_in)).astype(np.float32)
  return rng.standard_normal((d_in, d_out)).astype(np.float32), X.T @ X


def test_round_off_escalates_the_damping_then_succeeds(caplog):
  """A singular Gram matrix with a tiny damp fails Cholesky by round-off only: the damping is escalated."""
  W, H = _rank_deficient()
  with caplog.at_level(logging.WARNING, logger="gilora_jax.quant.hessian"):
    res = gj.quantize_layer(W, H, method="gptq", bits=3, damp=1e-9, diagnostics="errors")
  assert any("not positive definite" in r.getMessage() for r in caplog.records)
  assert res.report.damp > 1e-9 and res.report.rel_err >= 0
  assert np.all(np.isfinite(np.asarray(res.Q)))


def test_singular_hessian_beyond_escalation_names_the_fix():
  W, H = _rank_deficient()
  with pytest.raises(ValueError, match="too close to singular.*larger damp"):
    gj.quantize_layer(W, H, method="gptq", bits=3, damp=1e-12)


@pytest.mark.parametrize("method", ["gptq", "gilora", "srr", "gptq+olrc"])
def test_indefinite_hessian_is_refused_not_damped(layer, method):
  """An eigenvalue ≈ −2 × mean diag (the diagonal stays ≥ 0): damping would hide it and the reported error
  could go negative (it did: −0.113); a Hessian that cannot be XᵀX is refused, naming the likely cause."""
  W, H = layer
  H = H.copy()
  v = np.zeros(32, np.float32)
  v[:2] = 1.0
  H -= 3.0 * np.mean(np.diag(H)) * np.outer(v, v) / 2
  H[0, 0] = H[1, 1] = np.mean(np.diag(H))
  with pytest.raises(ValueError, match="not positive semi-definite.*not built as XᵀX"):
    gj.quantize_layer(W, H, method=method, bits=3, rank=4)


def test_hopelessly_indefinite_hessian_fails_loudly(layer):
  W, _ = layer
  H = np.eye(32, dtype=np.float32)
  H[0, 1] = H[1, 0] = 1e4  # eigenvalue ≈ −1e4 ≫ 100 × mean diag
  with pytest.raises(ValueError, match="not positive semi-definite"):
    gj.quantize_layer(W, H, method="gptq", bits=3)


@pytest.mark.parametrize("method", ["gptq", "gilora", "srr"])
def test_all_zero_hessian_names_the_missing_tokens(layer, method):
  """No calibration token reached the layer (seqlen 0, an all-padding mask): H = 0 used to give rel_err 0."""
  W, H = layer
  with pytest.raises(ValueError, match="H is all zero: no calibration tokens reached this layer"):
    gj.quantize_layer(W, np.zeros_like(H), method=method, bits=3, rank=4)


def test_indefinite_hessian_that_survives_the_factor_is_still_refused(layer):
  """An eigenvalue of −0.5 λ passes the damped Cholesky. Every eigendecomposition of the site checks it (gilora,
  SRR, factor='eigh', which floors eigenvalues); an error computed from it comes out negative when W lies in that
  direction, and the call fails instead of reporting it; the default level reports only the damped objective,
  which is positive definite."""
  W, H = layer
  lam = 0.01 * np.mean(np.diag(H))
  e, V = np.linalg.eigh(H.astype(np.float64))
  e[0] = -0.5 * lam  # the smallest eigenvalue made negative: H + λI stays positive definite
  H_bad = ((V * e[None, :]) @ V.T).astype(np.float32)
  W_bad = (np.outer(V[:, 0], np.ones(W.shape[1])) * 3.0).astype(np.float32)  # all of W in the negative direction
  for w, kw in ((W, {"method": "gilora", "rank": 4, "diagnostics": "off"}),
                (W, {"method": "gptq", "factor": "eigh", "diagnostics": "off"}),
                (W_bad, {"method": "gptq", "diagnostics": "errors"}),
                (W_bad, {"method": "gptq", "diagnostics": "full"}),
                (W_bad, {"method": "gptq+olrc", "rank": 4, "diagnostics": "errors"})):
    with pytest.raises(ValueError, match="not positive semi-definite"):
      gj.quantize_layer(w, H_bad, bits=3, **kw)
  rep = gj.quantize_layer(W_bad, H_bad, method="gptq+olrc", bits=3, rank=4).report
  assert rep.rel_err is None and len(rep.objective) == 1 and rep.objective[0] >= 0


def test_each_diagnostics_level_reports_what_it_says(layer):
  """off: nothing; auto: the objectives OLrC returns anyway; errors: + the final error, from that free objective
  or by products, equal to full's; full: every stage and gilora's bounds. Q never depends on the level."""
  W, H = layer
  for method, kw in (("gptq", {}), ("gptq+olrc", {"loops": 1}), ("gilora", {}), ("rtn", {})):
    reps = {lv: gj.quantize_layer(W, H, method=method, bits=3, rank=4, diagnostics=lv, **kw) for lv in
            ("off", "auto", "errors", "full")}
    for lv, res in reps.items():
      np.testing.assert_array_equal(np.asarray(res.codes), np.asarray(reps["full"].codes))
      np.testing.assert_array_equal(np.asarray(res.R), np.asarray(reps["full"].R))
    off, auto, errors, full = (reps[lv].report for lv in ("off", "auto", "errors", "full"))
    assert off.objective == () and off.rel_err is None and auto.rel_err is None and auto.rel_err_quantized is None
    assert len(auto.objective) == {"gptq": 0, "rtn": 0, "gptq+olrc": 3, "gilora": 1}[method]
    assert errors.rel_err_quantized is None and errors.upper_bound is None
    np.testing.assert_allclose(errors.rel_err, full.rel_err, rtol=1e-4)
    assert full.rel_err_quantized >= full.rel_err_method >= full.rel_err * (1 - 1e-5)
    assert (full.upper_bound is not None) == (method == "gilora")
    if auto.objective:  # the free values are the products' up to round-off
      np.testing.assert_allclose(auto.objective[-1], full.objective[-1], rtol=1e-4)
  assert gj.quantize_layer(W, H, method="gptq", bits=3, diagnostics=True).report.rel_err_quantized is not None
  assert gj.quantize_layer(W, H, method="gptq", bits=3, diagnostics=False).report.objective == ()


def test_numpy_float64_and_jax_inputs_agree(layer):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  W, H = layer
  a = gj.quantize_layer(W.astype(np.float64), H.astype(np.float64), method="gptq", bits=4)
  b = gj.quantize_layer(jnp.asarray(W), jnp.asarray(H), method="gptq", bits=4)
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))


def test_rtn_and_gptq_ignore_rank(layer):
  res = gj.quantize_layer(*layer, method="gptq", bits=3, rank=8)
  assert res.L.shape == (32, 0) and res.R.shape == (0, 16)


def test_a_prepared_site_shares_its_work_and_changes_nothing():
  from gilora_jax.quant import hessian  # pylint: disable=import-outside-toplevel
  W, _, H = problems.layer(seed=3, d_in=48, d_out=36, n=300, decay=8)
  site = hessian.prepare(H.astype(np.float32))
  parts = [W[:, :12], W[:, 12:24], W[:, 24:]]  # q, k, v reading one input
  shared = [gj.quantize_layer(w, site, method="gilora", bits=3, rank=4) for w in parts]
  alone = [gj.quantize_layer(w, H, method="gilora", bits=3, rank=4) for w in parts]
  for a, b in zip(shared, alone):
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    np.testing.assert_array_equal(np.asarray(a.L @ a.R), np.asarray(b.L @ b.R))
  assert sum(k[0] == "gilora" for k in site.computed()) == 1
  assert sum(k[0] == "eigh" for k in site.computed()) == 1
  with pytest.raises(ValueError, match="H is 48×48 but W has d_in=24"):
    gj.quantize_layer(W[:24], site, method="gptq", bits=3)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("loops, damped", [(0, False), (1, False), (0, True)])
def test_olrc_reusing_the_sweep_factor_is_still_optimal(loops, damped, caplog):
  """A wide layer (d_out > d_in) takes OLrC's input-side route, which reuses GPTQ's factor of H + λI (also after
  a damping escalation): L R must still be the exact optimum for the final Q."""
  from gilora_jax.quant import lowrank  # pylint: disable=import-outside-toplevel
  W, _, H = problems.layer(seed=4, d_in=24, d_out=40, n=300)
  damp = 0.01
  if damped:  # a rank-deficient Gram matrix and a tiny damp: the factor is made with an escalated damping
    rng = np.random.default_rng(4)
    X = rng.standard_normal((8, 24))
    H, damp = X.T @ X, 1e-17  # float64: escalated to 1e-15
  with caplog.at_level(logging.WARNING):
    res = gj.quantize_layer(W, H, method="gptq+olrc", bits=3, rank=5, loops=loops, damp=damp)
  assert ("retrying" in caplog.text) == damped
  Hd = H + res.report.damp * np.mean(np.diag(H)) * np.eye(24)
  E = W - np.asarray(res.Q)
  _, optimum = lowrank.olrc(jnp.asarray(E), jnp.asarray(Hd), 5)
  LR = np.asarray(res.L) @ np.asarray(res.R)
  np.testing.assert_allclose(np.sum((E - LR) * (Hd @ (E - LR))), float(optimum), rtol=1e-9)


def test_gptq_olrc_refinement_starts_from_the_methods_olrc(monkeypatch):
  """gptq+olrc with loops: refinement starts from the method's OLrC of Q instead of computing it again (traced
  once in the method, once after the loop: 2, not 3), with the codes and factors of a start from scratch."""
  from gilora_jax import methods  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant import lowrank  # pylint: disable=import-outside-toplevel
  W, _, H = problems.layer(seed=5, d_in=72, d_out=40, n=400)  # a shape no other test uses: traced here
  W, H = W.astype(np.float32), H.astype(np.float32)
  calls, olrc = [], lowrank.olrc
  monkeypatch.setattr(lowrank, "olrc", lambda *a, **k: calls.append(1) or olrc(*a, **k))
  a = gj.quantize_layer(W, H, method="gptq+olrc", bits=3, rank=4, loops=1)
  assert len(calls) == 2, calls
  method = methods.METHODS["gptq+olrc"]
  monkeypatch.setitem(methods.METHODS, "gptq+olrc", lambda *x: method(*x)._replace(olrc_of_q=False))
  b = gj.quantize_layer(W, H, method="gptq+olrc", bits=3, rank=4, loops=1)
  assert len(calls) == 4  # the method's compiled OLrC is reused; the refinement now traces its own first and last
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  np.testing.assert_array_equal(np.asarray(a.L) @ np.asarray(a.R), np.asarray(b.L) @ np.asarray(b.R))
