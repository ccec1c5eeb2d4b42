// SPDX-License-Identifier: GPL-2.0-only
/*
 * The wipe's two passes over a mapping of guest RAM, for the shared backend.
 *
 * From Python each page would cost one ctypes call per pass, and for a full
 * table those calls cost more than memset and memcmp themselves
 * (benchmarks/bench_backends.py, "zero+verify", measures it).  These loops
 * take the page list as two uint64 columns (addresses in this process,
 * lengths), as wipe.backends.Pieces holds them, and run without the GIL.
 *
 * The caller guarantees every (address, length) lies inside a live mapping of
 * its own; nothing here knows about guests.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define ZERO_CHUNK 65536
static const unsigned char zeros[ZERO_CHUNK];

static int zero_span(unsigned char *p, uint64_t n)
{
	memset(p, 0, n);
	return 0;
}

/* Non-zero if the span holds a non-zero byte. */
static int dirty_span(unsigned char *p, uint64_t n)
{
	while (n) {
		uint64_t step = n < ZERO_CHUNK ? n : ZERO_CHUNK;

		if (memcmp(p, zeros, step))
			return 1;
		p += step;
		n -= step;
	}
	return 0;
}

/*
 * Parse (addresses, lengths), two buffers of the same number of uint64, and
 * run @op on each span without the GIL until it returns non-zero.  Returns
 * the index of that span, -1 if there was none, or -2 with an exception set.
 */
static Py_ssize_t for_each_span(PyObject *args, int (*op)(unsigned char *, uint64_t))
{
	Py_buffer addr, len;
	Py_ssize_t count, hit = -1;
	const uint64_t *a, *l;

	if (!PyArg_ParseTuple(args, "y*y*", &addr, &len))
		return -2;
	if (addr.len != len.len || addr.len % sizeof(uint64_t)) {
		PyErr_SetString(PyExc_ValueError,
				"addresses and lengths must be uint64 columns of one length");
		hit = -2;
		goto out;
	}
	count = addr.len / (Py_ssize_t)sizeof(uint64_t);
	a = addr.buf;
	l = len.buf;
	Py_BEGIN_ALLOW_THREADS
	for (Py_ssize_t i = 0; i < count; i++) {
		if (op((unsigned char *)(uintptr_t)a[i], l[i])) {
			hit = i;
			break;
		}
	}
	Py_END_ALLOW_THREADS
out:
	PyBuffer_Release(&addr);
	PyBuffer_Release(&len);
	return hit;
}

static PyObject *pages_zero(PyObject *Py_UNUSED(self), PyObject *args)
{
	if (for_each_span(args, zero_span) == -2)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *pages_first_nonzero(PyObject *Py_UNUSED(self), PyObject *args)
{
	Py_ssize_t hit = for_each_span(args, dirty_span);

	return hit == -2 ? NULL : PyLong_FromSsize_t(hit);
}

static PyMethodDef pages_methods[] = {
	{ "zero", pages_zero, METH_VARARGS,
	  "zero(addresses, lengths): memset every span to 0." },
	{ "first_nonzero", pages_first_nonzero, METH_VARARGS,
	  "first_nonzero(addresses, lengths) -> index of the first span holding a "
	  "non-zero byte, or -1." },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef pages_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "_pages",
	.m_doc = "Zero and check many spans of this process's memory in one call.",
	.m_size = -1,
	.m_methods = pages_methods,
};

PyMODINIT_FUNC PyInit__pages(void)
{
	return PyModule_Create(&pages_module);
}
