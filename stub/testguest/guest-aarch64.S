// smolvm test guest for aarch64: the same program as guest.S (x86_64), entered
// at EL1 with the MMU off (PSTATE EL1h, interrupts masked, SP_EL1 set by the VMM).
//
// It exists to test the VMM (boot, pause, snapshot, resume), not as a product
// guest. Layout constants mirror stub/src/testguest_aarch64.rs; keep them in
// sync. The bytes are checked in there (TEXT); a test re-assembles this file
// when aarch64-linux-gnu-as is installed and compares.
//
// The x86 guest's I/O ports are MMIO here: port P is the byte at PORTS + P
// (arch::aarch64::layout::PORT_WINDOW). Every device access is a plain
// load/store with an immediate offset and no write-back, so that KVM's
// data-abort syndrome describes it (ISV=1) and it reaches the VMM as an MMIO exit.
//
//  - probes an unclaimed MMIO address once: the read must be all ones;
//  - keeps fixed values in x19-x24 and checks them every loop;
//  - keeps a shadow of the counter in x25 and checks it against memory;
//  - every REPORT_EVERY iterations fills a 4 KiB block from the counter and
//    reports counter and block checksum through the report port (4 x 32 bit);
//  - when the counter reaches LIMIT it writes the line
//    "smolvm test guest: counter=<decimal> status=<decimal>\n" to the console
//    port and then EXIT_STATUS to the exit port. A machine saved at that point
//    and resumed goes on counting: one more iteration, then the line and the
//    exit again.
// Failure statuses (after the same line): 3 register invariant broken, 4
// unclaimed MMIO did not read as all ones, 5 counter shadow mismatch.

    .set RAM,           0x80000000
    .set PARAMS_HI,     0x8000      // PARAMS = RAM + 0x2000: u64 report_every, limit, exit_status
    .set COUNTER_HI,    0x8020      // COUNTER = RAM + 0x200000
    .set BLOCK_OFF,     0x1000      // BLOCK = COUNTER + 0x1000
    .set BLOCK_QWORDS,  512
    .set PORTS_HI,      0x0900      // PORTS = 0x09000000
    .set REPORT_PORT,   0x510
    .set EXIT_PORT,     0xf4
    .set CONSOLE_PORT,  0xe9
    .set UNCLAIMED_HI,  0x0d00      // 0x0d000000: no device there

    .text
    .globl _start
_start:
    movz    x28, #PORTS_HI, lsl #16
    movz    x27, #PARAMS_HI, lsl #16
    add     x27, x27, #0x2000
    movz    x26, #COUNTER_HI, lsl #16
    // Unclaimed MMIO: the write is ignored, the read returns all ones.
    movz    x0, #UNCLAIMED_HI, lsl #16
    movz    w1, #0xef01
    movk    w1, #0xabcd, lsl #16
    str     w1, [x0]
    ldr     w2, [x0]
    cmn     w2, #1
    b.ne    fail_unclaimed

    ldr     x19, =0x1111111111111111
    ldr     x20, =0x2222222222222222
    ldr     x21, =0x3333333333333333
    ldr     x22, =0x4444444444444444
    ldr     x23, =0x5555555555555555
    ldr     x24, =0x6666666666666666
    ldr     x25, [x26]

loop:
    ldr     x0, =0x1111111111111111
    cmp     x0, x19
    b.ne    fail_regs
    ldr     x0, =0x2222222222222222
    cmp     x0, x20
    b.ne    fail_regs
    ldr     x0, =0x3333333333333333
    cmp     x0, x21
    b.ne    fail_regs
    ldr     x0, =0x4444444444444444
    cmp     x0, x22
    b.ne    fail_regs
    ldr     x0, =0x5555555555555555
    cmp     x0, x23
    b.ne    fail_regs
    ldr     x0, =0x6666666666666666
    cmp     x0, x24
    b.ne    fail_regs

    ldr     x0, [x26]
    cmp     x0, x25
    b.ne    fail_shadow
    add     x0, x0, #1
    str     x0, [x26]
    add     x25, x25, #1

    ldr     x1, [x27]
    udiv    x2, x0, x1
    msub    x3, x2, x1, x0
    cbnz    x3, check_limit
    bl      report

