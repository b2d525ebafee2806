"""What produced a figure: `provenance.json` in every run folder, ensemble report and demo summary.

    {"runs": [{"time", "fer_dist": {"version", "commit", "dirty"}, "python", "libraries",
               "devices", "world_size", "command", "seeds", "config", "manifest", ...}, ...]}

`config` and `manifest` are `{"file", "sha256"}`: the config the run resolved (`config.yaml`) and
the shards' `manifest.json`, so `sha256sum RUN/config.yaml SHARDS/manifest.json` checks a figure
against them; an ensemble or a demo records them for each member run. The commit is that of the
checkout fer-dist was imported from (null when installed from a wheel, or without git), with
whether its tracked files differed from the commit. A resumed run keeps the first record and
appends its own. Written atomically, by rank 0.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from rich.table import Table

import fer_dist
from fer_dist.console import out
from fer_dist.data.shards.format import atomic_write, manifest_path
from fer_dist.engine.rundir import PROVENANCE, REPORT, SUMMARY, RunDir
from fer_dist.tracks import TRACKS

LIBRARIES = ("torch", "torchvision", "torchaudio", "timm", "accelerate", "av", "webdataset", "numpy", "deepspeed")
CHECKOUT = Path(fer_dist.__file__).resolve().parents[1]  # the top of the checkout, when fer-dist runs from one


def sha256(path: Path) -> str | None:
    """The file's SHA-256 (hex, what `sha256sum` prints), or None when it is not there."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def stamp(path: Path) -> dict:
    """`{"file": absolute path, "sha256": ...}` of an input file."""
    return {"file": str(Path(path).resolve()), "sha256": sha256(path)}


