// SPDX-License-Identifier: MIT
/*
 * Guest-side probe for tests/test_retrofit.py: VMWIPE_IOC_REGISTER of
 * ordinary anonymous memory. Linked statically (no shim involved).
 *
 *   retrofit_test serve FIFO   read commands from FIFO, one per line; each
 *                              answer ends with "END <n>" (n counts commands)
 *   retrofit_test errors       refused ranges give the documented errno
 *   retrofit_test enospc       too few free slots: ENOSPC, nothing listed
 *   retrofit_test memlock      registrations are charged to RLIMIT_MEMLOCK
 *   retrofit_test cycles N     N register/unregister cycles leak no slot
 *                              or memlock charge (the host test counts pins)
 *   retrofit_test race SECONDS threads register, unregister, map, unmap,
 *                              DONTNEED, mprotect, mremap and fork over the
 *                              same pages at random; prints "RACE <ops>"
 *
 * serve commands (OFF and N in pages of the one test area):
 *   map N          mmap N private anonymous pages, fill them with 0x5a
 *   maphuge N      the same, 2 MiB aligned with MADV_HUGEPAGE (a THP)
 *   thp            "THP <kB>": AnonHugePages of this process
 *   reg OFF N      VMWIPE_IOC_REGISTER          -> "RC 0" or "RC -errno"
 *   unreg OFF N    VMWIPE_IOC_UNREGISTER        -> "RC ..."
 *   pfns           "PFN i 0x<pfn>" per page (0: not present), no faulting
 *   zeros          "ZERO i 0|1" per page (reads fault pages in)
 *   fill OFF N     write 0x5a again
 *   dontneed OFF N / munmap OFF N / wof OFF N (MADV_WIPEONFORK)
 *   mremap         move the whole area elsewhere -> "ADDR ..."
 *   fork           a child prints "CHILD PFN i 0x.. zero=0|1", writes its
 *                  pages, prints "CHILD WROTE i 0x..", and waits
 *   unfork         end that child
 *   exit
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <pthread.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "probe.h"

#include "vmwipe_uapi.h"

static long read_long(const char *path, const char *key)
{
	char line[256];
	long v = -1;
	FILE *f = fopen(path, "r");

	while (f && fgets(line, sizeof(line), f)) {
		if (!key) {
			v = strtol(line, NULL, 10);
			break;
		}
		if (!strncmp(line, key, strlen(key)) && line[strlen(key)] == ' ') {
			v = strtol(line + strlen(key) + 1, NULL, 10);
			break;
		}
	}
	if (f)
		fclose(f);
	return v;
}

static long used(void)
{
	return read_long(SYSFS "used", NULL);
}

static int vmwipe_fd(void)
{
	static int fd = -1;

	if (fd < 0)
		fd = open("/dev/vmwipe", O_RDWR | O_CLOEXEC);
	return fd;
}

/* 0 or -errno */
static int range_ioctl(unsigned long req, void *addr, size_t len)
{
	struct vmwipe_range r = { .addr = (uintptr_t)addr, .len = len };

	return ioctl(vmwipe_fd(), req, &r) ? -errno : 0;
}

