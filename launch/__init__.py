"""Accelerate launch files, shipped inside fer-dist as `fer_dist.launch` (see `fer_dist.config.LAUNCH`)."""
