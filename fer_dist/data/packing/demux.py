"""A container read past its damage (PyAV): demuxed packet by packet, each packet decoded on its own,
every video frame kept at its number.

A file damaged part way (bytes overwritten in a copy, a bad sector, an index cut short) is read to
its end: a packet that does not decode is skipped and counted, and the demuxer goes on past an
error of its own as long as packets follow it. An error with nothing after it is where the file
ends (a download cut off): what precedes it is kept.

The frames lost keep their places. A frame's number is its rank among the video's presentation
timestamps (the order in which the decoder gives its pictures, as `cropped_aligned` numbers them),
and the timestamps of the packets that give no picture are known from the demuxer, so their frames
are counted in at their own times: a packet that does not decode, and one that decodes to nothing
without an error (a frame whose reference frame was lost). The frames are counted by the packets'
timestamps and the pictures by what the decoder gives, its flush at the end included, so a decoder
that holds pictures back is reconciled with once it is drained. Where the demuxer reports that it
skipped damaged data (Matroska drops a damaged cluster, packets and all) and the video's timestamps
jump across that place by more than a frame and a half, the frames the jump holds at the stream's
average rate are counted in as lost, evenly spaced; where it reports damage after the last video
packet (a damaged last cluster), the frames up to where the file states the video ends
(`stated_end`) are. So the frames after the damage keep the numbers that their crops, cut from an
intact copy or by `fer-dist crop` from this one, have. A file that the demuxer says ended
prematurely (a Matroska download cut off, which raises no error) is cut off, like one whose demuxer
stops with an error.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import io
import itertools
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import av.logging

ASSUMED_FPS = Fraction(30)  # the frame rate of a file that cannot be read, or whose frames carry no times
FAULTS = (av.error.FFmpegError, IndexError, ValueError)  # what PyAV raises on a damaged or unknown file
RETRIES = 1000  # the most errors of the demuxer one pass goes on past (each with packets after it)
PREMATURE = "ended prematurely"  # FFmpeg's log line for a file cut off inside an element ("File ended prematurely")
REORDER = 16  # packets: the most a decoder reorders frames by (H.264 holds at most 16 in its buffer)


def fault(exc: Exception) -> str:
    """An error as one line: `ExceptionName: message`."""
    return f"{type(exc).__name__}: {exc}"


class FrontToBack(io.RawIOBase):
    """A file read from its start to its end, as from a pipe: a demuxer reading it cannot seek, so it
    reads the packets as they lie, not through the container's index."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "rb")  # noqa: SIM115 (closed with this object)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer) -> int:
        return self.file.readinto(buffer)

    def close(self) -> None:
        self.file.close()
        super().close()


def without_index(path: Path) -> bool:
    """Whether `path` is an MP4 (ISO base media: its first box is `ftyp`) whose index, the `moov`
    box that most encoders write last, is missing from its top-level boxes (walked to the file's
    end) or runs past the file's end: a file cut off before or inside its index, which no demuxer
    can read."""
    size, at, boxes = Path(path).stat().st_size, 0, {}
    with open(path, "rb") as fh:
        while at + 8 <= size:
            fh.seek(at)
            head = fh.read(16)
            length, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if length == 1 and len(head) == 16:
                length = int.from_bytes(head[8:16], "big")
            boxes.setdefault(kind, at + length)
            if length < 8:
                break
            at += length
    return next(iter(boxes), None) == b"ftyp" and boxes.get(b"moov", size + 1) > size


def unreadable(path: Path, exc: Exception) -> str:
    """Why the file at `path` could not be opened (`exc`, what opening it raised), as one line: an
    MP4 cut off before the end of its index said so (`without_index`), else the error itself."""
    with contextlib.suppress(OSError):
        if without_index(path):
            return "cut off before the end of its index (the moov box an MP4 has last)"
    return fault(exc)


@contextlib.contextmanager
def opened(path: Path, front_to_back: bool = False, format: str | None = None) -> Iterator[av.container.InputContainer]:
    """`path` opened with PyAV, closed after the block; `front_to_back`: read as it lies, without the
    container's index (`FrontToBack`), in `format` (a PyAV format name; None: probed). Raises what
    PyAV raises for a file it cannot open (`FAULTS`) and OSError."""
    source = FrontToBack(Path(path)) if front_to_back else None
    try:
        with av.open(source or str(path), format=format) as container:
            yield container
    finally:
        if source is not None:
            source.close()


