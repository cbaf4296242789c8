//! Matryoshka's emulated legacy PC devices. This crate knows nothing about
//! the CPU engine: devices are driven through [`bus::PioDevice`] /
//! [`bus::MmioDevice`], report interrupts through [`irq::IrqLine`] /
//! [`irq::InterruptSink`], read time through [`clock::Clock`], and report
//! machine-level events ([`VmEvent`]) through an [`EventHandler`].
//!
//! # Wiring (done by the VMM)
//!
//! Port I/O ([`PioBus`]): PIT 0x40/4 + `PioAlias(pit, 0x21)` at 0x61/1;
//! PIC 0x20/2 + `PioAlias(pic, 0x80)` at 0xa0/2 + `PioAlias(pic, 0x4b0)` at
//! 0x4d0/2; i8042 0x60/1 + `PioAlias(i8042, 4)` at 0x64/1; RTC 0x70/2;
//! COM1 0x3f8/8; ACPI PM 0x600/12; PCI host 0xcf8/8 (also serves 0xcf9).
//! MMIO ([`MmioBus`]): IOAPIC 0xfec00000/4K, LAPIC 0xfee00000/4K (per vCPU),
//! optionally the PCI host again as ECAM window.
//!
//! ISA IRQs go to both the PIC and the IOAPIC through
//! [`ioapic::IsaIrqLine`] (IRQ0 -> GSI2; declare the override in the MADT).
//! The IOAPIC sends to the [`ApicBus`], which posts into each [`Lapic`].
//!
//! vCPU loop, per iteration (or when woken by the `ApicBus` kick):
//! 1. `pit.poll() > 0` -> pulse ISA IRQ0; `lapic.poll_timer()`.
//! 2. `lapic.take_init()/take_sipi()/take_nmi()` for INIT/SIPI/NMI.
//! 3. If RFLAGS.IF and no interrupt shadow: `lapic.ack()` gives a vector;
//!    otherwise, if `lapic.accepts_pic_interrupts() && pic.interrupt_pending()`,
//!    `pic.ack()` gives one.
//! 4. After any LAPIC MMIO/MSR write: `apic_bus.flush(cpu, Some(&ioapic))`
//!    (with the LAPIC lock released) to send IPIs and EOI broadcasts.
//! 5. When halted, sleep until the earliest of `pit.next_deadline_ns()` and
//!    `lapic.next_deadline_ns()` (or a kick).

pub mod acpi_pm;
pub mod bus;
pub mod clock;
pub mod i8042;
pub mod ioapic;
pub mod irq;
pub mod lapic;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod serial;

use std::sync::Arc;

pub use acpi_pm::{AcpiPm, ResetControl};
pub use bus::{IoBus, MmioBus, MmioDevice, PioAlias, PioBus, PioDevice};
pub use clock::{Clock, HostClock, ManualClock};
pub use i8042::I8042;
pub use ioapic::IoApic;
pub use irq::{DeliveryMode, InterruptRequest, InterruptSink, IrqLine, MsiMessage};
pub use lapic::{ApicBus, Ipi, Lapic};
pub use pci::{PciConfig, PciDevice, PciHost};
pub use pic::Pic;
pub use pit::Pit;
pub use rtc::Rtc;
pub use serial::Serial;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("range [{base:#x}, +{len:#x}) overlaps [{existing_base:#x}, +{existing_len:#x})")]
    RangeOverlap {
        base: u64,
        len: u64,
        existing_base: u64,
        existing_len: u64,
    },
    #[error("zero-length range at {base:#x}")]
    ZeroLengthRange { base: u64 },
    #[error("range [{base:#x}, +{len:#x}) wraps around the address space")]
    RangeOverflow { base: u64, len: u64 },
    #[error("PCI address {bus:02x}:{device:02x}.{function} invalid or already in use")]
    PciSlotUnavailable { bus: u8, device: u8, function: u8 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Machine-level requests raised by guest actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEvent {
    /// Guest requested a system reset (i8042 0xFE, port 0xcf9, ...).
    Reset,
    /// Guest entered ACPI S5 (soft off).
    Poweroff,
}

/// Callback used by devices to report [`VmEvent`]s. It is called with the
/// device lock held, so it must not call back into the device; typically it
/// sets an atomic flag or sends on a channel that the vCPU loop checks.
pub type EventHandler = Arc<dyn Fn(VmEvent) + Send + Sync>;

#[cfg(test)]
mod tests {
    //! End-to-end interrupt flow as the VMM is expected to wire it.
    use super::*;
    use crate::bus::lock;
    use crate::ioapic::IsaIrqLine;
    use crate::lapic::LapicConfig;
    use std::sync::Mutex;

    #[test]
    fn pit_to_ioapic_to_lapic() {
        let clock = Arc::new(ManualClock::new(0));
        let lapic = Arc::new(Mutex::new(Lapic::new(
            0,
            true,
            clock.clone(),
            LapicConfig::default(),
        )));
        let apic_bus = Arc::new(ApicBus::new(vec![lapic.clone()], None));
        let ioapic = Arc::new(Mutex::new(IoApic::new(0, apic_bus.clone())));
        let pic = Arc::new(Mutex::new(Pic::new()));
        let irq0 = IsaIrqLine {
            pic: pic.clone(),
            ioapic: ioapic.clone(),
            irq: 0,
        };
        let mut pit = Pit::new(clock.clone());

        let mut mmio = MmioBus::new();
        mmio.insert(ioapic::IOAPIC_BASE, ioapic::IOAPIC_LEN, ioapic.clone())
            .unwrap();
        mmio.insert(lapic::LAPIC_BASE, lapic::LAPIC_LEN, lapic.clone())
            .unwrap();
        let mut pio = PioBus::new();
        pio.insert(
            pit::PIT_BASE as u64,
            pit::PIT_LEN as u64,
            Arc::new(Mutex::new(Pit::new(clock.clone()))),
        )
        .unwrap();

        // Guest: enable LAPIC, route GSI2 (ISA IRQ0) to vector 0x30, level
        // for the sake of exercising EOI broadcast.
        mmio.write(lapic::LAPIC_BASE + 0xf0, &0x1ffu32.to_le_bytes());
        mmio.write(ioapic::IOAPIC_BASE, &[0x14, 0, 0, 0]);
        mmio.write(ioapic::IOAPIC_BASE + 0x10, &0x0000_8030u32.to_le_bytes());

        pit.pio_write(3, &[0x34]);
        pit.pio_write(0, &[0x9c]);
        pit.pio_write(0, &[0x2e]);

        // vCPU loop iteration.
        clock.set_ns(pit.next_deadline_ns().unwrap());
        if pit.poll() > 0 {
            irq0.set_level(true); // level: held until the guest EOIs
        }
        let v = {
            let mut l = lock(&lapic);
            l.poll_timer();
            l.ack()
        };
        assert_eq!(v, Some(0x30));
        irq0.set_level(false);
        mmio.write(lapic::LAPIC_BASE + 0xb0, &0u32.to_le_bytes());
        apic_bus.flush(0, Some(&ioapic));
        let e = lock(&ioapic).redirection(2).unwrap();
        assert_eq!(e & (1 << 14), 0, "remote IRR cleared by EOI broadcast");
        // The PIC saw the edge too but is uninitialised/unmasked: the LAPIC's
        // LINT0 virtual wire would let the VMM deliver it.
        assert!(lock(&pic).interrupt_pending());
        assert!(lock(&lapic).accepts_pic_interrupts());
    }
}
