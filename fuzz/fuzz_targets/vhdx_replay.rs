#![no_main]
// Log replay, two ways: a read-only open lays the active log sequence over
// the file, a writable open replays it into the file. Both must read the
// same disk.
use disk::{MemStorage, VirtualDisk};
use vdisk_fuzz::{decode_sparse, MAX_READ};
use vhdx::{OpenOptions, Vhdx};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let file = decode_sparse(data);
    let Ok(ro) = Vhdx::open_storage(
        Box::new(MemStorage::from_vec("fuzz.vhdx", file.clone())),
        &OpenOptions::default(),
    ) else {
        return;
    };
    let rw_opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let Ok(rw) = Vhdx::open_storage(Box::new(MemStorage::from_vec("fuzz.vhdx", file)), &rw_opts)
    else {
        return;
    };
    assert_eq!(ro.virtual_size(), rw.virtual_size());
    let size = ro.virtual_size().min(MAX_READ);
    let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(65536) as usize;
        let (ra, rb) = (ro.read_at(&mut a[..n], pos), rw.read_at(&mut b[..n], pos));
        if ra.is_err() || rb.is_err() {
            break;
        }
        assert!(
            a[..n] == b[..n],
            "replayed and overlaid views differ at {pos:#x}"
        );
        pos += n as u64;
    }
});
