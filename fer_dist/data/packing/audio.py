"""Audio of a video as frame-synchronous log-mel columns, with every frame at its own time.

A frame's time is its presentation timestamp, read from the container (frame numbers stay the
decode order that `cropped_aligned` uses): a variable-frame-rate video, a recorder's stall or a
stream that starts late places each frame where it is shown, not at (i - 1) / fps. The log-mel
spectrogram (paper 000: 2048-point FFT, hop 1024, 128 mel bins) is computed once per video, then
sampled at each frame's time, one column per frame. A frame's window of +-h frames is then a plain
slice, whatever the video's frame rate and the audio's sample rate, and the narrower windows are
centre crops of the widest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torchaudio

from fer_dist.data.packing import demux
from fer_dist.data.packing.demux import ASSUMED_FPS, FAULTS, fault
from fer_dist.data.shards.format import MelParams
from fer_dist.data.shards.windows import PCM_SCALE, SILENCE, WAVE_RATE, WAVE_WIDTH, WIDEST


@dataclass
class Media:
    fps: Fraction | None  # the container's average frame rate; None when the file could not be read
    times: list[Fraction]  # each video frame's presentation time (s), in decode order; [] when unknown
    header_frames: int = 0  # the frame count the container's header states; 0 when it states none
    timed: bool = True  # the times are the frames' timestamps (False: (i - 1) / fps, the file has none)
    audio: np.ndarray | None = None  # mono float32 at the requested rate, sample k at k / rate s; None: none
    audio_start: float = 0.0  # seconds: where the audio stream's first sample lies on the container's timeline
    sound_gaps: float = 0.0  # seconds of silence put where the audio's timestamps jump ahead
    empty_audio: bool = False  # an audio stream is there but holds no sound (`audio` is None)
    damage: str | None = None  # why the file seems cut off part way: what precedes is kept
    error: str | None = None  # why the file could not be read at all
    resampled: dict[int, np.ndarray] = field(default_factory=dict)  # the audio at the `also` rates
    frames_lost: int = 0  # frames of `times` that did not decode or that the demuxer skipped (damaged packets)
    sound_lost: float = 0.0  # seconds of sound that did not decode or that the demuxer skipped (silence there)
    sound_heard: float = 0.0  # seconds of sound decoded

    @property
    def frames(self) -> int:
        """The video's frames, counted (not the header's count)."""
        return len(self.times)


GAP = 0.01  # s: a jump in the audio's timestamps longer than this is filled with silence


class AudioTimeline:
    """An audio stream's decoded frames placed on the container's timeline, mixed to mono and
    resampled to each of `rates` (Hz) from the same frames: sample k of `mono(rate)` lies at
    k / rate s. Silence leads up to the first frame's timestamp and is put where the timestamps
    jump ahead by more than `GAP` (a recorder that dropped sound, or sound lost to damaged packets),
    so that what follows keeps its time, as a video frame's time is its timestamp."""

    def __init__(self, rates: tuple[int, ...]) -> None:
        self.rates = tuple(dict.fromkeys(rates))  # each once: the log-mel's and the waveform's may be one rate
        self.resamplers = {r: av.AudioResampler(format="flt", layout="mono", rate=r) for r in rates}
        self.chunks: dict[int, list[np.ndarray]] = {r: [] for r in rates}  # float32 pieces of each rate's audio
        self.start: float | None = None  # s: the first frame's timestamp (0 when it has none); None: no frame yet
        self.end = 0.0  # s: where the audio added so far ends
        self.gaps = 0.0  # s of silence put where the timestamps jump ahead, sound lost not counted
        self.lost = 0.0  # s of sound lost: packets that did not decode, data the demuxer skipped
        self.heard = 0.0  # s of sound added
        self.pending = 0.0  # s lost in packets since the last frame added
        self.skipped = False  # sound of unknown length lost since the last frame added

    def lose(self, seconds: float | None) -> None:
        """Sound lost before the next frame: `seconds` of it (a packet that did not decode), or, None,
        as much as the next frame's timestamp jumps ahead (data the demuxer skipped)."""
        if seconds is None:
            self.skipped = True
        else:
            self.lost += seconds
            self.pending += seconds

    def add(self, frame: av.AudioFrame) -> None:
        """Appends a decoded frame at its timestamp (after the audio so far when it has none)."""
        at = None if frame.pts is None else float(frame.pts * frame.time_base)
        if self.start is None:
            self.start = self.end = max(0.0, at or 0.0)
        elif at is not None and at - self.end > GAP:  # the sound jumps ahead: silence in between
            jump = at - self.end
            lost = jump if self.skipped else min(jump, self.pending)
            self.lost += max(0.0, lost - self.pending)  # skipped beyond the packets counted already
            self.gaps += jump - lost
            for r in self.rates:
                self.chunks[r].append(np.zeros(round(jump * r), np.float32))
            self.end = at
        self.pending, self.skipped = 0.0, False
        self.end += frame.samples / frame.sample_rate
        self.heard += frame.samples / frame.sample_rate
        for r, resampler in self.resamplers.items():
            self.chunks[r] += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]

    def flush(self) -> None:
        """Appends what the resamplers still hold, once the last frame was added."""
        for r, resampler in self.resamplers.items():
            self.chunks[r] += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]

    def finish(self, end: Fraction | None) -> None:
        """The sound's end, once the last frame was added and flushed: sound the demuxer skipped after
        the last frame (Matroska dropping a damaged last cluster) is lost up to where the file states
        the sound ends (`end`, s; None: unstated, nothing counted), silence there."""
        if not self.skipped or end is None or self.start is None or float(end) - self.end <= GAP:
            return
        jump = float(end) - self.end
        self.lost += max(0.0, jump - self.pending)
        for r in self.rates:
            self.chunks[r].append(np.zeros(round(jump * r), np.float32))
        self.end, self.skipped = float(end), False

    def cut(self) -> None:
        """The file is cut off: the packets lost after the last frame are the cut's (a packet broken
        off at the end), past the file's end, not sound lost."""
        self.lost -= self.pending
        self.pending = 0.0

    def mono(self, rate: int) -> np.ndarray:
        """[samples] float32 at `rate` (one of `rates`): the audio from time 0 on, silence before
        its start."""
        lead = np.zeros(int(round((self.start or 0.0) * rate)), np.float32)
        return np.concatenate([lead, *self.chunks[rate]]).astype(np.float32)


