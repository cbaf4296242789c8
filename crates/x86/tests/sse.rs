//! SSE family: every instruction is compared against the host executing
//! the very same bytes (registers, flags, MXCSR and a memory buffer), plus
//! targeted tests for the architectural corner cases.

use iced_x86::code_asm::*;
use mat_x86::exception::{Fault, GP, NM, UD, XM};
use mat_x86::state::{cr0, cr4};
use mat_x86::testutil::*;
use mat_x86::Cpu;

const CODE: u64 = 0x10000;
const MEM: u64 = 0x20000;
const STATUS: u64 = 0x8d5;

/// Registers and memory an instruction under test may use: XMM0-3, RAX,
/// RCX, RDX, RFLAGS, MXCSR and 64 bytes at [RSI].
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq)]
struct St {
    xmm: [u128; 4],
    gpr: [u64; 3],
    _pad: u64,
    flags: u64,
    mxcsr: u32,
    host_mxcsr: u32,
    mem_ptr: u64,
    _pad2: u64,
    mem: [u8; 64],
}

impl St {
    fn new() -> Self {
        St {
            xmm: [0; 4],
            gpr: [0; 3],
            _pad: 0,
            flags: 0x2 | STATUS,
            mxcsr: 0x1f80,
            host_mxcsr: 0,
            mem_ptr: 0,
            _pad2: 0,
            mem: [0; 64],
        }
    }
}

fn bytes(f: &dyn Fn(&mut CodeAssembler)) -> Vec<u8> {
    asm64(0, |a| f(a))
}

/// Run `insn` natively with state `st`.
fn host_run(insn: &[u8], st: &St) -> St {
    let pro = asm64(0, |a| {
        a.push(r15).unwrap();
        a.mov(r15, rdi).unwrap();
        a.stmxcsr(dword_ptr(r15 + 108)).unwrap();
        a.ldmxcsr(dword_ptr(r15 + 104)).unwrap();
        for (k, x) in [xmm0, xmm1, xmm2, xmm3].into_iter().enumerate() {
            a.movdqu(x, xmmword_ptr(r15 + 16 * k as i32)).unwrap();
        }
        a.mov(rax, qword_ptr(r15 + 64)).unwrap();
        a.mov(rcx, qword_ptr(r15 + 72)).unwrap();
        a.mov(rdx, qword_ptr(r15 + 80)).unwrap();
        a.lea(rsi, qword_ptr(r15 + 128)).unwrap();
        a.mov(rdi, rsi).unwrap();
        a.push(qword_ptr(r15 + 96)).unwrap();
        a.popfq().unwrap();
    });
    let epi = asm64(0, |a| {
        a.pushfq().unwrap();
        a.pop(qword_ptr(r15 + 96)).unwrap();
        for (k, x) in [xmm0, xmm1, xmm2, xmm3].into_iter().enumerate() {
            a.movdqu(xmmword_ptr(r15 + 16 * k as i32), x).unwrap();
        }
        a.mov(qword_ptr(r15 + 64), rax).unwrap();
        a.mov(qword_ptr(r15 + 72), rcx).unwrap();
        a.mov(qword_ptr(r15 + 80), rdx).unwrap();
        a.stmxcsr(dword_ptr(r15 + 104)).unwrap();
        a.ldmxcsr(dword_ptr(r15 + 108)).unwrap();
        a.pop(r15).unwrap();
        a.ret().unwrap();
    });
    let code: Vec<u8> = pro.iter().chain(insn).chain(epi.iter()).copied().collect();
    let mut out = *st;
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len());
        let f: extern "C" fn(*mut St) = std::mem::transmute(p);
        f(&mut out);
        libc::munmap(p, 4096);
    }
    out.host_mxcsr = 0;
    out.mem_ptr = 0;
    out.flags &= STATUS;
    out
}

thread_local! {
    /// Guest RAM is never freed, so each test thread reuses one CPU.
    static CPU: std::cell::RefCell<Option<(Cpu, mat_x86::CpuState)>> = const { std::cell::RefCell::new(None) };
}

/// Load `insn` and `st` into this thread's guest CPU and hand it to `f`.
fn with_guest<R>(insn: &[u8], st: &St, f: impl FnOnce(&mut Cpu) -> R) -> R {
    CPU.with(|c| {
        let mut c = c.borrow_mut();
        let (cpu, init) = c.get_or_insert_with(|| {
            let cpu = cpu64(4 << 20, &[], CODE);
            let init = cpu.s.clone();
            (cpu, init)
        });
        cpu.set_state(init.clone());
        cpu.ram.write(CODE, insn);
        cpu.flush_code();
        cpu.s.rip = CODE;
        cpu.s.gpr[4] = 0x8000;
        for k in 0..4 {
            cpu.s.fpu.xmm[k] = st.xmm[k];
        }
        cpu.s.gpr[0] = st.gpr[0];
        cpu.s.gpr[1] = st.gpr[1];
        cpu.s.gpr[2] = st.gpr[2];
        cpu.s.gpr[6] = MEM;
        cpu.s.gpr[7] = MEM;
        cpu.s.rflags = st.flags;
        cpu.s.fpu.mxcsr = st.mxcsr;
        cpu.ram.write(MEM, &st.mem);
        f(cpu)
    })
}

fn guest_state(cpu: &Cpu) -> St {
    let mut out = St::new();
    for k in 0..4 {
        out.xmm[k] = cpu.s.fpu.xmm[k];
    }
    out.gpr = [cpu.s.gpr[0], cpu.s.gpr[1], cpu.s.gpr[2]];
    out.flags = cpu.s.rflags & STATUS;
    out.mxcsr = cpu.s.fpu.mxcsr;
    cpu.ram.read(MEM, &mut out.mem);
    out
}

