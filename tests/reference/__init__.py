"""Independent reference implementations used as test oracles (float64 NumPy)."""
