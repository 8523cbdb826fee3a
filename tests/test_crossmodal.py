"""§7's passes over text and speech (qklib.analyses.crossmodal) against the models' own attention maps, and its mode
search against brute force. The shipped MiniLM and whisper-tiny.en are runtime dependencies: these tests use them."""

import numpy as np
import pytest
import torch

import qklib
from qklib.analyses import crossmodal, units
from qklib.core import modalities


@pytest.fixture(scope="module")
def minilm():
    return qklib.load_model("hf:sentence-transformers/all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def tiny_en():
    return qklib.load_model("hf:openai/whisper-tiny.en")


def test_a_text_pass_equals_the_units_of_the_models_own_maps(minilm):
    texts = crossmodal.text_inputs(minilm, 3)
    assert all(len(t.sentences) >= 2 for t in texts)
    weights = crossmodal.weights_of(minilm)
    for text in texts:
        result = crossmodal.text_pass(minilm, weights, text, shifts=3, seed=1)
        own = modalities.model_attention(minilm, text)
        np.testing.assert_allclose(result.sums["word"], units.unit_sums(own, text.word_ids), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.nulls["sentence"], units.null_sums(own, text.sentence_ids, 3, seed=1),
                                   rtol=1e-4, atol=1e-6)
        content = int((text.word_ids >= 0).sum())
        assert result.tokens.shape == (6, content, 384) and len(result.labels) == content
        assert "[CLS]" not in result.labels and "[SEP]" not in result.labels


def test_a_speech_pass_on_the_spoken_frames_equals_the_models_full_maps_cut_to_them(tiny_en):
    (utterance,) = crossmodal.speech_inputs(1, max_words=12)
    result = crossmodal.speech_pass(tiny_en, crossmodal.weights_of(tiny_en), utterance, shifts=2, seed=0)
    n = modalities.speech_tokens(utterance.seconds)
    own = modalities.model_attention(tiny_en, modalities.log_mel(utterance.audio))[..., :n, :n]  # rows over 1500 keys
    words = modalities.frame_word_ids(utterance.spans)[:n]
    np.testing.assert_allclose(result.sums["word"], units.unit_sums(own, words), rtol=1e-3, atol=1e-5)
    assert result.tokens.shape[:2] == (4, n)
    spoken = {label for label in result.labels if label}
    assert spoken and spoken <= set(utterance.words)


def test_the_best_pairs_of_a_mode_are_the_brute_force_best(minilm):
    texts = crossmodal.text_inputs(minilm, 4)
    weights = crossmodal.weights_of(minilm)
    passes = [crossmodal.text_pass(minilm, weights, t, shifts=1, seed=0) for t in texts]
    svd = qklib.qk_svd(minilm)
    featured = crossmodal.featured_modes(svd, [0, 5])
    assert [h for _, h, _ in featured] == [int(svd.S[0, :, 0].argmax()), int(svd.S[5, :, 0].argmax())]
    table = crossmodal.mode_pairs(svd, passes, featured, count=2)
    layer, head, mode = featured[1]
    u, s, v = svd.U[layer, head, :, mode], float(svd.S[layer, head, mode]), svd.V[layer, head, :, mode]
    best = []
    for index, result in enumerate(passes):
        x = result.tokens[layer].double()
        terms = torch.outer(x @ u, x @ v) * s
        best.append((float(terms.clamp_min(0).max()), index))
    expected = [index for _, index in sorted(best, reverse=True)[:2]]
    rows = table[table["layer"] == layer]
    assert list(rows["input"]) == expected
    assert rows["score"].iloc[0] == pytest.approx(max(best)[0], rel=1e-9)
    assert rows["query_label"].iloc[0] == passes[expected[0]].labels[int(rows["query"].iloc[0])]


def test_too_many_inputs_are_refused_with_the_limit():
    with pytest.raises(ValueError, match="ask for at most"):
        crossmodal.speech_inputs(100000)


def test_a_model_of_the_wrong_family_is_refused_naming_the_parameter(minilm):
    from qklib.book import chapter

    vit = qklib.random_control("vit_tiny_patch16_224")
    assert chapter.check_family({"text": minilm}, "bert", "text_models") == {"text": minilm}
    with pytest.raises(chapter.ParameterError, match=r"'text_models' takes bert models; got vit.*\(timm-vit\)"):
        chapter.check_family({"vit": vit}, "bert", "text_models")


def test_the_live_text_explorer_redraws_for_a_slider_and_says_what_is_wrong(minilm):
    from qklib.present.explore import explore_text

    box = explore_text({"MiniLM": minilm}, {"MiniLM": qklib.qk_svd(minilm)}, text="One sentence here. And another one.")
    first = box.pictures["attention"].value
    assert box.message.value == "" and first and "amused" not in box.captions["caption"].value
    assert "another" in box.captions["caption"].value
    box.controls["layer"].value = 4
    assert box.message.value == "" and box.pictures["attention"].value != first
    box.controls["text"].value = "   "
    assert "tokenise needs non-empty text" in box.message.value
