//! Image locks between opens of one process (they behave as between
//! processes: the locks belong to the open file description).

use disk::{ErrorKind, FileStorage, LockMode, Storage};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn locked_msg(r: disk::Result<FileStorage>) -> String {
    let e = r.expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    e.to_string()
}

#[test]
fn writers_are_exclusive_readers_share() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("img");
    std::fs::write(&f, vec![7u8; 4096]).unwrap();
    let name = f.display().to_string();
    {
        let w = FileStorage::open(&f, true).unwrap();
        let m = locked_msg(FileStorage::open(&f, true));
        assert!(
            m.starts_with(&format!("{name}: Failed to get \"write\" lock")),
            "{m}"
        );
        assert!(m.contains("this process (pid"), "the holder is named: {m}");
        let m = locked_msg(FileStorage::open(&f, false));
        assert!(m.contains("Failed to get shared \"write\" lock"), "{m}");
        // Creating over it is refused too, and the file is left whole.
        locked_msg(FileStorage::create(&f, true));
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 4096);
        // Force-share readers are refused by nobody...
        let r = FileStorage::open_with(&f, false, LockMode::ForceShare).unwrap();
        let mut b = [0u8; 4];
        r.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [7; 4]);
        // ...and never for writing.
        let e = FileStorage::open_with(&f, true, LockMode::ForceShare).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        // No locks at all: not refused (the caller's own business).
        FileStorage::open_with(&f, true, LockMode::Off).unwrap();
        drop(w);
    }
    {
        let r1 = FileStorage::open(&f, false).unwrap();
        let _r2 = FileStorage::open(&f, false).unwrap();
        let m = locked_msg(FileStorage::open(&f, true));
        assert!(m.contains("Failed to get \"write\" lock"), "{m}");
        // A force-share reader does not stop a writer.
        drop(r1);
        drop(_r2);
        let _fs = FileStorage::open_with(&f, false, LockMode::ForceShare).unwrap();
        FileStorage::open(&f, true).unwrap();
    }
    // Everything released on drop.
    FileStorage::open(&f, true).unwrap();
}

#[test]
fn close_then_reopen_while_another_thread_spawns_processes() {
    // A child forked by another thread holds our closed file's locks until
    // it execs: the reopen must wait that out, not fail.
    let dir = tempfile::tempdir().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let spawner = std::thread::spawn(move || {
        let mut n = 0u32;
        while !s2.load(Ordering::Relaxed) {
            std::process::Command::new("true").status().unwrap();
            n += 1;
        }
        n
    });
    for i in 0..2000 {
        let p = dir.path().join(format!("f{}", i % 10));
        drop(FileStorage::create(&p, true).unwrap());
        drop(FileStorage::open(&p, true).unwrap());
        drop(FileStorage::open(&p, false).unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    assert!(
        spawner.join().unwrap() > 0,
        "processes were spawned meanwhile"
    );
}
