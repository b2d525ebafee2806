"""Training the action-unit and valence-arousal tracks: their losses and ensemble against values
worked by hand, the config's `tracks`, and a run of each track whose held-out frames are every
frame labelled for it, scored once, the same on 1, 2 and 3 ranks."""

from __future__ import annotations

import collections
import csv
import json
import math

import numpy as np
import pytest
import torch

from fer_dist import cli, config
from fer_dist.config import ConfigError, LossConfig
from fer_dist.data.packing.layout import discover
from fer_dist.data.packing.pack import pack
from fer_dist.data.packing.synth import synthesize
from fer_dist.data.shards import tars
from fer_dist.data.shards.format import PackParams, fold_group, read_manifest
from fer_dist.data.stream import balance, pipeline
from fer_dist.data.stream.counts import Counter
from fer_dist.engine import predictions
from fer_dist.engine.evaluation import scores
from fer_dist.engine.losses import circle, concordance, objective
from fer_dist.engine.metrics import ccc
from fer_dist.engine.task import au_pos_weight, ensembled
from fer_dist.models import build
from fer_dist.tracks import TRACKS, layout
from helpers import LENGTH, launch


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Six synthetic videos labelled for the three tracks (each track on its own overlapping
    set of videos), packed into 3 folds."""
    root = tmp_path_factory.mktemp("tracked")
    synthesize(root / "data", 6, seed=5, workers=2, length=LENGTH, tracks=("expr", "au", "va"))
    pack(discover(root / "data"), root / "shards", PackParams(samples_per_shard=150, n_folds=3), workers=2)
    return root / "shards"


def test_the_circle_loss_is_paper_001s_eq_5_worked_by_hand():
    s = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    first = math.log(1 + math.exp(-1.0) + math.exp(0.5)) + math.log(1 + math.exp(-2.0))
    second = math.log(1) + math.log(1 + 3 * math.exp(0.0))  # no negative: log(1 + 0)
    assert circle(s, y).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_au_loss_weighs_positives_masks_unlabelled_frames_and_adds_the_circle_loss():
    logits = torch.tensor([[1.0, -2.0], [0.5, 0.5], [3.0, 3.0]])
    y = torch.tensor([[1, 0], [0, 1], [-1, -1]])  # the third frame is not annotated
    weight = torch.tensor([4.0, 1.0])
    got = objective({"h": logits}, {"au": y}, ("h",), LossConfig(au_circle=0.5), pos_weight=weight)

    def bce(s, t, w):
        p = 1 / (1 + math.exp(-s))
        return -(w * t * math.log(p) + (1 - t) * math.log(1 - p))

    by_hand = np.mean([bce(1.0, 1, 4), bce(-2.0, 0, 1), bce(0.5, 0, 4), bce(0.5, 1, 1)])
    by_hand += 0.5 * circle(logits[:2], y[:2].float()).item()
    assert got.item() == pytest.approx(by_hand, rel=1e-6)


def test_va_loss_is_one_minus_the_ccc_of_each_dimension_over_the_labelled_frames():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(40, 2)).astype(np.float32)
    truth = np.clip(rng.normal(scale=0.4, size=(40, 2)), -1, 1).astype(np.float32)
    truth[5] = -5  # not annotated
    keep = np.arange(40) != 5
    pred = np.tanh(raw)
    by_hand = 1 - np.mean([ccc(pred[keep, d], truth[keep, d]) for d in range(2)])
    got = objective({"h": torch.from_numpy(raw)}, {"va": torch.from_numpy(truth)}, ("h",), LossConfig())
    assert got.item() == pytest.approx(by_hand, abs=1e-5)
    both = concordance(torch.from_numpy(pred[keep]), torch.from_numpy(truth[keep])).numpy()
    np.testing.assert_allclose(both, [ccc(pred[keep, d], truth[keep, d]) for d in range(2)], atol=1e-5)
    with_mse = objective({"h": torch.from_numpy(raw)}, {"va": torch.from_numpy(truth)}, ("h",), LossConfig(va_mse=2))
    assert with_mse.item() == pytest.approx(by_hand + 2 * np.mean((pred[keep] - truth[keep]) ** 2), abs=1e-5)


def test_the_ensemble_averages_each_tracks_own_values():
    outputs = {"a": torch.tensor([[0.0, 2.0, 1.0, -1.0]]), "b": torch.tensor([[2.0, -2.0, 0.0, 1.0]])}
    heads = ("a", "b")
    au = ensembled({h: v[:, :2].repeat(1, 6) for h, v in outputs.items()}, heads, ["au"])
    probs = (torch.sigmoid(outputs["a"][:, :2]) + torch.sigmoid(outputs["b"][:, :2])) / 2
    torch.testing.assert_close(torch.sigmoid(au[:, :2]), probs)
    va = ensembled({h: v[:, 2:] for h, v in outputs.items()}, heads, ["va"])
    torch.testing.assert_close(torch.tanh(va), (torch.tanh(outputs["a"][:, 2:]) + torch.tanh(outputs["b"][:, 2:])) / 2)


def test_tracks_lay_out_a_heads_columns_and_turn_them_into_labels():
    assert layout(["expr", "au", "va"]) == {"expr": slice(0, 8), "au": slice(8, 20), "va": slice(20, 22)}
    assert layout(["va"]) == {"va": slice(0, 2)}
    au, va = TRACKS["au"], TRACKS["va"]
    probs = au.values(np.array([[0.0, 2.0, -2.0] * 4]))
    assert probs[0, :3] == pytest.approx([0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))])
    assert au.decide(probs).tolist() == [[1, 1, 0] * 4]
    assert au.decide(probs, np.array([0.6, 0.9, 0.1] * 4)).tolist() == [[0, 0, 1] * 4]
    np.testing.assert_allclose(va.decide(va.values(np.array([[0.5, -30.0]]))), [[math.tanh(0.5), -1.0]])


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["tracks=[au, va]"], "a run learns one track"),
        (["tracks=[gaze]"], "unknown track 'gaze'"),
        (["tracks={au: 1}"], "a list of track names"),
        (["tracks=[au]", "data.mix=remix"], "data.mix=remix mixes expression labels"),
        (["loss.au_circle=-1"], "non-negative weights"),
        (["loss.au_pos_weight=inverse"], "loss.au_pos_weight must be one of counts, sqrt, none"),
    ],
)
def test_a_config_asking_for_tracks_it_cannot_learn_is_refused(overrides, says):
    with pytest.raises(ConfigError, match=says):
        config.load(None, overrides)


def test_heads_are_as_wide_as_the_runs_track_and_the_config_cannot_set_it():
    cfg = {"name": "feature_lstm", "embedding_dim": 8, "audio_features_dim": 4}
    for name, width in (("expr", 8), ("au", 12), ("va", 2)):
        model = build(cfg, 32, [32, 32], outputs=TRACKS[name].outputs)
        out = model(
            embedding=torch.randn(2, 5, 8), audio_features=torch.randn(2, 5, 4), mask=torch.ones(2, 5, dtype=bool)
        )
        assert all(v.shape == (2, 5, width) for v in out.values())
    with pytest.raises(ConfigError, match="model.outputs is set by the run's tracks"):
        build({**cfg, "outputs": 12}, 32, [32, 32])


def test_au_positive_weights_are_the_training_folds_negatives_over_positives(tracked):
    manifest = read_manifest(tracked)
    cfg = config.load(None, ["tracks=[au]", "data.mix=none", "data.holdout_fold=1"])
    counts = [manifest.groups[g].tracks["au"] for g in manifest.fold_groups(1) if "au" in manifest.groups[g].tracks]
    positives, frames = np.sum([c.counts for c in counts], 0), sum(c.samples for c in counts)
    want = np.where(positives > 0, (frames - positives) / np.maximum(positives, 1), 1.0)
    np.testing.assert_allclose(au_pos_weight(cfg, manifest).numpy(), want, rtol=1e-6)
    sqrt = config.load(None, ["tracks=[au]", "data.holdout_fold=1", "loss.au_pos_weight=sqrt"])
    np.testing.assert_allclose(au_pos_weight(sqrt, manifest).numpy(), np.sqrt(want), rtol=1e-6)
    assert au_pos_weight(config.load(None, ["tracks=[va]"]), manifest) is None


@pytest.fixture(scope="module")
def tracked_features(tracked, tmp_path_factory):
    """Feature shards of `tracked`: a tiny random-init ConvNeXt's embeddings and the audio features."""
    from fer_dist.jobs.extract import extract

    out = tmp_path_factory.mktemp("tracked_features")
    extract(tracked, out, discover(tracked.parent / "data"), "test_convnext", image_size=64, workers=2)
    return out


