//! I/O APIC (version 0x20, 24 pins) at MMIO [`IOAPIC_BASE`].
//!
//! Interrupts go out through an [`InterruptSink`] (normally the
//! [`ApicBus`](crate::lapic::ApicBus)). The sink is called with the IOAPIC
//! lock held, so it must not call back into the IOAPIC. Level-triggered EOIs
//! come back via [`IoApic::end_of_interrupt`], which the VMM calls (without
//! holding any LAPIC lock) for each vector drained from
//! [`Lapic::take_eoi_broadcasts`](crate::lapic::Lapic::take_eoi_broadcasts).
//!
//! Pin polarity is ignored: `set_irq(pin, true)` always means "asserted".

use std::sync::{Arc, Mutex};

use crate::bus::{lock, MmioDevice};
use crate::irq::{DeliveryMode, InterruptRequest, InterruptSink, IrqLine};

pub const IOAPIC_BASE: u64 = 0xfec0_0000;
pub const IOAPIC_LEN: u64 = 0x1000;
pub const IOAPIC_PINS: usize = 24;
const VERSION: u32 = 0x20;

const RTE_MASKED: u64 = 1 << 16;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_RO_BITS: u64 = RTE_REMOTE_IRR | RTE_DELIVERY_STATUS;

pub struct IoApic {
    id: u8,
    ioregsel: u8,
    rte: [u64; IOAPIC_PINS],
    /// Pending requests (level: line high; edge: edge latched while masked).
    irr: u32,
    /// Current line levels, for edge detection.
    levels: u32,
    sink: Arc<dyn InterruptSink>,
}

impl IoApic {
    pub fn new(id: u8, sink: Arc<dyn InterruptSink>) -> Self {
        IoApic {
            id: id & 0xf,
            ioregsel: 0,
            rte: [RTE_MASKED; IOAPIC_PINS],
            irr: 0,
            levels: 0,
            sink,
        }
    }

    /// Drives input `pin` (GSI). Out-of-range pins are ignored.
    pub fn set_irq(&mut self, pin: usize, level: bool) {
        if pin >= IOAPIC_PINS {
            return;
        }
        let bit = 1u32 << pin;
        let old = self.levels & bit != 0;
        if level {
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
        if self.rte[pin] & RTE_LEVEL != 0 {
            if level {
                self.irr |= bit;
                self.service(pin);
            } else {
                self.irr &= !bit;
            }
        } else if level && !old {
            self.irr |= bit;
            self.service(pin);
        }
    }

    /// Delivers `pin` if it is pending, unmasked and not blocked by remote IRR.
    fn service(&mut self, pin: usize) {
        let bit = 1u32 << pin;
        let e = self.rte[pin];
        if self.irr & bit == 0 || e & RTE_MASKED != 0 {
            return;
        }
        let level = e & RTE_LEVEL != 0;
        if level {
            if e & RTE_REMOTE_IRR != 0 {
                return;
            }
            self.rte[pin] |= RTE_REMOTE_IRR;
        } else {
            self.irr &= !bit;
        }
        self.sink.deliver(InterruptRequest {
            vector: e as u8,
            destination: (e >> 56) as u32,
            logical_destination: e & (1 << 11) != 0,
            delivery_mode: DeliveryMode::from_bits((e >> 8) as u32),
            level_triggered: level,
        });
    }

    /// EOI broadcast from a LAPIC for `vector`: clears remote IRR of
    /// matching level-triggered pins and re-delivers still-asserted lines.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..IOAPIC_PINS {
            let e = self.rte[pin];
            if e as u8 == vector && e & RTE_REMOTE_IRR != 0 {
                self.rte[pin] &= !RTE_REMOTE_IRR;
                self.service(pin);
            }
        }
    }

    /// The redirection entry of `pin` (for tests and debugging).
    pub fn redirection(&self, pin: usize) -> Option<u64> {
        self.rte.get(pin).copied()
    }

    fn read_reg(&self, sel: u8) -> u32 {
        match sel {
            0x00 => (self.id as u32) << 24,
            0x01 => ((IOAPIC_PINS as u32 - 1) << 16) | VERSION,
            0x02 => (self.id as u32) << 24,
            0x10..=0x3f => {
                let pin = ((sel - 0x10) / 2) as usize;
                let e = self.rte[pin];
                if sel & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0xffff_ffff,
        }
    }

    fn write_reg(&mut self, sel: u8, val: u32) {
        match sel {
            0x00 => self.id = ((val >> 24) & 0xf) as u8,
            0x10..=0x3f => {
                let pin = ((sel - 0x10) / 2) as usize;
                let old = self.rte[pin];
                let mut e = if sel & 1 == 0 {
                    (old & !0xffff_ffff) | val as u64
                } else {
                    (old & 0xffff_ffff) | (val as u64) << 32
                };
                e = (e & !RTE_RO_BITS) | (old & RTE_RO_BITS);
                if e & RTE_LEVEL == 0 {
                    e &= !RTE_REMOTE_IRR;
                }
                self.rte[pin] = e;
                // Re-sync a level line's IRR with its current input level,
                // since the trigger mode may just have changed.
                let bit = 1u32 << pin;
                if e & RTE_LEVEL != 0 {
                    if self.levels & bit != 0 {
                        self.irr |= bit;
                    } else {
                        self.irr &= !bit;
                    }
                }
                self.service(pin);
            }
            _ => {}
        }
    }
}

