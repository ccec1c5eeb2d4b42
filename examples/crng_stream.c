// SPDX-License-Identifier: MIT
/*
 * crng_stream: what a program that trusts the guest kernel's CRNG draws
 * across a snapshot, for the kernel-CRNG clone test (tests/test_crng_clone.py)
 * and the demo.
 *
 * Every -i ms it prints, one line each:
 *   G SEQ HEX16   8 bytes from getrandom()
 *   U SEQ UUID    /proc/sys/kernel/random/uuid
 *   V SEQ HEX16   8 bytes from the vDSO's getrandom, called directly (6.11+;
 *                 glibc 2.36 does not use it)
 * and, when its vmwipe page reads zero (the vmwipe idiom for "wiped: reseed"),
 *   K SEQ HEX64   the 32-byte key it reseeds with, from getrandom()
 */
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include "vmwipe.h"

struct vgetrandom_params {
	uint32_t size_of_opaque_state;
	uint32_t mmap_prot;
	uint32_t mmap_flags;
	uint32_t reserved[13];
};

typedef ssize_t (*vgetrandom_fn)(void *buf, size_t len, unsigned int flags, void *state,
				 size_t state_len);

/* A symbol of the vDSO, found through its section headers (it is mapped whole). */
static void *vdso_sym(const char *name)
{
	const uint8_t *base = (const uint8_t *)getauxval(AT_SYSINFO_EHDR);
	const Elf64_Ehdr *eh = (const Elf64_Ehdr *)base;
	const Elf64_Shdr *sh;
	const Elf64_Phdr *ph;
	uint64_t vaddr = 0;
	int i;

	if (!base)
		return NULL;
	ph = (const Elf64_Phdr *)(base + eh->e_phoff);
	for (i = 0; i < eh->e_phnum; i++)
		if (ph[i].p_type == PT_LOAD) {
			vaddr = ph[i].p_vaddr - ph[i].p_offset;
			break;
		}
	sh = (const Elf64_Shdr *)(base + eh->e_shoff);
	for (i = 0; i < eh->e_shnum; i++) {
		const Elf64_Sym *sym = (const Elf64_Sym *)(base + sh[i].sh_offset);
		const char *str = (const char *)(base + sh[sh[i].sh_link].sh_offset);
		size_t n, k;

		if (sh[i].sh_type != SHT_DYNSYM)
			continue;
		n = sh[i].sh_size / sizeof(*sym);
		for (k = 0; k < n; k++)
			if (sym[k].st_shndx != SHN_UNDEF && !strcmp(str + sym[k].st_name, name))
				return (void *)(base + sym[k].st_value - vaddr);
	}
	return NULL;
}

static void hex(const uint8_t *p, size_t n, char *out)
{
	static const char digits[] = "0123456789abcdef";
	size_t i;

	for (i = 0; i < n; i++) {
		out[2 * i] = digits[p[i] >> 4];
		out[2 * i + 1] = digits[p[i] & 15];
	}
	out[2 * n] = 0;
}

static void draw(uint8_t *buf, size_t n)
{
	if (getrandom(buf, n, 0) != (ssize_t)n) {
		perror("getrandom");
		exit(1);
	}
}

int main(int argc, char **argv)
{
	struct vgetrandom_params params;
	volatile uint64_t *mark;
	vgetrandom_fn vgetrandom;
	void *state = NULL;
	unsigned long seq;
	uint8_t key[32], v[8];
	char h[65], uuid[64];
	int interval_ms = 2;
	int opt;

	while ((opt = getopt(argc, argv, "i:")) != -1) {
		if (opt != 'i')
			return 2;
		interval_ms = atoi(optarg);
	}
	mark = vmwipe_alloc(sizeof(*mark));
	if (!mark) {
		perror("vmwipe_alloc");
		return 1;
	}
	*mark = 1;
	vgetrandom = (vgetrandom_fn)vdso_sym("__vdso_getrandom");
	if (vgetrandom && vgetrandom(NULL, 0, 0, &params, ~0UL) == 0) {
		state = mmap(NULL, params.size_of_opaque_state, params.mmap_prot,
			     params.mmap_flags, -1, 0);
		if (state == MAP_FAILED)
			state = NULL;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (seq = 0;; seq++) {
		int fd;
		ssize_t n;

		if (*mark == 0) {
			draw(key, sizeof(key));
			*mark = 1;
			hex(key, sizeof(key), h);
			printf("K %lu %s\n", seq, h);
		}
		draw(v, sizeof(v));
		hex(v, sizeof(v), h);
		printf("G %lu %s\n", seq, h);
		fd = open("/proc/sys/kernel/random/uuid", O_RDONLY);
		n = fd < 0 ? -1 : read(fd, uuid, sizeof(uuid) - 1);
		if (fd >= 0)
			close(fd);
		if (n > 0) {
			uuid[strcspn(uuid, "\n")] = 0;
			printf("U %lu %s\n", seq, uuid);
		}
		if (state && vgetrandom(v, sizeof(v), 0, state, params.size_of_opaque_state) ==
		    (ssize_t)sizeof(v)) {
			hex(v, sizeof(v), h);
			printf("V %lu %s\n", seq, h);
		}
		usleep(interval_ms * 1000);
	}
}
