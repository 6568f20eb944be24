/* Test extension for the PyUnstable perf-map C API, built by
   tests/test_perfmap_api.py against the patched headers. */

#include "Python.h"
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct {
    int thread;
    int count;
    int failures;
} writer_args;

/* Each thread writes `count` entries named ext::t<thread>_<i> at fake,
   distinct addresses, without the GIL. */
static void *
writer(void *arg)
{
    writer_args *args = arg;
    char name[64];
    for (int i = 0; i < args->count; i++) {
        snprintf(name, sizeof(name), "ext::t%d_%d", args->thread, i);
        uintptr_t addr = 0x100000000ull * (args->thread + 1) + 16u * i;
        if (PyUnstable_WritePerfMapEntry((const void *)addr, 16, name) < 0) {
            args->failures++;
        }
    }
    return NULL;
}

/* write_many(threads, count) -> number of failed writes */
static PyObject *
write_many(PyObject *self, PyObject *args)
{
    int nthreads, count;
    if (!PyArg_ParseTuple(args, "ii", &nthreads, &count)) {
        return NULL;
    }
    pthread_t *ids = PyMem_Calloc(nthreads, sizeof(pthread_t));
    writer_args *wargs = PyMem_Calloc(nthreads, sizeof(writer_args));
    if (ids == NULL || wargs == NULL) {
        PyMem_Free(ids);
        PyMem_Free(wargs);
        return PyErr_NoMemory();
    }
    int failures = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < nthreads; t++) {
        wargs[t].thread = t;
        wargs[t].count = count;
        pthread_create(&ids[t], NULL, writer, &wargs[t]);
    }
    for (int t = 0; t < nthreads; t++) {
        pthread_join(ids[t], NULL);
        failures += wargs[t].failures;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(ids);
    PyMem_Free(wargs);
    return PyLong_FromLong(failures);
}

/* write(addr, size, name) -> (result, errno) */
static PyObject *
write_entry(PyObject *self, PyObject *args)
{
    unsigned long long addr;
    unsigned int size;
    const char *name;
    if (!PyArg_ParseTuple(args, "KIy", &addr, &size, &name)) {
        return NULL;
    }
    errno = 0;
    int res = PyUnstable_WritePerfMapEntry((const void *)(uintptr_t)addr,
                                           size, name);
    return Py_BuildValue("ii", res, errno);
}

static PyObject *
init(PyObject *self, PyObject *unused)
{
    errno = 0;
    int res = PyUnstable_PerfMapState_Init();
    return Py_BuildValue("ii", res, errno);
}

static PyObject *
fini(PyObject *self, PyObject *unused)
{
    PyUnstable_PerfMapState_Fini();
    Py_RETURN_NONE;
}

static PyObject *
copy_file(PyObject *self, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) {
        return NULL;
    }
    errno = 0;
    int res = PyUnstable_CopyPerfMapFile(path);
    return Py_BuildValue("ii", res, errno);
}

static PyObject *
compile_code(PyObject *self, PyObject *code)
{
    if (!PyCode_Check(code)) {
        PyErr_SetString(PyExc_TypeError, "code object expected");
        return NULL;
    }
    if (PyUnstable_PerfTrampoline_CompileCode((PyCodeObject *)code) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
set_persist(PyObject *self, PyObject *arg)
{
    return PyLong_FromLong(
        PyUnstable_PerfTrampoline_SetPersistAfterFork(PyObject_IsTrue(arg)));
}

static PyMethodDef methods[] = {
    {"write_many", write_many, METH_VARARGS, NULL},
    {"write", write_entry, METH_VARARGS, NULL},
    {"init", init, METH_NOARGS, NULL},
    {"fini", fini, METH_NOARGS, NULL},
    {"copy_file", copy_file, METH_VARARGS, NULL},
    {"compile_code", compile_code, METH_O, NULL},
    {"set_persist", set_persist, METH_O, NULL},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "perfmap_ext", NULL, -1, methods
};

PyMODINIT_FUNC
PyInit_perfmap_ext(void)
{
    return PyModule_Create(&module);
}
