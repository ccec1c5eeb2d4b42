// SPDX-License-Identifier: GPL-2.0-only
/*
 * The scrub's two loops that otherwise cost time in proportion to the file:
 * hopping over the RAM page records of a mapped migration stream, and
 * picking the records of the listed pages out of the index.
 *
 * A 1 GiB save holds ~262,000 PAGE records.  Python, even in bulk, spends
 * ~70 ms walking them and ~40 ms per lookup pass (a scrub makes up to four),
 * more than reading the record headers costs.  Here the walk touches only the
 * 8-byte header of each record (never the 4096 data bytes) and runs without
 * the GIL.
 *
 * ram_run() accepts only the two record shapes that fill a stream's bulk
 * (PAGE|CONTINUE, and ZERO|CONTINUE with fill byte 0) of the current block,
 * in range and complete within the limit; it stops at the first record that
 * is anything else and leaves it to migstream.StreamWalker, which validates
 * and explains every other record exactly as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PAGE_BYTES 4096u
#define FLAG_MASK 0xfffu
#define RAM_ZERO_CONTINUE 0x022u /* RAM_ZERO | RAM_CONTINUE (migration/ram.c) */
#define RAM_PAGE_CONTINUE 0x028u /* RAM_PAGE | RAM_CONTINUE */
#define KIND_PAGE 1
#define KIND_ZERO 2
#define KEY_SHIFT 52 /* migstream._KEY_SHIFT */

struct run_out {
	uint64_t *page;
	uint64_t *pos;
	uint8_t *kind;
	size_t n, cap;
};

static int run_push(struct run_out *o, uint64_t page, uint64_t pos, uint8_t kind)
{
	if (o->n == o->cap) {
		size_t cap = o->cap ? o->cap * 2 : 4096;
		uint64_t *pg = realloc(o->page, cap * sizeof(*pg));

		if (!pg)
			return -1;
		o->page = pg;
		uint64_t *ps = realloc(o->pos, cap * sizeof(*ps));

		if (!ps)
			return -1;
		o->pos = ps;
		uint8_t *k = realloc(o->kind, cap);

		if (!k)
			return -1;
		o->kind = k;
		o->cap = cap;
	}
	o->page[o->n] = page;
	o->pos[o->n] = pos;
	o->kind[o->n] = kind;
	o->n++;
	return 0;
}

static uint64_t be64(const unsigned char *p)
{
	uint64_t v = 0;

	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

/*
 * Consume records from @pos while they are bulk records of a block of
 * @block_len bytes; returns the offset of the first record not consumed,
 * or (uint64_t)-1 when out of memory.
 */
static uint64_t hop(const unsigned char *buf, uint64_t pos, uint64_t limit,
		    uint64_t block_len, struct run_out *o)
{
	while (limit - pos >= 9) {
		uint64_t word = be64(buf + pos);
		uint64_t flags = word & FLAG_MASK;
		uint64_t offset = word & ~(uint64_t)FLAG_MASK;
		uint8_t kind;
		uint64_t len;

		if (offset >= block_len)
			break; /* the walker names it */
		if (flags == RAM_PAGE_CONTINUE) {
			if (limit - pos < 8 + PAGE_BYTES)
				break;
			kind = KIND_PAGE;
			len = 8 + PAGE_BYTES;
		} else if (flags == RAM_ZERO_CONTINUE && buf[pos + 8] == 0) {
			kind = KIND_ZERO;
			len = 9;
		} else {
			break;
		}
		if (run_push(o, offset / PAGE_BYTES, pos + 8, kind))
			return (uint64_t)-1;
		pos += len;
	}
	return pos;
}

static PyObject *ramwalk_ram_run(PyObject *Py_UNUSED(self), PyObject *args)
{
	Py_buffer view;
	unsigned long long pos, limit, block_len;
	struct run_out o = { 0 };
	uint64_t end;
	PyObject *ret = NULL;

	if (!PyArg_ParseTuple(args, "y*KKK", &view, &pos, &limit, &block_len))
		return NULL;
	if (limit > (unsigned long long)view.len || pos > limit) {
		PyErr_SetString(PyExc_ValueError, "ram_run: pos and limit must lie in the buffer");
		goto out;
	}
	Py_BEGIN_ALLOW_THREADS
	end = hop(view.buf, pos, limit, block_len, &o);
	Py_END_ALLOW_THREADS
	if (end == (uint64_t)-1) {
		PyErr_NoMemory();
		goto out;
	}
	/* y# turns a NULL pointer into None: an empty run is three empty bytes */
	ret = Py_BuildValue("Ky#y#y#", (unsigned long long)end,
			    o.n ? (const char *)o.page : "", (Py_ssize_t)(o.n * sizeof(uint64_t)),
			    o.n ? (const char *)o.pos : "", (Py_ssize_t)(o.n * sizeof(uint64_t)),
			    o.n ? (const char *)o.kind : "", (Py_ssize_t)o.n);
out:
	free(o.page);
	free(o.pos);
	free(o.kind);
	PyBuffer_Release(&view);
	return ret;
}

static int in_sorted(const uint64_t *keys, size_t n, uint64_t key)
{
	size_t lo = 0, hi = n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (keys[mid] < key)
			lo = mid + 1;
		else if (keys[mid] > key)
			hi = mid;
		else
			return 1;
	}
	return 0;
}

