/* Deferred entries: perf mode's map lines and jitdump records.

   A write() per new trampoline was most of perf mode's cost where many
   code objects run for the first time (imports, exec).
   perf reads the map when it reports, not when it samples, so perf mode's
   own lines wait in a buffer, and a helper thread writes them out at most
   FLUSH_DELAY_NS after the first of them: a process that never exits
   still gets every line into its map within that delay.  The buffer is
   also written when full, before fork(), at exit(), os._exit() and
   finalization, and when perf mode is turned off, so only a crash or
   SIGKILL can lose the lines of the last 10 ms.  (With 1 ms, an import
   burst cost ten times the context switches: a wakeup and a lock
   handover per millisecond of new code.)  Lines of the
   PyUnstable API go out at once, as in CPython 3.12. */

#include "Python.h"

#ifdef PY_HAVE_PERF_TRAMPOLINE

#include "perf_internal.h"

#include <errno.h>
#include <signal.h>               // pthread_sigmask()
#include <time.h>                 // clock_gettime()

#define PENDING_BYTES (64 * 1024)
#define FLUSH_DELAY_NS (10 * 1000 * 1000)
#define FLUSHER_STACK_SIZE (64 * 1024)

typedef struct {
    char data[PENDING_BYTES];   /* whole entries */
    size_t len;
    int error;                  /* errno of a failed write of them, or 0 */
} pending_buffer;

typedef struct {
    char map[PENDING_BYTES];
    size_t map_len;
    char jitdump[PENDING_BYTES];
    size_t jitdump_len;
} formatting_area;

/* All fields are guarded by the files' lock. */
static struct {
    pending_buffer map;         /* perf map lines */
    pending_buffer jitdump;     /* jitdump records (perf_jit) */
    struct timespec due;        /* when the oldest pending entry is due */
    pthread_cond_t wakeup;      /* new lines, or the flusher must go */
    pthread_t flusher;
    pid_t flusher_owner;        /* the process it runs in; 0: none */
    int flusher_started;        /* it runs its own code (see fork_prepare) */
    int writing;                /* the flusher is writing, unlocked */
    pthread_cond_t written;     /* it has finished */
    int adopt;                  /* a forked child's map is to be filled */
    /* What the flusher is writing: entries copied out of the buffers
       above, which take new entries meanwhile.  Only the flusher uses
       it. */
    struct {
        char map[PENDING_BYTES];
        char jitdump[PENDING_BYTES];
    } in_flight;
    /* Where write_records() formats lines and jitdump records before
       writing them.  One writer uses it at a time: the flusher while
       `writing` is set, or a flush that holds the lock and has waited
       for the flusher. */
    formatting_area formatted;
} pending;

/* perf mode's own lines wait in pending.map as records, and are formatted
   when they are written out: by the flusher, off the thread that made
   the trampoline, or by whoever flushes.  Formatted at once, a line cost
   as much as the rest of a new code object, and all of it in cold code.
   A record is this header and the name.  The name is raw when both
   names are ASCII, "py::<qualname>:<filename>" as it is, control
   characters still to escape (cut after PERF_MAX_NAME_BYTES + 1 bytes,
   enough to tell that the line needs "..."); otherwise it is as the map
   shows it. */
typedef struct {
    uintptr_t addr;
    uint64_t timestamp;     /* when the trampoline was made, for jitdump */
    uint32_t name_len;
    uint32_t name_is_raw;
} line_record;

#define RAW_NAME_CAP (PERF_MAX_NAME_BYTES + 1)
#define MAX_RECORD_BYTES (sizeof(line_record) + PERF_MAX_NAME_BYTES + 8)

static void
init_flusher_conditions(void)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&pending.wakeup, &attr);
    pthread_condattr_destroy(&attr);
    pthread_cond_init(&pending.written, NULL);
}

void
_PyPerfFlusher_WaitLocked(void)
{
    while (pending.writing) {
        pthread_cond_wait(&pending.written, &_PyPerfFiles_mutex);
    }
}

static int
nothing_pending(void)
{
    return pending.map.len == 0 && pending.jitdump.len == 0
           && !pending.adopt;
}

/* A failed write is kept with its buffer and reported by the next
   trampoline made (or at finalization), which turns perf mode off: these
   trampolines stay nameless. */
typedef struct {
    int map;
    int jitdump;
} write_errors;

