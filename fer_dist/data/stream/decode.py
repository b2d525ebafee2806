"""Decoding, the stream's last stage before batching: of each sample only the members its model
takes. A crop's JPEG to uint8 [3, H, W] in the loader worker (`data.decode: cpu`), or, for the
training device to decode in batches (`gpu`), its bytes after what can be checked without
decoding; the log-mel window with the (start, width) of the window drawn for it; the waveform
window cut to that window's samples; feature vectors as they are.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from fer_dist.data.shards.format import MEMBERS, load_npy, whole_jpeg
from fer_dist.data.shards.windows import NAMES, WAVE_WIDTH, column_span, wave_span
from fer_dist.data.stream.counts import Counter
from fer_dist.tracks import TRACKS

SPANS = {name: np.array(column_span(name)) for name in NAMES}  # each window's (start, width) columns
WAVE_SPANS = {name: wave_span(name) for name in NAMES}  # each window's (start, length) samples


def frames_of(sample: dict) -> list[dict]:
    """A sample's frames: itself, or a clip-mode run's."""
    return sample.get("frames", [sample])


def jpeg_bytes(data: bytes) -> np.ndarray:
    """A crop's bytes for decoding on the training device, after what a worker can check without
    decoding (`whole_jpeg`)."""
    if not whole_jpeg(data):
        raise ValueError("the crop is not a whole JPEG (start or end marker missing)")
    return np.frombuffer(data, np.uint8)


NO_AU = np.full(len(TRACKS["au"].columns), TRACKS["au"].missing, np.int8)
NO_VA = np.full(len(TRACKS["va"].columns), TRACKS["va"].missing, np.float32)


def decode_frame(sample: dict, inputs: tuple[str, ...], decode: str = "cpu") -> dict:
    """The members the model takes, decoded: JPEG to uint8 [3, H, W] (`decode: gpu`: its checked
    bytes, decoded on the device in batches), .npy arrays to tensors; with the frame's labels of
    every track: `label` the expression (-1: none), `au` [12] int8 0/1 (-1: none), `va` [2] float32
    (-5: none), from its metadata."""
    meta = sample["meta"]
    frame = {
        "key": sample["__key__"],
        "label": sample["label"],
        "au": NO_AU if meta.au is None else np.array(meta.au, np.int8),
        "va": NO_VA if meta.va is None else np.array(meta.va, np.float32),
        "clip": np.int64(sample["clip"]),
    }
    for name in inputs:
        data = sample[MEMBERS[name]]
        if name == "image" and decode == "gpu":
            frame["jpeg"] = jpeg_bytes(data)
        elif name == "image":
            frame["image"] = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        elif name == "audio":
            frame["mel"] = torch.from_numpy(load_npy(data))
            frame["window"] = SPANS[sample["window"]]
        elif name == "wave":
            start, length = WAVE_SPANS[sample["window"]]
            stored, wave = load_npy(data), np.zeros(WAVE_WIDTH, np.int16)
            wave[:length] = stored[start : start + length]  # the window first, then silence
            frame["wave"], frame["wave_length"] = torch.from_numpy(wave), np.int64(length)
        else:
            frame[name] = torch.from_numpy(load_npy(data))
    return frame


def decoded(src, inputs: tuple[str, ...], counter: Counter, decode: str = "cpu"):
    """Decoded frames (or runs of them); a sample that does not decode is skipped and counted."""
    for sample in src:
        try:
            frames = [decode_frame(f, inputs, decode) for f in frames_of(sample)]
        except Exception as exn:  # noqa: BLE001 - any decoder failure is a corrupt sample
            counter.sample_fault(RuntimeError(f"{frames_of(sample)[0]['__key__']}: {exn}"))
            continue
        yield frames if "frames" in sample else frames[0]
