/* SPDX-License-Identifier: MIT */
/*
 * libvmwipe: memory that the hypervisor zeroes before a restored snapshot or
 * a clone of this VM runs again (backed by /dev/vmwipe from vmwipe.ko).
 *
 * Keep keys and RNG state there and check them before use: a page that reads
 * as zero has been wiped, so reseed. The memory is not inherited by fork(),
 * not in core dumps, never swapped, and counts against RLIMIT_MEMLOCK.
 */
#ifndef LIBVMWIPE_H
#define LIBVMWIPE_H

#include <stddef.h>

#define VMWIPE_DEVICE "/dev/vmwipe"

/* Zeroed, page-aligned memory of at least @size bytes; NULL and errno on error. */
void *vmwipe_alloc(size_t size);

/* Release memory from vmwipe_alloc(); @size as passed to it. */
void vmwipe_free(void *p, size_t size);

#endif
