//! The metadata region (MS-VHDX 2.6): a 64 KiB metadata table at the start
//! of the region followed by the metadata items it describes.
//!
//! Table header (MS-VHDX 2.6.1.1, 32 bytes): `Signature` "metadata" (0),
//! reserved u16 (8), `EntryCount` u16 (10, at most 2047), reserved (12..32).
//! Entries (MS-VHDX 2.6.1.2, 32 bytes each, from offset 32): `ItemId` GUID
//! (0), `Offset` u32 (16, from the region start, at least 64 KiB), `Length`
//! u32 (20, at most 1 MiB; a zero length needs a zero offset), flags u32 (24:
//! bit 0 `IsUser`, bit 1 `IsVirtualDisk`, bit 2 `IsRequired`), reserved (28).
//! The metadata table has no checksum.
//!
//! Known system items (MS-VHDX 2.6.2): file parameters (2.6.2.1), virtual
//! disk size (2.6.2.2), virtual disk ID / page 83 data (2.6.2.3), logical
//! sector size (2.6.2.4), physical sector size (2.6.2.5), parent locator
//! (2.6.2.6, see [`crate::parent_locator`]).

use crate::guid::{is_aligned, le_u16, le_u32, le_u64, put_u16, put_u32, read_guid, write_guid};
use crate::parent_locator::ParentLocator;
use crate::{Error, Result};
use std::collections::HashSet;
use uuid::Uuid;

/// Structure name used in error messages.
const NAME: &str = "VHDX metadata";
/// `Signature` value: "metadata".
pub const SIGNATURE: [u8; 8] = *b"metadata";
/// Bytes of the metadata table.
pub const TABLE_SIZE: usize = 64 * 1024;
/// Bytes of the metadata table header.
pub const HEADER_SIZE: usize = 32;
/// Bytes of one metadata table entry.
pub const ENTRY_SIZE: usize = 32;
/// Maximum `EntryCount`.
pub const MAX_ENTRIES: u16 = 2047;
/// Maximum `Length` of one metadata item (1 MiB).
pub const MAX_ITEM_LENGTH: u32 = 1024 * 1024;
/// Largest virtual disk size the format allows (64 TiB, MS-VHDX 2.6.2.2).
pub const MAX_VIRTUAL_DISK_SIZE: u64 = 64 << 40;
/// Smallest block size (1 MiB, MS-VHDX 2.6.2.1).
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// Largest block size (256 MiB, MS-VHDX 2.6.2.1).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;

/// File parameters item (MS-VHDX 2.6.2.1).
pub const FILE_PARAMETERS: Uuid = Uuid::from_u128(0xCAA16737_FA36_4D43_B3B6_33F0AA44E76B);
/// Virtual disk size item (MS-VHDX 2.6.2.2).
pub const VIRTUAL_DISK_SIZE: Uuid = Uuid::from_u128(0x2FA54224_CD1B_4876_B211_5DBED83BF4B8);
/// Virtual disk ID (page 83 data) item (MS-VHDX 2.6.2.3).
pub const VIRTUAL_DISK_ID: Uuid = Uuid::from_u128(0xBECA12AB_B2E6_4523_93EF_C309E000C746);
/// Logical sector size item (MS-VHDX 2.6.2.4).
pub const LOGICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0x8141BF1D_A96F_4709_BA47_F233A8FAAB5F);
/// Physical sector size item (MS-VHDX 2.6.2.5).
pub const PHYSICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0xCDA348C7_445D_4471_9CC9_E9885251C556);
/// Parent locator item (MS-VHDX 2.6.2.6).
pub const PARENT_LOCATOR: Uuid = Uuid::from_u128(0xA8D35F2D_B30B_454D_ABF7_D3D84834AB0C);

const FLAG_USER: u32 = 1;
const FLAG_VIRTUAL_DISK: u32 = 2;
const FLAG_REQUIRED: u32 = 4;

