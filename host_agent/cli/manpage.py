"""Man pages from the argparse definitions: `python -m vmwipe.host_agent.cli.manpage DIR`.

One page per command, as git and virsh users expect (`man vmwipe-clone`), plus
`vmwipe(1)` with the command list, the resume rule and the exit codes.  Every
option, its help and its default come from the parser itself (argparse's own
formatter spells the invocations and expands `%(default)s`), so a page cannot
drift from `--help`.  Needs nothing beyond the standard library, so a package
build can run it; output is byte-for-byte reproducible (the date is
SOURCE_DATE_EPOCH's, or none).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import EXIT_CODES
from .agent import build_parser, version


def _esc(text: str) -> str:
    """Text for roff: backslashes and hyphens escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line[:1] in ".'" else line
                     for line in text.splitlines())


def _paragraphs(text: str) -> str:
    """Description text: argparse's raw paragraphs (blank-line separated) as .PP blocks."""
    paras = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return "\n.PP\n".join(_esc(p) for p in paras)


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse._SubParsersAction[
        argparse.ArgumentParser]]:
    yield from (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """(path, one-line help, parser) of every command and command group below `parser`."""
    for action in _subparsers(parser):
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        for name, sub in action.choices.items():
            yield (*path, name), helps.get(name, ""), sub
            yield from commands(sub, (*path, name))


def _options(parser: argparse.ArgumentParser) -> str:
    """The OPTIONS section: each argument's invocation in bold, its help below."""
    fmt = parser._get_formatter()
    out = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        invocation = fmt._format_action_invocation(action)
        helptext = fmt._expand_help(action) if action.help else ""
        out.append(f".TP\n\\fB{_esc(invocation)}\\fR\n{_esc(' '.join(helptext.split()))}")
    return "\n".join(out)


def _exit_status() -> str:
    return "\n".join(f".TP\n.B {code}\n{_esc(meaning)}" for code, meaning in EXIT_CODES.items())


def _header(title: str, date: str) -> str:
    return (f'.TH {title.upper()} 1 "{date}" "vmwipe {_esc(version())}" "vmwipe manual"\n'
            ".\\\" generated from the argparse definitions by vmwipe.host_agent.cli.manpage")


def _usage(parser: argparse.ArgumentParser) -> str:
    usage = parser.format_usage().removeprefix("usage: ").strip()
    return ".nf\n" + _esc(" ".join(usage.split())) + "\n.fi"


def _date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return ""
    return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).strftime("%Y-%m-%d")


def pages(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """File name -> roff text for `vmwipe.1` and one `vmwipe-CMD.1` per command."""
    parser = parser or build_parser()
    date = _date()
    cmds = list(commands(parser))
    names = {path: "vmwipe-" + "-".join(path) for path, _h, _p in cmds}
    out: dict[str, str] = {}
    for path, helptext, sub in cmds:
        name = names[path]
        children = [p for p in names if p[:-1] == path]
        body = [
            _header(name, date),
            ".SH NAME", f"{_esc(name)} \\- {_esc(helptext)}",
            ".SH SYNOPSIS", _usage(sub),
        ]
        if sub.description:
            body += [".SH DESCRIPTION", _paragraphs(sub.description)]
        if children:
            body += [".SH COMMANDS"] + [f".TP\n.BR {_esc(names[c])} (1)\n{_esc(h)}"
                                         for c, h, _p in cmds if c in children]
        body += [".SH OPTIONS", _options(sub)]
        if sub.epilog and not sub.epilog.startswith("exit codes:"):
            body += [".SH NOTES", _paragraphs(sub.epilog)]
        body += [".SH EXIT STATUS", _exit_status(),
                 ".SH SEE ALSO", ".BR vmwipe (1)"]
        out[f"{name}.1"] = "\n".join(body) + "\n"
    top = [
        _header("vmwipe", date),
        ".SH NAME", "vmwipe \\- wipe guest secrets before a restored or cloned VM runs",
        ".SH SYNOPSIS", _usage(parser),
        ".SH DESCRIPTION", _paragraphs(parser.description or ""),
        ".SH COMMANDS",
        *(f".TP\n.BR {_esc(names[p])} (1)\n{_esc(h)}" for p, h, _s in cmds),
        ".SH OPTIONS", _options(parser),
        ".SH EXIT STATUS", _exit_status(),
        ".SH SEE ALSO",
        ",\n".join(f".BR {_esc(names[p])} (1)" for p, _h, _s in cmds) + ",\n.BR virsh (1),\n"
        ".BR qemu-img (1)",
    ]
    out["vmwipe.1"] = "\n".join(top) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m vmwipe.host_agent.cli.manpage OUTDIR", file=sys.stderr)
        return 2
    outdir = Path(args[0])
    outdir.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(pages().items()):
        (outdir / name).write_text(text)
    print(f"wrote {len(pages())} man pages to {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
