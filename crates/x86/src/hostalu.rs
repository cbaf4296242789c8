//! Arithmetic flags computed by the host ALU.
//!
//! Host and guest share the ISA, so the exact guest result and status flags
//! (including the ones the architecture leaves "undefined", which then match
//! the host the differential tester compares against) come from running the
//! same instruction on the host and reading the flags back with LAHF/SETO —
//! no PUSHF/POPF on the hot path.

use crate::state::flags::{CF, OF};

/// Convert AX after `lahf; seto al` into RFLAGS status bits.
#[inline(always)]
pub fn ax_to_flags(ax: u16) -> u64 {
    (((ax >> 8) & 0xd5) as u64) | (((ax & 1) as u64) << 11)
}

/// Binary operation `dst = dst OP src` → (result, status flags).
macro_rules! binop {
    ($name:ident, $insn:literal, $t:ty, $cls:ident, $m:literal) => {
        #[inline(always)]
        pub fn $name(a: $t, b: $t) -> ($t, u64) {
            let r: $t;
            let ax: u16;
            // SAFETY: pure register arithmetic; no memory or stack use.
            unsafe {
                core::arch::asm!(
                    concat!($insn, " {a", $m, "}, {b", $m, "}"),
                    "lahf",
                    "seto al",
                    a = inout($cls) a => r,
                    b = in($cls) b,
                    out("ax") ax,
                    options(nomem, nostack)
                )
            }
            (r, ax_to_flags(ax))
        }
    };
}

/// Binary operation whose undefined flags may keep their incoming values
/// (IMUL, BSF, BSR: AMD hosts leave SF ZF AF PF of IMUL as they were):
/// the guest's status flags `fl` go in through SAHF, so the result is
/// what the host makes of the guest's flags, as in translated code, not of
/// whatever the host's flags happened to be.
macro_rules! binop_f {
    ($name:ident, $insn:literal, $t:ty, $cls:ident, $m:literal) => {
        #[inline(always)]
        pub fn $name(a: $t, b: $t, fl: u64) -> ($t, u64) {
            let r: $t;
            let mut ax: u16 = ((fl & 0xd5) as u16) << 8;
            // SAFETY: pure register arithmetic; no memory or stack use.
            unsafe {
                core::arch::asm!(
                    "sahf",
                    concat!($insn, " {a", $m, "}, {b", $m, "}"),
                    "lahf",
                    "seto al",
                    a = inout($cls) a => r,
                    b = in($cls) b,
                    inout("ax") ax,
                    options(nomem, nostack)
                )
            }
            (r, ax_to_flags(ax))
        }
    };
}

/// One-operand MUL or IMUL (`signed`) of `a` (the accumulator) by `b`,
/// of `size` bytes, run by the host with the guest's flags `fl` going in
/// → (rAX, rDX, status flags): the product (in AX for bytes, else low half
/// in rAX and high half in rDX) and the flags, whose undefined SF ZF AF PF
/// come out as the host makes them (AMD hosts leave them as they were), as
/// in translated code, which runs MUL itself.
pub fn mul1(signed: bool, size: usize, a: u64, b: u64, fl: u64) -> (u64, u64, u64) {
    let mut ax: u64 = (fl & 0xd5) << 8;
    let (lo, hi): (u64, u64);
    macro_rules! run {
        ($insn:literal, $mov:literal) => {
            // SAFETY: register arithmetic only (rax and rdx are declared).
            unsafe {
                core::arch::asm!(
                    "sahf",
                    $mov,
                    $insn,
                    "mov {lo}, rax",
                    "lahf",
                    "seto al",
                    a = in(reg) a,
                    b = in(reg) b,
                    lo = out(reg) lo,
                    inout("rax") ax,
                    out("rdx") hi,
                    options(nomem, nostack)
                )
            }
        };
    }
    match (signed, size) {
        (false, 1) => run!("mul {b:l}", "mov al, {a:l}"),
        (false, 2) => run!("mul {b:x}", "mov ax, {a:x}"),
        (false, 4) => run!("mul {b:e}", "mov eax, {a:e}"),
        (false, _) => run!("mul {b:r}", "mov rax, {a:r}"),
        (true, 1) => run!("imul {b:l}", "mov al, {a:l}"),
        (true, 2) => run!("imul {b:x}", "mov ax, {a:x}"),
        (true, 4) => run!("imul {b:e}", "mov eax, {a:e}"),
        (true, _) => run!("imul {b:r}", "mov rax, {a:r}"),
    }
    (lo, hi, ax_to_flags(ax as u16))
}

