"""Synthetic layer problems shared by the math tests: heavy-tailed inputs, optional decaying spectrum."""
import numpy as np


def layer(seed=0, d_in=128, d_out=96, n=1024, decay=None, outliers=0, df=5):
  """(W, X, H) in float64: X ~ Student-t(df) (error feedback matters), columns scaled by exp(−i/decay)."""
  rng = np.random.default_rng(seed)
  X = rng.standard_t(df, size=(n, d_in))
  if decay is not None:
    # A decaying spectrum: mix the features through a random rotation after scaling, so H is not diagonal.
    scale = np.exp(-np.arange(d_in) / decay) + 0.02
    Qm, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
    X = (X * scale) @ Qm.T
  if outliers:
    X[:, rng.choice(d_in, outliers, replace=False)] *= 20.0
  W = rng.standard_normal((d_in, d_out)) * 0.05
  return W, X, X.T @ X


def out_err(W, Wq, H):
  """tr((W − Wq)ᵀ H (W − Wq))."""
  E = np.asarray(W, np.float64) - np.asarray(Wq, np.float64)
  return float(np.sum(E * (H @ E)))


def spectral_drop(seed=0, n=512, d_in=64, d_out=24, r=8, big=10.0):
  """(W, H) with X's spectrum dropping by ``big`` after the first r singular values (ALGORITHMS.md's toy)."""
  rng = np.random.default_rng(seed)
  U, _ = np.linalg.qr(rng.standard_normal((n, d_in)))
  V, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
  s = np.where(np.arange(d_in) < r, big, 1.0) * (1 + 0.1 * rng.random(d_in))
  X = (U * s) @ V.T
  W = rng.standard_t(5, size=(d_in, d_out)) * 0.1
  return W, X.T @ X
