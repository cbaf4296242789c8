//! Linear → physical translation: page walks (legacy 32-bit, PAE, 4-level)
//! with accessed/dirty write-back, and a soft TLB that caches host pointers.
//!
//! TLB entries hold, per access kind, the linear page number they allow on
//! the fast path; anything else (misses, MMIO, pages not yet dirty, code
//! pages on write) takes the slow path through [`Cpu::translate`].

use std::sync::atomic::Ordering;

use crate::cpu::Cpu;
use crate::exception::{Fault, XResult};
use crate::fasthash::FastSet;
use crate::state::{cr0, cr4, efer};

/// 4096 direct-mapped entries per privilege: with 1024, kernel code and
/// data pages evicted each other often enough that 400 of every fork+exec's
/// jumps missed the TLB and went through the dispatcher.
pub const TLB_BITS: usize = 12;
pub const TLB_SIZE: usize = 1 << TLB_BITS;
const NO_TAG: u64 = u64::MAX;

/// A 64-bit linear address is canonical: bits 47..63 all equal.
#[inline]
pub fn canonical(v: u64) -> bool {
    let top = (v as i64) >> 47;
    top == 0 || top == -1
}

/// Physical address bits advertised in CPUID 0x80000008.
pub const PHYS_ADDR_BITS: u32 = 40;
const PHYS_MASK: u64 = ((1u64 << PHYS_ADDR_BITS) - 1) & !0xfff;

/// One soft-TLB slot. Translated code reads `jit_read`/`jit_write`, the
/// two's complement of `read_tag`/`write_tag`: adding the page number of
/// an address gives zero exactly on a hit (one flag-free LEA), and the
/// empty tag becomes 1, which no page number cancels. Write both through
/// [`TlbEntry::set_rw`]. 64 bytes and aligned: one cache line per slot,
/// and the slot offset is a plain shift of the index.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct TlbEntry {
    pub read_tag: u64,
    pub write_tag: u64,
    pub jit_read: u64,
    pub jit_write: u64,
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
        jit_read: NO_TAG.wrapping_neg(),
        jit_write: NO_TAG.wrapping_neg(),
        exec_tag: NO_TAG,
        addend: 0,
        ppn: 0,
        global: false,
        large_bits: 0,
    };

    /// Set the read and write tags (page numbers, or NO_TAG) and their
    /// negated copies for translated code.
    #[inline]
    pub fn set_rw(&mut self, read: u64, write: u64) {
        self.read_tag = read;
        self.write_tag = write;
        self.jit_read = read.wrapping_neg();
        self.jit_write = write.wrapping_neg();
    }
}

/// Two direct-mapped arrays: index 0 for supervisor accesses, 1 for user.
///
/// Besides the entries (whose layout translated code reads), the TLB keeps
/// bitmaps of the filled slots and of the slots holding large-page pieces,
/// plus the set of large pages those pieces come from, so that CR3 writes
/// and INVLPG touch only what is filled instead of all 2 × 1024 entries.
pub struct Tlb {
    pub e: [[TlbEntry; TLB_SIZE]; 2],
    /// Bit i of `filled[u]`: `e[u][i]` holds a translation (exact).
    filled: [[u64; TLB_WORDS]; 2],
    /// Bit i of `nonglobal[u]`: `e[u][i]` holds a non-global translation
    /// (exact): a CR3 write clears these without visiting the (many,
    /// long-lived) global kernel entries.
    nonglobal: [[u64; TLB_WORDS]; 2],
    /// Bit i of `large[u]`: `e[u][i]` holds a piece of a large page (exact).
    large: [[u64; TLB_WORDS]; 2],
    /// Large pages that may have pieces in the TLB, as [`large_key`]s: a
    /// superset (evicted pieces leave stale keys), so INVLPG of an address
    /// outside all of them needs no scan.
    large_pages: FastSet<u64>,
    /// The key inserted last (it is in `large_pages`): saves hashing on
    /// consecutive fills from the same large page.
    last_large: u64,
}

const TLB_WORDS: usize = TLB_SIZE / 64;

