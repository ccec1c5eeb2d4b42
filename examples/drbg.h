/* SPDX-License-Identifier: MIT */
/*
 * A ChaCha20 DRBG whose key, counter and epoch live in a vmwipe page, in one
 * of two styles:
 *
 * - drbg_init(): a page the host zeroes. After a restore or a clone the state
 *   reads as zero; the next call notices, reseeds from getrandom() (mixed with
 *   RDRAND where the CPU has it) and picks a new random epoch.
 * - drbg_init_fill(): a page the host fills with fresh random bytes (protocol
 *   v2). The next call simply runs on with the host's key, counter and epoch:
 *   no detection, no reseed, no syscall.
 *
 * Either way two clones never continue the same stream.
 */
#ifndef VMWIPE_DRBG_H
#define VMWIPE_DRBG_H

#include <stdint.h>

struct drbg_state;

struct drbg {
	struct drbg_state *s;	/* in a vmwipe page */
};

struct drbg_output {
	uint64_t epoch;		/* random id of the seed this came from */
	uint64_t counter;	/* position in that seed's stream */
	uint64_t value;
};

int drbg_init(struct drbg *d);
int drbg_init_fill(struct drbg *d);
void drbg_destroy(struct drbg *d);

/* Next output; reseeds first if the page was wiped. 0, or -1 and errno. */
int drbg_generate(struct drbg *d, struct drbg_output *out);

/*
 * Whether @out still belongs to the live seed. Call it again right before
 * using an output: if the page was wiped since, the output must be dropped.
 */
int drbg_valid(const struct drbg *d, const struct drbg_output *out);

#endif