def read_packets(
    container: av.container.InputContainer,
    video: av.VideoStream | None,
    sound: av.AudioStream | None,
    timeline: AudioTimeline,
) -> demux.Pass:
    """One demuxing pass over `container`'s `video` and `sound` streams (either may be None): the
    video packets' timestamps (`Pass.stamps`), the sound's frames added to `timeline`, and what the
    pass met (`demux.Pass`). An audio packet that does not decode, and data the demuxer skipped, are
    sound lost (`AudioTimeline.lose`); the pass goes on past them. Raises nothing of PyAV's."""
    seen, skips = demux.Pass(), 0
    for packet in demux.packets(container, [s for s in (video, sound) if s is not None], seen):
        if packet.stream is not sound:
            continue
        if seen.skips > skips:
            timeline.lose(None)
            skips = seen.skips
        frames = demux.decode(packet, seen)
        if frames is None:
            timeline.lose(seen.sound_failed[-1])
        for frame in frames or []:
            timeline.add(frame)
    if seen.skips > skips:  # damaged data after the last sound packet
        timeline.lose(None)
    timeline.flush()
    return seen


@dataclass
class Demuxed:
    """What the demuxing pass over a file read (`demux_media`)."""

    seen: demux.Pass
    timeline: AudioTimeline
    fps: Fraction | None  # the video's average rate; None without video or a rate
    header: int  # the frame count the video stream's header states; 0: none
    time_base: Fraction | None  # the video stream's; None without video
    sound: bool  # an audio stream is there
    front_to_back: bool  # read as it lies, without the container's index


