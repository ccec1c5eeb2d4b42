"""Protect and unprotect a libvirt domain by editing its persistent XML.

A protected domain carries, in one place that libvirt keeps with the domain
(and copies into save images, managed saves, snapshots and migrations):

- `<qemu:commandline>` arguments, because libvirt has no element for them:
  `-acpitable file=SSDT` (libvirt's `<acpi><table>` only takes SLIC), the
  second QMP monitor the hook uses (a hook must never call libvirt for its own
  domain: the domain is locked while the hook runs), and the reset-time zero
  page `-device loader,...,force-raw=on` (SPEC.md section 7);
- the region reservation: `memmap=SIZE$BASE` appended to `<cmdline>` for direct
  kernel boot, else a pc-dimm smaller than 128 MiB at a fixed address (Linux
  refuses to online it, so the range stays free for the driver);
- `<metadata><vmwipe:protect .../></metadata>`, which is how the hook, reading
  the XML on stdin, knows the domain is protected and where its monitor is.
  It also records exactly what was added, so `unprotect` removes only that.

Everything here is pure XML work on strings (no libvirt connection), so the
hook can import it cheaply and the tests can exercise it without libvirtd.
`protect` is idempotent: it strips what an earlier `protect` added and adds the
current set again; when the two sets agree the XML is returned unchanged.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path

from vmwipe.protocol import Region, validate_region

from ..errors import ProtectError
from ..qemu.vmconfig import DEFAULT_SIZE, choose_region
from .paths import META_NS, STATE_DIR

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
META_PREFIX = "vmwipe"
CHARDEV_ID = "vmwipe"

#: Socket path limit of AF_UNIX (sun_path is 108 bytes with the NUL).
_SUN_PATH_MAX = 107

_KIB = 1024
_MIB = 1 << 20
_GIB = 1 << 30
#: Keep pc-dimms well below Linux's memory block size (128 MiB): a smaller DIMM
#: is never onlined, so the guest never uses the region as RAM.
DIMM_SIZE = 2 * _MIB
_UNITS = {
    "b": 1, "bytes": 1, "k": _KIB, "kib": _KIB, "kb": 1000, "m": _MIB, "mib": _MIB,
    "mb": 1000**2, "g": _GIB, "gib": _GIB, "gb": 1000**3, "t": 1 << 40, "tib": 1 << 40,
    "tb": 1000**4,
}

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace(META_PREFIX, META_NS)


def _q(tag: str) -> str:
    return f"{{{QEMU_NS}}}{tag}"


def _m(tag: str) -> str:
    return f"{{{META_NS}}}{tag}"


@dataclass(frozen=True)
class Protection:
    """What `protect` put into a domain; stored as attributes of `<vmwipe:protect>`."""

    base: int
    size: int
    reservation: str  # "memmap" or "dimm"
    monitor: str
    ssdt: str
    zero_page: str
    cmdline_param: str = ""
    dimm_base: int = 0
    dimm_kib: int = 0
    maxmemory_added: bool = False
    numa_added: bool = False
    #: `protect --require-crng`: the hook refuses (kills) a restored guest whose table
    #: does not register its kernel CRNG.  Stored as metadata version 2, which a hook
    #: from before the policy refuses ("unsupported version") instead of ignoring it.
    require_crng: bool = False

    @property
    def region(self) -> Region:
        return Region(self.base, self.size)

    def qemu_args(self) -> list[str]:
        """The `<qemu:commandline>` arguments, in the order they are added."""
        return [
            "-acpitable", f"file={self.ssdt}",
            "-device", f"loader,file={self.zero_page},addr={self.base:#x},force-raw=on",
            "-chardev", f"socket,id={CHARDEV_ID},path={self.monitor},server=on,wait=off",
            "-mon", f"chardev={CHARDEV_ID},mode=control",
        ]

    def to_attrib(self) -> dict[str, str]:
        a = {
            "version": "2" if self.require_crng else "1",
            "base": f"{self.base:#x}",
            "size": f"{self.size:#x}",
            "reservation": self.reservation,
            "monitor": self.monitor,
            "ssdt": self.ssdt,
            "zero-page": self.zero_page,
        }
        if self.cmdline_param:
            a["cmdline-param"] = self.cmdline_param
        if self.reservation == "dimm":
            a["dimm-base"] = f"{self.dimm_base:#x}"
            a["dimm-kib"] = str(self.dimm_kib)
            a["maxmemory-added"] = "yes" if self.maxmemory_added else "no"
            a["numa-added"] = "yes" if self.numa_added else "no"
        if self.require_crng:
            a["require-crng"] = "yes"
        return a

    @classmethod
    def from_element(cls, el: ET.Element) -> Protection:
        """Parse `<vmwipe:protect>`; ProtectError names the bad attribute."""
        try:
            if el.get("version") not in ("1", "2"):
                raise ProtectError(f"unsupported vmwipe metadata version {el.get('version')!r}")
            require = el.get("require-crng", "no")
            if require not in ("yes", "no") or (require == "yes") != (el.get("version") == "2"):
                raise ProtectError(f"vmwipe metadata: require-crng={require!r} does not fit "
                                   f"version {el.get('version')!r}")
            prot = cls(
                base=int(el.attrib["base"], 0),
                size=int(el.attrib["size"], 0),
                reservation=el.attrib["reservation"],
                monitor=el.attrib["monitor"],
                ssdt=el.attrib["ssdt"],
                zero_page=el.attrib["zero-page"],
                cmdline_param=el.get("cmdline-param", ""),
                dimm_base=int(el.get("dimm-base", "0"), 0),
                dimm_kib=int(el.get("dimm-kib", "0"), 0),
                maxmemory_added=el.get("maxmemory-added") == "yes",
                numa_added=el.get("numa-added") == "yes",
                require_crng=require == "yes",
            )
        except KeyError as e:
            raise ProtectError(f"vmwipe metadata lacks attribute {e.args[0]!r}") from None
        except ValueError as e:
            if isinstance(e, ProtectError):
                raise
            raise ProtectError(f"vmwipe metadata has a bad number: {e}") from None
        if prot.reservation not in ("memmap", "dimm"):
            raise ProtectError(f"vmwipe metadata: unknown reservation {prot.reservation!r}")
        return prot


# --- reading ---------------------------------------------------------------------------


def parse_domain(xml_text: str) -> ET.Element:
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as e:
        raise ProtectError(f"domain XML does not parse: {e}") from None
    if root.tag != "domain":
        raise ProtectError(f"not a domain XML (root element <{root.tag}>)")
    return root


def protection_of(root: ET.Element) -> Protection | None:
    """The domain's vmwipe metadata, or None when it is not protected."""
    meta = root.find("metadata")
    if meta is None:
        return None
    el = meta.find(_m("protect"))
    return None if el is None else Protection.from_element(el)


