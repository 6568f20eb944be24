/* The eval-frame hook of perf mode (see Python/perf_trampoline.c).

   For every Python frame it finds the code object's trampoline in a
   co_extra slot and evaluates the frame through it (the fast path: a
   few loads and a tail call), or takes the slow path: it makes the
   trampoline of a code object run for the first time, guards the C
   stack, and polls for entries waiting to be written.  Runs with the
   GIL; the fast path's state may be cleared by any thread. */

#include "Python.h"
#include "pycore_code.h"          // _PyCodeObjectExtra
#include "pycore_frame.h"         // _PyInterpreterFrame
#include "pycore_interp.h"        // PyInterpreterState.co_extra_freefuncs
#include "pycore_pyerrors.h"      // _PyErr_Occurred()
#include "pycore_pystate.h"       // _PyInterpreterState_Main()

#ifdef PY_HAVE_PERF_TRAMPOLINE

#include "perf_internal.h"

#include <sys/auxv.h>             // getauxval()
#include <sys/resource.h>         // getrlimit()
#include <sys/syscall.h>          // SYS_gettid
#include <unistd.h>               // syscall()

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
_PyPerfHook_LeaveFastPath(void)
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
   set on failure.  Perf mode is turned on in an interpreter only after
   this, so hook.fast_interp never pairs an interpreter with another's
   index, even when a new interpreter reuses a freed one's address. */
Py_ssize_t
_PyPerfHook_UseCodeExtraIndex(PyInterpreterState *interp)
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

/* co's trampoline, made if needed: the hook's slow path and
   PyUnstable_PerfTrampoline_CompileCode() (see perf_internal.h). */
py_trampoline
_PyPerfHook_TrampolineFor(PyCodeObject *co, PyInterpreterState *interp,
                          Py_ssize_t index)
{
    index = code_extra_index_for(co, interp, index);
    if (index < 0) {
        return NULL;
    }
    void *extra = NULL;
    if (_PyCode_GetExtra((PyObject *)co, index, &extra) < 0) {
        return NULL;
    }
    if (extra != NULL) {
        /* Another tool's data is never called, nor overwritten. */
        return _PyPerfArena_IsTrampoline(extra) ? (py_trampoline)extra : NULL;
    }
    return compile_trampoline(co, index);
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
    /* A thrown-in exception is pending when throwflag is set: keep it out
       of the way, so that an exception after the call is a failure. */
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    int thrown = (_PyErr_Occurred(tstate) != NULL);
    if (thrown) {
        _PyErr_Fetch(tstate, &type, &value, &tb);
    }
    py_trampoline code = _PyPerfHook_TrampolineFor(co, tstate->interp, index);
    if (code == NULL && _PyErr_Occurred(tstate)) {
        _PyPerfTrampoline_DisableAfterFailure(tstate);
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
_PyPerfHook_AfterFork(void)
{
    _PyPerfHook_LeaveFastPath();
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
PyObject *
_PyPerfHook_EvalFrame(PyThreadState *tstate, _PyInterpreterFrame *frame,
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

#endif  /* PY_HAVE_PERF_TRAMPOLINE */
