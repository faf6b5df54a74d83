//! VMM benchmarks (issue 14 item 7), printed side by side in one run;
//! nothing is asserted about speed or memory: the bench reports (PASS/MISS
//! against the issue's targets) and exits 0 when a target is missed.
//!
//! ```text
//! cargo bench -p benches --bench vmm                                   # 35-70 s
//! VMMBENCH_MS=300 VMMBENCH_ROUNDS=8 cargo bench -p benches --bench vmm # steadier
//! VMM_BIN=path/to/vmm cargo bench -p benches --bench vmm               # and `vmm run`
//! ```
//!
//! Needs /dev/kvm (read-write) and gcc (the payload); skips, saying so,
//! without them. Run by `cargo test --benches` (no `--bench` argument) it
//! makes a smoke run of a few seconds, every check included. Knobs (environment): `VMMBENCH_MS` (100: guest time of
//! each test on each disk), `VMMBENCH_ROUNDS` (3), `VMMBENCH_SLICE_MS`
//! (10), `VMMBENCH_QD` (32, at most 40), `VMMBENCH_DISK_MIB` (256),
//! `VMMBENCH_FRESH_MIB` (4096), `VMMBENCH_STARTS` (20), `VMMBENCH_DIR`
//! (Cargo's target tmp dir), `VMM_BIN`.
//!
//! # What it measures
//!
//! 1. **Guest-side disk I/O.** The payload vmm-core/payloads/vmmbench.c
//!    runs through [`vmm_core::run`] (1 vCPU, 256 MiB) with every image as
//!    a virtio-blk disk of the same VM (opened as `vmm run --disk
//!    PATH,format=F` does) and times its own requests with rdtsc: 4 KiB
//!    random reads and writes (uniform, 4 KiB aligned, the same sequence
//!    on every disk) with one request in flight (QD1) and with
//!    `VMMBENCH_QD` in flight (completions polled from the used ring, each
//!    resubmitted at once), 1 MiB sequential reads and writes, then one
//!    flush per disk (the write-back of what the write tests left dirty);
//!    before them, one write per disk timed apart, the first after the
//!    open (a VHDX writes and syncs its headers with new write GUIDs
//!    then, once per open: a one-time cost kept out of the IOPS).
//!    Each test takes the disks in turn, in slices of `VMMBENCH_SLICE_MS`,
//!    until each has had `VMMBENCH_MS` of guest time: the disks share the
//!    same moments, so the host's load (this machine is shared) falls on
//!    all of them alike. The payload prints cycles; the host converts them
//!    with the guest TSC frequency from KVM_GET_TSC_KHZ (asked of a vCPU of
//!    a VM made for that: KVM gives every VM the same frequency, and the
//!    VMM sets none), which it also patches into the payload for the time
//!    budget; a line at the end compares the guest's span with the host's
//!    clock. The images, `VMMBENCH_DISK_MIB` each, every byte written
//!    beforehand in 4 MiB writes (the guest checks the pattern in the
//!    first VM; after the rounds the host checks that the guest's writes
//!    are on every image): raw, dynamic VHDX (32 MiB blocks), fixed VHDX,
//!    dynamic VHD (2 MiB blocks, size rounded up to a CHS geometry). The
//!    files live in Cargo's target tmp dir, in the page cache. Ratios are
//!    image / raw (> 1: faster than raw); the target (≥ 0.9×) is the
//!    dynamic VHDX's. `VMMBENCH_ROUNDS` rounds, which image is which
//!    device rotating; medians, and the range of the per-round ratios.
//! 2. **Where I/O runs.** A second VM per round serves raw and dynamic
//!    VHDX with [`vmm_core::IoMode::Vcpu`] (requests served on the vCPU
//!    thread during the QueueNotify exit), against the default
//!    [`vmm_core::IoMode::Thread`] (an I/O thread per disk, woken through
//!    an ioeventfd). The two VMs' order alternates.
//! 3. **First-touch writes.** Fresh images of `VMMBENCH_FRESH_MIB`, new
//!    every round, in one VM: a sparse raw file, a dynamic VHDX and a
//!    dynamic VHD with 2 MiB blocks; one 4 KiB write every 2 MiB over the
//!    first half (each allocates a block, or fills a hole of the raw file),
//!    1 MiB sequential writes over the second half, a flush.
//! 4. **Where a request's time goes.** The same 4 KiB random reads and
//!    writes, 1 MiB sequential reads and first-touch writes through the
//!    opened disk on the host ([`disk::VirtualDisk::read_at`] /
//!    `write_at`, the calls the device makes), without the VMM: the
//!    library's part of a guest request; the rest is the VMM's (the exits,
//!    the I/O thread's wake-up, the virtio queue, the copy into guest
//!    memory).
//! 5. **Start.** From the start of [`vmm_core::run`] to vCPU 0's first
//!    exit ([`vmm_core::Report::first_exit`]) with a payload whose second
//!    instruction exits: an upper bound of the time to the first guest
//!    instruction (target ≤ 10 ms), `VMMBENCH_STARTS` times without a
//!    disk and with the dynamic VHDX (whose open is timed apart); and the
//!    first run of fresh processes (this executable again: the VHDX's open,
//!    then the run). When a `vmm` binary is found (`VMM_BIN`, else `vmm`
//!    in this bench's target directory), also from spawning `vmm run
//!    --disk VHDX --payload` to the first byte the guest prints on its
//!    stdout, and to its exit; otherwise that line says why it is
//!    skipped.
//! 6. **Memory.** The VMM's RSS beyond guest memory (target ≤ 10 MiB): a
//!    child process (this executable again) opens the dynamic VHDX and
//!    runs the disk payload on it (IoMode::Thread) while a thread reads
//!    its /proc/self/smaps every 2 ms; measured is the sum of `Rss:` over
//!    every mapping except guest RAM (see [`rss::read`]), at its peak
//!    during the run, split into file-backed mappings (the executable and
//!    libraries) and the rest (heap, thread stacks, the device's bounce
//!    buffer); also shown: the same before the run, guest RAM resident,
//!    VmHWM. Kernel memory (KVM's page tables, the image's page cache) is
//!    in none of them. With a `vmm` binary, the same sampling of the real
//!    `vmm run` from outside (/proc/PID/smaps).
//!
//! # Reading the numbers
//!
//! A QD1 request's time is mostly the VMM's (section 4): on a nested,
//! shared host the exits and the I/O thread's wake-up are tens of µs and
//! vary with the load, the library a few. How a file was written changes
//! its 4 KiB write cost on recent kernels (large page-cache folios: a
//! file filled in 4 MiB writes takes 4 KiB pwrites about 3x slower than one
//! filled 4 KiB at a time); raw and VHDX are filled alike here, the VHD's
//! blocks are interleaved with its sector bitmaps.

