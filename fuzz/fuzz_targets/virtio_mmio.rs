#![no_main]
// The virtio-mmio register file of a virtio-blk device over a 1 MiB
// in-memory raw disk, served inline. Byte 0: the number of register
// accesses n (at most 64); then n accesses of 6 bytes each (byte 0:
// bit 7 read, else write; bits 0..6: register index, offset = 4 * index,
// reaching into the device configuration at 0x100; byte 1: access width
// 1, 2, 4 or 8 from its low two bits; bytes 2..6: the value); then the
// contents of the 64 KiB of guest RAM (queues and buffers).
use disk::{MemStorage, RawDisk, VirtualDisk};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_core::virtio::blk::Blk;
use vmm_core::virtio::mmio::Transport;
use vmm_sys_util::eventfd::EventFd;
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n.min(64)).min(rest.len() / 6);
    let (ops, body) = rest.split_at(n * 6);
    let ram: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    ram.write_slice(&body[..body.len().min(0x10000)], GuestAddress(0))
        .unwrap();
    let disk: Arc<dyn VirtualDisk> =
        Arc::new(RawDisk::new(MemStorage::from_vec("fuzz.raw", vec![0u8; 1 << 20])).unwrap());
    let t = Transport::new(
        Blk::new(disk, true),
        Arc::new(ram),
        EventFd::new(0).unwrap(),
        None,
    )
    .inline(true);
    for op in ops.chunks_exact(6) {
        let offset = u64::from(op[0] & 0x7f) * 4;
        let width = 1usize << (op[1] & 3);
        let mut v = [0u8; 8];
        v[..4].copy_from_slice(&op[2..6]);
        if op[0] & 0x80 != 0 {
            t.read(offset, &mut v[..width]);
        } else {
            t.write(offset, &v[..width]);
        }
    }
    let st = t.lock();
    let _ = (st.status(), st.problem().map(str::len));
});
