//! Integer arithmetic, logic, shifts, bit operations, multiply and divide.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::{mask, Handler};
use crate::cpu::Cpu;
use crate::exception::{Fault, XResult};
use crate::hostalu as h;
use crate::state::flags::*;

pub fn lookup(i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    Some(match i.mnemonic() {
        Add => add,
        Or => or,
        Adc => adc,
        Sbb => sbb,
        And => and,
        Sub => sub,
        Xor => xor,
        Cmp => cmp,
        Test => test,
        Inc => inc,
        Dec => dec,
        Neg => neg,
        Not => not,
        Rol | Ror | Rcl | Rcr | Shl | Sal | Shr | Sar => shift,
        Shld | Shrd => dshift,
        Bt | Bts | Btr | Btc => bittest,
        Bsf | Bsr => bitscan,
        Tzcnt | Lzcnt | Popcnt => bitcount,
        Mul => mul,
        Imul => imul,
        Div | Idiv => div,
        Andn | Bextr | Blsi | Blsmsk | Blsr | Bzhi | Pdep | Pext | Rorx | Sarx | Shlx | Shrx
        | Mulx => {
            return None; // BMI is not advertised
        }
        _ => return None,
    })
}

/// Two-operand ALU op with a writable destination (op0) and source (op1).
#[inline(always)]
fn binop(
    cpu: &mut Cpu,
    i: &Instruction,
    f: fn(usize, u64, u64) -> (u64, u64),
    write: bool,
) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    let b = cpu.read_op(i, 1)? & mask(size);
    if i.op0_kind() == OpKind::Register {
        let r = i.op0_register();
        let (res, fl) = f(size, cpu.gpr(r), b);
        if write {
            cpu.set_gpr(r, res);
        }
        cpu.set_flags(STATUS, fl);
    } else if write {
        let (_, fl) = cpu.rmw_mem(i, size, |a| f(size, a, b))?;
        cpu.set_flags(STATUS, fl);
    } else {
        let a = cpu.read_op(i, 0)?;
        let (_, fl) = f(size, a, b);
        cpu.set_flags(STATUS, fl);
    }
    Ok(())
}

fn add(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    binop(cpu, i, h::add, true)
}
fn or(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    binop(cpu, i, h::or, true)
}
fn and(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    binop(cpu, i, h::and, true)
}
fn sub(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    binop(cpu, i, h::sub, true)
}
fn xor(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    binop(cpu, i, h::xor, true)
}
fn cmp(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    binop(cpu, i, h::sub, false)
}
fn test(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    binop(cpu, i, h::and, false)
}

fn adc(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let cf = cpu.flag(CF);
    let size = cpu.op_size(i, 0);
    let b = cpu.read_op(i, 1)? & mask(size);
    let (_, fl) = if i.op0_kind() == OpKind::Register {
        let r = i.op0_register();
        let (res, fl) = h::adc(size, cpu.gpr(r), b, cf);
        cpu.set_gpr(r, res);
        (0, fl)
    } else {
        cpu.rmw_mem(i, size, |a| h::adc(size, a, b, cf))?
    };
    cpu.set_flags(STATUS, fl);
    Ok(())
}

fn sbb(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let cf = cpu.flag(CF);
    let size = cpu.op_size(i, 0);
    let b = cpu.read_op(i, 1)? & mask(size);
    let (_, fl) = if i.op0_kind() == OpKind::Register {
        let r = i.op0_register();
        let (res, fl) = h::sbb(size, cpu.gpr(r), b, cf);
        cpu.set_gpr(r, res);
        (0, fl)
    } else {
        cpu.rmw_mem(i, size, |a| h::sbb(size, a, b, cf))?
    };
    cpu.set_flags(STATUS, fl);
    Ok(())
}

#[inline(always)]
fn unop(
    cpu: &mut Cpu,
    i: &Instruction,
    f: fn(usize, u64) -> (u64, u64),
    which: u64,
) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    let fl = if i.op0_kind() == OpKind::Register {
        let r = i.op0_register();
        let (res, fl) = f(size, cpu.gpr(r));
        cpu.set_gpr(r, res);
        fl
    } else {
        cpu.rmw_mem(i, size, |a| f(size, a))?.1
    };
    cpu.set_flags(which, fl);
    Ok(())
}

