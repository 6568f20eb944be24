/* Perf trampolines: Python functions in the Linux perf profiler.

   perf walks native stacks, so a Python function is invisible to it: all
   Python frames run inside the same C function, _PyEval_EvalFrameDefault().
   In perf mode every code object gets its own copy of a tiny assembly
   trampoline (Python/asm_trampoline.S) that only calls the evaluator.  The
   PEP 523 eval-frame hook evaluates each frame through its code object's
   trampoline, so each Python frame owns a distinct native return address,
   and /tmp/perf-<pid>.map tells perf the name of each trampoline:

       <hex start> <hex size> py::<qualname>:<filename>

   Memory: trampolines live in mmap'd arenas that are filled with copies of
   the template while writable and then made read+execute (never W+X).
   Arenas are never unmapped: a frame may still return into a trampoline
   after perf mode was turned off, and code objects (static ones, leaked
   ones) can outlive an interpreter.  Since every trampoline is the same
   code, a stale pointer into an arena still behaves correctly.

   The map file is written one whole line per write(); a failed or short
   write is truncated away, so the file only ever holds complete lines.
   All state here is process-wide and protected by the GIL, except the map
   file, which has its own lock. */

#include "Python.h"
#include "pycore_frame.h"         // _PyInterpreterFrame
#include "pycore_initconfig.h"    // _Py_GetEnv()
#include "pycore_interp.h"        // PyInterpreterState.co_extra_freefuncs
#include "pycore_perf_trampoline.h"
#include "pycore_pystate.h"       // _PyThreadState_GET()

#include <errno.h>

/* -X perf, or PYTHONPERFSUPPORT set to a positive integer (read the same
   way where perf support is not built, to warn that it is missing). */
static int
perf_requested(const PyConfig *config)
{
    for (Py_ssize_t i = 0; i < config->xoptions.length; i++) {
        const wchar_t *opt = config->xoptions.items[i];
        if (wcscmp(opt, L"perf") == 0 || wcsncmp(opt, L"perf=", 5) == 0) {
            return 1;
        }
    }
    const char *env = _Py_GetEnv(config->use_environment,
                                 "PYTHONPERFSUPPORT");
    if (env == NULL) {
        return 0;
    }
    char *end;
    errno = 0;
    long value = strtol(env, &end, 10);
    if (errno != 0 || end == env || *end != '\0' || value < 0) {
        fprintf(stderr, "python: PYTHONPERFSUPPORT=%s is not a "
                "non-negative integer; perf support stays off\n", env);
        return 0;
    }
    return value > 0;
}

#ifdef PY_HAVE_PERF_TRAMPOLINE

#include <fcntl.h>                // open()
#include <pthread.h>
#include <signal.h>               // pthread_sigmask()
#include <stdio.h>
#include <time.h>                 // clock_gettime()
#include <sys/mman.h>             // mmap()
#include <sys/stat.h>             // fstat()
#include <unistd.h>               // write(), getpid()

typedef PyObject *(*py_evaluator)(PyThreadState *, _PyInterpreterFrame *,
                                  int throwflag);
typedef PyObject *(*py_trampoline)(PyThreadState *, _PyInterpreterFrame *,
                                   int throwflag, py_evaluator);

/* getpid() is a system call (glibc stopped caching it), and arenas and
   the map need the pid for every new trampoline, to notice a fork that
   skipped PyOS_AfterFork_Child().  A fork handler keeps a copy.  The
   process hooks are installed once, on first use; the fork and exit
   handlers also write out deferred map lines (see below). */
static pid_t cached_pid;
static pthread_once_t process_hooks_once = PTHREAD_ONCE_INIT;

static void fork_prepare(void);
static void fork_parent(void);
static void fork_child(void);
static void init_flusher_wakeup(void);
static void flush_pending(void);

static void
refresh_pid(void)
{
    cached_pid = getpid();
}

static void
install_process_hooks(void)
{
    refresh_pid();
    init_flusher_wakeup();
    (void)pthread_atfork(fork_prepare, fork_parent, fork_child);
    (void)atexit(flush_pending);
}

static pid_t
current_pid(void)
{
    pthread_once(&process_hooks_once, install_process_hooks);
    return cached_pid;
}

/* The template, from Python/asm_trampoline.S. */

extern const char _Py_trampoline_func_start[];
extern const char _Py_trampoline_func_end[];

/* Each trampoline starts on its own 16-byte boundary. */
#define TRAMPOLINE_ALIGN 16

/* Arenas start small (a plain script uses a few hundred code objects) and
   double up to a cap, so a program with a million code objects needs only
   a few dozen mappings. */
#define ARENA_MIN_SIZE (64 * 1024)
#define ARENA_MAX_SIZE (4 * 1024 * 1024)

typedef struct {
    pid_t owner;        /* the process that mapped the current arena */
    char *next;         /* next free trampoline */
    char *end;          /* end of the current arena */
    size_t last_size;   /* size of the current arena */
} arena_state;

