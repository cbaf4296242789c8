//! i8042 keyboard controller (ports 0x60 and 0x64) with a minimal keyboard
//! that answers the probe commands Linux's atkbd sends, and no mouse (AUX
//! commands complete with a timeout error, so psmouse gives up quickly).
//!
//! Controller command 0xFE (and any pulse/output-port write clearing bit 0)
//! resets the system via [`VmEvent::Reset`].
//!
//! Map the `I8042` at 0x60 (len 1) and a [`PioAlias`](crate::bus::PioAlias)
//! at 0x64 (len 1) with extra offset [`I8042_CMD_ALIAS_OFFSET`]. IRQ lines
//! are level: asserted while a byte for that port waits in the buffer, and
//! dropped for a moment by a read that leaves more (a new edge per byte).

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bus::PioDevice;
use crate::irq::IrqLine;
use crate::{EventHandler, VmEvent};

pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_CMD_PORT: u16 = 0x64;
pub const I8042_CMD_ALIAS_OFFSET: u16 = 4;
pub const KBD_IRQ: u8 = 1;
pub const AUX_IRQ: u8 = 12;

const STS_OBF: u8 = 0x01;
const STS_SYS: u8 = 0x04;
const STS_CMD: u8 = 0x08;
const STS_UNLOCKED: u8 = 0x10;
const STS_AUX: u8 = 0x20;
const STS_TIMEOUT: u8 = 0x40;

const CTR_KBD_INT: u8 = 0x01;
const CTR_AUX_INT: u8 = 0x02;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DIS: u8 = 0x10;
const CTR_AUX_DIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

/// Bound on queued output, so a guest can't make us buffer without limit.
const MAX_QUEUE: usize = 64;

#[derive(Clone, Copy)]
struct OutByte {
    data: u8,
    aux: bool,
    timeout: bool,
}

pub struct I8042 {
    ctr: u8,
    out: VecDeque<OutByte>,
    last: u8,
    last_was_cmd: bool,
    /// Controller command awaiting its data byte on port 0x60.
    pending_cmd: Option<u8>,
    /// Keyboard command awaiting its argument byte.
    kbd_pending: Option<u8>,
    output_port: u8,
    irq1: Arc<dyn IrqLine>,
    irq12: Arc<dyn IrqLine>,
    events: EventHandler,
}

impl I8042 {
    pub fn new(irq1: Arc<dyn IrqLine>, irq12: Arc<dyn IrqLine>, events: EventHandler) -> Self {
        I8042 {
            ctr: CTR_KBD_INT | CTR_SYS | CTR_XLATE,
            out: VecDeque::new(),
            last: 0,
            last_was_cmd: false,
            pending_cmd: None,
            kbd_pending: None,
            output_port: 0x03, // reset line inactive, A20 on
            irq1,
            irq12,
            events,
        }
    }

    /// Injects keyboard scancode bytes (as the guest expects them, i.e.
    /// set 1 if translation is on).
    pub fn push_scancodes(&mut self, codes: &[u8]) {
        for &c in codes {
            self.push(c, false, false);
        }
    }

    fn push(&mut self, data: u8, aux: bool, timeout: bool) {
        if self.out.len() < MAX_QUEUE {
            self.out.push_back(OutByte { data, aux, timeout });
        }
        self.update_irq();
    }

    fn update_irq(&self) {
        let front = self.out.front();
        let kbd = front.is_some_and(|b| !b.aux) && self.ctr & CTR_KBD_INT != 0;
        let aux = front.is_some_and(|b| b.aux) && self.ctr & CTR_AUX_INT != 0;
        self.irq1.set_level(kbd);
        self.irq12.set_level(aux);
    }

    fn status(&self) -> u8 {
        let mut s = STS_UNLOCKED | if self.ctr & CTR_SYS != 0 { STS_SYS } else { 0 };
        if self.last_was_cmd {
            s |= STS_CMD;
        }
        if let Some(b) = self.out.front() {
            s |= STS_OBF;
            if b.aux {
                s |= STS_AUX;
            }
            if b.timeout {
                s |= STS_TIMEOUT;
            }
        }
        s
    }

    fn read_data(&mut self) -> u8 {
        if let Some(b) = self.out.pop_front() {
            self.last = b.data;
            if !self.out.is_empty() {
                // The 8042 holds one byte: the next one is loaded after
                // this read and interrupts anew. Without the new edge an
                // edge-triggered pin (the ISA default) never reports the
                // bytes queued behind the first (atkbd's GETID reply then
                // timed out, and the keyboard probe took 0.7 s).
                self.irq1.set_level(false);
                self.irq12.set_level(false);
            }
        }
        self.update_irq();
        self.last
    }

    fn reset_system(&mut self) {
        (self.events)(VmEvent::Reset);
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_cmd = true;
        match cmd {
            0x20 => {
                let c = self.ctr;
                self.push(c, false, false)
            }
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending_cmd = Some(cmd),
            0xa7 => self.ctr |= CTR_AUX_DIS,
            0xa8 => self.ctr &= !CTR_AUX_DIS,
            0xa9 | 0xab => self.push(0x00, false, false), // interface tests pass
            0xaa => self.push(0x55, false, false),        // self-test OK
            0xad => self.ctr |= CTR_KBD_DIS,
            0xae => self.ctr &= !CTR_KBD_DIS,
            0xc0 => self.push(0x00, false, false),
            0xd0 => {
                let p = self.output_port;
                self.push(p, false, false)
            }
            0xf0..=0xff => {
                // Pulse output lines low; bit 0 is the CPU reset line.
                if cmd & 1 == 0 {
                    self.reset_system();
                }
            }
            _ => tracing::trace!("i8042: unhandled command {cmd:#x}"),
        }
    }

