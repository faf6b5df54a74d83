//! `vdisk serve` with real NBD clients: qemu-img (compare, convert, map),
//! qemu-io, and libnbd's nbdinfo and nbdcopy (Debian libnbd-bin), over
//! TCP and Unix sockets; images, a differencing chain (which qemu cannot
//! open itself), a checkpoint bundle, and a dirty-log VHDX served
//! read-only; signals, locks and a hostile client against the binary.
//! Each client is skipped with a message when it is not installed.

// The shared helpers make test patterns by truncation.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::vdisk_write as write;
use common::*;
use disk::testing::have;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const MIB: u64 = 1 << 20;

/// A running `vdisk serve`.
struct Served {
    child: Child,
    url: String,
}

impl Served {
    fn start(args: &[&str]) -> Served {
        let mut child = vdisk()
            .arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some((_, url)) = line.trim().split_once(" on ") else {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("vdisk serve {args:?} did not start: {line:?} {err}");
        };
        Served {
            child,
            url: url.to_string(),
        }
    }
    /// Stop with `signal`; the exit status must be 0. Returns stderr.
    fn stop(mut self, signal: &str) -> String {
        let st = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "vdisk serve exit {:?}: {err}",
            out.status
        );
        err
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tool(name: &str) -> bool {
    if have(name) {
        true
    } else {
        println!("{name} not installed: skipping its part");
        false
    }
}

/// Run `prog args...`; it must succeed; stdout.
fn must(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 64 MiB VHDX (1 MiB blocks) with data at 1 MiB and 40 MiB.
fn image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("d.vhdx");
    create_vhdx_1m(&img, "64M");
    write(&img, MIB, &pattern(300_000, 1));
    write(&img, 40 * MIB, &pattern(4096, 2));
    img
}

#[test]
fn read_only_export_matches_the_image_for_every_client() {
    let dir = tmp();
    let img = image(dir.path());
    let s = Served::start(&["--bind", "127.0.0.1:0", "--export", "d", p(&img)]);
    let raw = dir.path().join("copy.raw");
    ok(&["convert", "-O", "raw", p(&img), p(&raw)]);
    if tool("qemu-img") {
        must(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &s.url, p(&raw)],
        );
        // Holes and data, as the image has them.
        let map = must(
            "qemu-img",
            &["map", "-f", "raw", "--output", "json", &s.url],
        );
        let j: serde_json::Value = serde_json::from_str(&map).unwrap();
        let data_at = |off: u64| {
            j.as_array().unwrap().iter().any(|e| {
                let start = e["start"].as_u64().unwrap();
                let len = e["length"].as_u64().unwrap();
                e["data"] == true && start <= off && off < start + len
            })
        };
        assert!(data_at(MIB) && data_at(40 * MIB), "{map}");
        assert!(!data_at(10 * MIB) && !data_at(63 * MIB), "{map}");
    }
    if tool("nbdinfo") {
        let info = must("nbdinfo", &[&s.url]);
        assert!(info.contains("67108864"), "{info}");
        assert!(info.contains("is_read_only: true"), "{info}");
        assert!(info.contains("can_multi_conn: true"), "{info}");
        let map = must("nbdinfo", &["--map", &s.url]);
        assert!(map.contains("hole,zero") && map.contains("data"), "{map}");
        let list = must("nbdinfo", &["--list", &s.url]);
        assert!(list.contains("export=\"d\":"), "{list}");
        assert!(
            list.contains("description: ") && list.contains("read-only"),
            "{list}"
        );
        assert!(list.contains("block_size_maximum: 33554432"), "{list}");
    }
    if tool("nbdcopy") {
        let out = dir.path().join("nbdcopy.raw");
        must("nbdcopy", &[&s.url, p(&out)]);
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap());
    }
    if tool("qemu-io") {
        // Writes fail on a read-only export; the server goes on.
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 512", &s.url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!text.contains("wrote 512"), "{text}");
    }
    s.stop("TERM");
    // Nothing wrote the image.
    ok(&["compare", p(&img), p(&raw)]);
}

