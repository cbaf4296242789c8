//! x87 floating point, MMX, FXSAVE/FXRSTOR.
//!
//! Arithmetic is exact: every x87 computation is carried out by the host's
//! own x87 unit (see `host`), loaded with the guest's 80-bit operands and the
//! guest's precision/rounding control (all host exceptions masked). The
//! result, the exception flags and the condition codes come back from the
//! host's status word. Everything around the computation — the register
//! stack, tags, stack faults, masked/unmasked exception policy, #NM/#MF —
//! is done here in software on `FpuState`.
//!
//! MMX register i aliases the mantissa of physical register R(i).

use iced_x86::{ConditionCode, Instruction, MemorySize, Mnemonic, OpKind, Register};

use super::Handler;
use crate::cpu::Cpu;
use crate::exception::{Fault, XResult};
use crate::state::flags::*;
use crate::state::{cr0, cr4};

mod host;
mod mmx;

use host::{hcall, F80};

/// MXCSR bits that FXRSTOR/LDMXCSR accept (DAZ supported).
pub const MXCSR_MASK: u32 = 0xffff;

// FSW bits.
const IE: u16 = 1 << 0;
const DE: u16 = 1 << 1;
const ZE: u16 = 1 << 2;
const OE: u16 = 1 << 3;
const UE: u16 = 1 << 4;
const SF: u16 = 1 << 6;
const ES: u16 = 1 << 7;
const C0: u16 = 1 << 8;
const C1: u16 = 1 << 9;
const C2: u16 = 1 << 10;
const C3: u16 = 1 << 14;
const BUSY: u16 = 1 << 15;
const CC: u16 = C0 | C1 | C2 | C3;

/// The "real indefinite" QNaN.
const INDEF: F80 = (0xc000_0000_0000_0000, 0xffff);
const ZERO: F80 = (0, 0);

pub fn lookup(i: &Instruction) -> Option<Handler> {
    if let Some(h) = mmx::lookup(i) {
        return Some(h);
    }
    use Mnemonic::*;
    Some(match i.mnemonic() {
        Fld => fld,
        Fst | Fstp | Fstpnce => fst,
        Fild => fild,
        Fist | Fistp | Fisttp | Fbstp => fist,
        Fbld => fild,
        Fld1 | Fldz | Fldpi | Fldl2e | Fldl2t | Fldlg2 | Fldln2 => fldconst,
        Fxch => fxch,
        Fadd | Faddp | Fiadd | Fsub | Fsubp | Fisub | Fsubr | Fsubrp | Fisubr | Fmul | Fmulp
        | Fimul | Fdiv | Fdivp | Fidiv | Fdivr | Fdivrp | Fidivr => farith,
        Fchs | Fabs => fchs_abs,
        Fsqrt | Frndint | F2xm1 | Fsin | Fcos => funary,
        Fscale | Fprem | Fprem1 => fbin_st1,
        Fyl2x | Fyl2xp1 | Fpatan => fbin_pop,
        Fxtract | Fptan | Fsincos => funary_push,
        Fcom | Fcomp | Fcompp | Fucom | Fucomp | Fucompp | Ficom | Ficomp | Ftst => fcom,
        Fcomi | Fcomip | Fucomi | Fucomip => fcomi,
        Fxam => fxam,
        Fcmovb | Fcmove | Fcmovbe | Fcmovu | Fcmovnb | Fcmovne | Fcmovnbe | Fcmovnu => fcmov,
        Fincstp | Fdecstp => fincdec,
        Ffree | Ffreep => ffree,
        Fnop => fnop,
        Fneni | Fndisi | Fnsetpm | Frstpm => fnop_nowait,
        Feni | Fdisi | Fsetpm => fwait,
        Wait => fwait,
        Fninit | Finit => fninit,
        Fnclex | Fclex => fnclex,
        Fnstsw | Fstsw => fnstsw,
        Fnstcw | Fstcw => fnstcw,
        Fldcw => fldcw,
        Fnstenv | Fstenv | Fnsave | Fsave => fnstenv,
        Fldenv | Frstor => fldenv,
        Fxsave | Fxsave64 => fxsave,
        Fxrstor | Fxrstor64 => fxrstor,
        Ldmxcsr => ldmxcsr,
        Stmxcsr => stmxcsr,
        _ => return None,
    })
}

// -------------------------------------------------------------------
// Register stack and exception bookkeeping.
// -------------------------------------------------------------------

fn has_mem(i: &Instruction) -> bool {
    (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory)
}

/// ST(i) index of operand `n` (a ST register).
fn sti(i: &Instruction, n: u32) -> usize {
    (i.op_register(n) as u32 - Register::ST0 as u32) as usize
}

