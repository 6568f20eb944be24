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

#ifdef PY_HAVE_PERF_TRAMPOLINE

#include <fcntl.h>                // open()
#include <pthread.h>
#include <signal.h>               // pthread_sigmask()
#include <stdio.h>
#include <time.h>                 // clock_gettime()
#include <sys/mman.h>             // mmap()
#include <sys/resource.h>         // getrlimit()
#include <sys/stat.h>             // fstat()
#include <sys/auxv.h>             // getauxval()
#include <sys/syscall.h>          // SYS_gettid
#include <unistd.h>               // write(), getpid()

typedef PyObject *(*py_evaluator)(PyThreadState *, _PyInterpreterFrame *,
                                  int throwflag);
typedef PyObject *(*py_trampoline)(PyThreadState *, _PyInterpreterFrame *,
                                   int throwflag, py_evaluator);

/* getpid() is a system call (glibc stopped caching it), and arenas and
   the map need the pid for every new trampoline, to notice a fork.  A
   fork handler keeps a copy.  The process hooks are installed once, on
   first use; the fork and exit handlers also write out deferred map lines
   (see below), and the child's handler has its first Python frame give it
   its own map (see schedule_adoption). */
static pid_t cached_pid;
static pthread_once_t process_hooks_once = PTHREAD_ONCE_INIT;

static void fork_prepare(void);
static void fork_parent(void);
static void fork_child(void);
static void hook_after_fork(void);
static void init_flusher_conditions(void);
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
    init_flusher_conditions();
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

/* Room left free at the end of each arena.  perf inject --jit maps each
   trampoline's code together with its unwinding tables (see the jitdump
   section), a little more than the trampoline itself; the reserve keeps
   that from reaching into an arena mapped right after. */
#define ARENA_RESERVE 256

/* Arenas are carved, one after the other, out of a single reservation of
   address space (PROT_NONE: no memory behind it), so that telling a
   trampoline of ours from anything else is one comparison.  The hook
   needs that on every call: a co_extra slot that is ours in this
   interpreter may hold another tool's data in a code object that all
   interpreters share (the deep-frozen ones), and that must never be
   called.  The reservation is as large as the address-space limit
   allows, from 1 GiB (64 Mi trampolines) down to 16 MiB.  A page is left
   between arenas, so that the kernel never merges two of them into one
   mapping: perf names a mapping after the process that made it. */
#define REGION_MAX_SIZE ((size_t)1 << 30)
#define REGION_MIN_SIZE ((size_t)16 << 20)

typedef struct {
    char *region;       /* the reservation, or NULL */
    size_t region_size;
    size_t region_used; /* bytes of it carved into arenas (and gaps) */
    pid_t owner;        /* the process that made the current arena */
    char *next;         /* next free trampoline */
    char *end;          /* end of the current arena's trampolines */
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

/* Is p a trampoline of ours?  Only we map anything in the reservation,
   and trampolines start on TRAMPOLINE_ALIGN boundaries of the part carved
   into arenas.  NULL is not one. */
static inline int
is_trampoline(const void *p)
{
    uintptr_t offset = (uintptr_t)p - (uintptr_t)arenas.region;
    return offset < arenas.region_used && offset % TRAMPOLINE_ALIGN == 0;
}

/* Fill the first len bytes (whole strides) of a fresh, zeroed mapping with
   copies of the template: one copy, then copies of all that is filled so
   far, so that a 4 MiB arena takes 19 memcpy() calls rather than one per
   trampoline. */
static void
fill_with_template(char *mem, size_t len)
{
    size_t stride = trampoline_stride();
    memcpy(mem, _Py_trampoline_func_start, template_size());
    for (size_t filled = stride; filled < len; filled *= 2) {
        size_t n = filled < len - filled ? filled : len - filled;
        memcpy(mem + filled, mem, n);
    }
}

static int
reserve_region(void)
{
    for (size_t size = REGION_MAX_SIZE; size >= REGION_MIN_SIZE; size /= 2) {
        char *mem = mmap(NULL, size, PROT_NONE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem != MAP_FAILED) {
            arenas.region = mem;
            arenas.region_size = size;
            return 0;
        }
    }
    return -1;
}

/* The size of the next arena, or 0 if the reservation has no room for it
   and the page left unmapped after it. */
static size_t
next_arena_size(size_t page)
{
    size_t size = arenas.last_size ? arenas.last_size * 2 : ARENA_MIN_SIZE;
    if (size > ARENA_MAX_SIZE) {
        size = ARENA_MAX_SIZE;
    }
    size_t left = arenas.region_size - arenas.region_used;
    if (left < ARENA_MIN_SIZE + page) {
        return 0;
    }
    return size < left - page ? size : left - page;
}

/* Make the next part of the reservation an arena: writable while it is
   filled with copies of the template, then read+execute.  The part stays
   reserved whatever fails (mprotect() never leaves a hole another mapping
   could take).  Returns -1 with errno set on failure. */
static int
new_arena(void)
{
    if (arenas.region == NULL && reserve_region() < 0) {
        return -1;
    }
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t size = next_arena_size(page);
    if (size == 0) {
        errno = ENOMEM;
        return -1;
    }
    char *mem = arenas.region + arenas.region_used;
    if (mprotect(mem, size, PROT_READ | PROT_WRITE) < 0) {
        return -1;
    }
    size_t stride = trampoline_stride();
    size_t count = (size - ARENA_RESERVE) / stride;
    fill_with_template(mem, count * stride);
    if (mprotect(mem, size, PROT_READ | PROT_EXEC) < 0) {
        int saved_errno = errno;
        (void)mprotect(mem, size, PROT_NONE);
        errno = saved_errno;
        return -1;
    }
    /* Needed on architectures whose instruction cache does not snoop data
       writes (aarch64); a no-op on x86_64. */
    __builtin___clear_cache(mem, mem + size);
    arenas.region_used += size + page;
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
    int inherited_fd;   /* a forked child's copy of its parent's map, */
    off_t inherited_size;   /* whose lines it has yet to copy; or -1 */
} perf_map_state;

static perf_map_state perf_map = {-1, 0, 0, NULL, -1, 0};

/* Writers may come without the GIL (the PyUnstable perf-map API), so the
   file has a lock of its own. */
static pthread_mutex_t perf_map_lock = PTHREAD_MUTEX_INITIALIZER;

/* The flusher writes without the lock (see write_due_entries_locked):
   whoever uses the files themselves takes the lock and waits for that
   write. */
static void lock_perf_files(void);
static void wait_for_flusher_write_locked(void);

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

/* Refuse an existing file we must not write into: *refusal says why. */
static int
check_output_file(int fd, const char **refusal)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        *refusal = "is not a regular file";
        errno = EINVAL;
        return -1;
    }
    if (st.st_uid != geteuid()) {
        *refusal = "is owned by another user";
        errno = EPERM;
        return -1;
    }
    if (st.st_nlink != 1) {
        *refusal = "has other hard links";
        errno = EMLINK;
        return -1;
    }
    if ((st.st_mode & 07777) != 0600 && fchmod(fd, 0600) < 0) {
        return -1;
    }
    return 0;
}

/* Open one of our files in /tmp (the perf map, the jitdump) for appending,
   emptied unless keep is set, and tell its size.  Returns the descriptor,
   or -1 with errno (and maybe *refusal) set. */
