/* Between the files of perf support (Python/perf_*.c); nothing else
   includes this.  Each file keeps its state in one static struct (the
   hook also has a thread-local one; perf_trampoline.c has none) and
   offers the others the functions below, named with its prefix:

     perf_trampoline.c      _PyPerfTrampoline_  configuration, on/off, the
                            sys functions
     perf_hook.c            _PyPerfHook_     the eval-frame hook, its
                            code-extra cache, the C-stack guard
     perf_arena.c           _PyPerfArena_    executable memory for trampolines
     perf_files.c           _PyPerfFiles_    the pid, the one lock, safe
                            opening and appending, reading in chunks
     perf_map.c             _PyPerfMap_      /tmp/perf-<pid>.map, names, the
                            PyUnstable_PerfMap* API
     perf_flusher.c         _PyPerfFlusher_  entries waiting to be written,
                            the thread that writes them, fork and exit
     perf_jit_trampoline.c  _PyPerfJit_      /tmp/jit-<pid>.dump (perf_jit)
     perf_jit_unwind.c      _PyPerfUnwind_   DWARF unwinding tables for it
     perf_attach.c          _PyPerfAttach_   perf mode turned on or off from
                            outside the process (Tools/perf/attach.py)

   "Locked" functions expect the caller to hold the files' lock
   (_PyPerfFiles_Lock).  Functions returning int return 0, or -1 with
   errno set, unless they say otherwise. */

#ifndef Py_PERF_INTERNAL_H
#define Py_PERF_INTERNAL_H

/* perf_trampoline.c, in every build: switch perf mode in tstate's
   interpreter as the sys functions do, on with the backend `name`, or off
   if name is NULL, for a request from outside (perf_attach.c).  A failure
   is printed as one line on stderr, not raised.  Returns 0, or -1 if it
   failed. */
extern int _PyPerfTrampoline_Switch(PyThreadState *tstate, const char *name);
/* perf_attach.c, in every build: drop requests not carried out yet, at
   the main interpreter's finalization and initialization. */
extern void _PyPerfAttach_DropPending(void);

#ifdef PY_HAVE_PERF_TRAMPOLINE

#include "pycore_atomic.h"        // _Py_atomic_int
#include "pycore_frame.h"         // _PyInterpreterFrame

#include <errno.h>                // EBUSY
#include <pthread.h>
#include <sys/types.h>            // off_t, pid_t

typedef PyObject *(*py_evaluator)(PyThreadState *, _PyInterpreterFrame *,
                                  int throwflag);
typedef PyObject *(*py_trampoline)(PyThreadState *, _PyInterpreterFrame *,
                                   int throwflag, py_evaluator);


/* perf_trampoline.c */

/* Perf mode could not be turned on at start-up, or a trampoline could not
   be made while running: perf mode is turned off in tstate's interpreter,
   with a warning.  The exception set is the warning's text, and is
   cleared. */
extern void _PyPerfTrampoline_DisableAfterFailure(PyThreadState *tstate);


/* perf_hook.c */

/* The PEP 523 eval-frame function of perf mode. */
extern PyObject *_PyPerfHook_EvalFrame(PyThreadState *tstate,
                                       _PyInterpreterFrame *frame,
                                       int throwflag);
/* Our co_extra index in interp, requested if needed; -1 with an exception
   set on failure.  The hook's fast path then serves interp.  Called
   before perf mode is turned on in interp, and by
   PyUnstable_PerfTrampoline_CompileCode(). */
extern Py_ssize_t _PyPerfHook_UseCodeExtraIndex(PyInterpreterState *interp);
/* co's trampoline in interp, where index is our co_extra index; made if
   co has none yet.  NULL without an exception when co gets none there (a
   code object shared by all interpreters, when perf mode has no slot for
   it; another tool's data in the slot); NULL with an exception when it
   could not be made: the files then lack its entry, and the caller turns
   perf mode off.  Needs the GIL and no exception set. */
