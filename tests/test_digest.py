"""One digest of each input, wherever it is recorded (qklib.core.digest)."""

import hashlib
import os

from qklib.book import chapter
from qklib.core import digest
from qklib.search import checkpoint


def test_chapters_searches_and_the_builder_record_one_listing_format(tmp_path):
    (tmp_path / "a.png").write_bytes(b"12345")
    (tmp_path / "b.png").write_bytes(b"1")
    os.utime(tmp_path / "a.png", ns=(1, 1_000_000_000))
    expected = hashlib.sha256(b"a.png\t5\t1000000000\nb.png\t1\t" + str((tmp_path / "b.png").stat().st_mtime_ns).encode())
    assert digest.listing_digest(tmp_path, ["a.png", "b.png"]) == expected.hexdigest()
    assert digest.listing_digest(None, ["a.png", "b.png"]) == hashlib.sha256(b"a.png\nb.png").hexdigest()
    for name in ("listing_digest", "modes_digest", "weights_digest"):
        assert getattr(checkpoint, name) is getattr(digest, name)
    for name in ("listing_digest", "modes_digest", "file_digest"):
        assert getattr(chapter, name) is getattr(digest, name)
    assert digest.file_digest(tmp_path / "a.png") == hashlib.sha256(b"12345").hexdigest() and digest.file_digest(None) == ""
