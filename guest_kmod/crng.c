// SPDX-License-Identifier: GPL-2.0-only
/*
 * vmwipe: the kernel CRNG's state as fill ranges, so that every restored
 * image and every clone runs its first instruction with CRNG state the host
 * drew for it alone.
 *
 * Registered (drivers/char/random.c; base_crng lost its birth field in 6.2):
 *  - base_crng.key and .generation: a new generation makes every per-CPU
 *    CRNG and every batch of get_random_u32/u64 re-derive from the new key
 *    on its next use;
 *  - input_pool.hash.h, the BLAKE2s chaining value of the input pool: a
 *    reseed replaces the key with one extracted from the pool, and without
 *    this the next reseed (an in-flight one too) would hand every clone the
 *    same key again;
 *  - with vDSO getrandom (6.11+), _vdso_rng_data.generation: every process's
 *    user-space state re-keys through getrandom() on its next call.
 *
 * None of them is exported. kallsyms_lookup_name (itself not exported since
 * 5.7, found with a kprobe) names them, and they are trusted only after a
 * check: force one reseed and see exactly the expected fields change. No
 * other kernel function is called through a looked-up pointer. If anything
 * does not check out, nothing is registered: one dmesg line, and sysfs
 * crng_refresh reads "unavailable: <reason>".
 *
 * In flight: a vCPU stopped inside a base_crng critical section (a reseed or
 * a per-CPU re-derivation, both under base_crng.lock) writes back a key
 * derived from the pre-snapshot state when it resumes. So after each wipe
 * the module forces one more reseed, which extracts from the refilled pool.
 */

#include <crypto/blake2s.h>
#include <crypto/chacha.h>
#include <linux/device.h>
#include <linux/err.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/jiffies.h>
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/random.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/version.h>
#include <asm/cpufeature.h>

#include "crng.h"

static bool crng_refresh = true;
module_param(crng_refresh, bool, 0444);
MODULE_PARM_DESC(crng_refresh, "register the kernel CRNG state for the host to refill (default on)");

/* Mirrors of the (static) objects in drivers/char/random.c. */
struct base_crng_layout {
	u8 key[CHACHA_KEY_SIZE];
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 2, 0)
	unsigned long birth;	/* jiffies at the last reseed */
#endif
	unsigned long generation;
	spinlock_t lock;
};

struct input_pool_layout {
	struct blake2s_state hash;
	spinlock_t lock;
	unsigned int init_bits;
};

struct vdso_rng_layout {
	u64 generation;
	u8 is_ready;
};

struct crng_objs {
	struct base_crng_layout *base;
	struct input_pool_layout *pool;
	struct vdso_rng_layout *vdso;	/* NULL without vDSO getrandom */
};

struct crng_snap {
	struct base_crng_layout base;
	struct blake2s_state hash;
	struct vdso_rng_layout vdso;
};

static const char *crng_why = "no vmwipe device bound";	/* NULL: active */
static struct file *crng_urandom;	/* for RNDRESEEDCRNG */

static void crng_fail(struct device *dev, const char *why)
{
	crng_why = why;
	dev_warn(dev, "kernel CRNG not registered: %s\n", why);
}

/* Needs CAP_SYS_ADMIN: insmod has it, and so do kernel threads. */
static int crng_reseed(void)
{
	return vfs_ioctl(crng_urandom, RNDRESEEDCRNG, 0);
}

typedef unsigned long (*kallsyms_fn)(const char *name);

/* kallsyms_lookup_name is not exported (5.7+): a kprobe on it gives its address. */
static kallsyms_fn crng_kallsyms(void)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	kallsyms_fn fn;

	if (register_kprobe(&kp))
		return NULL;
	fn = (kallsyms_fn)kp.addr;
	unregister_kprobe(&kp);
	return fn;
}

static void crng_snap(const struct crng_objs *o, struct crng_snap *s)
{
	memcpy(&s->base, o->base, sizeof(s->base));
	memcpy(&s->hash, &o->pool->hash, sizeof(s->hash));
	if (o->vdso)
		memcpy(&s->vdso, o->vdso, sizeof(s->vdso));
}

/* @a and @b were taken just before and just after one forced reseed. */
static const char *crng_check(const struct crng_objs *o, const struct crng_snap *a,
			      const struct crng_snap *b)
{
	unsigned long next = a->base.generation + 1;

	if (next == ULONG_MAX)	/* random.c skips its "never" value */
		next++;
	if (b->base.generation != next)
		return "base_crng.generation did not advance by one";
	if (!memcmp(a->base.key, b->base.key, sizeof(a->base.key)))
		return "base_crng.key did not change";
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 2, 0)
	if (time_before(b->base.birth, a->base.birth) || time_after(b->base.birth, jiffies))
		return "base_crng.birth is not the jiffies of the reseed";
