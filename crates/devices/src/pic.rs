//! Cascaded 8259A PIC pair (master 0x20-0x21, slave 0xa0-0xa1, ELCR
//! 0x4d0-0x4d1), modelled after QEMU's i8259.
//!
//! Map the `Pic` at [`PIC_MASTER_BASE`] (len 2) and two
//! [`PioAlias`](crate::bus::PioAlias)es: 0xa0 (len 2) with extra offset
//! [`PIC_SLAVE_ALIAS_OFFSET`] and 0x4d0 (len 2) with [`ELCR_ALIAS_OFFSET`].
//! The CPU side: when `interrupt_pending()` and the LAPIC
//! `accepts_pic_interrupts()` and RFLAGS.IF=1, call `ack()` for the vector.
//! Each CPU's [`InterruptHint`] is connected with [`Pic::connect_cpu`], so
//! that a CPU need not lock the PIC while its hint is clear.

use std::sync::{Arc, Mutex};

use crate::bus::{lock, PioDevice};
use crate::irq::IrqLine;
use crate::lapic::InterruptHint;

pub const PIC_MASTER_BASE: u16 = 0x20;
pub const PIC_SLAVE_BASE: u16 = 0xa0;
pub const ELCR_BASE: u16 = 0x4d0;
pub const PIC_SLAVE_ALIAS_OFFSET: u16 = PIC_SLAVE_BASE - PIC_MASTER_BASE;
pub const ELCR_ALIAS_OFFSET: u16 = ELCR_BASE - PIC_MASTER_BASE;

#[derive(Debug, Default, Clone)]
struct Chip {
    last_irr: u8,
    irr: u8,
    imr: u8,
    isr: u8,
    priority_add: u8,
    irq_base: u8,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
    init_state: u8,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    init4: bool,
    single_mode: bool,
    elcr: u8,
    elcr_mask: u8,
    is_master: bool,
}

impl Chip {
    fn set_irq(&mut self, irq: u8, level: bool) {
        let mask = 1u8 << irq;
        if self.elcr & mask != 0 {
            if level {
                self.irr |= mask;
                self.last_irr |= mask;
            } else {
                self.irr &= !mask;
                self.last_irr &= !mask;
            }
        } else if level {
            if self.last_irr & mask == 0 {
                self.irr |= mask;
            }
            self.last_irr |= mask;
        } else {
            self.last_irr &= !mask;
        }
    }

    /// Priority (0 = highest) of the highest-priority bit in `mask`; 8 if none.
    fn priority(&self, mask: u8) -> u8 {
        if mask == 0 {
            return 8;
        }
        let mut p = 0;
        while mask & (1 << ((p + self.priority_add) & 7)) == 0 {
            p += 1;
        }
        p
    }

    /// The IRQ this chip would present to the CPU/master, if any.
    fn get_irq(&self) -> Option<u8> {
        let p = self.priority(self.irr & !self.imr);
        if p == 8 {
            return None;
        }
        let mut mask = self.isr;
        if self.special_mask {
            mask &= !self.imr;
        }
        if self.special_fully_nested && self.is_master {
            mask &= !(1 << 2);
        }
        (p < self.priority(mask)).then_some((p + self.priority_add) & 7)
    }

