"""The registry of the paper's 16 models tells the truth, and every architecture goes through the analysis.

Speed: the full-depth networks (ViT-H/14 has 632M parameters) are built on the meta device only, to check
the registry's geometry; the QK SVD and the forward extraction run on random-init copies with 2 blocks. Every
block of these isotropic transformers has the same geometry, so head dim, head count, width, prefix tokens,
pre-norm, pooling and the relative position bias are all present at depth 2.
"""

import contextlib
import io

import pytest
import timm
import torch
from torch import nn

import qklib
from qklib.cli import main
from official_layouts import ijepa_encoder, ijepa_predictor, simmim_vit, write_ijepa
from qklib.core.loaders import official
from qklib.book import paper_models
from qklib.core.extract import record
from qklib.core.models import ModelError
from qklib.core.reader import attention_sites
from qklib.core.loaders.weights import strip_prefix
from qklib.present import cosine_figures as charts

ENTRIES = [*paper_models.PAPER_MODELS, paper_models.IJEPA_PREDICTOR]


def test_the_registry_lists_the_papers_16_models_and_how_each_loads():
    assert len(paper_models.PAPER_MODELS) == 16
    assert [m.family for m in paper_models.PAPER_MODELS].count("SimMIM") == 2
    assert {m.family for m in paper_models.PAPER_MODELS} == {"ViT", "DeiT", "DINO", "CLIP", "SimMIM", "I-JEPA"}
    for model in paper_models.all_models():
        # every model either has a timm name or names the file and the architecture it converts to
        assert model.timm_name or (model.file and model.arch), model.label
    ijepa = next(m for m in paper_models.PAPER_MODELS if m.family == "I-JEPA")
    assert ijepa.timm_name == "vit_huge_patch14_gap_224.in1k_ijepa"  # the encoder is in timm
    assert paper_models.IJEPA_PREDICTOR.part == "predictor" and paper_models.IJEPA_PREDICTOR.file.endswith(".pth.tar")
    assert [m.bilinear for m in paper_models.PAPER_MODELS].count(False) == 2  # the two SimMIM models


def test_every_timm_name_is_a_pretrained_timm_model():
    pretrained = set(timm.list_pretrained())
    names = [m.timm_name for m in paper_models.PAPER_MODELS if m.timm_name]
    assert len(names) == 14
    missing = [name for name in names if name not in pretrained]
    assert not missing, f"not in timm.list_pretrained(): {missing}"


def test_cli_models_lists_all_16_with_how_each_loads():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["models", "--wide"]) == 0
    text = out.getvalue()
    assert "not in timm" not in text
    for model in paper_models.all_models():
        line = next(line for line in text.splitlines() if line.startswith(model.label + " "))
        assert model.loads in line and f"{model.layers} x {model.heads} x {model.head_dim}" in line
    assert "weights=simmim_pretrain__vit_base__img224__800ep.pth" in text
    assert "weights=IN1K-vit.h.14-300e.pth.tar, part=predictor" in text


@pytest.mark.parametrize("entry", ENTRIES, ids=[m.label for m in ENTRIES])
def test_full_architecture_matches_the_registry(entry):
    arch, kwargs = paper_models.architecture(entry)
    with torch.device("meta"):
        net = qklib.core.models.build(arch, kwargs)
    assert len(net.blocks) == entry.layers
    sites = attention_sites(net)  # structure only: the meta device has no weights to read
    assert sites.num_heads == entry.heads and sites.head_dim == entry.head_dim
    assert net.blocks[0].attn.qkv.out_features == 3 * entry.heads * entry.head_dim
    if entry is not paper_models.IJEPA_PREDICTOR:
        assert qklib.core.models.prefix_tokens(net) == entry.prefix_tokens


def _shapes(module: nn.Module, drop=("head.weight", "head.bias")) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if k not in drop}


def test_full_size_official_layouts_convert_to_the_registry_architectures():
    """Full ViT-H/14 (I-JEPA) and ViT-B/16 (SimMIM) official layouts, as shapes on the meta device."""
    encoder = strip_prefix(ijepa_encoder(width=1280, depth=32, patch=14, grid=16, meta=True), "module.")
    predictor = strip_prefix(ijepa_predictor(width=1280, predictor_width=384, depth=12, tokens=256, meta=True), "module.")
    parts = {"encoder": encoder, "predictor": predictor, "target_encoder": encoder}
    converted = official.convert_ijepa(parts, "encoder", "full.pth.tar")
    assert converted.arch == "vit_huge_patch14_gap_224"
    converted_predictor = official.convert_ijepa(parts, "predictor", "full.pth.tar")
    assert converted_predictor.kwargs == paper_models.IJEPA_PREDICTOR.arch_kwargs
    simmim = {e.label: e for e in paper_models.PAPER_MODELS if e.family == "SimMIM"}
    pretrain = official.convert_simmim(simmim_vit(768, 12, 12, 16, 14, shared=True, meta=True), "pre.pth")
    finetune = official.convert_simmim(simmim_vit(768, 12, 12, 16, 14, shared=False, mean_pooling=True, classes=1000,
                                                  meta=True), "ft.pth")
    pairs = [(converted, next(m for m in paper_models.PAPER_MODELS if m.family == "I-JEPA")),
             (converted_predictor, paper_models.IJEPA_PREDICTOR),
             (pretrain, simmim["SimMIM ViT-B/16 pretrain"]), (finetune, simmim["SimMIM ViT-B/16 fine-tuned"])]
    for result, entry in pairs:
        with torch.device("meta"):
            built = qklib.core.models.build(result.arch, result.kwargs)
            registry = qklib.core.models.build(*paper_models.architecture(entry))
        file_shapes = {k: tuple(v.shape) for k, v in result.state.items() if not k.startswith("head.")}
        assert _shapes(built) == _shapes(registry) == file_shapes, entry.label


