//! Hostile parents: differencing VHDX and VHD chains whose locators loop,
//! go too deep, fan out, lead outside the allowed directories or to the
//! wrong disk, and damaged parent locators.

use crate::harness::*;
use disk::ErrorKind;
use image::{CreateOptions, Format, Kind, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uuid::Uuid;
use vhdx::parent_locator::{ParentLocator, VHDX_PARENT_LOCATOR_TYPE};

const X: Format = Format::Vhdx;
const V: Format = Format::Vhd;

// ------------------------------------------------------------------ VHDX

/// A differencing VHDX `name` over `parent` (1 MiB blocks).
fn vhdx_child(dir: &Path, name: &str, parent: &Path) -> PathBuf {
    let p = dir.join(name);
    let mut o = vhdx::CreateOptions::new(0);
    o.block_size = MIB as u32;
    let o = CreateOptions {
        parent: Some(parent.to_path_buf()),
        ..CreateOptions::new(Kind::Vhdx(o))
    };
    image::create_closed(&p, &o).unwrap();
    p
}

/// The parent locator item's file offset and the locator.
fn vhdx_locator(p: &Path) -> (u64, ParentLocator) {
    let at = metadata_item(p, vhdx::metadata::PARENT_LOCATOR);
    let t = vhdx::metadata::MetadataTable::parse(&read_at(p, METADATA, 65536), MIB).unwrap();
    let len = t.find(vhdx::metadata::PARENT_LOCATOR).unwrap().length;
    let loc = ParentLocator::parse(&read_at(p, at, len as usize)).unwrap();
    (at, loc)
}

/// Replace the parent locator item with `bytes`, put at 256 KiB into the
/// metadata region (free space).
fn set_vhdx_locator_bytes(p: &Path, bytes: &[u8]) {
    patch(p, METADATA + 0x40000, bytes);
    edit_metadata_table(p, |t| {
        let e = t
            .entries
            .iter_mut()
            .find(|e| e.item_id == vhdx::metadata::PARENT_LOCATOR)
            .unwrap();
        e.offset = 0x40000;
        e.length = bytes.len() as u32;
    });
}

/// A locator naming `parent` (a file beside the child) with `linkage`.
fn vhdx_locator_for(parent: &str, linkage: Uuid) -> ParentLocator {
    ParentLocator {
        locator_type: VHDX_PARENT_LOCATOR_TYPE,
        entries: vec![
            ("parent_linkage".into(), vhdx::linkage_string(linkage)),
            ("relative_path".into(), format!(".\\{parent}")),
        ],
    }
}

fn data_write_guid(p: &Path) -> Uuid {
    vhdx::Vhdx::inspect(p).unwrap().header.data_write_guid
}

#[test]
fn vhdx_parent_cycle_is_refused() {
    // a -> b -> a.
    let dir = tempfile::tempdir().unwrap();
    let base = vhdx_image(dir.path(), "base.vhdx");
    let b = vhdx_child(dir.path(), "b.avhdx", &base);
    let a = vhdx_child(dir.path(), "a.avhdx", &b);
    set_vhdx_locator_bytes(
        &b,
        &vhdx_locator_for("a.avhdx", data_write_guid(&a)).to_bytes(),
    );
    let e = fails(
        "VHDX parent cycle",
        &a,
        X,
        Stage::Open,
        ErrorKind::InvalidInput,
        &["loops", "b.avhdx"],
    );
    has_words(&e, &["a.avhdx"]);
}

#[test]
fn vhdx_parent_is_itself() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhdx_image(dir.path(), "base.vhdx");
    let a = vhdx_child(dir.path(), "a.avhdx", &base);
    set_vhdx_locator_bytes(
        &a,
        &vhdx_locator_for("a.avhdx", data_write_guid(&a)).to_bytes(),
    );
    fails(
        "VHDX parent is itself",
        &a,
        X,
        Stage::Open,
        ErrorKind::InvalidInput,
        &["loops"],
    );
}

