"""vmwipe host agent: zero the guest pages a vmwipe table lists before a paused VM runs.

The agent talks to QEMU over QMP, learns the guest memory map from HMP, reads the
untrusted v1 table out of guest RAM, zeroes the listed pages through a direct
memory backend (QEMU has no command that writes guest RAM), verifies the result
and only then lets the VM resume.  Every module here does one job:

- `qmp`: synchronous QMP/HMP session with typed errors and event waits.
- `peercred`: the QEMU PID behind a QMP unix socket.
- `memmap`: guest RAM ranges from `info mtree -f` and `gpa2hva`.
- `memaccess`: process_vm and shared-file backends behind one interface.
- `region`: region discovery from QEMU's command line and the reset guard.
- `wipe`: the validate/zero/verify/commit engine.
- `flows`: inspect, wipe, restore, loadvm, save.
- `launcher` and `clone`: start QEMU processes and clone a saved state.
- `cli`: the `vmwipe` command.
"""
