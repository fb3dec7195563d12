"""Prediction tasks as ACES configs (``configs/tasks/<task>.yaml``) and the MEDS label files
made from them (``python -m cvmae_jax.labels``; docs/tasks.md)."""
