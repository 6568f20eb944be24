/* Perf trampolines: Python functions in the Linux perf profiler.

   perf walks native stacks, so a Python function is invisible to it: all
   Python frames run inside the same C function, _PyEval_EvalFrameDefault().
   In perf mode every code object gets its own copy of a tiny assembly
   trampoline (Python/asm_trampoline.S) that only calls the evaluator.  The
   PEP 523 eval-frame hook evaluates each frame through its code object's
   trampoline, so each Python frame owns a distinct native return address,
   and /tmp/perf-<pid>.map tells perf the name of each trampoline.

   This file holds the configuration, the hook with its code-object cache
   and C-stack guard, turning perf mode on and off, and the sys functions;
   Python/perf_internal.h lists the other files and what they hold.  All
   state here is process-wide and protected by the GIL. */

#include "Python.h"
#include "pycore_code.h"          // _PyCodeObjectExtra
#include "pycore_frame.h"         // _PyInterpreterFrame
#include "pycore_initconfig.h"    // _Py_GetEnv()
#include "pycore_interp.h"        // PyInterpreterState.co_extra_freefuncs
#include "pycore_perf_trampoline.h"
#include "pycore_pyerrors.h"       // _PyErr_Occurred()
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

#include <sys/resource.h>         // getrlimit()
#include <sys/auxv.h>             // getauxval()
#include <sys/syscall.h>          // SYS_gettid
#include <unistd.h>               // syscall()

/* ---------------------------------------------------------------------
   The eval-frame hook and the code-object cache. */

/* The co_extra slot holds the code object's trampoline.  Trampolines are
   never freed one by one, so there is nothing to release. */
static void
release_code_extra(void *Py_UNUSED(trampoline))
{
}

/* The index is per interpreter; release_code_extra in an interpreter's
   table of free functions marks ours, so the index is requested once per
   interpreter however often perf mode is toggled. */
static Py_ssize_t
find_code_extra_index(PyInterpreterState *interp)
{
    for (Py_ssize_t index = 0; index < interp->co_extra_user_count; index++) {
        if (interp->co_extra_freefuncs[index] == release_code_extra) {
            return index;
        }
    }
    return -1;
}

static struct {
    /* The hook's fast path serves one interpreter: the last one whose
       frame took the slow path.  0: none, while the hook polls for
       pending entries (perf_flusher.c) or in a forked child.  Set with
       the GIL; cleared by a thread that queues entries, which may not
       hold it. */
    _Py_atomic_address fast_interp;
    Py_ssize_t fast_index;      /* our co_extra index in fast_interp */
    int adoption_pending;       /* a forked child without its own map */
} hook;

static void
set_fast_path(PyInterpreterState *interp, Py_ssize_t index)
{
    hook.fast_index = index;
    _Py_atomic_store_relaxed(&hook.fast_interp,
                             _PyPerfFlusher_HookPolls() ? 0
                             : (uintptr_t)interp);
}

void
_PyPerfTrampoline_LeaveFastPath(void)
{
    _Py_atomic_store_relaxed(&hook.fast_interp, 0);
}

/* What co's slot index holds, or NULL.  Not necessarily a trampoline: it
   may be another tool's data (see _PyPerfArena_IsTrampoline).  Read
   directly (patch 0013 shares the block's layout), as the hook cannot
   afford _PyCode_GetExtra()'s call and checks. */
static inline void *
read_code_extra(PyCodeObject *co, Py_ssize_t index)
{
    _PyCodeObjectExtra *extra = (_PyCodeObjectExtra *)co->co_extra;
    if (extra == NULL || index >= extra->ce_size) {
        return NULL;
    }
    return extra->ce_extras[index];
}

/* Deep-frozen code objects (importlib, os, site...) are static, shared by
   every interpreter, and start with the reference count of
   _PyObject_IMMORTAL_INIT; no heap object comes near it. */
