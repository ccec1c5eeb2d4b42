// SPDX-License-Identifier: GPL-2.0-only
/*
 * vmwipe: pages that the hypervisor zeroes before a restored snapshot or a
 * clone of this VM runs again.
 *
 * The host describes a reserved range of guest RAM with an ACPI device
 * (_HID "VMWP0001", _CRS = the range). This driver writes a table there
 * (protocol v2, see vmwipe_abi.h) listing every page it hands out; before
 * resuming a restored image the host zeroes the listed pages (or, for fill
 * ranges, writes fresh random bytes there) and bumps wipe_generation in the
 * header. crng.c lists the kernel CRNG's state as fill ranges, ksecrets.c the
 * kernel's other per-boot secrets.
 *
 * Pages are handed out to user space through mmap() of /dev/vmwipe (at
 * offset VMWIPE_MMAP_FILL: pages the host refills instead of zeroing) and to
 * other modules through vmwipe_alloc_pages(); a process can also list pages
 * it already has with VMWIPE_IOC_REGISTER (see vmwipe_uapi.h and struct
 * vmwipe_reg). A read() of /dev/vmwipe
 * returns the last wipe_generation seen (u64, native endian) once, then end
 * of file until the generation changes; poll() reports EPOLLPRI once the
 * generation differs from the one this file last read.
 *
 * A wipe is seen in two ways: the host's wipe_generation in the header, and
 * the witness, module memory listed as a fill range that the module keeps
 * zero, so that any wipe leaves it non-zero. Only the witness survives a
 * wipe done while the guest sleeps in S3: QEMU's reset at wake-up rewrites
 * the loader's zero page over the header, the host's count included.
 */

#include <linux/atomic.h>
#include <linux/bitops.h>
#include <linux/crc32.h>
#include <linux/cred.h>
#include <linux/delay.h>
#include <linux/device.h>
#include <linux/highmem.h>
#include <linux/hmm.h>
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/kobject.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/mod_devicetable.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/platform_device.h>
#include <linux/pm.h>
#include <linux/poll.h>
#include <linux/random.h>
#include <linux/refcount.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/sched/user.h>
#include <linux/sizes.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <linux/xarray.h>

#include "compat.h"
#include "crng.h"
#include "vmwipe.h"
#include "vmwipe_abi.h"
#include "vmwipe_uapi.h"

/* Root only unless a udev rule (60-vmwipe.rules) grants a group access. */
static ushort mode = 0600;
module_param(mode, ushort, 0444);
MODULE_PARM_DESC(mode, "permissions of /dev/vmwipe (default 0600)");

static unsigned int poll_ms = 100;
static int poll_ms_set(const char *val, const struct kernel_param *kp);
static const struct kernel_param_ops poll_ms_ops = {
	.set = poll_ms_set,
	.get = param_get_uint,
};
module_param_cb(poll_ms, &poll_ms_ops, &poll_ms, 0644);
MODULE_PARM_DESC(poll_ms, "period in ms for checking wipe_generation, 0 = only on vmgenid (default 100)");

static unsigned int max_share = 50;
module_param(max_share, uint, 0644);
MODULE_PARM_DESC(max_share, "percent of the table one process without CAP_IPC_LOCK may hold (default 50)");

static unsigned int max_unpriv = 75;
module_param(max_unpriv, uint, 0644);
MODULE_PARM_DESC(max_unpriv, "percent of the table all callers without CAP_IPC_LOCK together may hold; the rest is kept for CAP_IPC_LOCK and the kernel (default 75)");

struct vmwipe {
	struct miscdevice misc;
	struct vmwipe_header *hdr;	/* start of the mapped region */
	struct vmwipe_slot *slots;
	size_t size;
	u32 capacity;

	/*
	 * Free slots, kept in kernel memory: nothing in the region is ever
	 * trusted, since the host (or a stale image) may have written there.
	 */
	spinlock_t lock;
	u32 nfree;
	u32 *free;
	atomic_long_t unpriv;		/* slots charged to callers without CAP_IPC_LOCK */

	/*
	 * What the slots must say, kept in kernel memory so that the table can
	 * be rebuilt after a suspend or hibernation lost the region's copy
	 * (vmwipe_republish). table_lock orders each slot's two copies against
	 * a rebuild.
	 */
	spinlock_t table_lock;
	struct vmwipe_slot *shadow;
	struct vmwipe_header header;	/* as written at probe, magic included */

	/* Registered user ranges (VMWIPE_IOC_REGISTER) and their work. */
	struct mutex reg_lock;
	struct list_head regs;
	struct workqueue_struct *wq;
	struct xarray upages;		/* PFN of each listed user page -> its address */

	/*
	 * The newest wipe_generation seen (under table_lock), and the last one
	 * announced, which read(), poll() and sysfs report. Both only grow.
	 */
	u64 newest;
	u64 generation;
	u8 *witness;			/* VMWIPE_WITNESS_LEN bytes, a fill range */
	wait_queue_head_t wait;
	struct delayed_work watch;
	bool watching;			/* between the watch's start and stop */
	struct notifier_block vmfork;
};

/* The one bound instance, for the in-kernel API. */
static struct vmwipe *vmwipe_instance;

/*
 * Orders poll_ms writes against the watch's start and stop, and against
 * vmwipe_instance going away: under it, a non-NULL instance is still alive.
 */
static DEFINE_MUTEX(vmwipe_watch_lock);

struct vmwipe_file {
	struct vmwipe *vmw;
	u64 seen;
};

/* Who pays for listed pages; all NULL for a caller with CAP_IPC_LOCK. */
struct vmwipe_charge {
	struct user_struct *user;	/* RLIMIT_MEMLOCK, per user */
	const struct cred *cred;	/* holds @user (free_uid is not exported everywhere) */
	struct mm_struct *mm;		/* pinned_vm: the process's share of the table */
	atomic_long_t *unpriv;		/* the share of all such callers together */
};

/* Fill bytes the host writes; the chance that all of them come out zero is 2^-256. */
#define VMWIPE_WITNESS_LEN	32

/* Shared by all VMAs of one mmap() (a VMA is only copied by mremap). */
struct vmwipe_mapping {
	refcount_t refs;
	struct vmwipe *vmw;
	struct vmwipe_charge charge;
	u64 kind;			/* 0 or VMWIPE_SLOT_FILL */
	unsigned long npages;
	u32 *slots;			/* the table slot of each page */
	struct page *pages[];
};

/* Take @n free slots, all or none. */
static int vmwipe_take_slots(struct vmwipe *vmw, u32 *slots, unsigned long n)
{
	unsigned long i;

	spin_lock(&vmw->lock);
	if (vmw->nfree < n) {
		spin_unlock(&vmw->lock);
		return -ENOSPC;
	}
	for (i = 0; i < n; i++)
		slots[i] = vmw->free[--vmw->nfree];
	spin_unlock(&vmw->lock);
	return 0;
}

/* Give back @n slots; the caller has unlisted them, so none still describes a page. */
static void vmwipe_put_slots(struct vmwipe *vmw, const u32 *slots, unsigned long n)
{
	unsigned long i;

	spin_lock(&vmw->lock);
	for (i = 0; i < n; i++)
		vmw->free[vmw->nfree++] = slots[i];
	spin_unlock(&vmw->lock);
}

/* Store one slot in the region: the host may read the table at any moment. */
static void vmwipe_store_slot(struct vmwipe_slot *s, const struct vmwipe_slot *src)
{
	WRITE_ONCE(s->count, src->count);
	WRITE_ONCE(s->offset, src->offset);
	/* count and offset must be in place before VALID is. */
	smp_store_release(&s->word, src->word);
}

/*
 * List in @slot a zero range of @count pages from @phys (@kind 0), or a fill
 * range of @count bytes at @phys, inside one page (@kind VMWIPE_SLOT_FILL).
 */
