//! The vCPU: state, memory access paths, the block cache and the run loop.

use crate::fasthash::FastMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction};

use crate::bus::Bus;
use crate::exception::{Fault, XResult};
use crate::exec::{self, Handler};
use crate::mem::GuestRam;
use crate::mmu::{Access, AccessKind, Tlb, TLB_SIZE};
use crate::state::{flags, CpuState, CS, SS};

/// Why [`Cpu::run`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// HLT with interrupts that cannot currently wake it; the VMM should wait
    /// for an interrupt (or the next timer deadline) and call `run` again.
    Halted,
    /// The instruction budget ran out.
    Budget,
    /// Another thread asked this vCPU to stop (`kick`).
    Kicked,
    /// Triple fault or unrecoverable state: the VM must be stopped or reset.
    Shutdown(String),
}

/// Static configuration of a vCPU.
#[derive(Clone, Debug)]
pub struct CpuConfig {
    pub apic_id: u32,
    pub cpu_count: u32,
    /// Advertised (constant, invariant) TSC frequency.
    pub tsc_hz: u64,
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig {
            apic_id: 0,
            cpu_count: 1,
            tsc_hz: 2_000_000_000,
        }
    }
}

/// Counters for tuning and the `--stats` output.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub instructions: u64,
    /// Instructions run as translated code (with the helpers it called);
    /// the rest were interpreted. Added up once per run of translated code.
    pub translated: u64,
    pub blocks_decoded: u64,
    pub block_invalidations: u64,
    pub exceptions: u64,
    pub interrupts: u64,
    pub unimplemented: u64,
}

/// A decoded instruction and the handler chosen for it at decode time.
#[derive(Clone, Copy)]
pub struct DInsn {
    pub insn: Instruction,
    pub handler: Handler,
}

/// A run of decoded instructions that ends at a control transfer, a
/// system instruction, or the end of a guest page.
pub struct Block {
    pub lin_pc: u64,
    pub phys_pc: u64,
    pub bitness: u32,
    /// (page number, generation) of each guest page the block's bytes came from.
    pub pages: [(u64, u32); 2],
    pub insns: Box<[DInsn]>,
    /// Translated code entry (0: none yet, 1: not translatable).
    pub(crate) jit_entry: std::cell::Cell<u64>,
    /// Interpreted executions so far (tiering), also while queued for the
    /// translator, which reads it to translate the hottest queued block
    /// first (atomic for that reader; relaxed loads and stores only).
    pub(crate) heat: std::sync::atomic::AtomicU32,
    /// Which taken conditional branch its interpreted runs mostly leave
    /// by (see [`ExitProfile`]); the vCPU thread's alone.
    pub(crate) exits: ExitProfile,
}

/// The conditional branch (by index in the block) that a block's
/// interpreted runs mostly leave by, taken, and a majority vote's margin
/// (Boyer-Moore) over its runs: each run that leaves by it adds one, each
/// that ends otherwise (another branch, the block's end, a fault) takes
/// one away. A margin of at least half the runs means that branch was
/// taken in at least three quarters of them; the translator may then
/// follow it (see `Cpu::jit_trace`).
#[derive(Debug, Default)]
pub(crate) struct ExitProfile {
    k: std::cell::Cell<u8>,
    margin: std::cell::Cell<u32>,
}

impl ExitProfile {
    /// A run ended, taking conditional branch `k` (None: otherwise).
    #[inline]
    fn vote(&self, k: Option<usize>) {
        // (u8::MAX: the run's other ends, all one candidate.)
        let k = k.map_or(u8::MAX, |k| k.min(u8::MAX as usize - 1) as u8);
        let m = self.margin.get();
        if m == 0 {
            self.k.set(k);
            self.margin.set(1);
        } else if self.k.get() == k {
            self.margin.set(m.saturating_add(1));
        } else {
            self.margin.set(m - 1);
        }
    }

    /// Start from `old`'s vote, for a block that keeps `runs` of its runs.
    fn inherit(&self, old: &ExitProfile, runs: u32) {
        self.k.set(old.k.get());
        self.margin.set(old.margin.get().min(runs));
    }

    /// The branch taken in at least three quarters of `runs` runs.
    pub(crate) fn hot(&self, runs: u32) -> Option<usize> {
        let (k, m) = (self.k.get(), self.margin.get() as u64);
        (k != u8::MAX && m > 0 && m * 2 >= runs as u64).then_some(k as usize)
    }
}

impl Block {
    /// If no translation runs it, ask for the cache lines of its decoded
    /// instructions at once: the interpreter mostly runs cold blocks (hot
    /// ones are translated), and their lines would otherwise miss one
    /// after another.
    #[inline]
    fn prefetch_if_interpreted(&self) {
        #[cfg(target_arch = "x86_64")]
        if self.jit_entry.get() == 0 {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let p = self.insns.as_ptr().cast::<i8>();
            // At most 16 lines.
            let end = std::mem::size_of_val(&*self.insns).min(16 * 64);
            for off in (0..end).step_by(64) {
                // SAFETY: a prefetch is a hint that never faults, and the
                // address stays inside the slice.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
            }
        }
    }

