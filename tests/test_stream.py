import io
import random
import shutil

import numpy as np
import pytest
import torch

from fer_dist import config
from fer_dist.data.shards.format import SampleMeta, read_manifest, sample_key
from fer_dist.data.stream import balance, pipeline, transport
from fer_dist.data.stream.balance import expected_thrown_away, resampling_plan
from fer_dist.data.stream.counts import COUNTS, Counter, Tally, describe, diversity, median_and_least
from fer_dist.data.stream.decode import decode_frame
from fer_dist.data.stream.pipeline import StreamError, check, eval_loader, pick_window, train_loader
from fer_dist.data.stream.transforms import crop_resize_windows
from fer_dist.models.contract import IMAGENET
from helpers import samples


def data_cfg(shards, **kw):
    cfg = config.load(None, [f"data.shards={shards}", "data.workers=0", "data.batch_size=8", "data.shuffle_buffer=50"])
    for k, v in kw.items():
        setattr(cfg.data, k, v)
    return cfg.data


def keys_of(loader):
    return [k for b in loader for k in b["key"]]


def test_train_batches_equal_on_every_rank(shards):
    manifest = read_manifest(shards)
    cfg = data_cfg(shards, epoch_samples=160)
    counts = []
    for rank in range(2):
        loader, n = train_loader(cfg, manifest, seed=0, epoch=0, rank=rank, world=2)
        batches = list(loader)
        counts.append(len(batches))
        assert n == 160 // (8 * 2)
        assert all(len(b["label"]) == 8 for b in batches)
    assert counts == [10, 10]


def test_train_order_is_seeded_and_changes_per_epoch(shards):
    manifest = read_manifest(shards)
    cfg = data_cfg(shards, epoch_samples=96)

    def order(seed, epoch, rank=0):
        return keys_of(train_loader(cfg, manifest, seed=seed, epoch=epoch, rank=rank, world=2)[0])

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(0, 0, rank=1)
    holdout = {k for k in keys_of(eval_loader(cfg, manifest, "fold0", rank=0, world=1))}
    assert not holdout & set(order(0, 0))  # the held-out fold is never trained on


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_sees_every_frame_once(shards, world):
    manifest = read_manifest(shards)
    cfg = data_cfg(shards, eval_batch_size=16)
    keys = []
    for rank in range(world):
        keys += keys_of(eval_loader(cfg, manifest, "fold1", rank=rank, world=world))
    assert len(keys) == len(set(keys)) == manifest.groups["fold1"].samples


def test_target_families():
    counts = np.array([100, 25, 0, 1, 4, 16, 9, 49])
    np.testing.assert_allclose(balance.target_distribution(counts, "natural"), counts / counts.sum())
    sqrt = balance.target_distribution(counts, "sqrt")
    np.testing.assert_allclose(sqrt, np.sqrt(counts) / np.sqrt(counts).sum())
    uniform = balance.target_distribution(counts, "uniform")
    assert uniform[2] == 0 and np.allclose(uniform[counts > 0], 1 / 7)
    weights = balance.target_distribution(counts, "weights", [1, 2, 5, 1, 1, 1, 1, 1])
    assert weights[2] == 0 and np.isclose(weights[1], 2 * weights[0]) and np.isclose(weights.sum(), 1)
    copies = balance.expected_copies(counts, uniform, max_repeat=1000)
    p = counts / counts.sum()
    assert np.isclose((copies * p).sum(), 1.0)  # one copy per read sample on average
    np.testing.assert_allclose(copies * p, uniform)
    assert balance.expected_copies(counts, uniform, max_repeat=3).max() == 3


def test_per_video_caps_and_subsampling():
    counts = {"a": np.array([400, 10, 0]), "b": np.array([30, 300, 5])}
    plan = balance.plan(counts, "natural", caps=[50, 200, 0])
    # natural target over the capped source: every kept frame is emitted once in expectation
    np.testing.assert_allclose(plan.copies["a"], [50 / 400, 1, 1])
    np.testing.assert_allclose(plan.copies["b"], [1, 200 / 300, 1])
    np.testing.assert_allclose(plan.emitted, [50 + 30, 10 + 200, 5])
    assert np.isclose(plan.discarded_fraction, (350 + 100) / 745)
    thinned = balance.plan(counts, "natural", keep=[0.5, 1, 1])
    np.testing.assert_allclose(thinned.emitted, [215, 310, 5])
    uniform = balance.plan(counts, "uniform", caps=[50, 200, 0], max_repeat=100)
    np.testing.assert_allclose(uniform.emitted, [uniform.emitted.sum() / 3] * 3)
    assert np.isclose(uniform.emitted.sum(), 80 + 210 + 5)  # caps set the epoch, the target its shares


