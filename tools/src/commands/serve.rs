//! `vdisk serve`: an NBD server ([`nbd`]) of one image, chain or bundle.

use crate::cli::ServeArgs;
use crate::open;
use anyhow::{Context, Result};
use checkpoint::Bundle;
use nbd::{Export, Listener, Server};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

/// Where the server listens when neither --bind nor --socket is given.
const DEFAULT_BIND: &str = "127.0.0.1:10809";

pub fn run(a: &ServeArgs) -> Result<()> {
    // A bundle is held (its directory lock) while its disk is served.
    let (bundle, path) = if a.image.is_dir() {
        let b = Bundle::open(&a.image)
            .with_context(|| format!("{}: opening the bundle", a.image.display()))?;
        let p = b.active_path();
        (Some(b), p)
    } else {
        (None, a.image.clone())
    };
    let img = open::open(&path, a.format, a.rw)?;
    let description = format!(
        "{} ({}{})",
        a.image.display(),
        img.format().name(),
        if a.rw { ", writable" } else { ", read-only" }
    );
    let export = Export {
        name: a.export.clone(),
        description,
        disk: img.disk().clone(),
        writable: a.rw,
    };
    let server = Server::new(vec![export], |msg| eprintln!("vdisk serve: {msg}"))?;
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, server.stop_flag())
            .context("installing the signal handlers")?;
    }
    let mut socket_file: Option<PathBuf> = None;
    let (listener, url) = if let Some(sock) = &a.socket {
        let l = UnixListener::bind(sock)
            .with_context(|| format!("{}: binding the Unix socket", sock.display()))?;
        socket_file = Some(sock.clone());
        let url = format!(
            "nbd+unix:///{}?socket={}",
            a.export,
            std::fs::canonicalize(sock)
                .unwrap_or_else(|_| sock.clone())
                .display()
        );
        (Listener::Unix(l), url)
    } else {
        let addr = a.bind.as_deref().unwrap_or(DEFAULT_BIND);
        let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        let local = l.local_addr().context("reading the bound address")?;
        (Listener::Tcp(l), format!("nbd://{local}/{}", a.export))
    };
    crate::outln!("serving {} on {url}", a.image.display())?;
    let served = server.run(&listener);
    if let Some(p) = socket_file {
        let _ = std::fs::remove_file(p);
    }
    served.context("serving")?;
    img.close()
        .with_context(|| format!("{}: closing", path.display()))?;
    drop(bundle);
    Ok(())
}
