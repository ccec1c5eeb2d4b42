// SPDX-License-Identifier: GPL-2.0-only
/*
 * vmwipe: the kernel's other per-boot secrets as fill ranges, so that a clone
 * does not share them with every other clone of its image.
 *
 * Each is a siphash key drawn once per boot and kept for its life:
 *  - net_secret (net/core/secure_seq.c): every TCP initial sequence number
 *    and the ephemeral source port chosen for a destination;
 *  - ts_secret (same file): every TCP connection's timestamp offset (kernels
 *    with secure_tcp_seq_and_ts_off(), 6.1.0-5x and 6.12.1xx in Debian among
 *    them, have no ts_secret: net_secret gives both);
 *  - syncookie_secret[2] (net/ipv4/syncookies.c) and syncookie6_secret[2]
 *    (net/ipv6/syncookies.c, when IPv6 is built in): SYN cookies;
 *  - ptr_key (lib/vsprintf.c): the hash behind %p in logs.
 * Refilling one changes only what is computed from it afterwards: a socket
 * keeps the ISN and timestamp offset it was given (they are stored in it),
 * so established connections carry on; SYN cookies in flight fail (the
 * peer retries) and %p hashes differ from those logged before.
 *
 * The kernel draws the first four on first use (net_get_random_once), ptr_key
 * once the CRNG is ready; until then a key holds zero bytes, as all static
 * storage starts. So "all zero" means "not drawn yet": a drawn key is 128 or
 * 256 random bits, all zero with odds of 2^-128, and a key read in the middle
 * of its draw reads non-zero and is registered, then refilled whole by the
 * host. A zero key is not registered, as there is nothing to protect yet: a
 * clone of an image saved before the draw makes its own on first use, and
 * would draw over the host's bytes anyway (its once-flag, which this module
 * cannot see, is still clear). It is looked at again on every watch tick
 * (poll_ms) and registered once drawn; only an image saved within one tick
 * of the draw holds a key its clones share.
 *
 * Found like the CRNG's objects (vmwipe_lookup: a core-kernel data symbol,
 * by name, with its kallsyms size); one that is missing, too small or not in
 * the kernel's direct or image mapping is not registered, and sysfs
 * kernel_secrets says why.
 *
 * Left alone, because changing them under a running kernel breaks it: the
 * hash-table seeds (inet/udp/ipv6 ehash secrets, rhashtable and jhash seeds:
 * entries already hashed would no longer be found), the stack-protector
 * canary (live stack frames hold copies) and the KASLR offset (the code is
 * already placed).
 */

#include <linux/device.h>
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/mutex.h>
#include <linux/siphash.h>
#include <linux/string.h>
#include <linux/sysfs.h>

#include "crng.h"
#include "vmwipe_abi.h"

static bool ksecrets_refresh = true;
module_param(ksecrets_refresh, bool, 0444);
MODULE_PARM_DESC(ksecrets_refresh, "register the kernel's TCP, SYN-cookie and %p keys for the host to refill (default on; off with crng_refresh=0)");

struct ksecret {
	const char *sym;
	const char *name;	/* as the host names it (KSECRET_NAMES) */
	u32 bit;
	size_t len;
	const char *absent;	/* why a kernel may not have it */
	void *addr;		/* found and checked; registered unless @why */
	const char *why;	/* NULL: registered */
};

static struct ksecret ksecrets[] = {
	{ "net_secret", "net_secret", VMWIPE_KSECRET_NET_SECRET, sizeof(siphash_key_t),
	  "not found" },
	{ "ts_secret", "ts_secret", VMWIPE_KSECRET_TS_SECRET, sizeof(siphash_key_t),
	  "not found (this kernel derives TCP timestamp offsets from net_secret)" },
	{ "syncookie_secret", "syncookie", VMWIPE_KSECRET_SYNCOOKIE, 2 * sizeof(siphash_key_t),
	  "not found (no CONFIG_SYN_COOKIES)" },
	{ "syncookie6_secret", "syncookie6", VMWIPE_KSECRET_SYNCOOKIE6,
	  2 * sizeof(siphash_key_t), "not found (IPv6 is a module, or off)" },
	{ "ptr_key", "ptr_key", VMWIPE_KSECRET_PTR_KEY, sizeof(siphash_key_t), "not found" },
};

