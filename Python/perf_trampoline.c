/* Perf trampolines: Python functions in the Linux perf profiler.

   perf walks native stacks, so a Python function is invisible to it: all
   Python frames run inside the same C function, _PyEval_EvalFrameDefault().
   In perf mode every code object gets its own copy of a tiny assembly
   trampoline (Python/asm_trampoline.S) that only calls the evaluator.  The
   PEP 523 eval-frame hook evaluates each frame through its code object's
   trampoline, so each Python frame owns a distinct native return address,
   and /tmp/perf-<pid>.map tells perf the name of each trampoline.

   This file holds the configuration, turning perf mode on and off, and
   the sys functions; the hook is in Python/perf_hook.c, and
   Python/perf_internal.h lists the other files and what they hold.  It
   runs with the GIL. */

#include "Python.h"
#include "pycore_initconfig.h"    // _Py_GetEnv()
#include "pycore_interp.h"        // PyInterpreterState.eval_frame
#include "pycore_perf_trampoline.h"
#include "pycore_pystate.h"       // _PyThreadState_GET()

#include <errno.h>

/* The backends: the perf map alone, or the map and a jitdump. */
enum { PERF_OFF, PERF_MAP, PERF_JIT };

/* An environment variable set to a positive integer. */
static int
env_flag(const PyConfig *config, const char *name)
{
    const char *env = _Py_GetEnv(config->use_environment, name);
    if (env == NULL) {
        return 0;
    }
    char *end;
    errno = 0;
    long value = strtol(env, &end, 10);
    if (errno != 0 || end == env || *end != '\0' || value < 0) {
        fprintf(stderr, "python: %s=%s is not a non-negative integer; "
                "ignored\n", name, env);
        return 0;
    }
    return value > 0;
}

/* -X name or -X name=... */
static int
has_xoption(const PyConfig *config, const wchar_t *name)
{
    size_t len = wcslen(name);
    for (Py_ssize_t i = 0; i < config->xoptions.length; i++) {
        const wchar_t *opt = config->xoptions.items[i];
        if (wcsncmp(opt, name, len) == 0
            && (opt[len] == L'\0' || opt[len] == L'='))
        {
            return 1;
        }
    }
    return 0;
}

/* The backend the configuration asks for, read as CPython 3.13 reads it:
   PYTHONPERFSUPPORT, -X perf, PYTHON_PERF_JIT_SUPPORT, -X perf_jit, a
   later one winning.  (Read the same way where perf support is not
   built, to warn that it is missing.) */
static int
perf_requested(const PyConfig *config)
{
    int backend = PERF_OFF;
    if (env_flag(config, "PYTHONPERFSUPPORT")) {
        backend = PERF_MAP;
    }
    if (has_xoption(config, L"perf")) {
        backend = PERF_MAP;
    }
    if (env_flag(config, "PYTHON_PERF_JIT_SUPPORT")) {
        backend = PERF_JIT;
    }
    if (has_xoption(config, L"perf_jit")) {
        backend = PERF_JIT;
    }
    return backend;
}

/* Print the exception set as one line on stderr, "python: perf support
   <what>: <its text>" (or `fallback` if it has none), and clear it: for
   failures that no Python code asked to hear of. */
static void
print_error(const char *what, const char *fallback)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *msg = value ? PyObject_Str(value) : NULL;
    const char *text = msg ? PyUnicode_AsUTF8(msg) : NULL;
    fprintf(stderr, "python: perf support %s: %s\n", what,
            text ? text : fallback);
    fflush(stderr);
    PyErr_Clear();
    Py_XDECREF(msg);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

#include "perf_internal.h"

#ifdef PY_HAVE_PERF_TRAMPOLINE

/* ---------------------------------------------------------------------
   Turning perf mode on and off. */

/* Perf mode could not be turned on at start-up, or a trampoline could not
   be made while running: turn perf mode off in this interpreter with one
   warning and carry on with the default evaluator. */
void
_PyPerfTrampoline_DisableAfterFailure(PyThreadState *tstate)
{
    print_error("disabled", "cannot create a trampoline");
    if (tstate->interp->eval_frame == _PyPerfHook_EvalFrame) {
        _PyInterpreterState_SetEvalFrameFunc(tstate->interp, NULL);
    }
}

static int
perf_map_prepare(void)
{
    int res = PyUnstable_PerfMapState_Init();
    if (res < 0) {
        _PyPerfOutput_SetError(&_PyPerfMap_output);
    }
    return res;
}

/* Another PEP 523 user's hook is installed: perf mode neither replaces
   nor removes it.  -1 with CPython 3.13's exception. */
static int
refuse_foreign_hook(PyInterpreterState *interp)
{
    if (interp->eval_frame != NULL
        && interp->eval_frame != _PyPerfHook_EvalFrame)
    {
        PyErr_SetString(PyExc_RuntimeError,
                        "Trampoline cannot be initialized as a custom eval "
                        "frame is already present");
        return -1;
    }
    return 0;
}

