"""Read a CTranslate2 ``model.bin`` into tensors, by parsing its bytes (nothing is unpickled or executed).

CTranslate2 (binary format version 6, ``ctranslate2.specs.model_spec.ModelSpec._serialize``) writes, little
endian: ``uint32`` format version, the spec name (``uint16`` length counting a terminating NUL, then the bytes),
``uint32`` spec revision, ``uint32`` variable count; per variable its name (same string format), ``uint8`` rank,
``rank`` x ``uint32`` dims, ``uint8`` dtype (the order of ``ctranslate2::DataType``: 0 float32, 1 int8, 2 int16,
3 int32, 4 float16, 5 bfloat16), ``uint32`` byte count and the raw data; then ``uint32`` alias count and
``(alias, target)`` string pairs. Quantised models (int8 weights with a ``weight_scale``) are read as stored;
callers that need float weights check the dtype.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..loaders.weights import ModelError

__all__ = ["CT2_DTYPES", "Ct2Model", "read_ct2"]

FORMAT_VERSION = 6
CT2_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}


@dataclass(frozen=True)
class Ct2Model:
    """What a ``model.bin`` holds: ``spec`` (e.g. ``WhisperSpec``), its ``revision``, the ``variables`` (name ->
    tensor in its stored dtype) and ``aliases`` (name -> the variable it shares)."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]

    def resolved(self) -> dict[str, torch.Tensor]:
        """Every name, aliases included, to its tensor: CTranslate2 stores a variable equal to an earlier one
        (zero biases, tied LayerNorms) once and names the others as aliases of it."""
        missing = sorted(target for target in self.aliases.values() if target not in self.variables)
        if missing:
            raise ModelError(f"CTranslate2 {self.spec}: aliases point at missing variables {missing[:3]}; the "
                             "model.bin is damaged")
        return {**self.variables, **{alias: self.variables[target] for alias, target in self.aliases.items()}}

    def stored_dtypes(self, prefix: str = "") -> set[torch.dtype]:
        """The dtypes of the floating-point variables whose names start with ``prefix``."""
        return {t.dtype for name, t in self.variables.items() if name.startswith(prefix) and t.is_floating_point()}


class _Cursor:
    """Reads little-endian fields from a byte buffer, with the file's name in every error."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.offset, self.path = data, 0, path

    def take(self, size: int) -> memoryview:
        """The next ``size`` bytes; a ModelError when the file ends first."""
        if self.offset + size > len(self.data):
            raise ModelError(f"{str(self.path)!r} ends at byte {len(self.data)} inside a field that needs byte "
                             f"{self.offset + size}: the file is truncated; copy or reinstall it")
        view = memoryview(self.data)[self.offset:self.offset + size]
        self.offset += size
        return view

    def number(self, fmt: str) -> int:
        """The next little-endian number of ``struct`` format ``fmt`` (``I`` uint32, ``H`` uint16, ``B`` uint8)."""
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        """The next string: uint16 length counting its terminating NUL, then the UTF-8 bytes and the NUL."""
        raw = bytes(self.take(self.number("H")))
        if not raw.endswith(b"\0"):
            raise ModelError(f"{str(self.path)!r}: a name at byte {self.offset} lacks its NUL; not a CTranslate2 file")
        return raw[:-1].decode("utf-8")


def _variable(cursor: _Cursor) -> tuple[str, torch.Tensor]:
    name = cursor.string()
    shape = [cursor.number("I") for _ in range(cursor.number("B"))]
    code = cursor.number("B")
    if code not in CT2_DTYPES:
        raise ModelError(f"{str(cursor.path)!r}: variable {name!r} has dtype code {code}, which qklib does not know "
                         f"(known: {sorted(CT2_DTYPES)}); convert the model again with ctranslate2 in float16 or "
                         "float32")
    dtype = CT2_DTYPES[code]
    size = cursor.number("I")
    expected = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    if size != expected:
        raise ModelError(f"{str(cursor.path)!r}: variable {name!r} of shape {shape} and {dtype} should hold "
                         f"{expected} bytes but says {size}; the file is damaged")
    raw = bytearray(cursor.take(size))  # a writable copy, so the tensor owns its memory
    tensor = torch.frombuffer(raw, dtype=dtype) if size else torch.empty(0, dtype=dtype)
    return name, tensor.reshape(shape)


def read_ct2(path: str | Path) -> Ct2Model:
    """Every variable of a CTranslate2 ``model.bin`` (a file, or the folder holding it) as torch tensors."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise ModelError(f"{str(path)!r} does not exist; pass a CTranslate2 model folder (model.bin, config.json)")
    cursor = _Cursor(path.read_bytes(), path)
    version = cursor.number("I")
    if version != FORMAT_VERSION:
        raise ModelError(f"{str(path)!r}: binary format version {version}; qklib reads CTranslate2's version "
                         f"{FORMAT_VERSION} (ctranslate2 >= 3); convert the model again with a current ctranslate2")
    spec, revision = cursor.string(), cursor.number("I")
    variables = dict(_variable(cursor) for _ in range(cursor.number("I")))
    aliases = {}
    for _ in range(cursor.number("I")):
        alias = cursor.string()
        aliases[alias] = cursor.string()
    if cursor.offset != len(cursor.data):
        raise ModelError(f"{str(path)!r}: {len(cursor.data) - cursor.offset} bytes after the last alias; "
                         "not a CTranslate2 model.bin of format version 6")
    return Ct2Model(spec, revision, variables, aliases)