extern py_trampoline _PyPerfHook_TrampolineFor(PyCodeObject *co,
                                               PyInterpreterState *interp,
                                               Py_ssize_t index);
/* In a forked child: its first Python frame gives it its own outputs. */
extern void _PyPerfHook_AfterFork(void);
/* Send every frame down the hook's slow path until it serves one again
   with nothing to poll.  Any thread. */
extern void _PyPerfHook_LeaveFastPath(void);


/* perf_arena.c */

/* The template, from Python/asm_trampoline.S. */
extern const char _Py_trampoline_func_start[];
extern const char _Py_trampoline_func_end[];

/* Each trampoline starts on its own 16-byte boundary. */
#define PERF_TRAMPOLINE_ALIGN 16

/* The arenas' state.  Not static: the hook tests every co_extra pointer
   against the reservation (_PyPerfArena_IsTrampoline), which must be
   inline to keep its fast path free of calls. */
typedef struct {
    char *region;       /* the reservation, or NULL */
    size_t region_size;
    size_t region_used; /* bytes of it carved into arenas (and gaps) */
    pid_t owner;        /* the process that made the current arena */
    char *next;         /* next free trampoline */
    char *end;          /* end of the current arena's trampolines */
    size_t last_size;   /* size of the current arena */
} _PyPerfArena_State;

extern _PyPerfArena_State _PyPerfArena;

/* Is p a trampoline of ours?  Only we map anything in the reservation,
   and trampolines start on PERF_TRAMPOLINE_ALIGN boundaries of the part
   carved into arenas.  NULL is not one. */
static inline int
_PyPerfArena_IsTrampoline(const void *p)
{
    uintptr_t offset = (uintptr_t)p - (uintptr_t)_PyPerfArena.region;
    return offset < _PyPerfArena.region_used
           && offset % PERF_TRAMPOLINE_ALIGN == 0;
}

extern size_t _PyPerfArena_TemplateSize(void);
/* Make sure an arena has room; perf mode does that when it is turned on,
   so that a failure is reported there. */
extern int _PyPerfArena_Prepare(void);
/* The next trampoline, or NULL with errno set. */
extern py_trampoline _PyPerfArena_Allocate(void);


/* perf_files.c */

/* The pid, without a system call (fork handlers keep it). */
extern pid_t _PyPerfFiles_Pid(void);
extern void _PyPerfFiles_RefreshPid(void);

/* The one lock of the map, the dump and the flusher's buffers: writers
   may come without the GIL (the PyUnstable perf-map API).  Lock() also
   waits for a write the flusher makes without it; Unlock() keeps errno. */
extern pthread_mutex_t _PyPerfFiles_mutex;
extern void _PyPerfFiles_Lock(void);
extern void _PyPerfFiles_Unlock(void);
/* Debug builds check that "locked" functions run with the lock held (by
   some thread: a mutex cannot tell which). */
#define _PyPerfFiles_ASSERT_LOCKED() \
    assert(pthread_mutex_trylock(&_PyPerfFiles_mutex) == EBUSY)

extern void _PyPerfFiles_CloseKeepingErrno(int fd);

/* An output file of ours in /tmp, written one whole entry per trampoline:
   the perf map (perf_map.c) and the jitdump (perf_jit_trampoline.c) are
   its two instances.  The fields from `wanted` on are guarded by the
   lock. */