#endif
	if (memchr_inv(&a->base.lock, 0, sizeof(a->base.lock)) ||
	    memchr_inv(&b->base.lock, 0, sizeof(b->base.lock)))
		return "base_crng.lock is not an unlocked spinlock";
	if (a->hash.outlen != BLAKE2S_HASH_SIZE || b->hash.outlen != BLAKE2S_HASH_SIZE ||
	    a->hash.f[0] || a->hash.f[1] || b->hash.f[0] || b->hash.f[1] ||
	    b->hash.buflen > BLAKE2S_BLOCK_SIZE)
		return "input_pool.hash is not a BLAKE2s state";
	if (!memcmp(a->hash.h, b->hash.h, sizeof(a->hash.h)))
		return "input_pool.hash.h did not change";
	if (o->vdso && (b->vdso.generation != (u64)b->base.generation + 1 || b->vdso.is_ready != 1))
		return "_vdso_rng_data.generation is not base_crng.generation + 1";
	return NULL;
}

static void crng_close(void *unused)
{
	fput(crng_urandom);
	crng_urandom = NULL;
	crng_why = "no vmwipe device bound";
}

/* Find and check the objects; on success @o may be registered. */
static const char *crng_find(struct device *dev, struct crng_objs *o)
{
	struct crng_snap before, after;
	const char *why = NULL;
	kallsyms_fn lookup;
	int i;

	/* Under IBT an indirect call to kallsyms_lookup_name (sealed) traps. */
	if (cpu_feature_enabled(X86_FEATURE_IBT))
		return "IBT is enabled, kallsyms_lookup_name cannot be called";
	lookup = crng_kallsyms();
	if (!lookup)
		return "no kprobe on kallsyms_lookup_name";
	o->base = (void *)lookup("base_crng");
	o->pool = (void *)lookup("input_pool");
	if (!o->base || !o->pool)
		return "base_crng or input_pool not found by kallsyms_lookup_name";
	if (IS_ENABLED(CONFIG_VDSO_GETRANDOM)) {
		o->vdso = (void *)lookup("_vdso_rng_data");
		if (!o->vdso)
			return "_vdso_rng_data not found by kallsyms_lookup_name";
	}

	if (wait_for_random_bytes())
		return "interrupted waiting for the CRNG to be ready";
	crng_urandom = filp_open("/dev/urandom", O_RDONLY, 0);
	if (IS_ERR(crng_urandom)) {
		crng_urandom = NULL;
		return "cannot open /dev/urandom";
	}

	/* A reseed of the kernel's own may interleave: try three times. */
	for (i = 0; i < 3; i++) {
		crng_snap(o, &before);
		why = crng_reseed() ? "RNDRESEEDCRNG failed" : NULL;
		if (why)
			break;
		crng_snap(o, &after);
		why = crng_check(o, &before, &after);
		if (!why)
			break;
	}
	if (why) {
		fput(crng_urandom);
		crng_urandom = NULL;
		return why;
	}
	/* Kept open for the reseed after each wipe. */
	if (devm_add_action_or_reset(dev, crng_close, NULL))
		return "out of memory";
	return NULL;
}

void vmwipe_crng_probe(struct device *dev, struct vmwipe *vmw)
{
	struct crng_objs o = { };
	struct vmwipe_kmem ranges[4];
	const char *why;
	unsigned int n = 0;

	if (!crng_refresh) {
		crng_why = "disabled (crng_refresh=0)";
		return;
	}
	why = crng_find(dev, &o);
	if (why) {
		crng_fail(dev, why);
		return;
	}

	/* Not birth (6.1): a random one would only make the next reseed come sooner or later. */
	ranges[n++] = (struct vmwipe_kmem){ o.base->key, sizeof(o.base->key) };
	ranges[n++] = (struct vmwipe_kmem){ &o.base->generation, sizeof(o.base->generation) };
	ranges[n++] = (struct vmwipe_kmem){ o.pool->hash.h, sizeof(o.pool->hash.h) };
	if (o.vdso)
		ranges[n++] = (struct vmwipe_kmem){ &o.vdso->generation, sizeof(o.vdso->generation) };
	if (vmwipe_list_kmem(vmw, ranges, n)) {
		crng_fail(dev, "no free table slots");
		return;
	}
	WRITE_ONCE(crng_why, NULL);
	dev_info(dev, "kernel CRNG registered: base_crng key+generation, input_pool%s\n",
		 o.vdso ? ", _vdso_rng_data generation" : "");
}

void vmwipe_crng_wiped(void)
{
	if (!crng_why)
		crng_reseed();
}

static ssize_t crng_refresh_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	const char *why = READ_ONCE(crng_why);

	return why ? sysfs_emit(buf, "unavailable: %s\n", why) : sysfs_emit(buf, "active\n");
}
DEVICE_ATTR_RO(crng_refresh);
