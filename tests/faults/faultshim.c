/* An LD_PRELOAD shim for tests/test_faults.py: makes chosen system calls
   of perf support fail, the way a full disk, an exhausted address space or
   an SELinux policy would.  Configured by environment variables, read once
   when the shim is loaded:

     FAULT_ARENA_SIZE=N    an mprotect() of exactly N bytes to
                           read+write fails with ENOMEM: making a perf
                           arena of N bytes out of the reservation.
                           Perf arenas are 16 KiB doubling up to 4 MiB.
                           (mmap() is left alone: the C library and
                           Python map 16 KiB read+write themselves.)
     FAULT_RESERVE=1       mmap() of an anonymous PROT_NONE reservation of
                           16 MiB or more fails with ENOMEM (a tight
                           address-space limit, ulimit -v).
     FAULT_MPROTECT_EXEC=1 mprotect() to an executable protection fails
                           with EACCES (SELinux's execmem denial).
     FAULT_MAP_OPEN=E      opening a /tmp/perf-*.map file fails with errno
                           E (a number).
     FAULT_MAP_WRITE=E     write() to a /tmp/perf-*.map file fails with
                           errno E; with E=0 it writes half of the buffer
                           (a short write) and then fails with ENOSPC.
     FAULT_FILE=jitdump    FAULT_MAP_OPEN and FAULT_MAP_WRITE act on
                           /tmp/jit-*.dump files (perf_jit) instead;
     FAULT_FILE=both       on both kinds of file; FAULT_FILE=map (or
                           unset) on the map only.
     FAULT_THREAD=E        pthread_create() fails with E (a number): the
                           process is out of threads.
     FAULT_AFTER=N         the first N calls that match succeed.  */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static long arena_size = -1;
static int reserve_fails;
static int mprotect_exec;
static int map_open_errno;
static int map_write_errno = -1;
static int thread_errno;
static long passes_left;
static int target_map = 1;
static int target_jitdump = 0;

static long
env_number(const char *name, long fallback)
{
    const char *value = getenv(name);
    return value != NULL ? strtol(value, NULL, 10) : fallback;
}

__attribute__((constructor)) static void
read_config(void)
{
    arena_size = env_number("FAULT_ARENA_SIZE", -1);
    reserve_fails = (int)env_number("FAULT_RESERVE", 0);
    mprotect_exec = (int)env_number("FAULT_MPROTECT_EXEC", 0);
    map_open_errno = (int)env_number("FAULT_MAP_OPEN", 0);
    map_write_errno = (int)env_number("FAULT_MAP_WRITE", -1);
    thread_errno = (int)env_number("FAULT_THREAD", 0);
    passes_left = env_number("FAULT_AFTER", 0);
    const char *file = getenv("FAULT_FILE");
    if (file != NULL) {
        target_map = strcmp(file, "jitdump") != 0;
        target_jitdump = strcmp(file, "map") != 0;
    }
}

/* A matching call: fail it unless FAULT_AFTER still lets it pass. */
static int
should_fail(void)
{
    if (passes_left > 0) {
        passes_left--;
        return 0;
    }
    return 1;
}

static int
has_form(const char *path, const char *prefix, const char *suffix)
{
    size_t len = path != NULL ? strlen(path) : 0;
    size_t prefix_len = strlen(prefix), suffix_len = strlen(suffix);
    return len > prefix_len + suffix_len
           && strncmp(path, prefix, prefix_len) == 0
           && strcmp(path + len - suffix_len, suffix) == 0;
}

/* One of the files faults are aimed at (FAULT_FILE)? */
static int
is_target_path(const char *path)
{
    return (target_map && has_form(path, "/tmp/perf-", ".map"))
           || (target_jitdump && has_form(path, "/tmp/jit-", ".dump"));
}

static int
is_target_fd(int fd)
{
    char link[64], target[4096];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof(target) - 1);
    if (n < 0) {
        return 0;
    }
    target[n] = '\0';
    return is_target_path(target);
}

