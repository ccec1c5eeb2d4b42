"""Man pages and bash completion for the vmwipe package, from the argparse definitions.

    PYTHONPATH=<installed tree> python3 debian/gen-cli-docs.py MANDIR COMPLETION_FILE

The generators are the project's own (`vmwipe.host_agent.cli.manpage` writes
vmwipe.1 and one page per subcommand, `vmwipe.host_agent.cli.completion` the bash
script, with shtab).  Until those modules exist in the tree being packaged, the
same definitions go through Debian's argparse-manpage (one page) and shtab.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _run(*argv: str) -> None:
    subprocess.run([sys.executable, *argv], check=True)


def main() -> int:
    mandir, completion = Path(sys.argv[1]), Path(sys.argv[2])
    mandir.mkdir(parents=True, exist_ok=True)
    completion.parent.mkdir(parents=True, exist_ok=True)
    if _have("vmwipe.host_agent.cli.manpage"):
        _run("-m", "vmwipe.host_agent.cli.manpage", str(mandir))
    else:
        from build_manpages.cli import main as argparse_manpage

        sys.argv = ["argparse-manpage", "--module", "vmwipe.host_agent.cli",
                    "--function", "build_parser", "--project-name", "vmwipe",
                    "--output", str(mandir / "vmwipe.1")]
        argparse_manpage()
    if _have("vmwipe.host_agent.cli.completion"):
        _run("-m", "vmwipe.host_agent.cli.completion", str(completion))
    else:
        script = subprocess.run([sys.executable, "-m", "shtab", "--shell=bash",
                                 "--prog", "vmwipe", "vmwipe.host_agent.cli.build_parser"],
                                check=True, capture_output=True, text=True).stdout
        completion.write_text(script)
    if not list(mandir.glob("*.1")) or not completion.read_text().strip():
        print("gen-cli-docs: no man page or completion was written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
