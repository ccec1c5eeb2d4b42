"""Bash completion from the argparse definitions: `python -m vmwipe.host_agent.cli.completion FILE`.

shtab writes the script from the real parser, so every command, option and
choice completes as `--help` lists it; this module only says which arguments
are files or directories (shtab cannot know) before handing the parser over.
shtab is a build-time dependency (Debian: python3-shtab); the installed CLI
never imports it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .agent import build_parser
from .manpage import commands

#: Argument destinations that name files, and those that name directories.
FILE_DESTS = {"file", "snapshot", "from_file", "to", "sidecar", "xml", "output", "from_state",
              "ram", "qmp", "apparmor_file", "python", "qemu"}
DIR_DESTS = {"dir", "template", "state_dir", "hooks_dir"}


def annotate(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Mark the file and directory arguments of every command for shtab."""
    import shtab

    for p in [parser, *(sub for _path, _h, sub in commands(parser))]:
        for action in p._actions:
            if action.dest in FILE_DESTS:
                action.complete = shtab.FILE  # type: ignore[attr-defined]
            elif action.dest in DIR_DESTS:
                action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    return parser


def bash_script() -> str:
    import shtab

    return str(shtab.complete(annotate(build_parser()), shell="bash"))


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m vmwipe.host_agent.cli.completion FILE", file=sys.stderr)
        return 2
    out = Path(args[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(bash_script())
    print(f"wrote bash completion to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
