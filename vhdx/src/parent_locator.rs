//! The parent locator metadata item (MS-VHDX 2.6.2.6) of differencing disks.
//!
//! Layout: header (MS-VHDX 2.6.2.6.1, 20 bytes): `LocatorType` GUID (0),
//! reserved u16 (16), `KeyValueCount` u16 (18); then `KeyValueCount`
//! entries (MS-VHDX 2.6.2.6.2, 12 bytes each): `KeyOffset` u32, `ValueOffset`
//! u32, `KeyLength` u16, `ValueLength` u16. Offsets are from the start of
//! the item, lengths are in bytes; keys and values are UTF-16LE without a
//! terminator. For [`VHDX_PARENT_LOCATOR_TYPE`] the known keys are
//! `parent_linkage`, `parent_linkage2`, `relative_path`, `volume_path` and
//! `absolute_win32_path` (MS-VHDX 2.6.2.6.3).

use crate::guid::{le_u16, le_u32, put_u16, put_u32, read_guid, write_guid};
use crate::{Error, Result};
use std::collections::HashSet;
use uuid::Uuid;

/// Structure name used in error messages.
const NAME: &str = "VHDX parent locator";
/// Bytes of the parent locator header.
pub const HEADER_SIZE: usize = 20;
/// Bytes of one key-value entry.
pub const ENTRY_SIZE: usize = 12;

/// `LocatorType` of the VHDX parent locator (MS-VHDX 2.6.2.6.3).
pub const VHDX_PARENT_LOCATOR_TYPE: Uuid = Uuid::from_u128(0xB04AEFB7_D19E_4A81_B789_25B8E9445913);

/// One raw key-value entry of a parent locator (MS-VHDX 2.6.2.6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocatorEntry {
    /// Offset of the key from the start of the item.
    pub key_offset: u32,
    /// Offset of the value from the start of the item.
    pub value_offset: u32,
    /// Bytes of the key.
    pub key_length: u16,
    /// Bytes of the value.
    pub value_length: u16,
}

impl LocatorEntry {
    /// Decode one 12-byte entry (field decoding only).
    pub fn parse(b: &[u8; ENTRY_SIZE]) -> Self {
        LocatorEntry {
            key_offset: le_u32(b, 0),
            value_offset: le_u32(b, 4),
            key_length: le_u16(b, 8),
            value_length: le_u16(b, 10),
        }
    }

    /// Encode into 12 bytes.
    pub fn write_to(&self, b: &mut [u8; ENTRY_SIZE]) {
        put_u32(b, 0, self.key_offset);
        put_u32(b, 4, self.value_offset);
        put_u16(b, 8, self.key_length);
        put_u16(b, 10, self.value_length);
    }
}