#define REAL(name) \
    static __typeof__(name) *real_##name; \
    if (real_##name == NULL) { \
        real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name); \
    }

static int
failed_mmap(size_t len, int prot, int flags)
{
    int reservation = reserve_fails && prot == PROT_NONE
                      && len >= ((size_t)16 << 20);
    if (reservation && (flags & MAP_ANONYMOUS) && should_fail()) {
        errno = ENOMEM;
        return 1;
    }
    return 0;
}

/* With _FILE_OFFSET_BITS=64, as CPython builds, calls to mmap() and
   open() go to mmap64() and open64(). */
void *
mmap(void *addr, size_t len, int prot, int flags, int fd, off_t offset)
{
    REAL(mmap);
    return failed_mmap(len, prot, flags)
           ? MAP_FAILED : real_mmap(addr, len, prot, flags, fd, offset);
}

void *
mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t offset)
{
    REAL(mmap64);
    return failed_mmap(len, prot, flags)
           ? MAP_FAILED : real_mmap64(addr, len, prot, flags, fd, offset);
}

int
mprotect(void *addr, size_t len, int prot)
{
    REAL(mprotect);
    if (mprotect_exec && (prot & PROT_EXEC) && should_fail()) {
        errno = EACCES;
        return -1;
    }
    if ((long)len == arena_size && prot == (PROT_READ | PROT_WRITE)
        && should_fail())
    {
        errno = ENOMEM;
        return -1;
    }
    return real_mprotect(addr, len, prot);
}

static int
failed_open(const char *path)
{
    if (map_open_errno != 0 && is_target_path(path) && should_fail()) {
        errno = map_open_errno;
        return 1;
    }
    return 0;
}

/* The mode argument of open() and friends, there with O_CREAT. */
#define MODE_ARG(flags, mode) \
    do { \
        va_list ap; \
        va_start(ap, flags); \
        mode = ((flags) & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0; \
        va_end(ap); \
    } while (0)

int
open(const char *path, int flags, ...)
{
    REAL(open);
    mode_t mode;
    MODE_ARG(flags, mode);
    return failed_open(path) ? -1 : real_open(path, flags, mode);
}

int
open64(const char *path, int flags, ...)
{
    REAL(open64);
    mode_t mode;
    MODE_ARG(flags, mode);
    return failed_open(path) ? -1 : real_open64(path, flags, mode);
}

int
openat(int dirfd, const char *path, int flags, ...)
{
    REAL(openat);
    mode_t mode;
    MODE_ARG(flags, mode);
    return failed_open(path) ? -1 : real_openat(dirfd, path, flags, mode);
}

int
openat64(int dirfd, const char *path, int flags, ...)
{
    REAL(openat64);
    mode_t mode;
    MODE_ARG(flags, mode);
    return failed_open(path) ? -1 : real_openat64(dirfd, path, flags, mode);
}

ssize_t
write(int fd, const void *buf, size_t count)
{
    REAL(write);
    static int disk_full;   /* after a short write, everything fails */
    if (map_write_errno < 0 || !is_target_fd(fd)) {
        return real_write(fd, buf, count);
    }
    if (disk_full) {
        errno = ENOSPC;
        return -1;
    }
    if (!should_fail()) {
        return real_write(fd, buf, count);
    }
    if (map_write_errno == 0 && count > 1) {
        disk_full = 1;
        return real_write(fd, buf, count / 2);
    }
    errno = map_write_errno != 0 ? map_write_errno : ENOSPC;
    return -1;
}

int
pthread_create(pthread_t *thread, const pthread_attr_t *attr,
               void *(*start)(void *), void *arg)
{
    REAL(pthread_create);
    if (thread_errno != 0 && should_fail()) {
        return thread_errno;
    }
    return real_pthread_create(thread, attr, start, arg);
}
