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
   PyUnstable API go out at once, as in CPython 3.12.

   A short process has no flusher.  A second thread costs a process more
   than its start (measured on `python -c pass`: 3% of its wall time,
   1 ms of CPU, in kernel time for the shared address space and in
   glibc's malloc, which leaves its single-thread fast path for good), and
   most processes that run with PYTHONPERFSUPPORT=1 set for a whole CI
   job live a few tens of milliseconds.  So for its first THREAD_AFTER_NS
   in perf mode a process writes its entries itself: while any are
   pending, every Python frame takes the hook's slow path, which polls
   (_PyPerfFlusher_Poll) and writes them once they are due.  A young
   process that stops running Python frames (a call-free loop, a blocking
   call) keeps them until it runs one again, forks, execs or exits.  A
   sub-interpreter in perf mode gets the thread: it may end while no
   frame of the others goes through the hook. */

#include "Python.h"

#ifdef PY_HAVE_PERF_TRAMPOLINE

#include "perf_internal.h"

#include <errno.h>
#include <signal.h>               // pthread_sigmask()
#include <time.h>                 // clock_gettime()

#define PENDING_BYTES (64 * 1024)
#define FLUSH_DELAY_NS (10 * 1000 * 1000)
#define FLUSHER_STACK_SIZE (64 * 1024)
#define THREAD_AFTER_NS (100 * 1000 * 1000)

/* The outputs (perf_internal.h), in the order their entries are
   written. */
enum { MAP, DUMP, N_OUTPUTS };
static perf_output *const outputs[N_OUTPUTS] = {
    &_PyPerfMap_output, &_PyPerfJit_output,
};

typedef struct {
    char data[PENDING_BYTES];   /* whole entries */
    size_t len;
} entry_buffer;

/* All fields are guarded by the files' lock. */
static struct {
    entry_buffer records;       /* new trampolines, for every output */
    entry_buffer dump_fill;     /* jitdump records of trampolines the map
                                   names already: a new dump being filled */
    struct timespec due;        /* when the oldest pending entry is due */
    pthread_cond_t wakeup;      /* new lines, or the flusher must go */
    pthread_t flusher;
    pid_t flusher_owner;        /* the process it runs in; 0: none */
    int flusher_started;        /* it runs its own code (see fork_prepare) */
    int writing;                /* the flusher is writing, unlocked */
    pthread_cond_t written;     /* it has finished */
    int adopt;                  /* a forked child's map is to be filled */
    struct timespec since;      /* perf mode's start in this process */
    int use_thread;             /* from the start: sub-interpreters */
    /* What the flusher is writing: entries copied out of the buffers
       above, which take new entries meanwhile.  Only the flusher uses
       it. */
    struct {
        char records[PENDING_BYTES];
        char dump_fill[PENDING_BYTES];
    } in_flight;
    /* Where write_records() puts a record's name as the map shows it, and
       encodes each output's entries before writing them.  One writer uses
       them at a time: the flusher while `writing` is set, or a flush that
       holds the lock and has waited for the flusher. */
    char name[PERF_MAX_NAME_BYTES + 4];
    entry_buffer encoded[N_OUTPUTS];
} pending;

/* perf mode's own lines wait in pending.records, and are formatted
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
    _PyPerfFiles_ASSERT_LOCKED();
    while (pending.writing) {
        pthread_cond_wait(&pending.written, &_PyPerfFiles_mutex);
    }
}

static int
nothing_pending(void)
{
    return pending.records.len == 0 && pending.dump_fill.len == 0
           && !pending.adopt;
}

/* The errnos of one write's failures, per output.  They are kept in the
   outputs (once the lock is held again, for the flusher), and reported
   by the next trampoline made (or at finalization), which turns perf
   mode off: these trampolines stay nameless. */
typedef struct {
    int of[N_OUTPUTS];
} write_errors;

static void
write_encoded(int i, write_errors *err)
{
    entry_buffer *area = &pending.encoded[i];
    if (area->len > 0 && err->of[i] == 0
        && _PyPerfOutput_AppendLocked(outputs[i], area->data, area->len) < 0)
    {
        err->of[i] = errno;
    }
    area->len = 0;
}

/* Put the record's name as the map shows it into pending.name: a raw name
   is escaped and cut now.  Returns its length. */
static size_t
put_display_name(const line_record *record, const char *name)
{
    if (!record->name_is_raw) {
        assert(record->name_len <= sizeof(pending.name));
        memcpy(pending.name, name, record->name_len);
        return record->name_len;
    }
    perf_name_writer w = {pending.name, 0, PERF_MAX_NAME_BYTES, 0};
    _PyPerfMap_PutAscii(&w, (const Py_UCS1 *)name, record->name_len);
    _PyPerfMap_EndName(&w);
    return w.len;
}

/* Encode records[0:len] for the outputs `to` selects and write them.
   Writing stops at an output's first error, kept in err. */
static void
write_records(const char *records, size_t len, const int to[N_OUTPUTS],
              write_errors *err)
{
    const char *p = records, *end = records + len;
    while (p < end) {
        line_record record;
        memcpy(&record, p, sizeof(record));
        const char *name = p + sizeof(record);
        p = name + record.name_len;
        size_t name_len = put_display_name(&record, name);
        for (int i = 0; i < N_OUTPUTS; i++) {
            if (!to[i]) {
                continue;
            }
            entry_buffer *area = &pending.encoded[i];
            if (PENDING_BYTES - area->len < outputs[i]->max_entry) {
                write_encoded(i, err);
            }
            size_t n = outputs[i]->encode(area->data + area->len,
                                          record.addr, pending.name,
                                          name_len, record.timestamp);
            assert(n <= outputs[i]->max_entry);
            area->len += n;
        }
    }
    for (int i = 0; i < N_OUTPUTS; i++) {
        write_encoded(i, err);
    }
}

/* Write out the records of a dump being filled, then the new
   trampolines' entries. */
static void
write_entries(const char *records, size_t records_len,
              const char *dump_fill, size_t dump_fill_len,
              const int to[N_OUTPUTS], write_errors *err)
{
    if (dump_fill_len > 0
        && _PyPerfOutput_AppendLocked(outputs[DUMP], dump_fill,
                                      dump_fill_len) < 0)
    {
        err->of[DUMP] = errno;
    }
    write_records(records, records_len, to, err);
}

static void
keep_write_errors_locked(const write_errors *err)
{
    for (int i = 0; i < N_OUTPUTS; i++) {
        if (err->of[i] != 0) {
            outputs[i]->error = err->of[i];
        }
    }
}

/* Which outputs get the pending records.  The map gets them, opened if
   need be (if it cannot be, its errno is kept and the lines are lost;
   the dump still gets its records); the dump only if it is open here:
   perf_jit may have been turned off since they were made. */
static void
choose_outputs_locked(int to[N_OUTPUTS])
{
    to[MAP] = 1;
    if (pending.records.len > 0 && outputs[MAP]->ready_locked() < 0) {
        outputs[MAP]->error = errno;
        to[MAP] = 0;
    }
    to[DUMP] = _PyPerfOutput_IsOpenHere(outputs[DUMP]);
}

void
_PyPerfFlusher_FlushLocked(void)
{
    _PyPerfFiles_ASSERT_LOCKED();
    _PyPerfFlusher_WaitLocked();
    int to[N_OUTPUTS];
    choose_outputs_locked(to);
    write_errors err = {{0}};
    write_entries(pending.records.data, pending.records.len,
                  pending.dump_fill.data, pending.dump_fill.len, to, &err);
    keep_write_errors_locked(&err);
    pending.records.len = 0;
    pending.dump_fill.len = 0;
}

/* Copy the parent's lines that this forked child has yet to copy into
   its map (and dump).  Caller holds the lock. */
static void
copy_inherited_lines_locked(void)
{
    _PyPerfFiles_ASSERT_LOCKED();
    if (!_PyPerfMap_HasInheritedLocked()) {
        return;
    }
    off_t from = outputs[MAP]->size;
    if (_PyPerfMap_CopyInheritedLocked() < 0) {
        outputs[MAP]->error = errno;
    }
    _PyPerfJit_AddCopiedLinesLocked(from);
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
    _PyPerfFiles_ASSERT_LOCKED();
    pending.adopt = 0;
    for (int i = 0; i < N_OUTPUTS; i++) {
        perf_output *out = outputs[i];
        if (out->wanted && out->ready_locked() < 0) {
            out->error = errno;
            if (i == MAP) {
                return;     /* nothing to copy into */
            }
        }
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
    int to[N_OUTPUTS];
    choose_outputs_locked(to);
    size_t records_len = pending.records.len;
    size_t dump_fill_len = pending.dump_fill.len;
    memcpy(pending.in_flight.records, pending.records.data, records_len);
    memcpy(pending.in_flight.dump_fill, pending.dump_fill.data,
           dump_fill_len);
    pending.records.len = 0;
    pending.dump_fill.len = 0;
    pending.writing = 1;
    pthread_mutex_unlock(&_PyPerfFiles_mutex);
    write_errors err = {{0}};
    write_entries(pending.in_flight.records, records_len,
                  pending.in_flight.dump_fill, dump_fill_len, to, &err);
    pthread_mutex_lock(&_PyPerfFiles_mutex);
    pending.writing = 0;
    keep_write_errors_locked(&err);
    pthread_cond_broadcast(&pending.written);
}

/* A deferred write that failed, to be reported now: returns the first
   failing output whose loss was not reported yet, with errno set to its
   error, or NULL.  Only that error is taken; another output's stays for
   the next call, so that each loss is reported once.  An output that
   restarts after an error is closed, to start anew. */
static perf_output *
take_error_locked(void)
{
    _PyPerfFiles_ASSERT_LOCKED();
    for (int i = 0; i < N_OUTPUTS; i++) {
        perf_output *out = outputs[i];
        if (out->error == 0) {
            continue;
        }
        if (out->restart_after_error) {
            out->close_locked();
            out->owner = 0;
        }
        /* After the close: it writes what is pending, which fails too. */
        int err = out->error;
        out->error = 0;
        if (out->lost) {
            continue;
        }
        out->lost = err;
        errno = err;
        return out;
    }
    errno = 0;
    return NULL;
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
    /* The copy queues the dump's records: the flush writes them.  Nothing
       may be left for the child, which would write it to our dump. */
    if (_PyPerfOutput_IsOpenHere(outputs[MAP])) {
        copy_inherited_lines_locked();
    }
    _PyPerfFlusher_FlushLocked();
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
    clock_gettime(CLOCK_MONOTONIC, &pending.since);
    pending.flusher_owner = 0;
    pending.adopt = 0;              /* the child's first frame decides */
    init_flusher_conditions();      /* it may have had the flusher waiting */
    /* A failed write was the parent's, to its files: the parent reports
       it. */
    for (int i = 0; i < N_OUTPUTS; i++) {
        outputs[i]->error = 0;
        outputs[i]->lost = 0;
    }
    pthread_mutex_unlock(&_PyPerfFiles_mutex);
    _PyPerfHook_AfterFork();
}

void
_PyPerfFlusher_InstallProcessHooks(void)
{
    _PyPerfFiles_RefreshPid();
    clock_gettime(CLOCK_MONOTONIC, &pending.since);
    init_flusher_conditions();
    (void)pthread_atfork(fork_prepare, fork_parent, fork_child);
    (void)atexit(_PyPerfFlusher_Flush);
}

static uint64_t
timespec_ns(const struct timespec *ts)
{
    return (uint64_t)ts->tv_sec * 1000000000 + (uint64_t)ts->tv_nsec;
}

static int64_t
ns_between(const struct timespec *from, const struct timespec *to)
{
    return (int64_t)(timespec_ns(to) - timespec_ns(from));
}

/* The first entries since the last write are due FLUSH_DELAY_NS after
   now. */
static void
set_due_time_locked(const struct timespec *now)
{
    pending.due = *now;
    pending.due.tv_nsec += FLUSH_DELAY_NS;
    if (pending.due.tv_nsec >= 1000000000) {
        pending.due.tv_sec++;
        pending.due.tv_nsec -= 1000000000;
    }
    pthread_cond_broadcast(&pending.wakeup);
}

_Py_atomic_int _PyPerfFlusher_polls;

/* pending.due in nanoseconds, for the hook's polls, which compare it with
   the clock without the lock.  (uintptr_t: 64 bits on the platforms perf
   support builds for.) */
static _Py_atomic_address poll_due_ns;

/* Caller holds the lock. */
static void
set_hook_polls(int polls)
{
    _Py_atomic_store_relaxed(&poll_due_ns,
                             (uintptr_t)timespec_ns(&pending.due));
    _Py_atomic_store_relaxed(&_PyPerfFlusher_polls, polls);
    if (polls) {
        _PyPerfHook_LeaveFastPath();
    }
}

/* Does this process write its entries itself (without a flusher)? */
static int
is_young_locked(const struct timespec *now)
{
    return pending.flusher_owner != _PyPerfFiles_Pid() && !pending.use_thread
           && ns_between(&pending.since, now) < THREAD_AFTER_NS;
}

/* Have the pending entries written FLUSH_DELAY_NS from now, unless some
   are pending already: by the hook in a process young in perf mode, by
   the flusher (started if need be) in an older one.  Returns -1 if no
   flusher can be started.  Caller holds the lock. */
static int
schedule_flusher_locked(void)
{
    if (!nothing_pending()) {
        return 0;
    }
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    int young = is_young_locked(&now);
    if (!young && start_flusher_locked() < 0) {
        return -1;
    }
    set_due_time_locked(&now);
    if (young) {
        set_hook_polls(1);
    }
    return 0;
}

/* The pending entries of a process without a flusher: written once due,
   or handed to a flusher once the process is no longer young.  Called by
   the hook, with the GIL, for each frame while it polls; stops its polls
   when nothing is left to write.  The coarse clock costs a few
   nanoseconds (a few hundred frames poll in `python -c pass`) and may be
   a tick (4 ms) late. */
void
_PyPerfFlusher_Poll(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
    if (timespec_ns(&now) < (uint64_t)_Py_atomic_load_relaxed(&poll_due_ns)) {
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &now);
    pthread_mutex_lock(&_PyPerfFiles_mutex);
    if (pending.flusher_owner != _PyPerfFiles_Pid() && !nothing_pending()) {
        if (!is_young_locked(&now) && start_flusher_locked() == 0) {
            pthread_cond_broadcast(&pending.wakeup);  /* it takes them */
        }
        else if (ns_between(&pending.due, &now) >= 0) {
            if (pending.adopt) {
                adopt_parent_lines_locked();
            }
            _PyPerfFlusher_FlushLocked();
        }
    }
    if (pending.flusher_owner == _PyPerfFiles_Pid() || nothing_pending()) {
        set_hook_polls(0);
    }
    pthread_mutex_unlock(&_PyPerfFiles_mutex);
}

void
_PyPerfFlusher_UseThread(void)
{
    pthread_mutex_lock(&_PyPerfFiles_mutex);
    pending.use_thread = 1;
    if (!nothing_pending() && start_flusher_locked() == 0) {
        set_hook_polls(0);
        pthread_cond_broadcast(&pending.wakeup);
    }
    pthread_mutex_unlock(&_PyPerfFiles_mutex);
}

/* Make room for len more bytes in buffer, and start the flush delay if
   nothing is pending yet.  Returns -1 if no flusher can be started: the
   caller then writes the entries itself.  Caller holds the lock. */
static int
make_room_locked(entry_buffer *buffer, size_t len)
{
    _PyPerfFiles_ASSERT_LOCKED();
    if (buffer->len + len > PENDING_BYTES) {
        _PyPerfFlusher_FlushLocked();
    }
    assert(buffer->len + len <= PENDING_BYTES);
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
    _PyPerfFiles_ASSERT_LOCKED();
    entry_buffer *fill = &pending.dump_fill;
    assert(name_len <= PERF_MAX_WRITTEN_NAME_BYTES);
    int no_flusher = make_room_locked(fill, PERF_MAX_JITDUMP_BYTES) < 0;
    size_t len = outputs[DUMP]->encode(fill->data + fill->len, addr, name,
                                       name_len, _PyPerfJit_Now());
    assert(len <= PERF_MAX_JITDUMP_BYTES);
    fill->len += len;
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
    _PyPerfFiles_ASSERT_LOCKED();
    int no_flusher = make_room_locked(&pending.records,
                                      MAX_RECORD_BYTES) < 0;
    line_record record = {(uintptr_t)code,
                          outputs[DUMP]->wanted ? _PyPerfJit_Now() : 0, 0, 0};
    char *at = pending.records.data + pending.records.len;
    record.name_len = (uint32_t)put_record_name(at + sizeof(record), co,
                                                &record.name_is_raw);
    memcpy(at, &record, sizeof(record));
    pending.records.len += sizeof(record) + record.name_len;
    if (no_flusher) {
        _PyPerfFlusher_FlushLocked();
    }
}

/* Are the outputs perf mode writes ready for a new trampoline's entries?
   NULL, or the output that is not (errno set). */
static perf_output *
outputs_ready_locked(void)
{
    perf_output *failed = take_error_locked();
    if (failed != NULL) {
        return failed;
    }
    for (int i = 0; i < N_OUTPUTS; i++) {
        perf_output *out = outputs[i];
        if (!out->wanted) {
            continue;
        }
        if (out->lost) {
            errno = out->lost;      /* a loss told already stops them all */
            return out;
        }
        if (out->ready_locked() < 0) {
            /* Reported by the caller: what fails with it is the same
               loss. */
            out->lost = errno;
            return out;
        }
    }
    return NULL;
}

/* Name a new trampoline in the map and, with perf_jit, in the dump: before
   its first use, as a sample may land in it right away (perf reads them
   when it reports).  Returns -1 with an exception set on failure. */
int
_PyPerfFlusher_Announce(py_trampoline code, PyCodeObject *co)
{
    pthread_mutex_lock(&_PyPerfFiles_mutex);
    perf_output *failed = outputs_ready_locked();
    if (failed == NULL) {
        queue_code_record_locked(code, co);
        failed = take_error_locked();     /* of a write just made */
    }
    _PyPerfFiles_Unlock();      /* keeps errno */
    /* Exceptions only outside the lock: making one may run a finalizer,
       and Python code may need the lock. */
    if (failed != NULL) {
        _PyPerfOutput_SetError(failed);
        return -1;
    }
    return 0;
}

perf_output *
_PyPerfFlusher_TakeError(void)
{
    _PyPerfFiles_Lock();
    perf_output *failed = take_error_locked();
    _PyPerfFiles_Unlock();
    return failed;
}

void
_PyPerfFlusher_NewSession(void)
{
    _PyPerfFiles_Lock();
    for (int i = 0; i < N_OUTPUTS; i++) {
        outputs[i]->lost = 0;
    }
    _PyPerfFiles_Unlock();
}

#endif  /* PY_HAVE_PERF_TRAMPOLINE */