    /// One more interpreted execution; the new heat (saturating). Only the
    /// vCPU thread writes it: a load and a store, no atomic add.
    pub(crate) fn heat_up(&self) -> u32 {
        let h = self.heat.load(Ordering::Relaxed).saturating_add(1);
        self.heat.store(h, Ordering::Relaxed);
        h
    }
}

const FAST_CACHE: usize = 4096;
pub(crate) const MAX_BLOCK_INSNS: usize = 64;
/// A block goes on past a side exit while it names at most this many
/// general registers: the translator needs a few it does not name as
/// scratch, or its memory accesses spill (10 of 16 kept the spilling
/// lookups of `int` and `fp` at their count with blocks that end at
/// every branch; 11 multiplied them by 2.5 to 9).
pub(crate) const SIDE_EXIT_REGS: u32 = 10;

pub struct Cpu {
    pub s: CpuState,
    pub ram: Arc<GuestRam>,
    pub bus: Box<dyn Bus>,
    pub config: CpuConfig,
    pub stats: Stats,
    /// Set from any thread to make `run` return `Exit::Kicked` soon.
    pub kick: Arc<AtomicBool>,
    pub(crate) tlb: Box<Tlb>,
    pub(crate) blocks: FastMap<(u64, u64, u32), Rc<Block>>,
    fast: Vec<Option<Rc<Block>>>,
    /// Scratch for `decode_block`: the code bytes read so far and the
    /// instructions decoded (kept to spare an allocation per block).
    code_bytes: Vec<u8>,
    code_insns: Vec<DInsn>,
    /// RIP of the instruction after the current one; branches overwrite it.
    pub(crate) next_rip: u64,
    /// A handler changed state that the rest of the block was decoded under.
    pub(crate) end_block: bool,
    pub(crate) shutdown: Option<String>,
    /// Unimplemented mnemonics seen (reported once each).
    pub(crate) unimpl_seen: std::collections::HashSet<String>,
    /// The binary translator, when the `jit` engine is selected.
    pub(crate) jit: Option<Box<crate::jit::Jit>>,
    /// Scratch block for translated code (addressed from host r15).
    pub(crate) jctx: crate::jit::JitCtx,
    /// The current instruction touched MMIO (translated code must leave).
    pub(crate) io_touched: bool,
    /// Test harnesses: faults stop `run` (Exit::Shutdown) and are kept in
    /// `captured_fault` instead of being delivered to the guest.
    pub capture_faults: bool,
    pub captured_fault: Option<Fault>,
}

impl Cpu {
    pub fn new(ram: Arc<GuestRam>, bus: Box<dyn Bus>, config: CpuConfig) -> Self {
        Cpu {
            s: CpuState::reset(),
            ram,
            bus,
            config,
            stats: Stats::default(),
            kick: Arc::new(AtomicBool::new(false)),
            tlb: Box::default(),
            blocks: FastMap::default(),
            fast: vec![None; FAST_CACHE],
            code_bytes: Vec::new(),
            code_insns: Vec::new(),
            next_rip: 0,
            end_block: false,
            shutdown: None,
            unimpl_seen: Default::default(),
            jit: None,
            jctx: Default::default(),
            io_touched: false,
            capture_faults: false,
            captured_fault: None,
        }
    }

    /// Replace the architectural state (boot setup, snapshot restore).
    pub fn set_state(&mut self, s: CpuState) {
        self.s = s;
        self.flush_tlb_all();
    }

    #[inline]
    pub fn user_mode(&self) -> bool {
        self.s.cpl() == 3
    }

    pub fn flush_tlb_all(&mut self) {
        self.tlb.flush_all();
    }

    pub fn flush_tlb_nonglobal(&mut self) {
        self.tlb.flush_nonglobal();
    }

    pub fn flush_tlb_page(&mut self, lin: u64) {
        self.tlb.flush_page(lin);
    }

    /// Drop all decoded code (e.g. after restoring memory).
    pub fn flush_code(&mut self) {
        if let Some(j) = self.jit.as_mut() {
            j.flush();
        }
        self.blocks.clear();
        self.fast.iter_mut().for_each(|e| *e = None);
    }

    // ---------------------------------------------------------------
    // Linear memory access.
    // ---------------------------------------------------------------

    #[inline(always)]
    pub(crate) fn tlb_host(&self, lin: u64, len: usize, kind: AccessKind) -> Option<*mut u8> {
        let vpn = lin >> 12;
        if (lin & 0xfff) as usize + len > 4096 {
            return None;
        }
        let e = &self.tlb.e[self.user_mode() as usize][(vpn as usize) & (TLB_SIZE - 1)];
        let tag = match kind {
            AccessKind::Read => e.read_tag,
            AccessKind::Write => e.write_tag,
            AccessKind::Exec => e.exec_tag,
        };
        if tag == vpn {
            if kind == AccessKind::Write && self.ram.is_code_page(e.ppn) {
                return None;
            }
            Some(e.addend.wrapping_add(lin) as *mut u8)
        } else {
            None
        }
    }

