import pytest

from fer_dist.data.packing.layout import LayoutError, read_annotation
from fer_dist.labels import CLASSES


def test_labels_crlf_and_unannotated(tmp_path):
    f = tmp_path / "v.txt"
    f.write_bytes((",".join(CLASSES) + "\r\n0\r\n-1\r\n7\r\n").encode())
    assert read_annotation(f).tolist() == [0, -1, 7]


def test_seven_class_header_maps_by_name(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise\n6\n4\n")
    assert read_annotation(f).tolist() == [CLASSES.index("Surprise"), CLASSES.index("Happiness")]


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text(",".join(CLASSES) + "\n0\n3.5\n")
    with pytest.raises(LayoutError, match=r"v\.txt:3: malformed label '3\.5'"):
        read_annotation(f)


def test_out_of_range_label(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text(",".join(CLASSES) + "\n8\n")
    with pytest.raises(LayoutError, match=r"v\.txt:2"):
        read_annotation(f)


def test_other_header_is_refused(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("valence,arousal\n0.1,0.2\n")
    with pytest.raises(LayoutError, match="is not a header of expressions but of valence-arousal"):
        read_annotation(f)


def test_blank_lines_at_the_end_carry_no_frame(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text(",".join(CLASSES) + "\n0\n5\n\n  \n\t\n")
    assert read_annotation(f).tolist() == [0, 5]


def test_blank_line_before_more_labels_is_malformed(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text(",".join(CLASSES) + "\n0\n\n5\n\n")
    with pytest.raises(LayoutError, match=r"v\.txt:3: malformed label ''"):
        read_annotation(f)
