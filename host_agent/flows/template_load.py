"""`vmwipe template --from STATE`: a template from an existing saved state.

The state is loaded into a new, never-running template QEMU whose RAM is a
`share=on` file created for it (the template RAM file), then handed to
`make_template`.  The load itself goes through `restore_flow` without `cont`,
so the listed pages are zeroed as soon as the load completes, while QEMU is
paused; `make_template` then zeroes, verifies them in the file and commits again.
The secrets sit in the file only between the end of the load and that first
wipe (milliseconds, paused).  On any failure the QEMU is killed and the RAM
file, which may still hold them, is deleted.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence

from ..errors import TemplateError
from ..private import private_dir
from ..qemu.launcher import start_qemu
from ..qemu.opts import escape, valid_id
from ..qemu.qmp import QMPSession
from ..qemu.region import option_values
from ..snapshot.sidecar import read_sidecar, sidecar_path
from .live import restore_flow
from .report import FlowReport
from .target import AgentOptions
from .template import make_template
from .template_manifest import Manifest

#: The RAM block of a pc or q35 machine without -machine memory-backend.  The template
#: backend must carry the block name the stream uses, or the load fails ("Unknown
#: ramblock"), so the backend's id is that name.
DEFAULT_BLOCK = "pc.ram"
_UNITS = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}


def ram_size(argv: Sequence[str]) -> int:
    """Bytes of `-m` (`512M`, `2G`, `size=512M,slots=...`; a bare number is MiB)."""
    values = option_values(argv, "m")
    if len(values) != 1:
        raise TemplateError("give the template QEMU exactly one -m SIZE")
    first = values[0].split(",", 1)[0].removeprefix("size=")
    m = re.fullmatch(r"(\d+)([KMGT]?)[Bb]?", first.upper())
    if not m:
        raise TemplateError(f"cannot read -m {values[0]!r}")
    return int(m[1]) << _UNITS[m[2]]


def stream_block(state: str) -> str:
    """The RAM block the saved state's guest RAM is in: from `vmwipe save`'s sidecar, else
    the default one.  A state whose RAM spans several blocks cannot be one template file."""
    side = sidecar_path(state)
    if not side.exists():
        return DEFAULT_BLOCK
    blocks = {r.block for r in read_sidecar(side).ram}
    if len(blocks) != 1:
        raise TemplateError(f"{state}: guest RAM is in {len(blocks)} RAM blocks "
                            f"({', '.join(sorted(blocks))}); a template holds one")
    block = blocks.pop()
    if not valid_id(block):  # it becomes the backend's id on the template QEMU's command line
        raise TemplateError(f"{side}: RAM block {block!r} is not a valid QEMU id")
    return block


def template_from_state(state: str, qemu_argv: Sequence[str], ram_path: str, directory: str,
                        opts: AgentOptions) -> tuple[FlowReport, FlowReport, Manifest]:
    """(restore report, template report, manifest) for STATE loaded into a new RAM file."""
    block = stream_block(state)
    argv = list(qemu_argv)
    if not argv or argv[0].startswith("-"):
        argv.insert(0, "qemu-system-x86_64")
    if any(a.startswith("memory-backend") for a in argv):
        raise TemplateError("do not pass a memory backend: the template QEMU gets its own")
    size = ram_size(argv)
    ram_path = os.path.abspath(ram_path)
    private_dir(directory, "template directory")
    try:  # never reuse a file: it could be another template's, or hold anything
        fd = os.open(ram_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise TemplateError(f"cannot create template RAM file {ram_path}: {e.strerror}") from None
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    argv += ["-object", f"memory-backend-file,id={block},size={size},"
             f"mem-path={escape(ram_path)},share=on", "-machine", f"memory-backend={block}"]
    qp = start_qemu(argv, os.path.join(directory, "template.qmp"),
                    log_path=os.path.join(directory, "template.log"), incoming_defer=True)
    done = False
    try:
        with QMPSession(qp.qmp_path) as session:
            restored = restore_flow(session, opts, state, do_resume=False)
            rep, manifest = make_template(session, opts, directory, created=True)
        done = True
        return restored, rep, manifest
    finally:
        qp.kill()  # quit by make_template already, unless something failed
        if not done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ram_path)
