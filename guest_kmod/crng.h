/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Between vmwipe_core.c, crng.c (the kernel CRNG as fill ranges) and
 * ksecrets.c (the kernel's other per-boot secrets); module-internal.
 */
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

/* vmwipe_core.c: the kernel's other secrets for the host (VMWIPE_KSECRET* mask, ranges). */
void vmwipe_ksecrets_status(struct vmwipe *vmw, u32 mask, u32 ranges);

/* crng.c: a static object of the core kernel by name, and its kallsyms size; or NULL. */
void *vmwipe_lookup(struct device *dev, const char *name, unsigned long *size);
/* crng.c: the crng_refresh module parameter. */
bool vmwipe_crng_enabled(void);
/* crng.c: find, check and list the CRNG state; never fails the bind. */
void vmwipe_crng_probe(struct device *dev, struct vmwipe *vmw);
/* crng.c: called once the host has wiped (a new wipe_generation). */
void vmwipe_crng_wiped(void);
extern struct device_attribute dev_attr_crng_refresh;

/* ksecrets.c: list the kernel's other secrets drawn so far; never fails the bind. */
void vmwipe_ksecrets_probe(struct device *dev, struct vmwipe *vmw);
/* ksecrets.c: from the watch, list the ones drawn since. */
void vmwipe_ksecrets_poll(struct device *dev, struct vmwipe *vmw);
extern struct device_attribute dev_attr_kernel_secrets;

#endif /* _VMWIPE_CRNG_H */
