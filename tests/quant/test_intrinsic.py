"""GPTQ-intrinsic LoRA: the Schur-deflated sweep equals the paper's literal augmented-Hessian sweep."""
import jax.numpy as jnp
import numpy as np
import pytest

import gilora_jax as gj
from gilora_jax import config
from gilora_jax.quant import hessian, intrinsic, linalg
from gilora_jax.quant.grid import GridSpec
from tests.quant import problems


def literal_augmented(W, H, bits, r, damp=0.01, lam=None):
  """Paper A, Alg. 3 as written, in float64 NumPy: GPTQ on [W; 0] with the (N+r)² augmented Hessian,
  quantizing the first N rows only, Hinv factor as the paper's "GPTQ*" (eigh of the inverse square root + QR).
  ``lam``: the absolute damping of the augmented diagonal (default Paper A's, damp · its mean diagonal)."""
  N = W.shape[0]
  e, V = np.linalg.eigh(H)
  L = V[:, ::-1][:, :r]
  Xa_T_Xa = np.block([[H, H @ L], [L.T @ H, L.T @ H @ L]])
  Ha = 0.5 * (Xa_T_Xa + Xa_T_Xa.T)
  Ha += (damp * np.mean(np.diag(Ha)) if lam is None else lam) * np.eye(N + r)
  ea, Va = np.linalg.eigh(Ha)
  Qt, G = np.linalg.qr((Va / np.sqrt(ea)) @ Va.T)  # (H_aug + λI)^{-1/2} = Q̃ G
  G = G * np.sign(np.diag(G))[:, None]  # diag(G) > 0, so Ψ = Gᵀ and U = G (Uᵀ U = (H_aug + λI)⁻¹)
  del Qt
  maxq = 2**bits - 1
  xmin, xmax = np.minimum(W.min(0), 0), np.maximum(W.max(0), 0)
  s = (xmax - xmin) / maxq
  z = np.round(-xmin / s)
  Wt = np.vstack([W, np.zeros((r, W.shape[1]))])
  codes = np.zeros(W.shape)
  for t in range(N):
    c = np.clip(np.round(Wt[t] / s) + z, 0, maxq)
    codes[t] = c
    err = (Wt[t] - s * (c - z)) / G[t, t]
    Wt[t + 1:] -= np.outer(G[t, t + 1:], err)
  return codes, L, Wt[N:]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("bits, r", [(2, 4), (3, 8), (4, 8)])
def test_schur_form_equals_literal_augmented_sweep(bits, r):
  W, H = problems.spectral_drop(seed=bits, d_in=48, d_out=20, r=r)
  codes_ref, L_ref, R_ref = literal_augmented(W, H, bits, r)
  res = intrinsic.gilora(W, H, GridSpec(bits=bits), r)  # the function itself, no OLrC after it
  np.testing.assert_array_equal(np.asarray(res.codes), codes_ref)
  # Eigenvectors are defined up to sign: compare the products L R and the spans.
  np.testing.assert_allclose(np.abs(np.asarray(res.lr.L).T @ L_ref), np.eye(r), atol=1e-8)
  np.testing.assert_allclose(np.asarray(res.lr.L @ res.lr.R), L_ref @ R_ref, atol=1e-9)
  # quantize_layer's gilora without its final OLrC is exactly this function
  via = gj.quantize_layer(W, H, method="gilora", bits=bits, rank=r, final_olrc=False, **config.PAPER)
  np.testing.assert_array_equal(np.asarray(via.codes), np.asarray(res.codes))
  np.testing.assert_array_equal(np.asarray(via.L @ via.R), np.asarray(res.lr.L @ res.lr.R))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("bits, r", [(2, 4), (3, 8)])
