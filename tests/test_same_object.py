"""qklib.analyses.same_object: token coverage of objects and the same-object probability against a brute force."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from qklib.core.datasets import ade20k
from qklib.analyses import same_object
from qklib.core.datasets.o3 import generate_scenes
from qklib.core.extract import token_embeddings
from qklib.core.images import ImageError, to_pixels


@pytest.fixture(scope="module")
def tiny(tiny_vit):
    return tiny_vit


def _two_object_set(count, rng, size=64):
    items = []
    for i in range(count):
        array = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        labels = np.zeros((size, size), np.uint8)
        labels[4:28, 4:28] = 1
        labels[36:60, 36:60] = 2
        if i % 4 == 3:
            labels[labels == 2] = 0  # only one object: skipped
        array[labels == 1] = (220, 30, 30)
        array[labels == 2] = (30, 30, 220)
        items.append(ade20k.MaskedImage(f"im{i}", Image.fromarray(array), labels))
    return items


def test_token_coverage(tiny):
    model, _ = tiny
    labels = np.zeros((64, 64), np.uint8)
    labels[:16, :16] = 3  # exactly token 0 after the model's resize/crop (64 -> 71 -> centre 64)
    labels[40:, 40:] = 7
    labels[0, 63] = 9  # one pixel: too small, left out
    coverage, ids = same_object.token_coverage(model, labels)
    assert list(ids) == [3, 7]
    assert coverage.shape == (2, 16)
    assert np.all(coverage >= 0) and np.all(coverage <= 1)
    assert coverage.sum(0).max() <= 1 + 1e-6
    assert coverage[0, 0] > 0.7 and coverage[1, 15] == 1.0
    cropped = same_object.crop_labels(model, labels)
    assert cropped.shape == (64, 64) and set(np.unique(cropped)) <= {0, 3, 7, 9}
    with_background, ids = same_object.token_coverage(model, labels, background=True)
    assert list(ids) == [0, 3, 7] and np.allclose(with_background[1:], coverage)
    assert np.allclose(with_background.sum(0)[:15], 1.0) and with_background[0, 5] == 1.0


def test_background_as_an_object_keeps_one_object_images(tiny):
    model, svd = tiny
    data = _two_object_set(8, np.random.default_rng(1))
    result = same_object.same_object_probability(model, svd, data, k=2, batch_size=4, background=True)
    assert result.images_used == 8 and result.images_skipped == 0  # background + 1 or 2 objects
    chance = np.nanmean(result.chance)
    assert 1 / 3 - 1e-6 <= chance <= 1 / 2 + 1e-6


def test_same_object_probability(tiny):
    model, svd = tiny
    data = _two_object_set(12, np.random.default_rng(0))
    result = same_object.same_object_probability(model, svd, data, k=3, batch_size=5)
    assert result.images_used == 9 and result.images_skipped == 3
    assert result.same.shape == (3, 3, 64, 2) and result.per_layer.shape == (3,)
    assert np.all((result.per_layer >= 0) & (result.per_layer <= 1))
    assert np.allclose(result.chance_layer, 0.5)  # two objects everywhere
    # brute force for one feature: top-3 images by score, same-object indicator
    used = [d for d in data if len(np.unique(d.objects)) == 3]
    tokens = token_embeddings(model, to_pixels(model, [d.image for d in used]), layers=[1])[0][:, 1:].double()
    u, v = svd.U[1, 2, :, 4], svd.V[1, 2, :, 4]
    qp, kp = tokens @ u, tokens @ v  # [B, T]
    scores = qp.amax(1).clamp_min(0) * kp.amax(1).clamp_min(0)
    order = sorted(range(len(used)), key=lambda i: (-float(scores[i]), i))[:3]
    order = [i for i in order if scores[i] > 0]
    same = []
    for i in order:
        coverage, _ = same_object.token_coverage(model, used[i].objects)
        cov = torch.from_numpy(coverage).double()
        q_obj = ((cov @ qp[i]) / cov.sum(1)).argmax()
        k_obj = ((cov @ kp[i]) / cov.sum(1)).argmax()
        same.append(float(q_obj == k_obj))
    assert result.same[1, 2, 4, 0] == pytest.approx(np.mean(same))


def test_same_object_needs_masks(tiny):
    model, svd = tiny
    item = ade20k.MaskedImage("x", Image.new("RGB", (64, 64)), None)
    with pytest.raises(ImageError, match="no object label map"):
        same_object.same_object_probability(model, svd, [item])
    one = ade20k.MaskedImage("y", Image.new("RGB", (64, 64)), np.ones((64, 64), np.uint8))
    with pytest.raises(ImageError, match="two or more objects"):
        same_object.same_object_probability(model, svd, [one])


def test_generated_scenes_have_object_maps(tmp_path):
    data = generate_scenes(tmp_path / "scenes", 3, seed=1, size=64)
    assert len(data) == 3
    assert data[0].objects is not None and data[0].objects.max() >= 2


# --- per instance and per kind; the background as an object --------------------------------------------------

class _Scene:
    """A hand-built scene: an image, its instance labels and kinds (label -> kind), as generated scenes carry."""

    def __init__(self, key, image, objects, kinds):
        self.id, self.image, self.objects, self.kinds = key, image, objects, kinds


def _blocks(colours, background=(90, 90, 90), size=64, noise=None):
    """A 4 x 4 grid of 16 px blocks: ``colours`` {(row, col): (label, rgb)}; every other block is background."""
    array = np.zeros((size, size, 3), np.float64) + background
    labels = np.zeros((size, size), np.uint8)
    for (row, col), (label, rgb) in colours.items():
        array[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] = rgb
        labels[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] = label
    if noise is not None:
        array += noise.normal(0, 25, array.shape)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)), labels


def _mode_between(svd, tokens, query_token, key_token):
    """A copy of ``svd`` whose layer 0 head 0 mode 0 looks for ``query_token``'s embedding and offers
    ``key_token``'s (each minus the image mean): its query map peaks there, its key map there."""
    centred = tokens - tokens.mean(0)
    u, v = centred[query_token], centred[key_token]
    U, V = svd.U.clone(), svd.V.clone()
    U[0, 0, :, 0], V[0, 0, :, 0] = u / u.norm(), v / v.norm()
    return dataclasses.replace(svd, U=U, V=V)