#[test]
fn vhdx_chain_deeper_than_the_limit_is_refused_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut top = vhdx_image(dir.path(), "l0.vhdx");
    for i in 1..=disk::parent::DEFAULT_MAX_DEPTH + 2 {
        top = vhdx_child(dir.path(), &format!("l{i}.avhdx"), &top);
    }
    fails(
        "VHDX chain of 67",
        &top,
        X,
        Stage::Open,
        ErrorKind::InvalidInput,
        &["deeper than 64"],
    );
}

#[test]
fn vhdx_parent_linkage_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhdx_image(dir.path(), "base.vhdx");
    let a = vhdx_child(dir.path(), "a.avhdx", &base);
    for slot in [0, 1] {
        edit_header(&base, slot, |h| h.data_write_guid = Uuid::from_u128(7));
    }
    fails(
        "VHDX parent linkage mismatch",
        &a,
        X,
        Stage::Open,
        ErrorKind::InvalidInput,
        &["DataWriteGuid", "parent_linkage"],
    );
}

#[test]
fn vhdx_parent_of_another_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhdx_image(dir.path(), "base.vhdx");
    let a = vhdx_child(dir.path(), "a.avhdx", &base);
    patch(
        &base,
        metadata_item(&base, vhdx::metadata::VIRTUAL_DISK_SIZE),
        &(2 * SIZE).to_le_bytes(),
    );
    fails(
        "VHDX parent of another size",
        &a,
        X,
        Stage::Open,
        ErrorKind::InvalidInput,
        &["virtual size", "not this disk's parent"],
    );
}

#[test]
fn vhdx_corrupt_parent_names_the_parent_and_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhdx_image(dir.path(), "base.vhdx");
    let a = vhdx_child(dir.path(), "a.avhdx", &base);
    for off in [0x10000 + 1000, 0x20000 + 1000] {
        let b = read_at(&base, off, 1)[0];
        patch(&base, off, &[!b]);
    }
    let r = front_door("VHDX corrupt parent", &a, X);
    let e = r.failed(Stage::Open, ErrorKind::Corrupt, &base);
    assert_corrupt(e, "VHDX header", 0x10000);
    has_words(e, &["the parent of", "a.avhdx"]);
}

#[test]
fn vhdx_parent_outside_the_allowed_directories_is_refused() {
    // The locator leads to a real parent (right linkage) in another
    // directory: the default policy does not follow it.
    let elsewhere = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = vhdx_image(elsewhere.path(), "base.vhdx");
    let a = vhdx_child(dir.path(), "a.avhdx", &base);
    fails(
        "VHDX parent outside the policy",
        &a,
        X,
        Stage::Open,
        ErrorKind::InvalidInput,
        &["not allowed by the parent policy"],
    );
}

#[test]
fn vhdx_locator_key_outside_the_item_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhdx_image(dir.path(), "base.vhdx");
    let a = vhdx_child(dir.path(), "a.avhdx", &base);
    let (at, _) = vhdx_locator(&a);
    // Entry 0's KeyOffset far past the item.
    patch(&a, at + 20, &0xFFFF_0000u32.to_le_bytes());
    corrupt(
        "VHDX locator key past the item",
        &a,
        X,
        Stage::Open,
        "VHDX parent locator",
        at + 20,
        &["entry 0", "past the item"],
    );
}

#[test]
fn vhdx_locator_value_outside_the_item_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhdx_image(dir.path(), "base.vhdx");
    let a = vhdx_child(dir.path(), "a.avhdx", &base);
    let (at, _) = vhdx_locator(&a);
    // Entry 1's ValueOffset + ValueLength past the item.
    patch(&a, at + 20 + 12 + 4, &u32::MAX.to_le_bytes());
    corrupt(
        "VHDX locator value past the item",
        &a,
        X,
        Stage::Open,
        "VHDX parent locator",
        at + 20 + 12 + 4,
        &["entry 1", "past the item"],
    );
}

#[test]
fn vhdx_locator_with_65535_keys_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhdx_image(dir.path(), "base.vhdx");
    let a = vhdx_child(dir.path(), "a.avhdx", &base);
    let (at, _) = vhdx_locator(&a);
    patch(&a, at + 18, &u16::MAX.to_le_bytes());
    corrupt(
        "VHDX locator KeyValueCount 65535",
        &a,
        X,
        Stage::Open,
        "VHDX parent locator",
        at + 18,
        &["KeyValueCount 65535"],
    );
}

