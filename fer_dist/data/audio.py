"""Audio of a video as frame-synchronous log-mel columns.

The log-mel spectrogram (paper 000: 2048-point FFT, hop 1024, 128 mel bins) is computed once per
video, then resampled along time to one column per video frame, frame i sitting at (i - 1) / fps.
A frame's window of +-h frames is then a plain slice, whatever the video's frame rate and the
audio's sample rate, and the narrower windows are centre crops of the widest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torchaudio

SILENCE = float(np.log(1e-6))  # log-mel value of digital silence and of padding
WIDEST = 32  # half width, in frames, of the widest dynamic window (paper 000)


@dataclass(frozen=True)
class MelParams:
    sample_rate: int = 32000  # not stated in paper 000; at hop 1024 it gives ~31 columns/s, ~1 per frame
    n_fft: int = 2048
    hop: int = 1024
    n_mels: int = 128


@dataclass
class Media:
    fps: Fraction | None  # None when the file could not be read
    frames: int  # frames in the video stream (0 if unknown)
    audio: np.ndarray | None  # mono float32 at the requested rate; None: no audio stream or unreadable
    error: str | None = None  # why the file could not be read
    resampled: dict[int, np.ndarray] = field(default_factory=dict)  # the audio at the `also` rates


def read_media(path: Path | None, sample_rate: int, also: tuple[int, ...] = ()) -> Media:
    """Frame rate from the container, audio decoded with PyAV, mixed to mono and resampled; to
    the `also` rates as well, from the same decoded frames (one decode for all)."""
    if path is None:
        return Media(None, 0, None, "no video file")
    try:
        with av.open(str(path)) as container:
            video = container.streams.video[0] if container.streams.video else None
            fps = Fraction(video.average_rate or video.guessed_rate) if video else None
            frames = int(video.frames) if video else 0
            if not container.streams.audio:
                return Media(fps, frames, None)
            stream = container.streams.audio[0]
            rates = (sample_rate, *also)
            resamplers = {r: av.AudioResampler(format="flt", layout="mono", rate=r) for r in rates}
            chunks: dict[int, list] = {r: [] for r in rates}
            start = None
            for frame in container.decode(stream):
                if start is None and frame.pts is not None:
                    start = max(0.0, float(frame.pts * stream.time_base))
                for r, resampler in resamplers.items():
                    chunks[r] += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            for r, resampler in resamplers.items():
                chunks[r] += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except (av.error.FFmpegError, IndexError, ValueError) as exc:
        return Media(None, 0, None, f"{type(exc).__name__}: {exc}")

    def mono(rate: int) -> np.ndarray:
        lead = np.zeros(int(round((start or 0.0) * rate)), np.float32)
        return np.concatenate([lead, *chunks[rate]]).astype(np.float32)

    return Media(fps, frames, mono(sample_rate), resampled={r: mono(r) for r in also})


def log_mel(audio: np.ndarray, p: MelParams) -> np.ndarray:
    """[n_mels, columns] natural-log mel power; column k is centred at k * hop / sample_rate."""
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=p.sample_rate, n_fft=p.n_fft, hop_length=p.hop, n_mels=p.n_mels, power=2.0
    )
    with torch.no_grad():
        mel = transform(torch.from_numpy(audio))
    return torch.log(mel + 1e-6).numpy()


def frame_columns(mel: np.ndarray | None, n_frames: int, fps: Fraction, p: MelParams) -> np.ndarray:
    """[n_mels, n_frames + 2 * WIDEST] float32: column WIDEST + i - 1 belongs to frame i.

    Columns before frame 1, after the last frame, and past the end of the audio are silence, so
    edge windows keep their width; `padding` tells how many of a window's columns that is.
    """
    out = np.full((p.n_mels, n_frames + 2 * WIDEST), SILENCE, np.float32)
    if mel is None or mel.shape[1] == 0:
        return out
    pos = np.arange(n_frames) / float(fps) * p.sample_rate / p.hop  # fractional column of each frame
    inside = pos <= mel.shape[1] - 1
    lo = np.floor(pos[inside]).astype(int)
    hi = np.minimum(lo + 1, mel.shape[1] - 1)
    w = (pos[inside] - lo).astype(np.float32)
    out[:, WIDEST : WIDEST + int(inside.sum())] = mel[:, lo] * (1 - w) + mel[:, hi] * w
    return out


def window(columns: np.ndarray, frame: int) -> np.ndarray:
    """The widest window of frame `frame` (1-based): frames frame-32 .. frame+31, as in paper 000."""
    return columns[:, frame - 1 : frame - 1 + 2 * WIDEST]


WAVE_RATE = 16000  # the wav2vec2 family's input rate
NOMINAL_FPS = 30  # a waveform window lasts what its frame window lasts at this frame rate
PCM_SCALE = 32767  # float samples in [-1, 1] to 16-bit PCM


def wave_half(half_frames: int) -> int:
    """A window of +-`half_frames` frames as +- samples of the 16 kHz waveform (at NOMINAL_FPS:
    the durations are the same for every video, so windows stack into batches)."""
    return round(half_frames * WAVE_RATE / NOMINAL_FPS)


WAVE_WIDTH = 2 * wave_half(WIDEST)  # samples in a frame's stored waveform window


def pcm16(audio: np.ndarray) -> np.ndarray:
    """Float samples as 16-bit PCM, the waveform member's compact form."""
    return np.clip(np.round(audio * PCM_SCALE), -PCM_SCALE - 1, PCM_SCALE).astype(np.int16)


def wave_window(pcm: np.ndarray, frame: int, fps: Fraction) -> np.ndarray:
    """Frame `frame`'s (1-based) widest waveform window: WAVE_WIDTH samples centred on its time
    (frame - 1) / fps, zeros before the audio starts and after it ends."""
    start = round((frame - 1) * Fraction(WAVE_RATE) / Fraction(fps)) - WAVE_WIDTH // 2
    out = np.zeros(WAVE_WIDTH, np.int16)
    lo, hi = max(0, start), min(len(pcm), start + WAVE_WIDTH)
    if hi > lo:
        out[lo - start : hi - start] = pcm[lo:hi]
    return out


def padding(frame: int, n_frames: int, audio_frames: int) -> tuple[int, int]:
    """How many columns of the frame's widest window lie before frame 1 / after the audio or video."""
    last = min(n_frames, audio_frames)
    return max(0, WIDEST + 1 - frame), max(0, frame + WIDEST - 1 - last)


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


def prosody(audio: np.ndarray | None, n_frames: int, fps: Fraction, p: ProsodyParams) -> np.ndarray:
    """[n_frames, n_mfcc + 2]: the MFCC, pitch (Hz) and log energy of the 25 ms around each video
    frame (frame i at (i - 1) / fps); zeros for a video without audio and past the audio's end."""
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
    t = np.arange(n_frames) / float(fps) * p.sample_rate  # each video frame's sample
    inside = t < len(audio)
    k = np.round(t[inside] / p.hop).astype(int)
    for column, values in enumerate([*coefficients.T, pitch, energy]):
        out[inside, column] = values[np.minimum(k, len(values) - 1)].numpy()
    return out