@pytest.fixture(scope="module")
def tracked_wave(tracked, tmp_path_factory):
    """`tracked`'s videos packed with each frame's waveform window as well (`--audio-wave`)."""
    out = tmp_path_factory.mktemp("tracked_wave")
    pack(discover(tracked.parent / "data"), out, PackParams(samples_per_shard=150, n_folds=3, audio_wave=True), 2)
    return out


def held_out_fold(manifest, track: str) -> int:
    """A fold holding frames of `track` with frames of it in the other folds too."""
    return next(
        k
        for k in manifest.folds()
        if manifest.frames_of(fold_group(k), (track,))
        and sum(manifest.frames_of(g, (track,)) for g in manifest.fold_groups(k))
    )


@pytest.mark.slow
@pytest.mark.parametrize("track", ["au", "va"])
def test_a_run_of_a_track_learns_it_and_scores_each_held_out_frame_once_on_any_number_of_ranks(
    track, tracked, tmp_path, capsys
):
    """The fusion model's CPU config, two short epochs on the videos of the other folds: the
    prediction's mean AU F1 well above calling every AU on (the always-positive baseline, what a
    model that learnt only the AUs' shares scores), its P_VA at least 0.50 (0 for a constant prediction).
    Its held-out predictions hold every frame labelled for the track once, and predicting them
    again on 2 (action units) or 3 (valence-arousal) ranks gives the same frames, outputs and figure.
    `fer-dist annotate` with the run gives the track's CSV, ABAW3 file and timeline."""
    manifest = read_manifest(tracked)
    fold, run = held_out_fold(manifest, track), tmp_path / "run"
    args = [f"data.shards={tracked}", f"train.run_dir={run}", f"tracks=[{track}]", f"data.holdout_fold={fold}"]
    args += ["train.log_with=[]", "data.epoch_samples=1920", "train.epochs=2", "data.image_size=32"]
    assert cli.main(["train", "--config", "mfm_cpu", *args, "data.audio_size=[32, 32]"]) == 0
    t = TRACKS[track]
    said = " ".join(capsys.readouterr().err.split())
    assert f"{t.metric_title} " in said and f"learning {t.title}" in said
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    if track == "au":
        assert metrics["au_f1"] >= metrics["always_positive_au_f1"] + 0.10, metrics["au_f1_by_head"]
    else:
        assert metrics["p_va"] >= 0.50, metrics["ccc"]
    trained = predictions.load(run / "predictions" / f"epoch{metrics['epoch']:03d}.npz")
    assert trained.tracks == (track,) and trained.logits["ensemble"].shape[1] == t.outputs
    assert t.annotated(trained.labels(track)).all()
    assert len(trained) == len(set(trained.key)) == manifest.frames_of(fold_group(fold), (track,))
    assert (
        metrics["eval_frames"] == len(trained) and metrics["track"] == track and metrics["score"] == metrics[t.metric]
    )
    assert set(metrics[f"{t.metric}_by_head"]) == {"image", "audio", "fusion", "ensemble"}
    assert (run / "confusion" / f"epoch{metrics['epoch']:03d}.png").stat().st_size > 0
    best = json.loads((run / "checkpoints" / "best" / "metrics.json").read_text())
    assert best[t.metric] == max(
        json.loads(line)[t.metric] for line in (run / "metrics.jsonl").read_text().splitlines()
    )
    best_predictions = predictions.load(run / "predictions" / f"epoch{best['epoch']:03d}.npz")
    for n in {"au": (2,), "va": (3,)}[track]:  # the one rank of training, and 2 or 3: each track on its own count
        out = tmp_path / f"eval{n}.npz"
        launch(n, "-m", "fer_dist.jobs.predict", run / "checkpoints" / "best", "--shards", tracked, "--group",
               fold_group(fold), "--out", out)  # fmt: skip
        other = predictions.load(out)
        assert other.key.tolist() == trained.key.tolist()
        assert np.array_equal(other.labels(track), trained.labels(track))
        for head in trained.logits:
            np.testing.assert_allclose(other.logits[head], best_predictions.logits[head], atol=1e-4)
        output = best_predictions.logits[trained.output]
        if track == "au":  # an AU decided otherwise only where its logit is 0 to within the ranks' float order
            flipped = (other.logits[trained.output] >= 0) != (output >= 0)
            assert (np.abs(output[flipped]) < 1e-4).all()
            if flipped.any():
                continue
        assert scores(other)[t.metric] == pytest.approx(best[t.metric], abs=1e-5)

    video = sorted((tracked.parent / "data").rglob("*.mp4"))[0]
    assert cli.main(["annotate", str(video), "--model", str(run), "--out", str(tmp_path / "annotated")]) == 0
    rows = list(csv.DictReader((tmp_path / "annotated" / f"{video.stem}.csv").read_text().splitlines()))
    abaw3 = (tmp_path / "annotated" / f"{video.stem}.txt").read_text().splitlines()
    assert len(rows) == len(abaw3) - 1 > 0 and abaw3[0] == ",".join(t.columns)
    assert (tmp_path / "annotated" / f"{video.stem}.png").stat().st_size > 0
    if track == "au":  # no post-processing beside the run: each AU on from probability 0.5
        on = np.array([[int(r[au]) for au in t.columns] for r in rows])
        probs = np.array([[float(r[f"p_{au}"]) for au in t.columns] for r in rows])
        clear = np.abs(probs - 0.5) > 1e-4  # the CSV's probabilities have 4 decimals
        assert np.array_equal(on[clear], (probs[clear] >= 0.5).astype(int))
        assert [line.split(",") for line in abaw3[1:]] == [[r[au] for au in t.columns] for r in rows]
    else:
        values = np.array([[float(r[d]) for d in t.columns] for r in rows])
        assert np.abs(values).max() < 1
        np.testing.assert_allclose(np.array([line.split(",") for line in abaw3[1:]], float), values, atol=1e-4)


