"""Every `vmwipe` command line in the README's shell blocks (and in the docs it links to)
parses with the real parser.

A user copies these lines; an option renamed or a value the parser refuses must fail
here, not on their host.  Each line is split as the shell would (comments, quotes,
`\\` continuations), the `vmwipe` invocation is found (also after `sudo`, `env` or a
pipe), and its arguments go through `build_parser().parse_args` with nothing run.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from vmwipe.host_agent.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SHELL_BLOCK = re.compile(r"^```(?:sh|shell|bash|console)\n(.*?)^```", re.M | re.S)
SEPARATORS = {"|", "||", "&&", ";", "&"}


def shell_lines(markdown: str) -> list[str]:
    """The logical lines of every sh/shell/bash/console block, continuations joined."""
    out = []
    for block in SHELL_BLOCK.findall(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ").removeprefix("# ")
            if line:
                out.append(line)
    return out


def vmwipe_invocations(line: str) -> list[list[str]]:
    """The argument lists of the `vmwipe` commands on one shell line."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        if "vmwipe" in line:
            raise  # a command users would copy does not even split: say so
        return []
    calls: list[list[str]] = []
    cmd: list[str] = []
    for w in [*words, ";"]:
        if w in SEPARATORS:
            if cmd:
                calls.append(cmd)
            cmd = []
        else:
            cmd.append(w)
    found = []
    for c in calls:
        while c and (c[0] in ("sudo", "env", "time") or "=" in c[0]):
            c = c[1:]
        if c and Path(c[0]).name == "vmwipe":
            found.append(c[1:])
    return found


def parse(argv: list[str]) -> str | None:
    """None if argparse accepts `argv` as `vmwipe` would see it, else its error."""
    if "--" in argv and next((a for a in argv if not a.startswith("-")), "") in (
            "clone", "template"):
        argv = argv[:argv.index("--")]  # QEMU's arguments: main() hands them over unparsed
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip() or f"exit {e.code}"
    return None


README_CALLS = [argv for line in shell_lines((ROOT / "README.md").read_text())
                for argv in vmwipe_invocations(line)]
#: The pages the README sends users to, held to the same rule.
DOCS = [ROOT / "examples" / "libvirt-walkthrough" / "README.md", *sorted(ROOT.glob("docs/*.md"))]
DOC_CALLS = [(doc.relative_to(ROOT).as_posix(), argv) for doc in DOCS
             for line in shell_lines(doc.read_text()) for argv in vmwipe_invocations(line)]


def test_the_readme_shows_the_commands() -> None:
    commands = {a[0] for a in README_CALLS if a}
    assert len(README_CALLS) >= 10, README_CALLS
    assert {"save", "restore", "clone", "template", "qemu-args", "libvirt"} <= commands


@pytest.mark.parametrize("argv", README_CALLS, ids=lambda a: " ".join(a)[:60])
def test_readme_command_line_parses(argv: list[str]) -> None:
    assert parse(argv) is None, f"vmwipe {shlex.join(argv)}: {parse(argv)}"


@pytest.mark.parametrize(("doc", "argv"), DOC_CALLS,
                         ids=lambda x: " ".join(x)[:60] if isinstance(x, list) else x)
def test_docs_command_line_parses(doc: str, argv: list[str]) -> None:
    assert parse(argv) is None, f"{doc}: vmwipe {shlex.join(argv)}: {parse(argv)}"


def test_the_check_catches_a_bad_line() -> None:
    """The check itself: a removed option, a bad value and a missing argument all fail."""
    text = ("```sh\nsudo vmwipe restore --qmp q --from f --no-such-flag   # comment\n"
            "vmwipe qemu-args --mem lots\nvmwipe libvirt protect\n"
            "vmwipe clone s -n 2 -- qemu-system-x86_64 -m 512 --whatever\n```\n")
    calls = [a for line in shell_lines(text) for a in vmwipe_invocations(line)]
    assert [parse(a) is None for a in calls] == [False, False, False, True]
