//! SSE, SSE2, SSE3, SSSE3, SSE4.1 and SSE4.2.
//!
//! Host and guest share the ISA, so every floating-point operation (and the
//! integer operations whose semantics are intricate) runs the very same
//! instruction on the host through inline assembly: NaN propagation, -0.0,
//! rounding, denormals, DAZ/FTZ and the approximations of RCP/RSQRT are
//! bit-exact with the hardware. Floating-point operations run under the
//! guest's MXCSR (rounding control, DAZ, FTZ) with every exception masked on
//! the host; the flags raised are merged into the guest MXCSR afterwards and
//! an exception the guest left unmasked raises #XM (or #UD without
//! CR4.OSXMMEXCPT) without writing the destination.
//!
//! Data movement, shuffles with immediates and inserts/extracts are plain
//! Rust on lanes.
//!
//! MMX-register forms belong to the x87/MMX family, except the conversions
//! that mix XMM and MMX operands (CVTPI2PS ... MOVDQ2Q), which live here.

use core::arch::asm;
use core::arch::x86_64::__m128i;

use iced_x86::{Code, EncodingKind, Instruction, Mnemonic, OpKind, Register};

use super::Handler;
use crate::cpu::Cpu;
use crate::exception::{self, Fault, XResult};
use crate::hostalu::ax_to_flags;
use crate::state::flags::*;
use crate::state::{cr0, cr4};

#[macro_use]
mod table;

type V = __m128i;

#[inline(always)]
fn v(x: u128) -> V {
    // SAFETY: both are 16 plain bytes.
    unsafe { core::mem::transmute::<u128, V>(x) }
}

#[inline(always)]
fn u(x: V) -> u128 {
    // SAFETY: both are 16 plain bytes.
    unsafe { core::mem::transmute::<V, u128>(x) }
}

const LO64: u128 = u64::MAX as u128;
const LO32: u128 = u32::MAX as u128;

// -------------------------------------------------------------------
// Common checks and operand access.
// -------------------------------------------------------------------

/// CR0.EM or !CR4.OSFXSR → #UD; CR0.TS → #NM.
#[inline(always)]
fn sse_check(cpu: &Cpu) -> XResult<()> {
    if cpu.s.cr0 & cr0::EM != 0 || cpu.s.cr4 & cr4::OSFXSR == 0 {
        return Err(Fault::ud());
    }
    if cpu.s.cr0 & cr0::TS != 0 {
        return Err(Fault::nm());
    }
    Ok(())
}

#[inline(always)]
fn xi(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::XMM0 as usize) & 15
}

#[inline(always)]
fn mi(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::MM0 as usize) & 7
}

/// Legacy SSE forms whose 16-byte memory operand may be misaligned.
#[inline(always)]
fn unaligned_ok(i: &Instruction) -> bool {
    use Mnemonic::*;
    matches!(
        i.mnemonic(),
        Movups
            | Movupd
            | Movdqu
            | Lddqu
            | Pcmpestri
            | Pcmpestri64
            | Pcmpestrm
            | Pcmpestrm64
            | Pcmpistri
            | Pcmpistrm
    )
}

#[inline(always)]
fn check_align(i: &Instruction, lin: u64, size: usize) -> XResult<()> {
    if size == 16 && lin & 15 != 0 && !unaligned_ok(i) {
        return Err(Fault::gp0());
    }
    Ok(())
}

impl Cpu {
    /// Read operand `n` of an SSE instruction zero-extended to 128 bits:
    /// an XMM/MMX/general register, the memory operand (access size from
    /// the instruction, aligned forms checked) or an 8-bit immediate.
    #[inline(always)]
    fn sse_src(&mut self, i: &Instruction, n: u32) -> XResult<u128> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                Ok(if r.is_xmm() {
                    self.s.fpu.xmm[xi(r)]
                } else if r.is_mm() {
                    self.s.fpu.st[mi(r)].0 as u128
                } else {
                    self.gpr(r) as u128
                })
            }
            OpKind::Memory => {
                let lin = self.mem_lin(i);
                let size = i.memory_size().size();
                self.sse_read_mem(i, lin, size)
            }
            _ => Ok(i.immediate(n) as u8 as u128),
        }
    }

    #[inline(always)]
    fn sse_read_mem(&mut self, i: &Instruction, lin: u64, size: usize) -> XResult<u128> {
        Ok(match size {
            16 => {
                check_align(i, lin, 16)?;
                self.read_u128(lin)?
            }
            8 => self.read_u64(lin)? as u128,
            4 => self.read_u32(lin)? as u128,
            2 => self.read_u16(lin)? as u128,
            _ => self.read_u8(lin)? as u128,
        })
    }

    /// Write operand `n`: an XMM register (whole), an MMX register (low 64
    /// bits), a general register (with its size's merge rules) or memory
    /// of the instruction's access size.
    #[inline(always)]
    fn sse_dst(&mut self, i: &Instruction, n: u32, val: u128) -> XResult<()> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                if r.is_xmm() {
                    self.s.fpu.xmm[xi(r)] = val;
                } else if r.is_mm() {
                    self.mm_write(r, val as u64);
                } else {
                    self.set_gpr(r, val as u64);
                }
                Ok(())
            }
            _ => {
                let lin = self.mem_lin(i);
                let size = i.memory_size().size();
                match size {
                    16 => {
                        check_align(i, lin, 16)?;
                        self.write_u128(lin, val)
                    }
                    8 => self.write_u64(lin, val as u64),
                    4 => self.write_u32(lin, val as u32),
                    2 => self.write_u16(lin, val as u16),
                    _ => self.write_u8(lin, val as u8),
                }
            }
        }
    }

    /// MMX register write: mantissa = value, sign/exponent all ones.
    #[inline(always)]
    fn mm_write(&mut self, r: Register, val: u64) {
        self.s.fpu.st[mi(r)] = (val, 0xffff);
    }

    /// What every MMX instruction does to the x87 state.
    #[inline(always)]
    fn mmx_transition(&mut self) {
        self.s.fpu.ftw = 0xff;
        self.s.fpu.fsw &= !0x3800;
    }

    /// Host MXCSR for running a guest operation: the guest's rounding
    /// control, DAZ and FTZ with all exceptions masked and no flags.
    #[inline(always)]
    fn host_csr(&self) -> u32 {
        (self.s.fpu.mxcsr & 0xffc0) | 0x1f80
    }

    /// Merge the exception flags raised by a host operation (the MXCSR read
    /// back after it) into the guest MXCSR; fault on an unmasked one.
    #[inline(always)]
    fn simd_flags(&mut self, after: u32) -> XResult<()> {
        let raised = after & 0x3f;
        if raised == 0 {
            return Ok(());
        }
        self.simd_flags_slow(raised)
    }

    #[cold]
    fn simd_flags_slow(&mut self, raised: u32) -> XResult<()> {
        let masks = (self.s.fpu.mxcsr >> 7) & 0x3f;
        if raised & !masks == 0 {
            self.s.fpu.mxcsr |= raised;
            return Ok(());
        }
        // An unmasked pre-computation exception (invalid, denormal, divide
        // by zero) suppresses the post-computation ones.
        let pre = raised & 0x7;
        let flags = if pre & !masks != 0 { pre } else { raised };
        self.s.fpu.mxcsr |= flags;
        Err(self.simd_fault())
    }

    fn simd_fault(&self) -> Fault {
        if self.s.cr4 & cr4::OSXMMEXCPT != 0 {
            Fault::new(exception::XM)
        } else {
            Fault::ud()
        }
    }
}

