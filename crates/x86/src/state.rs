//! Architectural state of one vCPU. Everything here is plain data so the
//! whole CPU can be serialized for snapshots and migration.

use serde::{Deserialize, Serialize};

/// General register indices (encoding order).
pub const RAX: usize = 0;
pub const RCX: usize = 1;
pub const RDX: usize = 2;
pub const RBX: usize = 3;
pub const RSP: usize = 4;
pub const RBP: usize = 5;
pub const RSI: usize = 6;
pub const RDI: usize = 7;

/// Segment register indices (encoding order).
pub const ES: usize = 0;
pub const CS: usize = 1;
pub const SS: usize = 2;
pub const DS: usize = 3;
pub const FS: usize = 4;
pub const GS: usize = 5;

pub mod flags {
    pub const CF: u64 = 1 << 0;
    pub const FIXED1: u64 = 1 << 1;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic status flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
}

pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const MP: u64 = 1 << 1;
    pub const EM: u64 = 1 << 2;
    pub const TS: u64 = 1 << 3;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const WP: u64 = 1 << 16;
    pub const AM: u64 = 1 << 18;
    pub const NW: u64 = 1 << 29;
    pub const CD: u64 = 1 << 30;
    pub const PG: u64 = 1 << 31;
}

pub mod cr4 {
    pub const VME: u64 = 1 << 0;
    pub const PVI: u64 = 1 << 1;
    pub const TSD: u64 = 1 << 2;
    pub const DE: u64 = 1 << 3;
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const MCE: u64 = 1 << 6;
    pub const PGE: u64 = 1 << 7;
    pub const PCE: u64 = 1 << 8;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
    pub const UMIP: u64 = 1 << 11;
    pub const FSGSBASE: u64 = 1 << 16;
    pub const PCIDE: u64 = 1 << 17;
    pub const OSXSAVE: u64 = 1 << 18;
    pub const SMEP: u64 = 1 << 20;
    pub const SMAP: u64 = 1 << 21;
}

pub mod efer {
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
}

/// A loaded segment register: visible selector plus the hidden descriptor cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// Descriptor attribute bits in VMX "access rights" layout:
    /// bits 0-3 type, 4 S, 5-6 DPL, 7 P, 12 AVL, 13 L, 14 D/B, 15 G.
    pub attr: u16,
}

pub mod seg_attr {
    pub const ACCESSED: u16 = 1 << 0;
    pub const WRITABLE: u16 = 1 << 1; // data: writable, code: readable
    pub const CODE: u16 = 1 << 3;
    pub const S: u16 = 1 << 4;
    pub const P: u16 = 1 << 7;
    pub const L: u16 = 1 << 13;
    pub const DB: u16 = 1 << 14;
    pub const G: u16 = 1 << 15;
}

impl Segment {
    pub fn dpl(&self) -> u8 {
        ((self.attr >> 5) & 3) as u8
    }
    pub fn present(&self) -> bool {
        self.attr & seg_attr::P != 0
    }
    pub fn long(&self) -> bool {
        self.attr & seg_attr::L != 0
    }
    pub fn default_big(&self) -> bool {
        self.attr & seg_attr::DB != 0
    }
    /// Real-mode style segment: base = selector << 4, 64 KiB limit.
    pub fn real(selector: u16) -> Self {
        Segment {
            selector,
            base: (selector as u64) << 4,
            limit: 0xffff,
            attr: seg_attr::P | seg_attr::S | seg_attr::WRITABLE | seg_attr::ACCESSED,
        }
    }
    /// Decode a legacy 8-byte descriptor (low, high dwords).
    pub fn from_descriptor(selector: u16, raw: u64) -> Self {
        let lo = raw as u32;
        let hi = (raw >> 32) as u32;
        let base = ((lo >> 16) | ((hi & 0xff) << 16) | (hi & 0xff00_0000)) as u64;
        let mut limit = (lo & 0xffff) | (hi & 0x000f_0000);
        let attr = (((hi >> 8) & 0xff) | (((hi >> 20) & 0xf) << 12)) as u16;
        if attr & seg_attr::G != 0 {
            limit = (limit << 12) | 0xfff;
        }
        Segment {
            selector,
            base,
            limit,
            attr,
        }
    }
}

