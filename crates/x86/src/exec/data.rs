//! Data movement: MOV family, LEA, XCHG, CMOV/SET, stack, conversions,
//! atomic exchange-and-compare, byte swapping, flag moves.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::{mask, sext, Handler};
use crate::cpu::Cpu;
use crate::exception::{Fault, XResult};
use crate::hostalu as h;
use crate::state::flags::*;

pub fn lookup(i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    Some(match i.mnemonic() {
        Mov => {
            if (0..2).any(|n| {
                i.op_kind(n) == OpKind::Register && {
                    let r = i.op_register(n);
                    r.is_segment_register() || r.is_cr() || r.is_dr() || r.is_tr()
                }
            }) {
                return None; // system forms live in system.rs
            }
            mov
        }
        Movzx => movzx,
        Movsx | Movsxd => movsx,
        Lea => lea,
        Xchg => xchg,
        Cmovo | Cmovno | Cmovb | Cmovae | Cmove | Cmovne | Cmovbe | Cmova | Cmovs | Cmovns
        | Cmovp | Cmovnp | Cmovl | Cmovge | Cmovle | Cmovg => cmov,
        Seto | Setno | Setb | Setae | Sete | Setne | Setbe | Seta | Sets | Setns | Setp | Setnp
        | Setl | Setge | Setle | Setg => setcc,
        Push => {
            if i.op0_kind() == OpKind::Register && i.op0_register().is_segment_register() {
                return None;
            }
            push
        }
        Pop => {
            if i.op0_kind() == OpKind::Register && i.op0_register().is_segment_register() {
                return None;
            }
            pop
        }
        Pusha | Pushad => pusha,
        Popa | Popad => popa,
        Cbw | Cwde | Cdqe => cbw,
        Cwd | Cdq | Cqo => cwd,
        Bswap => bswap,
        Xadd => xadd,
        Cmpxchg => cmpxchg,
        Cmpxchg8b | Cmpxchg16b => cmpxchg_wide,
        Movbe => movbe,
        Nop | Pause | Prefetchnta | Prefetcht0 | Prefetcht1 | Prefetcht2 | Prefetchw | Lfence
        | Sfence | Mfence | Endbr64 | Endbr32 => nop,
        // Serializing: the block ends here (`ends_block`), so the next
        // instruction is fetched and validated anew.
        Serialize => nop,
        Lahf => lahf,
        Sahf => sahf,
        Clc => |c, _| {
            c.s.rflags &= !CF;
            Ok(())
        },
        Stc => |c, _| {
            c.s.rflags |= CF;
            Ok(())
        },
        Cmc => |c, _| {
            c.s.rflags ^= CF;
            Ok(())
        },
        Cld => |c, _| {
            c.s.rflags &= !DF;
            Ok(())
        },
        Std => |c, _| {
            c.s.rflags |= DF;
            Ok(())
        },
        Xlatb => xlat,
        Enter => enter,
        Leave => leave,
        Movnti => mov,
        _ => return None,
    })
}

fn nop(_: &mut Cpu, i: &Instruction) -> XResult<()> {
    let _ = i;
    Ok(())
}

fn mov(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let v = cpu.read_op(i, 1)?;
    cpu.write_op(i, 0, v)
}

fn movzx(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let s = cpu.op_size(i, 1);
    let v = cpu.read_op(i, 1)? & mask(s);
    cpu.write_op(i, 0, v)
}

fn movsx(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let s = cpu.op_size(i, 1);
    let v = sext(cpu.read_op(i, 1)?, s);
    cpu.write_op(i, 0, v)
}

fn lea(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let v = cpu.ea(i);
    cpu.write_op(i, 0, v)
}