    fn intack(&mut self, irq: u8) {
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= 1 << irq;
        }
        // Level-triggered IRR stays set while the line is high.
        if self.elcr & (1 << irq) == 0 {
            self.irr &= !(1 << irq);
        }
    }

    fn init_reset(&mut self) {
        *self = Chip {
            elcr: self.elcr,
            elcr_mask: self.elcr_mask,
            is_master: self.is_master,
            irr: self.irr & self.elcr,
            ..Default::default()
        };
    }

    fn write(&mut self, port: u8, val: u8) {
        if port == 0 {
            if val & 0x10 != 0 {
                // ICW1
                self.init_reset();
                self.init_state = 1;
                self.init4 = val & 1 != 0;
                self.single_mode = val & 2 != 0;
            } else if val & 0x08 != 0 {
                // OCW3
                if val & 0x04 != 0 {
                    self.poll = true;
                }
                if val & 0x02 != 0 {
                    self.read_isr = val & 1 != 0;
                }
                if val & 0x40 != 0 {
                    self.special_mask = val & 0x20 != 0;
                }
            } else {
                // OCW2
                match val >> 5 {
                    0 => self.rotate_on_auto_eoi = false,
                    4 => self.rotate_on_auto_eoi = true,
                    cmd @ (1 | 5) => {
                        let p = self.priority(self.isr);
                        if p != 8 {
                            let irq = (p + self.priority_add) & 7;
                            self.isr &= !(1 << irq);
                            if cmd == 5 {
                                self.priority_add = (irq + 1) & 7;
                            }
                        }
                    }
                    3 => self.isr &= !(1 << (val & 7)),
                    6 => self.priority_add = (val + 1) & 7,
                    7 => {
                        let irq = val & 7;
                        self.isr &= !(1 << irq);
                        self.priority_add = (irq + 1) & 7;
                    }
                    _ => {}
                }
            }
        } else {
            match self.init_state {
                0 => self.imr = val, // OCW1
                1 => {
                    self.irq_base = val & 0xf8;
                    self.init_state = match (self.single_mode, self.init4) {
                        (true, true) => 3,
                        (true, false) => 0,
                        _ => 2,
                    };
                }
                2 => self.init_state = if self.init4 { 3 } else { 0 },
                _ => {
                    self.special_fully_nested = val & 0x10 != 0;
                    self.auto_eoi = val & 0x02 != 0;
                    self.init_state = 0;
                }
            }
        }
    }
}

pub struct Pic {
    chips: [Chip; 2],
    /// Raised whenever a change leaves INTR asserted.
    hints: Vec<Arc<InterruptHint>>,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    pub fn new() -> Self {
        let mut master = Chip {
            is_master: true,
            elcr_mask: 0xf8, // IRQ0-2 cannot be level-triggered
            ..Default::default()
        };
        master.init_reset();
        let slave = Chip {
            elcr_mask: 0xde, // IRQ8 and IRQ13 cannot be level-triggered
            ..Default::default()
        };
        Pic {
            chips: [master, slave],
            hints: Vec::new(),
        }
    }

    /// Connects a CPU that may take PIC interrupts (ExtINT / virtual wire):
    /// its hint is raised after every change that leaves INTR asserted.
    pub fn connect_cpu(&mut self, hint: Arc<InterruptHint>) {
        hint.raise_irq();
        self.hints.push(hint);
    }

    /// Called (with the PIC lock held) after every state change: INTR can
    /// only become asserted through one of them.
    fn notify(&self) {
        if !self.hints.is_empty() && self.interrupt_pending() {
            for h in &self.hints {
                h.raise_irq();
            }
        }
    }

