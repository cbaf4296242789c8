//! Model-specific registers. MSRs that belong to the CPU are kept in
//! `CpuState`; machine MSRs (APIC) go to the bus; anything else is #GP,
//! exactly as hardware does for an MSR it does not implement.

use crate::cpu::Cpu;
use crate::exception::{Fault, XResult};
use crate::mmu::canonical;
use crate::state::{efer, FS, GS};

pub const TSC: u32 = 0x10;
pub const TSC_ADJUST: u32 = 0x3b;
pub const APIC_BASE: u32 = 0x1b;
pub const FEATURE_CONTROL: u32 = 0x3a;
pub const BIOS_SIGN_ID: u32 = 0x8b;
pub const ARCH_CAPABILITIES: u32 = 0x10a;
pub const MTRRCAP: u32 = 0xfe;
pub const SYSENTER_CS: u32 = 0x174;
pub const SYSENTER_ESP: u32 = 0x175;
pub const SYSENTER_EIP: u32 = 0x176;
pub const MCG_CAP: u32 = 0x179;
pub const MCG_STATUS: u32 = 0x17a;
pub const MISC_ENABLE: u32 = 0x1a0;
pub const PAT: u32 = 0x277;
pub const MTRR_DEF_TYPE: u32 = 0x2ff;
pub const EFER: u32 = 0xc000_0080;
pub const STAR: u32 = 0xc000_0081;
pub const LSTAR: u32 = 0xc000_0082;
pub const CSTAR: u32 = 0xc000_0083;
pub const SFMASK: u32 = 0xc000_0084;
pub const FS_BASE: u32 = 0xc000_0100;
pub const GS_BASE: u32 = 0xc000_0101;
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const TSC_AUX: u32 = 0xc000_0103;

const FIXED_MTRRS: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];

pub fn read(cpu: &mut Cpu, msr: u32) -> XResult<u64> {
    let s = &cpu.s;
    Ok(match msr {
        TSC => return Ok(cpu.tsc()),
        TSC_ADJUST => s.tsc_adjust as u64,
        FEATURE_CONTROL => 1, // locked, VMX off
        BIOS_SIGN_ID => 0,
        ARCH_CAPABILITIES => crate::cpuid::ARCH_CAPABILITIES,
        MTRRCAP => 0x508, // 8 variable ranges, fixed ranges, WC
        SYSENTER_CS => s.sysenter_cs,
        SYSENTER_ESP => s.sysenter_esp,
        SYSENTER_EIP => s.sysenter_eip,
        MCG_CAP | MCG_STATUS => 0,
        MISC_ENABLE => s.misc_enable,
        PAT => s.pat,
        MTRR_DEF_TYPE => s.mtrr_def_type,
        0x200..=0x20f => s.mtrr_var[(msr - 0x200) as usize],
        EFER => s.efer,
        STAR => s.star,
        LSTAR => s.lstar,
        CSTAR => s.cstar,
        SFMASK => s.sfmask,
        FS_BASE => s.seg[FS].base,
        GS_BASE => s.seg[GS].base,
        KERNEL_GS_BASE => s.kernel_gs_base,
        TSC_AUX => s.tsc_aux,
        m if FIXED_MTRRS.contains(&m) => {
            s.mtrr_fixed[FIXED_MTRRS.iter().position(|&x| x == m).unwrap_or(0)]
        }
        _ => return cpu.bus.rdmsr(msr).ok_or(Fault::gp0()),
    })
}

pub fn write(cpu: &mut Cpu, msr: u32, v: u64) -> XResult<()> {
    match msr {
        TSC => {
            // Writing the TSC moves TSC_ADJUST by the same delta (SDM 17.17.3).
            let old = cpu.tsc();
            let now = cpu.bus.tsc();
            cpu.s.tsc_offset = v.wrapping_sub(now) as i64;
            cpu.s.tsc_adjust = cpu.s.tsc_adjust.wrapping_add(v.wrapping_sub(old) as i64);
        }
        TSC_ADJUST => {
            let delta = (v as i64).wrapping_sub(cpu.s.tsc_adjust);
            cpu.s.tsc_adjust = v as i64;
            cpu.s.tsc_offset = cpu.s.tsc_offset.wrapping_add(delta);
        }
        FEATURE_CONTROL | BIOS_SIGN_ID | MCG_STATUS => {}
        SYSENTER_CS => cpu.s.sysenter_cs = v & 0xffff,
        SYSENTER_ESP | SYSENTER_EIP if !canonical(v) => return Err(Fault::gp0()),
        SYSENTER_ESP => cpu.s.sysenter_esp = v,
        SYSENTER_EIP => cpu.s.sysenter_eip = v,
        MISC_ENABLE => cpu.s.misc_enable = v,
        PAT => {
            // Each entry must be a valid memory type (0,1,4,5,6,7).
            if (0..8).any(|k| matches!((v >> (k * 8)) & 0xff, 2 | 3 | 8..=255)) {
                return Err(Fault::gp0());
            }
            cpu.s.pat = v;
        }
        MTRR_DEF_TYPE => cpu.s.mtrr_def_type = v,
        0x200..=0x20f => cpu.s.mtrr_var[(msr - 0x200) as usize] = v,
        EFER => {
            let allowed = efer::SCE | efer::LME | efer::NXE | efer::LMA;
            if v & !allowed != 0 {
                return Err(Fault::gp0());
            }
            let old = cpu.s.efer;
            // LME cannot change while paging is on; LMA is read-only.
            if cpu.s.cr0 & crate::state::cr0::PG != 0 && (old ^ v) & efer::LME != 0 {
                return Err(Fault::gp0());
            }
            cpu.s.efer = (v & !efer::LMA) | (old & efer::LMA);
            if (old ^ v) & efer::NXE != 0 {
                cpu.flush_tlb_all();
            }
        }
        STAR => cpu.s.star = v,
        LSTAR | CSTAR | FS_BASE | GS_BASE | KERNEL_GS_BASE if !canonical(v) => {
            return Err(Fault::gp0())
        }
        LSTAR => cpu.s.lstar = v,
        CSTAR => cpu.s.cstar = v,
        SFMASK => cpu.s.sfmask = v & 0xffff_ffff,
        FS_BASE => cpu.s.seg[FS].base = v,
        GS_BASE => cpu.s.seg[GS].base = v,
        KERNEL_GS_BASE => cpu.s.kernel_gs_base = v,
        TSC_AUX => cpu.s.tsc_aux = v & 0xffff_ffff,
        m if FIXED_MTRRS.contains(&m) => {
            let k = FIXED_MTRRS.iter().position(|&x| x == m).unwrap_or(0);
            cpu.s.mtrr_fixed[k] = v;
        }
        _ => {
            if !cpu.bus.wrmsr(msr, v) {
                return Err(Fault::gp0());
            }
        }
    }
    Ok(())
}
