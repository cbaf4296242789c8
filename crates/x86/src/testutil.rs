//! Helpers to build small machines for unit tests, the self-test and
//! micro-benchmarks: a bus with no devices and ready-made CPU modes.

use std::sync::Arc;

use crate::bus::Bus;
use crate::cpu::{Cpu, CpuConfig};
use crate::mem::GuestRam;
use crate::state::{cr0, cr4, efer, flags, seg_attr, CpuState, Segment, CS, DS, ES, FS, GS, SS};

/// A bus with no devices: port reads return all-ones, writes are recorded.
#[derive(Default)]
pub struct NullBus {
    pub tsc: u64,
    pub io_writes: Vec<(u16, u32)>,
    pub pending_irq: Option<u8>,
}

impl Bus for NullBus {
    fn io_read(&mut self, _port: u16, _size: u8) -> u32 {
        u32::MAX
    }
    fn io_write(&mut self, port: u16, _size: u8, value: u32) {
        self.io_writes.push((port, value));
    }
    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    fn irq_pending(&mut self) -> bool {
        self.pending_irq.is_some()
    }
    fn irq_ack(&mut self) -> Option<u8> {
        self.pending_irq.take()
    }
    fn rdmsr(&mut self, _msr: u32) -> Option<u64> {
        None
    }
    fn wrmsr(&mut self, _msr: u32, _value: u64) -> bool {
        false
    }
    fn tsc(&mut self) -> u64 {
        self.tsc += 1000;
        self.tsc
    }
}

/// Where `long_mode_state` puts its tables.
pub const PML4: u64 = 0x1000;
pub const GDT: u64 = 0x800;

pub fn flat64_code(dpl: u16) -> Segment {
    Segment {
        selector: 0x08 | dpl,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0xb | seg_attr::S | seg_attr::P | seg_attr::L | seg_attr::G | (dpl << 5),
    }
}

pub fn flat_data(sel: u16, dpl: u16) -> Segment {
    Segment {
        selector: sel,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0x3 | seg_attr::S | seg_attr::P | seg_attr::DB | seg_attr::G | (dpl << 5),
    }
}

/// Write identity page tables for the first `gib` GiB (2 MiB pages, user,
/// writable) and a flat GDT; return a 64-bit CPL0 state using them.
pub fn long_mode_state(ram: &GuestRam, gib: u64) -> CpuState {
    let pdpt = PML4 + 0x1000;
    ram.write(PML4, &(pdpt | 7).to_le_bytes());
    for g in 0..gib.min(4) {
        let pd = pdpt + 0x1000 * (1 + g);
        ram.write(pdpt + g * 8, &(pd | 7).to_le_bytes());
        for k in 0..512u64 {
            let pa = (g << 30) | (k << 21);
            ram.write(pd + k * 8, &(pa | 0x87).to_le_bytes());
        }
    }
    let gdt: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00af_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
    ];
    for (k, d) in gdt.iter().enumerate() {
        ram.write(GDT + k as u64 * 8, &d.to_le_bytes());
    }
    let mut s = CpuState::reset();
    s.cr0 = cr0::PE | cr0::PG | cr0::ET | cr0::NE | cr0::WP | cr0::MP;
    s.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT | cr4::PGE;
    s.cr3 = PML4;
    s.efer = efer::LME | efer::LMA | efer::SCE | efer::NXE;
    s.seg[CS] = flat64_code(0);
    for i in [DS, ES, SS, FS, GS] {
        s.seg[i] = flat_data(0x10, 0);
    }
    s.gdtr.base = GDT;
    s.gdtr.limit = (gdt.len() * 8 - 1) as u16;
    s.rflags = flags::FIXED1;
    s
}

/// A 64-bit CPU over fresh anonymous RAM, with `code` placed at `rip`.
pub fn cpu64(ram_size: u64, code: &[u8], rip: u64) -> Cpu {
    let ram = Arc::new(GuestRam::anonymous(ram_size));
    let st = long_mode_state(&ram, ram_size.div_ceil(1 << 30));
    ram.write(rip, code);
    let mut cpu = Cpu::new(ram, Box::new(NullBus::default()), CpuConfig::default());
    cpu.set_state(st);
    cpu.s.rip = rip;
    cpu
}

/// Assemble with iced's code assembler at `ip` for 64-bit mode.
pub fn asm64(ip: u64, f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler)) -> Vec<u8> {
    let mut a = iced_x86::code_asm::CodeAssembler::new(64).expect("64-bit assembler");
    f(&mut a);
    a.assemble(ip).expect("assembles")
}
