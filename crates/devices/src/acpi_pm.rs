//! ACPI fixed-hardware PM registers (PM1a event/control + PM timer) and the
//! 0xcf9 reset control register.
//!
//! The VMM's FADT must match: PM1a_EVT_BLK = 0x600 (len 4), PM1a_CNT_BLK =
//! 0x604 (len 2), PM_TMR_BLK = 0x608 (len 4, 24-bit), and the DSDT's `\_S5`
//! package must use SLP_TYP [`SLP_TYP_S5`]. Map `AcpiPm` at [`PM_BASE`]
//! (len [`PM_LEN`]). The FADT RESET_REG may point at I/O port 0xcf9 with
//! value 0x06; 0xcf9 is served by [`crate::pci::PciHost`] (which embeds a
//! [`ResetControl`]), or by a standalone `ResetControl` at 0xcf9 if the VMM
//! has no PCI host.

use std::sync::Arc;

use crate::bus::PioDevice;
use crate::clock::{ns_to_ticks, Clock};
use crate::irq::IrqLine;
use crate::{EventHandler, VmEvent};

pub const PM_BASE: u16 = 0x600;
pub const PM_LEN: u16 = 0x0c;
pub const PM1_EVT_OFFSET: u16 = 0x0;
pub const PM1_CNT_OFFSET: u16 = 0x4;
pub const PM_TMR_OFFSET: u16 = 0x8;
pub const PM_TIMER_HZ: u64 = 3_579_545;
pub const SLP_TYP_S5: u16 = 5;
/// ISA IRQ used for the SCI (FADT SCI_INT).
pub const SCI_IRQ: u8 = 9;

pub const RESET_PORT: u16 = 0xcf9;

const PM1_STS_PWRBTN: u16 = 1 << 8;
const PM1_STS_WAK: u16 = 1 << 15;
const PM1_CNT_SCI_EN: u16 = 1 << 0;
const PM1_CNT_SLP_EN: u16 = 1 << 13;

pub struct AcpiPm {
    clock: Arc<dyn Clock>,
    events: EventHandler,
    sci: Option<Arc<dyn IrqLine>>,
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
}

impl AcpiPm {
    /// `sci` (ISA IRQ9, level) is only used for the power button event.
    pub fn new(clock: Arc<dyn Clock>, events: EventHandler, sci: Option<Arc<dyn IrqLine>>) -> Self {
        AcpiPm {
            clock,
            events,
            sci,
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: PM1_CNT_SCI_EN,
        }
    }

    /// Current 24-bit PM timer value.
    pub fn pm_timer(&self) -> u32 {
        (ns_to_ticks(self.clock.now_ns(), PM_TIMER_HZ) & 0xff_ffff) as u32
    }

    /// Presses the ACPI power button (asks the guest to shut down cleanly).
    pub fn power_button(&mut self) {
        self.pm1_sts |= PM1_STS_PWRBTN;
        self.update_sci();
    }

    fn update_sci(&self) {
        if let Some(sci) = &self.sci {
            sci.set_level(self.pm1_sts & self.pm1_en != 0);
        }
    }

    fn regs(&self) -> [u8; PM_LEN as usize] {
        let mut r = [0u8; PM_LEN as usize];
        r[0..2].copy_from_slice(&self.pm1_sts.to_le_bytes());
        r[2..4].copy_from_slice(&self.pm1_en.to_le_bytes());
        // SCI_EN always reads 1: we have no legacy (non-ACPI) mode.
        r[4..6].copy_from_slice(&(self.pm1_cnt | PM1_CNT_SCI_EN).to_le_bytes());
        r[8..12].copy_from_slice(&self.pm_timer().to_le_bytes());
        r
    }
}

impl PioDevice for AcpiPm {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        // Build the register file once so multi-byte timer reads are coherent.
        let r = self.regs();
        for (i, b) in data.iter_mut().enumerate() {
            *b = r.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        let mut sleep_write = false;
        for (i, &v) in data.iter().enumerate() {
            let off = offset as usize + i;
            let shift = (off & 1) * 8;
            match off {
                0 | 1 => self.pm1_sts &= !((v as u16) << shift), // write 1 to clear
                2 | 3 => self.pm1_en = (self.pm1_en & !(0xff << shift)) | ((v as u16) << shift),
                4 | 5 => {
                    self.pm1_cnt = (self.pm1_cnt & !(0xff << shift)) | ((v as u16) << shift);
                    sleep_write |= off == 5;
                }
                _ => {} // timer is read-only
            }
        }
        if sleep_write && self.pm1_cnt & PM1_CNT_SLP_EN != 0 {
            // SLP_EN is write-only: it triggers and reads back as 0.
            self.pm1_cnt &= !PM1_CNT_SLP_EN;
            let typ = (self.pm1_cnt >> 10) & 7;
            if typ == SLP_TYP_S5 {
                (self.events)(VmEvent::Poweroff);
            } else {
                // Other sleep states are not supported; wake immediately.
                tracing::debug!("ACPI sleep type {typ} requested; ignoring");
                self.pm1_sts |= PM1_STS_WAK;
            }
        }
        self.update_sci();
    }
}