    /// Read `buf.len()` bytes at a linear address (any alignment, may cross pages).
    pub fn read_bytes(&mut self, lin: u64, buf: &mut [u8]) -> XResult<()> {
        self.read_bytes_as(lin, buf, self.access(AccessKind::Read))
    }

    /// Translate both pages an access of `len` bytes may touch, before any
    /// byte is moved: (first physical address, bytes in the first page,
    /// physical address of the second page if the access crosses).
    fn translate_span(
        &mut self,
        lin: u64,
        len: usize,
        acc: Access,
    ) -> XResult<(u64, usize, Option<u64>)> {
        let lin = self.mask_lin(lin);
        let first = (4096 - (lin & 0xfff) as usize).min(len);
        let p0 = self.translate_fill(lin, acc)?;
        let p1 = if first < len {
            Some(self.translate_fill(self.mask_lin(lin.wrapping_add(first as u64)), acc)?)
        } else {
            None
        };
        Ok((p0, first, p1))
    }

    pub fn read_bytes_as(&mut self, lin: u64, buf: &mut [u8], acc: Access) -> XResult<()> {
        let (p0, first, p1) = self.translate_span(lin, buf.len(), acc)?;
        self.phys_read(p0, &mut buf[..first]);
        if let Some(p1) = p1 {
            self.phys_read(p1, &mut buf[first..]);
        }
        Ok(())
    }

    pub fn write_bytes(&mut self, lin: u64, buf: &[u8]) -> XResult<()> {
        self.write_bytes_as(lin, buf, self.access(AccessKind::Write))
    }

    pub fn write_bytes_as(&mut self, lin: u64, buf: &[u8], acc: Access) -> XResult<()> {
        let (p0, first, p1) = self.translate_span(lin, buf.len(), acc)?;
        self.phys_write(p0, &buf[..first]);
        if let Some(p1) = p1 {
            self.phys_write(p1, &buf[first..]);
        }
        Ok(())
    }

    /// Physical read: RAM or MMIO.
    pub fn phys_read(&mut self, gpa: u64, buf: &mut [u8]) {
        if !self.ram.read(gpa, buf) {
            self.io_touched = true;
            self.bus.mmio_read(gpa, buf);
        }
    }

    /// Physical write: RAM (invalidating decoded code) or MMIO.
    pub fn phys_write(&mut self, gpa: u64, buf: &[u8]) {
        if self.ram.is_code_page(gpa >> 12)
            || self.ram.is_code_page((gpa + buf.len() as u64 - 1) >> 12)
        {
            // Self-modifying code: the current block may be stale now.
            self.end_block = true;
            self.stats.block_invalidations += 1;
        }
        if !self.ram.write(gpa, buf) {
            self.io_touched = true;
            self.bus.mmio_write(gpa, buf);
        }
    }

    /// Outside long mode linear addresses are 32 bits.
    #[inline(always)]
    pub fn mask_lin(&self, lin: u64) -> u64 {
        if self.s.long_mode() {
            lin
        } else {
            lin & 0xffff_ffff
        }
    }
}

macro_rules! mem_access {
    ($read:ident, $write:ident, $t:ty) => {
        impl Cpu {
            #[inline(always)]
            pub fn $read(&mut self, lin: u64) -> XResult<$t> {
                const N: usize = std::mem::size_of::<$t>();
                if let Some(p) = self.tlb_host(lin, N, AccessKind::Read) {
                    // SAFETY: the TLB entry maps this page to live guest RAM
                    // and the access does not cross the page.
                    return Ok(unsafe { (p as *const $t).read_unaligned() });
                }
                let mut b = [0u8; N];
                self.read_bytes(lin, &mut b)?;
                Ok(<$t>::from_le_bytes(b))
            }
            #[inline(always)]
            pub fn $write(&mut self, lin: u64, v: $t) -> XResult<()> {
                const N: usize = std::mem::size_of::<$t>();
                if let Some(p) = self.tlb_host(lin, N, AccessKind::Write) {
                    // SAFETY: as above; the write tag is only set for RAM
                    // pages that are writable and already dirty.
                    unsafe { (p as *mut $t).write_unaligned(v) };
                    return Ok(());
                }
                self.write_bytes(lin, &v.to_le_bytes())
            }
        }
    };
}
mem_access!(read_u8, write_u8, u8);
mem_access!(read_u16, write_u16, u16);
mem_access!(read_u32, write_u32, u32);
mem_access!(read_u64, write_u64, u64);
mem_access!(read_u128, write_u128, u128);

impl Cpu {
    /// Read `size` (1, 2, 4, 8) bytes zero-extended.
    #[inline(always)]
    pub fn read_sized(&mut self, lin: u64, size: usize) -> XResult<u64> {
        Ok(match size {
            1 => self.read_u8(lin)? as u64,
            2 => self.read_u16(lin)? as u64,
            4 => self.read_u32(lin)? as u64,
            _ => self.read_u64(lin)?,
        })
    }

    #[inline(always)]
    pub fn write_sized(&mut self, lin: u64, size: usize, v: u64) -> XResult<()> {
        match size {
            1 => self.write_u8(lin, v as u8),
            2 => self.write_u16(lin, v as u16),
            4 => self.write_u32(lin, v as u32),
            _ => self.write_u64(lin, v),
        }
    }

