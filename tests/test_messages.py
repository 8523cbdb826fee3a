"""Every message written once, in Python spelling; the command line reads it in its own (qklib.core.messages)."""

import pytest

import qklib
from qklib.core.messages import cli_syntax
from qklib.core.models import ModelError


@pytest.mark.parametrize("python, command_line", [
    ("it takes no weights= or part=", "it takes no --weights or --part"),
    ("pass either hf:ORG/NAME or weights=, not both", "pass either hf:ORG/NAME or --weights, not both"),
    ("part= selects a network; pass weights='the.pth.tar'", "--part selects a network; pass --weights the.pth.tar"),
    ("give its timm name (e.g. load_model('vit_base_patch16_224', weights='/w/x.pt'))",
     "give its timm name (e.g. python -m qklib cosine vit_base_patch16_224 --weights /w/x.pt)"),
    ("leave the name out (load_model(weights='/w/x.pt'))", "leave the name out (--weights /w/x.pt alone)"),
    ("use load_model('random:vit_tiny_patch16_224')", "use random:vit_tiny_patch16_224"),
    ("'x' is a model name; name= is for a weights file", "'x' is a model name; --model is for a weights file"),
    ("pass the model folder as weights=FOLDER", "pass the model folder as --weights FOLDER"),
    ("use the encoder (part='encoder')", "use the encoder (--part encoder)"),
    ("the layer's name and its weights are kept", "the layer's name and its weights are kept"),  # prose untouched
])
def test_python_spellings_become_command_line_ones(python, command_line):
    assert cli_syntax(python) == command_line


def test_a_model_error_carries_one_message_and_its_command_line_reading():
    with pytest.raises(ModelError) as caught:
        qklib.load_model("random:vit_tiny_patch16_224", weights="x.safetensors")
    assert "weights= or part=" in str(caught.value) and "--weights or --part" in caught.value.cli
    with pytest.raises(TypeError):
        ModelError("message", cli="a second spelling")  # there is no second spelling to write
