"""The tracks of Aff-Wild2 (expressions, action units, valence-arousal): their annotation files
read in every edition's layout, their metrics against hand-computed values, and `fer-dist score`
on both submission formats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fer_dist import cli
from fer_dist.data.packing.annotations import read_labels
from fer_dist.data.packing.layout import LayoutError, discover, read_annotation, track_folders
from fer_dist.engine.metrics import always_positive_f1, au_thresholds, binary_f1, ccc, macro_f1, track_scores
from fer_dist.errors import InputError
from fer_dist.results.score import ScoreError, score
from fer_dist.results.submission import read_template
from fer_dist.tracks import ACTION_UNITS, TRACKS, TrackError, parse_tracks, track

AU, VA, EXPR = TRACKS["au"], TRACKS["va"], TRACKS["expr"]


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_track_names_are_checked_and_ordered():
    assert [t.name for t in parse_tracks("va, expr,va")] == ["expr", "va"]
    with pytest.raises(TrackError, match="unknown track 'aus'; fer-dist knows expr, au, va"):
        track("aus")
    with pytest.raises(TrackError, match="names no track"):
        parse_tracks(" , ")


def test_action_unit_files_are_read_by_header_name_with_minus_one_rows_not_annotated(tmp_path):
    header = list(reversed(ACTION_UNITS))  # columns named in another order go to their own AU
    rows = [
        "1,0,0,0,0,0,0,0,0,0,0,0",
        "-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1",
        "0,0,0,0,0,0,0,0,0,0,0,-1",
        " 0, 1,0,0,0,0,0,0,0,0,0,1",
    ]
    labels = read_annotation(write(tmp_path / "v.txt", [",".join(header), *rows]), AU)
    assert labels.shape == (4, 12) and labels.dtype == np.int8
    assert labels[0].tolist() == [0] * 11 + [1]  # the first column was AU26
    assert AU.annotated(labels).tolist() == [True, False, False, True]  # any -1 in a row: not annotated
    assert labels[3].tolist() == [1] + [0] * 9 + [1, 0]


def test_valence_arousal_files_mark_minus_five_rows_not_annotated(tmp_path):
    labels = read_annotation(write(tmp_path / "v.txt", ["arousal,valence", "0.5,-0.25", "-5,-5", "1,-1", "-5,0.1"]), VA)
    assert labels.dtype == np.float64 and labels[0].tolist() == [-0.25, 0.5]  # valence first, by name
    assert VA.annotated(labels).tolist() == [True, False, True, False]


@pytest.mark.parametrize(
    ("t", "header", "row", "says"),
    [
        ("au", ",".join(ACTION_UNITS), "0,1,2,0,0,0,0,0,0,0,0,0", "each AU is 0 or 1"),
        ("au", ",".join(ACTION_UNITS), "0,1,0,0", r"4 value\(s\) in '0,1,0,0'; action units rows hold 12"),
        ("va", "valence,arousal", "0.3,1.5", r"valence and arousal lie in \[-1, 1\]"),
        ("va", "valence,arousal", "0.3,nan", r"valence and arousal lie in \[-1, 1\]"),
        ("va", "valence,arousal", "0.3;0.2", "1 value"),
        ("va", "valence,arousal", "high,low", "expected 2 numbers"),
        ("expr", "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other", "9", "malformed label '9'"),
    ],
)
def test_a_malformed_row_is_refused_naming_the_file_and_line(tmp_path, t, header, row, says):
    good = "0,0,0,0,0,0,0,0,0,0,0,0" if t == "au" else ("0.1,0.2" if t == "va" else "3")
    path = write(tmp_path / "clip.txt", [header, good, good, row, good])
    with pytest.raises(LayoutError, match=rf"clip.txt:4: .*{says}"):
        read_annotation(path, TRACKS[t])


def test_a_header_of_another_track_is_refused(tmp_path):
    path = write(tmp_path / "v.txt", ["valence,arousal", "0.1,0.2"])
    with pytest.raises(LayoutError, match=r"v.txt:1: header 'valence,arousal' is not a header of action units but of"):
        read_annotation(path, AU)
    with pytest.raises(LayoutError, match="not a header of valence-arousal; expected"):
        read_annotation(write(tmp_path / "w.txt", ["valence", "0.1"]), VA)  # every column is needed


def test_each_tracks_folder_is_found_under_any_editions_name_nested_or_not(tmp_path):
    root = tmp_path / "3rd ABAW Annotations"
    (root / "Third ABAW Annotations" / "AU_Detection_Challenge" / "Train_Set").mkdir(parents=True)
    (root / "EXPR_Classification_Challenge" / "Train_Set").mkdir(parents=True)
    (root / "VA_Estimation_Challenge" / "Validation_Set").mkdir(parents=True)
    found = track_folders(tmp_path, list(TRACKS.values()))
    assert {k: v.name for k, v in found.items()} == {
        "expr": "EXPR_Classification_Challenge",
        "au": "AU_Detection_Challenge",
        "va": "VA_Estimation_Challenge",
    }
    assert track_folders(tmp_path / "3rd ABAW Annotations" / "Third ABAW Annotations", [VA, AU]).keys() == {"au"}
    (tmp_path / "old" / "annotations" / "AU_Set").mkdir(parents=True)
    with pytest.raises(LayoutError, match="several action units annotation folders"):
        track_folders(tmp_path, [AU])


def test_ccc_f1_and_thresholds_against_hand_computed_values():
    # x = 1, 2, 3, 4 against y = 2, 2, 3, 5: means 2.5 and 3, cov 1.25, variances 1.25 and 1.5
    assert ccc(np.array([1, 2, 3, 4]), np.array([2, 2, 3, 5])) == pytest.approx(2 * 1.25 / (1.25 + 1.5 + 0.25))
    assert ccc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(1.0)
    assert ccc(np.full(3, 0.5), np.full(3, 0.5)) == 0.0
    labels = np.array([[1, 1], [1, 0], [0, 0], [0, 1]])
    preds = np.array([[1, 1], [0, 1], [1, 0], [0, 1]])
    assert binary_f1(labels, preds).tolist() == pytest.approx([2 * 1 / (2 + 2), 2 * 2 / (2 + 3)])
    assert always_positive_f1(labels).tolist() == pytest.approx([2 * 0.5 / 1.5, 2 * 0.5 / 1.5])
    # AU 0 is told apart only above 0.6; AU 1 by any threshold in (0.2, 0.8]: the one nearest 0.5 wins
    probs = np.array([[0.9, 0.8], [0.7, 0.6], [0.6, 0.2], [0.1, 0.2]])
    truth = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])
    assert au_thresholds(truth, probs).tolist() == pytest.approx([0.65, 0.5])


def test_track_scores_leave_out_frames_not_annotated():
    labels = np.array([[0.5, 0.1], [-5, -5], [0.1, 0.3], [-0.2, 0.9]], np.float32)
    preds = np.array([[0.4, 0.0], [0.9, 0.9], [0.2, 0.4], [-0.1, 0.5]], np.float32)
    got = track_scores(VA, labels, preds)
    keep = [0, 2, 3]
    v, a = (ccc(preds[keep, d], labels[keep, d]) for d in (0, 1))
    assert got["frames"] == 3 and got["p_va"] == pytest.approx((v + a) / 2)
    assert got["parts"] == {"valence": pytest.approx(v, abs=1e-6), "arousal": pytest.approx(a, abs=1e-6)}
    classes = np.array([0, -1, 3, 3, 7])
    assert track_scores(EXPR, classes, np.array([0, 5, 3, 1, 7]))["macro_f1"] == pytest.approx(
        macro_f1(classes, np.array([0, 5, 3, 1, 7]))
    )


@pytest.fixture
def au_set(tmp_path):
    """Two annotated videos of the AU track, their true labels, and a prediction for each frame."""
    rng = np.random.default_rng(0)
    truth = {"a": rng.integers(0, 2, (30, 12)), "b_left": rng.integers(0, 2, (20, 12))}
    truth["a"][5] = -1  # frame 6 is not annotated: never scored, but an ABAW3 file still has its row
    pred = {v: np.where(rng.random(t.shape) < 0.8, np.abs(t), 1 - np.abs(t)) for v, t in truth.items()}
    folder = tmp_path / "AU_Detection_Challenge" / "Validation_Set"
    for v, t in truth.items():
        write(folder / f"{v}.txt", [",".join(ACTION_UNITS), *(",".join(map(str, r)) for r in t)])
    return folder, truth, pred


def submissions(tmp_path, t, pred):
    """The ABAW3 folder and the ABAW5/6 file of predictions `pred` ({video: rows})."""
    abaw3 = tmp_path / "abaw3"
    for v, rows in pred.items():
        write(abaw3 / f"{v}.txt", [",".join(t.columns), *(t.format(r) for r in rows)])
    lines = [f"{v}/{i + 1:05d}.jpg,{t.format(r)}" for v, rows in pred.items() for i, r in enumerate(rows)]
    return abaw3, write(tmp_path / "abaw5.csv", ["image_location," + ",".join(t.columns), *lines[::-1]])


def test_score_gives_the_same_figure_from_both_formats_and_by_hand(tmp_path, au_set):
    folder, truth, pred = au_set
    keep = {v: AU.annotated(t) for v, t in truth.items()}
    f1 = binary_f1(*(np.concatenate([x[v][keep[v]] for v in truth]) for x in (truth, pred)))
    for submission in submissions(tmp_path, AU, pred):
        got = score(AU, folder, submission)
        assert got["au_f1"] == pytest.approx(f1.mean()) and got["frames"] == 49
        assert list(got["parts"]) == list(ACTION_UNITS)


def test_score_of_valence_arousal_on_the_command_line(tmp_path, capsys):
    rng = np.random.default_rng(1)
    truth = rng.uniform(-1, 1, (40, 2)).round(3)
    pred = (truth + rng.normal(0, 0.3, truth.shape)).clip(-1, 1)
    folder = tmp_path / "va"
    write(folder / "x.txt", ["valence,arousal", *(f"{v},{a}" for v, a in truth)])
    abaw3, abaw5 = submissions(tmp_path, VA, {"x": pred})
    assert cli.main(["score", "--track", "va", "--annotations", str(folder), "--submission", str(abaw5), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = [ccc(np.round(pred[:, d], 6), truth[:, d]) for d in (0, 1)]  # the file holds 6 significant digits
    assert got["p_va"] == pytest.approx(np.mean(want), abs=1e-5) and got["frames"] == 40
    assert cli.main(["score", "--track", "va", "--annotations", str(folder), "--submission", str(abaw3)]) == 0
    assert "P_VA (mean CCC)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda lines: [lines[0], *lines[2:]], r"1 annotated frame\(s\) have no prediction, e.g. b_left/00020"),
        (lambda lines: [*lines[:3], "a/00001.jpg,1,0", *lines[3:]], r"abaw5.csv:4: 2 value\(s\); action units"),
        (lambda lines: [*lines[:3], lines[2]], r"abaw5.csv:4: .*/000\d\d is given twice"),
        (lambda lines: [*lines[:3], "a/frame1.jpg," + "0," * 11 + "0"], r"abaw5.csv:4: 'a/frame1.jpg' is not"),
        (lambda lines: ["image,AU1", *lines[1:]], "abaw5.csv:1: an ABAW5/6 submission's header starts with"),
        (lambda lines: [*lines[:3], "a/00001.jpg," + "-1," * 11 + "-1"], "the 'not annotated' marker"),
    ],
)
def test_a_submission_that_lacks_frames_or_holds_bad_rows_is_refused(tmp_path, au_set, capsys, damage, says):
    folder, truth, pred = au_set
    _, abaw5 = submissions(tmp_path, AU, pred)
    abaw5.write_text("\n".join(damage(abaw5.read_text().splitlines())) + "\n")
    with pytest.raises(ScoreError, match=says):
        score(AU, folder, abaw5)
    assert cli.main(["score", "--track", "au", "--annotations", str(folder), "--submission", str(abaw5)]) == 2
    assert "error:" in capsys.readouterr().err


def test_an_abaw3_folder_missing_a_video_or_a_frame_is_refused(tmp_path, au_set):
    folder, truth, pred = au_set
    abaw3, _ = submissions(tmp_path, AU, pred)
    lines = (abaw3 / "a.txt").read_text().splitlines()
    (abaw3 / "a.txt").write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(ScoreError, match=r"2 annotated frame\(s\) have no prediction, e.g. a/00029, a/00030"):
        score(AU, folder, abaw3)
    (abaw3 / "a.txt").unlink()
    with pytest.raises(ScoreError, match=r"29 annotated frame\(s\)"):
        score(AU, folder, abaw3)
    with pytest.raises(ScoreError, match="it holds AU_Detection_Challenge.*: name one"):
        score(AU, tmp_path, abaw3)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-8"])
def test_an_annotation_file_in_windows_encodings_reads_as_its_utf8_twin(tmp_path, encoding):
    """Notepad's "Unicode" (UTF-16 LE with a byte-order mark, CRLF), its big-endian twin and UTF-8
    with a mark give the labels of the plain UTF-8 file; a file in none of them is one line."""
    lines = [",".join(ACTION_UNITS), "1,0,0,0,0,0,0,0,0,0,0,1", "-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1"]
    plain = write(tmp_path / "plain.txt", lines)
    other = tmp_path / "other.txt"
    text = "\r\n".join(lines) + "\r\n"
    other.write_bytes(("\ufeff" + text).encode(encoding))  # the byte-order mark first
    assert np.array_equal(read_annotation(other, AU), read_annotation(plain, AU))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\nNeutré\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin.txt: not text in UTF-8, or UTF-16 with a byte-order mark"):
        read_annotation(latin, EXPR)


def test_score_reads_a_utf16_submission_and_counts_rows_past_a_videos_end(tmp_path, au_set, capsys):
    folder, truth, pred = au_set
    abaw3, abaw5 = submissions(tmp_path, AU, pred)
    want = score(AU, folder, abaw5)
    abaw5.write_bytes(abaw5.read_text().replace("\n", "\r\n").encode("utf-16"))
    assert score(AU, folder, abaw5) == want and want["past_end"] == 0
    with open(abaw3 / "b_left.txt", "a") as extra:  # b_left's file annotates 20 frames; 2 rows more
        extra.write("0,0,0,0,0,0,0,0,0,0,0,0\n1,1,1,1,1,1,1,1,1,1,1,1\n")
    got = score(AU, folder, abaw3)
    assert got["past_end"] == 2 and got["au_f1"] == want["au_f1"]
    assert cli.main(["score", "--track", "au", "--annotations", str(folder), "--submission", str(abaw3)]) == 0
    assert "2 row(s) lie past the end" in " ".join(capsys.readouterr().err.split())
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"image_location,AU1\n\xff\xfe\x00broken")
    assert cli.main(["score", "--track", "au", "--annotations", str(folder), "--submission", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv: not text in UTF-8" in err and "Traceback" not in err


def test_a_constant_prediction_has_a_ccc_of_zero_not_minus_zero():
    got = ccc(np.zeros(5), np.array([0.1, -0.2, 0.3, 0.0, 0.5]))
    assert got == 0 and np.copysign(1, got) == 1


def user_files(tmp_path):
    """Each kind of text file a user hands fer-dist, as UTF-8 text, and how fer-dist reads it."""
    root = tmp_path / "root"
    write(root / "EXPR_Recognition_Challenge" / "Train_Set" / "a.txt", [",".join(EXPR.columns), "3", "-1"])
    for video in ("a", "b", "c"):  # a annotated; b and c the test list's
        (root / "cropped_aligned" / video).mkdir(parents=True)
    return {
        "labels CSV": (
            "video,start_frame,end_frame,label\r\nclip1,1,30,Happiness\r\n",
            lambda path: [(r.video, r.start, r.end, r.label, r.split) for r in read_labels(path)],
        ),
        "template": ("image_location,Neutral\r\nb/00001.jpg,\r\nb/00002.jpg,\r\n", read_template),
        "test list": ("b\r\nc\r\n", lambda path: discover(root, test_list=path)),
        "annotations": ("valence,arousal\r\n0.5,-0.25\r\n-5,-5\r\n", lambda path: read_annotation(path, VA).tolist()),
    }


@pytest.mark.parametrize("kind", ["labels CSV", "template", "test list", "annotations"])
@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-8"])
def test_every_text_file_a_user_hands_over_reads_the_same_in_utf16_or_with_a_bom(tmp_path, kind, encoding):
    """What Windows editors save (UTF-16 with a byte-order mark, either byte order; UTF-8 with a
    mark; CRLF) reads as its plain UTF-8 twin, for every kind of file; latin-1 is refused in one
    line naming the file."""
    text, read = user_files(tmp_path)[kind]
    plain, marked, latin = tmp_path / "plain.txt", tmp_path / "marked.txt", tmp_path / "latin.txt"
    plain.write_bytes(text.encode())
    marked.write_bytes(("\ufeff" + text).encode(encoding))
    assert read(marked) == read(plain)
    latin.write_bytes(text.replace("\r\n", "é\r\n", 1).encode("latin-1"))
    with pytest.raises(InputError, match=r"latin.txt: not text in UTF-8, or UTF-16 with a byte-order mark"):
        read(latin)
    for unmarked in ("utf-16-le", "utf-32-le"):  # UTF-16 without a mark decodes as UTF-8 full of NULs
        latin.write_bytes(text.encode(unmarked))
        with pytest.raises(InputError, match=r"latin.txt: .*a NUL character at byte \d+: UTF-16 or UTF-32"):
            read(latin)
    for utf32 in ("utf-32-le", "utf-32-be"):  # with its mark, UTF-32 is named (its LE mark begins as UTF-16's)
        latin.write_bytes(("\ufeff" + text).encode(utf32))
        with pytest.raises(
            InputError, match=r"latin.txt: text in UTF-32 \(its byte-order mark says so\), which is not"
        ):
            read(latin)
