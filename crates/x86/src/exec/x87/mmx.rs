//! MMX (and the SSE/SSSE3 integer instructions on MM registers).
//!
//! MM(i) is the mantissa of physical x87 register R(i). Every MMX
//! instruction except EMMS sets TOP = 0 and tags all registers valid;
//! writing MM(i) sets R(i)'s exponent field to all ones.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use crate::cpu::Cpu;
use crate::exception::{Fault, XResult};
use crate::exec::Handler;
use crate::state::cr0;

pub fn lookup(i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    let m = i.mnemonic();
    if m == Emms {
        return Some(emms);
    }
    let mut mm = false;
    for n in 0..i.op_count() {
        if i.op_kind(n) == OpKind::Register {
            let r = i.op_register(n);
            if r.is_mm() {
                mm = true;
            } else if r.is_xmm() || r.is_ymm() || r.is_zmm() {
                return None;
            }
        }
    }
    if !mm {
        return None;
    }
    Some(match m {
        Movd | Movq | Movntq => mov,
        Paddb => paddb,
        Paddw => paddw,
        Paddd => paddd,
        Paddq => paddq,
        Psubb => psubb,
        Psubw => psubw,
        Psubd => psubd,
        Psubq => psubq,
        Paddsb => paddsb,
        Paddsw => paddsw,
        Paddusb => paddusb,
        Paddusw => paddusw,
        Psubsb => psubsb,
        Psubsw => psubsw,
        Psubusb => psubusb,
        Psubusw => psubusw,
        Pcmpeqb => pcmpeqb,
        Pcmpeqw => pcmpeqw,
        Pcmpeqd => pcmpeqd,
        Pcmpgtb => pcmpgtb,
        Pcmpgtw => pcmpgtw,
        Pcmpgtd => pcmpgtd,
        Packsswb => packsswb,
        Packssdw => packssdw,
        Packuswb => packuswb,
        Punpcklbw => punpcklbw,
        Punpcklwd => punpcklwd,
        Punpckldq => punpckldq,
        Punpckhbw => punpckhbw,
        Punpckhwd => punpckhwd,
        Punpckhdq => punpckhdq,
        Pmullw => pmullw,
        Pmulhw => pmulhw,
        Pmulhuw => pmulhuw,
        Pmuludq => pmuludq,
        Pmaddwd => pmaddwd,
        Pand => pand,
        Pandn => pandn,
        Por => por,
        Pxor => pxor,
        Pavgb => pavgb,
        Pavgw => pavgw,
        Pminub => pminub,
        Pmaxub => pmaxub,
        Pminsw => pminsw,
        Pmaxsw => pmaxsw,
        Psadbw => psadbw,
        Pshufb => pshufb,
        Phaddw => phaddw,
        Phaddd => phaddd,
        Phaddsw => phaddsw,
        Phsubw => phsubw,
        Phsubd => phsubd,
        Phsubsw => phsubsw,
        Pabsb => pabsb,
        Pabsw => pabsw,
        Pabsd => pabsd,
        Psignb => psignb,
        Psignw => psignw,
        Psignd => psignd,
        Pmulhrsw => pmulhrsw,
        Pmaddubsw => pmaddubsw,
        Psllw => psllw,
        Pslld => pslld,
        Psllq => psllq,
        Psrlw => psrlw,
        Psrld => psrld,
        Psrlq => psrlq,
        Psraw => psraw,
        Psrad => psrad,
        Pshufw => pshufw,
        Palignr => palignr,
        Pinsrw => pinsrw,
        Pextrw => pextrw,
        Pmovmskb => pmovmskb,
        Maskmovq => maskmovq,
        _ => return None,
    })
}

fn mm_idx(r: Register) -> usize {
    (r as u32 - Register::MM0 as u32) as usize
}

