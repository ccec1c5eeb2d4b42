"""vmwipe host agent: zero the guest pages a vmwipe table lists before a paused VM runs.

The agent talks to QEMU over QMP, learns the guest memory map from HMP, reads the
untrusted v1 table out of guest RAM, zeroes the listed pages through a direct
memory backend (QEMU has no command that writes guest RAM), verifies the result
and only then lets the VM resume.

Subpackages by layer; a module imports only its own subpackage and the layers
below it (tests/test_layout.py checks this):

- `errors`, `atomic`, `timing`: every error and exit code; atomic file
  replacement; the phase timer;
- `qemu`: the QMP session, the `Monitor` protocol, region and reset guard,
  QEMU processes, the files and arguments a protected VM carries;
- `wipe`: guest RAM map, memory backends, the validate/zero/verify/commit
  engine (it knows no QMP; `qemu` and `wipe` do not import each other);
- `snapshot`: migration streams, libvirt save images, sidecars, the scrub;
- `flows`: the one path to a wipe target, and inspect, wipe, restore,
  loadvm, save, save --scrub, clone;
- `libvirt`: domain XML, the API-driven flows, the hook and its installer;
- `cli`: the `vmwipe` command;
- `libvirt_hook`: only the old import path of hooks installed before this layout.
"""