/// Binary operation that consumes CF (ADC/SBB).
macro_rules! binop_c {
    ($name:ident, $insn:literal, $t:ty, $cls:ident, $m:literal) => {
        #[inline(always)]
        pub fn $name(a: $t, b: $t, cf: bool) -> ($t, u64) {
            let r: $t;
            let ax: u16;
            // SAFETY: pure register arithmetic; no memory or stack use.
            unsafe {
                core::arch::asm!(
                    "bt {c:e}, 0",
                    concat!($insn, " {a", $m, "}, {b", $m, "}"),
                    "lahf",
                    "seto al",
                    a = inout($cls) a => r,
                    b = in($cls) b,
                    c = in(reg) cf as u32,
                    out("ax") ax,
                    options(nomem, nostack)
                )
            }
            (r, ax_to_flags(ax))
        }
    };
}

/// Unary operation (INC/DEC/NEG) → (result, flags).
macro_rules! unop {
    ($name:ident, $insn:literal, $t:ty, $cls:ident, $m:literal) => {
        #[inline(always)]
        pub fn $name(a: $t) -> ($t, u64) {
            let r: $t;
            let ax: u16;
            // SAFETY: pure register arithmetic; no memory or stack use.
            unsafe {
                core::arch::asm!(
                    concat!($insn, " {a", $m, "}"),
                    "lahf",
                    "seto al",
                    a = inout($cls) a => r,
                    out("ax") ax,
                    options(nomem, nostack)
                )
            }
            (r, ax_to_flags(ax))
        }
    };
}

/// Shift/rotate by CL with incoming CF (needed by RCL/RCR; harmless for others).
/// The caller handles a masked count of zero (flags unchanged).
macro_rules! shiftop {
    ($name:ident, $insn:literal, $t:ty, $cls:ident, $m:literal) => {
        #[inline(always)]
        pub fn $name(a: $t, count: u8, cf: bool) -> ($t, u64) {
            let r: $t;
            let ax: u16;
            // SAFETY: pure register arithmetic; no memory or stack use.
            unsafe {
                core::arch::asm!(
                    "bt {c:e}, 0",
                    concat!($insn, " {a", $m, "}, cl"),
                    "lahf",
                    "seto al",
                    a = inout($cls) a => r,
                    c = in(reg) cf as u32,
                    in("cl") count,
                    out("ax") ax,
                    options(nomem, nostack)
                )
            }
            (r, ax_to_flags(ax))
        }
    };
}

/// Double shift SHLD/SHRD by CL.
macro_rules! dshiftop {
    ($name:ident, $insn:literal, $t:ty, $cls:ident, $m:literal) => {
        #[inline(always)]
        pub fn $name(a: $t, b: $t, count: u8) -> ($t, u64) {
            let r: $t;
            let ax: u16;
            // SAFETY: pure register arithmetic; no memory or stack use.
            unsafe {
                core::arch::asm!(
                    concat!($insn, " {a", $m, "}, {b", $m, "}, cl"),
                    "lahf",
                    "seto al",
                    a = inout($cls) a => r,
                    b = in($cls) b,
                    in("cl") count,
                    out("ax") ax,
                    options(nomem, nostack)
                )
            }
            (r, ax_to_flags(ax))
        }
    };
}

