// SPDX-License-Identifier: GPL-2.0-only
/*
 * vmwipe: the kernel CRNG's state as fill ranges, so that every restored
 * image and every clone runs its first instruction with CRNG state the host
 * drew for it alone.
 *
 * Registered (drivers/char/random.c):
 *  - base_crng.key and .generation: a new generation makes every per-CPU
 *    CRNG and every batch of get_random_u32/u64 re-derive from the new key
 *    on its next use;
 *  - input_pool.hash.h, the BLAKE2s chaining value of the input pool: a
 *    reseed replaces the key with one extracted from the pool, and without
 *    this the next reseed (an in-flight one too) would hand every clone the
 *    same key again;
 *  - with vDSO getrandom (6.11+), the vDSO RNG generation (_vdso_rng_data,
 *    or what vdso_k_rng_data points to from 6.15 on): every process's
 *    user-space state re-keys through getrandom() on its next call;
 *  - crng_seed below, the module's own: mixed into the pool before the
 *    reseed that follows each wipe.
 *
 * None of random.c's objects is exported. Their addresses come from
 * register_kprobe() on their names (see vmwipe_lookup), so no function is
 * ever called through a looked-up pointer, and kernels with IBT take the
 * same path. Their layout is not taken from the kernel version (distributions
 * backport random.c) but recognised: force one reseed and see exactly the
 * expected fields change, in exactly one of the layouts random.c has had.
 * If anything does not check out, nothing is registered: one dmesg line,
 * sysfs crng_refresh reads "unavailable: <reason>", and so does the table
 * header for the host.
 *
 * In flight: a vCPU stopped inside a base_crng.lock section (a reseed, a
 * per-CPU re-derivation) writes back a key derived from the snapshot when it
 * resumes, and one stopped inside input_pool.lock (random.c mixes the pool
 * far more often than it reseeds) writes back pool state computed from the
 * snapshot over the host's input_pool.hash.h. So after each wipe the module
 * mixes crng_seed, which only the host and this module write, into the pool
 * and forces a reseed: the new key always holds host-fresh bytes.
 */

#include <crypto/chacha.h>
#include <linux/device.h>
#include <linux/err.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/jiffies.h>
#include <linux/kallsyms.h>
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/random.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>

#include "compat.h"
#include "crng.h"
#include "vmwipe_abi.h"

static bool crng_refresh = true;
module_param(crng_refresh, bool, 0444);
MODULE_PARM_DESC(crng_refresh, "register the kernel CRNG state for the host to refill (default on)");

/* Mirrors of the (static) objects in drivers/char/random.c. */

/* base_crng from 5.17 to 6.1, and in stable backports of that random.c (5.10.119+). */
struct base_crng_birth {
	u8 key[CHACHA_KEY_SIZE];
	unsigned long birth;	/* jiffies at the last reseed */
	unsigned long generation;
	spinlock_t lock;
};

/* base_crng from 6.2 on (and where that random.c was backported: RHEL 9). */
struct base_crng_nobirth {
	u8 key[CHACHA_KEY_SIZE];
	unsigned long generation;
	spinlock_t lock;
};

struct input_pool_layout {
	vmwipe_blake2s_t hash;
	spinlock_t lock;
	unsigned int init_bits;
};

struct vdso_rng_layout {
	u64 generation;
	u8 is_ready;
};

struct crng_objs {
	void *base;		/* base_crng, in one of the layouts above */
	unsigned long base_size;	/* its size by kallsyms */
	bool birth;		/* which layout */
	struct input_pool_layout *pool;
	struct vdso_rng_layout *vdso;	/* NULL without vDSO getrandom */
	const char *vdso_name;
};

struct crng_snap {
	union {
		struct base_crng_birth birth;
		struct base_crng_nobirth nobirth;
	} base;
	vmwipe_blake2s_t hash;
	struct vdso_rng_layout vdso;
	unsigned long jiffies;
};

static const char *crng_why = "no vmwipe device bound";	/* NULL: active */
static struct file *crng_urandom;	/* for RNDRESEEDCRNG */

