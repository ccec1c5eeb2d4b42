"""Parse the size and address spellings QEMU users type: 1M, 512M, 0x1f000000, 4096."""

from __future__ import annotations

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Accept decimal, 0x-hex, and K/M/G/T suffixes (binary, as QEMU's -m does)."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    if s.startswith("0X"):
        try:
            return int(s, 16)
        except ValueError:
            raise ValueError(f"not a size: {text}") from None
    unit = s[-1:] if s[-1:] in _UNITS else ""
    number = s[: len(s) - len(unit)]
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"not a size: {text} (use e.g. 4096, 0x100000, 1M, 2G)") from None
    if value < 0 or value != int(value):
        raise ValueError(f"not a whole number of bytes: {text}")
    return int(value)
