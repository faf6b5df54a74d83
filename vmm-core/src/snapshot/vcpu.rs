//! A vCPU's state in a VM checkpoint: every register set KVM exposes
//! (general registers, segment and control registers, the XSAVE area —
//! which holds the x87 FPU and SSE state too —, XCRs, debug registers, MSRs, pending events, the MP state and, in
//! Linux mode, the local APIC), as [`Fields`] of their raw KVM structures.
//!
//! Restoring follows the order that makes each step valid: special
//! registers (paging and modes) first, then XCRs before the XSAVE area
//! they qualify, the general and debug registers, the local APIC before
//! the MSRs (the APIC base MSR must agree with it), pending events, and
//! the MP state last.

use super::file::Fields;
use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use zerocopy::{FromBytes, IntoBytes};

/// Read every MSR of `indices` this vCPU lets be read (one by one: a
/// batch stops at the first MSR KVM refuses).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, String> {
    let mut out = Vec::new();
    for &index in indices {
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|e| format!("an MSR list: {e:?}"))?;
        if fd.get_msrs(&mut m).ok() == Some(1) {
            out.push((index, m.as_slice()[0].data));
        }
    }
    Ok(out)
}

fn kvm(what: &str) -> impl Fn(kvm_ioctls::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Capture vCPU `fd`'s state; `msrs` the MSRs to save (KVM's index list),
/// `lapic` whether it has an in-kernel local APIC.
///
/// # Errors
/// KVM refuses one of the reads.
pub fn capture(fd: &VcpuFd, msrs: &[u32], lapic: bool) -> Result<Vec<u8>, String> {
    let mut f = Fields::default();
    f.put(
        *b"SREG",
        fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?.as_bytes(),
    );
    f.put(
        *b"XCRS",
        fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?.as_bytes(),
    );
    f.put(
        *b"XSAV",
        fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?.as_bytes(),
    );
    f.put(
        *b"REGS",
        fd.get_regs().map_err(kvm("KVM_GET_REGS"))?.as_bytes(),
    );
    f.put(
        *b"DBGR",
        fd.get_debug_regs()
            .map_err(kvm("KVM_GET_DEBUGREGS"))?
            .as_bytes(),
    );
    if lapic {
        f.put(
            *b"LAPC",
            fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?.as_bytes(),
        );
    }
    let mut m = Vec::new();
    for (index, data) in read_msrs(fd, msrs)? {
        m.extend_from_slice(&index.to_le_bytes());
        m.extend_from_slice(&data.to_le_bytes());
    }
    f.put(*b"MSRS", &m);
    f.put(
        *b"EVNT",
        fd.get_vcpu_events()
            .map_err(kvm("KVM_GET_VCPU_EVENTS"))?
            .as_bytes(),
    );
    f.put(
        *b"MPST",
        fd.get_mp_state()
            .map_err(kvm("KVM_GET_MP_STATE"))?
            .as_bytes(),
    );
    Ok(f.into_bytes())
}

/// One field as the KVM structure `T`.
fn field<T: FromBytes>(fields: &[([u8; 4], &[u8])], tag: &[u8; 4]) -> Result<Option<T>, String> {
    match fields.iter().find(|(t, _)| t == tag) {
        None => Ok(None),
        Some((_, b)) => T::read_from_bytes(b).map(Some).map_err(|_| {
            format!(
                "the {} field is {} bytes, not the {} of its KVM structure",
                String::from_utf8_lossy(tag),
                b.len(),
                std::mem::size_of::<T>()
            )
        }),
    }
}

fn need<T>(v: Option<T>, tag: &str) -> Result<T, String> {
    v.ok_or_else(|| format!("no {tag} field"))
}

/// Put the state `bytes` ([`capture`]'s) into vCPU `fd`.
///
/// # Errors
/// The state is malformed, or KVM refuses part of it.
pub fn restore(fd: &VcpuFd, bytes: &[u8], lapic: bool) -> Result<(), String> {
    let fields = Fields::parse(bytes)?;
    let sregs: kvm_sregs = need(field(&fields, b"SREG")?, "SREG")?;
    let xcrs: kvm_xcrs = need(field(&fields, b"XCRS")?, "XCRS")?;
    let xsave: kvm_xsave = need(field(&fields, b"XSAV")?, "XSAV")?;
    let regs: kvm_regs = need(field(&fields, b"REGS")?, "REGS")?;
    let dbg: kvm_debugregs = need(field(&fields, b"DBGR")?, "DBGR")?;
    let events: kvm_vcpu_events = need(field(&fields, b"EVNT")?, "EVNT")?;
    let mp: kvm_mp_state = need(field(&fields, b"MPST")?, "MPST")?;
    let apic: Option<kvm_lapic_state> = field(&fields, b"LAPC")?;
    let msrs = fields
        .iter()
        .find(|(t, _)| t == b"MSRS")
        .map(|(_, b)| *b)
        .ok_or("no MSRS field")?;
    if msrs.len() % 12 != 0 {
        return Err(format!(
            "the MSRS field is {} bytes, not 12 per MSR",
            msrs.len()
        ));
    }
    let entries: Vec<kvm_msr_entry> = msrs
        .chunks_exact(12)
        .map(|c| kvm_msr_entry {
            index: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            data: u64::from_le_bytes(c[4..12].try_into().unwrap_or_default()),
            ..Default::default()
        })
        .collect();

    fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    fd.set_xcrs(&xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    // SAFETY: KVM_SET_XSAVE reads the vCPU's uABI XSAVE size from this
    // 4096-byte structure. That size exceeds 4096 only for dynamically
    // enabled features (AMX), which need this process to ask the kernel
    // for guest permission (ARCH_REQ_XCOMP_GUEST_PERM); the VMM never
    // does, so the kernel reads no further than the structure.
    #[allow(unsafe_code)]
    unsafe { fd.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_debug_regs(&dbg).map_err(kvm("KVM_SET_DEBUGREGS"))?;
    match (apic, lapic) {
        (Some(a), true) => fd.set_lapic(&a).map_err(kvm("KVM_SET_LAPIC"))?,
        (None, false) => {}
        (Some(_), false) => return Err("a local APIC state, but the machine has none".into()),
        (None, true) => return Err("no local APIC state (LAPC field)".into()),
    }
    // One by one: KVM refuses to set some MSRs to the value it reports
    // for a guest that never used them (the KVM paravirtual ones, such as
    // MSR_KVM_ASYNC_PF_INT = 0). A refusal is harmless when the new vCPU
    // already holds the saved value; otherwise the restore fails.
    for e in &entries {
        let m = Msrs::from_entries(&[*e]).map_err(|x| format!("an MSR list: {x:?}"))?;
        if fd.set_msrs(&m).map_err(kvm("KVM_SET_MSRS"))? == 1 {
            continue;
        }
        let now = read_msrs(fd, &[e.index])?;
        if now.first().map(|(_, v)| *v) != Some(e.data) {
            return Err(format!(
                "KVM refuses MSR {:#x} = {:#x} (the vCPU holds {:?})",
                e.index,
                e.data,
                now.first().map(|(_, v)| format!("{v:#x}"))
            ));
        }
    }
    fd.set_vcpu_events(&events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    fd.set_mp_state(mp).map_err(kvm("KVM_SET_MP_STATE"))?;
    Ok(())
}
