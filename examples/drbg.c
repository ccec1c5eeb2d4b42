// SPDX-License-Identifier: MIT
#include "drbg.h"
#include "vmwipe.h"

#include <cpuid.h>
#include <errno.h>
#include <string.h>
#include <sys/random.h>

struct drbg_state {
	uint64_t live;		/* set first when seeding; 0 means wiped */
	uint64_t epoch;
	uint64_t counter;
	uint32_t key[8];
	uint32_t block[16];	/* working state: secrets never touch the stack */
};

/* The host changes the page behind the compiler's back. */
#define barrier() __atomic_signal_fence(__ATOMIC_SEQ_CST)

static int live(const struct drbg_state *s)
{
	return __atomic_load_n(&s->live, __ATOMIC_SEQ_CST) != 0;
}

static int getrandom_all(void *buf, size_t len)
{
	unsigned char *p = buf;

	while (len) {
		ssize_t n = getrandom(p, len, 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/*
 * With vmwipe.ko registering the kernel CRNG (sysfs crng_refresh "active"),
 * getrandom() already differs between clones from their first instruction.
 * Where it cannot (crng_refresh "unavailable"), the kernel reseeds only when
 * vmgenid's notification is handled, a moment after resume; RDRAND differs
 * between clones at once, so mix it in when the CPU offers it.
 */
__attribute__((target("rdrnd")))
static void mix_rdrand(uint32_t *key, unsigned int words)
{
	unsigned int a, b, c, d, i, r;

	if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_RDRND))
		return;
	for (i = 0; i < words; i++)
		if (__builtin_ia32_rdrand32_step(&r))
			key[i] ^= r;
}

static int reseed(struct drbg_state *s)
{
	uint32_t ep[2];

	/* A wipe anywhere in here clears live, and we start again. */
	do {
		__atomic_store_n(&s->live, 1, __ATOMIC_SEQ_CST);
		if (getrandom_all(&s->epoch, sizeof(s->epoch)) ||
		    getrandom_all(s->key, sizeof(s->key)))
			return -1;
		mix_rdrand(s->key, 8);
		/*
		 * The epoch too: clones that reseed before the kernel has handled
		 * vmgenid would otherwise draw the same epoch from the same CRNG.
		 */
		ep[0] = ep[1] = 0;
		mix_rdrand(ep, 2);
		s->epoch ^= (uint64_t)ep[1] << 32 | ep[0];
		s->counter = 0;
	} while (!live(s));
	return 0;
}

#define ROTL(v, n) (((v) << (n)) | ((v) >> (32 - (n))))
#define QR(a, b, c, d)					\
	do {						\
		a += b; d ^= a; d = ROTL(d, 16);	\
		c += d; b ^= c; b = ROTL(b, 12);	\
		a += b; d ^= a; d = ROTL(d, 8);		\
		c += d; b ^= c; b = ROTL(b, 7);		\
	} while (0)

/* One ChaCha20 block (RFC 8439 rounds, 64-bit counter, 64-bit nonce). */
static void chacha20_block(uint32_t x[16], const uint32_t key[8], uint64_t counter, uint64_t nonce)
{
	static const uint32_t sigma[4] = { 0x61707865, 0x3320646e, 0x79622d32, 0x6b206574 };
	uint32_t in[16];
	int i;

	memcpy(in, sigma, sizeof(sigma));
	memcpy(in + 4, key, 32);
	in[12] = (uint32_t)counter;
	in[13] = (uint32_t)(counter >> 32);
	in[14] = (uint32_t)nonce;
	in[15] = (uint32_t)(nonce >> 32);
	memcpy(x, in, sizeof(in));
	for (i = 0; i < 10; i++) {
		QR(x[0], x[4], x[8], x[12]);
		QR(x[1], x[5], x[9], x[13]);
		QR(x[2], x[6], x[10], x[14]);
		QR(x[3], x[7], x[11], x[15]);
		QR(x[0], x[5], x[10], x[15]);
		QR(x[1], x[6], x[11], x[12]);
		QR(x[2], x[7], x[8], x[13]);
		QR(x[3], x[4], x[9], x[14]);
	}
	for (i = 0; i < 16; i++)
		x[i] += in[i];
	/* in[] held the key: do not leave it on the stack. */
	memset(in, 0, sizeof(in));
	barrier();
}

int drbg_init(struct drbg *d)
{
	d->s = vmwipe_alloc(sizeof(*d->s));
	return d->s ? 0 : -1;
}

int drbg_init_fill(struct drbg *d)
{
	d->s = vmwipe_alloc_fill(sizeof(*d->s));
	if (!d->s)
		return -1;
	/* Seeded once here; after a clone the host's bytes are the new seed. */
	return reseed(d->s);
}

void drbg_destroy(struct drbg *d)
{
	vmwipe_free(d->s, sizeof(*d->s));
	d->s = NULL;
}

int drbg_valid(const struct drbg *d, const struct drbg_output *out)
{
	barrier();
	return live(d->s) && d->s->epoch == out->epoch;
}

int drbg_generate(struct drbg *d, struct drbg_output *out)
{
	struct drbg_state *s = d->s;

	for (;;) {
		barrier();
		if (!live(s) && reseed(s))
			return -1;
		out->epoch = s->epoch;
		out->counter = s->counter++;
		chacha20_block(s->block, s->key, out->counter, out->epoch);
		out->value = s->block[0] | (uint64_t)s->block[1] << 32;
		/* Wiped while computing: the output mixes two states, drop it. */
		if (drbg_valid(d, out))
			return 0;
	}
}
