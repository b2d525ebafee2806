"""Files damaged part way, made from `fer-dist synth` videos with PyAV and plain byte writes: an MP4
with random bytes written over 2 % of it in its middle (8 of its 333 frames and 0.28 s of its sound
then do not decode; fer-dist used to stop at the first, packing the 153 frames after it as past the
video's end, silent), the same kind of file in Matroska damaged alike (its demuxer drops the damaged
clusters, 54 frames and 1.8 s of sound, with no error but a line in FFmpeg's log), an AVI whose index
is cut short (it lists half the packets, and FFmpeg reads no more through it), a file cut off, and a
Matroska copy with bytes written over three places (99 packets dropped by its demuxer; 13 after them
come with timestamps but give no picture and no error: fer-dist counted 320 of its 333 frames and
placed every frame after frame 151 13 frames late), Matroska copies damaged near their end (the
demuxer drops the last cluster with nothing after it: fer-dist ended the video at the last frame it
read, 512 of 530, with nothing counted lost and false warnings of labels past the end) and cut off
(its demuxer raises no error: fer-dist took it for a whole, shorter video). Each is held to the
right value, taken from the intact file: every frame keeps its number and timestamp,
the sound that decodes lies at its own time, what is lost is counted (and warned once by `fer-dist
shard`, shown by `fer-dist inspect`), and `fer-dist crop`, `annotate` and `extract` read past the
damage as packing does."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
from PIL import Image

from fer_dist.data.packing import crop, demux
from fer_dist.data.packing.audio import ProsodyParams, prosody, read_media, seconds
from fer_dist.data.packing.faces import TEMPLATE, Face, align
from fer_dist.data.packing.features import prosody_job
from fer_dist.data.packing.layout import discover
from fer_dist.data.packing.pack import pack, timing_drift
from fer_dist.data.packing.synth import TEST_LIST, synthesize
from fer_dist.data.shards.format import PackParams, SampleMeta, read_manifest
from fer_dist.data.shards.windows import SILENCE
from fer_dist.jobs.annotate import Faces, render
from helpers import REPO, by_video, remux, samples

RATE = 16000  # Hz: the sound compared
QUIET = float(np.float16(SILENCE))


def garble(path: Path, share: float = 0.02) -> None:
    """Random bytes written over `share` of the file's bytes, from its middle on."""
    data = bytearray(path.read_bytes())
    size, at = int(len(data) * share), len(data) // 2
    data[at : at + size] = np.random.default_rng(0).bytes(size)
    path.write_bytes(bytes(data))


