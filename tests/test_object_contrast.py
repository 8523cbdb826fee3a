"""§6's object contrast (qklib.analyses.object_contrast): what one head's output does to the similarity of tokens within
and between objects, checked against brute-force pair loops, hand-worked heads and the model's own attention
output."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from qklib.analyses import object_contrast as oc
from qklib.core.ov import OVWeights, ov_weights


def brute_contrast(tokens: np.ndarray, objects: np.ndarray) -> float:
    """Mean cosine over every ordered pair i != j within one object minus over pairs of different objects."""
    unit = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
    within, between = [], []
    for i in range(len(tokens)):
        for j in range(len(tokens)):
            if i == j or objects[i] < 0 or objects[j] < 0:
                continue
            (within if objects[i] == objects[j] else between).append(unit[i] @ unit[j])
    return float(np.mean(within) - np.mean(between))


def test_contrast_is_the_pair_average_and_broadcasts_over_images():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(3, 12, 5))
    objects = np.array([[0, 0, 0, 1, 1, -1, 2, 2, 2, 2, -1, 0], [1, 1, 0, 0, -1, -1, -1, -1, 0, 1, 1, 1],
                        [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]])
    got = oc.contrast(torch.tensor(tokens), torch.tensor(objects))
    assert got.shape == (3,)
    for image in range(3):
        assert float(got[image]) == pytest.approx(brute_contrast(tokens[image], objects[image]), abs=1e-12)
    # identical tokens within objects, orthogonal between them: within 1, between 0
    eye = torch.eye(3)[[0, 0, 1, 1, 2]]
    assert float(oc.contrast(eye, torch.tensor([0, 0, 1, 1, -1]))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two objects of two tokens"):
        oc.contrast(eye, torch.tensor([0, 0, 0, 1, -1]))


def test_same_object_attention_on_hand_worked_rows():
    objects = torch.tensor([0, 0, 0, 1, 1, -1])  # 6 image tokens, N - 1 = 5 others per row
    same = (objects[:, None] == objects[None]) & (objects[:, None] >= 0)
    within = same.double() * (1 - torch.eye(6, dtype=torch.float64))  # every token attends uniformly to the rest of its own object
    within[5] = 1 / 6  # a background row: not counted
    chance = torch.tensor([2, 2, 2, 1, 1], dtype=torch.float64) / 5
    expected = float((1 - chance).mean())
    rows = within / within.sum(-1, keepdim=True)
    uniform = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    got = oc.same_object_attention(torch.stack([rows, uniform]), objects)
    assert got.tolist() == pytest.approx([expected, 0.0], abs=1e-12)
    # the own weight is removed before the share is taken: piling attention on itself changes nothing
    selfish = 0.5 * rows + 0.5 * torch.eye(6, dtype=torch.float64)
    assert float(oc.same_object_attention(selfish[None], objects)[0]) == pytest.approx(expected, abs=1e-12)


def identity_head(d: int) -> OVWeights:
    """One layer, one head whose OV matrix is the identity (r = d)."""
    return OVWeights(wv=torch.eye(d, dtype=torch.float64)[None, None], wo=torch.eye(d, dtype=torch.float64)[None, None])


def test_a_copying_head_that_attends_within_objects_raises_the_contrast():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(2, 8))
    objects = torch.tensor([0] * 5 + [1] * 5)
    x = torch.tensor(centres[objects.numpy()] + 1.5 * rng.normal(size=(10, 8)))  # [N, d]
    same = (objects[:, None] == objects[None]).double()
    block_diagonal = (same / same.sum(-1, keepdim=True))[None, None]  # [B, H, N, N], no prefix token
    uniform = torch.full((1, 1, 10, 10), 0.1, dtype=torch.float64)
    head = identity_head(8)
    grouped = oc.head_outputs(head, 0, x[None], block_diagonal, prefix=0)[0, 0]  # each token gets its object's mean
    assert torch.allclose(grouped, (same @ x) / 5)
    before = float(oc.contrast(x, objects))
    assert float(oc.contrast(x + grouped, objects)) > before + 0.1
    # uniform attention adds one vector to every token, and uniform_outputs is that vector
    flat = oc.head_outputs(head, 0, x[None], uniform, prefix=0)[0, 0]
    assert torch.allclose(flat, oc.uniform_outputs(head, 0, x[None])[0, 0].expand(10, 8))
    # a head whose OV is 0 changes nothing
    silent = OVWeights(wv=head.wv, wo=torch.zeros_like(head.wo))
    assert float(oc.contrast(x + oc.head_outputs(silent, 0, x[None], block_diagonal, 0)[0, 0], objects)) == before


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(3)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, embed_dim=48, num_heads=3,
                              img_size=64, init_values=0.5).eval()
    for name, parameter in model.named_parameters():  # biases and LayerScale away from their init, to count
        if name.endswith("bias") or name.endswith(".gamma"):
            parameter.data.normal_(0, 0.3)
    return model


def test_head_outputs_sum_to_the_attention_module_output(small_model):
    """Summed over heads, plus the value and output biases (the same vector for every token), the heads' outputs
    are exactly what the block's attention module adds before its LayerScale."""
    block = small_model.blocks[1]
    x = torch.randn(2, 17, 48)
    z = block.norm1(x)
    records = {}
    hook = block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: records.__setitem__("p", out))
    block.attn.fused_attn = False
    with torch.no_grad():
        direct = block.attn(z)
    hook.remove()
    weights = ov_weights(small_model)
    heads = oc.head_outputs(weights, 1, z.double(), records["p"].double(), prefix=1)  # [B, H, N, d]
    v_bias = block.attn.qkv.bias[96:].double().detach()
    constant = block.attn.proj.weight.double().detach() @ v_bias + block.attn.proj.bias.double().detach()
    assert torch.allclose(heads.sum(1) + constant, direct[:, 1:].double(), atol=1e-5)
    scaled = oc.head_outputs(ov_weights(small_model, layer_scale=True), 1, z.double(), records["p"].double(), 1)
    assert torch.allclose(scaled, block.ls1.gamma.double() * heads, atol=1e-6)


