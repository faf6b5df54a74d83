//! The 8250 UART at I/O ports 0x3f8-0x3ff (COM1), vm-superio's, its output
//! going to the machine's console (stdout for `vmm run`). Its interrupt
//! line goes nowhere in payload mode; for a Linux guest it is an irqfd on
//! GSI 4 (ISA IRQ 4), so that the kernel's 8250 driver is interrupt
//! driven. Nothing is ever typed into it.

use std::io::Write;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The UART's interrupt line: an irqfd, or nothing.
pub struct Irq(Option<EventFd>);

impl Trigger for Irq {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        match &self.0 {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

/// Where the guest's serial output goes.
pub type Console = Box<dyn Write + Send>;

/// The UART.
pub struct Uart(Serial<Irq, NoEvents, Console>);

impl Uart {
    /// A UART writing to `out`, its interrupt line connected to nothing.
    pub fn new(out: Console) -> Uart {
        Uart(Serial::new(Irq(None), out))
    }

    /// A UART writing to `out` that signals `irq` when it interrupts.
    pub fn with_irq(out: Console, irq: EventFd) -> Uart {
        Uart(Serial::new(Irq(Some(irq)), out))
    }

    /// A guest `in` from register `offset` (0-7).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.0.read(offset)
    }

    /// A guest `out` to register `offset` (0-7). Console write errors are
    /// dropped: a closed stdout does not stop the guest.
    pub fn write(&mut self, offset: u8, value: u8) {
        let _ = self.0.write(offset, value);
    }

    /// Flush the console.
    pub fn flush(&mut self) {
        let _ = self.0.writer_mut().flush();
    }
}