// -------------------------------------------------------------------
// Host execution wrappers.
// -------------------------------------------------------------------

/// Run instructions on the host under MXCSR `$csr`, restoring the host's
/// MXCSR afterwards; evaluates to the MXCSR read back right after them.
macro_rules! fpasm {
    ($csr:expr, [$($insn:expr),*], $($ops:tt)*) => {{
        let mut st: u32 = 0;
        let mut save: u32 = 0;
        let csr: u32 = $csr;
        asm!(
            "stmxcsr [{save}]",
            "ldmxcsr [{csr}]",
            $($insn,)*
            "stmxcsr [{st}]",
            "ldmxcsr [{save}]",
            save = in(reg) &mut save as *mut u32,
            csr = in(reg) &csr as *const u32,
            st = in(reg) &mut st as *mut u32,
            $($ops)*
            options(nostack)
        );
        st
    }};
}

/// `a = a OP b` under MXCSR; returns (a, mxcsr after).
type FpOp = unsafe fn(V, V, u32) -> (V, u32);

/// `dst = dst OP src` for a floating-point operation.
#[inline(always)]
fn fp_xx(cpu: &mut Cpu, i: &Instruction, op: FpOp) -> XResult<()> {
    sse_check(cpu)?;
    let b = cpu.sse_src(i, 1)?;
    let d = xi(i.op0_register());
    // SAFETY: register-only host SIMD instruction plus MXCSR save/restore.
    let (r, st) = unsafe { op(v(cpu.s.fpu.xmm[d]), v(b), cpu.host_csr()) };
    cpu.simd_flags(st)?;
    cpu.s.fpu.xmm[d] = u(r);
    Ok(())
}

macro_rules! fp2 {
    ($($name:ident = $insn:literal;)*) => {$(
        fn $name(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
            unsafe fn op(mut a: V, b: V, csr: u32) -> (V, u32) {
                let st = fpasm!(csr, [concat!($insn, " {a}, {b}")], a = inout(xmm_reg) a, b = in(xmm_reg) b,);
                (a, st)
            }
            fp_xx(cpu, i, op)
        }
    )*};
}

/// Floating-point operation with an imm8: one host function per relevant
/// immediate value.
macro_rules! fp2i {
    ($($name:ident = $insn:literal, $n:tt, $mask:literal;)*) => {$(
        fn $name(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
            unsafe fn op<const IMM: u8>(mut a: V, b: V, csr: u32) -> (V, u32) {
                let st = fpasm!(csr, [concat!($insn, " {a}, {b}, {imm}")],
                    a = inout(xmm_reg) a, b = in(xmm_reg) b, imm = const IMM,);
                (a, st)
            }
            static T: [FpOp; $n] = table!(op, $n);
            fp_xx(cpu, i, T[(i.immediate8() & $mask) as usize])
        }
    )*};
}

/// `a = a OP b` for integer operations (no MXCSR involvement).
type IntOp = fn(V, V) -> V;

#[inline(always)]
fn int_xx(cpu: &mut Cpu, i: &Instruction, op: IntOp) -> XResult<()> {
    sse_check(cpu)?;
    let b = cpu.sse_src(i, 1)?;
    let d = xi(i.op0_register());
    cpu.s.fpu.xmm[d] = u(op(v(cpu.s.fpu.xmm[d]), v(b)));
    Ok(())
}

macro_rules! int2 {
    ($($name:ident = $insn:literal;)*) => {$(
        fn $name(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
            fn op(mut a: V, b: V) -> V {
                // SAFETY: register-only host SIMD instruction.
                unsafe {
                    asm!(concat!($insn, " {a}, {b}"), a = inout(xmm_reg) a, b = in(xmm_reg) b,
                        options(pure, nomem, nostack));
                }
                a
            }
            int_xx(cpu, i, op)
        }
    )*};
}

macro_rules! int2i {
    ($($name:ident = $insn:literal, $n:tt, $mask:literal;)*) => {$(
        fn $name(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
            fn op<const IMM: u8>(mut a: V, b: V) -> V {
                // SAFETY: register-only host SIMD instruction.
                unsafe {
                    asm!(concat!($insn, " {a}, {b}, {imm}"), a = inout(xmm_reg) a, b = in(xmm_reg) b,
                        imm = const IMM, options(pure, nomem, nostack));
                }
                a
            }
            static T: [IntOp; $n] = table!(op, $n);
            int_xx(cpu, i, T[(i.immediate8() & $mask) as usize])
        }
    )*};
}

/// Blends with the implicit XMM0 mask.
macro_rules! blendv {
    ($($name:ident = $insn:literal;)*) => {$(
        fn $name(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
            sse_check(cpu)?;
            let b = cpu.sse_src(i, 1)?;
            let d = xi(i.op0_register());
            let mut a = v(cpu.s.fpu.xmm[d]);
            let m = v(cpu.s.fpu.xmm[0]);
            // SAFETY: register-only host SIMD instruction.
            unsafe {
                asm!(concat!($insn, " {a}, {b}, xmm0"), a = inout(xmm_reg) a, b = in(xmm_reg) v(b),
                    in("xmm0") m, options(pure, nomem, nostack));
            }
            cpu.s.fpu.xmm[d] = u(a);
            Ok(())
        }
    )*};
}

// -------------------------------------------------------------------
// Floating-point arithmetic and conversions between XMM registers.
// -------------------------------------------------------------------

fp2! {
    addps = "addps"; addpd = "addpd"; addss = "addss"; addsd = "addsd";
    subps = "subps"; subpd = "subpd"; subss = "subss"; subsd = "subsd";
    mulps = "mulps"; mulpd = "mulpd"; mulss = "mulss"; mulsd = "mulsd";
    divps = "divps"; divpd = "divpd"; divss = "divss"; divsd = "divsd";
    minps = "minps"; minpd = "minpd"; minss = "minss"; minsd = "minsd";
    maxps = "maxps"; maxpd = "maxpd"; maxss = "maxss"; maxsd = "maxsd";
    sqrtps = "sqrtps"; sqrtpd = "sqrtpd"; sqrtss = "sqrtss"; sqrtsd = "sqrtsd";
    rcpps = "rcpps"; rcpss = "rcpss"; rsqrtps = "rsqrtps"; rsqrtss = "rsqrtss";
    addsubps = "addsubps"; addsubpd = "addsubpd";
    haddps = "haddps"; haddpd = "haddpd"; hsubps = "hsubps"; hsubpd = "hsubpd";
    cvtps2pd = "cvtps2pd"; cvtpd2ps = "cvtpd2ps"; cvtss2sd = "cvtss2sd"; cvtsd2ss = "cvtsd2ss";
    cvtdq2ps = "cvtdq2ps"; cvtps2dq = "cvtps2dq"; cvttps2dq = "cvttps2dq";
    cvtdq2pd = "cvtdq2pd"; cvtpd2dq = "cvtpd2dq"; cvttpd2dq = "cvttpd2dq";
}

fp2i! {
    cmpps = "cmpps", 8, 7; cmppd = "cmppd", 8, 7; cmpss = "cmpss", 8, 7; cmpsd = "cmpsd", 8, 7;
    roundps = "roundps", 16, 15; roundpd = "roundpd", 16, 15;
    roundss = "roundss", 16, 15; roundsd = "roundsd", 16, 15;
    dpps = "dpps", 256, 255; dppd = "dppd", 256, 0x33;
}