/// Run `insn` once in the emulator; returns the final state or the fault.
fn guest_run(insn: &[u8], st: &St) -> Result<St, Fault> {
    with_guest(insn, st, |cpu| match cpu.step() {
        None => {
            assert_eq!(cpu.s.rip, CODE + insn.len() as u64);
            Ok(guest_state(cpu))
        }
        Some(f) => Err(f),
    })
}

fn diff(name: &str, insn: &[u8], st: &St) {
    let want = host_run(insn, st);
    let got = guest_run(insn, st).unwrap_or_else(|f| panic!("{name}: fault {f:?} for {st:x?}"));
    if got != want {
        panic!("{name}: mismatch\n input {st:x?}\n want  {want:x?}\n got   {got:x?}");
    }
}

// -------------------------------------------------------------------
// Inputs.
// -------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const F32S: &[u32] = &[
    0,
    0x8000_0000,
    0x3f80_0000,
    0xbf80_0000,
    0x0000_0001,
    0x807f_ffff,
    0x7f80_0000,
    0xff80_0000,
    0x7fc0_0000,
    0x7f80_0001,
    0xffc0_0001,
    0x7fa0_0000,
    0x7f7f_ffff,
    0x0080_0000,
    0x4f00_0000,
    0xcf00_0000,
    0x3fc0_0000,
    0x4020_0000,
    0xc020_0000,
    0x3f00_0000,
    0x4f32_d05e,
    0x5f00_0000,
    0xdf00_0000,
    0x3eaa_aaab,
    0x0100_0000,
    0x4b7f_ffff,
    0xcb00_0001,
    0x40490fdb,
];

const F64S: &[u64] = &[
    0,
    0x8000_0000_0000_0000,
    0x3ff0_0000_0000_0000,
    0xbff0_0000_0000_0000,
    1,
    0x800f_ffff_ffff_ffff,
    0x7ff0_0000_0000_0000,
    0xfff0_0000_0000_0000,
    0x7ff8_0000_0000_0000,
    0x7ff0_0000_0000_0001,
    0xfff8_0000_0000_0001,
    0x7fef_ffff_ffff_ffff,
    0x0010_0000_0000_0000,
    0x41e0_0000_0000_0000, // 2^31
    0xc1e0_0000_0000_0000, // -2^31
    0xc1e0_0000_0020_0000, // -2^31 - 1
    0x43e0_0000_0000_0000, // 2^63
    0xc3e0_0000_0000_0000, // -2^63
    0x3ff8_0000_0000_0000,
    0x4004_0000_0000_0000,
    0xc004_0000_0000_0000,
    0x3fe0_0000_0000_0000,
    0x47ef_ffff_e000_0000, // f32::MAX
    0x47ff_ffff_ffff_ffff, // overflows f32
    0x36a0_0000_0000_0000, // f32 denormal range
    0x3fd5_5555_5555_5555,
    0x4330_0000_0000_0001,
    0x400921fb54442d18,
];

fn rand_f32(r: &mut Rng) -> u32 {
    if r.below(4) == 0 {
        r.next() as u32
    } else {
        F32S[r.below(F32S.len() as u64) as usize]
    }
}

fn rand_f64(r: &mut Rng) -> u64 {
    if r.below(4) == 0 {
        r.next()
    } else {
        F64S[r.below(F64S.len() as u64) as usize]
    }
}

fn rand_vec(r: &mut Rng) -> u128 {
    match r.below(4) {
        0 => (0..4).fold(0, |v, k| v | (rand_f32(r) as u128) << (32 * k)),
        1 => rand_f64(r) as u128 | (rand_f64(r) as u128) << 64,
        2 => {
            // Small integers and bytes that matter to string/byte ops.
            (0..16).fold(0, |v, k| {
                v | (((r.next() % 5) as u8 * 0x21) as u128) << (8 * k)
            })
        }
        _ => r.next() as u128 | (r.next() as u128) << 64,
    }
}

fn rand_state(r: &mut Rng, vary_mxcsr: bool) -> St {
    let mut st = St::new();
    for k in 0..4 {
        st.xmm[k] = rand_vec(r);
    }
    for k in 0..3 {
        st.gpr[k] = match r.below(3) {
            0 => r.below(40) as i64 as u64,
            1 => (r.below(40) as i64 - 20) as u64,
            _ => r.next(),
        };
    }
    for k in 0..4 {
        st.mem[16 * k..16 * k + 16].copy_from_slice(&rand_vec(r).to_le_bytes());
    }
    if vary_mxcsr {
        st.mxcsr = 0x1f80 | ((r.below(4) as u32) << 13);
        if r.below(4) == 0 {
            st.mxcsr |= 0x8000; // FTZ
        }
        if r.below(4) == 0 {
            st.mxcsr |= 0x40; // DAZ
        }
        if r.below(4) == 0 {
            st.mxcsr |= 0x3f & r.next() as u32; // sticky flags already set
        }
    }
    st
}

type Emit = Box<dyn Fn(&mut CodeAssembler)>;

fn check_all(cases: Vec<(String, Emit)>, trials: usize, vary_mxcsr: bool) {
    let mut r = Rng(0x1234_5678_9abc_def1);
    for (name, f) in cases {
        let insn = bytes(&*f);
        for _ in 0..trials {
            let st = rand_state(&mut r, vary_mxcsr);
            diff(&name, &insn, &st);
        }
    }
}

