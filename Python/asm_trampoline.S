/* The perf trampoline template (see Python/perf_trampoline.c).

   Python/perf_arena.c copies the bytes between _Py_trampoline_func_start
   and _Py_trampoline_func_end once per code object, so the code must be
   position independent.  Its C signature is

       PyObject *trampoline(PyThreadState *tstate, _PyInterpreterFrame *frame,
                            int throwflag, evaluator eval);

   and it returns eval(tstate, frame, throwflag).  It builds a standard frame
   record, so frame-pointer unwinders (perf record -g) step through it and
   report its return address, the one address perf names for the code
   object. */

    .text
    .globl  _Py_trampoline_func_start
    .type   _Py_trampoline_func_start, @function
    .p2align 4
_Py_trampoline_func_start:
#if defined(__x86_64__)
#if defined(__CET__) && (__CET__ & 1)
    endbr64                     /* indirect-branch landing pad (IBT) */
#endif
    push    %rbp
    mov     %rsp, %rbp
    call    *%rcx               /* eval(tstate, frame, throwflag) */
    pop     %rbp
    ret
#elif defined(__aarch64__)
#if defined(__ARM_FEATURE_PAC_DEFAULT)
    paciasp                     /* sign lr; also a BTI landing pad */
#elif defined(__ARM_FEATURE_BTI_DEFAULT)
    bti     c
#endif
    stp     x29, x30, [sp, #-16]!
    mov     x29, sp
    blr     x3                  /* eval(tstate, frame, throwflag) */
    ldp     x29, x30, [sp], #16
#if defined(__ARM_FEATURE_PAC_DEFAULT)
    autiasp
#endif
    ret
#else
#  error "perf trampolines support x86_64 and aarch64 only"
#endif
    .globl  _Py_trampoline_func_end
_Py_trampoline_func_end:
    .size   _Py_trampoline_func_start, . - _Py_trampoline_func_start

    .section .note.GNU-stack, "", %progbits

/* A GNU property note saying which control-flow protections the template
   supports.  The linker ANDs the notes of all objects: without this one, a
   build with -fcf-protection (x86_64) or -mbranch-protection (aarch64)
   would silently lose IBT/SHSTK or BTI for the whole binary. */
#if defined(__x86_64__) && defined(__CET__)
#  define CF_PROPERTY_TYPE 0xc0000002   /* GNU_PROPERTY_X86_FEATURE_1_AND */
#  define CF_PROPERTY_BITS (__CET__ & 3)  /* IBT 1, SHSTK 2 */
#elif defined(__aarch64__) && (defined(__ARM_FEATURE_BTI_DEFAULT) || \
                               defined(__ARM_FEATURE_PAC_DEFAULT))
#  define CF_PROPERTY_TYPE 0xc0000000   /* GNU_PROPERTY_AARCH64_FEATURE_1_AND */
#  if defined(__ARM_FEATURE_BTI_DEFAULT) && defined(__ARM_FEATURE_PAC_DEFAULT)
#    define CF_PROPERTY_BITS 3          /* BTI 1, PAC 2 */
#  elif defined(__ARM_FEATURE_BTI_DEFAULT)
#    define CF_PROPERTY_BITS 1
#  else
#    define CF_PROPERTY_BITS 2
#  endif
#endif
#ifdef CF_PROPERTY_TYPE
    .section .note.gnu.property, "a"
    .p2align 3
    .long   4                   /* name size: "GNU" and its NUL */
    .long   16                  /* descriptor size */
    .long   5                   /* NT_GNU_PROPERTY_TYPE_0 */
    .asciz  "GNU"
    .long   CF_PROPERTY_TYPE
    .long   4                   /* property data size */
    .long   CF_PROPERTY_BITS
    .long   0                   /* pad the descriptor to 8 bytes */
#endif
