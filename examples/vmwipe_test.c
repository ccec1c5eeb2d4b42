// SPDX-License-Identifier: MIT
/*
 * Guest-side probes for tests/test_kmod.py. Each command prints marker lines
 * that the host test waits for on the serial console; "... OK" or
 * "... FAIL <why>" ends a check.
 *
 *   vmwipe_test hold N       map N pages, fill them, print their PFNs, then
 *                            SIGUSR1: munmap (prints UNMAPPED), SIGTERM: exit
 *   vmwipe_test holdfill N   the same with fill pages (mmap at VMWIPE_MMAP_FILL);
 *                            before the munmap it prints "DATA i HEX" (16 bytes)
 *   vmwipe_test fork         the child of fork() has no mapping
 *   vmwipe_test enospc       capacity gives ENOSPC, nothing half-published
 *   vmwipe_test cycles N     N map/unmap cycles leave used unchanged
 *   vmwipe_test errors       MAP_PRIVATE, exec, partial munmap, mremap, ...
 *   vmwipe_test memlock      mappings are charged to RLIMIT_MEMLOCK
 *   vmwipe_test share        one process holds at most max_share percent
 *   vmwipe_test unpriv       callers without CAP_IPC_LOCK hold at most
 *                            max_unpriv percent together, whatever their uids
 *   vmwipe_test poll MS      POLLPRI and a uevent when the host bumps
 *                            wipe_generation, and the page reads as zero
 */
#define _GNU_SOURCE
#include "vmwipe.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <linux/netlink.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "probe.h"
#include "vmwipe_uapi.h"

static long read_long(const char *path)
{
	long v = -1;
	FILE *f = fopen(path, "r");

	if (!f || fscanf(f, "%ld", &v) != 1)
		v = -1;
	if (f)
		fclose(f);
	return v;
}

static long sysfs_long(const char *name)
{
	char path[128];

	snprintf(path, sizeof(path), SYSFS "%s", name);
	return read_long(path);
}

static void *map(size_t npages, int prot, int flags, off_t off)
{
	int fd = open(VMWIPE_DEVICE, O_RDWR | O_CLOEXEC);
	void *p;
	int err;

	if (fd < 0)
		return MAP_FAILED;
	p = mmap(NULL, npages * PAGE, prot, flags, fd, off);
	err = errno;
	close(fd);
	errno = err;
	return p;
}

static void *map_rw(size_t npages)
{
	return map(npages, PROT_READ | PROT_WRITE, MAP_SHARED, 0);
}

static volatile sig_atomic_t got_usr1;

static void on_usr1(int sig)
{
	(void)sig;
	got_usr1 = 1;
}

static int cmd_hold(size_t n, off_t off)
{
	unsigned char *p = map(n, PROT_READ | PROT_WRITE, MAP_SHARED, off);
	sigset_t block, old;
	size_t i;

	if (p == MAP_FAILED) {
		printf("HOLD FAIL mmap errno %d\n", errno);
		return 1;
	}
	memset(p, FILL, n * PAGE);
	for (i = 0; i < n; i++)
		printf("PFN %zu 0x%" PRIx64 "\n", i, pfn_of(p + i * PAGE));
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigprocmask(SIG_BLOCK, &block, &old);
	signal(SIGUSR1, on_usr1);
	printf("HOLD READY\n");
	fflush(stdout);
	while (!got_usr1)
		sigsuspend(&old);
	for (i = 0; off && i < n; i++) {
		size_t k;

		printf("DATA %zu ", i);
		for (k = 0; k < 16; k++)
			printf("%02x", p[i * PAGE + k]);
		printf("\n");
	}
	munmap(p, n * PAGE);
	printf("UNMAPPED\n");
	fflush(stdout);
	for (;;)
		pause();
}

static int cmd_fork(void)
{
	long used = sysfs_long("used");
	unsigned char *p = map_rw(1);
	unsigned char vec;
	int status;
	pid_t pid;

	check(p != MAP_FAILED, "mmap");
	if (p == MAP_FAILED)
		return done("FORK");
	memset(p, FILL, PAGE);
	fflush(stdout);
	pid = fork();
	if (!pid) {
		/* mincore() fails with ENOMEM on an unmapped range. */
		_exit(mincore(p, PAGE, &vec) == -1 && errno == ENOMEM ? 0 : 1);
	}
	check(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) &&
	      WEXITSTATUS(status) == 0, "child still has the mapping");
	check(p[0] == FILL && p[PAGE - 1] == FILL, "parent lost its data");
	check(sysfs_long("used") == used + 1, "used changed by fork");
	munmap(p, PAGE);
	check(sysfs_long("used") == used, "munmap left a slot");
	return done("FORK");
}