    fn write_data(&mut self, v: u8) {
        self.last_was_cmd = false;
        match self.pending_cmd.take() {
            Some(0x60) => {
                self.ctr = v;
                self.update_irq();
            }
            Some(0xd1) => {
                self.output_port = v;
                if v & 1 == 0 {
                    self.reset_system();
                }
            }
            Some(0xd2) => self.push(v, false, false),
            Some(0xd3) => self.push(v, true, false),
            // No mouse: report "no response" with a timeout error.
            Some(0xd4) => self.push(0xfe, true, true),
            _ => self.keyboard_write(v),
        }
    }

    fn keyboard_write(&mut self, v: u8) {
        const ACK: u8 = 0xfa;
        if let Some(cmd) = self.kbd_pending.take() {
            self.push(ACK, false, false);
            if cmd == 0xf0 && v == 0 {
                // Report scancode set 2 (0x41 when translated).
                let set = if self.ctr & CTR_XLATE != 0 {
                    0x41
                } else {
                    0x02
                };
                self.push(set, false, false);
            }
            return;
        }
        match v {
            0xed | 0xf0 | 0xf3 => {
                self.kbd_pending = Some(v);
                self.push(ACK, false, false);
            }
            0xee => self.push(0xee, false, false),
            0xf2 => {
                self.push(ACK, false, false);
                self.push(0xab, false, false);
                let id = if self.ctr & CTR_XLATE != 0 {
                    0x41
                } else {
                    0x83
                };
                self.push(id, false, false);
            }
            0xff => {
                self.push(ACK, false, false);
                self.push(0xaa, false, false); // BAT passed
            }
            0xf4..=0xfd | 0xe6..=0xe8 => self.push(ACK, false, false),
            _ => self.push(0xfe, false, false), // resend
        }
    }
}

impl PioDevice for I8042 {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        crate::bus::read_bytes(offset, data, |o| match o {
            0 => self.read_data(),
            I8042_CMD_ALIAS_OFFSET => self.status(),
            _ => 0xff,
        });
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        crate::bus::write_bytes(offset, data, |o, v| match o {
            0 => self.write_data(v),
            I8042_CMD_ALIAS_OFFSET => self.command(v),
            _ => {}
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi_pm::tests::recorder;
    use crate::irq::{NullIrq, RecordingIrq};

    fn rd(k: &mut I8042, off: u16) -> u8 {
        let mut b = [0];
        k.pio_read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_via_fe() {
        let (ev, h) = recorder();
        let mut k = I8042::new(Arc::new(NullIrq), Arc::new(NullIrq), h);
        k.pio_write(4, &[0xfe]);
        assert_eq!(*ev.lock().unwrap(), vec![VmEvent::Reset]);
        k.pio_write(4, &[0xd1]);
        k.pio_write(0, &[0x02]);
        assert_eq!(ev.lock().unwrap().len(), 2);
    }

    #[test]
    fn probe_sequence() {
        let (_, h) = recorder();
        let irq1 = Arc::new(RecordingIrq::default());
        let irq12 = Arc::new(RecordingIrq::default());
        let mut k = I8042::new(irq1.clone(), irq12.clone(), h);
        assert_eq!(rd(&mut k, 4) & STS_OBF, 0);
        k.pio_write(4, &[0xaa]);
        assert_eq!(rd(&mut k, 4) & STS_OBF, STS_OBF);
        assert_eq!(rd(&mut k, 0), 0x55);
        // Read and write the command byte.
        k.pio_write(4, &[0x20]);
        let ctr = rd(&mut k, 0);
        assert_eq!(ctr, 0x45);
        k.pio_write(4, &[0x60]);
        k.pio_write(0, &[ctr | CTR_AUX_INT]);
        // AUX loopback raises IRQ12 with AUX data.
        k.pio_write(4, &[0xd3]);
        k.pio_write(0, &[0xa5]);
        assert!(irq12.level());
        assert_eq!(rd(&mut k, 4) & STS_AUX, STS_AUX);
        assert_eq!(rd(&mut k, 0), 0xa5);
        assert!(!irq12.level());
        // Keyboard GETID.
        irq1.take_edges();
        k.pio_write(0, &[0xf2]);
        assert!(irq1.level());
        assert_eq!(
            [rd(&mut k, 0), rd(&mut k, 0), rd(&mut k, 0)],
            [0xfa, 0xab, 0x41]
        );
        assert!(!irq1.level());
        // Mouse absent: timeout.
        k.pio_write(4, &[0xd4]);
        k.pio_write(0, &[0xff]);
        assert_eq!(
            rd(&mut k, 4) & (STS_TIMEOUT | STS_AUX),
            STS_TIMEOUT | STS_AUX
        );
        rd(&mut k, 0);
        let mut junk = [0u8; 4];
        k.pio_read(1, &mut junk);
        k.pio_write(2, &junk);
    }

    /// Each byte of a multi-byte reply interrupts on its own: Linux's
    /// i8042 driver reads one byte per interrupt, and the IOAPIC and PIC
    /// pins of ISA IRQs are edge-triggered.
    #[test]
    fn every_queued_byte_is_a_new_edge() {
        let (_, h) = recorder();
        let irq1 = Arc::new(RecordingIrq::default());
        let mut k = I8042::new(irq1.clone(), Arc::new(NullIrq), h);
        k.pio_write(0, &[0xf2]); // GETID: ACK, 0xab, id
        assert_eq!(irq1.take_edges(), 1);
        for (n, want) in [0xfa, 0xab, 0x41].into_iter().enumerate() {
            assert_eq!(rd(&mut k, 0), want);
            let more = n < 2;
            assert_eq!(irq1.take_edges(), more as u32, "after byte {n}");
            assert_eq!(irq1.level(), more);
        }
    }
}