/// A parsed parent locator (MS-VHDX 2.6.2.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLocator {
    /// The locator type; [`VHDX_PARENT_LOCATOR_TYPE`] for VHDX parents.
    pub locator_type: Uuid,
    /// The key-value pairs in on-disk order (keys are unique and non-empty).
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// Parse and validate a whole parent locator item. Error offsets are
    /// relative to the start of `item`.
    pub fn parse(item: &[u8]) -> Result<Self> {
        if item.len() < HEADER_SIZE {
            return Err(Error::corrupt(
                NAME,
                0,
                format!(
                    "item truncated: {} bytes, need at least {HEADER_SIZE}",
                    item.len()
                ),
            ));
        }
        let locator_type = read_guid(item, 0);
        let reserved = le_u16(item, 16);
        if reserved != 0 {
            return Err(Error::corrupt(
                NAME,
                16,
                format!("Reserved is {reserved:#x} (expected 0)"),
            ));
        }
        let count = usize::from(le_u16(item, 18));
        let table_end = HEADER_SIZE + count * ENTRY_SIZE;
        if table_end > item.len() {
            return Err(Error::corrupt(
                NAME,
                18,
                format!(
                    "KeyValueCount {count} needs {table_end} bytes but the item has {}",
                    item.len()
                ),
            ));
        }
        let mut entries = Vec::with_capacity(count);
        let mut seen = HashSet::with_capacity(count);
        for i in 0..count {
            let at = HEADER_SIZE + i * ENTRY_SIZE;
            let raw: &[u8; ENTRY_SIZE] = item[at..at + ENTRY_SIZE]
                .try_into()
                .expect("entry slice has entry size");
            let e = LocatorEntry::parse(raw);
            if e.key_length == 0 {
                return Err(Error::corrupt(
                    NAME,
                    (at + 8) as u64,
                    format!("entry {i}: KeyLength is 0"),
                ));
            }
            let key = string_at(item, table_end, i, "key", at, e.key_offset, e.key_length)?;
            let value = string_at(
                item,
                table_end,
                i,
                "value",
                at + 4,
                e.value_offset,
                e.value_length,
            )?;
            if !seen.insert(key.clone()) {
                return Err(Error::corrupt(
                    NAME,
                    at as u64,
                    format!("entry {i}: duplicate key \"{key}\""),
                ));
            }
            entries.push((key, value));
        }
        Ok(ParentLocator {
            locator_type,
            entries,
        })
    }

    /// The value of `key`, if present (keys compare exactly).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Check that [`ParentLocator::to_bytes`] can encode this locator: at
    /// most 65535 entries, keys non-empty and unique, every string at most
    /// 32767 UTF-16 units, the whole item within 1 MiB.
    pub fn validate(&self) -> Result<()> {
        if self.entries.len() > usize::from(u16::MAX) {
            return Err(Error::invalid(format!(
                "parent locator has {} entries (at most 65535)",
                self.entries.len()
            )));
        }
        let mut seen = HashSet::new();
        let mut total = HEADER_SIZE + self.entries.len() * ENTRY_SIZE;
        for (k, v) in &self.entries {
            if k.is_empty() {
                return Err(Error::invalid("parent locator key is empty"));
            }
            if !seen.insert(k.as_str()) {
                return Err(Error::invalid(format!(
                    "parent locator key \"{k}\" appears twice"
                )));
            }
            for s in [k, v] {
                let bytes = s.encode_utf16().count() * 2;
                if bytes > usize::from(u16::MAX) {
                    return Err(Error::invalid(format!(
                        "parent locator string of {bytes} bytes is too long (at most 65534)"
                    )));
                }
                total += bytes;
            }
        }
        if total > 1024 * 1024 {
            return Err(Error::invalid(format!(
                "parent locator of {total} bytes exceeds the 1 MiB metadata item limit"
            )));
        }
        Ok(())
    }

    /// Encode the item: header, entry table, then each key and value in
    /// entry order.
    ///
    /// # Panics
    /// If [`ParentLocator::validate`] would fail.
    // Once validated: at most 65535 entries, strings of at most 65534
    // bytes, 1 MiB in all; every cast below keeps its value.
    #[allow(clippy::cast_possible_truncation)]
    pub fn to_bytes(&self) -> Vec<u8> {
        if let Err(e) = self.validate() {
            panic!("cannot encode parent locator: {e}");
        }
        let table_end = HEADER_SIZE + self.entries.len() * ENTRY_SIZE;
        let mut out = vec![0u8; table_end];
        write_guid(&mut out, 0, self.locator_type);
        put_u16(&mut out, 18, self.entries.len() as u16);
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let key_offset = out.len() as u32;
            out.extend(k.encode_utf16().flat_map(u16::to_le_bytes));
            let value_offset = out.len() as u32;
            out.extend(v.encode_utf16().flat_map(u16::to_le_bytes));
            let e = LocatorEntry {
                key_offset,
                value_offset,
                key_length: (value_offset - key_offset) as u16,
                value_length: (out.len() as u32 - value_offset) as u16,
            };
            let at = HEADER_SIZE + i * ENTRY_SIZE;
            let raw: &mut [u8; ENTRY_SIZE] = (&mut out[at..at + ENTRY_SIZE])
                .try_into()
                .expect("entry slice has entry size");
            e.write_to(raw);
        }
        out
    }
}