impl Cpu {
    /// #NM / #MF checks for an x87 instruction. `wait`: a waiting
    /// instruction (checks for a pending unmasked exception).
    fn x87_check(&mut self, wait: bool) -> XResult<()> {
        if self.s.cr0 & (cr0::EM | cr0::TS) != 0 {
            return Err(Fault::nm());
        }
        if wait && self.s.fpu.fsw & ES != 0 && self.s.cr0 & cr0::NE != 0 {
            return Err(Fault::new(crate::exception::MF));
        }
        Ok(())
    }

    /// Entry of a non-control x87 instruction: checks, then FIP/FDP.
    fn x87_enter(&mut self, i: &Instruction) -> XResult<()> {
        self.x87_check(true)?;
        self.s.fpu.fip = self.s.rip;
        if has_mem(i) {
            self.s.fpu.fdp = self.ea(i);
        }
        Ok(())
    }

    fn fpu_top(&self) -> usize {
        ((self.s.fpu.fsw >> 11) & 7) as usize
    }
    fn fpu_set_top(&mut self, t: usize) {
        self.s.fpu.fsw = (self.s.fpu.fsw & !(7 << 11)) | (((t & 7) as u16) << 11);
    }
    fn fpu_phys(&self, i: usize) -> usize {
        (self.fpu_top() + i) & 7
    }
    fn st_empty(&self, i: usize) -> bool {
        self.s.fpu.ftw & (1 << self.fpu_phys(i)) == 0
    }
    /// ST0 for a store and the status bits to add: on stack underflow the
    /// indefinite value with IE|SF, or None when the unmasked underflow
    /// suppresses the store.
    fn st0_for_store(&mut self) -> Option<(F80, u16)> {
        if !self.st_empty(0) {
            return Some((self.st(0), 0));
        }
        self.fpu_underflow().then_some((INDEF, IE | SF))
    }

    fn st(&self, i: usize) -> F80 {
        self.s.fpu.st[self.fpu_phys(i)]
    }
    fn set_st(&mut self, i: usize, v: F80) {
        let p = self.fpu_phys(i);
        self.s.fpu.st[p] = v;
        self.s.fpu.ftw |= 1 << p;
    }
    fn fpu_pop(&mut self) {
        let p = self.fpu_phys(0);
        self.s.fpu.ftw &= !(1 << p);
        self.fpu_set_top(p + 1);
    }
    fn fpu_push(&mut self, v: F80) {
        let t = (self.fpu_top() + 7) & 7;
        self.fpu_set_top(t);
        self.set_st(0, v);
    }
    fn fpu_masked(&self, e: u16) -> bool {
        self.s.fpu.fcw & e == e
    }
    /// Would exceptions `hsw` (host status word) prevent the result from
    /// being committed? `block` lists the exceptions that do when unmasked.
    fn fpu_blocked(&self, hsw: u16, block: u16) -> bool {
        hsw & !self.s.fpu.fcw & block & 0x3f != 0
    }
    /// Merge the host's exception flags and the condition codes in `cmask`.
    fn fpu_apply(&mut self, hsw: u16, cmask: u16) {
        let f = &mut self.s.fpu;
        f.fsw = (f.fsw & !cmask) | (hsw & cmask) | (hsw & 0x7f);
        if f.fsw & !f.fcw & 0x3f != 0 {
            f.fsw |= ES | BUSY;
        }
    }
    /// Recompute ES/B from the flags and the mask.
    fn fpu_update_es(&mut self) {
        let f = &mut self.s.fpu;
        if f.fsw & !f.fcw & 0x3f != 0 {
            f.fsw |= ES | BUSY;
        } else {
            f.fsw &= !(ES | BUSY);
        }
    }
    /// Stack underflow: returns true when IE is masked (caller produces
    /// the indefinite result).
    fn fpu_underflow(&mut self) -> bool {
        self.s.fpu.fsw = (self.s.fpu.fsw | IE | SF) & !C1;
        self.fpu_update_es();
        self.fpu_masked(IE)
    }
    fn fpu_overflow(&mut self) -> bool {
        self.s.fpu.fsw |= IE | SF | C1;
        self.fpu_update_es();
        self.fpu_masked(IE)
    }
    /// Push with overflow check.
    fn fpu_push_checked(&mut self, v: F80, hsw: u16) {
        if !self.st_empty(7) {
            if self.fpu_overflow() {
                self.fpu_push(INDEF);
            }
            return;
        }
        if self.fpu_blocked(hsw, IE | DE) {
            self.fpu_apply(hsw, C1);
            return;
        }
        self.fpu_apply(hsw & !C1, C1);
        self.fpu_push(v);
    }

