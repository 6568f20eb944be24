/* The perf trampoline template (see Python/perf_trampoline.c).

   Python/perf_trampoline.c copies the bytes between _Py_trampoline_func_start
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
