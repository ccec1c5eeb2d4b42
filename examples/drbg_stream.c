// SPDX-License-Identifier: MIT
/*
 * Print DRBG outputs, one per line, as "EPOCH COUNTER VALUE" (EPOCH and VALUE
 * in 16 hex digits, COUNTER in decimal). A new EPOCH means the state was
 * wiped and reseeded. Runs forever unless -n is given.
 *
 *   drbg_stream [-n COUNT] [-i INTERVAL_MS]     (default interval 100 ms)
 */
#include "drbg.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int write_all(const char *buf, size_t len)
{
	while (len) {
		ssize_t n = write(STDOUT_FILENO, buf, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

int main(int argc, char **argv)
{
	unsigned long long count = 0, emitted = 0;
	long interval_ms = 100;
	int opt, fill = 0;
	struct drbg d;

	while ((opt = getopt(argc, argv, "n:i:f")) != -1) {
		switch (opt) {
		case 'f':
			fill = 1;
			break;
		case 'n':
			count = strtoull(optarg, NULL, 0);
			break;
		case 'i':
			interval_ms = strtol(optarg, NULL, 0);
			break;
		default:
			fprintf(stderr, "usage: %s [-f] [-n COUNT] [-i INTERVAL_MS]\n", argv[0]);
			return 2;
		}
	}
	if (fill ? drbg_init_fill(&d) : drbg_init(&d)) {
		perror("drbg_stream: vmwipe_alloc");
		return 1;
	}
	while (!count || emitted < count) {
		struct drbg_output out;
		char line[64];
		int len;

		if (drbg_generate(&d, &out)) {
			perror("drbg_stream: getrandom");
			return 1;
		}
		len = snprintf(line, sizeof(line), "%016llx %llu %016llx\n",
			       (unsigned long long)out.epoch, (unsigned long long)out.counter,
			       (unsigned long long)out.value);
		/* Last look before the value leaves: a wipe since means drop it. */
		if (!drbg_valid(&d, &out))
			continue;
		if (write_all(line, (size_t)len))
			return errno == EPIPE ? 0 : 1;
		emitted++;
		if (interval_ms > 0) {
			struct timespec ts = { interval_ms / 1000, (interval_ms % 1000) * 1000000 };

			nanosleep(&ts, NULL);
		}
	}
	drbg_destroy(&d);
	return 0;
}