typedef struct {
    const char *what;           /* "perf map file", for messages */
    const char *path_format;    /* its path, from the pid (a long) */
    /* Make sure this process's file is open and names every trampoline
       it must.  Locked. */
    int (*ready_locked)(void);
    /* Encode the entry of the trampoline at addr, named as the map shows
       it, made at time `made`, into buf (max_entry bytes); returns its
       length.  Locked, or the flusher while it writes. */
    size_t (*encode)(char *buf, uintptr_t addr, const char *name,
                     size_t name_len, uint64_t made);
    size_t max_entry;
    void (*close_locked)(void);
    /* After a write failed the file lacks entries: start a new one next
       time (the dump), or keep it as it is (the map: perf mode stops). */
    int restart_after_error;
    int wanted;                 /* perf mode writes it */
    int fd;                     /* -1 while closed */
    pid_t owner;                /* the process that created the file */
    off_t size;                 /* bytes of complete entries in it */
    const char *refusal;        /* why an existing file was refused */
    int error;                  /* errno of a deferred write that failed,
                                   until taken; 0 if none */
    /* errno of the loss of entries reported since perf mode was last
       turned on, or 0.  The failures that follow (lines still buffered
       then) are the same loss, and the file takes no new entries: every
       interpreter's perf mode stops at its next trampoline. */
    int lost;
} perf_output;

extern void _PyPerfOutput_Path(const perf_output *out, char *buf,
                               size_t size);
/* Open this process's file for appending: one left by an earlier process
   with the same pid is emptied, one this process wrote before (an
   earlier Py_Initialize, perf_jit turned on again) is appended to.
   Locked. */
extern int _PyPerfOutput_OpenLocked(perf_output *out);
/* Is this process's file open?  (After fork() the parent's may be.) */
extern int _PyPerfOutput_IsOpenHere(const perf_output *out);
/* Append whole entries; on failure the file is cut back to its complete
   entries.  Locked, or the flusher while it writes. */
extern int _PyPerfOutput_AppendLocked(perf_output *out, const char *buf,
                                      size_t len);
/* Raise OSError for the file's last failure (errno set). */
extern void _PyPerfOutput_SetError(const perf_output *out);

typedef int (*perf_lines_handler)(const char *lines, size_t len, void *arg);
/* handle() the complete lines of fd from offset to size, a chunk at a
   time.  Locked. */
extern int _PyPerfFiles_ForEachLineChunk(int fd, off_t offset, off_t size,
                                         perf_lines_handler handle,
                                         void *arg);


/* perf_map.c */

/* Longest symbol name written; longer names are cut with "...". */
#define PERF_MAX_NAME_BYTES 4000
/* With the "..." of a cut name. */
#define PERF_MAX_WRITTEN_NAME_BYTES (PERF_MAX_NAME_BYTES + 3)
/* Room for "<addr> <size> ", the name and "\n". */
#define PERF_MAX_LINE_BYTES (PERF_MAX_NAME_BYTES + 64)

/* Writes a name into a map line, escaped and cut at limit. */
typedef struct {
    char *buf;
    size_t len;
    size_t limit;       /* room for the name, not counting "...\n" */
    int truncated;
} perf_name_writer;

extern void _PyPerfMap_PutAscii(perf_name_writer *w, const Py_UCS1 *s,
                                Py_ssize_t length);
extern void _PyPerfMap_PutUnicode(perf_name_writer *w, PyObject *str);
/* A map line: StartEntry() writes "<addr> <size> " into buf and returns
   the writer for the name; FinishEntry() ends the line and returns its
   length; EndName() adds the "..." of a name that was cut. */
extern perf_name_writer _PyPerfMap_StartEntry(char *buf, const void *addr,
                                              size_t size);
extern void _PyPerfMap_EndName(perf_name_writer *w);
extern size_t _PyPerfMap_FinishEntry(char *buf, perf_name_writer *w);

extern perf_output _PyPerfMap_output;

/* Is the open map the parent's, in a forked child?  Locked. */
extern int _PyPerfMap_IsParentsLocked(void);
/* handle() the map's lines from byte `from` on.  Locked. */
extern int _PyPerfMap_ForEachLineLocked(off_t from, perf_lines_handler handle,
                                        void *arg);
/* A forked child: has it still to copy its parent's lines into its map?
   CopyInherited() copies them and forgets the parent's map.  Locked. */
extern int _PyPerfMap_HasInheritedLocked(void);
extern int _PyPerfMap_CopyInheritedLocked(void);


/* perf_flusher.c */

