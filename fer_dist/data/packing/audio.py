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

from fer_dist.data.shards.format import MelParams
from fer_dist.data.shards.windows import PCM_SCALE, SILENCE, WAVE_RATE, WAVE_WIDTH, WIDEST

ASSUMED_FPS = Fraction(30)  # the frame rate of a file that cannot be read


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
    damage: str | None = None  # why the file seems cut off or damaged part way: what precedes is kept
    error: str | None = None  # why the file could not be read at all
    resampled: dict[int, np.ndarray] = field(default_factory=dict)  # the audio at the `also` rates

    @property
    def frames(self) -> int:
        """The video's frames, counted (not the header's count)."""
        return len(self.times)


FAULTS = (av.error.FFmpegError, IndexError, ValueError)  # what PyAV raises on a damaged or unknown file
GAP = 0.01  # s: a jump in the audio's timestamps longer than this is filled with silence


def fault(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def video_times(container, video, stamps: list[int | None], fps: Fraction | None) -> tuple[list[Fraction], bool, str]:
    """Each frame's presentation time (s), in decode order, whether they are timestamps, and why
    decoding stopped early ("" when it did not).

    From the demuxed packets' `stamps` (sorted: presentation order) when they agree with the
    header's frame count; by decoding the video when the header states no count (fragmented MP4,
    Matroska) or one the packets do not bear out. Frames without timestamps are timed at
    (i - 1) / fps."""
    if int(video.frames) == len(stamps) and None not in stamps:
        return [Fraction(t) * video.time_base for t in sorted(stamps)], True, ""
    decoded, damage = [], ""
    try:
        container.seek(0)
        video.thread_type = "AUTO"
        for f in container.decode(video):
            decoded.append(None if f.pts is None else Fraction(f.pts) * f.time_base)
    except FAULTS as exc:
        damage = fault(exc)
    if not decoded and None not in stamps:  # could not even seek back: the packets are all there is
        return [Fraction(t) * video.time_base for t in sorted(stamps)], True, damage
    if None not in decoded:
        return decoded, True, damage
    return [Fraction(i) / (fps or ASSUMED_FPS) for i in range(len(decoded))], False, damage


class AudioTimeline:
    """An audio stream's decoded frames placed on the container's timeline, mixed to mono and
    resampled to each of `rates` (Hz) from the same frames: sample k of `mono(rate)` lies at
    k / rate s. Silence leads up to the first frame's timestamp and is put where the timestamps
    jump ahead by more than `GAP` (a recorder that dropped sound), so that what follows keeps its
    time, as a video frame's time is its timestamp."""

    def __init__(self, rates: tuple[int, ...]) -> None:
        self.rates = tuple(dict.fromkeys(rates))  # each once: the log-mel's and the waveform's may be one rate
        self.resamplers = {r: av.AudioResampler(format="flt", layout="mono", rate=r) for r in rates}
        self.chunks: dict[int, list[np.ndarray]] = {r: [] for r in rates}  # float32 pieces of each rate's audio
        self.start: float | None = None  # s: the first frame's timestamp (0 when it has none); None: no frame yet
        self.end = 0.0  # s: where the audio added so far ends
        self.gaps = 0.0  # s of silence put where the timestamps jump ahead

    def add(self, frame: av.AudioFrame) -> None:
        """Appends a decoded frame at its timestamp (after the audio so far when it has none)."""
        at = None if frame.pts is None else float(frame.pts * frame.time_base)
        if self.start is None:
            self.start = self.end = max(0.0, at or 0.0)
        elif at is not None and at - self.end > GAP:  # the sound jumps ahead: silence in between
            self.gaps += at - self.end
            for r in self.rates:
                self.chunks[r].append(np.zeros(round((at - self.end) * r), np.float32))
            self.end = at
        self.end += frame.samples / frame.sample_rate
        for r, resampler in self.resamplers.items():
            self.chunks[r] += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]

    def flush(self) -> None:
        """Appends what the resamplers still hold, once the last frame was added."""
        for r, resampler in self.resamplers.items():
            self.chunks[r] += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]

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
) -> tuple[list[int | None], str]:
    """One demuxing pass over `container`'s `video` and `sound` streams (either may be None): the
    video packets' timestamps (in the stream's time base; decode order), the sound's frames added
    to `timeline`; and why the pass stopped early ("" when it did not). PyAV's faults (`FAULTS`)
    end the pass, not raised."""
    stamps: list[int | None] = []
    try:
        for packet in container.demux([s for s in (video, sound) if s is not None]):
            if packet.stream is video:
                if packet.size and not packet.is_discard:
                    stamps.append(packet.pts if packet.pts is not None else packet.dts)
                continue
            for frame in packet.decode():
                timeline.add(frame)
    except FAULTS as exc:
        return stamps, fault(exc)
    return stamps, ""


def read_media(path: Path | None, sample_rate: int, also: tuple[int, ...] = ()) -> Media:
    """Each video frame's presentation time, and the audio decoded with PyAV, mixed to mono and
    resampled to `sample_rate` (and to the `also` rates, from the same decoded frames), placed on
    the container's timeline by its timestamps: sample k of the audio is at k / rate s, silence
    before its first timestamp and where its timestamps jump ahead (a recorder that dropped sound),
    as a frame's time is its timestamp (`AudioTimeline`).

    One demuxing pass reads the video packets' timestamps and decodes the audio (`read_packets`);
    the video is decoded only when its frame count needs it (`video_times`). A file damaged part
    way (cut off in a download) keeps what precedes the damage and says where it stopped
    (`damage`); a file that cannot be opened gives a `Media` with `error` set. Never an exception."""
    if path is None:
        return Media(None, [], error="no video file")
    try:
        container = av.open(str(path))
    except FAULTS as exc:
        return Media(None, [], error=fault(exc))
    timeline = AudioTimeline((sample_rate, *also))
    times, timed = [], True
    with container:
        video = container.streams.video[0] if container.streams.video else None
        sound = container.streams.audio[0] if container.streams.audio else None
        rate = (video.average_rate or video.guessed_rate) if video else None
        fps = Fraction(rate) if rate else None
        stamps, damage = read_packets(container, video, sound, timeline)
        timeline.flush()
        header = int(video.frames) if video else 0
        if video is not None:
            times, timed, late = video_times(container, video, stamps, fps)
            cut = f"it holds {len(times)} of the {header} frames its header states" if header > len(times) else ""
            damage = damage or late or cut
    heard = sound is not None and timeline.start is not None
    return Media(
        fps,
        times,
        header_frames=header,
        timed=timed,
        audio=timeline.mono(sample_rate) if heard else None,
        audio_start=timeline.start or 0.0,
        sound_gaps=timeline.gaps,
        empty_audio=sound is not None and not heard,
        damage=damage or None,
        resampled={r: timeline.mono(r) for r in also} if heard else {},
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