#[test]
fn vhdx_locator_of_an_unknown_type_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhdx_image(dir.path(), "base.vhdx");
    let a = vhdx_child(dir.path(), "a.avhdx", &base);
    let (at, _) = vhdx_locator(&a);
    patch(&a, at, &Uuid::from_u128(0xabc).to_bytes_le());
    fails(
        "VHDX locator type unknown",
        &a,
        X,
        Stage::Open,
        ErrorKind::Unsupported,
        &["parent locator type"],
    );
}

#[test]
fn vhdx_locator_naming_no_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhdx_image(dir.path(), "base.vhdx");
    let a = vhdx_child(dir.path(), "a.avhdx", &base);
    let loc = ParentLocator {
        locator_type: VHDX_PARENT_LOCATOR_TYPE,
        entries: vec![(
            "parent_linkage".into(),
            vhdx::linkage_string(data_write_guid(&base)),
        )],
    };
    set_vhdx_locator_bytes(&a, &loc.to_bytes());
    fails(
        "VHDX locator without a path",
        &a,
        X,
        Stage::Open,
        ErrorKind::InvalidInput,
        &["parent locator names no path"],
    );
}

// ------------------------------------------------------------------- VHD

/// A differencing VHD `name` over `parent`.
fn vhd_child(dir: &Path, name: &str, parent: &Path) -> PathBuf {
    let p = dir.join(name);
    let mut o = vhd::CreateOptions::new(0);
    o.block_size = MIB as u32;
    vhd::Vhd::create_differencing_file(&p, parent, &o, false).unwrap();
    p
}

/// A small dynamic VHD with nothing written.
fn vhd_empty(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut o = vhd::CreateOptions::new(2 * MIB);
    o.block_size = MIB as u32;
    vhd::Vhd::create(&p, &o, false).unwrap().close().unwrap();
    p
}

fn vhd_id(p: &Path) -> Uuid {
    vhd::Vhd::inspect(p).unwrap().footer.unique_id
}

/// Point the VHD `p`'s parent link at files of the child's directory: its
/// `W2ru` locator at `relative`, its `W2ku` locator at `absolute`, its
/// parent name and expected id at `name` and `id`.
fn set_vhd_parent(p: &Path, relative: &str, absolute: &str, name: &str, id: Uuid) {
    use vhd::dynamic_header::DynamicHeader;
    use vhd::parent_locator::{encode_path, W2KU, W2RU};
    let dir = p.parent().unwrap();
    let mut h = DynamicHeader::parse(&read_at(p, DYN_HEADER, 1024)).unwrap();
    for l in h.parent_locators.iter_mut() {
        let target = match l.platform_code {
            W2RU => format!(".\\{relative}"),
            W2KU => disk::parent::windows_absolute_path(&dir.join(absolute)).unwrap(),
            _ => continue,
        };
        let data = encode_path(&target);
        let space = l.data_space_bytes() as usize;
        assert!(data.len() <= space);
        let mut padded = data.clone();
        padded.resize(space, 0);
        patch(p, l.data_offset, &padded);
        l.data_length = data.len() as u32;
    }
    h.set_parent(id, h.parent_timestamp, name).unwrap();
    let mut b = [0u8; 1024];
    h.write_to(&mut b);
    patch(p, DYN_HEADER, &b);
}

#[test]
fn vhd_parent_cycle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhd_image(dir.path(), "base.vhd");
    let b = vhd_child(dir.path(), "b.vhd", &base);
    let a = vhd_child(dir.path(), "a.vhd", &b);
    set_vhd_parent(&b, "a.vhd", "a.vhd", "a.vhd", vhd_id(&a));
    let e = fails(
        "VHD parent cycle",
        &a,
        V,
        Stage::Open,
        ErrorKind::InvalidInput,
        &["loops"],
    );
    has_words(&e, &["b.vhd"]);
}

#[test]
fn vhd_parent_is_itself() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhd_image(dir.path(), "base.vhd");
    let a = vhd_child(dir.path(), "a.vhd", &base);
    set_vhd_parent(&a, "a.vhd", "a.vhd", "a.vhd", vhd_id(&a));
    fails(
        "VHD parent is itself",
        &a,
        V,
        Stage::Open,
        ErrorKind::InvalidInput,
        &["loops"],
    );
}