/// Register and memory forms of `op xmm1, xmm2/m`.
macro_rules! rm {
    ($v:ident; $($m:ident),* $(,)?) => {$(
        $v.push((concat!(stringify!($m), " reg").to_string(), Box::new(|a: &mut CodeAssembler| { a.$m(xmm1, xmm2).unwrap(); })));
        $v.push((concat!(stringify!($m), " mem").to_string(), Box::new(|a: &mut CodeAssembler| { a.$m(xmm1, ptr(rsi + 16)).unwrap(); })));
    )*};
}

/// Register and memory forms of `op xmm1, xmm2/m, imm8` for some imm8s.
macro_rules! rmi {
    ($v:ident, $imms:expr; $($m:ident),* $(,)?) => {$(
        for imm in $imms {
            $v.push((format!("{} reg {imm:#x}", stringify!($m)), Box::new(move |a: &mut CodeAssembler| { a.$m(xmm1, xmm2, imm).unwrap(); })));
            $v.push((format!("{} mem {imm:#x}", stringify!($m)), Box::new(move |a: &mut CodeAssembler| { a.$m(xmm1, ptr(rsi + 32), imm).unwrap(); })));
        }
    )*};
}

const IMMS: [i32; 12] = [0, 1, 2, 3, 4, 7, 0x1b, 0x39, 0x4e, 0x8d, 0xb1, 0xff];

#[test]
fn fp_arith_vs_host() {
    let mut v: Vec<(String, Emit)> = Vec::new();
    rm!(v; addps, addpd, addss, addsd, subps, subpd, subss, subsd, mulps, mulpd, mulss, mulsd,
        divps, divpd, divss, divsd, minps, minpd, minss, minsd, maxps, maxpd, maxss, maxsd,
        sqrtps, sqrtpd, sqrtss, sqrtsd, rcpps, rcpss, rsqrtps, rsqrtss,
        addsubps, addsubpd, haddps, haddpd, hsubps, hsubpd);
    check_all(v, 150, true);
}

#[test]
fn fp_convert_vs_host() {
    let mut v: Vec<(String, Emit)> = Vec::new();
    rm!(v; cvtps2pd, cvtpd2ps, cvtss2sd, cvtsd2ss, cvtdq2ps, cvtps2dq, cvttps2dq, cvtdq2pd, cvtpd2dq, cvttpd2dq);
    macro_rules! gp {
        ($($m:ident $r:ident),*) => {$(
            v.push((concat!(stringify!($m), " ", stringify!($r)).into(), Box::new(|a: &mut CodeAssembler| { a.$m($r, xmm2).unwrap(); })));
            v.push((concat!(stringify!($m), " ", stringify!($r), " mem").into(), Box::new(|a: &mut CodeAssembler| { a.$m($r, ptr(rsi + 8)).unwrap(); })));
        )*};
    }
    gp!(cvtss2si eax, cvtss2si rax, cvttss2si ecx, cvttss2si rcx, cvtsd2si edx, cvtsd2si rdx, cvttsd2si eax, cvttsd2si rax);
    macro_rules! si {
        ($($m:ident $r:ident $p:ident),*) => {$(
            v.push((concat!(stringify!($m), " ", stringify!($r)).into(), Box::new(|a: &mut CodeAssembler| { a.$m(xmm1, $r).unwrap(); })));
            v.push((concat!(stringify!($m), " mem ", stringify!($p)).into(), Box::new(|a: &mut CodeAssembler| { a.$m(xmm1, $p(rsi + 8)).unwrap(); })));
        )*};
    }
    si!(cvtsi2ss eax dword_ptr, cvtsi2ss rcx qword_ptr, cvtsi2sd edx dword_ptr, cvtsi2sd rax qword_ptr);
    check_all(v, 200, true);
}

#[test]
fn fp_compare_vs_host() {
    let mut v: Vec<(String, Emit)> = Vec::new();
    rm!(v; comiss, comisd, ucomiss, ucomisd);
    rmi!(v, 0..8; cmpps, cmppd, cmpss, cmpsd_3);
    rmi!(v, [0, 1, 2, 3, 4, 8, 9, 0xc, 0xf]; roundps, roundpd, roundss, roundsd);
    rmi!(v, [0xff, 0xf1, 0x31, 0x7f, 0x12]; dpps);
    rmi!(v, [0x33, 0x31, 0x12, 0xff]; dppd);
    check_all(v, 120, true);
}

