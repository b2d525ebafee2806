import pickle

import pytest
import torch
from safetensors.torch import save_file

from fer_dist.config import ConfigError
from fer_dist.models.speech import SpeechEncoder, create_speech_encoder, standardise


@pytest.mark.parametrize(
    ("name", "suffix"), [("wav2vec2_tiny", ".safetensors"), ("wavlm_tiny", ".pt"), ("hubert_base", ".pt")]
)
def test_each_encoder_family_loads_a_local_state_dict(tmp_path, name, suffix):
    """A state dict in torchaudio's layout, saved as safetensors or by torch.save, is loaded
    whole (also under a pipeline wrapper's `model.` prefix); an ASR head's `aux.` tensors are ignored."""
    torch.manual_seed(0)
    source = create_speech_encoder(name)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({**{f"model.{k}": v for k, v in state.items()}, "model.aux.weight": torch.zeros(3, 4)}, path)
    torch.manual_seed(1)
    loaded = create_speech_encoder(name, str(path))
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_weights_that_do_not_fit_or_would_run_code_are_refused(tmp_path):
    state = create_speech_encoder("wav2vec2_tiny").state_dict()
    torch.save({**state, "encoder.extra": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match="encoder.extra"):
        create_speech_encoder("wav2vec2_tiny", str(tmp_path / "extra.pt"))
    with pytest.raises(ConfigError, match="does not fit wavlm_tiny"):  # wav2vec2 weights in a WavLM
        create_speech_encoder("wavlm_tiny", str(tmp_path / "extra.pt"))

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    (tmp_path / "code.pt").write_bytes(pickle.dumps({"w": Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        create_speech_encoder("wav2vec2_tiny", str(tmp_path / "code.pt"))
    with pytest.raises(ConfigError, match="not one of"):
        create_speech_encoder("wav2vec3_base")


@pytest.mark.parametrize("name", ["wav2vec2_tiny", "wavlm_tiny"])
def test_the_embedding_is_the_weighted_layer_sum_averaged_over_the_windows_frames(name):
    torch.manual_seed(0)
    encoder = SpeechEncoder(name).eval()
    with torch.no_grad():
        encoder.layer_weights.copy_(torch.tensor([0.3, -0.2]))
    wave, lengths = torch.randn(3, 34134) * 0.1, torch.tensor([34134, 25600, 17066])
    got = encoder(wave, lengths)
    layers, _ = encoder.model.extract_features(wave, lengths if name.startswith("wav2vec2") else None)
    w = torch.softmax(torch.tensor([0.3, -0.2]), 0)
    for i, frames in enumerate([106, 79, 53]):  # 320 samples per frame, less the convolutions' edges
        by_hand = (w[0] * layers[0][i, :frames] + w[1] * layers[1][i, :frames]).mean(0)
        torch.testing.assert_close(got[i], by_hand, rtol=1e-4, atol=1e-5)


def test_a_frozen_encoder_trains_only_its_layer_weights():
    frozen, tuned = SpeechEncoder("wav2vec2_tiny"), SpeechEncoder("wav2vec2_tiny", trainable=True)
    wave, lengths = torch.randn(2, 17066) * 0.1, torch.tensor([17066, 17066])
    for encoder in (frozen, tuned):
        encoder.train()
        encoder(wave, lengths).sum().backward()
    assert frozen.layer_weights.grad is not None and not frozen.model.training
    assert all(p.grad is None for p in frozen.model.parameters())
    assert tuned.model.training and all(p.grad is not None for p in tuned.model.encoder.parameters())


@pytest.mark.parametrize("name", ["wav2vec2_tiny", "wavlm_tiny"])
def test_silence_after_the_batchs_longest_window_changes_nothing(name):
    """Windows shorter than the stored width come padded with silence; the encoder cuts what lies
    after the longest before its group-normed extractor sees it."""
    torch.manual_seed(0)
    encoder = SpeechEncoder(name).eval()
    speech, lengths = torch.randn(2, 17066) * 0.1, torch.tensor([17066, 12000])
    speech[1, 12000:] = 0
    padded = torch.cat([speech, torch.zeros(2, 34134 - 17066)], 1)
    with torch.no_grad():
        torch.testing.assert_close(encoder(padded, lengths), encoder(speech, lengths), rtol=1e-5, atol=1e-6)
        layers, _ = encoder.model.extract_features(padded, lengths if name.startswith("wav2vec2") else None)
    assert not torch.allclose(layers[-1][0, :5], encoder.model.extract_features(speech, None)[0][-1][0, :5])


def test_encoders_with_a_layer_normed_extractor_hear_standardised_windows():
    """As torchaudio's bundles do for the large LV-60k, XLSR, HuBERT and WavLM encoders: a whole
    window standardised as `layer_norm` would, a shorter one over its own samples, silence kept."""
    wave = torch.randn(2, 1000) * 0.3 + 0.1
    wave[1, 600:] = 0
    got = standardise(wave, torch.tensor([1000, 600]))
    torch.testing.assert_close(got[0], torch.nn.functional.layer_norm(wave[0], (1000,)))
    torch.testing.assert_close(got[1, :600], torch.nn.functional.layer_norm(wave[1, :600], (600,)))
    assert not got[1, 600:].any()
    assert SpeechEncoder("hubert_large").standardised and SpeechEncoder("wavlm_large").standardised
    assert not SpeechEncoder("wav2vec2_base").standardised and not SpeechEncoder("wavlm_tiny").standardised