mod guest;
mod host;
mod rss;
mod start;
mod table;

use guest::{bits, ImageFile, Params};
use std::time::{Duration, Instant};
use table::{Results, Unit};
use vmm_core::IoMode;

/// The knobs, from the environment.
struct Knobs {
    ms: u64,
    rounds: usize,
    disk_mib: u64,
    fresh_mib: u64,
    qd: u64,
    slice_ms: u64,
    starts: usize,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("{name}={v}: not a number, using the default");
            default
        }),
        Err(_) => default,
    }
}

impl Knobs {
    /// The knobs; `smoke`: `cargo test --benches` ran this (no `--bench`
    /// argument), so every default is the smallest that still runs every
    /// part once (every check included), for seconds, not numbers.
    fn from_env(smoke: bool) -> Knobs {
        let d = |full: u64, small: u64| if smoke { small } else { full };
        Knobs {
            ms: env_num("VMMBENCH_MS", d(100, 5)).max(1),
            rounds: env_num("VMMBENCH_ROUNDS", if smoke { 1 } else { 3 }).max(1),
            disk_mib: env_num("VMMBENCH_DISK_MIB", d(256, 16)).max(4),
            fresh_mib: env_num("VMMBENCH_FRESH_MIB", d(4096, 64)).max(8),
            qd: env_num("VMMBENCH_QD", 32u64).clamp(1, 40),
            slice_ms: env_num("VMMBENCH_SLICE_MS", d(10, 2)).max(1),
            starts: env_num("VMMBENCH_STARTS", if smoke { 2 } else { 20 }).max(1),
        }
    }
}