/// COMISS/COMISD/UCOMISS/UCOMISD: ZF PF CF from the compare, OF SF AF clear.
macro_rules! comis {
    ($($name:ident = $insn:literal;)*) => {$(
        fn $name(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
            sse_check(cpu)?;
            let b = cpu.sse_src(i, 1)?;
            let a = v(cpu.s.fpu.xmm[xi(i.op0_register())]);
            let ax: u16;
            // SAFETY: register-only host instruction plus MXCSR save/restore.
            let st = unsafe {
                fpasm!(cpu.host_csr(), [concat!($insn, " {a}, {b}"), "lahf", "seto al"],
                    a = in(xmm_reg) a, b = in(xmm_reg) v(b), out("ax") ax,)
            };
            cpu.simd_flags(st)?;
            cpu.set_flags(STATUS, ax_to_flags(ax));
            Ok(())
        }
    )*};
}

comis! { comiss = "comiss"; comisd = "comisd"; ucomiss = "ucomiss"; ucomisd = "ucomisd"; }

/// CVT(T)SS2SI / CVT(T)SD2SI: XMM/m → r32/r64.
macro_rules! cvt2si {
    ($($name:ident = $insn:literal, $m:literal;)*) => {$(
        fn $name(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
            sse_check(cpu)?;
            let b = cpu.sse_src(i, 1)?;
            let r: u64;
            // SAFETY: register-only host instruction plus MXCSR save/restore.
            let st = unsafe {
                fpasm!(cpu.host_csr(), [concat!($insn, " {r", $m, "}, {b}")],
                    r = out(reg) r, b = in(xmm_reg) v(b),)
            };
            cpu.simd_flags(st)?;
            cpu.set_gpr(i.op0_register(), r);
            Ok(())
        }
    )*};
}

cvt2si! {
    cvtss2si32 = "cvtss2si", ":e"; cvtss2si64 = "cvtss2si", ":r";
    cvttss2si32 = "cvttss2si", ":e"; cvttss2si64 = "cvttss2si", ":r";
    cvtsd2si32 = "cvtsd2si", ":e"; cvtsd2si64 = "cvtsd2si", ":r";
    cvttsd2si32 = "cvttsd2si", ":e"; cvttsd2si64 = "cvttsd2si", ":r";
}

/// CVTSI2SS / CVTSI2SD: r/m32 or r/m64 → low lane, upper lanes kept.
macro_rules! cvtsi2 {
    ($($name:ident = $insn:literal, $m:literal;)*) => {$(
        fn $name(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
            sse_check(cpu)?;
            let b = cpu.read_op(i, 1)?;
            let d = xi(i.op0_register());
            let mut a = v(cpu.s.fpu.xmm[d]);
            // SAFETY: register-only host instruction plus MXCSR save/restore.
            let st = unsafe {
                fpasm!(cpu.host_csr(), [concat!($insn, " {a}, {b", $m, "}")],
                    a = inout(xmm_reg) a, b = in(reg) b,)
            };
            cpu.simd_flags(st)?;
            cpu.s.fpu.xmm[d] = u(a);
            Ok(())
        }
    )*};
}

cvtsi2! {
    cvtsi2ss32 = "cvtsi2ss", ":e"; cvtsi2ss64 = "cvtsi2ss", ":r";
    cvtsi2sd32 = "cvtsi2sd", ":e"; cvtsi2sd64 = "cvtsi2sd", ":r";
}

/// Run one of the packed conversions on the host: `op(b)` with MXCSR.
#[inline(always)]
fn host_fp1(cpu: &mut Cpu, op: FpOp, b: u128) -> XResult<u128> {
    // SAFETY: register-only host SIMD instruction plus MXCSR save/restore.
    let (r, st) = unsafe { op(v(0), v(b), cpu.host_csr()) };
    cpu.simd_flags(st)?;
    Ok(u(r))
}

macro_rules! fp_fn {
    ($($name:ident = $insn:literal;)*) => {$(
        unsafe fn $name(mut a: V, b: V, csr: u32) -> (V, u32) {
            let st = fpasm!(csr, [concat!($insn, " {a}, {b}")], a = inout(xmm_reg) a, b = in(xmm_reg) b,);
            (a, st)
        }
    )*};
}

fp_fn! {
    h_cvtdq2ps = "cvtdq2ps"; h_cvtps2dq = "cvtps2dq"; h_cvttps2dq = "cvttps2dq";
    h_cvtdq2pd = "cvtdq2pd"; h_cvtpd2dq = "cvtpd2dq"; h_cvttpd2dq = "cvttpd2dq";
}

/// Conversions with an MMX operand. The MMX side is done by the equivalent
/// SSE2 conversion on zero-filled lanes (zero converts exactly, so the
/// flags are those of the two live lanes).
fn cvt_mmx(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let mm_op = (0..2).any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).is_mm());
    let b = cpu.sse_src(i, 1)?;
    let r = match i.code() {
        Code::Cvtpi2ps_xmm_mmm64 => {
            let r = host_fp1(cpu, h_cvtdq2ps, b & LO64)?;
            let d = xi(i.op0_register());
            (cpu.s.fpu.xmm[d] & !LO64) | (r & LO64)
        }
        Code::Cvtpi2pd_xmm_mmm64 => host_fp1(cpu, h_cvtdq2pd, b & LO64)?,
        Code::Cvtps2pi_mm_xmmm64 => host_fp1(cpu, h_cvtps2dq, b & LO64)? & LO64,
        Code::Cvttps2pi_mm_xmmm64 => host_fp1(cpu, h_cvttps2dq, b & LO64)? & LO64,
        Code::Cvtpd2pi_mm_xmmm128 => host_fp1(cpu, h_cvtpd2dq, b)? & LO64,
        Code::Cvttpd2pi_mm_xmmm128 => host_fp1(cpu, h_cvttpd2dq, b)? & LO64,
        Code::Movq2dq_xmm_mm => b & LO64,
        _ => b & LO64, // Movdq2q_mm_xmm
    };
    if mm_op {
        cpu.mmx_transition();
    }
    cpu.sse_dst(i, 0, r)
}

// -------------------------------------------------------------------
// Integer and data-movement operations run on the host.
// -------------------------------------------------------------------

