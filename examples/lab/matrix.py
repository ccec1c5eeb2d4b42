"""The kernel matrix (issue 22): vmwipe.ko on the Debian kernels guests run, 5.10 to 7.3.

For each kernel in `KERNELS`, oldest first:

1. fetch it from Debian's archive (scripts/fetch-kernel.sh: headers, image and
   modules unpacked under $VMWIPE_KERNEL_CACHE, default build/kernels);
2. build vmwipe.ko against its headers with W=1, from scratch (scripts/kernel-make.sh:
   the compiler the headers name, in the Debian 13 root for 6.19+ and +deb13 builds),
   and count the warnings; a failed build is recorded with its first error line;
3. when it built: boot it under TCG with the lab's busybox initramfs and run the
   CRNG clone scenario of `vmwipe.lab.crng` (`-cpu qemu64`, no vmgenid device,
   vmwipe.ko with `crng_refresh` on, `vmwipe save`, then `vmwipe clone -n 3`), and
   count the draws made after resume that two clones share: getrandom(),
   /proc/sys/kernel/random/uuid and vDSO getrandom() (6.11+), and the reseed keys
   (getrandom(32) as soon as a clone sees its vmwipe page wiped).

Every row says what happened, failures included (a build that fails, a module
that does not load, a scenario that times out), and the whole run is written to
build/kernel-matrix.json; `render_table` gives the markdown table of
docs/kernel-matrix.md (`--update-doc` replaces it there).

    python -m vmwipe.lab.matrix                       # everything (make kernel-matrix)
    python -m vmwipe.lab.matrix --only 7.3.4+deb13-amd64 --no-boot
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .build import (
    KMOD_SOURCES,
    KMODS,
    BuildError,
    GuestImage,
    Kernel,
    build_guest_image,
    build_root,
    kbuild_command,
    source_root,
)
from .crng import CrngScenario
from .e2e import Log
from .guest import GuestError


@dataclass(frozen=True)
class MatrixKernel:
    """One Debian kernel of the matrix and why it is there."""

    abi: str
    suite: str  # where Debian ships it
    why: str


#: Oldest and newest of each series Debian still ships with headers (checked 2026-12-07).
KERNELS = (
    MatrixKernel("5.10.0-43-amd64", "bullseye-security", "Debian 11, oldest shipped"),
    MatrixKernel("5.10.0-46-amd64", "bullseye-security", "Debian 11, newest"),
    MatrixKernel("6.1.0-47-amd64", "bookworm", "Debian 12, oldest in the main archive"),
    MatrixKernel("6.1.0-50-amd64", "bookworm", "Debian 12 point release (a fresh install)"),
    MatrixKernel("6.1.0-57-amd64", "bookworm-security", "Debian 12, newest"),
    MatrixKernel("6.12.107+deb13-amd64", "trixie", "Debian 13, oldest with headers"),
    MatrixKernel("6.12.118+deb13-amd64", "trixie-security", "Debian 13, newest"),
    MatrixKernel("7.2.12+deb13-amd64", "trixie-backports", "newest 7.2"),
    MatrixKernel("7.3.4+deb13-amd64", "trixie-backports", "newest"),
)

CLONES = 3
DRAWS = 150  # getrandom() lines per clone after resume (one every 2 ms in the guest)
_WARNING = re.compile(r"\bwarning:", re.IGNORECASE)  # gcc's "warning:", modpost's "WARNING:"
_ERROR = re.compile(r"\berror\b", re.IGNORECASE)


@dataclass
class Row:
    """What one kernel did. `None` where a step did not run."""

    abi: str
    suite: str
    why: str
    builds: bool | None = None
    warnings: list[str] = field(default_factory=list)
    first_error: str | None = None
    build_s: float | None = None
    booted: bool | None = None
    crng_refresh: str | None = None  # /sys/class/misc/vmwipe/crng_refresh after insmod
    dmesg: str = ""  # the module's "kernel CRNG" lines
    host_crng: str | None = None  # what `vmwipe clone` reported for the clones' kernel CRNG
    pages_wiped: list[int] = field(default_factory=list)  # per clone, from `vmwipe clone`
    draws: dict[str, int] = field(default_factory=dict)  # kind -> after resume, all clones
    duplicated: dict[str, int] = field(default_factory=dict)  # kind -> shared by >= 2 clones
    error: str | None = None  # the step that failed after the build, and why
    scenario_s: float | None = None

    @property
    def shared_draws(self) -> int | None:
        """getrandom(), uuid and vDSO draws after resume that two clones share."""
        if not self.draws:
            return None
        return sum(self.duplicated.get(k, 0) for k in ("G", "U", "V"))

    @property
    def shared_keys(self) -> int | None:
        return self.duplicated.get("K", 0) if self.draws else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shared_draws": self.shared_draws, "shared_keys": self.shared_keys}


def fetch(abi: str, image: bool) -> Path:
    """scripts/fetch-kernel.sh: the unpacked root (downloaded once per cache)."""
    cmd = ["bash", str(source_root() / "scripts" / "fetch-kernel.sh"), abi]
    proc = subprocess.run([*cmd, "--image"] if image else cmd, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise BuildError(f"fetch-kernel.sh {abi} failed: {proc.stderr.strip()[-2000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def build(kernel: Kernel, row: Row, directory: Path) -> Path | None:
    """Build vmwipe.ko (and the API test module) from scratch in `directory` with W=1.

    Fills the row's build columns; the module's path when it built, warnings or not.
    """
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    src = source_root() / "guest_kmod"
    for f in KMOD_SOURCES:
        shutil.copy2(src / f, directory / f)
    t0 = time.monotonic()
    proc = subprocess.run(kbuild_command(kernel, directory), capture_output=True, text=True,
                          check=False)
    row.build_s = round(time.monotonic() - t0, 1)
    log = proc.stdout + proc.stderr
    (directory / "build.log").write_text(log)
    log = log.replace(f"{directory}/", "")  # "crng.c:97:16: error: ..." in the table
    row.warnings = [ln.strip() for ln in log.splitlines() if _WARNING.search(ln)]
    row.builds = proc.returncode == 0 and all((directory / ko).is_file() for ko in KMODS)
    if not row.builds:
        errors = [ln.strip() for ln in log.splitlines()
                  if _ERROR.search(ln) and not ln.startswith("make")]
        row.first_error = (errors or [ln.strip() for ln in log.splitlines() if ln.strip()]
                           or [f"make exited {proc.returncode}"])[0]
        return None
    return directory / "vmwipe.ko"


def scenario(image: GuestImage, row: Row, log: Log, keep: Path | None = None) -> None:
    """Boot, `vmwipe save`, `vmwipe clone -n 3`; fill the row's scenario columns.

    The serial logs (the original's and each clone's ttyS1) are copied to `keep`.
    """
    t0 = time.monotonic()
    try:
        with CrngScenario(False, CLONES, DRAWS, log=log, image=image) as sc:
            try:
                sc.boot_and_save()
            finally:
                row.booted = sc.guest is not None and sc.guest.console is not None
                row.crng_refresh = sc.sysfs_state or None
                row.dmesg = sc.dmesg
            res = sc.run_mode("v2")
            row.draws, row.duplicated = dict(res.draws), dict(res.duplicated)
            row.host_crng = "; ".join(sorted(set(_crng_summaries(sc.clone_reports)))) or None
            row.pages_wiped = [int(c.get("report", {}).get("wipe", {}).get("pages", -1))
                               for c in sc.clone_reports]
            if keep is not None:
                for f in [sc.dir / "original.ttyS1", *sorted((sc.dir / "v2").glob("*.ttyS1"))]:
                    shutil.copy2(f, keep / f.name)
            # the guest cannot hide a missing reseed: every clone must print its key
            if res.draws.get("K", 0) < CLONES:
                row.error = f"only {res.draws.get('K', 0)} of {CLONES} clones printed a reseed key"
    except (GuestError, BuildError, OSError, subprocess.SubprocessError) as e:
        row.error = f"{type(e).__name__}: {_first_line(str(e))}"
    finally:
        row.scenario_s = round(time.monotonic() - t0, 1)


def _crng_summaries(node: object) -> list[str]:
    """Every "crng" report's summary in `vmwipe clone --json`'s output, wherever it sits."""
    if isinstance(node, list):
        return [x for item in node for x in _crng_summaries(item)]
    if not isinstance(node, dict):
        return []
    crng = node.get("crng")
    if isinstance(crng, dict) and isinstance(crng.get("summary"), str):
        return [crng["summary"]]
    return [x for value in node.values() for x in _crng_summaries(value)]


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")[:300]


def run_kernel(mk: MatrixKernel, boot: bool, log: Log) -> Row:
    """Fetch, build and (when it built and `boot`) run the clone scenario on one kernel."""
    row = Row(mk.abi, mk.suite, mk.why)
    try:
        root = fetch(mk.abi, image=boot)
    except BuildError as e:
        row.error = _first_line(str(e))
        return row
    kernel = Kernel(mk.abi, root)
    module = build(kernel, row, build_root() / "kernel-matrix" / mk.abi)
    log(f"{mk.abi}: " + (f"built in {row.build_s} s, {len(row.warnings)} warning(s)"
                         if row.builds else f"build FAILED: {row.first_error}"))
    if module is None or not boot:
        return row
    try:
        image = build_guest_image(kernel, module)
    except BuildError as e:
        row.error = f"initramfs: {_first_line(str(e))}"
        return row
    scenario(image, row, log, keep=module.parent)
    log(f"{mk.abi}: crng_refresh {row.crng_refresh!r}, shared draws {row.shared_draws}, "
        f"shared reseed keys {row.shared_keys}" + (f"; {row.error}" if row.error else ""))
    return row


def _cell(value: object) -> str:
    return "-" if value is None else str(value).replace("|", "\\|")


def render_table(rows: list[Row]) -> str:
    """The markdown table: kernel → builds / W=1 warnings / crng_refresh (the guest's sysfs,
    and the host's report of the table header) / shared values."""
    out = ["| kernel | Debian suite | builds | W=1 warnings | crng_refresh (guest) | "
           f"kernel CRNG (`vmwipe clone`) | shared draws ({CLONES} clones) | shared reseed keys "
           "| notes |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        builds = {True: "yes", False: "**no**", None: "-"}[r.builds]
        notes = [r.why]
        if r.first_error:
            notes.append(f"`{r.first_error}`")
        if r.warnings:
            notes.append(f"first warning: `{r.warnings[0]}`")
        if r.draws:
            notes.append("draws after resume: " + ", ".join(
                f"{k} {r.draws[k]}" for k in ("G", "U", "V", "K") if r.draws.get(k)))
        if r.error:
            notes.append(f"**{r.error}**")
        warnings = None if r.builds is None else len(r.warnings)
        out.append("| " + " | ".join(_cell(c) for c in (
            f"`{r.abi}`", r.suite, builds, warnings, r.crng_refresh, r.host_crng, r.shared_draws,
            r.shared_keys, "; ".join(notes))) + " |")
    return "\n".join(out)


BEGIN, END = "<!-- kernel-matrix:begin -->", "<!-- kernel-matrix:end -->"


def update_doc(doc: Path, table: str, header: str) -> None:
    """Replace the table between the markers in `doc` (docs/kernel-matrix.md)."""
    text = doc.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    doc.write_text(f"{text[:start]}\n{header}\n\n{table}\n{text[end:]}")


def _revision() -> str:
    proc = subprocess.run(["git", "-C", str(source_root()), "describe", "--always", "--dirty"],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmwipe.lab.matrix", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="ABI", help="these kernels of KERNELS only")
    ap.add_argument("--no-boot", action="store_true", help="fetch and build only")
    ap.add_argument("--json", type=Path, help="default: build/kernel-matrix.json")
    ap.add_argument("--update-doc", action="store_true",
                    help="write the table into docs/kernel-matrix.md")
    args = ap.parse_args(argv)
    kernels = [k for k in KERNELS if not args.only or k.abi in args.only]
    unknown = set(args.only or ()) - {k.abi for k in KERNELS}
    if unknown:
        ap.error(f"not in the matrix: {', '.join(sorted(unknown))}")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    started = datetime.now(UTC)
    t0 = time.monotonic()
    rows = []
    for mk in kernels:
        try:
            rows.append(run_kernel(mk, not args.no_boot, log))
        except Exception as e:  # one kernel's surprise must not cost the others' rows
            traceback.print_exc()
            rows.append(Row(mk.abi, mk.suite, mk.why, error=f"{type(e).__name__}: {e}"))
    minutes = round((time.monotonic() - t0) / 60, 1)
    header = (f"Measured {started:%Y-%m-%d %H:%M} UTC on revision {_revision()}, "
              f"{os.cpu_count()} CPUs, QEMU TCG, {minutes} min "
              f"(`make kernel-matrix`{', no boots' if args.no_boot else ''}).")
    table = render_table(rows)
    print(header + "\n\n" + table)
    out = args.json or build_root() / "kernel-matrix.json"
    out.write_text(json.dumps({"measured": started.isoformat(timespec="seconds"),
                               "revision": _revision(), "minutes": minutes,
                               "rows": [r.to_dict() for r in rows]}, indent=1) + "\n")
    log(f"wrote {out}")
    if args.update_doc:
        update_doc(source_root() / "docs" / "kernel-matrix.md", table, header)
    ok = all(r.builds and not r.warnings and not r.error and
             (args.no_boot or (r.crng_refresh == "active" and r.shared_draws == 0
                               and r.shared_keys == 0)) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
