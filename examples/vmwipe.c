// SPDX-License-Identifier: MIT
#include "vmwipe.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

static size_t round_to_pages(size_t size)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);

	return (size + page - 1) & ~(page - 1);
}

void *vmwipe_alloc(size_t size)
{
	void *p;
	int fd, err;

	if (!size) {
		errno = EINVAL;
		return NULL;
	}
	fd = open(VMWIPE_DEVICE, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	/* Only MAP_SHARED is allowed; the mapping keeps the device open. */
	p = mmap(NULL, round_to_pages(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	err = errno;
	close(fd);
	if (p == MAP_FAILED) {
		errno = err;
		return NULL;
	}
	return p;
}

void vmwipe_free(void *p, size_t size)
{
	/* The module clears the pages before it unlists and frees them. */
	if (p)
		munmap(p, round_to_pages(size));
}