fn xchg(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    if i.op0_kind() == OpKind::Register && i.op1_kind() == OpKind::Register {
        let a = cpu.gpr(i.op0_register());
        let b = cpu.gpr(i.op1_register());
        cpu.set_gpr(i.op0_register(), b);
        cpu.set_gpr(i.op1_register(), a);
        return Ok(());
    }
    // XCHG with memory is always locked.
    let (mem_n, reg) = if i.op0_kind() == OpKind::Memory {
        (0, i.op1_register())
    } else {
        (1, i.op0_register())
    };
    let _ = mem_n;
    let new = cpu.gpr(reg);
    let lin = cpu.mem_lin(i);
    let old = if let Some(p) = cpu.atomic_host_ptr(lin, size)? {
        // SAFETY: aligned guest RAM within one page.
        unsafe { super::atomic_rmw(p, size, &mut |_| (new, 0)).0 }
    } else {
        let old = cpu.read_sized(lin, size)?;
        cpu.write_sized(lin, size, new)?;
        old
    };
    cpu.set_gpr(reg, old);
    Ok(())
}

fn cmov(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let v = cpu.read_op(i, 1)?;
    let r = i.op0_register();
    if cpu.cond(i.condition_code()) {
        cpu.set_gpr(r, v);
    } else if r.size() == 4 {
        // A 32-bit CMOV writes its destination even when false.
        let cur = cpu.gpr(r);
        cpu.set_gpr(r, cur);
    }
    Ok(())
}

fn setcc(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let v = cpu.cond(i.condition_code()) as u64;
    cpu.write_op(i, 0, v)
}

fn push(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.stack_op_size(i);
    let v = cpu.read_op(i, 0)?;
    cpu.push(size, v)
}

fn pop(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.stack_op_size(i);
    if i.op0_kind() == OpKind::Memory {
        // The address is computed after RSP is incremented.
        let v = cpu.peek(size, 0)?;
        let old_sp = cpu.s.gpr[4];
        cpu.pop(size)?;
        if let Err(f) = cpu.write_op(i, 0, v) {
            cpu.s.gpr[4] = old_sp;
            return Err(f);
        }
        return Ok(());
    }
    let v = cpu.pop(size)?;
    cpu.write_op(i, 0, v)
}

fn pusha(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = if i.mnemonic() == Mnemonic::Pushad {
        4
    } else {
        2
    };
    let sp = cpu.s.gpr[4];
    for r in 0..8 {
        let v = if r == 4 { sp } else { cpu.s.gpr[r] };
        if let Err(f) = cpu.push(size, v) {
            cpu.s.gpr[4] = sp;
            return Err(f);
        }
    }
    Ok(())
}

fn popa(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = if i.mnemonic() == Mnemonic::Popad {
        4
    } else {
        2
    };
    let mut vals = [0u64; 8];
    for (k, v) in vals.iter_mut().enumerate() {
        *v = cpu.peek(size, (k * size) as u64)?;
    }
    for (k, &v) in vals.iter().enumerate() {
        let r = 7 - k;
        if r != 4 {
            cpu.set_reg_sized(r, size, v);
        }
    }
    let sp = cpu.s.gpr[4];
    let m = if cpu.stack_addr_size() == 4 {
        0xffff_ffff
    } else {
        0xffff
    };
    cpu.s.gpr[4] = (sp & !m) | (sp.wrapping_add(8 * size as u64) & m);
    Ok(())
}

fn cbw(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = match i.mnemonic() {
        Mnemonic::Cbw => 2,
        Mnemonic::Cwde => 4,
        _ => 8,
    };
    let v = sext(cpu.reg_sized(0, size / 2), size / 2);
    cpu.set_reg_sized(0, size, v);
    Ok(())
}

fn cwd(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = match i.mnemonic() {
        Mnemonic::Cwd => 2,
        Mnemonic::Cdq => 4,
        _ => 8,
    };
    let a = cpu.reg_sized(0, size);
    let v = if (a >> (size * 8 - 1)) & 1 != 0 {
        u64::MAX
    } else {
        0
    };
    cpu.set_reg_sized(2, size, v);
    Ok(())
}

fn bswap(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let r = i.op0_register();
    let v = cpu.gpr(r);
    let out = match r.size() {
        8 => v.swap_bytes(),
        4 => (v as u32).swap_bytes() as u64,
        _ => 0, // BSWAP r16 is undefined; hardware yields 0
    };
    cpu.set_gpr(r, out);
    Ok(())
}