static void vmwipe_list(struct vmwipe *vmw, u32 slot, phys_addr_t phys, u32 count, u64 kind)
{
	struct vmwipe_slot *shadow = &vmw->shadow[slot];

	spin_lock(&vmw->table_lock);
	shadow->count = cpu_to_le32(count);
	shadow->offset = cpu_to_le32(offset_in_page(phys));
	shadow->word = cpu_to_le64((phys & PAGE_MASK) | kind | VMWIPE_SLOT_VALID);
	vmwipe_store_slot(&vmw->slots[slot], shadow);
	spin_unlock(&vmw->table_lock);
}

/*
 * Once the word is 0 the host no longer touches the pages, so they may be
 * freed. The release orders any zeroing of the pages before it: a snapshot
 * taken in between must not find the secret in a page nobody wipes.
 */
static void vmwipe_unlist(struct vmwipe *vmw, u32 slot)
{
	struct vmwipe_slot *s = &vmw->slots[slot];

	spin_lock(&vmw->table_lock);
	smp_store_release(&s->word, 0);
	WRITE_ONCE(s->count, 0);
	WRITE_ONCE(s->offset, 0);
	memset(&vmw->shadow[slot], 0, sizeof(vmw->shadow[slot]));
	spin_unlock(&vmw->table_lock);
}

/*
 * The caller hands the page out only after this: no secret can predate it.
 * A fill range covers one whole page.
 */
static void vmwipe_publish(struct vmwipe *vmw, u32 slot, struct page *page, u32 npages,
			   u64 kind)
{
	vmwipe_list(vmw, slot, page_to_phys(page), kind ? PAGE_SIZE : npages, kind);
}

static void vmwipe_unpublish(struct vmwipe *vmw, u32 slot, struct page *page, u32 npages)
{
	u32 i;

	for (i = 0; i < npages; i++)
		clear_highpage(page + i);
	vmwipe_unlist(vmw, slot);
}

/**
 * vmwipe_alloc_pages() - allocate zeroed pages that the host wipes
 * @order: allocate 2^@order physically contiguous pages
 *
 * Return: the first page, or NULL if no vmwipe device is bound or out of
 * memory or table slots. Free with vmwipe_free_pages().
 */
struct page *vmwipe_alloc_pages(unsigned int order)
{
	struct vmwipe *vmw = READ_ONCE(vmwipe_instance);
	struct page *page;
	u32 slot;

	if (!vmw)
		return NULL;
	page = alloc_pages(GFP_KERNEL | __GFP_ZERO, order);
	if (!page)
		return NULL;
	if (vmwipe_take_slots(vmw, &slot, 1)) {
		__free_pages(page, order);
		return NULL;
	}
	/* vmwipe_free_pages() is given only the page: keep the slot with it. */
	set_page_private(page, slot);
	vmwipe_publish(vmw, slot, page, 1U << order, 0);
	return page;
}
EXPORT_SYMBOL_GPL(vmwipe_alloc_pages);

/*
 * Never unlisted: the kernel memory outlives the table, which
 * vmwipe_retire() clears as a whole.
 */
int vmwipe_list_kmem(struct vmwipe *vmw, const struct vmwipe_kmem *ranges, unsigned int n)
{
	u32 slots[8];
	unsigned int i, k = 0, need = 0;
	int ret;

	for (i = 0; i < n; i++)
		need += DIV_ROUND_UP(offset_in_page(ranges[i].addr) + ranges[i].len, PAGE_SIZE);
	if (need > ARRAY_SIZE(slots))
		return -E2BIG;
	ret = vmwipe_take_slots(vmw, slots, need);
	if (ret)
		return ret;
	for (i = 0; i < n; i++) {
		const u8 *p = ranges[i].addr, *end = p + ranges[i].len;

		while (p < end) {
			u32 len = min_t(size_t, end - p, PAGE_SIZE - offset_in_page(p));

			vmwipe_list(vmw, slots[k++], slow_virt_to_phys((void *)p), len,
				    VMWIPE_SLOT_FILL);
			p += len;
		}
	}
	return need;
}

/*
 * Tell the host what became of the kernel CRNG (header fields outside the
 * CRC). Kept in vmw->header as well, so that a rebuilt table says it again.
 */
void vmwipe_crng_status(struct vmwipe *vmw, u32 status, u32 ranges, const char *reason)
{
	struct vmwipe_header *h = &vmw->header;

	spin_lock(&vmw->table_lock);
	h->crng_status = cpu_to_le32(status);
	h->crng_ranges = cpu_to_le32(ranges);
	strscpy_pad((char *)h->crng_reason, reason, sizeof(h->crng_reason));
	WRITE_ONCE(vmw->hdr->crng_ranges, h->crng_ranges);
	memcpy(vmw->hdr->crng_reason, h->crng_reason, sizeof(h->crng_reason));
	/* The status last: a host that sees it sees the ranges and reason it vouches for. */
	smp_store_release(&vmw->hdr->crng_status, h->crng_status);
	spin_unlock(&vmw->table_lock);
}

/* The same for the kernel's other secrets: the ranges first, then the mask they back. */
void vmwipe_ksecrets_status(struct vmwipe *vmw, u32 mask, u32 ranges)
{
	struct vmwipe_header *h = &vmw->header;

	spin_lock(&vmw->table_lock);
	h->ksecrets = cpu_to_le32(mask);
	h->ksecrets_ranges = cpu_to_le32(ranges);
	WRITE_ONCE(vmw->hdr->ksecrets_ranges, h->ksecrets_ranges);
	smp_store_release(&vmw->hdr->ksecrets, h->ksecrets);
	spin_unlock(&vmw->table_lock);
}

/**
 * vmwipe_free_pages() - clear, unpublish and free pages
 * @page: first page, as returned by vmwipe_alloc_pages()
 * @order: the order it was allocated with
 */
void vmwipe_free_pages(struct page *page, unsigned int order)
{
	struct vmwipe *vmw = READ_ONCE(vmwipe_instance);
	u32 slot = page_private(page);

	vmwipe_unpublish(vmw, slot, page, 1U << order);
	vmwipe_put_slots(vmw, &slot, 1);
	__free_pages(page, order);
}
EXPORT_SYMBOL_GPL(vmwipe_free_pages);

static u64 vmwipe_percent(struct vmwipe *vmw, unsigned int pct)
{
	return div_u64((u64)vmw->capacity * min(pct, 100U), 100);
}

/*
 * Pinned pages count against RLIMIT_MEMLOCK, as memfd_secret's do, but in the
 * per-user counter that io_uring and perf use rather than per process: one
 * user of the device must pin neither unbounded memory nor every slot.
 * A root in a user namespace can switch uids, so each process is also held
 * to max_share percent of the table, counted in its mm's pinned_vm (with the
 * pages it pinned for RDMA or io_uring, as those count theirs), and all such
 * callers together to max_unpriv percent: however many uids or processes
 * fill their shares, the rest stays for CAP_IPC_LOCK holders and the kernel.
 */
static int vmwipe_charge(struct vmwipe *vmw, unsigned long npages, struct vmwipe_charge *c)
{
	unsigned long limit = rlimit(RLIMIT_MEMLOCK) >> PAGE_SHIFT;
	struct user_struct *user = current_user();
	struct mm_struct *mm = current->mm;
	long cur;
	int ret;

	c->user = NULL;
	c->mm = NULL;
	c->unpriv = NULL;
	if (capable(CAP_IPC_LOCK))
		return 0;
	if (atomic_long_add_return(npages, &vmw->unpriv) >
	    vmwipe_percent(vmw, READ_ONCE(max_unpriv))) {
		ret = -ENOSPC;
		goto undo_unpriv;
	}
	if (atomic64_add_return(npages, &mm->pinned_vm) >
	    vmwipe_percent(vmw, READ_ONCE(max_share))) {
		ret = -ENOSPC;
		goto undo_pinned;
	}
	cur = atomic_long_read(&user->locked_vm);
	do {
		if (cur + npages > limit) {
			ret = -EAGAIN;
			goto undo_pinned;
		}
	} while (!atomic_long_try_cmpxchg(&user->locked_vm, &cur, cur + npages));
	c->cred = get_current_cred();
	c->user = c->cred->user;
	mmgrab(mm);
	c->mm = mm;
	c->unpriv = &vmw->unpriv;
	return 0;

undo_pinned:
	atomic64_sub(npages, &mm->pinned_vm);
undo_unpriv:
	atomic_long_sub(npages, &vmw->unpriv);
	return ret;
}