/// One metadata table entry (MS-VHDX 2.6.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataEntry {
    /// Identifies the item.
    pub item_id: Uuid,
    /// Offset of the item from the start of the metadata region.
    pub offset: u32,
    /// Bytes of the item.
    pub length: u32,
    /// A user item (as opposed to a system item).
    pub is_user: bool,
    /// The item describes the virtual disk (copied to differencing children).
    pub is_virtual_disk: bool,
    /// An implementation that does not know the item must refuse the file.
    pub is_required: bool,
}

impl MetadataEntry {
    /// Decode one 32-byte entry (field decoding only; validation is in
    /// [`MetadataTable::parse`]).
    pub fn parse(b: &[u8; ENTRY_SIZE]) -> Self {
        let flags = le_u32(b, 24);
        MetadataEntry {
            item_id: read_guid(b, 0),
            offset: le_u32(b, 16),
            length: le_u32(b, 20),
            is_user: flags & FLAG_USER != 0,
            is_virtual_disk: flags & FLAG_VIRTUAL_DISK != 0,
            is_required: flags & FLAG_REQUIRED != 0,
        }
    }

    /// Encode into 32 bytes (reserved bits zero).
    pub fn write_to(&self, b: &mut [u8; ENTRY_SIZE]) {
        b.fill(0);
        write_guid(b, 0, self.item_id);
        put_u32(b, 16, self.offset);
        put_u32(b, 20, self.length);
        let mut flags = 0;
        if self.is_user {
            flags |= FLAG_USER;
        }
        if self.is_virtual_disk {
            flags |= FLAG_VIRTUAL_DISK;
        }
        if self.is_required {
            flags |= FLAG_REQUIRED;
        }
        put_u32(b, 24, flags);
    }

    fn end(&self) -> u64 {
        u64::from(self.offset) + u64::from(self.length)
    }
}

/// The metadata table (MS-VHDX 2.6.1).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MetadataTable {
    /// The entries in on-disk order.
    pub entries: Vec<MetadataEntry>,
}

impl MetadataTable {
    /// Parse and validate the table at the start of `buf` for a metadata
    /// region of `region_length` bytes: signature, entry count, every item
    /// inside the region past the table, no overlapping items, no duplicate
    /// `(ItemId, IsUser)` pairs. Error offsets are relative to `buf`.
    pub fn parse(buf: &[u8], region_length: u64) -> Result<Self> {
        if buf.len() < HEADER_SIZE {
            return Err(Error::corrupt(
                NAME,
                0,
                format!(
                    "table truncated: {} bytes, need at least {HEADER_SIZE}",
                    buf.len()
                ),
            ));
        }
        if buf[..8] != SIGNATURE {
            return Err(Error::corrupt(
                NAME,
                0,
                format!(
                    "bad table signature \"{}\" (expected \"metadata\")",
                    crate::guid::show_signature(&buf[..8])
                ),
            ));
        }
        let count = le_u16(buf, 10);
        if count > MAX_ENTRIES {
            return Err(Error::corrupt(
                NAME,
                10,
                format!("EntryCount {count} exceeds {MAX_ENTRIES}"),
            ));
        }
        let count = usize::from(count);
        let table_end = HEADER_SIZE + count * ENTRY_SIZE;
        if buf.len() < table_end {
            return Err(Error::corrupt(
                NAME,
                10,
                format!(
                    "table truncated: EntryCount {count} needs {table_end} bytes, have {}",
                    buf.len()
                ),
            ));
        }
        let mut entries: Vec<MetadataEntry> = Vec::with_capacity(count);
        let mut ids = HashSet::with_capacity(count);
        for i in 0..count {
            let at = HEADER_SIZE + i * ENTRY_SIZE;
            let raw: &[u8; ENTRY_SIZE] = buf[at..at + ENTRY_SIZE]
                .try_into()
                .expect("entry slice has entry size");
            let e = MetadataEntry::parse(raw);
            let at = at as u64;
            let bad = |field: u64, msg: String| {
                Err(Error::corrupt(
                    NAME,
                    at + field,
                    format!("item {} (entry {i}): {msg}", e.item_id),
                ))
            };
            if e.length == 0 {
                if e.offset != 0 {
                    return bad(16, format!("Length is 0 but Offset is {:#x}", e.offset));
                }
            } else {
                if e.length > MAX_ITEM_LENGTH {
                    return bad(20, format!("Length {:#x} exceeds 1 MiB", e.length));
                }
                if (e.offset as usize) < TABLE_SIZE {
                    return bad(
                        16,
                        format!("Offset {:#x} lies inside the 64 KiB table", e.offset),
                    );
                }
                if e.end() > region_length {
                    return bad(
                        16,
                        format!(
                            "{:#x}+{:#x} extends past the metadata region ({region_length:#x} bytes)",
                            e.offset, e.length
                        ),
                    );
                }
                if let Some(o) = entries.iter().find(|o| {
                    o.length != 0 && u64::from(e.offset) < o.end() && u64::from(o.offset) < e.end()
                }) {
                    return bad(
                        16,
                        format!(
                            "{:#x}+{:#x} overlaps item {} ({:#x}+{:#x})",
                            e.offset, e.length, o.item_id, o.offset, o.length
                        ),
                    );
                }
            }
            if !ids.insert((e.item_id, e.is_user)) {
                return bad(
                    0,
                    format!(
                        "listed twice as a {} item",
                        if e.is_user { "user" } else { "system" }
                    ),
                );
            }
            entries.push(e);
        }
        Ok(MetadataTable { entries })
    }

