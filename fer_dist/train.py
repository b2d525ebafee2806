"""Training's command line. Run it through Accelerate; the files in launch/ choose GPUs, nodes or DeepSpeed:

    accelerate launch fer_dist/train.py --config configs/mfm_swin_tiny.yaml [key=value ...]
    accelerate launch -m fer_dist.train --config configs/mfm_swin_tiny.yaml [key=value ...]
    accelerate launch fer_dist/train.py --resume runs/mfm_swin_tiny [key=value ...]
    fer-dist train --config mfm_cpu [key=value ...]            # in this process

`--config` takes a YAML file or the name of a config shipped with fer-dist. `--resume RUN_DIR`
goes on from the run's last checkpoint with its saved config (and starts afresh when there is
none, so one command serves a first start and a requeue). A run stopped by SIGTERM or SIGUSR1
exits with status 75 after its checkpoint; a refused input (a bad config, missing shards) exits
with status 2 after one line that says why; any other error keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rich.logging import RichHandler

from fer_dist import config as config_lib
from fer_dist.console import console
from fer_dist.engine.checkpoint import REQUEUE_EXIT
from fer_dist.engine.rundir import CONFIG, RunDir
from fer_dist.engine.trainer import Requeue, train
from fer_dist.errors import InputError, one_line


def resolve(config: str | None, resume: str | None, overrides: list[str]) -> config_lib.Config:
    """The run's config: `--resume`'s saved one when there is one, else `--config`; overrides last.
    Raises ConfigError."""
    source = config
    if resume:
        run = RunDir(resume)
        source = run.config_file if run.config_file.exists() else config
        if source is None:
            raise config_lib.ConfigError(f"--resume {resume}: no {CONFIG} there; give --config too")
        overrides = [*overrides, f"train.run_dir={resume}"]
    return config_lib.load(source, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fer-dist train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="experiment YAML, or the name of a shipped config")
    parser.add_argument("--resume", metavar="RUN_DIR", help="go on from RUN_DIR's last checkpoint (and its config)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    try:
        cfg = resolve(args.config, args.resume, args.overrides)
        train(cfg, resume=bool(args.resume))
    except Requeue as stop:
        console.print(f"[yellow]stopped by {stop}[/]; go on with --resume {cfg.train.run_dir}")
        return REQUEUE_EXIT
    except (InputError, OSError) as exc:
        console.print(f"[red]error:[/] {one_line(exc)}", soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