#define STATIC_CODE_REFCNT (999999999 / 2)

/* The co_extra index for co's trampoline, given ours in interp.  Indexes
   are per interpreter, but a shared code object's slots are read by the
   tools of every interpreter: its trampoline goes only in the slot that
   is ours in the main interpreter, never in a slot that may be another
   tool's there.  -1: co gets no trampoline here (shared, and perf mode
   has no slot in the main interpreter or this one has no such index). */
static Py_ssize_t
code_extra_index_for(PyCodeObject *co, PyInterpreterState *interp,
                     Py_ssize_t index)
{
    PyInterpreterState *main_interp = _PyInterpreterState_Main();
    if (interp == main_interp || Py_REFCNT(co) < STATIC_CODE_REFCNT) {
        return index;
    }
    Py_ssize_t main_index = find_code_extra_index(main_interp);
    return main_index < interp->co_extra_user_count ? main_index : -1;
}

/* Our co_extra index in interp, requested if needed; -1 with an exception
   set on failure.  activate() calls this before the hook runs in an
   interpreter, so hook.fast_interp never pairs an interpreter with another's
   index, even when a new interpreter reuses a freed one's address. */
static Py_ssize_t
use_code_extra_index(PyInterpreterState *interp)
{
    Py_ssize_t index = find_code_extra_index(interp);
    if (index < 0) {
        index = _PyEval_RequestCodeExtraIndex(release_code_extra);
        if (index < 0) {
            PyErr_SetString(PyExc_RuntimeError,
                            "no free code object extra slot for perf support");
            return -1;
        }
    }
    set_fast_path(interp, index);
    return index;
}