    /// Where the last item ends (at least the end of the 64 KiB table): how
    /// much of the region [`Metadata::parse_start`] needs.
    pub fn items_end(&self) -> u64 {
        self.entries
            .iter()
            .map(MetadataEntry::end)
            .fold(TABLE_SIZE as u64, u64::max)
    }

    /// Write the table into `buf[..65536]` (unused space zeroed).
    ///
    /// # Panics
    /// If `buf` is shorter than 64 KiB or there are more than 2047 entries.
    pub fn write_to(&self, buf: &mut [u8]) {
        let count = u16::try_from(self.entries.len())
            .ok()
            .filter(|&n| n <= MAX_ENTRIES)
            .expect("too many metadata items");
        let buf = &mut buf[..TABLE_SIZE];
        buf.fill(0);
        buf[..8].copy_from_slice(&SIGNATURE);
        put_u16(buf, 10, count);
        for (i, e) in self.entries.iter().enumerate() {
            let at = HEADER_SIZE + i * ENTRY_SIZE;
            let raw: &mut [u8; ENTRY_SIZE] = (&mut buf[at..at + ENTRY_SIZE])
                .try_into()
                .expect("entry slice has entry size");
            e.write_to(raw);
        }
    }

    /// The system (non-user) entry for `id`, if present.
    pub fn find(&self, id: Uuid) -> Option<&MetadataEntry> {
        self.entries.iter().find(|e| e.item_id == id && !e.is_user)
    }
}

/// `(offset, length)` within the metadata region of the system item `id`,
/// so a driver can rewrite one item in place.
pub fn item_offset(table: &MetadataTable, id: Uuid) -> Option<(u32, u32)> {
    table.find(id).map(|e| (e.offset, e.length))
}

/// The file parameters item (MS-VHDX 2.6.2.1): 8 bytes, `BlockSize` u32 then
/// flags u32 (bit 0 `LeaveBlockAllocated`, bit 1 `HasParent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileParameters {
    /// Payload block size: a power of two from 1 MiB to 256 MiB.
    pub block_size: u32,
    /// Blocks must stay allocated (fixed disks).
    pub leave_blocks_allocated: bool,
    /// The file is a differencing disk.
    pub has_parent: bool,
}

impl FileParameters {
    /// Bytes of the item.
    pub const SIZE: usize = 8;