static void vmwipe_uncharge(struct vmwipe_charge *c, unsigned long npages)
{
	if (c->user) {
		atomic_long_sub(npages, &c->user->locked_vm);
		atomic64_sub(npages, &c->mm->pinned_vm);
		atomic_long_sub(npages, c->unpriv);
	}
}

/* After the last uncharge: drop the references vmwipe_charge() took. */
static void vmwipe_charge_put(struct vmwipe_charge *c)
{
	if (c->user) {
		put_cred(c->cred);
		mmdrop(c->mm);
	}
}

static void vmwipe_mapping_free(struct vmwipe_mapping *m, bool published)
{
	unsigned long i;

	if (published) {
		for (i = 0; i < m->npages; i++) {
			vmwipe_unpublish(m->vmw, m->slots[i], m->pages[i], 1);
			cond_resched();
		}
		vmwipe_put_slots(m->vmw, m->slots, m->npages);
	}
	kvfree(m->slots);
	for (i = 0; i < m->npages && m->pages[i]; i++) {
		__free_page(m->pages[i]);
		cond_resched();
	}
	vmwipe_uncharge(&m->charge, m->npages);
	vmwipe_charge_put(&m->charge);
	kvfree(m);
}

static void vmwipe_vm_open(struct vm_area_struct *vma)
{
	struct vmwipe_mapping *m = vma->vm_private_data;

	refcount_inc(&m->refs);
}

static void vmwipe_vm_close(struct vm_area_struct *vma)
{
	struct vmwipe_mapping *m = vma->vm_private_data;

	/* Called after the page tables are gone: only we use the pages. */
	if (refcount_dec_and_test(&m->refs))
		vmwipe_mapping_free(m, true);
}

/* A split would leave pages without a mapping to free them: no partial munmap. */
static int vmwipe_vm_may_split(struct vm_area_struct *vma, unsigned long addr)
{
	return -EINVAL;
}

static int vmwipe_vm_mremap(struct vm_area_struct *vma)
{
	return -EINVAL;
}

static const struct vm_operations_struct vmwipe_vm_ops = {
	.open = vmwipe_vm_open,
	.close = vmwipe_vm_close,
	.VMWIPE_VM_SPLIT = vmwipe_vm_may_split,
	.mremap = vmwipe_vm_mremap,
};

static int vmwipe_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct vmwipe_file *vf = file->private_data;
	struct vmwipe *vmw = vf->vmw;
	unsigned long i, n = vma_pages(vma);
	struct vmwipe_mapping *m;
	int ret;

	if (!(vma->vm_flags & VM_SHARED) ||
	    (vma->vm_pgoff && vma->vm_pgoff != VMWIPE_MMAP_FILL >> PAGE_SHIFT))
		return -EINVAL;
	if (vma->vm_flags & VM_EXEC)
		return -EPERM;
	if (n > vmw->capacity)
		return -ENOSPC;

	m = kvzalloc(struct_size(m, pages, n), GFP_KERNEL_ACCOUNT);
	if (!m)
		return -ENOMEM;
	refcount_set(&m->refs, 1);
	m->vmw = vmw;
	m->kind = vma->vm_pgoff ? VMWIPE_SLOT_FILL : 0;
	m->npages = n;
	ret = vmwipe_charge(vmw, m->npages, &m->charge);
	if (ret)
		goto err;
	m->slots = kvmalloc_array(n, sizeof(*m->slots), GFP_KERNEL_ACCOUNT);
	if (!m->slots) {
		ret = -ENOMEM;
		goto err;
	}
	/* Charged to the caller's memory cgroup, as its own anonymous memory would be. */
	for (i = 0; i < n; i++) {
		m->pages[i] = alloc_page(GFP_KERNEL_ACCOUNT | __GFP_ZERO);
		if (!m->pages[i]) {
			ret = -ENOMEM;
			goto err;
		}
		cond_resched();
	}
	ret = vmwipe_take_slots(vmw, m->slots, n);
	if (ret)
		goto err;
	for (i = 0; i < n; i++) {
		vmwipe_publish(vmw, m->slots[i], m->pages[i], 1, m->kind);
		cond_resched();
	}

	/* Published, so they may now be mapped. */
	for (i = 0; i < n; i++) {
		ret = vm_insert_page(vma, vma->vm_start + i * PAGE_SIZE, m->pages[i]);
		if (ret) {
			/* Page tables still hold the inserted pages; mmap's unwind drops them. */
			vmwipe_mapping_free(m, true);
			return ret;
		}
	}

	/*
	 * Not inherited by fork(), not in core dumps, never grown or executed.
	 * VM_IO makes madvise() refuse MADV_DOFORK, which would clear
	 * VM_DONTCOPY, and keeps get_user_pages() (O_DIRECT, vmsplice,
	 * /proc/PID/mem) away from the pages.
	 */
	vmwipe_vm_flags_mod(vma, VM_DONTCOPY | VM_DONTDUMP | VM_DONTEXPAND | VM_IO, VM_MAYEXEC);
	vma->vm_ops = &vmwipe_vm_ops;
	vma->vm_private_data = m;
	return 0;

err:
	vmwipe_mapping_free(m, false);
	return ret;
}

/*
 * VMWIPE_IOC_REGISTER: list existing private anonymous pages of a process,
 * e.g. a MADV_WIPEONFORK sentinel of a TLS library, so that programs that
 * know nothing of vmwipe become clone-safe.
 *
 * The pages are pinned (FOLL_LONGTERM), so none of them can be freed or
 * reused while it is listed. An MMU interval notifier follows the range.
 * Its invalidate() runs before the page tables change and in contexts that
 * must not sleep, so it only records the event and queues a work item. The
 * work looks at the range once the change is done (without faulting
 * anything in) and retires every page that is no longer mapped at its
 * address: munmap, mremap, MADV_DONTNEED, exit, a COW replacement. Retiring
 * zeroes the page if nobody maps it any more, unlists it and only then drops
 * the pin, so a retired page stays listed, and owned by us, until it is
 * harmless.
 *
 * A registration belongs to the caller's mm, not to the file: it lasts
 * until VMWIPE_IOC_UNREGISTER, until all its pages are retired, or until
 * the process exits. A child of fork() inherits nothing: its copies of the
 * pages are unlisted (but a MADV_WIPEONFORK range is empty in the child).
 * Pages faulted in later at a registered address are not listed.
 */
struct vmwipe_reg {
	struct mmu_interval_notifier notifier;
	struct vmwipe *vmw;
	struct list_head node;		/* in vmw->regs */
	bool listed;			/* on vmw->regs; under vmw->reg_lock */
	struct work_struct work;	/* retire the pages that left */
	struct vmwipe_charge charge;	/* one page at a time as pages retire */
	unsigned long start, npages;
	unsigned long *pfns;		/* hmm_range_fault() output, for the work */
	u32 *slots;

	spinlock_t lock;		/* pages[], live, dead, notifier seq */
	unsigned long live;		/* pages not yet retired; 0 until listed */
	bool dead;			/* being torn down: queue no more work */
	struct page *pages[];		/* pinned pages, NULL once retired */
};

/*
 * Does any page table still map this very 4 KiB page? For a page of a large
 * folio (THP) page_mapped() answers for the whole folio, which stays mapped
 * when only part of it was unmapped: ask for the page's own mapcount.
 */
static bool vmwipe_page_mapped(struct page *page)
{
#ifdef VMWIPE_HAVE_PAGE_MAPCOUNT
	return page_mapcount(page) > 0;
#else
	/* page_mapcount() is gone; the per-page mapcount is still kept. */
	struct folio *folio = page_folio(page);

	if (!folio_test_large(folio))
		return folio_mapped(folio);
	return atomic_read(&page->_mapcount) >= 0 || folio_entire_mapcount(folio) > 0;
#endif
}