static void
write_formatted(formatting_area *out, write_errors *err)
{
    if (out->map_len > 0 && err->map == 0
        && _PyPerfMap_AppendLocked(out->map, out->map_len) < 0)
    {
        err->map = errno;
    }
    if (out->jitdump_len > 0 && err->jitdump == 0
        && _PyPerfJit_AppendLocked(out->jitdump, out->jitdump_len) < 0)
    {
        err->jitdump = errno;
    }
    out->map_len = 0;
    out->jitdump_len = 0;
}

/* Format records[0:len] and write them: their lines to the map if to_map,
   their jitdump records to this process's dump if it is open.  Writing
   stops at a file's first error, kept in err. */
static write_errors
write_records(const char *records, size_t len, int to_map, write_errors err)
{
    formatting_area *out = &pending.formatted;
    int to_jitdump = _PyPerfJit_IsOpenHere();
    const char *p = records, *end = records + len;
    while (p < end) {
        line_record record;
        memcpy(&record, p, sizeof(record));
        const char *name = p + sizeof(record);
        p = name + record.name_len;
        if (PENDING_BYTES - out->map_len < PERF_MAX_LINE_BYTES
            || PENDING_BYTES - out->jitdump_len < PERF_MAX_JITDUMP_BYTES)
        {
            write_formatted(out, &err);
        }
        char *line = out->map + out->map_len;
        perf_name_writer w = _PyPerfMap_StartEntry(
            line, (const void *)record.addr, _PyPerfArena_TemplateSize());
        if (record.name_is_raw) {
            _PyPerfMap_PutAscii(&w, (const Py_UCS1 *)name, record.name_len);
        }
        else {
            memcpy(w.buf, name, record.name_len);
            w.len = record.name_len;
        }
        size_t line_len = _PyPerfMap_FinishEntry(line, &w);
        if (to_map) {
            out->map_len += line_len;
        }
        if (to_jitdump) {
            uint64_t made = record.timestamp ? record.timestamp
                                             : _PyPerfJit_Now();
            out->jitdump_len += _PyPerfJit_Encode(
                out->jitdump + out->jitdump_len, record.addr, w.buf,
                w.len - 1, made);
        }
    }
    write_formatted(out, &err);
    return err;
}

/* Write out buffered jitdump records (of a dump being filled from the
   map), then format the buffered line records and write their lines to
   the map (if to_map) and their records to the dump (if open here). */
static write_errors
write_entries(const char *records, size_t records_len, int to_map,
              const char *jitdump_data, size_t jitdump_len)
{
    write_errors err = {0, 0};
    if (jitdump_len > 0
        && _PyPerfJit_AppendLocked(jitdump_data, jitdump_len) < 0)
    {
        err.jitdump = errno;
    }
    return write_records(records, records_len, to_map, err);
}

static void
keep_write_errors_locked(write_errors err)
{
    if (err.map != 0) {
        pending.map.error = err.map;
    }
    if (err.jitdump != 0) {
        pending.jitdump.error = err.jitdump;
    }
}

/* Can the pending lines go to the map?  Not if it cannot be opened (the
   errno is kept, and the lines are lost; the dump still gets its
   records). */
static int
map_writable_locked(void)
{
    if (pending.map.len > 0 && _PyPerfMap_ReadyLocked() < 0) {
        pending.map.error = errno;
        return 0;
    }
    return 1;
}

void
_PyPerfFlusher_FlushLocked(void)
{
    _PyPerfFlusher_WaitLocked();
    int to_map = map_writable_locked();
    keep_write_errors_locked(write_entries(pending.map.data, pending.map.len,
                                           to_map, pending.jitdump.data,
                                           pending.jitdump.len));
    pending.map.len = 0;
    pending.jitdump.len = 0;
}

/* Copy the parent's lines that this forked child has yet to copy into
   its map (and dump).  Caller holds the lock. */
static void
copy_inherited_lines_locked(void)
{
    if (!_PyPerfMap_HasInheritedLocked()) {
        return;
    }
    off_t from = _PyPerfMap_SizeLocked();
    if (_PyPerfMap_CopyInheritedLocked() < 0) {
        pending.map.error = errno;
    }
    else if (_PyPerfJit_IsOpenHere()
             && _PyPerfJit_AddMapLinesLocked(from) < 0)
    {
        pending.jitdump.error = errno;
    }
}

/* A forked child that has run Python for FLUSH_DELAY_NS (a worker, not a
   child about to exec or exit) gets its own map and dump with its
   parent's lines, naming the trampolines it inherited, which may be on
   its stack: a perf attached to it later (perf record -p) reads only the
   child's map.  Until then, and in a child that never gets there, perf
   names them from the parent's map (a profile that saw the fork clones
   the parent's mappings).  Errors are kept with the buffers.  Called by
   the flusher with the lock. */