    /// Decode and validate from the start of `b`; offsets relative to `b`.
    pub fn parse(b: &[u8]) -> Result<Self> {
        need(b, Self::SIZE, "file parameters")?;
        let flags = le_u32(b, 4);
        let p = FileParameters {
            block_size: le_u32(b, 0),
            leave_blocks_allocated: flags & 1 != 0,
            has_parent: flags & 2 != 0,
        };
        check_block_size(p.block_size).map_err(|m| Error::corrupt(NAME, 0, m))?;
        Ok(p)
    }

    /// Encode into `b[..8]`.
    pub fn write_to(&self, b: &mut [u8]) {
        put_u32(b, 0, self.block_size);
        put_u32(
            b,
            4,
            u32::from(self.leave_blocks_allocated) | (u32::from(self.has_parent) << 1),
        );
    }
}

/// The system metadata a VHDX file must have (MS-VHDX 2.6.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// File parameters (MS-VHDX 2.6.2.1).
    pub file_parameters: FileParameters,
    /// Virtual disk size in bytes (MS-VHDX 2.6.2.2).
    pub virtual_disk_size: u64,
    /// Virtual disk ID, the SCSI page 83 identifier (MS-VHDX 2.6.2.3).
    pub virtual_disk_id: Uuid,
    /// Logical sector size, 512 or 4096 (MS-VHDX 2.6.2.4).
    pub logical_sector_size: u32,
    /// Physical sector size, 512 or 4096 (MS-VHDX 2.6.2.5).
    pub physical_sector_size: u32,
    /// Parent locator (MS-VHDX 2.6.2.6), present when the file has one.
    pub parent_locator: Option<ParentLocator>,
}

impl Metadata {
    /// Parse the whole metadata region `region`: the table, then every known
    /// system item. Unknown items flagged required are `Unsupported`; missing
    /// required items and invalid values are `Corrupt`. Error offsets are
    /// relative to the region start.
    ///
    /// The parent locator is parsed whenever present and required when
    /// `HasParent` is set; its locator type is not checked here.
    pub fn parse(region: &[u8]) -> Result<(MetadataTable, Metadata)> {
        Metadata::parse_start(region, region.len() as u64)
    }

