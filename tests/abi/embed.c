/* An embedding program built against the *stock* 3.11 headers and linked
   with the patched libpython: three initialize/finalize cycles with perf
   support on (PYTHONPERFSUPPORT=1 in the environment).  PyConfig is filled
   in by the program, so its layout is checked too. */

#include "Python.h"
#include <stdio.h>

static const char code[] =
    "import sys\n"
    "def fib(n):\n"
    "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    "print('cycle', fib(15), sys.is_stack_trampoline_active())\n";

static int
initialize(const char *program)
{
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    /* The program's own path, so the build's stdlib is found. */
    PyStatus status = PyConfig_SetBytesString(&config, &config.program_name,
                                              program);
    if (!PyStatus_Exception(status)) {
        status = Py_InitializeFromConfig(&config);
    }
    PyConfig_Clear(&config);
    return PyStatus_Exception(status) ? -1 : 0;
}

int
main(int argc, char **argv)
{
    for (int cycle = 0; cycle < 3; cycle++) {
        if (argc < 1 || initialize(argv[0]) < 0) {
            return 3;
        }
        if (PyRun_SimpleString(code) != 0) {
            return 1;
        }
        if (Py_FinalizeEx() < 0) {
            return 2;
        }
    }
    return 0;
}