def demux_media(path: Path, rates: tuple[int, ...], front_to_back: bool = False, format: str | None = None) -> Demuxed:
    """The demuxing pass over the file at `path` (`read_packets`), its sound at `rates` (Hz);
    `front_to_back` and `format` as `demux.opened` takes them. Raises `FAULTS` and OSError when the
    file cannot be opened."""
    timeline = AudioTimeline(rates)
    with demux.opened(path, front_to_back, format) as container:
        video = container.streams.video[0] if container.streams.video else None
        sound = container.streams.audio[0] if container.streams.audio else None
        rate = (video.average_rate or video.guessed_rate) if video else None
        seen = read_packets(container, video, sound, timeline)
        return Demuxed(
            seen,
            timeline,
            Fraction(rate) if rate else None,
            int(video.frames) if video else 0,
            video.time_base if video else None,
            sound is not None,
            front_to_back,
        )


def demux_whole(path: Path, rates: tuple[int, ...]) -> Demuxed:
    """`demux_media`, again reading the file as it lies when its index is cut short (its video
    packets fall short of the count its header states though the demuxer met no error, and read as
    they lie they are more: `demux.index_cut_short`). Raises as `demux_media`."""
    first = demux_media(path, rates)
    if first.header <= len(first.seen.stamps) or first.seen.stopped:
        return first
    format = demux.index_cut_short(path)
    return first if format is None else demux_media(path, rates, front_to_back=True, format=format)


def video_frames(path: Path, read: Demuxed) -> tuple[demux.Frames, str]:
    """The video's frames (`demux.Frames`), the lost ones in their places, and why decoding it
    stopped before its end ("" when it did not).

    From the demuxed packets' timestamps when they agree with the header's frame count and the pass
    met no damage; else by decoding the video (`demux.from_decoded`): when the header states no count
    (fragmented MP4, Matroska) or one the packets do not bear out, and to count the frames lost in a
    damaged file (its times then still come from its packets when they agree with the header)."""
    seen, tb = read.seen, read.time_base
    agree = read.header == len(seen.stamps) and None not in seen.stamps
    if agree and not seen.damaged:
        return demux.from_packets(seen, tb, read.fps), ""
    decoded, again = [], demux.Pass()
    try:
        with demux.opened(path, read.front_to_back, seen.format) as container:
            video = container.streams.video[0]
            video.thread_type = "SLICE" if seen.damaged else "AUTO"  # frame threading hides a bad packet's error
            for packet in demux.packets(container, [video], again):
                decoded += [f.pts for f in demux.decode(packet, again) or []]
    except (*FAULTS, OSError) as exc:  # could not open it again
        again.stopped = again.stopped or fault(exc)
    if not decoded and None not in seen.stamps:  # nothing decoded: the packets are all there is
        return demux.from_packets(seen, tb, read.fps), again.stopped
    cut = bool(seen.stopped) or read.header > len(seen.stamps)
    frames = demux.from_decoded(decoded, again, tb, read.fps, cut)
    if agree:
        packets = demux.from_packets(seen, tb, read.fps)
        return demux.Frames(packets.times, True, frames.lost, {}), again.stopped
    return frames, again.stopped


def read_media(path: Path | None, sample_rate: int, also: tuple[int, ...] = ()) -> Media:
    """Each video frame's presentation time, and the audio decoded with PyAV, mixed to mono and
    resampled to `sample_rate` (and to the `also` rates, from the same decoded frames), placed on
    the container's timeline by its timestamps: sample k of the audio is at k / rate s, silence
    before its first timestamp and where its timestamps jump ahead (a recorder that dropped sound),
    as a frame's time is its timestamp (`AudioTimeline`).

    One demuxing pass reads the video packets' timestamps and decodes the audio (`read_packets`);
    the video is decoded only when its frame count needs it or the file is damaged (`video_frames`).
    A file damaged part way is read past the damage (`demux`): every frame keeps its number and
    time, the packets that do not decode are counted (`frames_lost`, `sound_lost`, silence where the
    sound was lost). A file cut off (a broken download) keeps what precedes the cut and says where
    it stopped (`damage`); a file that cannot be opened gives a `Media` with `error` set. Never an
    exception."""
    if path is None:
        return Media(None, [], error="no video file")
    try:
        read = demux_whole(path, (sample_rate, *also))
    except (*FAULTS, OSError) as exc:
        return Media(None, [], error=demux.unreadable(path, exc))
    frames, damage = demux.Frames([], True, 0, {}), read.seen.stopped
    if read.time_base is not None:
        frames, late = video_frames(path, read)
        cut = f"it holds {len(frames.times)} of the {read.header} frames its header states"
        damage = damage or late or (cut if read.header > len(frames.times) else "")
    timeline = read.timeline
    if damage:
        timeline.cut()
    else:
        timeline.finish(read.seen.sound_end)
    heard = read.sound and timeline.start is not None
    return Media(
        read.fps,
        frames.times,
        header_frames=read.header,
        timed=frames.timed,
        audio=timeline.mono(sample_rate) if heard else None,
        audio_start=timeline.start or 0.0,
        sound_gaps=timeline.gaps,
        empty_audio=read.sound and not heard,
        damage=damage or None,
        resampled={r: timeline.mono(r) for r in also} if heard else {},
        frames_lost=frames.lost,
        sound_lost=timeline.lost,
        sound_heard=timeline.heard,
    )