def _exact_reconstruction(net: nn.Module, svd: qklib.QKSVD) -> float:
    """Largest relative error of U S V^T against W_q,h^T W_k,h computed here from the module's own fused qkv
    weight (rows [0, D) W_q, [D, 2D) W_k: every paper model has one), not through qklib's reader."""
    worst = 0.0
    for layer, block in enumerate(net.blocks):
        weight = block.attn.qkv.weight.detach().double()
        width = weight.shape[0] // 3
        wq, wk = weight[:width], weight[width : 2 * width]
        heads = block.attn.num_heads
        wq, wk = wq.reshape(heads, -1, wq.shape[1]), wk.reshape(heads, -1, wk.shape[1])
        for head in range(heads):
            expected = wq[head].T @ wk[head]
            worst = max(worst, float((svd.matrix(layer, head) - expected).norm() / expected.norm()))
    return worst


@pytest.mark.parametrize("entry", ENTRIES, ids=[m.label for m in ENTRIES])
def test_each_architecture_at_random_init_through_qk_svd_and_extraction(entry):
    torch.manual_seed(0)
    arch, kwargs = paper_models.architecture(entry)
    net = qklib.core.models.build(arch, {**kwargs, "depth": 2}).eval()  # two blocks: per-block geometry unchanged
    svd = qklib.qk_svd(net)
    assert svd.S.shape == (2, entry.heads, entry.head_dim)
    assert _exact_reconstruction(net, svd) < 1e-10
    assert svd.exact == entry.bilinear
    if not entry.bilinear:
        assert any("relative position bias" in note for note in svd.notes)
    if entry is paper_models.IJEPA_PREDICTOR:
        with pytest.raises(ModelError, match="not an image"):
            record(net, torch.zeros(1, 3, 224, 224))
        with pytest.raises(ModelError, match="not an image model"):
            qklib.info(net)
        return
    geometry = qklib.info(net)
    assert (geometry.head_dim, geometry.prefix_tokens) == (entry.head_dim, entry.prefix_tokens)
    pixels = torch.randn(1, 3, geometry.img_size, geometry.img_size)
    tokens = record(net, pixels, layers=[0]).tokens  # the pass stops after block 0
    rows, cols = geometry.grid
    assert tokens.shape == (1, 1, entry.prefix_tokens + rows * cols, geometry.dim)
    assert torch.isfinite(tokens).all()
    if entry.family == "CLIP":
        assert isinstance(net.norm_pre, nn.LayerNorm)  # CLIP normalises the embeddings before block 0
    if entry.family == "I-JEPA":
        assert net.cls_token is None and net.global_pool == "avg"
    if entry.family == "SimMIM":
        shared = entry.arch_kwargs.get("use_shared_rel_pos_bias", False)
        assert (net.rel_pos_bias is not None) == shared
        assert (net.blocks[0].attn.relative_position_bias_table is not None) == (not shared)


def test_fig_s3_data_and_chart_from_an_official_checkpoint(tmp_path):
    checkpoint = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    saved = write_ijepa(checkpoint)
    svds = paper_models.ijepa_encoder_predictor(checkpoint)
    assert list(svds) == ["I-JEPA encoder", "I-JEPA predictor"]
    encoder, predictor = svds.values()
    assert (encoder.dim, predictor.dim) == (192, 96) and encoder.num_layers == predictor.num_layers == 2
    # the predictor's modes come from the predictor's own weights
    wq = saved["predictor"]["module.predictor_blocks.1.attn.qkv.weight"].double()
    wq, wk = wq[:96].reshape(3, 32, 96), wq[96:192].reshape(3, 32, 96)
    assert torch.allclose(predictor.matrix(1, 2), wq[2].T @ wk[2], rtol=1e-10, atol=1e-12)
    spec = charts.fig_s3_encoder_predictor(svds).to_dict()
    assert len(spec["hconcat"]) == 2
    titles = [panel["title"]["text"][0] for panel in spec["hconcat"]]
    assert titles == ["I-JEPA encoder", "I-JEPA predictor"]
    assert paper_models.IJEPA_FILE in paper_models.IJEPA_NEEDS
