"""CV-Masking Value-Only MAE in JAX/Flax."""
