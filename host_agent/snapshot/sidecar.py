"""`FILE.vmwipe.json`: what `vmwipe save` knows that the stream does not say.

The stream names RAM blocks and offsets, not guest-physical addresses, so an
offline scrub needs the region and the GPA-to-RAM-block map of the VM that was
saved.  `vmwipe save` (and `save --scrub`) write them beside the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmwipe.protocol import Region

from ..errors import LayoutError
from ..private import temp_beside
from ..wipe.memmap import RamRange

SIDECAR_SUFFIX = ".vmwipe.json"
SIDECAR_FORMAT = "vmwipe-sidecar"
SIDECAR_VERSION = 1


@dataclass
class Sidecar:
    """What `vmwipe save` knows that the stream does not say: the region and the GPA map."""

    region: Region
    ram: list[RamRange]
    qemu_version: str = ""
    machine: str = ""
    stream: str = ""
    mapped_ram: bool = False
    scrubbed: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    return Path(str(path) + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike[str], *, region: Region,
                  ram: Iterable[RamRange] | Iterable[tuple[int, int, str, int]],
                  qemu_version: str | tuple[int, ...] = "", machine: str = "",
                  stream: str | os.PathLike[str] = "", mapped_ram: bool = False,
                  scrubbed: dict[str, Any] | None = None) -> Path:
    """Write the sidecar atomically at `path` (conventionally `SAVEFILE.vmwipe.json`).

    Schema, version 1 (all integers are plain JSON numbers):

        {"format": "vmwipe-sidecar", "version": 1,
         "stream": "basename of the save file",
         "qemu_version": "7.2.22", "machine": "pc-i440fx-7.2",
         "region": {"base": 520093696, "size": 1048576},
         "ram": [{"gpa": 0, "size": 655360, "block": "pc.ram", "offset": 0}, ...],
         "mapped_ram": false,
         "scrubbed": null | {"pages": N, "copies": N, "bytes": N, "slots": N, "by": "..."}}

    `ram` is the guest RAM map as `wipe.memmap.load_memory_map` sees it: each range
    of guest-physical addresses and the RAM block and offset backing it.
    """
    rows = []
    for r in ram:
        rr = r if isinstance(r, RamRange) else RamRange(r[0], r[1], r[2], r[3])
        rows.append({"gpa": rr.gpa, "size": rr.size, "block": rr.block, "offset": rr.offset})
    if isinstance(qemu_version, tuple):
        qemu_version = ".".join(str(x) for x in qemu_version)
    doc = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "stream": os.path.basename(str(stream)),
        "qemu_version": qemu_version,
        "machine": machine,
        "region": {"base": region.base, "size": region.size},
        "ram": rows,
        "mapped_ram": mapped_ram,
        "scrubbed": scrubbed,
    }
    out = Path(path)
    fd, tmp = temp_beside(out)  # 0600, O_EXCL: it says where the secrets sit in the save
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def read_sidecar(path: str | os.PathLike[str]) -> Sidecar:
    """Parse and check a sidecar; LayoutError names what is wrong."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise LayoutError(f"cannot read sidecar {path}: {e}") from None
    try:
        if doc.get("format") != SIDECAR_FORMAT or doc.get("version") != SIDECAR_VERSION:
            raise LayoutError(f"{path} is not a vmwipe sidecar version {SIDECAR_VERSION}")
        reg = doc["region"]
        region = Region(int(reg["base"]), int(reg["size"]))
        ram = [RamRange(int(r["gpa"]), int(r["size"]), str(r["block"]), int(r["offset"]))
               for r in doc["ram"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LayoutError(f"malformed sidecar {path}: {e}") from None
    if not ram:
        raise LayoutError(f"sidecar {path} lists no guest RAM")
    return Sidecar(region=region, ram=ram, qemu_version=str(doc.get("qemu_version", "")),
                   machine=str(doc.get("machine", "")), stream=str(doc.get("stream", "")),
                   mapped_ram=bool(doc.get("mapped_ram", False)), scrubbed=doc.get("scrubbed"))
