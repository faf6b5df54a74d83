#![no_main]
// A two-file chain, both files from the input: a differencing child (VHDX
// or VHD) over a parent (VHDX or VHD) given to it already open. Byte 0:
// bit 0 child is a VHD, bit 1 parent is a VHD, bit 2 ignore the parent
// linkage (DataWriteGuid / time stamp); bytes 1..5: the parent's length
// (u32 LE); then the parent, then the child. VHDX files are
// sparse-encoded (vdisk_fuzz::decode_sparse), VHD files are raw. The child
// is opened read-only and read, then writable: read, written, flushed,
// closed, reopened over the parent and read back.
use disk::{MemStorage, VirtualDisk};
use std::sync::Arc;
use vdisk_fuzz::{bytes_of, check_written, decode_sparse, read_all, shared, write_some, Written};

fn parent(vhd: bool, file: &[u8]) -> Option<Arc<dyn VirtualDisk>> {
    let st = Box::new(MemStorage::from_vec(
        if vhd { "parent.vhd" } else { "parent.vhdx" },
        file.to_vec(),
    ));
    if vhd {
        Some(Arc::new(
            vhd::Vhd::open_storage(st, &vhd::OpenOptions::default()).ok()?,
        ))
    } else {
        Some(Arc::new(
            vhdx::Vhdx::open_storage(st, &vhdx::OpenOptions::default()).ok()?,
        ))
    }
}

/// Open the child over `p`; exercise it if `write`.
fn child(
    vhd: bool,
    ignore: bool,
    st: Box<dyn disk::Storage>,
    p: Arc<dyn VirtualDisk>,
    write: bool,
) -> Option<(Box<dyn VirtualDisk>, Written)> {
    let d: Box<dyn VirtualDisk> = if vhd {
        let o = vhd::OpenOptions {
            writable: write,
            ignore_parent_id: ignore,
            ..vhd::OpenOptions::default()
        };
        Box::new(vhd::Vhd::open_storage_with_parent(st, &o, p).ok()?)
    } else {
        let o = vhdx::OpenOptions {
            writable: write,
            ignore_parent_linkage: ignore,
            ..vhdx::OpenOptions::default()
        };
        Box::new(vhdx::Vhdx::open_storage_with_parent(st, &o, p).ok()?)
    };
    read_all(&*d);
    let w = if write {
        write_some(&*d, 7)
    } else {
        Vec::new()
    };
    Some((d, w))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (cvhd, pvhd, ignore) = (data[0] & 1 != 0, data[0] & 2 != 0, data[0] & 4 != 0);
    let plen = (u32::from_le_bytes(data[1..5].try_into().unwrap()) as usize).min(data.len() - 5);
    let (praw, craw) = data[5..].split_at(plen);
    let pfile = if pvhd {
        praw.to_vec()
    } else {
        decode_sparse(praw)
    };
    let cfile = if cvhd {
        craw.to_vec()
    } else {
        decode_sparse(craw)
    };
    let Some(p) = parent(pvhd, &pfile) else {
        return;
    };
    let name = if cvhd { "child.vhd" } else { "child.vhdx" };
    let _ = child(
        cvhd,
        ignore,
        Box::new(MemStorage::from_vec(name, cfile.clone())),
        p.clone(),
        false,
    );
    let st = shared(name, cfile);
    let Some((d, written)) = child(cvhd, ignore, Box::new(st.clone()), p, true) else {
        return;
    };
    if d.close().is_err() {
        return;
    }
    drop(d);
    let Some(p) = parent(pvhd, &pfile) else {
        return;
    };
    if let Some((d, _)) = child(
        cvhd,
        ignore,
        Box::new(MemStorage::from_vec(name, bytes_of(&st))),
        p,
        false,
    ) {
        check_written(&*d, &written);
    }
});