static int cmd_enospc(void)
{
	long cap = sysfs_long("capacity"), used = sysfs_long("used");
	size_t avail = (size_t)(cap - used);
	unsigned char *all, *one;

	check(cap > 0 && used >= 0, "sysfs capacity=%ld used=%ld", cap, used);
	one = map_rw(avail + 1);
	check(one == MAP_FAILED && errno == ENOSPC, "mmap(avail+1) did not give ENOSPC");
	check(sysfs_long("used") == used, "failed mmap left slots used");
	all = map_rw(avail);
	check(all != MAP_FAILED, "mmap(avail=%zu)", avail);
	if (all != MAP_FAILED) {
		check(sysfs_long("used") == cap, "used != capacity when full");
		one = map_rw(1);
		check(one == MAP_FAILED && errno == ENOSPC, "mmap(1) when full did not give ENOSPC");
		munmap(all, avail * PAGE);
	}
	check(sysfs_long("used") == used, "slots not returned");
	printf("ENOSPC capacity=%ld avail=%zu\n", cap, avail);
	return done("ENOSPC");
}

static int cmd_cycles(long n)
{
	long used = sysfs_long("used"), i;

	for (i = 0; i < n && !failed; i++) {
		size_t np = 1 + (size_t)i % 4;
		unsigned char *p = map_rw(np);

		check(p != MAP_FAILED, "mmap in cycle %ld", i);
		if (p == MAP_FAILED)
			break;
		check(is_zero(p, np * PAGE), "fresh mapping not zero in cycle %ld", i);
		memset(p, FILL, np * PAGE);
		munmap(p, np * PAGE);
	}
	check(sysfs_long("used") == used, "used %ld -> %ld", used, sysfs_long("used"));
	printf("CYCLES %ld\n", i);
	return done("CYCLES");
}

static void expect_errno(int ret_failed, int want, const char *what)
{
	int got = errno;

	check(ret_failed && got == want, "%s: want errno %d, got %s %d", what, want,
	      ret_failed ? "errno" : "success", ret_failed ? got : 0);
}

