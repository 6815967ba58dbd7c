"""Hessian tools: streaming accumulation, factors (both routes), dead features, top eigenvectors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gilora_jax.quant import hessian
from tests.quant import problems


def test_streaming_equals_gram_with_mask(rng):
  X = rng.standard_normal((3, 50, 16)).astype(np.float32)
  mask = rng.random((3, 50)) > 0.3
  stats = hessian.init(16)
  for b in range(3):
    stats = jax.jit(hessian.update)(stats, jnp.asarray(X[b]), jnp.asarray(mask[b]))
  Xm = X[mask].astype(np.float64)
  np.testing.assert_allclose(stats.xtx, Xm.T @ Xm, rtol=1e-5, atol=1e-4)
  assert int(stats.count) == mask.sum()


def test_bf16_activations_accumulate_in_float32(rng):
  x = jnp.asarray(rng.standard_normal((64, 8)), jnp.bfloat16)
  stats = hessian.update(hessian.init(8), x)
  assert stats.xtx.dtype == jnp.float32
  xf = np.asarray(x.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(stats.xtx, xf.T @ xf, rtol=1e-5, atol=1e-4)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_factor_is_ul_cholesky_of_damped_hessian(method):
  _, _, H = problems.layer(d_in=48, n=200)
  Hd = H + hessian.damping(jnp.asarray(H), 0.01) * np.eye(48)
  T = np.asarray(hessian.factor(jnp.asarray(Hd), method))
  assert np.allclose(T, np.triu(T)) and (np.diagonal(T) > 0).all()
  np.testing.assert_allclose(T @ T.T, Hd, rtol=1e-10, atol=1e-8 * np.abs(Hd).max())
  U = np.asarray(hessian.inverse_factor(jnp.asarray(T)))
  np.testing.assert_allclose(U.T @ U, np.linalg.inv(Hd), rtol=1e-7, atol=1e-9 * np.abs(np.linalg.inv(Hd)).max())
  # U is GPTQ's Hinv: the upper Cholesky factor of the inverse, computed the reference way.
  np.testing.assert_allclose(U, np.linalg.cholesky(np.linalg.inv(Hd)).T, rtol=1e-6, atol=1e-10)
  # The transposed form the sweep reads is the same factor, inside jit too (where XLA may drop the layout copies).
  for Tt in (hessian.factor(jnp.asarray(Hd), method, transpose=True),
             jax.jit(lambda h: hessian.factor(h, method, transpose=True))(jnp.asarray(Hd))):
    np.testing.assert_allclose(np.asarray(Tt), T.T, rtol=1e-12, atol=1e-12 * np.abs(T).max())


@pytest.mark.usefixtures("x64")
def test_cholesky_factor_reads_exactly_one_triangle(rng):
  X = rng.standard_normal((64, 24))
  H = X.T @ X + np.eye(24)
  Ha = H + np.triu(rng.standard_normal((24, 24)), 1) * 1e-3 * np.abs(H).max()  # upper triangle perturbed
  T = np.asarray(hessian.factor(jnp.asarray(Ha)))
  upper = np.triu(Ha) + np.triu(Ha, 1).T
  closest = min(np.abs(T @ T.T - S).max() for S in (H, upper))  # H is the symmetric completion of the lower triangle
  assert closest < 1e-10 * np.abs(H).max(), closest  # one triangle, exactly: not an average of the two


def test_cholesky_factor_of_indefinite_matrix_is_not_finite():
  T = hessian.factor(jnp.array([[1.0, 2.0], [2.0, 1.0]]))
  assert not bool(jnp.all(jnp.isfinite(T)))  # the caller must check; quantize_layer does


def test_eigh_factor_survives_rank_deficient_matrix(rng):
  X = rng.standard_normal((5, 20))  # rank 5 < 20
  T = hessian.factor(jnp.asarray(X.T @ X, jnp.float32), "eigh")
  assert bool(jnp.all(jnp.isfinite(T))) and bool(jnp.all(jnp.diagonal(T) > 0))


def test_fix_dead():
  H = jnp.diag(jnp.array([2.0, 0.0, 3.0]))
  W = jnp.ones((3, 2))
  H2, W2, dead = hessian.fix_dead(H, W)
  np.testing.assert_array_equal(dead, [False, True, False])
  np.testing.assert_array_equal(jnp.diagonal(H2), [2.0, 1.0, 3.0])
  np.testing.assert_array_equal(W2[1], [0.0, 0.0])


def test_top_eigh(rng):
  A = rng.standard_normal((30, 10))
  sig2, V = hessian.top_eigh(jnp.asarray(A.T @ A, jnp.float32), 3)
  s = np.linalg.svd(A, compute_uv=False)
  np.testing.assert_allclose(sig2, s[:3] ** 2, rtol=1e-4)
  _, _, Vt = np.linalg.svd(A)
  np.testing.assert_allclose(np.abs(np.asarray(V).T @ Vt[:3].T), np.eye(3), atol=1e-3)
