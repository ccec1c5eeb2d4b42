"""Man pages and bash completion, both generated from the argparse definitions (issue 24).

The pages are rendered by groff with every warning on; the completion script is sourced
by a real bash and asked to complete, as a user's Tab would.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmwipe.host_agent.cli import build_parser
from vmwipe.host_agent.cli.manpage import commands, pages
from vmwipe.host_agent.errors import EXIT_CODES


def _visible_options(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions if a.help != argparse.SUPPRESS
            for s in a.option_strings]


def test_one_page_per_command_with_every_option() -> None:
    parser = build_parser()
    got = pages(parser)
    expected = {"vmwipe.1"} | {"vmwipe-" + "-".join(p) + ".1" for p, _h, _s in
                               commands(parser)}
    assert set(got) == expected
    assert {"vmwipe-clone.1", "vmwipe-libvirt-status.1", "vmwipe-ssdt.1"} <= set(got)
    for path, _h, sub in commands(parser):
        text = got["vmwipe-" + "-".join(path) + ".1"]
        for opt in _visible_options(sub):
            bold = [line for line in text.splitlines() if line.startswith("\\fB")]
            assert any(opt.replace("-", "\\-") in line for line in bold), (path, opt)
        assert "--no-resume".replace("-", "\\-") not in text  # hidden spellings stay hidden
    top = got["vmwipe.1"]
    for code in EXIT_CODES:
        assert f".B {code}\n" in top
    assert ".BR vmwipe\\-clone (1)" in top and "virsh" in top


def test_pages_are_reproducible(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pages() == pages()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1765065600")
    assert '"2025-12-07"' in pages()["vmwipe.1"].splitlines()[0]


@pytest.mark.skipif(not shutil.which("groff"), reason="groff not installed")
def test_pages_render_without_warnings(tmp_path: Path) -> None:
    """`make man` writes build/man; groff -ww reports every roff mistake."""
    run = subprocess.run([sys.executable, "-m", "vmwipe.host_agent.cli.manpage", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    files = sorted(tmp_path.glob("*.1"))
    assert len(files) == len(pages())
    for f in files:
        r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(f)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stderr == "", (f.name, r.stderr)
    out = subprocess.run(["groff", "-man", "-Tutf8", str(tmp_path / "vmwipe-clone.1")],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "GROFF_NO_SGR": "1"}).stdout
    assert "once every clone is wiped and verified" in " ".join(out.split())


def _complete(script: Path, *words: str) -> list[str]:
    """What Tab offers after `words` (the last one being typed), from the real script."""
    arr = " ".join(f"'{w}'" for w in words)
    code = (f"source {script}; COMP_WORDS=({arr}); COMP_CWORD={len(words) - 1}; "
            f"COMP_LINE='{' '.join(words)}'; COMP_POINT=${{#COMP_LINE}}; "
            "_shtab_vmwipe; printf '%s\\n' \"${COMPREPLY[@]}\"")
    run = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_bash_completion_completes_commands_options_and_files(tmp_path: Path) -> None:
    pytest.importorskip("shtab")
    script = tmp_path / "completion" / "vmwipe"
    run = subprocess.run([sys.executable, "-m", "vmwipe.host_agent.cli.completion",
                          str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert _complete(script, "vmwipe", "cl") == ["clone"]
    assert set(_complete(script, "vmwipe", "libvirt", "st")) == {"start", "status"}
    assert _complete(script, "vmwipe", "clone", "--pa") == ["--paused"]
    assert set(_complete(script, "vmwipe", "scrub", "--on-invalid", "")) == {"fail", "skip"}
    (tmp_path / "vm.state").write_bytes(b"")
    os.chdir(tmp_path)
    assert "vm.state" in _complete(script, "vmwipe", "scrub", "vm")
