"""QEMU's option syntax, both ways: read what a command line says, write values into one.

Reading: `-device`/`-object` take `key=value,...` (the first bare word is the
implied key, `driver` or `qom-type`; `,,` is a literal comma) or, from QEMU 6.2
on, a JSON object; booleans are spelled on/off, yes/no, true/false, y/n.  A
check that looks only at `share=on` or only at the first word misses the other
spellings of the same option.

Writing: a value that came from a file (a sidecar, a manifest) or a user must
not add options of its own.  An id must follow QEMU's id rules, so a name like
`pc.ram,prealloc=on` is refused rather than pasted; a path gets its commas doubled.
"""

from __future__ import annotations

import json
import re

from .region import split_qemu_opts

_TRUE = frozenset({"on", "yes", "true", "y"})
#: QEMU's id_wellformed(): a letter, then letters, digits, '-', '.' and '_'.
_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")


def option_dict(value: str, implied: str = "driver") -> dict[str, str]:
    """A `-device`/`-object` value as a dict, classic or JSON; the type is under "".

    `implied` is the key a leading bare word stands for (`driver` for -device,
    `qom-type` for -object); `implied=VALUE` anywhere counts the same.
    """
    if value.lstrip().startswith("{"):
        try:
            obj = json.loads(value)
        except ValueError:
            return {}
        if not isinstance(obj, dict):
            return {}
        out = {str(k): _json_str(v) for k, v in obj.items()}
    else:
        out = split_qemu_opts(value)
    if implied in out and "" not in out:
        out[""] = out[implied]
    return out


def _json_str(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def is_true(value: str) -> bool:
    """Whether a boolean option value means true, in any spelling QEMU accepts."""
    return value.strip().lower() in _TRUE


def is_on(opts: dict[str, str], key: str) -> bool:
    """Whether boolean option `key` is set to true."""
    return is_true(opts.get(key, "off"))


def valid_id(name: str) -> bool:
    """Whether QEMU accepts `name` as an object or device id (and it adds no option)."""
    return _ID.fullmatch(name) is not None


def escape(value: str) -> str:
    """`value` as one option value: commas doubled, so it cannot end the option."""
    return value.replace(",", ",,")
