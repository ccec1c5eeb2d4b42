"""Argument types the `vmwipe` subcommands share, so each is parsed one way."""

from __future__ import annotations

import argparse

from vmwipe.protocol import Region

from ..errors import AgentError
from ..qemu.region import parse_region_arg


def region_type(text: str) -> Region:
    """argparse `type=` for `--region BASE:SIZE` (argparse names the option)."""
    try:
        return parse_region_arg(text)
    except AgentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """argparse `type=` for counts that must be at least 1 (`--jobs`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