def test_stochastic_rounding_mean():
    rng = random.Random(0)
    draws = [balance.draw_copies(1.3, rng) for _ in range(20000)]
    assert set(draws) == {1, 2}
    assert abs(np.mean(draws) - 1.3) < 0.02


def test_stream_emits_the_planned_class_shares(shards):
    manifest = read_manifest(shards)
    cfg = data_cfg(shards, epoch_samples=6000, batch_size=50, balance="uniform", shuffle_buffer=200)
    plan = resampling_plan(manifest, manifest.fold_groups(0), cfg)
    loader, _ = train_loader(cfg, manifest, seed=0, epoch=0, rank=0, world=1)
    tally, labels = Tally(), []
    for batch in loader:
        labels.append(batch["label"])
        tally.see(batch)
    emitted = np.bincount(torch.cat(labels).numpy(), minlength=8) / 6000
    expected = plan.emitted / plan.emitted.sum()
    assert np.abs(emitted - expected).max() < 0.03, (emitted, expected)
    counts = describe(tally.total())
    assert counts["emitted"] >= 6000 and counts["read"] > 0
    assert counts["discarded_fraction"] > 0  # the uniform target thins the majority classes
    expected = expected_thrown_away(manifest, manifest.fold_groups(0), plan)
    assert abs(counts["discarded_fraction"] - expected) < 0.05, (counts, expected)


def test_a_batch_counts_the_videos_and_the_clips_it_draws_on():
    """A clip is a run of consecutive frames of one video as read from one shard: a gap, another
    video or another shard starts the next; copies of a frame stay in its clip."""

    def sample(url: str, video: str, frame: int) -> dict:
        meta = windowed(True, True, True)["meta"]
        meta.video, meta.frame = video, frame
        return {"__key__": sample_key(video, frame), "__url__": url, "json": meta.to_bytes(), "cls": b"1"}

    read = [("a", "v", 1), ("a", "v", 2), ("a", "v", 4), ("a", "w", 5), ("b", "w", 6), ("b", "w", 7)]
    parsed = list(pipeline.parse([sample(*r) for r in read], Counter()))
    assert [s["clip"] for s in parsed] == [1, 1, 2, 3, 4, 4]
    frames = [decode_frame(s, ()) for s in parsed + parsed[:1]]  # and a copy of the first frame
    batch = transport.as_tensors(transport.collate(frames, image_size=8))
    assert diversity(batch) == (2, 4)
    runs = transport.as_tensors(transport.collate_runs([frames[:2], frames[3:4]], length=3, image_size=8))
    assert diversity(runs) == (2, 2)  # the padding of the short run is no frame
    assert median_and_least([0, 0, 3, 1, 5]) == {"median": 4, "min": 2}
    assert median_and_least([0, 2, 0, 2]) == {"median": 1, "min": 1}


def windowed(s: bool, m: bool, l: bool) -> dict:  # noqa: E741 - the window's name
    """A parsed sample whose windows pass their purity thresholds as given."""
    return {"meta": SampleMeta("v", 1, 0, "train", "fold0", 30.0, {"s": s, "m": m, "l": l}, True, [0, 0], None)}


def test_window_choice(tmp_path):
    frames = [windowed(False, True, True) for _ in range(400)]
    bare = [windowed(False, False, False) for _ in range(10)]
    counter = Counter()
    chosen = [s["window"] for s in pick_window(iter(frames + bare), ["s", "m", "l"], "drop", "0/0/0", counter)]
    assert len(chosen) == 400 and set(chosen) == {"m", "l"} and 150 < chosen.count("m") < 250
    assert counter.values[COUNTS.index("no_window")] == 10
    only_short = list(pick_window(iter(frames), ["s"], "widest", "0/0/0", Counter()))
    assert {s["window"] for s in only_short} == {"l"}  # no pure short window: the widest, when asked


