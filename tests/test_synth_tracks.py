"""The synthetic twin's action-unit and valence-arousal tracks: the tracks' video sets overlap and
differ, and so do their splits; the labels follow the expressions as the field's EMFACS prototypes
say without being a function of them; every track packs; bad asks are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

from fer_dist import cli
from fer_dist.data.packing.layout import discover, read_annotation
from fer_dist.data.packing.pack import pack
from fer_dist.data.packing.synth import ANNOTATIONS, PROTOTYPE, TEST_TEMPLATES, synthesize, written
from fer_dist.data.shards.format import PackParams, read_manifest
from fer_dist.labels import CLASSES
from fer_dist.tracks import TRACKS

N, LENGTH = 8, 400


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "set"
    synthesize(out, N, seed=5, workers=2, length=LENGTH, test_videos=2, tracks=("expr", "au", "va"))
    return out


def files(out, name):
    """{face: (split folder, labels)} of track `name`'s train and validation files."""
    found = (out / ANNOTATIONS / TRACKS[name].folders[0]).glob("*/*.txt")
    return {f.stem: (f.parent.name, read_annotation(f, TRACKS[name])) for f in found}


def test_the_tracks_video_sets_overlap_and_differ_and_so_do_their_splits(tracked):
    sets = {name: files(tracked, name) for name in TRACKS}
    faces = {name: set(found) for name, found in sets.items()}
    assert faces["expr"] & faces["au"] & faces["va"]  # some videos carry every track
    assert len({frozenset(f) for f in faces.values()}) == 3  # and no two tracks label the same videos
    for name, found in sets.items():
        assert {split for split, _ in found.values()} == {"Train_Set", "Validation_Set"}, name
    both = faces["au"] & faces["va"]
    assert any(sets["au"][f][0] != sets["va"][f][0] for f in both)  # one video, two splits
    for name in TRACKS:
        assert (
            (tracked / TEST_TEMPLATES[name]).read_text().startswith("image_location," + ",".join(TRACKS[name].columns))
        )


def test_action_units_follow_the_expressions_prototypes_without_being_a_function_of_them(tracked):
    expr, au = files(tracked, "expr"), files(tracked, "au")
    shown = {c: [] for c in CLASSES}
    for face in set(expr) & set(au):
        e, a = expr[face][1], au[face][1]
        n = min(len(e), len(a))
        keep = (e[:n] >= 0) & (a[:n] >= 0).all(1)
        for k, c in enumerate(CLASSES):
            shown[c].append(a[:n][keep & (e[:n] == k)])
    rate = np.stack([np.concatenate(shown[c]).mean(0) for c in CLASSES])  # [class, AU]
    frames = np.array([sum(len(x) for x in shown[c]) for c in CLASSES])[:, None] * np.ones_like(rate)
    typical, foreign = PROTOTYPE >= 0.8, PROTOTYPE == 0
    on_typical = np.average(rate[typical], weights=frames[typical])
    on_foreign = np.average(rate[foreign], weights=frames[foreign])
    assert on_typical > 0.6 and on_foreign < 0.2, (on_typical, on_foreign)
    assert ((rate > 0) & (rate < 1)).any(0).all()  # each AU comes and goes within some expression
    rows = np.concatenate([a for _, a in au.values()])
    assert set(np.unique(rows)) == {-1, 0, 1} and ((rows == -1).all(1) | (rows >= 0).all(1)).all()


def test_valence_arousal_are_in_range_follow_the_expressions_and_drift(tracked):
    expr, va = files(tracked, "expr"), files(tracked, "va")
    rows = np.concatenate([v for _, v in va.values()])
    missing = (rows == -5).all(1)
    assert missing.any() and (np.abs(rows[~missing]) <= 1).all()
    by_class = {c: [] for c in CLASSES}
    for face in set(expr) & set(va):
        e, v = expr[face][1], va[face][1]
        n = min(len(e), len(v))
        keep = (e[:n] >= 0) & (v[:n] > -5).all(1)
        for k, c in enumerate(CLASSES):
            by_class[c].append(v[:n][keep & (e[:n] == k)])
    mean = {c: np.concatenate(v).mean(0) for c, v in by_class.items()}
    assert mean["Happiness"][0] > 0.3 > -0.3 > mean["Sadness"][0]  # valence
    assert mean["Fear"][1] > 0.3 > -0.1 > mean["Sadness"][1]  # arousal
    happy = np.concatenate(by_class["Happiness"])
    assert happy[:, 0].std() > 0.05  # the drift: one expression, many values


def test_every_track_of_the_set_packs_and_its_counts_are_those_written(tracked, tmp_path):
    out = tmp_path / "shards"
    pack(discover(tracked), out, PackParams(samples_per_shard=400), workers=2)
    manifest = read_manifest(out)
    assert manifest.tracks == list(TRACKS)
    for name, (videos, frames) in written(tracked, TRACKS).items():
        assert manifest.totals.tracks[name].labelled == frames, name
        assert sum(name in v.tracks for v in manifest.videos.values()) == videos, name


def test_the_synth_command_names_each_tracks_files(tmp_path, capsys):
    out = tmp_path / "set"
    assert cli.main(["synth", "--out", str(out), "--videos", "4", "--length", "300", "--tracks", "va,expr"]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "expressions: 4 videos" in said and "valence-arousal:" in said and "action units" not in said
    assert {p.name for p in (out / ANNOTATIONS).iterdir()} == {"EXPR_Recognition_Challenge", "VA_Estimation_Challenge"}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--tracks", "au,mood"], "unknown track 'mood'"),
        (["--tracks", ","], "--tracks names no track"),
        (["--tracks", "expr,va", "--style", "shapes"], "--tracks va needs --style faces"),
    ],
)
def test_synth_refuses_tracks_it_cannot_make_in_one_line(tmp_path, capsys, args, says):
    assert cli.main(["synth", "--out", str(tmp_path / "set"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "set").exists()
