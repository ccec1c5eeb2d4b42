"""The operations behind the commands, on a live QEMU.

- `target`: the one path to a wipe target (region, reset guard, RAM map, backend)
  for every caller, the libvirt ones included;
- `migration`: the outgoing migration both savers run (bandwidth, wait loop);
- `live`: inspect, wipe, restore, loadvm, save;
- `clone`: start N QEMUs and restore a saved state into each;
- `save_scrub`: `vmwipe save --scrub`, a save whose listed pages go out as zeros;
- `template`: `vmwipe template`, a share=on RAM file scrubbed in place plus device state;
- `template_manifest`: what a template records, and how a changed RAM file is caught;
- `template_clone`: `vmwipe clone --template`, copy-on-write clones checked and wiped.
"""