static arena_state arenas;

static size_t
template_size(void)
{
    return (size_t)(_Py_trampoline_func_end - _Py_trampoline_func_start);
}

static size_t
trampoline_stride(void)
{
    size_t size = template_size();
    return (size + TRAMPOLINE_ALIGN - 1) & ~(size_t)(TRAMPOLINE_ALIGN - 1);
}

/* Map a new arena, fill it with copies of the template, then make it
   read+execute.  Returns -1 with errno set on failure. */
static int
new_arena(void)
{
    size_t size = arenas.last_size ? arenas.last_size * 2 : ARENA_MIN_SIZE;
    if (size > ARENA_MAX_SIZE) {
        size = ARENA_MAX_SIZE;
    }
    char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        return -1;
    }
    size_t stride = trampoline_stride();
    size_t count = size / stride;
    for (size_t i = 0; i < count; i++) {
        memcpy(mem + i * stride, _Py_trampoline_func_start, template_size());
    }
    if (mprotect(mem, size, PROT_READ | PROT_EXEC) < 0) {
        int saved_errno = errno;
        munmap(mem, size);
        errno = saved_errno;
        return -1;
    }
    /* Needed on architectures whose instruction cache does not snoop data
       writes (aarch64); a no-op on x86_64. */
    __builtin___clear_cache(mem, mem + size);
    arenas.owner = current_pid();
    arenas.next = mem;
    arenas.end = mem + count * stride;
    arenas.last_size = size;
    return 0;
}

/* Hand out the next trampoline.  Returns NULL with errno set on failure.

   After fork() the child starts a new arena: perf names addresses in a
   mapping after the process that mapped it, so samples in an arena the
   parent mapped are looked up in the parent's map, which never learns of
   the child's trampolines.  Those of the child must live in its own
   mapping. */
static py_trampoline
allocate_trampoline(void)
{
    if (arenas.next == NULL || arenas.next == arenas.end
        || arenas.owner != current_pid())
    {
        if (new_arena() < 0) {
            return NULL;
        }
    }
    char *code = arenas.next;
    arenas.next += trampoline_stride();
    return (py_trampoline)(void *)code;
}


/* ---------------------------------------------------------------------
   The map file, /tmp/perf-<pid>.map. */

/* Longest symbol name written; longer names are cut with "...". */
#define MAX_NAME_BYTES 4000
/* Room for "<addr> <size> ", the name and "\n". */
#define MAX_LINE_BYTES (MAX_NAME_BYTES + 64)

typedef struct {
    int fd;             /* -1 while no map file is open */
    pid_t owner;        /* the process that created the file behind fd */
    off_t size;         /* bytes of complete lines in the file */
    const char *refusal;  /* why an existing file was refused, or NULL */
} perf_map_state;

static perf_map_state perf_map = {-1, 0, 0, NULL};

/* Writers may come without the GIL (the PyUnstable perf-map API), so the
   file has a lock of its own. */
static pthread_mutex_t perf_map_lock = PTHREAD_MUTEX_INITIALIZER;

static void
perf_map_path(char *buf, size_t size, pid_t pid)
{
    snprintf(buf, size, "/tmp/perf-%ld.map", (long)pid);
}

/* Cleanup on an error path must not clobber the errno it reports. */
static void
close_keeping_errno(int fd)
{
    int saved_errno = errno;
    close(fd);
    errno = saved_errno;
}

static void
perf_map_unlock(void)
{
    int saved_errno = errno;
    pthread_mutex_unlock(&perf_map_lock);
    errno = saved_errno;
}

/* Refuse an existing file we must not write into. */
static int
check_map_file(int fd)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        perf_map.refusal = "is not a regular file";
        errno = EINVAL;
        return -1;
    }
    if (st.st_uid != geteuid()) {
        perf_map.refusal = "is owned by another user";
        errno = EPERM;
        return -1;
    }
    if (st.st_nlink != 1) {
        perf_map.refusal = "has other hard links";
        errno = EMLINK;
        return -1;
    }
    if ((st.st_mode & 07777) != 0600 && fchmod(fd, 0600) < 0) {
        return -1;
    }
    return 0;
}

/* Open this process's map file.  A file left by an earlier process with
   the same pid is emptied; one this process wrote before (an earlier
   Py_Initialize) is appended to.  Caller holds perf_map_lock.  Returns -1
   with errno (and maybe perf_map.refusal) set on failure. */
