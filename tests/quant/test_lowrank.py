"""OLrC reaches the Eckart–Young optimum of the whitened residual; LoRC is the plain truncated SVD."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gilora_jax.quant import lowrank
from tests.quant import problems


def _eckart_young(E, Hd, r):
  """Independent reference: SVD of Hd^{1/2} E via a float64 eigendecomposition."""
  e, V = np.linalg.eigh(Hd)
  s = np.linalg.svd((V * np.sqrt(e)) @ V.T @ E, compute_uv=False)
  return np.sum(s[r:] ** 2)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("d_in, d_out", [(64, 40), (40, 64)])  # output-side and input-side routes
@pytest.mark.parametrize("r", [0, 1, 8, 40])
def test_olrc_reaches_eckart_young(d_in, d_out, r):
  _, _, H = problems.layer(d_in=d_in, d_out=d_out, n=300, decay=10)
  E = np.random.default_rng(1).standard_normal((d_in, d_out))
  Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(d_in)
  (L, R), opt = lowrank.olrc(jnp.asarray(E), jnp.asarray(Hd), r)
  assert L.shape == (d_in, r) and R.shape == (r, d_out)
  ref = _eckart_young(E, Hd, r)
  achieved = problems.out_err(E, np.asarray(L) @ np.asarray(R), Hd)
  scale = problems.out_err(E, 0 * E, Hd)
  assert abs(achieved - ref) <= 1e-9 * scale
  assert abs(float(opt) - ref) <= 1e-9 * scale


@pytest.mark.usefixtures("x64")
def test_input_side_route_matches_explicit_whitened_svd():
  """d_out > d_in takes the input-side route (factor T, SVD of TᵀE); compare the product with a direct one."""
  _, _, H = problems.layer(d_in=40, n=300, decay=8)
  E = np.random.default_rng(2).standard_normal((40, 64))
  Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(40)
  (L, R), _ = lowrank.olrc(jnp.asarray(E), jnp.asarray(Hd), 5)
  e, V = np.linalg.eigh(Hd)
  A = (V * np.sqrt(e)) @ V.T  # Hd^{1/2}
  U, s, Vt = np.linalg.svd(A @ E, full_matrices=False)
  ref = np.linalg.solve(A, (U[:, :5] * s[:5]) @ Vt[:5])
  np.testing.assert_allclose(np.asarray(L @ R), ref, rtol=1e-7, atol=1e-9)


def test_error_non_increasing_in_rank_and_full_rank_exact(rng):
  _, _, H = problems.layer(d_in=32, d_out=24, n=200)
  E = rng.standard_normal((32, 24)).astype(np.float32)
  Hd = jnp.asarray(H + 0.01 * np.mean(np.diag(H)) * np.eye(32), jnp.float32)
  errs = []
  for r in range(0, 25, 4):
    (L, R), _ = lowrank.olrc(jnp.asarray(E), Hd, r)
    errs.append(problems.out_err(E, np.asarray(L @ R), np.asarray(Hd, np.float64)))
  assert all(b <= a * (1 + 1e-5) for a, b in zip(errs, errs[1:]))
  assert errs[-1] <= 1e-6 * errs[0]  # rank = min(d_in, d_out) reproduces the residual


def test_lorc_is_truncated_svd(rng):
  E = rng.standard_normal((20, 12)).astype(np.float32)
  L, R = lowrank.lorc(jnp.asarray(E), 4)
  U, s, Vt = np.linalg.svd(E.astype(np.float64), full_matrices=False)
  np.testing.assert_allclose(np.asarray(L @ R), (U[:, :4] * s[:4]) @ Vt[:4], atol=1e-5)


def test_olrc_beats_lorc_in_output_error():
  W, _, H = problems.layer(d_in=64, d_out=48, n=500, decay=6, outliers=2)
  E = np.random.default_rng(3).standard_normal((64, 48)).astype(np.float32)
  Hd = jnp.asarray(H + 0.01 * np.mean(np.diag(H)) * np.eye(64), jnp.float32)
  (L, R), _ = lowrank.olrc(jnp.asarray(E), Hd, 8)
  L2, R2 = lowrank.lorc(jnp.asarray(E), 8)
  assert problems.out_err(E, np.asarray(L @ R), H) < problems.out_err(E, np.asarray(L2 @ R2), H)
  del W


@pytest.mark.parametrize("d_out", [16, 48])  # both routes: the output-side Gram (d_out ≤ d_in), the input-side one
def test_optimum_of_a_residual_within_the_rank_is_zero_not_negative(rng, d_out):
  """E of rank 1 ≤ r: the optimum is 0; computed as tr − Σ top-r it leaves round-off of either sign, which must not
  read as a negative energy (quantize_layer refuses those as a non-PSD H); a genuinely negative one still shows."""
  d_in = 32
  X = rng.standard_normal((200, d_in))
  Hd = jnp.asarray(X.T @ X + np.eye(d_in), jnp.float32)
  for scale in (1.0, 3.0, 1e3):
    E = jnp.asarray(scale * np.outer(rng.standard_normal(d_in), np.ones(d_out)), jnp.float32)
    _, opt = lowrank.olrc(E, Hd, 4)
    assert float(opt) >= 0.0, (scale, float(opt))
  e, V = np.linalg.eigh(np.asarray(Hd, np.float64))
  H_bad = jnp.asarray((V * np.where(np.arange(d_in) == 0, -50.0, e)[None]) @ V.T, jnp.float32)
  E = jnp.asarray(np.outer(V[:, 0], np.ones(d_out)) + 0.01 * rng.standard_normal((d_in, d_out)), jnp.float32)
  if d_out <= d_in:  # the output-side Gram needs no factor of the (indefinite) matrix
    assert float(lowrank.olrc(E, H_bad, 1)[1]) < 0


@pytest.mark.parametrize("d_in, d_out", [(1100, 1024), (1024, 1100)])  # output side and input side, n = 1024
def test_olrc_on_a_large_layer_reaches_eckart_young_through_block_krylov(d_in, d_out):
  """From n = 1024 on the Gram matrix's top-r comes from block Krylov (linalg.top_eigh_auto): in float32 the factors
  reach the float64 Eckart–Young optimum within 1e-5 of the error energy, and the returned optimum is the returned
  factors' own objective."""
  rng = np.random.default_rng(3)
  X = rng.standard_normal((3000, d_in)) * (np.arange(d_in) + 1.0) ** -0.5
  H = X.T @ X
  E = rng.standard_normal((d_in, d_out)) * (np.arange(d_out) + 1.0) ** -0.3
  Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(d_in)
  r = 32
  (L, R), opt = jax.jit(lowrank.olrc, static_argnums=2)(jnp.asarray(E, jnp.float32), jnp.asarray(Hd, jnp.float32), r)
  ref = _eckart_young(E, Hd, r)
  achieved = problems.out_err(E, np.asarray(L, np.float64) @ np.asarray(R, np.float64), Hd)
  scale = problems.out_err(E, 0 * E, Hd)
  assert abs(achieved - ref) <= 1e-5 * scale, (achieved, ref, scale)
  assert abs(float(opt) - achieved) <= 1e-5 * scale