/// Reset control register (RST_CNT, port 0xcf9): setting RST_CPU (bit 2)
/// resets the system, e.g. writing 0x06 or 0x0e.
pub struct ResetControl {
    value: u8,
    events: EventHandler,
}

impl ResetControl {
    pub fn new(events: EventHandler) -> Self {
        ResetControl { value: 0, events }
    }

    pub fn read(&self) -> u8 {
        self.value
    }

    pub fn write(&mut self, v: u8) {
        // Keep SYS_RST/FULL_RST; RST_CPU self-clears.
        self.value = v & 0x0a;
        if v & 0x04 != 0 {
            (self.events)(VmEvent::Reset);
        }
    }
}

impl PioDevice for ResetControl {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = if offset as usize + i == 0 {
                self.value
            } else {
                0xff
            };
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        if offset == 0 {
            if let Some(&v) = data.first() {
                self.write(v);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::clock::{ticks_to_ns, ManualClock};
    use crate::irq::RecordingIrq;
    use std::sync::Mutex;

    pub fn recorder() -> (Arc<Mutex<Vec<VmEvent>>>, EventHandler) {
        let ev = Arc::new(Mutex::new(Vec::new()));
        let e2 = ev.clone();
        (ev, Arc::new(move |e| e2.lock().unwrap().push(e)))
    }

    #[test]
    fn poweroff_and_timer() {
        let clock = Arc::new(ManualClock::new(0));
        let (ev, h) = recorder();
        let sci = Arc::new(RecordingIrq::default());
        let mut pm = AcpiPm::new(clock.clone(), h, Some(sci.clone()));
        let mut b = [0u8; 2];
        pm.pio_read(PM1_CNT_OFFSET, &mut b);
        assert_eq!(u16::from_le_bytes(b) & 1, 1);

        clock.set_ns(ticks_to_ns(0x123456, PM_TIMER_HZ));
        let mut t = [0u8; 4];
        pm.pio_read(PM_TMR_OFFSET, &mut t);
        assert_eq!(u32::from_le_bytes(t), 0x123456);
        clock.set_ns(ticks_to_ns(0x1_000_005, PM_TIMER_HZ)); // 24-bit wrap
        pm.pio_read(PM_TMR_OFFSET, &mut t);
        assert_eq!(u32::from_le_bytes(t), 5);

        // S3 request: ignored (no event), WAK_STS set.
        pm.pio_write(
            PM1_CNT_OFFSET,
            &(PM1_CNT_SLP_EN | (3 << 10) | 1).to_le_bytes(),
        );
        assert!(ev.lock().unwrap().is_empty());
        // S5 via the high byte only, as some code does.
        pm.pio_write(
            PM1_CNT_OFFSET + 1,
            &[((PM1_CNT_SLP_EN | (5 << 10)) >> 8) as u8],
        );
        assert_eq!(*ev.lock().unwrap(), vec![VmEvent::Poweroff]);

        // Power button raises SCI when enabled; W1C clears it.
        pm.pio_write(2, &[0x00, 0x01]);
        pm.power_button();
        assert!(sci.level());
        pm.pio_write(0, &[0x00, 0x01]);
        assert!(!sci.level());
        let mut junk = [0u8; 8];
        pm.pio_read(10, &mut junk);
        pm.pio_write(11, &junk);
    }

    #[test]
    fn reset_register() {
        let (ev, h) = recorder();
        let mut r = ResetControl::new(h);
        r.pio_write(0, &[0x02]);
        assert!(ev.lock().unwrap().is_empty());
        r.pio_write(0, &[0x06]);
        assert_eq!(*ev.lock().unwrap(), vec![VmEvent::Reset]);
        let mut b = [0u8];
        r.pio_read(0, &mut b);
        assert_eq!(b[0], 0x02);
    }
}