def frame_times(media: Media, n: int) -> list[Fraction]:
    """Times (s) of those of frames 1..n that the video has: each one's own timestamp. Frames past
    the video's last (an annotation longer than its video) have none: they are outside the video.
    When the file has no video frames to count (unreadable, no video stream), frame i is taken to
    be at (i - 1) / fps (30 fps when even the rate is unknown)."""
    if media.frames:
        return media.times[:n]
    return [Fraction(i) / (media.fps or ASSUMED_FPS) for i in range(n)]


def seconds(times: list[Fraction]) -> np.ndarray:
    return np.array([float(t) for t in times], np.float64)


def log_mel(audio: np.ndarray, p: MelParams) -> np.ndarray:
    """[n_mels, columns] natural-log mel power; column k is centred at k * hop / sample_rate s.
    Audio shorter than half an FFT window (a few ms of sound) is padded with silence first."""
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=p.sample_rate, n_fft=p.n_fft, hop_length=p.hop, n_mels=p.n_mels, power=2.0
    )
    audio = np.pad(audio, (0, max(0, p.n_fft // 2 + 1 - len(audio))))  # the centred frames reflect n_fft / 2
    with torch.no_grad():
        mel = transform(torch.from_numpy(audio))
    return torch.log(mel + 1e-6).numpy()


def frame_columns(mel: np.ndarray | None, times: np.ndarray, n_frames: int, p: MelParams) -> np.ndarray:
    """[n_mels, n_frames + 2 * WIDEST] float32: column WIDEST + i - 1 belongs to frame i, the
    log-mel interpolated at the frame's time `times[i - 1]` (s).

    Columns before frame 1, after the last frame, past the end of the audio and of frames past
    `len(times)` (labels past the video's end) are silence, so edge windows keep their width;
    `padding` tells how many of a window's columns that is.
    """
    out = np.full((p.n_mels, n_frames + 2 * WIDEST), SILENCE, np.float32)
    if mel is None or mel.shape[1] == 0:
        return out
    pos = np.asarray(times[:n_frames], np.float64) * p.sample_rate / p.hop  # fractional column of each frame
    inside = np.flatnonzero((pos >= 0) & (pos <= mel.shape[1] - 1))
    lo = np.floor(pos[inside]).astype(int)
    hi = np.minimum(lo + 1, mel.shape[1] - 1)
    w = (pos[inside] - lo).astype(np.float32)
    out[:, WIDEST + inside] = mel[:, lo] * (1 - w) + mel[:, hi] * w
    return out


def window(columns: np.ndarray, frame: int) -> np.ndarray:
    """The widest window of frame `frame` (1-based): frames frame-32 .. frame+31, as in paper 000."""
    return columns[:, frame - 1 : frame - 1 + 2 * WIDEST]


def heard(times: list[Fraction], audio: np.ndarray | None, audio_start: float, rate: int) -> np.ndarray:
    """[len(times)] bool: which frames lie inside the audio (its first to its last sample)."""
    t = seconds(times)
    if audio is None:
        return np.zeros(len(t), bool)
    return (t >= audio_start) & (t < len(audio) / rate)


def padding(heard_: np.ndarray, n_frames: int) -> np.ndarray:
    """[n_frames, 2]: how many of each frame's widest-window columns (frames f-32 .. f+31) are
    silence because they lie outside the video or the audio: before (before frame 1, or before the
    audio starts) and after (after the last frame, after the audio ends, or past the video's end).
    Each row sums to at most the window's 2 * WIDEST columns."""
    k = len(heard_)
    silent = np.ones(n_frames + 2 * WIDEST, bool)  # column WIDEST + i - 1 is frame i
    silent[WIDEST : WIDEST + min(k, n_frames)] = ~heard_[:n_frames]
    first = WIDEST + (int(np.argmax(heard_)) if heard_.any() else 0)  # columns before it lead the sound
    before = silent & (np.arange(len(silent)) < first)
    windows = np.lib.stride_tricks.sliding_window_view(np.stack([before, silent & ~before]), 2 * WIDEST, axis=1)
    return windows.sum(2).T[:n_frames].astype(np.int64)


def pcm16(audio: np.ndarray) -> np.ndarray:
    """Float samples as 16-bit PCM, the waveform member's compact form."""
    return np.clip(np.round(audio * PCM_SCALE), -PCM_SCALE - 1, PCM_SCALE).astype(np.int16)


def wave_window(pcm: np.ndarray, time: Fraction) -> np.ndarray:
    """The widest waveform window of a frame shown at `time` (s): WAVE_WIDTH samples centred on
    it, zeros before the audio starts and after it ends."""
    start = round(time * WAVE_RATE) - WAVE_WIDTH // 2
    out = np.zeros(WAVE_WIDTH, np.int16)
    lo, hi = max(0, start), min(len(pcm), start + WAVE_WIDTH)
    if hi > lo:
        out[lo - start : hi - start] = pcm[lo:hi]
    return out


@dataclass(frozen=True)
class ProsodyParams:
    """The per-frame audio features of paper 001 (MFCC, pitch, short-time energy); the paper used
    librosa and gives no parameters, these are common speech settings."""

    sample_rate: int = 16000
    n_mfcc: int = 13
    n_mels: int = 40
    n_fft: int = 400  # 25 ms
    hop: int = 160  # 10 ms
    min_pitch: float = 85.0  # Hz
    max_pitch: float = 500.0


def prosody(audio: np.ndarray | None, times: np.ndarray, p: ProsodyParams) -> np.ndarray:
    """[frames, n_mfcc + 2]: the MFCC, pitch (Hz) and log energy of the 25 ms around each video
    frame's time `times` (s); zeros for a video without audio and outside the audio."""
    n_frames = len(times)
    out = np.zeros((n_frames, p.n_mfcc + 2), np.float32)
    if audio is None or len(audio) < p.n_fft:
        return out
    wave = torch.from_numpy(audio)
    mfcc = torchaudio.transforms.MFCC(
        p.sample_rate, p.n_mfcc, melkwargs={"n_fft": p.n_fft, "hop_length": p.hop, "n_mels": p.n_mels}
    )
    half = p.n_fft // 2
    with torch.no_grad():
        coefficients = mfcc(wave).T  # column k centred at k * hop
        pitch = torchaudio.functional.detect_pitch_frequency(
            wave[None],
            p.sample_rate,
            frame_time=p.hop / p.sample_rate,
            freq_low=int(p.min_pitch),
            freq_high=int(p.max_pitch),
        )[0]
        framed = torch.nn.functional.pad(wave, (half, half)).unfold(0, p.n_fft, p.hop)
        energy = torch.log(framed.pow(2).mean(1) + 1e-10)
    t = np.asarray(times, np.float64) * p.sample_rate  # each video frame's sample
    inside = (t >= 0) & (t < len(audio))
    k = np.round(t[inside] / p.hop).astype(int)
    for column, values in enumerate([*coefficients.T, pitch, energy]):
        out[inside, column] = values[np.minimum(k, len(values) - 1)].numpy()
    return out