impl Cpu {
    /// #UD / #NM / #MF checks for an MMX instruction.
    fn mmx_check(&self) -> XResult<()> {
        if self.s.cr0 & cr0::EM != 0 {
            return Err(Fault::ud());
        }
        if self.s.cr0 & cr0::TS != 0 {
            return Err(Fault::nm());
        }
        if self.s.fpu.fsw & 0x80 != 0 && self.s.cr0 & cr0::NE != 0 {
            return Err(Fault::new(crate::exception::MF));
        }
        Ok(())
    }
    /// The x87 side effects of an MMX instruction: TOP = 0, all valid.
    fn mmx_touch(&mut self) {
        self.s.fpu.fsw &= !(7 << 11);
        self.s.fpu.ftw = 0xff;
    }
    fn mm(&self, r: Register) -> u64 {
        self.s.fpu.st[mm_idx(r)].0
    }
    fn set_mm(&mut self, r: Register, v: u64) {
        self.s.fpu.st[mm_idx(r)] = (v, 0xffff);
    }
    /// Operand `n` as a 64-bit source: MM register, general register, or
    /// memory of the instruction's memory size (zero-extended).
    fn mmx_src(&mut self, i: &Instruction, n: u32) -> XResult<u64> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                Ok(if r.is_mm() { self.mm(r) } else { self.gpr(r) })
            }
            OpKind::Memory => {
                let lin = self.mem_lin(i);
                let sz = i.memory_size().size().min(8);
                self.read_sized(lin, sz)
            }
            _ => Ok(i.immediate(n)),
        }
    }
}

fn emms(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    cpu.mmx_check()?;
    cpu.s.fpu.ftw = 0;
    Ok(())
}

fn mov(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.mmx_check()?;
    if i.op0_kind() == OpKind::Register && i.op0_register().is_mm() {
        let v = cpu.mmx_src(i, 1)?;
        let v = if i.op_kind(1) == OpKind::Register && i.op_register(1).size() == 4 {
            v & 0xffff_ffff
        } else {
            v
        };
        cpu.mmx_touch();
        cpu.set_mm(i.op0_register(), v);
    } else {
        let v = cpu.mm(i.op1_register());
        if i.op0_kind() == OpKind::Register {
            let r = i.op0_register();
            cpu.set_gpr(r, v);
        } else {
            let lin = cpu.mem_lin(i);
            let sz = i.memory_size().size();
            cpu.write_sized(lin, sz, v)?;
        }
        cpu.mmx_touch();
    }
    Ok(())
}

#[inline(always)]
fn binop(cpu: &mut Cpu, i: &Instruction, f: fn(u64, u64) -> u64) -> XResult<()> {
    cpu.mmx_check()?;
    let b = cpu.mmx_src(i, 1)?;
    let d = i.op0_register();
    let a = cpu.mm(d);
    cpu.mmx_touch();
    cpu.set_mm(d, f(a, b));
    Ok(())
}

// Lane helpers.
fn m8(a: u64, b: u64, f: impl Fn(u8, u8) -> u8) -> u64 {
    let (x, y) = (a.to_le_bytes(), b.to_le_bytes());
    let mut r = [0u8; 8];
    for k in 0..8 {
        r[k] = f(x[k], y[k]);
    }
    u64::from_le_bytes(r)
}
fn w(v: u64) -> [u16; 4] {
    [
        v as u16,
        (v >> 16) as u16,
        (v >> 32) as u16,
        (v >> 48) as u16,
    ]
}
fn unw(r: [u16; 4]) -> u64 {
    r[0] as u64 | (r[1] as u64) << 16 | (r[2] as u64) << 32 | (r[3] as u64) << 48
}
fn m16(a: u64, b: u64, f: impl Fn(u16, u16) -> u16) -> u64 {
    let (x, y) = (w(a), w(b));
    unw([f(x[0], y[0]), f(x[1], y[1]), f(x[2], y[2]), f(x[3], y[3])])
}
fn m32(a: u64, b: u64, f: impl Fn(u32, u32) -> u32) -> u64 {
    f(a as u32, b as u32) as u64 | (f((a >> 32) as u32, (b >> 32) as u32) as u64) << 32
}
fn sat8(v: i16) -> u8 {
    v.clamp(-128, 127) as i8 as u8
}
fn satu8(v: i16) -> u8 {
    v.clamp(0, 255) as u8
}
fn sat16(v: i32) -> u16 {
    v.clamp(-32768, 32767) as i16 as u16
}
fn mask_if(c: bool) -> u64 {
    if c {
        u64::MAX
    } else {
        0
    }
}

macro_rules! mmx_bin {
    ($($name:ident => $f:expr;)*) => {
        $(fn $name(cpu: &mut Cpu, i: &Instruction) -> XResult<()> { binop(cpu, i, $f) })*
    };
}