static int cmd_errors(void)
{
	long used = sysfs_long("used");
	unsigned char *p, *q;

	p = map(1, PROT_READ | PROT_WRITE, MAP_PRIVATE, 0);
	expect_errno(p == MAP_FAILED, EINVAL, "MAP_PRIVATE");
	p = map(1, PROT_READ | PROT_EXEC, MAP_SHARED, 0);
	expect_errno(p == MAP_FAILED, EPERM, "PROT_EXEC");
	/* Offsets 0 and VMWIPE_MMAP_FILL are the two kinds of page; any other is refused. */
	p = map(1, PROT_READ | PROT_WRITE, MAP_SHARED, 2 * VMWIPE_MMAP_FILL);
	expect_errno(p == MAP_FAILED, EINVAL, "offset");
	check(sysfs_long("used") == used, "refused mmaps used slots");

	p = map_rw(2);
	check(p != MAP_FAILED, "mmap 2 pages");
	if (p == MAP_FAILED)
		return done("ERRORS");
	memset(p, FILL, 2 * PAGE);
	expect_errno(munmap(p + PAGE, PAGE) != 0, EINVAL, "partial munmap");
	expect_errno(mprotect(p, PAGE, PROT_READ) != 0, EINVAL, "partial mprotect");
	expect_errno(mprotect(p, 2 * PAGE, PROT_READ | PROT_EXEC) != 0, EACCES, "mprotect exec");
	expect_errno(madvise(p, 2 * PAGE, MADV_DODUMP) != 0, EINVAL, "MADV_DODUMP");
	/* MADV_DOFORK would clear VM_DONTCOPY: a child would inherit the secrets. */
	expect_errno(madvise(p, 2 * PAGE, MADV_DOFORK) != 0, EINVAL, "MADV_DOFORK");
	q = mremap(p, 2 * PAGE, PAGE, 0);
	expect_errno(q == MAP_FAILED, EINVAL, "mremap shrink");
	q = mremap(p, 2 * PAGE, 4 * PAGE, MREMAP_MAYMOVE);
	expect_errno(q == MAP_FAILED, EFAULT, "mremap grow");
	q = mmap(NULL, 2 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	q = mremap(p, 2 * PAGE, 2 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, q);
	expect_errno(q == MAP_FAILED, EINVAL, "mremap move");
	check(p[0] == FILL && p[2 * PAGE - 1] == FILL, "data lost after refused calls");
	check(sysfs_long("used") == used + 2, "used %ld, want %ld", sysfs_long("used"), used + 2);
	check(munmap(p, 2 * PAGE) == 0, "whole munmap");
	check(sysfs_long("used") == used, "used %ld after munmap, want %ld",
	      sysfs_long("used"), used);
	return done("ERRORS");
}

static int cmd_memlock(void)
{
	struct rlimit lim = { 2 * PAGE, 2 * PAGE };
	unsigned char *p, *q;

	/* Without CAP_IPC_LOCK the limit applies: become nobody. */
	check(setrlimit(RLIMIT_MEMLOCK, &lim) == 0, "setrlimit");
	check(setgid(65534) == 0 && setuid(65534) == 0, "setuid nobody");
	p = map_rw(2);
	check(p != MAP_FAILED, "mmap within the limit");
	q = map_rw(1);
	expect_errno(q == MAP_FAILED, EAGAIN, "mmap over RLIMIT_MEMLOCK");
	if (p != MAP_FAILED)
		munmap(p, 2 * PAGE);
	q = map_rw(2);
	check(q != MAP_FAILED, "mmap after munmap returned the charge");
	return done("MEMLOCK");
}

/*
 * A root in a user namespace can take any uid, so a per-user memlock charge
 * does not bound it: one process may hold only max_share percent of the table.
 */
static int cmd_share(void)
{
	struct rlimit lim = { RLIM_INFINITY, RLIM_INFINITY };
	long cap = sysfs_long("capacity"), used = sysfs_long("used");
	long pct = read_long("/sys/module/vmwipe/parameters/max_share");
	size_t share = (size_t)(cap * pct / 100);
	unsigned char *p, *q;

	check(cap > 0 && pct > 0 && pct < 100 && cap - used > (long)share,
	      "capacity=%ld used=%ld max_share=%ld", cap, used, pct);
	check(setrlimit(RLIMIT_MEMLOCK, &lim) == 0, "setrlimit");
	check(setgid(65534) == 0 && setuid(65534) == 0, "setuid nobody");
	p = map_rw(share);
	check(p != MAP_FAILED, "mmap of the whole share (%zu pages), errno %d", share, errno);
	q = map_rw(1);
	expect_errno(q == MAP_FAILED, ENOSPC, "mmap over the process's share");
	if (p != MAP_FAILED)
		munmap(p, share * PAGE);
	q = map_rw(share);
	check(q != MAP_FAILED, "mmap after munmap returned the share");
	return done("SHARE");
}

/* In a child: become @uid with no memlock limit, map @n pages, exit 0 (mapped) or 1. */
static int map_as(uid_t uid, size_t n)
{
	struct rlimit lim = { RLIM_INFINITY, RLIM_INFINITY };

	if (setrlimit(RLIMIT_MEMLOCK, &lim) || setgid(uid) || setuid(uid))
		return 2;
	return map_rw(n) == MAP_FAILED ? 1 : 0;
}

/*
 * Two uids, each within its max_share, cannot take more than max_unpriv
 * percent of the table together; root (CAP_IPC_LOCK) still maps past that.
 */
static int cmd_unpriv(void)
{
	long cap = sysfs_long("capacity"), used = sysfs_long("used");
	long pct = read_long("/sys/module/vmwipe/parameters/max_share");
	long all = read_long("/sys/module/vmwipe/parameters/max_unpriv");
	size_t each = (size_t)(cap * pct / 100), pool = (size_t)(cap * all / 100);
	int ready[2], hold[2], st = -1;
	unsigned char *p;
	pid_t a, b;
	char c = 0;

	check(each > 0 && each < pool && 2 * each > pool && (long)pool + used < cap,
	      "capacity=%ld used=%ld max_share=%ld max_unpriv=%ld", cap, used, pct, all);
	check(pipe(ready) == 0 && pipe(hold) == 0, "pipe");
	if (failed)
		return done("UNPRIV");
	a = fork();
	if (a == 0) {
		close(hold[1]);
		c = map_as(65534, each) ? 'F' : 'K';
		(void)!write(ready[1], &c, 1);
		(void)!read(hold[0], &c, 1);	/* until the parent is done */
		_exit(0);
	}
	close(ready[1]);
	close(hold[0]);
	check(read(ready[0], &c, 1) == 1 && c == 'K', "uid 65534 maps its share (%zu pages)", each);
	b = fork();
	if (b == 0)
		_exit(map_as(65533, each) == 1 && errno == ENOSPC && !map_as(65533, pool - each) ?
		      0 : 1);
	waitpid(b, &st, 0);
	check(WIFEXITED(st) && WEXITSTATUS(st) == 0,
	      "uid 65533: ENOSPC past max_unpriv, then the rest of it (status %#x)", st);
	p = map_rw(pool);
	check(p != MAP_FAILED, "CAP_IPC_LOCK maps past max_unpriv, errno %d", errno);
	if (p != MAP_FAILED)
		munmap(p, pool * PAGE);
	close(hold[1]);
	waitpid(a, &st, 0);
	return done("UNPRIV");
}

/* Listen for kernel uevents (what udev gets) on the netlink socket. */
static int uevent_socket(void)
{
	struct sockaddr_nl addr = { .nl_family = AF_NETLINK, .nl_groups = 1 };
	int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT);

	if (fd >= 0 && bind(fd, (struct sockaddr *)&addr, sizeof(addr))) {
		close(fd);
		fd = -1;
	}
	return fd;
}