/// `large_pages` is rebuilt from the entries when it grows past this.
const MAX_LARGE_KEYS: usize = 2 * TLB_SIZE;

/// Identifies the large page of `1 << large_bits` 4 KiB pages containing
/// linear page `vpn` (large_bits is at most 18, it fits the low byte).
#[inline]
fn large_key(vpn: u64, large_bits: u8) -> u64 {
    ((vpn >> large_bits) << 8) | large_bits as u64
}

/// Calls `f` with the index of every set bit of `bits`, clearing the bit
/// when `f` returns true.
#[inline]
fn for_each_set(bits: &mut [u64; TLB_WORDS], mut f: impl FnMut(usize) -> bool) {
    for (w, word) in bits.iter_mut().enumerate() {
        let mut m = *word;
        while m != 0 {
            let b = m.trailing_zeros() as usize;
            m &= m - 1;
            if f(w * 64 + b) {
                *word &= !(1u64 << b);
            }
        }
    }
}

impl Default for Tlb {
    fn default() -> Self {
        Tlb {
            e: [[TlbEntry::EMPTY; TLB_SIZE]; 2],
            filled: [[0; TLB_WORDS]; 2],
            nonglobal: [[0; TLB_WORDS]; 2],
            large: [[0; TLB_WORDS]; 2],
            large_pages: FastSet::default(),
            last_large: NO_TAG,
        }
    }
}

impl Tlb {
    pub fn flush_all(&mut self) {
        for u in 0..2 {
            let (e, large) = (&mut self.e[u], &mut self.large[u]);
            for_each_set(&mut self.filled[u], |i| {
                e[i] = TlbEntry::EMPTY;
                true
            });
            *large = [0; TLB_WORDS];
            self.nonglobal[u] = [0; TLB_WORDS];
        }
        self.forget_large_pages();
    }

    /// CR3 write: drop everything but global entries.
    pub fn flush_nonglobal(&mut self) {
        let mut any_large = false;
        for u in 0..2 {
            let (e, large, filled) = (&mut self.e[u], &mut self.large[u], &mut self.filled[u]);
            for_each_set(&mut self.nonglobal[u], |i| {
                e[i] = TlbEntry::EMPTY;
                large[i / 64] &= !(1u64 << (i % 64));
                filled[i / 64] &= !(1u64 << (i % 64));
                true
            });
            any_large |= large.iter().any(|&w| w != 0);
        }
        if !any_large {
            self.forget_large_pages();
        }
    }

    /// Remove write permission for entries mapping physical page `ppn`
    /// (it now holds decoded code: writes must take the slow path).
    pub fn drop_write(&mut self, ppn: u64) {
        for u in 0..2 {
            let e = &mut self.e[u];
            for_each_set(&mut self.filled[u], |i| {
                if e[i].ppn == ppn {
                    let r = e[i].read_tag;
                    e[i].set_rw(r, NO_TAG);
                }
                false
            });
        }
    }

    /// INVLPG: drop the translations of `lin`'s page, and of every page of
    /// the large page containing `lin` (the TLB holds a large page as
    /// separate 4 KiB pieces).
    pub fn flush_page(&mut self, lin: u64) {
        let vpn = lin >> 12;
        let idx = (vpn as usize) & (TLB_SIZE - 1);
        for u in 0..2 {
            self.clear_slot(u, idx);
        }
        if self.large_pages.is_empty() {
            return;
        }
        // Each large-page size in use (9: 2 MiB, 10: 4 MiB, 18: 1 GiB).
        for lb in [9u8, 10, 18] {
            if !self.large_pages.remove(&large_key(vpn, lb)) {
                continue;
            }
            self.last_large = NO_TAG;
            for u in 0..2 {
                let (e, filled, ng) = (&mut self.e[u], &mut self.filled[u], &mut self.nonglobal[u]);
                for_each_set(&mut self.large[u], |i| {
                    let x = &mut e[i];
                    if x.large_bits == lb && (x.read_tag ^ vpn) >> lb == 0 {
                        *x = TlbEntry::EMPTY;
                        filled[i / 64] &= !(1u64 << (i % 64));
                        ng[i / 64] &= !(1u64 << (i % 64));
                        return true;
                    }
                    false
                });
            }
        }
    }

