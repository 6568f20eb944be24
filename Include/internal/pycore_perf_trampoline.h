#ifndef Py_INTERNAL_PERF_TRAMPOLINE_H
#define Py_INTERNAL_PERF_TRAMPOLINE_H
#ifdef __cplusplus
extern "C" {
#endif

#ifndef Py_BUILD_CORE
#  error "this header requires Py_BUILD_CORE define"
#endif

/* Linux perf support: every Python frame is evaluated through a small
   per-code-object trampoline whose address is named in /tmp/perf-<pid>.map.
   See Python/perf_trampoline.c. */

/* Called when an interpreter (main or sub) is about to run Python code:
   honours -X perf and PYTHONPERFSUPPORT.  Failures print one warning; they
   never stop the interpreter from starting. */
extern void _PyPerfTrampoline_InitFromConfig(PyThreadState *tstate);

/* Called by Py_FinalizeEx(): stop using trampolines, close the map file. */
extern void _PyPerfTrampoline_Fini(void);

/* Called by os._exit() and os.exec*(): write out map lines that are still
   buffered (exit() and Py_FinalizeEx() do that themselves). */
extern void _PyPerfTrampoline_FlushMap(void);

/* Called where the main thread checks for signals, with the GIL: carry
   out a request made by PyUnstable_PerfTrampoline_Request() (see
   Python/perf_attach.c). */
extern void _PyPerfAttach_RunRequest(PyThreadState *tstate);

/* sys.activate_stack_trampoline() and friends, added to the sys module. */
extern PyMethodDef _PyPerfTrampoline_SysMethods[];

#ifdef __cplusplus
}
#endif
#endif /* !Py_INTERNAL_PERF_TRAMPOLINE_H */