fn inc(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    unop(cpu, i, h::inc, STATUS & !CF)
}
fn dec(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    unop(cpu, i, h::dec, STATUS & !CF)
}
fn neg(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    unop(cpu, i, h::neg, STATUS)
}
fn not(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    unop(cpu, i, |_, a| (!a, 0), 0)
}

type ShiftFn = fn(usize, u64, u8, bool) -> (u64, u64);

fn shift(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    let raw = if i.op_count() > 1 {
        cpu.read_op(i, 1)? as u8
    } else {
        1
    };
    let count = raw & if size == 8 { 63 } else { 31 };
    if count == 0 {
        // Flags untouched (but still a memory access check); a 32-bit
        // register destination is still written, i.e. zero-extended.
        if i.op0_kind() == OpKind::Memory {
            cpu.read_op(i, 0)?;
        } else if size == 4 {
            let r = i.op0_register();
            cpu.set_gpr(r, cpu.gpr(r));
        }
        return Ok(());
    }
    let cf = cpu.flag(CF);
    let (f, which): (ShiftFn, u64) = match i.mnemonic() {
        Mnemonic::Rol => (h::rol, h::ROTATE_FLAGS),
        Mnemonic::Ror => (h::ror, h::ROTATE_FLAGS),
        Mnemonic::Rcl => (h::rcl, h::ROTATE_FLAGS),
        Mnemonic::Rcr => (h::rcr, h::ROTATE_FLAGS),
        Mnemonic::Shl | Mnemonic::Sal => (h::shl, STATUS),
        Mnemonic::Shr => (h::shr, STATUS),
        _ => (h::sar, STATUS),
    };
    let fl = if i.op0_kind() == OpKind::Register {
        let r = i.op0_register();
        let (res, fl) = f(size, cpu.gpr(r), count, cf);
        cpu.set_gpr(r, res);
        fl
    } else {
        cpu.rmw_mem(i, size, |a| f(size, a, count, cf))?.1
    };
    cpu.set_flags(which, fl);
    Ok(())
}

fn dshift(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    let src = cpu.read_op(i, 1)?;
    let count = (cpu.read_op(i, 2)? as u8) & if size == 8 { 63 } else { 31 };
    if count == 0 {
        if i.op0_kind() == OpKind::Memory {
            cpu.read_op(i, 0)?;
        } else if size == 4 {
            let r = i.op0_register();
            cpu.set_gpr(r, cpu.gpr(r)); // zero-extends, as hardware does
        }
        return Ok(());
    }
    let left = i.mnemonic() == Mnemonic::Shld;
    let f = move |a: u64| -> (u64, u64) {
        match (size, left) {
            (2, true) => {
                let (r, f) = h::shld16(a as u16, src as u16, count);
                (r as u64, f)
            }
            (2, false) => {
                let (r, f) = h::shrd16(a as u16, src as u16, count);
                (r as u64, f)
            }
            (4, true) => {
                let (r, f) = h::shld32(a as u32, src as u32, count);
                (r as u64, f)
            }
            (4, false) => {
                let (r, f) = h::shrd32(a as u32, src as u32, count);
                (r as u64, f)
            }
            (_, true) => h::shld64(a, src, count),
            (_, false) => h::shrd64(a, src, count),
        }
    };
    let fl = if i.op0_kind() == OpKind::Register {
        let r = i.op0_register();
        let (res, fl) = f(cpu.gpr(r));
        cpu.set_gpr(r, res);
        fl
    } else {
        cpu.rmw_mem(i, size, f)?.1
    };
    cpu.set_flags(STATUS, fl);
    Ok(())
}

