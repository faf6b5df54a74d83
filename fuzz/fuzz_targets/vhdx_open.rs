#![no_main]
// A whole image (sparse-encoded, see vdisk_fuzz::decode_sparse): open
// read-only (a dirty log is laid over the file) and read; open writable
// (the log is replayed), read, write, flush, close; reopen and read back
// what was written. What is read and written: vdisk_fuzz::Plan. The file
// lives in a sparse in-memory storage (read-only for the read-only opens).
use disk::{Storage, VirtualDisk};
use std::sync::Arc;
use vdisk_fuzz::{check_growth, check_written, Plan, SparseStorage};
use vhdx::{OpenOptions, Vhdx};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let file = SparseStorage::decode("fuzz.vhdx", data);
    let ro = OpenOptions::default();
    let rw = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    if let Ok(d) = Vhdx::open_storage(Box::new(file.snapshot("fuzz.vhdx", false)), &ro) {
        Plan::new(d.virtual_size(), data).read(&d);
    }
    let initial = file.len().unwrap_or(0);
    let st = Arc::new(file);
    let Ok(d) = Vhdx::open_storage(Box::new(st.clone()), &rw) else {
        return;
    };
    let plan = Plan::new(d.virtual_size(), data);
    plan.read(&d);
    let written = plan.write(&d, data.len() as u8);
    let size = d.virtual_size();
    let closed = d.close();
    check_growth(&st, initial, size);
    if closed.is_err() {
        return;
    }
    if let Ok(d) = Vhdx::open_storage(Box::new(st.snapshot("fuzz.vhdx", false)), &ro) {
        check_written(&d, &written);
        plan.read(&d);
    }
});
