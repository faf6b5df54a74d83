//! The 8250 UART at I/O ports 0x3f8-0x3ff (COM1), vm-superio's, its output
//! going to the machine's console (stdout for `vmm run`). Its interrupt
//! line goes nowhere in payload mode, and nothing is ever typed into it.

use std::io::Write;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

/// An interrupt line connected to nothing.
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Where the guest's serial output goes.
pub type Console = Box<dyn Write + Send>;

/// The UART.
pub struct Uart(Serial<NoIrq, NoEvents, Console>);

impl Uart {
    /// A UART writing to `out`.
    pub fn new(out: Console) -> Uart {
        Uart(Serial::new(NoIrq, out))
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
