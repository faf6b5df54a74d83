/* The example payload (README, scripts/demo.sh): on every disk, print its
 * size and id, write a line of text at 1 MiB, flush, read it back and
 * compare. Ends with 0, or the failing step's number. Build it with
 * `bash scripts/payload.sh vmm-core/payloads/hello.c hello.bin`. */
#include "payload.h"

static struct vq queues[4] __attribute__((aligned(4096)));
static char text[512] __attribute__((aligned(512)));
static char back[512] __attribute__((aligned(512)));

u32 payload_main(u64 ram, u64 disks, u64 vcpu) {
    struct vblk b;
    char id[21];
    const char *why;
    u64 d, i, n;
    if (vcpu != 0) park();
    puts("hello: "); put_dec(ram >> 20); puts(" MiB of RAM, "); put_dec(disks); puts(" disk(s)\n");
    for (d = 0; d < disks && d < 4; d++) {
        if ((why = vblk_init(&b, (int)d, &queues[d]))) fail(1, why);
        memset(id, 0, sizeof id);
        if (vblk_get_id(&b, id) != S_OK) fail(2, "GET_ID");
        puts("hello: disk "); put_dec(d); puts(": "); put_dec(b.capacity * 512 >> 20);
        puts(" MiB, id "); puts(id); puts("\n");
        if (b.features & (1UL << F_RO)) { puts("hello: read-only, not written\n"); continue; }
        memset(text, 0, sizeof text);
        n = 0;
        for (why = "written by the guest on disk "; *why; why++) text[n++] = *why;
        text[n++] = (char)('0' + d);
        text[n++] = '\n';
        if (vblk_rw(&b, T_OUT, 2048, text, 512) != S_OK) fail(3, "write");
        if (vblk_rw(&b, T_FLUSH, 0, 0, 0) != S_OK) fail(4, "flush");
        if (vblk_rw(&b, T_IN, 2048, back, 512) != S_OK) fail(5, "read");
        for (i = 0; i < 512; i++) if (text[i] != back[i]) fail(6, "read back other bytes");
        puts("hello: wrote, flushed and read back 512 bytes at 1 MiB\n");
    }
    return 0;
}