/* Give a code object its trampoline.  Returns NULL with an exception. */
static py_trampoline
compile_trampoline(PyCodeObject *co, Py_ssize_t index)
{
    py_trampoline code = _PyPerfArena_Allocate();
    if (code == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    if (_PyPerfFlusher_Announce(code, co) < 0) {
        return NULL;
    }
    if (_PyCode_SetExtra((PyObject *)co, index, (void *)code) < 0) {
        return NULL;
    }
    return code;
}

static PyObject *py_trampoline_evaluator(PyThreadState *,
                                         _PyInterpreterFrame *, int);

/* A trampoline could not be made while running: turn perf mode off in this
   interpreter with one warning and carry on with the default evaluator. */
static void
disable_after_failure(PyThreadState *tstate)
{
    print_error("disabled", "cannot create a trampoline");
    if (tstate->interp->eval_frame == py_trampoline_evaluator) {
        _PyInterpreterState_SetEvalFrameFunc(tstate->interp, NULL);
    }
}

/* The hook's slow path: another interpreter than the fast path's, or a
   code object without a trampoline yet.  Returns NULL when the frame must
   run without a trampoline. */
static Py_NO_INLINE py_trampoline
find_or_make_trampoline(PyThreadState *tstate, PyCodeObject *co)
{
    Py_ssize_t index = find_code_extra_index(tstate->interp);
    if (index < 0) {
        return NULL;
    }
    /* This interpreter runs now: make it the fast path's. */
    set_fast_path(tstate->interp, index);
    index = code_extra_index_for(co, tstate->interp, index);
    if (index < 0) {
        return NULL;
    }
    void *extra = NULL;
    (void)_PyCode_GetExtra((PyObject *)co, index, &extra);
    if (extra != NULL) {
        /* Another tool's data is never called, nor overwritten. */
        return _PyPerfArena_IsTrampoline(extra) ? (py_trampoline)extra : NULL;
    }
    /* A thrown-in exception is pending when throwflag is set: keep it out
       of the way while the trampoline is made. */
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    int thrown = (_PyErr_Occurred(tstate) != NULL);
    if (thrown) {
        _PyErr_Fetch(tstate, &type, &value, &tb);
    }
    py_trampoline code = compile_trampoline(co, index);
    if (code == NULL) {
        disable_after_failure(tstate);
    }
    if (thrown) {
        _PyErr_Restore(tstate, type, value, tb);
    }
    return code;
}

/* The C stack.  In perf mode every Python frame costs a native frame (its
   trampoline and an evaluator), where stock 3.11 runs Python-to-Python
   calls inline, so deep recursion that stock survives could overflow the
   C stack.  The hook raises RecursionError instead when less than
   STACK_RESERVE bytes are left.  stack.limit starts at UINTPTR_MAX, so a
   thread's first frame takes the slow path, which finds the limit.

   Only the thread's own stack, from stack.low up, is judged: code
   may run on stacks the guard knows nothing of (fibers made with
   makecontext(), C coroutine libraries), and there it runs as on stock. */
#define STACK_RESERVE (256 * 1024)

static __thread struct {
    uintptr_t limit;
    uintptr_t low;
    int limit_is_exact;
} stack = {UINTPTR_MAX, 0, 0};

/* Where this function's stack is: the stack pointer itself where it can
   be read in one instruction, so that the hook needs no frame of its own. */
static inline uintptr_t
current_stack_address(void)
{
    uintptr_t sp;
#if defined(__x86_64__)
    __asm__("mov %%rsp, %0" : "=r"(sp));
#elif defined(__aarch64__)
    __asm__("mov %0, sp" : "=r"(sp));
#else
    sp = (uintptr_t)__builtin_frame_address(0);
#endif
    return sp;
}

/* The real limit: STACK_RESERVE (at most a quarter of the stack) above the
   stack's lowest address, or 0 (no guard) if that is unknown. */
static void
find_exact_stack_limit(void)
{
    pthread_attr_t attr;
    void *base;
    size_t size;
    stack.limit = 0;
    stack.low = 0;
    stack.limit_is_exact = 1;
    if (pthread_getattr_np(pthread_self(), &attr) != 0) {
        return;
    }
    if (pthread_attr_getstack(&attr, &base, &size) == 0) {
        size_t reserve = size / 4 < STACK_RESERVE ? size / 4 : STACK_RESERVE;
        stack.low = (uintptr_t)base;
        stack.limit = stack.low + reserve;
    }
    pthread_attr_destroy(&attr);
}

/* Is sp on the stack the kernel gave the process (the main thread's)?  It
   spans RLIMIT_STACK below the program's name, which exec() put near its
   top (AT_EXECFN); thread stacks are mappings below all of that, unless
   RLIMIT_STACK is huge, so the thread must be the main one too.  The
   thread that forked a child is not on it, even if its id is the
   child's pid. */
static int
on_initial_stack(uintptr_t sp, const struct rlimit *limit)
{
    uintptr_t top = (uintptr_t)getauxval(AT_EXECFN);
    return limit->rlim_cur != RLIM_INFINITY
           && sp < top && top - sp < (uintptr_t)limit->rlim_cur
           && syscall(SYS_gettid) == _PyPerfFiles_Pid();
}

/* A thread's first limit.  For the main thread, glibc's
   pthread_getattr_np() reads all of /proc/self/maps (about 100 us, 1% of
   Python's startup), and most programs never run deep; so its first limit
   is provisional: an eighth of RLIMIT_STACK below the first frame, which
   exec() leaves free (arguments and environment take at most a quarter of
   it).  Frames past it find the real limit. */
static void
find_stack_limit(uintptr_t sp)
{
    struct rlimit limit;
    if (getrlimit(RLIMIT_STACK, &limit) == 0
        && on_initial_stack(sp, &limit))
    {
        stack.limit = sp - (uintptr_t)limit.rlim_cur / 8;
        stack.limit_is_exact = 0;
        return;
    }
    find_exact_stack_limit();
}

/* Is the C stack nearly full?  Only where the thread's stack is known. */
static int
c_stack_nearly_full(void)
{
    uintptr_t sp = current_stack_address();
    if (stack.limit == UINTPTR_MAX) {
        find_stack_limit(sp);
    }
    if (sp <= stack.limit && !stack.limit_is_exact) {
        find_exact_stack_limit();
    }
    return sp <= stack.limit && sp >= stack.low;
}

/* In a forked child (perf_flusher.c's fork handler): send the next frame
   down the slow path, which gives the child its own outputs. */
void
_PyPerfTrampoline_AfterFork(void)
{
    _PyPerfTrampoline_LeaveFastPath();
    hook.adoption_pending = 1;
}

/* Evaluate a frame that the fast path could not serve.  The hook may
   return NULL without evaluating the frame: its caller clears it. */
static Py_NO_INLINE PyObject *
evaluate_slow(PyThreadState *tstate, _PyInterpreterFrame *frame,
              int throwflag)
{
    if (c_stack_nearly_full()) {
        PyErr_SetString(PyExc_RecursionError,
                        "maximum recursion depth exceeded: the C stack is "
                        "nearly full (perf mode uses a native frame per "
                        "Python frame)");
        return NULL;
    }
    if (hook.adoption_pending) {
        hook.adoption_pending = 0;
        _PyPerfFlusher_ScheduleAdoption();
    }
    if (_PyPerfFlusher_HookPolls()) {
        _PyPerfFlusher_Poll();
    }
    py_trampoline code = find_or_make_trampoline(tstate, frame->f_code);
    if (code == NULL) {
        return _PyEval_EvalFrameDefault(tstate, frame, throwflag);
    }
    return code(tstate, frame, throwflag, _PyEval_EvalFrameDefault);
}

/* Runs for every Python frame in perf mode.  Both paths end in tail calls,
   so no frame of the hook stays on the stack under the trampoline, and
   the common case is a few loads and a jump. */
static PyObject *
py_trampoline_evaluator(PyThreadState *tstate, _PyInterpreterFrame *frame,
                        int throwflag)
{
    if ((uintptr_t)tstate->interp
            == _Py_atomic_load_relaxed(&hook.fast_interp)
        && current_stack_address() > stack.limit)
    {
        void *code = read_code_extra(frame->f_code, hook.fast_index);
        if (_PyPerfArena_IsTrampoline(code)) {
            return ((py_trampoline)code)(tstate, frame, throwflag,
                                         _PyEval_EvalFrameDefault);
        }
    }
    return evaluate_slow(tstate, frame, throwflag);
}


/* ---------------------------------------------------------------------
   Turning perf mode on and off. */

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
        && interp->eval_frame != py_trampoline_evaluator)
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
    if (use_code_extra_index(interp) < 0 || perf_map_prepare() < 0
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
    _PyInterpreterState_SetEvalFrameFunc(interp, py_trampoline_evaluator);
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
    if (interp->eval_frame == py_trampoline_evaluator) {
        _PyInterpreterState_SetEvalFrameFunc(interp, NULL);
        _PyPerfFlusher_Flush();
    }
}

static int
is_active(PyInterpreterState *interp)
{
    return interp->eval_frame == py_trampoline_evaluator;
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
        disable_after_failure(tstate);
    }
}

void
_PyPerfTrampoline_Fini(void)
{
    PyThreadState *tstate = _PyThreadState_GET();
    if (tstate != NULL) {
        deactivate(tstate->interp);
    }
    _PyPerfTrampoline_LeaveFastPath();
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
    Py_ssize_t index = use_code_extra_index(interp);
    if (index < 0) {
        return -1;
    }
    index = code_extra_index_for(co, interp, index);
    if (index < 0) {
        return 0;
    }
    void *extra = NULL;
    if (_PyCode_GetExtra((PyObject *)co, index, &extra) < 0) {
        return -1;
    }
    if (extra == NULL && compile_trampoline(co, index) == NULL) {
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
