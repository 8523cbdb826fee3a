"""Which layers, heads, modes and shard a search covers: parsing of user input (0-based indices)."""

from __future__ import annotations

from collections.abc import Sequence


def parse_indices(spec, count: int, what: str) -> list[int]:
    """``None``/``"all"`` -> all; ``"0,3,5"``, ``"2-5"``, an int or a list -> sorted unique 0-based indices."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(count))
    items: list[int] = []
    if isinstance(spec, int) and not isinstance(spec, bool):
        items = [spec]
    elif isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    low, high = part.split("-", 1) if not part.startswith("-") else (part, "")
                    items.extend(range(int(low), int(high) + 1))
                else:
                    items.append(int(part))
            except ValueError:
                raise ValueError(f"{what}: cannot read {part!r} in {spec!r}; use e.g. '0,3,5', '2-5' or 'all'") from None
    elif isinstance(spec, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        items = list(spec)
    else:
        raise ValueError(f"{what}: expected 'all', a list of integers or a string like '0,3-5', got {spec!r}")
    bad = sorted({i for i in items if not 0 <= i < count})
    if bad:
        raise ValueError(f"{what} {bad} out of range: valid {what} are 0..{count - 1} (0-based)")
    if not items:
        raise ValueError(f"{what}: {spec!r} selects nothing")
    return sorted(set(items))


def parse_shard(spec) -> tuple[int, int] | None:
    """``"i/n"`` (0-based i < n) or ``(i, n)`` -> ``(i, n)``; None stays None."""
    if spec is None or spec == "":
        return None
    try:
        if isinstance(spec, str):
            i_text, n_text = spec.split("/")
            index, count = int(i_text), int(n_text)
        else:
            index, count = (int(v) for v in spec)
    except (ValueError, TypeError):
        raise ValueError(f"shard {spec!r}: write it as 'i/n' with 0 <= i < n, e.g. '0/4' ... '3/4'") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {spec!r}: need 0 <= i < n (shards are 0-based: '0/{max(count, 1)}' is the first)")
    return index, count
