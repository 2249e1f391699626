# smolvm test guest: a tiny x86_64 program entered directly in 64-bit mode.
#
# It exists to test the VMM (boot, pause, snapshot, resume), not as a product
# guest. Layout constants mirror stub/src/testguest.rs; keep them in sync.
#
#  - probes an unclaimed I/O port and an unclaimed MMIO address once: both must
#    read back as all ones (the VMM ignores the writes);
#  - keeps fixed values in rbx, rbp, r12-r15 and checks them every loop;
#  - keeps a shadow of the counter in rsi and checks it against memory;
#  - every REPORT_EVERY iterations fills a 4 KiB block from the counter and
#    reports counter and block checksum through the report port;
#  - when the counter reaches LIMIT it writes the line
#    "smolvm test guest: counter=<decimal> status=<decimal>\n" to the console
#    port (like the Bochs/QEMU debug console, one `rep outsb`) and then
#    EXIT_STATUS to the exit port. A machine saved at that point and resumed
#    goes on counting: one more iteration, then the line and the exit again.
#
# Exit codes it reports on failure (after the same line): 3 register
# invariant broken, 4 unclaimed port/MMIO did not read as all ones, 5 counter
# shadow mismatch.

    .set PARAMS,        0x2000      # u64 report_every, u64 limit, u64 exit_status
    .set COUNTER,       0x200000
    .set BLOCK,         0x201000
    .set BLOCK_QWORDS,  512
    .set REPORT_PORT,   0x510
    .set EXIT_PORT,     0xf4
    .set CONSOLE_PORT,  0xe9
    .set UNCLAIMED_PORT, 0x0cfc
    .set UNCLAIMED_MMIO, 0xd0000000

    .code64
    .text
    .globl _start
_start:
    # Unclaimed port: the write is ignored, the read returns all ones.
    mov     $UNCLAIMED_PORT, %dx
    mov     $0x12345678, %eax
    out     %eax, %dx
    in      %dx, %eax
    cmp     $0xffffffff, %eax
    jne     fail_unclaimed
    # Unclaimed MMIO: same contract.
    mov     $UNCLAIMED_MMIO, %edi
    movl    $0xabcdef01, (%rdi)
    mov     (%rdi), %eax
    cmp     $0xffffffff, %eax
    jne     fail_unclaimed

    movabs  $0x1111111111111111, %rbx
    movabs  $0x2222222222222222, %rbp
    movabs  $0x3333333333333333, %r12
    movabs  $0x4444444444444444, %r13
    movabs  $0x5555555555555555, %r14
    movabs  $0x6666666666666666, %r15
    mov     COUNTER, %rsi

loop:
    movabs  $0x1111111111111111, %rax
    cmp     %rax, %rbx
    jne     fail_regs
    movabs  $0x2222222222222222, %rax
    cmp     %rax, %rbp
    jne     fail_regs
    movabs  $0x3333333333333333, %rax
    cmp     %rax, %r12
    jne     fail_regs
    movabs  $0x4444444444444444, %rax
    cmp     %rax, %r13
    jne     fail_regs
    movabs  $0x5555555555555555, %rax
    cmp     %rax, %r14
    jne     fail_regs
    movabs  $0x6666666666666666, %rax
    cmp     %rax, %r15
    jne     fail_regs

    mov     COUNTER, %rax
    cmp     %rax, %rsi
    jne     fail_shadow
    inc     %rax
    mov     %rax, COUNTER
    inc     %rsi

    xor     %edx, %edx
    mov     PARAMS, %rcx
    div     %rcx
    test    %rdx, %rdx
    jnz     check_limit
    call    report

check_limit:
    mov     COUNTER, %rax
    cmp     PARAMS+8, %rax
    jb      loop

    mov     PARAMS+16, %rax
    call    finish
    jmp     loop
done:
    hlt
    jmp     done

# Write the status line to the console port, then the status (al) to the exit
# port. Preserves every register but rax and the flags (a saved machine
# resumes right after the exit port write, inside this function).
finish:
    push    %rsi
    push    %rdi
    push    %rcx
    push    %rdx
    push    %r8
    movzbl  %al, %eax
    push    %rax
    sub     $96, %rsp
    cld
    mov     %rsp, %rdi
    lea     msg_counter(%rip), %rsi
    mov     $(msg_status - msg_counter), %ecx
    rep movsb
    mov     COUNTER, %rax
    call    put_decimal
    lea     msg_status(%rip), %rsi
    mov     $(msg_end - msg_status), %ecx
    rep movsb
    mov     96(%rsp), %rax
    call    put_decimal
    movb    $10, (%rdi)
    inc     %rdi
    mov     %rdi, %rcx
    sub     %rsp, %rcx
    mov     %rsp, %rsi
    mov     $CONSOLE_PORT, %dx
    rep outsb
    mov     96(%rsp), %rax
    mov     $EXIT_PORT, %dx
    out     %al, %dx
    add     $104, %rsp
    pop     %r8
    pop     %rdx
    pop     %rcx
    pop     %rdi
    pop     %rsi
    ret

# Store rax in decimal at (%rdi) and advance rdi. Clobbers rax, rcx, rdx, r8.
put_decimal:
    mov     $10, %r8d
    xor     %ecx, %ecx
1:
    xor     %edx, %edx
    div     %r8
    add     $'0', %dl
    push    %rdx
    inc     %ecx
    test    %rax, %rax
    jnz     1b
2:
    pop     %rax
    stosb
    dec     %ecx
    jnz     2b
    ret

# Fill the block from the counter, checksum it, and report both.
# Clobbers rax, rcx, rdx, rdi, r8-r10.
report:
    mov     $BLOCK, %edi
    mov     COUNTER, %r8
    xor     %ecx, %ecx
    xor     %r9d, %r9d
    movabs  $0x9e3779b97f4a7c15, %r10
fill:
    lea     1(%rcx), %rax
    imul    %r8, %rax
    xor     %r10, %rax
    mov     %rax, (%rdi,%rcx,8)
    rol     $5, %r9
    xor     %rax, %r9
    inc     %ecx
    cmp     $BLOCK_QWORDS, %ecx
    jb      fill

    mov     $REPORT_PORT, %dx
    mov     %r8, %rax
    out     %eax, %dx
    shr     $32, %rax
    add     $4, %dx
    out     %eax, %dx
    mov     %r9, %rax
    add     $4, %dx
    out     %eax, %dx
    shr     $32, %rax
    add     $4, %dx
    out     %eax, %dx
    ret

fail_regs:
    mov     $3, %al
    jmp     fail
fail_unclaimed:
    mov     $4, %al
    jmp     fail
fail_shadow:
    mov     $5, %al
fail:
    call    finish
    jmp     done

msg_counter:
    .ascii  "smolvm test guest: counter="
msg_status:
    .ascii  " status="
msg_end:
