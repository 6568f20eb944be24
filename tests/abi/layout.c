/* Prints the size and member offsets of the structs that extensions and
   embedders see.  tests/test_abi.py compiles it against the stock and the
   patched headers and requires identical output. */

#define Py_BUILD_CORE 1       /* also check the internal layouts */
#include "Python.h"
#include "frameobject.h"
#include "internal/pycore_frame.h"
#include "internal/pycore_interp.h"
#include "internal/pycore_runtime.h"
#include <stddef.h>
#include <stdio.h>

#define SIZE(type) printf("sizeof(%s) = %zu\n", #type, sizeof(type))
#define OFFSET(type, member) \
    printf("offsetof(%s, %s) = %zu\n", #type, #member, offsetof(type, member))

int
main(void)
{
    SIZE(PyConfig);
    OFFSET(PyConfig, xoptions);
    OFFSET(PyConfig, use_environment);
    OFFSET(PyConfig, _is_python_build);
    SIZE(PyPreConfig);
    SIZE(PyCodeObject);
    OFFSET(PyCodeObject, co_extra);
    OFFSET(PyCodeObject, co_qualname);
    OFFSET(PyCodeObject, co_code_adaptive);
    SIZE(PyThreadState);
    OFFSET(PyThreadState, interp);
    OFFSET(PyThreadState, cframe);
    OFFSET(PyThreadState, datastack_limit);
    SIZE(PyFrameObject);
    SIZE(_PyInterpreterFrame);
    SIZE(PyInterpreterState);
    OFFSET(PyInterpreterState, eval_frame);
    OFFSET(PyInterpreterState, co_extra_user_count);
    OFFSET(PyInterpreterState, co_extra_freefuncs);
    SIZE(_PyRuntimeState);
    SIZE(PyTypeObject);
    SIZE(PyModuleDef);
    SIZE(PyMethodDef);
    SIZE(PyStatus);
    SIZE(PyWideStringList);
    return 0;
}