    /// Host pointer for an atomic read-modify-write of `size` bytes at `lin`,
    /// when the location is aligned RAM within one page.
    pub fn atomic_host_ptr(&mut self, lin: u64, size: usize) -> XResult<Option<*mut u8>> {
        let lin = self.mask_lin(lin);
        if (lin & 0xfff) as usize + size > 4096 {
            return Ok(None);
        }
        let acc = self.access(AccessKind::Write);
        let phys = self.translate_fill(lin, acc)?;
        if self.ram.is_code_page(phys >> 12) {
            self.ram.note_write(phys, size as u64);
            self.end_block = true;
        }
        if !(lin as usize).is_multiple_of(size) {
            return Ok(None);
        }
        Ok(self.ram.host_ptr(phys, size as u64))
    }

    // ---------------------------------------------------------------
    // Stack.
    // ---------------------------------------------------------------

    /// Stack address size in bytes (8 in 64-bit mode, else SS.B).
    #[inline]
    pub fn stack_addr_size(&self) -> usize {
        if self.s.mode64() {
            8
        } else if self.s.protected() && self.s.seg[SS].default_big() && !self.s.v86() {
            4
        } else {
            2
        }
    }

    #[inline]
    fn sp_mask(&self) -> u64 {
        match self.stack_addr_size() {
            8 => u64::MAX,
            4 => 0xffff_ffff,
            _ => 0xffff,
        }
    }

    /// Push `size` bytes.
    pub fn push(&mut self, size: usize, v: u64) -> XResult<()> {
        let mask = self.sp_mask();
        let sp = self.s.gpr[4];
        let new_sp = (sp.wrapping_sub(size as u64)) & mask;
        let lin = self.seg_base(SS).wrapping_add(new_sp);
        self.write_sized(lin, size, v)?;
        self.s.gpr[4] = (sp & !mask) | new_sp;
        Ok(())
    }

    /// Pop `size` bytes.
    pub fn pop(&mut self, size: usize) -> XResult<u64> {
        let v = self.peek(size, 0)?;
        let mask = self.sp_mask();
        let sp = self.s.gpr[4];
        self.s.gpr[4] = (sp & !mask) | (sp.wrapping_add(size as u64) & mask);
        Ok(v)
    }

    /// Read the stack at RSP + offset without popping.
    pub fn peek(&mut self, size: usize, offset: u64) -> XResult<u64> {
        let mask = self.sp_mask();
        let sp = self.s.gpr[4].wrapping_add(offset) & mask;
        let lin = self.seg_base(SS).wrapping_add(sp);
        self.read_sized(lin, size)
    }

    /// Segment base used for address generation (FS/GS only in 64-bit mode).
    #[inline(always)]
    pub fn seg_base(&self, seg: usize) -> u64 {
        if self.s.mode64() && seg < 4 {
            0
        } else {
            self.s.seg[seg].base
        }
    }

    // ---------------------------------------------------------------
    // Decoding and the block cache.
    // ---------------------------------------------------------------

    pub(crate) fn fetch_block(&mut self) -> XResult<Rc<Block>> {
        let bitness = self.s.bitness();
        let lin_pc = self.mask_lin(self.seg_base(CS).wrapping_add(self.s.rip));
        let acc = self.access(AccessKind::Exec);
        let vpn = lin_pc >> 12;
        let e = &self.tlb.e[acc.user as usize][(vpn as usize) & (TLB_SIZE - 1)];
        let phys_pc = if e.exec_tag == vpn {
            (e.ppn << 12) | (lin_pc & 0xfff)
        } else {
            self.translate_fill(lin_pc, acc)?
        };
        let slot = ((lin_pc ^ (lin_pc >> 12)) as usize) & (FAST_CACHE - 1);
        if let Some(b) = &self.fast[slot] {
            if b.lin_pc == lin_pc && b.phys_pc == phys_pc && b.bitness == bitness {
                // Its lines load while the checks run.
                b.prefetch_if_interpreted();
                if self.block_valid(b) {
                    return Ok(b.clone());
                }
            }
        }
        let key = (phys_pc, lin_pc, bitness);
        let mut stale = None;
        if let Some(b) = self.blocks.get(&key) {
            b.prefetch_if_interpreted();
            if self.block_valid(b) {
                let b = b.clone();
                self.fast[slot] = Some(b.clone());
                return Ok(b);
            }
            stale = self.blocks.remove(&key);
        }
        let b = Rc::new(self.decode_block(lin_pc, phys_pc, bitness)?);
        if let Some(old) = stale {
            // A write elsewhere in its page (Linux patches kernel text
            // while it boots: alternatives, static keys) made the block
            // stale (a fifth of a boot's decoded blocks). When it decodes
            // to the same instructions it is the same code: it keeps the
            // heat it had, up to half the threshold, so a block that was
            // translated is translated again after half the interpreted
            // runs. (All of the threshold translated many intermediate
            // versions of pages patched in bursts.)
            if old.insns.len() == b.insns.len()
                && old
                    .insns
                    .iter()
                    .zip(b.insns.iter())
                    .all(|(x, y)| x.insn.eq_all_bits(&y.insn))
            {
                let hot = if old.jit_entry.get() > 1 { u32::MAX } else { 0 };
                let h = old.heat.load(Ordering::Relaxed).max(hot);
                let h = h.min(self.warm_heat());
                b.heat.store(h, Ordering::Relaxed);
                // And the branch its runs mostly left by (see
                // `Cpu::jit_trace`), for the runs it keeps.
                b.exits.inherit(&old.exits, h);
            }
        }
        if b.pages[0].1 != u32::MAX {
            if self.blocks.len() > 200_000 {
                self.blocks.clear();
            }
            self.blocks.insert(key, b.clone());
            self.fast[slot] = Some(b.clone());
        }
        Ok(b)
    }