static int
open_output_file(const char *path, int keep, const char **refusal,
                 off_t *size)
{
    *refusal = NULL;
    /* O_NOFOLLOW: never write through a planted symlink.  O_NONBLOCK: a
       planted FIFO must not hang us before check_output_file() rejects
       it. */
    int fd = open(path,
                  O_RDWR | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC
                  | O_NONBLOCK, 0600);
    if (fd < 0) {
        if (errno == ELOOP) {
            *refusal = "is a symbolic link";
        }
        return -1;
    }
    struct stat st;
    if (check_output_file(fd, refusal) < 0
        || fcntl(fd, F_SETFL, O_APPEND) < 0
        || (!keep && ftruncate(fd, 0) < 0)
        || fstat(fd, &st) < 0)
    {
        close_keeping_errno(fd);
        return -1;
    }
    *size = st.st_size;
    return fd;
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
    int fd = open_output_file(path, perf_map.owner == pid,
                              &perf_map.refusal, &perf_map.size);
    if (fd < 0) {
        return -1;
    }
    perf_map.fd = fd;
    perf_map.owner = pid;
    return 0;
}

/* Append len bytes of whole entries (lines, records) to the file open as
   fd, whose complete entries end at *size.  On failure cut the file back
   to *size, so a reader never sees half an entry. */
static int
append_entries(int fd, off_t *size, const char *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = write(fd, buf + done, len - done);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            int saved_errno = (n == 0) ? ENOSPC : errno;
            (void)ftruncate(fd, *size);
            errno = saved_errno;
            return -1;
        }
        done += (size_t)n;
    }
    *size += (off_t)len;
    return 0;
}

/* Append whole lines to the map.  Caller holds perf_map_lock, or is the
   flusher writing outside it (see write_due_entries_locked). */
static int
perf_map_append_locked(const char *buf, size_t len)
{
    return append_entries(perf_map.fd, &perf_map.size, buf, len);
}

typedef int (*lines_handler)(const char *lines, size_t len, void *arg);

/* Where for_each_map_chunk() reads.  Not on the C stack: it runs on
   threads whose stacks may be 32 KiB (fork, activation, the C API).
   Guarded by perf_map_lock. */
static char map_chunk[64 * 1024];

/* Call handle() on the complete lines of the map file open as src_fd from
   byte `offset` up to byte `size`, a chunk at a time.  Caller holds
   perf_map_lock. */
static int
for_each_map_chunk(int src_fd, off_t offset, off_t size, lines_handler handle,
                   void *arg)
{
    char *buf = map_chunk;
    while (offset < size) {
        size_t want = sizeof(map_chunk);
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
            if ((size_t)n < sizeof(map_chunk)) {
                return 0;  /* only a partial line is left */
            }
            errno = EINVAL;  /* a line longer than the buffer */
            return -1;
        }
        if (handle(buf, len, arg) < 0) {
            return -1;
        }
        offset += (off_t)len;
    }
    return 0;
}

static int
append_map_lines(const char *lines, size_t len, void *Py_UNUSED(arg))
{
    return perf_map_append_locked(lines, len);
}

/* Copy the complete lines of another map file into ours.  After fork()
   that is the parent's map, so that trampolines inherited by the child -
   including those of frames on its stack - resolve in the child's map
   too.  Caller holds perf_map_lock. */
static int
perf_map_copy_locked(int src_fd, off_t size)
{
    return for_each_map_chunk(src_fd, 0, size, append_map_lines, NULL);
}

/* Is this process's map open?  (After fork() the parent's may be.) */
static int
perf_map_open_here(void)
{
    return perf_map.fd >= 0 && perf_map.owner == current_pid();
}

static void
drop_inherited_map_locked(void)
{
    if (perf_map.inherited_fd >= 0) {
        close(perf_map.inherited_fd);
        perf_map.inherited_fd = -1;
    }
}

/* In a forked child, swap the parent's map for our own.  The parent's file
   is never written by the child.  Its lines are copied later, if at all
   (see adopt_parent_lines_locked).  Caller holds perf_map_lock. */
static int
perf_map_fork_locked(void)
{
    int parent_fd = perf_map.fd;
    off_t parent_size = perf_map.size;
    /* The parent copied its own parent's lines before it forked. */
    assert(perf_map.inherited_fd < 0);
    perf_map.fd = -1;
    if (perf_map_open_locked() < 0) {
        close_keeping_errno(parent_fd);
        return -1;
    }
    perf_map.inherited_fd = parent_fd;
    perf_map.inherited_size = parent_size;
    return 0;
}

