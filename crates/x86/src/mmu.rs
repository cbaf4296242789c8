//! Linear → physical translation: page walks (legacy 32-bit, PAE, 4-level)
//! with accessed/dirty write-back, and a soft TLB that caches host pointers.
//!
//! TLB entries hold, per access kind, the linear page number they allow on
//! the fast path; anything else (misses, MMIO, pages not yet dirty, code
//! pages on write) takes the slow path through [`Cpu::translate`].

use std::sync::atomic::Ordering;

use crate::cpu::Cpu;
use crate::exception::{Fault, XResult};
use crate::state::{cr0, cr4, efer};

pub const TLB_BITS: usize = 10;
pub const TLB_SIZE: usize = 1 << TLB_BITS;
const NO_TAG: u64 = u64::MAX;

/// Physical address bits advertised in CPUID 0x80000008.
pub const PHYS_ADDR_BITS: u32 = 40;
const PHYS_MASK: u64 = ((1u64 << PHYS_ADDR_BITS) - 1) & !0xfff;

#[derive(Clone, Copy)]
pub struct TlbEntry {
    pub read_tag: u64,
    pub write_tag: u64,
    pub exec_tag: u64,
    /// host address = linear address + addend (wrapping).
    pub addend: u64,
    pub ppn: u64,
    pub global: bool,
    /// Extra linear page-number bits covered by the page this entry came
    /// from: 0 for 4 KiB, 9 for 2 MiB, 10 for 4 MiB, 18 for 1 GiB.
    pub large_bits: u8,
}

impl TlbEntry {
    const EMPTY: TlbEntry = TlbEntry {
        read_tag: NO_TAG,
        write_tag: NO_TAG,
        exec_tag: NO_TAG,
        addend: 0,
        ppn: 0,
        global: false,
        large_bits: 0,
    };
}

/// Two direct-mapped arrays: index 0 for supervisor accesses, 1 for user.
pub struct Tlb {
    pub e: [[TlbEntry; TLB_SIZE]; 2],
    /// Some entry may come from a large page (INVLPG must then scan).
    pub has_large: bool,
}

impl Default for Tlb {
    fn default() -> Self {
        Tlb {
            e: [[TlbEntry::EMPTY; TLB_SIZE]; 2],
            has_large: false,
        }
    }
}

impl Tlb {
    pub fn flush_all(&mut self) {
        for m in self.e.iter_mut() {
            m.fill(TlbEntry::EMPTY);
        }
        self.has_large = false;
    }
    pub fn flush_nonglobal(&mut self) {
        for m in self.e.iter_mut() {
            for e in m.iter_mut() {
                if !e.global {
                    *e = TlbEntry::EMPTY;
                }
            }
        }
    }
    /// Remove write permission for entries mapping physical page `ppn`
    /// (it now holds decoded code: writes must take the slow path).
    pub fn drop_write(&mut self, ppn: u64) {
        for m in self.e.iter_mut() {
            for e in m.iter_mut() {
                if e.ppn == ppn {
                    e.write_tag = NO_TAG;
                }
            }
        }
    }