    /// Load the memory operand as an 80-bit value (with the conversion's
    /// exception flags).
    fn fpu_load_mem(&mut self, i: &Instruction) -> XResult<(F80, u16)> {
        let lin = self.mem_lin(i);
        let (f, n): (fn(&mut host::HBuf), usize) = match i.memory_size() {
            MemorySize::Float32 => (host::ld32, 4),
            MemorySize::Float64 => (host::ld64, 8),
            MemorySize::Int16 => (host::ild16, 2),
            MemorySize::Int32 => (host::ild32, 4),
            MemorySize::Int64 => (host::ild64, 8),
            MemorySize::Bcd => (host::bld, 10),
            MemorySize::Float80 => {
                let mut b = [0u8; 10];
                self.read_bytes(lin, &mut b)?;
                return Ok((host::from_bytes(&b), 0));
            }
            _ => return Err(Fault::ud()),
        };
        let mut b = [0u8; 10];
        self.read_bytes(lin, &mut b[..n])?;
        let h = hcall(f, self.s.fpu.fcw, ZERO, ZERO, &b[..n]);
        Ok((h.out0(), h.sw() & 0x3f))
    }

    fn fpu_hcw(&self) -> u16 {
        self.s.fpu.fcw
    }
}

// -------------------------------------------------------------------
// Loads and stores.
// -------------------------------------------------------------------

fn fld(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    if i.op0_kind() == OpKind::Memory {
        let (v, sw) = cpu.fpu_load_mem(i)?;
        cpu.fpu_push_checked(v, sw);
    } else {
        let s = sti(i, 0);
        if cpu.st_empty(s) {
            if cpu.fpu_underflow() {
                if !cpu.st_empty(7) {
                    cpu.fpu_overflow();
                }
                cpu.fpu_push(INDEF);
            }
            return Ok(());
        }
        let v = cpu.st(s);
        cpu.fpu_push_checked(v, 0);
    }
    Ok(())
}

fn fild(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    fld(cpu, i)
}

fn fst(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    let pop = i.mnemonic() != Mnemonic::Fst;
    let Some((v, hsw)) = cpu.st0_for_store() else {
        return Ok(());
    };
    if i.op0_kind() == OpKind::Memory {
        let lin = cpu.mem_lin(i);
        let (f, n): (fn(&mut host::HBuf), usize) = match i.memory_size() {
            MemorySize::Float32 => (host::st32, 4),
            MemorySize::Float64 => (host::st64, 8),
            MemorySize::Float80 => {
                cpu.write_bytes(lin, &host::to_bytes(v))?;
                cpu.fpu_apply(hsw, C1);
                if pop {
                    cpu.fpu_pop();
                }
                return Ok(());
            }
            _ => return Err(Fault::ud()),
        };
        let h = hcall(f, cpu.fpu_hcw(), v, ZERO, &[]);
        let sw = h.sw() | hsw;
        if cpu.fpu_blocked(sw, IE | DE | OE | UE) {
            cpu.fpu_apply(sw, C1);
            return Ok(());
        }
        cpu.write_bytes(lin, &h.mem()[..n])?;
        cpu.fpu_apply(sw, C1);
    } else {
        cpu.set_st(sti(i, 0), v);
        cpu.fpu_apply(hsw, C1);
    }
    if pop {
        cpu.fpu_pop();
    }
    Ok(())
}

/// FIST/FISTP/FISTTP/FBSTP.
fn fist(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    let pop = i.mnemonic() != Mnemonic::Fist;
    let Some((v, hsw)) = cpu.st0_for_store() else {
        return Ok(());
    };
    let tt = i.mnemonic() == Mnemonic::Fisttp;
    let (f, n): (fn(&mut host::HBuf), usize) = match (i.memory_size(), tt) {
        (MemorySize::Int16, false) => (host::ist16, 2),
        (MemorySize::Int32, false) => (host::ist32, 4),
        (MemorySize::Int64, false) => (host::ist64, 8),
        (MemorySize::Int16, true) => (host::istt16, 2),
        (MemorySize::Int32, true) => (host::istt32, 4),
        (MemorySize::Int64, true) => (host::istt64, 8),
        (MemorySize::Bcd, _) => (host::bstp, 10),
        _ => return Err(Fault::ud()),
    };
    let lin = cpu.mem_lin(i);
    let h = hcall(f, cpu.fpu_hcw(), v, ZERO, &[]);
    let sw = h.sw() | hsw;
    if cpu.fpu_blocked(sw, IE | DE) {
        cpu.fpu_apply(sw, C1);
        return Ok(());
    }
    cpu.write_bytes(lin, &h.mem()[..n])?;
    cpu.fpu_apply(sw, C1);
    if pop {
        cpu.fpu_pop();
    }
    Ok(())
}

