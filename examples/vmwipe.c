// SPDX-License-Identifier: MIT
#include "vmwipe.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vmwipe_uapi.h"

static size_t round_to_pages(size_t size)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);

	return (size + page - 1) & ~(page - 1);
}

static void *vmwipe_map(size_t size, off_t offset)
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
	p = mmap(NULL, round_to_pages(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset);
	err = errno;
	close(fd);
	if (p == MAP_FAILED) {
		errno = err;
		return NULL;
	}
	return p;
}

void *vmwipe_alloc(size_t size)
{
	return vmwipe_map(size, 0);
}

void *vmwipe_alloc_fill(size_t size)
{
	return vmwipe_map(size, VMWIPE_MMAP_FILL);
}

void vmwipe_free(void *p, size_t size)
{
	/* The module clears the pages before it unlists and frees them. */
	if (p)
		munmap(p, round_to_pages(size));
}