/* Make sure this process's map file is open.  Caller holds the lock. */
static int
perf_map_ready_locked(void)
{
    if (perf_map_open_here()) {
        return 0;
    }
    /* Opening the file or starting the child's: not while the flusher
       writes to the old one. */
    wait_for_flusher_write_locked();
    if (perf_map.fd < 0) {
        return perf_map_open_locked();
    }
    /* A forked child's first use: the parent's map is still open. */
    return perf_map_fork_locked();
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

/* The high bit of each byte of x that is below 0x20 or is 0x7f (DEL),
   for x holding ASCII bytes, which have no high bit: a byte below 0x20
   borrows in the subtraction, and DEL becomes zero once xored with 0x7f.
   A borrow can mark a later byte too, but only after a byte that is
   marked rightly. */
static inline uint64_t
control_bytes(uint64_t x)
{
    const uint64_t ones = 0x0101010101010101u;
    return ((x - 0x20 * ones) | ((x ^ 0x7f * ones) - ones)) & (0x80 * ones);
}

/* How many bytes from s on, at most length, are printable ASCII (0x20 to
   0x7e)?  s is ASCII.  Eight bytes are tested at a time, and the last
   eight of a string of eight or more at once: names are mostly long file
   paths, and this is most of the cost of a map line. */
static Py_ssize_t
printable_ascii_run(const Py_UCS1 *s, Py_ssize_t length)
{
    uint64_t x;
    Py_ssize_t n = 0;
    for (; length - n >= 8; n += 8) {
        memcpy(&x, s + n, 8);
        if (control_bytes(x)) {
            break;
        }
    }
    if (length - n < 8 && n < length && length >= 8) {
        memcpy(&x, s + length - 8, 8);      /* covers s[n:length] */
        if (!control_bytes(x)) {
            return length;
        }
    }
    while (n < length && s[n] >= 0x20 && s[n] != 0x7f) {
        n++;
    }
    return n;
}

/* put_ascii() for text that needs escaping or cutting. */
static Py_NO_INLINE void
put_ascii_runs(name_writer *w, const Py_UCS1 *s, Py_ssize_t length)
{
    Py_ssize_t i = 0;
    while (i < length && !w->truncated) {
        Py_ssize_t end = i + printable_ascii_run(s + i, length - i);
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

/* ASCII text, the common case, is copied as it is when it has no control
   character and fits: one test and one copy. */
static inline void
put_ascii(name_writer *w, const Py_UCS1 *s, Py_ssize_t length)
{
    if (!w->truncated && (size_t)length <= w->limit - w->len
        && printable_ascii_run(s, length) == length)
    {
        memcpy(w->buf + w->len, s, (size_t)length);
        w->len += (size_t)length;
        return;
    }
    put_ascii_runs(w, s, length);
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
   would cost more than the rest of the line.)  Digits go two at a time. */
static char *
put_hex(char *out, uintptr_t value)
{
    static const char pairs[] =
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
        "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
        "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
        "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
        "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
        "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
        "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff";
    int bits = 64 - __builtin_clzll((unsigned long long)value | 1);
    size_t digits = (size_t)(bits + 3) / 4;
    char *end = out + digits;
    for (char *p = end; digits >= 2; digits -= 2, value >>= 8) {
        p -= 2;
        memcpy(p, pairs + 2 * (value & 0xff), 2);
    }
    if (digits == 1) {
        out[0] = pairs[2 * value + 1];      /* the top digit: value < 16 */
    }
    *end = ' ';
    return end + 1;
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

/* A name cut at the limit ends in "...". */
static void
end_name(name_writer *w)
{
    if (w->truncated) {
        memcpy(w->buf + w->len, "...", 3);
        w->len += 3;
        w->truncated = 0;
    }
}

static size_t
finish_entry(char *buf, name_writer *w)
{
    end_name(w);
    w->buf[w->len++] = '\n';
    return (size_t)(w->buf - buf) + w->len;
}

/* Where write_map_line() formats a line: not on the C stack of a caller
   that may have a small one.  Guarded by perf_map_lock. */
static char api_line[MAX_LINE_BYTES];

/* Append the line for [code_addr, code_addr + code_size) named by the
   UTF-8 string name to this process's map, opening it first if needed.
   Any thread may call this, with or without the GIL. */
static int
write_map_line(const void *code_addr, unsigned int code_size,
               const char *name)
{
    lock_perf_files();
    int res = perf_map_ready_locked();
    if (res == 0) {
        name_writer w = start_entry(api_line, code_addr, code_size);
        put_utf8(&w, name);
        res = perf_map_append_locked(api_line, finish_entry(api_line, &w));
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
   SIGKILL can lose the lines of the last 10 ms.  (With 1 ms, an import
   burst cost ten times the context switches: a wakeup and a lock
   handover per millisecond of new code.)  Lines of the
   PyUnstable API go out at once, as in CPython 3.12. */

#define PENDING_BYTES (64 * 1024)
#define FLUSH_DELAY_NS (10 * 1000 * 1000)
#define FLUSHER_STACK_SIZE (64 * 1024)

typedef struct {
    char data[PENDING_BYTES];   /* whole entries */
    size_t len;
    int error;                  /* errno of a failed write of them, or 0 */
} pending_buffer;

/* All fields are guarded by perf_map_lock. */
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
} pending;

/* What the flusher is writing: entries copied out of the pending buffers,
   which take new entries meanwhile.  Only the flusher uses it. */
static struct {
    char map[PENDING_BYTES];
    char jitdump[PENDING_BYTES];
} in_flight;

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

static void
wait_for_flusher_write_locked(void)
{
    while (pending.writing) {
        pthread_cond_wait(&pending.written, &perf_map_lock);
    }
}

static void
lock_perf_files(void)
{
    pthread_mutex_lock(&perf_map_lock);
    wait_for_flusher_write_locked();
}

static int jitdump_append_locked(const char *buf, size_t len);
static void adopt_parent_lines_locked(void);
static void copy_inherited_lines_locked(void);

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

static write_errors write_records(const char *records, size_t len,
                                  int to_map, write_errors err);

/* Write out buffered jitdump records (of a dump being filled from the
   map), then format the buffered line records and write their lines to
   the map (if to_map) and their records to the dump (if open here). */
static write_errors
write_entries(const char *records, size_t records_len, int to_map,
              const char *jitdump_data, size_t jitdump_len)
{
    write_errors err = {0, 0};
    if (jitdump_len > 0
        && jitdump_append_locked(jitdump_data, jitdump_len) < 0)
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
    if (pending.map.len > 0 && perf_map_ready_locked() < 0) {
        pending.map.error = errno;
        return 0;
    }
    return 1;
}

static void
flush_pending_locked(void)
{
    wait_for_flusher_write_locked();
    int to_map = map_writable_locked();
    keep_write_errors_locked(write_entries(pending.map.data, pending.map.len,
                                           to_map, pending.jitdump.data,
                                           pending.jitdump.len));
    pending.map.len = 0;
    pending.jitdump.len = 0;
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
    memcpy(in_flight.map, pending.map.data, map_len);
    memcpy(in_flight.jitdump, pending.jitdump.data, jitdump_len);
    pending.map.len = 0;
    pending.jitdump.len = 0;
    pending.writing = 1;
    pthread_mutex_unlock(&perf_map_lock);
    write_errors err = write_entries(in_flight.map, map_len, to_map,
                                     in_flight.jitdump, jitdump_len);
    pthread_mutex_lock(&perf_map_lock);
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

static void
flush_pending(void)
{
    lock_perf_files();
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
    pending.flusher_started = 1;
    pthread_cond_broadcast(&pending.written);
    while (is_designated_flusher()) {
        if (nothing_pending()) {
            pthread_cond_wait(&pending.wakeup, &perf_map_lock);
        }
        else if (pthread_cond_timedwait(&pending.wakeup, &perf_map_lock,
                                        &pending.due) == ETIMEDOUT) {
            write_due_entries_locked();
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
    pending.flusher_started = 0;
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
   thread holds the lock across the fork.  The child has no flusher.  A
   child that forks before it copied its own parent's lines (see
   adopt_parent_lines_locked) copies them now: its child could not. */
static void
fork_prepare(void)
{
    lock_perf_files();
    /* Not while the flusher is still starting: the C library (or a
       sanitizer's runtime, which has no fork handlers) may hold locks of
       its own in that thread, which the child would inherit held. */
    while (pending.flusher_owner == current_pid()
           && !pending.flusher_started)
    {
        pthread_cond_wait(&pending.written, &perf_map_lock);
    }
    flush_pending_locked();
    if (perf_map_open_here()) {
        copy_inherited_lines_locked();
    }
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
    pending.adopt = 0;              /* the child's first frame decides */
    init_flusher_conditions();      /* it may have had the flusher waiting */
    pthread_mutex_unlock(&perf_map_lock);
    hook_after_fork();
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
   holds perf_map_lock. */
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
   caller then writes the entries itself.  Caller holds perf_map_lock. */
static int
make_room_locked(pending_buffer *buffer, size_t len)
{
    if (buffer->len + len > PENDING_BYTES) {
        flush_pending_locked();
    }
    return schedule_flusher_locked();
}

/* Raise OSError for a failed operation on one of our files (errno set). */
static void
set_file_error(const char *what, const char *path, const char *refusal)
{
    if (refusal != NULL) {
        PyErr_Format(PyExc_OSError, "%s %s %s; not writing to it",
                     what, path, refusal);
    }
    else {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
}

static void
set_map_error(void)
{
    char path[64];
    perf_map_path(path, sizeof(path), current_pid());
    set_file_error("perf map file", path, perf_map.refusal);
}


/* ---------------------------------------------------------------------
   The perf_jit backend: /tmp/jit-<pid>.dump, in the jitdump format that
   `perf inject --jit` reads (Linux's tools/perf/util/jitdump.h).  For
   every trampoline it holds the code, the name and DWARF call frame
   information, from which perf inject makes a small ELF file per
   trampoline; perf's DWARF unwinder (--call-graph dwarf) then steps
   through trampolines in builds without frame pointers.  The perf map is
   kept as well: it lists every trampoline, so a switch to perf_jit and a
   fork() fill a new dump from it. */

#define JITDUMP_MAGIC 0x4A695444        /* "JiTD" */
#define JITDUMP_VERSION 1
#define JIT_CODE_LOAD 0
#define JIT_CODE_UNWINDING_INFO 4

#if defined(__x86_64__)
#  define JITDUMP_ELF_MACHINE 62        /* EM_X86_64 */
#elif defined(__aarch64__)
#  define JITDUMP_ELF_MACHINE 183       /* EM_AARCH64 */
#endif

typedef struct {
    uint32_t magic;
    uint32_t version;
    uint32_t total_size;
    uint32_t elf_mach;
    uint32_t pad1;
    uint32_t pid;
    uint64_t timestamp;
    uint64_t flags;
} jitdump_header;

typedef struct {
    uint32_t id;
    uint32_t total_size;
    uint64_t timestamp;
} jitdump_prefix;

/* Followed by the name, NUL-terminated, and the code. */
typedef struct {
    jitdump_prefix prefix;
    uint32_t pid;
    uint32_t tid;
    uint64_t vma;
    uint64_t code_addr;
    uint64_t code_size;
    uint64_t code_index;
} jitdump_code_load;

/* Followed by .eh_frame and .eh_frame_hdr; it describes the next
   code load. */
typedef struct {
    jitdump_prefix prefix;
    uint64_t unwinding_size;
    uint64_t eh_frame_hdr_size;
    uint64_t mapped_size;
} jitdump_unwinding;

/* All fields are guarded by perf_map_lock. */
static struct {
    int fd;                 /* -1 while no dump is open */
    pid_t owner;            /* the process that created the file */
    off_t size;             /* bytes of complete records in the file */
    void *marker;           /* the executable mapping perf records */
    size_t marker_size;
    uint64_t next_index;    /* names perf inject's jitted-<pid>-<n>.so */
    const char *refusal;
    int wanted;             /* perf_jit is the backend */
    off_t map_done;         /* the map's bytes whose trampolines it has */
} jitdump = {-1, 0, 0, NULL, 0, 0, NULL, 0, 0};

/* .eh_frame (a CIE, one FDE, a terminator) then .eh_frame_hdr for the
   template; the same bytes serve every trampoline. */
static struct {
    unsigned char data[192];
    size_t size;
    size_t hdr_size;
} unwind_tables;

/* The most one trampoline's records take. */
#define MAX_JITDUMP_BYTES (sizeof(jitdump_unwinding) \
                           + sizeof(unwind_tables.data) + 8 \
                           + sizeof(jitdump_code_load) + MAX_LINE_BYTES)

static void
jitdump_path(char *buf, size_t size, pid_t pid)
{
    snprintf(buf, size, "/tmp/jit-%ld.dump", (long)pid);
}

static void
set_jitdump_error(void)
{
    char path[64];
    jitdump_path(path, sizeof(path), current_pid());
    set_file_error("jitdump file", path, jitdump.refusal);
}

static uint64_t
monotonic_ns(void)
{
    /* perf record -k 1 stamps samples with this clock. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000 + (uint64_t)ts.tv_nsec;
}

/* A little writer for the DWARF bytes. */
typedef struct {
    unsigned char *buf;
    size_t len;
    size_t cap;
} byte_writer;

static void
put_byte(byte_writer *w, unsigned int byte)
{
    if (w->len < w->cap) {
        w->buf[w->len] = (unsigned char)byte;
    }
    w->len++;               /* an overflow shows as len > cap */
}

/* In the byte order of the machine, as perf reads the dump. */
static void
put_u32_at(byte_writer *w, size_t at, uint32_t value)
{
    for (int i = 0; i < 4; i++) {
#if PY_BIG_ENDIAN
        int shift = 8 * (3 - i);
#else
        int shift = 8 * i;
#endif
        if (at + i < w->cap) {
            w->buf[at + i] = (unsigned char)(value >> shift);
        }
    }
}

static void
put_u32(byte_writer *w, uint32_t value)
{
    put_u32_at(w, w->len, value);
    w->len += 4;
}

static void
put_sleb128(byte_writer *w, int value)
{
    for (;;) {
        unsigned int byte = value & 0x7f;
        value >>= 7;
        if ((value == 0 && !(byte & 0x40)) || (value == -1 && (byte & 0x40))) {
            put_byte(w, byte);
            return;
        }
        put_byte(w, byte | 0x80);
    }
}

/* DWARF call frame instructions used below.  Operands that fit in 7 bits
   are their own ULEB128 encoding. */
#define DW_CFA_advance_loc 0x40
#define DW_CFA_offset 0x80
#define DW_CFA_restore 0xc0
#define DW_CFA_def_cfa 0x0c
#define DW_CFA_def_cfa_register 0x0d
#define DW_CFA_def_cfa_offset 0x0e
#define DW_CFA_AARCH64_negate_ra_state 0x2d
#define DW_EH_PE_udata4 0x03
#define DW_EH_PE_sdata4 0x0b
#define DW_EH_PE_pcrel 0x10
#define DW_EH_PE_datarel 0x30

/* How the template's frame evolves: the CIE's parameters and the FDE's
   instructions, checked against the template's actual bytes. */
typedef struct {
    unsigned int code_align;
    int data_align;
    unsigned int return_column;
    unsigned char initial[8];
    size_t initial_len;
    unsigned char program[32];
    size_t program_len;
} frame_description;

#if defined(__x86_64__)
static int
describe_template(frame_description *d)
{
    static const unsigned char endbr64[] = {0xf3, 0x0f, 0x1e, 0xfa};
    static const unsigned char body[] = {
        0x55,                   /* push %rbp */
        0x48, 0x89, 0xe5,       /* mov %rsp, %rbp */
        0xff, 0xd1,             /* call *%rcx */
        0x5d,                   /* pop %rbp */
        0xc3,                   /* ret */
    };
    const unsigned char *code =
        (const unsigned char *)_Py_trampoline_func_start;
    size_t start = 0;
    if (template_size() >= sizeof(endbr64)
        && memcmp(code, endbr64, sizeof(endbr64)) == 0)
    {
        start = sizeof(endbr64);
    }
    if (template_size() != start + sizeof(body)
        || memcmp(code + start, body, sizeof(body)) != 0)
    {
        return -1;
    }
    const unsigned char initial[] = {
        DW_CFA_def_cfa, 7, 8,           /* CFA = rsp + 8 */
        DW_CFA_offset | 16, 1,          /* return address at CFA - 8 */
    };
    const unsigned char program[] = {
        DW_CFA_advance_loc | (start + 1),   /* after push %rbp */
        DW_CFA_def_cfa_offset, 16,
        DW_CFA_offset | 6, 2,               /* rbp at CFA - 16 */
        DW_CFA_advance_loc | 3,             /* after mov %rsp, %rbp */
        DW_CFA_def_cfa_register, 6,         /* CFA = rbp + 16 */
        DW_CFA_advance_loc | 3,             /* after call, pop %rbp */
        DW_CFA_def_cfa, 7, 8,
        DW_CFA_restore | 6,
    };
    d->code_align = 1;
    d->data_align = -8;
    d->return_column = 16;
    memcpy(d->initial, initial, sizeof(initial));
    d->initial_len = sizeof(initial);
    memcpy(d->program, program, sizeof(program));
    d->program_len = sizeof(program);
    return 0;
}
#elif defined(__aarch64__)
static int
describe_template(frame_description *d)
{
    enum {
        PACIASP = 0xd503233f, BTI_C = 0xd503245f, AUTIASP = 0xd50323bf,
        STP_FP_LR = 0xa9bf7bfd, MOV_FP_SP = 0x910003fd, BLR_X3 = 0xd63f0060,
        LDP_FP_LR = 0xa8c17bfd, RET = 0xd65f03c0,
    };
    uint32_t insn[8];
    size_t count = template_size() / 4;
    if (count > 8 || template_size() % 4 != 0) {
        return -1;
    }
    memcpy(insn, _Py_trampoline_func_start, template_size());
    size_t i = 0;
    int pac = 0;
    if (i < count && (insn[i] == PACIASP || insn[i] == BTI_C)) {
        pac = (insn[i] == PACIASP);
        i++;
    }
    static const uint32_t body[] = {STP_FP_LR, MOV_FP_SP, BLR_X3, LDP_FP_LR};
    size_t prologue = i;
    for (size_t k = 0; k < 4; k++, i++) {
        if (i >= count || insn[i] != body[k]) {
            return -1;
        }
    }
    if (pac && (i >= count || insn[i++] != AUTIASP)) {
        return -1;
    }
    if (i != count - 1 || insn[i] != RET) {
        return -1;
    }
    const unsigned char initial[] = {
        DW_CFA_def_cfa, 31, 0,              /* CFA = sp */
    };
    unsigned char program[32];
    size_t n = 0;
    if (pac) {
        program[n++] = DW_CFA_advance_loc | 1;  /* after paciasp */
        program[n++] = DW_CFA_AARCH64_negate_ra_state;
    }
    program[n++] = DW_CFA_advance_loc | (prologue + 1 - pac);  /* after stp */
    program[n++] = DW_CFA_def_cfa_offset;
    program[n++] = 16;
    program[n++] = DW_CFA_offset | 29;      /* x29 at CFA - 16 */
    program[n++] = 2;
    program[n++] = DW_CFA_offset | 30;      /* x30 at CFA - 8 */
    program[n++] = 1;
    program[n++] = DW_CFA_advance_loc | 1;  /* after mov x29, sp */
    program[n++] = DW_CFA_def_cfa_register;
    program[n++] = 29;
    program[n++] = DW_CFA_advance_loc | 2;  /* after blr, ldp */
    program[n++] = DW_CFA_def_cfa;
    program[n++] = 31;
    program[n++] = 0;
    program[n++] = DW_CFA_restore | 29;
    program[n++] = DW_CFA_restore | 30;
    if (pac) {
        program[n++] = DW_CFA_advance_loc | 1;  /* after autiasp */
        program[n++] = DW_CFA_AARCH64_negate_ra_state;
    }
    d->code_align = 4;
    d->data_align = -8;
    d->return_column = 30;
    memcpy(d->initial, initial, sizeof(initial));
    d->initial_len = sizeof(initial);
    memcpy(d->program, program, n);
    d->program_len = n;
    return 0;
}
#endif

/* Pad an .eh_frame entry that started at `start` to 8 bytes with
   DW_CFA_nop, and fill in its length. */
static void
end_cfi_entry(byte_writer *w, size_t start)
{
    while ((w->len - start) % 8 != 0) {
        put_byte(w, 0);
    }
    put_u32_at(w, start, (uint32_t)(w->len - start - 4));
}

/* Build unwind_tables.  perf inject places the code at an offset T that
   is a multiple of 16, .eh_frame at T + ALIGN_8(code size) and
   .eh_frame_hdr right after it; every pointer here is relative, so T
   itself never matters. */
static int
build_unwind_tables(void)
{
    frame_description d;
    if (unwind_tables.size != 0) {
        return 0;
    }
    if (describe_template(&d) < 0) {
        errno = ENOTSUP;
        return -1;
    }
    byte_writer w = {unwind_tables.data, 0, sizeof(unwind_tables.data)};
    int64_t code_to_eh_frame = (int64_t)((template_size() + 7) & ~(size_t)7);

    size_t cie = w.len;             /* the CIE */
    put_u32(&w, 0);                 /* length, filled in below */
    put_u32(&w, 0);                 /* CIE id */
    put_byte(&w, 1);                /* version */
    put_byte(&w, 'z');
    put_byte(&w, 'R');
    put_byte(&w, 0);
    put_byte(&w, d.code_align);
    put_sleb128(&w, d.data_align);
    put_byte(&w, d.return_column);
    put_byte(&w, 1);                /* augmentation data: */
    put_byte(&w, DW_EH_PE_pcrel | DW_EH_PE_sdata4);  /* FDE pointers */
    for (size_t i = 0; i < d.initial_len; i++) {
        put_byte(&w, d.initial[i]);
    }
    end_cfi_entry(&w, cie);

    size_t fde = w.len;             /* the FDE */
    put_u32(&w, 0);
    put_u32(&w, (uint32_t)(fde + 4 - cie));                 /* CIE pointer */
    put_u32(&w, (uint32_t)(-(code_to_eh_frame + (int64_t)fde + 8)));
    put_u32(&w, (uint32_t)template_size());                 /* range */
    put_byte(&w, 0);                /* no augmentation data */
    for (size_t i = 0; i < d.program_len; i++) {
        put_byte(&w, d.program[i]);
    }
    end_cfi_entry(&w, fde);
    put_u32(&w, 0);                 /* terminator */
    int64_t eh_frame_size = (int64_t)w.len;

    put_byte(&w, 1);                /* .eh_frame_hdr: version */
    put_byte(&w, DW_EH_PE_pcrel | DW_EH_PE_sdata4);     /* eh_frame_ptr */
    put_byte(&w, DW_EH_PE_udata4);                      /* fde_count */
    put_byte(&w, DW_EH_PE_datarel | DW_EH_PE_sdata4);   /* table */
    put_u32(&w, (uint32_t)(-(eh_frame_size + 4)));
    put_u32(&w, 1);
    put_u32(&w, (uint32_t)(-(code_to_eh_frame + eh_frame_size)));
    put_u32(&w, (uint32_t)((int64_t)fde - eh_frame_size));
    if (w.len > w.cap) {
        errno = ENOBUFS;
        return -1;
    }
    unwind_tables.hdr_size = w.len - (size_t)eh_frame_size;
    unwind_tables.size = w.len;
    return 0;
}

/* Is this process's dump open?  (After fork() the parent's may be.) */
static int
jitdump_open_here(void)
{
    return jitdump.fd >= 0 && jitdump.owner == current_pid();
}

/* As perf_map_append_locked(), for the jitdump. */
static int
jitdump_append_locked(const char *buf, size_t len)
{
    return append_entries(jitdump.fd, &jitdump.size, buf, len);
}

static void
jitdump_close_locked(void)
{
    flush_pending_locked();
    if (jitdump_open_here() && perf_map_open_here()) {
        /* Every trampoline the map lists is in the dump now: opened again
           (perf_jit switched back on), it needs only the later ones. */
        jitdump.map_done = perf_map.size;
    }
    if (jitdump.marker != NULL) {
        munmap(jitdump.marker, jitdump.marker_size);
        jitdump.marker = NULL;
    }
    if (jitdump.fd >= 0) {
        close(jitdump.fd);
        jitdump.fd = -1;
    }
}

/* Open this process's dump (emptied unless this process wrote it
   before), write the header if it is new, and map it executable: that
   mapping is how perf record learns of the file.  Caller holds
   perf_map_lock. */
static int
jitdump_open_locked(void)
{
    char path[64];
    pid_t pid = current_pid();
    if (build_unwind_tables() < 0) {
        return -1;
    }
    jitdump_path(path, sizeof(path), pid);
    int fd = open_output_file(path, jitdump.owner == pid, &jitdump.refusal,
                              &jitdump.size);
    if (fd < 0) {
        return -1;
    }
    jitdump.fd = fd;
    jitdump.owner = pid;
    if (jitdump.size == 0) {
        jitdump.map_done = 0;
        jitdump_header header = {
            .magic = JITDUMP_MAGIC,
            .version = JITDUMP_VERSION,
            .total_size = sizeof(jitdump_header),
            .elf_mach = JITDUMP_ELF_MACHINE,
            .pid = (uint32_t)pid,
            .timestamp = monotonic_ns(),
        };
        if (jitdump_append_locked((const char *)&header,
                                  sizeof(header)) < 0) {
            jitdump_close_locked();
            return -1;
        }
    }
    jitdump.marker_size = (size_t)sysconf(_SC_PAGESIZE);
    jitdump.marker = mmap(NULL, jitdump.marker_size, PROT_READ | PROT_EXEC,
                          MAP_PRIVATE, fd, 0);
    if (jitdump.marker == MAP_FAILED) {
        jitdump.marker = NULL;
        jitdump.refusal = "cannot be mapped executable (is /tmp noexec?)";
        jitdump_close_locked();
        return -1;
    }
    return 0;
}

/* Encode the records for one trampoline into buf (MAX_JITDUMP_BYTES):
   its unwinding tables, then its code load, both stamped with the time
   the trampoline was made.  Returns their length.  Called with the lock,
   or by the flusher while it writes (pending.writing). */
static size_t
encode_jitdump_load(char *buf, uintptr_t addr, const char *name,
                    size_t name_len, uint64_t timestamp)
{
    size_t unwinding_len = (sizeof(jitdump_unwinding) + unwind_tables.size
                            + 7) & ~(size_t)7;
    jitdump_unwinding unwinding = {
        .prefix = {JIT_CODE_UNWINDING_INFO, (uint32_t)unwinding_len,
                   timestamp},
        .unwinding_size = unwind_tables.size,
        .eh_frame_hdr_size = unwind_tables.hdr_size,
        .mapped_size = unwind_tables.size,
    };
    memset(buf, 0, unwinding_len);
    memcpy(buf, &unwinding, sizeof(unwinding));
    memcpy(buf + sizeof(unwinding), unwind_tables.data, unwind_tables.size);

    size_t load_len = sizeof(jitdump_code_load) + name_len + 1
                      + template_size();
    jitdump_code_load load = {
        .prefix = {JIT_CODE_LOAD, (uint32_t)load_len, timestamp},
        .pid = (uint32_t)current_pid(),
        /* The mapping belongs to the whole process; naming the main
           thread spares a gettid() per record. */
        .tid = (uint32_t)current_pid(),
        .vma = addr,
        .code_addr = addr,
        .code_size = template_size(),
        .code_index = jitdump.next_index++,
    };
    char *p = buf + unwinding_len;
    memcpy(p, &load, sizeof(load));
    p += sizeof(load);
    memcpy(p, name, name_len);
    p[name_len] = '\0';
    p += name_len + 1;
    /* The trampoline holds a copy of the template. */
    memcpy(p, _Py_trampoline_func_start, template_size());
    return unwinding_len + load_len;
}

/* Buffer the records of a trampoline named in the map: filling a dump.
   They are encoded in place (a trampoline's records are too big for the
   C stack of a small thread).  A failed write is kept with the buffer.
   Caller holds perf_map_lock. */
static void
jitdump_add_locked(uintptr_t addr, const char *name, size_t name_len)
{
    int no_flusher = make_room_locked(&pending.jitdump,
                                      MAX_JITDUMP_BYTES) < 0;
    pending.jitdump.len += encode_jitdump_load(
        pending.jitdump.data + pending.jitdump.len, addr, name, name_len,
        monotonic_ns());
    if (no_flusher) {
        flush_pending_locked();
    }
}

/* The address and name of a map line of ours ("<addr> <size> py::..."),
   or 0 for a line of someone else's (the PyUnstable API's users). */
static uintptr_t
parse_own_line(const char *line, size_t len, const char **name,
               size_t *name_len)
{
    char *end;
    uintptr_t addr = (uintptr_t)strtoull(line, &end, 16);
    if (*end != ' ') {
        return 0;
    }
    unsigned long long size = strtoull(end + 1, &end, 16);
    if (*end != ' ' || strncmp(end + 1, "py::", 4) != 0
        || size != template_size() || !is_trampoline((void *)addr))
    {
        return 0;
    }
    *name = end + 1;
    *name_len = (size_t)(line + len - *name);
    return addr;
}

static int
add_map_lines_to_jitdump(const char *lines, size_t len, void *Py_UNUSED(arg))
{
    const char *end = lines + len;
    while (lines < end) {
        const char *newline = memchr(lines, '\n', (size_t)(end - lines));
        const char *name;
        size_t name_len;
        uintptr_t addr = parse_own_line(lines, (size_t)(newline - lines),
                                        &name, &name_len);
        if (addr != 0) {
            jitdump_add_locked(addr, name, name_len);
        }
        lines = newline + 1;
    }
    return 0;
}

/* Make sure this process's dump is open.  It gets the trampolines of ours
   that the map lists and it does not have yet: all of them for a new dump
   (perf_jit turned on, or a fork; inherited ones included), those made
   since it was closed for one opened again.  Caller holds
   perf_map_lock. */
static int
jitdump_ready_locked(void)
{
    if (jitdump_open_here()) {
        return 0;
    }
    jitdump_close_locked();     /* a parent's (it waits for the flusher) */
    flush_pending_locked();
    if (perf_map_ready_locked() < 0) {
        return -1;
    }
    if (jitdump_open_locked() < 0) {
        return -1;
    }
    if (for_each_map_chunk(perf_map.fd, jitdump.map_done, perf_map.size,
                           add_map_lines_to_jitdump, NULL) < 0)
    {
        return -1;
    }
    jitdump.map_done = perf_map.size;
    return 0;
}

/* A forked child that has run Python for FLUSH_DELAY_NS (a worker, not a
   child about to exec or exit) gets its own map and dump with its
   parent's lines, naming the trampolines it inherited, which may be on
   its stack: a perf attached to it later (perf record -p) reads only the
   child's map.  Until then, and in a child that never gets there, perf
   names them from the parent's map (a profile that saw the fork clones
   the parent's mappings).  Errors are kept with the buffers.  Called by
   the flusher with perf_map_lock. */
static void
adopt_parent_lines_locked(void)
{
    pending.adopt = 0;
    if (perf_map_ready_locked() < 0) {
        pending.map.error = errno;
        return;
    }
    if (jitdump.wanted && jitdump_ready_locked() < 0) {
        pending.jitdump.error = errno;
    }
    copy_inherited_lines_locked();
}

/* Copy the parent's lines that this forked child has yet to copy into
   its map (and dump).  Caller holds perf_map_lock. */
static void
copy_inherited_lines_locked(void)
{
    if (perf_map.inherited_fd < 0) {
        return;
    }
    off_t from = perf_map.size;
    if (perf_map_copy_locked(perf_map.inherited_fd,
                             perf_map.inherited_size) < 0)
    {
        pending.map.error = errno;
    }
    else if (jitdump_open_here()
             && for_each_map_chunk(perf_map.fd, from, perf_map.size,
                                   add_map_lines_to_jitdump, NULL) < 0)
    {
        pending.jitdump.error = errno;
    }
    drop_inherited_map_locked();
}

/* Switch the dump on or off with the backend.  Returns -1 with an
   exception set if it cannot be opened. */
static int
jitdump_set_wanted(int wanted)
{
    lock_perf_files();
    int res = 0;
    jitdump.wanted = wanted;
    if (wanted) {
        res = jitdump_ready_locked();
        if (res < 0) {
            jitdump.wanted = 0;
            jitdump_close_locked();
        }
    }
    else {
        jitdump_close_locked();
    }
    perf_map_unlock();
    if (res < 0) {
        set_jitdump_error();
    }
    return res;
}

/* perf mode's own lines wait in pending.map as records, and are formatted
   when they are written out: by the flusher, off the thread that made
   the trampoline, or by whoever flushes.  Formatted at once, a line cost
   as much as the rest of a new code object, and all of it in cold code.
   A record is this header and the name.  The name is raw when both
   names are ASCII, "py::<qualname>:<filename>" as it is, control
   characters still to escape (cut after MAX_NAME_BYTES + 1 bytes, enough
   to tell that the line needs "..."); otherwise it is as the map shows
   it. */
typedef struct {
    uintptr_t addr;
    uint64_t timestamp;     /* when the trampoline was made, for jitdump */
    uint32_t name_len;
    uint32_t name_is_raw;
} line_record;

#define RAW_NAME_CAP (MAX_NAME_BYTES + 1)
#define MAX_RECORD_BYTES (sizeof(line_record) + MAX_NAME_BYTES + 8)

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
    name_writer w = {name, 0, MAX_NAME_BYTES, 0};
    put_ascii(&w, (const Py_UCS1 *)"py::", 4);
    put_unicode(&w, qualname);
    put_ascii(&w, (const Py_UCS1 *)":", 1);
    put_unicode(&w, filename);
    end_name(&w);
    *is_raw = 0;
    return w.len;
}

/* Buffer the record of a new trampoline for co.  Write errors (of a full
   buffer, or with no flusher) are kept with the buffers.  Caller holds
   perf_map_lock and the GIL, and has checked that the files are ready. */
static void
queue_code_record_locked(py_trampoline code, PyCodeObject *co)
{
    int no_flusher = make_room_locked(&pending.map, MAX_RECORD_BYTES) < 0;
    line_record record = {(uintptr_t)code,
                          jitdump.wanted ? monotonic_ns() : 0, 0, 0};
    char *at = pending.map.data + pending.map.len;
    record.name_len = (uint32_t)put_record_name(at + sizeof(record), co,
                                                &record.name_is_raw);
    memcpy(at, &record, sizeof(record));
    pending.map.len += sizeof(record) + record.name_len;
    if (no_flusher) {
        flush_pending_locked();
    }
}

/* Where write_records() formats lines and jitdump records before writing
   them.  One writer uses it at a time: the flusher while pending.writing
   is set, or a flush that holds the lock and has waited for the
   flusher. */
static struct {
    char map[PENDING_BYTES];
    size_t map_len;
    char jitdump[PENDING_BYTES];
    size_t jitdump_len;
} formatted;

static void
write_formatted(write_errors *err)
{
    if (formatted.map_len > 0 && err->map == 0
        && perf_map_append_locked(formatted.map, formatted.map_len) < 0)
    {
        err->map = errno;
    }
    if (formatted.jitdump_len > 0 && err->jitdump == 0
        && jitdump_append_locked(formatted.jitdump,
                                 formatted.jitdump_len) < 0)
    {
        err->jitdump = errno;
    }
    formatted.map_len = 0;
    formatted.jitdump_len = 0;
}

/* Format records[0:len] and write them: their lines to the map if to_map,
   their jitdump records to this process's dump if it is open.  Writing
   stops at a file's first error, kept in err. */
static write_errors
write_records(const char *records, size_t len, int to_map, write_errors err)
{
    int to_jitdump = jitdump_open_here();
    const char *p = records, *end = records + len;
    while (p < end) {
        line_record record;
        memcpy(&record, p, sizeof(record));
        const char *name = p + sizeof(record);
        p = name + record.name_len;
        if (PENDING_BYTES - formatted.map_len < MAX_LINE_BYTES
            || PENDING_BYTES - formatted.jitdump_len < MAX_JITDUMP_BYTES)
        {
            write_formatted(&err);
        }
        char *line = formatted.map + formatted.map_len;
        name_writer w = start_entry(line, (const void *)record.addr,
                                    template_size());
        if (record.name_is_raw) {
            put_ascii(&w, (const Py_UCS1 *)name, record.name_len);
        }
        else {
            memcpy(w.buf, name, record.name_len);
            w.len = record.name_len;
        }
        size_t line_len = finish_entry(line, &w);
        if (to_map) {
            formatted.map_len += line_len;
        }
        if (to_jitdump) {
            uint64_t made = record.timestamp ? record.timestamp
                                             : monotonic_ns();
            formatted.jitdump_len += encode_jitdump_load(
                formatted.jitdump + formatted.jitdump_len, record.addr,
                w.buf, w.len - 1, made);
        }
    }
    write_formatted(&err);
    return err;
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
        /* The dump misses records now: a later perf_jit starts a new one
           rather than add to this. */
        jitdump_close_locked();
        jitdump.owner = 0;
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
    if (perf_map_ready_locked() < 0) {
        return -1;
    }
    if (jitdump.wanted && jitdump_ready_locked() < 0) {
        return -2;
    }
    return 0;
}

/* Name a new trampoline in the map and, with perf_jit, in the dump: before
   its first use, as a sample may land in it right away (perf reads them
   when it reports).  Returns -1 with an exception set on failure. */
static int
announce_trampoline(py_trampoline code, PyCodeObject *co)
{
    pthread_mutex_lock(&perf_map_lock);
    int failed = outputs_ready_locked();
    if (failed == 0) {
        queue_code_record_locked(code, co);
        failed = take_write_error_locked();     /* of a write just made */
    }
    perf_map_unlock();      /* keeps errno */
    /* Exceptions only outside the lock: making one may run a finalizer,
       and Python code may need the lock. */
    if (failed == -1) {
        set_map_error();
    }
    else if (failed == -2) {
        set_jitdump_error();
    }
    return failed < 0 ? -1 : 0;
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

/* What co's slot index holds, or NULL.  Not necessarily a trampoline: it
   may be another tool's data (see is_trampoline). */
static inline void *
read_code_extra(PyCodeObject *co, Py_ssize_t index)
{
    code_extra_block *extra = (code_extra_block *)co->co_extra;
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

/* _PyCode_SetExtra() sizes a new block for every index requested so far,
   and code_dealloc() calls the free function of every index in the block,
   also for empty slots.  Perf mode gives nearly every code object a
   block, so other users' free functions would run for code objects they
   never touched (test_code's, a Python function, crashed at
   finalization).  A block we create holds no slot past ours; a later
   _PyCode_SetExtra() for a higher index grows it again. */
static void
trim_code_extra(PyCodeObject *co, Py_ssize_t index)
{
    code_extra_block *extra = (code_extra_block *)co->co_extra;
    if (extra->ce_size > index + 1) {
        extra->ce_size = index + 1;
    }
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
    if (announce_trampoline(code, co) < 0) {
        return NULL;
    }
    int new_block = (co->co_extra == NULL);
    if (_PyCode_SetExtra((PyObject *)co, index, (void *)code) < 0) {
        return NULL;
    }
    if (read_code_extra(co, index) != (void *)code) {
        fast.layout_broken = 1;
        fast.interp = NULL;
    }
    else if (new_block) {
        trim_code_extra(co, index);
    }
    return code;
}

static PyObject *py_trampoline_evaluator(PyThreadState *,
                                         _PyInterpreterFrame *, int);

/* Set once a failure has turned perf mode off with a warning: lines still
   buffered then may fail to be written too, and one warning is enough. */
static int failure_reported;

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
    failure_reported = 1;
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
    index = code_extra_index_for(co, tstate->interp, index);
    if (index < 0) {
        return NULL;
    }
    void *extra = NULL;
    (void)_PyCode_GetExtra((PyObject *)co, index, &extra);
    if (extra != NULL) {
        /* Another tool's data is never called, nor overwritten. */
        return is_trampoline(extra) ? (py_trampoline)extra : NULL;
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
   STACK_RESERVE bytes are left.  stack_limit starts at UINTPTR_MAX, so a
   thread's first frame takes the slow path, which finds the limit.

   Only the thread's own stack, from stack_low up, is judged: code
   may run on stacks the guard knows nothing of (fibers made with
   makecontext(), C coroutine libraries), and there it runs as on stock. */
#define STACK_RESERVE (256 * 1024)

static __thread uintptr_t stack_limit = UINTPTR_MAX;
static __thread uintptr_t stack_low;
static __thread int stack_limit_is_exact;

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
    stack_limit = 0;
    stack_low = 0;
    stack_limit_is_exact = 1;
    if (pthread_getattr_np(pthread_self(), &attr) != 0) {
        return;
    }
    if (pthread_attr_getstack(&attr, &base, &size) == 0) {
        size_t reserve = size / 4 < STACK_RESERVE ? size / 4 : STACK_RESERVE;
        stack_low = (uintptr_t)base;
        stack_limit = stack_low + reserve;
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
           && syscall(SYS_gettid) == current_pid();
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
        stack_limit = sp - (uintptr_t)limit.rlim_cur / 8;
        stack_limit_is_exact = 0;
        return;
    }
    find_exact_stack_limit();
}

/* Is the C stack nearly full?  Only where the thread's stack is known. */
static int
c_stack_nearly_full(void)
{
    uintptr_t sp = current_stack_address();
    if (stack_limit == UINTPTR_MAX) {
        find_stack_limit(sp);
    }
    if (sp <= stack_limit && !stack_limit_is_exact) {
        find_exact_stack_limit();
    }
    return sp <= stack_limit && sp >= stack_low;
}

/* Set in a forked child until it has its own map (and dump). */
static int adoption_pending;

/* In a forked child (fork_child): send the next frame down the slow path,
   which gives the child its own outputs. */
static void
hook_after_fork(void)
{
    fast.interp = NULL;
    adoption_pending = 1;
}

/* A forked child's first Python frame in perf mode: if it still runs
   FLUSH_DELAY_NS from now, its flusher gives it its own map with its
   parent's lines (adopt_parent_lines_locked).  A child that execs or
   exits before (most do: subprocess, multiprocessing's short tasks)
   copies nothing and leaves no file unless it made trampolines.  With no
   flusher, the copy is made now. */
static void
schedule_adoption(void)
{
    adoption_pending = 0;
    pthread_mutex_lock(&perf_map_lock);
    if (perf_map.fd >= 0 && !perf_map_open_here()) {     /* the parent's */
        if (schedule_flusher_locked() < 0) {
            wait_for_flusher_write_locked();
            adopt_parent_lines_locked();
        }
        else {
            pending.adopt = 1;
        }
    }
    pthread_mutex_unlock(&perf_map_lock);
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
    if (adoption_pending) {
        schedule_adoption();
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
        && current_stack_address() > stack_limit)
    {
        void *code = read_code_extra(frame->f_code, fast.index);
        if (is_trampoline(code)) {
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
        set_map_error();
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
        || jitdump_set_wanted(backend == PERF_JIT) < 0)
    {
        return -1;
    }
    if (arenas.next == NULL && new_arena() < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    _PyInterpreterState_SetEvalFrameFunc(interp, py_trampoline_evaluator);
    return 0;
}

/* sys.activate_stack_trampoline(name), name already checked to be a str
   without NUL characters. */
static int
activate_named(PyThreadState *tstate, const char *name)
{
    if (strcmp(name, "perf") == 0) {
        return activate(tstate, PERF_MAP);
    }
    if (strcmp(name, "perf_jit") == 0) {
        return activate(tstate, PERF_JIT);
    }
    PyErr_Format(PyExc_ValueError, "invalid backend: %s", name);
    return -1;
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
    int backend = perf_requested(config);
    if (backend == PERF_OFF) {
        return;
    }
    if (activate(tstate, backend) < 0) {
        disable_after_failure(tstate);
    }
}

/* Report a deferred write that failed after the last trampoline was made,
   so that no later one reported it. */
static void
warn_if_lines_lost(void)
{
    lock_perf_files();
    int map_err = take_error_locked(&pending.map);
    int jitdump_err = take_error_locked(&pending.jitdump);
    perf_map_unlock();
    if (failure_reported || (map_err == 0 && jitdump_err == 0)) {
        return;
    }
    char path[64];
    if (map_err != 0) {
        perf_map_path(path, sizeof(path), current_pid());
    }
    else {
        jitdump_path(path, sizeof(path), current_pid());
    }
    fprintf(stderr, "python: perf support disabled: cannot write %s: %s\n",
            path, strerror(map_err != 0 ? map_err : jitdump_err));
}

void
_PyPerfTrampoline_Fini(void)
{
    PyThreadState *tstate = _PyThreadState_GET();
    if (tstate != NULL) {
        deactivate(tstate->interp);
    }
    fast.interp = NULL;
    (void)jitdump_set_wanted(0);
    PyUnstable_PerfMapState_Fini();
    warn_if_lines_lost();
}

/* ---------------------------------------------------------------------
   The perf-map C API (Include/cpython/perfmap.h).  The map functions may
   be called from any thread, without the GIL; failures return -1 with
   errno set. */

int
PyUnstable_PerfMapState_Init(void)
{
    lock_perf_files();
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
    return write_map_line(code_addr, code_size, entry_name);
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
    lock_perf_files();
    flush_pending_locked();
    if (perf_map.fd >= 0) {
        close(perf_map.fd);
        perf_map.fd = -1;
    }
    drop_inherited_map_locked();
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
        lock_perf_files();
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
        return -1;
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

static PyObject *
sys_deactivate_stack_trampoline(PyObject *Py_UNUSED(module),
                                PyObject *Py_UNUSED(args))
{
    PyInterpreterState *interp = _PyInterpreterState_GET();
    if (refuse_foreign_hook(interp) < 0) {
        return NULL;
    }
    deactivate(interp);
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