mmx_bin! {
    paddb => |a, b| m8(a, b, |x, y| x.wrapping_add(y));
    paddw => |a, b| m16(a, b, |x, y| x.wrapping_add(y));
    paddd => |a, b| m32(a, b, |x, y| x.wrapping_add(y));
    paddq => |a, b| a.wrapping_add(b);
    psubb => |a, b| m8(a, b, |x, y| x.wrapping_sub(y));
    psubw => |a, b| m16(a, b, |x, y| x.wrapping_sub(y));
    psubd => |a, b| m32(a, b, |x, y| x.wrapping_sub(y));
    psubq => |a, b| a.wrapping_sub(b);
    paddsb => |a, b| m8(a, b, |x, y| (x as i8).saturating_add(y as i8) as u8);
    paddsw => |a, b| m16(a, b, |x, y| (x as i16).saturating_add(y as i16) as u16);
    paddusb => |a, b| m8(a, b, |x, y| x.saturating_add(y));
    paddusw => |a, b| m16(a, b, |x, y| x.saturating_add(y));
    psubsb => |a, b| m8(a, b, |x, y| (x as i8).saturating_sub(y as i8) as u8);
    psubsw => |a, b| m16(a, b, |x, y| (x as i16).saturating_sub(y as i16) as u16);
    psubusb => |a, b| m8(a, b, |x, y| x.saturating_sub(y));
    psubusw => |a, b| m16(a, b, |x, y| x.saturating_sub(y));
    pcmpeqb => |a, b| m8(a, b, |x, y| mask_if(x == y) as u8);
    pcmpeqw => |a, b| m16(a, b, |x, y| mask_if(x == y) as u16);
    pcmpeqd => |a, b| m32(a, b, |x, y| mask_if(x == y) as u32);
    pcmpgtb => |a, b| m8(a, b, |x, y| mask_if(x as i8 > y as i8) as u8);
    pcmpgtw => |a, b| m16(a, b, |x, y| mask_if(x as i16 > y as i16) as u16);
    pcmpgtd => |a, b| m32(a, b, |x, y| mask_if(x as i32 > y as i32) as u32);
    packsswb => |a, b| {
        let (x, y) = (w(a), w(b));
        let mut r = [0u8; 8];
        for k in 0..4 {
            r[k] = sat8(x[k] as i16);
            r[k + 4] = sat8(y[k] as i16);
        }
        u64::from_le_bytes(r)
    };
    packuswb => |a, b| {
        let (x, y) = (w(a), w(b));
        let mut r = [0u8; 8];
        for k in 0..4 {
            r[k] = satu8(x[k] as i16);
            r[k + 4] = satu8(y[k] as i16);
        }
        u64::from_le_bytes(r)
    };
    packssdw => |a, b| unw([
        sat16(a as i32), sat16((a >> 32) as i32), sat16(b as i32), sat16((b >> 32) as i32),
    ]);
    punpcklbw => |a, b| {
        let (x, y) = (a.to_le_bytes(), b.to_le_bytes());
        u64::from_le_bytes([x[0], y[0], x[1], y[1], x[2], y[2], x[3], y[3]])
    };
    punpckhbw => |a, b| {
        let (x, y) = (a.to_le_bytes(), b.to_le_bytes());
        u64::from_le_bytes([x[4], y[4], x[5], y[5], x[6], y[6], x[7], y[7]])
    };
    punpcklwd => |a, b| { let (x, y) = (w(a), w(b)); unw([x[0], y[0], x[1], y[1]]) };
    punpckhwd => |a, b| { let (x, y) = (w(a), w(b)); unw([x[2], y[2], x[3], y[3]]) };
    punpckldq => |a, b| (a & 0xffff_ffff) | (b << 32);
    punpckhdq => |a, b| (a >> 32) | (b & 0xffff_ffff_0000_0000);
    pmullw => |a, b| m16(a, b, |x, y| (x as i16 as i32 * y as i16 as i32) as u16);
    pmulhw => |a, b| m16(a, b, |x, y| ((x as i16 as i32 * y as i16 as i32) >> 16) as u16);
    pmulhuw => |a, b| m16(a, b, |x, y| ((x as u32 * y as u32) >> 16) as u16);
    pmuludq => |a, b| (a & 0xffff_ffff) * (b & 0xffff_ffff);
    pmaddwd => |a, b| {
        let (x, y) = (w(a), w(b));
        let p = |k: usize| (x[k] as i16 as i32).wrapping_mul(y[k] as i16 as i32);
        (p(0).wrapping_add(p(1)) as u32 as u64) | ((p(2).wrapping_add(p(3)) as u32 as u64) << 32)
    };
    pand => |a, b| a & b;
    pandn => |a, b| !a & b;
    por => |a, b| a | b;
    pxor => |a, b| a ^ b;
    pavgb => |a, b| m8(a, b, |x, y| ((x as u16 + y as u16 + 1) >> 1) as u8);
    pavgw => |a, b| m16(a, b, |x, y| ((x as u32 + y as u32 + 1) >> 1) as u16);
    pminub => |a, b| m8(a, b, |x, y| x.min(y));
    pmaxub => |a, b| m8(a, b, |x, y| x.max(y));
    pminsw => |a, b| m16(a, b, |x, y| (x as i16).min(y as i16) as u16);
    pmaxsw => |a, b| m16(a, b, |x, y| (x as i16).max(y as i16) as u16);
    psadbw => |a, b| {
        let (x, y) = (a.to_le_bytes(), b.to_le_bytes());
        (0..8).map(|k| (x[k] as i32 - y[k] as i32).unsigned_abs() as u64).sum()
    };
    pshufb => |a, b| {
        let (x, y) = (a.to_le_bytes(), b.to_le_bytes());
        let mut r = [0u8; 8];
        for k in 0..8 {
            r[k] = if y[k] & 0x80 != 0 { 0 } else { x[(y[k] & 7) as usize] };
        }
        u64::from_le_bytes(r)
    };
    phaddw => |a, b| { let (x, y) = (w(a), w(b)); unw([x[0].wrapping_add(x[1]), x[2].wrapping_add(x[3]), y[0].wrapping_add(y[1]), y[2].wrapping_add(y[3])]) };
    phsubw => |a, b| { let (x, y) = (w(a), w(b)); unw([x[0].wrapping_sub(x[1]), x[2].wrapping_sub(x[3]), y[0].wrapping_sub(y[1]), y[2].wrapping_sub(y[3])]) };
    phaddsw => |a, b| {
        let (x, y) = (w(a), w(b));
        let s = |p: u16, q: u16| (p as i16).saturating_add(q as i16) as u16;
        unw([s(x[0], x[1]), s(x[2], x[3]), s(y[0], y[1]), s(y[2], y[3])])
    };
    phsubsw => |a, b| {
        let (x, y) = (w(a), w(b));
        let s = |p: u16, q: u16| (p as i16).saturating_sub(q as i16) as u16;
        unw([s(x[0], x[1]), s(x[2], x[3]), s(y[0], y[1]), s(y[2], y[3])])
    };
    phaddd => |a, b| ((a as u32).wrapping_add((a >> 32) as u32) as u64) | (((b as u32).wrapping_add((b >> 32) as u32) as u64) << 32);
    phsubd => |a, b| ((a as u32).wrapping_sub((a >> 32) as u32) as u64) | (((b as u32).wrapping_sub((b >> 32) as u32) as u64) << 32);
    pabsb => |_, b| m8(0, b, |_, y| (y as i8).unsigned_abs());
    pabsw => |_, b| m16(0, b, |_, y| (y as i16).unsigned_abs());
    pabsd => |_, b| m32(0, b, |_, y| (y as i32).unsigned_abs());
    psignb => |a, b| m8(a, b, |x, y| match (y as i8).signum() { -1 => (x as i8).wrapping_neg() as u8, 0 => 0, _ => x });
    psignw => |a, b| m16(a, b, |x, y| match (y as i16).signum() { -1 => (x as i16).wrapping_neg() as u16, 0 => 0, _ => x });
    psignd => |a, b| m32(a, b, |x, y| match (y as i32).signum() { -1 => (x as i32).wrapping_neg() as u32, 0 => 0, _ => x });
    pmulhrsw => |a, b| m16(a, b, |x, y| ((((x as i16 as i32 * y as i16 as i32) >> 14) + 1) >> 1) as u16);
    pmaddubsw => |a, b| {
        let (x, y) = (a.to_le_bytes(), b.to_le_bytes());
        let p = |k: usize| x[k] as i32 * y[k] as i8 as i32;
        unw([sat16(p(0) + p(1)), sat16(p(2) + p(3)), sat16(p(4) + p(5)), sat16(p(6) + p(7))])
    };
}

