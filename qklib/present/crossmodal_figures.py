"""§7's figures: the weighted cosine and same-unit attention across modalities, and a mode's optimal text
snippets and speech frames drawn with the red/cyan of the ViT chapters (query map red, key map cyan)."""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd
import torch

from ..analyses.sequences import snippet_html
from ..core.modalities import log_mel
from ..core.svd import QKSVD
from .mode_figures import mode_caption, picture_row
from .render import normalize_map, red_cyan
from .style import CHANCE, inline, model_colour

DEPTH = alt.X("depth:Q", title="normalised layer depth  l / (L-1)", scale=alt.Scale(domain=[0, 1]))


def _null_rules(values: Sequence[float]) -> alt.Chart:
    """Dashed black rules at each of ``values``."""
    return alt.Chart(inline(pd.DataFrame({"y": list(values)}))).mark_rule(strokeDash=[4, 3], color=CHANCE).encode(
        y="y:Q")


def cosine_chart(table: pd.DataFrame, models: Sequence[str] | None = None) -> alt.HConcatChart:
    """Fig 3 across modalities: the weighted cosine per layer (mean over heads, its interval over heads shaded)
    by relative depth, one line per model, one panel per ``basis``; dashed: +- the null band of one random
    cosine (``band``, from each model's width). ``models``: every model of the chapter, in its order, so that
    each keeps one colour across the chapter's charts (default: the table's)."""
    colour = model_colour(table["model"] if models is None else models)
    base = alt.Chart().encode(x=DEPTH, color=colour)
    band = base.mark_area(opacity=0.15).encode(y="heads_low:Q", y2="heads_high:Q")
    line = base.mark_line(point=True).encode(
        y=alt.Y("weighted_cosine:Q", title="weighted cosine (mean over heads)"),
        tooltip=["model:N", "layer:O", alt.Tooltip("weighted_cosine:Q", format=".3f"),
                 alt.Tooltip("heads_low:Q", format=".3f"), alt.Tooltip("heads_high:Q", format=".3f")])
    rules = [s * b for b in sorted(set(np.round(table["band"], 4))) for s in (-1, 1)]
    panels = [alt.layer(band, line, data=inline(rows.drop(columns="basis"))).properties(width=270, height=240,
                                                                                       title=basis)
              for basis, rows in table.groupby("basis", sort=False)]
    return alt.hconcat(*[alt.layer(panel, _null_rules(rules)) for panel in panels]).resolve_scale(y="shared")


def unit_chart(table: pd.DataFrame, models: Sequence[str] | None = None) -> alt.HConcatChart:
    """Fig 2 across modalities: per layer, the preference for the own unit over shifted units (``excess``, 1 =
    attention follows position only; ``qklib.analyses.units.layer_table``) with its interval over inputs, one panel per
    ``unit`` (e.g. "text: word"), one line per model; dashed at 1. ``models``: as :func:`cosine_chart`'s."""
    colour = model_colour(table["model"] if models is None else models)
    base = alt.Chart().encode(x=DEPTH, color=colour)
    band = base.mark_area(opacity=0.2).encode(y="excess_low:Q", y2="excess_high:Q")
    line = base.mark_line(point=True).encode(
        y=alt.Y("excess:Q", title="own unit / shifted units", scale=alt.Scale(type="log")),
        tooltip=["model:N", "layer:O", alt.Tooltip("excess:Q", format=".3f"), alt.Tooltip("excess_low:Q", format=".3f"),
                 alt.Tooltip("excess_high:Q", format=".3f"), alt.Tooltip("dominance:Q", format=".2f"),
                 alt.Tooltip("null_dominance:Q", format=".2f")])
    columns = ["model", "layer", "depth", "excess", "excess_low", "excess_high", "dominance", "null_dominance"]
    panels = [alt.layer(band, line, _null_rules([1.0]), data=inline(rows[columns])).properties(
        width=160, height=220, title=unit) for unit, rows in table.groupby("unit", sort=False)]
    return alt.hconcat(*panels).resolve_scale(y="shared")