#[test]
fn integer_vs_host() {
    let mut v: Vec<(String, Emit)> = Vec::new();
    rm!(v; paddb, paddw, paddd, paddq, psubb, psubw, psubd, psubq, paddsb, paddsw, paddusb, paddusw,
        psubsb, psubsw, psubusb, psubusw, pmullw, pmulhw, pmulhuw, pmuludq, pmaddwd, psadbw, pavgb, pavgw,
        pminub, pmaxub, pminsw, pmaxsw, pand, pandn, por, pxor, andps, andnps, orps, xorps, andpd, andnpd,
        orpd, xorpd, pcmpeqb, pcmpeqw, pcmpeqd, pcmpeqq, pcmpgtb, pcmpgtw, pcmpgtd, pcmpgtq,
        packsswb, packssdw, packuswb, packusdw, punpcklbw, punpcklwd, punpckldq, punpcklqdq,
        punpckhbw, punpckhwd, punpckhdq, punpckhqdq, unpcklps, unpckhps, unpcklpd, unpckhpd,
        psllw, pslld, psllq, psrlw, psrld, psrlq, psraw, psrad, pshufb, phaddw, phaddd, phaddsw,
        phsubw, phsubd, phsubsw, pmaddubsw, psignb, psignw, psignd, pmulhrsw, pabsb, pabsw, pabsd,
        pmuldq, pmulld, pminsb, pminsd, pminuw, pminud, pmaxsb, pmaxsd, pmaxuw, pmaxud, phminposuw,
        pmovsxbw, pmovsxbd, pmovsxbq, pmovsxwd, pmovsxwq, pmovsxdq, pmovzxbw, pmovzxbd, pmovzxbq,
        pmovzxwd, pmovzxwq, pmovzxdq, movddup, movsldup, movshdup, ptest, pblendvb, blendvps, blendvpd,
        movaps, movups, movapd, movupd, movdqa, movdqu, movss, movsd_2, movq);
    rmi!(v, IMMS; pshufd, pshufhw, pshuflw, shufps, shufpd, pblendw, blendps, blendpd, mpsadbw, insertps);
    rmi!(v, [0, 1, 3, 8, 15, 16, 17, 24, 31, 32, 200]; palignr);
    for imm in [0, 1, 3, 7, 8, 15, 16, 31, 32, 63, 64, 200] {
        macro_rules! sh {
            ($($m:ident),*) => {$(
                v.push((format!("{} {imm}", stringify!($m)), Box::new(move |a: &mut CodeAssembler| { a.$m(xmm1, imm).unwrap(); })));
            )*};
        }
        sh!(psllw, pslld, psllq, psrlw, psrld, psrlq, psraw, psrad, pslldq, psrldq);
    }
    check_all(v, 60, false);
}

#[test]
fn moves_vs_host() {
    let mut v: Vec<(String, Emit)> = Vec::new();
    macro_rules! c {
        ($($name:literal => |$a:ident| $e:expr;)*) => {$(
            v.push(($name.to_string(), Box::new(|$a: &mut CodeAssembler| { $e.unwrap(); })));
        )*};
    }
    c! {
        "movss store" => |a| a.movss(dword_ptr(rsi + 4), xmm1);
        "movsd store" => |a| a.movsd_2(qword_ptr(rsi + 8), xmm1);
        "movaps store" => |a| a.movaps(xmmword_ptr(rsi + 16), xmm1);
        "movups store" => |a| a.movups(xmmword_ptr(rsi + 1), xmm1);
        "movdqu load" => |a| a.movdqu(xmm0, xmmword_ptr(rsi + 3));
        "lddqu" => |a| a.lddqu(xmm0, xmmword_ptr(rsi + 5));
        "movntdqa" => |a| a.movntdqa(xmm0, xmmword_ptr(rsi + 16));
        "movntps" => |a| a.movntps(xmmword_ptr(rsi + 16), xmm3);
        "movntdq" => |a| a.movntdq(xmmword_ptr(rsi + 32), xmm3);
        "movq store" => |a| a.movq(qword_ptr(rsi + 8), xmm1);
        "movq xmm,xmm" => |a| a.movq(xmm0, xmm3);
        "movd xmm,r32" => |a| a.movd(xmm1, ecx);
        "movq xmm,r64" => |a| a.movq(xmm1, rcx);
        "movd r32,xmm" => |a| a.movd(eax, xmm1);
        "movq r64,xmm" => |a| a.movq(rax, xmm1);
        "movd xmm,m32" => |a| a.movd(xmm1, dword_ptr(rsi + 4));
        "movd m32,xmm" => |a| a.movd(dword_ptr(rsi + 4), xmm1);
        "movlps load" => |a| a.movlps(xmm1, qword_ptr(rsi + 8));
        "movlps store" => |a| a.movlps(qword_ptr(rsi + 8), xmm1);
        "movhps load" => |a| a.movhps(xmm1, qword_ptr(rsi + 8));
        "movhps store" => |a| a.movhps(qword_ptr(rsi + 8), xmm1);
        "movlpd load" => |a| a.movlpd(xmm1, qword_ptr(rsi + 8));
        "movhpd store" => |a| a.movhpd(qword_ptr(rsi + 8), xmm1);
        "movhlps" => |a| a.movhlps(xmm1, xmm2);
        "movlhps" => |a| a.movlhps(xmm1, xmm2);
        "movmskps" => |a| a.movmskps(eax, xmm1);
        "movmskpd" => |a| a.movmskpd(rax, xmm1);
        "pmovmskb" => |a| a.pmovmskb(ecx, xmm1);
        "maskmovdqu" => |a| a.maskmovdqu(xmm1, xmm2);
        "pextrb r" => |a| a.pextrb(eax, xmm1, 13);
        "pextrb m" => |a| a.pextrb(byte_ptr(rsi + 3), xmm1, 5);
        "pextrw r" => |a| a.pextrw(eax, xmm1, 6);
        "pextrw m" => |a| a.pextrw(word_ptr(rsi + 3), xmm1, 9);
        "pextrd r" => |a| a.pextrd(ecx, xmm1, 3);
        "pextrq r" => |a| a.pextrq(rcx, xmm1, 1);
        "pextrq m" => |a| a.pextrq(qword_ptr(rsi), xmm1, 0);
        "extractps r" => |a| a.extractps(edx, xmm1, 2);
        "extractps m" => |a| a.extractps(dword_ptr(rsi + 4), xmm1, 7);
        "pinsrb r" => |a| a.pinsrb(xmm1, ecx, 11);
        "pinsrb m" => |a| a.pinsrb(xmm1, byte_ptr(rsi + 7), 20);
        "pinsrw r" => |a| a.pinsrw(xmm1, ecx, 3);
        "pinsrw m" => |a| a.pinsrw(xmm1, word_ptr(rsi + 7), 7);
        "pinsrd r" => |a| a.pinsrd(xmm1, edx, 2);
        "pinsrq r" => |a| a.pinsrq(xmm1, rdx, 1);
        "pinsrq m" => |a| a.pinsrq(xmm1, qword_ptr(rsi + 8), 0);
        "stmxcsr" => |a| a.stmxcsr(dword_ptr(rsi + 4));
    }
    // Register-only forms with the first 2 registers swapped.
    check_all(v, 40, false);
}

