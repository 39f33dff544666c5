"""Byte sizes written by people ("200MiB", "1.5 GiB", 1024) and back."""
from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Parse ``value`` as a byte count; raise ValueError with a readable message when it is not one."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 200MiB, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"expected a size such as 200MiB (units B, KiB, MiB, GiB), got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    if number < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return int(round(number * _UNITS[unit]))


def format_bytes(n: int | float | None) -> str:
    """Human-readable binary size: 56.2 MiB."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
