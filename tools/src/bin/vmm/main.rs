//! `vmm`: run a guest on KVM whose virtio-blk disks are disk images (raw,
//! VHD, VHDX, differencing chains, a checkpoint bundle's active disk).
//! The machine and the payload ABI are vmm-core's ([`vmm_core`]).

mod api;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use image::Format;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tools::size::parse_size;
use vmm_core::{Boot, Config, DiskSpec, IoMode, OpenDisk, Outcome};

/// Exit status of an error of the VMM itself (before or after the guest
/// ran); the guest's own statuses are its port-0xf4 value.
const EXIT_ERROR: u8 = 1;

const RUN_AFTER_HELP: &str = "\
Disks:
  --disk PATH[,ro][,format=raw|vhdx|vhd][,iops=N][,bps=N]
  repeatable; device i is the i-th --disk,
  a virtio-mmio transport at 0xd0000000 + i*0x1000. PATH may be a checkpoint bundle's
  directory: its active disk is served and the bundle held for the run. Every image is
  opened through the library's front door with its image locks: an image another
  process holds (vdisk, qemu-img, qemu-nbd, another vmm) is refused, naming the holder;
  a differencing disk's parents are held shared and never written.

Storage QoS:
  iops=N limits a disk to N I/Os a second counted as Hyper-V's Storage QoS counts
  them, in 8 KiB units (a 4 KiB request is one, a 64 KiB request eight); bps=N to N
  bytes a second (K, M, G suffixes: powers of 1024). Token buckets with a burst of
  50 ms of the rate; requests over a limit wait, never fail.

How a disk's format is chosen:
  format= on the disk, else --format, else the file's signature: a VHDX or VHD
  signature makes it that; a .vhdx/.vhd name without one is refused as damaged;
  anything else is raw and *guarded*: the guest may not write its first sector nor a
  VHD footer cookie into its last one (those writes fail with an I/O error), so that
  what the guest writes can never make the next probe open the file as a VHD/VHDX whose
  parent paths the guest chose. Give --format raw (or format=raw) for a raw disk the
  guest must write whole; it is then never probed.

Payload mode (--payload BIN): BIN is a flat x86-64 binary loaded at 0x200000 and
  entered at CPL3 in 64-bit mode with RIP=0x200000, RSP=0x1ffff0, RFLAGS=0x3002,
  RDI=RAM size, RSI=number of disks; RAM at [0, --mem), the first 4 GiB identity-mapped;
  an 8250 UART at port 0x3f8 writes to stdout. The full ABI is in the README and in
  vmm-core's documentation.

Exit status:
  V        the guest wrote V to port 0xf4 (255 when V > 255)
  253      the guest faulted (an exception, hlt, a load or store where there is
           nothing, every vCPU parked); the message says what and where
  252      stopped by --timeout
  130      stopped by SIGINT or SIGTERM (the disks are flushed and closed first)
  1        an error of the VMM (a missing or locked image, a payload too big...)

VM checkpoints:
  With --bundle DIR, disk 0 is the checkpoint bundle's active disk and
  `vmm ctl SOCKET checkpoint NAME` saves the VM (vCPUs, devices, memory) with
  the disk checkpoint NAME; `vmm restore --bundle DIR --checkpoint NAME`
  continues it in a new process.

Examples:
  vmm run --disk data.vhdx --payload guest.bin
  vmm run --disk base.vhdx,ro --disk /srv/vm1.bundle --mem 512M --vcpus 2 --payload guest.bin
  vmm run --disk disk.img --format raw --payload guest.bin --timeout 60";

/// Run a guest on KVM with disk images as its virtio-blk disks.
#[derive(Parser)]
#[command(name = "vmm", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (a payload, or a Linux kernel) and run it to its end.
    #[command(after_help = RUN_AFTER_HELP)]
    Run(RunArgs),
    /// Continue a VM checkpoint of a bundle (taken by a running `vmm run
    /// --bundle DIR` through its API) in this process: the guest goes on
    /// where it stopped, its disk as of the checkpoint.
    Restore(RestoreArgs),
    /// Send a request to a running `vmm run --api SOCKET` and print its
    /// reply (exit 0 when it says ok, 1 when not).
    #[command(after_help = CTL_AFTER_HELP)]
    Ctl(CtlArgs),
}