/* Report the deferred writes that failed and were not reported yet (after
   the last trampoline was made, or by a file perf mode turned off since):
   one warning per file.  It says what happened, not what perf mode does
   next: that depends on where it is told (a failed exec goes on, a new
   activation starts anew), and a trampoline made afterwards turns perf
   mode off with a warning of its own. */
static void
warn_if_lines_lost(void)
{
    perf_output *failed;
    while ((failed = _PyPerfFlusher_TakeError()) != NULL) {
        int err = errno;
        char path[64];
        _PyPerfOutput_Path(failed, path, sizeof(path));
        fprintf(stderr, "python: perf support lost entries: cannot write "
                "%s: %s\n", path, strerror(err));
    }
}

/* Turn perf mode on with a backend, or switch an active one to it (as in
   CPython 3.13: the other backend's output is closed).  Returns -1 with
   an exception if perf mode cannot be turned on; the interpreter then
   keeps its default evaluator. */
static int
activate(PyThreadState *tstate, int backend)
{
    PyInterpreterState *interp = tstate->interp;
    if (refuse_foreign_hook(interp) < 0) {
        return -1;
    }
    if (_PyPerfHook_UseCodeExtraIndex(interp) < 0 || perf_map_prepare() < 0
        || _PyPerfJit_SetWanted(backend == PERF_JIT) < 0)
    {
        return -1;
    }
    if (_PyPerfArena_Prepare() < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (interp != _PyInterpreterState_Main()) {
        /* It may end while the main interpreter, in perf mode or not,
           runs no frame through the hook: nothing would poll. */
        _PyPerfFlusher_UseThread();
    }
    _PyInterpreterState_SetEvalFrameFunc(interp, _PyPerfHook_EvalFrame);
    return 0;
}

/* sys.activate_stack_trampoline(name), name already checked to be a str
   without NUL characters. */
static int
activate_named(PyThreadState *tstate, const char *name)
{
    int backend = strcmp(name, "perf") == 0 ? PERF_MAP
                  : strcmp(name, "perf_jit") == 0 ? PERF_JIT : PERF_OFF;
    if (backend == PERF_OFF) {
        PyErr_Format(PyExc_ValueError, "invalid backend: %s", name);
        return -1;
    }
    /* Turned on again by the program: what the time before left is
       written, and its losses not reported yet are told now (a dump that
       lost records starts anew); they do not stop this new time on.  (A
       new interpreter turned on by -X perf does not forgive another's.) */
    _PyPerfFlusher_Flush();
    warn_if_lines_lost();
    if (activate(tstate, backend) < 0) {
        return -1;
    }
    _PyPerfFlusher_NewSession();
    return 0;
}

static void
deactivate(PyInterpreterState *interp)
{
    /* Running frames keep returning through their trampolines, which stay
       mapped; only new frames stop using them. */
    if (interp->eval_frame == _PyPerfHook_EvalFrame) {
        _PyInterpreterState_SetEvalFrameFunc(interp, NULL);
        _PyPerfFlusher_Flush();
    }
}

static int
is_active(PyInterpreterState *interp)
{
    return interp->eval_frame == _PyPerfHook_EvalFrame;
}

void
_PyPerfTrampoline_InitFromConfig(PyThreadState *tstate)
{
    if (_Py_IsMainInterpreter(tstate->interp)) {
        _PyPerfAttach_DropPending();
    }
    const PyConfig *config = _PyInterpreterState_GetConfig(tstate->interp);
    int backend = perf_requested(config);
    if (backend == PERF_OFF) {
        return;
    }
    if (activate(tstate, backend) < 0) {
        _PyPerfTrampoline_DisableAfterFailure(tstate);
    }
}

void
_PyPerfTrampoline_Fini(void)
{
    PyThreadState *tstate = _PyThreadState_GET();
    if (tstate != NULL) {
        deactivate(tstate->interp);
    }
    _PyPerfHook_LeaveFastPath();
    (void)_PyPerfJit_SetWanted(0);
    PyUnstable_PerfMapState_Fini();
    warn_if_lines_lost();
    _PyPerfAttach_DropPending();
}

/* os._exit() and os.exec*() (patch 0012): nothing runs after them to
   write or report. */
void
_PyPerfTrampoline_FlushMap(void)
{
    _PyPerfFlusher_Flush();
    warn_if_lines_lost();
}

/* Give a code object its trampoline now, before it first runs.  Needs the
   GIL; returns -1 with an exception set on failure. */
int
PyUnstable_PerfTrampoline_CompileCode(PyCodeObject *co)
{
    PyInterpreterState *interp = _PyInterpreterState_GET();
    Py_ssize_t index = _PyPerfHook_UseCodeExtraIndex(interp);
    if (index < 0) {
        return -1;
    }
    if (_PyPerfHook_TrampolineFor(co, interp, index) == NULL
        && PyErr_Occurred())
    {
        /* As after a failure in the hook: the files lack an entry, so
           perf mode stops; the exception is the report. */
        deactivate(interp);
        return -1;
    }
    if (!is_active(interp)) {
        /* No hook polls for the entry here (perf_flusher.c). */
        _PyPerfFlusher_Flush();
    }
    return 0;
}

/* A forked child always gets its own map that names the trampolines it
   inherited (see adopt_parent_lines_locked), which is what
   persisting means in CPython 3.12; there is nothing to switch. */
int
PyUnstable_PerfTrampoline_SetPersistAfterFork(int Py_UNUSED(enable))
{
    return 0;
}

#else  /* !PY_HAVE_PERF_TRAMPOLINE */

/* Any name, valid or not, as in CPython 3.13. */
static int
activate_named(PyThreadState *Py_UNUSED(tstate), const char *Py_UNUSED(name))
{
    PyErr_SetString(PyExc_ValueError, "perf trampoline not available");
    return -1;
}

static int
refuse_foreign_hook(PyInterpreterState *Py_UNUSED(interp))
{
    return 0;
}

static void
deactivate(PyInterpreterState *Py_UNUSED(interp))
{
}

static int
is_active(PyInterpreterState *Py_UNUSED(interp))
{
    return 0;
}

void
_PyPerfTrampoline_InitFromConfig(PyThreadState *tstate)
{
    if (_Py_IsMainInterpreter(tstate->interp)) {
        _PyPerfAttach_DropPending();
    }
    const PyConfig *config = _PyInterpreterState_GetConfig(tstate->interp);
    if (perf_requested(config)) {
        fprintf(stderr, "python: perf support is not available on this "
                "platform\n");
    }
}

void
_PyPerfTrampoline_Fini(void)
{
    _PyPerfAttach_DropPending();
}

void
_PyPerfTrampoline_FlushMap(void)
{
}

int
PyUnstable_PerfTrampoline_CompileCode(PyCodeObject *Py_UNUSED(co))
{
    return 0;
}

int
PyUnstable_PerfTrampoline_SetPersistAfterFork(int Py_UNUSED(enable))
{
    return 0;
}

#endif  /* PY_HAVE_PERF_TRAMPOLINE */


/* ---------------------------------------------------------------------
   The sys module functions, with CPython 3.12's names and semantics. */

PyDoc_STRVAR(activate_doc,
"activate_stack_trampoline($module, backend, /)\n\
--\n\
\n\
Activate stack profiler trampoline *backend*.");

/* The argument is parsed as CPython 3.13's Argument Clinic "str" converter
   does, with its messages. */
static PyObject *
sys_activate_stack_trampoline(PyObject *Py_UNUSED(module), PyObject *arg)
{
    if (!PyUnicode_Check(arg)) {
        _PyArg_BadArgument("activate_stack_trampoline", "argument", "str",
                           arg);
        return NULL;
    }
    Py_ssize_t len;
    const char *backend = PyUnicode_AsUTF8AndSize(arg, &len);
    if (backend == NULL) {
        return NULL;
    }
    if (strlen(backend) != (size_t)len) {
        PyErr_SetString(PyExc_ValueError, "embedded null character");
        return NULL;
    }
    if (activate_named(_PyThreadState_GET(), backend) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(deactivate_doc,
"deactivate_stack_trampoline($module, /)\n\
--\n\
\n\
Deactivate the current stack profiler trampoline backend.\n\
\n\
If no stack profiler is activated, this function has no effect.");

/* Turn perf mode off in interp, unless another tool's hook is installed
   there: -1 with an exception. */
static int
deactivate_checked(PyInterpreterState *interp)
{
    if (refuse_foreign_hook(interp) < 0) {
        return -1;
    }
    deactivate(interp);
    return 0;
}

static PyObject *
sys_deactivate_stack_trampoline(PyObject *Py_UNUSED(module),
                                PyObject *Py_UNUSED(args))
{
    if (deactivate_checked(_PyInterpreterState_GET()) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(is_active_doc,
"is_stack_trampoline_active($module, /)\n\
--\n\
\n\
Return *True* if a stack profiler trampoline is active.");

static PyObject *
sys_is_stack_trampoline_active(PyObject *Py_UNUSED(module),
                               PyObject *Py_UNUSED(args))
{
    return PyBool_FromLong(is_active(_PyInterpreterState_GET()));
}

/* A request from outside the process (perf_attach.c): what the sys
   functions would do, with nobody to raise an exception to. */
int
_PyPerfTrampoline_Switch(PyThreadState *tstate, const char *name)
{
    int res = name != NULL ? activate_named(tstate, name)
                           : deactivate_checked(tstate->interp);
    if (res < 0) {
        print_error(name != NULL ? "not turned on" : "not turned off",
                    "unknown error");
    }
    return res;
}

PyMethodDef _PyPerfTrampoline_SysMethods[] = {
    {"activate_stack_trampoline", sys_activate_stack_trampoline,
     METH_O, activate_doc},
    {"deactivate_stack_trampoline", sys_deactivate_stack_trampoline,
     METH_NOARGS, deactivate_doc},
    {"is_stack_trampoline_active", sys_is_stack_trampoline_active,
     METH_NOARGS, is_active_doc},
    {NULL, NULL}
};