/*
 * Host-fresh bytes for the reseed after each wipe (a fill range). Only the
 * host and this module write them, so no resumed vCPU can put snapshot
 * state over them.
 */
static u8 crng_seed[32] __aligned(32);

bool vmwipe_crng_enabled(void)
{
	return crng_refresh;
}

/* Not registered: @why for sysfs, and for the host (disabled, or refused and why). */
static void crng_report(struct vmwipe *vmw, const char *why)
{
	crng_why = why;
	if (crng_refresh)
		vmwipe_crng_status(vmw, VMWIPE_CRNG_STATUS_REFUSED, 0, why);
	else
		vmwipe_crng_status(vmw, VMWIPE_CRNG_STATUS_DISABLED, 0, "crng_refresh=0");
}

/*
 * RNDRESEEDCRNG on /dev/urandom; it needs CAP_SYS_ADMIN, which insmod and
 * kernel threads have. vfs_ioctl() is not exported from 7.3 on; the exported
 * compat_ptr_ioctl() makes the same call into the file's own ioctl.
 */
static int crng_reseed(void)
{
#ifdef CONFIG_COMPAT
	return compat_ptr_ioctl(crng_urandom, RNDRESEEDCRNG, 0);
#else
	return crng_urandom->f_op->unlocked_ioctl(crng_urandom, RNDRESEEDCRNG, 0);
#endif
}

/*
 * The address of a static object of the kernel, by name, without calling
 * kallsyms_lookup_name() through a looked-up pointer (under IBT that call
 * traps): register_kprobe() resolves the name through kallsyms and stores
 * the address in kp.addr, then refuses it with -EINVAL because it is not
 * text. sprint_symbol() (exported) must then name exactly that object,
 * "<name>+0x0/<size>" in the core kernel; @size receives its size, which
 * kallsyms counts up to the next symbol. Not for per-CPU symbols, whose
 * "address" is an offset.
 */
void *vmwipe_lookup(struct device *dev, const char *name, unsigned long *size)
{
	struct kprobe kp = { .symbol_name = name };
	size_t len = strlen(name);
	void *addr = NULL;
	char *sym;
	int ret;

	sym = kmalloc(KSYM_SYMBOL_LEN, GFP_KERNEL);
	if (!sym)
		return NULL;
	ret = register_kprobe(&kp);
	if (!ret) {		/* text, so not the object */
		unregister_kprobe(&kp);
		goto out;
	}
	if (ret != -EINVAL || !kp.addr)
		goto out;
	sprint_symbol(sym, (unsigned long)kp.addr);
	if (!strncmp(sym, name, len) && !strncmp(sym + len, "+0x0/", 5) &&
	    !kstrtoul(sym + len + 5, 16, size)) {
		addr = kp.addr;
		dev_dbg(dev, "%s at %px (%s)\n", name, addr, sym);
	}
out:
	kfree(sym);
	return addr;
}

/* The vDSO RNG data: through vdso_k_rng_data (6.15+), or _vdso_rng_data (6.11-6.12). */
static const char *crng_find_vdso(struct device *dev, struct crng_objs *o)
{
	struct vdso_rng_layout **ptr;
	unsigned long size;

	ptr = vmwipe_lookup(dev, "vdso_k_rng_data", &size);
	if (ptr && size >= sizeof(*ptr)) {
		o->vdso = READ_ONCE(*ptr);
		o->vdso_name = "vdso_k_rng_data";
		dev_dbg(dev, "vdso_k_rng_data points to %px\n", o->vdso);
		return o->vdso ? NULL : "vdso_k_rng_data is NULL";
	}
	o->vdso = vmwipe_lookup(dev, "_vdso_rng_data", &size);
	o->vdso_name = "_vdso_rng_data";
	if (o->vdso && size >= sizeof(*o->vdso))
		return NULL;
	o->vdso = NULL;
	return "vDSO getrandom on, but vDSO RNG data not found";
}

