"""Sizes as people write them, read in one place: token counts in powers of 1000 (`500k`, `2.5B`) and context lengths
in powers of 1024 (`4k` = 4096, `1m`), or as a multiple of a reference length (`2x` the training length); memory in
bytes with binary units (`512MB`, `4GB`, `4GiB`)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMbBxX]?)\s*")


def parse_size(value: object, base: int, relative_to: int | None = None) -> int:
    """A positive whole number from an int or a string with an optional suffix: k, m, b = base, base^2, base^3;
    x = times `relative_to` (only where given; rounded down). ValueError with a short reason otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = _SIZE.fullmatch(value) if isinstance(value, str) else None
        suffix = match.group(2).lower() if match else ""
        if match is None or (suffix == "x" and relative_to is None):
            raise ValueError(f"cannot read {value!r}")
        amount = float(match.group(1))
        if suffix == "x":
            number = int(amount * relative_to)
        else:
            scaled = amount * base ** " kmb".index(suffix or " ")
            if scaled != int(scaled):
                raise ValueError(f"{value!r} is not a whole number")
            number = int(scaled)
    if number < 1:
        raise ValueError(f"{value!r} is not positive")
    return number


_BYTES = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*")


def parse_bytes(value: object) -> int:
    """Bytes from an int or a string such as `4GB`, `4GiB`, `512m` (k, m, g, t = powers of 1024). ValueError with a
    short reason otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = _BYTES.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise ValueError(f"cannot read {value!r} as a memory size (e.g. 512MB, 4GB)")
        number = int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " "))
    if number < 1:
        raise ValueError(f"{value!r} is not positive")
    return number