fn bittest(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    let bits = (size * 8) as u64;
    let off = cpu.read_op(i, 1)?;
    let m = i.mnemonic();
    let op = move |a: u64, bit: u64| -> u64 {
        match m {
            Mnemonic::Bts => a | (1 << bit),
            Mnemonic::Btr => a & !(1 << bit),
            Mnemonic::Btc => a ^ (1 << bit),
            _ => a,
        }
    };
    // Only CF is written: ZF is preserved, OF/SF/AF/PF are left as they were.
    let host_flags = |a: u64, bit: u64| -> u64 {
        match size {
            2 => h::bt16(a as u16, bit as u16).1,
            4 => h::bt32(a as u32, bit as u32).1,
            _ => h::bt64(a, bit).1,
        }
    };
    if i.op0_kind() == OpKind::Register {
        let r = i.op0_register();
        let bit = off & (bits - 1);
        let a = cpu.gpr(r);
        let fl = host_flags(a, bit);
        if m != Mnemonic::Bt {
            cpu.set_gpr(r, op(a, bit));
        }
        cpu.set_flags(CF, fl);
        return Ok(());
    }
    // Memory form: a register bit offset addresses beyond the operand.
    let (byte_off, bit) = if i.op1_kind() == OpKind::Register {
        let soff = super::sext(off, size) as i64;
        (
            (soff >> (bits.trailing_zeros())) * size as i64,
            (soff as u64) & (bits - 1),
        )
    } else {
        (0, off & (bits - 1))
    };
    let lin = cpu.mask_lin(cpu.mem_lin(i).wrapping_add(byte_off as u64));
    let a = cpu.read_sized(lin, size)?;
    let fl = host_flags(a, bit);
    if m != Mnemonic::Bt {
        if i.has_lock_prefix() {
            if let Some(p) = cpu.atomic_host_ptr(lin, size)? {
                let mut fl2 = fl;
                // SAFETY: aligned guest RAM within one page (checked).
                unsafe {
                    super::atomic_rmw(p, size, &mut |old| {
                        fl2 = host_flags(old, bit);
                        (op(old, bit), 0)
                    })
                };
                cpu.set_flags(CF, fl2);
                return Ok(());
            }
        }
        cpu.write_sized(lin, size, op(a, bit))?;
    }
    cpu.set_flags(CF, fl);
    Ok(())
}

fn bitscan(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    let src = cpu.read_op(i, 1)?;
    let r = i.op0_register();
    let dst = cpu.gpr(r);
    let fwd = i.mnemonic() == Mnemonic::Bsf;
    let fl_in = cpu.s.rflags;
    let (res, fl) = match (size, fwd) {
        (2, true) => {
            let (r, f) = h::bsf16(dst as u16, src as u16, fl_in);
            (r as u64, f)
        }
        (2, false) => {
            let (r, f) = h::bsr16(dst as u16, src as u16, fl_in);
            (r as u64, f)
        }
        (4, true) => {
            let (r, f) = h::bsf32(dst as u32, src as u32, fl_in);
            (r as u64, f)
        }
        (4, false) => {
            let (r, f) = h::bsr32(dst as u32, src as u32, fl_in);
            (r as u64, f)
        }
        (_, true) => h::bsf64(dst, src, fl_in),
        (_, false) => h::bsr64(dst, src, fl_in),
    };
    // A zero source leaves the whole destination unchanged on real CPUs
    // (even a 32-bit one is not zero-extended).
    if src & mask(size) != 0 {
        cpu.set_gpr(r, res);
    }
    cpu.set_flags(STATUS, fl);
    Ok(())
}

fn bitcount(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    let bits = (size * 8) as u64;
    let src = cpu.read_op(i, 1)? & mask(size);
    let res = match i.mnemonic() {
        Mnemonic::Popcnt => src.count_ones() as u64,
        Mnemonic::Tzcnt => (src.trailing_zeros() as u64).min(bits),
        _ => (src.leading_zeros() as u64) - (64 - bits),
    };
    let mut fl = 0;
    if res == 0 {
        fl |= ZF;
    }
    match i.mnemonic() {
        Mnemonic::Popcnt => {}
        Mnemonic::Tzcnt | Mnemonic::Lzcnt if src == 0 => fl |= CF,
        _ => {}
    }
    cpu.set_gpr(i.op0_register(), res);
    // POPCNT clears OF SF AF CF PF; TZCNT/LZCNT leave OF SF AF PF undefined
    // (hardware clears them... keep them unchanged like common CPUs? no:
    // real CPUs differ, and the tester masks undefined flags).
    if i.mnemonic() == Mnemonic::Popcnt {
        cpu.set_flags(STATUS, fl);
    } else {
        cpu.set_flags(CF | ZF, fl);
    }
    Ok(())
}

