"""A Hugging Face hub cache written on disk by the tests, so that ``hf:`` names load without any network."""

from pathlib import Path


def fake_hf_cache(cache: Path, repo: str, source: Path) -> None:
    """The hub cache layout: models--ORG--NAME/refs/main names a snapshot folder holding the files of ``source``."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(revision)
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