    #[inline]
    fn block_valid(&self, b: &Block) -> bool {
        b.pages
            .iter()
            .all(|&(ppn, gen)| ppn == u64::MAX || self.ram.page_gen(ppn) == gen)
    }

    fn decode_block(&mut self, lin_pc: u64, phys_pc: u64, bitness: u32) -> XResult<Block> {
        let mut bytes = std::mem::take(&mut self.code_bytes);
        let mut insns = std::mem::take(&mut self.code_insns);
        let r = self.decode_into(lin_pc, phys_pc, bitness, &mut bytes, &mut insns);
        self.code_bytes = bytes;
        let r = r.map(|pages| Block {
            lin_pc,
            phys_pc,
            bitness,
            pages,
            insns: Box::from(&insns[..]),
            jit_entry: Default::default(),
            heat: Default::default(),
            exits: Default::default(),
        });
        insns.clear();
        self.code_insns = insns;
        r
    }

    /// Decode the block at `phys_pc` into `insns`; the pages it came from.
    /// Code bytes are read into `bytes` as decoding needs them (a block is
    /// tens of bytes; reading the rest of its page each time was a
    /// kilobyte-sized copy per block).
    fn decode_into(
        &mut self,
        lin_pc: u64,
        phys_pc: u64,
        bitness: u32,
        bytes: &mut Vec<u8>,
        insns: &mut Vec<DInsn>,
    ) -> XResult<[(u64, u32); 2]> {
        /// Bytes read at a time.
        const CHUNK: usize = 128;
        self.stats.blocks_decoded += 1;
        let ppn = phys_pc >> 12;
        // Mark before reading so a concurrent write is never missed.
        if !self.ram.is_code_page(ppn) {
            self.tlb.drop_write(ppn);
        }
        let gen0 = self.ram.mark_code(ppn);
        let page_left = 4096 - (phys_pc & 0xfff) as usize;
        bytes.resize(4096 + 15, 0);
        // bytes[..have] hold the code from phys_pc on.
        let mut have = 0usize;
        let mut pages = [(ppn, gen0), (u64::MAX, 0)];
        let ip_mask = match bitness {
            16 => 0xffff,
            32 => 0xffff_ffff,
            _ => u64::MAX,
        };
        let ip0 = self.s.rip;
        let mut offset = 0usize;
        let mut named = 0u16;
        let mut last_side_exit: Option<(usize, u16)> = None;
        loop {
            // Up to 15 bytes from offset on (within the page), ahead.
            let need = page_left.min(offset + 15);
            if have < need {
                let upto = page_left.min(need.max(have + CHUNK));
                self.phys_read(phys_pc + have as u64, &mut bytes[have..upto]);
                have = upto;
            }
            let at_page_tail = offset + 15 > page_left;
            if at_page_tail && pages[1].0 == u64::MAX && offset < page_left {
                // An instruction may straddle into the next page: fetch it
                // only if this instruction really needs it.
                let mut probe = Decoder::with_ip(
                    bitness,
                    &bytes[offset..page_left],
                    ip0.wrapping_add(offset as u64) & ip_mask,
                    DecoderOptions::NO_INVALID_CHECK,
                );
                let i = probe.decode();
                if i.is_invalid() && probe.last_error() == iced_x86::DecoderError::NoMoreBytes {
                    if !insns.is_empty() {
                        break; // end the block here; the next block handles it
                    }
                    let next_lin = self.mask_lin((lin_pc & !0xfff).wrapping_add(4096));
                    let acc = self.access(AccessKind::Exec);
                    let p2 = self.translate_fill(next_lin, acc)?;
                    if !self.ram.is_code_page(p2 >> 12) {
                        self.tlb.drop_write(p2 >> 12);
                    }
                    let g2 = self.ram.mark_code(p2 >> 12);
                    pages[1] = (p2 >> 12, g2);
                    self.phys_read(p2, &mut bytes[page_left..page_left + 15]);
                    let mut d = Decoder::with_ip(
                        bitness,
                        &bytes[offset..page_left + 15],
                        ip0.wrapping_add(offset as u64) & ip_mask,
                        DecoderOptions::NONE,
                    );
                    let mut insn = d.decode();
                    insn.set_next_ip(insn.next_ip() & ip_mask);
                    insns.push(DInsn {
                        handler: exec::handler_for(&insn),
                        insn,
                    });
                    break;
                }
            }
            if offset >= page_left {
                break;
            }
            let end = page_left.min(offset + 15);
            let mut d = Decoder::with_ip(
                bitness,
                &bytes[offset..end],
                ip0.wrapping_add(offset as u64) & ip_mask,
                DecoderOptions::NONE,
            );
            let mut insn = d.decode();
            if insn.is_invalid() && d.last_error() == iced_x86::DecoderError::NoMoreBytes {
                break;
            }
            insn.set_next_ip(insn.next_ip() & ip_mask);
            offset += insn.len().max(1);
            named |= exec::named_gprs(&insn);
            if let Some((j, before)) = last_side_exit {
                // Past a side exit, stop at it rather than let the block
                // name many registers, or rcx (the translator's lookups
                // and checks then need rcx kept aside).
                if named.count_ones() > SIDE_EXIT_REGS || named & !before & 2 != 0 {
                    insns.truncate(j + 1);
                    break;
                }
            }
            // 64-bit blocks go on past a conditional branch (a side exit
            // when taken): longer blocks, fewer dispatches, counts and
            // chains. One back to the block's start closes a loop, so is
            // usually taken: it ends the block.
            let target = insn.near_branch_target();
            let side_exit = bitness == 64 && exec::side_exit(&insn) && target != ip0;
            // They also follow a direct JMP forward within the page: it
            // costs nothing in translated code.
            let follow = bitness == 64
                && matches!(insn.code(), Code::Jmp_rel8_64 | Code::Jmp_rel32_64)
                && target > insn.ip()
                && target.wrapping_sub(ip0) < page_left as u64;
            // A side exit back into the block closes a loop inside it. One
            // that counts runs many passes, best in a block of its own
            // (which loops on itself: checks hoisted, registers kept from
            // pass to pass); this one ends before the loop's head, so that
            // its first pass is not a copy that runs slower than the rest.
            // (A loop that stops on the data it reads, such as a sort's
            // scan, often runs one pass or two: it stays.)
            if side_exit && target < insn.ip() && target > ip0 {
                let head = insns.iter().position(|d| d.insn.ip() == target);
                if let Some(j) = head.filter(|&j| counted_loop(&insns[j..])) {
                    insns.truncate(j);
                    break;
                }
            }
            let stop = insn.is_invalid()
                || insn.flow_control() != FlowControl::Next && !side_exit && !follow
                || exec::ends_block(&insn)
                || insns.len() + 1 >= MAX_BLOCK_INSNS;
            insns.push(DInsn {
                handler: exec::handler_for(&insn),
                insn,
            });
            if stop {
                break;
            }
            if follow {
                offset = target.wrapping_sub(ip0) as usize;
            }
            if side_exit || follow {
                last_side_exit = Some((insns.len() - 1, named));
            }
        }
        if insns.is_empty() {
            // Cannot happen for a valid page, but never spin on an empty block.
            return Err(Fault::ud());
        }
        Ok(pages)
    }