/// Shifts: `kind` 0 = left logical, 1 = right logical, 2 = right arithmetic.
fn shift(cpu: &mut Cpu, i: &Instruction, lane: u32, kind: u8) -> XResult<()> {
    cpu.mmx_check()?;
    let n = cpu.mmx_src(i, 1)?;
    let n = if matches!(i.op1_kind(), OpKind::Immediate8) {
        n & 0xff
    } else {
        n
    };
    let d = i.op0_register();
    let a = cpu.mm(d);
    let lanes = 64 / lane;
    let lmask = if lane == 64 {
        u64::MAX
    } else {
        (1u64 << lane) - 1
    };
    let mut r = 0u64;
    for k in 0..lanes {
        let x = (a >> (k * lane)) & lmask;
        let y = match kind {
            0 => {
                if n >= lane as u64 {
                    0
                } else {
                    (x << n) & lmask
                }
            }
            1 => {
                if n >= lane as u64 {
                    0
                } else {
                    x >> n
                }
            }
            _ => {
                let s = n.min(lane as u64 - 1) as u32;
                let sx = ((x << (64 - lane)) as i64) >> (64 - lane);
                ((sx >> s) as u64) & lmask
            }
        };
        r |= y << (k * lane);
    }
    cpu.mmx_touch();
    cpu.set_mm(d, r);
    Ok(())
}

