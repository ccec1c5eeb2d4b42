/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Helpers shared by the guest-side test probes (vmwipe_test, retrofit_test,
 * wof_probe): a CHECK-style failure log, the final OK/FAIL line the host
 * tests parse, and the page-frame lookup the host compares with the table.
 */
#ifndef VMWIPE_PROBE_H
#define VMWIPE_PROBE_H

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define PAGE 4096UL
#define FILL 0x5a	/* what the probes write into pages they hold */
#define SYSFS "/sys/class/misc/vmwipe/"

static int failed;

static inline void check(int ok, const char *what, ...)
{
	va_list ap;

	if (ok)
		return;
	failed = 1;
	printf("FAIL ");
	va_start(ap, what);
	vprintf(what, ap);
	va_end(ap);
	printf(" (errno %d %s)\n", errno, strerror(errno));
}

static inline int done(const char *name)
{
	printf("%s %s\n", name, failed ? "FAIL" : "OK");
	return failed;
}

/* bit 63: present; bits 54..0: PFN (reading it needs CAP_SYS_ADMIN) */
static inline uint64_t pfn_of(const void *addr)
{
	uint64_t entry = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);

	if (fd < 0 || pread(fd, &entry, 8, (off_t)((uintptr_t)addr / PAGE * 8)) != 8)
		entry = 0;
	if (fd >= 0)
		close(fd);
	return entry >> 63 ? entry & ((1ULL << 55) - 1) : 0;
}

static inline int is_zero(const unsigned char *p, size_t len)
{
	while (len--)
		if (*p++)
			return 0;
	return 1;
}

#endif
