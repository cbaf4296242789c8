//! String instructions (MOVS, CMPS, STOS, LODS, SCAS, INS, OUTS) with
//! REP/REPE/REPNE. Long repeats run in chunks and restart the instruction
//! so interrupts stay responsive, as on hardware.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::{mask, Handler};
use crate::cpu::Cpu;
use crate::exception::XResult;
use crate::hostalu as h;
use crate::state::flags::*;
use crate::state::{DS, ES};

/// Iterations per run of a repeated string instruction before yielding.
const CHUNK: u64 = 16384;

pub fn lookup(i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    Some(match i.mnemonic() {
        Movsb | Movsw | Movsq => movs,
        Movsd if i.op_count() == 2 && is_string_op(i.op0_kind()) => movs,
        Cmpsb | Cmpsw | Cmpsq => cmps,
        Cmpsd if i.op_count() == 2 && is_string_op(i.op0_kind()) => cmps,
        Stosb | Stosw | Stosd | Stosq => stos,
        Lodsb | Lodsw | Lodsd | Lodsq => lods,
        Scasb | Scasw | Scasd | Scasq => scas,
        Insb | Insw | Insd => ins,
        Outsb | Outsw | Outsd => outs,
        _ => return None,
    })
}

fn is_string_op(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI
    )
}

fn elem_size(i: &Instruction) -> usize {
    use Mnemonic::*;
    match i.mnemonic() {
        Movsb | Cmpsb | Stosb | Lodsb | Scasb | Insb | Outsb => 1,
        Movsw | Cmpsw | Stosw | Lodsw | Scasw | Insw | Outsw => 2,
        Movsd | Cmpsd | Stosd | Lodsd | Scasd | Insd | Outsd => 4,
        _ => 8,
    }
}

/// Address size from the implicit string operand kinds.
fn asize(i: &Instruction) -> usize {
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::MemorySegSI | OpKind::MemoryESDI => return 2,
            OpKind::MemorySegESI | OpKind::MemoryESEDI => return 4,
            OpKind::MemorySegRSI | OpKind::MemoryESRDI => return 8,
            _ => {}
        }
    }
    8
}

struct Ctx {
    size: usize,
    asz: usize,
    step: u64,
    rep: bool,
}

fn ctx(cpu: &Cpu, i: &Instruction) -> Ctx {
    let size = elem_size(i);
    let step = if cpu.flag(DF) {
        (size as u64).wrapping_neg()
    } else {
        size as u64
    };
    Ctx {
        size,
        asz: asize(i),
        step,
        rep: i.has_rep_prefix() || i.has_repne_prefix(),
    }
}

impl Cpu {
    #[inline(always)]
    fn str_src(&self, i: &Instruction, c: &Ctx) -> u64 {
        let seg = if i.memory_segment() == iced_x86::Register::None {
            DS
        } else {
            super::seg_index(i.memory_segment())
        };
        self.mask_lin(self.seg_base(seg).wrapping_add(self.reg_sized(6, c.asz)))
    }
    #[inline(always)]
    fn str_dst(&self, c: &Ctx) -> u64 {
        self.mask_lin(self.seg_base(ES).wrapping_add(self.reg_sized(7, c.asz)))
    }
    #[inline(always)]
    fn adv(&mut self, reg: usize, c: &Ctx) {
        let v = self.reg_sized(reg, c.asz).wrapping_add(c.step) & mask(c.asz);
        self.set_reg_sized(reg, c.asz, v);
    }
    /// Returns false when a REP count is exhausted (instruction done).
    #[inline(always)]
    fn rep_begin(&self, c: &Ctx) -> bool {
        !c.rep || self.reg_sized(1, c.asz) != 0
    }
    #[inline(always)]
    fn rep_dec(&mut self, c: &Ctx) -> u64 {
        let n = self.reg_sized(1, c.asz).wrapping_sub(1) & mask(c.asz);
        self.set_reg_sized(1, c.asz, n);
        n
    }
    /// Yield after a chunk: re-execute this instruction next time.
    fn rep_yield(&mut self) {
        self.next_rip = self.s.rip;
        self.end_block = true;
    }
}

