/* The perf_jit backend: /tmp/jit-<pid>.dump, in the jitdump format that
   `perf inject --jit` reads (Linux's tools/perf/util/jitdump.h).  For
   every trampoline it holds the code, the name and DWARF call frame
   information, from which perf inject makes a small ELF file per
   trampoline; perf's DWARF unwinder (--call-graph dwarf) then steps
   through trampolines in builds without frame pointers.  The perf map is
   kept as well: it lists every trampoline, so a switch to perf_jit and a
   fork() fill a new dump from it. */

#include "Python.h"

#ifdef PY_HAVE_PERF_TRAMPOLINE

#include "perf_internal.h"

#include <errno.h>
#include <stdio.h>                // snprintf()
#include <sys/mman.h>             // mmap()
#include <time.h>                 // clock_gettime()
#include <unistd.h>               // close(), sysconf()

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

/* The file is _PyPerfJit_output (at the end).  All fields are guarded
   by the files' lock. */
static struct {
    void *marker;           /* the executable mapping perf records */
    size_t marker_size;
    uint64_t next_index;    /* names perf inject's jitted-<pid>-<n>.so */
    off_t map_done;         /* the map's bytes whose trampolines it has */
    const perf_unwind_tables *unwind;   /* set when a dump is opened */
} jitdump;

#define DUMP (&_PyPerfJit_output)
#define MAP (&_PyPerfMap_output)

uint64_t
_PyPerfJit_Now(void)
{
    /* perf record -k 1 stamps samples with this clock. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000 + (uint64_t)ts.tv_nsec;
}

static void
jitdump_close_locked(void)
{
    _PyPerfFiles_ASSERT_LOCKED();
    _PyPerfFlusher_FlushLocked();
    if (_PyPerfOutput_IsOpenHere(DUMP) && _PyPerfOutput_IsOpenHere(MAP)) {
        /* Every trampoline the map lists is in the dump now: opened again
           (perf_jit switched back on), it needs only the later ones. */
        jitdump.map_done = MAP->size;
    }
    if (jitdump.marker != NULL) {
        munmap(jitdump.marker, jitdump.marker_size);
        jitdump.marker = NULL;
    }
    if (DUMP->fd >= 0) {
        close(DUMP->fd);
        DUMP->fd = -1;
    }
}

/* Open this process's dump (emptied unless this process wrote it
   before), write the header if it is new, and map it executable: that
   mapping is how perf record learns of the file.  Caller holds the
   lock. */
static int
jitdump_open_locked(void)
{
    _PyPerfFiles_ASSERT_LOCKED();
    jitdump.unwind = _PyPerfUnwind_Tables();
    if (jitdump.unwind == NULL || _PyPerfOutput_OpenLocked(DUMP) < 0) {
        return -1;
    }
    if (DUMP->size == 0) {
        jitdump.map_done = 0;
        jitdump_header header = {
            .magic = JITDUMP_MAGIC,
            .version = JITDUMP_VERSION,
            .total_size = sizeof(jitdump_header),
            .elf_mach = JITDUMP_ELF_MACHINE,
            .pid = (uint32_t)DUMP->owner,
            .timestamp = _PyPerfJit_Now(),
        };
        if (_PyPerfOutput_AppendLocked(DUMP, (const char *)&header,
                                       sizeof(header)) < 0) {
            jitdump_close_locked();
            return -1;
        }
    }
    jitdump.marker_size = (size_t)sysconf(_SC_PAGESIZE);
    jitdump.marker = mmap(NULL, jitdump.marker_size, PROT_READ | PROT_EXEC,
                          MAP_PRIVATE, DUMP->fd, 0);
    if (jitdump.marker == MAP_FAILED) {
        jitdump.marker = NULL;
        DUMP->refusal = "cannot be mapped executable (is /tmp noexec?)";
        jitdump_close_locked();
        return -1;
    }
    return 0;
}

/* Encode the records for one trampoline into buf (PERF_MAX_JITDUMP_BYTES):
   its unwinding tables, then its code load, both stamped with the time
   the trampoline was made (0: now).  Returns their length.  Called with
   the lock, or by the flusher while it writes. */
