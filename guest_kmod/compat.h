/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * What differs between the kernels vmwipe builds for (5.10 on), decided by
 * compiling probes against the kernel's headers (compat-probes.sh, run by
 * Kbuild), never by LINUX_VERSION_CODE: distributions backport.
 */
#ifndef _VMWIPE_COMPAT_H
#define _VMWIPE_COMPAT_H

#include <crypto/blake2s.h>
#include <linux/mm.h>
#include <linux/mmzone.h>
#include <linux/pm.h>
#include <linux/random.h>

#include "compat-probed.h"

/* 5.11 renamed vm_operations_struct.split to may_split. */
#ifdef VMWIPE_HAVE_VM_MAY_SPLIT
#define VMWIPE_VM_SPLIT may_split
#else
#define VMWIPE_VM_SPLIT split
#endif

#ifndef VMWIPE_HAVE_VMA_LOOKUP
/* The VMA that contains @addr, or NULL (5.14). */
static inline struct vm_area_struct *vma_lookup(struct mm_struct *mm, unsigned long addr)
{
	struct vm_area_struct *vma = find_vma(mm, addr);

	return vma && addr >= vma->vm_start ? vma : NULL;
}
#endif

/*
 * May a FOLL_LONGTERM pin keep @page where it is, rather than migrate it
 * away? Not in ZONE_MOVABLE, not in CMA. Whether the page itself is CMA
 * takes its pageblock's migratetype, which modules cannot read from 7.x on
 * (get_pfnblock_migratetype is not exported, so neither is
 * folio_is_longterm_pinnable usable): refuse every page of a zone that has
 * CMA pages at all (none unless the kernel was booted with cma= or the like).
 */
static inline bool vmwipe_longterm_pinnable(struct page *page)
{
	if (page_zonenum(page) == ZONE_MOVABLE)
		return false;
#ifdef VMWIPE_HAVE_ZONE_CMA_PAGES
	return !zone_cma_pages(page_zone(page));
#else
	return !is_migrate_cma_page(page);
#endif
}

/* Set @set and clear @clear in vma->vm_flags (read-only from 6.3 on). */
static inline void vmwipe_vm_flags_mod(struct vm_area_struct *vma, unsigned long set,
				       unsigned long clear)
{
#ifdef VMWIPE_HAVE_VM_FLAGS_MOD
	vm_flags_mod(vma, set, clear);
#else
	vma->vm_flags = (vma->vm_flags | set) & ~clear;
#endif
}

/* pin_user_pages() lost its vmas argument in 6.5. */
static inline long vmwipe_pin_user_pages(unsigned long start, unsigned long n,
					 unsigned int flags, struct page **pages)
{
#ifdef VMWIPE_HAVE_PIN_WITHOUT_VMAS
	return pin_user_pages(start, n, flags, pages);
#else
	return pin_user_pages(start, n, flags, pages, NULL);
#endif
}

#ifndef VMWIPE_HAVE_VMFORK_NOTIFIER
/*
 * No vmfork notifier (before 6.1, and Debian's 5.10): no vmgenid driver to
 * hear a VM fork from either, so wipe_generation is only polled (poll_ms).
 */
static inline int register_random_vmfork_notifier(struct notifier_block *nb)
{
	return 0;
}

static inline int unregister_random_vmfork_notifier(struct notifier_block *nb)
{
	return 0;
}
#endif

#ifndef VMWIPE_HAVE_PM_SLEEP_PTR
/* 5.17, and only later 5.10 stable releases (5.10.0-46 has it, 5.10.0-43 not). */
#define pm_sleep_ptr(_ptr) (IS_ENABLED(CONFIG_PM_SLEEP) ? (_ptr) : NULL)
#endif

/* Is guest memory private to the guest (SEV, TDX)? cc_platform_has() from 5.16 on. */
#ifdef VMWIPE_HAVE_CC_PLATFORM
#include <linux/cc_platform.h>
static inline bool vmwipe_mem_encrypted(void)
{
	return cc_platform_has(CC_ATTR_GUEST_MEM_ENCRYPT);
}
#else
#include <linux/mem_encrypt.h>
static inline bool vmwipe_mem_encrypted(void)
{
	return mem_encrypt_active();	/* SEV; TDX guests came later */
}
#endif

/* The BLAKE2s state of random.c's input pool: struct blake2s_ctx from 6.19 on. */
#ifdef VMWIPE_HAVE_BLAKE2S_CTX
typedef struct blake2s_ctx vmwipe_blake2s_t;
#else
typedef struct blake2s_state vmwipe_blake2s_t;
#endif

#endif /* _VMWIPE_COMPAT_H */