def _object_means(model, item, direction, layer=0, background=False):
    """{label: area-weighted mean projection of the label's tokens on ``direction``} (brute force, float64)."""
    tokens = token_embeddings(model, to_pixels(model, [item.image]), layers=[layer])[0][0, 1:].double()
    coverage, ids = same_object.token_coverage(model, item.objects, background=background)
    cov = torch.from_numpy(coverage).double()
    return dict(zip(ids.tolist(), ((cov @ (tokens @ direction.double())) / cov.sum(1)).tolist()))


def test_kind_and_instance_differ_where_query_and_key_fall_on_two_distractors(tiny):
    model, svd = tiny
    # target (label 1) top left; three distractors (2, 3, 4) of one kind in strongly different shades
    image, labels = _blocks({(0, 0): (1, (250, 250, 250)), (0, 3): (2, (230, 20, 20)), (3, 0): (3, (20, 220, 20)),
                             (3, 3): (4, (20, 20, 230))})
    scene = _Scene("s", image, labels, {0: 0, 1: 1, 2: 2, 3: 2, 4: 2})
    tokens = token_embeddings(model, to_pixels(model, [image]), layers=[0])[0][0, 1:]
    crafted = _mode_between(svd, tokens.double(), query_token=3, key_token=12)  # token (0, 3) and token (3, 0)
    for background in (False, True):  # the premise, by brute force: query on distractor 2, key on distractor 3
        u, v = crafted.U[0, 0, :, 0], crafted.V[0, 0, :, 0]
        query, key = _object_means(model, scene, u, background=background), _object_means(model, scene, v, background=background)
        assert max(query, key=query.get) == 2 and max(key, key=key.get) == 3
    runs = same_object.same_object_variants(model, crafted, [scene], k=1, layers=[0])
    assert set(runs) == {(False, "instance"), (False, "kind"), (True, "instance"), (True, "kind")}
    for background in (False, True):
        assert runs[background, "instance"].same[0, 0, 0, 0] == 0.0  # two objects ...
        assert runs[background, "kind"].same[0, 0, 0, 0] == 1.0  # ... of one kind
    # chance by hand: 4 objects (1 target, 3 distractors); with the background 5 (it is a kind of its own)
    assert runs[False, "instance"].chance[0, 0, 0, 0] == pytest.approx(1 / 4)
    assert runs[False, "kind"].chance[0, 0, 0, 0] == pytest.approx((1 + 9) / 16)
    assert runs[True, "instance"].chance[0, 0, 0, 0] == pytest.approx(1 / 5)
    assert runs[True, "kind"].chance[0, 0, 0, 0] == pytest.approx((1 + 9 + 1) / 25)
    one = same_object.same_object_probability(model, crafted, [scene], k=1, layers=[0], match="kind")
    assert one.match == "kind" and not one.background and one.same[0, 0, 0, 0] == 1.0