    // ---------------------------------------------------------------
    // The run loop.
    // ---------------------------------------------------------------

    /// Execute up to roughly `budget` instructions.
    pub fn run(&mut self, budget: u64) -> Exit {
        let stop_at = self.stats.instructions.saturating_add(budget);
        let mut chain = None;
        loop {
            let pending_chain = chain.take();
            if let Some(why) = self.shutdown.take() {
                return Exit::Shutdown(why);
            }
            if self.kick.load(Ordering::Relaxed) {
                self.kick.store(false, Ordering::Relaxed);
                return Exit::Kicked;
            }
            if self.stats.instructions >= stop_at {
                return Exit::Budget;
            }
            // STI / MOV SS shadow: no interrupt before the next instruction,
            // which then runs alone.
            let shadow = self.s.irq_shadow;
            self.s.irq_shadow = false;
            if !shadow {
                self.check_interrupts();
                if let Some(why) = self.shutdown.take() {
                    return Exit::Shutdown(why);
                }
            }
            if self.s.halted {
                return Exit::Halted;
            }
            let block = match self.fetch_block() {
                Ok(b) => b,
                Err(f) => {
                    self.raise(f);
                    continue;
                }
            };
            // Translated code runs 64-bit code without single-stepping.
            // Under an interrupt shadow it may run on: interrupts are only
            // taken once it leaves, after at least one instruction (else
            // the shadow stays for the next round).
            if self.jit.is_some() && block.bitness == 64 && self.s.rflags & flags::TF == 0 {
                if let Some(entry) = self.jit_lookup(&block, pending_chain) {
                    let before = self.stats.instructions;
                    chain = self.jit_run(entry, stop_at - self.stats.instructions);
                    self.stats.translated += self.stats.instructions - before;
                    if !crate::mmu::canonical(self.s.rip) {
                        self.jit_wild_branch();
                        chain = None;
                    }
                    if shadow && self.stats.instructions == before {
                        self.s.irq_shadow = true;
                    }
                    continue;
                }
            }
            // The taken conditional branch the run leaves by, if any (a
            // vote in the block's `exits`, which only the translator reads).
            let voting = self.jit.is_some();
            let mut exit = None;
            for (k, di) in block.insns.iter().enumerate() {
                self.next_rip = di.insn.next_ip();
                match (di.handler)(self, &di.insn) {
                    Ok(()) => {
                        self.s.rip = self.next_rip;
                        self.stats.instructions += 1;
                    }
                    Err(f) => {
                        self.raise(f);
                        break;
                    }
                }
                // A taken side exit leaves the block (a followed JMP goes
                // on to the next decoded instruction); the common case, a
                // fall-through, looks no further than this instruction.
                let branched = self.s.rip != di.insn.next_ip()
                    && block
                        .insns
                        .get(k + 1)
                        .is_none_or(|n| n.insn.ip() != self.s.rip);
                if self.end_block || shadow || branched {
                    if voting && branched && exec::side_exit(&di.insn) {
                        exit = Some(k);
                    }
                    self.end_block = false;
                    break;
                }
            }
            if voting {
                block.exits.vote(exit);
            }
        }
    }

