"""Experiment configs, shipped inside fer-dist as `fer_dist.configs` (see `fer_dist.config.CONFIGS`)."""