/*
 * Unlist page @i and drop its pin; zero it first if nobody else can see it.
 * Sleeps: called outside reg->lock, by the only one that changes pages[].
 */
static void vmwipe_reg_drop(struct vmwipe_reg *reg, unsigned long i, bool zero)
{
	struct page *page = reg->pages[i];

	spin_lock(&reg->lock);
	reg->pages[i] = NULL;
	reg->live--;
	spin_unlock(&reg->lock);
	if (zero)
		clear_highpage(page);
	vmwipe_unlist(reg->vmw, reg->slots[i]);
	xa_erase(&reg->vmw->upages, page_to_pfn(page));
	/* Only now may the page be freed and reused. */
	unpin_user_page(page);
	vmwipe_put_slots(reg->vmw, &reg->slots[i], 1);
	vmwipe_uncharge(&reg->charge, 1);
}

static bool vmwipe_reg_invalidate(struct mmu_interval_notifier *mni,
				  const struct mmu_notifier_range *range,
				  unsigned long cur_seq)
{
	struct vmwipe_reg *reg = container_of(mni, struct vmwipe_reg, notifier);

	/* Never sleeps: fine for non-blockable ranges (the OOM reaper) too. */
	spin_lock(&reg->lock);
	mmu_interval_set_seq(mni, cur_seq);
	switch (range->event) {
	case MMU_NOTIFY_PROTECTION_VMA:	/* mprotect() */
	case MMU_NOTIFY_PROTECTION_PAGE:	/* fork() write-protecting */
	case MMU_NOTIFY_SOFT_DIRTY:
		break;		/* the same pages stay mapped */
	default:
		if (!reg->dead)
			queue_work(reg->vmw->wq, &reg->work);
	}
	spin_unlock(&reg->lock);
	return true;
}

static const struct mmu_interval_notifier_ops vmwipe_reg_ops = {
	.invalidate = vmwipe_reg_invalidate,
};

/*
 * Tear down a registration nobody else can reach any more (off the list,
 * or never on it). @self: called from its own work item.
 */
static void vmwipe_reg_destroy(struct vmwipe_reg *reg, bool self)
{
	unsigned long i;

	spin_lock(&reg->lock);
	reg->dead = true;
	spin_unlock(&reg->lock);
	/* Waits for a running invalidate(); none runs after it returns. */
	mmu_interval_notifier_remove(&reg->notifier);
	if (self)
		cancel_work(&reg->work);	/* a requeue of ourselves */
	else
		cancel_work_sync(&reg->work);
	for (i = 0; i < reg->npages; i++) {
		if (reg->pages[i])
			vmwipe_reg_drop(reg, i, !vmwipe_page_mapped(reg->pages[i]));
		cond_resched();
	}
	vmwipe_charge_put(&reg->charge);
	kvfree(reg->pfns);
	kvfree(reg->slots);
	kvfree(reg);
	module_put(THIS_MODULE);
}

/*
 * PROT_NONE hides a page from the walk: count it as still there. (mprotect
 * does not take pages away; a page dropped meanwhile stays pinned and
 * listed, harmlessly, until unregister or exit.)
 */
static void vmwipe_reg_unseen(struct vmwipe_reg *reg, struct mm_struct *mm)
{
	struct vm_area_struct *vma;
	unsigned long i;

	for (i = 0; i < reg->npages; i++) {
		if (!reg->pages[i] || (reg->pfns[i] & HMM_PFN_VALID))
			continue;
		vma = vma_lookup(mm, reg->start + (i << PAGE_SHIFT));
		if (vma && !(vma->vm_flags & VM_READ))
			reg->pfns[i] = page_to_pfn(reg->pages[i]) | HMM_PFN_VALID;
	}
}

static void vmwipe_reg_work(struct work_struct *work)
{
	struct vmwipe_reg *reg = container_of(work, struct vmwipe_reg, work);
	struct vmwipe *vmw = reg->vmw;
	struct mm_struct *mm = reg->notifier.mm;
	struct hmm_range range = {
		.notifier = &reg->notifier,
		.start = reg->start,
		.end = reg->start + (reg->npages << PAGE_SHIFT),
		.hmm_pfns = reg->pfns,
		/* No REQ_FAULT flags: only look at the page tables. */
	};
	bool exiting, mine;
	unsigned long i;
	int ret = 0;

	spin_lock(&reg->lock);
	i = reg->live;
	spin_unlock(&reg->lock);
	if (!i)
		return;		/* not listed yet, or all retired */

	/* Only this work changes pages[] once live is set; read it unlocked. */
	exiting = !mmget_not_zero(mm);
	if (!exiting) {
		do {
			/* Sleeps until a running invalidation has changed the tables. */
			range.notifier_seq = mmu_interval_read_begin(&reg->notifier);
			mmap_read_lock(mm);
			ret = hmm_range_fault(&range);
			if (!ret)
				vmwipe_reg_unseen(reg, mm);
			mmap_read_unlock(mm);
		} while (ret == -EBUSY);
		/* Perhaps the last user: exit_mmap() then invalidates and requeues us. */
		mmput(mm);
	}

	/* Fails only when asked to fault: then keep everything listed. */
	if (WARN_ON_ONCE(ret))
		return;
	spin_lock(&reg->lock);
	if (!exiting && mmu_interval_read_retry(&reg->notifier, range.notifier_seq)) {
		/* Changed again while we looked: look again. */
		if (!reg->dead)
			queue_work(vmw->wq, &reg->work);
		spin_unlock(&reg->lock);
		return;
	}
	spin_unlock(&reg->lock);
	/*
	 * pfns[] was true when the check passed. A change since then queues
	 * this work again, which looks again; the pages stay pinned until
	 * dropped, so none is reused meanwhile. The drops zero pages and may
	 * cover the whole table: never under a spinlock.
	 */
	for (i = 0; i < reg->npages; i++) {
		struct page *page = reg->pages[i];

		if (!page)
			continue;
		/* An exiting mm never runs again: zero even pages still mapped. */
		if (exiting)
			vmwipe_reg_drop(reg, i, true);
		else if (!(reg->pfns[i] & HMM_PFN_VALID) ||
			 hmm_pfn_to_page(reg->pfns[i]) != page)
			vmwipe_reg_drop(reg, i, !vmwipe_page_mapped(page));
		cond_resched();
	}
	spin_lock(&reg->lock);
	i = reg->live;
	spin_unlock(&reg->lock);
	if (i)
		return;

	/* Nothing left: whoever takes it off the list tears it down. */
	mutex_lock(&vmw->reg_lock);
	mine = reg->listed;
	if (mine) {
		list_del(&reg->node);
		reg->listed = false;
	}
	mutex_unlock(&vmw->reg_lock);
	if (mine)
		vmwipe_reg_destroy(reg, true);
}

static int vmwipe_range_get(const void __user *uarg, unsigned long *start, unsigned long *n)
{
	struct vmwipe_range r;

	if (copy_from_user(&r, uarg, sizeof(r)))
		return -EFAULT;
	if (!r.len || !PAGE_ALIGNED(r.addr) || r.addr >= TASK_SIZE ||
	    r.len > TASK_SIZE - r.addr)
		return -EINVAL;
	*start = r.addr;
	*n = PAGE_ALIGN(r.len) >> PAGE_SHIFT;
	return 0;
}

/* Private anonymous memory only: no file, shmem, hugetlb or device behind it. */
static int vmwipe_check_vmas(struct mm_struct *mm, unsigned long start, unsigned long end)
{
	struct vm_area_struct *vma;
	unsigned long addr;

	for (addr = start; addr < end; addr = vma->vm_end) {
		vma = vma_lookup(mm, addr);
		if (!vma)
			return -ENOMEM;
		if (!vma_is_anonymous(vma) || (vma->vm_flags & (VM_SHARED | VM_IO | VM_PFNMAP)))
			return -EINVAL;
	}
	return 0;
}

/* Fault in and pin all @n pages (the caller holds the mmap lock), all or none. */
static int vmwipe_pin_range(unsigned long start, unsigned long n, unsigned int flags,
			    struct page **pages)
{
	unsigned long done = 0;
	long got;