static void
adopt_parent_lines_locked(void)
{
    pending.adopt = 0;
    if (_PyPerfMap_ReadyLocked() < 0) {
        pending.map.error = errno;
        return;
    }
    if (_PyPerfJit_IsWanted() && _PyPerfJit_ReadyLocked() < 0) {
        pending.jitdump.error = errno;
    }
    copy_inherited_lines_locked();
}

/* The flusher's regular write.  It copies the due entries out, and formats
   and writes them without the lock, so that a thread making a trampoline
   meanwhile waits neither for the formatting nor for the disk;
   pending.writing holds off every other use of the files until it is
   done.  Called and returns with the lock. */
static void
write_due_entries_locked(void)
{
    if (pending.adopt) {
        adopt_parent_lines_locked();
    }
    int to_map = map_writable_locked();
    size_t map_len = pending.map.len;
    size_t jitdump_len = pending.jitdump.len;
    memcpy(pending.in_flight.map, pending.map.data, map_len);
    memcpy(pending.in_flight.jitdump, pending.jitdump.data, jitdump_len);
    pending.map.len = 0;
    pending.jitdump.len = 0;
    pending.writing = 1;
    pthread_mutex_unlock(&_PyPerfFiles_mutex);
    write_errors err = write_entries(pending.in_flight.map, map_len, to_map,
                                     pending.in_flight.jitdump, jitdump_len);
    pthread_mutex_lock(&_PyPerfFiles_mutex);
    pending.writing = 0;
    keep_write_errors_locked(err);
    pthread_cond_broadcast(&pending.written);
}

/* A buffer's failed write, now reported: returns its errno (0 if none)
   and forgets it. */
static int
take_error_locked(pending_buffer *buffer)
{
    int err = buffer->error;
    buffer->error = 0;
    return err;
}

void
_PyPerfFlusher_Flush(void)
{
    _PyPerfFiles_Lock();
    _PyPerfFlusher_FlushLocked();
    _PyPerfFiles_Unlock();
}

static int
is_designated_flusher(void)
{
    return pending.flusher_owner == _PyPerfFiles_Pid()
           && pthread_equal(pending.flusher, pthread_self());
}

static void *
flusher_main(void *Py_UNUSED(arg))
{
    pthread_mutex_lock(&_PyPerfFiles_mutex);
    pending.flusher_started = 1;
    pthread_cond_broadcast(&pending.written);
    while (is_designated_flusher()) {
        if (nothing_pending()) {
            pthread_cond_wait(&pending.wakeup, &_PyPerfFiles_mutex);
        }
        else if (pthread_cond_timedwait(&pending.wakeup, &_PyPerfFiles_mutex,
                                        &pending.due) == ETIMEDOUT) {
            write_due_entries_locked();
        }
    }
    _PyPerfFlusher_FlushLocked();
    pthread_mutex_unlock(&_PyPerfFiles_mutex);
    return NULL;
}

/* Make sure this process has a flusher.  Returns -1 if no thread can be
   started; lines are then written at once. */