    pub fn flush_page(&mut self, lin: u64) {
        let vpn = lin >> 12;
        let idx = (vpn as usize) & (TLB_SIZE - 1);
        self.e[0][idx] = TlbEntry::EMPTY;
        self.e[1][idx] = TlbEntry::EMPTY;
        // INVLPG drops the whole large page containing `lin`, and the TLB
        // holds it as separate 4 KiB entries.
        if self.has_large {
            for m in self.e.iter_mut() {
                for e in m.iter_mut() {
                    if e.large_bits != 0
                        && e.read_tag != NO_TAG
                        && (e.read_tag ^ vpn) >> e.large_bits == 0
                    {
                        *e = TlbEntry::EMPTY;
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AccessKind {
    Read,
    Write,
    Exec,
}

/// One memory access for translation purposes.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    pub kind: AccessKind,
    /// Checked with user (CPL 3) permissions.
    pub user: bool,
}

/// Page-fault error code bits.
pub mod pf {
    pub const P: u32 = 1;
    pub const W: u32 = 2;
    pub const U: u32 = 4;
    pub const RSVD: u32 = 8;
    pub const I: u32 = 16;
}

const PTE_P: u64 = 1;
const PTE_RW: u64 = 2;
const PTE_US: u64 = 4;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_G: u64 = 1 << 8;
const PTE_NX: u64 = 1 << 63;

/// Result of a successful translation.
#[derive(Clone, Copy, Debug)]
pub struct Translation {
    pub phys: u64,
    pub writable: bool,
    pub user: bool,
    pub exec: bool,
    pub dirty: bool,
    pub global: bool,
    /// See [`TlbEntry::large_bits`].
    pub large_bits: u8,
}

impl Cpu {
    /// Translate a linear address, walking the page tables and updating A/D
    /// bits. Raises #PF (or #GP for non-canonical addresses).
    pub fn translate(&mut self, lin: u64, acc: Access) -> XResult<Translation> {
        let s = &self.s;
        if s.cr0 & cr0::PG == 0 {
            let phys = if s.long_mode() {
                lin
            } else {
                lin & 0xffff_ffff
            };
            return Ok(Translation {
                phys,
                writable: true,
                user: true,
                exec: true,
                dirty: true,
                global: false,
                large_bits: 0,
            });
        }
        let write = acc.kind == AccessKind::Write;
        let exec = acc.kind == AccessKind::Exec;
        let nxe = s.efer & efer::NXE != 0;
        let wp = s.cr0 & cr0::WP != 0;
        let pge = s.cr4 & cr4::PGE != 0;
        let mut err = 0u32;
        if write {
            err |= pf::W;
        }
        if acc.user {
            err |= pf::U;
        }
        if exec && (nxe || s.cr4 & cr4::SMEP != 0) {
            err |= pf::I;
        }

        // Gather the entries of the walk: (entry physical address, value, size bytes).
        let mut chain: [(u64, u64); 4] = [(0, 0); 4];
        let mut depth = 0usize;
        let leaf_phys;
        let mut large = false;
        let mut large_bits = 0u8;
        let mut user_ok = true;
        let mut write_ok = true;
        let mut nx = false;

        if s.long_mode() {
            // Canonical check (48-bit linear addresses).
            let top = (lin as i64) >> 47;
            if top != 0 && top != -1 {
                return Err(Fault::gp0());
            }
            let rsvd_common = !PHYS_MASK & 0x000f_ffff_ffff_f000 | if nxe { 0 } else { PTE_NX };
            let mut table = s.cr3 & PHYS_MASK;
            let mut level = 4;
            loop {
                let shift = 12 + 9 * (level - 1);
                let idx = (lin >> shift) & 0x1ff;
                let ea = table + idx * 8;
                let pte = self.ram.read_u64(ea).unwrap_or(0);
                if pte & PTE_P == 0 {
                    return Err(Fault::pf(err, lin));
                }
                let mut rsvd = pte & rsvd_common;
                if level == 4 {
                    rsvd |= pte & PTE_PS;
                }
                if level == 3 && pte & PTE_PS != 0 {
                    rsvd |= pte & 0x3fff_e000; // bits 29:13 of a 1 GiB entry
                }
                if level == 2 && pte & PTE_PS != 0 {
                    rsvd |= pte & 0x1f_e000; // bits 20:13 of a 2 MiB entry
                }
                if rsvd != 0 {
                    return Err(Fault::pf(err | pf::P | pf::RSVD, lin));
                }
                chain[depth] = (ea, pte);
                depth += 1;
                user_ok &= pte & PTE_US != 0;
                write_ok &= pte & PTE_RW != 0;
                nx |= nxe && pte & PTE_NX != 0;
                if level == 1 {
                    leaf_phys = (pte & PHYS_MASK) | (lin & 0xfff);
                    break;
                }
                if pte & PTE_PS != 0 && (level == 2 || level == 3) {
                    let psize_mask = (1u64 << shift) - 1;
                    leaf_phys = (pte & PHYS_MASK & !psize_mask) | (lin & psize_mask);
                    large = true;
                    large_bits = (shift - 12) as u8;
                    break;
                }
                table = pte & PHYS_MASK;
                level -= 1;
            }
        } else if s.cr4 & cr4::PAE != 0 {
            let lin = lin & 0xffff_ffff;
            let rsvd_common = !PHYS_MASK & 0x000f_ffff_ffff_f000 | if nxe { 0 } else { PTE_NX };
            let pdpte_addr = (s.cr3 & 0xffff_ffe0) + ((lin >> 30) & 3) * 8;
            let pdpte = self.ram.read_u64(pdpte_addr).unwrap_or(0);
            if pdpte & PTE_P == 0 {
                return Err(Fault::pf(err, lin));
            }
            let mut table = pdpte & PHYS_MASK;
            let mut level = 2;
            loop {
                let shift = 12 + 9 * (level - 1);
                let idx = (lin >> shift) & 0x1ff;
                let ea = table + idx * 8;
                let pte = self.ram.read_u64(ea).unwrap_or(0);
                if pte & PTE_P == 0 {
                    return Err(Fault::pf(err, lin));
                }
                let mut rsvd = pte & rsvd_common;
                if level == 2 && pte & PTE_PS != 0 {
                    rsvd |= pte & 0x1f_e000;
                }
                if rsvd != 0 {
                    return Err(Fault::pf(err | pf::P | pf::RSVD, lin));
                }
                chain[depth] = (ea, pte);
                depth += 1;
                user_ok &= pte & PTE_US != 0;
                write_ok &= pte & PTE_RW != 0;
                nx |= nxe && pte & PTE_NX != 0;
                if level == 1 {
                    leaf_phys = (pte & PHYS_MASK) | (lin & 0xfff);
                    break;
                }
                if pte & PTE_PS != 0 {
                    leaf_phys = (pte & PHYS_MASK & !0x1f_ffff) | (lin & 0x1f_ffff);
                    large = true;
                    large_bits = 9;
                    break;
                }
                table = pte & PHYS_MASK;
                level -= 1;
            }
        } else {
            // Legacy two-level 32-bit paging with 4-byte entries.
            let lin = lin & 0xffff_ffff;
            let pde_addr = (s.cr3 & 0xffff_f000) + ((lin >> 22) & 0x3ff) * 4;
            let pde = self.read_phys_u32(pde_addr) as u64;
            if pde & PTE_P == 0 {
                return Err(Fault::pf(err, lin));
            }
            chain[depth] = (pde_addr, pde);
            depth += 1;
            user_ok &= pde & PTE_US != 0;
            write_ok &= pde & PTE_RW != 0;
            if pde & PTE_PS != 0 && s.cr4 & cr4::PSE != 0 {
                // 4 MiB page; bits 20:13 carry physical address bits 39:32.
                let hi = ((pde >> 13) & 0xff) << 32;
                leaf_phys = (pde & 0xffc0_0000) | hi | (lin & 0x3f_ffff);
                large = true;
                large_bits = 10;
            } else {
                let pte_addr = (pde & 0xffff_f000) + ((lin >> 12) & 0x3ff) * 4;
                let pte = self.read_phys_u32(pte_addr) as u64;
                if pte & PTE_P == 0 {
                    return Err(Fault::pf(err, lin));
                }
                chain[depth] = (pte_addr, pte);
                depth += 1;
                user_ok &= pte & PTE_US != 0;
                write_ok &= pte & PTE_RW != 0;
                leaf_phys = (pte & 0xffff_f000) | (lin & 0xfff);
            }
        }

        // Permission checks.
        if acc.user && !user_ok {
            return Err(Fault::pf(err | pf::P, lin));
        }
        if write && !write_ok && (acc.user || wp) {
            return Err(Fault::pf(err | pf::P, lin));
        }
        if exec && nx {
            return Err(Fault::pf(err | pf::P, lin));
        }

        // Accessed bits on every level; dirty on the leaf for writes.
        let legacy = !s.long_mode() && s.cr4 & cr4::PAE == 0;
        let (leaf_ea, leaf_pte) = chain[depth - 1];
        for (i, &(ea, pte)) in chain[..depth].iter().enumerate() {
            let mut set = PTE_A;
            if i == depth - 1 && write {
                set |= PTE_D;
            }
            if pte & set != set {
                self.set_pte_bits(ea, set, legacy);
            }
        }
        let _ = large;
        let dirty = write || leaf_pte & PTE_D != 0;
        let _ = leaf_ea;
        Ok(Translation {
            phys: leaf_phys,
            writable: write_ok || (!wp && !acc.user),
            user: user_ok,
            exec: !nx,
            dirty,
            global: pge && leaf_pte & PTE_G != 0,
            large_bits,
        })
    }

    fn read_phys_u32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        if self.ram.read(gpa, &mut b) {
            u32::from_le_bytes(b)
        } else {
            0
        }
    }

    /// OR bits into a page-table entry atomically (other vCPUs may walk or
    /// modify the same tables).
    fn set_pte_bits(&self, ea: u64, bits: u64, legacy: bool) {
        if legacy {
            if let Some(a) = self.ram.atomic_u32(ea) {
                a.fetch_or(bits as u32, Ordering::SeqCst);
            }
        } else if let Some(a) = self.ram.atomic_u64(ea) {
            a.fetch_or(bits, Ordering::SeqCst);
        }
        self.ram.note_write(ea, 8);
    }

    /// Translate and, when the target is RAM, install a TLB entry.
    /// Returns the physical address.
    pub fn translate_fill(&mut self, lin: u64, acc: Access) -> XResult<u64> {
        let t = self.translate(lin, acc)?;
        let page_phys = t.phys & !0xfff;
        if let Some(host) = self.ram.host_ptr(page_phys, 4096) {
            let vpn = lin >> 12;
            let idx = (vpn as usize) & (TLB_SIZE - 1);
            let e = &mut self.tlb.e[acc.user as usize][idx];
            if e.read_tag != vpn || e.ppn != page_phys >> 12 {
                *e = TlbEntry::EMPTY;
            }
            e.read_tag = vpn;
            // Pages holding decoded code are never written on the fast
            // path, so translated code cannot miss an invalidation.
            e.write_tag = if t.writable && t.dirty && !self.ram.is_code_page(page_phys >> 12) {
                vpn
            } else {
                NO_TAG
            };
            e.exec_tag = if t.exec { vpn } else { NO_TAG };
            e.addend = (host as u64).wrapping_sub(lin & !0xfff);
            e.ppn = page_phys >> 12;
            e.global = t.global;
            e.large_bits = t.large_bits;
            self.tlb.has_large |= t.large_bits != 0;
        }
        Ok(t.phys)
    }

    /// Translate for a fetch/read/write of the current privilege.
    #[inline]
    pub fn access(&self, kind: AccessKind) -> Access {
        Access {
            kind,
            user: self.user_mode(),
        }
    }
}