impl MmioDevice for IoApic {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        // Registers are 32-bit; narrower reads take bytes of the dword.
        let v = match offset & !3 {
            0x00 => self.ioregsel as u32,
            0x10 => self.read_reg(self.ioregsel),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let start = (offset & 3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset & 3 != 0 || data.is_empty() {
            return;
        }
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(bytes);
        match offset {
            0x00 => self.ioregsel = v as u8,
            0x10 if n == 4 => self.write_reg(self.ioregsel, v),
            0x40 => self.end_of_interrupt(v as u8), // version 0x20 EOI register
            _ => {}
        }
    }
}

/// An [`IrqLine`] driving one IOAPIC pin.
pub struct IoApicIrqLine {
    pub ioapic: Arc<Mutex<IoApic>>,
    pub pin: usize,
}

impl IrqLine for IoApicIrqLine {
    fn set_level(&self, level: bool) {
        lock(&self.ioapic).set_irq(self.pin, level);
    }
}

/// An ISA IRQ wired to both the PIC and the IOAPIC, as on a PC. ISA IRQ0
/// goes to IOAPIC pin 2 (the VMM's MADT must carry the matching interrupt
/// source override: bus 0, source 0, GSI 2); other IRQs are identity-mapped.
pub struct IsaIrqLine {
    pub pic: Arc<Mutex<crate::pic::Pic>>,
    pub ioapic: Arc<Mutex<IoApic>>,
    pub irq: u8,
}

impl IsaIrqLine {
    pub fn gsi(irq: u8) -> usize {
        if irq == 0 {
            2
        } else {
            irq as usize
        }
    }
}

impl IrqLine for IsaIrqLine {
    fn set_level(&self, level: bool) {
        lock(&self.pic).set_irq(self.irq, level);
        lock(&self.ioapic).set_irq(Self::gsi(self.irq), level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    pub struct Rec(pub Mutex<Vec<InterruptRequest>>);
    impl InterruptSink for Rec {
        fn deliver(&self, r: InterruptRequest) {
            self.0.lock().unwrap().push(r);
        }
    }

    fn wr(io: &mut IoApic, reg: u8, v: u32) {
        io.mmio_write(0, &[reg, 0, 0, 0]);
        io.mmio_write(0x10, &v.to_le_bytes());
    }
    fn rd(io: &mut IoApic, reg: u8) -> u32 {
        io.mmio_write(0, &[reg, 0, 0, 0]);
        let mut b = [0u8; 4];
        io.mmio_read(0x10, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn version_and_edge() {
        let sink = Arc::new(Rec::default());
        let mut io = IoApic::new(0, sink.clone());
        assert_eq!(rd(&mut io, 1), 0x0017_0020);
        // Masked at reset; edge latched and delivered on unmask.
        io.set_irq(2, true);
        assert!(sink.0.lock().unwrap().is_empty());
        wr(&mut io, 0x10 + 4 + 1, 0x0100_0000); // dest 1
        wr(&mut io, 0x10 + 4, 0x30);
        io.set_irq(2, false);
        let v = std::mem::take(&mut *sink.0.lock().unwrap());
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].vector, 0x30);
        assert_eq!(v[0].destination, 1);
        assert!(!v[0].level_triggered);
        io.set_irq(2, true);
        io.set_irq(2, true);
        assert_eq!(sink.0.lock().unwrap().len(), 1);
        assert_eq!(rd(&mut io, 0x15), 0x0100_0000);
        let mut junk = [0u8; 8];
        io.mmio_read(0xfff, &mut junk);
        io.mmio_write(0x13, &junk);
        wr(&mut io, 0x7f, 1);
        assert_eq!(rd(&mut io, 0x7f), 0xffff_ffff);
    }

    #[test]
    fn level_remote_irr() {
        let sink = Arc::new(Rec::default());
        let mut io = IoApic::new(0, sink.clone());
        wr(&mut io, 0x10 + 2 * 10, 0x0000_a141); // level, vector 0x41, lowest prio
        io.set_irq(10, true);
        assert_eq!(sink.0.lock().unwrap().len(), 1);
        assert_ne!(rd(&mut io, 0x10 + 20) & (1 << 14), 0);
        // Blocked by remote IRR.
        io.set_irq(10, true);
        assert_eq!(sink.0.lock().unwrap().len(), 1);
        // EOI with line still high: redelivered.
        io.end_of_interrupt(0x41);
        assert_eq!(sink.0.lock().unwrap().len(), 2);
        io.set_irq(10, false);
        io.mmio_write(0x40, &[0x41, 0, 0, 0]);
        assert_eq!(sink.0.lock().unwrap().len(), 2);
        assert_eq!(rd(&mut io, 0x10 + 20) & (1 << 14), 0);
        let r = sink.0.lock().unwrap()[0];
        assert_eq!(r.delivery_mode, DeliveryMode::LowestPriority);
        assert!(r.level_triggered);
    }
}