/// Run `body` once, or repeatedly under REP. `body` returns false to stop
/// early (REPE/REPNE condition).
fn repeat(cpu: &mut Cpu, c: &Ctx, mut body: impl FnMut(&mut Cpu) -> XResult<bool>) -> XResult<()> {
    if !c.rep {
        body(cpu)?;
        return Ok(());
    }
    let mut n = 0u64;
    while cpu.rep_begin(c) {
        let go_on = body(cpu)?;
        let left = cpu.rep_dec(c);
        if !go_on || left == 0 {
            return Ok(());
        }
        n += 1;
        if n >= CHUNK {
            cpu.rep_yield();
            return Ok(());
        }
    }
    Ok(())
}

/// Host pointer for `len` bytes at `lin` inside one page, when the page is
/// plain RAM (and, for writes, holds no decoded code); None otherwise.
fn bulk_ptr(cpu: &mut Cpu, lin: u64, len: usize, write: bool) -> XResult<Option<*mut u8>> {
    let kind = if write {
        crate::mmu::AccessKind::Write
    } else {
        crate::mmu::AccessKind::Read
    };
    // A TLB hit is RAM with A/D already set (and, for writes, no decoded
    // code): no page walk. Short copies (system call buffers) live on this.
    if let Some(p) = cpu.tlb_host(lin, len, kind) {
        return Ok(Some(p));
    }
    let phys = cpu.translate_fill(lin, cpu.access(kind))?;
    if write && cpu.ram.is_code_page(phys >> 12) {
        return Ok(None);
    }
    Ok(cpu.ram.host_ptr(phys, len as u64))
}

/// Forward REP MOVS/STOS in 64-bit addressing, a page at a time straight on
/// host memory. Stops (leaving the rest to the element loop) at anything
/// unusual: MMIO, code pages, elements crossing pages, overlap.
fn bulk(cpu: &mut Cpu, i: &Instruction, c: &Ctx, movs: bool) -> XResult<()> {
    if !c.rep || c.asz != 8 || cpu.flag(DF) || !cpu.s.mode64() {
        return Ok(());
    }
    let mut done = 0u64;
    while done < CHUNK {
        let count = cpu.s.gpr[1];
        if count == 0 {
            return Ok(());
        }
        let dst = cpu.str_dst(c);
        let mut room = (4096 - (dst & 0xfff)) / c.size as u64;
        let src = if movs { cpu.str_src(i, c) } else { 0 };
        if movs {
            room = room.min((4096 - (src & 0xfff)) / c.size as u64);
        }
        let k = room.min(count).min(CHUNK - done);
        if k == 0 {
            return Ok(());
        }
        let len = (k as usize) * c.size;
        let Some(d) = bulk_ptr(cpu, dst, len, true)? else {
            return Ok(());
        };
        if movs {
            let Some(s) = bulk_ptr(cpu, src, len, false)? else {
                return Ok(());
            };
            let (a, b) = (s as usize, d as usize);
            if b > a && b - a < len {
                // Overlapping with the destination above: element-wise
                // semantics replicate the source (no memmove does that).
                return Ok(());
            }
            // Forward element by element, a destination below the source
            // never overwrites a source element before it is read, which
            // is what memmove does too (the kernel's own memmove moves
            // data down this way).
            // SAFETY: both ranges are inside guest RAM (host_ptr checked
            // the length); `copy` allows them to overlap.
            unsafe { std::ptr::copy(s, d, len) };
            cpu.s.gpr[6] = cpu.s.gpr[6].wrapping_add(len as u64);
        } else {
            let v = cpu.reg_sized(0, c.size);
            // SAFETY: [d, d+len) is guest RAM (host_ptr checked the length);
            // elements are written unaligned.
            unsafe {
                match c.size {
                    1 => std::ptr::write_bytes(d, v as u8, len),
                    _ => {
                        for n in 0..k as usize {
                            let p = d.add(n * c.size);
                            match c.size {
                                2 => (p as *mut u16).write_unaligned(v as u16),
                                4 => (p as *mut u32).write_unaligned(v as u32),
                                _ => (p as *mut u64).write_unaligned(v),
                            }
                        }
                    }
                }
            }
        }
        cpu.s.gpr[7] = cpu.s.gpr[7].wrapping_add(len as u64);
        cpu.s.gpr[1] = count - k;
        done += k;
    }
    if cpu.s.gpr[1] != 0 {
        cpu.rep_yield();
    }
    Ok(())
}