/* pthread_once() handler: fork handlers and the exit flush. */
extern void _PyPerfFlusher_InstallProcessHooks(void);
/* Wait for the flusher's unlocked write to end.  Locked. */
extern void _PyPerfFlusher_WaitLocked(void);
/* Write out everything pending. */
extern void _PyPerfFlusher_FlushLocked(void);
extern void _PyPerfFlusher_Flush(void);
/* Write out what is pending and end the flusher thread. */
extern void _PyPerfFlusher_Stop(void);
/* Name a new trampoline for co in the map and, with perf_jit, in the
   dump.  Returns -1 with an exception set. */
extern int _PyPerfFlusher_Announce(py_trampoline code, PyCodeObject *co);
/* Buffer the jitdump records of a trampoline named in the map.  Locked. */
extern void _PyPerfFlusher_QueueJitdumpLocked(uintptr_t addr,
                                              const char *name,
                                              size_t name_len);
/* A forked child's first Python frame: it gets its own map and dump with
   its parent's lines, soon (see perf_flusher.c). */
extern void _PyPerfFlusher_ScheduleAdoption(void);
/* Set while entries wait in a process without a flusher: the hook polls
   for every frame, which takes its slow path meanwhile. */
extern _Py_atomic_int _PyPerfFlusher_polls;
static inline int
_PyPerfFlusher_HookPolls(void)
{
    return _Py_atomic_load_relaxed(&_PyPerfFlusher_polls);
}
/* Write the pending entries if they are due (see perf_flusher.c).  With
   the GIL. */
extern void _PyPerfFlusher_Poll(void);
/* From now on this process's entries are written by the flusher thread.
   With the GIL. */
extern void _PyPerfFlusher_UseThread(void);
/* A deferred write that failed and was not reported yet: its output, with
   errno set, and forgotten; or NULL.  The caller reports it. */
extern perf_output *_PyPerfFlusher_TakeError(void);
/* Perf mode is turned on: failures from now on are new losses. */
extern void _PyPerfFlusher_NewSession(void);


/* perf_jit_trampoline.c */

/* The records' sizes (checked there), for buffer sizes here. */
#define PERF_JITDUMP_UNWINDING_BYTES 40
#define PERF_JITDUMP_CODE_LOAD_BYTES 56
/* perf_jit_unwind.c's tables, at most. */
#define PERF_UNWIND_TABLES_BYTES 192
/* The most one trampoline's records take. */
#define PERF_MAX_JITDUMP_BYTES (PERF_JITDUMP_UNWINDING_BYTES \
                                + PERF_UNWIND_TABLES_BYTES + 8 \
                                + PERF_JITDUMP_CODE_LOAD_BYTES \
                                + PERF_MAX_LINE_BYTES)

extern perf_output _PyPerfJit_output;

/* Switch the dump on or off with the backend; -1 with an exception set
   if it cannot be opened. */
extern int _PyPerfJit_SetWanted(int wanted);
/* Queue the records of the trampolines of the map's lines from byte
   `from` on.  Locked. */
extern int _PyPerfJit_AddMapLinesLocked(off_t from);
/* Lines were appended to the map from byte `from` on (a copy): an open
   dump gets the trampolines of ours they name.  Locked. */
extern void _PyPerfJit_AddCopiedLinesLocked(off_t from);
/* The clock of the records (perf record -k 1). */
extern uint64_t _PyPerfJit_Now(void);


/* perf_jit_unwind.c */

/* .eh_frame (a CIE, one FDE, a terminator) then .eh_frame_hdr for the
   template; the same bytes serve every trampoline. */
typedef struct {
    unsigned char data[PERF_UNWIND_TABLES_BYTES];
    size_t size;
    size_t hdr_size;
} perf_unwind_tables;

/* The tables, built on first use; NULL with errno set if the template is
   not the one they describe. */
extern const perf_unwind_tables *_PyPerfUnwind_Tables(void);

#endif  /* PY_HAVE_PERF_TRAMPOLINE */
#endif  /* !Py_PERF_INTERNAL_H */
