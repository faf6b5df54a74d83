#![no_main]
// A two-file chain, both files from the input: a differencing child (VHDX
// or VHD) over a parent (VHDX or VHD) given to it already open. Byte 0:
// bit 0 child is a VHD, bit 1 parent is a VHD, bit 2 ignore the parent
// linkage (DataWriteGuid / time stamp); bytes 1..5: the parent's length
// (u32 LE); then the parent, then the child. VHDX files are
// sparse-encoded (vdisk_fuzz::decode_sparse), VHD files are raw; both live
// in sparse in-memory storage. The child is opened read-only and read,
// then writable: read, written, flushed, closed, reopened over the parent
// and read back. What is read and written: vdisk_fuzz::Plan.
use disk::{Storage, VirtualDisk};
use std::sync::Arc;
use vdisk_fuzz::{check_growth, check_written, Plan, SparseStorage, Written};

fn parent(vhd: bool, file: &SparseStorage) -> Option<Arc<dyn VirtualDisk>> {
    let st = Box::new(file.snapshot(if vhd { "parent.vhd" } else { "parent.vhdx" }, false));
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

/// Open the child over `p`, read the plan's ranges; write them if `write`.
fn child(
    vhd: bool,
    ignore: bool,
    st: Box<dyn Storage>,
    p: Arc<dyn VirtualDisk>,
    write: bool,
    data: &[u8],
) -> Option<(Box<dyn VirtualDisk>, Plan, Written)> {
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
    let plan = Plan::new(d.virtual_size(), data);
    plan.read(&*d);
    let w = if write {
        plan.write(&*d, 7)
    } else {
        Vec::new()
    };
    Some((d, plan, w))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (cvhd, pvhd, ignore) = (data[0] & 1 != 0, data[0] & 2 != 0, data[0] & 4 != 0);
    let plen = (u32::from_le_bytes(data[1..5].try_into().unwrap()) as usize).min(data.len() - 5);
    let (praw, craw) = data[5..].split_at(plen);
    let pfile = if pvhd {
        SparseStorage::from_bytes("parent.vhd", praw)
    } else {
        SparseStorage::decode("parent.vhdx", praw)
    };
    let name = if cvhd { "child.vhd" } else { "child.vhdx" };
    let cfile = if cvhd {
        SparseStorage::from_bytes(name, craw)
    } else {
        SparseStorage::decode(name, craw)
    };
    let Some(p) = parent(pvhd, &pfile) else {
        return;
    };
    let _ = child(
        cvhd,
        ignore,
        Box::new(cfile.snapshot(name, false)),
        p.clone(),
        false,
        data,
    );
    let initial = cfile.len().unwrap_or(0);
    let st = Arc::new(cfile);
    let Some((d, plan, written)) = child(cvhd, ignore, Box::new(st.clone()), p, true, data) else {
        return;
    };
    let closed = d.close();
    check_growth(&st, initial, d.virtual_size());
    drop(d);
    if closed.is_err() {
        return;
    }
    let Some(p) = parent(pvhd, &pfile) else {
        return;
    };
    if let Some((d, _, _)) = child(
        cvhd,
        ignore,
        Box::new(st.snapshot(name, false)),
        p,
        false,
        data,
    ) {
        check_written(&*d, &written);
        plan.read(&*d);
    }
});
