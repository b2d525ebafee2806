"""Refusals and faults: every refusal of bad input is an `InputError` and a command prints it as
one line with status 2; any other exception (a fault of fer-dist or a library) keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fer_dist import cli
from fer_dist.config import ConfigError
from fer_dist.data.packing.annotations import LabelsError
from fer_dist.data.packing.faces import DETECTORS, DetectorError
from fer_dist.data.packing.features import ExtractError
from fer_dist.data.packing.layout import LayoutError
from fer_dist.data.packing.synth import STYLES
from fer_dist.data.shards.format import FOLD_SCHEMES, MISSING, ManifestError
from fer_dist.data.shards.windows import NAMES
from fer_dist.data.stream.pipeline import StreamError
from fer_dist.engine.rundir import RunError
from fer_dist.errors import InputError, one_line
from fer_dist.results.ensemble import EnsembleError
from fer_dist.results.score import ScoreError
from fer_dist.results.submission import SubmissionError
from fer_dist.tracks import TrackError
from helpers import REPO, tiny_run

REFUSALS = (
    ConfigError,
    LayoutError,
    LabelsError,
    ManifestError,
    ExtractError,
    StreamError,
    DetectorError,
    RunError,
    EnsembleError,
    SubmissionError,
    ScoreError,
    TrackError,
)


def test_every_refusal_derives_from_the_one_base():
    from fer_dist.bench.gpu import Unavailable

    for kind in (*REFUSALS, Unavailable):
        assert issubclass(kind, InputError) and issubclass(kind, ValueError), kind


def test_one_line_is_the_message_or_a_loader_workers_last_line():
    assert one_line(ConfigError("data.mix must be one of none, mixup, remix")) == (
        "data.mix must be one of none, mixup, remix"
    )
    # torch's DataLoader raises a worker's exception again with its traceback as the text
    worker = (
        "Caught StreamError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "pipeline.py", line 1, in read_shards\n'
        "fer_dist.data.stream.pipeline.StreamError: 100 shards in a row could not be read\n"
    )
    assert one_line(StreamError(worker)) == "100 shards in a row could not be read"


@pytest.mark.parametrize(
    "argv, names",
    [
        (["inspect", "{tmp}/nowhere"], "nowhere: no such folder"),
        (["inspect", "{tmp}"], "neither shards (manifest.json, *.tar) nor a run folder"),
        (["ensemble", "{tmp}", "--out", "{tmp}/out"], "no finished training run there"),
        (["cv", "--config", "mfm_cpu", "--how", "max", "--cv-dir", "{tmp}/cv"], "--how must be one of vote, mean"),
        (["cv", "--config", "mfm_cpu", "--cv-dir", "{tmp}/cv", "data.mix=cutmix"], "data.mix must be one of"),
        (["shard", "--root", "{tmp}", "--out", "{tmp}/shards"], "{tmp}"),
        (["train", "--config", "mfm_cpu", "data.shards={tmp}", "train.run_dir={tmp}/run"], "manifest"),
        (["synth", "--out", "{tmp}/s", "--videos", "3"], "--videos must be at least 4"),
        (["shard", "--root", "{tmp}", "--out", "{tmp}/shards", "--tracks", "expr,mood"], "unknown track 'mood'"),
        (["score", "--track", "au", "--annotations", "{tmp}", "--submission", "{tmp}/sub.txt"], "no annotation files"),
    ],
)
def test_a_refused_input_is_one_line_and_status_2(argv, names, tmp_path, capsys):
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert names.format(tmp=tmp_path) in err


def test_a_fault_inside_the_model_keeps_its_traceback(shards, tmp_path):
    """A ValueError raised in the model's forward is a fault, not a refusal: the command does not
    turn it into one line, and the traceback names where it was raised."""
    bug = (
        "import sys\n"
        "from fer_dist.models.mfm import ModalFusionNet\n"
        "def forward(self, **inputs):\n"
        "    raise ValueError('a deliberate fault in forward')\n"
        "ModalFusionNet.forward = forward\n"
        "from fer_dist.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    config = str(REPO / "configs" / "mfm_cpu.yaml")
    argv = ["train", "--config", config, *tiny_run(shards, tmp_path / "run", "train.log_with=[]")]
    result = subprocess.run([sys.executable, "-c", bug, *argv], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert "in forward" in result.stderr and "ValueError: a deliberate fault in forward" in result.stderr
    assert "error: a deliberate fault" not in result.stderr


SHARD = ["shard", "--root", ".", "--out", "x"]
EXTRACT = ["extract", "--shards", "s", "--root", "r", "--out", "x", "--backbone", "b"]


@pytest.mark.parametrize(
    "argv, allowed",
    [
        ([*SHARD, "--folds", "video3"], FOLD_SCHEMES),
        ([*SHARD, "--missing", "drop"], MISSING),
        (["crop", "--videos", "v.mp4", "--out", "x", "--detector", "mtcnn"], DETECTORS),
        (["synth", "--out", "x", "--style", "cartoons"], STYLES),
        ([*EXTRACT, "--speech-window", "xl"], NAMES),
    ],
)
def test_an_options_allowed_values_are_the_librarys(argv, allowed, capsys):
    """The command line offers the values the library allows (one statement of them), and refuses
    another before anything runs."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "invalid choice" in line]
    assert stop.value.code == 2 and all(name in line.split("choose from", 1)[1] for name in allowed), line