static const char *const ksecret_unset = "not drawn yet (looked at again every poll_ms)";

/* Orders the probe, the watch's ticks and sysfs reads of ksecrets[]. */
static DEFINE_MUTEX(ksecrets_lock);
static const char *ksecrets_off;	/* NULL: on; set at probe */
static u32 ksecrets_mask;
static u32 ksecrets_ranges;

static const char *ksecret_find(struct device *dev, struct ksecret *k)
{
	unsigned long size;

	k->addr = vmwipe_lookup(dev, k->sym, &size);
	if (!k->addr)
		return k->absent;
	if (size < k->len)
		return "smaller than a siphash key";
	if (!IS_ALIGNED((unsigned long)k->addr, sizeof(u64)) || !virt_addr_valid(k->addr))
		return "not in the kernel's data";
	return NULL;
}

/* Register @k if the kernel has drawn it; false if nothing changed. */
static bool ksecret_try(struct device *dev, struct vmwipe *vmw, struct ksecret *k)
{
	int slots;

	lockdep_assert_held(&ksecrets_lock);
	if (k->why != ksecret_unset || !memchr_inv(k->addr, 0, k->len))
		return false;
	slots = vmwipe_list_kmem(vmw, &(struct vmwipe_kmem){ k->addr, k->len }, 1);
	if (slots < 0) {
		k->why = "no free table slots";
		return false;
	}
	k->why = NULL;
	ksecrets_mask |= k->bit;
	ksecrets_ranges += slots;
	dev_info(dev, "kernel secret registered: %s (%d %s)\n", k->sym, slots,
		 slots == 1 ? "range" : "ranges");
	return true;
}

/* After the CRNG's registration, and before the watch starts. */
void vmwipe_ksecrets_probe(struct device *dev, struct vmwipe *vmw)
{
	struct ksecret *k;

	mutex_lock(&ksecrets_lock);
	ksecrets_mask = 0;
	ksecrets_ranges = 0;
	ksecrets_off = !vmwipe_crng_enabled() ? "disabled (crng_refresh=0)" :
		       !ksecrets_refresh ? "disabled (ksecrets_refresh=0)" : NULL;
	for (k = ksecrets; k < ksecrets + ARRAY_SIZE(ksecrets); k++) {
		k->addr = NULL;
		k->why = ksecrets_off ? ksecrets_off : ksecret_find(dev, k);
		if (!k->why) {
			k->why = ksecret_unset;
			ksecret_try(dev, vmw, k);
		} else if (!ksecrets_off) {
			dev_info(dev, "kernel secret %s not registered: %s\n", k->sym, k->why);
		}
	}
	vmwipe_ksecrets_status(vmw, VMWIPE_KSECRETS_REPORTED | ksecrets_mask, ksecrets_ranges);
	mutex_unlock(&ksecrets_lock);
}

/* From the watch: register what the kernel has drawn since. */
void vmwipe_ksecrets_poll(struct device *dev, struct vmwipe *vmw)
{
	bool changed = false;
	struct ksecret *k;

	mutex_lock(&ksecrets_lock);
	for (k = ksecrets; k < ksecrets + ARRAY_SIZE(ksecrets); k++)
		changed |= ksecret_try(dev, vmw, k);
	if (changed)
		vmwipe_ksecrets_status(vmw, VMWIPE_KSECRETS_REPORTED | ksecrets_mask,
				       ksecrets_ranges);
	mutex_unlock(&ksecrets_lock);
}

/* One line per secret: "<name>: registered" or "<name>: not registered: <why>". */
static ssize_t kernel_secrets_show(struct device *dev, struct device_attribute *attr,
				   char *buf)
{
	const struct ksecret *k;
	int n = 0;

	mutex_lock(&ksecrets_lock);
	for (k = ksecrets; k < ksecrets + ARRAY_SIZE(ksecrets); k++) {
		const char *why = ksecrets_off ? ksecrets_off : k->why;

		if (why)
			n += sysfs_emit_at(buf, n, "%s: not registered: %s\n", k->name, why);
		else
			n += sysfs_emit_at(buf, n, "%s: registered\n", k->name);
	}
	mutex_unlock(&ksecrets_lock);
	return n;
}
DEVICE_ATTR_RO(kernel_secrets);
