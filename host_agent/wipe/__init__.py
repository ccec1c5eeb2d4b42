"""The wipe core: guest RAM, the backends that write it, and the engine.

- `memmap`: guest RAM ranges from `info mtree -f` and `gpa2hva`;
- `backends`: the process_vm and shared-file memory backends behind one interface;
- `_pages` (C, `_pages.c`): the shared backend's zero and verify loops;
- `engine`: validate the untrusted table, zero, verify, commit.

It knows no QMP: the map is built from a callable that runs an HMP line.
"""