static int
start_flusher_locked(void)
{
    if (pending.flusher_owner == _PyPerfFiles_Pid()) {
        return 0;
    }
    /* The helper never runs signal handlers: it inherits a full mask. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, FLUSHER_STACK_SIZE);
    pending.flusher_started = 0;
    int err = pthread_create(&pending.flusher, &attr, flusher_main, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0) {
        return -1;
    }
    (void)pthread_setname_np(pending.flusher, "perf-map-flush");
    pending.flusher_owner = _PyPerfFiles_Pid();
    return 0;
}

/* Tell the flusher to write what is pending and end; wait for it. */
void
_PyPerfFlusher_Stop(void)
{
    pthread_mutex_lock(&_PyPerfFiles_mutex);
    int running = (pending.flusher_owner == _PyPerfFiles_Pid());
    pthread_t flusher = pending.flusher;
    pending.flusher_owner = 0;
    pthread_cond_broadcast(&pending.wakeup);
    pthread_mutex_unlock(&_PyPerfFiles_mutex);
    if (running) {
        pthread_join(flusher, NULL);
    }
}

/* fork(): the parent's lines go into the parent's map first, and no
   thread holds the lock across the fork.  The child has no flusher.  A
   child that forks before it copied its own parent's lines (see
   adopt_parent_lines_locked) copies them now: its child could not. */
static void
fork_prepare(void)
{
    _PyPerfFiles_Lock();
    /* Not while the flusher is still starting: the C library (or a
       sanitizer's runtime, which has no fork handlers) may hold locks of
       its own in that thread, which the child would inherit held. */
    while (pending.flusher_owner == _PyPerfFiles_Pid()
           && !pending.flusher_started)
    {
        pthread_cond_wait(&pending.written, &_PyPerfFiles_mutex);
    }
    _PyPerfFlusher_FlushLocked();
    if (_PyPerfMap_IsOpenHere()) {
        copy_inherited_lines_locked();
    }
}

static void
fork_parent(void)
{
    pthread_mutex_unlock(&_PyPerfFiles_mutex);
}

static void
fork_child(void)
{
    _PyPerfFiles_RefreshPid();
    pending.flusher_owner = 0;
    pending.adopt = 0;              /* the child's first frame decides */
    init_flusher_conditions();      /* it may have had the flusher waiting */
    pthread_mutex_unlock(&_PyPerfFiles_mutex);
    _PyPerfTrampoline_AfterFork();
}

void
_PyPerfFlusher_InstallProcessHooks(void)
{
    _PyPerfFiles_RefreshPid();
    init_flusher_conditions();
    (void)pthread_atfork(fork_prepare, fork_parent, fork_child);
    (void)atexit(_PyPerfFlusher_Flush);
}

/* The first entries since the last write: the flusher writes them
   FLUSH_DELAY_NS from now. */
static void
set_due_time_locked(void)
{
    clock_gettime(CLOCK_MONOTONIC, &pending.due);
    pending.due.tv_nsec += FLUSH_DELAY_NS;
    if (pending.due.tv_nsec >= 1000000000) {
        pending.due.tv_sec++;
        pending.due.tv_nsec -= 1000000000;
    }
    pthread_cond_broadcast(&pending.wakeup);
}

/* Have the flusher run FLUSH_DELAY_NS from now, unless something is
   pending already.  Returns -1 if no flusher can be started.  Caller
   holds the lock. */
static int
schedule_flusher_locked(void)
{
    if (start_flusher_locked() < 0) {
        return -1;
    }
    if (nothing_pending()) {
        set_due_time_locked();
    }
    return 0;
}

/* Make room for len more bytes in buffer, and start the flush delay if
   nothing is pending yet.  Returns -1 if no flusher can be started: the
   caller then writes the entries itself.  Caller holds the lock. */
static int
make_room_locked(pending_buffer *buffer, size_t len)
{
    if (buffer->len + len > PENDING_BYTES) {
        _PyPerfFlusher_FlushLocked();
    }
    return schedule_flusher_locked();
}

/* Buffer the records of a trampoline named in the map: filling a dump.
   They are encoded in place (a trampoline's records are too big for the
   C stack of a small thread).  A failed write is kept with the buffer.
   Caller holds the lock. */
void
_PyPerfFlusher_QueueJitdumpLocked(uintptr_t addr, const char *name,
                                  size_t name_len)
{
    int no_flusher = make_room_locked(&pending.jitdump,
                                      PERF_MAX_JITDUMP_BYTES) < 0;
    pending.jitdump.len += _PyPerfJit_Encode(
        pending.jitdump.data + pending.jitdump.len, addr, name, name_len,
        _PyPerfJit_Now());
    if (no_flusher) {
        _PyPerfFlusher_FlushLocked();
    }
}

/* A forked child's first Python frame in perf mode: if it still runs
   FLUSH_DELAY_NS from now, its flusher gives it its own map with its
   parent's lines (adopt_parent_lines_locked).  A child that execs or
   exits before (most do: subprocess, multiprocessing's short tasks)
   copies nothing and leaves no file unless it made trampolines.  With no
   flusher, the copy is made now. */
void
_PyPerfFlusher_ScheduleAdoption(void)
{
    pthread_mutex_lock(&_PyPerfFiles_mutex);
    if (_PyPerfMap_IsParentsLocked()) {
        if (schedule_flusher_locked() < 0) {
            _PyPerfFlusher_WaitLocked();
            adopt_parent_lines_locked();
        }
        else {
            pending.adopt = 1;
        }
    }
    pthread_mutex_unlock(&_PyPerfFiles_mutex);
}

static int
is_ascii_str(PyObject *str)
{
    return str != NULL && PyUnicode_Check(str) && PyUnicode_IS_READY(str)
           && PyUnicode_IS_ASCII(str);
}

/* Append n bytes of s to a raw name of *len bytes, up to RAW_NAME_CAP. */
static inline void
add_raw(char *name, size_t *len, const void *s, size_t n)
{
    size_t room = RAW_NAME_CAP - *len;
    if (n > room) {
        n = room;
    }
    memcpy(name + *len, s, n);
    *len += n;
}

/* The name part of a record for a code object: returns its length. */
static size_t
put_record_name(char *name, PyCodeObject *co, uint32_t *is_raw)
{
    PyObject *qualname = co->co_qualname, *filename = co->co_filename;
    if (is_ascii_str(qualname) && is_ascii_str(filename)) {
        size_t len = 0;
        add_raw(name, &len, "py::", 4);
        add_raw(name, &len, PyUnicode_1BYTE_DATA(qualname),
                (size_t)PyUnicode_GET_LENGTH(qualname));
        add_raw(name, &len, ":", 1);
        add_raw(name, &len, PyUnicode_1BYTE_DATA(filename),
                (size_t)PyUnicode_GET_LENGTH(filename));
        *is_raw = 1;
        return len;
    }
    perf_name_writer w = {name, 0, PERF_MAX_NAME_BYTES, 0};
    _PyPerfMap_PutAscii(&w, (const Py_UCS1 *)"py::", 4);
    _PyPerfMap_PutUnicode(&w, qualname);
    _PyPerfMap_PutAscii(&w, (const Py_UCS1 *)":", 1);
    _PyPerfMap_PutUnicode(&w, filename);
    _PyPerfMap_EndName(&w);
    *is_raw = 0;
    return w.len;
}

/* Buffer the record of a new trampoline for co.  Write errors (of a full
   buffer, or with no flusher) are kept with the buffers.  Caller holds
   the lock and the GIL, and has checked that the files are ready. */
static void
queue_code_record_locked(py_trampoline code, PyCodeObject *co)
{
    int no_flusher = make_room_locked(&pending.map, MAX_RECORD_BYTES) < 0;
    line_record record = {(uintptr_t)code,
                          _PyPerfJit_IsWanted() ? _PyPerfJit_Now() : 0, 0, 0};
    char *at = pending.map.data + pending.map.len;
    record.name_len = (uint32_t)put_record_name(at + sizeof(record), co,
                                                &record.name_is_raw);
    memcpy(at, &record, sizeof(record));
    pending.map.len += sizeof(record) + record.name_len;
    if (no_flusher) {
        _PyPerfFlusher_FlushLocked();
    }
}

/* A write of earlier entries that failed: -1 (map) or -2 (dump) with
   errno set, or 0. */
static int
take_write_error_locked(void)
{
    int err = take_error_locked(&pending.map);
    if (err != 0) {
        errno = err;
        return -1;
    }
    err = take_error_locked(&pending.jitdump);
    if (err != 0) {
        _PyPerfJit_AbandonLocked();
        errno = err;
        return -2;
    }
    return 0;
}

/* Are the map and, with perf_jit, this process's dump ready for a new
   trampoline's entries?  0, or -1 (map) or -2 (dump) with errno set. */
static int
outputs_ready_locked(void)
{
    int res = take_write_error_locked();
    if (res < 0) {
        return res;
    }
    if (_PyPerfMap_ReadyLocked() < 0) {
        return -1;
    }
    if (_PyPerfJit_IsWanted() && _PyPerfJit_ReadyLocked() < 0) {
        return -2;
    }
    return 0;
}

/* Name a new trampoline in the map and, with perf_jit, in the dump: before
   its first use, as a sample may land in it right away (perf reads them
   when it reports).  Returns -1 with an exception set on failure. */
int
_PyPerfFlusher_Announce(py_trampoline code, PyCodeObject *co)
{
    pthread_mutex_lock(&_PyPerfFiles_mutex);
    int failed = outputs_ready_locked();
    if (failed == 0) {
        queue_code_record_locked(code, co);
        failed = take_write_error_locked();     /* of a write just made */
    }
    _PyPerfFiles_Unlock();      /* keeps errno */
    /* Exceptions only outside the lock: making one may run a finalizer,
       and Python code may need the lock. */
    if (failed == -1) {
        _PyPerfMap_SetError();
    }
    else if (failed == -2) {
        _PyPerfJit_SetError();
    }
    return failed < 0 ? -1 : 0;
}

void
_PyPerfFlusher_TakeErrors(int *map_error, int *jitdump_error)
{
    _PyPerfFiles_Lock();
    *map_error = take_error_locked(&pending.map);
    *jitdump_error = take_error_locked(&pending.jitdump);
    _PyPerfFiles_Unlock();
}

#endif  /* PY_HAVE_PERF_TRAMPOLINE */
