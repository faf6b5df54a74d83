#![no_main]
// A whole image (the file's bytes): open read-only and read; open
// writable, read, write, flush, close; reopen and read back what was
// written.
use vdisk_fuzz::{bytes_of, check_written, read_all, shared, write_some};
use vhd::{OpenOptions, Vhd};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let ro = OpenOptions::default();
    let rw = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    if let Ok(d) = Vhd::open_storage(
        Box::new(disk::MemStorage::from_vec("fuzz.vhd", data.to_vec())),
        &ro,
    ) {
        read_all(&d);
    }
    let st = shared("fuzz.vhd", data.to_vec());
    let Ok(d) = Vhd::open_storage(Box::new(st.clone()), &rw) else {
        return;
    };
    read_all(&d);
    let written = write_some(&d, data.len() as u8);
    if d.close().is_err() {
        return;
    }
    if let Ok(d) = Vhd::open_storage(
        Box::new(disk::MemStorage::from_vec("fuzz.vhd", bytes_of(&st))),
        &ro,
    ) {
        check_written(&d, &written);
        read_all(&d);
    }
});
