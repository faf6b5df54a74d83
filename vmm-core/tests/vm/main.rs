//! End-to-end tests of the VMM on this host's KVM: guest payloads (built
//! from vmm-core/payloads by build.rs) doing real virtio-blk I/O on images,
//! checked afterwards through the library; a hostile guest; the payload
//! ABI's exits and faults. Each test skips, saying so, without /dev/kvm or
//! without the payloads (no gcc).

mod common;
mod control;
mod disks;
mod hostile;
mod linux;
mod machine;
mod migrate;
mod qos;
mod vmcheckpoint;