fn fldconst(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    use Mnemonic::*;
    let f: fn(&mut host::HBuf) = match i.mnemonic() {
        Fld1 => host::ld1,
        Fldz => host::ldz,
        Fldpi => host::ldpi,
        Fldl2e => host::ldl2e,
        Fldl2t => host::ldl2t,
        Fldlg2 => host::ldlg2,
        _ => host::ldln2,
    };
    let h = hcall(f, cpu.fpu_hcw(), ZERO, ZERO, &[]);
    cpu.fpu_push_checked(h.out0(), 0);
    Ok(())
}

fn fxch(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    let s = if i.op_count() >= 2 { sti(i, 1) } else { 1 };
    if cpu.st_empty(0) || cpu.st_empty(s) {
        if !cpu.fpu_underflow() {
            return Ok(());
        }
        for k in [0, s] {
            if cpu.st_empty(k) {
                cpu.set_st(k, INDEF);
            }
        }
    } else {
        cpu.s.fpu.fsw &= !C1;
    }
    let (a, b) = (cpu.st(0), cpu.st(s));
    cpu.set_st(0, b);
    cpu.set_st(s, a);
    Ok(())
}

// -------------------------------------------------------------------
// Arithmetic.
// -------------------------------------------------------------------

fn farith(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    use Mnemonic::*;
    let m = i.mnemonic();
    let (f, rev): (fn(&mut host::HBuf), bool) = match m {
        Fadd | Faddp | Fiadd => (host::add, false),
        Fsub | Fsubp | Fisub => (host::sub, false),
        Fsubr | Fsubrp | Fisubr => (host::sub, true),
        Fmul | Fmulp | Fimul => (host::mul, false),
        Fdiv | Fdivp | Fidiv => (host::div, false),
        _ => (host::div, true),
    };
    let pop = matches!(m, Faddp | Fsubp | Fsubrp | Fmulp | Fdivp | Fdivrp);
    let (dst, src, csw, src_empty) = if has_mem(i) {
        let (v, sw) = cpu.fpu_load_mem(i)?;
        (0, v, sw, false)
    } else if i.op_count() >= 2 {
        let s = sti(i, 1);
        (sti(i, 0), cpu.st(s), 0, cpu.st_empty(s))
    } else {
        (1, cpu.st(0), 0, cpu.st_empty(0))
    };
    if src_empty || cpu.st_empty(dst) {
        if cpu.fpu_underflow() {
            cpu.set_st(dst, INDEF);
            if pop {
                cpu.fpu_pop();
            }
        }
        return Ok(());
    }
    let d = cpu.st(dst);
    let (a, b) = if rev { (src, d) } else { (d, src) };
    let h = hcall(f, cpu.fpu_hcw(), a, b, &[]);
    let sw = h.sw() | csw;
    if cpu.fpu_blocked(sw, IE | DE | ZE) {
        cpu.fpu_apply(sw, C1);
        return Ok(());
    }
    cpu.fpu_apply(sw, C1);
    cpu.set_st(dst, h.out0());
    if pop {
        cpu.fpu_pop();
    }
    Ok(())
}

fn fchs_abs(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    if cpu.st_empty(0) {
        if cpu.fpu_underflow() {
            cpu.set_st(0, INDEF);
        }
        return Ok(());
    }
    let (m, e) = cpu.st(0);
    let e = if i.mnemonic() == Mnemonic::Fchs {
        e ^ 0x8000
    } else {
        e & 0x7fff
    };
    cpu.set_st(0, (m, e));
    cpu.s.fpu.fsw &= !C1;
    Ok(())
}

fn funary(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    use Mnemonic::*;
    let (f, cm): (fn(&mut host::HBuf), u16) = match i.mnemonic() {
        Fsqrt => (host::sqrt, C1),
        Frndint => (host::rndint, C1),
        F2xm1 => (host::f2xm1, C1),
        Fsin => (host::sin, C1 | C2),
        _ => (host::cos, C1 | C2),
    };
    st0_op(cpu, f, cm, false)
}

/// ST0 = f(ST0[, ST1]) with stack-underflow and unmasked-exception rules
/// shared by the unary and ST1-operand instructions.
fn st0_op(cpu: &mut Cpu, f: fn(&mut host::HBuf), cm: u16, uses_st1: bool) -> XResult<()> {
    if cpu.st_empty(0) || (uses_st1 && cpu.st_empty(1)) {
        if cpu.fpu_underflow() {
            cpu.set_st(0, INDEF);
        }
        return Ok(());
    }
    let b = if uses_st1 { cpu.st(1) } else { ZERO };
    let h = hcall(f, cpu.fpu_hcw(), cpu.st(0), b, &[]);
    let sw = h.sw();
    cpu.fpu_apply(sw, cm);
    if !cpu.fpu_blocked(sw, IE | DE | ZE) {
        cpu.set_st(0, h.out0());
    }
    Ok(())
}