def test_deflated_lambda_is_the_literal_sweep_damped_by_the_deflated_diagonal(bits, r):
  """The library's default λ changes only the damping: the literal augmented sweep with λ = damp · Σ_{i>r} σ_i² / N
  on its diagonal gives the same codes and L R."""
  W, H = problems.spectral_drop(seed=bits, d_in=48, d_out=20, r=r)
  e = np.sort(np.linalg.eigvalsh(H))[::-1]
  lam = 0.01 * e[r:].sum() / 48
  codes_ref, L_ref, R_ref = literal_augmented(W, H, bits, r, lam=lam)
  res = intrinsic.gilora(W, H, GridSpec(bits=bits), r, lam_from="deflated")
  np.testing.assert_allclose(float(res.ih.lam), lam, rtol=1e-10)
  np.testing.assert_array_equal(np.asarray(res.codes), codes_ref)
  np.testing.assert_allclose(np.asarray(res.lr.L @ res.lr.R), L_ref @ R_ref, atol=1e-9)
  via = gj.quantize_layer(W, H, method="gilora", bits=bits, rank=r, final_olrc=False, mse=False, act_order=False)
  np.testing.assert_array_equal(np.asarray(via.codes), np.asarray(res.codes))


def test_rank_zero_is_gptq():
  W, _, H = problems.layer(seed=4, d_in=96, d_out=40, n=600)
  a = gj.quantize_layer(W, H, method="gilora", bits=3, rank=0)
  b = gj.quantize_layer(W, H, method="gptq", bits=3)
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  assert a.L.shape == (96, 0) and a.R.shape == (0, 40)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gilora_beats_gptq_olrc_on_decaying_spectrum(seed):
  W, H = problems.spectral_drop(seed=seed)
  for bits in (2, 3, 4):
    e = {m: gj.quantize_layer(W, H, diagnostics="full", method=m, bits=bits, rank=8).report.rel_err for m in ("gptq", "gptq+olrc",
                                                                                          "gilora")}
    assert e["gilora"] < e["gptq+olrc"] < e["gptq"], (bits, e)


@pytest.mark.usefixtures("x64")
def test_deflated_hessian_closed_form():
  """S = H + λI − H V (VᵀHV + λI)⁻¹ VᵀH computed directly equals the eigen-shortcut; R is the ridge solution."""
  _, _, H = problems.layer(d_in=32, n=200, decay=5)
  ih = intrinsic.deflate(jnp.asarray(H), 4, 0.01)
  V, lam = np.asarray(ih.V), float(ih.lam)
  direct = H + lam * np.eye(32) - H @ V @ np.linalg.solve(V.T @ H @ V + lam * np.eye(4), V.T @ H)
  np.testing.assert_allclose(np.asarray(ih.S), direct, rtol=1e-10, atol=1e-10 * np.abs(H).max())
  E = np.random.default_rng(0).standard_normal((32, 6))
  ridge = np.linalg.solve(V.T @ H @ V + lam * np.eye(4), V.T @ H @ E)
  np.testing.assert_allclose(np.asarray(intrinsic.ridge_r(ih, jnp.asarray(E))), ridge, rtol=1e-8, atol=1e-12)


def test_deflated_hessian_is_positive_definite_in_float32_at_small_damping():
  """A top-8 spectrum 1000× the tail, damp 1e-6, float32: S built as the difference H + λI − V diag(σ⁴/(σ²+λ)) Vᵀ
  goes indefinite (round-off of σ₁² swamps λ); built from the eigenpairs every eigenvalue is ≥ λ, so the factor
  succeeds without damping escalation. (test_deflated_hessian_closed_form checks the value in float64.)"""
  _, H = problems.spectral_drop(seed=0, d_in=128, d_out=8, r=8, big=1000.0)
  H32 = jnp.asarray(H, jnp.float32)
  e, V = linalg.eigh_desc(H32)
  ih = intrinsic.deflate(H32, 8, 1e-6, eig=(e, V))
  lam = float(ih.lam)
  by_difference = (np.asarray(hessian.shifted(H32, lam), np.float64)
                   - np.asarray(V[:, :8] * (e[:8] ** 2 / (e[:8] + lam))[None, :], np.float64) @ np.asarray(V[:, :8]).T)
  assert np.linalg.eigvalsh(by_difference).min() < 0  # the case the fix is for
  assert np.linalg.eigvalsh(np.asarray(ih.S, np.float64)).min() > 0.5 * lam
  assert bool(hessian.factor_ok(hessian.factor(ih.S, transpose=True)))  # gilora's sweep factor: no escalation
