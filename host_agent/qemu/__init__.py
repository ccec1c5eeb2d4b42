"""QEMU primitives: what the agent learns from, and asks of, one QEMU process.

- `qmp`: the synchronous QMP/HMP session, and the QEMU PID behind its socket
  (SO_PEERCRED);
- `monitor`: the `Monitor` protocol (cmd/hmp/status) every caller that drives a
  QEMU accepts, whether over `QMPSession` or libvirt's own monitor;
- `region`: the vmwipe region and the reset guard, from QEMU's command line;
- `launcher`: start and stop QEMU processes (clones, tests);
- `vmconfig`: the SSDT, zero page and QEMU arguments a protected VM carries.

Nothing here knows guest RAM or the wipe: `qemu/` and `wipe/` do not import
each other.
"""
