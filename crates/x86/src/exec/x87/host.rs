//! The host's x87 unit as an exact 80-bit calculator.
//!
//! Each operation is one `asm!` block: save the host control word, load
//! the guest's precision/rounding control with every exception masked,
//! load the operands (in1 then in0, so ST0 = in0, ST1 = in1), run the
//! operation, store the status word and ST0/ST1, then FNINIT (emptying the
//! host stack whatever the operation left) and restore the host control
//! word. The host x87 is therefore left empty and as it was configured.

/// An 80-bit value: (mantissa, sign|exponent).
pub type F80 = (u64, u16);

const CW: usize = 0;
const SW: usize = 2;
const MEM: usize = 8;
const IN0: usize = 24;
const IN1: usize = 40;
const OUT0: usize = 56;
const OUT1: usize = 72;

#[repr(C, align(16))]
pub struct HBuf {
    b: [u8; 96],
}

pub fn to_bytes(v: F80) -> [u8; 10] {
    let mut r = [0u8; 10];
    r[..8].copy_from_slice(&v.0.to_le_bytes());
    r[8..].copy_from_slice(&v.1.to_le_bytes());
    r
}

pub fn from_bytes(b: &[u8]) -> F80 {
    (
        u64::from_le_bytes(b[..8].try_into().unwrap()),
        u16::from_le_bytes(b[8..10].try_into().unwrap()),
    )
}

impl HBuf {
    pub fn sw(&self) -> u16 {
        u16::from_le_bytes([self.b[SW], self.b[SW + 1]])
    }
    pub fn out0(&self) -> F80 {
        from_bytes(&self.b[OUT0..OUT0 + 10])
    }
    pub fn out1(&self) -> F80 {
        from_bytes(&self.b[OUT1..OUT1 + 10])
    }
    pub fn mem(&self) -> &[u8] {
        &self.b[MEM..MEM + 16]
    }
}

/// Run host operation `f` with guest control word `fcw` (exceptions forced
/// masked), ST0 = `a`, ST1 = `b`, and `mem` in the memory-operand slot.
pub fn hcall(f: fn(&mut HBuf), fcw: u16, a: F80, b: F80, mem: &[u8]) -> HBuf {
    let mut h = HBuf { b: [0; 96] };
    let cw = (fcw & 0x0f00) | 0x7f;
    h.b[CW..CW + 2].copy_from_slice(&cw.to_le_bytes());
    h.b[IN0..IN0 + 10].copy_from_slice(&to_bytes(a));
    h.b[IN1..IN1 + 10].copy_from_slice(&to_bytes(b));
    h.b[MEM..MEM + mem.len()].copy_from_slice(mem);
    f(&mut h);
    h
}

macro_rules! host_ops {
    ($($name:ident: $($body:literal)+;)*) => {
        $(
            #[inline(never)]
            pub fn $name(h: &mut HBuf) {
                // SAFETY: touches only the x87 unit and `h` (96 bytes, all
                // offsets in range). The host x87 stack is emptied by FNINIT
                // and its control word restored before returning; all x87
                // registers are declared clobbered.
                unsafe {
                    core::arch::asm!(
                        "fnstcw word ptr [{p} + 4]",
                        "fldcw word ptr [{p}]",
                        "fnclex",
                        "fld tbyte ptr [{p} + 40]",
                        "fld tbyte ptr [{p} + 24]",
                        $($body,)+
                        "fnstsw word ptr [{p} + 2]",
                        "fstp tbyte ptr [{p} + 56]",
                        "fstp tbyte ptr [{p} + 72]",
                        "fninit",
                        "fldcw word ptr [{p} + 4]",
                        p = in(reg) h.b.as_mut_ptr(),
                        out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                        out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                        options(nostack),
                    );
                }
            }
        )*
    };
}

host_ops! {
    add: "fadd st(0), st(1)";
    sub: "fsub st(0), st(1)";
    mul: "fmul st(0), st(1)";
    div: "fdiv st(0), st(1)";
    sqrt: "fsqrt";
    rndint: "frndint";
    f2xm1: "f2xm1";
    sin: "fsin";
    cos: "fcos";
    scale: "fscale";
    prem: "fprem";
    prem1: "fprem1";
    yl2x: "fyl2x";
    yl2xp1: "fyl2xp1";
    patan: "fpatan";
    xtract: "fxtract";
    ptan: "fptan";
    sincos: "fsincos";
    com: "fcom st(1)";
    ucom: "fucom st(1)";
    tst: "ftst";
    xam: "fxam";
    ld32: "fld dword ptr [{p} + 8]";
    ld64: "fld qword ptr [{p} + 8]";
    ild16: "fild word ptr [{p} + 8]";
    ild32: "fild dword ptr [{p} + 8]";
    ild64: "fild qword ptr [{p} + 8]";
    bld: "fbld tbyte ptr [{p} + 8]";
    st32: "fst dword ptr [{p} + 8]";
    st64: "fst qword ptr [{p} + 8]";
    ist16: "fist word ptr [{p} + 8]";
    ist32: "fist dword ptr [{p} + 8]";
    ist64: "fld st(0)" "fistp qword ptr [{p} + 8]";
    istt16: "fld st(0)" "fisttp word ptr [{p} + 8]";
    istt32: "fld st(0)" "fisttp dword ptr [{p} + 8]";
    istt64: "fld st(0)" "fisttp qword ptr [{p} + 8]";
    bstp: "fld st(0)" "fbstp tbyte ptr [{p} + 8]";
    ld1: "fld1";
    ldz: "fldz";
    ldpi: "fldpi";
    ldl2e: "fldl2e";
    ldl2t: "fldl2t";
    ldlg2: "fldlg2";
    ldln2: "fldln2";
}