macro_rules! all_widths {
    ($mac:ident, $insn:literal, $n8:ident, $n16:ident, $n32:ident, $n64:ident) => {
        $mac!($n8, $insn, u8, reg_byte, "");
        $mac!($n16, $insn, u16, reg, ":x");
        $mac!($n32, $insn, u32, reg, ":e");
        $mac!($n64, $insn, u64, reg, ":r");
    };
}
macro_rules! wide_widths {
    ($mac:ident, $insn:literal, $n16:ident, $n32:ident, $n64:ident) => {
        $mac!($n16, $insn, u16, reg, ":x");
        $mac!($n32, $insn, u32, reg, ":e");
        $mac!($n64, $insn, u64, reg, ":r");
    };
}

all_widths!(binop, "add", add8, add16, add32, add64);
all_widths!(binop, "or", or8, or16, or32, or64);
all_widths!(binop, "and", and8, and16, and32, and64);
all_widths!(binop, "sub", sub8, sub16, sub32, sub64);
all_widths!(binop, "xor", xor8, xor16, xor32, xor64);
all_widths!(binop_c, "adc", adc8, adc16, adc32, adc64);
all_widths!(binop_c, "sbb", sbb8, sbb16, sbb32, sbb64);
all_widths!(unop, "inc", inc8, inc16, inc32, inc64);
all_widths!(unop, "dec", dec8, dec16, dec32, dec64);
all_widths!(unop, "neg", neg8, neg16, neg32, neg64);
all_widths!(shiftop, "rol", rol8, rol16, rol32, rol64);
all_widths!(shiftop, "ror", ror8, ror16, ror32, ror64);
all_widths!(shiftop, "rcl", rcl8, rcl16, rcl32, rcl64);
all_widths!(shiftop, "rcr", rcr8, rcr16, rcr32, rcr64);
all_widths!(shiftop, "shl", shl8, shl16, shl32, shl64);
all_widths!(shiftop, "shr", shr8, shr16, shr32, shr64);
all_widths!(shiftop, "sar", sar8, sar16, sar32, sar64);
wide_widths!(dshiftop, "shld", shld16, shld32, shld64);
wide_widths!(dshiftop, "shrd", shrd16, shrd32, shrd64);
wide_widths!(binop_f, "bsf", bsf16, bsf32, bsf64);
wide_widths!(binop_f, "bsr", bsr16, bsr32, bsr64);
wide_widths!(binop_f, "imul", imul2_16, imul2_32, imul2_64);
wide_widths!(binop, "bt", bt16, bt32, bt64);
wide_widths!(binop, "bts", bts16, bts32, bts64);
wide_widths!(binop, "btr", btr16, btr32, btr64);
wide_widths!(binop, "btc", btc16, btc32, btc64);

/// Width-dispatched helpers: operate on u64 holding an `size`-byte value.
macro_rules! dispatch2 {
    ($name:ident, $f8:ident, $f16:ident, $f32:ident, $f64:ident) => {
        #[inline(always)]
        pub fn $name(size: usize, a: u64, b: u64) -> (u64, u64) {
            match size {
                1 => {
                    let (r, f) = $f8(a as u8, b as u8);
                    (r as u64, f)
                }
                2 => {
                    let (r, f) = $f16(a as u16, b as u16);
                    (r as u64, f)
                }
                4 => {
                    let (r, f) = $f32(a as u32, b as u32);
                    (r as u64, f)
                }
                _ => $f64(a, b),
            }
        }
    };
}
dispatch2!(add, add8, add16, add32, add64);
dispatch2!(or, or8, or16, or32, or64);
dispatch2!(and, and8, and16, and32, and64);
dispatch2!(sub, sub8, sub16, sub32, sub64);
dispatch2!(xor, xor8, xor16, xor32, xor64);