/// FSCALE, FPREM, FPREM1: ST0 = f(ST0, ST1).
fn fbin_st1(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    let (f, cm): (fn(&mut host::HBuf), u16) = match i.mnemonic() {
        Mnemonic::Fscale => (host::scale, C1),
        Mnemonic::Fprem => (host::prem, CC),
        _ => (host::prem1, CC),
    };
    st0_op(cpu, f, cm, true)
}

/// FYL2X, FYL2XP1, FPATAN: ST1 = f(ST0, ST1), pop.
fn fbin_pop(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    let f: fn(&mut host::HBuf) = match i.mnemonic() {
        Mnemonic::Fyl2x => host::yl2x,
        Mnemonic::Fyl2xp1 => host::yl2xp1,
        _ => host::patan,
    };
    if cpu.st_empty(0) || cpu.st_empty(1) {
        if cpu.fpu_underflow() {
            cpu.set_st(1, INDEF);
            cpu.fpu_pop();
        }
        return Ok(());
    }
    let h = hcall(f, cpu.fpu_hcw(), cpu.st(0), cpu.st(1), &[]);
    let sw = h.sw();
    if cpu.fpu_blocked(sw, IE | DE | ZE) {
        cpu.fpu_apply(sw, C1);
        return Ok(());
    }
    cpu.fpu_apply(sw, C1);
    cpu.set_st(1, h.out0());
    cpu.fpu_pop();
    Ok(())
}

/// FXTRACT, FPTAN, FSINCOS: ST0 = second result, push first.
fn funary_push(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    let (f, cm): (fn(&mut host::HBuf), u16) = match i.mnemonic() {
        Mnemonic::Fxtract => (host::xtract, C1),
        Mnemonic::Fptan => (host::ptan, C1 | C2),
        _ => (host::sincos, C1 | C2),
    };
    if cpu.st_empty(0) {
        if cpu.fpu_underflow() {
            cpu.set_st(0, INDEF);
            cpu.fpu_push(INDEF);
        }
        return Ok(());
    }
    if !cpu.st_empty(7) {
        if cpu.fpu_overflow() {
            cpu.set_st(0, INDEF);
            cpu.fpu_push(INDEF);
        }
        return Ok(());
    }
    let h = hcall(f, cpu.fpu_hcw(), cpu.st(0), ZERO, &[]);
    let sw = h.sw();
    if cpu.fpu_blocked(sw, IE | DE | ZE) {
        cpu.fpu_apply(sw, cm);
        return Ok(());
    }
    cpu.fpu_apply(sw, cm);
    if cm & C2 != 0 && sw & C2 != 0 {
        return Ok(()); // operand out of range: unchanged
    }
    cpu.set_st(0, h.out1());
    cpu.fpu_push(h.out0());
    Ok(())
}

// -------------------------------------------------------------------
// Comparisons and classification.
// -------------------------------------------------------------------

fn fcom(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    use Mnemonic::*;
    let m = i.mnemonic();
    let pops = match m {
        Fcomp | Fucomp | Ficomp => 1,
        Fcompp | Fucompp => 2,
        _ => 0,
    };
    let f: fn(&mut host::HBuf) = match m {
        Fucom | Fucomp | Fucompp => host::ucom,
        Ftst => host::tst,
        _ => host::com,
    };
    let (src, csw, src_empty) = if has_mem(i) {
        let (v, sw) = cpu.fpu_load_mem(i)?;
        (v, sw, false)
    } else if m == Ftst {
        (ZERO, 0, false)
    } else {
        let s = if i.op_count() >= 2 {
            sti(i, 1)
        } else if i.op_count() == 1 {
            sti(i, 0)
        } else {
            1
        };
        (cpu.st(s), 0, cpu.st_empty(s))
    };
    if src_empty || cpu.st_empty(0) {
        if cpu.fpu_underflow() {
            cpu.s.fpu.fsw |= C0 | C2 | C3;
            for _ in 0..pops {
                cpu.fpu_pop();
            }
        }
        return Ok(());
    }
    let h = hcall(f, cpu.fpu_hcw(), cpu.st(0), src, &[]);
    let sw = (h.sw() | csw) & !C1;
    if cpu.fpu_blocked(sw, IE | DE) {
        cpu.fpu_apply(sw, 0);
        return Ok(());
    }
    cpu.fpu_apply(sw, CC);
    for _ in 0..pops {
        cpu.fpu_pop();
    }
    Ok(())
}