    /// Drives ISA IRQ line `irq` (0..16; 2 is the cascade and is ignored).
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            0..=7 if irq != 2 => self.chips[0].set_irq(irq, level),
            8..=15 => self.chips[1].set_irq(irq - 8, level),
            _ => return,
        }
        self.update();
        self.notify();
    }

    /// Propagates the slave's output to master IRQ2.
    fn update(&mut self) {
        let slave_out = self.chips[1].get_irq().is_some();
        self.chips[0].set_irq(2, slave_out);
    }

    /// Whether the INTR output to the CPU is asserted.
    pub fn interrupt_pending(&self) -> bool {
        self.chips[0].get_irq().is_some()
    }

    /// INTA cycle: returns the vector for the CPU, or None if INTR is not
    /// asserted. A request that vanished yields the spurious IRQ7/15 vector.
    pub fn ack(&mut self) -> Option<u8> {
        let irq = self.chips[0].get_irq()?;
        self.chips[0].intack(irq);
        let vector = if irq == 2 {
            let v = match self.chips[1].get_irq() {
                Some(i) => {
                    self.chips[1].intack(i);
                    i
                }
                None => 7,
            };
            self.chips[1].irq_base | v
        } else {
            self.chips[0].irq_base | irq
        };
        self.update();
        self.notify();
        Some(vector)
    }

    /// Vector base programmed by ICW2 for master (0) or slave (1).
    pub fn irq_base(&self, chip: usize) -> u8 {
        self.chips.get(chip).map_or(0, |c| c.irq_base)
    }

    fn poll_read(&mut self, chip: usize) -> u8 {
        self.chips[chip].poll = false;
        match self.chips[chip].get_irq() {
            Some(irq) => {
                if chip == 0 && irq == 2 {
                    // Polling the master for a slave IRQ acks the slave too.
                    let s = self.chips[1].get_irq();
                    if let Some(si) = s {
                        self.chips[1].intack(si);
                    }
                }
                self.chips[chip].intack(irq);
                self.update();
                0x80 | irq
            }
            None => 0,
        }
    }

    fn read_port(&mut self, off: u16) -> u8 {
        let (chip, port) = match off {
            0 | 1 => (0, off),
            PIC_SLAVE_ALIAS_OFFSET | 0x81 => (1, off - PIC_SLAVE_ALIAS_OFFSET),
            ELCR_ALIAS_OFFSET => return self.chips[0].elcr,
            0x4b1 => return self.chips[1].elcr,
            _ => return 0xff,
        };
        if self.chips[chip].poll {
            return self.poll_read(chip);
        }
        let c = &self.chips[chip];
        match (port, c.read_isr) {
            (0, true) => c.isr,
            (0, false) => c.irr,
            _ => c.imr,
        }
    }

    fn write_port(&mut self, off: u16, val: u8) {
        match off {
            0 | 1 => self.chips[0].write(off as u8, val),
            PIC_SLAVE_ALIAS_OFFSET | 0x81 => {
                self.chips[1].write((off - PIC_SLAVE_ALIAS_OFFSET) as u8, val)
            }
            ELCR_ALIAS_OFFSET | 0x4b1 => {
                let c = &mut self.chips[(off - ELCR_ALIAS_OFFSET) as usize];
                c.elcr = val & c.elcr_mask;
            }
            _ => return,
        }
        self.update();
    }
}

impl PioDevice for Pic {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        crate::bus::read_bytes(offset, data, |o| self.read_port(o));
        self.notify(); // a poll-mode read acknowledges, like INTA
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        crate::bus::write_bytes(offset, data, |o, v| self.write_port(o, v));
        self.notify();
    }
}

/// An [`IrqLine`] driving one PIC input.
pub struct PicIrqLine {
    pub pic: Arc<Mutex<Pic>>,
    pub irq: u8,
}