static void crng_snap(const struct crng_objs *o, struct crng_snap *s)
{
	s->jiffies = jiffies;
	/* Enough for either layout, where kallsyms says the object is that large. */
	memcpy(&s->base, o->base, min(o->base_size, sizeof(s->base)));
	memcpy(&s->hash, &o->pool->hash, sizeof(s->hash));
	if (o->vdso)
		memcpy(&s->vdso, o->vdso, sizeof(s->vdso));
}

static unsigned long crng_next_gen(unsigned long gen)
{
	return gen + 1 == ULONG_MAX ? gen + 2 : gen + 1;	/* random.c skips "never" */
}

/* Does base_crng read as one forced reseed in the layout @o->birth says? */
static bool crng_base_ok(const struct crng_objs *o, const struct crng_snap *a,
			 const struct crng_snap *b)
{
	const struct base_crng_birth *ab = &a->base.birth, *bb = &b->base.birth;
	const struct base_crng_nobirth *an = &a->base.nobirth, *bn = &b->base.nobirth;

	if (o->birth)
		return bb->generation == crng_next_gen(ab->generation) &&
		       memcmp(ab->key, bb->key, sizeof(ab->key)) &&
		       !time_before(bb->birth, a->jiffies) && !time_after(bb->birth, b->jiffies) &&
		       !memchr_inv(&ab->lock, 0, sizeof(ab->lock)) &&
		       !memchr_inv(&bb->lock, 0, sizeof(bb->lock));
	return bn->generation == crng_next_gen(an->generation) &&
	       memcmp(an->key, bn->key, sizeof(an->key)) &&
	       !memchr_inv(&an->lock, 0, sizeof(an->lock)) &&
	       !memchr_inv(&bn->lock, 0, sizeof(bn->lock));
}

/*
 * Right after a reseed, extract_entropy() has re-keyed the pool's BLAKE2s
 * state with blake2s_init_key(): h is the public IV (for a 32-byte key and
 * hash), nothing counted, and the new key waits in buf. So it is h that
 * stays the same from one reseed to the next, and the key in buf that changes.
 */
static const char *crng_pool_check(const vmwipe_blake2s_t *a, const vmwipe_blake2s_t *b)
{
	static const u32 iv[8] = {
		BLAKE2S_IV0, BLAKE2S_IV1, BLAKE2S_IV2, BLAKE2S_IV3,
		BLAKE2S_IV4, BLAKE2S_IV5, BLAKE2S_IV6, BLAKE2S_IV7,
	};
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(iv); i++)
		if (b->h[i] != (i ? iv[i] : iv[0] ^ (0x01010000 | 32 << 8 | 32)))
			return "input_pool.hash is not a freshly keyed BLAKE2s state";
	if (b->t[0] || b->t[1] || b->f[0] || b->f[1] || b->outlen != BLAKE2S_HASH_SIZE ||
	    b->buflen != BLAKE2S_BLOCK_SIZE || memchr_inv(b->buf + 32, 0, sizeof(b->buf) - 32))
		return "input_pool.hash is not a freshly keyed BLAKE2s state";
	if (!memcmp(a->buf, b->buf, 32))
		return "input_pool.hash was not re-keyed";
	return NULL;
}