static PyObject *ramwalk_select(PyObject *Py_UNUSED(self), PyObject *args)
{
	Py_buffer blocks, pages, keys;
	PyObject *ret = NULL;
	uint64_t *hits = NULL;
	size_t n, nkeys, nhits = 0;

	if (!PyArg_ParseTuple(args, "y*y*y*", &blocks, &pages, &keys))
		return NULL;
	n = (size_t)pages.len / sizeof(uint64_t);
	nkeys = (size_t)keys.len / sizeof(uint64_t);
	if (pages.len % sizeof(uint64_t) || keys.len % sizeof(uint64_t) ||
	    (size_t)blocks.len != n * sizeof(uint16_t)) {
		PyErr_SetString(PyExc_ValueError,
				"select: blocks (uint16), pages and keys (uint64) of matching lengths");
		goto out;
	}
	hits = malloc(n ? n * sizeof(*hits) : 1);
	if (!hits) {
		PyErr_NoMemory();
		goto out;
	}
	Py_BEGIN_ALLOW_THREADS
	const uint16_t *b = blocks.buf;
	const uint64_t *p = pages.buf, *k = keys.buf;

	for (size_t i = 0; i < n; i++)
		if (in_sorted(k, nkeys, (uint64_t)b[i] << KEY_SHIFT | p[i]))
			hits[nhits++] = i;
	Py_END_ALLOW_THREADS
	ret = PyBytes_FromStringAndSize((const char *)hits, (Py_ssize_t)(nhits * sizeof(*hits)));
out:
	free(hits);
	PyBuffer_Release(&blocks);
	PyBuffer_Release(&pages);
	PyBuffer_Release(&keys);
	return ret;
}

static PyMethodDef ramwalk_methods[] = {
	{ "ram_run", ramwalk_ram_run, METH_VARARGS,
	  "ram_run(buf, pos, limit, block_length) -> (end, pages, positions, kinds): consume "
	  "the PAGE|CONTINUE and zero-fill ZERO|CONTINUE records of one block from pos; the "
	  "columns are native uint64, uint64 and uint8 bytes." },
	{ "select", ramwalk_select, METH_VARARGS,
	  "select(blocks, pages, sorted_keys) -> native uint64 bytes: indices of the records "
	  "whose block << 52 | page is one of the keys." },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef ramwalk_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "_ramwalk",
	.m_doc = "Hop over a migration stream's bulk RAM records and look up listed pages.",
	.m_size = -1,
	.m_methods = ramwalk_methods,
};

PyMODINIT_FUNC PyInit__ramwalk(void)
{
	return PyModule_Create(&ramwalk_module);
}