def test_same_instance_is_same_kind_and_target_to_distractor_is_neither(tiny):
    model, svd = tiny
    image, labels = _blocks({(0, 0): (1, (250, 250, 250)), (0, 3): (2, (230, 20, 20)), (3, 0): (3, (20, 220, 20))})
    scene = _Scene("s", image, labels, {1: 1, 2: 2, 3: 2})
    tokens = token_embeddings(model, to_pixels(model, [image]), layers=[0])[0][0, 1:].double()
    for query_token, key_token, expected in ((3, 3, 1.0), (0, 12, 0.0)):  # distractor -> itself; target -> distractor
        crafted = _mode_between(svd, tokens, query_token, key_token)
        runs = same_object.same_object_variants(model, crafted, [scene], k=1, layers=[0], background=(False,))
        assert runs[False, "instance"].same[0, 0, 0, 0] == runs[False, "kind"].same[0, 0, 0, 0] == expected


def _reference(model, svd, items, layer, k, background, margin):
    """Brute force of every feature of ``layer``: (same instance, same kind, a background pick, decided) over
    its top-k images; ``decided`` is False where a score or an object mean is within ``margin`` of a tie."""
    tokens = token_embeddings(model, to_pixels(model, [i.image for i in items]), layers=[layer])[0][:, 1:].double()
    u, v = svd.U[layer].double(), svd.V[layer].double()  # [H, d, r]
    q = torch.einsum("btd,hdr->bhrt", tokens, u)
    kp = torch.einsum("btd,hdr->bhrt", tokens, v)
    out = {}
    for sign in (1, -1):
        scores = (sign * q).amax(-1).clamp_min(0) * (sign * kp).amax(-1).clamp_min(0)  # [B, H, r]
        for h in range(u.shape[0]):
            for n in range(u.shape[2]):
                order = sorted(range(len(items)), key=lambda i: (-float(scores[i, h, n]), i))
                kept = [i for i in order[:k] if scores[i, h, n] > 0]
                ranked = sorted((float(s) for s in scores[:, h, n]), reverse=True)
                decided = len(ranked) <= k or ranked[k - 1] - ranked[k] > margin  # the top-k set, not its order
                same_i, same_k, bg = [], [], False
                for i in kept:
                    coverage, ids = same_object.token_coverage(model, items[i].objects, background=background)
                    cov = torch.from_numpy(coverage).double()
                    qm = sign * (cov @ q[i, h, n]) / cov.sum(1)
                    km = sign * (cov @ kp[i, h, n]) / cov.sum(1)
                    for means in (qm, km):
                        top2 = torch.topk(means, 2).values
                        decided &= float(top2[0] - top2[1]) > margin
                    a, b = int(ids[int(qm.argmax())]), int(ids[int(km.argmax())])
                    kinds = items[i].kinds
                    same_i.append(a == b)
                    same_k.append((a == 0) == (b == 0) and (a == 0 or kinds[a] == kinds[b]))
                    bg |= a == 0 or b == 0
                if kept:
                    out[h, n, 0 if sign == 1 else 1] = (np.mean(same_i), np.mean(same_k), bg, decided)
    return out


