"""fer-dist: audio-visual facial-expression recognition on Aff-Wild2-style video, from one GPU to
SLURM clusters. The data path, one folder per stage:

    labels, config -> data/ -> models/ -> engine/ -> results/ -> jobs/ -> cli

Each stage imports only from the stages before it.
"""
