#![no_main]
// A whole (small) image: open, read everything, never panic.
use disk::{MemStorage, VirtualDisk};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let st = MemStorage::from_vec("fuzz.vhd", data.to_vec());
    if let Ok(d) = vhd::Vhd::open_storage(Box::new(st), &vhd::OpenOptions::default()) {
        let size = d.virtual_size().min(1 << 22);
        let mut buf = vec![0u8; 65536];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            if d.read_at(&mut buf[..n], pos).is_err() {
                break;
            }
            pos += n as u64;
        }
    }
});
