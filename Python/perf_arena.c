/* Executable memory for perf trampolines.

   Trampolines live in mmap'd arenas that are filled with copies of the
   template (Python/asm_trampoline.S) while writable and then made
   read+execute (never W+X).  Arenas are never unmapped: a frame may still
   return into a trampoline after perf mode was turned off, and code
   objects (static ones, leaked ones) can outlive an interpreter.  Since
   every trampoline is the same code, a stale pointer into an arena still
   behaves correctly.  All of it runs with the GIL. */

#include "Python.h"

#ifdef PY_HAVE_PERF_TRAMPOLINE

#include "perf_internal.h"

#include <errno.h>
#include <sys/mman.h>             // mmap()
#include <unistd.h>               // sysconf()

/* Arenas start small and double up to a cap, so a program with a million
   code objects needs only a few dozen mappings.  An arena is filled
   whole when it is made, so the first is small: `python -c pass` makes
   about 170 trampolines (16 bytes each), and each page filled costs a
   page fault and a share of start-up (a 64 KiB first arena cost it 16
   faults). */
#define ARENA_MIN_SIZE (16 * 1024)
#define ARENA_MAX_SIZE (4 * 1024 * 1024)

/* Room left free at the end of each arena.  perf inject --jit maps each
   trampoline's code together with its unwinding tables (see
   perf_jit_trampoline.c), a little more than the trampoline itself; the
   reserve keeps that from reaching into an arena mapped right after. */
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

/* Shared with the hook (see perf_internal.h); changed only here. */
_PyPerfArena_State _PyPerfArena;

size_t
_PyPerfArena_TemplateSize(void)
{
    return (size_t)(_Py_trampoline_func_end - _Py_trampoline_func_start);
}

static size_t
trampoline_stride(void)
{
    size_t size = _PyPerfArena_TemplateSize();
    size_t align = PERF_TRAMPOLINE_ALIGN;
    return (size + align - 1) & ~(align - 1);
}

/* Fill the first len bytes (whole strides) of a fresh, zeroed mapping with
   copies of the template: one copy, then copies of all that is filled so
   far, so that a 4 MiB arena takes 19 memcpy() calls rather than one per
   trampoline. */
static void
fill_with_template(char *mem, size_t len)
{
    size_t stride = trampoline_stride();
    memcpy(mem, _Py_trampoline_func_start, _PyPerfArena_TemplateSize());
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
            _PyPerfArena.region = mem;
            _PyPerfArena.region_size = size;
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
    size_t last = _PyPerfArena.last_size;
    size_t size = last ? last * 2 : ARENA_MIN_SIZE;
    if (size > ARENA_MAX_SIZE) {
        size = ARENA_MAX_SIZE;
    }
    size_t left = _PyPerfArena.region_size - _PyPerfArena.region_used;
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
    if (_PyPerfArena.region == NULL && reserve_region() < 0) {
        return -1;
    }
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t size = next_arena_size(page);
    if (size == 0) {
        errno = ENOMEM;
        return -1;
    }
    char *mem = _PyPerfArena.region + _PyPerfArena.region_used;
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
    _PyPerfArena.region_used += size + page;
    _PyPerfArena.owner = _PyPerfFiles_Pid();
    _PyPerfArena.next = mem;
    _PyPerfArena.end = mem + count * stride;
    _PyPerfArena.last_size = size;
    return 0;
}

/* Hand out the next trampoline.  Returns NULL with errno set on failure.

   After fork() the child starts a new arena: perf names addresses in a
   mapping after the process that mapped it, so samples in an arena the
   parent mapped are looked up in the parent's map, which never learns of
   the child's trampolines.  Those of the child must live in its own
   mapping. */
py_trampoline
_PyPerfArena_Allocate(void)
{
    if (_PyPerfArena.next == NULL || _PyPerfArena.next == _PyPerfArena.end
        || _PyPerfArena.owner != _PyPerfFiles_Pid())
    {
        if (new_arena() < 0) {
            return NULL;
        }
    }
    char *code = _PyPerfArena.next;
    _PyPerfArena.next += trampoline_stride();
    return (py_trampoline)(void *)code;
}

/* Map the first arena, so that turning perf mode on reports a failure to
   map one rather than the first call. */
int
_PyPerfArena_Prepare(void)
{
    if (_PyPerfArena.next == NULL) {
        return new_arena();
    }
    return 0;
}

#endif  /* PY_HAVE_PERF_TRAMPOLINE */