def test_window_crop_resize_is_a_centre_crop():
    mel = torch.arange(64, dtype=torch.float32).repeat(2, 4, 1)  # column index as value
    window = torch.tensor([[16, 32], [0, 64]])
    out = crop_resize_windows(mel, window, (4, 32))
    torch.testing.assert_close(out[0, 0, 0], torch.arange(16, 48, dtype=torch.float32))
    torch.testing.assert_close(out[1, 0, 0], mel[1, 0, ::2] + 0.5)


def test_clip_mode_runs_of_consecutive_frames(shards):
    manifest = read_manifest(shards)
    cfg = data_cfg(shards, epoch_samples=4 * 16 * 4, batch_size=4, sequence_length=16, eval_batch_size=4)
    loader, n = train_loader(cfg, manifest, seed=0, epoch=0, rank=0, world=1)
    batches = list(loader)
    assert len(batches) == n == 4
    for batch in batches:
        assert batch["image"].shape[:2] == batch["label"].shape == batch["mask"].shape == (4, 16)
        for keys, mask in zip(batch["key"], batch["mask"], strict=True):
            real = [k for k in keys if k]
            assert len(real) == int(mask.sum()) and mask[: len(real)].all()
            videos = {k.rsplit("/", 1)[0] for k in real}
            frames = [int(k.rsplit("/", 1)[1]) for k in real]
            assert len(videos) == 1 and frames == list(range(frames[0], frames[0] + len(frames)))
    keys = []
    for rank in range(2):
        for batch in eval_loader(cfg, manifest, "fold2", rank=rank, world=2):
            keys += [k for row in batch["key"] for k in row if k]
            assert (batch["label"][~batch["mask"]] == -1).all()
    assert len(keys) == len(set(keys)) == manifest.groups["fold2"].samples


def test_sequence_longer_than_the_packed_clips_is_refused(shards):
    manifest = read_manifest(shards)
    with pytest.raises(config.ConfigError, match="clip-len 64"):
        check(data_cfg(shards, sequence_length=64), manifest)