#[test]
fn string_compare_vs_host() {
    let mut v: Vec<(String, Emit)> = Vec::new();
    for imm in (0..128).step_by(1) {
        v.push((
            format!("pcmpistri {imm:#x}"),
            Box::new(move |a: &mut CodeAssembler| a.pcmpistri(xmm1, xmm2, imm).unwrap()),
        ));
        v.push((
            format!("pcmpistrm {imm:#x}"),
            Box::new(move |a: &mut CodeAssembler| a.pcmpistrm(xmm1, ptr(rsi + 1), imm).unwrap()),
        ));
        v.push((
            format!("pcmpestri {imm:#x}"),
            Box::new(move |a: &mut CodeAssembler| a.pcmpestri(xmm1, ptr(rsi + 3), imm).unwrap()),
        ));
        v.push((
            format!("pcmpestrm {imm:#x}"),
            Box::new(move |a: &mut CodeAssembler| a.pcmpestrm(xmm1, xmm2, imm).unwrap()),
        ));
        v.push((
            format!("pcmpestri64 {imm:#x}"),
            Box::new(move |a: &mut CodeAssembler| a.pcmpestri64(xmm1, xmm2, imm).unwrap()),
        ));
        v.push((
            format!("pcmpestrm64 {imm:#x}"),
            Box::new(move |a: &mut CodeAssembler| a.pcmpestrm64(xmm1, ptr(rsi), imm).unwrap()),
        ));
    }
    check_all(v, 12, false);
}

#[test]
fn crc32_vs_host() {
    let mut v: Vec<(String, Emit)> = Vec::new();
    macro_rules! c {
        ($($d:ident, $s:expr);*) => {$(
            v.push((format!("crc32 {} {}", stringify!($d), stringify!($s)), Box::new(|a: &mut CodeAssembler| a.crc32($d, $s).unwrap())));
        )*};
    }
    c!(eax, cl; eax, cx; eax, ecx; rax, cl; rax, rcx; edx, byte_ptr(rsi + 1); edx, word_ptr(rsi + 1);
       edx, dword_ptr(rsi + 3); rdx, qword_ptr(rsi + 5));
    check_all(v, 50, false);
}

// -------------------------------------------------------------------
// Targeted semantics.
// -------------------------------------------------------------------

fn one(f: impl Fn(&mut CodeAssembler), st: &St) -> Result<St, Fault> {
    let insn = asm64(0, |a| f(a));
    guest_run(&insn, st)
}

#[test]
fn movss_movsd_movq_zeroing() {
    let mut st = St::new();
    st.xmm[1] = 0x1111_2222_3333_4444_5555_6666_7777_8888;
    st.xmm[2] = 0xaaaa_bbbb_cccc_dddd_eeee_ffff_0000_1234;
    st.mem[..16].copy_from_slice(&0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10u128.to_le_bytes());
    let r = one(|a| a.movss(xmm1, xmm2).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1], 0x1111_2222_3333_4444_5555_6666_0000_1234);
    let r = one(|a| a.movss(xmm1, dword_ptr(rsi)).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1], 0x0d0e_0f10);
    let r = one(|a| a.movsd_2(xmm1, xmm2).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1], 0x1111_2222_3333_4444_eeee_ffff_0000_1234);
    let r = one(|a| a.movsd_2(xmm1, qword_ptr(rsi)).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1], 0x090a_0b0c_0d0e_0f10);
    let r = one(|a| a.movq(xmm1, xmm2).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1], 0xeeee_ffff_0000_1234);
    let r = one(|a| a.movd(xmm1, dword_ptr(rsi)).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1], 0x0d0e_0f10);
    // SSE2 MOVSD store.
    let r = one(|a| a.movsd_2(qword_ptr(rsi + 16), xmm2).unwrap(), &st).unwrap();
    assert_eq!(&r.mem[16..24], &0xeeee_ffff_0000_1234u64.to_le_bytes());
}

#[test]
fn nan_denormal_negzero_arith() {
    let mut st = St::new();
    // -0 + -0, qNaN + 1, sNaN + 1 (quieted, IE), denormal * 1 (DE)
    st.xmm[1] =
        0x8000_0000 | (0x7fc0_1234u128 << 32) | (0x7f80_0001u128 << 64) | (0x0000_0001u128 << 96);
    st.xmm[2] =
        0x8000_0000 | (0x3f80_0000u128 << 32) | (0x3f80_0000u128 << 64) | (0x3f80_0000u128 << 96);
    let want = host_run(&bytes(&|a| a.addps(xmm1, xmm2).unwrap()), &st);
    let got = one(|a| a.addps(xmm1, xmm2).unwrap(), &st).unwrap();
    assert_eq!(got, want);
    assert_eq!(got.xmm[1] as u32, 0x8000_0000);
    assert_eq!((got.xmm[1] >> 32) as u32, 0x7fc0_1234);
    assert_eq!((got.xmm[1] >> 64) as u32, 0x7fc0_0001);
    assert_eq!(got.mxcsr & 0x3f, 0x1 | 0x2 | 0x20); // IE, DE, PE
}