    /// [`Metadata::parse`] from `start`, the first bytes of a metadata
    /// region of `region_length` bytes: at least the table and every item
    /// (see [`MetadataTable::items_end`]). An open reads no more of the
    /// (usually 1 MiB) region than that.
    ///
    /// # Errors
    /// As [`Metadata::parse`]; an item past `start` is `Corrupt`.
    pub fn parse_start(start: &[u8], region_length: u64) -> Result<(MetadataTable, Metadata)> {
        let region = start;
        let table = MetadataTable::parse(region, region_length)?;
        let mut file_parameters = None;
        let mut virtual_disk_size = None;
        let mut virtual_disk_id = None;
        let mut logical_sector_size = None;
        let mut physical_sector_size = None;
        let mut parent_locator = None;
        for e in &table.entries {
            // MetadataTable::parse checked offset + length <= region_length,
            // which is region.len() unless only the start was read.
            let Some(item) = region.get(e.offset as usize..e.offset as usize + e.length as usize)
            else {
                return Err(Error::corrupt(
                    NAME,
                    u64::from(e.offset),
                    format!(
                        "item {} lies past the {:#x} bytes read of the region",
                        e.item_id,
                        region.len()
                    ),
                ));
            };
            let base = u64::from(e.offset);
            // Rebase an item-relative error to the region (file name stays empty
            // so the driver's own `in_file` still applies).
            let rebase = |err: Error| err.in_file("", base);
            let known = !e.is_user
                && [
                    FILE_PARAMETERS,
                    VIRTUAL_DISK_SIZE,
                    VIRTUAL_DISK_ID,
                    LOGICAL_SECTOR_SIZE,
                    PHYSICAL_SECTOR_SIZE,
                    PARENT_LOCATOR,
                ]
                .contains(&e.item_id);
            if !known {
                if e.is_required {
                    return Err(Error::unsupported(format!(
                        "required {} metadata item {} is not known to this implementation",
                        if e.is_user { "user" } else { "system" },
                        e.item_id
                    )));
                }
                continue;
            }
            match e.item_id {
                FILE_PARAMETERS => {
                    file_parameters = Some(FileParameters::parse(item).map_err(rebase)?);
                }
                VIRTUAL_DISK_SIZE => {
                    need(item, 8, "virtual disk size").map_err(rebase)?;
                    virtual_disk_size = Some((le_u64(item, 0), base));
                }
                VIRTUAL_DISK_ID => {
                    need(item, 16, "virtual disk ID").map_err(rebase)?;
                    virtual_disk_id = Some(read_guid(item, 0));
                }
                LOGICAL_SECTOR_SIZE => {
                    need(item, 4, "logical sector size").map_err(rebase)?;
                    let v = le_u32(item, 0);
                    check_sector_size(v, "logical").map_err(|m| Error::corrupt(NAME, base, m))?;
                    logical_sector_size = Some(v);
                }
                PHYSICAL_SECTOR_SIZE => {
                    need(item, 4, "physical sector size").map_err(rebase)?;
                    let v = le_u32(item, 0);
                    check_sector_size(v, "physical").map_err(|m| Error::corrupt(NAME, base, m))?;
                    physical_sector_size = Some(v);
                }
                _ => {
                    parent_locator = Some(ParentLocator::parse(item).map_err(rebase)?);
                }
            }
        }
        let missing = |what: &str, id: Uuid| {
            Error::corrupt(
                NAME,
                10,
                format!("the required {what} item ({id}) is missing"),
            )
        };
        let file_parameters =
            file_parameters.ok_or_else(|| missing("file parameters", FILE_PARAMETERS))?;
        let (virtual_disk_size, size_at) =
            virtual_disk_size.ok_or_else(|| missing("virtual disk size", VIRTUAL_DISK_SIZE))?;
        let virtual_disk_id =
            virtual_disk_id.ok_or_else(|| missing("virtual disk ID", VIRTUAL_DISK_ID))?;
        let logical_sector_size = logical_sector_size
            .ok_or_else(|| missing("logical sector size", LOGICAL_SECTOR_SIZE))?;
        let physical_sector_size = physical_sector_size
            .ok_or_else(|| missing("physical sector size", PHYSICAL_SECTOR_SIZE))?;
        if file_parameters.has_parent && parent_locator.is_none() {
            return Err(missing(
                "parent locator (HasParent is set, so the)",
                PARENT_LOCATOR,
            ));
        }
        check_virtual_size(virtual_disk_size, logical_sector_size)
            .map_err(|m| Error::corrupt(NAME, size_at, m))?;
        Ok((
            table,
            Metadata {
                file_parameters,
                virtual_disk_size,
                virtual_disk_id,
                logical_sector_size,
                physical_sector_size,
                parent_locator,
            },
        ))
    }

    /// Check the values against the same rules [`Metadata::parse`] applies
    /// (as `InvalidInput` errors), including that `HasParent` and the parent
    /// locator agree.
    pub fn validate(&self) -> Result<()> {
        check_block_size(self.file_parameters.block_size).map_err(Error::invalid)?;
        check_sector_size(self.logical_sector_size, "logical").map_err(Error::invalid)?;
        check_sector_size(self.physical_sector_size, "physical").map_err(Error::invalid)?;
        check_virtual_size(self.virtual_disk_size, self.logical_sector_size)
            .map_err(Error::invalid)?;
        match (&self.parent_locator, self.file_parameters.has_parent) {
            (Some(p), true) => p.validate(),
            (None, false) => Ok(()),
            (None, true) => Err(Error::invalid(
                "HasParent is set but there is no parent locator",
            )),
            (Some(_), false) => Err(Error::invalid(
                "a parent locator is given but HasParent is not set",
            )),
        }
    }

