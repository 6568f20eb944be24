/* The files of perf support: the pid they are named after, the lock
   that guards them, and how they are opened, appended to and read.

   Our files (/tmp/perf-<pid>.map, /tmp/jit-<pid>.dump) are in a directory
   anyone can write to, so an existing file is used only if it is a
   regular file of ours with no other link, and a symbolic link is never
   followed.  They are written one whole entry per write(); a failed or
   short write is cut away, so a file only ever holds complete entries. */

#include "Python.h"

#ifdef PY_HAVE_PERF_TRAMPOLINE

#include "perf_internal.h"

#include <errno.h>
#include <fcntl.h>                // open()
#include <stdio.h>                // snprintf()
#include <sys/stat.h>             // fstat()
#include <unistd.h>               // write(), getpid()

pthread_mutex_t _PyPerfFiles_mutex = PTHREAD_MUTEX_INITIALIZER;

static struct {
    /* getpid() is a system call (glibc stopped caching it), and arenas
       and the map need the pid for every new trampoline, to notice a
       fork.  A fork handler keeps this copy. */
    pid_t pid;
    pthread_once_t process_hooks_once;
    /* Where _PyPerfFiles_ForEachLineChunk() reads.  Not on the C stack:
       it runs on threads whose stacks may be 32 KiB (fork, activation,
       the C API).  Guarded by the lock. */
    char chunk[64 * 1024];
} files = {0, PTHREAD_ONCE_INIT, {0}};

void
_PyPerfFiles_RefreshPid(void)
{
    files.pid = getpid();
}

/* The process hooks (perf_flusher.c) are installed on first use. */
pid_t
_PyPerfFiles_Pid(void)
{
    pthread_once(&files.process_hooks_once,
                 _PyPerfFlusher_InstallProcessHooks);
    return files.pid;
}

/* The flusher writes without the lock (see perf_flusher.c): whoever uses
   the files themselves takes the lock and waits for that write. */
void
_PyPerfFiles_Lock(void)
{
    pthread_mutex_lock(&_PyPerfFiles_mutex);
    _PyPerfFlusher_WaitLocked();
}

void
_PyPerfFiles_Unlock(void)
{
    int saved_errno = errno;
    pthread_mutex_unlock(&_PyPerfFiles_mutex);
    errno = saved_errno;
}

/* Cleanup on an error path must not clobber the errno it reports. */
void
_PyPerfFiles_CloseKeepingErrno(int fd)
{
    int saved_errno = errno;
    close(fd);
    errno = saved_errno;
}

/* Refuse an existing file we must not write into: *refusal says why.
   Fills *st. */
static int
check_output_file(int fd, struct stat *st, const char **refusal)
{
    if (fstat(fd, st) < 0) {
        return -1;
    }
    if (!S_ISREG(st->st_mode)) {
        *refusal = "is not a regular file";
        errno = EINVAL;
        return -1;
    }
    if (st->st_uid != geteuid()) {
        *refusal = "is owned by another user";
        errno = EPERM;
        return -1;
    }
    if (st->st_nlink != 1) {
        *refusal = "has other hard links";
        errno = EMLINK;
        return -1;
    }
    if ((st->st_mode & 07777) != 0600 && fchmod(fd, 0600) < 0) {
        return -1;
    }
    return 0;
}

/* Open one of our files in /tmp for appending, emptied unless keep is
   set, and tell its size.  Returns the descriptor, or -1 with errno (and
   maybe *refusal) set. */
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
    if (check_output_file(fd, &st, refusal) < 0
        || fcntl(fd, F_SETFL, O_APPEND) < 0)
    {
        _PyPerfFiles_CloseKeepingErrno(fd);
        return -1;
    }
    /* A stale file of an earlier process with our pid is emptied; a new
       one is not truncated: on ext4, a file truncated to 0 is written back
       as soon as it is closed (auto_da_alloc), which cost each short
       process about 1% of its run. */
    if (!keep && st.st_size > 0) {
        if (ftruncate(fd, 0) < 0) {
            _PyPerfFiles_CloseKeepingErrno(fd);
            return -1;
        }
        st.st_size = 0;
    }
    *size = st.st_size;
    return fd;
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

/* Call handle() on the complete lines of the file open as src_fd from
   byte `offset` up to byte `size`, a chunk at a time. */
int
_PyPerfFiles_ForEachLineChunk(int src_fd, off_t offset, off_t size,
                              perf_lines_handler handle, void *arg)
{
    _PyPerfFiles_ASSERT_LOCKED();
    char *buf = files.chunk;
    while (offset < size) {
        size_t want = sizeof(files.chunk);
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
            if ((size_t)n < sizeof(files.chunk)) {
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

void
_PyPerfOutput_Path(const perf_output *out, char *buf, size_t size)
{
    snprintf(buf, size, out->path_format, (long)_PyPerfFiles_Pid());
}

int
_PyPerfOutput_OpenLocked(perf_output *out)
{
    _PyPerfFiles_ASSERT_LOCKED();
    char path[64];
    pid_t pid = _PyPerfFiles_Pid();
    _PyPerfOutput_Path(out, path, sizeof(path));
    int fd = open_output_file(path, out->owner == pid, &out->refusal,
                              &out->size);
    if (fd < 0) {
        return -1;
    }
    out->fd = fd;
    out->owner = pid;
    return 0;
}

int
_PyPerfOutput_IsOpenHere(const perf_output *out)
{
    return out->fd >= 0 && out->owner == _PyPerfFiles_Pid();
}

int
_PyPerfOutput_AppendLocked(perf_output *out, const char *buf, size_t len)
{
    return append_entries(out->fd, &out->size, buf, len);
}

void
_PyPerfOutput_SetError(const perf_output *out)
{
    char path[64];
    _PyPerfOutput_Path(out, path, sizeof(path));
    if (out->refusal != NULL) {
        PyErr_Format(PyExc_OSError, "%s %s %s; not writing to it",
                     out->what, path, out->refusal);
    }
    else {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
}

#endif  /* PY_HAVE_PERF_TRAMPOLINE */
