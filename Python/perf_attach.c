/* Perf mode turned on or off from outside the process.

   A service started without -X perf can be profiled without a restart:
   Tools/perf/attach.py has gdb call PyUnstable_PerfTrampoline_Request()
   in it.  gdb stops the process at any instruction, where any thread may
   hold the GIL, the allocator's locks or perf support's own lock, and runs
   the function on one thread while the others stay stopped.  So the
   request only records what is asked, with lock-free atomic operations,
   and trips the main interpreter's eval breaker the way the C signal
   handler does (_PyEval_SignalReceived() is async-signal-safe): it takes
   no lock, allocates nothing and calls no Python API, so it cannot wait
   for a stopped thread.

   The main thread carries the request out where Python's signal handlers
   run, with the GIL: _PyErr_CheckSignalsTstate() calls
   _PyPerfAttach_RunRequest() (patch 0015), between two bytecodes or in a C
   function that checks for signals.  It does what a Python signal handler
   calling sys.activate_stack_trampoline() or
   sys.deactivate_stack_trampoline() would do there, except that a failure
   is one line on stderr: the program must not see an exception it did not
   cause.  PyUnstable_PerfTrampoline_RequestStatus() tells the caller when
   that has happened, again without a lock. */

#include "Python.h"
#include "pycore_ceval.h"         // _PyEval_SignalReceived()
#include "pycore_perf_trampoline.h"
#include "pycore_pyerrors.h"      // _PyErr_Fetch()
#include "pycore_pystate.h"       // _Py_ThreadCanHandleSignals()
#include "pycore_runtime.h"       // _PyRuntime

#include "perf_internal.h"        // _PyPerfTrampoline_Switch()

#include <stdatomic.h>
#include <unistd.h>               // getpid()

/* Lock-free operations are what make the request safe in a stopped
   process (and in a signal handler). */
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "int atomics must be lock-free");

/* The backends by their number in the C API; NULL turns perf mode off. */
static const char *const backend_names[] = {NULL, "perf", "perf_jit"};
#define BACKEND_COUNT ((int)Py_ARRAY_LENGTH(backend_names))

/* A request is its number (1, 2, ... in the order they were made) and its
   backend, in one word: number * 4 + backend.  Numbers stop at
   MAX_REQUESTS, which still fits in an int; gdb makes a request in no
   less than about 25 ms, so that lasts ten months of calls without a
   pause. */
#define REQUEST_WORD(number, backend) ((number) << 2 | (unsigned int)(backend))
#define REQUEST_NUMBER(word) ((word) >> 2)
#define REQUEST_BACKEND(word) ((int)((word) & 3))
#define MAX_REQUESTS (UINT_MAX >> 2)

static struct {
    /* The newest request made, or 0.  Taking a number and publishing the
       request are one compare-and-swap, so an older request can never
       land after a newer one. */
    atomic_uint newest;
    atomic_int pid;         /* the process the newest request was made in */
    /* Written by the main thread (and the one that finalizes or
       initializes the main interpreter): the number of the newest request
       it has seen (carried out or dropped), and the newest carried out,
       as number * 2 plus 1 if it failed. */
    atomic_uint seen;
    atomic_uint done;
} attach;

int
PyUnstable_PerfTrampoline_Request(int backend)
{
    if (backend < 0 || backend >= BACKEND_COUNT) {
        return -1;
    }
    /* Only a running interpreter checks for signals.  Its state is in
       _PyRuntime, which is never freed, so a finalization that starts
       just after this check cannot pull it away. */
    if (!_PyRuntime.initialized
        || _PyRuntimeState_GetFinalizing(&_PyRuntime) != NULL)
    {
        return -2;
    }
    /* Every thread of a process stores the same pid; before the request
       is published, so the main thread never sees a request without it. */
    atomic_store(&attach.pid, getpid());
    unsigned int old = atomic_load(&attach.newest);
    unsigned int word;
    do {
        if (REQUEST_NUMBER(old) >= MAX_REQUESTS) {
            return -3;
        }
        word = REQUEST_WORD(REQUEST_NUMBER(old) + 1, backend);
    } while (!atomic_compare_exchange_weak(&attach.newest, &old, word));
    /* The request is visible before the eval breaker is tripped. */
    atomic_thread_fence(memory_order_seq_cst);
    PyInterpreterState *interp = _PyInterpreterState_Main();
    _PyEval_SignalReceived(interp);
    /* That sets the eval breaker only when called from the main thread;
       a debugger may call from another.  Set it anyway, as Windows does:
       the main thread handles it at its next check, other threads clear
       it when they next compute it. */
    _Py_atomic_store_relaxed(&interp->ceval.eval_breaker, 1);
    return (int)REQUEST_NUMBER(word);
}

int
PyUnstable_PerfTrampoline_RequestStatus(int request)
{
    unsigned int done = atomic_load(&attach.done);
    if (request <= 0 || done / 2 < (unsigned int)request) {
        return 0;
    }
    if (done / 2 > (unsigned int)request) {
        return 2;               /* a newer one was carried out since */
    }
    return done % 2 ? -1 : 1;
}

/* Switch perf mode as asked, keeping an exception being raised (a C
   function may check for signals with one set) out of the way.  Returns
   -1 if it failed; the failure was printed. */
static int
carry_out(PyThreadState *tstate, int backend)
{
    PyObject *type, *value, *tb;
    _PyErr_Fetch(tstate, &type, &value, &tb);
    int res = _PyPerfTrampoline_Switch(tstate, backend_names[backend]);
    _PyErr_Restore(tstate, type, value, tb);
    return res;
}

void
_PyPerfAttach_RunRequest(PyThreadState *tstate)
{
    /* The eval breaker or a signal led here: the load must not see the
       word from before the request that tripped it. */
    atomic_thread_fence(memory_order_acquire);
    unsigned int word = atomic_load_explicit(&attach.newest,
                                             memory_order_relaxed);
    if (REQUEST_NUMBER(word) <= atomic_load(&attach.seen)) {
        return;
    }
    /* Another thread or interpreter than the one signals are for, or the
       end of the interpreter: the main thread finds it later, or never. */
    if (!_Py_ThreadCanHandleSignals(tstate->interp)
        || _PyRuntimeState_GetFinalizing(&_PyRuntime) != NULL)
    {
        return;
    }
    unsigned int number = REQUEST_NUMBER(word);
    atomic_store(&attach.seen, number);
    /* A forked child does not carry out what was asked of its parent. */
    if (atomic_load(&attach.pid) != getpid()) {
        return;
    }
    int failed = carry_out(tstate, REQUEST_BACKEND(word)) < 0;
    /* carry_out() may run Python code (a __del__ called by a collection
       while an exception is made), which may carry out a newer request
       in a nested call: the newer one's result stays. */
    if (number > atomic_load(&attach.done) / 2) {
        atomic_store(&attach.done, number * 2 + (unsigned int)failed);
    }
}

/* A request not carried out when the main interpreter is finalized is
   dropped, not left for one that an embedding application initializes
   next.  Dropped again when that one is initialized: a thread of the
   process may have been preempted between checking that the interpreter
   runs and publishing its request.  A request published later still
   goes to the new interpreter, as if made in its lifetime. */
void
_PyPerfAttach_DropPending(void)
{
    atomic_store(&attach.seen, REQUEST_NUMBER(atomic_load(&attach.newest)));
}
