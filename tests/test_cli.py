"""The command line: --help lists every command, the embedded model is every command's default, messages
use CLI syntax, checkpoint flags, a closed pipe ends quietly."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import qklib
from qklib import cli, search

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^  ([a-z][a-z-]+) +(\S.*)$", text, re.M)}
    documented = set(re.findall(r"python -m qklib ([a-z][a-z-]+)", (ROOT / "README.md").read_text()))
    assert documented and documented <= set(lines), (documented, text)
    assert set(lines) == set(cli.COMMANDS) == {"models", "cosine", "convert", "search", "search-merge"}
    for name in lines:  # each command parses (its own --help works)
        with pytest.raises(SystemExit) as done:
            cli.main([name, "--help"])
        assert done.value.code == 0
        assert f"usage: python -m qklib {name}" in capsys.readouterr().out


def test_cosine_defaults_to_the_embedded_model(capsys):
    code, out, _ = run(capsys, "cosine", "--json")
    assert code == 0 and json.loads(out)["model"] == qklib.DEFAULT_MODEL
    code, again, _ = run(capsys, "cosine", "--model", qklib.DEFAULT_MODEL, "--json")
    assert code == 0 and json.loads(again) == json.loads(out)
    code, _, err = run(capsys, "cosine", "vit_tiny_patch16_224", "--model", qklib.DEFAULT_MODEL)
    assert code == 2 and "two models given" in err


def test_messages_use_cli_syntax(capsys, tmp_path):
    assert cli.cli_syntax("pass weights='path/to/model.safetensors'") == "pass --weights path/to/model.safetensors"
    assert cli.cli_syntax("or allow_partial=True merges; continue with resume=True") == \
        "or --allow-partial merges; continue with --resume"
    # offline (conftest sets HF_HUB_OFFLINE=1) a pretrained tag fails with load_model's advice, in CLI syntax
    code, out, err = run(capsys, "cosine", "vit_tiny_patch16_224.augreg_in21k")
    assert code == 2 and out == "" and err.startswith("error: could not get pretrained weights")
    assert "--weights path/to/model.safetensors" in err and "weights='" not in err and "random_control" not in err
    assert "use random:vit_tiny_patch16_224.augreg_in21k" in err  # the one model spelling every command takes
    Image.new("RGB", (16, 16)).save(tmp_path / "one.png")
    code, _, err = run(capsys, "search", tmp_path, "--layers", "99", "--no-progress", "--out", tmp_path / "x.npz")
    assert code == 2 and err.startswith("error: layers [99] out of range") and not (tmp_path / "x.npz").exists()


@pytest.fixture(scope="module")
def tiny_cli(tmp_path_factory):
    """A random-init vit_tiny_patch16_224 weights file and 9 small images: a fast model for the CLI."""
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(5)
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224").state_dict().items()}, str(weights))
    rng = np.random.default_rng(5)
    (folder / "images").mkdir()
    for i in range(9):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(folder / "images" / f"{i}.png")
    return folder, ["--model", "vit_tiny_patch16_224", "--weights", str(weights), "--layers", "0", "--modes", "0-3",
                    "-k", "2", "--batch-size", "2", "--no-progress"]


def test_search_checkpoint_flags(tiny_cli, capsys):
    folder, common = tiny_cli
    out = folder / "run"
    checkpoint = out / "search.npz.checkpoint"
    checkpoint.parent.mkdir()
    # a stale checkpoint of another run (k=3): refused, naming the input, and never overwritten
    code, _, _ = run(capsys, "search", folder / "images", "--out", folder / "other.npz", *common, "-k", "3",
                     "--checkpoint", checkpoint, "--checkpoint-every", "2", "--limit", "1")
    assert code == 0 and not checkpoint.exists()  # a finished run removes its checkpoint
    state = search.Checkpoint(checkpoint, every=2)
    state.begin({"k": 3}, ["x"], [0], resume=False)
    state.save(search.RunningTopK(1, 3), 0, [])
    code, out_text, err = run(capsys, "search", folder / "images", "--out", out, *common)
    assert code == 2 and "a checkpoint of an interrupted search exists" in err and "--resume" in err
    code, _, err = run(capsys, "search", folder / "images", "--out", out, *common, "--resume")
    assert code == 2 and "belongs to another search: its model differs" in err
    checkpoint.unlink()
    code, out_text, err = run(capsys, "search", folder / "images", "--out", out, *common, "--resume")
    assert code == 0 and "no checkpoint at" in err and f"saved {out / 'search.npz'}" in out_text
    assert search.load_result(out / "search.npz").n_images == 9 and not checkpoint.exists()
    code, _, err = run(capsys, "search", folder / "images", "--out", out, *common, "--checkpoint-every", "-1")
    assert code == 2 and "--checkpoint-every" in err


def test_closed_pipe_ends_quietly():
    """`python -m qklib cosine | head -1`, made deterministic: the reader is gone before qklib writes."""
    process = subprocess.Popen([sys.executable, "-m", "qklib", "cosine"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    err = process.stderr.read()
    process.wait(timeout=300)
    process.stderr.close()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert process.returncode == 141