int2! {
    paddb = "paddb"; paddw = "paddw"; paddd = "paddd"; paddq = "paddq";
    psubb = "psubb"; psubw = "psubw"; psubd = "psubd"; psubq = "psubq";
    paddsb = "paddsb"; paddsw = "paddsw"; paddusb = "paddusb"; paddusw = "paddusw";
    psubsb = "psubsb"; psubsw = "psubsw"; psubusb = "psubusb"; psubusw = "psubusw";
    pmullw = "pmullw"; pmulhw = "pmulhw"; pmulhuw = "pmulhuw"; pmuludq = "pmuludq";
    pmaddwd = "pmaddwd"; psadbw = "psadbw"; pavgb = "pavgb"; pavgw = "pavgw";
    pminub = "pminub"; pmaxub = "pmaxub"; pminsw = "pminsw"; pmaxsw = "pmaxsw";
    pand = "pand"; pandn = "pandn"; por = "por"; pxor = "pxor";
    andps = "andps"; andnps = "andnps"; orps = "orps"; xorps = "xorps";
    andpd = "andpd"; andnpd = "andnpd"; orpd = "orpd"; xorpd = "xorpd";
    pcmpeqb = "pcmpeqb"; pcmpeqw = "pcmpeqw"; pcmpeqd = "pcmpeqd"; pcmpeqq = "pcmpeqq";
    pcmpgtb = "pcmpgtb"; pcmpgtw = "pcmpgtw"; pcmpgtd = "pcmpgtd"; pcmpgtq = "pcmpgtq";
    packsswb = "packsswb"; packssdw = "packssdw"; packuswb = "packuswb"; packusdw = "packusdw";
    punpcklbw = "punpcklbw"; punpcklwd = "punpcklwd"; punpckldq = "punpckldq"; punpcklqdq = "punpcklqdq";
    punpckhbw = "punpckhbw"; punpckhwd = "punpckhwd"; punpckhdq = "punpckhdq"; punpckhqdq = "punpckhqdq";
    unpcklps = "unpcklps"; unpckhps = "unpckhps"; unpcklpd = "unpcklpd"; unpckhpd = "unpckhpd";
    psllw = "psllw"; pslld = "pslld"; psllq = "psllq";
    psrlw = "psrlw"; psrld = "psrld"; psrlq = "psrlq";
    psraw = "psraw"; psrad = "psrad";
    pshufb = "pshufb"; phaddw = "phaddw"; phaddd = "phaddd"; phaddsw = "phaddsw";
    phsubw = "phsubw"; phsubd = "phsubd"; phsubsw = "phsubsw"; pmaddubsw = "pmaddubsw";
    psignb = "psignb"; psignw = "psignw"; psignd = "psignd"; pmulhrsw = "pmulhrsw";
    pabsb = "pabsb"; pabsw = "pabsw"; pabsd = "pabsd";
    pmuldq = "pmuldq"; pmulld = "pmulld";
    pminsb = "pminsb"; pminsd = "pminsd"; pminuw = "pminuw"; pminud = "pminud";
    pmaxsb = "pmaxsb"; pmaxsd = "pmaxsd"; pmaxuw = "pmaxuw"; pmaxud = "pmaxud";
    phminposuw = "phminposuw";
    pmovsxbw = "pmovsxbw"; pmovsxbd = "pmovsxbd"; pmovsxbq = "pmovsxbq";
    pmovsxwd = "pmovsxwd"; pmovsxwq = "pmovsxwq"; pmovsxdq = "pmovsxdq";
    pmovzxbw = "pmovzxbw"; pmovzxbd = "pmovzxbd"; pmovzxbq = "pmovzxbq";
    pmovzxwd = "pmovzxwd"; pmovzxwq = "pmovzxwq"; pmovzxdq = "pmovzxdq";
    movddup = "movddup"; movsldup = "movsldup"; movshdup = "movshdup";
}

int2i! {
    mpsadbw = "mpsadbw", 8, 7;
}

blendv! { pblendvb = "pblendvb"; blendvps = "blendvps"; blendvpd = "blendvpd"; }

fn ptest(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let b = cpu.sse_src(i, 1)?;
    let a = v(cpu.s.fpu.xmm[xi(i.op0_register())]);
    let ax: u16;
    // SAFETY: register-only host instruction.
    unsafe {
        asm!("ptest {a}, {b}", "lahf", "seto al", a = in(xmm_reg) a, b = in(xmm_reg) v(b), out("ax") ax,
            options(pure, nomem, nostack));
    }
    cpu.set_flags(STATUS, ax_to_flags(ax));
    Ok(())
}

// -------------------------------------------------------------------
// Shuffles, blends, inserts and extracts with immediates (lanes in Rust).
// -------------------------------------------------------------------

#[inline(always)]
fn lane(x: u128, bits: u32, k: u32) -> u128 {
    (x >> (bits * k)) & ((1u128 << bits) - 1)
}

/// `dst = f(dst, src, imm8)` on plain lanes.
#[inline(always)]
fn imm_op(cpu: &mut Cpu, i: &Instruction, f: fn(u128, u128, u32) -> u128) -> XResult<()> {
    sse_check(cpu)?;
    let b = cpu.sse_src(i, 1)?;
    let d = xi(i.op0_register());
    cpu.s.fpu.xmm[d] = f(cpu.s.fpu.xmm[d], b, i.immediate8() as u32);
    Ok(())
}

macro_rules! imm_ops {
    ($($name:ident = |$a:ident, $b:ident, $imm:ident| $body:expr;)*) => {$(
        fn $name(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
            #[allow(unused_variables)]
            fn f($a: u128, $b: u128, $imm: u32) -> u128 {
                $body
            }
            imm_op(cpu, i, f)
        }
    )*};
}

imm_ops! {
    pshufd = |a, b, imm| {
        (0..4).fold(0, |r, k| r | lane(b, 32, (imm >> (2 * k)) & 3) << (32 * k))
    };
    pshuflw = |a, b, imm| {
        (0..4).fold(b & !LO64, |r, k| r | lane(b, 16, (imm >> (2 * k)) & 3) << (16 * k))
    };
    pshufhw = |a, b, imm| {
        (0..4).fold(b & LO64, |r, k| r | lane(b, 16, 4 + ((imm >> (2 * k)) & 3)) << (64 + 16 * k))
    };
    shufps = |a, b, imm| {
        lane(a, 32, imm & 3)
            | lane(a, 32, (imm >> 2) & 3) << 32
            | lane(b, 32, (imm >> 4) & 3) << 64
            | lane(b, 32, (imm >> 6) & 3) << 96
    };
    shufpd = |a, b, imm| lane(a, 64, imm & 1) | lane(b, 64, (imm >> 1) & 1) << 64;
    palignr = |a, b, imm| {
        let s = imm;
        match s {
            0 => b,
            1..=15 => (b >> (8 * s)) | (a << (128 - 8 * s)),
            16 => a,
            17..=31 => a >> (8 * (s - 16)),
            _ => 0,
        }
    };
    pblendw = |a, b, imm| {
        (0..8).fold(0, |r, k| r | lane(if imm >> k & 1 != 0 { b } else { a }, 16, k) << (16 * k))
    };
    blendps = |a, b, imm| {
        (0..4).fold(0, |r, k| r | lane(if imm >> k & 1 != 0 { b } else { a }, 32, k) << (32 * k))
    };
    blendpd = |a, b, imm| {
        (0..2).fold(0, |r, k| r | lane(if imm >> k & 1 != 0 { b } else { a }, 64, k) << (64 * k))
    };
    pslldq = |a, b, imm| if b < 16 { a << (8 * b) } else { 0 };
    psrldq = |a, b, imm| if b < 16 { a >> (8 * b) } else { 0 };
}

/// INSERTPS xmm1, xmm2/m32, imm8.
fn insertps(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let imm = i.immediate8() as u32;
    let b = cpu.sse_src(i, 1)?;
    let s = if i.op1_kind() == OpKind::Register {
        lane(b, 32, imm >> 6)
    } else {
        b & LO32
    };
    let d = xi(i.op0_register());
    let k = (imm >> 4) & 3;
    let mut r = (cpu.s.fpu.xmm[d] & !(LO32 << (32 * k))) | (s << (32 * k));
    for z in 0..4 {
        if imm >> z & 1 != 0 {
            r &= !(LO32 << (32 * z));
        }
    }
    cpu.s.fpu.xmm[d] = r;
    Ok(())
}

/// PINSRB/W/D/Q xmm, r/m, imm8.
fn pinsr(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let bits: u32 = match i.mnemonic() {
        Mnemonic::Pinsrb => 8,
        Mnemonic::Pinsrw => 16,
        Mnemonic::Pinsrd => 32,
        _ => 64,
    };
    let n = 128 / bits;
    let k = i.immediate8() as u32 % n;
    let m = (1u128 << bits) - 1;
    let b = cpu.sse_src(i, 1)? & m;
    let d = xi(i.op0_register());
    cpu.s.fpu.xmm[d] = (cpu.s.fpu.xmm[d] & !(m << (bits * k))) | (b << (bits * k));
    Ok(())
}

