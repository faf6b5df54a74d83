//! The control API of `vmm run --api SOCKET`: a unix socket, one JSON
//! object per line each way.
//!
//! Requests: `{"cmd":"pause"}`, `{"cmd":"resume"}`, `{"cmd":"stop"}`,
//! `{"cmd":"info"}`, `{"cmd":"set-qos","disk":I,"iops":N,"bps":N}` (a limit
//! left out is kept, 0 or null removes it),
//! `{"cmd":"migrate-storage","disk":I,"dest":PATH,"format":"vhdx"|"vhd"|"raw"}`
//! (answered when the device serves DEST, with the copy passes, the bytes
//! copied and the pause; or with an error, the guest still on its disk),
//! `{"cmd":"checkpoint","name":N}` (a VM checkpoint into the bundle of
//! `vmm run --bundle`: answered with its node, the memory written and the
//! pause). Replies: `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`. `pause` answers once no vCPU runs guest
//! code; `stop` once the run is told to end (the process then flushes and
//! closes the disks and exits 130). A line longer than 64 KiB, or one that
//! is not a JSON object with a known "cmd", is answered with an error; the
//! connection stays open. Any number of clients may be connected.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmm_core::qos::Limits;
use vmm_core::Controller;

/// The longest request line taken.
const MAX_LINE: u64 = 64 << 10;

/// A listening API socket; the file is removed when it is dropped.
pub struct Api {
    path: PathBuf,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen on `path` and serve `ctl` on a thread. A socket file left by a
/// process that is gone is replaced; one something listens on is refused.
///
/// # Errors
/// The path is taken or cannot be bound.
/// `bundles[i]` says whether disk `i` is a checkpoint bundle's active disk
/// (which is not migrated: its checkpoints would stay behind).
pub fn serve(path: &Path, ctl: Arc<Controller>, bundles: Vec<bool>) -> Result<Api> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "{}: another process listens on this API socket",
                path.display()
            );
        }
        let meta = std::fs::symlink_metadata(path)?;
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            bail!("{}: exists and is not a socket", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on the API socket {}", path.display()))?;
    std::thread::Builder::new()
        .name("vmm-api".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let ctl = ctl.clone();
                let bundles = bundles.clone();
                let _ = std::thread::Builder::new()
                    .name("vmm-api-client".into())
                    .spawn(move || client(conn, &ctl, &bundles));
            }
        })
        .context("starting the API thread")?;
    Ok(Api {
        path: path.to_path_buf(),
    })
}

/// Serve one client until it hangs up.
fn client(conn: UnixStream, ctl: &Controller, bundles: &[bool]) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = Vec::new();
        let n = match (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let reply = if u64::try_from(n).unwrap_or(u64::MAX) > MAX_LINE {
            // Skip the rest of the line, then answer.
            let mut rest = Vec::new();
            if reader.read_until(b'\n', &mut rest).is_err() {
                return;
            }
            error(format!("request line longer than {MAX_LINE} bytes"))
        } else if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        } else {
            match serde_json::from_slice::<Value>(&line) {
                Ok(Value::Object(req)) => answer(&req, ctl, bundles),
                Ok(_) => error("a request is a JSON object".into()),
                Err(e) => error(format!("not JSON: {e}")),
            }
        };
        let mut text = reply.to_string();
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

fn error(msg: String) -> Value {
    json!({"ok": false, "error": msg})
}

fn done(r: Result<(), String>) -> Value {
    match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => error(e),
    }
}

/// The reply to one request.
pub fn answer(req: &Map<String, Value>, ctl: &Controller, bundles: &[bool]) -> Value {
    let Some(cmd) = req.get("cmd").and_then(Value::as_str) else {
        return error("no \"cmd\" string in the request".into());
    };
    match cmd {
        "pause" => done(ctl.pause()),
        "resume" => done(ctl.resume()),
        "stop" => done(ctl.stop()),
        "info" => info(ctl),
        "set-qos" => match set_qos(req, ctl) {
            Ok(()) => json!({"ok": true}),
            Err(e) => error(e),
        },
        "migrate-storage" => migrate(req, ctl, bundles).unwrap_or_else(error),
        "checkpoint" => checkpoint(req, ctl).unwrap_or_else(error),
        other => error(format!("unknown command \"{other}\" (known: {KNOWN})")),
    }
}

