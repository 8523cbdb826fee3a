"""Optimal token pairs of a QK mode over sequences (qklib.analyses.sequences), against brute force."""

import itertools

import pytest
import torch

from qklib.analyses import sequences


def _brute(x, u, s, v, valid=None):
    best = (0.0, None)
    for i, j in itertools.product(range(len(x)), repeat=2):
        if valid is not None and not (valid[i] and valid[j]):
            continue
        term = float((x[i] @ u) * s * (x[j] @ v))
        if term > best[0]:
            best = (term, (i, j))
    return best


def test_best_pair_equals_the_brute_force_maximum_and_keeps_the_sign():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
        u, v = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
        valid = torch.rand(9, generator=gen) > 0.3
        pair = sequences.best_pair(x, u, 2.0, v, valid)
        score, (i, j) = _brute(x, u, 2.0, v, valid)
        assert pair.score == pytest.approx(score)
        assert (pair.query, pair.key) == (i, j)
        assert pair.sign == (1 if float(x[i] @ u) > 0 else -1)


def test_top_pairs_ranks_sequences_and_skips_empty_ones():
    u = v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    seqs = [torch.tensor([[1.0, 0.0], [0.5, 1.0]]), torch.tensor([[3.0, 0.0], [0.0, 1.0]]),
            torch.tensor([[-2.0, 0.0], [0.0, 1.0]])]
    valid = [torch.tensor([True, True]), torch.tensor([True, True]), torch.tensor([False, False])]
    top = sequences.top_pairs(seqs, u, 1.0, v, count=5, valid=valid)
    assert [p.sequence for p in top] == [1, 0]
    assert top[0].score == pytest.approx(9.0)
    both = sequences.top_pairs(seqs, u, 1.0, v, count=1)
    assert both[0].sequence == 1
    with pytest.raises(ValueError, match="count"):
        sequences.top_pairs(seqs, u, 1.0, v, count=0)


def test_snippet_marks_query_and_key_and_escapes_text():
    words = ["a", "<b>", "c", "d", "e"]
    text = sequences.snippet_html(words, 1, 3, context=1)
    assert "&lt;b&gt;" in text and "<b>" not in text.replace("<b style", "")
    assert text.startswith("a ") and text.endswith(" e")
    assert sequences.QUERY_COLOUR in text and sequences.KEY_COLOUR in text
    cut = sequences.snippet_html(words * 10, 20, 20, context=2)
    assert cut.startswith("… ") and cut.endswith(" …") and "linear-gradient" in cut
