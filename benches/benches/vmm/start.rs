//! Time to the first guest instruction: in-process, from the start of
//! [`vmm_core::run`] to vCPU 0's first exit ([`vmm_core::Report::first_exit`]),
//! with a payload whose second instruction exits; and, when a `vmm` binary
//! is found, from spawning `vmm run` to the first byte the guest printed.

use crate::guest::{self, Capture, ImageFile, MEM};
use crate::rss::{Peak, Sampler};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmm_core::{Boot, Config, Disk, IoMode, Outcome};

/// `xor eax, eax; out 0xf4, eax`: the run ends at the second instruction.
const EXIT_NOW: &[u8] = &[0x31, 0xc0, 0xe7, 0xf4];
/// `mov dx, 0x3f8; mov al, 10; out dx, al; xor eax, eax; out 0xf4, eax`:
/// a newline on the console first (what a `vmm` binary's parent sees).
pub const NEWLINE_EXIT: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, 0x0a, 0xee, 0x31, 0xc0, 0xe7, 0xf4,
];

/// In-process start times.
#[derive(Debug, Default)]
pub struct InProcess {
    /// run() start to first exit, no disk.
    pub first_exit: Vec<Duration>,
    /// The whole run (to the VM torn down), no disk.
    pub whole: Vec<Duration>,
    /// Opening the image as `vmm run --disk` does.
    pub open: Vec<Duration>,
    /// run() start to first exit, with the image as disk 0.
    pub first_exit_disk: Vec<Duration>,
}

fn run_exit_now(disks: Vec<Disk>) -> Result<vmm_core::Report, String> {
    let r = vmm_core::run(Config {
        mem: MEM,
        vcpus: 1,
        disks,
        boot: Boot::Payload(EXIT_NOW.to_vec()),
        console: Box::new(Capture::default()),
        timeout: Some(Duration::from_secs(10)),
        io: IoMode::Thread,
        stop: None,
        controller: None,
        bundle: None,
    })
    .map_err(|e| format!("the VMM failed: {e}"))?;
    if r.outcome != Outcome::Exited(0) {
        return Err(format!("the start payload: {}", r.outcome));
    }
    Ok(r)
}

/// `n` runs without a disk and `n` with `img` (opened before each).
pub fn in_process(n: usize, img: &ImageFile) -> Result<InProcess, String> {
    let mut out = InProcess::default();
    for _ in 0..n {
        let r = run_exit_now(vec![])?;
        out.first_exit.extend(r.first_exit);
        out.whole.push(r.elapsed);
        let t = Instant::now();
        let open = guest::open(img)?;
        out.open.push(t.elapsed());
        let r = run_exit_now(vec![guest::served(&open)])?;
        out.first_exit_disk.extend(r.first_exit);
    }
    Ok(out)
}

/// Where a `vmm` binary is: $VMM_BIN, or `vmm` in the target directory
/// this bench was built in (target/release/vmm, once the tools crate has
/// one and it was built); the message says why none when there is none.
pub fn find_vmm() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("VMM_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("VMM_BIN={} is not a file", p.display()))
        };
    }
    // This bench runs as TARGET/release/deps/vmm-HASH.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("vmm"))
        .ok_or("no target directory")?;
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(format!(
            "no vmm binary at {} (build it, or set VMM_BIN=PATH)",
            candidate.display()
        ))
    }
}

/// `n` spawns of `vmm run --disk IMAGE,format=vhdx --payload FILE` (the
/// payload prints a newline and exits): spawn to the first byte on its
/// stdout, spawn to its exit.
pub fn spawn_times(
    vmm: &Path,
    payload: &Path,
    image: &Path,
    n: usize,
) -> Result<(Vec<Duration>, Vec<Duration>), String> {
    let (mut first, mut exit) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        let mut child = Command::new(vmm)
            .arg("run")
            .arg("--disk")
            .arg(format!("{},format=vhdx", image.display()))
            .arg("--payload")
            .arg(payload)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", vmm.display()))?;
        let mut byte = [0u8; 1];
        let got = child
            .stdout
            .take()
            .map(|mut o| o.read(&mut byte).unwrap_or(0))
            .unwrap_or(0);
        let t_first = t.elapsed();
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let t_exit = t.elapsed();
        if !out.status.success() || got != 1 {
            return Err(format!(
                "`{} run --payload {}` ended with {} ({} byte(s) of output): {}",
                vmm.display(),
                payload.display(),
                out.status,
                got,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        first.push(t_first);
        exit.push(t_exit);
    }
    Ok((first, exit))
}

/// `vmm run --disk IMAGE,format=vhdx --payload FILE`, its smaps sampled
/// while it runs.
pub fn spawn_rss(vmm: &Path, payload: &Path, image: &Path) -> Result<Peak, String> {
    let child = Command::new(vmm)
        .arg("run")
        .arg("--disk")
        .arg(format!("{},format=vhdx", image.display()))
        .arg("--payload")
        .arg(payload)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", vmm.display()))?;
    let sampler = Sampler::start(child.id().to_string(), MEM);
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let peak = sampler.finish();
    if !out.status.success() {
        return Err(format!(
            "`vmm run` on {} ended with {}: {}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(peak)
}

/// The environment variable that makes this bench a start-time child; its
/// value is the image.
pub const CHILD_ENV: &str = "VMMBENCH_START_CHILD";

/// The child: open the dynamic VHDX `image`, run [`EXIT_NOW`] with it,
/// print `START open_us=N first_exit_us=N`.
pub fn child(image: PathBuf) -> Result<(), String> {
    let img = ImageFile {
        label: "vhdx-dyn",
        path: image,
        format: image::Format::Vhdx,
    };
    let t = Instant::now();
    let open = guest::open(&img)?;
    let opened = t.elapsed();
    let r = run_exit_now(vec![guest::served(&open)])?;
    println!(
        "START open_us={} first_exit_us={}",
        opened.as_micros(),
        r.first_exit.map_or(0, |d| d.as_micros())
    );
    Ok(())
}

/// Start times of the first run in fresh processes.
#[derive(Debug, Default)]
pub struct Cold {
    /// Opening the image.
    pub open: Vec<Duration>,
    /// vmm_core::run start to its first exit.
    pub first_exit: Vec<Duration>,
}

/// `n` children (this executable again), each timing its first run.
pub fn cold(n: usize, img: &ImageFile) -> Result<Cold, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut out = Cold::default();
    for _ in 0..n {
        let o = Command::new(&exe)
            .env(CHILD_ENV, &img.path)
            .output()
            .map_err(|e| format!("running the start child: {e}"))?;
        let stdout = String::from_utf8_lossy(&o.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("START "))
            .ok_or_else(|| {
                format!(
                    "the start child printed no result ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                )
            })?;
        for w in line.split_whitespace() {
            let us = |v: &str| Duration::from_micros(v.parse().unwrap_or(0));
            match w.split_once('=') {
                Some(("open_us", v)) => out.open.push(us(v)),
                Some(("first_exit_us", v)) => out.first_exit.push(us(v)),
                _ => {}
            }
        }
    }
    Ok(out)
}
