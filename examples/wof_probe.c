// SPDX-License-Identifier: MIT
/*
 * A program that knows nothing of vmwipe, for tests/test_retrofit.py: it
 * uses a MADV_WIPEONFORK sentinel the way BoringSSL's fork detection does
 * (crypto/fork_detect.c: mmap a page, madvise it, store a non-zero word;
 * zero later means "we are a fork: reseed"). Linked dynamically so that
 * libvmwipe-preload.so can be preloaded.
 *
 *   wof_probe sentinel   set up the sentinel, print "PFN 0x..", "SENTINEL
 *                        READY" and "FORK zero=1" (from a child), then
 *                        poll it; print "SENTINEL ZERO" once it reads 0
 *   wof_probe advice     madvise() gives the same result and errno as the
 *                        bare system call for every advice value, and
 *                        keeps errno on success
 *   wof_probe keep       "USED n" (sysfs used) after MADV_WIPEONFORK of two
 *                        pages and again after MADV_KEEPONFORK
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "probe.h"

static int cmd_sentinel(void)
{
	volatile uint64_t *s = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int status;
	pid_t pid;

	if ((void *)s == MAP_FAILED || madvise((void *)s, PAGE, MADV_WIPEONFORK)) {
		printf("SENTINEL FAIL errno %d\n", errno);
		return 1;
	}
	*s = 1;
	printf("PFN 0x%" PRIx64 "\n", pfn_of((void *)s));
	fflush(stdout);
	pid = fork();
	if (!pid)
		_exit(*s == 0 ? 0 : 1);
	waitpid(pid, &status, 0);
	printf("FORK zero=%d\n", WIFEXITED(status) && WEXITSTATUS(status) == 0);
	printf("SENTINEL READY\n");
	fflush(stdout);
	while (*s)
		usleep(20000);
	printf("SENTINEL ZERO\n");
	return 0;
}

struct outcome {
	long ret;
	int err;
};

static struct outcome via_libc(void *p, size_t len, int advice)
{
	struct outcome o;

	errno = 4242;
	o.ret = madvise(p, len, advice);
	o.err = errno;
	return o;
}

static struct outcome via_syscall(void *p, size_t len, int advice)
{
	struct outcome o;

	errno = 4242;
	o.ret = syscall(SYS_madvise, p, len, advice);
	o.err = errno;
	return o;
}

static int cmd_advice(void)
{
	static const size_t lens[] = { PAGE, 2 * PAGE, 1, 0 };
	int advice, bad = 0, n = 0;
	unsigned int l, kind;

	/* Not 100/101 (MADV_HWPOISON, MADV_SOFT_OFFLINE): they would do it. */
	for (advice = -1; advice <= 30; advice++) {
		for (kind = 0; kind < 4; kind++) {
			for (l = 0; l < sizeof(lens) / sizeof(lens[0]); l++) {
				/* anon private, anon shared, unaligned, unmapped */
				int flags = kind == 1 ? MAP_SHARED : MAP_PRIVATE;
				unsigned char *a = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE,
							flags | MAP_ANONYMOUS, -1, 0);
				unsigned char *b = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE,
							flags | MAP_ANONYMOUS, -1, 0);
				struct outcome x, y;

				if (kind == 3) {
					munmap(a, 2 * PAGE);
					munmap(b, 2 * PAGE);
				} else {
					memset(a, 1, 2 * PAGE);
					memset(b, 1, 2 * PAGE);
				}
				x = via_libc(a + (kind == 2), lens[l], advice);
				y = via_syscall(b + (kind == 2), lens[l], advice);
				n++;
				if (x.ret != y.ret || x.err != y.err) {
					printf("DIFF advice %d kind %u len %zu: libc %ld/%d, syscall %ld/%d\n",
					       advice, kind, lens[l], x.ret, x.err, y.ret, y.err);
					bad = 1;
				}
				if (kind != 3) {
					munmap(a, 2 * PAGE);
					munmap(b, 2 * PAGE);
				}
			}
		}
	}
	printf("ADVICE %d calls %s\n", n, bad ? "FAIL" : "OK");
	return bad;
}

static long used(void)
{
	FILE *f = fopen("/sys/class/misc/vmwipe/used", "r");
	long v = -1;

	if (f && fscanf(f, "%ld", &v) != 1)
		v = -1;
	if (f)
		fclose(f);
	return v;
}

static int cmd_keep(void)
{
	char *p = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return 1;
	p[0] = 1;
	printf("USED %ld\n", used());
	if (madvise(p, 2 * PAGE, MADV_WIPEONFORK))
		return 1;
	printf("USED %ld\n", used());
	if (madvise(p, 2 * PAGE, MADV_KEEPONFORK))
		return 1;
	printf("USED %ld\n", used());
	return 0;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(cmd, "sentinel"))
		return cmd_sentinel();
	if (!strcmp(cmd, "advice"))
		return cmd_advice();
	if (!strcmp(cmd, "keep"))
		return cmd_keep();
	fprintf(stderr, "usage: wof_probe sentinel|advice|keep\n");
	return 2;
}
