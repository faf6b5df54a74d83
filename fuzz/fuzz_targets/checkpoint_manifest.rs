#![no_main]
// The checkpoint bundle manifest (bundle.json): the input is written as
// the manifest of an otherwise empty bundle directory, which is opened
// (parsing, validation, and the recovery of a pending operation, whose
// disks are missing). The manifest reader is private to the checkpoint
// crate: this goes through the public Bundle::open.
use std::path::PathBuf;
use std::sync::OnceLock;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("vdisk-fuzz-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let d = dir();
    std::fs::write(d.join(checkpoint::MANIFEST), data).unwrap();
    if let Ok(b) = checkpoint::Bundle::open(d) {
        let _ = b.list();
        let _ = b.active_path();
    }
    // Whatever the recovery made goes, so that every input meets an empty
    // bundle.
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            let _ = std::fs::remove_dir_all(&p);
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
});
