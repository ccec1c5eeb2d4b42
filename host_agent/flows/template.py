"""`vmwipe template`: turn a VM whose RAM is a `share=on` file into a scrubbed clone template.

QEMU templating (x-ignore-shared) lets clones map the template's RAM file
privately and load only the device state, but every clone then starts from the
template's secrets.  Here the secrets are removed from the file itself before
anything else happens, so they never rest on disk or in tmpfs:

1. refuse RAM that is not one `share=on` `memory-backend-file` holding every
   guest RAM range, or a RAM file group or others can read; stop the VM (or
   find it paused);
2. read and validate the vmwipe table, zero the listed pages through QEMU's
   shared mapping (that is the file), verify, commit the header (the ordinary
   wipe engine), then read the listed pages back *from the file* and fsync it;
3. migrate the device state with x-ignore-shared to `DIR/devstate`;
4. `quit` the template QEMU: a paused QEMU with a writable shared mapping of
   the file would be one `cont` away from writing into every clone's RAM;
5. write `DIR/manifest.json` once QEMU is gone (see `template_manifest`).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

from vmwipe.protocol import PAGE_SIZE, decode_table

from ..errors import QMPCommandError, QMPFailure, TemplateError, VerifyError, VMStateError
from ..private import private_dir, private_output
from ..qemu.qmp import QMPSession
from ..timing import Phases
from ..wipe.engine import read_region, run_wipe
from ..wipe.memmap import GuestMemoryMap
from .incoming import set_capability
from .migration import full_bandwidth
from .report import FlowReport, new_report
from .save import migrate_to_file, save_uri
from .target import AgentOptions, open_target
from .template_manifest import DEVSTATE, FileIdentity, Manifest, sha256_file

log = logging.getLogger(__name__)

#: How long `quit` may take before the template QEMU counts as still alive.
QUIT_WAIT = 10.0


def machine_backend(session: QMPSession) -> tuple[str, str, int, str]:
    """(machine type, memory backend id, size, mem-path) of a QEMU's `-machine memory-backend=`.

    Refuses anything clones could not share: no machine memory backend, a backend
    that is not a file, or a private (`share=off`) one.
    """
    machine = str(session.cmd("qom-get", {"path": "/machine", "property": "type"}))
    backend = str(session.cmd("qom-get", {"path": "/machine", "property": "memory-backend"}))
    backend = backend.rsplit("/", 1)[-1]
    if not backend:
        raise TemplateError("the VM has no -machine memory-backend=ID; a template needs its RAM "
                            "in a share=on memory-backend-file")
    memdevs = {str(m.get("id", "")): m for m in session.cmd("query-memdev")}
    dev = memdevs.get(backend)
    if dev is None:
        raise TemplateError(f"memory backend {backend!r} is not in query-memdev")
    try:
        path = str(session.cmd("qom-get", {"path": f"/objects/{backend}",
                                           "property": "mem-path"}))
    except QMPCommandError:
        raise TemplateError(f"memory backend {backend!r} is not a memory-backend-file") from None
    return machine, backend, int(dev["size"]), path


def _check_shared(session: QMPSession, backend: str) -> None:
    memdevs = {str(m.get("id", "")): m for m in session.cmd("query-memdev")}
    if not memdevs[backend].get("share"):
        raise TemplateError(f"memory backend {backend!r} is share=off: its RAM is not in the "
                            "file, so the file cannot be a template")


def _file_offsets(memmap: GuestMemoryMap, backend: str, starts: list[int],
                  sizes: list[int]) -> list[tuple[int, int]]:
    """(file offset, size) of every listed byte; the RAM file is block offset 0."""
    out = []
    for start, size in zip(starts, sizes, strict=True):
        for gpa, n, rng in memmap.split(start, size):
            if rng.block != backend:
                raise TemplateError(f"listed page {gpa:#x} is in RAM block {rng.block!r}, "
                                    f"not the template file {backend!r}")
            out.append((rng.offset + gpa - rng.gpa, n))
    return out


def verify_file_zero(path: str, spans: list[tuple[int, int]]) -> None:
    """Read the listed spans back from the file itself: the proof the secrets left it."""
    zero = bytes(1 << 20)
    with open(path, "rb", buffering=0) as f:
        for off, size in spans:
            pos = off
            while pos < off + size:
                n = min(len(zero), off + size - pos)
                if os.pread(f.fileno(), n, pos) != zero[:n]:
                    raise VerifyError(f"template file {path} offset {pos:#x} is not zero "
                                      "after the scrub")
                pos += n
        os.fsync(f.fileno())


def _wait_gone(pid: int, timeout: float) -> bool:
    """True once `pid` has exited (gone, or a zombie: it holds no mapping any more)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        time.sleep(0.02)
    return False


