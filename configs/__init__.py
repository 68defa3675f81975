"""Config files, one per model (data only): installed with the package as `rhead_jax.configs`, so
`--config yi34b.py` resolves in a checkout and after `pip install` (rhead_jax.config)."""
