"""provenance.json: what it records, how a resumed run appends, what `fer-dist inspect RUN` shows
and checks. (A real training run and its resume are in test_train.py.)"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from fer_dist.cli import main
from fer_dist.engine import provenance
from helpers import REPO

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def git(root, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_the_commit_of_a_checkout_and_whether_it_differs(tmp_path, monkeypatch):
    root = tmp_path / "checkout"
    (root / "fer_dist").mkdir(parents=True)
    (root / "fer_dist" / "__init__.py").write_text("")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=a", "-c", "user.email=a@b", "commit", "-q", "-m", "one")
    assert provenance.checkout(root) == {"commit": git(root, "rev-parse", "HEAD"), "dirty": False}
    (root / "untracked.txt").write_text("runs and demos leave files behind")
    assert provenance.checkout(root)["dirty"] is False
    (root / "fer_dist" / "__init__.py").write_text("changed = True\n")
    assert provenance.checkout(root)["dirty"] is True
    # a folder inside a checkout (a wheel in a venv there) is not the checkout fer-dist came from
    (root / "site").mkdir()
    assert provenance.checkout(root / "site") == {"commit": None, "dirty": None}
    # no git at all
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert provenance.checkout(root) == {"commit": None, "dirty": None}


def test_a_record_names_the_code_libraries_devices_and_inputs(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("train: {seed: 3}\n")
    entry = provenance.record(["cpu", "cpu"], 2, {"train.seed": 3}, config=provenance.stamp(config))
    assert entry["fer_dist"]["version"] == "0.1.0"
    assert entry["fer_dist"]["commit"] == git(REPO, "rev-parse", "HEAD")  # the tests run from a checkout
    assert entry["python"] == ".".join(map(str, sys.version_info[:3]))
    lib = entry["libraries"]
    assert lib["torch"] == torch.__version__ and lib["cuda"] == torch.version.cuda
    assert {"torchaudio", "timm", "accelerate", "av", "webdataset", "cudnn"} <= set(lib) and lib["av"]
    assert entry["devices"] == ["cpu", "cpu"] and entry["world_size"] == 2 and entry["seeds"] == {"train.seed": 3}
    assert entry["config"] == {"file": str(config.resolve()), "sha256": sha256(config)}
    assert "pytest" in entry["command"]


def fake_run(run, shards) -> None:
    """A run folder as training leaves it, with a record of one start."""
    run.mkdir()
    shards.mkdir()
    (shards / "manifest.json").write_text('{"format": 2}')
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"shards": str(shards)}, "train": {"seed": 7}}))
    heads = {"image": 0.5, "audio": 0.6, "ensemble": 0.8}
    lines = [{"epoch": 1, "macro_f1_by_head": heads}, {"epoch": 2, "macro_f1_by_head": {**heads, "ensemble": 0.9}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    inputs = {"config": provenance.stamp(run / "config.yaml"), "manifest": provenance.stamp(shards / "manifest.json")}
    provenance.write(run, provenance.record(["cpu"], 1, {"train.seed": 7}, **inputs))


def test_a_resumed_run_appends_and_a_new_one_starts_afresh(tmp_path):
    run = tmp_path / "run"
    fake_run(run, tmp_path / "shards")
    first = json.loads((run / "provenance.json").read_text())["runs"]
    provenance.write(run, {"resumed": True}, append=True)
    assert json.loads((run / "provenance.json").read_text())["runs"] == [*first, {"resumed": True}]
    provenance.write(run, {"again": True})
    assert json.loads((run / "provenance.json").read_text())["runs"] == [{"again": True}]
    assert [p.name for p in run.iterdir() if p.name.startswith("provenance")] == ["provenance.json"]  # no .tmp left


def test_inspect_shows_a_runs_record_and_figures_and_checks_its_inputs(tmp_path, capsys):
    run, shards = tmp_path / "run", tmp_path / "shards"
    fake_run(run, shards)
    assert main(["inspect", str(run), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["figures"]["epoch 2 (last)"]["ensemble"] == 0.9
    assert [c["now"] for c in found["checks"]] == ["same", "same"]
    assert found["runs"][0]["manifest"]["sha256"] == sha256(shards / "manifest.json")

    assert main(["inspect", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "start 1 of 1" in shown and "epoch 2 (last)" in shown and "0.9000" in shown and "same" in shown

    (shards / "manifest.json").write_text('{"format": 2, "repacked": true}')
    assert main(["inspect", str(run), "--json"]) == 1  # the shards changed since the run read them
    assert [c["now"] for c in json.loads(capsys.readouterr().out)["checks"]] == ["same", "changed"]
    shutil.rmtree(shards)
    assert main(["inspect", str(run), "--json"]) == 0  # another machine, without those shards
    assert [c["now"] for c in json.loads(capsys.readouterr().out)["checks"]] == ["same", "missing"]


def test_inspect_of_a_folder_without_a_record_says_so(tmp_path, capsys):
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "config.yaml").write_text("train: {seed: 0}\n")
    assert main(["inspect", str(run)]) == 0
    assert "no provenance.json" in capsys.readouterr().out


def test_inspect_of_a_missing_or_empty_folder_says_so_in_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothere")]) == 2
    assert "nothere: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "neither shards (manifest.json, *.tar) nor a run folder" in " ".join(capsys.readouterr().err.split())


def test_an_ensembles_figures_keep_the_held_out_folds_apart_from_the_test_videos(tmp_path):
    """A member's row is in both of the report's sections: each keeps its own figure."""
    out = tmp_path / "ensemble"
    out.mkdir()
    rows = {
        "validation": [{"name": "cv-fold4", "macro_f1": 0.889}, {"name": "out-of-fold", "macro_f1": 0.93}],
        "test": [{"name": "cv-fold4", "macro_f1": 0.949}, {"name": "ensemble (vote)", "macro_f1": 0.955}],
    }
    (out / "report.json").write_text(json.dumps(rows))
    figures = provenance.figures(out)
    assert figures["on the held-out folds"] == {"cv-fold4": 0.889, "out-of-fold": 0.93}
    assert figures["on the test videos"] == {"cv-fold4": 0.949, "ensemble (vote)": 0.955}


def test_inspect_of_a_cross_validation_names_what_to_inspect_in_it(tmp_path, capsys):
    (tmp_path / "cv" / "fold0").mkdir(parents=True)
    assert main(["inspect", str(tmp_path / "cv")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is a cross-validation" in err and "cv/fold0" in err and "cv/ensemble" in err