/// The commands served.
const KNOWN: &str = "pause, resume, stop, info, set-qos, migrate-storage, checkpoint";

fn checkpoint(req: &Map<String, Value>, ctl: &Controller) -> Result<Value, String> {
    let name = req
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or("checkpoint needs \"name\": the checkpoint's name")?;
    let r = ctl.checkpoint(name)?;
    Ok(json!({
        "ok": true,
        "name": r.name,
        "node": r.node,
        "memory-bytes": r.memory_bytes,
        "pause-ms": r.pause.as_secs_f64() * 1e3,
        "seconds": r.elapsed.as_secs_f64(),
    }))
}

fn migrate(req: &Map<String, Value>, ctl: &Controller, bundles: &[bool]) -> Result<Value, String> {
    let disk = req
        .get("disk")
        .and_then(Value::as_u64)
        .and_then(|d| usize::try_from(d).ok())
        .ok_or("migrate-storage needs \"disk\": the disk's index (0-based)")?;
    let dest = req
        .get("dest")
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty())
        .ok_or("migrate-storage needs \"dest\": the new image's path")?;
    let format = req
        .get("format")
        .and_then(Value::as_str)
        .ok_or("migrate-storage needs \"format\": vhdx, vhd or raw")
        .and_then(|f| image::Format::parse(f).map_err(|_| "\"format\" is vhdx, vhd or raw"))?;
    if bundles.get(disk).copied().unwrap_or(false) {
        return Err(format!(
            "disk {disk} is a checkpoint bundle's active disk: migrating it would leave its \
             checkpoints behind"
        ));
    }
    let r = ctl.migrate_storage(disk, &vmm_core::migrate::MigrateOptions::new(dest, format))?;
    Ok(json!({
        "ok": true,
        "passes": r.passes,
        "bytes-copied": r.bytes_copied,
        "pause-ms": r.pause.as_secs_f64() * 1e3,
        "seconds": r.elapsed.as_secs_f64(),
    }))
}

fn info(ctl: &Controller) -> Value {
    let i = ctl.info();
    let disks: Vec<Value> = i
        .disks
        .iter()
        .enumerate()
        .map(|(n, d)| {
            json!({
                "index": n,
                "name": d.name,
                "writable": d.writable,
                "requests": d.requests,
                "io-errors": d.io_errors,
                "refused": d.refused,
                "iops": d.qos.iops,
                "bps": d.qos.bps,
            })
        })
        .collect();
    json!({
        "ok": true,
        "state": i.state.name(),
        "vcpus": i.vcpus,
        "mem": i.mem,
        "uptime-seconds": i.uptime.as_secs_f64(),
        "disks": disks,
    })
}

/// A limit in a set-qos request: `Ok(None)` when left out (keep),
/// `Ok(Some(None))` for 0 or null (remove).
fn limit(req: &Map<String, Value>, key: &str) -> Result<Option<Option<u64>>, String> {
    match req.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => match v.as_u64() {
            Some(0) => Ok(Some(None)),
            Some(n) => Ok(Some(Some(n))),
            None => Err(format!("\"{key}\" must be a whole number (0: no limit)")),
        },
    }
}

fn set_qos(req: &Map<String, Value>, ctl: &Controller) -> Result<(), String> {
    let disk = req
        .get("disk")
        .and_then(Value::as_u64)
        .and_then(|d| usize::try_from(d).ok())
        .ok_or("set-qos needs \"disk\": the disk's index (0-based)")?;
    let (iops, bps) = (limit(req, "iops")?, limit(req, "bps")?);
    if iops.is_none() && bps.is_none() {
        return Err("set-qos needs \"iops\" or \"bps\" (0 removes a limit)".into());
    }
    let now = ctl
        .info()
        .disks
        .get(disk)
        .map(|d| d.qos)
        .unwrap_or_default();
    ctl.set_qos(
        disk,
        Limits {
            iops: iops.unwrap_or(now.iops),
            bps: bps.unwrap_or(now.bps),
        },
    )
}