fn movbe(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    let v = cpu.read_op(i, 1)?;
    let swapped = match size {
        2 => (v as u16).swap_bytes() as u64,
        4 => (v as u32).swap_bytes() as u64,
        _ => v.swap_bytes(),
    };
    cpu.write_op(i, 0, swapped)
}

fn xadd(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    let src_reg = i.op1_register();
    let b = cpu.gpr(src_reg);
    if i.op0_kind() == OpKind::Register {
        let d = i.op0_register();
        let a = cpu.gpr(d);
        let (sum, fl) = h::add(size, a, b);
        cpu.set_gpr(src_reg, a);
        cpu.set_gpr(d, sum);
        cpu.set_flags(STATUS, fl);
    } else {
        let (old, fl) = cpu.rmw_mem(i, size, |a| h::add(size, a, b))?;
        cpu.set_gpr(src_reg, old);
        cpu.set_flags(STATUS, fl);
    }
    Ok(())
}

fn cmpxchg(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.op_size(i, 0);
    let acc = cpu.reg_sized(0, size);
    let src = cpu.gpr(i.op1_register());
    if i.op0_kind() == OpKind::Register {
        let d = i.op0_register();
        let cur = cpu.gpr(d);
        let (_, fl) = h::sub(size, acc, cur);
        if cur == acc {
            cpu.set_gpr(d, src);
        } else {
            cpu.set_reg_sized(0, size, cur);
        }
        cpu.set_flags(STATUS, fl);
        return Ok(());
    }
    // Memory: the destination is always written (with the old value on failure).
    let (old, _) = cpu.rmw_mem(i, size, |cur| if cur == acc { (src, 0) } else { (cur, 0) })?;
    let (_, fl) = h::sub(size, acc, old);
    if old != acc {
        cpu.set_reg_sized(0, size, old);
    }
    cpu.set_flags(STATUS, fl);
    Ok(())
}

fn cmpxchg_wide(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let wide = i.mnemonic() == Mnemonic::Cmpxchg16b;
    let lin = cpu.mem_lin(i);
    let half = if wide { 8 } else { 4 };
    if wide && lin & 15 != 0 {
        return Err(Fault::gp0());
    }
    let expect_lo = cpu.reg_sized(0, half);
    let expect_hi = cpu.reg_sized(2, half);
    let new_lo = cpu.reg_sized(3, half);
    let new_hi = cpu.reg_sized(1, half);
    let (old_lo, old_hi, ok);
    let ptr = if lin & (2 * half as u64 - 1) == 0 {
        cpu.atomic_host_ptr(lin, 2 * half)?
    } else {
        None
    };
    if let Some(p) = ptr {
        if wide {
            let expect = (expect_hi as u128) << 64 | expect_lo as u128;
            let new = (new_hi as u128) << 64 | new_lo as u128;
            // SAFETY: 16-byte aligned guest RAM within one page.
            let (prev, success) = unsafe { cmpxchg16b_host(p as *mut u128, expect, new) };
            old_lo = prev as u64;
            old_hi = (prev >> 64) as u64;
            ok = success;
        } else {
            use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
            // SAFETY: 8-byte aligned guest RAM within one page.
            let a = unsafe { &*(p as *const AtomicU64) };
            let expect = expect_hi << 32 | expect_lo;
            let new = new_hi << 32 | new_lo;
            let r = a.compare_exchange(expect, new, SeqCst, SeqCst);
            let prev = r.unwrap_or_else(|v| v);
            old_lo = prev & 0xffff_ffff;
            old_hi = prev >> 32;
            ok = r.is_ok();
        }
    } else {
        let lo = cpu.read_sized(lin, half)?;
        let hi = cpu.read_sized(lin + half as u64, half)?;
        ok = lo == expect_lo && hi == expect_hi;
        let (wl, wh) = if ok { (new_lo, new_hi) } else { (lo, hi) };
        cpu.write_sized(lin, half, wl)?;
        cpu.write_sized(lin + half as u64, half, wh)?;
        old_lo = lo;
        old_hi = hi;
    }
    if ok {
        cpu.s.rflags |= ZF;
    } else {
        cpu.s.rflags &= !ZF;
        cpu.set_reg_sized(0, half, old_lo);
        cpu.set_reg_sized(2, half, old_hi);
    }
    Ok(())
}