def test_rare_aus_are_resampled_by_the_square_root_of_their_rarity_when_asked():
    positives = np.array([400, 100, 25, 0, 400, 400, 400, 400, 400, 400, 400, 4])
    copies = balance.rare_au_copies(positives, max_repeat=8.0)
    np.testing.assert_allclose(copies[:4], [1.0, 2.0, 4.0, 1.0])  # sqrt(400 / n); an AU never on: 1
    assert copies[-1] == 8.0  # sqrt(100) capped at max_repeat
    assert balance.frame_copies([0] * 12, copies) == 1.0  # no AU on: one copy
    assert balance.frame_copies([1, 1, 0, 0] + [0] * 8, copies) == 2.0  # the rarer of AU1 and AU2
    assert balance.frame_copies([1, 0, 1, 0] + [0] * 8, copies) == 4.0


def test_the_au_stream_emits_rare_au_frames_as_often_as_planned(tracked):
    """Read once a pass without it; with `data.au_balance=rare`, the stream's balancing stage gives
    each frame of the training folds floor(e) or ceil(e) copies, e its rarest AU on's, and as many
    in all as the plan expects, to within the stochastic rounding."""
    manifest = read_manifest(tracked)
    fold = held_out_fold(manifest, "au")
    groups, common = manifest.fold_groups(fold), [f"data.shards={tracked}", "tracks=[au]", f"data.holdout_fold={fold}"]
    plan = balance.resampling_plan(manifest, groups, config.load(None, common).data, ("image",), ("au",))
    assert plan.au_copies is None and plan.read[0] == sum(manifest.frames_of(g, ("au",)) for g in groups)
    rare = config.load(None, [*common, "data.au_balance=rare"])
    stream = pipeline.TrainStream(rare.data, manifest, ("image",), seed=0, rank=0, world=1, tracks=("au",))
    copies = stream.plan.au_copies
    assert copies is not None and copies.max() > 1 and copies.min() == 1
    samples = []
    for shard in manifest.shard_paths(tracked, groups):
        with open(shard, "rb") as fh:
            parsed = pipeline.parse(tars.samples(fh, shard), Counter())
            samples += [s for s in pipeline.carrying(parsed, ("au",), Counter())]
    out = list(pipeline.balanced(iter(samples), stream.plan.copies, "0/0/0", Counter(), copies))
    got = collections.Counter(s["__key__"] for s in out)
    want = {s["__key__"]: balance.frame_copies(s["meta"].au, copies) for s in samples}
    assert all(math.floor(e) <= got[k] <= math.ceil(e) for k, e in want.items())
    assert abs(len(out) - sum(want.values())) < 4 * math.sqrt(len(want))
    with pytest.raises(ConfigError, match="data.au_balance=rare resamples action units"):
        config.load(None, ["tracks=[va]", "data.au_balance=rare"])