static size_t
encode_load(char *buf, uintptr_t addr, const char *name, size_t name_len,
            uint64_t timestamp)
{
    Py_BUILD_ASSERT(sizeof(jitdump_unwinding)
                    == PERF_JITDUMP_UNWINDING_BYTES);
    Py_BUILD_ASSERT(sizeof(jitdump_code_load)
                    == PERF_JITDUMP_CODE_LOAD_BYTES);
    const perf_unwind_tables *tables = jitdump.unwind;
    if (timestamp == 0) {
        timestamp = _PyPerfJit_Now();   /* made before perf_jit was on */
    }
    size_t code_size = _PyPerfArena_TemplateSize();
    size_t unwinding_len = (sizeof(jitdump_unwinding) + tables->size
                            + 7) & ~(size_t)7;
    jitdump_unwinding unwinding = {
        .prefix = {JIT_CODE_UNWINDING_INFO, (uint32_t)unwinding_len,
                   timestamp},
        .unwinding_size = tables->size,
        .eh_frame_hdr_size = tables->hdr_size,
        .mapped_size = tables->size,
    };
    memset(buf, 0, unwinding_len);
    memcpy(buf, &unwinding, sizeof(unwinding));
    memcpy(buf + sizeof(unwinding), tables->data, tables->size);

    size_t load_len = sizeof(jitdump_code_load) + name_len + 1 + code_size;
    jitdump_code_load load = {
        .prefix = {JIT_CODE_LOAD, (uint32_t)load_len, timestamp},
        .pid = (uint32_t)_PyPerfFiles_Pid(),
        /* The mapping belongs to the whole process; naming the main
           thread spares a gettid() per record. */
        .tid = (uint32_t)_PyPerfFiles_Pid(),
        .vma = addr,
        .code_addr = addr,
        .code_size = code_size,
        .code_index = jitdump.next_index++,
    };
    char *p = buf + unwinding_len;
    memcpy(p, &load, sizeof(load));
    p += sizeof(load);
    memcpy(p, name, name_len);
    p[name_len] = '\0';
    p += name_len + 1;
    /* The trampoline holds a copy of the template. */
    memcpy(p, _Py_trampoline_func_start, code_size);
    return unwinding_len + load_len;
}

/* A number as perf_map.c writes one, then a space: lowercase hex digits
   without leading zeros, at most 16.  Returns what follows the space, or
   NULL. */
static const char *
parse_own_hex(const char *p, const char *end, uintptr_t *value)
{
    const char *start = p;
    uintptr_t v = 0;
    for (; p < end && p - start < 17; p++) {
        int digit = (*p >= '0' && *p <= '9') ? *p - '0'
                    : (*p >= 'a' && *p <= 'f') ? *p - 'a' + 10 : -1;
        if (digit < 0) {
            break;
        }
        v = v << 4 | (uintptr_t)digit;
    }
    size_t digits = (size_t)(p - start);
    if (digits == 0 || digits > 16 || (digits > 1 && *start == '0')
        || p == end || *p != ' ')
    {
        return NULL;
    }
    *value = v;
    return p + 1;
}

/* The length of the UTF-8 sequence at p that perf_map.c may write: a
   printable ASCII character, or a valid multi-byte sequence of a code
   point from U+00A0 on that is no surrogate (it escapes C0, DEL and C1
   controls).  0 for anything else: a NUL would end the dump's name
   early, and perf's readers want UTF-8. */
static size_t
own_char_length(const unsigned char *p, const unsigned char *end)
{
    if (*p < 0x80) {
        return (*p >= 0x20 && *p != 0x7f) ? 1 : 0;
    }
    size_t len = *p >= 0xf0 ? 4 : *p >= 0xe0 ? 3 : *p >= 0xc0 ? 2 : 0;
    if (len == 0 || *p > 0xf4 || (size_t)(end - p) < len) {
        return 0;
    }
    uint32_t cp = *p & (0x7f >> len);
    for (size_t i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80) {
            return 0;
        }
        cp = cp << 6 | (p[i] & 0x3f);
    }
    static const uint32_t least[] = {0, 0, 0xa0, 0x800, 0x10000};
    if (cp < least[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
        return 0;
    }
    return len;
}