const CTL_AFTER_HELP: &str = "\
The API: a unix socket, one JSON object per line each way. Requests:
  {\"cmd\":\"pause\"}     answered once no vCPU runs guest code (the disks' I/O goes on)
  {\"cmd\":\"resume\"}
  {\"cmd\":\"stop\"}      the run ends; vmm flushes and closes the disks and exits 130
  {\"cmd\":\"checkpoint\",\"name\":N}
                    a VM checkpoint into the bundle of `vmm run --bundle DIR`: vCPUs,
                    devices and memory in DIR/vm/, with the disk checkpoint N
  {\"cmd\":\"info\"}      state (starting, running, paused, ended), vcpus, mem, uptime,
                    and each disk's name, requests, errors and QoS limits
  {\"cmd\":\"set-qos\",\"disk\":I,\"iops\":N,\"bps\":N}
                    a limit left out is kept; 0 or null removes it
  {\"cmd\":\"migrate-storage\",\"disk\":I,\"dest\":PATH,\"format\":\"vhdx\"|\"vhd\"|\"raw\"}
                    copy the disk to a new image while the guest writes (a dirty map on
                    the write path, copy passes, then a short pause to copy the rest and
                    switch); answered with passes, bytes-copied, pause-ms. On failure the
                    guest goes on on its disk and DEST is removed. The old image is
                    left as it was at the switch.
Replies: {\"ok\":true,...} or {\"ok\":false,\"error\":\"...\"}.

Examples:
  vmm run --api /run/vm1.sock --disk vm1.vhdx --payload guest.bin &
  vmm ctl /run/vm1.sock info
  vmm ctl /run/vm1.sock set-qos 0 --iops 500 --bps 50M
  vmm ctl /run/vm1.sock migrate-storage 0 /fast/vm1.vhdx
  vmm ctl /run/vm1.sock pause
  vmm ctl /run/vm1.sock send '{\"cmd\":\"resume\"}'";

#[derive(Args)]
struct CtlArgs {
    /// The API socket (`vmm run --api SOCKET`).
    socket: PathBuf,
    #[command(subcommand)]
    request: CtlRequest,
}

#[derive(Subcommand)]
enum CtlRequest {
    /// Pause the vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// End the run.
    Stop,
    /// What the machine is doing.
    Info,
    /// Change a disk's QoS limits (0 removes a limit; one left out is kept).
    SetQos {
        /// The disk's index (0-based, in --disk order).
        disk: u64,
        /// I/Os a second, in 8 KiB units.
        #[arg(long)]
        iops: Option<u64>,
        /// Bytes a second (K, M, G suffixes).
        #[arg(long, value_name = "N")]
        bps: Option<String>,
    },
    /// Copy a disk to a new image while the guest runs, then switch the
    /// guest to it.
    MigrateStorage {
        /// The disk's index (0-based, in --disk order).
        disk: u64,
        /// The new image (must not exist).
        dest: PathBuf,
        /// Its format (default: from DEST's name, .vhdx, .vhd or raw).
        #[arg(short = 'O', long = "format", value_name = "FMT", value_parser = Format::parse)]
        format: Option<Format>,
    },
    /// Take a VM checkpoint NAME into the bundle (`vmm run --bundle`):
    /// vCPUs, devices, memory and the disk at one instant.
    Checkpoint {
        /// The checkpoint's name.
        name: String,
    },
    /// Send a raw JSON request.
    Send {
        /// One JSON object.
        json: String,
    },
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// A checkpoint bundle whose active disk is disk 0; VM checkpoints
    /// (the API's "checkpoint") go into it.
    #[arg(long, value_name = "DIR")]
    bundle: Option<PathBuf>,
    /// Guest RAM (at least 64M, at most 3G, a whole number of 4 KiB pages).
    #[arg(short = 'm', long, value_name = "SIZE", default_value = "256M")]
    mem: String,
    /// How many vCPUs (payload mode: every vCPU enters the payload).
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: usize,
    /// A flat binary to run in payload mode.
    #[arg(
        long,
        value_name = "BIN",
        conflicts_with = "kernel",
        required_unless_present = "kernel"
    )]
    payload: Option<PathBuf>,
    /// A Linux kernel (bzImage or ELF vmlinux).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// The kernel's initrd.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// The kernel's command line.
    #[arg(long, value_name = "TEXT", requires = "kernel", default_value = "")]
    cmdline: String,
}

#[derive(Args)]
struct RestoreArgs {
    #[command(flatten)]
    common: Common,
    /// The checkpoint bundle.
    #[arg(long, value_name = "DIR")]
    bundle: PathBuf,
    /// The checkpoint to continue (taken with VM state by a running vmm).
    #[arg(long, value_name = "NAME")]
    checkpoint: String,
}

/// What `vmm run` and `vmm restore` share.
#[derive(Args)]
struct Common {
    /// A disk: PATH[,ro][,format=raw|vhdx|vhd][,iops=N][,bps=N] (repeatable;
    /// in device order, after the bundle's).
    #[arg(long = "disk", value_name = "SPEC", value_parser = DiskSpec::parse)]
    disks: Vec<DiskSpec>,
    /// The format of every --disk that names none.
    #[arg(short = 'f', long, value_name = "FMT", value_parser = Format::parse)]
    format: Option<Format>,
    /// Stop the run after this many seconds (exit status 252).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Where disk I/O is done: on an I/O thread per disk (the default) or
    /// on the vCPU thread during the notify exit (for measurements).
    #[arg(long, value_enum, default_value_t = Io::Thread)]
    io: Io,
    /// At the end, print what each disk served (requests, errors,
    /// refusals) to stderr.
    #[arg(long)]
    report: bool,
    /// At the end, write that report and the outcome as JSON to FILE
    /// ("-": stderr).
    #[arg(long, value_name = "FILE")]
    report_json: Option<PathBuf>,
    /// Serve the control API on this unix socket (see `vmm ctl --help`).
    #[arg(long, value_name = "SOCKET")]
    api: Option<PathBuf>,
    /// Start with the vCPUs paused (resume through the API).
    #[arg(long, requires = "api")]
    paused: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Io {
    Thread,
    Vcpu,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_ERROR)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match &cli.command {
        Command::Run(a) => run(a),
        Command::Restore(a) => restore(a),
        Command::Ctl(a) => ctl(a),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("vmm: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// `vmm run`: the guest's exit status, or an error of the VMM.
fn run(a: &RunArgs) -> Result<u8> {
    let mem = parse_size(&a.mem).with_context(|| format!("invalid --mem '{}'", a.mem))?;
    let boot = match (&a.payload, &a.kernel) {
        (Some(p), _) => Boot::Payload(read_payload(p)?),
        (None, Some(k)) => Boot::Linux {
            kernel: k.clone(),
            initrd: a.initrd.clone(),
            cmdline: a.cmdline.clone(),
        },
        (None, None) => bail!("give --payload BIN or --kernel FILE"),
    };
    let bundle = match &a.bundle {
        Some(dir) => Some(open_bundle(dir, checkpoint::Bundle::open(dir))?),
        None => None,
    };
    launch(&a.common, mem, a.vcpus, boot, bundle)
}

/// `vmm restore`: continue a VM checkpoint of a bundle in this process,
/// the disk as of that checkpoint (a new active child of it).
fn restore(a: &RestoreArgs) -> Result<u8> {
    let dir = &a.bundle;
    let mut bundle =
        checkpoint::Bundle::open(dir).with_context(|| format!("--bundle {}", dir.display()))?;
    let node = bundle
        .checkpoint(&a.checkpoint)
        .with_context(|| format!("--checkpoint {}", a.checkpoint))?
        .id
        .clone();
    let (state, memory) = bundle.vm_state_paths(&node);
    if !state.exists() {
        bail!(
            "checkpoint \"{}\" of {} has no VM state (it was taken of the disk alone; \
             `vmm run --bundle` takes them with `vmm ctl SOCKET checkpoint NAME`)",
            a.checkpoint,
            dir.display()
        );
    }
    // Checked before the bundle changes: a damaged state reverts nothing.
    let ckpt = vmm_core::snapshot::Checkpoint::load(&state, &memory).map_err(anyhow::Error::msg)?;
    if ckpt.conf.disks.len() != a.common.disks.len() + 1 {
        bail!(
            "the checkpoint's machine had {} disks: give the {} besides the bundle's with --disk \
             (read-only), in the same order",
            ckpt.conf.disks.len(),
            ckpt.conf.disks.len() - 1
        );
    }
    bundle
        .revert(&a.checkpoint)
        .with_context(|| format!("reverting {} to {}", dir.display(), a.checkpoint))?;
    let (mem, vcpus) = (ckpt.conf.mem, ckpt.conf.vcpus);
    let bundle = open_bundle(dir, Ok(bundle))?;
    launch(
        &a.common,
        mem,
        vcpus,
        Boot::Restore(Arc::new(ckpt)),
        Some(bundle),
    )
}

/// The bundle's active disk, opened for the device, and the bundle.
fn open_bundle(
    dir: &Path,
    bundle: std::result::Result<checkpoint::Bundle, disk::Error>,
) -> Result<(vmm_core::Disk, checkpoint::Bundle)> {
    let bundle = bundle.with_context(|| format!("--bundle {}", dir.display()))?;
    let opts = image::OpenOptions {
        format: Some(bundle.manifest().format.image()),
        writable: true,
        ..image::OpenOptions::probing()
    };
    let img = image::open(bundle.active_path(), &opts)
        .with_context(|| format!("--bundle {}", dir.display()))?;
    let disk = vmm_core::Disk {
        disk: img.disk().clone(),
        writable: true,
        name: img.storage().name().to_string(),
        qos: None,
    };
    // Only the device holds the disk from now on: a checkpoint closes it.
    drop(img);
    Ok((disk, bundle))
}

/// Open the other disks, start the API, run the machine, report.
fn launch(
    c: &Common,
    mem: u64,
    vcpus: usize,
    boot: Boot,
    bundle: Option<(vmm_core::Disk, checkpoint::Bundle)>,
) -> Result<u8> {
    let timeout = match c.timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => Some(Duration::from_secs_f64(t)),
        Some(t) => bail!("invalid --timeout {t}: a positive number of seconds"),
    };
    // Every disk is opened (and locked) before the guest runs; a disk that
    // cannot be opened stops the run before it starts.
    let mut open: Vec<OpenDisk> = Vec::with_capacity(c.disks.len());
    for spec in &c.disks {
        let d = vmm_core::disks::open(spec, c.format)
            .with_context(|| format!("--disk {}", spec.path.display()))?;
        open.push(d);
    }
    let (first, bundle) = match bundle {
        Some((d, b)) => (Some(d), Some(b)),
        None => (None, None),
    };
    let mut bundles: Vec<bool> = Vec::new();
    let mut disks = Vec::new();
    if let Some(d) = first {
        disks.push(d);
        bundles.push(true);
    }
    for d in &open {
        disks.push(vmm_core::Disk {
            disk: d.disk(),
            writable: !d.spec.read_only,
            name: d.name(),
            qos: d.qos(),
        });
        bundles.push(d.bundle.is_some());
    }
    let controller = if c.paused {
        vmm_core::Controller::paused()
    } else {
        vmm_core::Controller::new()
    };
    let api = match &c.api {
        Some(path) => Some(api::serve(path, controller.clone(), bundles)?),
        None => None,
    };
    // A bundle run with an API names its socket, so that `vdisk checkpoint
    // create` asks this vmm rather than fail on the bundle's lock.
    let recorded = match (&c.api, &bundle) {
        (Some(sock), Some(b)) => Some(tools::vmm_api::record(b.dir(), sock)?),
        _ => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .context("installing the SIGINT/SIGTERM handlers")?;
    }
    let report = vmm_core::run(Config {
        mem,
        vcpus,
        disks,
        boot,
        console: Box::new(std::io::stdout()),
        timeout,
        io: match c.io {
            Io::Thread => IoMode::Thread,
            Io::Vcpu => IoMode::Vcpu,
        },
        stop: Some(stop),
        controller: Some(controller),
        bundle,
    })?;
    drop(recorded);
    drop(api);
    // The disks were flushed and closed by the run; the bundles' locks go
    // with `open`.
    drop(open);
    match &report.outcome {
        Outcome::Exited(_) => {}
        other => eprintln!("vmm: {other}"),
    }
    if c.report {
        print_report(&report);
    }
    if let Some(path) = &c.report_json {
        write_json(&report, path)?;
    }
    Ok(report.outcome.status())
}

/// `vmm ctl`: 0 when the reply says ok, 1 when not.
fn ctl(a: &CtlArgs) -> Result<u8> {
    let req = match &a.request {
        CtlRequest::Pause => serde_json::json!({"cmd": "pause"}),
        CtlRequest::Resume => serde_json::json!({"cmd": "resume"}),
        CtlRequest::Stop => serde_json::json!({"cmd": "stop"}),
        CtlRequest::Info => serde_json::json!({"cmd": "info"}),
        CtlRequest::SetQos { disk, iops, bps } => {
            let mut r = serde_json::json!({"cmd": "set-qos", "disk": disk});
            if let Some(i) = iops {
                r["iops"] = (*i).into();
            }
            if let Some(b) = bps {
                r["bps"] = parse_size(b)
                    .with_context(|| format!("invalid --bps '{b}'"))?
                    .into();
            }
            r
        }
        CtlRequest::MigrateStorage { disk, dest, format } => serde_json::json!({
            "cmd": "migrate-storage",
            "disk": disk,
            "dest": dest,
            "format": format.unwrap_or_else(|| Format::for_new_file(dest)).name(),
        }),
        CtlRequest::Checkpoint { name } => serde_json::json!({"cmd": "checkpoint", "name": name}),
        CtlRequest::Send { json } => {
            serde_json::from_str(json).context("the request is not JSON")?
        }
    };
    let reply = tools::vmm_api::call(&a.socket, &req)?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    if reply["ok"] == true {
        Ok(0)
    } else {
        Ok(EXIT_ERROR)
    }
}

/// Read a payload file, refusing what cannot be one.
fn read_payload(p: &Path) -> Result<Vec<u8>> {
    let bytes =
        std::fs::read(p).with_context(|| format!("cannot read the payload {}", p.display()))?;
    if bytes.is_empty() {
        bail!("the payload {} is empty", p.display());
    }
    if bytes.starts_with(b"\x7fELF") {
        bail!(
            "the payload {} is an ELF file: payload mode runs a flat binary loaded at \
             0x200000 (make one with `objcopy -O binary`); a Linux kernel (bzImage or ELF) \
             goes with --kernel",
            p.display()
        );
    }
    Ok(bytes)
}

fn print_report(r: &vmm_core::Report) {
    for (i, d) in r.devices.iter().enumerate() {
        eprintln!(
            "vmm: disk {i} ({}): {} requests, {} I/O errors, {} refused{}{}",
            d.name,
            d.requests,
            d.io_errors,
            d.refused,
            d.last_problem
                .as_deref()
                .map(|p| format!("; last: {p}"))
                .unwrap_or_default(),
            if d.needs_reset {
                format!(
                    "; NEEDS_RESET: {}",
                    d.transport_problem.as_deref().unwrap_or("")
                )
            } else {
                String::new()
            }
        );
    }
    eprintln!(
        "vmm: {} in {:.3} s (first guest exit after {})",
        r.outcome,
        r.elapsed.as_secs_f64(),
        r.first_exit
            .map(|t| format!("{:.3} ms", t.as_secs_f64() * 1e3))
            .unwrap_or_else(|| "none".into())
    );
}

fn write_json(r: &vmm_core::Report, path: &Path) -> Result<()> {
    let outcome = match &r.outcome {
        Outcome::Exited(v) => serde_json::json!({"kind": "exited", "value": v}),
        Outcome::Fault { vcpu, what } => {
            serde_json::json!({"kind": "fault", "vcpu": vcpu, "what": what})
        }
        Outcome::TimedOut(t) => {
            serde_json::json!({"kind": "timed-out", "seconds": t.as_secs_f64()})
        }
        Outcome::Stopped => serde_json::json!({"kind": "stopped"}),
    };
    let devices: Vec<_> = r
        .devices
        .iter()
        .map(|d| {
            serde_json::json!({
                "name": d.name,
                "requests": d.requests,
                "io-errors": d.io_errors,
                "refused": d.refused,
                "last-problem": d.last_problem,
                "transport-problem": d.transport_problem,
                "needs-reset": d.needs_reset,
            })
        })
        .collect();
    let v = serde_json::json!({
        "outcome": outcome,
        "status": r.outcome.status(),
        "elapsed-seconds": r.elapsed.as_secs_f64(),
        "first-exit-seconds": r.first_exit.map(|t| t.as_secs_f64()),
        "devices": devices,
    });
    let text = serde_json::to_string_pretty(&v)? + "\n";
    if path == Path::new("-") {
        eprint!("{text}");
    } else {
        std::fs::write(path, text)
            .with_context(|| format!("cannot write the report {}", path.display()))?;
    }
    Ok(())
}