fn fcomi(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    use Mnemonic::*;
    let m = i.mnemonic();
    let pop = matches!(m, Fcomip | Fucomip);
    let f: fn(&mut host::HBuf) = if matches!(m, Fucomi | Fucomip) {
        host::ucom
    } else {
        host::com
    };
    let s = if i.op_count() >= 2 { sti(i, 1) } else { 1 };
    let (zf, pf, cf);
    if cpu.st_empty(0) || cpu.st_empty(s) {
        if !cpu.fpu_underflow() {
            return Ok(());
        }
        (zf, pf, cf) = (true, true, true);
    } else {
        let h = hcall(f, cpu.fpu_hcw(), cpu.st(0), cpu.st(s), &[]);
        let sw = h.sw() & !C1;
        if cpu.fpu_blocked(sw, IE | DE) {
            cpu.fpu_apply(sw, 0);
            return Ok(());
        }
        cpu.fpu_apply(sw, C1);
        (zf, pf, cf) = (sw & C3 != 0, sw & C2 != 0, sw & C0 != 0);
    }
    let fl = if zf { ZF } else { 0 } | if pf { PF } else { 0 } | if cf { CF } else { 0 };
    cpu.set_flags(STATUS, fl);
    if pop {
        cpu.fpu_pop();
    }
    Ok(())
}

fn fxam(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    let v = cpu.st(0);
    let sign = if v.1 & 0x8000 != 0 { C1 } else { 0 };
    let cc = if cpu.st_empty(0) {
        C3 | C0 | sign
    } else {
        let h = hcall(host::xam, cpu.fpu_hcw(), v, ZERO, &[]);
        h.sw() & CC
    };
    cpu.s.fpu.fsw = (cpu.s.fpu.fsw & !CC) | cc;
    Ok(())
}

fn fcmov(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    use Mnemonic::*;
    let cc = match i.mnemonic() {
        Fcmovb => ConditionCode::b,
        Fcmove => ConditionCode::e,
        Fcmovbe => ConditionCode::be,
        Fcmovu => ConditionCode::p,
        Fcmovnb => ConditionCode::ae,
        Fcmovne => ConditionCode::ne,
        Fcmovnbe => ConditionCode::a,
        _ => ConditionCode::np,
    };
    let s = sti(i, 1);
    if cpu.st_empty(0) || cpu.st_empty(s) {
        if cpu.fpu_underflow() {
            cpu.set_st(0, INDEF);
        }
        return Ok(());
    }
    cpu.s.fpu.fsw &= !C1;
    if cpu.cond(cc) {
        let v = cpu.st(s);
        cpu.set_st(0, v);
    }
    Ok(())
}

// -------------------------------------------------------------------
// Stack and control.
// -------------------------------------------------------------------

fn fincdec(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    let t = cpu.fpu_top();
    cpu.fpu_set_top(if i.mnemonic() == Mnemonic::Fincstp {
        t + 1
    } else {
        t + 7
    });
    cpu.s.fpu.fsw &= !C1;
    Ok(())
}

fn ffree(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)?;
    let p = cpu.fpu_phys(sti(i, 0));
    cpu.s.fpu.ftw &= !(1 << p);
    if i.mnemonic() == Mnemonic::Ffreep {
        cpu.fpu_pop();
    }
    Ok(())
}

fn fnop(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_enter(i)
}

fn fnop_nowait(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    cpu.x87_check(false)
}

fn fwait(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    let c = cpu.s.cr0;
    if c & cr0::TS != 0 && c & cr0::MP != 0 {
        return Err(Fault::nm());
    }
    if cpu.s.fpu.fsw & ES != 0 && c & cr0::NE != 0 {
        return Err(Fault::new(crate::exception::MF));
    }
    Ok(())
}

fn is_wait_form(i: &Instruction) -> bool {
    use Mnemonic::*;
    matches!(i.mnemonic(), Finit | Fclex | Fstsw | Fstcw | Fstenv | Fsave)
}

impl Cpu {
    fn fpu_init(&mut self) {
        let f = &mut self.s.fpu;
        f.fcw = 0x037f;
        f.fsw = 0;
        f.ftw = 0;
        f.fop = 0;
        f.fip = 0;
        f.fdp = 0;
    }
}

fn fninit(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_check(is_wait_form(i))?;
    cpu.fpu_init();
    Ok(())
}

fn fnclex(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_check(is_wait_form(i))?;
    cpu.s.fpu.fsw &= 0x7f00;
    Ok(())
}

fn fnstsw(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_check(is_wait_form(i))?;
    let v = cpu.s.fpu.fsw;
    if i.op0_kind() == OpKind::Register {
        cpu.set_gpr(Register::AX, v as u64);
        Ok(())
    } else {
        let lin = cpu.mem_lin(i);
        cpu.write_u16(lin, v)
    }
}