	while (done < n) {
		got = vmwipe_pin_user_pages(start + (done << PAGE_SHIFT), n - done, flags,
					    pages + done);
		if (got <= 0) {
			unpin_user_pages(pages, done);
			return got ? got : -EFAULT;
		}
		done += got;
	}
	return 0;
}

/*
 * Pin @n pages for as long as they are listed. A FOLL_LONGTERM pin migrates
 * a page out of ZONE_MOVABLE or CMA and frees the old copy without zeroing
 * it: the secret would live on in free memory and in every later snapshot.
 * So pin briefly first and refuse such pages (-EXDEV), and hold that pin
 * across the long-term one: a page with an extra reference cannot migrate,
 * so the long-term pin must find the very same pages. It does not when
 * another thread replaced one meanwhile (MADV_DONTNEED needs only the read
 * lock): -EAGAIN.
 */
static int vmwipe_pin(unsigned long start, unsigned long n, struct page **pages)
{
	struct page **probe;
	unsigned long i;
	int ret;

	probe = kvmalloc_array(n, sizeof(*probe), GFP_KERNEL);
	if (!probe)
		return -ENOMEM;
	ret = vmwipe_pin_range(start, n, FOLL_WRITE, probe);
	if (ret)
		goto out;
	for (i = 0; i < n; i++) {
		if (!vmwipe_longterm_pinnable(probe[i])) {
			ret = -EXDEV;
			goto unpin;
		}
	}
	ret = vmwipe_pin_range(start, n, FOLL_WRITE | FOLL_LONGTERM, pages);
	if (!ret && memcmp(pages, probe, n * sizeof(*pages))) {
		unpin_user_pages(pages, n);
		ret = -EAGAIN;
	}
unpin:
	unpin_user_pages(probe, n);
out:
	kvfree(probe);
	return ret;
}

/*
 * Is one of @reg's pages listed already? At the same address: -EEXIST.
 * Moved here by mremap from a registration whose work has not retired it
 * yet: -EAGAIN. A page listed twice would make the host refuse the table.
 */
static int vmwipe_listed(struct vmwipe *vmw, struct vmwipe_reg *reg)
{
	unsigned long i;
	void *at;

	lockdep_assert_held(&vmw->reg_lock);
	for (i = 0; i < reg->npages; i++) {
		at = xa_load(&vmw->upages, page_to_pfn(reg->pages[i]));
		if (at)
			return xa_to_value(at) == (reg->start >> PAGE_SHIFT) + i ? -EEXIST : -EAGAIN;
	}
	return 0;
}

static long vmwipe_register(struct vmwipe *vmw, const void __user *uarg)
{
	struct mm_struct *mm = current->mm;
	unsigned long start, n, i, seq;
	struct vmwipe_reg *reg;
	int ret, tries;

	ret = vmwipe_range_get(uarg, &start, &n);
	if (ret)
		return ret;
	if (!mm)
		return -EINVAL;
	if (n > vmw->capacity)
		return -ENOSPC;

	reg = kvzalloc(struct_size(reg, pages, n), GFP_KERNEL_ACCOUNT);
	if (!reg)
		return -ENOMEM;
	reg->vmw = vmw;
	reg->start = start;
	reg->npages = n;
	spin_lock_init(&reg->lock);
	INIT_WORK(&reg->work, vmwipe_reg_work);
	reg->pfns = kvmalloc_array(n, sizeof(*reg->pfns), GFP_KERNEL_ACCOUNT);
	reg->slots = kvmalloc_array(n, sizeof(*reg->slots), GFP_KERNEL_ACCOUNT);
	if (!reg->pfns || !reg->slots) {
		ret = -ENOMEM;
		goto err_free;
	}
	ret = vmwipe_charge(vmw, n, &reg->charge);
	if (ret)
		goto err_free;

	/* Follow the range before pinning, so that no change goes unseen. */
	ret = mmu_interval_notifier_insert(&reg->notifier, mm, start, n << PAGE_SHIFT,
					   &vmwipe_reg_ops);
	if (ret)
		goto err_uncharge;
	seq = mmu_interval_read_begin(&reg->notifier);
	mmap_read_lock(mm);
	ret = vmwipe_check_vmas(mm, start, start + (n << PAGE_SHIFT));
	if (!ret)
		ret = vmwipe_pin(start, n, reg->pages);
	mmap_read_unlock(mm);
	if (ret)
		goto err_remove;

	for (tries = 0; ; tries++) {
		mutex_lock(&vmw->reg_lock);
		ret = vmwipe_listed(vmw, reg);
		if (ret != -EAGAIN)
			break;
		mutex_unlock(&vmw->reg_lock);
		if (tries == 100) {
			ret = -EBUSY;
			goto err_unpin;
		}
		/* The move queued the other registration's work: let it run. */
		flush_workqueue(vmw->wq);
		if (tries)
			msleep(1);
	}
	if (!ret)
		ret = vmwipe_take_slots(vmw, reg->slots, n);
	if (ret)
		goto err_unlock;
	for (i = 0; i < n; i++) {
		ret = xa_err(xa_store(&vmw->upages, page_to_pfn(reg->pages[i]),
				      xa_mk_value((start >> PAGE_SHIFT) + i), GFP_KERNEL));
		if (ret) {
			while (i--)
				xa_erase(&vmw->upages, page_to_pfn(reg->pages[i]));
			goto err_slots;
		}
	}

	/*
	 * The pages may already hold secrets: nothing covers a snapshot taken
	 * before this point. From here on the host wipes them.
	 */
	for (i = 0; i < n; i++)
		vmwipe_list(vmw, reg->slots[i], page_to_phys(reg->pages[i]), 1, 0);
	__module_get(THIS_MODULE);
	list_add(&reg->node, &vmw->regs);
	reg->listed = true;
	spin_lock(&reg->lock);
	reg->live = n;
	/* A change since read_begin may have left pages behind: look. */
	if (mmu_interval_read_retry(&reg->notifier, seq))
		queue_work(vmw->wq, &reg->work);
	spin_unlock(&reg->lock);
	mutex_unlock(&vmw->reg_lock);
	return 0;

err_slots:
	vmwipe_put_slots(vmw, reg->slots, n);
err_unlock:
	mutex_unlock(&vmw->reg_lock);
err_unpin:
	unpin_user_pages(reg->pages, n);
err_remove:
	mmu_interval_notifier_remove(&reg->notifier);
	cancel_work_sync(&reg->work);	/* it found live == 0 and did nothing */
err_uncharge:
	vmwipe_uncharge(&reg->charge, n);
	vmwipe_charge_put(&reg->charge);
err_free:
	kvfree(reg->pfns);
	kvfree(reg->slots);
	kvfree(reg);
	return ret;
}

static long vmwipe_unregister(struct vmwipe *vmw, const void __user *uarg)
{
	struct vmwipe_reg *reg, *tmp;
	unsigned long start, end, n;
	LIST_HEAD(gone);
	int ret;

	ret = vmwipe_range_get(uarg, &start, &n);
	if (ret)
		return ret;
	end = start + (n << PAGE_SHIFT);
	mutex_lock(&vmw->reg_lock);
	list_for_each_entry_safe(reg, tmp, &vmw->regs, node) {
		if (reg->notifier.mm == current->mm && reg->start >= start &&
		    reg->start + (reg->npages << PAGE_SHIFT) <= end) {
			list_move(&reg->node, &gone);
			reg->listed = false;
		}
	}
	mutex_unlock(&vmw->reg_lock);
	if (list_empty(&gone))
		return -ENOENT;
	/* The pages are still mapped: they keep their contents. */
	list_for_each_entry_safe(reg, tmp, &gone, node)
		vmwipe_reg_destroy(reg, false);
	return 0;
}

static long vmwipe_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct vmwipe_file *vf = file->private_data;

	switch (cmd) {
	case VMWIPE_IOC_REGISTER:
		return vmwipe_register(vf->vmw, (const void __user *)arg);
	case VMWIPE_IOC_UNREGISTER:
		return vmwipe_unregister(vf->vmw, (const void __user *)arg);
	}
	return -ENOTTY;
}