#[test]
fn vhd_chain_deeper_than_the_limit_is_refused_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut top = vhd_image(dir.path(), "l0.vhd");
    for i in 1..=disk::parent::DEFAULT_MAX_DEPTH + 2 {
        top = vhd_child(dir.path(), &format!("l{i}.vhd"), &top);
    }
    fails(
        "VHD chain of 67",
        &top,
        V,
        Stage::Open,
        ErrorKind::InvalidInput,
        &["deeper than 64"],
    );
}

#[test]
fn vhd_parent_id_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhd_image(dir.path(), "base.vhd");
    let a = vhd_child(dir.path(), "a.vhd", &base);
    set_vhd_parent(&a, "base.vhd", "base.vhd", "base.vhd", Uuid::from_u128(9));
    fails(
        "VHD parent unique id mismatch",
        &a,
        V,
        Stage::Open,
        ErrorKind::InvalidInput,
        &["unique id", "not this disk's parent"],
    );
}

#[test]
fn vhd_parent_of_another_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhd_image(dir.path(), "base.vhd");
    let a = vhd_child(dir.path(), "a.vhd", &base);
    let other = vhd_empty(dir.path(), "other.vhd");
    set_vhd_parent(&a, "other.vhd", "other.vhd", "other.vhd", vhd_id(&other));
    fails(
        "VHD parent of another size",
        &a,
        V,
        Stage::Open,
        ErrorKind::InvalidInput,
        &["virtual size", "not this disk's parent"],
    );
}

#[test]
fn vhd_locators_of_absurd_length_are_skipped_for_the_parent_name() {
    use vhd::dynamic_header::DynamicHeader;
    let dir = tempfile::tempdir().unwrap();
    let base = vhd_image(dir.path(), "base.vhd");
    let a = vhd_child(dir.path(), "a.vhd", &base);
    let mut h = DynamicHeader::parse(&read_at(&a, DYN_HEADER, 1024)).unwrap();
    for (i, l) in h.parent_locators.iter_mut().enumerate() {
        if !l.is_empty() {
            // One of 4 GiB in the file, one 4 GiB past its end.
            l.data_length = u32::MAX;
            if i == 1 {
                l.data_offset = 1 << 40;
            }
        }
    }
    let mut b = [0u8; 1024];
    h.write_to(&mut b);
    patch(&a, DYN_HEADER, &b);
    // The parent is still found by its name, beside the child.
    opens_with_data("VHD locators of 4 GiB", &a, V);
}

#[test]
fn vhd_locators_fanning_out_are_searched_in_linear_time() {
    // Levels 1..=D of two children each, a_k and b_k, both over b_{k+1},
    // whose locators name a_{k+1} first (a disk of another id) and b_{k+1}
    // second. Opening every candidate's whole chain to read its id would
    // open 2^D chains.
    const D: usize = 24;
    let dir = tempfile::tempdir().unwrap();
    let name = |c: char, k: usize| format!("{c}{k:02}.vhd");
    let mut below = (
        vhd_empty(dir.path(), &name('a', D + 1)),
        vhd_empty(dir.path(), &name('b', D + 1)),
    );
    for k in (1..=D).rev() {
        let a = vhd_child(dir.path(), &name('a', k), &below.1);
        let b = vhd_child(dir.path(), &name('b', k), &below.1);
        let id = vhd_id(&below.1);
        for p in [&a, &b] {
            set_vhd_parent(
                p,
                &name('a', k + 1),
                &name('b', k + 1),
                &name('b', k + 1),
                id,
            );
        }
        below = (a, b);
    }
    let t = Instant::now();
    let r = front_door("VHD locator fan-out", &below.0, V);
    assert_eq!(r.stage, Stage::Done, "{:?}", r.err);
    assert!(r.first.iter().all(|&b| b == 0));
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    let files = image::chain::chain_files(&below.0, &OpenOptions::new(V)).unwrap();
    assert_eq!(files.len(), D + 1);
    assert!(files[1..]
        .iter()
        .all(|f| f.file_name().unwrap().to_str().unwrap().starts_with('b')));
}