static int
perf_map_open_locked(void)
{
    char path[64];
    pid_t pid = current_pid();
    perf_map_path(path, sizeof(path), pid);
    perf_map.refusal = NULL;
    /* O_NOFOLLOW: never write through a planted symlink.  O_NONBLOCK: a
       planted FIFO must not hang us before check_map_file() rejects it. */
    int fd = open(path,
                  O_RDWR | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC
                  | O_NONBLOCK, 0600);
    if (fd < 0) {
        if (errno == ELOOP) {
            perf_map.refusal = "is a symbolic link";
        }
        return -1;
    }
    int reuse = (perf_map.owner == pid);
    struct stat st;
    if (check_map_file(fd) < 0
        || fcntl(fd, F_SETFL, O_APPEND) < 0
        || (!reuse && ftruncate(fd, 0) < 0)
        || fstat(fd, &st) < 0)
    {
        close_keeping_errno(fd);
        return -1;
    }
    perf_map.fd = fd;
    perf_map.owner = pid;
    perf_map.size = st.st_size;
    return 0;
}

/* Append whole lines; on failure cut the file back to its last complete
   line so a reader never sees half a line.  Caller holds perf_map_lock. */
static int
perf_map_append_locked(const char *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = write(perf_map.fd, buf + done, len - done);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            int saved_errno = (n == 0) ? ENOSPC : errno;
            (void)ftruncate(perf_map.fd, perf_map.size);
            errno = saved_errno;
            return -1;
        }
        done += (size_t)n;
    }
    perf_map.size += (off_t)len;
    return 0;
}

/* Copy the complete lines among the first `size` bytes of the file open
   as `src_fd` into ours.  After fork() that is the parent's map, so that
   trampolines inherited by the child - including those of frames on its
   stack - resolve in the child's map too. */
static int
perf_map_copy_locked(int src_fd, off_t size)
{
    char buf[64 * 1024];
    off_t offset = 0;
    while (offset < size) {
        size_t want = sizeof(buf);
        if ((off_t)want > size - offset) {
            want = (size_t)(size - offset);
        }
        ssize_t n = pread(src_fd, buf, want, offset);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return n == 0 ? 0 : -1;  /* n == 0: the file got shorter */
        }
        /* Whole lines only: a chunk can end in the middle of one, and
           the file in a line still being written. */
        size_t len = (size_t)n;
        while (len > 0 && buf[len - 1] != '\n') {
            len--;
        }
        if (len == 0) {
            if ((size_t)n < sizeof(buf)) {
                return 0;  /* only a partial line is left */
            }
            errno = EINVAL;  /* a line longer than the buffer */
            return -1;
        }
        if (perf_map_append_locked(buf, len) < 0) {
            return -1;
        }
        offset += (off_t)len;
    }
    return 0;
}

/* In a forked child, swap the parent's map for our own.  The parent's file
   is never written by the child.  Caller holds perf_map_lock. */
static int
perf_map_fork_locked(void)
{
    int parent_fd = perf_map.fd;
    off_t parent_size = perf_map.size;
    perf_map.fd = -1;
    int res = perf_map_open_locked();
    if (res == 0) {
        res = perf_map_copy_locked(parent_fd, parent_size);
    }
    close_keeping_errno(parent_fd);
    return res;
}

/* Make sure this process's map file is open.  Caller holds the lock. */
static int
perf_map_ready_locked(void)
{
    if (perf_map.fd < 0) {
        return perf_map_open_locked();
    }
    if (perf_map.owner != current_pid()) {
        /* Forked without PyOS_AfterFork_Child() (a C extension's fork). */
        return perf_map_fork_locked();
    }
    return 0;
}

/* Escape one code point of a name so that the map line stays one line
   and valid UTF-8.  Returns the bytes written to out (at most 6). */
