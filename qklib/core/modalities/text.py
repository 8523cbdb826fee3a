"""BERT text encoders: a model folder as transformers' ``BertModel`` with eager attention, and tokenisation that
keeps, per token, the word and the sentence it came from (the units of "same word" / "same sentence" analyses).

A folder holds ``config.json`` (``model_type`` ``bert``), ``model.safetensors`` (or ``pytorch_model.bin``, read
with ``weights_only=True``) and ``tokenizer.json`` (or ``vocab.txt``). Keys may carry a ``bert.`` prefix (a
``BertFor...`` checkpoint); heads on top (MLM, classifiers) are left out and named in the notes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import tokenizers
import torch
import transformers
from torch import nn

from ..loaders.hf import read_folder
from ..loaders.weights import ModelError, strip_prefix
from ..provenance import provenance as core_provenance
from .corpus import split_sentences

__all__ = ["TokenisedText", "bert_from_folder", "text_tokenizer", "tokenise"]

_DROPPED_BERT = ("embeddings.position_ids",)  # a buffer old checkpoints saved; BertModel rebuilds it


def bert_from_folder(folder: Path) -> tuple[nn.Module, list[str], str]:
    """``(BertModel in eval mode with eager attention, float32; notes; the stored dtype)`` from a BERT model
    folder; every encoder tensor must be present and every tensor placed, or a ModelError names the offenders."""
    config, state = read_folder(folder)
    if config.get("model_type") != "bert":
        raise ModelError(f"{str(folder)!r}: config.json says model_type {config.get('model_type')!r}, not 'bert'")
    if any(key.startswith("bert.") for key in state):
        heads = sorted({key.split(".")[0] for key in state if not key.startswith("bert.")})
        state = strip_prefix({k: v for k, v in state.items() if k.startswith("bert.")}, "bert.")
        notes = [f"the task heads ({', '.join(heads)}) were left out"] if heads else []
    else:
        notes = []
    state = {key: value for key, value in state.items() if key not in _DROPPED_BERT}
    stored = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()}))
    if stored != "float32":
        notes.append(f"the weights are stored as {stored}, cast to float32")
    # Eager attention: output_attentions needs the explicit softmax (SDPA returns no maps).
    bert_config = transformers.BertConfig.from_dict(config, attn_implementation="eager")
    model = transformers.BertModel(bert_config, add_pooling_layer="pooler.dense.weight" in state)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ModelError(f"{str(folder)!r}: not a BertModel checkpoint of this config.json (missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}); pass the folder save_pretrained wrote")
    return model.eval(), notes, stored


@lru_cache(maxsize=8)
def _tokenizer(folder: str) -> tokenizers.Tokenizer:
    path = Path(folder)
    if (path / "tokenizer.json").is_file():
        tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.txt").is_file():
        config = path / "tokenizer_config.json"
        settings = json.loads(config.read_text()) if config.is_file() else {}
        tokenizer = tokenizers.implementations.BertWordPieceTokenizer(
            str(path / "vocab.txt"), lowercase=settings.get("do_lower_case", True))._tokenizer
    else:
        raise ModelError(f"{folder!r} has neither tokenizer.json nor vocab.txt; copy the tokenizer files beside the "
                         "weights (save_pretrained of the tokenizer writes them)")
    tokenizer.no_truncation()  # a text too long for the model is an error below, never silently cut
    tokenizer.no_padding()
    return tokenizer


def text_tokenizer(model: nn.Module) -> tokenizers.Tokenizer:
    """The WordPiece tokenizer stored beside a text model that ``qklib.load_model`` loaded."""
    record = core_provenance(model)
    provenance = record.details if record is not None else None
    if getattr(provenance, "family", None) != "bert":
        raise ModelError(f"{type(model).__name__} was not loaded by qklib.load_model as a BERT text model; load it "
                         "with qklib.load_model('hf:sentence-transformers/all-MiniLM-L6-v2') or weights=FOLDER")
    return _tokenizer(str(provenance.path))


@dataclass(frozen=True)
class TokenisedText:
    """One text as one BERT sequence ``[CLS] sentence 1 ... sentence n [SEP]``.

    ``input_ids``, ``word_ids``, ``sentence_ids``: ``[T]`` int64. ``word_ids[t]`` numbers the words of the whole
    text from 0 (a word is what BERT's pre-tokenizer splits off: a run of letters/digits, or one punctuation mark;
    its WordPiece pieces share the id); ``sentence_ids[t]`` numbers the sentences; both are -1 on [CLS] and [SEP].
    ``tokens``: the WordPiece strings; ``spans``: each token's ``(start, end)`` characters in ``text`` ((0, 0) on
    special tokens); ``sentences``: the sentences, ``text`` their join with single spaces."""

    text: str
    sentences: tuple[str, ...]
    tokens: tuple[str, ...]
    input_ids: torch.Tensor
    word_ids: torch.Tensor
    sentence_ids: torch.Tensor
    spans: tuple[tuple[int, int], ...]


def tokenise(model: nn.Module, text: str | list[str] | tuple[str, ...], max_tokens: int | None = None) -> TokenisedText:
    """``text`` (a string, cut with ``split_sentences``, or a list of sentences) as one BERT input of a text model
    ``qklib.load_model`` loaded. ``max_tokens``: default the model's ``max_position_embeddings``; longer text is an
    error (never truncated), so that every word asked for is in the attention maps."""
    tokenizer = text_tokenizer(model)
    sentences = tuple(split_sentences(text) if isinstance(text, str) else (" ".join(s.split()) for s in text))
    if not sentences or not all(sentences):
        raise ValueError(f"tokenise needs non-empty text, got {text!r}")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokens, ids, words, sents, spans = ["[CLS]"], [cls], [-1], [-1], [(0, 0)]
    start, first_word = 0, 0
    for index, sentence in enumerate(sentences):
        encoding = tokenizer.encode(sentence, add_special_tokens=False)
        tokens += encoding.tokens
        ids += encoding.ids
        words += [first_word + word for word in encoding.word_ids]
        sents += [index] * len(encoding.ids)
        spans += [(start + a, start + b) for a, b in encoding.offsets]
        first_word += max(encoding.word_ids, default=-1) + 1
        start += len(sentence) + 1
    tokens, ids, words, sents, spans = tokens + ["[SEP]"], ids + [sep], words + [-1], sents + [-1], spans + [(0, 0)]
    limit = max_tokens or model.config.max_position_embeddings
    if len(ids) > limit:
        raise ValueError(f"the text is {len(ids)} tokens long with [CLS] and [SEP]; the model takes at most {limit}: "
                         "pass fewer sentences (pydoc_corpus(max_words=...) sizes snippets)")
    return TokenisedText(" ".join(sentences), sentences, tuple(tokens), torch.tensor(ids), torch.tensor(words),
                         torch.tensor(sents), tuple(spans))