fn fnstcw(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_check(is_wait_form(i))?;
    let lin = cpu.mem_lin(i);
    let v = cpu.s.fpu.fcw;
    cpu.write_u16(lin, v)
}

fn fldcw(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_check(true)?;
    let lin = cpu.mem_lin(i);
    let v = cpu.read_u16(lin)?;
    cpu.s.fpu.fcw = (v & 0x1f3f) | 0x40;
    cpu.fpu_update_es();
    Ok(())
}

/// Full two-bit tag of physical register `p`.
fn full_tag(f: &crate::state::FpuState, p: usize) -> u16 {
    if f.ftw & (1 << p) == 0 {
        return 3;
    }
    let (m, se) = f.st[p];
    let e = se & 0x7fff;
    if e == 0x7fff {
        2
    } else if e == 0 {
        if m == 0 {
            1
        } else {
            2
        }
    } else if m >> 63 == 0 {
        2
    } else {
        0
    }
}

fn full_tag_word(f: &crate::state::FpuState) -> u16 {
    (0..8).fold(0u16, |w, p| w | (full_tag(f, p) << (2 * p)))
}

fn abridge(tw: u16) -> u8 {
    (0..8).fold(0u8, |a, p| {
        if (tw >> (2 * p)) & 3 != 3 {
            a | (1 << p)
        } else {
            a
        }
    })
}

/// FNSTENV / FNSAVE (and the waiting forms).
fn fnstenv(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_check(is_wait_form(i))?;
    let save = matches!(i.mnemonic(), Mnemonic::Fnsave | Mnemonic::Fsave);
    let big = matches!(
        i.memory_size(),
        MemorySize::FpuEnv28 | MemorySize::FpuState108
    );
    let real = !cpu.s.protected() || cpu.s.v86();
    let f = &cpu.s.fpu;
    let tw = full_tag_word(f);
    let (fip, fdp, fop) = (f.fip, f.fdp, f.fop as u32 & 0x7ff);
    let mut img = Vec::with_capacity(108);
    let env: [u32; 7] = if real {
        [
            f.fcw as u32,
            f.fsw as u32,
            tw as u32,
            fip as u32 & 0xffff,
            ((fip as u32 >> 16) << 12) | fop,
            fdp as u32 & 0xffff,
            (fdp as u32 >> 16) << 12,
        ]
    } else {
        [
            f.fcw as u32,
            f.fsw as u32,
            tw as u32,
            fip as u32,
            fop << 16,
            fdp as u32,
            0,
        ]
    };
    if big {
        for (k, w) in env.iter().enumerate() {
            let w = if k < 3 || (real && (k == 3 || k == 5)) {
                w | 0xffff_0000
            } else {
                *w
            };
            img.extend_from_slice(&w.to_le_bytes());
        }
    } else {
        for w in env {
            img.extend_from_slice(&(w as u16).to_le_bytes());
        }
    }
    if save {
        for k in 0..8 {
            img.extend_from_slice(&host::to_bytes(cpu.st(k)));
        }
    }
    let lin = cpu.mem_lin(i);
    cpu.write_bytes(lin, &img)?;
    if save {
        cpu.fpu_init();
    } else {
        cpu.s.fpu.fcw |= 0x3f;
        cpu.fpu_update_es();
    }
    Ok(())
}

/// FLDENV / FRSTOR.
fn fldenv(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.x87_check(true)?;
    let restore = i.mnemonic() == Mnemonic::Frstor;
    let big = matches!(
        i.memory_size(),
        MemorySize::FpuEnv28 | MemorySize::FpuState108
    );
    let real = !cpu.s.protected() || cpu.s.v86();
    let envlen = if big { 28 } else { 14 };
    let mut img = vec![0u8; envlen + if restore { 80 } else { 0 }];
    let lin = cpu.mem_lin(i);
    cpu.read_bytes(lin, &mut img)?;
    let w: Vec<u32> = (0..7)
        .map(|k| {
            if big {
                u32::from_le_bytes(img[k * 4..k * 4 + 4].try_into().unwrap())
            } else {
                u16::from_le_bytes(img[k * 2..k * 2 + 2].try_into().unwrap()) as u32
            }
        })
        .collect();
    let f = &mut cpu.s.fpu;
    f.fcw = (w[0] as u16 & 0x1f3f) | 0x40;
    f.fsw = w[1] as u16;
    f.ftw = abridge(w[2] as u16);
    if real {
        let hi = if big { 0xffff } else { 0xf };
        f.fip = ((w[3] & 0xffff) | (((w[4] >> 12) & hi) << 16)) as u64;
        f.fop = (w[4] & 0x7ff) as u16;
        f.fdp = ((w[5] & 0xffff) | (((w[6] >> 12) & hi) << 16)) as u64;
    } else {
        f.fip = w[3] as u64;
        f.fop = if big {
            ((w[4] >> 16) & 0x7ff) as u16
        } else {
            0
        };
        f.fdp = w[5] as u64;
    }
    if restore {
        for k in 0..8 {
            let o = envlen + k * 10;
            let v = host::from_bytes(&img[o..o + 10]);
            let p = cpu.fpu_phys(k);
            cpu.s.fpu.st[p] = v;
        }
    }
    cpu.fpu_update_es();
    Ok(())
}

