/* Two vCPUs: each enters with its index in RDX, the count in RCX and its
 * own stack. vCPU 1 reports its stack pointer through memory and parks;
 * vCPU 0 waits for it and checks. Ends with 0, or the failing step. */
#include "payload.h"

static volatile u64 seen_rsp[2];
static volatile u32 arrived;

u32 payload_main(u64 ram, u64 disks, u64 vcpu, u64 vcpus) {
    u64 rsp, spins = 0;
    (void)ram; (void)disks;
    __asm__ volatile("mov %%rsp, %0" : "=r"(rsp));
    if (vcpus != 2) fail(1, "expected 2 vCPUs");
    if (vcpu == 1) {
        seen_rsp[1] = rsp;
        __atomic_store_n(&arrived, 1, __ATOMIC_RELEASE);
        park();
    }
    seen_rsp[0] = rsp;
    while (!__atomic_load_n(&arrived, __ATOMIC_ACQUIRE))
        if (++spins > 1000000000UL) fail(2, "vCPU 1 never ran");
    /* vCPU 0's stack is [0x180000, 0x200000), vCPU 1's [0x100000, 0x180000). */
    if (seen_rsp[0] <= 0x180000 || seen_rsp[0] > 0x1ffff0) fail(3, "vCPU 0's stack is misplaced");
    if (seen_rsp[1] <= 0x100000 || seen_rsp[1] > 0x17fff0) fail(4, "vCPU 1's stack is misplaced");
    puts("smp: vCPU 1 ran on its own stack\n");
    return 0;
}
