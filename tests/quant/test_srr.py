"""SRR: k = 0 is plain QER (= OLrC for the exact scaling); the split criterion; determinism under the seed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gilora_jax as gj
from gilora_jax.quant import srr as srr_lib
from tests.quant import problems


def test_k0_exact_scaling_is_gptq_plus_olrc():
  W, H = problems.spectral_drop(seed=0)
  a = gj.quantize_layer(W, H, method="srr", bits=3, rank=8, srr_k=0)
  b = gj.quantize_layer(W, H, method="gptq+olrc", bits=3, rank=8)
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  np.testing.assert_allclose(a.info["rel_err"], b.info["rel_err"], rtol=1e-4)


@pytest.mark.parametrize("scaling", ["identity", "diag", "exact"])
def test_every_split_is_valid_and_criterion_is_seeded(scaling):
  W, H = problems.spectral_drop(seed=1)
  errs = [gj.quantize_layer(W, H, method="srr", bits=3, rank=6, srr_k=k, srr_scaling=scaling).info["rel_err"]
          for k in range(0, 7, 3)]
  assert all(np.isfinite(errs))
  a = gj.quantize_layer(W, H, method="srr", bits=3, rank=6, srr_scaling=scaling, seed=11)
  b = gj.quantize_layer(W, H, method="srr", bits=3, rank=6, srr_scaling=scaling, seed=11)
  assert a.info["srr_k"] == b.info["srr_k"] and 0 <= a.info["srr_k"] <= 6
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  assert a.L.shape == (64, 6) and a.R.shape == (6, 24)


def test_criterion_prefers_preserving_a_dominant_subspace():
  """A weight with a few huge singular directions: quantizing it whole wastes the grid, so k* > 0."""
  rng = np.random.default_rng(0)
  U, _ = np.linalg.qr(rng.standard_normal((64, 4)))
  V, _ = np.linalg.qr(rng.standard_normal((32, 4)))
  W = 50 * U @ V.T + rng.standard_normal((64, 32))
  k = srr_lib.choose_k(jnp.asarray(W, jnp.float32), jnp.eye(64), 8, jax.random.key(0))
  assert 3 <= int(k) <= 8
  k_flat = srr_lib.choose_k(jnp.asarray(rng.uniform(-1, 1, (64, 32)), jnp.float32), jnp.eye(64), 8,
                            jax.random.key(0))
  assert int(k_flat) <= 2


def test_tail_fractions():
  rho = srr_lib.tail_fractions(jnp.array([2.0, 1.0, 1.0]), 2)
  np.testing.assert_allclose(rho, [1.0, 2 / 6, 1 / 6], rtol=1e-6)


def test_preserved_plus_residual_recovers_full_rank_weight():
  W, H = problems.spectral_drop(seed=4, d_in=16, d_out=8)
  res = gj.quantize_layer(W, H, method="srr", bits=8, rank=8, srr_k=4)
  assert res.info["rel_err"] < 1e-6