def test_variants_match_a_brute_force_and_the_background_changes_only_background_cases(tiny):
    model, svd = tiny
    rng = np.random.default_rng(5)
    items = []
    for i in range(10):  # a target and two distractors of one kind at shuffled places, on a noisy background
        places = [tuple(p) for p in rng.permutation([(r, c) for r in range(4) for c in range(4)])[:3]]
        paints = [(250, 250, 250), (200, 40, 40), (150, 30, 60)]
        image, labels = _blocks({p: (label, paint) for label, (p, paint) in enumerate(zip(places, paints), 1)},
                                background=tuple(rng.integers(40, 200, 3)), noise=rng)
        items.append(_Scene(f"im{i}", image, labels, {1: 1, 2: 2, 3: 2}))
    runs = same_object.same_object_variants(model, svd, items, k=3, layers=[1], batch_size=4)
    without, with_bg = _reference(model, svd, items, 1, 3, False, 1e-4), _reference(model, svd, items, 1, 3, True, 1e-4)
    checked = changed = 0
    for key in without:
        h, n, s = key
        for background, reference in ((False, without), (True, with_bg)):
            same_i, same_k, _, decided = reference[key]
            if decided:
                assert runs[background, "instance"].same[0, h, n, s] == pytest.approx(same_i)
                assert runs[background, "kind"].same[0, h, n, s] == pytest.approx(same_k)
                checked += 1
        assert runs[True, "kind"].same[0, h, n, s] >= runs[True, "instance"].same[0, h, n, s]
        if not with_bg[key][2] and with_bg[key][3] and without[key][3]:  # no top image picks the background
            assert runs[False, "instance"].same[0, h, n, s] == runs[True, "instance"].same[0, h, n, s]
            assert runs[False, "kind"].same[0, h, n, s] == runs[True, "kind"].same[0, h, n, s]
        changed += runs[False, "instance"].same[0, h, n, s] != runs[True, "instance"].same[0, h, n, s]
    assert checked > 0.9 * 2 * len(without) and changed > 0  # nearly every feature decided; the background matters
    assert runs[False, "instance"].images_used == runs[True, "instance"].images_used == 10


def test_kind_needs_kind_labels(tiny):
    model, svd = tiny
    data = _two_object_set(4, np.random.default_rng(2))  # MaskedImage without kinds
    with pytest.raises(ImageError, match="no kind labels"):
        same_object.same_object_variants(model, svd, data, k=1, layers=[0])
    assert not same_object.has_kinds(data)
    assert same_object.same_object_variants(model, svd, data, k=1, layers=[0], match=("instance",))
    with pytest.raises(ValueError, match="match must be"):
        same_object.same_object_variants(model, svd, data, k=1, layers=[0], match=("class",))


def test_generated_scenes_count_every_distractor_as_one_kind(tmp_path):
    data = generate_scenes(tmp_path / "scenes", 2, seed=4, size=64)
    assert same_object.has_kinds(data)
    kinds = data[0].kinds
    assert kinds[1] == 1 and {kinds[label] for label in kinds if label >= 2} == {2} and kinds[0] == 0


def test_the_mismatched_null_pairs_each_query_direction_with_the_next_modes_key_direction(tiny):
    _, svd = tiny
    null = same_object.mismatched(svd)
    assert torch.equal(null.U, svd.U) and torch.equal(null.S, svd.S)
    assert torch.equal(null.V[..., 0], svd.V[..., 1]) and torch.equal(null.V[..., -1], svd.V[..., 0])
    assert "next mode" in null.notes[-1] and not any("next mode" in n for n in svd.notes)
