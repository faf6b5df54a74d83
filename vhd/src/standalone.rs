//! Making a differencing VHD standalone ([`Vhd::make_standalone`]): the
//! last step of merging a parent into its only child.

use crate::dynamic_header::{HEADER_SIZE, LOCATORS, PARENT_NAME_SIZE};
use crate::footer::{DiskType, FOOTER_SIZE};
use crate::image::Vhd;
use crate::parent_locator::ParentLocator;
use crate::relink::inspect_for_rewrite;
use crate::{Error, Result};
use uuid::Uuid;

impl Vhd {
    /// Turn this differencing VHD, open writable, into a dynamic VHD whose
    /// content is what the child holds: its present sectors, and zeros
    /// wherever it would have read from its parent. The last step of
    /// merging a parent into its only child, once the caller has copied
    /// into the child every parent sector it needs (not checked here). The
    /// unique id, BAT, bitmaps and data are kept; the parent is not read.
    /// The image is flushed first, then closed: the call consumes it.
    ///
    /// # Crash safety
    /// The image's own flush (its writes durable, the in-memory BAT and
    /// bitmaps written, synced); then the structures are read again from
    /// the file, and:
    /// 1. the trailing footer is rewritten with disk type dynamic (and a new
    ///    checksum; one 512-byte sector), **sync**;
    /// 2. the footer copy at offset 0, the same, **sync**;
    /// 3. the dynamic disk header with its parent fields cleared (unique
    ///    id, time stamp, name, locator entries; one 4 KiB page), **sync**.
    ///
    /// Each state a power cut can leave opens:
    /// - before step 1 persisted: the differencing disk, unchanged (it
    ///   still needs its parent, so the caller deletes the parent only
    ///   after this returns);
    /// - after step 1, before step 3: the trailing footer, the one every
    ///   reader uses, says dynamic, while the copy at 0 may still say
    ///   differencing and the header still names the parent. The disk opens
    ///   as dynamic: for a dynamic disk the parent fields are ignored (the
    ///   open code reads the locators and looks for a parent only when the
    ///   footer says differencing, and refuses a parent passed to
    ///   [`Vhd::open_with_parent`]), and sectors whose bitmap bit is 0 read
    ///   as zeros. Its content is already the final one;
    /// - after step 3: done.
    ///
    /// If the trailing footer were torn anyway, the copy at offset 0 (still
    /// differencing before step 2) is used, read-only, with the parent.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind) when it is not a
    /// differencing VHD, its trailing footer is damaged, or it is open
    /// read-only; I/O errors (of the flush, or of the rewrite).
    pub fn make_standalone(self) -> Result<()> {
        self.close_inner()?;
        let storage = &*self.storage;
        let name = storage.name().to_string();
        let child = inspect_for_rewrite(storage, "make the disk standalone")?;
        let Some(header) = &child.info.header else {
            return Err(Error::invalid("a differencing disk without a header").in_file(&name, 0));
        };
        let mut footer = child.info.footer.clone();
        footer.disk_type = DiskType::Dynamic;
        let mut fbuf = [0u8; FOOTER_SIZE];
        footer.write_to(&mut fbuf);
        let mut h = header.clone();
        h.parent_unique_id = Uuid::nil();
        h.parent_timestamp = 0;
        h.parent_unicode_name = [0; PARENT_NAME_SIZE];
        h.parent_locators = [ParentLocator::default(); LOCATORS];
        let mut hbuf = [0u8; HEADER_SIZE];
        h.write_to(&mut hbuf);
        let (footer_offset, hdr_off) = (child.info.footer_offset, footer.data_offset);

        storage.write_at(&fbuf, footer_offset)?;
        storage.flush()?;
        storage.write_at(&fbuf, 0)?;
        storage.flush()?;
        storage.write_at(&hbuf, hdr_off)?;
        storage.flush()
    }
}
