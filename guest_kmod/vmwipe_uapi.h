/* SPDX-License-Identifier: (GPL-2.0-only WITH Linux-syscall-note) OR MIT */
/*
 * ioctls of /dev/vmwipe (vmwipe.ko), for kernel and user space alike.
 * Hand-written: the wire protocol's constants live in the generated
 * vmwipe_abi.h; this file is only the device's user ABI.
 */
#ifndef _VMWIPE_UAPI_H
#define _VMWIPE_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* A range of the caller's address space. */
struct vmwipe_range {
	__u64 addr;	/* page aligned */
	__u64 len;	/* bytes, > 0, rounded up to whole pages */
};

/*
 * Unused as an ioctl type in ioctl-number.rst and in the uapi headers up to
 * 7.3 (0xB7 is nsfs's NSIO, 0xB8 mshv's, 0xBA liveupdate's).
 */
#define VMWIPE_IOC_MAGIC	0xBB

/*
 * mmap() offset of /dev/vmwipe for fill pages: instead of zeroing them, the
 * host writes fresh random bytes over each whole page before a restored
 * image or a clone runs. A DRBG key kept there is re-keyed with host entropy,
 * with no detection code. Offset 0 maps pages the host zeroes.
 */
#define VMWIPE_MMAP_FILL	0x1000

/*
 * Pin the caller's existing private anonymous pages in the range and list
 * them in the table, so that the host zeroes them on restore or clone.
 * Errors: EINVAL (alignment, not private anonymous), ENOMEM (a hole),
 * EFAULT (not writable), EEXIST (a page is already registered), ENOSPC (not
 * enough free slots), EAGAIN (over RLIMIT_MEMLOCK).
 */
#define VMWIPE_IOC_REGISTER	_IOW(VMWIPE_IOC_MAGIC, 1, struct vmwipe_range)

/*
 * Undo every registration of the caller lying wholly inside the range.
 * The pages stay mapped with their contents. ENOENT if there was none.
 */
#define VMWIPE_IOC_UNREGISTER	_IOW(VMWIPE_IOC_MAGIC, 2, struct vmwipe_range)

#endif /* _VMWIPE_UAPI_H */