@dataclass
class Pass:
    """What one demuxing pass over a container met (`packets` and `decode` fill it)."""

    format: str = ""  # the container's format (PyAV's name): the demuxer's own error lines carry it
    stamps: list[int | None] = field(default_factory=list)  # each video packet's pts (else dts), stream time base
    marks: list[int] = field(default_factory=list)  # the demuxer skipped damaged data just before video packet k
    # (k = len(stamps): after the last one)
    video_end: Fraction | None = None  # s: where the video ends, as the file states (`stated_end`); None: unstated
    sound_end: Fraction | None = None  # s: where the sound ends, likewise
    failed: list[int | None] = field(default_factory=list)  # stamps of the video packets that did not decode
    sound_failed: list[float | None] = field(default_factory=list)  # s: audio packets that did not decode
    corrupt: int = 0  # packets the demuxer flagged corrupt
    errors: int = 0  # errors the demuxer raised and went on past (packets followed them)
    skips: int = 0  # the demuxer's reports of damaged data skipped, so far: its errors, raised or logged
    stopped: str = ""  # the error that ended the pass before the file's end, or the demuxer's "ended prematurely"

    @property
    def damaged(self) -> bool:
        """Whether the pass met damage: a packet that did not decode or came flagged corrupt, data the
        demuxer skipped."""
        return bool(self.failed or self.sound_failed or self.corrupt or self.skips)


@contextlib.contextmanager
def ffmpeg_errors() -> Iterator[list[tuple[int, str, str]]]:
    """FFmpeg's error lines (level, name of what logged it, message) while the block runs, each one
    (a line repeating the last is kept too), kept from the terminal; PyAV's log settings are put
    back after it."""
    level, repeated = av.logging.get_level(), av.logging.get_skip_repeated()
    if level is None or level < av.logging.ERROR:
        av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)
    try:
        with av.logging.Capture(local=False) as logs:
            yield logs
    finally:
        av.logging.set_level(level)
        av.logging.set_skip_repeated(repeated)


def flush_packet(stream) -> av.Packet:
    """An empty packet of `stream`: decoding it drains the decoder of the frames it holds."""
    packet = av.Packet()
    packet.stream = stream
    return packet


def stated_end(container: av.container.InputContainer, stream) -> Fraction | None:
    """Where `stream` ends (s), as `container` states it: the stream's duration after its start, else
    its `DURATION` tag (Matroska's muxers, FFmpeg and mkvmerge, write one per stream), else the
    container's duration (its longest stream's); None when none is stated."""
    if stream.duration and stream.time_base:
        return (stream.start_time or 0) * stream.time_base + stream.duration * stream.time_base
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration") or ""
    parts = tag.split(":")
    if len(parts) == 3:
        try:
            hours, minutes = int(parts[0]), int(parts[1])
            whole, _, fraction = parts[2].partition(".")
            return 3600 * hours + 60 * minutes + int(whole) + Fraction(int(fraction or 0), 10 ** len(fraction))
        except ValueError:
            pass
    return Fraction(container.duration, av.time_base) if container.duration else None


def packets(container: av.container.InputContainer, streams: list, seen: Pass) -> Iterator[av.Packet]:
    """`container`'s packets of `streams`, as they lie in the file, then the flush packets (size 0)
    that drain the decoders. An error of the demuxer is gone past when a packet follows it (counted
    in `seen.errors`); one after which none follows ends the pass (`seen.stopped`). Each video packet's
    timestamp is added to `seen.stamps`, with a mark where the demuxer reported damaged data before
    it (`seen.marks`, `seen.skips`). Raises nothing of PyAV's."""
    drained = yield from demuxed(container, streams, seen)
    if not drained:  # the demuxer stopped with an error: it gave no flush packets
        yield from (flush_packet(s) for s in streams)


