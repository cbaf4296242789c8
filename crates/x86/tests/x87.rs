//! x87 / MMX / FXSAVE tests: each sequence runs both in the interpreter and
//! natively on the host (the same machine code, `rdi` = data buffer), and
//! the resulting buffers are compared.

use iced_x86::code_asm::*;
use mat_x86::testutil::*;
use mat_x86::Exit;

const CODE: u64 = 0x10000;
const BUF: u64 = 0x20000;
const LEN: usize = 8192;

#[repr(C, align(64))]
struct Buf([u8; LEN]);

type Body = dyn Fn(&mut CodeAssembler);

fn native(body: &Body, input: &[u8]) -> Vec<u8> {
    let code = asm64(0, |a| {
        a.fninit().unwrap();
        body(a);
        a.fninit().unwrap();
        a.ret().unwrap();
    });
    let mut buf = Box::new(Buf([0; LEN]));
    buf.0[..input.len()].copy_from_slice(input);
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            65536,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len());
        let f: extern "sysv64" fn(*mut u8) = std::mem::transmute(p);
        f(buf.0.as_mut_ptr());
        libc::munmap(p, 65536);
    }
    buf.0.to_vec()
}

fn guest(body: &Body, input: &[u8]) -> (Vec<u8>, mat_x86::Cpu) {
    let code = asm64(CODE, |a| {
        a.fninit().unwrap();
        body(a);
        a.hlt().unwrap();
    });
    let mut cpu = cpu64(16 << 20, &code, CODE);
    cpu.s.gpr[4] = 0x9000;
    cpu.s.gpr[7] = BUF;
    cpu.ram.write(BUF, input);
    assert_eq!(
        cpu.run(100_000),
        Exit::Halted,
        "guest did not halt at rip {:#x}",
        cpu.s.rip
    );
    let mut out = vec![0u8; LEN];
    cpu.ram.read(BUF, &mut out);
    (out, cpu)
}

fn both(body: &Body, input: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let n = native(body, input);
    let (g, _) = guest(body, input);
    (g, n)
}

/// Compare the output area [start, end) in 16-byte rows, for good messages.
fn same(g: &[u8], n: &[u8], start: usize, end: usize) {
    for o in (start..end).step_by(16) {
        let e = (o + 16).min(end);
        assert_eq!(&g[o..e], &n[o..e], "mismatch at offset {o:#x}");
    }
}

fn m(off: i32) -> AsmMemoryOperand {
    rdi + off
}

