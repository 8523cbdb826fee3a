"""qklib.extract reads what the model really computes: recomputing each block's attention output from the
recorded tokens and probabilities gives the model's own output (with its fused attention, as it runs)."""

from __future__ import annotations

import pytest
import timm
import torch

from qklib.core.extract import image_tokens, record


def _random_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    # Small random models with 2 (CLS + distillation) and 5 (CLS + 4 registers) prefix tokens.
    return timm.create_model(name, pretrained=False, img_size=56).eval()


MODELS = ["default", "deit_tiny_distilled_patch16_224", "vit_small_patch14_reg4_dinov2"]


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    model = request.getfixturevalue("embedded_model") if request.param == "default" else _random_model(request.param)
    size = int(model.patch_embed.img_size[0])
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return request.param, model, pixels


def _own_outputs(model, pixels) -> list[torch.Tensor]:
    """Each block's attention output from a plain forward pass, fused attention as the model has it."""
    outputs, handles = [], []
    for block in model.blocks:
        handles.append(block.attn.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach())))
    try:
        with torch.no_grad():
            model.forward_features(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, count, width = x.shape
    return x.reshape(batch, count, heads, width // heads).transpose(1, 2)  # [B, H, T, d_k]


def test_attention_output_recomputed_from_record_equals_the_models(case):
    name, model, pixels = case
    fused_before = [block.attn.fused_attn for block in model.blocks]
    if name == "default":
        assert all(fused_before), "the comparison should be against the model's fused (SDPA) forward pass"
    own = _own_outputs(model, pixels)
    rec = record(model, pixels, tokens=True, attention=True)
    assert [block.attn.fused_attn for block in model.blocks] == fused_before, "fused attention not restored"
    layers, heads = len(model.blocks), model.blocks[0].attn.num_heads
    assert rec.tokens.shape[:2] == (layers, 2) and rec.attention.shape[:3] == (layers, 2, heads)
    assert rec.prefix_tokens == model.num_prefix_tokens
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        with torch.no_grad():
            q, k, v = (_heads(part, heads) for part in attn.qkv(rec.tokens[layer]).chunk(3, dim=-1))
            scores = (q * attn.scale) @ k.transpose(-2, -1)
            torch.testing.assert_close(rec.attention[layer], scores.softmax(-1), atol=1e-5, rtol=1e-4,
                                       msg=f"{name} layer {layer}: probabilities are not softmax(q k) of the tokens")
            mixed = (rec.attention[layer] @ v).transpose(1, 2).reshape(rec.tokens[layer].shape[0], -1, attn.qkv.out_features // 3)
            recomputed = attn.proj(mixed)
        torch.testing.assert_close(recomputed, own[layer], atol=1e-4, rtol=1e-4,
                                   msg=f"{name} layer {layer}: recomputed attention output differs from the model's")


def test_probabilities_are_rows_that_sum_to_one(case):
    _, model, pixels = case
    attention = record(model, pixels, tokens=False, attention=True).attention
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]), atol=1e-5, rtol=0)
    assert (attention >= 0).all()


def test_layer_subset_matches_full_record_and_restores_flags():
    model = _random_model("deit_tiny_distilled_patch16_224")
    pixels = torch.randn(1, 3, 56, 56)
    full = record(model, pixels, tokens=True, attention=True)
    part = record(model, pixels, tokens=True, attention=True, layers=[3, 1])
    torch.testing.assert_close(part.attention, full.attention[[3, 1]])
    torch.testing.assert_close(part.tokens, full.tokens[[3, 1]])
    assert all(block.attn.fused_attn == model.blocks[0].attn.fused_attn for block in model.blocks)
    with pytest.raises(ValueError, match="out of range"):
        record(model, pixels, layers=[99])


def test_image_tokens_drops_the_prefix():
    x = torch.arange(2 * 7).reshape(2, 7, 1)
    assert image_tokens(x, 2, dim=1)[0, :, 0].tolist() == [2, 3, 4, 5, 6]
