"""Packing every track: a tree holding expressions, action units and valence-arousal in three
editions' folder names, with overlapping video sets, splits that differ per track, -1/-5 rows and a
`_left`/`_right` pair, packs each frame once with each of its labels; the counts per track are
those of the files; the stream of an expression run reads the expression frames alone."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fer_dist import cli, config
from fer_dist.data.packing.layout import LayoutError, discover, read_annotation
from fer_dist.data.packing.pack import pack, show
from fer_dist.data.shards.format import PackParams, SampleMeta, fold_group, label_counts, read_manifest
from fer_dist.data.stream.counts import COUNTS
from fer_dist.data.stream.pipeline import eval_loader
from fer_dist.engine.trainer import report_stream
from fer_dist.tracks import ACTION_UNITS, TRACKS, parse_tracks
from helpers import samples

EXPR_SRC = Path("6th ABAW Annotations") / "EXPR_Recognition_Challenge"
EXPR = Path("5th_ABAW_Annotations") / "EXPR_Classification_Challenge"  # ABAW5's name
AU = Path("3rd ABAW Annotations") / "Third ABAW Annotations" / "AU_Detection_Challenge"  # a nested release
VA = Path("annotations") / "VA_Set"  # ABAW1/2's name, with its Training_Set
# video -> (track, split): the sets overlap and differ; 3-30 is validation for expressions, train for AUs
PLAN = {
    "1-30-640x360_left": {"expr": "Train_Set", "au": "Train_Set", "va": "Training_Set"},
    "1-30-640x360_right": {"expr": "Train_Set", "au": "Train_Set"},
    "2-25-640x360": {"expr": "Train_Set", "va": "Validation_Set"},
    "3-30-640x360": {"expr": "Validation_Set", "au": "Train_Set"},
    "4-30-640x360": {"expr": "Train_Set", "au": "Validation_Set", "va": "Training_Set"},
    "5-30-640x360": {"au": "Train_Set", "va": "Training_Set"},  # no expression labels
    "6-25-640x360": {"va": "Validation_Set"},  # valence-arousal alone
}
FOLDER = {"expr": EXPR, "au": AU, "va": VA}


def write_labels(synthetic: Path, root: Path) -> dict[str, dict[str, np.ndarray]]:
    """The three tracks' files under `root` (PLAN), AU and VA labels drawn at random with runs not
    annotated; returns what each file says, by track and video."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True)
    for name in ("cropped_aligned", "cropped_aligned_new_50_vids", "batch1", "batch2", "new_vids"):
        (root / name).symlink_to(synthetic / name)
    truth: dict[str, dict[str, np.ndarray]] = {t: {} for t in TRACKS}
    for video, tracks in PLAN.items():
        source = next((synthetic / EXPR_SRC).glob(f"*/{video}.txt"))
        n = len(source.read_text().splitlines()) - 1
        for track, split in tracks.items():
            path = root / FOLDER[track] / split / f"{video}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            if track == "expr":
                shutil.copy(source, path)
            elif track == "au":
                rows = rng.integers(0, 2, (n, 12)) * (rng.random((n, 1)) < 0.9)  # some all-off frames
                rows[20:35] = -1
                path.write_text(",".join(ACTION_UNITS) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
            else:
                rows = rng.uniform(-1, 1, (n, 2)).round(3)
                rows[40:60] = -5
                rows[70, 1] = -5  # one dimension missing: the frame is not annotated
                path.write_text("valence,arousal\n" + "".join(f"{v},{a}\n" for v, a in rows))
            truth[track][video] = read_annotation(path, TRACKS[track])
    return truth


@pytest.fixture(scope="module")
def three(synthetic, tmp_path_factory):
    root = tmp_path_factory.mktemp("three_tracks")
    truth = write_labels(synthetic, root / "data")
    out = root / "shards"
    assert cli.main(["shard", "--root", str(root / "data"), "--out", str(out), "--samples-per-shard", "200"]) == 0
    return root, truth, read_manifest(out)


def test_every_track_is_found_under_its_editions_name_with_its_split_per_track(three):
    root, _, manifest = three
    videos = {v.name: v for v in discover(root / "data")}
    assert set(videos) == set(PLAN)
    for name, tracks in PLAN.items():
        want = {t: "train" if s.startswith("Train") else "val" for t, s in tracks.items()}
        assert videos[name].splits == want and manifest.videos[name].splits == want
        assert videos[name].split == next(iter(want.values()))  # the first track's split sets the fold scheme's
    assert manifest.format == 3 and manifest.tracks == ["expr", "au", "va"]


def test_the_counts_per_track_are_the_files_and_every_labelled_frame_is_packed_once(three):
    _, truth, manifest = three
    for track, videos in truth.items():
        t = TRACKS[track]
        for video, labels in videos.items():
            got = manifest.videos[video].tracks[track]
            labelled = labels[t.annotated(labels)]
            assert got.labelled == got.samples == len(labelled)  # --missing fill packs every labelled frame
            assert got.counts == label_counts(track, labelled)
        assert manifest.totals.tracks[track].samples == sum(manifest.videos[v].tracks[track].samples for v in videos)
    # a frame is one sample whatever it carries: the union of the tracks' labelled frames
    for video, record in manifest.videos.items():
        union = np.zeros(record.frames, bool)
        for track in truth:
            if video in truth[track]:
                union[: len(truth[track][video])] |= TRACKS[track].annotated(truth[track][video])
        assert record.samples == union.sum() == sum(record.carried.values())
    au = manifest.totals.tracks["au"]
    assert au.counts == np.concatenate([v[TRACKS["au"].annotated(v)] for v in truth["au"].values()]).sum(0).tolist()
    va = manifest.totals.tracks["va"]
    assert sum(va.counts) == va.samples and len(va.counts) == 100


def test_each_sample_carries_each_of_its_frames_labels(three):
    root, truth, manifest = three
    seen = 0
    for sample in samples(root / "shards"):
        meta = SampleMeta.from_bytes(sample["json"])
        for track in TRACKS:
            labels = truth[track].get(meta.video)
            here = labels is not None and TRACKS[track].annotated(labels[meta.frame - 1 : meta.frame])[0]
            assert meta.carries(track) == here, (meta.video, meta.frame, track)
            if here and track == "au":
                assert meta.au == labels[meta.frame - 1].tolist()
            if here and track == "va":
                assert meta.va == labels[meta.frame - 1].tolist()  # the file's decimals, exactly
        assert int(sample["cls"]) == meta.label
        seen += 1
    assert seen == manifest.totals.samples


def test_inspect_reads_every_track_back_from_the_tars(three, capsys):
    root, _, manifest = three
    assert cli.main(["inspect", str(root / "shards")]) == 0
    shown = capsys.readouterr().out
    assert "frames per track" in shown and all(re.search(rf"│\s+{t}\s+│\s+5\s+│", shown) for t in TRACKS)
    assert cli.main(["inspect", str(root / "shards"), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["agrees"] and found["tracks"]["5-30-640x360"].keys() == {"au", "va"}
    totals = {row["track"]: row for row in found["track_totals"]}
    assert all(totals[t]["packed"] == manifest.totals.tracks[t].samples and totals[t]["videos"] == 5 for t in TRACKS)


def test_tracks_asked_for_are_packed_alone_and_a_missing_one_is_named(three, tmp_path):
    root, truth, _ = three
    videos = discover(root / "data", tracks=parse_tracks("au"))
    assert {v.name for v in videos} == set(truth["au"]) and all(v.annotations.keys() == {"au"} for v in videos)
    manifest = pack(videos, tmp_path / "au", PackParams(samples_per_shard=500), workers=2)
    assert manifest.tracks == ["au"] and manifest.totals.samples == manifest.totals.tracks["au"].samples
    (tmp_path / "only_expr").mkdir()
    shutil.copytree(root / "data" / EXPR, tmp_path / "only_expr" / EXPR)
    (tmp_path / "only_expr" / "cropped_aligned").mkdir()
    with pytest.raises(LayoutError, match="no annotation folder found; looked for VA_Estimation_Challenge, VA_Set"):
        discover(tmp_path / "only_expr", tracks=parse_tracks("expr,va"))


def test_a_malformed_row_of_any_track_stops_packing_naming_the_file_and_line(synthetic, tmp_path):
    write_labels(synthetic, tmp_path / "data")
    victim = tmp_path / "data" / VA / "Training_Set" / "4-30-640x360.txt"
    lines = victim.read_text().splitlines()
    lines[7] = "0.2,1.7"
    victim.write_text("\n".join(lines) + "\n")
    with pytest.raises(LayoutError, match=r"4-30-640x360.txt:8: malformed row '0.2,1.7'; valence and arousal lie"):
        pack(discover(tmp_path / "data"), tmp_path / "shards", PackParams(), workers=2)
    assert not list((tmp_path / "shards").glob("*.tar"))


def test_an_expression_run_reads_the_expression_frames_alone(three):
    root, truth, manifest = three
    cfg = config.load(None, [f"data.shards={root / 'shards'}", "data.workers=0", "data.eval_batch_size=64"]).data
    for group in manifest.fold_groups():
        keys = [k for batch in eval_loader(cfg, manifest, group, rank=0, world=1) for k in batch["key"]]
        want = {
            f"{video}/{f:05d}"
            for video, labels in truth["expr"].items()
            if manifest.videos[video].fold == group
            for f in (np.flatnonzero(labels >= 0) + 1).tolist()
        }
        assert len(keys) == len(set(keys)) == manifest.frames_of(group, ("expr",)) and set(keys) == want


def test_a_run_is_refused_before_training_when_its_track_is_missing_from_the_shards_or_the_fold(
    three, tmp_path, capsys
):
    """Shards of action units alone, a held-out fold without an expression frame, and training
    folds without one: each refused in one line before any training, never a hung stream or a
    traceback after training; packing names the folds a track lacks."""
    root, truth, manifest = three
    au = tmp_path / "au"
    show(pack(discover(root / "data", tracks=parse_tracks("au")), au, PackParams(samples_per_shard=500), workers=2))
    shown = capsys.readouterr().out
    assert "frames per track" in shown and "labelled frames per class" not in shown  # no empty table of classes
    assert cli.main(["inspect", str(au)]) == 0
    assert "Neutral" not in capsys.readouterr().out
    run = ["train", "--config", "mfm_cpu", f"train.run_dir={tmp_path / 'run'}"]
    assert cli.main([*run, f"data.shards={au}"]) == 2
    assert "carry action units alone; the run learns expressions" in " ".join(capsys.readouterr().err.split())
    lacking = [k for k in manifest.folds() if not manifest.frames_of(fold_group(k), ("expr",))]
    assert lacking, "the plan deals some fold only videos without expression labels"
    named = ", ".join(fold_group(k) for k in lacking)
    assert any(p.startswith(f"{named} hold(s) no frames of expressions") for p in manifest.problems)
    assert cli.main([*run, f"data.shards={root / 'shards'}", f"data.holdout_fold={lacking[0]}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{fold_group(lacking[0])} holds no frames labelled for expressions" in err
    assert not (tmp_path / "run").exists()


def test_a_file_that_annotates_no_frame_is_named_in_a_warning(synthetic, tmp_path):
    write_labels(synthetic, tmp_path / "data")
    header_only = tmp_path / "data" / AU / "Train_Set" / "5-30-640x360.txt"
    header_only.write_text(",".join(ACTION_UNITS) + "\n")
    unmarked = tmp_path / "data" / VA / "Validation_Set" / "2-25-640x360.txt"
    n = len(unmarked.read_text().splitlines()) - 1
    unmarked.write_text("valence,arousal\n" + "-5,-5\n" * n)
    manifest = pack(discover(tmp_path / "data"), tmp_path / "shards", PackParams(samples_per_shard=500), workers=2)
    assert (
        "5-30-640x360: its action units file annotates no frame (a header alone, or -1 each row)" in manifest.problems
    )
    assert "2-25-640x360: its valence-arousal file annotates no frame (a header alone, or -5 each row)" in (
        manifest.problems
    )
    assert manifest.videos["5-30-640x360"].tracks["au"].labelled == 0


def test_a_video_annotated_twice_in_a_track_or_also_listed_as_a_test_video_is_refused_naming_the_files(three, tmp_path):
    root, _, _ = three
    listed = tmp_path / "test_set.txt"
    listed.write_text("5-30-640x360\n")
    with pytest.raises(LayoutError, match=r"test video 5-30-640x360 is annotated \(action units in .*AU_Detection"):
        discover(root / "data", test_list=listed)
    listed.write_text("7-30-640x360\n7-30-640x360\n")
    with pytest.raises(LayoutError, match="video 7-30-640x360 is listed twice"):
        discover(root / "data", test_list=listed)
    data = tmp_path / "data"
    shutil.copytree(root / "data", data, symlinks=True)
    twin = data / AU / "Validation_Set" / "3-30-640x360.txt"
    twin.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / AU / "Train_Set" / "3-30-640x360.txt", twin)
    with pytest.raises(LayoutError, match=r"annotated for action units in both .*Train_Set/3-30-640x360.txt and .*"):
        discover(data)


@pytest.mark.parametrize(
    ("other_tracks", "discarded", "warned"),
    [(700, 100, False), (0, 600, True), (300, 400, True)],
)
def test_frames_of_other_tracks_are_said_apart_and_never_set_off_the_resampling_warning(
    other_tracks, discarded, warned, capsys
):
    """Of 1000 frames read, those labelled for other tracks only are named in the epoch's line and
    left out of the warning about data.balance and video_cap, which cannot change them."""
    counts = dict.fromkeys(COUNTS, 0) | {"read": 1000, "other_tracks": other_tracks, "discarded": discarded}
    counts |= {"discarded_fraction": (other_tracks + discarded) / 1000}
    counts |= {"videos_per_batch": {"median": 3, "min": 2}, "clips_per_batch": {"median": 4, "min": 3}}
    report_stream(counts)
    said = " ".join(capsys.readouterr().err.split())
    assert (f"({other_tracks} labelled for other tracks only)" in said) == bool(other_tracks)
    assert ("most of what the stream read was discarded" in said) == warned