def test_a_clip_mode_model_trains_on_runs_of_a_tracks_frames_and_scores_each_once(tracked, tmp_path):
    """Paper 003's model over runs of 4 frames (its CPU config, a few steps: too few to learn, which
    is not asked here): a run holds only frames of the track, padded runs are masked by their keys
    (not by an expression label the frames may lack), and every held-out frame labelled for
    valence-arousal is scored once."""
    manifest = read_manifest(tracked)
    fold, run = held_out_fold(manifest, "va"), tmp_path / "run"
    args = [f"data.shards={tracked}", f"train.run_dir={run}", "tracks=[va]", f"data.holdout_fold={fold}"]
    args += ["train.log_with=[]", "data.epoch_samples=1024", "data.image_size=32", "train.epochs=1"]
    assert cli.main(["train", "--config", "regnet_transformer_cpu", *args]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    held = predictions.load(run / "predictions" / "epoch001.npz")
    assert len(held) == len(set(held.key)) == lines[-1]["eval_frames"] == manifest.frames_of(fold_group(fold), ("va",))
    assert TRACKS["va"].annotated(held.labels("va")).all() and held.logits["output"].shape[1] == 2
    assert math.isfinite(lines[-1]["train_loss"]) and set(lines[-1]["p_va_by_head"]) == {"output"}


@pytest.mark.parametrize(
    "config, track, extra",
    [
        ("feature_lstm_cpu", "au", []),
        ("feature_transformer_cpu", "va", []),
        ("decoder_fusion_cpu", "va", ["data.mix=none"]),
        ("face_voice_temporal_cpu", "au", []),
    ],
)
def test_the_other_configs_train_on_a_track_and_score_each_held_out_frame_once(config, track, extra, request, tmp_path):
    """The feature-shard configs of papers 001, 002 and 004 and the recipe's CPU config on another
    track than expressions (a few steps: too few to learn, which docs/tracks.md measures with the
    feature configs as shipped): each head as wide as the track, and every held-out frame labelled
    for it scored once."""
    shards = request.getfixturevalue("tracked_wave" if config.startswith("face_voice") else "tracked_features")
    manifest = read_manifest(shards)
    fold, run, t = held_out_fold(manifest, track), tmp_path / "run", TRACKS[track]
    args = [f"data.shards={shards}", f"train.run_dir={run}", f"tracks=[{track}]", f"data.holdout_fold={fold}"]
    args += ["train.log_with=[]", "data.epoch_samples=256", "train.epochs=1", *extra]
    assert cli.main(["train", "--config", config, *args]) == 0
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    held = predictions.load(run / "predictions" / "epoch001.npz")
    assert held.tracks == (track,) and {v.shape[1] for v in held.logits.values()} == {t.outputs}
    assert len(held) == len(set(held.key)) == metrics["eval_frames"] == manifest.frames_of(fold_group(fold), (track,))
    assert t.annotated(held.labels(track)).all() and set(metrics[f"{t.metric}_by_head"]) == set(held.logits)
    assert math.isfinite(metrics["train_loss"]) and metrics["score"] == metrics[t.metric]