    /// Execute exactly one instruction (used by the self-test and debugging).
    /// Exceptions are delivered as usual; returns the fault, if one occurred.
    pub fn step(&mut self) -> Option<Fault> {
        let block = match self.fetch_block() {
            Ok(b) => b,
            Err(f) => return Some(f),
        };
        let di = &block.insns[0];
        self.next_rip = di.insn.next_ip();
        let r = (di.handler)(self, &di.insn);
        self.end_block = false;
        match r {
            Ok(()) => {
                self.s.rip = self.next_rip;
                self.stats.instructions += 1;
                None
            }
            Err(f) => Some(f),
        }
    }

    /// Deliver pending external interrupts / NMIs if the CPU can take them.
    fn check_interrupts(&mut self) {
        if !self.s.nmi_blocked && self.bus.nmi_take() {
            self.s.halted = false;
            self.deliver_interrupt(crate::exception::NMI, None, true);
            return;
        }
        if self.s.rflags & flags::IF != 0 && self.bus.irq_pending() {
            if let Some(v) = self.bus.irq_ack() {
                self.s.halted = false;
                self.stats.interrupts += 1;
                self.deliver_interrupt(v, None, true);
            }
        }
    }
}

/// Does the loop whose body is `body` (from its head up to, not
/// including, its back edge) count: does its back edge follow a compare
/// of a register the body only steps by constants (ADD/SUB/INC/DEC with
/// an immediate, LEA of itself plus a displacement) with a constant or
/// with a register the body leaves alone, or such a step itself?
fn counted_loop(body: &[DInsn]) -> bool {
    use iced_x86::{InstructionInfoFactory, Mnemonic, OpKind, Register};
    let Some((c, before)) = body.split_last() else {
        return false;
    };
    // A step that sets the flags is one of the steps.
    let rest = if matches!(c.insn.mnemonic(), Mnemonic::Cmp) {
        before
    } else {
        body
    };
    let c = &c.insn;
    let reg = |n: u32| (c.op_kind(n) == OpKind::Register).then(|| c.op_register(n).full_register());
    let imm = |n: u32| exec::is_immediate(c.op_kind(n));
    let (a, b) = match c.mnemonic() {
        Mnemonic::Cmp if imm(1) => (reg(0), None),
        // The step itself sets the flags (DEC and JNZ).
        Mnemonic::Add | Mnemonic::Sub if imm(1) => (reg(0), None),
        Mnemonic::Inc | Mnemonic::Dec => (reg(0), None),
        Mnemonic::Cmp => match (reg(0), reg(1)) {
            (Some(x), Some(y)) => (Some(x), Some(y)),
            _ => return false,
        },
        _ => return false,
    };
    let Some(a) = a else {
        return false;
    };
    let mut info = InstructionInfoFactory::new();
    // How each register is written: None (never), Some(true) (only
    // stepped), Some(false) (otherwise).
    let how = |r: Register, info: &mut InstructionInfoFactory| -> Option<bool> {
        let mut w = None;
        for d in rest {
            let i = &d.insn;
            let writes = info
                .info(i)
                .used_registers()
                .iter()
                .any(|u| u.register().full_register() == r && exec::is_write(u.access()));
            if !writes {
                continue;
            }
            let own = i.op_count() >= 1
                && i.op_kind(0) == OpKind::Register
                && i.op0_register().full_register() == r;
            let step = own
                && match i.mnemonic() {
                    Mnemonic::Add | Mnemonic::Sub => exec::is_immediate(i.op1_kind()),
                    Mnemonic::Inc | Mnemonic::Dec => true,
                    Mnemonic::Lea => {
                        i.memory_base().full_register() == r && i.memory_index() == Register::None
                    }
                    _ => false,
                };
            w = Some(w.unwrap_or(true) && step);
        }
        w
    };
    let ha = how(a, &mut info);
    match b {
        None => ha == Some(true),
        Some(b) => {
            let hb = how(b, &mut info);
            ha == Some(true) && hb.is_none() || hb == Some(true) && ha.is_none()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ExitProfile;
    use crate::testutil::{asm64, cpu64};
    use iced_x86::code_asm::*;

    /// The instructions of the block decoded at the start of the code
    /// `f` assembles: two set-up instructions, then whatever `f` adds.
    fn first_block(f: impl FnOnce(&mut CodeAssembler)) -> Vec<iced_x86::Mnemonic> {
        let code = asm64(0x10000, |a| {
            a.mov(esi, 0x20000).unwrap();
            a.lea(rdi, qword_ptr(rsi + 0x800)).unwrap();
            f(a);
        });
        let mut cpu = cpu64(16 << 20, &code, 0x10000);
        let block = cpu.fetch_block().expect("decodes");
        block.insns.iter().map(|d| d.insn.mnemonic()).collect()
    }

    /// A loop `body` (with its back edge) after the set-up, then HLT.
    fn with_loop(body: impl FnOnce(&mut CodeAssembler, &mut CodeLabel)) -> Vec<iced_x86::Mnemonic> {
        first_block(|a| {
            let mut top = a.create_label();
            a.set_label(&mut top).unwrap();
            body(a, &mut top);
            a.hlt().unwrap();
        })
    }

    /// A block ends before the head of a loop that counts (by a compare
    /// of a stepped register with one the loop leaves alone, or with a
    /// constant, or by the step itself), so that the loop gets a block
    /// of its own.
    #[test]
    fn blocks_end_before_the_head_of_a_counted_loop() {
        use iced_x86::Mnemonic::{Lea, Mov};
        let by_register = with_loop(|a, top| {
            a.add(rax, qword_ptr(rsi)).unwrap();
            a.add(rsi, 8).unwrap();
            a.cmp(rsi, rdi).unwrap();
            a.jne(*top).unwrap();
        });
        assert_eq!(by_register, [Mov, Lea]);
        let by_constant = with_loop(|a, top| {
            a.add(rax, qword_ptr(rsi + rcx)).unwrap();
            a.lea(rcx, qword_ptr(rcx + 8)).unwrap();
            a.cmp(rcx, 0x300).unwrap();
            a.jne(*top).unwrap();
        });
        assert_eq!(by_constant, [Mov, Lea]);
        let by_step = with_loop(|a, top| {
            a.add(rax, qword_ptr(rsi)).unwrap();
            a.add(rsi, 8).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(*top).unwrap();
        });
        assert_eq!(by_step, [Mov, Lea]);
    }

    /// Loops that stop on the data they read (a sort's scan), or whose
    /// bound moves, or whose register moves by other than a constant,
    /// stay in the block: they often run a pass or two.
    #[test]
    fn blocks_keep_loops_that_do_not_count() {
        use iced_x86::Mnemonic::{Add, Cmp, Hlt, Jb, Jne, Lea, Mov};
        let scan = with_loop(|a, top| {
            a.mov(edx, dword_ptr(rsi)).unwrap();
            a.add(rsi, 4).unwrap();
            a.cmp(edx, ecx).unwrap();
            a.jb(*top).unwrap();
        });
        assert_eq!(scan, [Mov, Lea, Mov, Add, Cmp, Jb, Hlt]);
        let moving_bound = with_loop(|a, top| {
            a.add(rsi, 8).unwrap();
            a.add(rdi, rax).unwrap();
            a.cmp(rsi, rdi).unwrap();
            a.jne(*top).unwrap();
        });
        assert_eq!(moving_bound, [Mov, Lea, Add, Add, Cmp, Jne, Hlt]);
        let loaded_step = with_loop(|a, top| {
            a.add(rsi, qword_ptr(rsi)).unwrap();
            a.cmp(rsi, 0x300).unwrap();
            a.jne(*top).unwrap();
        });
        assert_eq!(loaded_step, [Mov, Lea, Add, Cmp, Jne, Hlt]);
    }

    /// A block's exit vote names a branch only when it was taken in at
    /// least three quarters of the runs, counting runs that ended any
    /// other way against it; a re-decoded block keeps the vote for the
    /// runs it keeps.
    #[test]
    fn exit_profile_names_a_branch_taken_in_three_quarters_of_the_runs() {
        let runs = |votes: &[Option<usize>]| {
            let p = ExitProfile::default();
            for &v in votes {
                p.vote(v);
            }
            p.hot(votes.len() as u32)
        };
        let mostly = [Some(2), Some(2), Some(2), None].repeat(8);
        assert_eq!(runs(&mostly), Some(2));
        let two_thirds = [Some(2), Some(2), None].repeat(8);
        assert_eq!(runs(&two_thirds), None, "2/3 of the runs is not enough");
        let other_branch = [Some(2), Some(2), Some(5)].repeat(8);
        assert_eq!(runs(&other_branch), None);
        assert_eq!(runs(&[None; 32]), None, "no branch was taken");
        assert_eq!(runs(&[Some(4); 32]), Some(4));
        let old = ExitProfile::default();
        for _ in 0..32 {
            old.vote(Some(1));
        }
        let new = ExitProfile::default();
        new.inherit(&old, 16);
        assert_eq!(new.hot(16), Some(1));
        assert_eq!(
            new.hot(33),
            None,
            "the margin kept is at most the runs kept"
        );
    }
}