static int vmwipe_open(struct inode *inode, struct file *file)
{
	struct vmwipe *vmw = container_of(file->private_data, struct vmwipe, misc);
	struct vmwipe_file *vf;

	vf = kzalloc(sizeof(*vf), GFP_KERNEL);
	if (!vf)
		return -ENOMEM;
	vf->vmw = vmw;
	vf->seen = READ_ONCE(vmw->generation);
	file->private_data = vf;
	return nonseekable_open(inode, file);
}

static int vmwipe_release(struct inode *inode, struct file *file)
{
	kfree(file->private_data);
	return 0;
}

static ssize_t vmwipe_read(struct file *file, char __user *buf, size_t len, loff_t *ppos)
{
	struct vmwipe_file *vf = file->private_data;
	u64 gen = READ_ONCE(vf->vmw->generation);

	/* Each generation reads once, so `cat` ends; a new one starts over. */
	if (gen != READ_ONCE(vf->seen))
		*ppos = 0;
	if (*ppos)
		return 0;
	if (len < sizeof(gen))
		return -EINVAL;
	if (copy_to_user(buf, &gen, sizeof(gen)))
		return -EFAULT;
	WRITE_ONCE(vf->seen, gen);
	*ppos = sizeof(gen);
	return sizeof(gen);
}

static __poll_t vmwipe_poll(struct file *file, poll_table *wait)
{
	struct vmwipe_file *vf = file->private_data;

	poll_wait(file, &vf->vmw->wait, wait);
	return READ_ONCE(vf->vmw->generation) != READ_ONCE(vf->seen) ? EPOLLPRI : 0;
}

static const struct file_operations vmwipe_fops = {
	.owner = THIS_MODULE,
	.open = vmwipe_open,
	.release = vmwipe_release,
	.read = vmwipe_read,
	.poll = vmwipe_poll,
	.mmap = vmwipe_mmap,
	.unlocked_ioctl = vmwipe_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static struct vmwipe *dev_to_vmwipe(struct device *dev)
{
	return container_of(dev_get_drvdata(dev), struct vmwipe, misc);
}

static ssize_t capacity_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%u\n", dev_to_vmwipe(dev)->capacity);
}
static DEVICE_ATTR_RO(capacity);

static ssize_t used_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vmwipe *vmw = dev_to_vmwipe(dev);

	return sysfs_emit(buf, "%u\n", vmw->capacity - READ_ONCE(vmw->nfree));
}
static DEVICE_ATTR_RO(used);

static ssize_t generation_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%llu\n", READ_ONCE(dev_to_vmwipe(dev)->generation));
}
static DEVICE_ATTR_RO(generation);

static struct attribute *vmwipe_attrs[] = {
	&dev_attr_capacity.attr,
	&dev_attr_used.attr,
	&dev_attr_generation.attr,
	&dev_attr_crng_refresh.attr,
	&dev_attr_kernel_secrets.attr,
	NULL
};
ATTRIBUTE_GROUPS(vmwipe);

/* Not zeroed by a reset, not retired, not another boot's or a forgery's. */
static bool vmwipe_header_is_ours(struct vmwipe *vmw)
{
	return !memcmp(vmw->hdr->magic, vmw->header.magic, VMWIPE_MAGIC_LEN) &&
	       !memcmp(vmw->hdr->boot_id, vmw->header.boot_id, sizeof(vmw->header.boot_id));
}

/*
 * Take in the wipes done since the last look: a larger wipe_generation in
 * our own header, or a refilled witness, which counts as one more wipe when
 * the header does not show it. Never goes back.
 */
static u64 vmwipe_sync_generation(struct vmwipe *vmw)
{
	u64 gen = vmw->newest;

	lockdep_assert_held(&vmw->table_lock);
	if (vmwipe_header_is_ours(vmw))
		gen = max(gen, le64_to_cpu(READ_ONCE(vmw->hdr->wipe_generation)));
	if (memchr_inv(vmw->witness, 0, VMWIPE_WITNESS_LEN)) {
		gen = max(gen, vmw->newest + 1);
		memzero_explicit(vmw->witness, VMWIPE_WITNESS_LEN);
	}
	vmw->newest = gen;
	return gen;
}

/*
 * Tell everyone about a new wipe: the forced CRNG reseed, POLLPRI, the
 * uevent. Called by the watch, or with the watch stopped.
 */
static void vmwipe_announce(struct vmwipe *vmw)
{
	char env[40];
	char *envp[] = { env, NULL };
	u64 gen;

	spin_lock(&vmw->table_lock);
	gen = vmwipe_sync_generation(vmw);
	spin_unlock(&vmw->table_lock);
	if (gen == vmw->generation)
		return;
	WRITE_ONCE(vmw->generation, gen);
	vmwipe_crng_wiped();
	wake_up_interruptible_poll(&vmw->wait, EPOLLPRI);
	snprintf(env, sizeof(env), "VMWIPE_GENERATION=%llu", gen);
	kobject_uevent_env(&vmw->misc.this_device->kobj, KOBJ_CHANGE, envp);
}

static void vmwipe_watch(struct work_struct *work)
{
	struct vmwipe *vmw = container_of(to_delayed_work(work), struct vmwipe, watch);
	unsigned int period = READ_ONCE(poll_ms);

	vmwipe_announce(vmw);
	vmwipe_ksecrets_poll(vmw->misc.parent, vmw);
	if (period)
		schedule_delayed_work(&vmw->watch, msecs_to_jiffies(period));
}

static void vmwipe_watch_start(struct vmwipe *vmw)
{
	mutex_lock(&vmwipe_watch_lock);
	vmw->watching = true;
	if (poll_ms)
		schedule_delayed_work(&vmw->watch, msecs_to_jiffies(poll_ms));
	mutex_unlock(&vmwipe_watch_lock);
}

/* Nothing queues the watch again until vmwipe_watch_start(). */
static void vmwipe_watch_stop(struct vmwipe *vmw)
{
	mutex_lock(&vmwipe_watch_lock);
	vmw->watching = false;
	mutex_unlock(&vmwipe_watch_lock);
	cancel_delayed_work_sync(&vmw->watch);
}

/* A watch that stopped because poll_ms was 0 must start again when it is not. */
static int poll_ms_set(const char *val, const struct kernel_param *kp)
{
	struct vmwipe *vmw;
	int ret;

	mutex_lock(&vmwipe_watch_lock);
	ret = param_set_uint(val, kp);
	vmw = vmwipe_instance;
	if (!ret && poll_ms && vmw && vmw->watching)
		mod_delayed_work(system_wq, &vmw->watch, 0);
	mutex_unlock(&vmwipe_watch_lock);
	return ret;
}

/* vmgenid says we were restored or cloned: look at once, not at the next tick. */
static int vmwipe_vmfork(struct notifier_block *nb, unsigned long action, void *data)
{
	struct vmwipe *vmw = container_of(nb, struct vmwipe, vmfork);

	/* A blocking notifier chain: the mutex is fine. */
	mutex_lock(&vmwipe_watch_lock);
	if (vmw->watching)
		mod_delayed_work(system_wq, &vmw->watch, 0);
	mutex_unlock(&vmwipe_watch_lock);
	return NOTIFY_DONE;
}

static void vmwipe_clear_magic(struct vmwipe *vmw)
{
	/* Without the magic the host ignores the table (and so will the next boot). */
	smp_store_release((u64 *)vmw->hdr->magic, 0);
}