fn movs(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let c = ctx(cpu, i);
    bulk(cpu, i, &c, true)?;
    if c.rep && (cpu.s.gpr[1] == 0 && c.asz == 8 || cpu.end_block) {
        return Ok(());
    }
    repeat(cpu, &c, |cpu| {
        let v = cpu.read_sized(cpu.str_src(i, &c), c.size)?;
        cpu.write_sized(cpu.str_dst(&c), c.size, v)?;
        cpu.adv(6, &c);
        cpu.adv(7, &c);
        Ok(true)
    })
}

fn stos(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let c = ctx(cpu, i);
    bulk(cpu, i, &c, false)?;
    if c.rep && (cpu.s.gpr[1] == 0 && c.asz == 8 || cpu.end_block) {
        return Ok(());
    }
    let v = cpu.reg_sized(0, c.size);
    repeat(cpu, &c, |cpu| {
        cpu.write_sized(cpu.str_dst(&c), c.size, v)?;
        cpu.adv(7, &c);
        Ok(true)
    })
}

fn lods(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let c = ctx(cpu, i);
    repeat(cpu, &c, |cpu| {
        let v = cpu.read_sized(cpu.str_src(i, &c), c.size)?;
        cpu.set_reg_sized(0, c.size, v);
        cpu.adv(6, &c);
        Ok(true)
    })
}

fn cmps(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let c = ctx(cpu, i);
    let repe = i.has_repe_prefix();
    repeat(cpu, &c, |cpu| {
        let a = cpu.read_sized(cpu.str_src(i, &c), c.size)?;
        let b = cpu.read_sized(cpu.str_dst(&c), c.size)?;
        let (_, fl) = h::sub(c.size, a, b);
        cpu.set_flags(STATUS, fl);
        cpu.adv(6, &c);
        cpu.adv(7, &c);
        Ok((fl & ZF != 0) == repe)
    })
}

fn scas(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let c = ctx(cpu, i);
    let repe = i.has_repe_prefix();
    let a = cpu.reg_sized(0, c.size);
    repeat(cpu, &c, |cpu| {
        let b = cpu.read_sized(cpu.str_dst(&c), c.size)?;
        let (_, fl) = h::sub(c.size, a, b);
        cpu.set_flags(STATUS, fl);
        cpu.adv(7, &c);
        Ok((fl & ZF != 0) == repe)
    })
}

fn ins(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let c = ctx(cpu, i);
    let port = cpu.reg_sized(2, 2) as u16;
    cpu.check_io(port, c.size)?;
    repeat(cpu, &c, |cpu| {
        let dst = cpu.str_dst(&c);
        // Probe the destination before the (side-effecting) port read.
        cpu.translate_fill(dst, cpu.access(crate::mmu::AccessKind::Write))?;
        let v = cpu.bus.io_read(port, c.size as u8) as u64;
        cpu.write_sized(dst, c.size, v)?;
        cpu.adv(7, &c);
        Ok(true)
    })
}

fn outs(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let c = ctx(cpu, i);
    let port = cpu.reg_sized(2, 2) as u16;
    cpu.check_io(port, c.size)?;
    repeat(cpu, &c, |cpu| {
        let v = cpu.read_sized(cpu.str_src(i, &c), c.size)?;
        cpu.bus.io_write(port, c.size as u8, v as u32);
        cpu.adv(6, &c);
        Ok(true)
    })
}