static size_t
escape_name_char(Py_UCS4 ch, char *out)
{
    if (ch < 0x20 || ch == 0x7f || (ch >= 0x80 && ch < 0xa0)) {
        /* C0, DEL and C1 controls: "\n" must never end the line. */
        return (size_t)sprintf(out, "\\x%02x", (unsigned int)ch);
    }
    if (ch >= 0xdc80 && ch <= 0xdcff) {
        /* A byte of an undecodable file name (surrogateescape). */
        return (size_t)sprintf(out, "\\x%02x", (unsigned int)(ch - 0xdc00));
    }
    if (ch >= 0xd800 && ch <= 0xdfff) {
        ch = 0xfffd;  /* other lone surrogates cannot be encoded */
    }
    if (ch < 0x80) {
        out[0] = (char)ch;
        return 1;
    }
    if (ch < 0x800) {
        out[0] = (char)(0xc0 | (ch >> 6));
        out[1] = (char)(0x80 | (ch & 0x3f));
        return 2;
    }
    if (ch < 0x10000) {
        out[0] = (char)(0xe0 | (ch >> 12));
        out[1] = (char)(0x80 | ((ch >> 6) & 0x3f));
        out[2] = (char)(0x80 | (ch & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (ch >> 18));
    out[1] = (char)(0x80 | ((ch >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((ch >> 6) & 0x3f));
    out[3] = (char)(0x80 | (ch & 0x3f));
    return 4;
}

typedef struct {
    char *buf;
    size_t len;
    size_t limit;       /* room for the name, not counting "...\n" */
    int truncated;
} name_writer;

static void
put_char(name_writer *w, Py_UCS4 ch)
{
    char encoded[8];
    size_t n = escape_name_char(ch, encoded);
    if (w->truncated || w->len + n > w->limit) {
        w->truncated = 1;
        return;
    }
    memcpy(w->buf + w->len, encoded, n);
    w->len += n;
}

/* Decode one code point of the UTF-8 string s.  A byte that does not
   start a valid sequence decodes as U+DC80..U+DCFF, as surrogateescape
   would, and escape_name_char() writes it as \xNN.  Returns the number of
   bytes used; a NUL ends any sequence, so s is never read past its end. */
static size_t
decode_utf8_char(const unsigned char *s, Py_UCS4 *ch)
{
    unsigned char lead = s[0];
    size_t more;
    Py_UCS4 min;
    if (lead < 0x80) {
        *ch = lead;
        return 1;
    }
    if (lead >= 0xc2 && lead <= 0xdf) {
        more = 1, min = 0x80, *ch = lead & 0x1f;
    }
    else if (lead >= 0xe0 && lead <= 0xef) {
        more = 2, min = 0x800, *ch = lead & 0x0f;
    }
    else if (lead >= 0xf0 && lead <= 0xf4) {
        more = 3, min = 0x10000, *ch = lead & 0x07;
    }
    else {
        *ch = 0xdc00 + lead;
        return 1;
    }
    for (size_t i = 1; i <= more; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            *ch = 0xdc00 + lead;
            return 1;
        }
        *ch = (*ch << 6) | (s[i] & 0x3f);
    }
    if (*ch < min || *ch > 0x10ffff || (*ch >= 0xd800 && *ch <= 0xdfff)) {
        *ch = 0xdc00 + lead;
        return 1;
    }
    return more + 1;
}

static void
put_utf8(name_writer *w, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p && !w->truncated) {
        Py_UCS4 ch;
        p += decode_utf8_char(p, &ch);
        put_char(w, ch);
    }
}

/* ASCII text, the common case, goes in runs: only its control
   characters need escaping. */
static void
put_ascii(name_writer *w, const Py_UCS1 *s, Py_ssize_t length)
{
    Py_ssize_t i = 0;
    while (i < length && !w->truncated) {
        Py_ssize_t end = i;
        while (end < length && s[end] >= 0x20 && s[end] != 0x7f) {
            end++;
        }
        size_t run = (size_t)(end - i);
        size_t room = w->limit - w->len;
        if (run > room) {
            run = room;
            w->truncated = 1;
        }
        memcpy(w->buf + w->len, s + i, run);
        w->len += run;
        if (end < length) {
            put_char(w, s[end]);
        }
        i = end + 1;
    }
}

static void
put_unicode(name_writer *w, PyObject *str)
{
    if (str == NULL || !PyUnicode_Check(str) || PyUnicode_READY(str) < 0) {
        put_utf8(w, "?");
        return;
    }
    if (PyUnicode_IS_ASCII(str)) {
        put_ascii(w, PyUnicode_1BYTE_DATA(str), PyUnicode_GET_LENGTH(str));
        return;
    }
    int kind = PyUnicode_KIND(str);
    const void *data = PyUnicode_DATA(str);
    Py_ssize_t length = PyUnicode_GET_LENGTH(str);
    for (Py_ssize_t i = 0; i < length && !w->truncated; i++) {
        put_char(w, PyUnicode_READ(kind, data, i));
    }
}

/* Write value in lowercase hex, then a space; returns the end.  (snprintf
   would cost more than the rest of the line.) */
static char *
put_hex(char *out, uintptr_t value)
{
    char digits[2 * sizeof(value)];
    size_t n = 0;
    do {
        digits[n++] = "0123456789abcdef"[value & 0xf];
        value >>= 4;
    } while (value != 0);
    while (n > 0) {
        *out++ = digits[--n];
    }
    *out++ = ' ';
    return out;
}

/* A map line is "<hex addr> <hex size> <name>\n".  start_entry() writes
   the numbers into buf and returns a writer for the name;
   finish_entry() ends the line and returns its length. */
static name_writer
start_entry(char *buf, const void *addr, size_t size)
{
    char *name = put_hex(put_hex(buf, (uintptr_t)addr), (uintptr_t)size);
    name_writer w = {name, 0, MAX_NAME_BYTES, 0};
    return w;
}

static size_t
finish_entry(char *buf, name_writer *w)
{
    if (w->truncated) {
        memcpy(w->buf + w->len, "...", 3);
        w->len += 3;
    }
    w->buf[w->len++] = '\n';
    return (size_t)(w->buf - buf) + w->len;
}

/* Append one line to this process's map, opening it first if needed.
   Any thread may call this, with or without the GIL. */
static int
write_map_line(const char *line, size_t len)
{
    pthread_mutex_lock(&perf_map_lock);
    int res = perf_map_ready_locked();
    if (res == 0) {
        res = perf_map_append_locked(line, len);
    }
    perf_map_unlock();
    return res;
}

/* ---------------------------------------------------------------------
   Deferred lines.  A write() per new trampoline was most of perf mode's
   cost where many code objects run for the first time (imports, exec).
   perf reads the map when it reports, not when it samples, so perf mode's
   own lines wait in a buffer, and a helper thread writes them out at most
   FLUSH_DELAY_NS after the first of them: a process that never exits
   still gets every line into its map within that delay.  The buffer is
   also written when full, before fork(), at exit(), os._exit() and
   finalization, and when perf mode is turned off, so only a crash or
   SIGKILL can lose the lines of the last millisecond.  Lines of the
   PyUnstable API go out at once, as in CPython 3.12. */

#define PENDING_BYTES (64 * 1024)
#define FLUSH_DELAY_NS (1000 * 1000)
#define FLUSHER_STACK_SIZE (64 * 1024)

/* All fields are guarded by perf_map_lock. */
static struct {
    char buf[PENDING_BYTES];    /* whole lines */
    size_t len;
    struct timespec due;        /* when the oldest pending line is due */
    int error;                  /* errno of a failed deferred write, or 0 */
    pthread_cond_t wakeup;      /* new lines, or the flusher must go */
    pthread_t flusher;
    pid_t flusher_owner;        /* the process it runs in; 0: none */
} pending;

static void
init_flusher_wakeup(void)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&pending.wakeup, &attr);
    pthread_condattr_destroy(&attr);
}

