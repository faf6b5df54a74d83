//! The client side of `vmm`'s control API (a unix socket, one JSON object
//! per line each way), and the file by which a checkpoint bundle that a
//! running `vmm run --bundle DIR --api SOCKET` holds names that socket, so
//! that `vdisk checkpoint create` can ask that vmm instead of failing on
//! the bundle's lock.

use anyhow::{Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The longest reply read.
const MAX_LINE: u64 = 64 << 10;

/// The file in a bundle naming the API socket of the vmm that runs it.
pub const API_FILE: &str = "vmm.api";

/// Send one request to the API at `socket`; its reply.
///
/// # Errors
/// The socket cannot be reached, or the reply is no JSON line.
pub fn call(socket: &Path, req: &Value) -> Result<Value> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot connect to {} (is `vmm run --api` running?)",
            socket.display()
        )
    })?;
    let mut text = req.to_string();
    text.push('\n');
    s.write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new(s)
        .take(MAX_LINE)
        .read_line(&mut line)
        .context("reading the reply")?;
    serde_json::from_str(&line)
        .with_context(|| format!("the reply is not JSON: {:?}", line.trim_end()))
}

/// The record of a bundle's API socket, removed when dropped.
#[derive(Debug)]
pub struct Recorded(PathBuf);

impl Drop for Recorded {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Record in bundle `dir` that `socket` controls the vmm running it.
///
/// # Errors
/// The file cannot be written.
pub fn record(dir: &Path, socket: &Path) -> Result<Recorded> {
    let socket = std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf());
    let file = dir.join(API_FILE);
    std::fs::write(&file, socket.as_os_str().as_encoded_bytes())
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(Recorded(file))
}

/// The API socket recorded in bundle `dir`, if a vmm recorded one.
pub fn recorded(dir: &Path) -> Option<PathBuf> {
    let b = std::fs::read(dir.join(API_FILE)).ok()?;
    let s = String::from_utf8(b).ok()?;
    (!s.is_empty()).then(|| PathBuf::from(s))
}
