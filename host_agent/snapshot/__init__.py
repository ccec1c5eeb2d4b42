"""Saved VM state on disk: reading, rewriting and scrubbing it.

- `migstream`: walk and rewrite QEMU's migration stream (file or pipe); `_ramwalk` (C,
  `_ramwalk.c`) hops over its bulk RAM records and looks up listed pages;
- `saveimage`: the libvirt save image header around a stream;
- `machine`: guest-physical RAM layout of pc and q35 machines;
- `sidecar`: `FILE.vmwipe.json`, the region and RAM map `vmwipe save` records;
- `replace`: put a scrubbed copy in place of a file (atomically, owner kept);
- `scrub`: plan and run `vmwipe scrub FILE`.
"""