def text_snippets(svd: QKSVD, pairs: pd.DataFrame, labels: Sequence[Sequence[str]], context: int = 12) -> str:
    """HTML: per featured mode its caption and its best snippets, the query token on red and the key token on
    cyan. ``pairs``: ``qklib.analyses.crossmodal.mode_pairs`` rows; ``labels``: each input's tokens."""
    blocks = []
    for (layer, head, mode), rows in pairs.groupby(["layer", "head", "mode"], sort=False):
        lines = "".join(f"<li>{snippet_html(labels[int(r.input)], int(r.query), int(r.key), context)} "
                        f"<small>(term {r.score:.3g})</small></li>" for r in rows.itertuples())
        blocks.append(f"<div>{mode_caption(svd, layer, head, mode, int(rows.iloc[0]['sign']))}<ol>{lines}</ol></div>")
    return "<div style='font-size:0.9em;line-height:1.5'>" + "".join(blocks) + "</div>"


def speech_picture(features: torch.Tensor, query: torch.Tensor, key: torch.Tensor, frames: slice) -> np.ndarray:
    """``[mel bins, 2 * frames, 3]`` uint8: the log-mel spectrogram of ``frames`` (encoder frames, two mel frames
    each; low frequencies at the bottom) with the mode's query map (projections on u_n) in red and its key map
    (on v_n) in cyan, each normalised between its percentiles as the ViT pictures are."""
    mel = features[:, 2 * frames.start:2 * frames.stop].flip(0).numpy()
    grey = np.repeat(normalize_map(mel, 1, 99)[..., None] * 255, 3, axis=-1).astype(np.uint8)
    column = np.ones((mel.shape[0], 1))
    return red_cyan(grey, column * np.repeat(normalize_map(query[frames]), 2)[None],
                    column * np.repeat(normalize_map(key[frames]), 2)[None])


def speech_frames(svd: QKSVD, pairs: pd.DataFrame, utterances: Sequence, passes: Sequence, around: int = 40) -> str:
    """HTML: per featured mode, its best utterances' spectrograms around the best frame pair (``around`` frames,
    20 ms each, either side), red/cyan, captioned with the words spoken at the query and the key frame.
    ``utterances``: ``qklib.core.modalities.Utterance``; ``passes``: their ``qklib.analyses.crossmodal.Pass``."""
    features = {int(i): log_mel(utterances[int(i)].audio) for i in set(pairs["input"])}
    tokens, labels = [p.tokens for p in passes], [p.labels for p in passes]
    rows_html = []
    for (layer, head, mode), rows in pairs.groupby(["layer", "head", "mode"], sort=False):
        u, v = svd.U[layer, head, :, mode], svd.V[layer, head, :, mode]
        pictures, captions = [], []
        for r in rows.itertuples():
            x = tokens[int(r.input)][layer].to(u)
            centre = (int(r.query) + int(r.key)) // 2
            start = max(0, min(centre - around, len(x) - 2 * around))
            frames = slice(start, min(len(x), start + 2 * around))
            pictures.append(speech_picture(features[int(r.input)], x @ u * r.sign, x @ v * r.sign, frames))
            words = labels[int(r.input)]
            captions.append(f"query {int(r.query) * 0.02:.2f} s '{words[int(r.query)] or 'silence'}', key "
                            f"{int(r.key) * 0.02:.2f} s '{words[int(r.key)] or 'silence'}'")
        rows_html.append(picture_row(pictures, captions, mode_caption(svd, layer, head, mode, int(rows.iloc[0]['sign'])),
                                     width=240))
    return "".join(rows_html)


def attention_picture(maps: torch.Tensor, query: np.ndarray, key: np.ndarray, cell: int = 6) -> np.ndarray:
    """``[T*cell, T*cell, 3]`` uint8: one head's attention map (rows: queries, darker = more, each row scaled to
    its maximum) with a strip of the mode's query map (red) on the left edge and key map (cyan) on the top."""
    rows = maps / maps.max(dim=-1, keepdim=True).values.clamp_min(1e-12)
    grey = (255 * (1 - rows.numpy())).astype(np.uint8)
    picture = np.repeat(np.repeat(np.repeat(grey[..., None], 3, axis=-1), cell, axis=0), cell, axis=1)
    strip = max(cell, 4)
    picture[:, :strip] = red_cyan(picture[:, :strip], np.repeat(query, cell)[:, None] * np.ones((1, strip)),
                                  np.zeros((len(query) * cell, strip)))
    picture[:strip, :] = red_cyan(picture[:strip, :], np.zeros((strip, len(key) * cell)),
                                  np.ones((strip, 1)) * np.repeat(key, cell)[None])
    return picture