def cut_index(path: Path) -> None:
    """An AVI with the second half of its index (`idx1`, at the file's end) cut off."""
    data = path.read_bytes()
    at = data.rfind(b"idx1")
    path.write_bytes(data[: at + (len(data) - at) // 2])


def truth(path: Path) -> SimpleNamespace:
    """What plain PyAV finds in a file decoded packet by packet, past packets that do not decode:
    the video's frames decoded (their timestamps, s) and its packets; the sound's frames decoded
    (timestamp s, mono samples) and its rate (Hz)."""
    times, packets, sound, rate = [], 0, [], 0
    with av.open(str(path)) as container:
        for packet in container.demux():
            packets += bool(packet.size and packet.stream.type == "video")
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                continue
            if packet.stream.type == "video":
                times += [Fraction(f.pts) * f.time_base for f in frames]
            for f in frames if packet.stream.type == "audio" else []:
                sound.append((float(f.pts * f.time_base), f.to_ndarray()[0]))
                rate = f.sample_rate
    return SimpleNamespace(times=sorted(times), packets=packets, sound=sound, rate=rate)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """The intact videos of a synthetic challenge (`intact/`) and the challenge with its videos
    damaged (`data/`): 4-30 an MP4 garbled in its middle, 5-30 (a test video) its packets in
    Matroska garbled alike, 2-25 an AVI whose index is cut short; the _left/_right pair's video and
    3-30's (silent) are left whole."""
    root = tmp_path_factory.mktemp("damage")
    data, intact = root / "data", root / "intact"
    synthesize(data, 4, seed=1, workers=2, length=300, test_videos=1)
    videos = {v.name: v for v in discover(data, test_list=data / TEST_LIST)}
    intact.mkdir()
    for v in videos.values():
        shutil.copy(v.media, intact / v.media.name)
    mkv = videos["5-30-640x360"].media
    remux(mkv, intact / f"{mkv.stem}.mkv")
    (intact / mkv.name).unlink()
    mkv.unlink()
    shutil.copy(intact / f"{mkv.stem}.mkv", mkv.with_suffix(".mkv"))
    for path in (videos["4-30-640x360"].media, mkv.with_suffix(".mkv")):
        garble(path)
    cut_index(videos["2-25-640x360"].media)
    media = {v.name: v.media for v in discover(data, test_list=data / TEST_LIST)}
    return SimpleNamespace(root=root, data=data, intact=intact, media=media)


def whole(files, name: str) -> Path:
    """The intact file of video `name`."""
    return next(files.intact.glob(f"{name}.*"))


@pytest.mark.parametrize("name", ["4-30-640x360", "5-30-640x360"], ids=["mp4", "mkv"])
def test_a_damaged_file_is_read_past_its_damage_every_frame_at_its_number(files, name):
    """Decoding goes on past the damage: the frames are the intact file's, each at its own time (to
    Matroska's millisecond), those whose packets are lost counted; the sound after the damage is the
    intact file's at the same time, silence only where it was lost (not counted as gaps)."""
    damaged, intact = read_media(files.media[name], RATE), read_media(whole(files, name), RATE)
    decoded = truth(files.media[name]).times
    assert damaged.damage is None and damaged.header_frames == intact.header_frames
    assert damaged.frames == intact.frames and damaged.frames_lost == intact.frames - len(decoded)
    assert 0 < damaged.frames_lost < 0.2 * intact.frames  # Matroska drops whole clusters: 54 of 390 frames
    assert np.abs(seconds(damaged.times) - seconds(intact.times)).max() < 0.0011  # Matroska: whole ms
    assert 0.04 < damaged.sound_lost < 2.5 and damaged.sound_gaps < 1e-6
    assert damaged.sound_heard == pytest.approx(intact.sound_heard - damaged.sound_lost, abs=0.03)
    a, b = intact.audio, damaged.audio
    assert len(b) == pytest.approx(len(a), abs=16)
    silent = np.abs(b) < 1e-7
    assert silent.sum() / RATE == pytest.approx(damaged.sound_lost + (np.abs(a) < 1e-7).sum() / RATE, abs=0.05)
    found = truth(files.media[name])
    heard = read_media(files.media[name], found.rate).audio  # at the sound's own rate: its samples as decoded
    slack = round(0.001 * found.rate) if name == "5-30-640x360" else 0  # Matroska: whole milliseconds
    for t, pcm in found.sound:  # every frame of sound that decodes lies at its own time
        at, n = round(t * found.rate), len(pcm)
        if slack <= at <= len(heard) - n - slack:
            assert min(np.abs(heard[at + k : at + k + n] - pcm).max() for k in range(-slack, slack + 1)) < 1e-6


def test_an_avi_whose_index_is_cut_short_is_read_as_it_lies(files):
    """Its index lists half the packets (FFmpeg reads no more through it, with no error): read as
    the file lies, every frame and all of the sound are there, nothing counted lost."""
    name = "2-25-640x360"
    assert len(truth(files.media[name]).times) < 0.6 * len(truth(whole(files, name)).times)
    damaged, intact = read_media(files.media[name], RATE), read_media(whole(files, name), RATE)
    assert damaged.times == intact.times and damaged.frames == damaged.header_frames
    assert damaged.damage is None and damaged.frames_lost == 0 and damaged.sound_lost == 0
    assert np.array_equal(damaged.audio, intact.audio)


def test_a_file_cut_off_keeps_what_precedes_the_cut_and_loses_nothing_else(files, tmp_path):
    """A broken download (the index first, cut at 60 %): the frames up to the last picture before
    the cut, each at its place (one shown before that picture whose packet came after the cut is
    lost), their sound; the packet broken off at the cut is the cut's, not sound lost."""
    faststart = tmp_path / "faststart.mp4"
    remux(whole(files, "4-30-640x360"), faststart, options={"movflags": "faststart"})
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(faststart.read_bytes()[: int(faststart.stat().st_size * 0.6)])
    media, shown = read_media(cut, RATE), truth(cut).times
    assert media.times == [t for t in read_media(faststart, RATE).times if t <= shown[-1]]
    assert 0 < media.frames < media.header_frames and media.damage
    assert media.frames_lost == media.frames - len(shown) <= 2 and media.sound_lost == 0


@pytest.mark.parametrize("share", [0.6, 0.97])
def test_an_mp4_cut_off_before_the_end_of_its_index_is_said_to_be(files, share, tmp_path):
    """An MP4 whose index (`moov`) is written last, as most encoders write it, cut off: no demuxer
    can read it, and the reason given is the cut, not FFmpeg's "Invalid data found when processing
    input"; an intact MP4 and one cut after a first index are not taken for it."""
    intact = whole(files, "4-30-640x360")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(intact.read_bytes()[: int(intact.stat().st_size * share)])
    media = read_media(cut, RATE)
    assert media.error == "cut off before the end of its index (the moov box an MP4 has last)"
    assert crop.track_video(cut, whole_frame, tmp_path / "work", 95).error == media.error
    faststart = tmp_path / "faststart.mp4"
    remux(intact, faststart, options={"movflags": "faststart"})
    early = tmp_path / "early.mp4"
    early.write_bytes(faststart.read_bytes()[: int(faststart.stat().st_size * share)])
    assert not demux.without_index(intact) and not demux.without_index(early)
    assert not demux.without_index(files.media["5-30-640x360"])  # Matroska


class Container:
    """A stand-in for a PyAV container whose demuxer raises its `errors` (at those packet counts)."""

    def __init__(self, packets: int, errors: list[int]) -> None:
        self.format, self.duration = SimpleNamespace(name="stub"), None
        self.left, self.errors, self.read = packets, list(errors), 0

    def demux(self, streams):
        while True:
            if self.errors and self.errors[0] == self.read:
                self.errors.pop(0)
                raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
            if not self.left:
                yield SimpleNamespace(size=0, is_corrupt=False, stream=streams[0])  # the decoders' flush
                return
            self.left, self.read = self.left - 1, self.read + 1
            yield SimpleNamespace(
                size=100, is_corrupt=False, is_discard=False, stream=streams[0], pts=self.read, dts=self.read
            )


@pytest.mark.parametrize(
    "errors, read, gone_past, stopped",
    [([], 10, 0, False), ([3, 7], 10, 2, False), ([0], 10, 1, False), ([3, 3], 3, 0, True), ([10], 10, 0, True)],
    ids=["whole", "two-errors-gone-past", "one-at-the-start", "twice-in-one-place", "at-the-end"],
)
def test_the_demuxer_goes_on_past_its_errors_and_stops_where_nothing_follows(
    errors, read, gone_past, stopped, monkeypatch
):
    """An error with packets after it is gone past (and marks the packet after it); one with none
    after it (again at once, or at the end) ends the pass, the decoders drained either way."""
    monkeypatch.setattr(demux, "flush_packet", lambda s: SimpleNamespace(size=0, is_corrupt=False, stream=s))
    seen, stream = demux.Pass(), SimpleNamespace(type="video", duration=None, metadata={})
    got = list(demux.packets(Container(10, errors), [stream], seen))
    assert seen.stamps == list(range(1, read + 1)) and got[-1].size == 0  # the decoders are flushed
    assert seen.errors == gone_past and bool(seen.stopped) == stopped
    assert seen.marks == errors[:gone_past]  # an error gone past marks the packet after it


def test_frames_are_counted_by_their_packets_and_pictures_by_the_decoder_after_its_flush():
    """Packets in decode order (B-frames); the decoder's pictures after its flush, two packets giving
    none without an error: those two frames are lost at their packets' times, every other frame keeps
    its number. Pictures whose times no packet has (another clock) are not matched: none is lost."""
    seen = demux.Pass(stamps=[0, 3, 1, 2, 6, 4, 5, 7])
    shown = [0, 1, 2, 3, 5, 7]  # 4 and 6 gave no picture
    frames = demux.from_decoded(shown, seen, Fraction(1, 30), Fraction(30))
    assert frames.times == [Fraction(k, 30) for k in range(8)] and frames.lost == 2
    assert [frames.numbers[t] for t in shown] == [1, 2, 3, 4, 6, 8]
    apart = demux.from_decoded([t + 100 for t in shown], seen, Fraction(1, 30), Fraction(30))
    assert len(apart.times) == len(shown) and apart.lost == 0


def test_matroska_frames_skipped_by_the_demuxer_are_counted_in_at_the_rate(files):
    """Matroska drops the damaged cluster's packets without an error (it logs one): the frames the
    timestamps jump over are counted in, at the stream's rate, so every later frame keeps its number."""
    name = "5-30-640x360"
    assert truth(files.media[name]).packets < truth(whole(files, name)).packets - 30
    header, seen = demux.video_packets(files.media[name])
    assert header == 0 and seen.skips >= 1 and seen.marks and not seen.stopped


def whole_frame(image: np.ndarray) -> list[Face]:
    """A 'face' that is the whole frame, its five points the template's, scaled to it."""
    h, w = image.shape[:2]
    return [Face(np.array([0, 0, w, h], float), TEMPLATE * [w / 112, h / 112], 1.0, 0)]


@pytest.mark.parametrize("name", ["4-30-640x360", "5-30-640x360", "2-25-640x360"], ids=["mp4", "mkv", "avi"])
def test_crop_reads_past_the_damage_and_numbers_frames_as_packing_does(files, name, tmp_path):
    """`fer-dist crop`'s decoding: a frame lost gets no crop, every other frame its number (packing's
    for the same file), and a crop after the damage is the intact file's crop of that frame."""
    seen = crop.track_video(files.media[name], whole_frame, tmp_path / "work", 95)
    media = read_media(files.media[name], RATE)
    assert seen.error is None and not seen.damage and seen.lost == media.frames_lost
    assert np.allclose(seen.times, seconds(media.times)) and len(seen.faces) == media.frames
    assert sum(bool(f) for f in seen.faces) == media.frames - media.frames_lost == len(seen.files)
    last = max(seen.files)
    with av.open(str(whole(files, name))) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    mine = np.asarray(Image.open(tmp_path / "work" / "0" / f"{seen.files[last]:05d}.jpg").convert("RGB"), float)
    theirs = np.asarray(align(frames[last - 1], whole_frame(frames[last - 1])[0].points), float)
    assert np.abs(mine - theirs).mean() < 4  # JPEG's error, not another frame


OVERWRITES = {  # random bytes written over a Matroska copy of 4-30 at these (offset, length) places
    "three": ((60000, 400), (75000, 400), (90000, 300)),  # the file: 99 packets dropped, 13 give no picture
    "one": ((30000, 400),),  # 84 packets dropped, 10 give no picture
}


def pictures(path: Path) -> SimpleNamespace:
    """What plain PyAV finds in a file's video: its packets' timestamps, the timestamps of the
    pictures they decode to (the decoder drained at the end) and how many packets raise an error."""
    stamps, shown, raised = [], set(), 0
    with av.open(str(path)) as container:
        for packet in container.demux(video=0):
            stamps += [packet.pts] if packet.size else []
            try:
                shown |= {f.pts for f in packet.decode()}
            except av.error.InvalidDataError:
                raised += 1
    return SimpleNamespace(stamps=stamps, shown=shown, raised=raised)


@pytest.fixture(scope="module")
def pictureless(files) -> dict[str, Path]:
    """4-30's packets in Matroska (`intact`), and copies with bytes written over them (`OVERWRITES`):
    the demuxer drops the damaged clusters, and packets after them come through with timestamps but
    give no picture and no error (P-frames whose reference frame was lost)."""
    folder = files.root / "pictureless"
    folder.mkdir()
    made = {"intact": folder / "intact.mkv"}
    remux(whole(files, "4-30-640x360"), made["intact"])
    for name, places in OVERWRITES.items():
        data, rng = bytearray(made["intact"].read_bytes()), np.random.default_rng(0)
        for at, size in places:
            data[at : at + size] = rng.bytes(size)
        made[name] = folder / f"{name}.mkv"
        made[name].write_bytes(bytes(data))
    return made


@pytest.mark.parametrize("name", list(OVERWRITES))
def test_packets_that_give_no_picture_are_frames_lost_at_their_own_times(pictureless, name, tmp_path):
    """Packets that decode to nothing without an error are frames lost, each at its packet's time,
    as are the frames of the clusters the demuxer dropped: every frame keeps its number and time, in
    packing's reading and in `fer-dist crop`'s (which crops every picture at its own frame)."""
    found, intact = pictures(pictureless[name]), read_media(pictureless["intact"], RATE)
    assert found.raised == 0 and len(set(found.stamps) - found.shown) >= 10  # the kind of damage
    assert len(found.stamps) < intact.frames - 30  # and clusters dropped
    damaged = read_media(pictureless[name], RATE)
    assert damaged.frames == intact.frames and damaged.damage is None
    assert damaged.frames_lost == intact.frames - len(found.shown)
    assert np.abs(seconds(damaged.times) - seconds(intact.times)).max() < 0.0011  # Matroska: whole ms
    assert timing_drift(damaged.times) < 0.0011  # not a variable frame rate
    seen = crop.track_video(pictureless[name], whole_frame, tmp_path / "work", 95)
    assert seen.error is None and not seen.damage and seen.lost == damaged.frames_lost
    assert np.allclose(seen.times, seconds(intact.times), atol=0.0011) and len(seen.faces) == intact.frames
    shown = {k + 1 for k, t in enumerate(intact.times) if round(t * 1000) in found.shown}  # ms: Matroska's time base
    assert set(seen.files) == shown
    with av.open(str(pictureless["intact"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for frame in sorted(shown)[-60::20]:  # after the damage: the intact file's picture of that frame
        mine = Image.open(tmp_path / "work" / "0" / f"{seen.files[frame]:05d}.jpg").convert("RGB")
        theirs = align(frames[frame - 1], whole_frame(frames[frame - 1])[0].points)
        assert np.abs(np.asarray(mine, float) - np.asarray(theirs, float)).mean() < 4, frame


@pytest.mark.slow  # packs one video three times
def test_packing_a_file_whose_packets_give_no_picture_keeps_each_frame_with_its_sound(
    files, pictureless, tails, tmp_path
):
    """The issue's files packed as 4-30's video, the one with packets that give no picture and the
    one whose last cluster was dropped: each one's frame count is the intact file's, with no false
    warning (a variable frame rate, labels or crops past the end), and every frame after the damage
    gets the intact file's sound window, not one 0.43 s late."""
    video = next(v for v in discover(files.data, test_list=files.data / TEST_LIST) if v.name == "4-30-640x360")
    packed = {}
    for name, path in {"intact": pictureless["intact"], "three": pictureless["three"], "tail": tails["zeros"]}.items():
        params = PackParams(n_folds=1, samples_per_shard=100000)
        manifest = pack([dataclasses.replace(video, media=path)], tmp_path / name, params, workers=1)
        frames = {SampleMeta.from_bytes(s["json"]).frame: s for s in samples(tmp_path / name)}
        packed[name] = SimpleNamespace(manifest=manifest, frames=frames, quality=manifest.videos[video.name].quality)
    intact = packed["intact"]
    for name, lost in (("three", 112), ("tail", packed["tail"].quality.frames_lost)):  # three: the intact file's count
        damaged = packed[name]
        assert damaged.quality.video_frames == intact.quality.video_frames and damaged.quality.frames_lost > 0
        assert damaged.quality.labels_past_end == damaged.quality.crops_past_end == intact.quality.labels_past_end
        assert damaged.quality.timing_drift_s < 0.0011 and damaged.frames.keys() == intact.frames.keys()
        warned = [line for line in damaged.manifest.problems if line not in intact.manifest.problems]
        assert len(warned) == 1 and f"damaged packets: {lost} frame(s)" in warned[0], warned
    assert packed["tail"].quality.sound_lost_s > 0.04
    damaged = packed["three"]
    found = pictures(pictureless["three"])
    times = read_media(pictureless["intact"], RATE).times
    last_lost = max(k + 1 for k, t in enumerate(times) if round(t * 1000) not in found.shown)
    late = [f for f in intact.frames if f > last_lost + 2 * 32]
    assert len(late) > 10
    for f in late:  # the same sound to Matroska's millisecond; 13 frames late is a hundred times further off
        got, want, late_by_13 = (
            np.load(io.BytesIO(packed.frames[k]["mel.npy"])).astype(float)
            for packed, k in ((damaged, f), (intact, f), (intact, f - 13))
        )
        assert np.abs(got - want).mean() < 0.1 < 0.1 * np.abs(late_by_13 - want).mean(), f


TAILS = {  # bytes written over a Matroska copy of 4-30 (offset from the end, length, random or zeros)
    "zeros": (-8000, 400, False),  # the file: its last cluster dropped, 18 frames and 0.67 s of sound with it
    "random": (-3000, 300, True),
    "earlier": (-20000, 400, True),
    "last-packets": (-1000, 400, False),  # a packet that does not decode: frame threading hid its error, and 2 pictures
}
CUTS = (0.6, 0.97)  # shares of the Matroska copy kept: a download cut off


@pytest.fixture(scope="module")
def tails(pictureless) -> dict[str, Path]:
    """Copies of `pictureless["intact"]` damaged near their end (`TAILS`), and cut off (`CUTS`)."""
    data, made = pictureless["intact"].read_bytes(), {}
    for name, (at, size, noise) in TAILS.items():
        copy = bytearray(data)
        copy[len(data) + at : len(data) + at + size] = np.random.default_rng(1).bytes(size) if noise else bytes(size)
        made[name] = pictureless["intact"].with_name(f"tail-{name}.mkv")
        made[name].write_bytes(bytes(copy))
    for share in CUTS:
        made[f"cut{share}"] = pictureless["intact"].with_name(f"cut-{share}.mkv")
        made[f"cut{share}"].write_bytes(data[: int(len(data) * share)])
    return made


@pytest.mark.parametrize("name", list(TAILS))
def test_a_matroska_file_damaged_near_its_end_keeps_every_frame_to_its_stated_end(pictureless, tails, name, tmp_path):
    """Matroska drops a damaged last cluster with nothing after it: its frames are lost, counted up to
    where the file states the video ends (each at its place, at the stream's rate), and its sound is
    lost up to the sound's stated end; fer-dist used to end the video at the last frame it read, with
    neither counted. `fer-dist crop` reads it alike."""
    found, intact = truth(tails[name]), read_media(pictureless["intact"], RATE)
    damaged = read_media(tails[name], RATE)
    assert len(found.times) < intact.frames  # the kind of damage: frames lost
    assert damaged.frames == intact.frames and damaged.damage is None
    assert damaged.frames_lost == intact.frames - len(found.times)
    assert np.abs(seconds(damaged.times) - seconds(intact.times)).max() < 0.0011  # Matroska: whole ms
    assert damaged.sound_lost > 0.04
    assert damaged.sound_heard + damaged.sound_lost == pytest.approx(intact.sound_heard, abs=0.03)
    assert len(damaged.audio) == pytest.approx(len(intact.audio), abs=0.03 * RATE)
    seen = crop.track_video(tails[name], whole_frame, tmp_path / "work", 95)
    assert seen.error is None and not seen.damage and seen.lost == damaged.frames_lost
    assert np.allclose(seen.times, seconds(intact.times), atol=0.0011)


@pytest.mark.parametrize("share", CUTS)
def test_a_matroska_file_cut_off_is_said_to_be_cut_and_keeps_what_precedes(pictureless, tails, share, tmp_path):
    """A Matroska download cut off: its demuxer logs that the file ended prematurely and raises
    nothing. The frames up to the last picture before the cut are kept at their places, the file is
    said to be cut off (`damage`), and nothing past the cut is counted lost (fer-dist used to take it
    for a whole, shorter video)."""
    path, intact = tails[f"cut{share}"], read_media(pictureless["intact"], RATE)
    media, shown = read_media(path, RATE), truth(path).times
    assert 0 < media.frames < intact.frames and "ended prematurely" in media.damage
    assert np.abs(seconds(media.times) - seconds(intact.times[: media.frames])).max() < 0.0011
    assert media.times[-1] == shown[-1] and media.frames_lost == media.frames - len(shown) <= 2
    assert media.sound_lost == 0
    seen = crop.track_video(path, whole_frame, tmp_path / "work", 95)
    assert "ended prematurely" in seen.damage and len(seen.faces) == media.frames
    assert seen.lost == media.frames_lost


def test_the_end_a_file_states_is_its_stream_duration_else_its_tag_else_the_containers():
    """`demux.stated_end` and the frames `demux.skipped` counts after damage past the last packet."""
    container = SimpleNamespace(duration=14_000_000)  # microseconds (FFmpeg's AV_TIME_BASE)
    stream = SimpleNamespace(duration=None, time_base=Fraction(1, 1000), start_time=0, metadata={})
    assert demux.stated_end(container, stream) == 14
    stream.metadata = {"DURATION": "00:00:13.689000000"}
    assert demux.stated_end(container, stream) == Fraction(13689, 1000)
    stream.duration, stream.start_time = 13000, 500
    assert demux.stated_end(container, stream) == Fraction(27, 2)
    assert demux.stated_end(SimpleNamespace(duration=None), SimpleNamespace(duration=None, metadata={})) is None

    tb, fps = Fraction(1, 1000), Fraction(30)
    stamps = [round(k * 1000 / 30) for k in range(20)]  # frames 0..19 read; the file states 25 frames
    seen = demux.Pass(stamps=stamps, marks=[20], video_end=Fraction(25, 30))
    assert [round(t * 30 / 1000) for t in demux.skipped(seen, tb, fps)] == [20, 21, 22, 23, 24]
    assert demux.skipped(dataclasses.replace(seen, video_end=None), tb, fps) == []
    assert demux.skipped(dataclasses.replace(seen, video_end=Fraction(20, 30)), tb, fps) == []  # nothing lost


def test_annotate_renders_a_damaged_video_with_each_frame_at_its_place(files, tmp_path):
    path = files.media["4-30-640x360"]
    media = read_media(path, RATE)
    n = media.frames
    times = seconds(media.times)
    faces = Faces("x", "x", times, np.tile([2.0, 2.0, 30.0, 30.0], (n, 1)), np.full((n, 8), 1 / 8), np.zeros(n, int))
    render(tmp_path / "x.mp4", path, [faces])
    with av.open(str(tmp_path / "x.mp4")) as container:
        shown = [float(f.time) for f in container.decode(video=0)]
    assert len(shown) == n - media.frames_lost and shown[-1] == pytest.approx(times[-1], abs=0.04)


def test_extract_hears_the_sound_after_the_damage(files, tmp_path):
    """`fer-dist extract`'s audio features of a damaged video: after the damage, the intact file's
    (to the decoder's noise); silence only on the frames shown while the sound was lost."""
    name, params = "4-30-640x360", ProsodyParams()
    video = SimpleNamespace(name=name, media=files.media[name])
    damaged = read_media(files.media[name], params.sample_rate)
    n = damaged.frames
    prosody_job((video, n, params, tmp_path))
    got = np.load(tmp_path / f"{name}.afeat.npy")
    intact = read_media(whole(files, name), params.sample_rate)
    want = prosody(intact.audio, seconds(intact.times), params)
    late = slice(n - 90, n - 30)  # MFCC and energy; pitch detection is too fine for the decoder's noise
    assert np.allclose(got[late, :13], want[late, :13], atol=1.5)
    assert np.allclose(got[late, -1], want[late, -1], atol=0.2)
    silent = got[:, -1] <= np.log(1e-10) + 1e-3  # a frame's 25 ms of silence: the energy's floor
    assert 0 < silent.sum() <= damaged.sound_lost * float(damaged.fps) + 2 and not silent[: n // 3].any()


@pytest.fixture(scope="module")
def packed(files) -> SimpleNamespace:
    shards = files.root / "shards"
    cmd = [sys.executable, "-m", "fer_dist.cli", "shard", "--root", str(files.data), "--out", str(shards)]
    cmd += ["--test-list", str(files.data / TEST_LIST), "--n-folds", "2", "--samples-per-shard", "200"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return SimpleNamespace(shards=shards, result=result, manifest=read_manifest(shards), samples=by_video(shards))


@pytest.mark.slow  # packs a small dataset
def test_shard_packs_a_damaged_file_past_its_damage_counts_the_loss_and_warns_once(files, packed):
    """The issue's input: every labelled frame after the damage is packed at its own number, with
    its sound (not as "past the end" with silence); the frames and seconds lost are counted in the
    quality record, named in one warning, and shown by `fer-dist inspect`."""
    stderr = " ".join(packed.result.stderr.split())
    rows = json.loads(
        subprocess.run(
            [sys.executable, "-m", "fer_dist.cli", "inspect", str(packed.shards), "--json"],
            capture_output=True,
            text=True,
            cwd=REPO,
        ).stdout
    )["quality"]
    found = {r["video"]: r["found"] for r in rows}
    for name in ("4-30-640x360", "5-30-640x360"):
        record, q = packed.manifest.videos[name], packed.manifest.videos[name].quality
        intact = read_media(whole(files, name), RATE)
        assert q.video_frames == intact.frames and not q.damage and q.labels_past_end == 0
        assert 0 < q.frames_lost < 0.2 * intact.frames and q.sound_lost_s > 0.04
        assert record.samples == (record.labelled if record.split != "test" else intact.frames)
        lines = [line for line in packed.manifest.problems if line.startswith(f"{name}:") and "damaged" in line]
        assert len(lines) == 1 and f"{q.frames_lost} frame(s) and {q.sound_lost_s:.2f} s of sound" in lines[0]
        assert lines[0] in stderr and lines[0].removeprefix(f"{name}: ") in found[name]
        late = [s for f, s in packed.samples[name].items() if 0.75 * intact.frames < f <= intact.frames - 32]
        assert late and all(s["mel"][:, 32].max() > QUIET and s["meta"].pad == [0, 0] for s in late)
    avi = packed.manifest.videos["2-25-640x360"].quality
    assert avi.video_frames == avi.header_frames and avi.frames_lost == 0 and not avi.damage
    assert not any("damaged" in line for line in packed.manifest.problems if line.startswith("1-30-640x360"))
