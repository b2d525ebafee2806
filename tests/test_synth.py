from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from fer_dist import cli
from fer_dist.data.packing.layout import discover, read_annotation
from fer_dist.data.packing.synth import LOOK, SOUND, shape_segments, synthesize
from fer_dist.labels import CLASSES
from helpers import LENGTH, N_VIDEOS

HEADER = ",".join(CLASSES)


def test_layout_is_affwild2(synthetic):
    ann = synthetic / "6th ABAW Annotations" / "EXPR_Recognition_Challenge"
    files = sorted(ann.glob("*/*.txt"))
    assert {f.parent.name for f in files} == {"Train_Set", "Validation_Set"}
    assert len(files) == N_VIDEOS + 1  # one video holds a _left/_right pair
    for f in files:
        lines = f.read_text().splitlines()
        assert lines[0] == HEADER
        assert {int(x) for x in lines[1:]} <= set(range(-1, 8))
    assert any("-1" in f.read_text().splitlines()[1:] for f in files)
    videos = discover(synthetic)
    left = next(v for v in videos if v.name.endswith("_left"))
    right = next(v for v in videos if v.name.endswith("_right"))
    assert left.media == right.media and left.media.suffix == ".mp4"
    assert any(v.media.suffix == ".avi" for v in videos)
    assert (synthetic / "cropped_aligned_new_50_vids").is_dir() and (synthetic / "new_vids").is_dir()


def test_videos_are_real_containers(synthetic):
    rates, silent = set(), 0
    for media in {v.media for v in discover(synthetic)}:
        with av.open(str(media)) as c:
            rates.add(Fraction(c.streams.video[0].average_rate))
            silent += not c.streams.audio
    assert {Fraction(25), Fraction(30000, 1001), Fraction(30)} <= rates
    assert silent == 1


def test_crops_have_gaps_and_real_size(synthetic):
    for v in discover(synthetic):
        labels = read_annotation(v.annotation)
        crops = sorted(int(p.stem) for p in v.crops.glob("*.jpg"))
        assert crops[-1] <= len(labels) and len(crops) < len(labels)
        assert Image.open(v.crops / f"{crops[0]:05d}.jpg").size == (112, 112)


def test_every_class_in_every_video(synthetic):
    for v in discover(synthetic):
        assert set(read_annotation(v.annotation).tolist()) == set(range(-1, 8))


def test_needs_both_modalities():
    pairs = {(LOOK[c], SOUND[c]) for c in range(8)}
    assert len(pairs) == 8  # both together separate every class
    same_look = [(a, b) for a in range(8) for b in range(a + 1, 8) if LOOK[a] == LOOK[b]]
    same_sound = [(a, b) for a in range(8) for b in range(a + 1, 8) if SOUND[a] == SOUND[b]]
    assert len(same_look) >= 2 and len(same_sound) >= 2


@pytest.mark.slow
def test_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        synthesize(d, 4, seed=3, workers=1, length=LENGTH)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and {f.suffix for f in files_a} == {".txt", ".jpg", ".mp4", ".avi"}
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    c = tmp_path / "c"
    synthesize(c, 4, seed=4, workers=1, length=LENGTH)
    texts = sorted(f for f in files_a if f.suffix == ".txt")
    assert any((c / f).read_text() != (a / f).read_text() for f in texts)


def test_audio_follows_the_sound_of_the_label(synthetic):
    """Frames of classes that share a sound have alike spectra; classes that do not, differ."""
    from fer_dist.data.packing.audio import frame_columns, frame_times, log_mel, read_media, seconds
    from fer_dist.data.shards.format import MelParams

    v = next(v for v in discover(synthetic) if v.media.suffix == ".mp4" and "_" not in v.name)
    labels = read_annotation(v.annotation)
    media = read_media(v.media, 32000)
    p = MelParams()
    times = seconds(frame_times(media, len(labels)))
    cols = frame_columns(log_mel(media.audio, p), times, len(labels), p)[:, 32:-32]
    profile = {c: cols[:, labels == c].mean(1) for c in range(8)}
    anger, disgust, happy = profile[1], profile[2], profile[4]
    assert np.abs(anger - disgust).mean() < 0.5 * np.abs(anger - happy).mean()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--length", "299"], "--length must be at least 300 frames a video, to hold every class; got 299"),
        (["--videos", "3"], "--videos must be at least 4 (the layout's quirks need that many); got 3"),
    ],
)
def test_synth_refuses_a_set_it_cannot_make_in_one_line(tmp_path, capsys, args, says):
    """Too few frames a video or too few videos: one line, exit 2, nothing written."""
    assert cli.main(["synth", "--out", str(tmp_path / "set"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err
    assert not (tmp_path / "set").exists()


def test_shapes_are_drawn_in_the_asked_size_range():
    """Each label segment gets one placement, its size within `shape_size` (px of the 112-px crop)."""
    seg_start = np.repeat(np.arange(0, 400, 40), 40)  # ten segments of 40 frames
    placed = shape_segments(np.random.default_rng(0), seg_start, (34.0, 50.0))
    assert sorted(placed) == list(range(0, 400, 40))
    assert all(34 <= size <= 50 for _, size, _ in placed.values())


@pytest.mark.parametrize("sizes", [(3, 20), (30, 20), (20, 101), (20,)])
def test_synthesize_refuses_a_shape_size_the_crop_cannot_hold(tmp_path, sizes):
    """Too small, reversed, too large or not a pair: ValueError naming the rule, nothing written."""
    with pytest.raises(ValueError, match=r"shape_size must be \(least, most\) px with 4 <= least <= most <= 100"):
        synthesize(tmp_path / "set", 4, length=300, style="shapes", shape_size=sizes)
    assert not (tmp_path / "set").exists()