/// # Safety
/// `p` must be 16-byte aligned and valid for reads and writes.
unsafe fn cmpxchg16b_host(p: *mut u128, expect: u128, new: u128) -> (u128, bool) {
    let mut lo = expect as u64;
    let mut hi = (expect >> 64) as u64;
    let ok: u8;
    // SAFETY: caller guarantees alignment and validity; RBX is saved
    // manually because LLVM reserves it.
    core::arch::asm!(
        "xchg {nb}, rbx",
        "lock cmpxchg16b [{p}]",
        "sete {ok}",
        "mov rbx, {nb}",
        p = in(reg) p,
        nb = inout(reg) new as u64 => _,
        ok = out(reg_byte) ok,
        inout("rax") lo,
        inout("rdx") hi,
        in("rcx") (new >> 64) as u64,
    );
    ((hi as u128) << 64 | lo as u128, ok != 0)
}

fn lahf(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    let v = (cpu.s.rflags & (SF | ZF | AF | PF | CF)) | FIXED1;
    cpu.set_gpr(Register::AH, v);
    Ok(())
}

fn sahf(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    let v = cpu.gpr(Register::AH);
    cpu.set_flags(SF | ZF | AF | PF | CF, v);
    Ok(())
}

fn xlat(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let al = cpu.gpr(Register::AL);
    let asz = cpu.addr_size(i);
    let base = cpu.reg_sized(3, asz);
    let off = base.wrapping_add(al) & mask(asz);
    let seg = super::seg_index(i.memory_segment());
    let lin = cpu.mask_lin(cpu.seg_base(seg).wrapping_add(off));
    let v = cpu.read_u8(lin)?;
    cpu.set_gpr(Register::AL, v as u64);
    Ok(())
}

fn enter(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.stack_op_size(i);
    let alloc = i.immediate16() as u64;
    let level = (i.immediate8_2nd() & 31) as u64;
    let old_sp = cpu.s.gpr[4];
    let res = (|| -> XResult<()> {
        let bp = cpu.reg_sized(5, size);
        cpu.push(size, bp)?;
        let frame = cpu.reg_sized(4, cpu.stack_addr_size());
        let mut bp_walk = bp;
        for _ in 1..level {
            bp_walk = bp_walk.wrapping_sub(size as u64);
            let lin = cpu
                .seg_base(crate::state::SS)
                .wrapping_add(bp_walk & mask(cpu.stack_addr_size()));
            let v = cpu.read_sized(cpu.mask_lin(lin), size)?;
            cpu.push(size, v)?;
        }
        if level > 0 {
            cpu.push(size, frame)?;
        }
        let sz = cpu.stack_addr_size();
        let sp = cpu.reg_sized(4, sz).wrapping_sub(alloc);
        // Probe the new stack top like hardware does.
        let lin = cpu.seg_base(crate::state::SS).wrapping_add(sp & mask(sz));
        let probe = cpu.mask_lin(lin);
        let b = cpu.read_u8(probe)?;
        cpu.write_u8(probe, b)?;
        cpu.set_reg_sized(5, size, frame);
        cpu.set_reg_sized(4, sz, sp);
        Ok(())
    })();
    if res.is_err() {
        cpu.s.gpr[4] = old_sp;
    }
    res
}

fn leave(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.stack_op_size(i);
    let sz = cpu.stack_addr_size();
    let old_sp = cpu.s.gpr[4];
    let bp = cpu.reg_sized(5, sz);
    cpu.set_reg_sized(4, sz, bp);
    match cpu.pop(size) {
        Ok(v) => {
            cpu.set_reg_sized(5, size, v);
            Ok(())
        }
        Err(f) => {
            cpu.s.gpr[4] = old_sp;
            Err(f)
        }
    }
}