static void
flush_pending_locked(void)
{
    if (pending.len == 0) {
        return;
    }
    if (perf_map_ready_locked() < 0
        || perf_map_append_locked(pending.buf, pending.len) < 0)
    {
        /* Reported by the next queue_map_line(), which turns perf mode
           off: these trampolines stay nameless. */
        pending.error = errno;
    }
    pending.len = 0;
}

static void
flush_pending(void)
{
    pthread_mutex_lock(&perf_map_lock);
    flush_pending_locked();
    perf_map_unlock();
}

static int
is_designated_flusher(void)
{
    return pending.flusher_owner == current_pid()
           && pthread_equal(pending.flusher, pthread_self());
}

static void *
flusher_main(void *Py_UNUSED(arg))
{
    pthread_mutex_lock(&perf_map_lock);
    while (is_designated_flusher()) {
        if (pending.len == 0) {
            pthread_cond_wait(&pending.wakeup, &perf_map_lock);
        }
        else if (pthread_cond_timedwait(&pending.wakeup, &perf_map_lock,
                                        &pending.due) == ETIMEDOUT) {
            flush_pending_locked();
        }
    }
    flush_pending_locked();
    pthread_mutex_unlock(&perf_map_lock);
    return NULL;
}

/* Make sure this process has a flusher.  Returns -1 if no thread can be
   started; lines are then written at once. */
