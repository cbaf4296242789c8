//! CPUID: one coherent, documented feature set. Only what the interpreter
//! implements is advertised; everything else is hidden so guests never pick
//! code paths we cannot run.

use crate::cpu::CpuConfig;

/// CPUID.1:ECX bits we advertise.
pub mod ecx1 {
    pub const SSE3: u32 = 1 << 0;
    pub const PCLMULQDQ: u32 = 1 << 1;
    pub const SSSE3: u32 = 1 << 9;
    pub const CX16: u32 = 1 << 13;
    pub const SSE41: u32 = 1 << 19;
    pub const SSE42: u32 = 1 << 20;
    pub const X2APIC: u32 = 1 << 21;
    pub const MOVBE: u32 = 1 << 22;
    pub const POPCNT: u32 = 1 << 23;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const HYPERVISOR: u32 = 1 << 31;
}

/// CPUID.1:EDX bits we advertise.
pub mod edx1 {
    pub const FPU: u32 = 1 << 0;
    pub const DE: u32 = 1 << 2;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    /// Machine-check exception and architecture, with no banks
    /// (IA32_MCG_CAP reads 0): Linux then sets up machine checks
    /// quietly instead of logging "Unable to init MCE device" at every
    /// boot.
    pub const MCE: u32 = 1 << 7;
    pub const CX8: u32 = 1 << 8;
    pub const APIC: u32 = 1 << 9;
    pub const SEP: u32 = 1 << 11;
    pub const MTRR: u32 = 1 << 12;
    pub const PGE: u32 = 1 << 13;
    pub const MCA: u32 = 1 << 14;
    pub const CMOV: u32 = 1 << 15;
    pub const PAT: u32 = 1 << 16;
    pub const PSE36: u32 = 1 << 17;
    pub const CLFSH: u32 = 1 << 19;
    pub const MMX: u32 = 1 << 23;
    pub const FXSR: u32 = 1 << 24;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
}

/// The SIMD extensions the interpreter implements in full. SSE4.2 (string
/// compares, CRC32) is advertised only together with its implementation.
pub const SIMD_ECX: u32 = ecx1::SSE3 | ecx1::SSSE3 | ecx1::SSE41 | ecx1::SSE42 | ecx1::POPCNT;

pub const FEATURES_ECX1: u32 =
    SIMD_ECX | ecx1::CX16 | ecx1::MOVBE | ecx1::TSC_DEADLINE | ecx1::HYPERVISOR;

pub const FEATURES_EDX1: u32 = edx1::FPU
    | edx1::DE
    | edx1::PSE
    | edx1::TSC
    | edx1::MSR
    | edx1::PAE
    | edx1::MCE
    | edx1::CX8
    | edx1::APIC
    | edx1::SEP
    | edx1::MTRR
    | edx1::PGE
    | edx1::MCA
    | edx1::CMOV
    | edx1::PAT
    | edx1::PSE36
    | edx1::CLFSH
    | edx1::MMX
    | edx1::FXSR
    | edx1::SSE
    | edx1::SSE2;

/// CPUID.80000001:ECX — LAHF/SAHF in 64-bit mode, LZCNT (ABM).
pub const FEATURES_ECX81: u32 = 1 | (1 << 5);
/// CPUID.80000001:EDX — SYSCALL, NX, 1 GiB pages, RDTSCP, long mode.
pub const FEATURES_EDX81: u32 = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29);
/// CPUID.7.0:EBX — TSC_ADJUST MSR, ERMS (fast REP MOVSB/STOSB is a hint only).
/// TSC_ADJUST plus the invariant TSC lets Linux trust the TSC without a
/// clocksource watchdog, as on current hardware.
pub const FEATURES_EBX7: u32 = (1 << 1) | (1 << 9);
/// CPUID.7.0:EDX — SERIALIZE (Linux's sync_core() then uses it instead
/// of an IRET to itself) and the IA32_ARCH_CAPABILITIES MSR exists.
pub const FEATURES_EDX7: u32 = (1 << 14) | (1 << 29);

/// IA32_ARCH_CAPABILITIES (MSR 0x10a): the "not affected" bits for the
/// speculative-execution side channels. This CPU does not speculate (the
/// soft TLB checks every permission before an access, no fill or store
/// buffers hold other contexts' data), so none apply; without them an Intel
/// guest assumes the worst and pays for it on every kernel entry (Linux:
/// page-table isolation, two CR3 writes and TLB flushes per system call;
/// VERW buffer clearing on every return to user; ITS return thunks).
pub mod arch_cap {
    pub const RDCL_NO: u64 = 1 << 0;
    pub const SSB_NO: u64 = 1 << 4;
    pub const MDS_NO: u64 = 1 << 5;
    pub const PSCHANGE_MC_NO: u64 = 1 << 6;
    pub const TAA_NO: u64 = 1 << 8;
    pub const SBDR_SSDP_NO: u64 = 1 << 13;
    pub const FBSDP_NO: u64 = 1 << 14;
    pub const PSDP_NO: u64 = 1 << 15;
    pub const GDS_NO: u64 = 1 << 26;
    pub const RFDS_NO: u64 = 1 << 27;
    pub const ITS_NO: u64 = 1 << 62;
}

