"""Test lab for the guest side: build an initramfs with vmwipe.ko and boot it under QEMU.

Used by tests/test_kmod.py and by anyone who wants to poke at a real guest:

    from vmwipe.lab import GuestConfig, Guest, build_guest_image, default_kernel
    with Guest(GuestConfig(build_guest_image(default_kernel()))) as g:
        g.console.check("insmod /vmwipe.ko")
        print(g.table())
"""

from .build import (
    BuildError,
    GuestImage,
    Kernel,
    build_dynamic,
    build_guest_image,
    build_initramfs,
    build_module,
    build_programs,
    default_kernel,
    installed_kernels,
)
from .guest import CommandResult, Console, Guest, GuestConfig, GuestError, default_accel

__all__ = [
    "BuildError", "CommandResult", "Console", "Guest", "GuestConfig", "GuestError", "GuestImage",
    "Kernel", "build_dynamic", "build_guest_image", "build_initramfs", "build_module",
    "build_programs", "default_accel", "default_kernel", "installed_kernels",
]
