import itertools

import pytest

from fer_dist import cli
from fer_dist.data.packing.layout import CROP_DIRS, VIDEO_DIRS, LayoutError, discover, read_annotation
from fer_dist.data.packing.pack import pack
from fer_dist.data.shards.format import PackParams, read_manifest
from fer_dist.errors import InputError
from fer_dist.labels import CLASSES
from helpers import clash, mirror


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


@pytest.mark.parametrize(
    ("first", "second"),
    [*itertools.permutations(VIDEO_DIRS, 2), *itertools.permutations(CROP_DIRS, 2)],
)
def test_a_name_in_two_folders_is_refused_naming_both_unless_one_is_preferred(synthetic, tmp_path, first, second):
    """Every pair of video folders and of crop folders: a clash names both paths and the option;
    --prefer (a folder's name or path) picks the file, and the other is kept as passed over."""
    root = mirror(synthetic, tmp_path / "root")
    kept, twin = clash(root, first, second)
    with pytest.raises(LayoutError, match=r"1 (video file|crop folder) name\(s\) in several folders") as refused:
        discover(root)
    both = {f"{kept} and {twin}", f"{twin} and {kept}"}  # in the order the folders are searched
    assert any(pair in str(refused.value) for pair in both) and "--prefer FOLDER" in str(refused.value)
    for prefer, chosen, lost in (([second], twin, kept), ([str(root / first)], kept, twin)):
        video = next(v for v in discover(root, prefer=prefer) if kept.stem in (v.name, v.parent))
        assert (video.crops if kept.is_dir() else video.media) == chosen and video.passed_over == (lost,)


def test_clashing_videos_and_crop_folders_are_refused_in_one_line_naming_both_kinds(synthetic, tmp_path):
    """A video name in two video folders and a crop folder name in two crop folders: one refusal
    names both clashes (the first run reported only the crop folders', a second the videos')."""
    root = mirror(synthetic, tmp_path / "root")
    video, video_twin = clash(root, "batch1", "batch2")
    crops, crops_twin = clash(root, "cropped_aligned", "cropped_aligned_new_50_vids")
    with pytest.raises(LayoutError) as refused:
        discover(root)
    said = str(refused.value)
    assert "1 video file name(s) in several folders" in said and "1 crop folder name(s) in several folders" in said
    assert f"{video} and {video_twin}" in said and f"{crops} and {crops_twin}" in said


def test_two_containers_of_a_video_in_one_folder_pack_the_mp4_and_say_so(synthetic, tmp_path, capsys):
    root = mirror(synthetic, tmp_path / "root")
    mp4 = sorted((root / "batch1").glob("*.mp4"))[0]
    mkv = mp4.with_suffix(".mkv")
    mkv.symlink_to(mp4.resolve())
    video = next(v for v in discover(root) if v.media in (mp4, mkv))
    assert video.media == mp4 and video.passed_over == (mkv,)
    out = tmp_path / "shards"
    assert cli.main(["shard", "--root", str(root), "--out", str(out)]) == 0
    said = "".join(capsys.readouterr().err.split())
    assert "".join(f"{mp4} packed, not {mkv} (the .mp4 beside it)".split()) in said


def test_a_preferred_folder_is_packed_and_said_in_a_warning(synthetic, tmp_path, capsys):
    root = mirror(synthetic, tmp_path / "root")
    kept, twin = clash(root, "batch1", "new_vids")
    out = tmp_path / "shards"
    assert cli.main(["shard", "--root", str(root), "--out", str(out), "--prefer", "new_vids"]) == 0
    said = "".join(capsys.readouterr().err.split())  # the console wraps long paths anywhere
    assert "".join(f"{twin} packed, not {kept} (--prefer)".split()) in said
    assert any(f"{twin} packed, not {kept}" in p for p in read_manifest(out).problems)


def test_prefer_takes_a_folder_by_name_or_any_path_and_refuses_one_naming_none_or_two(synthetic, tmp_path, monkeypatch):
    root = mirror(synthetic, tmp_path / "root")
    kept, twin = clash(root, "batch1", "batch2")
    monkeypatch.chdir(tmp_path)
    for prefer in ("batch2", "batch2/", str(root / "batch2"), "root/batch2/", "./root/../root/batch2"):
        video = next(v for v in discover(root, prefer=[prefer]) if v.parent == kept.stem)
        assert video.media == twin, prefer
    with pytest.raises(LayoutError, match="--prefer batch9 names none of the folders searched"):
        discover(root, prefer=["batch9"])
    with pytest.raises(LayoutError, match="--prefer names none of a clash's folders"):
        discover(root, prefer=["new_vids"])
    other = tmp_path / "elsewhere" / "batch2"
    other.mkdir(parents=True)
    with pytest.raises(LayoutError, match=rf"--prefer batch2 names {root / 'batch2'} and {other}; give the path"):
        discover(root, video_dirs=[root / "batch1", root / "batch2", other], prefer=["batch2"])
    args = cli.parser().parse_args(["shard", "--root", "r", "--out", "o", "--prefer", "a", "--prefer", "b", "c"])
    assert args.prefer == ["a", "b", "c"]  # a repeated option adds to the list


def test_a_bad_annotation_file_is_refused_before_anything_is_written_and_the_mended_rerun_packs(synthetic, tmp_path):
    root = mirror(synthetic, tmp_path / "root")
    videos = discover(root)
    first = videos[0].annotation
    good = first.read_bytes()
    first.unlink()
    first.write_bytes(good.replace(b"Neutral", "Neutré".encode("latin-1"), 1))
    out = tmp_path / "shards"
    with pytest.raises(InputError, match="not text in UTF-8"):
        pack(discover(root), out, PackParams(), workers=1)
    assert not out.exists()
    first.write_bytes(good)
    assert pack(discover(root), out, PackParams(), workers=1).totals.videos == len(videos)


def test_a_test_list_naming_a_video_found_nowhere_or_a_file_name_is_refused(synthetic, tmp_path):
    listed = tmp_path / "test_set.txt"
    listed.write_text("8-30-640x36\n")  # a typo: no crops, no video
    with pytest.raises(LayoutError, match=r"test video\(s\) 8-30-640x36 have neither a crop folder nor a video file"):
        discover(synthetic, test_list=listed)
    listed.write_text("8-30-640x360.mp4\n")
    with pytest.raises(LayoutError, match=r"shard keys cannot \(list it as 8-30-640x360, without .mp4\)"):
        discover(synthetic, test_list=listed)