/// PEXTRB/W/D/Q, EXTRACTPS r/m, xmm, imm8 (registers zero-extended).
fn pextr(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let bits: u32 = match i.mnemonic() {
        Mnemonic::Pextrb => 8,
        Mnemonic::Pextrw => 16,
        Mnemonic::Pextrd | Mnemonic::Extractps => 32,
        _ => 64,
    };
    let k = i.immediate8() as u32 % (128 / bits);
    let x = cpu.s.fpu.xmm[xi(i.op1_register())];
    let val = lane(x, bits, k);
    if i.op0_kind() == OpKind::Register {
        let r = i.op0_register();
        // A 32-bit destination zero-extends; a 64-bit one gets the lane.
        let full = r.full_register();
        cpu.set_gpr(full, val as u64);
        Ok(())
    } else {
        cpu.sse_dst(i, 0, val)
    }
}

/// MOVMSKPS / MOVMSKPD / PMOVMSKB r32/r64, xmm.
fn movmsk(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let x = cpu.s.fpu.xmm[xi(i.op1_register())];
    let bits: u32 = match i.mnemonic() {
        Mnemonic::Movmskps => 32,
        Mnemonic::Movmskpd => 64,
        _ => 8,
    };
    let n = 128 / bits;
    let m = (0..n).fold(0u64, |m, k| {
        m | (((x >> (bits * k + bits - 1)) & 1) as u64) << k
    });
    cpu.set_gpr(i.op0_register().full_register(), m);
    Ok(())
}

// -------------------------------------------------------------------
// Data movement.
// -------------------------------------------------------------------

/// Full 128-bit moves (MOVAPS/MOVUPS/MOVDQA/MOVDQU/LDDQU/MOVNT*).
fn mov128(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let val = cpu.sse_src(i, 1)?;
    cpu.sse_dst(i, 0, val)
}

/// Moves whose source is zero-extended into the whole destination when
/// that is a register: MOVD/MOVQ in both directions.
fn movdq(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let val = cpu.sse_src(i, 1)?;
    let val = if i.op1_kind() == OpKind::Register && i.op1_register().is_xmm() {
        val & if matches!(i.code(), Code::Movd_rm32_xmm) {
            LO32
        } else {
            LO64
        }
    } else {
        val
    };
    cpu.sse_dst(i, 0, val)
}

/// MOVSS / MOVSD (SSE2): register→register merges the low lane, a load
/// zeroes the rest, a store writes the low lane.
fn movs_scalar(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let m = if i.mnemonic() == Mnemonic::Movss {
        LO32
    } else {
        LO64
    };
    let b = cpu.sse_src(i, 1)?;
    if i.op0_kind() == OpKind::Register {
        let d = xi(i.op0_register());
        cpu.s.fpu.xmm[d] = if i.op1_kind() == OpKind::Register {
            (cpu.s.fpu.xmm[d] & !m) | (b & m)
        } else {
            b & m
        };
        Ok(())
    } else {
        cpu.sse_dst(i, 0, b & m)
    }
}

/// MOVLPS/MOVLPD/MOVHPS/MOVHPD (xmm↔m64), MOVHLPS, MOVLHPS.
fn movhl(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let b = cpu.sse_src(i, 1)?;
    match i.code() {
        Code::Movlps_m64_xmm | Code::Movlpd_m64_xmm => cpu.sse_dst(i, 0, b & LO64),
        Code::Movhps_m64_xmm | Code::Movhpd_m64_xmm => cpu.sse_dst(i, 0, b >> 64),
        code => {
            let d = xi(i.op0_register());
            let a = cpu.s.fpu.xmm[d];
            cpu.s.fpu.xmm[d] = match code {
                Code::Movlps_xmm_m64 | Code::Movlpd_xmm_m64 => (a & !LO64) | (b & LO64),
                Code::Movhps_xmm_m64 | Code::Movhpd_xmm_m64 => (a & LO64) | (b << 64),
                Code::Movhlps_xmm_xmm => (a & !LO64) | (b >> 64),
                _ => (a & LO64) | (b << 64), // Movlhps
            };
            Ok(())
        }
    }
}

/// MASKMOVDQU xmm1, xmm2: byte-masked store to DS:rDI.
fn maskmovdqu(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let data = cpu.s.fpu.xmm[xi(i.op1_register())];
    let mask = cpu.s.fpu.xmm[xi(i.op2_register())];
    let asz = match i.op0_kind() {
        OpKind::MemorySegDI => 2,
        OpKind::MemorySegEDI => 4,
        _ => 8,
    };
    let seg = super::seg_index(i.memory_segment());
    let ea = cpu.s.gpr[crate::state::RDI] & super::mask(asz);
    let base = cpu.seg_base(seg).wrapping_add(ea);
    for k in 0..16u32 {
        if (mask >> (8 * k + 7)) & 1 != 0 {
            let lin = cpu.mask_lin(base.wrapping_add(k as u64));
            cpu.write_u8(lin, (data >> (8 * k)) as u8)?;
        }
    }
    Ok(())
}

fn ldmxcsr(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let lin = cpu.mem_lin(i);
    let val = cpu.read_u32(lin)?;
    if val & !0xffff != 0 {
        return Err(Fault::gp0());
    }
    cpu.s.fpu.mxcsr = val;
    Ok(())
}

fn stmxcsr(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    sse_check(cpu)?;
    let lin = cpu.mem_lin(i);
    let val = cpu.s.fpu.mxcsr;
    cpu.write_u32(lin, val)
}

// -------------------------------------------------------------------
// SSE4.2: string compares and CRC32.
// -------------------------------------------------------------------

/// (a, b, rax, rdx, rcx, xmm0) → (rcx, xmm0, ax = lahf/seto flags).
type StrOp = unsafe fn(V, V, u64, u64, u64, V) -> (u64, V, u16);

unsafe fn istri<const IMM: u8>(a: V, b: V, _: u64, _: u64, mut rcx: u64, x0: V) -> (u64, V, u16) {
    let ax: u16;
    asm!("pcmpistri {a}, {b}, {imm}", "lahf", "seto al", a = in(xmm_reg) a, b = in(xmm_reg) b,
        imm = const IMM, inout("rcx") rcx, out("ax") ax, options(pure, nomem, nostack));
    (rcx, x0, ax)
}

unsafe fn estri<const IMM: u8>(
    a: V,
    b: V,
    rax: u64,
    rdx: u64,
    mut rcx: u64,
    x0: V,
) -> (u64, V, u16) {
    let fl: u64;
    asm!("pcmpestri {a}, {b}, {imm}", "lahf", "seto al", a = in(xmm_reg) a, b = in(xmm_reg) b,
        imm = const IMM, inout("rax") rax => fl, in("rdx") rdx, inout("rcx") rcx, options(pure, nomem, nostack));
    (rcx, x0, fl as u16)
}

unsafe fn istrm<const IMM: u8>(a: V, b: V, _: u64, _: u64, rcx: u64, _: V) -> (u64, V, u16) {
    let ax: u16;
    let x0: V;
    asm!("pcmpistrm {a}, {b}, {imm}", "lahf", "seto al", a = in(xmm_reg) a, b = in(xmm_reg) b,
        imm = const IMM, out("xmm0") x0, out("ax") ax, options(pure, nomem, nostack));
    (rcx, x0, ax)
}