    fn clear_slot(&mut self, u: usize, idx: usize) {
        let (w, bit) = (idx / 64, 1u64 << (idx % 64));
        if self.filled[u][w] & bit != 0 {
            self.e[u][idx] = TlbEntry::EMPTY;
            self.filled[u][w] &= !bit;
            self.nonglobal[u][w] &= !bit;
            self.large[u][w] &= !bit;
        }
    }

    fn forget_large_pages(&mut self) {
        if !self.large_pages.is_empty() {
            self.large_pages.clear();
        }
        self.last_large = NO_TAG;
    }

    /// Record that `e[u][idx]` was just filled (`large_bits` from its entry).
    #[inline]
    fn note_fill(&mut self, u: usize, idx: usize) {
        let (w, bit) = (idx / 64, 1u64 << (idx % 64));
        self.filled[u][w] |= bit;
        let e = &self.e[u][idx];
        if e.global {
            self.nonglobal[u][w] &= !bit;
        } else {
            self.nonglobal[u][w] |= bit;
        }
        if e.large_bits == 0 {
            self.large[u][w] &= !bit;
            return;
        }
        self.large[u][w] |= bit;
        let key = large_key(e.read_tag, e.large_bits);
        if key != self.last_large {
            if self.large_pages.len() >= MAX_LARGE_KEYS {
                self.rebuild_large_pages();
            }
            self.large_pages.insert(key);
            self.last_large = key;
        }
    }

    /// Replace the (stale-key) set of large pages by the exact one.
    fn rebuild_large_pages(&mut self) {
        self.large_pages.clear();
        self.last_large = NO_TAG;
        for u in 0..2 {
            let (e, pages) = (&self.e[u], &mut self.large_pages);
            for_each_set(&mut self.large[u], |i| {
                pages.insert(large_key(e[i].read_tag, e[i].large_bits));
                false
            });
        }
    }