def checkout(root: Path = CHECKOUT) -> dict:
    """The git commit of the checkout holding the fer_dist package, and whether its tracked files
    differ from it; both None when the package is not in a checkout's top folder (a wheel, or a
    venv inside a checkout), or git is missing."""
    root = Path(root).resolve()
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
        if top.returncode or Path(top.stdout.strip()).resolve() != root:
            return {"commit": None, "dirty": None}
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
    except OSError:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip() or None, "dirty": bool(status.stdout.strip())}


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def local_devices() -> list[str]:
    """The names of the CUDA devices this process sees, or ["cpu"]."""
    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return ["cpu"]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def record(devices: list[str], world_size: int, seeds: dict, **inputs) -> dict:
    """One start's record: versions of fer-dist (and its commit), Python and the libraries, the
    devices (one name per rank, or what this process sees), the world size, the command line,
    the seeds, and `inputs` (`config`, `manifest` stamps, or `members`)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fer_dist": {"version": version("fer-dist"), **checkout()},
        "python": platform.python_version(),
        "libraries": {name: version(name) for name in LIBRARIES}
        | {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn},  # torch with its build label
        "devices": devices,
        "world_size": world_size,
        "command": shlex.join(sys.orig_argv),
        "seeds": seeds,
        **inputs,
    }


def of_runs(runs: list[RunDir]) -> dict:
    """What finished runs were trained from, read from their folders, for the records of
    ensembles and summaries: `seeds` and `members` (the stamps of each run's config and of its
    shards' manifest), by run folder."""
    seeds, members = {}, {}
    for run in runs:
        seeds[str(run.path)] = run.config.train.seed
        members[str(run.path)] = {
            "config": stamp(run.config_file),
            "manifest": stamp(manifest_path(run.config.data.shards)),
        }
    return {"seeds": seeds, "members": members}


def write(folder: Path, entry: dict, append: bool = False) -> None:
    """`folder/provenance.json` with `entry` as its only record, or after the records there."""
    path = Path(folder) / PROVENANCE
    runs = json.loads(path.read_text())["runs"] if append and path.exists() else []
    atomic_write(path, json.dumps({"runs": [*runs, entry]}, indent=1).encode())


def stamps(entry: dict) -> list[dict]:
    """Every `{"file", "sha256"}` in a record."""
    if isinstance(entry, dict):
        if set(entry) == {"file", "sha256"}:
            return [entry]
        return [s for value in entry.values() for s in stamps(value)]
    return []


def metric_of(figures: dict) -> str:
    """The key of the track's metric (`macro_f1`, `au_f1`, `p_va`) of a metrics line or an ensemble
    report (their `track`; expressions where they name none, as files of earlier versions)."""
    return TRACKS[figures.get("track", "expr").split(",")[0]].metric


def figures(folder: Path) -> dict[str, dict[str, float]]:
    """The folder's figures on its track's metric (macro-F1, mean AU F1, P_VA): a run's last epoch
    and best model per head, an ensemble report's rows on the held-out folds and, apart, on the test
    videos, a demo summary's test figures."""
    folder, run = Path(folder), RunDir(Path(folder))
    if run.metrics_file.exists():
        lines = run.metrics()
        found = {}
        if lines:
            found[f"epoch {lines[-1]['epoch']} (last)"] = lines[-1][f"{metric_of(lines[-1])}_by_head"]
        if run.best.exists():
            best = run.best.metrics()
            found[f"epoch {best['epoch']} (best)"] = best[f"{metric_of(best)}_by_head"]
        return found
    if (folder / REPORT).exists():  # a member's row is in both: its held-out fold, then the test videos
        report = json.loads((folder / REPORT).read_text())
        metric = metric_of(report)
        found = {"on the held-out folds": {r["name"]: r[metric] for r in report["validation"]}}
        if report.get("test"):
            found["on the test videos"] = {r["name"]: r[metric] for r in report["test"]}
        return found
    if (folder / SUMMARY).exists():
        return {"test macro-F1": json.loads((folder / SUMMARY).read_text())["test"]}
    return {}


def inspect(folder: Path) -> dict:
    """The folder's records, figures, and each input of its latest record checked against the file
    as it is now: `same`, `changed` or `missing`."""
    path = Path(folder) / PROVENANCE
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    checks = []
    for s in stamps(runs[-1]) if runs else []:
        now = sha256(Path(s["file"]))
        checks.append({**s, "now": "missing" if now is None else "same" if now == s["sha256"] else "changed"})
    return {"folder": str(folder), "runs": runs, "figures": figures(folder), "checks": checks}


def table(title: str, headings: tuple[str, str], rows: dict) -> Table:
    """Two left-aligned columns whose long values (paths, hashes, commands) fold, never cut."""
    shown = Table(title=title, title_justify="left")
    for heading in headings:
        shown.add_column(heading, overflow="fold")
    for key, value in rows.items():
        shown.add_row(str(key), str(value))
    return shown


def show(found: dict) -> None:
    """What `inspect` found, as tables on stdout."""
    if not found["runs"]:
        out.print(f"{found['folder']}: no {PROVENANCE}, no record of what produced it", soft_wrap=True)
    for k, entry in enumerate(found["runs"]):
        lib, code = entry["libraries"], entry["fer_dist"]
        commit = (code["commit"] or "no checkout") + (" (uncommitted changes)" if code["dirty"] else "")
        others = ", ".join(f"{n} {v}" for n, v in lib.items() if n not in ("torch", "cuda", "cudnn") and v)
        rows = {
            "time": entry["time"],
            "fer-dist": f"{code['version']} {commit}",
            "Python, torch": f"{entry['python']}, {lib['torch']} (CUDA {lib['cuda']}, cuDNN {lib['cudnn']})",
            "libraries": others,
            "devices": f"{entry['world_size']} process(es): {', '.join(entry['devices'])}",
            "command": entry["command"],
            "seeds": json.dumps(entry["seeds"]),
        } | {s["file"]: s["sha256"] or "missing" for s in stamps(entry)}
        out.print(table(f"{found['folder']}: start {k + 1} of {len(found['runs'])}", ("", "record"), rows))
    for title, values in found["figures"].items():
        out.print(table(title, ("", "macro-F1"), {name: f"{v:.4f}" for name, v in values.items()}))
    if found["checks"]:
        rows = {c["file"]: c["now"] for c in found["checks"]}
        out.print(table("the latest record's inputs, now", ("file", "sha256 now"), rows))
