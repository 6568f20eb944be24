/* A C extension built against the *stock* 3.11 headers; the patched
   interpreter must load and run it, also with -X perf. */

#include "Python.h"

/* call(f, x): f(x) + 1, calling back into Python through the evaluator. */
static PyObject *
call_plus_one(PyObject *module, PyObject *args)
{
    PyObject *func, *arg;
    if (!PyArg_ParseTuple(args, "OO", &func, &arg)) {
        return NULL;
    }
    PyObject *res = PyObject_CallOneArg(func, arg);
    if (res == NULL) {
        return NULL;
    }
    PyObject *one = PyLong_FromLong(1);
    PyObject *sum = one ? PyNumber_Add(res, one) : NULL;
    Py_DECREF(res);
    Py_XDECREF(one);
    return sum;
}

/* The co_extra API the patch also uses: an extension's own slot. */
static PyObject *
tag_code(PyObject *module, PyObject *code)
{
    Py_ssize_t index = _PyEval_RequestCodeExtraIndex(NULL);
    if (index < 0) {
        return NULL;
    }
    if (_PyCode_SetExtra(code, index, (void *)0x1234) < 0) {
        return NULL;
    }
    void *back = NULL;
    if (_PyCode_GetExtra(code, index, &back) < 0) {
        return NULL;
    }
    return PyBool_FromLong(back == (void *)0x1234);
}

static PyMethodDef methods[] = {
    {"call_plus_one", call_plus_one, METH_VARARGS, NULL},
    {"tag_code", tag_code, METH_O, NULL},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "abi_ext", NULL, -1, methods
};

PyMODINIT_FUNC
PyInit_abi_ext(void)
{
    return PyModule_Create(&module);
}
