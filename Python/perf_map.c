/* The perf map, /tmp/perf-<pid>.map: one line per trampoline (and per
   entry of the PyUnstable_PerfMap* API's users), which perf reads when it
   reports:

       <hex start> <hex size> py::<qualname>:<filename>

   Names are escaped so that a line stays one line of valid UTF-8, and cut
   with "..." after PERF_MAX_NAME_BYTES.  perf mode's own lines are
   written by perf_flusher.c; the API's lines go out at once. */

#include "Python.h"

#include <errno.h>

#ifdef PY_HAVE_PERF_TRAMPOLINE

#include "perf_internal.h"

#include <fcntl.h>                // open()
#include <stdio.h>                // snprintf()
#include <sys/stat.h>             // fstat()
#include <unistd.h>               // close()

/* The file is _PyPerfMap_output (at the end).  Guarded by the lock. */
static struct {
    int inherited_fd;   /* a forked child's copy of its parent's map, */
    off_t inherited_size;   /* whose lines it has yet to copy; or -1 */
    /* Where write_map_line() formats a line: not on the C stack of a
       caller that may have a small one. */
    char api_line[PERF_MAX_LINE_BYTES];
} perf_map = {.inherited_fd = -1};

#define MAP (&_PyPerfMap_output)

static int
append_map_lines(const char *lines, size_t len, void *Py_UNUSED(arg))
{
    return _PyPerfOutput_AppendLocked(MAP, lines, len);
}

/* Copy the complete lines of another map file into ours.  After fork()
   that is the parent's map, so that trampolines inherited by the child -
   including those of frames on its stack - resolve in the child's map
   too.  Caller holds the lock. */