def corrupt_copy(shards, tmp_path):
    """The shards with one training shard truncated mid-sample and the JPEGs of another garbled."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    manifest = read_manifest(out)
    first, second = (out / s.name for s in manifest.groups["fold1"].shards[:2])
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2 + 7])
    second.write_bytes(second.read_bytes().replace(b"\xff\xd8\xff", b"\0\0\0"))  # JPEGs without their SOI
    return out, manifest


def test_corrupt_shard_and_sample_are_skipped_and_counted(shards, tmp_path, caplog):
    out, manifest = corrupt_copy(shards, tmp_path)
    cfg = data_cfg(out, epoch_samples=4000, batch_size=40, balance="natural", shuffle_buffer=10)
    loader, n = train_loader(cfg, manifest, seed=0, epoch=0, rank=0, world=1)
    tally, batches = Tally(), 0
    for batch in loader:
        batches += 1
        tally.see(batch)
    counts = describe(tally.total())
    assert batches == n  # training went on
    assert counts["corrupt_shards"] >= 1 and counts["corrupt_samples"] >= 1
    assert "skipped a shard" in caplog.text and "skipped a sample" in caplog.text


def test_a_stream_of_unreadable_shards_stops_with_an_error(shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    for tar in out.glob("fold[1-4]-*.tar"):
        tar.write_bytes(b"not a tar file")
    cfg = data_cfg(out, epoch_samples=80)
    loader, _ = train_loader(cfg, read_manifest(out), seed=0, epoch=0, rank=0, world=1)
    with pytest.raises(StreamError, match="shards in a row could not be read"):
        list(loader)


@pytest.mark.slow
def test_workers_started_by_fork_spawn_or_forkserver_give_the_same_samples(shards):
    """Every stage is a module-level function with its arguments bound, so a worker started by
    spawn or forkserver (Python 3.14's default on Linux), which gets the pipeline pickled, reads
    what a forked one reads: the training stream of a resumed epoch, in clip mode, and evaluation."""
    manifest = read_manifest(shards)
    seen = {}
    for method in ("fork", "spawn", "forkserver"):
        cfg = data_cfg(shards, workers=2, start_method=method, epoch_samples=320, sequence_length=4)
        loader, _ = train_loader(cfg, manifest, seed=0, epoch=1, rank=0, world=1, skip=1)
        batches = list(loader)
        train = [k for b in batches for run in b["key"] for k in run]
        held_out = keys_of(
            eval_loader(data_cfg(shards, workers=2, start_method=method), manifest, "fold1", rank=0, world=1)
        )
        seen[method] = (train, held_out, [b["image"].sum().item() for b in batches])
    assert len(seen["fork"][0]) > 0 and len(seen["fork"][1]) == manifest.groups["fold1"].samples
    assert seen["spawn"] == seen["fork"] and seen["forkserver"] == seen["fork"]


@pytest.mark.parametrize("sequence_length", [0, 4])
def test_the_waveform_window_is_cut_from_the_member_as_the_window_drawn(wave_shards, sequence_length):
    """The stream takes the window drawn for the frame (the same draw as the log-mel's) from the
    stored waveform: its samples first, then silence, and its length; a frame's mel window and
    waveform window are the same window."""
    from fer_dist.data.stream.transforms import prepare

    manifest = read_manifest(wave_shards)
    stored = {s["__key__"]: s for s in samples(wave_shards)}
    cfg = data_cfg(wave_shards, epoch_samples=64, sequence_length=sequence_length)
    loader, _ = train_loader(cfg, manifest, seed=0, epoch=0, rank=0, world=1, inputs=("audio", "wave"))
    batch = next(iter(loader))
    keys = [k for run in batch["key"] for k in run] if sequence_length else batch["key"]
    waves, lengths = batch["wave"].flatten(0, -2), batch["wave_length"].flatten()
    mel_widths = batch["window"].flatten(0, -2)[:, 1]
    spans = {64: (0, 34134), 48: (4267, 25600), 32: (8534, 17066)}  # mel columns -> samples
    seen = set()
    for key, wave, length, width in zip(keys, waves, lengths, mel_widths.tolist(), strict=True):
        if not key:  # padding of a short run
            continue
        start, expected_length = spans[width]
        member = np.load(io.BytesIO(stored[key]["wav.npy"]), allow_pickle=False)
        assert length == expected_length
        assert np.array_equal(wave[:length].numpy(), member[start : start + length]) and not wave[length:].any()
        seen.add(width)
    assert len(seen) > 1  # the windows drawn differ
    inputs = prepare(batch, torch.device("cpu"), cfg, manifest, train=False, normalisation=IMAGENET)
    assert inputs["wave"].shape == batch["wave"].shape and inputs["wave"].abs().max() <= 1
    assert torch.equal(inputs["wave_lengths"], batch["wave_length"])


@pytest.mark.parametrize("sequence_length", [0, 4])
def test_a_worker_hands_over_the_batches_it_made_in_one_block_each(shards, sequence_length):
    """A worker's batches reach the training process equal to the batches made in that process
    (the worker writes later batches into blocks it has handed over before), each batch's crops
    and spectrograms views of one block, everything small as tensors."""
    manifest = read_manifest(shards)
    batches = {}
    for workers in (0, 1):
        cfg = data_cfg(shards, workers=workers, epoch_samples=320, sequence_length=sequence_length, batch_size=8)
        batches[workers] = list(train_loader(cfg, manifest, seed=0, epoch=0, rank=0, world=1)[0])
    assert len(batches[1]) == len(batches[0]) > transport.POOL
    for alone, handed in zip(batches[0], batches[1], strict=True):
        assert handed.keys() == alone.keys() and handed["key"] == alone["key"]
        for name, value in alone.items():
            if name not in ("key", "__key__"):  # the second is webdataset's, None on a batch
                assert isinstance(handed[name], torch.Tensor) and torch.equal(handed[name], value), name
        assert handed["image"].shape[: 1 + bool(sequence_length)] == handed["label"].shape
        assert handed["image"].shape[-3] == 3
        assert handed["image"].untyped_storage().data_ptr() == handed["mel"].untyped_storage().data_ptr()


def test_a_worker_reuses_a_block_only_once_the_training_process_has_copied_it_out(monkeypatch):
    """...and hands a block over once: a batch in a block the training process holds already
    carries only the block's name."""
    monkeypatch.setattr(transport, "get_worker_info", lambda: "a worker")
    for name, empty in (("_pool", []), ("_handed", set()), ("_held", {})):
        monkeypatch.setattr(transport, name, empty)

    def made(value: int) -> dict:
        crop = torch.arange(60, dtype=torch.uint8).view(4, 5, 3).permute(2, 0, 1) + value  # as decode_jpeg gives it
        frames = [{"key": str(i), "label": 0, "image": crop} for i in range(2)]
        return transport.collate(frames, image_size=4)

    first, second = made(1), made(2)
    assert first["block"].data_ptr() != second["block"].data_ptr()  # the first is still in the other's hands
    received = transport.as_tensors(first)
    third = made(3)
    assert third["block"] == third["block_name"] == first["block_name"]  # the first's block, by name
    crops = torch.arange(60, dtype=torch.uint8).view(4, 5, 3).permute(2, 0, 1).expand(2, 3, 4, 5)
    assert torch.equal(received["image"], crops + 1)
    assert torch.equal(transport.as_tensors(third)["image"], crops + 3)
    transport._held.clear()  # a name this process never received with its block
    with pytest.raises(RuntimeError, match="never received"):
        transport.as_tensors(third)


@pytest.mark.parametrize("sequence_length", [0, 4])
def test_crops_decoded_on_the_device_are_the_crops_the_workers_decode(shards, sequence_length):
    """`data.decode: gpu`: the stream carries each crop's checked JPEG bytes, and the batch
    preparation decodes them on the training device; on a CPU device that is the same decoder as
    the workers', so the prepared inputs are equal to the last bit."""
    from fer_dist.data.stream.transforms import prepare

    manifest = read_manifest(shards)
    prepared = {}
    for decode in ("cpu", "gpu"):
        cfg = data_cfg(shards, epoch_samples=64, sequence_length=sequence_length, decode=decode, image_size=48)
        batch = next(iter(train_loader(cfg, manifest, seed=0, epoch=0, rank=0, world=1)[0]))
        assert ("jpeg" in batch) == (decode == "gpu") and ("image" in batch) == (decode == "cpu")
        prepared[decode] = (
            batch["key"],
            prepare(batch, torch.device("cpu"), cfg, manifest, train=False, normalisation=IMAGENET),
        )
    (keys, cpu), (gpu_keys, gpu) = prepared["cpu"], prepared["gpu"]
    assert keys == gpu_keys and cpu.keys() == gpu.keys()
    for name in cpu:
        assert torch.equal(cpu[name], gpu[name]), name


def test_a_truncated_crop_is_caught_in_the_worker_when_the_gpu_decodes(tmp_path):
    from fer_dist.data.stream.decode import jpeg_bytes

    crop = tmp_path / "c.jpg"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 10, 10)).save(crop)
    data = crop.read_bytes()
    assert jpeg_bytes(data).tobytes() == data
    for broken in (data[: len(data) // 2], b"\x00" * 4 + data[4:]):
        with pytest.raises(ValueError, match="not a whole JPEG"):
            jpeg_bytes(broken)


def test_gpu_decoding_without_a_gpu_is_a_config_error(capsys):
    from fer_dist.cli import main

    assert main(["train", "--config", "mfm_cpu", "data.decode=gpu"]) == 2
    assert "data.decode=gpu" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_decodes_the_crops_as_the_cpu_does_up_to_rounding(shards):
    from fer_dist.data.stream.transforms import decode_on

    manifest = read_manifest(shards)
    cfg = data_cfg(shards, epoch_samples=64, decode="gpu")
    batch = next(iter(train_loader(cfg, manifest, seed=0, epoch=0, rank=0, world=1)[0]))
    jpegs = list(batch["jpeg"].split(batch["jpeg_lengths"].tolist()))
    on_gpu = decode_on(jpegs, torch.device("cuda"), 112).cpu().int()
    on_cpu = decode_on(jpegs, torch.device("cpu"), 112).int()
    difference = (on_gpu - on_cpu).abs().float()
    assert on_gpu.shape == on_cpu.shape and difference.mean() < 1.0 and difference.max() <= 16
