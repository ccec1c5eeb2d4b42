"""The template directory's manifest: what a clone must match, and how a changed file is caught.

A template is three things: the RAM file (the template QEMU's `share=on`
`memory-backend-file`), the device state (`devstate`, migrated with
x-ignore-shared, so it holds no RAM) and `manifest.json`.  Clones map the RAM
file privately, so every byte of it shows through in every page a clone has not
written yet: a file changed after the template was made (edited in place, or
replaced by rename) would hand every clone RAM the agent never scrubbed.

Two checks, because neither alone is enough:

- the file's identity (device, inode, size, mtime, ctime): catches a replace by
  rename and any write through the file system.  ctime cannot be set from user
  space.  It is cheap, so it is checked around every clone.
- SHA-256 of the whole file: catches writes that change no timestamps (a
  MAP_SHARED mapping of a tmpfs file never updates mtime).  A sampled or keyed
  digest would be cheaper only by reading less, and would then miss a single
  edited page; SHA-256 runs at ~600 MB/s here, so it is computed once per
  `vmwipe clone` invocation (not per clone) before any clone starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..errors import TemplateError
from ..progress import task
from ..qemu.opts import valid_id

FORMAT = "vmwipe-template/1"
MANIFEST = "manifest.json"
DEVSTATE = "devstate"
#: Read size for hashing: large enough that Python's loop costs nothing next to SHA-256.
_HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class FileIdentity:
    """What stat(2) says about the RAM file; any difference means it is not the same file."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileIdentity:
        st = os.stat(path)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def same_inode(self, dev: int, ino: int) -> bool:
        return (self.dev, self.ino) == (dev, ino)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read sequentially (no mapping: the file may be huge), with
    progress: a template's RAM file takes seconds."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f, \
            task(f"sha256 {os.path.basename(path)}", os.fstat(f.fileno()).st_size) as t:
        while n := f.readinto(buf):
            h.update(view[:n])
            t.update(t.done + n)
    return h.hexdigest()


@dataclass
class Manifest:
    """Everything a clone is checked against (see the module docstring)."""

    qemu_version: str
    machine: str
    backend_id: str
    ram_size: int
    ram_path: str
    ram_layout: list[dict[str, int | str]]  # the flat view's RAM ranges: gpa, size, block, offset
    region: tuple[int, int]
    ram_identity: FileIdentity
    ram_sha256: str
    devstate_sha256: str
    header_generation: int | None  # after the template's own wipe; None: nothing registered
    scrubbed_pages: int
    format: str = FORMAT
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST
        write_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode(), mode=0o600)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Manifest:
        path = Path(directory) / MANIFEST
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise TemplateError(f"cannot read template manifest {path}: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise TemplateError(f"{path} is not a {FORMAT} manifest")
        try:
            raw["ram_identity"] = FileIdentity(**raw["ram_identity"])
            raw["region"] = tuple(raw["region"])
            manifest = cls(**raw)
        except (TypeError, KeyError) as e:
            raise TemplateError(f"{path}: malformed manifest: {e}") from None
        manifest.check_names(path)
        return manifest

    def check_names(self, path: Path) -> None:
        """Refuse a backend id or RAM path that could not go onto a clone's QEMU command
        line as exactly one value (the manifest is a file anyone with access may edit)."""
        if not isinstance(self.backend_id, str) or not valid_id(self.backend_id):
            raise TemplateError(f"{path}: backend_id {self.backend_id!r} is not a valid "
                                "QEMU id")
        if (not isinstance(self.ram_path, str) or not os.path.isabs(self.ram_path)
                or "\0" in self.ram_path):
            raise TemplateError(f"{path}: ram_path {self.ram_path!r} is not an absolute path")
        if not isinstance(self.ram_size, int) or self.ram_size <= 0:
            raise TemplateError(f"{path}: ram_size {self.ram_size!r} is not a size")

    def check_identity(self) -> None:
        """Refuse a RAM file that is not the one the template made (cheap: one stat)."""
        try:
            now = FileIdentity.of(self.ram_path)
        except OSError as e:
            raise TemplateError(f"template RAM file {self.ram_path}: {e.strerror}") from None
        if now != self.ram_identity:
            raise TemplateError(
                f"template RAM file {self.ram_path} changed since the template was made "
                f"(stat was {self.ram_identity}, is {now}); refusing to clone it"
            )

    def check_digest(self, directory: str | os.PathLike[str]) -> None:
        """Refuse unless the RAM file and the device state hash to what was recorded."""
        self.check_identity()
        got = sha256_file(self.ram_path)
        if got != self.ram_sha256:
            raise TemplateError(
                f"template RAM file {self.ram_path} does not match its manifest digest "
                "(modified in place?); refusing to clone it"
            )
        self.check_identity()  # not changed while it was being hashed
        dev = Path(directory) / DEVSTATE
        try:
            got = sha256_file(dev)
        except OSError as e:
            raise TemplateError(f"template device state {dev}: {e.strerror}") from None
        if got != self.devstate_sha256:
            raise TemplateError(f"template device state {dev} does not match its manifest digest")
