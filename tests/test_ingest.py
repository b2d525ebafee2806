"""`fer-dist shard` on every real layout, the test set, the fold schemes, bad input and kill -9."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fer_dist import cli
from fer_dist.data.packing.audio import read_media
from fer_dist.data.packing.layout import LayoutError, discover, list_crops, read_annotation
from fer_dist.data.packing.pack import assign_folds, pack
from fer_dist.data.shards.format import PackParams, SampleMeta, read_manifest
from fer_dist.errors import InputError
from fer_dist.labels import CLASSES
from helpers import samples

ANN = Path("6th ABAW Annotations") / "EXPR_Recognition_Challenge"


def link_media(src: Path, dst: Path, crops=("cropped_aligned", "cropped_aligned_new_50_vids")) -> None:
    for name in (*crops, "batch1", "batch2", "new_vids"):
        (dst / name).symlink_to(src / name)


def relayout(src: Path, dst: Path, challenge: Path, train: str = "Train_Set", crlf=False, seven=False) -> None:
    link_media(src, dst)
    for split, name in (("Train_Set", train), ("Validation_Set", "Validation_Set")):
        target = dst / challenge / name
        target.mkdir(parents=True)
        for f in (src / ANN / split).glob("*.txt"):
            lines = f.read_text().splitlines()
            if seven:
                lines = [",".join(CLASSES[:7])] + ["-1" if x == "7" else x for x in lines[1:]]
            (target / f.name).write_bytes(("\r\n" if crlf else "\n").join(lines).encode() + b"\n")


@pytest.mark.parametrize(
    "challenge, train, crlf, seven",
    [
        (Path("3rd_ABAW_Annotations") / "EXPR_Classification_Challenge", "Train_Set", False, False),
        (Path("5th_ABAW_Annotations") / "EXPR_Classification_Challenge", "Train_Set", True, False),
        (ANN, "Train_Set", False, False),
        (Path("annotations") / "EXPR_Set", "Training_Set", False, True),
    ],
    ids=["abaw3", "abaw5-crlf", "abaw6-spaces", "abaw2-7class"],
)
def test_every_edition_layout(synthetic, tmp_path, challenge, train, crlf, seven):
    relayout(synthetic, tmp_path, challenge, train, crlf, seven)
    reference = {v.name: v for v in discover(synthetic)}
    found = {v.name: v for v in discover(tmp_path)}
    assert set(found) == set(reference)
    for name, v in found.items():
        ref = reference[name]
        assert v.split == ref.split and v.media.name == ref.media.name and v.crops.name == ref.crops.name
        labels, expected = read_annotation(v.annotation), read_annotation(ref.annotation)
        if seven:
            expected = np.where(expected == 7, -1, expected)
        assert (labels == expected).all()


def test_explicit_paths_override_discovery(synthetic, tmp_path):
    (tmp_path / "labels").symlink_to(synthetic / ANN)
    (tmp_path / "faces").symlink_to(synthetic / "cropped_aligned")
    (tmp_path / "faces2").symlink_to(synthetic / "cropped_aligned_new_50_vids")
    for d in ("batch1", "batch2", "new_vids"):
        (tmp_path / f"v_{d}").symlink_to(synthetic / d)
    with pytest.raises(LayoutError, match="no annotation folder"):
        discover(tmp_path)
    videos = discover(
        tmp_path,
        annotations=tmp_path / "labels",
        crop_dirs=[tmp_path / "faces", tmp_path / "faces2"],
        video_dirs=[tmp_path / f"v_{d}" for d in ("batch1", "batch2", "new_vids")],
    )
    assert len(videos) == len(discover(synthetic)) and all(v.crops and v.media for v in videos)


def test_frame_rates_from_the_container(synthetic):
    rates = {round(float(read_media(v.media, 16000).fps), 2) for v in discover(synthetic)}
    assert {25.0, 29.97, 30.0} <= rates


def test_fold_schemes_keep_parents_together(synthetic):
    videos = discover(synthetic)
    for scheme in ("video5", "train4+val", "official"):
        groups = assign_folds(videos, scheme, 5, seed=1)
        by_parent = {}
        for v in videos:
            assert by_parent.setdefault(v.parent, groups[v.name]) == groups[v.name], scheme
    official = assign_folds(videos, "official", 5, 0)
    assert all(official[v.name] == ("fold0" if v.split == "train" else "fold1") for v in videos)
    t4v = assign_folds(videos, "train4+val", 5, 0)
    assert all((t4v[v.name] == "fold4") == (v.split == "val") for v in videos)
    assert {t4v[v.name] for v in videos if v.split == "train"} == {f"fold{k}" for k in range(4)}
    v5 = assign_folds(videos, "video5", 5, 0)
    assert set(v5.values()) == {f"fold{k}" for k in range(5)}
    assert v5 != assign_folds(videos, "video5", 5, 1)  # seeded


@pytest.mark.parametrize(
    "options, message",
    [
        (["--n-folds", "0"], "--n-folds 0: --folds video5 deals videos into at least 1"),
        (["--folds", "train4+val", "--n-folds", "1"], "--n-folds 1: --folds train4+val deals videos into at least 2"),
        (["--samples-per-shard", "0"], "--samples-per-shard (0) and --clip-len (32) count samples: >= 1"),
        (["--clip-len", "-2"], "--samples-per-shard (2000) and --clip-len (-2) count samples: >= 1"),
    ],
)
def test_packing_parameters_are_refused_before_anything_is_written(synthetic, tmp_path, capsys, options, message):
    """Parameters no packing can follow (`--n-folds 0` once divided by zero, half-way, leaving its
    work folder behind to refuse the next try): one line, and no folder made."""
    out = tmp_path / "shards"
    assert cli.main(["shard", "--root", str(synthetic), "--out", str(out), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}", err
    assert not out.exists()


def test_test_set_packs_every_frame(synthetic, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    link_media(synthetic, root)
    held = sorted(v.name for v in discover(synthetic) if v.split == "val")[:2]
    for split in ("Train_Set", "Validation_Set"):
        (root / ANN / split).mkdir(parents=True)
        for f in (synthetic / ANN / split).glob("*.txt"):
            if f.stem not in held:
                (root / ANN / split / f.name).write_bytes(f.read_bytes())
    (tmp_path / "test.txt").write_text("\n".join(held) + "\n")
    videos = discover(root, test_list=tmp_path / "test.txt")
    out = tmp_path / "shards"
    manifest = pack(videos, out, PackParams(samples_per_shard=400), workers=2)
    got = {}
    for s in samples(out, "test-*.tar"):
        meta = SampleMeta.from_bytes(s["json"])
        assert int(s["cls"]) == -1 == meta.label and meta.split == "test"
        got.setdefault(meta.video, []).append(meta.frame)
    for name in held:
        v = next(v for v in videos if v.name == name)
        frames = len(read_annotation(synthetic / ANN / "Validation_Set" / f"{name}.txt"))
        assert sorted(got[name]) == list(range(1, frames + 1))  # every frame, crop or not
        assert len(list_crops(v.crops)) < frames
    assert manifest.groups["test"].samples == sum(len(f) for f in got.values())


@pytest.fixture
def damaged(synthetic, tmp_path):
    """A copy of the synthetic set with one of each kind of bad input that must not stop packing."""
    root = tmp_path / "data"
    shutil.copytree(synthetic, root)
    videos = {v.name: v for v in discover(root)}
    names = sorted(n for n in videos if "_" not in n)
    crops = sorted(videos[names[0]].crops.glob("*.jpg"))
    crops[5].write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" + bytes(300) + b"\xff\xd9")
    crops[9].write_bytes(crops[9].read_bytes()[:700])  # truncated
    videos[names[1]].media.write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage")  # unreadable video
    videos[names[2]].media.unlink()  # an annotation without a video
    shutil.rmtree(videos[names[3]].crops)  # a video with no crop folder
    return root, names, crops


def test_bad_input_is_counted_and_reported(damaged, tmp_path):
    root, names, crops = damaged
    out = tmp_path / "shards"
    manifest = pack(discover(root), out, PackParams(samples_per_shard=150), workers=2)
    records, problems = manifest.videos, "\n".join(manifest.problems)
    assert records[names[0]].corrupt_crops == 2
    assert f"{names[0]}: 2 corrupt crop(s) treated as missing" in problems
    by_key = {s["__key__"]: s for s in samples(out)}
    good = {int(p.stem): p for p in crops if p not in (crops[5], crops[9])}
    for bad in (crops[5], crops[9]):
        frame = int(bad.stem)
        sample = by_key.get(f"{names[0]}/{frame:05d}")
        if sample is not None:  # labelled: filled from the nearest readable crop
            src = SampleMeta.from_bytes(sample["json"]).filled_from
            assert src != frame and sample["jpg"] == good[src].read_bytes()
    assert records[names[1]].audio is False and f"{names[1]}: video unreadable" in problems
    assert records[names[2]].audio is False and f"{names[2]}: no video file found" in problems
    assert records[names[3]].samples == 0
    assert records[names[3]].dropped == {"no readable crop in the video": records[names[3]].labelled}
    assert f"{names[3]}: {records[names[3]].labelled} frame(s) dropped" in problems
    assert manifest.totals.samples == manifest.totals.labelled - records[names[3]].labelled


def test_packing_again_keeps_the_shards_of_the_same_inputs_and_refuses_changed_ones(
    synthetic, shards, tmp_path, capsys
):
    """A second `fer-dist shard` into a folder: the same inputs (a copy of them too) give the shards
    there, said so; a crop re-saved, a label changed (even to a digit of the same length) or a
    video replaced are other inputs, refused instead of answered with the old shards."""
    from PIL import Image

    from fer_dist.data.packing.pack import fingerprint

    assert pack(discover(synthetic), shards, PackParams(samples_per_shard=150), workers=2) == read_manifest(shards)
    assert "kept, nothing packed again" in " ".join(capsys.readouterr().err.split())
    copy = tmp_path / "copy"
    shutil.copytree(synthetic, copy)
    same = fingerprint(discover(copy))
    assert same == fingerprint(discover(synthetic))
    video = discover(copy)[0]
    changes = [
        lambda: (
            Image.open(sorted(video.crops.glob("*.jpg"))[3])
            .resize((100, 90))
            .save(sorted(video.crops.glob("*.jpg"))[3])
        ),
        lambda: video.annotation.write_text(video.annotation.read_text().replace("\n3\n", "\n0\n", 1)),
        lambda: video.media.write_bytes(video.media.read_bytes()[:-100]),
    ]
    for change in changes:
        change()
        assert fingerprint(discover(copy)) != same
        same = fingerprint(discover(copy))
    with pytest.raises(InputError, match="other inputs or settings"):
        pack(discover(copy), shards, PackParams(samples_per_shard=150), workers=2)
    assert cli.main(["shard", "--root", str(copy), "--out", str(shards), "--samples-per-shard", "150"]) == 2
    assert "holds shards made from other inputs or settings" in capsys.readouterr().err  # one line, no traceback


def test_malformed_annotation_is_a_clear_error(synthetic, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    link_media(synthetic, root)
    shutil.copytree(synthetic / ANN.parent, root / ANN.parent)
    victim = sorted((root / ANN / "Train_Set").glob("*.txt"))[0]
    lines = victim.read_text().splitlines()
    lines[10] = "3,4"
    victim.write_text("\n".join(lines) + "\n")
    with pytest.raises(LayoutError, match=rf"{victim.name}:11: malformed label '3,4'"):
        pack(discover(root), tmp_path / "shards", PackParams(), workers=2)
    victim.write_text("Valence,Arousal\n0.1,0.2\n")
    with pytest.raises(LayoutError, match=rf"{victim.name}:1: header"):
        pack(discover(root), tmp_path / "shards2", PackParams(), workers=2)


def test_no_annotation_folder_is_a_clear_error(tmp_path):
    (tmp_path / "cropped_aligned").mkdir()
    with pytest.raises(LayoutError, match="no annotation folder found"):
        discover(tmp_path)


def run_until(cmd, ready, timeout=120):
    """Starts the command in its own process group and kills the whole group with SIGKILL once
    `ready()` holds: the packer and its worker processes die at once, as under a node failure."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    return proc.wait()


@pytest.mark.slow
def test_kill_and_resume_is_byte_identical(synthetic, shards, tmp_path):
    out = tmp_path / "shards"
    cmd = [
        sys.executable,
        "-m",
        "fer_dist.cli",
        "shard",
        "--src",
        "affwild2",
        "--root",
        str(synthetic),
        "--out",
        str(out),
        "--samples-per-shard",
        "150",
        "--workers",
        "2",
    ]
    work = out / ".work"
    assert run_until(cmd, lambda: len(list(work.glob("*.json"))) >= 2) == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert run_until(cmd, lambda: len(list(out.glob("fold*.tar"))) >= 2) == -signal.SIGKILL
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    reference = sorted(p.name for p in shards.glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == reference
    for name in reference:
        assert (out / name).read_bytes() == (shards / name).read_bytes(), name
    assert (out / "manifest.json").read_bytes() == (shards / "manifest.json").read_bytes()
    assert not list(out.glob("*.tmp")) and not work.exists()