unsafe fn estrm<const IMM: u8>(a: V, b: V, rax: u64, rdx: u64, rcx: u64, _: V) -> (u64, V, u16) {
    let fl: u64;
    let x0: V;
    asm!("pcmpestrm {a}, {b}, {imm}", "lahf", "seto al", a = in(xmm_reg) a, b = in(xmm_reg) b,
        imm = const IMM, inout("rax") rax => fl, in("rdx") rdx, out("xmm0") x0, options(pure, nomem, nostack));
    (rcx, x0, fl as u16)
}

static ISTRI: [StrOp; 128] = table!(istri, 128);
static ESTRI: [StrOp; 128] = table!(estri, 128);
static ISTRM: [StrOp; 128] = table!(istrm, 128);
static ESTRM: [StrOp; 128] = table!(estrm, 128);

fn pcmpstr(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    use Mnemonic::*;
    sse_check(cpu)?;
    let b = cpu.sse_src(i, 1)?;
    let a = cpu.s.fpu.xmm[xi(i.op0_register())];
    let imm = (i.immediate8() & 0x7f) as usize;
    let (mut rax, mut rdx) = (cpu.s.gpr[0], cpu.s.gpr[2]);
    if matches!(i.mnemonic(), Pcmpestri64 | Pcmpestrm64) {
        // 64-bit lengths: |len| saturates at 16 elements either way, so the
        // host's 32-bit form sees an equivalent (positive, small) length.
        rax = (rax as i64).unsigned_abs().min(16);
        rdx = (rdx as i64).unsigned_abs().min(16);
    }
    let op = match i.mnemonic() {
        Pcmpistri => ISTRI[imm],
        Pcmpestri | Pcmpestri64 => ESTRI[imm],
        Pcmpistrm => ISTRM[imm],
        _ => ESTRM[imm],
    };
    let x0 = v(cpu.s.fpu.xmm[0]);
    // SAFETY: register-only host SSE4.2 instruction.
    let (rcx, x0, ax) = unsafe { op(v(a), v(b), rax, rdx, cpu.s.gpr[1], x0) };
    cpu.s.gpr[1] = rcx;
    cpu.s.fpu.xmm[0] = u(x0);
    cpu.set_flags(STATUS, ax_to_flags(ax));
    Ok(())
}

/// CRC32 r32/r64, r/m8/16/32/64 (CRC-32C), computed by the host.
fn crc32(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let src = cpu.read_op(i, 1)?;
    let mut acc = cpu.gpr(i.op0_register()) & 0xffff_ffff;
    // SAFETY: register-only host instruction.
    unsafe {
        match cpu.op_size(i, 1) {
            1 => {
                asm!("crc32 {a:e}, {b:l}", a = inout(reg) acc, b = in(reg) src, options(pure, nomem, nostack))
            }
            2 => {
                asm!("crc32 {a:e}, {b:x}", a = inout(reg) acc, b = in(reg) src, options(pure, nomem, nostack))
            }
            4 => {
                asm!("crc32 {a:e}, {b:e}", a = inout(reg) acc, b = in(reg) src, options(pure, nomem, nostack))
            }
            _ => {
                asm!("crc32 {a:r}, {b:r}", a = inout(reg) acc, b = in(reg) src, options(pure, nomem, nostack))
            }
        }
    }
    cpu.set_gpr(i.op0_register(), acc & 0xffff_ffff);
    Ok(())
}

// -------------------------------------------------------------------
// Dispatch.
// -------------------------------------------------------------------

