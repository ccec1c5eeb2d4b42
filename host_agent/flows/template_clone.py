"""`vmwipe clone --template DIR`: N clones that map the template's RAM file copy-on-write.

Each clone is started by us with the template's backend id on the same file
but `share=off` (a private mapping: the clone's writes never reach the file or
another clone; on QEMU >= 8.2 also `readonly=on,rom=off`, so QEMU opens the
file read-only), `-S -incoming defer` and x-ignore-shared, and loads only the
device state.  Before it runs, per clone:

- before the load: the machine type, the backend (id, size, share=off, and a
  private mapping of the template file's very inode in /proc/PID/maps), no
  balloon (free-page reporting is a balloon feature), no virtio-mem, no
  postcopy: all of them discard pages of a private file mapping, which then
  read back from the file or as zeros;
- after the load: the canary.  The clone's vmwipe region and a few random
  non-zero pages of the file must read the same in the clone.  A clone whose
  RAM is not the file (memory-backend-ram loads "completed" with all-zero RAM)
  fails it;
- the ordinary wipe, with `expect_zero`: the listed pages (zero in the file) are
  read and verified, written only if one is not zero; fill ranges get fresh
  random bytes; header committed;
- with --resume, `cont`, for every clone at once when all of them are ready
  (`fleet.run_fleet`).

Any refusal kills every QEMU this command started, by PID, before any runs.
"""

from __future__ import annotations

import functools
import os
import random
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmwipe.protocol import PAGE_SIZE, Region

from ..errors import QMPCommandError, TemplateError, UsageError
from ..private import private_dir
from ..qemu.opts import escape, is_on, is_true, option_dict
from ..qemu.qmp import QMPSession
from ..qemu.region import option_values, split_qemu_opts
from ..timing import Phases
from ..wipe.backends import MemoryBackend, read_proc_maps
from ..wipe.engine import EarlyRegion, run_wipe
from .fleet import CloneSet, default_jobs, run_fleet, stderr_progress
from .incoming import incoming_uri, load_incoming
from .report import FlowReport, new_report
from .runstate import resume
from .target import AgentOptions, open_target
from .template_manifest import DEVSTATE, Manifest

#: Devices that discard guest pages, which on a private file mapping makes them
#: read back from the template file (stale secrets) or as zeros.
FORBIDDEN_DEVICES = ("virtio-balloon", "virtio-mem")
#: Pages of the file compared with the clone besides the region (chosen at random per clone).
CANARY_PAGES = 8


