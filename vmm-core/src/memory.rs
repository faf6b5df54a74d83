//! Guest RAM: one anonymous mapping at guest-physical 0, given to KVM as
//! memory slot 0, and the bounds checks every device access goes through.

use crate::layout::{MAX_RAM, MIN_RAM};
use crate::{Error, Result};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest RAM, [0, size).
pub type Ram = GuestMemoryMmap<()>;

/// Check a RAM size: a whole number of 4 KiB pages, within the ABI's
/// bounds.
///
/// # Errors
/// The size is refused, saying why.
pub fn check_size(size: u64) -> Result<()> {
    if !(MIN_RAM..=MAX_RAM).contains(&size) {
        return Err(Error::Config(format!(
            "guest memory of {size} bytes: it must be between {} MiB and {} MiB (RAM ends \
             below the virtio-mmio devices at 0xd0000000)",
            MIN_RAM >> 20,
            MAX_RAM >> 20
        )));
    }
    if !size.is_multiple_of(4096) {
        return Err(Error::Config(format!(
            "guest memory of {size} bytes: it must be a whole number of 4 KiB pages"
        )));
    }
    Ok(())
}

/// Map `size` bytes of anonymous memory as guest RAM at guest-physical 0.
///
/// # Errors
/// A refused size, or the mapping fails.
pub fn create(size: u64) -> Result<Ram> {
    check_size(size)?;
    let len = usize::try_from(size).map_err(|_| Error::Config("guest memory too large".into()))?;
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
        .map_err(|e| Error::Memory(format!("mapping {size} bytes of guest memory: {e}")))
}

/// Give guest RAM to the VM (memory slot 0).
///
/// # Errors
/// KVM refuses the slot.
pub fn register(vm: &VmFd, ram: &Ram) -> Result<()> {
    for (slot, region) in ram.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(format!("guest memory region {slot}: {e}")))?;
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| Error::Memory("too many regions".into()))?,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range [host, host + memory_size) is the mapping
        // `ram` owns; `ram` outlives the VM (the machine keeps both and
        // drops the VM's vCPUs and file before the mapping), and no other
        // slot overlaps it.
        #[allow(unsafe_code)]
        unsafe { vm.set_user_memory_region(region) }.map_err(|e| Error::Kvm {
            what: "KVM_SET_USER_MEMORY_REGION",
            source: e,
        })?;
    }
    Ok(())
}

/// Whether [addr, addr + len) lies inside guest RAM (checked arithmetic:
/// an overflowing range is outside).
pub fn contains(ram: &Ram, addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    if len == 0 {
        return addr <= ram_size(ram);
    }
    ram.iter()
        .any(|r| addr >= r.start_addr().0 && end <= r.start_addr().0 + r.len())
}

/// The size of guest RAM in bytes.
pub fn ram_size(ram: &Ram) -> u64 {
    ram.iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_bounds() {
        assert!(check_size(64 << 20).is_ok());
        assert!(check_size(3 << 30).is_ok());
        for bad in [0, (64 << 20) - 4096, (3 << 30) + 4096, (64 << 20) + 1] {
            assert!(check_size(bad).is_err(), "{bad}");
        }
        let ram = create(64 << 20).unwrap();
        assert_eq!(ram_size(&ram), 64 << 20);
        assert!(contains(&ram, 0, 64 << 20));
        assert!(contains(&ram, (64 << 20) - 1, 1));
        assert!(!contains(&ram, (64 << 20) - 1, 2));
        assert!(!contains(&ram, 64 << 20, 1));
        assert!(!contains(&ram, u64::MAX, 2));
        assert!(!contains(&ram, 0xd000_0000, 4));
    }
}