    /// Number of filled entries (tests, statistics).
    pub fn filled_count(&self) -> usize {
        self.filled
            .iter()
            .flatten()
            .map(|w| w.count_ones() as usize)
            .sum()
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
            if !canonical(lin) {
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
            // Pages holding decoded code are never written on the fast
            // path, so translated code cannot miss an invalidation.
            let write = if t.writable && t.dirty && !self.ram.is_code_page(page_phys >> 12) {
                vpn
            } else {
                NO_TAG
            };
            e.set_rw(vpn, write);
            e.exec_tag = if t.exec { vpn } else { NO_TAG };
            e.addend = (host as u64).wrapping_sub(lin & !0xfff);
            e.ppn = page_phys >> 12;
            e.global = t.global;
            e.large_bits = t.large_bits;
            self.tlb.note_fill(acc.user as usize, idx);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Fill the slot of `vpn` in array `u` the way `translate_fill` does.
    fn fill(t: &mut Tlb, u: usize, vpn: u64, ppn: u64, global: bool, large_bits: u8) {
        let idx = (vpn as usize) & (TLB_SIZE - 1);
        t.e[u][idx] = TlbEntry {
            read_tag: vpn,
            write_tag: vpn,
            jit_read: vpn.wrapping_neg(),
            jit_write: vpn.wrapping_neg(),
            exec_tag: vpn,
            addend: 0x1000,
            ppn,
            global,
            large_bits,
        };
        t.note_fill(u, idx);
    }

    fn holds(t: &Tlb, u: usize, vpn: u64) -> bool {
        t.e[u][(vpn as usize) & (TLB_SIZE - 1)].read_tag == vpn
    }

    fn all_empty(t: &Tlb) -> bool {
        t.e.iter()
            .flatten()
            .all(|e| e.read_tag == NO_TAG && e.write_tag == NO_TAG && e.exec_tag == NO_TAG)
    }

    #[test]
    fn entry_layout_is_what_translated_code_expects() {
        assert_eq!(std::mem::size_of::<TlbEntry>(), 64);
        assert_eq!(std::mem::align_of::<TlbEntry>(), 64);
        // Empty tags: no page number (< 2^52) cancels the negated one.
        let e = TlbEntry::EMPTY;
        for vpn in [0u64, 1, (1 << 52) - 1, 0x7_ffff_ffff] {
            assert_ne!(vpn.wrapping_add(e.jit_read), 0);
            assert_ne!(vpn.wrapping_add(e.jit_write), 0);
            // The 16-byte-aligned form compares (vpn << 4 | low bits).
            assert_ne!((vpn << 4).wrapping_add(e.jit_read << 4), 0);
        }
    }

    #[test]
    fn flush_after_fill_empties_every_filled_slot() {
        let mut t = Tlb::default();
        for k in 0..300u64 {
            fill(&mut t, (k % 2) as usize, 0x4000 + k * 7, k, k % 3 == 0, 0);
        }
        assert_eq!(t.filled_count(), 300);
        t.flush_all();
        assert_eq!(t.filled_count(), 0);
        assert!(all_empty(&t));
    }

    #[test]
    fn global_entries_survive_cr3_writes_only() {
        let mut t = Tlb::default();
        fill(&mut t, 0, 0xf_fff8_0000_0000, 1, true, 0);
        fill(&mut t, 0, 0x401, 2, false, 0);
        fill(&mut t, 1, 0x402, 3, false, 0);
        fill(&mut t, 1, 0x7f00_0000, 4, true, 0);
        t.flush_nonglobal();
        assert!(holds(&t, 0, 0xf_fff8_0000_0000));
        assert!(holds(&t, 1, 0x7f00_0000));
        assert!(!holds(&t, 0, 0x401));
        assert!(!holds(&t, 1, 0x402));
        assert_eq!(t.filled_count(), 2);
        // INVLPG drops global translations too.
        t.flush_page(0xf_fff8_0000_0000 << 12);
        assert!(!holds(&t, 0, 0xf_fff8_0000_0000));
        t.flush_all();
        assert!(all_empty(&t));
    }

    #[test]
    fn invlpg_drops_the_whole_large_page_and_nothing_else() {
        let mut t = Tlb::default();
        let big = 0x4_0000u64; // 2 MiB page at 1 GiB: vpns 0x40000..0x40200
        for k in [0u64, 1, 0x55, 0x1ff] {
            fill(&mut t, (k & 1) as usize, big + k, 0x100 + k, true, 9);
        }
        fill(&mut t, 0, big + 0x200, 7, false, 9); // next 2 MiB page
        fill(&mut t, 0, big - 1, 8, false, 0); // 4 KiB page just below
        let giga = 0xc_0000u64; // 1 GiB page at 3 GiB
        fill(&mut t, 1, giga + 0x3_0000, 9, false, 18);
        // An address in no large page: only its own slot goes.
        t.flush_page(0x1234_5000);
        assert_eq!(t.filled_count(), 7);
        // Another 4 KiB page of the first large page.
        t.flush_page((big + 0x100) << 12 | 0x123);
        for k in [0u64, 1, 0x55, 0x1ff] {
            assert!(!holds(&t, (k & 1) as usize, big + k), "piece {k:#x} kept");
        }
        assert!(holds(&t, 0, big + 0x200));
        assert!(holds(&t, 0, big - 1));
        assert!(holds(&t, 1, giga + 0x3_0000));
        t.flush_page((giga + 5) << 12);
        assert!(!holds(&t, 1, giga + 0x3_0000));
        assert_eq!(t.filled_count(), 2);
    }

    #[test]
    fn large_page_set_stays_bounded_and_exact_enough() {
        let mut t = Tlb::default();
        // Many large pages through one slot: all but the last are evicted.
        for k in 0..(3 * MAX_LARGE_KEYS as u64) {
            fill(&mut t, 0, k << TLB_BITS, k, false, 9);
        }
        assert!(t.large_pages.len() <= MAX_LARGE_KEYS);
        let last = (3 * MAX_LARGE_KEYS as u64 - 1) << TLB_BITS;
        assert!(holds(&t, 0, last));
        t.flush_page((last + 3) << 12);
        assert!(!holds(&t, 0, last));
        assert_eq!(t.filled_count(), 0);
    }

    #[test]
    fn drop_write_clears_only_that_physical_page() {
        let mut t = Tlb::default();
        fill(&mut t, 0, 0x10, 0x99, false, 0);
        fill(&mut t, 1, 0x11, 0x99, false, 0);
        fill(&mut t, 1, 0x12, 0x98, false, 0);
        t.drop_write(0x99);
        assert_eq!(t.e[0][0x10].write_tag, NO_TAG);
        assert_eq!(t.e[1][0x11].write_tag, NO_TAG);
        assert_eq!(t.e[1][0x11].read_tag, 0x11);
        assert_eq!(t.e[1][0x12].write_tag, 0x12);
    }

    /// The bookkeeping against the plain full scans it replaces, over random
    /// fills and flushes.
    #[test]
    fn matches_full_scan_reference() {
        struct Ref(Vec<[TlbEntry; TLB_SIZE]>);
        impl Ref {
            fn flush_nonglobal(&mut self) {
                for e in self.0.iter_mut().flatten() {
                    if !e.global {
                        *e = TlbEntry::EMPTY;
                    }
                }
            }
            fn flush_page(&mut self, vpn: u64) {
                let idx = (vpn as usize) & (TLB_SIZE - 1);
                self.0[0][idx] = TlbEntry::EMPTY;
                self.0[1][idx] = TlbEntry::EMPTY;
                for e in self.0.iter_mut().flatten() {
                    if e.large_bits != 0
                        && e.read_tag != NO_TAG
                        && (e.read_tag ^ vpn) >> e.large_bits == 0
                    {
                        *e = TlbEntry::EMPTY;
                    }
                }
            }
        }
        let mut t = Tlb::default();
        let mut r = Ref(vec![[TlbEntry::EMPTY; TLB_SIZE]; 2]);
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for step in 0..200_000 {
            let x = rnd();
            // Addresses from a few large-page-sized regions so pieces collide.
            let vpn = ((x >> 8) % 6) << 18 | (x >> 20) & 0x3_ffff;
            match x % 100 {
                0 => {
                    t.flush_nonglobal();
                    r.flush_nonglobal();
                }
                1 => {
                    t.flush_all();
                    r.0.iter_mut().for_each(|a| a.fill(TlbEntry::EMPTY));
                }
                2..=11 => {
                    t.flush_page(vpn << 12);
                    r.flush_page(vpn);
                }
                12..=14 => {
                    t.drop_write(x >> 40 & 0xff);
                    for e in r.0.iter_mut().flatten() {
                        if e.ppn == x >> 40 & 0xff {
                            e.write_tag = NO_TAG;
                        }
                    }
                }
                _ => {
                    let u = (x >> 3 & 1) as usize;
                    let lb = [0u8, 0, 9, 10, 18][(x >> 4) as usize % 5];
                    let global = x >> 7 & 1 != 0;
                    fill(&mut t, u, vpn, x >> 40 & 0xff, global, lb);
                    let idx = (vpn as usize) & (TLB_SIZE - 1);
                    r.0[u][idx] = t.e[u][idx];
                }
            }
            if step % 1000 == 0 || x % 100 < 15 {
                for u in 0..2 {
                    for i in 0..TLB_SIZE {
                        let (a, b) = (&t.e[u][i], &r.0[u][i]);
                        assert_eq!(
                            (a.read_tag, a.write_tag, a.exec_tag),
                            (b.read_tag, b.write_tag, b.exec_tag),
                            "step {step}: slot {u}/{i} differs"
                        );
                        assert_eq!(
                            (a.jit_read, a.jit_write),
                            (a.read_tag.wrapping_neg(), a.write_tag.wrapping_neg()),
                            "step {step}: slot {u}/{i}: negated tags out of step"
                        );
                    }
                }
                let live =
                    r.0.iter()
                        .flatten()
                        .filter(|e| e.read_tag != NO_TAG)
                        .count();
                assert_eq!(t.filled_count(), live, "step {step}");
            }
        }
    }
}
