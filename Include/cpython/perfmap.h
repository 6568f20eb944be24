#ifndef Py_LIMITED_API
#ifndef Py_CPYTHON_PERFMAP_H
#define Py_CPYTHON_PERFMAP_H
#ifdef __cplusplus
extern "C" {
#endif

/* The Linux perf map, /tmp/perf-<pid>.map: code generated at run time
   (JITs, trampolines of extensions) named for the perf profiler, in the
   same file as the interpreter's own perf trampolines.  The names and
   signatures are those of CPython 3.12.  See Doc/c-api/perfmaps.rst. */

PyAPI_FUNC(int) PyUnstable_PerfMapState_Init(void);
PyAPI_FUNC(int) PyUnstable_WritePerfMapEntry(
    const void *code_addr,
    unsigned int code_size,
    const char *entry_name);
PyAPI_FUNC(void) PyUnstable_PerfMapState_Fini(void);
PyAPI_FUNC(int) PyUnstable_CopyPerfMapFile(const char *parent_filename);
PyAPI_FUNC(int) PyUnstable_PerfTrampoline_CompileCode(PyCodeObject *);
PyAPI_FUNC(int) PyUnstable_PerfTrampoline_SetPersistAfterFork(int enable);

/* Perf mode turned on or off from outside the process, by a debugger
   (Tools/perf/attach.py): safe to call at any instruction, from any
   thread, without the GIL.  Not in CPython 3.12 or 3.13. */
PyAPI_FUNC(int) PyUnstable_PerfTrampoline_Request(int backend);
PyAPI_FUNC(int) PyUnstable_PerfTrampoline_RequestStatus(int request);

#ifdef __cplusplus
}
#endif
#endif /* !Py_CPYTHON_PERFMAP_H */
#endif /* !Py_LIMITED_API */