#[test]
fn conversions_out_of_range() {
    let mut st = St::new();
    st.xmm[2] = 0x4f00_0000; // 2^31 as f32
    let r = one(|a| a.cvttss2si(eax, xmm2).unwrap(), &st).unwrap();
    assert_eq!(r.gpr[0], 0x8000_0000);
    assert_eq!(r.mxcsr & 1, 1);
    st.xmm[2] = 0x7ff8_0000_0000_0000;
    let r = one(|a| a.cvtsd2si(rax, xmm2).unwrap(), &st).unwrap();
    assert_eq!(r.gpr[0], 0x8000_0000_0000_0000);
    st.xmm[2] = 0x5f00_0000_4f00_0000_cf00_0000_7f80_0000;
    let r = one(|a| a.cvtps2dq(xmm1, xmm2).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1], 0x8000_0000_8000_0000_8000_0000_8000_0000);
}

#[test]
fn comiss_flags() {
    let mut st = St::new();
    for (a, b, fl) in [
        (0x3f80_0000u128, 0x4000_0000u128, 0x01u64), // 1 < 2: CF
        (0x4000_0000, 0x3f80_0000, 0x00),
        (0x3f80_0000, 0x3f80_0000, 0x40),
        (0x8000_0000, 0x0000_0000, 0x40), // -0 == 0
        (0x7fc0_0000, 0x3f80_0000, 0x45), // unordered: ZF PF CF
    ] {
        st.xmm[1] = a;
        st.xmm[2] = b;
        let r = one(|a| a.comiss(xmm1, xmm2).unwrap(), &st).unwrap();
        assert_eq!(r.flags, fl, "{a:x} {b:x}");
        let r = one(|a| a.ucomiss(xmm1, xmm2).unwrap(), &st).unwrap();
        assert_eq!(r.flags, fl);
    }
    // COMISS raises IE on a quiet NaN, UCOMISS does not.
    let r = one(|a| a.comiss(xmm1, xmm2).unwrap(), &st).unwrap();
    assert_eq!(r.mxcsr & 1, 1);
    let r = one(|a| a.ucomiss(xmm1, xmm2).unwrap(), &st).unwrap();
    assert_eq!(r.mxcsr & 1, 0);
}

#[test]
fn shuffles_known() {
    let mut st = St::new();
    st.xmm[1] = 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100;
    st.xmm[2] = 0x8001_0203_0405_0607_0809_0a0b_0c0d_0e0f;
    let r = one(|a| a.pshufb(xmm1, xmm2).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1], 0x0001_0203_0405_0607_0809_0a0b_0c0d_0e0f);
    let r = one(|a| a.pshufd(xmm0, xmm1, 0x1b).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[0], 0x0302_0100_0706_0504_0b0a_0908_0f0e_0d0c);
    let r = one(|a| a.palignr(xmm1, xmm2, 4).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1], 0x0302_0100_8001_0203_0405_0607_0809_0a0b);
    let r = one(|a| a.shufps(xmm1, xmm2, 0x4e).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1], 0x0809_0a0b_0c0d_0e0f_0f0e_0d0c_0b0a_0908);
    let r = one(|a| a.pmovmskb(eax, xmm2).unwrap(), &st).unwrap();
    assert_eq!(r.gpr[0], 0x8000);
}

#[test]
fn pcmpistri_strings() {
    fn s16(s: &[u8]) -> u128 {
        let mut b = [0u8; 16];
        b[..s.len()].copy_from_slice(s);
        u128::from_le_bytes(b)
    }
    let mut st = St::new();
    // strchr-like: equal any, find first of "o" in "hello world".
    st.xmm[1] = s16(b"o");
    st.xmm[2] = s16(b"hello world");
    let r = one(|a| a.pcmpistri(xmm1, xmm2, 0x00).unwrap(), &st).unwrap();
    assert_eq!(r.gpr[1], 4);
    assert_eq!(r.flags & 0x41, 0x41); // CF (match), ZF (xmm2 has a NUL)
                                      // strcmp-like: equal each, negative polarity → first difference.
    st.xmm[1] = s16(b"hello there");
    let r = one(|a| a.pcmpistri(xmm1, xmm2, 0x18).unwrap(), &st).unwrap();
    assert_eq!(r.gpr[1], 6);
    // substring search (equal ordered).
    st.xmm[1] = s16(b"wor");
    let r = one(|a| a.pcmpistri(xmm1, xmm2, 0x0c).unwrap(), &st).unwrap();
    assert_eq!(r.gpr[1], 6);
    // No match: index 16, CF clear.
    st.xmm[1] = s16(b"z");
    let r = one(|a| a.pcmpistri(xmm1, xmm2, 0x00).unwrap(), &st).unwrap();
    assert_eq!(r.gpr[1], 16);
    assert_eq!(r.flags & 1, 0);
    diff(
        "pcmpistri",
        &bytes(&|a| a.pcmpistri(xmm1, xmm2, 0x00).unwrap()),
        &st,
    );
}

#[test]
fn crc32c_known_vectors() {
    // CRC-32C("123456789") = 0xE3069283 (init ~0, final xor ~0).
    let mut crc: u64 = 0xffff_ffff;
    for b in b"123456789" {
        let mut st = St::new();
        st.gpr[0] = crc;
        st.gpr[1] = *b as u64;
        let r = one(|a| a.crc32(eax, cl).unwrap(), &st).unwrap();
        crc = r.gpr[0];
    }
    assert_eq!(crc ^ 0xffff_ffff, 0xe306_9283);
    // 32 zero bytes → 0x8A9136AA.
    let mut st = St::new();
    st.gpr[0] = 0xffff_ffff;
    for _ in 0..4 {
        st = one(|a| a.crc32(rax, qword_ptr(rsi)).unwrap(), &st).unwrap();
    }
    assert_eq!(st.gpr[0] ^ 0xffff_ffff, 0x8a91_36aa);
}

