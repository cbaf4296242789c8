//! COM1 16550A UART, a thin wrapper around `vm_superio::Serial`.
//!
//! Map at [`COM1_BASE`], length [`COM1_LEN`]; connect `irq` to ISA IRQ4.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

use crate::bus::PioDevice;
use crate::irq::IrqLine;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
pub const COM1_IRQ: u8 = 4;

/// Bridges vm-superio's edge trigger to an [`IrqLine`] pulse.
pub struct IrqTrigger(pub Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.pulse();
        Ok(())
    }
}

/// Upper bound on buffered console input, so a flood of host input while the
/// guest isn't reading can't grow memory without limit.
const MAX_PENDING_INPUT: usize = 1 << 20;

pub struct Serial {
    inner: vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
    /// Input that did not fit vm-superio's 64-byte FIFO yet.
    pending: VecDeque<u8>,
}

impl Serial {
    /// `out` receives every byte the guest transmits (e.g. `Box::new(stdout())`).
    pub fn new(irq: Arc<dyn IrqLine>, out: Box<dyn Write + Send>) -> Self {
        Serial {
            inner: vm_superio::Serial::new(IrqTrigger(irq), out),
            pending: VecDeque::new(),
        }
    }

    /// Queues console input for the guest; bytes beyond the UART FIFO are
    /// held here and fed in as the guest drains the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        self.pending.extend(&input[..input.len().min(room)]);
        self.refill();
    }

    /// Bytes of console input not yet handed to the UART FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    fn refill(&mut self) {
        let n = self.inner.fifo_capacity().min(self.pending.len());
        if n == 0 {
            return;
        }
        let chunk: Vec<u8> = self.pending.iter().take(n).copied().collect();
        // Fails only in loopback mode (returns 0) or on a full FIFO; in both
        // cases the bytes simply stay pending.
        if let Ok(done) = self.inner.enqueue_raw_bytes(&chunk) {
            self.pending.drain(..done);
        }
    }

    pub fn writer_mut(&mut self) -> &mut Box<dyn Write + Send> {
        self.inner.writer_mut()
    }
}

impl PioDevice for Serial {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset as usize + i;
            *b = if off < COM1_LEN as usize {
                self.inner.read(off as u8)
            } else {
                0xff
            };
            if off == 0 {
                // Receive buffer read: top the FIFO up from pending input.
                self.refill();
            }
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let off = offset as usize + i;
            if off < COM1_LEN as usize {
                // Output errors (closed stdout) are not the guest's problem.
                if let Err(e) = self.inner.write(off as u8, b) {
                    tracing::trace!("serial write error: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::RecordingIrq;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_input_and_irq() {
        let irq = Arc::new(RecordingIrq::default());
        let out = Buf::default();
        let mut s = Serial::new(irq.clone(), Box::new(out.clone()));
        s.pio_write(0, b"h");
        s.pio_write(0, b"i");
        assert_eq!(&*out.0.lock().unwrap(), b"hi");

        // Enable RX interrupt, then feed more than the FIFO holds.
        s.pio_write(1, &[0x01]);
        irq.take_edges();
        let input: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        s.enqueue_input(&input);
        assert!(irq.take_edges() >= 1);
        assert!(s.pending_input() > 0);
        let mut got = Vec::new();
        for _ in 0..1000 {
            let mut lsr = [0u8];
            s.pio_read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut b = [0u8];
            s.pio_read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        assert_eq!(s.pending_input(), 0);

        // Out-of-range offsets and wide accesses must not panic.
        let mut b = [0u8; 4];
        s.pio_read(6, &mut b);
        s.pio_write(7, &[1, 2, 3, 4]);
        s.pio_read(0xffff, &mut b);
    }
}