macro_rules! dispatch2c {
    ($name:ident, $f8:ident, $f16:ident, $f32:ident, $f64:ident) => {
        #[inline(always)]
        pub fn $name(size: usize, a: u64, b: u64, cf: bool) -> (u64, u64) {
            match size {
                1 => {
                    let (r, f) = $f8(a as u8, b as u8, cf);
                    (r as u64, f)
                }
                2 => {
                    let (r, f) = $f16(a as u16, b as u16, cf);
                    (r as u64, f)
                }
                4 => {
                    let (r, f) = $f32(a as u32, b as u32, cf);
                    (r as u64, f)
                }
                _ => $f64(a, b, cf),
            }
        }
    };
}
dispatch2c!(adc, adc8, adc16, adc32, adc64);
dispatch2c!(sbb, sbb8, sbb16, sbb32, sbb64);

macro_rules! dispatch1 {
    ($name:ident, $f8:ident, $f16:ident, $f32:ident, $f64:ident) => {
        #[inline(always)]
        pub fn $name(size: usize, a: u64) -> (u64, u64) {
            match size {
                1 => {
                    let (r, f) = $f8(a as u8);
                    (r as u64, f)
                }
                2 => {
                    let (r, f) = $f16(a as u16);
                    (r as u64, f)
                }
                4 => {
                    let (r, f) = $f32(a as u32);
                    (r as u64, f)
                }
                _ => $f64(a),
            }
        }
    };
}
dispatch1!(inc, inc8, inc16, inc32, inc64);
dispatch1!(dec, dec8, dec16, dec32, dec64);
dispatch1!(neg, neg8, neg16, neg32, neg64);

macro_rules! dispatch_shift {
    ($name:ident, $f8:ident, $f16:ident, $f32:ident, $f64:ident) => {
        #[inline(always)]
        pub fn $name(size: usize, a: u64, count: u8, cf: bool) -> (u64, u64) {
            match size {
                1 => {
                    let (r, f) = $f8(a as u8, count, cf);
                    (r as u64, f)
                }
                2 => {
                    let (r, f) = $f16(a as u16, count, cf);
                    (r as u64, f)
                }
                4 => {
                    let (r, f) = $f32(a as u32, count, cf);
                    (r as u64, f)
                }
                _ => $f64(a, count, cf),
            }
        }
    };
}
dispatch_shift!(rol, rol8, rol16, rol32, rol64);
dispatch_shift!(ror, ror8, ror16, ror32, ror64);
dispatch_shift!(rcl, rcl8, rcl16, rcl32, rcl64);
dispatch_shift!(rcr, rcr8, rcr16, rcr32, rcr64);
dispatch_shift!(shl, shl8, shl16, shl32, shl64);
dispatch_shift!(shr, shr8, shr16, shr32, shr64);
dispatch_shift!(sar, sar8, sar16, sar32, sar64);

/// Flags written by rotates: only CF and OF (the rest stay as they were).
pub const ROTATE_FLAGS: u64 = CF | OF;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::flags::*;

    #[test]
    fn add_flags() {
        let (r, f) = add8(0xff, 1);
        assert_eq!(r, 0);
        assert_eq!(f & (CF | ZF | AF | PF), CF | ZF | AF | PF);
        let (_, f) = add32(0x7fff_ffff, 1);
        assert_eq!(f & (OF | SF), OF | SF);
        let (r, f) = adc64(u64::MAX, 0, true);
        assert_eq!((r, f & CF), (0, CF));
        let (r, f) = sbb16(0, 0, true);
        assert_eq!((r, f & CF), (0xffff, CF));
    }

    #[test]
    fn shifts() {
        assert_eq!(shl32(1, 31, false).0, 0x8000_0000);
        let (r, f) = rcl8(0x80, 1, false);
        assert_eq!((r, f & ROTATE_FLAGS), (0, CF | OF));
        assert_eq!(rcr8(0, 1, true).0, 0x80);
    }
}
