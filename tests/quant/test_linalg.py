"""The shared helpers: eigenpairs in descending order of the symmetric part (dense, and the block Krylov top-r
for large matrices), truncated SVD factors."""
import jax.numpy as jnp
import numpy as np
import pytest

from gilora_jax.quant import linalg


def test_eigh_desc_is_descending_and_reads_the_symmetric_part(rng):
  A = rng.standard_normal((8, 8))
  M = A @ A.T
  e, V = linalg.eigh_desc(jnp.asarray(M + np.triu(np.ones((8, 8)), 1) * 1e-3 - np.tril(np.ones((8, 8)), -1) * 1e-3))
  assert np.all(np.diff(np.asarray(e)) <= 0)
  np.testing.assert_allclose(np.asarray(e), np.linalg.eigvalsh(M)[::-1], rtol=1e-4)
  np.testing.assert_allclose((np.asarray(V) * np.asarray(e)[None, :]) @ np.asarray(V).T, M, atol=1e-3)
  top, Vr = linalg.top_eigh(jnp.asarray(M), 3)
  np.testing.assert_allclose(np.asarray(top), np.asarray(e[:3]), rtol=1e-5)
  assert Vr.shape == (8, 3)


def test_truncated_svd_is_the_best_rank_p_approximation(rng):
  A = rng.standard_normal((12, 7)).astype(np.float32)
  L, R = linalg.truncated_svd(jnp.asarray(A), 2)
  U, s, Vt = np.linalg.svd(A, full_matrices=False)
  np.testing.assert_allclose(np.asarray(L @ R), (U[:, :2] * s[:2]) @ Vt[:2], atol=1e-5)


def _psd(rng, n, k):
  """A PSD n × n Gram matrix of k samples with a decaying spectrum (float32), like OLrC's residual Grams."""
  A = rng.standard_normal((n, k)) * (np.arange(k) + 1.0) ** -0.7
  return (A @ A.T).astype(np.float32)


def test_iterative_top_eigh_matches_the_dense_one(rng):
  """Block Krylov's top-r eigenvalues equal the float64 dense ones, its vectors are orthonormal, and its Ritz sum is
  the energy its own subspace captures (so an optimum computed from it is the returned factors' own)."""
  M = _psd(rng, 1100, 1500)
  e, V = linalg.top_eigh_iterative(jnp.asarray(M), 16)
  exact = np.sort(np.linalg.eigvalsh(M.astype(np.float64)))[::-1][:16]
  np.testing.assert_allclose(np.asarray(e), exact, rtol=2e-5)
  V = np.asarray(V, np.float64)
  np.testing.assert_allclose(V.T @ V, np.eye(16), atol=1e-5)
  np.testing.assert_allclose(np.trace(V.T @ M @ V), float(jnp.sum(e)), rtol=1e-5)
  assert np.all(np.diff(np.asarray(e)) <= 0)


def test_iterative_top_eigh_of_zero_and_of_a_low_rank_matrix_is_finite(rng):
  """M = 0: a finite orthonormal basis with zero Ritz values. Rank < r: the top eigenvalues are found and the rest
  are ~0."""
  e, V = linalg.top_eigh_iterative(jnp.zeros((1024, 1024)), 8)
  assert np.all(np.isfinite(np.asarray(V))) and np.all(np.asarray(e) == 0)
  A = rng.standard_normal((1024, 3)).astype(np.float32)
  e, V = linalg.top_eigh_iterative(jnp.asarray(A @ A.T), 8)
  exact = np.sort(np.linalg.eigvalsh((A @ A.T).astype(np.float64)))[::-1][:3]
  np.testing.assert_allclose(np.asarray(e[:3]), exact, rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(V))) and np.max(np.abs(np.asarray(e[3:]))) < 1e-3 * exact[0]


def test_auto_takes_the_dense_eigh_on_small_matrices_and_refuses_a_large_rank(rng):
  M = jnp.asarray(_psd(rng, 64, 80))
  for got, want in zip(linalg.top_eigh_auto(M, 4), linalg.top_eigh(M, 4)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bit for bit: the same routine
  with pytest.raises(ValueError, match="Krylov basis"):
    linalg.top_eigh_iterative(M, 13)
