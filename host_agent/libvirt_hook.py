"""Compatibility path for libvirt hooks installed before the subpackage layout.

Such a hook runs `from vmwipe.host_agent.libvirt_hook import main` on every
domain operation.  Without this module that import fails and the hook's own
fallback refuses every protected domain until someone runs `vmwipe libvirt
install-hook` again.  New hooks import `vmwipe.host_agent.libvirt.hook`.
"""

from .libvirt.hook import main

__all__ = ["main"]
