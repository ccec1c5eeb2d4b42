// SPDX-License-Identifier: MIT
/*
 * bssl_stream: random bytes drawn through a real TLS library's own API, for
 * the retrofit proof in tests/test_retrofit.py. The program knows nothing of
 * vmwipe.
 *
 * It loads BoringSSL's libcrypto (Debian's android-libboringssl) and prints
 * one line per RAND_bytes() call, in drbg_stream's format:
 *
 *   GENERATION COUNTER VALUE       (hex 16, decimal, hex 16)
 *
 * GENERATION is CRYPTO_get_fork_generation(), BoringSSL's fork-detection
 * epoch: it moves when the library finds its MADV_WIPEONFORK sentinel page
 * zeroed, and then RAND_bytes() reseeds from the kernel. COUNTER counts the
 * outputs within a generation. The library is opened with dlopen() so that
 * the program builds without the package.
 *
 *   bssl_stream [-i INTERVAL_MS] [-l LIBCRYPTO]
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LIBCRYPTO "/usr/lib/x86_64-linux-gnu/android/libcrypto.so.0"

int main(int argc, char **argv)
{
	const char *lib = LIBCRYPTO;
	long interval_ms = 1;
	int (*rand_bytes)(uint8_t *, size_t);
	uint64_t (*fork_generation)(void);
	uint64_t gen, last = 0, value;
	unsigned long counter = 0;
	struct timespec ts;
	void *h;
	int opt;

	while ((opt = getopt(argc, argv, "i:l:")) != -1) {
		if (opt == 'i')
			interval_ms = strtol(optarg, NULL, 0);
		else if (opt == 'l')
			lib = optarg;
		else
			return 2;
	}
	h = dlopen(lib, RTLD_NOW);
	if (!h) {
		fprintf(stderr, "bssl_stream: %s\n", dlerror());
		return 1;
	}
	rand_bytes = (int (*)(uint8_t *, size_t))dlsym(h, "RAND_bytes");
	fork_generation = (uint64_t (*)(void))dlsym(h, "CRYPTO_get_fork_generation");
	if (!rand_bytes || !fork_generation) {
		fprintf(stderr, "bssl_stream: %s lacks RAND_bytes or CRYPTO_get_fork_generation\n",
			lib);
		return 1;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	ts.tv_sec = interval_ms / 1000;
	ts.tv_nsec = interval_ms % 1000 * 1000000;
	for (;;) {
		if (rand_bytes((uint8_t *)&value, sizeof(value)) != 1)
			return 1;
		/* RAND_bytes() looked at the sentinel first: this is its epoch. */
		gen = fork_generation();
		if (gen != last)
			counter = 0;
		last = gen;
		printf("%016" PRIx64 " %lu %016" PRIx64 "\n", gen, counter++, value);
		if (interval_ms)
			nanosleep(&ts, NULL);
	}
}
