#![no_main]
// A whole image (sparse-encoded, see vdisk_fuzz::decode_sparse): open
// read-only (a dirty log is laid over the file) and read; open writable
// (the log is replayed), read, write, flush, close; reopen and read back
// what was written.
use vdisk_fuzz::{bytes_of, check_written, decode_sparse, read_all, shared, write_some};
use vhdx::{OpenOptions, Vhdx};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let file = decode_sparse(data);
    let ro = OpenOptions::default();
    let rw = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    if let Ok(d) = Vhdx::open_storage(
        Box::new(disk::MemStorage::from_vec("fuzz.vhdx", file.clone())),
        &ro,
    ) {
        read_all(&d);
    }
    let st = shared("fuzz.vhdx", file);
    let Ok(d) = Vhdx::open_storage(Box::new(st.clone()), &rw) else {
        return;
    };
    read_all(&d);
    let written = write_some(&d, data.len() as u8);
    if d.close().is_err() {
        return;
    }
    if let Ok(d) = Vhdx::open_storage(
        Box::new(disk::MemStorage::from_vec("fuzz.vhdx", bytes_of(&st))),
        &ro,
    ) {
        check_written(&d, &written);
        read_all(&d);
    }
});