/// GDTR / IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// x87 / MMX / SSE state, laid out logically (not the FXSAVE image).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FpuState {
    /// Physical x87 registers R0..R7 as 80-bit values (mantissa, sign|exponent).
    pub st: [(u64, u16); 8],
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word as in FXSAVE: bit i set = R(i) valid.
    pub ftw: u8,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub xmm: [u128; 16],
    pub mxcsr: u32,
}

impl Default for FpuState {
    fn default() -> Self {
        FpuState {
            st: [(0, 0); 8],
            fcw: 0x037f,
            fsw: 0,
            ftw: 0,
            fop: 0,
            fip: 0,
            fdp: 0,
            xmm: [0; 16],
            mxcsr: 0x1f80,
        }
    }
}

/// The complete architectural state of a vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuState {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub seg: [Segment; 6],
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub dr: [u64; 8],
    pub fpu: FpuState,
    pub xcr0: u64,
    // MSRs kept by the CPU itself.
    pub kernel_gs_base: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub pat: u64,
    pub tsc_offset: i64,
    /// IA32_TSC_ADJUST (kept in step with `tsc_offset`).
    #[serde(default)]
    pub tsc_adjust: i64,
    pub tsc_aux: u64,
    pub misc_enable: u64,
    pub mtrr_def_type: u64,
    pub mtrr_fixed: [u64; 11],
    pub mtrr_var: [u64; 16],
    /// HLT executed; waiting for an interrupt.
    pub halted: bool,
    /// Interrupts are inhibited for one instruction (STI / MOV SS shadow).
    pub irq_shadow: bool,
    /// NMI being handled (blocked until IRET).
    pub nmi_blocked: bool,
}

impl Default for CpuState {
    fn default() -> Self {
        Self::reset()
    }
}

impl CpuState {
    /// Power-on / INIT state: real mode at F000:FFF0.
    pub fn reset() -> Self {
        let mut seg = [Segment::real(0); 6];
        seg[CS] = Segment {
            selector: 0xf000,
            base: 0xffff_0000,
            limit: 0xffff,
            attr: seg_attr::P
                | seg_attr::S
                | seg_attr::CODE
                | seg_attr::WRITABLE
                | seg_attr::ACCESSED,
        };
        CpuState {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: flags::FIXED1,
            seg,
            ldtr: Segment {
                attr: seg_attr::P | 2,
                limit: 0xffff,
                ..Default::default()
            },
            tr: Segment {
                attr: seg_attr::P | 11,
                limit: 0xffff,
                ..Default::default()
            },
            gdtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            cr0: cr0::ET | cr0::CD | cr0::NW,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            dr: [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400],
            fpu: FpuState::default(),
            xcr0: 1,
            kernel_gs_base: 0,
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            pat: 0x0007_0406_0007_0406,
            tsc_offset: 0,
            tsc_adjust: 0,
            tsc_aux: 0,
            misc_enable: 1, // fast strings
            mtrr_def_type: 0,
            mtrr_fixed: [0; 11],
            mtrr_var: [0; 16],
            halted: false,
            irq_shadow: false,
            nmi_blocked: false,
        }
    }

    pub fn long_mode(&self) -> bool {
        self.efer & efer::LMA != 0
    }
    /// 64-bit code segment active.
    pub fn mode64(&self) -> bool {
        self.long_mode() && self.seg[CS].long()
    }
    pub fn protected(&self) -> bool {
        self.cr0 & cr0::PE != 0
    }
    pub fn v86(&self) -> bool {
        self.rflags & flags::VM != 0
    }
    /// Current privilege level.
    pub fn cpl(&self) -> u8 {
        if !self.protected() {
            0
        } else if self.v86() {
            3
        } else {
            self.seg[CS].dpl()
        }
    }
    /// Code bitness: 16, 32 or 64.
    pub fn bitness(&self) -> u32 {
        if self.mode64() {
            64
        } else if self.protected() && !self.v86() && self.seg[CS].default_big() {
            32
        } else {
            16
        }
    }
}
