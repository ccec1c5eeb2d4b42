/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * In-kernel API of vmwipe.ko: zeroed pages that the hypervisor wipes before a
 * restored snapshot or a clone of this VM runs again. Keep keys and RNG
 * state in them; find them zeroed after a wipe and re-key.
 */
#ifndef _VMWIPE_H
#define _VMWIPE_H

struct page;

struct page *vmwipe_alloc_pages(unsigned int order);
void vmwipe_free_pages(struct page *page, unsigned int order);

#endif /* _VMWIPE_H */
