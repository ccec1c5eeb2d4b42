"""The operations behind the commands, on a live QEMU.

- `target`: the one path to a wipe target (region, reset guard, RAM map, backend)
  for every caller, the libvirt ones included;
- `migration`: the outgoing migration both savers run (bandwidth, wait loop);
- `report`: the report every flow returns; `runstate`: wait out a load, resume last;
- `incoming`: load a saved state into a waiting QEMU (URI, capabilities, ends paused);
- `live`: inspect, wipe, restore, loadvm; `save`: `vmwipe save` and its scrub sidecar;
- `fleet`: start N clone QEMUs and prepare each, killing all on any failure;
- `clone`: a fleet that restores a saved state into each clone;
- `save_scrub`: `vmwipe save --scrub`, a save whose listed pages go out as zeros;
- `template`: `vmwipe template`, a share=on RAM file scrubbed in place plus device state;
- `template_manifest`: what a template records, and how a changed RAM file is caught;
- `template_clone`: `vmwipe clone --template`, copy-on-write clones checked and wiped.
"""
