"""§7: the paper's measurements on a text encoder and a speech encoder, next to the ViT.

The inputs are what ships offline: English prose from the standard library (``pydoc_data.topics``) for the text
encoder, and the same sentences spoken by eSpeak NG for the speech encoder. A unit is what §3's object becomes in
each modality: the word pieces of one word and the tokens of one sentence (text), the encoder frames inside one
spoken word (speech; frames of silence and Whisper's 30-s padding belong to no unit). Attention to the own unit is
measured by :mod:`qklib.analyses.units` with its shifted-units null; the optimal inputs of a QK mode by
:mod:`qklib.analyses.sequences`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.modalities import (TokenisedText, Utterance, attention_from_weights, attention_inputs, frame_word_ids,
                               log_mel, pydoc_corpus, speech_tokens, synthesise, tokenise)
from ..core.reader import read_attention
from ..core.svd import QKSVD, null_band
from .cosine import layer_table
from .sequences import top_pairs
from .units import layer_table as units_layer_table
from .units import null_sums, unit_sums

TEXT_UNITS = ("word", "sentence")
SPEECH_UNITS = ("word",)


def text_inputs(model: nn.Module, count: int) -> list[TokenisedText]:
    """The first ``count`` snippets of the pydoc corpus with at least two sentences, as BERT inputs (so that
    both units, words and sentences, have other units beside them)."""
    snippets = [s for s in pydoc_corpus() if len(s.sentences) >= 2][:count]
    if len(snippets) < count:
        raise ValueError(f"the pydoc corpus has {len(snippets)} snippets of two or more sentences; ask for at most that")
    return [tokenise(model, list(s.sentences)) for s in snippets]


def speech_inputs(count: int, max_words: int = 45) -> list[Utterance]:
    """``count`` utterances spoken by eSpeak NG, each the consecutive sentences of the pydoc corpus that fit in
    ``max_words`` words (about 15 s at eSpeak's 175 words per minute, well inside Whisper's 30 s)."""
    sentences = [sentence for snippet in pydoc_corpus() for sentence in snippet.sentences]
    texts, group = [], []
    for sentence in sentences:
        if group and len(" ".join(group + [sentence]).split()) > max_words:
            texts.append(" ".join(group))
            group = []
            if len(texts) == count:
                break
        group.append(sentence)
    if len(texts) < count:
        raise ValueError(f"the corpus gives {len(texts)} utterances of up to {max_words} words; ask for at most that")
    return [synthesise(text) for text in texts]


@dataclass
class Pass:
    """One input's forward pass, kept small: per unit kind its :func:`qklib.analyses.units.unit_sums` and the shifted
    null's (``[L, H, 4]`` each), the tokens each layer's attention reads (``[L, T, d]``, content tokens only) and
    their labels (text: the WordPiece strings; speech: the word spoken at each frame, '' in silence)."""

    sums: dict[str, np.ndarray]
    nulls: dict[str, np.ndarray]
    tokens: torch.Tensor
    labels: list[str]


def weights_of(model: nn.Module) -> dict:
    """The model's stacked attention weights (``qklib.core.reader``) as the dict the passes below take."""
    return vars(read_attention(model))


def text_pass(model: nn.Module, weights: dict, text: TokenisedText, shifts: int, seed: int) -> Pass:
    """One forward pass of a text: the tokens each layer's attention reads, the attention maps recomputed from
    them and the weights (equal to the model's own: tests/test_modalities_text.py), reduced to what §7 keeps."""
    tokens = attention_inputs(model, text)
    maps = attention_from_weights(weights, tokens)
    units = {"word": text.word_ids, "sentence": text.sentence_ids}
    content = text.word_ids >= 0
    return Pass({k: unit_sums(maps, u) for k, u in units.items()},
                {k: null_sums(maps, u, shifts, seed) for k, u in units.items()},
                tokens[:, content], [t for t, c in zip(text.tokens, content.tolist()) if c])


def speech_pass(model: nn.Module, weights: dict, utterance: Utterance, shifts: int, seed: int) -> Pass:
    """The same for one utterance, on the frames before Whisper's padding: the maps are the softmax over those
    frames, which, renormalised over any set of them as :mod:`qklib.analyses.units` does, equals the model's softmax
    over all 1500 renormalised the same way."""
    features = log_mel(utterance.audio)
    n = speech_tokens(utterance.seconds)
    tokens = attention_inputs(model, features)[:, :n]
    maps = attention_from_weights(weights, tokens)
    words = frame_word_ids(utterance.spans)[:n]
    labels = [utterance.words[w] if w >= 0 else "" for w in words.tolist()]
    return Pass({"word": unit_sums(maps, words)}, {"word": null_sums(maps, words, shifts, seed)}, tokens, labels)


