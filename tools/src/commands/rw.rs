//! `vdisk read` and `vdisk write`: raw access to virtual bytes.

use super::{min_len, CHUNK};
use crate::cli::{ReadArgs, WriteArgs};
use crate::open;
use crate::size::parse_arg;
use anyhow::{bail, Context, Result};
use disk::VirtualDisk;
use std::io::{Read, Write};
use std::path::Path;

/// Fail unless `[offset, offset+len)` is inside the disk.
fn check_range(d: &dyn VirtualDisk, image: &Path, offset: u64, len: u64) -> Result<()> {
    let size = d.virtual_size();
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => bail!(
            "{}: range of {len} bytes at offset {offset} is beyond the virtual size ({size} bytes)",
            image.display()
        ),
    }
}

pub fn read(args: &ReadArgs) -> Result<()> {
    let offset = parse_arg("OFFSET", &args.offset)?;
    let length = parse_arg("LENGTH", &args.length)?;
    let img = open::open(&args.image, args.format, false)?;
    let d = img.disk();
    check_range(d, &args.image, offset, length)?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; min_len(length, CHUNK)];
    let mut done = 0u64;
    while done < length {
        let n = min_len(length - done, buf.len());
        d.read_at(&mut buf[..n], offset + done)?;
        out.write_all(&buf[..n]).context("cannot write to stdout")?;
        done += n as u64;
    }
    out.flush().context("cannot write to stdout")?;
    Ok(())
}

/// Read until `buf` is full or the input ends; the number of bytes read.
fn read_full(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub fn write(args: &WriteArgs) -> Result<()> {
    let offset = parse_arg("OFFSET", &args.offset)?;
    let img = open::open(&args.image, args.format, true)?;
    let d = img.disk();
    check_range(d, &args.image, offset, 0)?;
    let (mut input, input_name): (Box<dyn Read>, String) = match &args.file {
        Some(p) => {
            let name = p.display().to_string();
            let f = std::fs::File::open(p)
                .map_err(|e| disk::Error::io("cannot open", e).in_file(&name, 0))?;
            let len = f
                .metadata()
                .map_err(|e| disk::Error::io("cannot stat", e).in_file(&name, 0))?
                .len();
            // Refuse before writing anything rather than halfway through.
            let size = d.virtual_size();
            if !matches!(offset.checked_add(len), Some(end) if end <= size) {
                bail!(
                    "{}: cannot write the {len} bytes of {name} at offset {offset}: \
                     beyond the virtual size ({size} bytes)",
                    args.image.display()
                );
            }
            (Box::new(f), name)
        }
        None => (Box::new(std::io::stdin().lock()), "stdin".to_string()),
    };
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    loop {
        let n = read_full(&mut *input, &mut buf)
            .map_err(|e| disk::Error::io("read failed", e).in_file(&input_name, 0))?;
        if n == 0 {
            break;
        }
        d.write_at(&buf[..n], offset + done)?;
        done += n as u64;
        if n < buf.len() {
            break;
        }
    }
    d.flush()?;
    img.close()?;
    crate::outln!("wrote {done} bytes at offset {offset}")?;
    Ok(())
}