def demuxed(container: av.container.InputContainer, streams: list, seen: Pass) -> Generator[av.Packet, None, bool]:
    """`packets` but for the flush packets of a pass that stopped with an error; returns whether the
    demuxer ran to its end (and gave its own flush packets)."""
    video = next((s for s in streams if s.type == "video"), None)
    seen.format, read, noted, since, pending, drained = container.format.name, 0, 0, 0, "", False
    sound = next((s for s in streams if s.type == "audio"), None)
    seen.video_end = stated_end(container, video) if video else None
    seen.sound_end = stated_end(container, sound) if sound else None
    with ffmpeg_errors() as logs:
        for _ in range(RETRIES + 1):
            try:
                for packet in container.demux(streams):
                    if packet.size and pending:  # the demuxer went on after its error
                        seen.errors, seen.skips, pending = seen.errors + 1, seen.skips + 1, ""
                    seen.skips += sum(entry[1] == seen.format for entry in logs[read:])
                    read = len(logs)
                    seen.corrupt += bool(packet.size and packet.is_corrupt)
                    if packet.stream is video and packet.size and not packet.is_discard:
                        seen.marks += [len(seen.stamps)] if seen.skips > noted else []
                        seen.stamps.append(packet.pts if packet.pts is not None else packet.dts)
                        noted, since = seen.skips, len(logs)
                    yield packet
                seen.stopped, drained = pending, True
                break
            except FAULTS as exc:
                if pending:  # an error again, nothing between: where the file ends
                    seen.stopped = pending
                    break
                pending = fault(exc)
        else:
            seen.stopped = f"more than {RETRIES} errors of the demuxer; the last: {pending}"
        seen.skips += sum(entry[1] == seen.format for entry in logs[read:])
        late = [entry[2].strip() for entry in logs[since:] if entry[1] == seen.format]
        ended = next((line for line in late if PREMATURE in line.lower()), "")
        if ended and not seen.stopped:  # cut off inside an element: the file ends there
            seen.stopped = f"{seen.format}: {ended}"
        if seen.skips > noted and seen.stamps:  # damaged data after the last video packet
            seen.marks.append(len(seen.stamps))
    return drained


def decode(packet: av.Packet, seen: Pass) -> list | None:
    """The frames `packet` decodes to; None when it does not decode, which `seen` counts: a video
    packet's timestamp in `seen.failed`, an audio packet's duration (s; None when unknown) in
    `seen.sound_failed`."""
    try:
        return packet.decode()
    except FAULTS:
        if packet.stream.type == "video":
            seen.failed.append(packet.pts if packet.pts is not None else packet.dts)
        elif packet.stream.type == "audio":
            seen.sound_failed.append(float(packet.duration * packet.time_base) if packet.duration else None)
        return None


def skipped(seen: Pass, time_base: Fraction, fps: Fraction | None) -> list[int]:
    """The timestamps (`time_base`) of the video frames the demuxer skipped with damaged data: where
    it reported damage (`seen.marks`), the gaps of more than a frame and a half at `fps` between
    consecutive presentation times of the frames whose packets lie within `REORDER` packets of that
    place (a decoder shows a frame up to that many packets after it reads it), each filled with the
    frames it holds at `fps`, evenly spaced. Damage after the last video packet (the rest of a last
    cluster that Matroska dropped) also leaves a gap from the last presentation time to where the
    file states the video ends (`Pass.video_end`). None without timestamps or a frame rate."""
    stamps = seen.stamps
    if not seen.marks or not fps or None in stamps:
        return []
    order, gaps = sorted(stamps), set()
    for k in seen.marks:
        if 0 < k <= len(stamps):
            near = stamps[max(0, k - REORDER) : k + REORDER]
            ends = order[bisect.bisect_left(order, min(near)) : bisect.bisect_right(order, max(near))]
            if k == len(stamps) and seen.video_end is not None:
                ends.append(round(seen.video_end / time_base))
            gaps |= {(a, b) for a, b in itertools.pairwise(ends) if (b - a) * time_base * fps > Fraction(3, 2)}
    out: list[int] = []
    for a, b in sorted(gaps):
        missing = round((b - a) * time_base * fps) - 1
        out += [a + round((b - a) * j / (missing + 1)) for j in range(1, missing + 1)]
    return out


