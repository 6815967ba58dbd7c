"""The shared helpers: eigenpairs in descending order of the symmetric part, truncated SVD factors."""
import jax.numpy as jnp
import numpy as np

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