static void vmwipe_build_header(struct vmwipe *vmw)
{
	struct vmwipe_header *h = &vmw->header;

	memcpy(h->magic, VMWIPE_MAGIC, VMWIPE_MAGIC_LEN);
	h->version = cpu_to_le32(VMWIPE_ABI_VERSION);
	h->header_size = cpu_to_le32(VMWIPE_HEADER_SIZE);
	h->region_size = cpu_to_le64(vmw->size);
	h->slot_size = cpu_to_le32(VMWIPE_SLOT_SIZE);
	h->slot_count = cpu_to_le32(vmw->capacity);
	h->slots_offset = cpu_to_le64(VMWIPE_SLOTS_OFFSET);
	get_random_bytes(h->boot_id, sizeof(h->boot_id));
	h->header_crc32 = cpu_to_le32(crc32_le(~0U, (u8 *)h, VMWIPE_HEADER_CRC_LEN) ^ ~0U);
}

/* Slots written per hold of table_lock when the whole table is rewritten. */
#define VMWIPE_SLOT_BATCH	1024

/*
 * Write the whole table from kernel memory: the header, every slot from the
 * shadow, and the magic last, so the host never sees a half-written table.
 * Sleeps between batches of slots: vmwipe_list() and vmwipe_unlist() may
 * run meanwhile, and as each writes both copies of its slot under
 * table_lock, a batch copied before or after agrees with them.
 */
static void vmwipe_write_table(struct vmwipe *vmw)
{
	u32 i, end;
	u64 magic;

	spin_lock(&vmw->table_lock);
	/* Before the rebuild overwrites the host's count (no reset at s2idle). */
	vmwipe_sync_generation(vmw);
	/* What the region holds now is stale or foreign: drop its magic first. */
	vmwipe_clear_magic(vmw);
	/* One page, and vmwipe_crng_status() updates the header under the lock. */
	memset((u8 *)vmw->hdr + VMWIPE_MAGIC_LEN, 0, VMWIPE_HEADER_SIZE - VMWIPE_MAGIC_LEN);
	memcpy((u8 *)vmw->hdr + VMWIPE_MAGIC_LEN, (u8 *)&vmw->header + VMWIPE_MAGIC_LEN,
	       sizeof(vmw->header) - VMWIPE_MAGIC_LEN);
	spin_unlock(&vmw->table_lock);
	for (i = 0; i < vmw->capacity; i = end) {
		end = min(vmw->capacity, i + VMWIPE_SLOT_BATCH);
		spin_lock(&vmw->table_lock);
		for (; i < end; i++)
			vmwipe_store_slot(&vmw->slots[i], &vmw->shadow[i]);
		spin_unlock(&vmw->table_lock);
		cond_resched();
	}
	spin_lock(&vmw->table_lock);
	/* Keep the count, so no reader mistakes the rebuild for a wipe. */
	vmw->hdr->wipe_generation = cpu_to_le64(vmw->newest);
	memcpy(&magic, vmw->header.magic, sizeof(magic));
	smp_store_release((u64 *)vmw->hdr->magic, magic);
	spin_unlock(&vmw->table_lock);
}

/*
 * Clear the magic, then the rest. At unbind no page is handed out any more
 * (module refcount). At shutdown, power-off and hibernation some may be: a
 * later (un)list then writes into a table the host ignores, and a thaw or
 * restore rebuilds it from the shadow.
 */
static void vmwipe_retire(void *data)
{
	struct vmwipe *vmw = data;
	size_t off, len;

	spin_lock(&vmw->table_lock);
	vmwipe_clear_magic(vmw);
	spin_unlock(&vmw->table_lock);
	for (off = VMWIPE_MAGIC_LEN; off < vmw->size; off += len) {
		len = min_t(size_t, vmw->size - off, SZ_64K);
		memset((u8 *)vmw->hdr + off, 0, len);
		cond_resched();
	}
}

/*
 * S3: the table stays live while the guest sleeps, since a state saved then
 * is restored and wiped like any other. Only the watch stops: until the
 * table is rebuilt after wake-up, the header may be the loader's zeros.
 */
static int vmwipe_suspend(struct device *dev)
{
	vmwipe_watch_stop(dev_get_drvdata(dev));
	return 0;
}

/*
 * The first device phase after wake-up from S3 (.resume_noirq), after a
 * hibernation image was made (.thaw_noirq) or in the kernel restored from
 * one (.restore_noirq): QEMU's reset at S3 wake-up has rewritten the
 * loader's zero page over the header, and .freeze retired the table (the
 * reserved region is not part of an image). Rebuild it before other
 * drivers' resume code runs, counting a wipe done meanwhile (the witness).
 */
static int vmwipe_republish(struct device *dev)
{
	vmwipe_write_table(dev_get_drvdata(dev));
	return 0;
}

/*
 * .resume, .thaw, .restore: user space is still frozen. Rebuild the table
 * if no noirq phase did (a suspend or hibernation that stopped early), tell
 * everyone of a wipe done while asleep, then watch again.
 */
static int vmwipe_resume(struct device *dev)
{
	struct vmwipe *vmw = dev_get_drvdata(dev);
	bool ours;

	spin_lock(&vmw->table_lock);
	ours = vmwipe_header_is_ours(vmw);
	spin_unlock(&vmw->table_lock);
	if (!ours)
		vmwipe_write_table(vmw);
	vmwipe_announce(vmw);
	vmwipe_watch_start(vmw);
	return 0;
}

/*
 * Hibernation (.freeze, then .thaw and .poweroff once the image is written)
 * and the boot kernel handing over to an image (.freeze): retire the table.
 * The image's kernel has its own table at other addresses; a snapshot taken
 * while the boot kernel's table is live would make the host write over its
 * pages, which by then hold the image. ACPI hibernation powers off through
 * .poweroff, not .shutdown.
 */
static int vmwipe_freeze(struct device *dev)
{
	struct vmwipe *vmw = dev_get_drvdata(dev);

	vmwipe_watch_stop(vmw);
	vmwipe_retire(vmw);
	return 0;
}

static void vmwipe_kfree(void *data)
{
	kfree(data);
}

static void vmwipe_kvfree(void *data)
{
	kvfree(data);
}

/* Registrations hold a module reference: none is left at unbind. */
static void vmwipe_destroy_wq(void *data)
{
	destroy_workqueue(data);
}

static void vmwipe_stop_watch(void *data)
{
	vmwipe_watch_stop(data);
}

/* One device only: a second would share the misc name and the CRNG state. */
static unsigned long vmwipe_claimed;

static void vmwipe_unclaim(void *data)
{
	clear_bit(0, &vmwipe_claimed);
}

/*
 * Prove that the range keeps what is written: SMRAM (TSEG, which OVMF with
 * SMM puts at the top of low RAM) ignores writes from outside SMM, as do a
 * hole or a missing DIMM. The host would read an empty table there and
 * resume the guest as if nothing were registered. One word per page, after
 * the magic (cleared first, so the host never sees a half-written header).
 */
static int vmwipe_check_ram(struct device *dev, struct resource *res, void *base,
			    resource_size_t size)
{
	u64 seed = get_random_u64();
	resource_size_t off;
	u64 *word;

	smp_store_release((u64 *)base, 0);
	for (off = 0; off < size; off += PAGE_SIZE) {
		word = base + off + sizeof(u64);
		WRITE_ONCE(*word, seed ^ off);
	}
	for (off = 0; off < size; off += PAGE_SIZE) {
		word = base + off + sizeof(u64);
		if (READ_ONCE(*word) != (seed ^ off))
			return dev_err_probe(dev, -EIO,
					     "%pR does not keep what is written (at +%#llx): not RAM the guest can write, such as SMRAM (TSEG) or a hole\n",
					     res, (unsigned long long)off);
	}
	return 0;
}


static void vmwipe_unregister_vmfork(void *data)
{
	struct vmwipe *vmw = data;

	unregister_random_vmfork_notifier(&vmw->vmfork);
}

static void vmwipe_deregister(void *data)
{
	struct vmwipe *vmw = data;

	mutex_lock(&vmwipe_watch_lock);
	WRITE_ONCE(vmwipe_instance, NULL);
	mutex_unlock(&vmwipe_watch_lock);
	misc_deregister(&vmw->misc);
}