static unsigned char *anon(size_t n)
{
	return mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

/* ---- serve ---------------------------------------------------------- */

static unsigned char *area;
static size_t area_pages;
static pid_t child = -1;
static int child_pipe = -1;

static void do_fork(void)
{
	int ready[2], hold[2];
	char c;
	size_t i;

	if (pipe(ready) || pipe(hold)) {
		printf("RC -%d\n", errno);
		return;
	}
	fflush(stdout);
	child = fork();
	if (child == 0) {
		close(ready[0]);
		close(hold[1]);
		for (i = 0; i < area_pages; i++)
			printf("CHILD PFN %zu 0x%" PRIx64 " zero=%d\n", i, pfn_of(area + i * PAGE),
			       is_zero(area + i * PAGE, PAGE));
		memset(area, 0x77, area_pages * PAGE);
		for (i = 0; i < area_pages; i++)
			printf("CHILD WROTE %zu 0x%" PRIx64 "\n", i, pfn_of(area + i * PAGE));
		fflush(stdout);
		(void)!write(ready[1], "x", 1);
		(void)!read(hold[0], &c, 1);
		_exit(0);
	}
	close(ready[1]);
	close(hold[0]);
	(void)!read(ready[0], &c, 1);
	close(ready[0]);
	child_pipe = hold[1];
	printf("RC %d\n", child > 0 ? 0 : -errno);
}

static void do_unfork(void)
{
	int status;

	if (child_pipe >= 0)
		close(child_pipe);
	child_pipe = -1;
	if (child > 0)
		waitpid(child, &status, 0);
	child = -1;
	printf("RC 0\n");
}

static void serve_one(char *line)
{
	char cmd[32] = "";
	size_t off = 0, n = 0, i;
	unsigned char *p;
	int ret;

	if (sscanf(line, "%31s %zu %zu", cmd, &off, &n) < 1)
		return;
	p = area + off * PAGE;
	if (!strcmp(cmd, "map")) {
		area_pages = off;
		area = anon(area_pages);
		if (area == MAP_FAILED)
			printf("RC -%d\n", errno);
		else
			memset(area, FILL, area_pages * PAGE);
		printf("ADDR %p\n", (void *)area);
	} else if (!strcmp(cmd, "maphuge")) {
		size_t huge = 512 * PAGE;

		area_pages = off;
		area = mmap(NULL, area_pages * PAGE + huge, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		area = (unsigned char *)(((uintptr_t)area + huge - 1) & ~(huge - 1));
		madvise(area, area_pages * PAGE, MADV_HUGEPAGE);
		memset(area, FILL, area_pages * PAGE);
		printf("ADDR %p\n", (void *)area);
	} else if (!strcmp(cmd, "thp")) {
		printf("THP %ld\n", read_long("/proc/self/smaps_rollup", "AnonHugePages:"));
	} else if (!strcmp(cmd, "reg")) {
		printf("RC %d\n", range_ioctl(VMWIPE_IOC_REGISTER, p, n * PAGE));
	} else if (!strcmp(cmd, "unreg")) {
		printf("RC %d\n", range_ioctl(VMWIPE_IOC_UNREGISTER, p, n * PAGE));
	} else if (!strcmp(cmd, "pfns")) {
		for (i = 0; i < area_pages; i++)
			printf("PFN %zu 0x%" PRIx64 "\n", i, pfn_of(area + i * PAGE));
	} else if (!strcmp(cmd, "zeros")) {
		for (i = 0; i < area_pages; i++)
			printf("ZERO %zu %d\n", i, is_zero(area + i * PAGE, PAGE));
	} else if (!strcmp(cmd, "fill")) {
		memset(p, FILL, n * PAGE);
	} else if (!strcmp(cmd, "dontneed")) {
		printf("RC %d\n", madvise(p, n * PAGE, MADV_DONTNEED) ? -errno : 0);
	} else if (!strcmp(cmd, "wof")) {
		printf("RC %d\n", madvise(p, n * PAGE, MADV_WIPEONFORK) ? -errno : 0);
	} else if (!strcmp(cmd, "munmap")) {
		printf("RC %d\n", munmap(p, n * PAGE) ? -errno : 0);
	} else if (!strcmp(cmd, "mremap")) {
		/* Reserve a new place first so the move cannot land in place. */
		unsigned char *to = mmap(NULL, area_pages * PAGE, PROT_NONE,
					 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		p = mremap(area, area_pages * PAGE, area_pages * PAGE,
			   MREMAP_MAYMOVE | MREMAP_FIXED, to);
		ret = p == MAP_FAILED ? -errno : 0;
		if (!ret)
			area = p;
		printf("RC %d\nADDR %p\n", ret, (void *)area);
	} else if (!strcmp(cmd, "fork")) {
		do_fork();
	} else if (!strcmp(cmd, "unfork")) {
		do_unfork();
	} else if (!strcmp(cmd, "exit")) {
		exit(0);
	} else {
		printf("RC -%d\n", EINVAL);
	}
}

static int cmd_serve(const char *fifo)
{
	/* O_RDWR: the FIFO never reports EOF between writers. */
	FILE *in = fopen(fifo, "r+");
	char line[256];
	long seq = 0;

	if (!in) {
		perror(fifo);
		return 1;
	}
	printf("SERVE READY\n");
	while (fgets(line, sizeof(line), in)) {
		serve_one(line);
		printf("END %ld\n", ++seq);
	}
	return 0;
}

/* ---- one-shot checks ------------------------------------------------ */

static void expect(int got, int want, const char *what)
{
	check(got == want, "%s: got %d, want %d", what, got, want);
}

static int cmd_errors(void)
{
	long used0 = used();
	unsigned char *p = anon(4), *ro, *shared;
	int fd;

	check(p != MAP_FAILED, "mmap");
	expect(range_ioctl(VMWIPE_IOC_REGISTER, p + 1, PAGE), -EINVAL, "unaligned");
	expect(range_ioctl(VMWIPE_IOC_REGISTER, p, 0), -EINVAL, "empty");
	expect(range_ioctl(VMWIPE_IOC_REGISTER, (void *)-PAGE, 2 * PAGE), -EINVAL, "wraps");
	munmap(p + 2 * PAGE, PAGE);
	expect(range_ioctl(VMWIPE_IOC_REGISTER, p, 4 * PAGE), -ENOMEM, "hole");
	shared = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	expect(range_ioctl(VMWIPE_IOC_REGISTER, shared, PAGE), -EINVAL, "MAP_SHARED");
	fd = open("/bin/busybox", O_RDONLY);
	ro = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	expect(range_ioctl(VMWIPE_IOC_REGISTER, ro, PAGE), -EINVAL, "file mapping");
	ro = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	expect(range_ioctl(VMWIPE_IOC_REGISTER, ro, PAGE), -EFAULT, "read-only");
	ro = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, vmwipe_fd(), 0);
	expect(range_ioctl(VMWIPE_IOC_REGISTER, ro, PAGE), -EINVAL, "a /dev/vmwipe mapping");
	munmap(ro, PAGE);
	check(used() == used0, "refused registrations used slots");

	expect(range_ioctl(VMWIPE_IOC_REGISTER, p, 2 * PAGE), 0, "register");
	expect(range_ioctl(VMWIPE_IOC_REGISTER, p + PAGE, PAGE), -EEXIST, "overlap");
	expect(range_ioctl(VMWIPE_IOC_UNREGISTER, p, PAGE), -ENOENT, "unregister a part");
	expect(range_ioctl(VMWIPE_IOC_UNREGISTER, p + 3 * PAGE, PAGE), -ENOENT, "unregister other");
	check(used() == used0 + 2, "used %ld, want %ld", used(), used0 + 2);
	expect(range_ioctl(VMWIPE_IOC_UNREGISTER, p, 4 * PAGE), 0, "unregister around");
	check(used() == used0, "unregister left slots");
	expect(ioctl(vmwipe_fd(), _IO(VMWIPE_IOC_MAGIC, 99), 0) ? errno : 0, ENOTTY, "bad ioctl");
	return done("ERRORS");
}

static unsigned char *devmap(size_t n)
{
	return mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, vmwipe_fd(), 0);
}

static int cmd_enospc(void)
{
	long cap = read_long(SYSFS "capacity", NULL), used0 = used();
	size_t avail = (size_t)(cap - used0);
	unsigned char *fill, *p = anon(2);

	memset(p, FILL, 2 * PAGE);
	/* Leave exactly one slot free. */
	fill = devmap(avail - 1);
	check(fill != MAP_FAILED, "mmap %zu pages", avail - 1);
	expect(range_ioctl(VMWIPE_IOC_REGISTER, p, 2 * PAGE), -ENOSPC, "2 pages, 1 slot");
	check(used() == cap - 1, "a refused registration used slots");
	expect(range_ioctl(VMWIPE_IOC_REGISTER, p, PAGE), 0, "1 page, 1 slot");
	expect(range_ioctl(VMWIPE_IOC_REGISTER, p + PAGE, PAGE), -ENOSPC, "1 page, 0 slots");
	check(used() == cap, "used %ld, want capacity %ld", used(), cap);
	munmap(fill, (avail - 1) * PAGE);
	expect(range_ioctl(VMWIPE_IOC_UNREGISTER, p, PAGE), 0, "unregister");
	expect(range_ioctl(VMWIPE_IOC_REGISTER, p, (size_t)cap * PAGE + PAGE), -ENOSPC,
	       "more than capacity");
	check(used() == used0, "slots not returned");
	printf("ENOSPC capacity=%ld avail=%zu\n", cap, avail);
	return done("ENOSPC");
}

static int cmd_memlock(void)
{
	struct rlimit lim = { 3 * PAGE, 3 * PAGE };
	unsigned char *p = anon(4), *d;

	memset(p, FILL, 4 * PAGE);
	vmwipe_fd();
	/* Without CAP_IPC_LOCK the limit applies: become nobody. */
	check(setrlimit(RLIMIT_MEMLOCK, &lim) == 0, "setrlimit");
	check(setgid(65534) == 0 && setuid(65534) == 0, "setuid nobody");
	expect(range_ioctl(VMWIPE_IOC_REGISTER, p, 4 * PAGE), -EAGAIN, "4 pages over 3");
	expect(range_ioctl(VMWIPE_IOC_REGISTER, p, 2 * PAGE), 0, "2 pages");
	d = devmap(2);
	check(d == MAP_FAILED && errno == EAGAIN, "mmap shares the same charge");
	d = devmap(1);
	check(d != MAP_FAILED, "mmap of the last page");
	expect(range_ioctl(VMWIPE_IOC_REGISTER, p + 2 * PAGE, PAGE), -EAGAIN, "full");
	munmap(d, PAGE);
	expect(range_ioctl(VMWIPE_IOC_REGISTER, p + 2 * PAGE, PAGE), 0, "after munmap");
	/* Retired pages return their charge too (MADV_DONTNEED retires asynchronously). */
	madvise(p, 3 * PAGE, MADV_DONTNEED);
	for (int i = 0; i < 100 && range_ioctl(VMWIPE_IOC_REGISTER, p + 3 * PAGE, PAGE); i++)
		usleep(20000);
	expect(range_ioctl(VMWIPE_IOC_UNREGISTER, p + 3 * PAGE, PAGE), 0,
	       "register after DONTNEED returned the charge");
	return done("MEMLOCK");
}

static int cmd_cycles(long n)
{
	long used0 = used(), i;
	struct rlimit lim = { 4 * PAGE, 4 * PAGE };
	unsigned char *p = anon(4);

	memset(p, FILL, 4 * PAGE);
	vmwipe_fd();
	/* As nobody with room for 4 pages: a leaked charge fails the next cycle. */
	check(setrlimit(RLIMIT_MEMLOCK, &lim) == 0, "setrlimit");
	check(setgid(65534) == 0 && setuid(65534) == 0, "setuid nobody");
	for (i = 0; i < n && !failed; i++) {
		size_t np = 1 + (size_t)i % 4;

		expect(range_ioctl(VMWIPE_IOC_REGISTER, p, np * PAGE), 0, "register");
		expect(range_ioctl(VMWIPE_IOC_UNREGISTER, p, np * PAGE), 0, "unregister");
	}
	check(p[0] == FILL && p[4 * PAGE - 1] == FILL, "data changed");
	check(used() == used0, "used %ld -> %ld", used0, used());
	printf("CYCLES %ld\n", i);
	return done("CYCLES");
}

/* ---- race ----------------------------------------------------------- */

#define RACE_SLOTS 16
#define RACE_PAGES 4
#define RACE_THREADS 4

static unsigned char *race_base;
static volatile int race_stop;

static unsigned long xorshift(unsigned long *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/*
 * Random operations on random slots of one reserved window, in every thread
 * at once. No thread touches the memory itself: another may have unmapped it.
 */
static void *race_thread(void *arg)
{
	unsigned long seed = (unsigned long)(uintptr_t)arg * 2654435761UL + 1, ops = 0;
	size_t len = RACE_PAGES * PAGE;

	while (!race_stop) {
		unsigned char *p = race_base + (xorshift(&seed) % RACE_SLOTS) * len;
		size_t n = 1 + xorshift(&seed) % RACE_PAGES;
		pid_t pid;

		switch (xorshift(&seed) % 10) {
		case 0:
			/* Populated by the kernel: touching it here could fault. */
			mmap(p, len, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_POPULATE, -1, 0);
			break;
		case 1:
		case 2:
			range_ioctl(VMWIPE_IOC_REGISTER, p, n * PAGE);
			break;
		case 3:
			range_ioctl(VMWIPE_IOC_UNREGISTER, p, len);
			break;
		case 4:
			mmap(p, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
			break;
		case 5:
			madvise(p, n * PAGE, MADV_DONTNEED);
			break;
		case 6:
			mprotect(p, n * PAGE, xorshift(&seed) % 2 ? PROT_NONE : PROT_READ | PROT_WRITE);
			break;
		case 7:
			/* Swap two slots' pages. */
			mremap(p, len, len, MREMAP_MAYMOVE | MREMAP_FIXED,
			       race_base + (xorshift(&seed) % RACE_SLOTS) * len);
			break;
		case 8:
			madvise(p, len, MADV_WIPEONFORK);
			break;
		case 9:
			pid = fork();
			if (pid == 0) {
				/* The child writes wherever it can, then exits. */
				mprotect(race_base, RACE_SLOTS * len, PROT_READ | PROT_WRITE);
				_exit(0);
			}
			if (pid > 0)
				waitpid(pid, NULL, 0);
			break;
		}
		ops++;
	}
	return (void *)ops;
}

static int cmd_race(long seconds)
{
	pthread_t t[RACE_THREADS];
	unsigned long total = 0;
	void *ops;
	long i;

	race_base = mmap(NULL, RACE_SLOTS * RACE_PAGES * PAGE, PROT_NONE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	check(race_base != MAP_FAILED && vmwipe_fd() >= 0, "setup");
	for (i = 0; i < RACE_THREADS; i++)
		pthread_create(&t[i], NULL, race_thread, (void *)(uintptr_t)(i + 1));
	sleep((unsigned int)seconds);
	race_stop = 1;
	for (i = 0; i < RACE_THREADS; i++) {
		pthread_join(t[i], &ops);
		total += (unsigned long)(uintptr_t)ops;
	}
	printf("RACE %lu ops used %ld\n", total, used());
	return done("RACE");
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(cmd, "serve") && argc > 2)
		return cmd_serve(argv[2]);
	if (!strcmp(cmd, "errors"))
		return cmd_errors();
	if (!strcmp(cmd, "enospc"))
		return cmd_enospc();
	if (!strcmp(cmd, "memlock"))
		return cmd_memlock();
	if (!strcmp(cmd, "cycles") && argc > 2)
		return cmd_cycles(strtol(argv[2], NULL, 0));
	if (!strcmp(cmd, "race") && argc > 2)
		return cmd_race(strtol(argv[2], NULL, 0));
	fprintf(stderr, "usage: see the comment at the top of retrofit_test.c\n");
	return 2;
}