/// Input buffer with f64 values at 8-byte slots from 0.
fn f64s(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

const OUT: i32 = 0x400;

#[test]
fn arithmetic_80bit() {
    let input = f64s(&[
        1.0,
        3.0,
        std::f64::consts::PI,
        2.0,
        -7.25,
        1e300,
        1e-300,
        0.1,
    ]);
    let body = |a: &mut CodeAssembler| {
        // 1/3 in extended precision
        a.fld(qword_ptr(m(0))).unwrap();
        a.fdiv(qword_ptr(m(8))).unwrap();
        a.fld(st0).unwrap();
        a.fstp(tword_ptr(m(OUT))).unwrap();
        // (1/3)*pi + 0.1, then sqrt
        a.fmul(qword_ptr(m(16))).unwrap();
        a.fadd(qword_ptr(m(56))).unwrap();
        a.fld(st0).unwrap();
        a.fstp(tword_ptr(m(OUT + 16))).unwrap();
        a.fsqrt().unwrap();
        a.fst(qword_ptr(m(OUT + 32))).unwrap();
        a.fstp(tword_ptr(m(OUT + 48))).unwrap();
        // FILD / FIDIV / FSTP m64
        a.mov(dword_ptr(m(0x100)), 22i32).unwrap();
        a.mov(dword_ptr(m(0x104)), 7i32).unwrap();
        a.fild(dword_ptr(m(0x100))).unwrap();
        a.fidiv(dword_ptr(m(0x104))).unwrap();
        a.fstp(qword_ptr(m(OUT + 64))).unwrap();
        // all the register forms of sub/div
        a.fld(qword_ptr(m(32))).unwrap(); // -7.25
        a.fldpi().unwrap();
        a.fld(qword_ptr(m(8))).unwrap(); // 3, pi, -7.25
        a.fsub_2(st0, st1).unwrap();
        a.fsubr_2(st0, st2).unwrap();
        a.fsub_2(st2, st0).unwrap();
        a.fsubr_2(st1, st0).unwrap();
        a.fdiv_2(st1, st0).unwrap();
        a.fdivr_2(st2, st0).unwrap();
        a.fsubp(st1, st0).unwrap();
        a.fdivrp(st1, st0).unwrap();
        a.fld(qword_ptr(m(8))).unwrap();
        a.fsubrp(st1, st0).unwrap();
        a.fld(qword_ptr(m(24))).unwrap();
        a.fdivp(st1, st0).unwrap();
        a.fld(qword_ptr(m(24))).unwrap();
        a.fmulp(st1, st0).unwrap();
        a.fld(qword_ptr(m(24))).unwrap();
        a.faddp(st1, st0).unwrap();
        a.fstp(tword_ptr(m(OUT + 80))).unwrap();
        a.fstp(tword_ptr(m(OUT + 96))).unwrap();
        a.fnstsw(word_ptr(m(OUT + 112))).unwrap();
        // overflow / underflow / precision to m32, m64
        a.fld(qword_ptr(m(40))).unwrap();
        a.fst(dword_ptr(m(OUT + 120))).unwrap();
        a.fmul_2(st0, st0).unwrap();
        a.fstp(tword_ptr(m(OUT + 128))).unwrap();
        a.fld(qword_ptr(m(48))).unwrap();
        a.fmul_2(st0, st0).unwrap();
        a.fst(qword_ptr(m(OUT + 144))).unwrap();
        a.fstp(tword_ptr(m(OUT + 160))).unwrap();
        a.fnstsw(word_ptr(m(OUT + 176))).unwrap();
        // integer memory forms
        a.mov(word_ptr(m(0x108)), -5i32).unwrap();
        a.fldln2().unwrap();
        a.fiadd(word_ptr(m(0x108))).unwrap();
        a.fimul(dword_ptr(m(0x104))).unwrap();
        a.fisub(dword_ptr(m(0x100))).unwrap();
        a.fisubr(word_ptr(m(0x108))).unwrap();
        a.fidivr(dword_ptr(m(0x104))).unwrap();
        a.fstp(tword_ptr(m(OUT + 192))).unwrap();
        a.fnstsw(word_ptr(m(OUT + 208))).unwrap();
    };
    let (g, n) = both(&body, &input);
    same(&g, &n, OUT as usize, OUT as usize + 224);
    // Sanity: 1/3 is 0x3ffd aaaa...ab
    assert_eq!(
        u16::from_le_bytes([g[OUT as usize + 8], g[OUT as usize + 9]]),
        0x3ffd
    );
    assert_eq!(
        f64::from_le_bytes(g[OUT as usize + 64..OUT as usize + 72].try_into().unwrap()),
        22.0 / 7.0
    );
}

#[test]
fn constants_and_rounding_control() {
    let body = |a: &mut CodeAssembler| {
        for (k, rc) in [0u16, 1, 2, 3].iter().enumerate() {
            let o = OUT + k as i32 * 0x80;
            a.mov(word_ptr(m(0x100)), (0x037f | (rc << 10)) as i32)
                .unwrap();
            a.fldcw(word_ptr(m(0x100))).unwrap();
            a.fldpi().unwrap();
            a.fstp(tword_ptr(m(o))).unwrap();
            a.fldl2e().unwrap();
            a.fstp(tword_ptr(m(o + 16))).unwrap();
            a.fldl2t().unwrap();
            a.fstp(tword_ptr(m(o + 32))).unwrap();
            a.fldlg2().unwrap();
            a.fstp(tword_ptr(m(o + 48))).unwrap();
            a.fldln2().unwrap();
            a.fld1().unwrap();
            a.fldz().unwrap();
            a.faddp(st1, st0).unwrap();
            a.fdivrp(st1, st0).unwrap();
            a.fstp(tword_ptr(m(o + 64))).unwrap();
            a.fnstcw(word_ptr(m(o + 80))).unwrap();
            a.fnstsw(word_ptr(m(o + 82))).unwrap();
        }
        // precision control: single precision 1/3
        a.mov(word_ptr(m(0x100)), 0x007fi32).unwrap();
        a.fldcw(word_ptr(m(0x100))).unwrap();
        a.fld1().unwrap();
        a.fldl2t().unwrap();
        a.fdivp(st1, st0).unwrap();
        a.fstp(tword_ptr(m(OUT + 0x200))).unwrap();
    };
    let (g, n) = both(&body, &[]);
    same(&g, &n, OUT as usize, OUT as usize + 0x210);
}

#[test]
fn fist_rounding_modes() {
    let input = f64s(&[2.5, -2.5, 1.5, -0.5, 1e10, -3.7, 123456.789, 1e30]);
    let body = |a: &mut CodeAssembler| {
        let mut o = OUT;
        for rc in 0u16..4 {
            a.mov(word_ptr(m(0x100)), (0x037f | (rc << 10)) as i32)
                .unwrap();
            a.fldcw(word_ptr(m(0x100))).unwrap();
            for k in 0..8 {
                a.fld(qword_ptr(m(k * 8))).unwrap();
                a.fist(word_ptr(m(o))).unwrap();
                a.fist(dword_ptr(m(o + 2))).unwrap();
                a.fld(st0).unwrap();
                a.fistp(qword_ptr(m(o + 6))).unwrap();
                a.fld(st0).unwrap();
                a.fisttp(dword_ptr(m(o + 14))).unwrap();
                a.fld(st0).unwrap();
                a.fisttp(word_ptr(m(o + 18))).unwrap();
                a.fld(st0).unwrap();
                a.fbstp(tword_ptr(m(o + 20))).unwrap();
                a.frndint().unwrap();
                a.fstp(qword_ptr(m(o + 30))).unwrap();
                a.fnstsw(word_ptr(m(o + 38))).unwrap();
                o += 40;
            }
        }
        a.fbld(tword_ptr(m(OUT + 20))).unwrap();
        a.fstp(tword_ptr(m(o))).unwrap();
    };
    let (g, n) = both(&body, &input);
    same(&g, &n, OUT as usize, OUT as usize + 40 * 32 + 16);
}

#[test]
fn fprem_and_transcendentals() {
    let input = f64s(&[
        1e20,
        3.0,
        std::f64::consts::PI,
        0.5,
        -100.125,
        7.0,
        1e-5,
        2.0,
        1e300,
    ]);
    let body = |a: &mut CodeAssembler| {
        // FPREM / FPREM1 with condition codes
        for (k, (x, y)) in [(8, 16), (32, 40), (0, 40), (64, 16)].iter().enumerate() {
            let o = OUT + k as i32 * 48;
            a.fld(qword_ptr(m(*y))).unwrap();
            a.fld(qword_ptr(m(*x))).unwrap();
            a.fprem().unwrap();
            a.fnstsw(word_ptr(m(o))).unwrap();
            a.fld(st0).unwrap();
            a.fstp(tword_ptr(m(o + 2))).unwrap();
            a.fld(qword_ptr(m(*x))).unwrap();
            a.fprem1().unwrap();
            a.fnstsw(word_ptr(m(o + 12))).unwrap();
            a.fstp(tword_ptr(m(o + 14))).unwrap();
            a.fstp(st0).unwrap();
            a.fstp(st0).unwrap();
        }
        let o = OUT + 0x100;
        // FSIN of a big argument (out of range: C2=1), and of pi
        a.fld(qword_ptr(m(0))).unwrap();
        a.fsin().unwrap();
        a.fnstsw(word_ptr(m(o))).unwrap();
        a.fstp(tword_ptr(m(o + 2))).unwrap();
        a.fld(qword_ptr(m(16))).unwrap();
        a.fsin().unwrap();
        a.fnstsw(word_ptr(m(o + 12))).unwrap();
        a.fstp(tword_ptr(m(o + 14))).unwrap();
        a.fld(qword_ptr(m(24))).unwrap();
        a.fcos().unwrap();
        a.fstp(tword_ptr(m(o + 24))).unwrap();
        a.fld(qword_ptr(m(24))).unwrap();
        a.fsincos().unwrap();
        a.fstp(tword_ptr(m(o + 34))).unwrap();
        a.fstp(tword_ptr(m(o + 44))).unwrap();
        a.fld(qword_ptr(m(24))).unwrap();
        a.fptan().unwrap();
        a.fstp(tword_ptr(m(o + 54))).unwrap();
        a.fstp(tword_ptr(m(o + 64))).unwrap();
        a.fld(qword_ptr(m(8))).unwrap();
        a.fld(qword_ptr(m(32))).unwrap();
        a.fpatan().unwrap();
        a.fstp(tword_ptr(m(o + 74))).unwrap();
        a.fld(qword_ptr(m(8))).unwrap();
        a.fld(qword_ptr(m(40))).unwrap();
        a.fyl2x().unwrap();
        a.fstp(tword_ptr(m(o + 84))).unwrap();
        a.fld(qword_ptr(m(8))).unwrap();
        a.fld(qword_ptr(m(48))).unwrap();
        a.fyl2xp1().unwrap();
        a.fstp(tword_ptr(m(o + 94))).unwrap();
        a.fld(qword_ptr(m(24))).unwrap();
        a.f2xm1().unwrap();
        a.fstp(tword_ptr(m(o + 104))).unwrap();
        a.fld(qword_ptr(m(40))).unwrap();
        a.fld(qword_ptr(m(32))).unwrap();
        a.fscale().unwrap();
        a.fstp(tword_ptr(m(o + 114))).unwrap();
        a.fstp(st0).unwrap();
        a.fld(qword_ptr(m(32))).unwrap();
        a.fxtract().unwrap();
        a.fstp(tword_ptr(m(o + 124))).unwrap();
        a.fstp(tword_ptr(m(o + 134))).unwrap();
        a.fld(qword_ptr(m(64))).unwrap();
        a.fld(st0).unwrap();
        a.fmulp(st1, st0).unwrap();
        a.fchs().unwrap();
        a.fstp(tword_ptr(m(o + 144))).unwrap();
        a.fld(qword_ptr(m(32))).unwrap();
        a.fabs().unwrap();
        a.fstp(tword_ptr(m(o + 154))).unwrap();
        a.fnstsw(word_ptr(m(o + 164))).unwrap();
    };
    let (g, n) = both(&body, &input);
    same(&g, &n, OUT as usize, OUT as usize + 0x100 + 166);
}

#[test]
fn fxam_classes_and_compares() {
    // zero, -denormal(f64 -> normal in 80 bit, so build one via fscale), inf, nan, normal
    let input = f64s(&[0.0, -1.0, f64::INFINITY, f64::NAN, 2.5, -0.0, 1.0, -2.5]);
    let body = |a: &mut CodeAssembler| {
        let mut o = OUT;
        for k in 0..8 {
            a.fld(qword_ptr(m(k * 8))).unwrap();
            a.fxam().unwrap();
            a.fnstsw(word_ptr(m(o))).unwrap();
            a.fstp(st0).unwrap();
            o += 2;
        }
        // empty register
        a.fxam().unwrap();
        a.fnstsw(word_ptr(m(o))).unwrap();
        o += 2;
        // 80-bit denormal: 1.0 scaled by -16400
        a.mov(dword_ptr(m(0x100)), -16400i32).unwrap();
        a.fild(dword_ptr(m(0x100))).unwrap();
        a.fld1().unwrap();
        a.fscale().unwrap();
        a.fxam().unwrap();
        a.fnstsw(word_ptr(m(o))).unwrap();
        a.fstp(tword_ptr(m(o + 2))).unwrap();
        a.fstp(st0).unwrap();
        o += 12;
        // compares: every pair of a few values, FCOM / FUCOM / FCOMI / FUCOMI
        for x in [0, 8, 24, 32] {
            for y in [0, 24, 40, 56] {
                a.fld(qword_ptr(m(y))).unwrap();
                a.fld(qword_ptr(m(x))).unwrap();
                a.fcom_2(st0, st1).unwrap();
                a.fnstsw(word_ptr(m(o))).unwrap();
                a.fucom(st0, st1).unwrap();
                a.fnstsw(word_ptr(m(o + 2))).unwrap();
                a.fcomi(st0, st1).unwrap();
                a.pushfq().unwrap();
                a.pop(rax).unwrap();
                a.and(eax, 0x8d5).unwrap();
                a.mov(word_ptr(m(o + 4)), ax).unwrap();
                a.fucomip(st0, st1).unwrap();
                a.pushfq().unwrap();
                a.pop(rax).unwrap();
                a.and(eax, 0x8d5).unwrap();
                a.mov(word_ptr(m(o + 6)), ax).unwrap();
                a.fcom(qword_ptr(m(x))).unwrap();
                a.fnstsw(word_ptr(m(o + 8))).unwrap();
                a.ftst().unwrap();
                a.fnstsw(word_ptr(m(o + 10))).unwrap();
                a.fcomp(dword_ptr(m(0x100))).unwrap();
                a.fnstsw(word_ptr(m(o + 12))).unwrap();
                a.fnclex().unwrap();
                o += 14;
            }
        }
        a.fld1().unwrap();
        a.fldz().unwrap();
        a.fcompp().unwrap();
        a.fnstsw(word_ptr(m(o))).unwrap();
        a.mov(word_ptr(m(0x108)), 1i32).unwrap();
        a.fld1().unwrap();
        a.ficomp(word_ptr(m(0x108))).unwrap();
        a.fnstsw(word_ptr(m(o + 2))).unwrap();
        // FCMOV
        a.fld(qword_ptr(m(48))).unwrap();
        a.fld(qword_ptr(m(56))).unwrap();
        a.fcomi(st0, st1).unwrap();
        a.fcmovb(st0, st1).unwrap();
        a.fstp(tword_ptr(m(o + 4))).unwrap();
        a.fld(qword_ptr(m(56))).unwrap();
        a.fcmovnb(st0, st1).unwrap();
        a.fstp(tword_ptr(m(o + 14))).unwrap();
        a.fnstsw(word_ptr(m(o + 24))).unwrap();
    };
    let (g, n) = both(&body, &input);
    same(&g, &n, OUT as usize, OUT as usize + 0x1a0);
}

#[test]
fn stack_faults_and_fxch() {
    let input = f64s(&[1.5, -2.0]);
    let body = |a: &mut CodeAssembler| {
        // underflow: add on an empty stack, masked -> indefinite
        a.fadd_2(st0, st1).unwrap();
        a.fnstsw(word_ptr(m(OUT))).unwrap();
        a.fstp(tword_ptr(m(OUT + 2))).unwrap();
        a.fnstsw(word_ptr(m(OUT + 12))).unwrap();
        a.fst(qword_ptr(m(OUT + 14))).unwrap();
        a.fist(dword_ptr(m(OUT + 22))).unwrap();
        a.fnstsw(word_ptr(m(OUT + 26))).unwrap();
        a.fnclex().unwrap();
        // overflow: 9 pushes
        for _ in 0..9 {
            a.fld(qword_ptr(m(0))).unwrap();
        }
        a.fnstsw(word_ptr(m(OUT + 28))).unwrap();
        a.fstp(tword_ptr(m(OUT + 30))).unwrap();
        a.fstp(tword_ptr(m(OUT + 40))).unwrap();
        a.fninit().unwrap();
        // FXCH, FINCSTP/FDECSTP, FFREE
        a.fld(qword_ptr(m(0))).unwrap();
        a.fld(qword_ptr(m(8))).unwrap();
        a.fxch(st0, st1).unwrap();
        a.fstp(tword_ptr(m(OUT + 50))).unwrap();
        a.fdecstp().unwrap();
        a.fincstp().unwrap();
        a.fincstp().unwrap();
        a.fnstsw(word_ptr(m(OUT + 60))).unwrap();
        a.fdecstp().unwrap();
        a.ffree(st0).unwrap();
        a.fxch(st0, st1).unwrap(); // both empty: indefinites
        a.fnstsw(word_ptr(m(OUT + 62))).unwrap();
        a.fstp(tword_ptr(m(OUT + 64))).unwrap();
        // FNSTENV: control, status, tag words
        a.fld1().unwrap();
        a.fldz().unwrap();
        a.fnstenv(m(OUT + 80)).unwrap();
        a.fnstsw(ax).unwrap();
        a.mov(word_ptr(m(OUT + 110)), ax).unwrap();
        // FNSAVE (then FNINIT state), FRSTOR, arithmetic on restored regs
        a.fldpi().unwrap();
        a.fnsave(m(OUT + 0x100)).unwrap();
        a.fnstsw(word_ptr(m(OUT + 112))).unwrap();
        a.fnstcw(word_ptr(m(OUT + 114))).unwrap();
        a.frstor(m(OUT + 0x100)).unwrap();
        a.faddp(st1, st0).unwrap();
        a.fstp(tword_ptr(m(OUT + 116))).unwrap();
        a.fnstsw(word_ptr(m(OUT + 126))).unwrap();
    };
    let (g, n) = both(&body, &input);
    same(&g, &n, OUT as usize, OUT as usize + 80);
    same(&g, &n, OUT as usize + 80, OUT as usize + 92); // FCW FSW FTW (+reserved)
    same(&g, &n, OUT as usize + 110, OUT as usize + 128);
    same(&g, &n, OUT as usize + 0x100, OUT as usize + 0x100 + 12);
    same(
        &g,
        &n,
        OUT as usize + 0x100 + 28,
        OUT as usize + 0x100 + 108,
    ); // registers
}

#[test]
fn fxsave_layout_matches_host() {
    let input = f64s(&[1.5, -2.0, f64::NAN, 0.0]);
    let body = |a: &mut CodeAssembler| {
        a.fld(qword_ptr(m(0))).unwrap();
        a.fld(qword_ptr(m(8))).unwrap();
        a.fld(qword_ptr(m(16))).unwrap();
        a.fld(qword_ptr(m(24))).unwrap();
        a.fdiv_2(st0, st0).unwrap(); // 0/0: IE, indefinite
        a.fincstp().unwrap();
        a.mov(word_ptr(m(0x100)), 0x0b7fi32).unwrap();
        a.fldcw(word_ptr(m(0x100))).unwrap();
        a.fxsave(m(0x200)).unwrap();
        a.fxsave64(m(0x400)).unwrap();
        // restore a modified image and save again
        a.mov(word_ptr(m(0x200)), 0x027fi32).unwrap();
        a.mov(byte_ptr(m(0x204)), 0x81i32).unwrap();
        a.fxrstor(m(0x200)).unwrap();
        a.fxsave(m(0x600)).unwrap();
        a.fninit().unwrap();
        a.fxsave(m(0x800 - 0x200 + 0x200)).unwrap();
    };
    let (g, n) = both(&body, &input);
    for base in [0x200usize, 0x400, 0x600, 0x800] {
        same(&g, &n, base, base + 8); // FCW FSW FTW FOP
        same(&g, &n, base + 24, base + 28); // MXCSR
                                            // MXCSR_MASK: ours is 0xffff (DAZ supported); hosts may add bits (AMD: MM, bit 17).
        assert_eq!(
            u32::from_le_bytes(g[base + 28..base + 32].try_into().unwrap()),
            0xffff
        );
        same(&g, &n, base + 32, base + 160); // ST0-7
    }
}

#[test]
fn mmx_matches_host() {
    let input: Vec<u8> = [
        0x8000_7fff_0102_fffeu64,
        0x7f80_0180_ff01_0203,
        0x0123_4567_89ab_cdef,
        0xfedc_ba98_7654_3210,
        0x0000_0000_0000_0004,
        0x8182_0304_8586_0708,
    ]
    .iter()
    .flat_map(|x| x.to_le_bytes())
    .collect();
    let body = |a: &mut CodeAssembler| {
        type Op = fn(&mut CodeAssembler, AsmRegisterMm, AsmRegisterMm) -> Result<(), IcedError>;
        let ops: &[Op] = &[
            CodeAssembler::paddusb,
            CodeAssembler::paddusw,
            CodeAssembler::paddsb,
            CodeAssembler::paddsw,
            CodeAssembler::psubusb,
            CodeAssembler::psubsw,
            CodeAssembler::paddb,
            CodeAssembler::paddw,
            CodeAssembler::paddd,
            CodeAssembler::paddq,
            CodeAssembler::psubb,
            CodeAssembler::psubd,
            CodeAssembler::psubq,
            CodeAssembler::pmaddwd,
            CodeAssembler::packsswb,
            CodeAssembler::packssdw,
            CodeAssembler::packuswb,
            CodeAssembler::punpcklbw,
            CodeAssembler::punpckhbw,
            CodeAssembler::punpcklwd,
            CodeAssembler::punpckhwd,
            CodeAssembler::punpckldq,
            CodeAssembler::punpckhdq,
            CodeAssembler::pcmpeqb,
            CodeAssembler::pcmpgtb,
            CodeAssembler::pcmpgtw,
            CodeAssembler::pcmpgtd,
            CodeAssembler::pmullw,
            CodeAssembler::pmulhw,
            CodeAssembler::pmulhuw,
            CodeAssembler::pmuludq,
            CodeAssembler::pandn,
            CodeAssembler::pxor,
            CodeAssembler::pavgb,
            CodeAssembler::pavgw,
            CodeAssembler::pminub,
            CodeAssembler::pmaxsw,
            CodeAssembler::psadbw,
            CodeAssembler::pshufb,
            CodeAssembler::phaddw,
            CodeAssembler::phaddsw,
            CodeAssembler::phsubd,
            CodeAssembler::pabsb,
            CodeAssembler::pabsw,
            CodeAssembler::psignb,
            CodeAssembler::psignw,
            CodeAssembler::pmulhrsw,
            CodeAssembler::pmaddubsw,
            CodeAssembler::psllw,
            CodeAssembler::psrld,
            CodeAssembler::psraw,
            CodeAssembler::psrlq,
        ];
        let mut o = OUT;
        for op in ops {
            for (x, y) in [(0, 8), (16, 24), (8, 40), (40, 32)] {
                a.movq(mm0, qword_ptr(m(x))).unwrap();
                a.movq(mm3, qword_ptr(m(y))).unwrap();
                op(a, mm0, mm3).unwrap();
                a.movq(qword_ptr(m(o)), mm0).unwrap();
                o += 8;
            }
        }
        a.movq(mm1, qword_ptr(m(16))).unwrap();
        a.pshufw(mm2, mm1, 0x1b).unwrap();
        a.movq(qword_ptr(m(o)), mm2).unwrap();
        a.psrad(mm2, 5).unwrap();
        a.psllq(mm2, 3).unwrap();
        a.movq(qword_ptr(m(o + 8)), mm2).unwrap();
        a.mov(eax, 0x12345678).unwrap();
        a.pinsrw(mm2, eax, 2).unwrap();
        a.pextrw(ecx, mm2, 1).unwrap();
        a.mov(dword_ptr(m(o + 16)), ecx).unwrap();
        a.pmovmskb(edx, mm2).unwrap();
        a.mov(dword_ptr(m(o + 20)), edx).unwrap();
        a.movd(mm4, eax).unwrap();
        a.palignr(mm4, mm2, 3).unwrap();
        a.movq(qword_ptr(m(o + 24)), mm4).unwrap();
        a.movd(dword_ptr(m(o + 32)), mm2).unwrap();
        a.movq(rax, mm2).unwrap();
        a.mov(qword_ptr(m(o + 36)), rax).unwrap();
        a.punpcklbw(mm4, dword_ptr(m(40))).unwrap();
        a.movq(qword_ptr(m(o + 44)), mm4).unwrap();
        a.lea(rdi, m(o + 52)).unwrap();
        a.maskmovq(mm1, mm2).unwrap();
        a.lea(rdi, m(-(o + 52))).unwrap();
        a.movntq(qword_ptr(m(o + 60)), mm1).unwrap();
        // tag word after MMX use and after EMMS
        a.fnstenv(m(o + 68)).unwrap();
        a.emms().unwrap();
        a.fnstenv(m(o + 100)).unwrap();
    };
    let (g, n) = both(&body, &input);
    let end = OUT as usize + 52 * 4 * 8 + 68;
    same(&g, &n, OUT as usize, end);
    same(&g, &n, end, end + 12);
    same(&g, &n, end + 32, end + 44);
}

/// Low quadword of a 64-bit interrupt gate (selector 8, DPL0) to `h`.
fn gate_lo(h: u64) -> u64 {
    (h & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((h >> 16) << 48)
}

#[test]
fn nm_and_mf_exceptions() {
    // #NM with CR0.TS: handler at 0x30000 halts.
    let code = asm64(CODE, |a| {
        a.fld1().unwrap();
        a.hlt().unwrap();
    });
    let mut cpu = cpu64(16 << 20, &code, CODE);
    let h = asm64(0x30000, |a| a.hlt().unwrap());
    cpu.ram.write(0x30000, &h);
    for v in [7u64, 16] {
        let lo = gate_lo(0x30000);
        cpu.ram.write(0x3000 + v * 16, &lo.to_le_bytes());
        cpu.ram.write(0x3000 + v * 16 + 8, &0u64.to_le_bytes());
    }
    cpu.s.idtr.base = 0x3000;
    cpu.s.idtr.limit = 0xfff;
    cpu.s.gpr[4] = 0x9000;
    cpu.s.cr0 |= 8; // TS
    assert_eq!(cpu.run(100), Exit::Halted);
    assert_eq!(cpu.s.rip, 0x30001, "#NM delivered");
    assert_eq!(cpu.ram.read_u64(0x9000 - 40).unwrap(), CODE);

    // #MF: unmask ZE, divide by zero, next FPU instruction faults.
    let code = asm64(CODE, |a| {
        a.fninit().unwrap();
        a.mov(word_ptr(rdi), 0x037bi32).unwrap();
        a.fldcw(word_ptr(rdi)).unwrap();
        a.fld1().unwrap();
        a.fldz().unwrap();
        a.fdivp(st1, st0).unwrap(); // ZE unmasked: no result, ES set
        a.fnstsw(ax).unwrap();
        a.wait().unwrap(); // #MF here
        a.hlt().unwrap();
    });
    let mut cpu2 = cpu64(16 << 20, &code, CODE);
    cpu2.ram.write(0x30000, &h);
    for v in [7u64, 16] {
        let lo = gate_lo(0x30000);
        cpu2.ram.write(0x3000 + v * 16, &lo.to_le_bytes());
        cpu2.ram.write(0x3000 + v * 16 + 8, &0u64.to_le_bytes());
    }
    cpu2.s.idtr.base = 0x3000;
    cpu2.s.idtr.limit = 0xfff;
    cpu2.s.gpr[4] = 0x9000;
    cpu2.s.gpr[7] = BUF;
    assert_eq!(cpu2.run(100), Exit::Halted);
    assert_eq!(cpu2.s.rip, 0x30001, "#MF delivered");
    let sw = cpu2.s.gpr[0] as u16;
    assert_eq!(sw & 0x80ff, 0x8084, "ZE + ES + B, got {sw:#x}");
    assert_eq!((sw >> 11) & 7, 6, "no pop on unmasked exception");
    // the faulting instruction is the FWAIT
    let rip = cpu2.ram.read_u64(0x9000 - 40).unwrap();
    let mut b = [0u8; 1];
    cpu2.ram.read(rip, &mut b);
    assert_eq!(b[0], 0x9b);
}

#[test]
fn fxsave_alignment_and_mxcsr_checks() {
    let code = asm64(CODE, |a| {
        a.fxsave(ptr(rdi + 8)).unwrap();
        a.hlt().unwrap();
    });
    let mut cpu = cpu64(16 << 20, &code, CODE);
    cpu.s.gpr[7] = BUF;
    assert_eq!(cpu.step().map(|f| f.vector), Some(13));
    let code = asm64(CODE, |a| {
        a.fxrstor(ptr(rdi)).unwrap();
        a.hlt().unwrap();
    });
    let mut cpu = cpu64(16 << 20, &code, CODE);
    cpu.s.gpr[7] = BUF;
    cpu.ram.write(BUF + 24, &0x1_0000u32.to_le_bytes());
    assert_eq!(cpu.step().map(|f| f.vector), Some(13));
}