/// Decode the UTF-16LE string `offset..offset + length` of `item` for entry
/// `i`; it must lie after the entry table and inside the item.
fn string_at(
    item: &[u8],
    table_end: usize,
    i: usize,
    what: &str,
    field_at: usize,
    offset: u32,
    length: u16,
) -> Result<String> {
    let err = |msg: String| Err(Error::corrupt(NAME, field_at as u64, msg));
    if length & 1 != 0 {
        return err(format!(
            "entry {i}: {what} length {length} is odd (UTF-16 needs even lengths)"
        ));
    }
    let start = offset as usize;
    let end = start.checked_add(usize::from(length));
    if length != 0 && start < table_end {
        return err(format!(
            "entry {i}: {what} offset {offset:#x} lies inside the header or entry table (ends at {table_end:#x})"
        ));
    }
    let Some(bytes) = end.and_then(|end| item.get(start..end)) else {
        return err(format!(
            "entry {i}: {what} {offset:#x}+{length:#x} extends past the item ({:#x} bytes)",
            item.len()
        ));
    };
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    match String::from_utf16(&units) {
        Ok(s) => Ok(s),
        Err(_) => err(format!("entry {i}: {what} is not valid UTF-16")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ParentLocator {
        ParentLocator {
            locator_type: VHDX_PARENT_LOCATOR_TYPE,
            entries: vec![
                (
                    "parent_linkage".into(),
                    "{83ea4a3f-5fb0-4c0a-b6b4-0a2a2ee2ef2c}".into(),
                ),
                ("relative_path".into(), r"..\base.vhdx".into()),
                (
                    "absolute_win32_path".into(),
                    "C:\\VMs\\b\u{e4}se.vhdx".into(),
                ),
            ],
        }
    }

    #[test]
    fn round_trip_and_get() {
        let p = sample();
        let bytes = p.to_bytes();
        let back = ParentLocator::parse(&bytes).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.get("relative_path"), Some(r"..\base.vhdx"));
        assert_eq!(back.get("volume_path"), None);
        // Trailing slack after the strings is allowed.
        let mut padded = bytes.clone();
        padded.resize(bytes.len() + 100, 0);
        assert_eq!(ParentLocator::parse(&padded).unwrap(), p);
    }

    #[test]
    fn validation() {
        let good = sample().to_bytes();
        let msg = |b: &[u8]| ParentLocator::parse(b).unwrap_err().to_string();
        assert!(msg(&good[..19]).contains("truncated"));
        let mut b = good.clone();
        b[16] = 1;
        assert!(msg(&b).contains("Reserved"));
        let mut b = good.clone();
        put_u16(&mut b, 18, 1000);
        assert!(msg(&b).contains("KeyValueCount 1000"));
        // Entry 1's key length odd, zero, past the end, inside the table.
        let e1 = HEADER_SIZE + ENTRY_SIZE;
        let mut b = good.clone();
        put_u16(&mut b, e1 + 8, 3);
        assert!(msg(&b).contains("odd"));
        let mut b = good.clone();
        put_u16(&mut b, e1 + 8, 0);
        assert!(msg(&b).contains("KeyLength is 0"));
        let mut b = good.clone();
        put_u32(&mut b, e1 + 4, u32::MAX - 1);
        assert!(msg(&b).contains("past the item"));
        let mut b = good.clone();
        put_u32(&mut b, e1, 4);
        assert!(msg(&b).contains("inside the header"));
        // Entry 1's key made to point at entry 0's key: duplicate.
        let mut b = good.clone();
        let k0 = le_u32(&b, HEADER_SIZE);
        let l0 = le_u16(&b, HEADER_SIZE + 8);
        put_u32(&mut b, e1, k0);
        put_u16(&mut b, e1 + 8, l0);
        assert!(msg(&b).contains("duplicate key \"parent_linkage\""));
        // Unpaired surrogate.
        let mut b = good.clone();
        let k1 = le_u32(&b, e1) as usize;
        b[k1..k1 + 2].copy_from_slice(&0xD800u16.to_le_bytes());
        assert!(msg(&b).contains("not valid UTF-16"));
    }

    #[test]
    fn encoder_validation() {
        let mut p = sample();
        p.entries.push(("relative_path".into(), "x".into()));
        assert!(p.validate().is_err());
        let mut p = sample();
        p.entries[0].0.clear();
        assert!(p.validate().is_err());
        let mut p = sample();
        p.entries[0].1 = "x".repeat(40000);
        assert!(p.validate().is_err());
    }

    #[test]
    fn corpus_header_and_entry() {
        if let Some(h) = crate::guid::corpus_struct("parent_locator_header.1") {
            assert_eq!(read_guid(&h, 0), VHDX_PARENT_LOCATOR_TYPE);
            assert_eq!(le_u16(&h, 16), 0);
            assert_eq!(le_u16(&h, 18), 5);
            // With five entries the strings start right after the table, at 80.
            assert_eq!(HEADER_SIZE + 5 * ENTRY_SIZE, 0x50);
        }
        if let Some(e) = crate::guid::corpus_struct("parent_locator_entry.1") {
            let raw: &[u8; ENTRY_SIZE] = e[..ENTRY_SIZE].try_into().unwrap();
            let e = LocatorEntry::parse(raw);
            assert_eq!(
                e,
                LocatorEntry {
                    key_offset: 0x50,
                    value_offset: 0x6c,
                    key_length: 0x1c,
                    value_length: 0x4c,
                }
            );
            // 28 bytes = "parent_linkage"; 76 bytes = a braced GUID string.
            assert_eq!("parent_linkage".len() * 2, 0x1c);
            assert_eq!(38 * 2, 0x4c);
            let mut out = [0u8; ENTRY_SIZE];
            e.write_to(&mut out);
            assert_eq!(&out, raw);
        }
    }
}
