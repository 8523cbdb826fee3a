"""The one reader of attention weights (qklib.core.reader): its stacked weights against the modules' own, the
attention recomputed from them against the model's, and the registry."""

import pytest
import timm
import torch
from torch import nn

import qklib
from qklib.core import reader
from qklib.core.reader import AttentionWeights, attention_sites, read_attention


@pytest.fixture(scope="module")
def registers_vit():
    """DINOv2 layout with 4 registers, LayerScale and random (non-zero) biases, norms and LayerScale."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=2).eval()
    with torch.no_grad():
        for block in model.blocks:
            for tensor in (block.attn.qkv.bias, block.attn.proj.bias, block.ls1.gamma, block.norm1.weight,
                           block.norm1.bias):
                tensor.normal_()
    return model


def test_stacked_weights_are_the_modules_rows_and_columns(registers_vit):
    weights = read_attention(registers_vit)
    assert weights.family == "timm-vit" and weights.special_tokens == 5 and weights.norm_position == "pre"
    assert weights.wq.shape == (2, 6, 64, 384) and weights.wo.shape == (2, 6, 384, 64)
    assert weights.wq.dtype == torch.float64 and weights.scale == 64**-0.5
    block = registers_vit.blocks[1]
    qkv, proj = block.attn.qkv.weight.detach().double(), block.attn.proj.weight.detach().double()
    bias = block.attn.qkv.bias.detach().double()
    head = 4  # rows 4*64:5*64 of each third of qkv, the same columns of proj
    rows = slice(head * 64, (head + 1) * 64)
    assert torch.equal(weights.wq[1, head], qkv[:384][rows]) and torch.equal(weights.wk[1, head], qkv[384:768][rows])
    assert torch.equal(weights.wv[1, head], qkv[768:][rows]) and torch.equal(weights.bk[1, head], bias[384:768][rows])
    assert torch.equal(weights.wo[1, head], proj[:, rows])
    assert torch.equal(weights.bo[1], block.attn.proj.bias.detach().double())
    assert torch.equal(weights.layer_scale[1], block.ls1.gamma.detach().double())
    assert torch.equal(weights.norm_gamma[1], block.norm1.weight.detach().double())
    assert weights.has_bias == {"q": True, "k": True, "v": True, "o": True} and not weights.qk_norm


def test_attention_recomputed_from_the_weights_equals_the_models(registers_vit):
    """Every block's attention output (before LayerScale) from the reader's stacked weights alone, on the tokens
    its norm produced, against the output of the model's own attention module."""
    weights = read_attention(registers_vit)
    seen = {}
    hooks = [block.norm1.register_forward_hook(lambda _m, _i, out, l=l: seen.__setitem__(("x", l), out))
             for l, block in enumerate(registers_vit.blocks)]
    hooks += [block.attn.register_forward_hook(lambda _m, _i, out, l=l: seen.__setitem__(("out", l), out))
              for l, block in enumerate(registers_vit.blocks)]
    with torch.no_grad():
        registers_vit.forward_features(torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1)))
    for hook in hooks:
        hook.remove()
    for layer in range(weights.num_layers):
        x = seen[("x", layer)].double()  # [B, T, d]
        q = torch.einsum("hrd,btd->bhtr", weights.wq[layer], x) + weights.bq[layer][None, :, None]
        k = torch.einsum("hrd,btd->bhtr", weights.wk[layer], x) + weights.bk[layer][None, :, None]
        v = torch.einsum("hrd,btd->bhtr", weights.wv[layer], x) + weights.bv[layer][None, :, None]
        mixed = (q @ k.mT * weights.scale).softmax(-1) @ v
        out = torch.einsum("hdr,bhtr->btd", weights.wo[layer], mixed) + weights.bo[layer]
        assert torch.allclose(out, seen[("out", layer)].double(), atol=1e-4), layer


def test_flags_of_the_variants():
    torch.manual_seed(0)
    normed = read_attention(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, qk_norm=True))
    assert normed.qk_norm and normed.q_norm_gamma.shape == (1, 64) and normed.layer_scale is None
    beit = read_attention(timm.create_model("beit_base_patch16_224", pretrained=False, depth=1, img_size=32))
    assert beit.rel_pos_bias and beit.has_bias["q"] and not beit.has_bias["k"] and bool((beit.bk == 0).all())
    eva = read_attention(timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, qkv_fused=False))
    assert eva.rope and eva.wq.shape == (1, 3, 64, 192)
    deit = read_attention(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1))
    assert deit.special_tokens == 2
    predictor = read_attention(qklib.core.loaders.official.build_predictor(embed_dim=64, predictor_dim=48, depth=2,
                                                                   num_heads=3, num_patches=16))
    assert predictor.family == "ijepa-predictor" and predictor.special_tokens == 0 and predictor.wq.shape == (2, 3, 16, 48)


def test_sites_hook_the_norm_and_the_softmax(registers_vit):
    sites = attention_sites(registers_vit)
    assert sites.num_heads == 6 and sites.head_dim == 64 and len(sites.blocks) == 2
    assert sites.inputs[0] is registers_vit.blocks[0].norm1 and sites.fused_qk[1] is registers_vit.blocks[1].attn.qkv
    flags = [block.attn.fused_attn for block in registers_vit.blocks]
    with sites.explicit_softmax():
        assert not any(block.attn.fused_attn for block in registers_vit.blocks)
    assert [block.attn.fused_attn for block in registers_vit.blocks] == flags


class _Toy(nn.Module):
    """A one-layer 'model' of another family: its weights as plain parameters."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2, 3))  # W_q, W_k, W_v and W_o^T of one head: r = 2, d = 3


def _read_toy(model: _Toy) -> dict:
    w = model.w.detach().double()
    zeros = torch.zeros(1, 1, 2, dtype=torch.float64)
    return {"wq": w[0][None, None], "wk": w[1][None, None], "wv": w[2][None, None], "wo": w[3].T[None, None],
            "bq": zeros, "bk": zeros, "bv": zeros, "bo": torch.zeros(1, 3, dtype=torch.float64),
            "norm_gamma": None, "norm_beta": None, "norm_position": "post", "scale": 0.5, "special_tokens": 0}


def test_a_registered_family_goes_through_qk_svd(monkeypatch):
    monkeypatch.setattr(reader, "_ADAPTERS", dict(reader._ADAPTERS))  # leave the registry as it was afterwards
    model = _Toy()
    with pytest.raises(TypeError, match="qklib reads the attention of .*timm-vit.*register"):
        read_attention(model)
    reader.register("toy", lambda m: isinstance(m, _Toy), _read_toy)
    assert reader.family_of(model) == "toy" and reader.families()[-1] == "toy"
    svd = qklib.qk_svd(model)
    w = model.w.detach().double()
    assert torch.allclose(svd.matrix(0, 0), w[0].T @ w[1], atol=1e-12)
    with pytest.raises(TypeError, match="fold_gamma=False"):
        qklib.qk_svd(model, fold_gamma=True)
    with pytest.raises(TypeError, match="does not hook their forward pass"):
        attention_sites(model)


def test_bad_shapes_say_which_field():
    fields = _read_toy(_Toy())
    AttentionWeights(**fields)
    with pytest.raises(ValueError, match=r"AttentionWeights.bo: expected shape \(1, 3\)"):
        AttentionWeights(**{**fields, "bo": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="norm_position"):
        AttentionWeights(**{**fields, "norm_position": "middle"})