def stacked(passes: Sequence[Pass], unit: str) -> tuple[np.ndarray, np.ndarray]:
    """``(sums, null)`` ``[inputs, L, H, 4]`` of one unit kind over a model's passes."""
    return np.stack([p.sums[unit] for p in passes]), np.stack([p.nulls[unit] for p in passes])


def featured_modes(svd: QKSVD, layers: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(layer, head, mode 0)`` per layer: the head whose first singular value is the largest in the layer (a
    rule, so that the featured modes are not picked by eye)."""
    return [(int(layer), int(svd.S[layer, :, 0].argmax()), 0) for layer in layers]


def mode_pairs(svd: QKSVD, passes: Sequence[Pass], featured: Sequence[tuple[int, int, int]],
               count: int = 3) -> pd.DataFrame:
    """For each featured mode, the ``count`` inputs whose best token pair scores highest on it, with the query
    and key tokens' positions and labels."""
    rows = []
    for layer, head, mode in featured:
        u, s, v = svd.U[layer, head, :, mode], float(svd.S[layer, head, mode]), svd.V[layer, head, :, mode]
        for rank, pair in enumerate(top_pairs([p.tokens[layer] for p in passes], u, s, v, count)):
            labels = passes[pair.sequence].labels
            rows.append({"layer": layer, "head": head, "mode": mode, "rank": rank + 1, "input": pair.sequence,
                         "query": pair.query, "key": pair.key, "query_label": labels[pair.query],
                         "key_label": labels[pair.key], "score": pair.score, "sign": pair.sign})
    return pd.DataFrame(rows)


def models_table(loaded: dict[str, nn.Module]) -> pd.DataFrame:
    """One row per model: its family (the reader's adapter), layers, heads, width, head width, where its
    LayerNorm sits and how many special tokens lead its sequences."""
    rows = []
    for label, model in loaded.items():
        weights = read_attention(model)
        layers, heads, r, d = weights.wq.shape
        rows.append({"model": label, "family": weights.family, "layers": layers, "heads": heads, "d": d, "r": r,
                     "layer norm": weights.norm_position, "special tokens": weights.special_tokens})
    return pd.DataFrame(rows)


def cosine_table(raw: dict[str, QKSVD], folded: dict[str, QKSVD], resamples: int, seed: int) -> pd.DataFrame:
    """``qklib.analyses.cosine.layer_table`` in both bases, with each model's null band of one random cosine
    (``band``)."""
    frames = []
    for basis, svds in (("raw weights", raw), ("gamma folded", folded)):
        table = layer_table(svds, resamples=resamples, seed=seed)
        table["basis"] = basis
        table["band"] = table["model"].map({label: null_band(svd.dim) for label, svd in svds.items()})
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def unit_tables(passes: dict[str, Sequence[Pass]], modality: dict[str, str], resamples: int,
                seed: int) -> pd.DataFrame:
    """``qklib.analyses.units.layer_table`` per model and unit kind, the ``unit`` column naming both ("text: word")."""
    frames = []
    for label, model_passes in passes.items():
        for unit in model_passes[0].sums:
            sums, null = stacked(model_passes, unit)
            table = units_layer_table(sums, null, label=label, resamples=resamples, seed=seed)
            table["unit"] = f"{modality[label]}: {unit}"
            frames.append(table)
    return pd.concat(frames, ignore_index=True)


def all_passes(text_models: dict[str, nn.Module], speech_models: dict[str, nn.Module], texts: Sequence[TokenisedText],
               utterances: Sequence[Utterance], shifts: int, seed: int) -> dict[str, list[Pass]]:
    """Every model's passes: the texts through each text model, the utterances through each speech model."""
    out = {label: [text_pass(model, weights_of(model), t, shifts, seed) for t in texts]
           for label, model in text_models.items()}
    return out | {label: [speech_pass(model, weights_of(model), u, shifts, seed) for u in utterances]
                  for label, model in speech_models.items()}


def first_middle_last(count: int) -> list[int]:
    """The first, middle and last layer of ``count`` (fewer where they coincide)."""
    return sorted({0, count // 2, count - 1})


def featured_pairs(svd: QKSVD, passes: Sequence[Pass], count: int) -> pd.DataFrame:
    """:func:`mode_pairs` for the :func:`featured_modes` of the first, middle and last layer."""
    return mode_pairs(svd, passes, featured_modes(svd, first_middle_last(svd.num_layers)), count)