static int
start_flusher_locked(void)
{
    if (pending.flusher_owner == current_pid()) {
        return 0;
    }
    /* The helper never runs signal handlers: it inherits a full mask. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, FLUSHER_STACK_SIZE);
    int err = pthread_create(&pending.flusher, &attr, flusher_main, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0) {
        return -1;
    }
    (void)pthread_setname_np(pending.flusher, "perf-map-flush");
    pending.flusher_owner = current_pid();
    return 0;
}

/* Tell the flusher to write what is pending and end; wait for it. */
static void
stop_flusher(void)
{
    pthread_mutex_lock(&perf_map_lock);
    int running = (pending.flusher_owner == current_pid());
    pthread_t flusher = pending.flusher;
    pending.flusher_owner = 0;
    pthread_cond_broadcast(&pending.wakeup);
    pthread_mutex_unlock(&perf_map_lock);
    if (running) {
        pthread_join(flusher, NULL);
    }
}

/* fork(): the parent's lines go into the parent's map first, and no
   thread holds the lock across the fork.  The child has no flusher. */
static void
fork_prepare(void)
{
    pthread_mutex_lock(&perf_map_lock);
    flush_pending_locked();
}

static void
fork_parent(void)
{
    pthread_mutex_unlock(&perf_map_lock);
}

static void
fork_child(void)
{
    refresh_pid();
    pending.flusher_owner = 0;
    init_flusher_wakeup();      /* it may have had the flusher waiting */
    pthread_mutex_unlock(&perf_map_lock);
}

/* Queue one of perf mode's own lines.  Returns -1 with errno set if the
   map cannot be written (now, or by an earlier deferred write). */
static int
queue_map_line(const char *line, size_t len)
{
    pthread_mutex_lock(&perf_map_lock);
    int res = 0;
    if (pending.error != 0) {
        errno = pending.error;
        pending.error = 0;
        res = -1;
    }
    else if (perf_map_ready_locked() < 0) {
        res = -1;
    }
    else if (start_flusher_locked() < 0) {
        res = perf_map_append_locked(line, len);
    }
    else {
        if (pending.len + len > PENDING_BYTES) {
            flush_pending_locked();
        }
        if (pending.len == 0) {
            clock_gettime(CLOCK_MONOTONIC, &pending.due);
            pending.due.tv_nsec += FLUSH_DELAY_NS;
            if (pending.due.tv_nsec >= 1000000000) {
                pending.due.tv_sec++;
                pending.due.tv_nsec -= 1000000000;
            }
            pthread_cond_broadcast(&pending.wakeup);
        }
        memcpy(pending.buf + pending.len, line, len);
        pending.len += len;
    }
    perf_map_unlock();
    return res;
}

/* Queue the line "py::<qualname>:<filename>" for a code object's
   trampoline. */
static int
queue_code_entry(py_trampoline code, PyCodeObject *co)
{
    char line[MAX_LINE_BYTES];
    name_writer w = start_entry(line, (const void *)code, template_size());
    put_utf8(&w, "py::");
    put_unicode(&w, co->co_qualname);
    put_utf8(&w, ":");
    put_unicode(&w, co->co_filename);
    return queue_map_line(line, finish_entry(line, &w));
}

/* Raise the Python exception for a failed map operation (errno set). */
static void
set_map_error(void)
{
    char path[64];
    perf_map_path(path, sizeof(path), current_pid());
    if (perf_map.refusal != NULL) {
        PyErr_Format(PyExc_OSError, "perf map file %s %s; not writing to it",
                     path, perf_map.refusal);
    }
    else {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
}


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

/* The hook's fast path reads co_extra directly, in the layout that
   Objects/codeobject.c keeps private; every trampoline stored through
   _PyCode_SetExtra() is read back this way too, and the first mismatch
   turns the fast path off for good. */
typedef struct {
    Py_ssize_t ce_size;
    void *ce_extras[1];
} code_extra_block;

static struct {
    PyInterpreterState *interp;  /* NULL: fast path off */
    Py_ssize_t index;            /* our co_extra index in interp */
    int layout_broken;
} fast;

/* Point the fast path at interp, unless the layout check failed. */
static void
set_fast_path(PyInterpreterState *interp, Py_ssize_t index)
{
    if (!fast.layout_broken) {
        fast.interp = interp;
        fast.index = index;
    }
}

static inline py_trampoline
read_trampoline(PyCodeObject *co, Py_ssize_t index)
{
    code_extra_block *extra = (code_extra_block *)co->co_extra;
    if (extra == NULL || index >= extra->ce_size) {
        return NULL;
    }
    return (py_trampoline)extra->ce_extras[index];
}

/* Our co_extra index in interp, requested if needed; -1 with an exception
   set on failure.  activate() calls this before the hook runs in an
   interpreter, so fast.interp never pairs an interpreter with another's
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
    py_trampoline code = allocate_trampoline();
    if (code == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    /* Name it before first use: a sample may land in it right away, and
       perf must find the line when it reports. */
    if (queue_code_entry(code, co) < 0) {
        set_map_error();
        return NULL;
    }
    if (_PyCode_SetExtra((PyObject *)co, index, (void *)code) < 0) {
        return NULL;
    }
    if (read_trampoline(co, index) != code) {
        fast.layout_broken = 1;
        fast.interp = NULL;
    }
    return code;
}

static PyObject *py_trampoline_evaluator(PyThreadState *, _PyInterpreterFrame *,
                                         int);

/* A trampoline could not be made while running: turn perf mode off in this
   interpreter with one warning and carry on with the default evaluator. */
static void
disable_after_failure(PyThreadState *tstate)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *msg = value ? PyObject_Str(value) : NULL;
    const char *text = msg ? PyUnicode_AsUTF8(msg) : NULL;
    fprintf(stderr, "python: perf support disabled: %s\n",
            text ? text : "cannot create a trampoline");
    fflush(stderr);
    PyErr_Clear();
    Py_XDECREF(msg);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
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
    void *extra = NULL;
    (void)_PyCode_GetExtra((PyObject *)co, index, &extra);
    if (extra != NULL) {
        return (py_trampoline)extra;
    }
    /* A thrown-in exception is pending when throwflag is set: keep it out
       of the way while the trampoline is made. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    py_trampoline code = compile_trampoline(co, index);
    if (code == NULL) {
        disable_after_failure(tstate);
    }
    PyErr_Restore(type, value, tb);
    return code;
}

/* The C stack.  In perf mode every Python frame costs a native frame (its
   trampoline and an evaluator), where stock 3.11 runs Python-to-Python
   calls inline, so deep recursion that stock survives could overflow the
   C stack.  The hook raises RecursionError instead when less than
   STACK_RESERVE bytes are left.  stack_limit starts at UINTPTR_MAX, so a
   thread's first frame takes the slow path, which finds the real limit. */
#define STACK_RESERVE (256 * 1024)

static __thread uintptr_t stack_limit = UINTPTR_MAX;

static void
find_stack_limit(void)
{
    pthread_attr_t attr;
    void *base;
    size_t size;
    stack_limit = 0;  /* unknown: no guard */
    if (pthread_getattr_np(pthread_self(), &attr) != 0) {
        return;
    }
    if (pthread_attr_getstack(&attr, &base, &size) == 0) {
        size_t reserve = size / 4 < STACK_RESERVE ? size / 4 : STACK_RESERVE;
        stack_limit = (uintptr_t)base + reserve;
    }
    pthread_attr_destroy(&attr);
}

/* Evaluate a frame that the fast path could not serve.  The hook may
   return NULL without evaluating the frame: its caller clears it. */
static Py_NO_INLINE PyObject *
evaluate_slow(PyThreadState *tstate, _PyInterpreterFrame *frame,
              int throwflag)
{
    if (stack_limit == UINTPTR_MAX) {
        find_stack_limit();
    }
    if ((uintptr_t)__builtin_frame_address(0) <= stack_limit) {
        PyErr_SetString(PyExc_RecursionError,
                        "maximum recursion depth exceeded: the C stack is "
                        "nearly full (perf mode uses a native frame per "
                        "Python frame)");
        return NULL;
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
    if (tstate->interp == fast.interp
        && (uintptr_t)__builtin_frame_address(0) > stack_limit)
    {
        py_trampoline code = read_trampoline(frame->f_code, fast.index);
        if (code != NULL) {
            return code(tstate, frame, throwflag, _PyEval_EvalFrameDefault);
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
        set_map_error();
    }
    return res;
}

/* Returns -1 with an exception if perf mode cannot be turned on; the
   interpreter then keeps its default evaluator. */
static int
activate(PyThreadState *tstate)
{
    PyInterpreterState *interp = tstate->interp;
    if (interp->eval_frame == py_trampoline_evaluator) {
        return 0;
    }
    if (interp->eval_frame != NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "perf trampoline cannot be activated: another "
                        "frame evaluation function is installed");
        return -1;
    }
    if (use_code_extra_index(interp) < 0 || perf_map_prepare() < 0) {
        return -1;
    }
    if (arenas.next == NULL && new_arena() < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    _PyInterpreterState_SetEvalFrameFunc(interp, py_trampoline_evaluator);
    return 0;
}

static void
deactivate(PyInterpreterState *interp)
{
    /* Running frames keep returning through their trampolines, which stay
       mapped; only new frames stop using them. */
    if (interp->eval_frame == py_trampoline_evaluator) {
        _PyInterpreterState_SetEvalFrameFunc(interp, NULL);
        flush_pending();
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
    const PyConfig *config = _PyInterpreterState_GetConfig(tstate->interp);
    if (!perf_requested(config)) {
        return;
    }
    if (activate(tstate) < 0) {
        disable_after_failure(tstate);
    }
}

/* Report a deferred write that failed after the last trampoline was made,
   so that no later one reported it. */
static void
warn_if_lines_lost(void)
{
    pthread_mutex_lock(&perf_map_lock);
    int err = pending.error;
    pending.error = 0;
    perf_map_unlock();
    if (err != 0) {
        char path[64];
        perf_map_path(path, sizeof(path), current_pid());
        fprintf(stderr, "python: perf support disabled: cannot write %s: "
                "%s\n", path, strerror(err));
    }
}

void
_PyPerfTrampoline_Fini(void)
{
    PyThreadState *tstate = _PyThreadState_GET();
    if (tstate != NULL) {
        deactivate(tstate->interp);
    }
    fast.interp = NULL;
    PyUnstable_PerfMapState_Fini();
    warn_if_lines_lost();
}

void
_PyPerfTrampoline_AfterFork_Child(void)
{
    pthread_mutex_lock(&perf_map_lock);
    int res = perf_map.fd < 0 ? 0 : perf_map_fork_locked();
    perf_map_unlock();
    if (res < 0) {
        set_map_error();
        disable_after_failure(_PyThreadState_GET());
    }
}


/* ---------------------------------------------------------------------
   The perf-map C API (Include/cpython/perfmap.h).  The map functions may
   be called from any thread, without the GIL; failures return -1 with
   errno set. */

int
PyUnstable_PerfMapState_Init(void)
{
    pthread_mutex_lock(&perf_map_lock);
    int res = perf_map_ready_locked();
    perf_map_unlock();
    return res;
}

int
PyUnstable_WritePerfMapEntry(const void *code_addr, unsigned int code_size,
                             const char *entry_name)
{
    if (entry_name == NULL) {
        errno = EINVAL;
        return -1;
    }
    char line[MAX_LINE_BYTES];
    name_writer w = start_entry(line, code_addr, code_size);
    put_utf8(&w, entry_name);
    return write_map_line(line, finish_entry(line, &w));
}

void
_PyPerfTrampoline_FlushMap(void)
{
    flush_pending();
}

void
PyUnstable_PerfMapState_Fini(void)
{
    /* Perf mode, if active, opens the map again (appending) when it next
       needs it, and starts a new flusher. */
    stop_flusher();
    pthread_mutex_lock(&perf_map_lock);
    flush_pending_locked();
    if (perf_map.fd >= 0) {
        close(perf_map.fd);
        perf_map.fd = -1;
    }
    pthread_mutex_unlock(&perf_map_lock);
}

int
PyUnstable_CopyPerfMapFile(const char *parent_filename)
{
    if (parent_filename == NULL) {
        errno = EINVAL;
        return -1;
    }
    int fd = open(parent_filename,
                  O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) {
        return -1;
    }
    struct stat st;
    int res = fstat(fd, &st);
    if (res == 0 && !S_ISREG(st.st_mode)) {
        errno = EINVAL;
        res = -1;
    }
    if (res == 0) {
        pthread_mutex_lock(&perf_map_lock);
        res = perf_map_ready_locked();
        if (res == 0) {
            res = perf_map_copy_locked(fd, st.st_size);
        }
        perf_map_unlock();
    }
    close_keeping_errno(fd);
    return res;
}

/* Give a code object its trampoline now, before it first runs.  Needs the
   GIL; returns -1 with an exception set on failure. */
int
PyUnstable_PerfTrampoline_CompileCode(PyCodeObject *co)
{
    Py_ssize_t index = use_code_extra_index(_PyInterpreterState_GET());
    if (index < 0) {
        return -1;
    }
    void *extra = NULL;
    if (_PyCode_GetExtra((PyObject *)co, index, &extra) < 0) {
        return -1;
    }
    if (extra == NULL && compile_trampoline(co, index) == NULL) {
        return -1;
    }
    return 0;
}

/* A forked child always gets its own map that names the trampolines it
   inherited (see _PyPerfTrampoline_AfterFork_Child), which is what
   persisting means in CPython 3.12; there is nothing to switch. */
int
PyUnstable_PerfTrampoline_SetPersistAfterFork(int Py_UNUSED(enable))
{
    return 0;
}

#else  /* !PY_HAVE_PERF_TRAMPOLINE */

static int
activate(PyThreadState *Py_UNUSED(tstate))
{
    PyErr_SetString(PyExc_ValueError, "perf trampoline not available");
    return -1;
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
    const PyConfig *config = _PyInterpreterState_GetConfig(tstate->interp);
    if (perf_requested(config)) {
        fprintf(stderr, "python: perf support is not available on this "
                "platform\n");
    }
}

void
_PyPerfTrampoline_Fini(void)
{
}

void
_PyPerfTrampoline_AfterFork_Child(void)
{
}

void
_PyPerfTrampoline_FlushMap(void)
{
}

int
PyUnstable_PerfMapState_Init(void)
{
    errno = ENOTSUP;
    return -1;
}

int
PyUnstable_WritePerfMapEntry(const void *Py_UNUSED(code_addr),
                             unsigned int Py_UNUSED(code_size),
                             const char *Py_UNUSED(entry_name))
{
    errno = ENOTSUP;
    return -1;
}

void
PyUnstable_PerfMapState_Fini(void)
{
}

int
PyUnstable_CopyPerfMapFile(const char *Py_UNUSED(parent_filename))
{
    errno = ENOTSUP;
    return -1;
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

static PyObject *
sys_activate_stack_trampoline(PyObject *Py_UNUSED(module), PyObject *backend)
{
    if (!PyUnicode_Check(backend)) {
        PyErr_Format(PyExc_TypeError,
                     "activate_stack_trampoline() argument must be str, "
                     "not %.50s", Py_TYPE(backend)->tp_name);
        return NULL;
    }
    if (!_PyUnicode_EqualToASCIIString(backend, "perf")) {
        PyErr_Format(PyExc_ValueError, "invalid backend: %R", backend);
        return NULL;
    }
    if (activate(_PyThreadState_GET()) < 0) {
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

static PyObject *
sys_deactivate_stack_trampoline(PyObject *Py_UNUSED(module),
                                PyObject *Py_UNUSED(args))
{
    deactivate(_PyInterpreterState_GET());
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

PyMethodDef _PyPerfTrampoline_SysMethods[] = {
    {"activate_stack_trampoline", sys_activate_stack_trampoline,
     METH_O, activate_doc},
    {"deactivate_stack_trampoline", sys_deactivate_stack_trampoline,
     METH_NOARGS, deactivate_doc},
    {"is_stack_trampoline_active", sys_is_stack_trampoline_active,
     METH_NOARGS, is_active_doc},
    {NULL, NULL}
};