fn mul(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    let src = cpu.read_op(i, 0)? & mask(size);
    let a = cpu.reg_sized(0, size);
    mul_on_host(cpu, false, size, a, src);
    Ok(())
}

/// One-operand MUL/IMUL by the host (see [`h::mul1`]): CF=OF=overflow;
/// SF ZF AF PF are undefined, and the host decides them from the guest's
/// flags, as translated code's MUL does.
fn mul_on_host(cpu: &mut Cpu, signed: bool, size: usize, a: u64, b: u64) {
    let (lo, hi, fl) = h::mul1(signed, size, a, b, cpu.s.rflags);
    if size == 1 {
        cpu.set_reg_sized(0, 2, lo);
    } else {
        cpu.set_reg_sized(0, size, lo & mask(size));
        cpu.set_reg_sized(2, size, hi & mask(size));
    }
    cpu.set_flags(STATUS, fl);
}

fn imul(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    match i.op_count() {
        1 => {
            let (src, a) = (cpu.read_op(i, 0)?, cpu.reg_sized(0, size));
            mul_on_host(cpu, true, size, a, src);
        }
        _ => {
            let (a, b) = if i.op_count() == 2 {
                (cpu.read_op(i, 0)?, cpu.read_op(i, 1)?)
            } else {
                (cpu.read_op(i, 1)?, cpu.read_op(i, 2)?)
            };
            let fl_in = cpu.s.rflags;
            let (res, fl) = match size {
                2 => {
                    let (r, f) = h::imul2_16(a as u16, b as u16, fl_in);
                    (r as u64, f)
                }
                4 => {
                    let (r, f) = h::imul2_32(a as u32, b as u32, fl_in);
                    (r as u64, f)
                }
                _ => h::imul2_64(a, b, fl_in),
            };
            cpu.set_gpr(i.op0_register(), res);
            cpu.set_flags(STATUS, fl);
        }
    }
    Ok(())
}

fn div(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    let bits = size * 8;
    let src = cpu.read_op(i, 0)? & mask(size);
    if src == 0 {
        return Err(Fault::de());
    }
    let (hi, lo) = if size == 1 {
        let ax = cpu.reg_sized(0, 2);
        (ax >> 8, ax & 0xff)
    } else {
        (cpu.reg_sized(2, size), cpu.reg_sized(0, size))
    };
    let dividend = ((hi as u128) << bits) | lo as u128;
    let (q, r) = if i.mnemonic() == Mnemonic::Div {
        let q = dividend / src as u128;
        if q > mask(size) as u128 {
            return Err(Fault::de());
        }
        (q as u64, (dividend % src as u128) as u64)
    } else {
        // Sign-extend the 2*size dividend.
        let shift = 128 - 2 * bits as u32;
        let sd = ((dividend << shift) as i128) >> shift;
        let ss = super::sext(src, size) as i64 as i128;
        if sd == i128::MIN && ss == -1 {
            return Err(Fault::de());
        }
        let q = sd / ss;
        let min = -(1i128 << (bits - 1));
        let max = (1i128 << (bits - 1)) - 1;
        if q < min || q > max {
            return Err(Fault::de());
        }
        ((q as u64) & mask(size), ((sd % ss) as u64) & mask(size))
    };
    if size == 1 {
        cpu.set_reg_sized(0, 2, (r << 8) | q);
    } else {
        cpu.set_reg_sized(0, size, q);
        cpu.set_reg_sized(2, size, r);
    }
    // Flags are undefined after DIV/IDIV; leave them unchanged.
    Ok(())
}
