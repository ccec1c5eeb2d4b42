"""Typed errors for untrusted protocol data.

The host reads the table out of an untrusted guest, so every refusal must say
exactly which field or slot was wrong and what value it held: the message is
what an operator sees in a one-line CLI error or a libvirt hook log.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Base of every error raised while decoding vmwipe wire data."""


class HeaderError(ProtocolError):
    """The region header is present (magic matches) but a field is wrong."""

    def __init__(self, field: str, value: object, expected: object) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"invalid header: {field}={_fmt(value)}, expected {_fmt(expected)}")


class SlotError(ProtocolError):
    """A VALID slot breaks a rule of the spec; the host must not wipe on its word."""

    def __init__(self, index: int, field: str, value: object, reason: str) -> None:
        self.index = index
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid slot {index}: {field}={_fmt(value)} ({reason})")


class SsdtError(ProtocolError):
    """The bytes are not a vmwipe SSDT this decoder understands."""


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, bytes):
        return value.hex() if any(b < 0x20 or b > 0x7E for b in value) else repr(value)
    return str(value)