#[test]
fn misaligned_gp() {
    let st = St::new();
    for f in [
        |a: &mut CodeAssembler| a.movaps(xmm0, xmmword_ptr(rsi + 8)).unwrap(),
        |a: &mut CodeAssembler| a.movaps(xmmword_ptr(rsi + 4), xmm0).unwrap(),
        |a: &mut CodeAssembler| a.addps(xmm0, xmmword_ptr(rsi + 1)).unwrap(),
        |a: &mut CodeAssembler| a.pxor(xmm0, xmmword_ptr(rsi + 2)).unwrap(),
        |a: &mut CodeAssembler| a.movdqa(xmm0, xmmword_ptr(rsi + 8)).unwrap(),
    ] {
        let e = one(f, &st).unwrap_err();
        assert_eq!((e.vector, e.error_code), (GP, Some(0)));
    }
    // Unaligned forms and scalar operands are fine.
    for f in [
        |a: &mut CodeAssembler| a.movups(xmm0, xmmword_ptr(rsi + 8)).unwrap(),
        |a: &mut CodeAssembler| a.movdqu(xmmword_ptr(rsi + 4), xmm0).unwrap(),
        |a: &mut CodeAssembler| a.addss(xmm0, dword_ptr(rsi + 1)).unwrap(),
        |a: &mut CodeAssembler| a.movsd_2(xmm0, qword_ptr(rsi + 4)).unwrap(),
        |a: &mut CodeAssembler| a.pcmpistri(xmm0, xmmword_ptr(rsi + 3), 0).unwrap(),
    ] {
        one(f, &st).unwrap();
    }
}

#[test]
fn control_register_checks() {
    let insn = bytes(&|a| a.addps(xmm0, xmm1).unwrap());
    let st = St::new();
    with_guest(&insn, &st, |cpu| {
        cpu.s.cr0 |= cr0::TS;
        assert_eq!(cpu.step().unwrap().vector, NM);
    });
    with_guest(&insn, &st, |cpu| {
        cpu.s.cr0 |= cr0::EM;
        assert_eq!(cpu.step().unwrap().vector, UD);
    });
    with_guest(&insn, &st, |cpu| {
        cpu.s.cr4 &= !cr4::OSFXSR;
        assert_eq!(cpu.step().unwrap().vector, UD);
    });
    // CRC32 is a general-register instruction: not affected.
    let insn = bytes(&|a| a.crc32(eax, ecx).unwrap());
    with_guest(&insn, &st, |cpu| {
        cpu.s.cr0 |= cr0::TS;
        assert_eq!(cpu.step(), None);
    });
}

#[test]
fn mxcsr_sticky_and_unmasked() {
    let mut st = St::new();
    st.xmm[1] = 0x3f80_0000;
    st.xmm[2] = 0;
    // 1/0 masked: inf, ZE set, sticky across a clean operation.
    let r = one(|a| a.divss(xmm1, xmm2).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1] as u32, 0x7f80_0000);
    assert_eq!(r.mxcsr, 0x1f80 | 0x4);
    let r2 = one(|a| a.addss(xmm1, xmm1).unwrap(), &r).unwrap();
    assert_eq!(r2.mxcsr, 0x1f84);
    // Unmasked ZE: #XM, destination untouched, flag set.
    st.mxcsr = 0x1f80 & !(1 << 9);
    let insn = bytes(&|a| a.divss(xmm1, xmm2).unwrap());
    with_guest(&insn, &st, |cpu| {
        let e = cpu.step().unwrap();
        assert_eq!(e.vector, XM);
        assert_eq!(cpu.s.fpu.xmm[1], 0x3f80_0000);
        assert_eq!(cpu.s.fpu.mxcsr & 0x3f, 0x4);
        assert_eq!(cpu.s.rip, CODE);
    });
    // Without CR4.OSXMMEXCPT it is #UD.
    with_guest(&insn, &st, |cpu| {
        cpu.s.cr4 &= !cr4::OSXMMEXCPT;
        assert_eq!(cpu.step().unwrap().vector, UD);
    });
    // Unmasked precision on a conversion to GPR: register untouched.
    st.mxcsr = 0x1f80 & !(1 << 12);
    st.xmm[2] = 0x3fc0_0000; // 1.5
    st.gpr[0] = 0x1234;
    let insn = bytes(&|a| a.cvtss2si(eax, xmm2).unwrap());
    with_guest(&insn, &st, |cpu| {
        assert_eq!(cpu.step().unwrap().vector, XM);
        assert_eq!(cpu.s.gpr[0], 0x1234);
        assert_eq!(cpu.s.fpu.mxcsr & 0x3f, 0x20);
    });
    // Unmasked compare exception leaves RFLAGS alone.
    st.mxcsr = 0x1f80 & !(1 << 7);
    st.xmm[1] = 0x7fc0_0000;
    let insn = bytes(&|a| a.comiss(xmm1, xmm2).unwrap());
    with_guest(&insn, &st, |cpu| {
        assert_eq!(cpu.step().unwrap().vector, XM);
        assert_eq!(cpu.s.rflags & STATUS, STATUS);
    });
}

