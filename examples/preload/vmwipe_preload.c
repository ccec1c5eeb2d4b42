// SPDX-License-Identifier: MIT
/*
 * libvmwipe-preload.so: make unchanged programs clone-safe.
 *
 *   LD_PRELOAD=/path/to/libvmwipe-preload.so program ...
 *
 * BoringSSL, AWS-LC and s2n-tls keep a MADV_WIPEONFORK sentinel page: the
 * kernel zeroes it in a child of fork(), and a zero sentinel makes them
 * reseed. This shim wraps madvise(): after a successful
 * madvise(addr, len, MADV_WIPEONFORK) it registers the range with
 * /dev/vmwipe (VMWIPE_IOC_REGISTER), so that the hypervisor also zeroes it
 * before a restored snapshot or a clone of the VM runs, and the same code
 * reseeds there too. MADV_KEEPONFORK unregisters the range again.
 *
 * Rules it keeps:
 * - madvise() itself is the plain system call: same result, same errno, for
 *   every advice value. The registration happens only after it succeeded,
 *   and its own errors are ignored.
 * - No /dev/vmwipe (module not loaded, no permission, no free slot): nothing
 *   happens, nothing is printed.
 * - Async-signal-safe and fork-safe: raw system calls only, no libc state,
 *   no malloc, no locks, no static data. errno is never touched on success.
 *
 * Limits: only calls through the dynamic symbol are seen (not static
 * binaries, not libc-internal calls); a fork() in another thread during the
 * few instructions the device is open inherits that (harmless) descriptor.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "vmwipe_uapi.h"

#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#define MADV_KEEPONFORK 19
#endif

#define EXPORT __attribute__((visibility("default")))

/* A system call that returns -errno and leaves errno alone. */
static long raw_syscall4(long nr, long a, long b, long c, long d)
{
#if defined(__x86_64__)
	register long r10 __asm__("r10") = d;
	long ret;

	__asm__ volatile ("syscall"
			  : "=a"(ret)
			  : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10)
			  : "rcx", "r11", "memory");
	return ret;
#else
	int saved = errno;
	long ret = syscall(nr, a, b, c, d);

	if (ret == -1)
		ret = -errno;
	errno = saved;
	return ret;
#endif
}

static void vmwipe_tell(void *addr, size_t len, unsigned long request)
{
	struct vmwipe_range range = { .addr = (uintptr_t)addr, .len = len };
	long fd;

	fd = raw_syscall4(SYS_openat, AT_FDCWD, (long)"/dev/vmwipe", O_RDWR | O_CLOEXEC, 0);
	if (fd < 0)
		return;
	raw_syscall4(SYS_ioctl, fd, (long)request, (long)&range, 0);
	raw_syscall4(SYS_close, fd, 0, 0, 0);
}

EXPORT int madvise(void *addr, size_t len, int advice)
{
	long ret = raw_syscall4(SYS_madvise, (long)addr, (long)len, advice, 0);

	if (ret < 0) {
		errno = (int)-ret;
		return -1;
	}
	if (advice == MADV_WIPEONFORK)
		vmwipe_tell(addr, len, VMWIPE_IOC_REGISTER);
	else if (advice == MADV_KEEPONFORK)
		vmwipe_tell(addr, len, VMWIPE_IOC_UNREGISTER);
	return 0;
}