static int vmwipe_probe(struct platform_device *pdev)
{
	struct device *dev = &pdev->dev;
	struct resource *res;
	struct vmwipe *vmw;
	resource_size_t size;
	void *base;
	u32 i;
	int ret;

	/* The region is private memory there: the host cannot read the table. */
	if (vmwipe_mem_encrypted())
		return dev_err_probe(dev, -ENODEV,
				     "guest memory is encrypted (SEV/TDX): the host cannot read the table\n");
	res = platform_get_resource(pdev, IORESOURCE_MEM, 0);
	if (!res)
		return dev_err_probe(dev, -ENODEV, "no memory range in _CRS\n");
	size = resource_size(res);
	if (!PAGE_ALIGNED(res->start) || !PAGE_ALIGNED(size))
		return dev_err_probe(dev, -EINVAL, "%pR is not page aligned\n", res);
	if (size < VMWIPE_MIN_REGION_SIZE ||
	    (size - VMWIPE_SLOTS_OFFSET) / VMWIPE_SLOT_SIZE > U32_MAX)
		return dev_err_probe(dev, -EINVAL, "%pR has an unusable size\n", res);
	/*
	 * Unless memmap= (or the like) took the range out of System RAM,
	 * memremap() would return the direct map and the table would
	 * overwrite memory the kernel is using.
	 */
	if (region_intersects(res->start, size, IORESOURCE_SYSTEM_RAM,
			      IORES_DESC_NONE) != REGION_DISJOINT)
		return dev_err_probe(dev, -EBUSY,
				     "%pR overlaps System RAM, reserve it with memmap=\n", res);
	if (!devm_request_mem_region(dev, res->start, size, KBUILD_MODNAME))
		return dev_err_probe(dev, -EBUSY, "%pR is in use\n", res);
	base = devm_memremap(dev, res->start, size, MEMREMAP_WB);
	if (IS_ERR(base))
		return dev_err_probe(dev, PTR_ERR(base), "cannot map %pR\n", res);
	ret = vmwipe_check_ram(dev, res, base, size);
	if (ret)
		return ret;
	if (test_and_set_bit(0, &vmwipe_claimed))
		return dev_err_probe(dev, -EBUSY, "%pR: another vmwipe device is bound already\n",
				     res);
	ret = devm_add_action_or_reset(dev, vmwipe_unclaim, NULL);
	if (ret)
		return ret;

	vmw = devm_kzalloc(dev, sizeof(*vmw), GFP_KERNEL);
	if (!vmw)
		return -ENOMEM;
	vmw->hdr = base;
	vmw->slots = base + VMWIPE_SLOTS_OFFSET;
	vmw->size = size;
	vmw->capacity = (size - VMWIPE_SLOTS_OFFSET) / VMWIPE_SLOT_SIZE;
	spin_lock_init(&vmw->lock);
	mutex_init(&vmw->reg_lock);
	INIT_LIST_HEAD(&vmw->regs);
	xa_init(&vmw->upages);
	init_waitqueue_head(&vmw->wait);
	INIT_DELAYED_WORK(&vmw->watch, vmwipe_watch);
	platform_set_drvdata(pdev, vmw);

	vmw->free = kvmalloc_array(vmw->capacity, sizeof(*vmw->free), GFP_KERNEL);
	if (!vmw->free)
		return -ENOMEM;
	ret = devm_add_action_or_reset(dev, vmwipe_kvfree, vmw->free);
	if (ret)
		return ret;
	/* Hand out low slots first, which keeps the host's scan short. */
	for (i = 0; i < vmw->capacity; i++)
		vmw->free[i] = vmw->capacity - 1 - i;
	vmw->nfree = vmw->capacity;

	spin_lock_init(&vmw->table_lock);
	vmw->shadow = kvcalloc(vmw->capacity, sizeof(*vmw->shadow), GFP_KERNEL);
	if (!vmw->shadow)
		return -ENOMEM;
	ret = devm_add_action_or_reset(dev, vmwipe_kvfree, vmw->shadow);
	if (ret)
		return ret;

	/* Freed after the retire below (devm unwinds in reverse), as a listed range must be. */
	vmw->witness = kzalloc(VMWIPE_WITNESS_LEN, GFP_KERNEL);
	if (!vmw->witness)
		return -ENOMEM;
	ret = devm_add_action_or_reset(dev, vmwipe_kfree, vmw->witness);
	if (ret)
		return ret;

	vmwipe_build_header(vmw);
	vmwipe_write_table(vmw);
	ret = devm_add_action_or_reset(dev, vmwipe_retire, vmw);
	if (ret)
		return ret;
	/* After the table exists, before the watch may ask for a reseed. */
	vmwipe_crng_probe(dev, vmw);
	/* A kmalloc of 32 bytes never straddles a page: one slot, after the CRNG's. */
	ret = vmwipe_list_kmem(vmw, &(struct vmwipe_kmem){ vmw->witness, VMWIPE_WITNESS_LEN }, 1);
	if (ret < 0)
		return dev_err_probe(dev, ret, "no slot for the witness\n");
	vmwipe_ksecrets_probe(dev, vmw);

	/* Before the device exists, gone after it (devm unwinds in reverse). */
	vmw->wq = alloc_workqueue(KBUILD_MODNAME, 0, 0);
	if (!vmw->wq)
		return -ENOMEM;
	ret = devm_add_action_or_reset(dev, vmwipe_destroy_wq, vmw->wq);
	if (ret)
		return ret;

	vmw->misc.minor = MISC_DYNAMIC_MINOR;
	vmw->misc.name = KBUILD_MODNAME;
	vmw->misc.fops = &vmwipe_fops;
	vmw->misc.mode = mode;
	vmw->misc.parent = dev;
	vmw->misc.groups = vmwipe_groups;
	ret = misc_register(&vmw->misc);
	if (ret)
		return ret;
	WRITE_ONCE(vmwipe_instance, vmw);
	ret = devm_add_action_or_reset(dev, vmwipe_deregister, vmw);
	if (ret)
		return ret;

	/* The watch sends uevents from the misc device: start it after that. */
	vmwipe_watch_start(vmw);
	ret = devm_add_action_or_reset(dev, vmwipe_stop_watch, vmw);
	if (ret)
		return ret;

	vmw->vmfork.notifier_call = vmwipe_vmfork;
	ret = register_random_vmfork_notifier(&vmw->vmfork);
	if (ret)
		return ret;
	ret = devm_add_action_or_reset(dev, vmwipe_unregister_vmfork, vmw);
	if (ret)
		return ret;

	dev_info(dev, "%pR: %u slots\n", res, vmw->capacity);
	return 0;
}

/* Reboot, poweroff and kexec: the next kernel must not inherit a live table. */
static void vmwipe_shutdown(struct platform_device *pdev)
{
	struct vmwipe *vmw = platform_get_drvdata(pdev);

	vmwipe_watch_stop(vmw);
	vmwipe_retire(vmw);
}

static const struct dev_pm_ops vmwipe_pm_ops = {
	/* S3 */
	.suspend = vmwipe_suspend,
	.resume_noirq = vmwipe_republish,
	.resume = vmwipe_resume,
	/* S4 */
	.freeze = vmwipe_freeze,
	.thaw_noirq = vmwipe_republish,
	.thaw = vmwipe_resume,
	.poweroff = vmwipe_freeze,
	.restore_noirq = vmwipe_republish,
	.restore = vmwipe_resume,
};

static const struct acpi_device_id vmwipe_acpi_ids[] = {
	{ VMWIPE_ACPI_HID, 0 },
	{ }
};
MODULE_DEVICE_TABLE(acpi, vmwipe_acpi_ids);

static struct platform_driver vmwipe_driver = {
	.probe = vmwipe_probe,
	.shutdown = vmwipe_shutdown,
	.driver = {
		.name = KBUILD_MODNAME,
		.acpi_match_table = vmwipe_acpi_ids,
		.pm = pm_sleep_ptr(&vmwipe_pm_ops),
		/* Unbinding with pages handed out would orphan the table. */
		.suppress_bind_attrs = true,
	},
};
module_platform_driver(vmwipe_driver);

MODULE_DESCRIPTION("Pages the hypervisor wipes before a restored VM runs");
MODULE_LICENSE("GPL");