static int
is_name_like_ours(const char *name, size_t len)
{
    const unsigned char *p = (const unsigned char *)name;
    const unsigned char *end = p + len;
    while (p < end) {
        size_t n = own_char_length(p, end);
        if (n == 0) {
            return 0;
        }
        p += n;
    }
    return 1;
}

/* The address and name of a map line of ours ("<addr> <size> py::...",
   len bytes without its "\n"), or 0 for any other line: the PyUnstable
   API's users', or one that perf_map.c cannot have written (numbers
   written otherwise, a name too long or with characters it escapes). */
static uintptr_t
parse_own_line(const char *line, size_t len, const char **name,
               size_t *name_len)
{
    const char *end = line + len;
    uintptr_t addr, size;
    const char *p = parse_own_hex(line, end, &addr);
    p = p ? parse_own_hex(p, end, &size) : NULL;
    if (p == NULL || end - p < 4 || memcmp(p, "py::", 4) != 0
        || size != _PyPerfArena_TemplateSize()
        || !_PyPerfArena_IsTrampoline((void *)addr))
    {
        return 0;
    }
    *name = p;
    *name_len = (size_t)(end - p);
    if (*name_len > PERF_MAX_WRITTEN_NAME_BYTES
        || !is_name_like_ours(*name, *name_len))
    {
        return 0;
    }
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
            _PyPerfFlusher_QueueJitdumpLocked(addr, name, name_len);
        }
        lines = newline + 1;
    }
    return 0;
}

int
_PyPerfJit_AddMapLinesLocked(off_t from)
{
    return _PyPerfMap_ForEachLineLocked(from, add_map_lines_to_jitdump, NULL);
}

void
_PyPerfJit_AddCopiedLinesLocked(off_t from)
{
    _PyPerfFiles_ASSERT_LOCKED();
    int saved_errno = errno;
    if (_PyPerfOutput_IsOpenHere(DUMP)
        && _PyPerfJit_AddMapLinesLocked(from) < 0)
    {
        DUMP->error = errno;
    }
    errno = saved_errno;
}

/* Make sure this process's dump is open.  It gets the trampolines of ours
   that the map lists and it does not have yet: all of them for a new dump
   (perf_jit turned on, or a fork; inherited ones included), those made
   since it was closed for one opened again.  Caller holds the lock. */
static int
dump_ready_locked(void)
{
    _PyPerfFiles_ASSERT_LOCKED();
    if (_PyPerfOutput_IsOpenHere(DUMP)) {
        return 0;
    }
    jitdump_close_locked();     /* a parent's (it waits for the flusher) */
    _PyPerfFlusher_FlushLocked();
    if (MAP->ready_locked() < 0) {
        return -1;
    }
    if (jitdump_open_locked() < 0) {
        return -1;
    }
    if (_PyPerfJit_AddMapLinesLocked(jitdump.map_done) < 0) {
        return -1;
    }
    jitdump.map_done = MAP->size;
    return 0;
}

/* Switch the dump on or off with the backend.  Returns -1 with an
   exception set if it cannot be opened. */
int
_PyPerfJit_SetWanted(int wanted)
{
    _PyPerfFiles_Lock();
    int res = 0;
    DUMP->wanted = wanted;
    if (wanted) {
        res = dump_ready_locked();
        if (res < 0) {
            DUMP->wanted = 0;
            jitdump_close_locked();
        }
    }
    else {
        jitdump_close_locked();
    }
    _PyPerfFiles_Unlock();
    if (res < 0) {
        _PyPerfOutput_SetError(DUMP);
    }
    return res;
}

perf_output _PyPerfJit_output = {
    .what = "jitdump file",
    .path_format = "/tmp/jit-%ld.dump",
    .ready_locked = dump_ready_locked,
    .encode = encode_load,
    .max_entry = PERF_MAX_JITDUMP_BYTES,
    .close_locked = jitdump_close_locked,
    /* perf inject reads a dump as a whole: a later perf_jit starts a new
       one rather than add to one that misses records. */
    .restart_after_error = 1,
    .fd = -1,
};

#endif  /* PY_HAVE_PERF_TRAMPOLINE */
