"""The shape of host_agent/: import layers, no loops, one exit-code table.

The import check reads the source with `ast` (nothing is imported), so it sees
lazy imports inside functions too.  It is exercised on small synthetic trees
first, to show it does fail on an upward import, on qemu/ <-> wipe/ and on a loop.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from vmwipe.host_agent.cli import build_parser
from vmwipe.host_agent.errors import (
    EXIT_CODES,
    AgentError,
    exit_code_help,
    exit_code_table,
)

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "host_agent"
PKG = "vmwipe.host_agent"

#: Layer of each top-level name in host_agent/.  A module may import its own
#: subpackage and lower layers only; two different names on one layer may not
#: import each other (that is what keeps qemu/ and wipe/ apart).
LAYERS = {
    "__init__": 0, "errors": 0, "atomic": 0, "timing": 0, "progress": 0,
    "qemu": 1, "wipe": 1, "private": 1,
    "snapshot": 2,
    "flows": 3,
    "libvirt": 4,
    "cli": 5,
    "libvirt_hook": 6,  # compatibility path for installed hooks: may import anything
}


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join([PKG, *parts])


def _imports(root: Path, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `path` imports, anywhere in the file."""
    mod = _module_name(root, path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(PKG + "."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == PKG or target.startswith(PKG + ".")):
                continue
            for a in node.names:  # `from . import x` names a module when there is one
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known else target)
    out.discard(mod)
    return out


def _group(mod: str) -> str:
    rest = mod[len(PKG) + 1:] if mod != PKG else "__init__"
    return rest.split(".")[0]


def layering_problems(root: Path) -> list[str]:
    """Every upward or sideways import and every import loop under `root` (a host_agent)."""
    files = sorted(root.rglob("*.py"))
    known = {_module_name(root, f) for f in files}
    graph = {_module_name(root, f): _imports(root, f, known) for f in files}
    problems = []
    for mod, deps in graph.items():
        g = _group(mod)
        for dep in sorted(deps):
            d = _group(dep)
            if d == g or (d == "__init__" and dep == PKG and g == "__init__"):
                continue
            if d not in LAYERS or g not in LAYERS:
                problems.append(f"{mod} -> {dep}: {d if d not in LAYERS else g} has no layer")
            elif LAYERS[d] >= LAYERS[g]:
                problems.append(f"{mod} -> {dep}: {g} (layer {LAYERS[g]}) may not import "
                                f"{d} (layer {LAYERS[d]})")
    # loops, module by module (a subpackage's __init__ importing its modules is fine:
    # the modules then must not import the __init__ back)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                loop = [*stack[stack.index(dep):], dep]
                problems.append("import loop: " + " -> ".join(loop))
            elif dep in graph and dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return problems


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "host_agent"
    for name, text in {"__init__.py": "", **files}.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_layering_check_accepts_a_clean_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "errors.py": "",
        "qemu/__init__.py": "", "qemu/qmp.py": "from ..errors import x\n",
        "wipe/__init__.py": "", "wipe/engine.py": "from .memmap import y\n",
        "wipe/memmap.py": "from .. import errors\n",
        "flows/__init__.py": "",
        "flows/live.py": "from ..qemu.qmp import a\nfrom ..wipe import engine\n",
    })
    assert layering_problems(root) == []


