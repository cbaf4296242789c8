//! The per-vCPU view of the machine: implements the CPU crate's `Bus` over
//! the shared device buses, this vCPU's local APIC and the machine clock.

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::clock::{ns_to_tsc, Clock};
use devices::{ApicBus, IoApic, Lapic, MmioBus, Pic, PioBus};

/// Local APIC MMIO window (per vCPU, at the address in IA32_APIC_BASE).
const LAPIC_LEN: u64 = 0x1000;

pub struct VcpuBus {
    pub index: usize,
    pub pio: Arc<PioBus>,
    pub mmio: Arc<MmioBus>,
    pub lapic: Arc<Mutex<Lapic>>,
    pub apic_bus: Arc<ApicBus>,
    pub ioapic: Arc<Mutex<IoApic>>,
    pub pic: Arc<Mutex<Pic>>,
    pub clock: Arc<dyn Clock>,
    pub tsc_hz: u64,
    /// Port 0x80/0xe9 style debug output is ignored; unknown ports read ~0.
    pub io_trace: bool,
}

impl VcpuBus {
    fn lapic_window(&self, gpa: u64) -> Option<u64> {
        let l = lock(&self.lapic);
        if !l.mmio_enabled() {
            return None;
        }
        let base = l.mmio_base();
        (gpa >= base && gpa < base + LAPIC_LEN).then(|| gpa - base)
    }
}

impl x86::Bus for VcpuBus {
    fn io_read(&mut self, port: u16, size: u8) -> u32 {
        let mut buf = [0xffu8; 4];
        let n = (size as usize).clamp(1, 4);
        if !self.pio.read(port, &mut buf[..n]) && self.io_trace {
            tracing::debug!(
                port = format_args!("{port:#x}"),
                size,
                "read from unmapped port"
            );
        }
        u32::from_le_bytes(buf)
            & if n == 4 {
                u32::MAX
            } else {
                (1u32 << (n * 8)) - 1
            }
    }

    fn io_write(&mut self, port: u16, size: u8, value: u32) {
        let n = (size as usize).clamp(1, 4);
        let bytes = value.to_le_bytes();
        if !self.pio.write(port, &bytes[..n]) && self.io_trace {
            tracing::debug!(
                port = format_args!("{port:#x}"),
                value,
                "write to unmapped port"
            );
        }
    }

    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        if let Some(off) = self.lapic_window(gpa) {
            use devices::MmioDevice;
            lock(&self.lapic).mmio_read(off, data);
            return;
        }
        if !self.mmio.read(gpa, data) {
            data.fill(0xff);
        }
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        if let Some(off) = self.lapic_window(gpa) {
            use devices::MmioDevice;
            lock(&self.lapic).mmio_write(off, data);
            self.apic_bus.flush(self.index, Some(&self.ioapic));
            return;
        }
        self.mmio.write(gpa, data);
    }

    fn irq_pending(&mut self) -> bool {
        let l = lock(&self.lapic);
        if l.pending_vector().is_some() {
            return true;
        }
        let pic_ok = l.accepts_pic_interrupts();
        drop(l);
        pic_ok && lock(&self.pic).interrupt_pending()
    }

    fn irq_ack(&mut self) -> Option<u8> {
        let mut l = lock(&self.lapic);
        if let Some(v) = l.ack() {
            return Some(v);
        }
        let pic_ok = l.accepts_pic_interrupts();
        drop(l);
        if pic_ok {
            lock(&self.pic).ack()
        } else {
            None
        }
    }

    fn nmi_take(&mut self) -> bool {
        lock(&self.lapic).take_nmi()
    }

    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        lock(&self.lapic).rdmsr(msr)
    }

    fn wrmsr(&mut self, msr: u32, value: u64) -> bool {
        let ok = lock(&self.lapic).wrmsr(msr, value);
        if ok {
            self.apic_bus.flush(self.index, Some(&self.ioapic));
        }
        ok
    }

    fn tsc(&mut self) -> u64 {
        ns_to_tsc(self.clock.now_ns(), self.tsc_hz)
    }

    fn set_tpr(&mut self, tpr: u8) {
        lock(&self.lapic).set_cr8(tpr as u64);
    }
}
