//! Interrupt plumbing shared by devices and interrupt controllers.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// An interrupt request line driven by a device. Level devices hold it high
/// while asserted; edge devices call [`IrqLine::pulse`].
pub trait IrqLine: Send + Sync {
    fn set_level(&self, level: bool);
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// A line connected to nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullIrq;

impl IrqLine for NullIrq {
    fn set_level(&self, _: bool) {}
}

/// Adapts any closure into an [`IrqLine`].
pub struct FnIrqLine<F: Fn(bool) + Send + Sync>(pub F);

impl<F: Fn(bool) + Send + Sync> IrqLine for FnIrqLine<F> {
    fn set_level(&self, level: bool) {
        (self.0)(level)
    }
}

/// Records line activity; handy for tests and for polling-style VMM glue.
#[derive(Debug, Default)]
pub struct RecordingIrq {
    level: AtomicBool,
    rising_edges: AtomicU32,
}

impl RecordingIrq {
    pub fn level(&self) -> bool {
        self.level.load(Ordering::SeqCst)
    }
    /// Returns and clears the number of rising edges seen.
    pub fn take_edges(&self) -> u32 {
        self.rising_edges.swap(0, Ordering::SeqCst)
    }
}

impl IrqLine for RecordingIrq {
    fn set_level(&self, level: bool) {
        if level && !self.level.swap(true, Ordering::SeqCst) {
            self.rising_edges.fetch_add(1, Ordering::SeqCst);
        }
        if !level {
            self.level.store(false, Ordering::SeqCst);
        }
    }
}

/// APIC delivery modes (ICR / redirection entry / MSI data bits 8..10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
    Reserved,
}

impl DeliveryMode {
    pub fn from_bits(bits: u32) -> Self {
        match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => DeliveryMode::Reserved,
        }
    }
}

/// An interrupt message as sent on the APIC bus (from the IOAPIC, an MSI or
/// an IPI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptRequest {
    pub vector: u8,
    /// Destination APIC ID (physical) or logical destination mask.
    pub destination: u32,
    pub logical_destination: bool,
    pub delivery_mode: DeliveryMode,
    pub level_triggered: bool,
}

/// Where the IOAPIC (and MSI-capable devices) send interrupts; normally the
/// [`crate::lapic::ApicBus`].
pub trait InterruptSink: Send + Sync {
    fn deliver(&self, req: InterruptRequest);
}

/// A PCI MSI message (address/data pair as programmed by the guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

impl MsiMessage {
    /// Decodes the x86 MSI format (address 0xfeeXXXXX). Extended destination
    /// ID bits 11..5 of the address are honoured (for >255 APIC IDs).
    pub fn to_request(&self) -> Option<InterruptRequest> {
        if self.address >> 20 != 0xfee {
            return None;
        }
        let dest =
            ((self.address >> 12) & 0xff) as u32 | (((self.address >> 5) & 0x7f) as u32) << 8;
        Some(InterruptRequest {
            vector: self.data as u8,
            destination: dest,
            logical_destination: self.address & (1 << 2) != 0,
            delivery_mode: DeliveryMode::from_bits(self.data >> 8),
            level_triggered: self.data & (1 << 15) != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msi_decode() {
        let m = MsiMessage {
            address: 0xfee0_1000,
            data: 0x4041,
        };
        let r = m.to_request().unwrap();
        assert_eq!(r.vector, 0x41);
        assert_eq!(r.destination, 1);
        assert_eq!(r.delivery_mode, DeliveryMode::Fixed);
        assert!(!r.logical_destination);
        assert!(MsiMessage::default().to_request().is_none());

        let l = RecordingIrq::default();
        l.pulse();
        l.set_level(true);
        l.set_level(true);
        assert_eq!(l.take_edges(), 2);
        assert!(l.level());
    }
}