@pytest.mark.parametrize(("files", "expected"), [
    ({"qemu/__init__.py": "", "qemu/qmp.py": "def f():\n    from ..flows.live import g\n",
      "flows/__init__.py": "", "flows/live.py": ""}, "qemu (layer 1) may not import flows"),
    ({"qemu/__init__.py": "", "qemu/qmp.py": "from ..wipe.memmap import m\n",
      "wipe/__init__.py": "", "wipe/memmap.py": ""}, "qemu (layer 1) may not import wipe"),
    ({"wipe/__init__.py": "", "wipe/engine.py": "import vmwipe.host_agent.qemu.qmp\n",
      "qemu/__init__.py": "", "qemu/qmp.py": ""}, "wipe (layer 1) may not import qemu"),
    ({"snapshot/__init__.py": "", "snapshot/migstream.py": "from .saveimage import p\n",
      "snapshot/saveimage.py": "def f():\n    from .migstream import q\n"}, "import loop"),
    ({"errors.py": "from .cli import main\n", "cli/__init__.py": ""},
     "errors (layer 0) may not import cli"),
    ({"mystery/__init__.py": "", "cli/__init__.py": "from ..mystery import z\n"}, "no layer"),
])
def test_layering_check_fails_on_a_bad_tree(tmp_path: Path, files: dict[str, str],
                                            expected: str) -> None:
    problems = layering_problems(_tree(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_host_agent_imports_run_down_the_layers_without_loops() -> None:
    assert layering_problems(AGENT) == []


def test_every_top_level_name_has_a_layer() -> None:
    names = {p.stem if p.is_file() else p.name for p in AGENT.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert names <= set(LAYERS), names - set(LAYERS)


def test_protocol_names_come_from_the_facade() -> None:
    """`vmwipe.protocol` is the one public face of the wire format."""
    bad = []
    for f in sorted(AGENT.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "vmwipe.protocol."):
                bad.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.module}")
    assert bad == []


# --- exit codes ---------------------------------------------------------------------


def _subclasses(cls: type[AgentError]) -> list[type[AgentError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


def test_one_code_one_meaning() -> None:
    owners: dict[int, list[str]] = {}
    for cls in _subclasses(AgentError):
        if "exit_code" in vars(cls):
            owners.setdefault(cls.exit_code, []).append(cls.__name__)
        else:  # a refinement keeps its parent's code and meaning
            assert "meaning" not in vars(cls), cls
    assert all(len(v) == 1 for v in owners.values()), owners
    assert set(EXIT_CODES) == {0, *owners}
    assert EXIT_CODES[14].startswith("libvirt") and EXIT_CODES[11].startswith("scrub")


@pytest.mark.parametrize("doc", ["README.md", "SECURITY.md"])
def test_docs_carry_the_exit_code_table(doc: str) -> None:
    text = (ROOT / doc).read_text()
    m = re.search(r"<!-- exit-codes[^>]*-->\n(.*?)<!-- /exit-codes -->", text, re.S)
    assert m, f"{doc} has no exit-codes block"
    assert m.group(1) == exit_code_table()
    # every "exit N" / "exits N" in the prose names a code with that meaning's number
    for n in re.findall(r"\bexits? (\d+)\b", text):
        assert int(n) in EXIT_CODES, f"{doc} mentions exit {n}, which is not in the table"


def test_help_prints_the_table() -> None:
    help_text = build_parser().format_help()
    assert exit_code_help() in help_text
    for code, meaning in EXIT_CODES.items():
        assert f"{code:3d}  {meaning}" in help_text


# --- old import paths that live on outside this repository ----------------------------


def test_hooks_installed_before_the_layout_still_import(tmp_path: Path) -> None:
    """An installed hook runs `from vmwipe.host_agent.libvirt_hook import main`."""
    import subprocess
    import sys

    from vmwipe.host_agent.libvirt import hook
    from vmwipe.host_agent.libvirt.install import hook_script
    from vmwipe.host_agent.libvirt_hook import main

    assert main is hook.main
    new = hook_script(tmp_path / "qemu.vmwipe-chained")
    assert "from vmwipe.host_agent.libvirt.hook import main" in new
    old = new.replace("vmwipe.host_agent.libvirt.hook", "vmwipe.host_agent.libvirt_hook")
    script = tmp_path / "qemu"
    script.write_text(old)
    # XML that names the vmwipe URN: had the import failed, the script's fallback would
    # refuse it ("cannot load the agent", exit 1); the agent itself finds no
    # <vmwipe:protect> element in it and lets it run (exit 0)
    r = subprocess.run([sys.executable, str(script), "dom", "started", "begin", "-"],
                       input=b"<domain><description>urn:vmwipe:libvirt:1</description></domain>",
                       capture_output=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b""), r.stderr
    broken = old.replace("vmwipe.host_agent.libvirt_hook", "vmwipe.host_agent.no_such_module")
    script.write_text(broken)
    r = subprocess.run([sys.executable, str(script), "dom", "started", "begin", "-"],
                       input=b"<domain><description>urn:vmwipe:libvirt:1</description></domain>",
                       capture_output=True, timeout=60)
    assert r.returncode == 1 and b"cannot load the agent" in r.stderr


def test_console_script_and_module_entry_points() -> None:
    import subprocess
    import sys
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vmwipe"] == "vmwipe.host_agent.cli:main"
    from vmwipe.host_agent import cli

    assert callable(cli.main)
    r = subprocess.run([sys.executable, "-m", "vmwipe.host_agent.cli", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and exit_code_help() in r.stdout