fn psllw(c: &mut Cpu, i: &Instruction) -> XResult<()> {
    shift(c, i, 16, 0)
}
fn pslld(c: &mut Cpu, i: &Instruction) -> XResult<()> {
    shift(c, i, 32, 0)
}
fn psllq(c: &mut Cpu, i: &Instruction) -> XResult<()> {
    shift(c, i, 64, 0)
}
fn psrlw(c: &mut Cpu, i: &Instruction) -> XResult<()> {
    shift(c, i, 16, 1)
}
fn psrld(c: &mut Cpu, i: &Instruction) -> XResult<()> {
    shift(c, i, 32, 1)
}
fn psrlq(c: &mut Cpu, i: &Instruction) -> XResult<()> {
    shift(c, i, 64, 1)
}
fn psraw(c: &mut Cpu, i: &Instruction) -> XResult<()> {
    shift(c, i, 16, 2)
}
fn psrad(c: &mut Cpu, i: &Instruction) -> XResult<()> {
    shift(c, i, 32, 2)
}

fn pshufw(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.mmx_check()?;
    let b = w(cpu.mmx_src(i, 1)?);
    let imm = i.immediate8();
    let r = unw([0, 1, 2, 3].map(|k| b[((imm >> (2 * k)) & 3) as usize]));
    cpu.mmx_touch();
    cpu.set_mm(i.op0_register(), r);
    Ok(())
}

fn palignr(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.mmx_check()?;
    let b = cpu.mmx_src(i, 1)?;
    let d = i.op0_register();
    let a = cpu.mm(d);
    let cat = ((a as u128) << 64) | b as u128;
    let n = i.immediate8() as u32;
    let r = if n >= 16 { 0 } else { (cat >> (n * 8)) as u64 };
    cpu.mmx_touch();
    cpu.set_mm(d, r);
    Ok(())
}

fn pinsrw(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.mmx_check()?;
    let v = cpu.mmx_src(i, 1)? as u16;
    let d = i.op0_register();
    let mut x = w(cpu.mm(d));
    x[(i.immediate8() & 3) as usize] = v;
    cpu.mmx_touch();
    cpu.set_mm(d, unw(x));
    Ok(())
}

fn pextrw(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.mmx_check()?;
    let x = w(cpu.mm(i.op1_register()));
    let v = x[(i.immediate8() & 3) as usize] as u64;
    cpu.mmx_touch();
    cpu.set_gpr(i.op0_register(), v);
    Ok(())
}

fn pmovmskb(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.mmx_check()?;
    let x = cpu.mm(i.op1_register()).to_le_bytes();
    let v = (0..8).fold(0u64, |m, k| m | (((x[k] >> 7) as u64) << k));
    cpu.mmx_touch();
    cpu.set_gpr(i.op0_register(), v);
    Ok(())
}

fn maskmovq(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.mmx_check()?;
    let asz = match i.op0_kind() {
        OpKind::MemorySegDI => 2,
        OpKind::MemorySegEDI => 4,
        _ => 8,
    };
    let seg = crate::exec::seg_index(i.memory_segment());
    let off = cpu.s.gpr[crate::state::RDI] & crate::exec::mask(asz);
    let data = cpu.mm(i.op1_register()).to_le_bytes();
    let m = cpu.mm(i.op2_register()).to_le_bytes();
    for k in 0..8 {
        if m[k] & 0x80 != 0 {
            let lin = cpu.mask_lin(
                cpu.seg_base(seg)
                    .wrapping_add(off.wrapping_add(k as u64) & crate::exec::mask(asz)),
            );
            cpu.write_u8(lin, data[k])?;
        }
    }
    cpu.mmx_touch();
    Ok(())
}