class Item:
    def __init__(self, image, objects):
        self.image, self.objects = image, objects


def test_token_objects_and_measure_on_masked_images(small_model):
    labels = np.zeros((64, 64), np.uint8)  # a 4 x 4 grid of 16 px patches
    labels[:32, :32] = 1  # four whole patches
    labels[32:, 32:48] = 2  # two whole patches
    labels[0:16, 48:64] = 3  # one whole patch: a token, but an object needs two
    labels[16:20, 48:64] = 4  # a quarter of a patch: no token (a token needs half its patch covered)
    owners = oc.token_objects(small_model, labels)
    assert owners.reshape(4, 4).tolist() == [[0, 0, -1, -1], [0, 0, -1, -1], [-1, -1, 1, -1], [-1, -1, 1, -1]]
    labels[20:24, 48:64] = 4  # now half of that patch: a token of object 4, still one token
    assert (oc.token_objects(small_model, labels) == owners).all()
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    lonely = np.zeros((64, 64), np.uint8)
    lonely[:32, :32] = 1
    run = oc.measure(small_model, [Item(photo, labels), Item(photo, lonely), Item(photo, labels)], batch_size=2)
    assert (run.images_used, run.images_skipped) == (2, 1)
    assert run.delta.shape == (2, 2, 3) and run.block.shape == (2, 2) and run.attention.shape == (2, 2, 3)
    assert np.allclose(run.delta[0], run.delta[1])  # the same image twice, in two batches
    with pytest.raises(ValueError, match="none of the 1 images has two objects"):
        oc.measure(small_model, [Item(photo, lonely)])


def test_output_scale_reads_the_layer_scale(small_model):
    gammas = [block.ls1.gamma.detach().double() for block in small_model.blocks]
    weights = ov_weights(small_model)
    expected = np.mean([float((g[:, None] * w.reshape(48, -1)).norm() / w.norm())
                        for g, w in zip(gammas, weights.wo.transpose(1, 2).reshape(2, 48, -1))])
    assert oc.output_scale(small_model) == pytest.approx(expected)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1).eval()
    assert oc.output_scale(plain) is None


def test_measure_reads_an_ade20k_style_folder_with_non_square_images(small_model, tmp_path):
    """``ade20k_dir`` in the chapter: any folder of images/ and objects/ label maps, cropped like the images."""
    from qklib.core.datasets import ade20k

    (tmp_path / "images").mkdir()
    (tmp_path / "objects").mkdir()
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        labels = np.zeros((64, 96), np.uint8)  # resized to 64 high, then the centre 64 x 64 is kept
        labels[:, 16:48] = 1  # columns 16..47 become the crop's columns 0..31: its two left tokens per row
        labels[:, 48:80] = 2
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{name}.png")
        Image.fromarray(labels).save(tmp_path / "objects" / f"{name}.png")
    masked = ade20k.load_ade20k(tmp_path)
    assert oc.token_objects(small_model, masked[0].objects).reshape(4, 4).tolist() == [[0, 0, 1, 1]] * 4
    run = oc.measure(small_model, masked)
    assert (run.images_used, run.images_skipped) == (2, 0) and np.isfinite(run.delta).all()


def test_the_layer_table_is_the_image_mean_with_its_interval():
    rng = np.random.default_rng(4)
    run = oc.ObjectContrast(delta=rng.normal(size=(5, 2, 3)), uniform=rng.normal(size=(5, 2, 3)),
                            block=rng.normal(size=(5, 2)), before=rng.normal(size=(5, 2)),
                            attention=rng.normal(size=(5, 2, 3)), images_used=5, images_skipped=0)
    table = oc.layer_table({"m": run}, resamples=200).set_index(["quantity", "layer"])
    assert table.loc[("per head", 1), "mean"] == pytest.approx(run.delta[:, 1].mean())
    assert table.loc[("uniform", 0), "mean"] == pytest.approx(run.uniform[:, 0].mean())
    assert table.loc[("block", 1), "mean"] == pytest.approx(run.block[:, 1].mean())
    assert table.loc[("before", 0), "mean"] == pytest.approx(run.before[:, 0].mean())
    assert bool(((table["low"] <= table["mean"]) & (table["mean"] <= table["high"])).all())