@dataclass(frozen=True)
class Frames:
    """A video's frames, the lost ones in their places: frame i (1-based) at `times[i - 1]`."""

    times: list[Fraction]  # s: each frame's presentation time, ascending; (i - 1) / fps when not `timed`
    timed: bool  # the times are the frames' timestamps
    lost: int  # frames in `times` that gave no picture (did not decode, or decoded to nothing) or the demuxer skipped
    numbers: dict[int, int]  # a frame's timestamp (stream time base) -> its number, 1-based; {} when not `timed`


def from_packets(seen: Pass, time_base: Fraction, fps: Fraction | None) -> Frames:
    """The frames that `seen`'s video packets are (their timestamps in presentation order) and those
    the demuxer skipped (`skipped`); lost: the skipped ones and the packets that did not decode (the
    frames are numbered by the packets alone: `from_decoded` counts those that gave no picture)."""
    extra = skipped(seen, time_base, fps)
    stamps = sorted([*seen.stamps, *extra])
    return Frames([Fraction(t) * time_base for t in stamps], True, len(extra) + len(seen.failed), {})


def unpictured(decoded: set[int], seen: Pass) -> list[int]:
    """The timestamps of `seen`'s video packets that no picture the decoder gave (`decoded`, after
    its flush) has, ascending: frames lost, each at its own time, whether its packet failed to
    decode or decoded to nothing (a frame whose reference was lost gives no picture and no error).
    None when a packet has no timestamp, or when the pictures' timestamps are not the packets' (a
    picture at a time no packet has) and no packet failed: the two then cannot be matched."""
    stamps = set(seen.stamps)
    if None in stamps or not (seen.failed or decoded <= stamps):
        return []
    return sorted(stamps - decoded)


def from_decoded(
    decoded: list[int | None], seen: Pass, time_base: Fraction, fps: Fraction | None, cut: bool = False
) -> Frames:
    """The frames that decoded (`decoded`: their pictures' timestamps, in the decoder's order, its
    flush included) and the frames lost in `seen`'s pass over the same video: those of the packets
    whose timestamps no picture has (`unpictured`: the frames are counted by the packets'
    timestamps, the pictures by the decoder's output, so a decoder that holds pictures back is
    reconciled with at the end), and those the demuxer skipped (`skipped`). A file `cut` off (or
    whose pass stopped early, `seen.stopped`) loses none after its last decoded frame: a packet
    broken off at the cut lies past its end. Frames without timestamps are numbered in order, at
    (i - 1) / fps; the lost ones are then only counted."""
    if None in decoded or not decoded:
        rate = fps or ASSUMED_FPS
        return Frames([Fraction(i) / rate for i in range(len(decoded))], False, len(seen.failed), {})
    have = set(decoded)
    missing = unpictured(have, seen)
    extra = skipped(seen, time_base, fps)
    if cut or seen.stopped:
        missing, extra = [t for t in missing if t < max(decoded)], [t for t in extra if t < max(decoded)]
    stamps = sorted([*decoded, *missing, *extra])
    numbers = {t: i + 1 for i, t in enumerate(stamps)}
    return Frames([Fraction(t) * time_base for t in stamps], True, len(missing) + len(extra), numbers)


def video_packets(path: Path, front_to_back: bool = False, format: str | None = None) -> tuple[int, Pass]:
    """The frame count the header of `path`'s video stream states (0: none), and a demuxing pass over
    its video packets, none decoded (`packets`). Raises `FAULTS` and OSError when it cannot be opened
    or holds no video stream (ValueError)."""
    with opened(path, front_to_back, format) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        video, seen = container.streams.video[0], Pass()
        collections.deque(packets(container, [video], seen), maxlen=0)
        return int(video.frames), seen


def index_cut_short(path: Path) -> str | None:
    """The format (PyAV's name) to read `path` in front to back (`opened`), when its index is cut
    short: the video packets read through it fall short of the count the header states though the
    demuxer met no error, and read as they lie they are more (an AVI's index lists only the packets
    it indexes, the others are never read); None otherwise, and when the file cannot be read."""
    try:
        header, first = video_packets(path)
        if header <= len(first.stamps) or first.stopped:
            return None
        _, again = video_packets(path, True, first.format)
    except (*FAULTS, OSError):
        return None
    return first.format if len(again.stamps) > len(first.stamps) else None