impl IrqLine for PicIrqLine {
    fn set_level(&self, level: bool) {
        lock(&self.pic).set_irq(self.irq, level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The init sequence Linux's init_8259A uses.
    fn linux_init(p: &mut Pic) {
        p.pio_write(1, &[0xff]);
        p.pio_write(0x81, &[0xff]);
        p.pio_write(0, &[0x11]);
        p.pio_write(1, &[0x30]);
        p.pio_write(1, &[0x04]);
        p.pio_write(1, &[0x01]);
        p.pio_write(0x80, &[0x11]);
        p.pio_write(0x81, &[0x38]);
        p.pio_write(0x81, &[0x02]);
        p.pio_write(0x81, &[0x01]);
        p.pio_write(1, &[0x00]);
        p.pio_write(0x81, &[0x00]);
    }

    fn rd(p: &mut Pic, off: u16) -> u8 {
        let mut b = [0];
        p.pio_read(off, &mut b);
        b[0]
    }

    #[test]
    fn init_priority_eoi() {
        let mut p = Pic::new();
        linux_init(&mut p);
        assert_eq!(p.irq_base(0), 0x30);
        assert_eq!(p.irq_base(1), 0x38);
        assert!(!p.interrupt_pending());

        p.set_irq(4, true);
        p.set_irq(1, true);
        p.set_irq(12, true);
        assert_eq!(rd(&mut p, 0), 0x16); // IRR: 1, 2 (cascade), 4
        assert_eq!(p.ack(), Some(0x31));
        // IRQ1 in service blocks lower priorities (2 and 4).
        assert!(!p.interrupt_pending());
        p.pio_write(0, &[0x0b]); // OCW3: read ISR
        assert_eq!(rd(&mut p, 0), 0x02);
        p.pio_write(0, &[0x20]); // non-specific EOI
        assert_eq!(p.ack(), Some(0x3c)); // slave IRQ12 via cascade
        p.pio_write(0x80, &[0x20]);
        p.pio_write(0, &[0x20]);
        assert_eq!(p.ack(), Some(0x34));
        p.pio_write(0, &[0x64]); // specific EOI IRQ4
        assert!(!p.interrupt_pending());
        assert_eq!(p.ack(), None);

        // Edge lines need a new rising edge.
        p.set_irq(4, true);
        assert!(!p.interrupt_pending());
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert!(p.interrupt_pending());

        // Masking.
        p.pio_write(1, &[0x10]);
        assert!(!p.interrupt_pending());
        assert_eq!(rd(&mut p, 1), 0x10);
    }

    /// A connected CPU's hint is raised exactly when a change leaves INTR
    /// asserted (including guest unmask/EOI writes).
    #[test]
    fn connected_hint() {
        let mut p = Pic::new();
        let h = Arc::new(InterruptHint::default());
        p.connect_cpu(h.clone());
        let raised = |h: &InterruptHint| {
            let was = h.irq_maybe();
            h.clear_irq();
            was
        };
        assert!(raised(&h));
        linux_init(&mut p);
        assert!(!raised(&h));
        p.pio_write(1, &[0x02]); // mask IRQ1
        p.set_irq(1, true);
        assert!(!raised(&h), "masked line");
        p.pio_write(1, &[0x00]);
        assert!(raised(&h), "unmask");
        assert_eq!(p.ack(), Some(0x31));
        assert!(!raised(&h));
        p.set_irq(3, true);
        assert!(!raised(&h), "blocked by IRQ1 in service");
        p.pio_write(0, &[0x20]);
        assert!(raised(&h), "EOI");
        p.set_irq(1, false);
        p.set_irq(1, true);
        assert!(raised(&h), "higher priority edge");
    }

    #[test]
    fn level_elcr_auto_eoi_spurious() {
        let mut p = Pic::new();
        p.pio_write(0, &[0x11]);
        p.pio_write(1, &[0x08]);
        p.pio_write(1, &[0x04]);
        p.pio_write(1, &[0x03]); // auto-EOI
        p.pio_write(ELCR_ALIAS_OFFSET, &[0xff]);
        assert_eq!(rd(&mut p, ELCR_ALIAS_OFFSET), 0xf8);
        p.set_irq(5, true);
        assert_eq!(p.ack(), Some(0x0d));
        // Level still high and auto-EOI: re-presented.
        assert!(p.interrupt_pending());
        p.set_irq(5, false);
        assert!(!p.interrupt_pending());

        // Slave request withdrawn before INTA: spurious IRQ15.
        p.pio_write(0x80, &[0x11]);
        p.pio_write(0x81, &[0x70]);
        p.pio_write(0x81, &[0x02]);
        p.pio_write(0x81, &[0x01]);
        p.pio_write(ELCR_ALIAS_OFFSET + 1, &[0x08]); // IRQ11 level
        p.set_irq(11, true);
        assert!(p.interrupt_pending());
        p.set_irq(11, false);
        // Master latched the cascade edge; slave has nothing.
        assert_eq!(p.ack(), Some(0x77));

        // Poll mode.
        p.set_irq(3, true);
        p.pio_write(0, &[0x0c]);
        assert_eq!(rd(&mut p, 0), 0x83);
        let mut junk = [0u8; 4];
        p.pio_read(0x1234, &mut junk);
        p.pio_write(0xffff, &[1, 2, 3]);
    }
}
