//! An initramfs for the Linux boot test: a cpio archive in the "newc"
//! format the kernel unpacks (Documentation/driver-api/early-userspace/
//! buffer-format.rst), written here at test time.

/// A newc cpio archive being written.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

/// File types and permissions of `mode` (stat(2)).
pub const DIR: u32 = 0o040_755;
pub const EXEC: u32 = 0o100_755;
pub const FILE: u32 = 0o100_644;
pub const CHAR_DEV: u32 = 0o020_600;

impl Cpio {
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Add `name` (no leading slash) of `mode` with `data`; `rdev` the
    /// (major, minor) of a device node.
    pub fn add(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let size = u32::try_from(data.len()).expect("a file of the initramfs fits 4 GiB");
        let namesize = u32::try_from(name.len() + 1).unwrap();
        // The magic, then 13 fields of 8 hexadecimal digits: ino, mode,
        // uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check.
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.add("TRAILER!!!", 0, (0, 0), &[]);
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

/// Whether `elf` is a statically linked ELF file (no PT_INTERP program
/// header), as the initramfs's busybox must be.
pub fn is_static_elf(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff + i * usize::from(phentsize);
        elf.get(at..at + 4) != Some(&3u32.to_le_bytes()[..])
    })
}
