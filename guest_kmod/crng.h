/* SPDX-License-Identifier: GPL-2.0-only */
/* Between vmwipe_core.c and crng.c (the kernel CRNG as fill ranges); module-internal. */
#ifndef _VMWIPE_CRNG_H
#define _VMWIPE_CRNG_H

#include <linux/device.h>
#include <linux/types.h>

struct vmwipe;

/* Kernel memory that lives as long as the kernel, such as static data. */
struct vmwipe_kmem {
	const void *addr;
	size_t len;
};

/*
 * vmwipe_core.c: list @n ranges as fill ranges, one slot per page touched; all
 * or none. Returns the number of slots taken, or a negative errno.
 */
int vmwipe_list_kmem(struct vmwipe *vmw, const struct vmwipe_kmem *ranges, unsigned int n);
/* vmwipe_core.c: the kernel CRNG's state for the host (VMWIPE_CRNG_STATUS_*, ranges, why). */
void vmwipe_crng_status(struct vmwipe *vmw, u32 status, u32 ranges, const char *reason);

/* crng.c: find, check and list the CRNG state; never fails the bind. */
void vmwipe_crng_probe(struct device *dev, struct vmwipe *vmw);
/* crng.c: called once the host has wiped (a new wipe_generation). */
void vmwipe_crng_wiped(void);
extern struct device_attribute dev_attr_crng_refresh;

#endif /* _VMWIPE_CRNG_H */