pub fn lookup(i: &Instruction) -> Option<Handler> {
    use Code as C;
    if i.encoding() != EncodingKind::Legacy {
        return None;
    }
    Some(match i.code() {
        // Moves.
        C::Movups_xmm_xmmm128
        | C::Movupd_xmm_xmmm128
        | C::Movups_xmmm128_xmm
        | C::Movupd_xmmm128_xmm => mov128,
        C::Movaps_xmm_xmmm128
        | C::Movapd_xmm_xmmm128
        | C::Movaps_xmmm128_xmm
        | C::Movapd_xmmm128_xmm => mov128,
        C::Movdqa_xmm_xmmm128
        | C::Movdqu_xmm_xmmm128
        | C::Movdqa_xmmm128_xmm
        | C::Movdqu_xmmm128_xmm => mov128,
        C::Lddqu_xmm_m128 | C::Movntdqa_xmm_m128 => mov128,
        C::Movntps_m128_xmm | C::Movntpd_m128_xmm | C::Movntdq_m128_xmm => mov128,
        C::Movss_xmm_xmmm32 | C::Movss_xmmm32_xmm | C::Movsd_xmm_xmmm64 | C::Movsd_xmmm64_xmm => {
            movs_scalar
        }
        C::Movd_xmm_rm32 | C::Movq_xmm_rm64 | C::Movd_rm32_xmm | C::Movq_rm64_xmm => movdq,
        C::Movq_xmm_xmmm64 | C::Movq_xmmm64_xmm => movdq,
        C::Movlps_xmm_m64 | C::Movlpd_xmm_m64 | C::Movlps_m64_xmm | C::Movlpd_m64_xmm => movhl,
        C::Movhps_xmm_m64 | C::Movhpd_xmm_m64 | C::Movhps_m64_xmm | C::Movhpd_m64_xmm => movhl,
        C::Movhlps_xmm_xmm | C::Movlhps_xmm_xmm => movhl,
        C::Movddup_xmm_xmmm64 => movddup,
        C::Movsldup_xmm_xmmm128 => movsldup,
        C::Movshdup_xmm_xmmm128 => movshdup,
        C::Maskmovdqu_rDI_xmm_xmm => maskmovdqu,
        C::Movmskps_r32_xmm | C::Movmskps_r64_xmm | C::Movmskpd_r32_xmm | C::Movmskpd_r64_xmm => {
            movmsk
        }
        C::Pmovmskb_r32_xmm | C::Pmovmskb_r64_xmm => movmsk,
        C::Ldmxcsr_m32 => ldmxcsr,
        C::Stmxcsr_m32 => stmxcsr,

        // Floating-point arithmetic.
        C::Addps_xmm_xmmm128 => addps,
        C::Addpd_xmm_xmmm128 => addpd,
        C::Addss_xmm_xmmm32 => addss,
        C::Addsd_xmm_xmmm64 => addsd,
        C::Subps_xmm_xmmm128 => subps,
        C::Subpd_xmm_xmmm128 => subpd,
        C::Subss_xmm_xmmm32 => subss,
        C::Subsd_xmm_xmmm64 => subsd,
        C::Mulps_xmm_xmmm128 => mulps,
        C::Mulpd_xmm_xmmm128 => mulpd,
        C::Mulss_xmm_xmmm32 => mulss,
        C::Mulsd_xmm_xmmm64 => mulsd,
        C::Divps_xmm_xmmm128 => divps,
        C::Divpd_xmm_xmmm128 => divpd,
        C::Divss_xmm_xmmm32 => divss,
        C::Divsd_xmm_xmmm64 => divsd,
        C::Minps_xmm_xmmm128 => minps,
        C::Minpd_xmm_xmmm128 => minpd,
        C::Minss_xmm_xmmm32 => minss,
        C::Minsd_xmm_xmmm64 => minsd,
        C::Maxps_xmm_xmmm128 => maxps,
        C::Maxpd_xmm_xmmm128 => maxpd,
        C::Maxss_xmm_xmmm32 => maxss,
        C::Maxsd_xmm_xmmm64 => maxsd,
        C::Sqrtps_xmm_xmmm128 => sqrtps,
        C::Sqrtpd_xmm_xmmm128 => sqrtpd,
        C::Sqrtss_xmm_xmmm32 => sqrtss,
        C::Sqrtsd_xmm_xmmm64 => sqrtsd,
        C::Rcpps_xmm_xmmm128 => rcpps,
        C::Rcpss_xmm_xmmm32 => rcpss,
        C::Rsqrtps_xmm_xmmm128 => rsqrtps,
        C::Rsqrtss_xmm_xmmm32 => rsqrtss,
        C::Addsubps_xmm_xmmm128 => addsubps,
        C::Addsubpd_xmm_xmmm128 => addsubpd,
        C::Haddps_xmm_xmmm128 => haddps,
        C::Haddpd_xmm_xmmm128 => haddpd,
        C::Hsubps_xmm_xmmm128 => hsubps,
        C::Hsubpd_xmm_xmmm128 => hsubpd,
        C::Cmpps_xmm_xmmm128_imm8 => cmpps,
        C::Cmppd_xmm_xmmm128_imm8 => cmppd,
        C::Cmpss_xmm_xmmm32_imm8 => cmpss,
        C::Cmpsd_xmm_xmmm64_imm8 => cmpsd,
        C::Roundps_xmm_xmmm128_imm8 => roundps,
        C::Roundpd_xmm_xmmm128_imm8 => roundpd,
        C::Roundss_xmm_xmmm32_imm8 => roundss,
        C::Roundsd_xmm_xmmm64_imm8 => roundsd,
        C::Dpps_xmm_xmmm128_imm8 => dpps,
        C::Dppd_xmm_xmmm128_imm8 => dppd,
        C::Comiss_xmm_xmmm32 => comiss,
        C::Comisd_xmm_xmmm64 => comisd,
        C::Ucomiss_xmm_xmmm32 => ucomiss,
        C::Ucomisd_xmm_xmmm64 => ucomisd,

        // Conversions.
        C::Cvtps2pd_xmm_xmmm64 => cvtps2pd,
        C::Cvtpd2ps_xmm_xmmm128 => cvtpd2ps,
        C::Cvtss2sd_xmm_xmmm32 => cvtss2sd,
        C::Cvtsd2ss_xmm_xmmm64 => cvtsd2ss,
        C::Cvtdq2ps_xmm_xmmm128 => cvtdq2ps,
        C::Cvtps2dq_xmm_xmmm128 => cvtps2dq,
        C::Cvttps2dq_xmm_xmmm128 => cvttps2dq,
        C::Cvtdq2pd_xmm_xmmm64 => cvtdq2pd,
        C::Cvtpd2dq_xmm_xmmm128 => cvtpd2dq,
        C::Cvttpd2dq_xmm_xmmm128 => cvttpd2dq,
        C::Cvtss2si_r32_xmmm32 => cvtss2si32,
        C::Cvtss2si_r64_xmmm32 => cvtss2si64,
        C::Cvttss2si_r32_xmmm32 => cvttss2si32,
        C::Cvttss2si_r64_xmmm32 => cvttss2si64,
        C::Cvtsd2si_r32_xmmm64 => cvtsd2si32,
        C::Cvtsd2si_r64_xmmm64 => cvtsd2si64,
        C::Cvttsd2si_r32_xmmm64 => cvttsd2si32,
        C::Cvttsd2si_r64_xmmm64 => cvttsd2si64,
        C::Cvtsi2ss_xmm_rm32 => cvtsi2ss32,
        C::Cvtsi2ss_xmm_rm64 => cvtsi2ss64,
        C::Cvtsi2sd_xmm_rm32 => cvtsi2sd32,
        C::Cvtsi2sd_xmm_rm64 => cvtsi2sd64,
        C::Cvtpi2ps_xmm_mmm64
        | C::Cvtpi2pd_xmm_mmm64
        | C::Cvtps2pi_mm_xmmm64
        | C::Cvttps2pi_mm_xmmm64
        | C::Cvtpd2pi_mm_xmmm128
        | C::Cvttpd2pi_mm_xmmm128
        | C::Movq2dq_xmm_mm
        | C::Movdq2q_mm_xmm => cvt_mmx,

        // Logic.
        C::Andps_xmm_xmmm128 => andps,
        C::Andpd_xmm_xmmm128 => andpd,
        C::Andnps_xmm_xmmm128 => andnps,
        C::Andnpd_xmm_xmmm128 => andnpd,
        C::Orps_xmm_xmmm128 => orps,
        C::Orpd_xmm_xmmm128 => orpd,
        C::Xorps_xmm_xmmm128 => xorps,
        C::Xorpd_xmm_xmmm128 => xorpd,
        C::Pand_xmm_xmmm128 => pand,
        C::Pandn_xmm_xmmm128 => pandn,
        C::Por_xmm_xmmm128 => por,
        C::Pxor_xmm_xmmm128 => pxor,

        // Shuffles and unpacks.
        C::Shufps_xmm_xmmm128_imm8 => shufps,
        C::Shufpd_xmm_xmmm128_imm8 => shufpd,
        C::Unpcklps_xmm_xmmm128 => unpcklps,
        C::Unpckhps_xmm_xmmm128 => unpckhps,
        C::Unpcklpd_xmm_xmmm128 => unpcklpd,
        C::Unpckhpd_xmm_xmmm128 => unpckhpd,
        C::Pshufd_xmm_xmmm128_imm8 => pshufd,
        C::Pshufhw_xmm_xmmm128_imm8 => pshufhw,
        C::Pshuflw_xmm_xmmm128_imm8 => pshuflw,
        C::Pshufb_xmm_xmmm128 => pshufb,
        C::Palignr_xmm_xmmm128_imm8 => palignr,
        C::Punpcklbw_xmm_xmmm128 => punpcklbw,
        C::Punpcklwd_xmm_xmmm128 => punpcklwd,
        C::Punpckldq_xmm_xmmm128 => punpckldq,
        C::Punpcklqdq_xmm_xmmm128 => punpcklqdq,
        C::Punpckhbw_xmm_xmmm128 => punpckhbw,
        C::Punpckhwd_xmm_xmmm128 => punpckhwd,
        C::Punpckhdq_xmm_xmmm128 => punpckhdq,
        C::Punpckhqdq_xmm_xmmm128 => punpckhqdq,
        C::Packsswb_xmm_xmmm128 => packsswb,
        C::Packssdw_xmm_xmmm128 => packssdw,
        C::Packuswb_xmm_xmmm128 => packuswb,
        C::Packusdw_xmm_xmmm128 => packusdw,

        // Blends, inserts, extracts.
        C::Pblendw_xmm_xmmm128_imm8 => pblendw,
        C::Blendps_xmm_xmmm128_imm8 => blendps,
        C::Blendpd_xmm_xmmm128_imm8 => blendpd,
        C::Pblendvb_xmm_xmmm128 => pblendvb,
        C::Blendvps_xmm_xmmm128 => blendvps,
        C::Blendvpd_xmm_xmmm128 => blendvpd,
        C::Insertps_xmm_xmmm32_imm8 => insertps,
        C::Pinsrb_xmm_r32m8_imm8
        | C::Pinsrb_xmm_r64m8_imm8
        | C::Pinsrw_xmm_r32m16_imm8
        | C::Pinsrw_xmm_r64m16_imm8
        | C::Pinsrd_xmm_rm32_imm8
        | C::Pinsrq_xmm_rm64_imm8 => pinsr,
        C::Pextrb_r32m8_xmm_imm8
        | C::Pextrb_r64m8_xmm_imm8
        | C::Pextrw_r32_xmm_imm8
        | C::Pextrw_r64_xmm_imm8
        | C::Pextrw_r32m16_xmm_imm8
        | C::Pextrw_r64m16_xmm_imm8
        | C::Pextrd_rm32_xmm_imm8
        | C::Pextrq_rm64_xmm_imm8
        | C::Extractps_rm32_xmm_imm8
        | C::Extractps_r64m32_xmm_imm8 => pextr,

        // Integer arithmetic.
        C::Paddb_xmm_xmmm128 => paddb,
        C::Paddw_xmm_xmmm128 => paddw,
        C::Paddd_xmm_xmmm128 => paddd,
        C::Paddq_xmm_xmmm128 => paddq,
        C::Psubb_xmm_xmmm128 => psubb,
        C::Psubw_xmm_xmmm128 => psubw,
        C::Psubd_xmm_xmmm128 => psubd,
        C::Psubq_xmm_xmmm128 => psubq,
        C::Paddsb_xmm_xmmm128 => paddsb,
        C::Paddsw_xmm_xmmm128 => paddsw,
        C::Paddusb_xmm_xmmm128 => paddusb,
        C::Paddusw_xmm_xmmm128 => paddusw,
        C::Psubsb_xmm_xmmm128 => psubsb,
        C::Psubsw_xmm_xmmm128 => psubsw,
        C::Psubusb_xmm_xmmm128 => psubusb,
        C::Psubusw_xmm_xmmm128 => psubusw,
        C::Pmullw_xmm_xmmm128 => pmullw,
        C::Pmulhw_xmm_xmmm128 => pmulhw,
        C::Pmulhuw_xmm_xmmm128 => pmulhuw,
        C::Pmuludq_xmm_xmmm128 => pmuludq,
        C::Pmaddwd_xmm_xmmm128 => pmaddwd,
        C::Psadbw_xmm_xmmm128 => psadbw,
        C::Pavgb_xmm_xmmm128 => pavgb,
        C::Pavgw_xmm_xmmm128 => pavgw,
        C::Pminub_xmm_xmmm128 => pminub,
        C::Pmaxub_xmm_xmmm128 => pmaxub,
        C::Pminsw_xmm_xmmm128 => pminsw,
        C::Pmaxsw_xmm_xmmm128 => pmaxsw,
        C::Pcmpeqb_xmm_xmmm128 => pcmpeqb,
        C::Pcmpeqw_xmm_xmmm128 => pcmpeqw,
        C::Pcmpeqd_xmm_xmmm128 => pcmpeqd,
        C::Pcmpeqq_xmm_xmmm128 => pcmpeqq,
        C::Pcmpgtb_xmm_xmmm128 => pcmpgtb,
        C::Pcmpgtw_xmm_xmmm128 => pcmpgtw,
        C::Pcmpgtd_xmm_xmmm128 => pcmpgtd,
        C::Pcmpgtq_xmm_xmmm128 => pcmpgtq,
        C::Psllw_xmm_xmmm128 | C::Psllw_xmm_imm8 => psllw,
        C::Pslld_xmm_xmmm128 | C::Pslld_xmm_imm8 => pslld,
        C::Psllq_xmm_xmmm128 | C::Psllq_xmm_imm8 => psllq,
        C::Psrlw_xmm_xmmm128 | C::Psrlw_xmm_imm8 => psrlw,
        C::Psrld_xmm_xmmm128 | C::Psrld_xmm_imm8 => psrld,
        C::Psrlq_xmm_xmmm128 | C::Psrlq_xmm_imm8 => psrlq,
        C::Psraw_xmm_xmmm128 | C::Psraw_xmm_imm8 => psraw,
        C::Psrad_xmm_xmmm128 | C::Psrad_xmm_imm8 => psrad,
        C::Pslldq_xmm_imm8 => pslldq,
        C::Psrldq_xmm_imm8 => psrldq,

        // SSSE3.
        C::Phaddw_xmm_xmmm128 => phaddw,
        C::Phaddd_xmm_xmmm128 => phaddd,
        C::Phaddsw_xmm_xmmm128 => phaddsw,
        C::Phsubw_xmm_xmmm128 => phsubw,
        C::Phsubd_xmm_xmmm128 => phsubd,
        C::Phsubsw_xmm_xmmm128 => phsubsw,
        C::Pmaddubsw_xmm_xmmm128 => pmaddubsw,
        C::Psignb_xmm_xmmm128 => psignb,
        C::Psignw_xmm_xmmm128 => psignw,
        C::Psignd_xmm_xmmm128 => psignd,
        C::Pmulhrsw_xmm_xmmm128 => pmulhrsw,
        C::Pabsb_xmm_xmmm128 => pabsb,
        C::Pabsw_xmm_xmmm128 => pabsw,
        C::Pabsd_xmm_xmmm128 => pabsd,

        // SSE4.1.
        C::Pmuldq_xmm_xmmm128 => pmuldq,
        C::Pmulld_xmm_xmmm128 => pmulld,
        C::Pminsb_xmm_xmmm128 => pminsb,
        C::Pminsd_xmm_xmmm128 => pminsd,
        C::Pminuw_xmm_xmmm128 => pminuw,
        C::Pminud_xmm_xmmm128 => pminud,
        C::Pmaxsb_xmm_xmmm128 => pmaxsb,
        C::Pmaxsd_xmm_xmmm128 => pmaxsd,
        C::Pmaxuw_xmm_xmmm128 => pmaxuw,
        C::Pmaxud_xmm_xmmm128 => pmaxud,
        C::Phminposuw_xmm_xmmm128 => phminposuw,
        C::Pmovsxbw_xmm_xmmm64 => pmovsxbw,
        C::Pmovsxbd_xmm_xmmm32 => pmovsxbd,
        C::Pmovsxbq_xmm_xmmm16 => pmovsxbq,
        C::Pmovsxwd_xmm_xmmm64 => pmovsxwd,
        C::Pmovsxwq_xmm_xmmm32 => pmovsxwq,
        C::Pmovsxdq_xmm_xmmm64 => pmovsxdq,
        C::Pmovzxbw_xmm_xmmm64 => pmovzxbw,
        C::Pmovzxbd_xmm_xmmm32 => pmovzxbd,
        C::Pmovzxbq_xmm_xmmm16 => pmovzxbq,
        C::Pmovzxwd_xmm_xmmm64 => pmovzxwd,
        C::Pmovzxwq_xmm_xmmm32 => pmovzxwq,
        C::Pmovzxdq_xmm_xmmm64 => pmovzxdq,
        C::Ptest_xmm_xmmm128 => ptest,
        C::Mpsadbw_xmm_xmmm128_imm8 => mpsadbw,

        // SSE4.2.
        C::Pcmpestri_xmm_xmmm128_imm8
        | C::Pcmpestri64_xmm_xmmm128_imm8
        | C::Pcmpestrm_xmm_xmmm128_imm8
        | C::Pcmpestrm64_xmm_xmmm128_imm8
        | C::Pcmpistri_xmm_xmmm128_imm8
        | C::Pcmpistrm_xmm_xmmm128_imm8 => pcmpstr,
        C::Crc32_r32_rm8
        | C::Crc32_r64_rm8
        | C::Crc32_r32_rm16
        | C::Crc32_r32_rm32
        | C::Crc32_r64_rm64 => crc32,

        _ => return None,
    })
}