static int
perf_map_copy_locked(int src_fd, off_t size)
{
    return _PyPerfFiles_ForEachLineChunk(src_fd, 0, size, append_map_lines,
                                         NULL);
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
   (see perf_flusher.c).  Caller holds the lock. */
static int
perf_map_fork_locked(void)
{
    _PyPerfFiles_ASSERT_LOCKED();
    int parent_fd = MAP->fd;
    off_t parent_size = MAP->size;
    /* The parent copied its own parent's lines before it forked. */
    assert(perf_map.inherited_fd < 0);
    MAP->fd = -1;
    if (_PyPerfOutput_OpenLocked(MAP) < 0) {
        _PyPerfFiles_CloseKeepingErrno(parent_fd);
        return -1;
    }
    perf_map.inherited_fd = parent_fd;
    perf_map.inherited_size = parent_size;
    return 0;
}

/* Make sure this process's map file is open.  Caller holds the lock. */
static int
map_ready_locked(void)
{
    _PyPerfFiles_ASSERT_LOCKED();
    if (_PyPerfOutput_IsOpenHere(MAP)) {
        return 0;
    }
    /* Opening the file or starting the child's: not while the flusher
       writes to the old one. */
    _PyPerfFlusher_WaitLocked();
    if (MAP->fd < 0) {
        return _PyPerfOutput_OpenLocked(MAP);
    }
    /* A forked child's first use: the parent's map is still open. */
    return perf_map_fork_locked();
}

int
_PyPerfMap_IsParentsLocked(void)
{
    return MAP->fd >= 0 && !_PyPerfOutput_IsOpenHere(MAP);
}

int
_PyPerfMap_ForEachLineLocked(off_t from, perf_lines_handler handle,
                             void *arg)
{
    _PyPerfFiles_ASSERT_LOCKED();
    return _PyPerfFiles_ForEachLineChunk(MAP->fd, from, MAP->size, handle,
                                         arg);
}

int
_PyPerfMap_HasInheritedLocked(void)
{
    return perf_map.inherited_fd >= 0;
}

int
_PyPerfMap_CopyInheritedLocked(void)
{
    _PyPerfFiles_ASSERT_LOCKED();
    int res = perf_map_copy_locked(perf_map.inherited_fd,
                                   perf_map.inherited_size);
    int saved_errno = errno;
    drop_inherited_map_locked();
    errno = saved_errno;
    return res;
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

static void
put_char(perf_name_writer *w, Py_UCS4 ch)
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
put_utf8(perf_name_writer *w, const char *s)
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

/* _PyPerfMap_PutAscii() for text that needs escaping or cutting. */
static Py_NO_INLINE void
put_ascii_runs(perf_name_writer *w, const Py_UCS1 *s, Py_ssize_t length)
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
void
_PyPerfMap_PutAscii(perf_name_writer *w, const Py_UCS1 *s, Py_ssize_t length)
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

void
_PyPerfMap_PutUnicode(perf_name_writer *w, PyObject *str)
{
    if (str == NULL || !PyUnicode_Check(str) || PyUnicode_READY(str) < 0) {
        put_utf8(w, "?");
        return;
    }
    if (PyUnicode_IS_ASCII(str)) {
        _PyPerfMap_PutAscii(w, PyUnicode_1BYTE_DATA(str),
                            PyUnicode_GET_LENGTH(str));
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

/* A map line is "<hex addr> <hex size> <name>\n".  StartEntry() writes
   the numbers into buf and returns a writer for the name; FinishEntry()
   ends the line and returns its length. */
perf_name_writer
_PyPerfMap_StartEntry(char *buf, const void *addr, size_t size)
{
    char *name = put_hex(put_hex(buf, (uintptr_t)addr), (uintptr_t)size);
    perf_name_writer w = {name, 0, PERF_MAX_NAME_BYTES, 0};
    return w;
}

/* A name cut at the limit ends in "...". */
void
_PyPerfMap_EndName(perf_name_writer *w)
{
    if (w->truncated) {
        memcpy(w->buf + w->len, "...", 3);
        w->len += 3;
        w->truncated = 0;
    }
}

size_t
_PyPerfMap_FinishEntry(char *buf, perf_name_writer *w)
{
    _PyPerfMap_EndName(w);
    w->buf[w->len++] = '\n';
    return (size_t)(w->buf - buf) + w->len;
}

/* Append the line for [code_addr, code_addr + code_size) named by the
   UTF-8 string name to this process's map, opening it first if needed.
   Any thread may call this, with or without the GIL. */
static int
write_map_line(const void *code_addr, unsigned int code_size,
               const char *name)
{
    _PyPerfFiles_Lock();
    int res = map_ready_locked();
    if (res == 0) {
        char *line = perf_map.api_line;
        perf_name_writer w = _PyPerfMap_StartEntry(line, code_addr,
                                                   code_size);
        put_utf8(&w, name);
        res = _PyPerfOutput_AppendLocked(MAP, line,
                                         _PyPerfMap_FinishEntry(line, &w));
    }
    _PyPerfFiles_Unlock();
    return res;
}

/* The map line of a trampoline named as the map shows it. */
static size_t
encode_line(char *buf, uintptr_t addr, const char *name, size_t name_len,
            uint64_t Py_UNUSED(made))
{
    perf_name_writer w = _PyPerfMap_StartEntry(buf, (const void *)addr,
                                               _PyPerfArena_TemplateSize());
    memcpy(w.buf, name, name_len);
    w.len = name_len;
    return _PyPerfMap_FinishEntry(buf, &w);
}

static void
map_close_locked(void)
{
    if (MAP->fd >= 0) {
        close(MAP->fd);
        MAP->fd = -1;
    }
    drop_inherited_map_locked();
}

perf_output _PyPerfMap_output = {
    .what = "perf map file",
    .path_format = "/tmp/perf-%ld.map",
    .ready_locked = map_ready_locked,
    .encode = encode_line,
    .max_entry = PERF_MAX_LINE_BYTES,
    .close_locked = map_close_locked,
    /* Perf mode stops; perf reads the lines the map has. */
    .restart_after_error = 0,
    .wanted = 1,
    .fd = -1,
};

/* ---------------------------------------------------------------------
   The perf-map C API (Include/cpython/perfmap.h).  The map functions may
   be called from any thread, without the GIL; failures return -1 with
   errno set. */

int
PyUnstable_PerfMapState_Init(void)
{
    _PyPerfFiles_Lock();
    int res = map_ready_locked();
    _PyPerfFiles_Unlock();
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
PyUnstable_PerfMapState_Fini(void)
{
    /* Perf mode, if active, opens the map again (appending) when it next
       needs it, and starts a new flusher. */
    _PyPerfFlusher_Stop();
    _PyPerfFiles_Lock();
    _PyPerfFlusher_FlushLocked();
    map_close_locked();
    _PyPerfFiles_Unlock();
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
        _PyPerfFiles_Lock();
        res = map_ready_locked();
        if (res == 0) {
            off_t from = MAP->size;
            res = perf_map_copy_locked(fd, st.st_size);
            _PyPerfJit_AddCopiedLinesLocked(from);
            /* At once, as the copy: the caller may not hold the GIL, and
               the hook may not poll for them (perf_flusher.c). */
            _PyPerfFlusher_FlushLocked();
        }
        _PyPerfFiles_Unlock();
    }
    _PyPerfFiles_CloseKeepingErrno(fd);
    return res;
}

#else  /* !PY_HAVE_PERF_TRAMPOLINE */

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

#endif  /* PY_HAVE_PERF_TRAMPOLINE */
