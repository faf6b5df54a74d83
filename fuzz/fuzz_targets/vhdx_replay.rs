#![no_main]
// Log replay, two ways: a read-only open lays the active log sequence over
// the file, a writable open replays it into the file. Both must read the
// same disk (over vdisk_fuzz::Plan's ranges), and the overlaid file must
// hold what the replayed file holds (every page with data in either, the
// headers aside: vdisk_fuzz::compare_replayed).
use disk::VirtualDisk;
use std::sync::Arc;
use vdisk_fuzz::{compare_replayed, Plan, SparseStorage};
use vhdx::{OpenOptions, Vhdx};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let file = SparseStorage::decode("fuzz.vhdx", data);
    let Ok(ro) = Vhdx::open_storage(
        Box::new(file.snapshot("fuzz.vhdx", false)),
        &OpenOptions::default(),
    ) else {
        return;
    };
    let rw_opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let st = Arc::new(file.snapshot("fuzz.vhdx", true));
    let Ok(rw) = Vhdx::open_storage(Box::new(st.clone()), &rw_opts) else {
        return;
    };
    assert_eq!(ro.virtual_size(), rw.virtual_size());
    compare_replayed(ro.storage(), &st, &file);
    Plan::new(ro.virtual_size(), data).compare(&ro, &rw, "replayed and overlaid views");
});
