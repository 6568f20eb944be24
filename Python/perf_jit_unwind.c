/* The DWARF call frame information of the trampoline template, for the
   jitdump (perf_jit_trampoline.c): .eh_frame and .eh_frame_hdr, from
   which perf inject --jit makes each trampoline's ELF file unwindable, so
   that perf's DWARF unwinder steps through trampolines in builds without
   frame pointers.  The description is checked against the template's
   actual instructions; another template gets no tables (ENOTSUP) rather
   than wrong ones. */

#include "Python.h"

#ifdef PY_HAVE_PERF_TRAMPOLINE

#include "perf_internal.h"

#include <errno.h>

static struct {
    perf_unwind_tables tables;  /* built once; size 0 until then */
} unwind;

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
    size_t size = _PyPerfArena_TemplateSize();
    if (size >= sizeof(endbr64)
        && memcmp(code, endbr64, sizeof(endbr64)) == 0)
    {
        start = sizeof(endbr64);
    }
    if (size != start + sizeof(body)
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
    size_t size = _PyPerfArena_TemplateSize();
    size_t count = size / 4;
    if (count > 8 || size % 4 != 0) {
        return -1;
    }
    memcpy(insn, _Py_trampoline_func_start, size);
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

/* Build the tables.  perf inject places the code at an offset T that
   is a multiple of 16, .eh_frame at T + ALIGN_8(code size) and
   .eh_frame_hdr right after it; every pointer here is relative, so T
   itself never matters. */
static int
build_unwind_tables(void)
{
    frame_description d;
    if (describe_template(&d) < 0) {
        errno = ENOTSUP;
        return -1;
    }
    byte_writer w = {unwind.tables.data, 0, sizeof(unwind.tables.data)};
    size_t code_size = _PyPerfArena_TemplateSize();
    int64_t code_to_eh_frame = (int64_t)((code_size + 7) & ~(size_t)7);

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
    put_u32(&w, (uint32_t)code_size);                       /* range */
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
    unwind.tables.hdr_size = w.len - (size_t)eh_frame_size;
    unwind.tables.size = w.len;
    return 0;
}

const perf_unwind_tables *
_PyPerfUnwind_Tables(void)
{
    if (unwind.tables.size == 0 && build_unwind_tables() < 0) {
        return NULL;
    }
    return &unwind.tables;
}

#endif  /* PY_HAVE_PERF_TRAMPOLINE */
