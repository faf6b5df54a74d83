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

    /// Its registers, for a VM checkpoint.
    pub fn state(&self) -> UartState {
        let s = self.0.state();
        UartState {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A UART with the registers of a checkpoint, writing to `out`,
    /// signalling `irq` (if any).
    ///
    /// # Errors
    /// The state is impossible (more input than the FIFO holds).
    pub fn restored(out: Console, irq: Option<EventFd>, st: &UartState) -> Result<Uart, String> {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            st.regs;
        let s = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: st.in_buffer.clone(),
        };
        Serial::from_state(&s, Irq(irq), NoEvents, out)
            .map(Uart)
            .map_err(|e| format!("the UART state: {e:?}"))
    }
}

/// The UART's registers in a VM checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    /// Received bytes not yet read.
    pub in_buffer: Vec<u8>,
}