// -------------------------------------------------------------------
// FXSAVE / FXRSTOR, LDMXCSR / STMXCSR.
// -------------------------------------------------------------------

fn fx_regs(cpu: &Cpu) -> usize {
    if cpu.s.mode64() {
        16
    } else {
        8
    }
}

fn fxsave(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    if cpu.s.cr0 & (cr0::EM | cr0::TS) != 0 {
        return Err(Fault::nm());
    }
    let lin = cpu.mem_lin(i);
    if lin & 15 != 0 {
        return Err(Fault::gp0());
    }
    let n = fx_regs(cpu);
    let mut img = vec![0u8; 160 + 16 * n];
    let f = &cpu.s.fpu;
    img[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    img[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    img[4] = f.ftw;
    img[6..8].copy_from_slice(&f.fop.to_le_bytes());
    if i.mnemonic() == Mnemonic::Fxsave64 {
        img[8..16].copy_from_slice(&f.fip.to_le_bytes());
        img[16..24].copy_from_slice(&f.fdp.to_le_bytes());
    } else {
        img[8..12].copy_from_slice(&(f.fip as u32).to_le_bytes());
        img[16..20].copy_from_slice(&(f.fdp as u32).to_le_bytes());
    }
    img[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    img[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
    for k in 0..8 {
        img[32 + k * 16..42 + k * 16].copy_from_slice(&host::to_bytes(cpu.st(k)));
    }
    for k in 0..n {
        img[160 + k * 16..176 + k * 16].copy_from_slice(&f.xmm[k].to_le_bytes());
    }
    cpu.write_bytes(lin, &img)
}

fn fxrstor(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    if cpu.s.cr0 & (cr0::EM | cr0::TS) != 0 {
        return Err(Fault::nm());
    }
    let lin = cpu.mem_lin(i);
    if lin & 15 != 0 {
        return Err(Fault::gp0());
    }
    let n = fx_regs(cpu);
    let mut img = vec![0u8; 160 + 16 * n];
    cpu.read_bytes(lin, &mut img)?;
    let u16at = |o: usize| u16::from_le_bytes(img[o..o + 2].try_into().unwrap());
    let u32at = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().unwrap());
    let u64at = |o: usize| u64::from_le_bytes(img[o..o + 8].try_into().unwrap());
    let mxcsr = u32at(24);
    if mxcsr & !MXCSR_MASK != 0 {
        return Err(Fault::gp0());
    }
    let wide = i.mnemonic() == Mnemonic::Fxrstor64;
    let f = &mut cpu.s.fpu;
    f.fcw = (u16at(0) & 0x1f3f) | 0x40;
    f.fsw = u16at(2);
    f.ftw = img[4];
    f.fop = u16at(6) & 0x7ff;
    f.fip = if wide { u64at(8) } else { u32at(8) as u64 };
    f.fdp = if wide { u64at(16) } else { u32at(16) as u64 };
    f.mxcsr = mxcsr;
    for k in 0..n {
        f.xmm[k] = u128::from_le_bytes(img[160 + k * 16..176 + k * 16].try_into().unwrap());
    }
    for k in 0..8 {
        let v = host::from_bytes(&img[32 + k * 16..42 + k * 16]);
        let p = cpu.fpu_phys(k);
        cpu.s.fpu.st[p] = v;
    }
    cpu.fpu_update_es();
    Ok(())
}

fn mxcsr_check(cpu: &Cpu) -> XResult<()> {
    if cpu.s.cr0 & cr0::EM != 0 || cpu.s.cr4 & cr4::OSFXSR == 0 {
        return Err(Fault::ud());
    }
    if cpu.s.cr0 & cr0::TS != 0 {
        return Err(Fault::nm());
    }
    Ok(())
}

fn ldmxcsr(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    mxcsr_check(cpu)?;
    let lin = cpu.mem_lin(i);
    let v = cpu.read_u32(lin)?;
    if v & !MXCSR_MASK != 0 {
        return Err(Fault::gp0());
    }
    cpu.s.fpu.mxcsr = v;
    Ok(())
}

fn stmxcsr(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    mxcsr_check(cpu)?;
    let lin = cpu.mem_lin(i);
    let v = cpu.s.fpu.mxcsr;
    cpu.write_u32(lin, v)
}
