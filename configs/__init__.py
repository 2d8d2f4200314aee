"""Experiment configs: one file per experiment (`configs/NAME.py`, loaded by `meme_jax.load_config`), plus the
sections they share (`common`, `dem_common`)."""