/* @a and @b were taken just before and just after one forced reseed. */
static const char *crng_check(struct crng_objs *o, const struct crng_snap *a,
			      const struct crng_snap *b)
{
	bool birth, nobirth;
	unsigned long gen;
	const char *why;

	/* Exactly one layout may fit; each misreads the other's fields. */
	o->birth = false;
	nobirth = crng_base_ok(o, a, b);
	o->birth = o->base_size >= sizeof(struct base_crng_birth);
	birth = o->birth && crng_base_ok(o, a, b);
	if (birth == nobirth)
		return birth ? "base_crng fits two layouts" : "base_crng does not fit a known layout";
	o->birth = birth;
	why = crng_pool_check(&a->hash, &b->hash);
	if (why)
		return why;
	gen = birth ? b->base.birth.generation : b->base.nobirth.generation;
	if (o->vdso && (b->vdso.generation != (u64)gen + 1 || b->vdso.is_ready != 1))
		return "vDSO RNG generation is not base_crng.generation + 1";
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
	struct crng_snap before = { }, after = { };
	const char *why = NULL;
	unsigned long size;
	int i;

	o->base = vmwipe_lookup(dev, "base_crng", &o->base_size);
	if (!o->base)
		return "base_crng not found";
	if (o->base_size < sizeof(struct base_crng_nobirth))
		return "base_crng is smaller than any known layout";
	o->pool = vmwipe_lookup(dev, "input_pool", &size);
	if (!o->pool)
		return "input_pool not found";
	if (size < sizeof(*o->pool))
		return "input_pool is smaller than its known layout";
	if (IS_ENABLED(CONFIG_VDSO_GETRANDOM)) {
		why = crng_find_vdso(dev, o);
		if (why)
			return why;
	}

	if (wait_for_random_bytes())
		return "interrupted waiting for the CRNG to be ready";
	crng_urandom = filp_open("/dev/urandom", O_RDONLY, 0);
	if (IS_ERR(crng_urandom)) {
		crng_urandom = NULL;
		return "cannot open /dev/urandom";
	}

	/* A reseed or pool mix of the kernel's own may interleave: try three times. */
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
	struct vmwipe_kmem ranges[5];
	unsigned int n = 0;
	const char *why;
	int slots;

	if (!crng_refresh) {
		crng_report(vmw, "disabled (crng_refresh=0)");
		return;
	}
	why = crng_find(dev, &o);
	if (why) {
		dev_warn(dev, "kernel CRNG not registered: %s\n", why);
		crng_report(vmw, why);
		return;
	}

	/* Not birth (before 6.2): a random one would only make the next reseed come sooner or later. */
	if (o.birth) {
		struct base_crng_birth *b = o.base;

		ranges[n++] = (struct vmwipe_kmem){ b->key, sizeof(b->key) };
		ranges[n++] = (struct vmwipe_kmem){ &b->generation, sizeof(b->generation) };
	} else {
		struct base_crng_nobirth *b = o.base;

		ranges[n++] = (struct vmwipe_kmem){ b->key, sizeof(b->key) };
		ranges[n++] = (struct vmwipe_kmem){ &b->generation, sizeof(b->generation) };
	}
	ranges[n++] = (struct vmwipe_kmem){ o.pool->hash.h, sizeof(o.pool->hash.h) };
	if (o.vdso)
		ranges[n++] = (struct vmwipe_kmem){ &o.vdso->generation, sizeof(o.vdso->generation) };
	ranges[n++] = (struct vmwipe_kmem){ crng_seed, sizeof(crng_seed) };
	slots = vmwipe_list_kmem(vmw, ranges, n);
	if (slots < 0) {
		dev_warn(dev, "kernel CRNG not registered: no free table slots\n");
		crng_report(vmw, "no free table slots");
		return;
	}
	WRITE_ONCE(crng_why, NULL);
	vmwipe_crng_status(vmw, VMWIPE_CRNG_STATUS_ACTIVE, slots, "");
	dev_info(dev, "kernel CRNG registered: base_crng key+generation, input_pool%s%s, seed (%d ranges)\n",
		 o.vdso ? ", " : "", o.vdso ? o.vdso_name : "", slots);
}

void vmwipe_crng_wiped(void)
{
	if (crng_why)
		return;
	/* The host's bytes, then never again: a later snapshot holds zeros here. */
	add_device_randomness(crng_seed, sizeof(crng_seed));
	memzero_explicit(crng_seed, sizeof(crng_seed));
	crng_reseed();
}

static ssize_t crng_refresh_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	const char *why = READ_ONCE(crng_why);

	return why ? sysfs_emit(buf, "unavailable: %s\n", why) : sysfs_emit(buf, "active\n");
}
DEVICE_ATTR_RO(crng_refresh);
