//! Writes the checked-in seed corpora, fuzz/seeds/TARGET/*, from images this
//! library creates (never from ../shared/corpus, which must not be copied
//! into the repository: scripts/fuzz.sh adds it at run time). Run from
//! fuzz/: `cargo run --example make_seeds [TARGET...]` (only those
//! targets' seeds when named; the images carry random GUIDs, so the other
//! seeds would change).

use disk::{MemStorage, VirtualDisk};
use std::path::Path;
use std::sync::Arc;
use vdisk_fuzz::encode_sparse;
use vhdx::header::Header;
use vhdx::log::{LogEntry, LogOp};
use vhdx::region_table::{RegionTable, BAT_REGION, METADATA_REGION};

fn put(target: &str, name: &str, bytes: &[u8]) {
    let only: Vec<String> = std::env::args().skip(1).collect();
    if !only.is_empty() && !only.iter().any(|t| t == target) {
        return;
    }
    assert!(
        bytes.len() < 100 << 10,
        "{target}/{name} is {} bytes",
        bytes.len()
    );
    let dir = Path::new("seeds").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// VHDX creation options with 1 MiB blocks (the smallest: every block a
/// whole-image target allocates grows the in-memory file by a block).
fn vhdx_opts(size: u64) -> vhdx::CreateOptions {
    let mut o = vhdx::CreateOptions::new(size);
    o.block_size = 1 << 20;
    o
}

fn vhdx_bytes(opts: &vhdx::CreateOptions, writes: &[(u64, u8)]) -> Vec<u8> {
    let st = Arc::new(MemStorage::new("seed.vhdx"));
    let d = vhdx::Vhdx::create_on(Box::new(st.clone()), opts).unwrap();
    for &(at, b) in writes {
        d.write_at(&[b; 4096], at).unwrap();
    }
    d.close().unwrap();
    st.to_vec()
}

fn vhd_bytes(opts: &vhd::CreateOptions, writes: &[(u64, u8)]) -> Vec<u8> {
    let st = Arc::new(MemStorage::new("seed.vhd"));
    let d = vhd::Vhd::create_on(Box::new(st.clone()), opts).unwrap();
    for &(at, b) in writes {
        d.write_at(&[b; 4096], at).unwrap();
    }
    d.close().unwrap();
    st.to_vec()
}

fn current_header(f: &[u8]) -> (usize, Header) {
    let h = |i: usize| Header::parse(&f[Header::OFFSETS[i] as usize..][..Header::SIZE]);
    vhdx::header::select_current(h(0), h(1)).unwrap()
}

fn regions(f: &[u8]) -> RegionTable {
    RegionTable::parse(&f[RegionTable::OFFSETS[0] as usize..][..RegionTable::SIZE]).unwrap()
}

fn region(f: &[u8], guid: uuid::Uuid) -> &[u8] {
    let e = regions(f)
        .entries
        .into_iter()
        .find(|e| e.guid == guid)
        .unwrap();
    &f[e.file_offset as usize..][..e.length as usize]
}

/// `f` with a dirty log: one entry writing a page of 0x5a at `page_at`
/// and zeroing the 4 KiB after it.
fn with_dirty_log(mut f: Vec<u8>, page_at: u64) -> Vec<u8> {
    let (slot, mut h) = current_header(&f);
    h.log_guid = uuid::Uuid::from_u128(0x1234_5678_9abc_def0_0fed_cba9_8765_4321);
    h.sequence_number += 1;
    let other = Header::OFFSETS[1 - slot] as usize;
    f[other..other + Header::SIZE].copy_from_slice(&h.to_bytes());
    let entry = LogEntry {
        sequence_number: 1,
        log_guid: h.log_guid,
        tail: 0,
        flushed_file_offset: f.len() as u64,
        last_file_offset: f.len() as u64,
        entry_length: 0,
        ops: vec![
            LogOp::Data {
                file_offset: page_at,
                page: Box::new([0x5a; 4096]),
            },
            LogOp::Zero {
                file_offset: page_at + 4096,
                length: 4096,
            },
        ],
    };
    let e = entry.encode();
    let at = h.log_offset as usize;
    f[at..at + e.len()].copy_from_slice(&e);
    f
}

fn chain_input(flags: u8, parent: &[u8], child: &[u8]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(&(parent.len() as u32).to_le_bytes());
    v.extend_from_slice(parent);
    v.extend_from_slice(child);
    v
}

fn main() {
    let tmp = std::env::temp_dir().join(format!("vdisk-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();

    // VHDX: dynamic with data, fixed, 4K sectors, differencing.
    let dynamic = vhdx_bytes(&vhdx_opts(8 << 20), &[(0, 0x11), (5 << 20, 0x22)]);
    let mut fixed_o = vhdx_opts(1 << 20);
    fixed_o.fixed = true;
    let fixed = vhdx_bytes(&fixed_o, &[(4096, 0x33)]);
    let mut k4 = vhdx_opts(4 << 20);
    k4.logical_sector_size = 4096;
    k4.physical_sector_size = 4096;
    let sector4k = vhdx_bytes(&k4, &[(8192, 0x44)]);
    let (slot, hdr) = current_header(&dynamic);
    let _ = slot;
    let bat_off = regions(&dynamic)
        .entries
        .iter()
        .find(|e| e.guid == BAT_REGION)
        .unwrap()
        .file_offset;
    let first_block =
        u64::from_le_bytes(dynamic[bat_off as usize..][..8].try_into().unwrap()) >> 20 << 20;
    let dirty = with_dirty_log(dynamic.clone(), first_block);

    let ppath = tmp.join("parent.vhdx");
    std::fs::write(&ppath, &dynamic).unwrap();
    let cpath = tmp.join("child.avhdx");
    {
        let opts = vhdx_opts(8 << 20);
        let popts = vhdx::OpenOptions::default();
        let c = vhdx::Vhdx::create_differencing(&cpath, &ppath, &opts, &popts, true).unwrap();
        c.write_at(&[0x66; 4096], 1 << 20).unwrap();
        c.close().unwrap();
    }
    let child = std::fs::read(&cpath).unwrap();

    for (name, f) in [
        ("dynamic", &dynamic),
        ("fixed", &fixed),
        ("sector4k", &sector4k),
        ("dirty-log", &dirty),
        ("differencing", &child),
    ] {
        put("vhdx_open", name, &encode_sparse(f));
        put(
            "vhdx_header",
            name,
            &f[Header::OFFSETS[0] as usize..][..Header::SIZE],
        );
        put(
            "vhdx_region_table",
            name,
            &f[RegionTable::OFFSETS[0] as usize..][..RegionTable::SIZE],
        );
        // The metadata region, cut after its last non-zero byte.
        let m = region(f, METADATA_REGION);
        let end = m
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |p| p + 1)
            .next_multiple_of(512);
        put("vhdx_metadata", name, &m[..end]);
        // Geometry (virtual size, shift 0, block size 2^20 << 5 = 32 MiB,
        // sectors, parent) and the BAT's used part.
        let bat = region(f, BAT_REGION);
        let bend = bat
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |p| p + 1)
            .next_multiple_of(8);
        let (table, meta) = vhdx::metadata::Metadata::parse(m).unwrap();
        let _ = table;
        let mut g = vec![0u8; 16];
        g[0..8].copy_from_slice(&meta.virtual_disk_size.to_le_bytes());
        g[9] = (meta.file_parameters.block_size.trailing_zeros() - 20) as u8;
        g[10] = u8::from(meta.logical_sector_size == 4096)
            | (u8::from(meta.file_parameters.has_parent) << 1);
        g.extend_from_slice(&bat[..bend]);
        put("vhdx_bat", name, &g);
        // The log: its GUID, then the first 64 KiB of the log region.
        let (_, h) = current_header(f);
        let mut l = h.log_guid.to_bytes_le().to_vec();
        l.extend_from_slice(&f[h.log_offset as usize..][..64 << 10]);
        let lend = l
            .iter()
            .rposition(|&b| b != 0)
            .map_or(16, |p| p + 1)
            .next_multiple_of(4096)
            + 16;
        put("vhdx_log", name, &l[..lend.min(l.len())]);
    }
    put("vhdx_replay", "dirty-log", &encode_sparse(&dirty));
    put("vhdx_replay", "dynamic", &encode_sparse(&dynamic));
    let _ = hdr;
    // The parent locator item of the child.
    let (_, meta) = vhdx::metadata::Metadata::parse(region(&child, METADATA_REGION)).unwrap();
    let loc = meta
        .parent_locator
        .expect("a differencing disk has a locator");
    put("vhdx_parent_locator", "differencing", &loc.to_bytes());

    // VHD: dynamic (16 KiB blocks) with data, fixed, differencing.
    let mut vo = vhd::CreateOptions::new(1 << 20);
    vo.block_size = 16 << 10;
    let vdyn = vhd_bytes(&vo, &[(0, 0x11), (64 << 10, 0x22)]);
    let mut vf = vhd::CreateOptions::new(64 << 10);
    vf.fixed = true;
    let vfixed = vhd_bytes(&vf, &[(4096, 0x33)]);
    let vppath = tmp.join("parent.vhd");
    std::fs::write(&vppath, &vdyn).unwrap();
    let vcpath = tmp.join("child.avhd");
    {
        let mut o = vhd::CreateOptions::new(1 << 20);
        o.block_size = 16 << 10;
        let c = vhd::Vhd::create_differencing(&vcpath, &vppath, &o, true).unwrap();
        c.write_at(&[0x66; 4096], 16 << 10).unwrap();
        c.close().unwrap();
    }
    let vchild = std::fs::read(&vcpath).unwrap();
    for (name, f) in [
        ("dynamic", &vdyn),
        ("fixed", &vfixed),
        ("differencing", &vchild),
    ] {
        put("vhd_open", name, f);
        put("vhd_footer", name, &f[f.len() - 512..]);
        if name != "fixed" {
            put("vhd_dynamic_header", name, &f[512..1536]);
        }
    }
    for i in 0..8 {
        let e = &vchild[512 + 576 + 24 * i..][..24];
        if e.iter().any(|&b| b != 0) {
            put("vhd_parent_locator", &format!("differencing-{i}"), e);
        }
    }

    // Chains: VHDX over VHDX, VHD over VHD, and linkage ignored.
    put(
        "chain",
        "vhdx-vhdx",
        &chain_input(0, &encode_sparse(&dynamic), &encode_sparse(&child)),
    );
    put("chain", "vhd-vhd", &chain_input(3, &vdyn, &vchild));
    put(
        "chain",
        "vhdx-vhdx-ignore",
        &chain_input(4, &encode_sparse(&dynamic), &encode_sparse(&child)),
    );

    // Partition tables: an MBR with a primary and an extended partition
    // holding one logical partition.
    let mut mbr = vec![0u8; 64 << 10];
    let part = |t: &mut [u8], at: usize, kind: u8, lba: u32, len: u32| {
        t[at + 4] = kind;
        t[at + 8..at + 12].copy_from_slice(&lba.to_le_bytes());
        t[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
    };
    part(&mut mbr, 446, 0x83, 8, 24);
    part(&mut mbr, 462, 0x05, 32, 96);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let ebr = 32 * 512;
    part(&mut mbr, ebr + 446, 0x83, 2, 30);
    mbr[ebr + 510] = 0x55;
    mbr[ebr + 511] = 0xaa;
    put("partition", "mbr-extended", &mbr);

    // Checkpoint manifests: a bundle with two checkpoints, and one with an
    // interrupted create.
    for format in [checkpoint::Format::Vhdx, checkpoint::Format::Vhd] {
        let dir = tmp.join(format!("bundle-{format:?}"));
        let mut b = checkpoint::Bundle::init(&dir, format, 1 << 20).unwrap();
        b.create("one").unwrap();
        b.create("two").unwrap();
        b.revert("one").unwrap();
        let mut m = b.manifest().clone();
        drop(b);
        let text = std::fs::read(dir.join(checkpoint::MANIFEST)).unwrap();
        put("checkpoint_manifest", &format!("{format:?}"), &text);
        m.pending = Some(checkpoint::Pending::Delete {
            node: m.nodes[1].id.clone(),
        });
        put(
            "checkpoint_manifest",
            &format!("{format:?}-pending"),
            serde_json::to_string(&m).unwrap().as_bytes(),
        );
    }

    // virtio-blk: queues in guest RAM with one request each of several
    // kinds (header at 0x1000, data at 0x2000, status at 0x3000).
    for (name, kind, sector, dlen, writable_data) in [
        ("in", 0u32, 1u64, 512u32, true),
        ("out", 1, 2, 1024, false),
        ("flush", 4, 0, 0, false),
        ("get-id", 8, 0, 20, true),
        ("discard", 11, 0, 16, false),
        ("write-zeroes", 13, 0, 16, false),
    ] {
        let mut ram = vec![0u8; 0x3001];
        let mut desc = |i: usize, addr: u64, len: u32, flags: u16, next: u16| {
            let d = &mut ram[16 * i..16 * i + 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
        };
        let mut next = 1;
        desc(0, 0x1000, 16, 1, next);
        if dlen > 0 {
            desc(
                next as usize,
                0x2000,
                dlen,
                1 | if writable_data { 2 } else { 0 },
                next + 1,
            );
            next += 1;
        }
        desc(next as usize, 0x3000, 1, 2, 0);
        ram[0x102..0x104].copy_from_slice(&1u16.to_le_bytes()); // avail idx
        ram[0x1000..0x1004].copy_from_slice(&kind.to_le_bytes());
        ram[0x1008..0x1010].copy_from_slice(&sector.to_le_bytes());
        if kind == 11 || kind == 13 {
            ram[0x2000..0x2008].copy_from_slice(&3u64.to_le_bytes());
            ram[0x2008..0x200c].copy_from_slice(&8u32.to_le_bytes());
        }
        let mut input = vec![2u8]; // queue size 4
        input.extend_from_slice(&2048u32.to_le_bytes()); // capacity
        input.extend_from_slice(&[1, 1, 1]); // writable, 1 range, 256 sectors
        input.extend_from_slice(&ram);
        put("virtio_blk_request", name, &input);

        // The same through the register file: reset, ACKNOWLEDGE, DRIVER,
        // features (VERSION_1 and FLUSH), FEATURES_OK, queue 0 of 4 at the
        // same places, ready, DRIVER_OK, notify.
        let ops: &[(u8, u32)] = &[
            (0x70 / 4, 0),
            (0x70 / 4, 1),
            (0x70 / 4, 3),
            (0x24 / 4, 0),
            (0x20 / 4, 1 << 9),
            (0x24 / 4, 1),
            (0x20 / 4, 1),
            (0x70 / 4, 11),
            (0x30 / 4, 0),
            (0x38 / 4, 4),
            (0x80 / 4, 0),
            (0x90 / 4, 0x100),
            (0xa0 / 4, 0x200),
            (0x44 / 4, 1),
            (0x70 / 4, 15),
            (0x50 / 4, 0),
            (0x80 | (0x60 / 4), 0),
            (0x64 / 4, 1),
            (0x80 | (0x70 / 4), 0),
        ];
        let mut m = vec![ops.len() as u8];
        for &(reg, v) in ops {
            m.push(reg);
            m.push(2); // 4 bytes
            m.extend_from_slice(&v.to_le_bytes());
        }
        m.extend_from_slice(&ram);
        put("virtio_mmio", name, &m);
    }

    nbd_seeds();
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Client sessions for `nbd_session` (byte 0: 1 = writable export).
fn nbd_seeds() {
    use nbd::proto::{cflag, cmd, info, opt, Request, IHAVEOPT};
    fn option(v: &mut Vec<u8>, option: u32, data: &[u8]) {
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    }
    fn request(v: &mut Vec<u8>, flags: u16, kind: u16, offset: u64, length: u32) {
        let cookie = v.len() as u64;
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        v.extend_from_slice(&r.to_bytes());
        if kind == cmd::WRITE {
            v.extend(std::iter::repeat_n(0x5a, length as usize));
        }
    }
    let name_and_info = |name: &[u8]| {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        d
    };
    let mut meta = 1u32.to_be_bytes().to_vec();
    meta.push(b'd');
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");

    // Fixed newstyle, structured replies, base:allocation, GO, every
    // command, DISC.
    let mut full = vec![1u8];
    full.extend_from_slice(&1u32.to_be_bytes()); // NBD_FLAG_C_FIXED_NEWSTYLE
    option(&mut full, opt::STRUCTURED_REPLY, &[]);
    option(&mut full, opt::LIST_META_CONTEXT, &meta);
    option(&mut full, opt::SET_META_CONTEXT, &meta);
    option(&mut full, opt::GO, &name_and_info(b"d"));
    request(&mut full, 0, cmd::WRITE, 4096, 4096);
    request(&mut full, cflag::FUA, cmd::WRITE, 65536, 512);
    request(&mut full, 0, cmd::READ, 0, 8192);
    request(&mut full, cflag::DF, cmd::READ, 4096, 4096);
    request(&mut full, 0, cmd::BLOCK_STATUS, 0, 1 << 20);
    request(&mut full, cflag::REQ_ONE, cmd::BLOCK_STATUS, 4096, 4096);
    request(&mut full, 0, cmd::TRIM, 0, 65536);
    request(&mut full, 0, cmd::WRITE_ZEROES, 131072, 65536);
    request(
        &mut full,
        cflag::FAST_ZERO | cflag::NO_HOLE,
        cmd::WRITE_ZEROES,
        0,
        4096,
    );
    request(&mut full, 0, cmd::FLUSH, 0, 0);
    request(&mut full, 0, cmd::CACHE, 0, 4096);
    request(&mut full, 0, cmd::READ, (1 << 20) - 512, 1024); // past the end
    request(&mut full, 0, cmd::DISC, 0, 0);
    put("nbd_session", "every-command", &full);

    // Read-only, simple replies, many small reads in one burst.
    let mut burst = vec![0u8];
    burst.extend_from_slice(&1u32.to_be_bytes());
    option(&mut burst, opt::GO, &name_and_info(b""));
    for k in 0..32u64 {
        request(&mut burst, 0, cmd::READ, k * 4096, 4096);
    }
    request(&mut burst, 0, cmd::WRITE, 0, 512); // refused: read-only
    put("nbd_session", "read-only-burst", &burst);

    // The other options, then the old way into transmission.
    let mut opts = vec![1u8];
    opts.extend_from_slice(&3u32.to_be_bytes()); // fixed newstyle, no zeroes
    option(&mut opts, opt::LIST, &[]);
    option(&mut opts, opt::INFO, &name_and_info(b"d"));
    option(&mut opts, opt::INFO, &name_and_info(b"nope"));
    option(&mut opts, opt::STARTTLS, &[]);
    option(&mut opts, 0xdead, b"unknown");
    option(&mut opts, opt::EXPORT_NAME, b"d");
    request(&mut opts, 0, cmd::READ, 0, 512);
    put("nbd_session", "options-then-export-name", &opts);

    let mut abort = vec![0u8];
    abort.extend_from_slice(&1u32.to_be_bytes());
    option(&mut abort, opt::ABORT, &[]);
    put("nbd_session", "abort", &abort);
}