check_limit:
    ldr     x0, [x26]
    ldr     x1, [x27, #8]
    cmp     x0, x1
    b.lo    loop

    ldr     x0, [x27, #16]
    bl      finish
    b       loop
done:
    wfi
    b       done

// Write the status line to the console port, then the status (x0's low byte)
// to the exit port. Preserves every register but x0 and the flags (a saved
// machine resumes right after the exit port write, inside this function).
finish:
    stp     x29, x30, [sp, #-16]!
    stp     x1, x2, [sp, #-16]!
    stp     x3, x4, [sp, #-16]!
    stp     x5, x6, [sp, #-16]!
    stp     x7, x8, [sp, #-16]!
    and     x8, x0, #0xff
    adr     x1, msg_counter
    mov     x2, #(msg_status - msg_counter)
    bl      puts
    ldr     x0, [x26]
    bl      put_decimal
    adr     x1, msg_status
    mov     x2, #(msg_end - msg_status)
    bl      puts
    mov     x0, x8
    bl      put_decimal
    mov     w3, #10
    strb    w3, [x28, #CONSOLE_PORT]
    strb    w8, [x28, #EXIT_PORT]
    ldp     x7, x8, [sp], #16
    ldp     x5, x6, [sp], #16
    ldp     x3, x4, [sp], #16
    ldp     x1, x2, [sp], #16
    ldp     x29, x30, [sp], #16
    ret

// Write x2 bytes from x1 to the console port. Clobbers x1-x3.
puts:
    ldrb    w3, [x1], #1
    strb    w3, [x28, #CONSOLE_PORT]
    subs    x2, x2, #1
    b.ne    puts
    ret

// Write x0 in decimal to the console port. Clobbers x0, x4-x7.
put_decimal:
    sub     sp, sp, #32
    mov     x4, #10
    mov     x5, #0
1:
    udiv    x6, x0, x4
    msub    x7, x6, x4, x0
    add     x7, x7, #'0'
    strb    w7, [sp, x5]
    add     x5, x5, #1
    mov     x0, x6
    cbnz    x0, 1b
2:
    sub     x5, x5, #1
    ldrb    w7, [sp, x5]
    strb    w7, [x28, #CONSOLE_PORT]
    cbnz    x5, 2b
    add     sp, sp, #32
    ret

// Fill the block from the counter, checksum it, and report both.
// Clobbers x9-x14.
report:
    add     x9, x26, #BLOCK_OFF
    ldr     x10, [x26]
    mov     x11, #0
    mov     x12, #0
    ldr     x13, =0x9e3779b97f4a7c15
fill:
    add     x14, x11, #1
    mul     x14, x14, x10
    eor     x14, x14, x13
    str     x14, [x9, x11, lsl #3]
    ror     x12, x12, #59
    eor     x12, x12, x14
    add     x11, x11, #1
    cmp     x11, #BLOCK_QWORDS
    b.lo    fill

    str     w10, [x28, #REPORT_PORT]
    lsr     x14, x10, #32
    str     w14, [x28, #(REPORT_PORT + 4)]
    str     w12, [x28, #(REPORT_PORT + 8)]
    lsr     x14, x12, #32
    str     w14, [x28, #(REPORT_PORT + 12)]
    ret

fail_regs:
    mov     x0, #3
    b       fail
fail_unclaimed:
    mov     x0, #4
    b       fail
fail_shadow:
    mov     x0, #5
fail:
    bl      finish
    b       done

msg_counter:
    .ascii  "smolvm test guest: counter="
msg_status:
    .ascii  " status="
msg_end:
    .balign 8
    .ltorg