def qemu_version_of(binary: str) -> tuple[int, int]:
    """(major, minor) from `QEMU --version`: the backend options differ from 8.2 on.

    Cached per binary path, size and mtime: running QEMU costs ~15 ms, a tenth of a
    whole templated clone.
    """
    path = shutil.which(binary) or binary
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"cannot run {binary}: {e.strerror}") from None
    return _version_cached(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _version_cached(binary: str, _size: int, _mtime: int) -> tuple[int, int]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise UsageError(f"cannot run {binary} --version: {e}") from None
    words = out.split()
    i = words.index("version") if "version" in words else -1
    major, minor = words[i + 1].split(".")[:2] if i >= 0 else ("0", "0")
    return int(major), int(minor)


def backend_args(manifest: Manifest, version: tuple[int, int]) -> list[str]:
    """The clone's RAM: the template file, private; read-only open where QEMU can (>= 8.2).

    The id and path come from the manifest (checked by `Manifest.load`); the path's
    commas are escaped, so neither can add an option of its own.
    """
    opts = (f"memory-backend-file,id={manifest.backend_id},size={manifest.ram_size},"
            f"mem-path={escape(manifest.ram_path)},share=off")
    if version >= (8, 2):
        opts += ",readonly=on,rom=off"
    return ["-object", opts, "-machine", f"memory-backend={manifest.backend_id}"]


def _global_setting(value: str) -> tuple[str, str]:
    """(`driver.property` lowercased, value) of a `-global` argument, in either syntax."""
    opts = split_qemu_opts(value)
    if "driver" in opts:
        return f"{opts['driver']}.{opts.get('property', '')}".lower(), opts.get("value", "")
    key, val = next(iter(opts.items()), ("", ""))
    return key.lower(), val


def check_argv(argv: Sequence[str]) -> None:
    """Refuse a clone command line that would leak into or out of the template (static).

    Each option is read as QEMU reads it (`driver=`, JSON, every boolean spelling);
    `check_before_load` asks the clone QEMU itself again, for what a command line
    can say in ways this misses.
    """
    for a in ("-incoming", "-S"):
        if a in argv:
            raise TemplateError(f"do not pass {a}: the clone command adds it")
    for value in option_values(argv, "device"):
        kind = option_dict(value).get("", "")
        if kind.startswith(FORBIDDEN_DEVICES):
            raise TemplateError(f"{kind} discards pages of the private template mapping "
                                "(they would read back from the template or as zeros)")
        if kind.startswith("vhost-user"):
            raise TemplateError(f"{kind}: a vhost-user backend maps guest RAM, the template "
                                "file, shared and writable in another process")
    for value in option_values(argv, "netdev"):
        if option_dict(value, "type").get("") == "vhost-user":
            raise TemplateError("-netdev vhost-user: the backend maps guest RAM, the template "
                                "file, shared and writable in another process")
    for value in option_values(argv, "object"):
        opts = option_dict(value, "qom-type")
        if not opts.get("", "").startswith("memory-backend"):
            continue
        if is_on(opts, "share"):
            # x-ignore-shared skips every share=on block: the template's would be
            # written by all clones, any other would arrive empty
            raise TemplateError("a share=on clone would write into the template file "
                                "and every other clone")
        if is_on(opts, "prealloc"):
            raise TemplateError("a preallocated memory backend copies all of the template RAM "
                                "into every clone")
    for value in option_values(argv, "global"):
        prop, val = _global_setting(value)
        if prop == "migration.x-postcopy-ram" and is_true(val):
            raise TemplateError("postcopy discards pages of the private template mapping")
    if "-mem-prealloc" in argv:
        raise TemplateError("-mem-prealloc copies all of the template RAM into every clone")
    for value in option_values(argv, "overcommit"):
        if is_on(split_qemu_opts(value), "mem-lock"):
            raise TemplateError("-overcommit mem-lock=on copies all of the template RAM into "
                                "every clone")


#: What QEMU says about a clone before any state is loaded into it, asked in one batch.
PRELOAD_QUERIES: list[tuple[str, dict[str, Any] | None]] = [
    ("query-status", None),
    ("qom-get", {"path": "/machine", "property": "type"}),
    ("qom-get", {"path": "/machine", "property": "memory-backend"}),
    ("query-memdev", None),
    ("query-balloon", None),
    ("query-memory-devices", None),
    ("query-migrate-capabilities", None),
]


class PrefetchedMonitor:
    """A `Monitor` that answers from the pre-load batch where it can.

    `open_target` asks for the memory backends, which the batch already holds, so
    that answer costs no second command.  Anything else goes to QEMU.
    """

    def __init__(self, session: QMPSession, answers: dict[str, Any]) -> None:
        self.session = session
        self.answers = answers

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        if args is None and name in self.answers:
            return self.answers[name]
        return self.session.cmd(name, args)

    def hmp(self, line: str) -> str:
        if line in self.answers:
            return str(self.answers[line])
        return self.session.hmp(line)

    def status(self) -> str:
        return self.session.status()


def check_before_load(session: QMPSession, manifest: Manifest) -> PrefetchedMonitor:
    """What QEMU itself says about the clone, before any state is loaded into it.

    Every question goes in one batch (each round trip is paid in every clone's
    start-up); the file behind the RAM is proved by /proc/PID/maps (its inode), not
    by the backend's mem-path, which could name a different file by then.  Returns
    the answers the target preparation can reuse.
    """
    (status, machine, backend, memdev_list, balloon, memory_devices,
     cap_list) = session.batch(PRELOAD_QUERIES)
    for answer in (status, machine, backend, memdev_list, memory_devices, cap_list):
        if isinstance(answer, QMPCommandError):
            raise answer
    # (a load already under way makes QEMU refuse the migrate-incoming that follows)
    if status["status"] != "inmigrate":
        raise TemplateError("the clone QEMU must be started with -S -incoming defer")
    if str(machine) != manifest.machine:
        raise TemplateError(f"clone machine {machine} != template machine {manifest.machine}")
    backend = str(backend).rsplit("/", 1)[-1]
    memdevs = {str(m.get("id", "")): m for m in memdev_list}
    dev = memdevs.get(backend)
    if backend != manifest.backend_id or dev is None or int(dev["size"]) != manifest.ram_size:
        raise TemplateError(f"clone RAM {backend!r} != template {manifest.backend_id!r} "
                            f"({manifest.ram_size} bytes)")
    if dev.get("share"):
        raise TemplateError("the clone's RAM is share=on: it would write into the template")
    if any(m.get("prealloc") for m in memdevs.values()):
        raise TemplateError("a preallocated memory backend copies all of the template's RAM")
    ident = manifest.ram_identity
    maps = [mp for mp in read_proc_maps(session.pid, ident.ino) if ident.same_inode(
        os.makedev(*mp.dev), mp.inode)]
    if not maps or sum(mp.end - mp.start for mp in maps) < manifest.ram_size:
        raise TemplateError("the clone's RAM is not a mapping of the template file "
                            "(memory-backend-ram comes up all zeros)")
    if any(not mp.perms.endswith("p") for mp in maps):
        raise TemplateError("the clone maps the template file shared; it would write into it")
    if not isinstance(balloon, QMPCommandError):  # query-balloon fails without a balloon
        raise TemplateError("a balloon (or free-page reporting) would discard pages of the "
                            "private template mapping")
    if any("virtio-mem" in str(d.get("type", "")) for d in memory_devices):
        raise TemplateError("virtio-mem would discard pages of the private template mapping")
    if {c["capability"]: c["state"] for c in cap_list}.get("postcopy-ram"):
        raise TemplateError("postcopy discards pages of the private template mapping")
    return PrefetchedMonitor(session, {"query-memdev": memdev_list})


def canary(backend: MemoryBackend, manifest: Manifest, region: Region,
           rng: random.Random) -> tuple[int, bytes]:
    """Compare the clone's region and random non-zero file pages with the file; returns the
    pages checked and the region as read (the wipe then need not read it again).

    Runs before the wipe writes anything, so every compared page must be identical.
    """
    layout = manifest.ram_layout
    def file_offset(gpa: int) -> int:
        for r in layout:
            g, s, o = int(r["gpa"]), int(r["size"]), int(r["offset"])
            if g <= gpa < g + s:
                return o + gpa - g
        raise TemplateError(f"guest address {gpa:#x} is not in the template layout")

    checks = [(region.base, region.size)]
    nonzero = 0
    with open(manifest.ram_path, "rb", buffering=0) as f:
        fd = f.fileno()
        tries = 0
        while len(checks) < 1 + CANARY_PAGES and tries < 64 * CANARY_PAGES:
            tries += 1
            r = rng.choice(layout)
            gpa = int(r["gpa"]) + rng.randrange(int(r["size"]) // PAGE_SIZE) * PAGE_SIZE
            if os.pread(fd, PAGE_SIZE, file_offset(gpa)).count(0) != PAGE_SIZE:
                checks.append((gpa, PAGE_SIZE))
        region_bytes = b""
        for gpa, size in checks:
            want = os.pread(fd, size, file_offset(gpa))
            got = backend.read(gpa, size)
            region_bytes = region_bytes or got  # checks[0] is the region
            if got != want:
                raise TemplateError(f"canary: clone RAM at {gpa:#x} differs from the template "
                                    "file; its RAM is not the template's")
            nonzero += want.count(0) != len(want)
    if nonzero == 0:
        raise TemplateError("canary: no non-zero template page to compare; cannot prove the "
                            "clone's RAM is the template's")
    return len(checks), region_bytes


def prepare_clone(session: QMPSession, manifest: Manifest, directory: str, opts: AgentOptions,
                  do_resume: bool, wipe: bool = True) -> FlowReport:
    """Checks, device-state load, canary, wipe, and `cont` with `do_resume`, on one clone.

    The wipe expects the listed pages to read zero (the template file was
    scrubbed) and writes only if one does not.
    """
    phases = Phases()
    rep = new_report("clone-template", session)
    rep.state_before = "inmigrate"
    prefetched = check_before_load(session, manifest)
    phases.mark("checks")
    load_incoming(session, incoming_uri(session, str(Path(directory) / DEVSTATE)),
                  opts.timeout, capabilities=("events", "x-ignore-shared"))
    phases.mark("load")
    manifest.check_identity()
    target = open_target(prefetched, session.pid, opts, guard=True)
    try:
        rep.region_source, rep.warnings = target.region_source, list(target.warnings)
        if (target.region.base, target.region.size) != tuple(manifest.region):
            raise TemplateError(f"clone region {target.region} != template region "
                                f"{manifest.region}")
        layout = [{"gpa": r.gpa, "size": r.size, "block": r.block, "offset": r.offset}
                  for r in target.memmap.ranges]
        if layout != manifest.ram_layout:
            raise TemplateError("the clone's guest RAM layout differs from the template's")
        rep.extra["canary_pages"], region_bytes = canary(
            target.backend, manifest, target.region, random.Random(os.urandom(16)))
        phases.mark("canary")
        if wipe:
            early = EarlyRegion(tuple(target.memmap.ranges), bytearray(region_bytes))
            rep.wipe = run_wipe(target.backend, target.region, opts.on_invalid, phases,
                                early=early, expect_zero=True,
                                require_crng_refresh=opts.require_crng)
        if do_resume:
            resume(session)
            rep.resumed = True
            phases.mark("resume")
    finally:
        target.close()
    rep.state_after = "running" if rep.resumed else session.status()
    rep.timings_ms = dict(phases.ms)
    return rep


@dataclass
class TemplateCloneSet(CloneSet):
    template: str = ""
    digest_checked: bool = True
    warnings: list[str] = field(default_factory=list)


def clone_template_flow(
    template: str,
    count: int,
    qemu_argv: Sequence[str],
    opts: AgentOptions,
    *,
    directory: str | None = None,
    do_resume: bool = False,
    check_digest: bool = True,
    wipe: bool = True,
    progress: Callable[[str], None] = stderr_progress,
    qmp_timeout: float = 10.0,
    jobs: int | None = None,
) -> TemplateCloneSet:
    """Start `count` clones of the template in `template`; on any failure kill all of them.

    `jobs` clones are prepared at a time (default: one per CPU).  `wipe=False`
    exists only for the test and benchmark controls ("templated without vmwipe").
    """
    if count < 1:
        raise UsageError("-n must be at least 1")
    manifest = Manifest.load(template)
    if check_digest:
        manifest.check_digest(template)  # once per command: ~600 MB/s (template_manifest)
    else:
        manifest.check_identity()
    argv = list(qemu_argv)
    if not argv or argv[0].startswith("-"):
        argv.insert(0, "qemu-system-x86_64")
    check_argv(argv[1:])
    argv += backend_args(manifest, qemu_version_of(argv[0]))
    directory = (str(private_dir(directory, "clone directory")) if directory
                 else tempfile.mkdtemp(prefix="vmwipe-clone-"))
    result = TemplateCloneSet(directory, template=os.path.abspath(template),
                              digest_checked=check_digest)

    def prepare(i: int, session: QMPSession) -> FlowReport:
        rep = prepare_clone(session, manifest, template, opts, False, wipe)
        pages = rep.wipe.pages if rep.wipe else 0
        crng = f"{rep.wipe.crng.line()}, " if rep.wipe and rep.wipe.crng else ""
        if rep.wipe and rep.wipe.ksecrets:
            crng += f"{rep.wipe.ksecrets.line()}, "
        progress(f"clone {i + 1}/{count}: pid {session.pid}, {pages} pages wiped, {crng}paused")
        return rep

    progress(f"starting {count} clone(s) of template {template}: {shlex.join(argv[-4:])}")
    run_fleet(result, argv, count, prepare, progress, qmp_timeout,
              default_jobs(count) if jobs is None else jobs, do_resume)
    return result