/* The VMWIPE_GENERATION value of the next vmwipe change uevent, or -1. */
static long long uevent_generation(int fd, int timeout_ms)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	char buf[4096];

	while (poll(&pfd, 1, timeout_ms) == 1) {
		ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
		long long gen = -1;
		int change = 0;
		char *p;

		if (n <= 0)
			break;
		buf[n] = 0;
		/* "ACTION@DEVPATH\0KEY=VALUE\0..." */
		for (p = buf; p < buf + n; p += strlen(p) + 1) {
			if (!strcmp(p, "ACTION=change"))
				change = 1;
			else if (!strncmp(p, "VMWIPE_GENERATION=", 18))
				gen = strtoll(p + 18, NULL, 10);
		}
		if (change && gen >= 0)
			return gen;
	}
	return -1;
}

static int cmd_poll(int timeout_ms)
{
	int nl = uevent_socket();
	long long ugen;
	int fd = open(VMWIPE_DEVICE, O_RDONLY | O_CLOEXEC);
	struct pollfd pfd = { .fd = fd, .events = POLLPRI };
	unsigned char *p = map_rw(1);
	uint64_t gen = 0, gen2 = 0;
	int n;

	check(fd >= 0 && p != MAP_FAILED && nl >= 0, "open/mmap/netlink");
	check(read(fd, &gen, sizeof(gen)) == sizeof(gen), "read generation");
	if (failed)
		return done("POLL");
	memset(p, FILL, PAGE);
	printf("PFN 0 0x%" PRIx64 "\n", pfn_of(p));
	printf("POLL WAIT gen=%" PRIu64 "\n", gen);
	fflush(stdout);
	n = poll(&pfd, 1, timeout_ms);
	check(n == 1 && (pfd.revents & POLLPRI), "poll returned %d revents %#x", n, pfd.revents);
	check(read(fd, &gen2, sizeof(gen2)) == sizeof(gen2), "read generation");
	check(gen2 != gen, "generation unchanged");
	pfd.revents = 0;
	check(poll(&pfd, 1, 0) == 0, "POLLPRI still set after read");
	printf("POLL WOKE gen=%" PRIu64 " zero=%d\n", gen2, is_zero(p, PAGE));
	ugen = uevent_generation(nl, 5000);
	check(ugen == (long long)gen2, "uevent VMWIPE_GENERATION=%lld", ugen);
	printf("UEVENT gen=%lld\n", ugen);
	return done("POLL");
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";
	long arg = argc > 2 ? strtol(argv[2], NULL, 0) : 0;
	int ret;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(cmd, "hold") && arg > 0)
		ret = cmd_hold((size_t)arg, 0);
	else if (!strcmp(cmd, "holdfill") && arg > 0)
		ret = cmd_hold((size_t)arg, VMWIPE_MMAP_FILL);
	else if (!strcmp(cmd, "fork"))
		ret = cmd_fork();
	else if (!strcmp(cmd, "enospc"))
		ret = cmd_enospc();
	else if (!strcmp(cmd, "cycles") && arg > 0)
		ret = cmd_cycles(arg);
	else if (!strcmp(cmd, "errors"))
		ret = cmd_errors();
	else if (!strcmp(cmd, "memlock"))
		ret = cmd_memlock();
	else if (!strcmp(cmd, "share"))
		ret = cmd_share();
	else if (!strcmp(cmd, "unpriv"))
		ret = cmd_unpriv();
	else if (!strcmp(cmd, "poll") && arg > 0)
		ret = cmd_poll((int)arg);
	else {
		fprintf(stderr, "usage: see the comment at the top of vmwipe_test.c\n");
		return 2;
	}
	return ret;
}