#[test]
fn ldmxcsr_reserved_bits() {
    let mut st = St::new();
    st.mem[..4].copy_from_slice(&0x0001_1f80u32.to_le_bytes());
    let e = one(|a| a.ldmxcsr(dword_ptr(rsi)).unwrap(), &st).unwrap_err();
    assert_eq!((e.vector, e.error_code), (GP, Some(0)));
    st.mem[..4].copy_from_slice(&0x7f80u32.to_le_bytes());
    let r = one(|a| a.ldmxcsr(dword_ptr(rsi)).unwrap(), &st).unwrap();
    assert_eq!(r.mxcsr, 0x7f80);
}

#[test]
fn rounding_modes_follow_mxcsr() {
    let mut st = St::new();
    st.xmm[2] = 0x4020_0000; // 2.5
    for (rc, want) in [(0u32, 2u64), (1, 2), (2, 3), (3, 2)] {
        st.mxcsr = 0x1f80 | rc << 13;
        let r = one(|a| a.cvtss2si(eax, xmm2).unwrap(), &st).unwrap();
        assert_eq!(r.gpr[0], want, "rc {rc}");
    }
}

#[test]
fn mmx_conversions() {
    let mut st = St::new();
    st.xmm[1] = 0xffff_ffff_ffff_ffff_0000_0000_0000_0000;
    st.mem[..8].copy_from_slice(&((3u64 << 32) | 0xffff_fffe).to_le_bytes());
    let r = one(|a| a.cvtpi2ps(xmm1, qword_ptr(rsi)).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1], 0xffff_ffff_ffff_ffff_4040_0000_c000_0000);
    let r = one(|a| a.cvtpi2pd(xmm1, qword_ptr(rsi)).unwrap(), &st).unwrap();
    assert_eq!(r.xmm[1], 0x4008_0000_0000_0000_c000_0000_0000_0000);

    let insn = bytes(&|a| a.cvttps2pi(mm3, xmm1).unwrap());
    st.xmm[1] = 0x4f00_0000_c020_0000; // 2^31, -2.5
    with_guest(&insn, &st, |cpu| {
        cpu.s.fpu.ftw = 0;
        cpu.s.fpu.fsw = 0x3800;
        assert_eq!(cpu.step(), None);
        assert_eq!(cpu.s.fpu.st[3], (0x8000_0000_ffff_fffe, 0xffff));
        assert_eq!(cpu.s.fpu.ftw, 0xff);
        assert_eq!(cpu.s.fpu.fsw & 0x3800, 0);
    });

    let insn = bytes(&|a| a.movq2dq(xmm2, mm5).unwrap());
    with_guest(&insn, &st, |cpu| {
        cpu.s.fpu.st[5] = (0x1122_3344_5566_7788, 0);
        assert_eq!(cpu.step(), None);
        assert_eq!(cpu.s.fpu.xmm[2], 0x1122_3344_5566_7788);
    });

    let insn = bytes(&|a| a.movdq2q(mm6, xmm1).unwrap());
    with_guest(&insn, &st, |cpu| {
        assert_eq!(cpu.step(), None);
        assert_eq!(cpu.s.fpu.st[6].0, 0x4f00_0000_c020_0000);
    });
}

#[test]
fn vex_forms_are_not_ours() {
    use iced_x86::{Decoder, DecoderOptions};
    // vaddps xmm0, xmm1, xmm2; paddb mm0, mm1
    for code in [&[0xc5u8, 0xf0, 0x58, 0xc2][..], &[0x0f, 0xfc, 0xc1][..]] {
        let mut d = Decoder::new(64, code, DecoderOptions::NONE);
        let i = d.decode();
        assert!(mat_x86::exec::sse::lookup(&i).is_none());
    }
}

#[test]
fn every_legacy_sse_code_has_a_handler() {
    use iced_x86::{Code, CpuidFeature, Instruction};
    let mut missing = Vec::new();
    for code in Code::values() {
        let feats = code.cpuid_features();
        let sse = feats.iter().any(|f| {
            matches!(
                f,
                CpuidFeature::SSE
                    | CpuidFeature::SSE2
                    | CpuidFeature::SSE3
                    | CpuidFeature::SSSE3
                    | CpuidFeature::SSE4_1
                    | CpuidFeature::SSE4_2
            )
        });
        let name = format!("{code:?}");
        let mixed = matches!(
            code,
            Code::Cvtpi2ps_xmm_mmm64
                | Code::Cvtpi2pd_xmm_mmm64
                | Code::Cvtps2pi_mm_xmmm64
                | Code::Cvttps2pi_mm_xmmm64
                | Code::Cvtpd2pi_mm_xmmm128
                | Code::Cvttpd2pi_mm_xmmm128
                | Code::Movq2dq_xmm_mm
                | Code::Movdq2q_mm_xmm
        );
        if !sse
            || code.encoding() != iced_x86::EncodingKind::Legacy
            || (name.contains("_mm") && !mixed)
        {
            continue;
        }
        let mut i = Instruction::default();
        i.set_code(code);
        if mat_x86::exec::sse::lookup(&i).is_none() {
            missing.push(name);
        }
    }
    // Handled by other families (data.rs, alu.rs, x87: FXSAVE, FISTTP).
    missing.retain(|n| {
        ![
            "Prefetch", "Sfence", "Lfence", "Mfence", "Movnti", "Pause", "Fxsave", "Fxrstor",
            "Popcnt", "Fisttp",
        ]
        .iter()
        .any(|p| n.starts_with(p))
    });
    assert!(missing.is_empty(), "no handler: {missing:?}");
}