fn main() {
    if std::env::var_os(rss::CHILD_ENV).is_some() {
        if let Err(e) = rss::child() {
            eprintln!("vmm bench (RSS child): {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Some(image) = std::env::var_os(start::CHILD_ENV) {
        if let Err(e) = start::child(image.into()) {
            eprintln!("vmm bench (start child): {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = bench() {
        eprintln!("vmm bench: {e}");
        std::process::exit(1);
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn bench() -> Result<(), String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        println!("vmm bench skipped: /dev/kvm cannot be opened ({e})");
        return Ok(());
    }
    if vmm_core::test_payloads::VMMBENCH.is_empty() {
        println!("vmm bench skipped: the payloads were not built (no gcc)");
        return Ok(());
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let k = Knobs::from_env(smoke);
    if smoke {
        println!("vmm bench: a smoke run (no --bench: `cargo test`); `cargo bench -p benches --bench vmm` measures");
    }
    let started = Instant::now();
    let tsc_khz = guest::tsc_khz()?;
    let base = std::env::var_os("VMMBENCH_DIR").map_or_else(
        || env!("CARGO_TARGET_TMPDIR").into(),
        std::path::PathBuf::from,
    );
    let dir = tempfile::Builder::new()
        .prefix("vmm-bench")
        .tempdir_in(&base)
        .map_err(|e| format!("a directory in {}: {e}", base.display()))?;
    let load_start = loadavg();
    println!(
        "== vmm bench: {} ms a test on each disk in slices of {} ms, {} rounds, queue depth {}, prefilled disks {} MiB, \
         fresh disks {} MiB; guest TSC {tsc_khz} kHz (KVM_GET_TSC_KHZ); {} CPUs; load average {load_start} ==",
        k.ms,
        k.slice_ms,
        k.rounds,
        k.qd,
        k.disk_mib,
        k.fresh_mib,
        std::thread::available_parallelism().map_or(0, usize::from),
    );

    eprintln!("preparing images in {}", dir.path().display());
    let pre = guest::prefilled(dir.path(), k.disk_mib << 20)?;
    let params = Params {
        tsc_khz,
        ms: k.ms,
        tests: bits::PREFILLED,
        qd: k.qd,
        check_prefill: true,
        slice_ms: k.slice_ms,
    };
    // The guest checks the prefill in the first VM only: the write tests
    // overwrite it.
    let pre_bin_checked = guest::payload(&params)?;
    let pre_bin = guest::payload(&Params {
        check_prefill: false,
        ..params
    })?;
    let fresh_bin = guest::payload(&Params {
        tests: bits::FRESH,
        check_prefill: false,
        ..params
    })?;

    // 1 and 2: prefilled images, all of them in one VM on the I/O thread,
    // raw and dynamic VHDX in another on the vCPU thread; the two VMs'
    // order alternating; the library's own costs after them.
    let mut vcpu_imgs: Vec<&ImageFile> = pre
        .iter()
        .filter(|i| matches!(i.label, "raw" | "vhdx-dyn"))
        .collect();
    let mut all: Vec<&ImageFile> = pre.iter().collect();
    let mut res = Results::default();
    let mut tsc_check = None;
    for round in 0..k.rounds {
        let t = Instant::now();
        // Which image is which device changes every round.
        if round > 0 {
            all.rotate_left(1);
            vcpu_imgs.rotate_left(1);
        }
        let mut vms = [
            (&all, IoMode::Thread, ""),
            (&vcpu_imgs, IoMode::Vcpu, "/vcpu"),
        ];
        if round % 2 == 1 {
            vms.reverse();
        }
        for (n, (imgs, io, suffix)) in vms.into_iter().enumerate() {
            // The very first VM checks the prefill (then the writes
            // overwrite it).
            let bin = if round == 0 && n == 0 {
                &pre_bin_checked
            } else {
                &pre_bin
            };
            let r = guest::run(bin, imgs, io, tsc_khz)?;
            tsc_check.get_or_insert((r.guest_secs, r.report.elapsed));
            for (img, tests) in imgs.iter().zip(&r.tests) {
                res.add(&format!("{}{suffix}", img.label), round, tests);
            }
        }
        for c in 0..pre.len() {
            let img = &pre[(c + round) % pre.len()];
            let s = host::measure(img, k.ms.div_ceil(2))?;
            res.add(&format!("host:{}", img.label), round, &s);
        }
        eprintln!(
            "  round {} of the prefilled tests: {:.1} s",
            round + 1,
            t.elapsed().as_secs_f64()
        );
    }

    // What the guest's writes left: its sequential writes (0xa5, the
    // last write test) start at sector 0, its random writes are 0x5a.
    for img in &pre {
        guest::check_written(img)?;
    }

    // 3: fresh images, made anew for every round, in one VM.
    for round in 0..k.rounds {
        let t = Instant::now();
        let fresh = guest::fresh(dir.path(), k.fresh_mib << 20)?;
        let imgs: Vec<&ImageFile> = fresh.iter().collect();
        let r = guest::run(&fresh_bin, &imgs, IoMode::Thread, tsc_khz)?;
        for (img, tests) in fresh.iter().zip(&r.tests) {
            res.add(&format!("fresh:{}", img.label), round, tests);
            // Its first first-touch write (0x5a) is at offset 0.
            guest::check_written(img)?;
        }
        // The library's own first-touch cost, on images as fresh.
        for img in guest::fresh(dir.path(), k.fresh_mib << 20)? {
            let s = host::first_touch(&img, k.ms.div_ceil(2))?;
            res.add(&format!("host:fresh:{}", img.label), round, &s);
            let _ = std::fs::remove_file(&img.path);
        }
        eprintln!(
            "  round {} of the first-touch tests: {:.1} s",
            round + 1,
            t.elapsed().as_secs_f64()
        );
    }

    // 4: start times; 5: memory.
    let vhdx = pre
        .iter()
        .find(|i| i.label == "vhdx-dyn")
        .ok_or("no dynamic VHDX")?;
    let starts = start::in_process(k.starts, vhdx)?;
    let cold = start::cold(k.starts.min(10), vhdx)?;
    let payload_file = dir.path().join("vmmbench.bin");
    std::fs::write(&payload_file, &pre_bin).map_err(|e| e.to_string())?;
    let child = rss::measure(&payload_file, &vhdx.path, tsc_khz)?;
    let vmm = start::find_vmm().and_then(|bin| {
        let start_file = dir.path().join("start.bin");
        std::fs::write(&start_file, start::NEWLINE_EXIT).map_err(|e| e.to_string())?;
        let times = start::spawn_times(&bin, &start_file, &vhdx.path, k.starts.min(10))?;
        let peak = start::spawn_rss(&bin, &payload_file, &vhdx.path)?;
        Ok((bin, times, peak))
    });

    // The tables.
    println!();
    let qd = format!("QD{}", k.qd);
    let rows = table::prefilled_rows(&qd);
    println!(
        "== 1. guest-side disk I/O on prefilled images (IoMode::Thread, the default); medians of {} rounds; \
         ratio = image / raw (> 1: faster than raw); target: vhdx-dyn >= 0.9x ==",
        k.rounds
    );
    res.print(
        &rows,
        "raw",
        &["vhdx-dyn", "vhdx-fixed", "vhd-dyn"],
        Some("vhdx-dyn"),
    );
    println!();
    println!("== 2. I/O on the vCPU thread (IoMode::Vcpu) vs the I/O thread (IoMode::Thread); ratio = vcpu / thread ==");
    res.print(&rows, "raw", &["raw/vcpu"], None);
    res.print(&rows, "vhdx-dyn", &["vhdx-dyn/vcpu"], None);
    println!("vhdx-dyn / raw, both on the vCPU thread:");
    res.print(&rows, "raw/vcpu", &["vhdx-dyn/vcpu"], Some("vhdx-dyn/vcpu"));
    println!();
    println!(
        "== 3. first-touch writes on fresh images ({} MiB; dynamic ones with 2 MiB blocks); IoMode::Thread; ratio = image / raw ==",
        k.fresh_mib
    );
    res.print(
        &[
            (
                "firsttouch4k",
                "4K write, one per 2 MiB (allocating)",
                Unit::Iops,
            ),
            ("seqwrite1m_fresh", "1M sequential write, fresh", Unit::Mbs),
            ("flush", "flush after the writes", Unit::Ms),
            ("firstwrite", "first write after the open", Unit::Ms),
        ],
        "fresh:raw-sparse",
        &["fresh:vhdx-dyn", "fresh:vhd-dyn"],
        None,
    );
    println!();
    print_breakdown(&res, &pre);
    println!();
    print_start(&k, &starts, &cold, &vmm);
    println!();
    print_rss(&child, &vmm);
    if let Some((guest_secs, elapsed)) = tsc_check {
        println!();
        println!(
            "notes: TSC check: the guest's own span of its first run, {:.3} s by KVM_GET_TSC_KHZ, within that run's {:.3} s \
             (vmm_core::run start to end, with setup and teardown).",
            guest_secs,
            elapsed.as_secs_f64()
        );
    }
    println!(
        "       IOPS, MB/s (10^6 bytes/s) and flush times are guest time (rdtsc) from the first submission to the last \
         completion of each test. Load average at start: {load_start}; at end: {}. Total {:.1} s.",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Guest time per request against the library's on the host.
fn print_breakdown(res: &Results, pre: &[ImageFile]) {
    println!(
        "== 4. where a request's time goes: time per request, one at a time (QD1), medians; \
         library = the same calls on the host without the VMM =="
    );
    println!(
        "{:<40} {:>14} {:>14} {:>10}  {:>18}",
        "test, image", "guest, thread", "guest, vcpu", "library", "VMM part (thread)"
    );
    let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} us"));
    let line = |label: String, key: &str, test: &str| {
        let thread = res.micros(key, test);
        let vcpu = res.micros(&format!("{key}/vcpu"), test);
        let lib = res.micros(&format!("host:{key}"), test);
        let vmm = thread.zip(lib).map(|(t, h)| t - h);
        println!(
            "{label:<40} {:>14} {:>14} {:>10}  {:>18}",
            show(thread),
            show(vcpu),
            show(lib),
            show(vmm)
        );
    };
    for (test, label) in [
        ("randread4k_qd1", "4K random read"),
        ("randwrite4k_qd1", "4K random write"),
        ("seqread1m", "1M sequential read"),
    ] {
        for img in pre {
            line(format!("{label}, {}", img.label), img.label, test);
        }
    }
    for l in ["raw-sparse", "vhdx-dyn", "vhd-dyn"] {
        line(
            format!("4K first-touch write, {l}"),
            &format!("fresh:{l}"),
            "firsttouch4k",
        );
    }
}

type VmmSpawn = Result<
    (
        std::path::PathBuf,
        (Vec<Duration>, Vec<Duration>),
        rss::Peak,
    ),
    String,
>;

fn print_start(k: &Knobs, s: &start::InProcess, cold: &start::Cold, vmm: &VmmSpawn) {
    println!("== 5. start: time to the first guest exit (an upper bound of the first instruction); target <= 10 ms ==");
    // Lines that time the first instruction get a verdict; the others
    // are context.
    let line = |what: &str, v: &[Duration], target: bool| {
        let (min, med, max) = table::min_med_max(v);
        println!(
            "{what:<66} min {:>7.3} ms  median {:>7.3} ms  max {:>7.3} ms  {}",
            ms(min),
            ms(med),
            ms(max),
            if target { verdict(ms(med) <= 10.0) } else { "" }
        );
    };
    line(
        &format!("vmm_core::run -> first exit, no disk ({} runs)", k.starts),
        &s.first_exit,
        true,
    );
    line(
        "vmm_core::run -> first exit, 1 dynamic VHDX",
        &s.first_exit_disk,
        true,
    );
    line("  opening that VHDX (before vmm_core::run)", &s.open, false);
    line(
        "  whole run, no disk (to the VM torn down)",
        &s.whole,
        false,
    );
    line(
        &format!(
            "fresh process: open the VHDX ({} processes)",
            cold.open.len()
        ),
        &cold.open,
        false,
    );
    line(
        "  then vmm_core::run -> first exit (its first run)",
        &cold.first_exit,
        true,
    );
    match vmm {
        Ok((bin, (first, exit), _)) => {
            line(
                &format!("spawn `{} run`, 1 VHDX -> first guest byte", bin.display()),
                first,
                true,
            );
            line(
                "spawn `vmm run` -> exit (the VHDX flushed and closed)",
                exit,
                false,
            );
        }
        Err(why) => println!("`vmm run` spawned: skipped: {why}"),
    }
}

fn print_rss(c: &rss::ChildRss, vmm: &VmmSpawn) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("== 6. VMM resident memory beyond guest RAM (smaps Rss of every mapping but guest RAM, peak); target <= 10 MiB ==");
    if c.samples.1 == 0 {
        println!(
            "in-process VMM: not measured: no sample saw the guest RAM mapping ({} samples)",
            c.samples.0
        );
    } else {
        println!(
        "in-process VMM (child process, dynamic VHDX, full disk payload): peak {:.1} MiB = {:.1} MiB file-backed \
         (executable, libraries) + {:.1} MiB other (heap, stacks, bounce buffer)  {}",
        mib(c.peak.beyond_guest()),
        mib(c.peak.file),
        mib(c.peak.anon),
        verdict(mib(c.peak.beyond_guest()) <= 10.0)
    );
    }
    println!(
        "  before the run (image open): {:.1} MiB; guest RAM resident at most {:.1} MiB of {} MiB; VmHWM {:.1} MiB; \
         {} samples, {} during the run",
        mib(c.before),
        mib(c.guest),
        guest::MEM >> 20,
        mib(c.hwm),
        c.samples.0,
        c.samples.1
    );
    match vmm {
        Ok((_, _, p)) if p.with_guest == 0 => println!(
            "`vmm run`: not measured: no sample saw the guest RAM mapping ({} samples)",
            p.samples
        ),
        Ok((bin, _, p)) => println!(
            "`{} run` (same payload and image): peak {:.1} MiB = {:.1} file-backed + {:.1} other; guest RAM resident {:.1} MiB; \
             {} samples, {} with guest RAM  {}",
            bin.display(),
            mib(p.beyond.beyond_guest()),
            mib(p.beyond.file),
            mib(p.beyond.anon),
            mib(p.guest),
            p.samples,
            p.with_guest,
            verdict(mib(p.beyond.beyond_guest()) <= 10.0)
        ),
        Err(why) => println!("`vmm run` measured: skipped: {why}"),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}
