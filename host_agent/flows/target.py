"""The one path to a wipe target: region, reset guard, guest RAM map, memory backend.

Every caller that touches guest RAM comes through `open_target`: the CLI flows
over a `QMPSession`, and the libvirt flows and the hook over libvirt's monitor
or the domain's second QMP monitor.  All it needs is a `Monitor` (QMP, HMP,
run state) and the QEMU PID (for /proc/PID/cmdline and the memory backends:
no QMP or HMP command writes guest RAM).  The security checks (the region from
QEMU's own SSDT, the reset guard) therefore exist once.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from vmwipe.protocol import Region

from ..errors import AgentError, MemoryAccessError, RegionError
from ..qemu.monitor import Monitor
from ..qemu.region import GuardProblem, discover_region, read_cmdline, reset_guard_problem
from ..wipe.backends import MemoryBackend, ProcessVMBackend, SharedFileBackend, open_backend
from ..wipe.engine import EarlyRegion, read_region_early
from ..wipe.memmap import GuestMemoryMap, load_memory_map

log = logging.getLogger(__name__)

#: Run states in which the vCPUs are stopped and a wipe is meaningful.
PAUSED_STATES = frozenset({"paused", "prelaunch", "postmigrate"})


@dataclass
class AgentOptions:
    """Knobs shared by every wiping command (see `vmwipe wipe --help`)."""

    region: Region | None = None
    reset_guard: bool = True
    backend: str = "auto"
    on_invalid: str = "fail"
    populate: bool = False
    timeout: float = 600.0  # for waits on migrations
    #: --require-crng: refuse (never resume) a guest that does not register its kernel CRNG.
    require_crng: bool = False


@dataclass(frozen=True)
class Located:
    """The region, where it came from, and what the reset guard found."""

    region: Region
    source: str  # "acpitable:PATH" or "--region"
    guard: GuardProblem | None
    warnings: tuple[str, ...] = ()


@dataclass
class Target:
    """A VM the agent can read and write: PID, region, memory map, backend."""

    pid: int
    region: Region
    region_source: str
    memmap: GuestMemoryMap
    backend: MemoryBackend
    warnings: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.backend.close()


def locate_region(pid: int, opts: AgentOptions, guard: bool = True,
                  expect: Region | None = None,
                  expect_from: str = "domain metadata") -> Located:
    """Region from --region or QEMU's cmdline, then the reset guard (refuse or warn).

    `guard=False` (inspect, the save sidecar: nothing is written) only reports the
    guard's finding.  `expect` is what a record of the loaded state says the region
    is (`expect_from`: the libvirt domain metadata, the save's sidecar); when it
    disagrees with the SSDT, this refuses.
    """
    argv = read_cmdline(pid)
    if opts.region is not None:
        region, source = opts.region, "--region"
    else:
        found = discover_region(pid, argv)
        region, source = found.region, found.source
    warnings: list[str] = []
    if expect is not None and expect != region:
        # Either one may be the guest's: reading the wrong one finds no magic, which
        # reads as "nothing registered" and would resume an unwiped guest.
        said = "--region says" if source == "--region" else "QEMU's SSDT says"
        raise RegionError(f"{expect_from} says region {expect.base:#x}+{expect.size:#x}, "
                          f"{said} {region.base:#x}+{region.size:#x}; refusing to "
                          "guess which table the guest uses")
    problem = reset_guard_problem(pid, argv, region)
    if problem is not None:
        if guard and opts.reset_guard:
            raise RegionError(str(problem))
        warnings.append("reset guard: " + problem.finding)
        if guard:
            log.warning("--no-reset-guard: %s", problem)
    return Located(region, source, problem, tuple(warnings))


def shared_blocks(mon: Monitor) -> dict[str, bool]:
    """RAM block (memdev id) -> share=on, from query-memdev."""
    return {str(m["id"]): bool(m.get("share", False)) for m in mon.cmd("query-memdev")}


class PreparedTarget:
    """What a load cannot change, learned before it starts, so that the paused window
    after it holds only what must be read then: the flat view of guest RAM.

    Fixed for the life of a QEMU process: the region and reset guard (from its
    command line), the memory backends and their `share=` flags, each RAM block's
    host address (a block is allocated once; resizing keeps its reservation), and
    whether this process may access QEMU's memory.  Not fixed: which guest-physical
    ranges are RAM (SMRAM, PAM and TSEG follow the loaded device state), so
    `open_target` reads `info mtree -f` again after the load.

    With `--populate`, the shared mapping is also mapped and populated in a thread
    while QEMU loads, so the faulting is paid before the pause instead of inside it.
    Otherwise a worker thread stands ready to read the region while the main
    thread fetches the flat view after the load (`read_early`).
    """

    def __init__(self, mon: Monitor, pid: int, opts: AgentOptions, guard: bool = True,
                 expect: Region | None = None, expect_from: str = "") -> None:
        self.pid = pid
        self.located = locate_region(pid, opts, guard, expect, expect_from)
        self.shared = shared_blocks(mon)
        self.memmap = load_memory_map(mon.hmp, set(self.shared))
        self.backend: MemoryBackend | None = None
        self.error: MemoryAccessError | None = None
        self._thread: threading.Thread | None = None
        if opts.populate and opts.backend != "process_vm":
            self._thread = threading.Thread(
                target=self._open_shared, args=(pid,), name="vmwipe-prefetch", daemon=True,
            )
            self._thread.start()
        else:  # refuse now, before anything is loaded, if guest RAM is out of reach
            self.backend = open_backend(opts.backend, self.memmap, pid, self.shared,
                                        opts.populate)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmwipe-early")
        self._pool.submit(lambda: None)  # start the worker now, outside the paused window

    def _open_shared(self, pid: int) -> None:
        try:
            self.backend = SharedFileBackend(self.memmap, pid, self.shared, populate=True)
        except MemoryAccessError as e:
            self.error = e

    def read_early(self) -> Future[EarlyRegion | None] | None:
        """Start reading the region on the map from before the load.

        Only with process_vm access (checked before the load): it needs nothing
        but the PID, so the worker gets its own backend and shares no state.
        """
        if not isinstance(self.backend, ProcessVMBackend):
            return None
        try:
            reader = ProcessVMBackend(self.memmap, self.pid)
        except AgentError as e:
            log.debug("early region read not started: %s", e)
            return None
        return self._pool.submit(_read_and_close, reader, self.located.region)

    def take(self, memmap: GuestMemoryMap) -> MemoryBackend | None:
        """The prepared backend, now on the loaded `memmap`; None if there is none or
        the loaded RAM lies in a block it does not cover (then it is closed)."""
        if self._thread is not None:
            self._thread.join()
        backend, self.backend = self.backend, None
        if backend is None:
            log.info("shared prefetch unavailable: %s", self.error)
            return None
        if not backend.follow(memmap):
            log.info("RAM blocks changed while loading; not using the prepared backend")
            backend.close()
            return None
        return backend

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._thread is not None:
            self._thread.join()
        if self.backend is not None:
            self.backend.close()
            self.backend = None


def _read_and_close(reader: MemoryBackend, region: Region) -> EarlyRegion | None:
    """The early read in the worker, which owns `reader` (and its process handle)."""
    with reader:
        return read_region_early(reader, region)


def open_target(
    mon: Monitor,
    pid: int,
    opts: AgentOptions,
    guard: bool = True,
    prepared: PreparedTarget | None = None,
    expect: Region | None = None,
    expect_from: str = "domain metadata",
) -> Target:
    """Everything needed to touch guest RAM; raises with a one-line reason otherwise.

    `pid` is the QEMU behind `mon` (SO_PEERCRED of a QMP socket, or libvirt's PID
    file checked against the process).  `prepared` carries what was learned before
    a load (see `PreparedTarget`).
    """
    if prepared is None:
        located = locate_region(pid, opts, guard, expect, expect_from)
        shared, bases = shared_blocks(mon), None
    else:
        located = prepared.located
        shared, bases = prepared.shared, prepared.memmap.block_bases()
    memmap = load_memory_map(mon.hmp, set(shared), bases)
    backend = prepared.take(memmap) if prepared is not None else None
    if backend is None:
        backend = open_backend(opts.backend, memmap, pid, shared, opts.populate)
    return Target(pid, located.region, located.source, memmap, backend,
                  list(located.warnings))