def check_ram_file(ram_path: str) -> None:
    """Refuse a RAM file that is not a regular file, or that group or others can read.

    The file keeps the whole guest RAM (only the listed pages are scrubbed) for as
    long as the template exists, and every clone starts from it: it is as secret as a
    save.  Refused rather than warned about: a template is made once, a warning
    scrolls by, and the fix is one `chmod go= FILE` before anything was touched.
    """
    try:
        st = os.stat(ram_path)
    except OSError as e:
        raise TemplateError(f"mem-path {ram_path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TemplateError(f"mem-path {ram_path} is not a regular file (a directory makes "
                            "QEMU create and unlink a temporary file)")
    if st.st_mode & 0o077:
        raise TemplateError(f"template RAM file {ram_path} has mode "
                            f"{stat.S_IMODE(st.st_mode):04o}: group or others could read the "
                            "guest's RAM in it; make it owner-only (chmod go= FILE) first")


def make_template(session: QMPSession, opts: AgentOptions, directory: str,
                  created: bool = False) -> tuple[FlowReport, Manifest]:
    """Scrub the VM's RAM file, save its device state into `directory`, quit QEMU, write
    the manifest.  Raises on any problem; until `quit`, the VM is left paused.

    `directory` is created 0700 (`private.private_dir`) unless `created` says the
    caller already did."""
    phases = Phases()
    rep = new_report("template", session)
    rep.state_before = session.status()
    if rep.state_before not in ("paused", "prelaunch", "running"):
        raise VMStateError(f"cannot make a template of a VM in state {rep.state_before!r}")
    machine, backend, size, ram_path = machine_backend(session)
    _check_shared(session, backend)
    ram_path = os.path.realpath(ram_path)
    check_ram_file(ram_path)
    out = Path(directory) if created else private_dir(directory, "template directory")
    if rep.state_before == "running":
        session.cmd("stop")
    phases.mark("stop")

    target = open_target(session, session.pid, opts, guard=True)
    try:
        foreign = [r for r in target.memmap.ranges if r.block != backend]
        if foreign:
            raise TemplateError(f"guest RAM {foreign[0].gpa:#x} is in block "
                                f"{foreign[0].block!r}, outside the template file")
        rep.region_source = target.region_source
        rep.warnings += target.warnings
        rep.wipe = run_wipe(target.backend, target.region, opts.on_invalid, phases,
                            require_crng_refresh=opts.require_crng)
        table = decode_table(read_region(target.backend, target.region), target.region,
                             target.memmap.pairs(), strict=False)
        starts, sizes = table.runs() if table.header is not None else ([], [])
        spans = _file_offsets(target.memmap, backend, list(starts), list(sizes))
        layout: list[dict[str, int | str]] = [
            {"gpa": r.gpa, "size": r.size, "block": r.block, "offset": r.offset}
            for r in target.memmap.ranges]
        region = (target.region.base, target.region.size)
    finally:
        target.close()
    verify_file_zero(ram_path, spans)
    phases.mark("file-verify")

    devstate = str(out / DEVSTATE)
    with full_bandwidth(session):
        set_capability(session, "events", True)
        set_capability(session, "x-ignore-shared", True)
        session.clear_events()
        uri, _mapped, _restore = save_uri(session, devstate, False, rep.warnings)
        private_output(devstate, session.pid)
        migrate_to_file(session, devstate, uri, opts.timeout)
    phases.mark("devstate")
    pid = session.pid
    try:
        session.cmd("quit")
    except QMPFailure as e:  # QEMU may close the socket before it answers
        log.debug("quit: %s", e)
    if not _wait_gone(pid, QUIT_WAIT):
        raise TemplateError(f"template QEMU pid {pid} did not exit after quit; no manifest "
                            "written (a live template QEMU could still write the file)")
    phases.mark("quit")
    manifest = Manifest(
        qemu_version=".".join(map(str, session.version)),
        machine=machine,
        backend_id=backend,
        ram_size=size,
        ram_path=ram_path,
        ram_layout=layout,
        region=region,
        ram_identity=FileIdentity.of(ram_path),
        ram_sha256=sha256_file(ram_path),
        devstate_sha256=sha256_file(devstate),
        header_generation=rep.wipe.generation_after,
        scrubbed_pages=sum(n for _o, n in spans) // PAGE_SIZE,
        warnings=list(rep.warnings),
    )
    manifest.check_identity()  # nothing wrote the file while it was being hashed
    rep.extra.update({"manifest": str(manifest.write(out)), "devstate": devstate,
                      "ram_path": ram_path, "template_qemu": "quit"})
    phases.mark("manifest")
    rep.state_after = "quit"
    rep.timings_ms = dict(phases.ms)
    return rep, manifest