pub const ARCH_CAPABILITIES: u64 = arch_cap::RDCL_NO
    | arch_cap::SSB_NO
    | arch_cap::MDS_NO
    | arch_cap::PSCHANGE_MC_NO
    | arch_cap::TAA_NO
    | arch_cap::SBDR_SSDP_NO
    | arch_cap::FBSDP_NO
    | arch_cap::PSDP_NO
    | arch_cap::GDS_NO
    | arch_cap::RFDS_NO
    | arch_cap::ITS_NO;

fn str_regs(s: &[u8; 12]) -> [u32; 3] {
    [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    ]
}

/// Evaluate CPUID for (leaf, subleaf) → [eax, ebx, ecx, edx].
pub fn cpuid(cfg: &CpuConfig, leaf: u32, sub: u32) -> [u32; 4] {
    const BRAND: &[u8; 48] = b"Matryoshka Virtual CPU @ software x86-64\0\0\0\0\0\0\0\0";
    match leaf {
        0 => {
            let v = str_regs(b"GenuineIntel");
            [0x16, v[0], v[2], v[1]]
        }
        1 => {
            // Family 6, model 0x2a (a plain, well-trodden model), stepping 7.
            let ebx = (cfg.apic_id << 24) | ((cfg.cpu_count.max(1) & 0xff) << 16) | (8 << 8);
            let mut edx = FEATURES_EDX1;
            if cfg.cpu_count > 1 {
                edx |= 1 << 28; // HTT: logical processor count in EBX is valid
            }
            [0x0002_06a7, ebx, FEATURES_ECX1, edx]
        }
        7 if sub == 0 => [0, FEATURES_EBX7, 0, FEATURES_EDX7],
        0xb => {
            // x2APIC topology: one thread per core, cores = cpu_count.
            let n = cfg.cpu_count.max(1);
            match sub {
                0 => [0, 1, 0x100, cfg.apic_id],
                1 => [32 - (n - 1).leading_zeros().min(32), n, 0x201, cfg.apic_id],
                _ => [0, 0, sub & 0xff, cfg.apic_id],
            }
        }
        0x15 => {
            // TSC = crystal * ebx / eax: lets Linux skip TSC calibration.
            let crystal = 25_000_000u64;
            let num = (cfg.tsc_hz / crystal) as u32;
            if num == 0 || !cfg.tsc_hz.is_multiple_of(crystal) {
                [1, (cfg.tsc_hz / 1000) as u32, 1000, 0]
            } else {
                [1, num, crystal as u32, 0]
            }
        }
        0x16 => {
            let mhz = (cfg.tsc_hz / 1_000_000) as u32;
            [mhz, mhz, 100, 0]
        }
        0x4000_0000 => {
            let v = str_regs(b"MatryoshkaVM");
            [0x4000_0000, v[0], v[1], v[2]]
        }
        0x8000_0000 => [0x8000_0008, 0, 0, 0],
        0x8000_0001 => [0, 0, FEATURES_ECX81, FEATURES_EDX81],
        0x8000_0002..=0x8000_0004 => {
            let base = ((leaf - 0x8000_0002) * 16) as usize;
            let mut r = [0u32; 4];
            for (k, reg) in r.iter_mut().enumerate() {
                let o = base + k * 4;
                *reg = u32::from_le_bytes([BRAND[o], BRAND[o + 1], BRAND[o + 2], BRAND[o + 3]]);
            }
            r
        }
        0x8000_0006 => [0, 0, (1024 << 16) | (8 << 12) | 64, 0],
        0x8000_0007 => [0, 0, 0, 1 << 8], // invariant TSC
        0x8000_0008 => [crate::mmu::PHYS_ADDR_BITS | (48 << 8), 0, 0, 0],
        _ => [0, 0, 0, 0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{asm64, cpu64};
    use iced_x86::code_asm::*;

    /// The guest finds IA32_ARCH_CAPABILITIES through CPUID.7 and reads the
    /// "not affected" bits, and only those: no bit that announces an MSR or
    /// control we do not implement (IBRS_ALL, TSX_CTRL, FB_CLEAR_CTRL, ...).
    #[test]
    fn arch_capabilities_is_advertised_and_readable() {
        let code = asm64(0x10000, |a| {
            a.mov(eax, 7u32).unwrap();
            a.xor(ecx, ecx).unwrap();
            a.cpuid().unwrap();
            a.mov(r8, rdx).unwrap();
            a.mov(ecx, 0x10au32).unwrap();
            a.rdmsr().unwrap();
        });
        let mut cpu = cpu64(16 << 20, &code, 0x10000);
        for _ in 0..6 {
            assert!(cpu.step().is_none(), "faulted at {:#x}", cpu.s.rip);
        }
        assert_ne!(
            cpu.s.gpr[8] & (1 << 29),
            0,
            "CPUID.7.0:EDX.ARCH_CAPABILITIES"
        );
        let v = (cpu.s.gpr[2] << 32) | (cpu.s.gpr[0] & 0xffff_ffff);
        assert_eq!(v, ARCH_CAPABILITIES);
        assert_ne!(v & arch_cap::RDCL_NO, 0);
        assert_ne!(v & arch_cap::MDS_NO, 0);
        let control_bits = (1 << 1) | (1 << 2) | (1 << 7) | (1 << 9) | (1 << 17) | (1 << 18);
        assert_eq!(v & control_bits, 0);
    }
}