    /// Build a fresh metadata region of `region_length` bytes as Hyper-V lays
    /// it out: the table at 0, then the items packed from 64 KiB on in the
    /// order file parameters, virtual disk size, virtual disk ID, logical
    /// sector size, physical sector size, parent locator (if any). Flags:
    /// file parameters and parent locator required; the others required and
    /// virtual-disk.
    pub fn build_region(&self, region_length: u32) -> Result<Vec<u8>> {
        self.validate()?;
        let mut items: Vec<(Uuid, bool, Vec<u8>)> = Vec::with_capacity(6);
        let mut fp = vec![0u8; FileParameters::SIZE];
        self.file_parameters.write_to(&mut fp);
        items.push((FILE_PARAMETERS, false, fp));
        items.push((
            VIRTUAL_DISK_SIZE,
            true,
            self.virtual_disk_size.to_le_bytes().to_vec(),
        ));
        items.push((
            VIRTUAL_DISK_ID,
            true,
            self.virtual_disk_id.to_bytes_le().to_vec(),
        ));
        items.push((
            LOGICAL_SECTOR_SIZE,
            true,
            self.logical_sector_size.to_le_bytes().to_vec(),
        ));
        items.push((
            PHYSICAL_SECTOR_SIZE,
            true,
            self.physical_sector_size.to_le_bytes().to_vec(),
        ));
        if let Some(p) = &self.parent_locator {
            items.push((PARENT_LOCATOR, false, p.to_bytes()));
        }
        let needed: usize = TABLE_SIZE + items.iter().map(|(_, _, b)| b.len()).sum::<usize>();
        if needed > region_length as usize {
            return Err(Error::invalid(format!(
                "metadata needs {needed} bytes but the region has {region_length}"
            )));
        }
        let mut region = vec![0u8; region_length as usize];
        // Every item ends inside the region (`needed` ≤ `region_length`, a
        // u32): offsets and lengths fit a u32.
        #[allow(clippy::cast_possible_truncation)]
        let entry = |item_id, is_virtual_disk, at: usize, len: usize| MetadataEntry {
            item_id,
            offset: at as u32,
            length: len as u32,
            is_user: false,
            is_virtual_disk,
            is_required: true,
        };
        let mut table = MetadataTable::default();
        let mut at = TABLE_SIZE;
        for (item_id, is_virtual_disk, bytes) in items {
            region[at..at + bytes.len()].copy_from_slice(&bytes);
            table
                .entries
                .push(entry(item_id, is_virtual_disk, at, bytes.len()));
            at += bytes.len();
        }
        table.write_to(&mut region);
        Ok(region)
    }
}

/// Fail with a Corrupt error at item offset 0 unless `item` has `n` bytes.
fn need(item: &[u8], n: usize, what: &str) -> Result<()> {
    if item.len() < n {
        return Err(Error::corrupt(
            NAME,
            0,
            format!("{what} item is {} bytes, need at least {n}", item.len()),
        ));
    }
    Ok(())
}

fn check_block_size(v: u32) -> std::result::Result<(), String> {
    if !v.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&v) {
        return Err(format!(
            "BlockSize {v:#x} is not a power of two from 1 MiB to 256 MiB"
        ));
    }
    Ok(())
}

fn check_sector_size(v: u32, which: &str) -> std::result::Result<(), String> {
    if v != 512 && v != 4096 {
        return Err(format!("{which} sector size {v} is neither 512 nor 4096"));
    }
    Ok(())
}

fn check_virtual_size(v: u64, logical: u32) -> std::result::Result<(), String> {
    if v == 0 || v > MAX_VIRTUAL_DISK_SIZE || !is_aligned(v, u64::from(logical)) {
        return Err(format!(
            "VirtualDiskSize {v:#x} is not a non-zero multiple of the {logical}-byte logical sector size up to 64 TiB"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
