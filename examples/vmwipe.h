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

/*
 * The same, but the host fills these pages with fresh random bytes instead of
 * zeroing them (protocol v2 fill ranges): keep a DRBG key there and every
 * restored image or clone runs on with a key of its own, with no detection
 * code. Never use it for sentinels whose "wiped" signal is zero.
 */
void *vmwipe_alloc_fill(size_t size);

/* Release memory from vmwipe_alloc() or vmwipe_alloc_fill(); @size as passed to it. */
void vmwipe_free(void *p, size_t size);

#endif