#[test]
fn writes_through_qemu_io_read_back_with_vdisk() {
    if !tool("qemu-io") {
        return;
    }
    let dir = tmp();
    let img = image(dir.path());
    let s = Served::start(&["--rw", "--bind", "127.0.0.1:0", p(&img)]);
    let out = must(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 5M 1M",
            "-c",
            "write -z 1M 4096",
            "-c",
            "discard 40M 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0x5a 5M 1M",
            &s.url,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // A second writer of the image is refused while it is served.
    let err = fails(1, &["write", p(&img), "0", "/dev/null"]);
    assert!(err.contains("lock") || err.contains("in use"), "{err}");
    s.stop("TERM");
    assert_eq!(read_bytes(&img, 5 * MIB, 4096), vec![0x5a; 4096]);
    assert_eq!(read_bytes(&img, MIB, 4096), vec![0; 4096]);
    assert_eq!(
        read_bytes(&img, MIB + 4096, 16),
        pattern(300_000, 1)[4096..4112]
    );
    assert_eq!(read_bytes(&img, 40 * MIB, 4096), vec![0; 4096]);
    ok(&["check", p(&img)]);
}

#[test]
fn a_dirty_log_vhdx_is_served_replayed_and_left_untouched() {
    let dir = tmp();
    let img = dir.path().join("dirty.vhdx");
    let data = dirty_log_vhdx(&img);
    let before = std::fs::read(&img).unwrap();
    let sock = dir.path().join("s");
    let s = Served::start(&["--socket", p(&sock), p(&img)]);
    assert!(s.url.starts_with("nbd+unix:///?socket="), "{}", s.url);
    if tool("qemu-img") {
        let out = dir.path().join("out.raw");
        must(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", &s.url, p(&out)],
        );
        let got = std::fs::read(&out).unwrap();
        assert!(got[3 << 20..(3 << 20) + data.len()] == data[..]);
    }
    s.stop("INT");
    assert!(std::fs::read(&img).unwrap() == before, "the file changed");
    assert!(!sock.exists(), "the socket file is left behind");
}

#[test]
fn a_differencing_chain_and_a_bundle_are_served_as_one_disk() {
    if !tool("qemu-img") {
        return;
    }
    let dir = tmp();
    let base = image(dir.path());
    let child = dir.path().join("child.avhdx");
    ok(&["create", "-f", "vhdx", "-b", p(&base), p(&child)]);
    write(&child, MIB + 1000, &pattern(5000, 3));
    let raw = dir.path().join("chain.raw");
    ok(&["convert", "-O", "raw", p(&child), p(&raw)]);
    let s = Served::start(&["--bind", "127.0.0.1:0", p(&child)]);
    must(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &s.url, p(&raw)],
    );
    s.stop("TERM");

    let bundle = dir.path().join("vm");
    ok(&["checkpoint", "init", "--from", p(&base), p(&bundle)]);
    let active = ok(&["checkpoint", "path", p(&bundle)]).trim().to_string();
    write(Path::new(&active), 7 * MIB, &pattern(8192, 4));
    ok(&["checkpoint", "create", p(&bundle), "c1"]);
    let active = ok(&["checkpoint", "path", p(&bundle)]).trim().to_string();
    write(Path::new(&active), 9 * MIB, &pattern(8192, 5));
    let braw = dir.path().join("bundle.raw");
    ok(&["convert", "-O", "raw", &active, p(&braw)]);
    let s = Served::start(&["--bind", "127.0.0.1:0", p(&bundle)]);
    must(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &s.url, p(&braw)],
    );
    // The bundle is held while served.
    fails(1, &["checkpoint", "create", p(&bundle), "c2"]);
    s.stop("TERM");
}

#[test]
fn a_hostile_client_is_dropped_and_the_server_goes_on() {
    let dir = tmp();
    let img = image(dir.path());
    let s = Served::start(&["--bind", "127.0.0.1:0", p(&img)]);
    let addr = s
        .url
        .trim_start_matches("nbd://")
        .trim_end_matches('/')
        .to_string();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    c.write_all(&[0xff; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    if tool("qemu-io") {
        let out = must("qemu-io", &["-f", "raw", "-r", "-c", "read 0 4096", &s.url]);
        assert!(out.contains("read 4096/4096"), "{out}");
    }
    let err = s.stop("TERM");
    assert!(err.contains("client dropped"), "{err}");
}

#[test]
fn bad_arguments_are_refused() {
    let dir = tmp();
    let img = image(dir.path());
    let err = fails(1, &["serve", "--bind", "not-an-address", p(&img)]);
    assert!(err.contains("not-an-address"), "{err}");
    let err = fails(1, &["serve", p(&dir.path().join("missing.vhdx"))]);
    assert!(err.contains("missing.vhdx"), "{err}");
    let err = fails(1, &["serve", "-U", "--rw", p(&img)]);
    assert!(err.contains("force-share"), "{err}");
    // The help says what it does and how it ends.
    let help = ok(&["serve", "--help"]);
    for want in [
        "Examples",
        "vdisk serve ",
        "base:allocation",
        "--rw",
        "SIGTERM",
        "Exit status",
    ] {
        assert!(help.contains(want), "{want}: {help}");
    }
}
