"""libvirt integration: protected domains, the hook, and the API-driven flows.

- `paths`: every libvirt path and the metadata URN, defined once;
- `domain_xml`: protect/unprotect a domain's persistent XML (no libvirt calls);
- `flows`: wipe a domain through libvirt's monitor; restore, revert, start;
- `hook`: the qemu hook's runtime (`started begin` wipes a restored domain);
- `install`: install/uninstall the hook and the AppArmor rules.
"""
