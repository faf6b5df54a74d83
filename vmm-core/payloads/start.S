/* The payload ABI's registers are the System V calling convention's first
 * four arguments: main(ram_size, disks, vcpu, vcpus). RSP is 16-byte
 * aligned, so enter main by a call, as crt0 does; its return value ends
 * the run through port 0xf4. */
    .section .text.start, "ax"
    .globl _start
_start:
    call payload_main
    out %eax, $0xf4
1:  jmp 1b
    /* No executable stack. */
    .section .note.GNU-stack, "", @progbits
