/* The native half of the trampoline check (tests/test_cross.py).

   An embedding program that runs check_trampolines.py in perf mode and
   gives it a builtin module, _fpwalk, whose return_addresses() walks the
   frame-pointer chain from its own frame up to main(), as perf record -g
   does, and returns the saved return addresses.  The same source is built
   for x86_64 and for aarch64 (run under qemu-aarch64), so both trampoline
   templates are held to one test.

   usage: fpwalk LIBDIR SCRIPT */

#include "Python.h"
#include <stdint.h>

/* main()'s frame: the walk stops there, before the C library's frames,
   which have no frame pointers. */
static uintptr_t *main_frame;

/* A saved return address without its pointer authentication code
   (aarch64 signs return addresses when PAC is on). */
static uintptr_t
strip_pac(uintptr_t address)
{
#if defined(__aarch64__)
    register uintptr_t lr __asm__("x30") = address;
    __asm__("hint #7" : "+r"(lr));      /* xpaclri; a no-op without PAC */
    return lr;
#else
    return address;
#endif
}

static PyObject *
return_addresses(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(unused))
{
    PyObject *result = PyList_New(0);
    if (result == NULL) {
        return NULL;
    }
    /* A frame record is {caller's frame pointer, return address} on both
       x86_64 and aarch64. */
    uintptr_t *fp = __builtin_frame_address(0);
    while (fp != NULL && fp < main_frame) {
        PyObject *address = PyLong_FromUnsignedLongLong(strip_pac(fp[1]));
        if (address == NULL || PyList_Append(result, address) < 0) {
            Py_XDECREF(address);
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(address);
        uintptr_t *caller = (uintptr_t *)fp[0];
        if (caller <= fp) {
            /* A broken chain: callers live higher up the stack. */
            break;
        }
        fp = caller;
    }
    return result;
}

static PyMethodDef fpwalk_methods[] = {
    {"return_addresses", return_addresses, METH_NOARGS,
     "Return addresses on the frame-pointer chain, innermost first."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fpwalk_module = {
    PyModuleDef_HEAD_INIT, "_fpwalk", NULL, 0, fpwalk_methods,
};

static PyObject *
init_fpwalk(void)
{
    return PyModule_Create(&fpwalk_module);
}

static int
run(const char *libdir, const char *script)
{
    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    config.site_import = 0;
    config.module_search_paths_set = 1;
    PyStatus status = PyConfig_SetBytesString(&config, &config.run_filename,
                                              script);
    wchar_t *wide_libdir = Py_DecodeLocale(libdir, NULL);
    if (wide_libdir == NULL) {
        status = PyStatus_NoMemory();
    }
    if (!PyStatus_Exception(status)) {
        status = PyWideStringList_Append(&config.module_search_paths,
                                         wide_libdir);
    }
    if (!PyStatus_Exception(status)) {
        status = PyWideStringList_Append(&config.xoptions, L"perf");
    }
    if (!PyStatus_Exception(status)) {
        status = Py_InitializeFromConfig(&config);
    }
    PyMem_RawFree(wide_libdir);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        Py_ExitStatusException(status);
    }
    return Py_RunMain();
}

int
main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s LIBDIR SCRIPT\n", argv[0]);
        return 2;
    }
    main_frame = __builtin_frame_address(0);
    if (PyImport_AppendInittab("_fpwalk", init_fpwalk) < 0) {
        return 2;
    }
    return run(argv[1], argv[2]);
}