def read_protection(xml_text: str) -> Protection | None:
    """For the hook: is the domain on stdin protected, and how."""
    return protection_of(parse_domain(xml_text))


def domain_name(root: ET.Element) -> str:
    return (root.findtext("name") or "").strip()


def domain_uuid(root: ET.Element) -> str:
    return (root.findtext("uuid") or "").strip()


def _to_bytes(el: ET.Element) -> int:
    unit = (el.get("unit") or "KiB").lower()
    if unit not in _UNITS:
        raise ProtectError(f"<{el.tag}> has an unknown unit {el.get('unit')!r}")
    try:
        return int((el.text or "0").strip()) * _UNITS[unit]
    except ValueError:
        raise ProtectError(f"<{el.tag}> is not a number: {el.text!r}") from None


def _set_kib(el: ET.Element, nbytes: int) -> None:
    el.set("unit", "KiB")
    el.text = str(nbytes // _KIB)


def _dimms(root: ET.Element) -> list[ET.Element]:
    devs = root.find("devices")
    if devs is None:
        return []
    return [m for m in devs.findall("memory") if m.get("model") in ("dimm", "nvdimm",
                                                                     "virtio-mem", "virtio-pmem")]


def _dimm_bytes(mem: ET.Element) -> int:
    size = mem.find("target/size")
    return 0 if size is None else _to_bytes(size)


def initial_memory(root: ET.Element) -> int:
    """Guest RAM given to QEMU's -m: NUMA cells if any, else <memory> minus memory devices."""
    cells = root.findall("cpu/numa/cell")
    if cells:
        try:
            return sum(int(c.get("memory", "0")) * _UNITS[(c.get("unit") or "KiB").lower()]
                       for c in cells)
        except (ValueError, KeyError):
            raise ProtectError("<cpu><numa><cell memory=...> is not a size") from None
    mem = root.find("memory")
    if mem is None:
        raise ProtectError("domain XML has no <memory>")
    return _to_bytes(mem) - sum(_dimm_bytes(m) for m in _dimms(root))


def is_direct_kernel_boot(root: ET.Element) -> bool:
    kernel = root.findtext("os/kernel")
    return bool(kernel and kernel.strip())


def _machine(root: ET.Element) -> str:
    t = root.find("os/type")
    return "" if t is None else t.get("machine", "")


def device_memory_base(machine: str, ram: int) -> int:
    """Where QEMU's x86 hotplug area starts: 4 GiB + RAM above 4 GiB, rounded up to 1 GiB.

    The split of -m RAM below/above 4 GiB follows QEMU's pc_piix/pc_q35 rules
    (gigabyte-aligned defaults).
    """
    if "q35" in machine:
        lowmem = 0x8000_0000 if ram >= 0xB000_0000 else 0xB000_0000
    else:
        lowmem = 0xC000_0000 if ram >= 0xE000_0000 else 0xE000_0000
    above = max(0, ram - lowmem)
    return -(-(4 * _GIB + above) // _GIB) * _GIB


# --- planning ------------------------------------------------------------------------


def monitor_path(state_dir: Path, uuid: str) -> str:
    """`STATE/mon/libvirt-UUID.qmp`: named like the domain's AppArmor profile (libvirt calls
    it `libvirt-UUID`), so the rule `mon/@{profile_name}.qmp` lets each QEMU reach its own
    second monitor and no other domain's."""
    if not re.fullmatch(r"[0-9a-fA-F-]+", uuid):
        raise ProtectError(f"domain UUID {uuid!r} is not a UUID")
    path = str(state_dir / "mon" / f"libvirt-{uuid}.qmp")
    if len(path.encode()) > _SUN_PATH_MAX:
        raise ProtectError(f"monitor socket path {path} is longer than {_SUN_PATH_MAX} bytes")
    return path


def domain_files_dir(state_dir: Path, uuid: str) -> Path:
    """Per-domain directory of the SSDT and the zero page (UUID survives a rename)."""
    if not uuid:
        raise ProtectError("domain XML has no <uuid>")
    return state_dir / "domains" / uuid


def plan_protection(
    root: ET.Element,
    state_dir: Path = STATE_DIR,
    size: int = DEFAULT_SIZE,
    reservation: str = "auto",
) -> Protection:
    """Decide region and reservation for a domain whose vmwipe additions are already stripped."""
    uuid = domain_uuid(root)
    files = domain_files_dir(state_dir, uuid)
    monitor = monitor_path(state_dir, uuid)
    ssdt = str(files / "vmwipe-ssdt.aml")
    zero = str(files / "vmwipe-zero-page.bin")
    if reservation == "auto":
        reservation = "memmap" if is_direct_kernel_boot(root) else "dimm"
    ram = initial_memory(root)
    if reservation == "memmap":
        if not is_direct_kernel_boot(root):
            raise ProtectError(
                "memmap= needs direct kernel boot (<os><kernel>); for a guest with its own "
                "bootloader add memmap= to its kernel command line yourself, or use the "
                "pc-dimm reservation"
            )
        try:
            region = choose_region(ram, size)
        except ValueError as e:
            raise ProtectError(str(e)) from None
        param = f"memmap={region.size:#x}${region.base:#x}"
        return Protection(region.base, region.size, "memmap", monitor, ssdt, zero,
                          cmdline_param=param)
    if reservation != "dimm":
        raise ProtectError(f"unknown reservation {reservation!r} (memmap, dimm or auto)")
    if size > DIMM_SIZE:
        raise ProtectError(f"a pc-dimm region holds at most {DIMM_SIZE} bytes")
    base = device_memory_base(_machine(root), ram)
    # The DIMM must be the first one in the hotplug area to sit at its base.
    if _dimms(root):
        raise ProtectError("the domain already has memory devices; the vmwipe pc-dimm must be "
                           "the first one (use --reservation memmap with direct kernel boot)")
    region = Region(base, size)
    validate_region(region)
    maxmem = root.find("maxMemory")
    # libvirt refuses memory devices without a NUMA topology: add one node holding all RAM.
    return Protection(base, size, "dimm", monitor, ssdt, zero, dimm_base=base,
                      dimm_kib=DIMM_SIZE // _KIB, maxmemory_added=maxmem is None,
                      numa_added=not root.findall("cpu/numa/cell"))


# --- editing -------------------------------------------------------------------------


@dataclass
class Edit:
    """The result of protect/unprotect: new XML, and human-readable items added/removed."""

    xml: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    protection: Protection | None = None

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)

    def lines(self) -> list[str]:
        return [f"- {x}" for x in self.removed] + [f"+ {x}" for x in self.added]


def _is_our_arg(opt: str, value: str, prot: Protection | None) -> bool:
    """Recognise the argument pairs `protect` adds (also without metadata, for repair)."""
    if opt == "-chardev":
        return f"id={CHARDEV_ID}," in value + ","
    if opt == "-mon":
        return f"chardev={CHARDEV_ID}" in value.split(",")
    if opt == "-acpitable":
        return value.endswith("/vmwipe-ssdt.aml") or (prot is not None and
                                                       value == f"file={prot.ssdt}")
    if opt == "-device":
        return value.startswith("loader,") and "/vmwipe-zero-page.bin," in value
    return False


def _strip(root: ET.Element) -> tuple[list[str], Protection | None]:
    """Remove every vmwipe addition from `root`; return descriptions of what was there."""
    items: list[str] = []
    prot = protection_of(root)
    meta = root.find("metadata")
    if meta is not None:
        for el in meta.findall(_m("protect")):
            meta.remove(el)
            items.append(_describe_meta(prot))
        if len(meta) == 0:
            root.remove(meta)
    cl = root.find(_q("commandline"))
    if cl is not None:
        args = cl.findall(_q("arg"))
        i = 0
        while i < len(args):
            opt = args[i].get("value", "")
            val = args[i + 1].get("value", "") if i + 1 < len(args) else ""
            if i + 1 < len(args) and _is_our_arg(opt, val, prot):
                cl.remove(args[i])
                cl.remove(args[i + 1])
                items.append(f"qemu:arg {opt} {val}")
                i += 2
            else:
                i += 1
        if len(cl) == 0:
            root.remove(cl)
    if prot is not None and prot.cmdline_param:
        cmd = root.find("os/cmdline")
        if cmd is not None and cmd.text:
            words = cmd.text.split()
            if prot.cmdline_param in words:
                words.remove(prot.cmdline_param)
                cmd.text = " ".join(words)
                items.append(f"kernel cmdline {prot.cmdline_param}")
                if not words:
                    os_el = root.find("os")
                    assert os_el is not None
                    os_el.remove(cmd)
    if prot is not None and prot.reservation == "dimm":
        items += _strip_dimm(root, prot)
    return items, prot


def _describe_meta(prot: Protection | None) -> str:
    if prot is None:
        return "metadata vmwipe:protect"
    return (f"metadata vmwipe:protect region {prot.base:#x}+{prot.size:#x} "
            f"({prot.reservation}), monitor {prot.monitor}"
            + (", require-crng" if prot.require_crng else ""))


def _strip_dimm(root: ET.Element, prot: Protection) -> list[str]:
    items: list[str] = []
    devs = root.find("devices")
    for mem in list(devs) if devs is not None else []:
        if mem.tag != "memory" or mem.get("model") != "dimm":
            continue
        addr = mem.find("address")
        if addr is None or int(addr.get("base", "0"), 0) != prot.dimm_base:
            continue
        assert devs is not None
        devs.remove(mem)
        items.append(f"pc-dimm {prot.dimm_kib} KiB at {prot.dimm_base:#x}")
        for tag in ("memory", "currentMemory"):
            el = root.find(tag)
            if el is not None:
                _set_kib(el, _to_bytes(el) - prot.dimm_kib * _KIB)
        items.append(f"<memory>/<currentMemory> +{prot.dimm_kib} KiB")
    if prot.maxmemory_added:
        mm = root.find("maxMemory")
        if mm is not None:
            root.remove(mm)
            items.append(f"<maxMemory slots='1'> {(mm.text or '').strip()} KiB")
    cpu = root.find("cpu")
    numa = None if cpu is None else cpu.find("numa")
    if prot.numa_added and cpu is not None and numa is not None:
        cells = numa.findall("cell")
        cpu.remove(numa)
        if len(cpu) == 0 and not cpu.attrib:
            root.remove(cpu)
        items.append(_describe_numa(cells[0] if len(cells) == 1 else None))
    return items


def _describe_numa(cell: ET.Element | None) -> str:
    if cell is None:
        return "NUMA topology"
    return (f"NUMA node 0 (cpus {cell.get('cpus')}, {cell.get('memory')} "
            f"{cell.get('unit', 'KiB')})")


def _insert_after(root: ET.Element, new: ET.Element, after: tuple[str, ...]) -> None:
    """Insert `new` after the last present sibling among `after` (libvirt's element order)."""
    pos = 0
    for i, child in enumerate(root):
        if child.tag in after:
            pos = i + 1
    root.insert(pos, new)


def _apply(root: ET.Element, prot: Protection) -> list[str]:
    items: list[str] = []
    meta = root.find("metadata")
    if meta is None:
        meta = ET.Element("metadata")
        _insert_after(root, meta, ("name", "uuid", "genid", "title", "description"))
    el = ET.SubElement(meta, _m("protect"), prot.to_attrib())
    el.tail = None
    items.append(_describe_meta(prot))

    if prot.reservation == "memmap":
        os_el = root.find("os")
        assert os_el is not None
        cmd = os_el.find("cmdline")
        if cmd is None:
            cmd = ET.Element("cmdline")
            _insert_after(os_el, cmd, ("type", "loader", "nvram", "kernel", "initrd"))
        words = (cmd.text or "").split()
        words.append(prot.cmdline_param)
        cmd.text = " ".join(words)
        items.append(f"kernel cmdline {prot.cmdline_param}")
    else:
        items += _apply_dimm(root, prot)

    cl = root.find(_q("commandline"))
    if cl is None:
        cl = ET.SubElement(root, _q("commandline"))
    args = prot.qemu_args()
    for opt, val in zip(args[::2], args[1::2], strict=True):
        ET.SubElement(cl, _q("arg"), {"value": opt})
        ET.SubElement(cl, _q("arg"), {"value": val})
        items.append(f"qemu:arg {opt} {val}")
    return items


def _apply_dimm(root: ET.Element, prot: Protection) -> list[str]:
    items: list[str] = []
    mem = root.find("memory")
    if mem is None:
        raise ProtectError("domain XML has no <memory>")
    total = _to_bytes(mem)
    if prot.maxmemory_added:
        mm = ET.Element("maxMemory", {"slots": "1", "unit": "KiB"})
        mm.text = str((total + _GIB) // _KIB)
        _insert_after(root, mm, ("name", "uuid", "genid", "title", "description", "metadata"))
        items.append(f"<maxMemory slots='1'> {mm.text} KiB")
    else:
        have = root.find("maxMemory")
        assert have is not None
        if _to_bytes(have) < total + prot.dimm_kib * _KIB:
            raise ProtectError("<maxMemory> leaves no room for the vmwipe pc-dimm")
        if int(have.get("slots", "0")) < 1 + len(_dimms(root)):
            raise ProtectError("<maxMemory slots=...> has no free slot for the vmwipe pc-dimm")
    if prot.numa_added:
        ram = initial_memory(root)
        vcpus = int((root.findtext("vcpu") or "1").strip())
        cpu = root.find("cpu")
        if cpu is None:
            cpu = ET.Element("cpu")
            _insert_after(root, cpu, ("name", "uuid", "genid", "title", "description",
                                      "metadata", "maxMemory", "memory", "currentMemory",
                                      "blkiotune", "memtune", "memoryBacking", "vcpu",
                                      "vcpus", "iothreads", "cputune", "numatune",
                                      "resource", "sysinfo", "bootloader", "os", "idmap",
                                      "features"))
        numa = ET.SubElement(cpu, "numa")
        cpus = "0" if vcpus == 1 else f"0-{vcpus - 1}"  # libvirt writes "0-0" as "0"
        cell = ET.SubElement(numa, "cell", {"id": "0", "cpus": cpus,
                                            "memory": str(ram // _KIB), "unit": "KiB"})
        items.append(_describe_numa(cell))
    for tag in ("memory", "currentMemory"):
        el = root.find(tag)
        if el is not None:
            _set_kib(el, _to_bytes(el) + prot.dimm_kib * _KIB)
    items.append(f"<memory>/<currentMemory> +{prot.dimm_kib} KiB")
    devs = root.find("devices")
    if devs is None:
        devs = ET.SubElement(root, "devices")
    dimm = ET.SubElement(devs, "memory", {"model": "dimm"})
    target = ET.SubElement(dimm, "target")
    size = ET.SubElement(target, "size", {"unit": "KiB"})
    size.text = str(prot.dimm_kib)
    node = ET.SubElement(target, "node")
    node.text = "0"
    ET.SubElement(dimm, "address", {"type": "dimm", "slot": "0", "base": f"{prot.dimm_base:#x}"})
    items.append(f"pc-dimm {prot.dimm_kib} KiB at {prot.dimm_base:#x}")
    return items


def _serialize(root: ET.Element) -> str:
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def protect_xml(
    xml_text: str,
    state_dir: Path = STATE_DIR,
    size: int = DEFAULT_SIZE,
    reservation: str = "auto",
    require_crng: bool = False,
) -> Edit:
    """Add (or refresh) the vmwipe additions; unchanged XML text when already current.

    `require_crng` is set or cleared as given: protecting again without it drops it."""
    root = parse_domain(xml_text)
    before, old = _strip(root)
    if reservation == "auto" and old is not None:
        reservation = old.reservation
    prot = replace(plan_protection(root, state_dir, size, reservation), require_crng=require_crng)
    if prot.reservation == "dimm" and old is not None and old.reservation == "dimm":
        prot = replace(prot, maxmemory_added=old.maxmemory_added, numa_added=old.numa_added)
    after = _apply(root, prot)
    if sorted(before) == sorted(after) and old == prot:
        return Edit(xml_text, protection=prot)
    return Edit(
        _serialize(root),
        added=[x for x in after if x not in before],
        removed=[x for x in before if x not in after],
        protection=prot,
    )


def unprotect_xml(xml_text: str) -> Edit:
    """Remove every vmwipe addition; unchanged XML text when there is none."""
    root = parse_domain(xml_text)
    removed, _old = _strip(root)
    if not removed:
        return Edit(xml_text)
    return Edit(_serialize(root), removed=removed)


def qemu_commandline(root: ET.Element) -> list[str]:
    """The `<qemu:arg>` values of a domain, in order."""
    cl = root.find(_q("commandline"))
    return [] if cl is None else [a.get("value", "") for a in cl.findall(_q("arg"))]


# --- files ---------------------------------------------------------------------------


def prepare_files(prot: Protection, qemu_user: str = "libvirt-qemu") -> list[str]:
    """Write SSDT and zero page, create the monitor directory; return what was created.

    QEMU runs as `qemu_user` and creates the monitor socket itself, so the
    socket directory belongs to that user (mode 0700: root reaches it anyway).
    The SSDT and the zero page are world-readable, like a kernel image.
    """
    from ..qemu.vmconfig import write_vm_config

    done: list[str] = []
    files = Path(prot.ssdt).parent
    existed = Path(prot.ssdt).exists() and Path(prot.zero_page).exists()
    files.mkdir(parents=True, exist_ok=True)
    # QEMU (another uid) must traverse STATE/domains/UUID to open the files.
    for d in (files, files.parent, files.parent.parent):
        mode = d.stat().st_mode
        if mode & 0o011 != 0o011:
            os.chmod(d, mode | 0o011)
    cfg = write_vm_config(prot.region, files)
    if cfg.ssdt_path != str(Path(prot.ssdt).resolve()):  # pragma: no cover - name drift
        raise ProtectError(f"SSDT written to {cfg.ssdt_path}, expected {prot.ssdt}")
    if not existed:
        done.append(f"wrote {prot.ssdt} and {prot.zero_page}")
    mon = Path(prot.monitor).parent
    if not mon.is_dir():
        mon.mkdir(parents=True, mode=0o700)
        done.append(f"created {mon}")
    try:
        import pwd

        pw = pwd.getpwnam(qemu_user)
    except KeyError:
        pw = None
    if pw is not None and os.geteuid() == 0:
        st = mon.stat()
        if st.st_uid != pw.pw_uid:
            os.chown(mon, pw.pw_uid, pw.pw_gid)
            done.append(f"{mon} now belongs to {qemu_user}")
    return done
