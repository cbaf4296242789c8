//! Random instruction sequences and inputs for the differential tester.

use iced_x86::{
    Code, CpuidFeature, Decoder, DecoderOptions, Encoder, EncodingKind, Instruction, MemoryOperand,
    Mnemonic, OpCodeOperandKind as K, Register, RepPrefixKind,
};

use super::native::{Regs, DATA_BASE, PAGE, SEQ_START, STACK_BASE};
use super::Class;

/// splitmix64: tiny, fast, good enough for test generation.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    #[inline]
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    pub fn range_i64(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
}

/// A generated test case.
pub struct Case {
    pub class: Class,
    pub code: Vec<u8>,
    /// Decoded instructions (IPs are their guest/native addresses).
    pub insns: Vec<Instruction>,
    pub input: Regs,
    pub data: Box<[u8; PAGE]>,
    pub stack: Box<[u8; PAGE]>,
}

pub const RBX_VALUE: u64 = DATA_BASE + 0x800;
pub const RSP_VALUE: u64 = STACK_BASE + 0x800;

const GPR64: [Register; 12] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBP,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];
const GPR32: [Register; 12] = [
    Register::EAX,
    Register::ECX,
    Register::EDX,
    Register::EBP,
    Register::R8D,
    Register::R9D,
    Register::R10D,
    Register::R11D,
    Register::R12D,
    Register::R13D,
    Register::R14D,
    Register::R15D,
];
const GPR16: [Register; 12] = [
    Register::AX,
    Register::CX,
    Register::DX,
    Register::BP,
    Register::R8W,
    Register::R9W,
    Register::R10W,
    Register::R11W,
    Register::R12W,
    Register::R13W,
    Register::R14W,
    Register::R15W,
];
const GPR8: [Register; 15] = [
    Register::AL,
    Register::CL,
    Register::DL,
    Register::BPL,
    Register::R8L,
    Register::R9L,
    Register::R10L,
    Register::R11L,
    Register::R12L,
    Register::R13L,
    Register::R14L,
    Register::R15L,
    Register::AH,
    Register::CH,
    Register::DH,
];

fn int_mnemonic(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Add | Adc
            | Sub
            | Sbb
            | And
            | Or
            | Xor
            | Cmp
            | Test
            | Inc
            | Dec
            | Neg
            | Not
            | Rol
            | Ror
            | Rcl
            | Rcr
            | Shl
            | Sal
            | Shr
            | Sar
            | Shld
            | Shrd
            | Mul
            | Imul
            | Div
            | Idiv
            | Bt
            | Bts
            | Btr
            | Btc
            | Bsf
            | Bsr
            | Tzcnt
            | Lzcnt
            | Popcnt
            | Bswap
            | Movbe
            | Xadd
            | Xchg
            | Cmpxchg
            | Cmpxchg8b
            | Cmpxchg16b
            | Mov
            | Movzx
            | Movsx
            | Movsxd
            | Lea
            | Cbw
            | Cwde
            | Cdqe
            | Cwd
            | Cdq
            | Cqo
            | Lahf
            | Sahf
            | Clc
            | Stc
            | Cmc
            | Cld
            | Std
            | Push
            | Pop
            | Nop
            | Xlatb
            | Pushf
            | Pushfq
            | Cmovo
            | Cmovno
            | Cmovb
            | Cmovae
            | Cmove
            | Cmovne
            | Cmovbe
            | Cmova
            | Cmovs
            | Cmovns
            | Cmovp
            | Cmovnp
            | Cmovl
            | Cmovge
            | Cmovle
            | Cmovg
            | Seto
            | Setno
            | Setb
            | Setae
            | Sete
            | Setne
            | Setbe
            | Seta
            | Sets
            | Setns
            | Setp
            | Setnp
            | Setl
            | Setge
            | Setle
            | Setg
    )
}

fn int_feature(f: CpuidFeature) -> bool {
    use CpuidFeature::*;
    matches!(
        f,
        INTEL8086
            | INTEL186
            | INTEL286
            | INTEL386
            | INTEL486
            | X64
            | CMOV
            | CX8
            | CMPXCHG16B
            | MOVBE
            | POPCNT
            | LZCNT
            | BMI1
            | MULTIBYTENOP
    )
}

fn sse_feature(f: CpuidFeature) -> bool {
    use CpuidFeature::*;
    matches!(f, SSE | SSE2 | SSE3 | SSSE3 | SSE4_1 | SSE4_2)
}

fn sse_excluded(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Ldmxcsr
            | Prefetchnta
            | Prefetcht0
            | Prefetcht1
            | Prefetcht2
            | Clflush
            | Monitor
            | Mwait
            | Fxsave
            | Fxrstor
            | Fxsave64
            | Fxrstor64
            | Emms
            | Pause
    )
}

fn fillable(k: K) -> bool {
    matches!(
        k,
        K::r8_or_mem
            | K::r16_or_mem
            | K::r32_or_mem
            | K::r64_or_mem
            | K::xmm_or_mem
            | K::mem
            | K::r8_reg
            | K::r8_opcode
            | K::r16_reg
            | K::r16_rm
            | K::r16_opcode
            | K::r32_reg
            | K::r32_rm
            | K::r32_opcode
            | K::r64_reg
            | K::r64_rm
            | K::r64_opcode
            | K::xmm_reg
            | K::xmm_rm
            | K::al
            | K::cl
            | K::ax
            | K::dx
            | K::eax
            | K::rax
            | K::imm8
            | K::imm8_const_1
            | K::imm8sex16
            | K::imm8sex32
            | K::imm8sex64
            | K::imm16
            | K::imm32
            | K::imm32sex64
            | K::imm64
    )
}

/// The instruction forms each class draws from.
pub struct Tables {
    pub int: Vec<Code>,
    pub sse: Vec<Code>,
}

impl Default for Tables {
    fn default() -> Self {
        Self::new()
    }
}

impl Tables {
    pub fn new() -> Tables {
        let mut int = Vec::new();
        let mut sse = Vec::new();
        for code in Code::values() {
            let oc = code.op_code();
            if !oc.is_instruction() || oc.encoding() != EncodingKind::Legacy || !oc.mode64() {
                continue;
            }
            let kinds: Vec<K> = (0..oc.op_count()).map(|n| oc.op_kind(n)).collect();
            if !kinds.iter().all(|&k| fillable(k)) {
                continue;
            }
            let m = code.mnemonic();
            let feats = code.cpuid_features();
            if int_mnemonic(m) && feats.iter().all(|&f| int_feature(f)) {
                int.push(code);
            } else if feats.iter().all(|&f| sse_feature(f)) && !sse_excluded(m) && !feats.is_empty()
            {
                sse.push(code);
            }
        }
        Tables { int, sse }
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Reg(Register),
    Mem(MemoryOperand),
    Imm(i32),
    Imm64(u64),
}

fn make(code: Code, ops: &[Op]) -> Option<Instruction> {
    use Op::*;
    let r = match *ops {
        [] => Ok(Instruction::with(code)),
        [Reg(a)] => Instruction::with1(code, a),
        [Mem(a)] => Instruction::with1(code, a),
        [Imm(a)] => Instruction::with1(code, a),
        [Reg(a), Reg(b)] => Instruction::with2(code, a, b),
        [Reg(a), Mem(b)] => Instruction::with2(code, a, b),
        [Reg(a), Imm(b)] => Instruction::with2(code, a, b),
        [Reg(a), Imm64(b)] => Instruction::with2(code, a, b),
        [Mem(a), Reg(b)] => Instruction::with2(code, a, b),
        [Mem(a), Imm(b)] => Instruction::with2(code, a, b),
        [Reg(a), Reg(b), Reg(c)] => Instruction::with3(code, a, b, c),
        [Reg(a), Reg(b), Imm(c)] => Instruction::with3(code, a, b, c),
        [Reg(a), Reg(b), Mem(c)] => Instruction::with3(code, a, b, c),
        [Reg(a), Mem(b), Reg(c)] => Instruction::with3(code, a, b, c),
        [Reg(a), Mem(b), Imm(c)] => Instruction::with3(code, a, b, c),
        [Mem(a), Reg(b), Reg(c)] => Instruction::with3(code, a, b, c),
        [Mem(a), Reg(b), Imm(c)] => Instruction::with3(code, a, b, c),
        _ => return None,
    };
    r.ok()
}

fn reg_of_size(rng: &mut Rng, bits: u32) -> Register {
    match bits {
        8 => rng.pick(&GPR8),
        16 => rng.pick(&GPR16),
        32 => rng.pick(&GPR32),
        _ => rng.pick(&GPR64),
    }
}

fn xmm_reg(rng: &mut Rng) -> Register {
    Register::from_xmm(rng.below(16))
}

trait FromXmm {
    fn from_xmm(n: u64) -> Register;
}
impl FromXmm for Register {
    fn from_xmm(n: u64) -> Register {
        const X: [Register; 16] = [
            Register::XMM0,
            Register::XMM1,
            Register::XMM2,
            Register::XMM3,
            Register::XMM4,
            Register::XMM5,
            Register::XMM6,
            Register::XMM7,
            Register::XMM8,
            Register::XMM9,
            Register::XMM10,
            Register::XMM11,
            Register::XMM12,
            Register::XMM13,
            Register::XMM14,
            Register::XMM15,
        ];
        X[n as usize]
    }
}

/// A memory operand inside the sandbox data page: `[rbx+disp]` or
/// `[rbx+rsi*scale+disp]` (RSI is 0..15), sometimes with 32-bit addressing.
fn mem_operand(rng: &mut Rng, class: Class) -> MemoryOperand {
    let a32 = rng.chance(8);
    let (base, index) = if a32 {
        (Register::EBX, Register::ESI)
    } else {
        (Register::RBX, Register::RSI)
    };
    let aligned = class == Class::Sse && rng.chance(90);
    let (idx, scale) = if !aligned && class != Class::Str && rng.chance(40) {
        (index, rng.pick(&[1u32, 2, 4, 8]))
    } else {
        (Register::None, 1)
    };
    let disp: i64 = if aligned {
        rng.range_i64(-16, 15) * 16
    } else if rng.chance(20) {
        0
    } else {
        rng.range_i64(-256, 255)
    };
    let dsize = if disp == 0 && rng.chance(50) {
        0
    } else if (-128..=127).contains(&disp) {
        1
    } else if a32 {
        4
    } else {
        8 // iced's size for a sign-extended disp32 with 64-bit addressing
    };
    MemoryOperand::with_base_index_scale_displ_size(base, idx, scale, disp, dsize)
}

/// Any addressing form (LEA does not access memory).
fn lea_operand(rng: &mut Rng) -> MemoryOperand {
    let a32 = rng.chance(25);
    let pool64 = [
        Register::RAX,
        Register::RCX,
        Register::RDX,
        Register::RBX,
        Register::RSP,
        Register::RBP,
        Register::RSI,
        Register::RDI,
        Register::R8,
        Register::R12,
        Register::R13,
        Register::R15,
    ];
    let pool32 = [
        Register::EAX,
        Register::ECX,
        Register::EDX,
        Register::EBX,
        Register::ESP,
        Register::EBP,
        Register::ESI,
        Register::EDI,
        Register::R8D,
        Register::R12D,
        Register::R13D,
        Register::R15D,
    ];
    let pool: &[Register] = if a32 { &pool32 } else { &pool64 };
    if rng.chance(8) {
        let rip = if a32 { Register::EIP } else { Register::RIP };
        return MemoryOperand::with_base_displ(rip, rng.range_i64(-1000, 1000));
    }
    let base = if rng.chance(15) {
        Register::None
    } else {
        rng.pick(pool)
    };
    let index = if rng.chance(50) {
        let r = rng.pick(pool);
        if r == Register::RSP || r == Register::ESP {
            Register::None
        } else {
            r
        }
    } else {
        Register::None
    };
    let scale = rng.pick(&[1u32, 2, 4, 8]);
    let disp = match rng.below(4) {
        0 => 0,
        1 => rng.range_i64(-128, 127),
        2 => rng.next_u64() as i32 as i64,
        _ => rng.range_i64(-0x10000, 0x10000),
    };
    let dsize = if base == Register::None && index != Register::None || disp == 0 && rng.chance(50)
    {
        if disp == 0 && base != Register::None {
            0
        } else {
            4
        }
    } else if (-128..=127).contains(&disp) {
        1
    } else {
        4
    };
    let dsize = if base == Register::None { 4 } else { dsize };
    let dsize = if dsize == 4 && !a32 { 8 } else { dsize };
    MemoryOperand::with_base_index_scale_displ_size(base, index, scale, disp, dsize)
}

fn imm_for(rng: &mut Rng, k: K) -> Op {
    let small = rng.chance(35);
    match k {
        K::imm8_const_1 => Op::Imm(1),
        K::imm8 | K::imm8sex16 | K::imm8sex32 | K::imm8sex64 => {
            if small {
                Op::Imm(rng.pick(&[
                    0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, -1, 127, -128,
                ]))
            } else {
                Op::Imm(rng.range_i64(-128, 127) as i32)
            }
        }
        K::imm16 => Op::Imm(rng.range_i64(-32768, 32767) as i32),
        K::imm32 | K::imm32sex64 => Op::Imm(if small {
            rng.pick(&[0, 1, -1, i32::MIN, i32::MAX])
        } else {
            rng.next_u64() as i32
        }),
        _ => Op::Imm64(interesting(rng)),
    }
}

fn interesting(rng: &mut Rng) -> u64 {
    match rng.below(8) {
        0 => rng.pick(&[
            0u64,
            1,
            u64::MAX,
            0x80,
            0x7f,
            0xff,
            0x8000,
            0x7fff,
            0xffff,
            0x8000_0000,
            0x7fff_ffff,
            0xffff_ffff,
            0x8000_0000_0000_0000,
            0x7fff_ffff_ffff_ffff,
            0xffff_ffff_0000_0000,
        ]),
        1 => rng.below(70),
        2 => (rng.below(70) as i64).wrapping_neg() as u64,
        3 => rng.next_u64() & 0xffff_ffff,
        4 => rng.next_u64() as i32 as i64 as u64,
        _ => rng.next_u64(),
    }
}

fn op_bits(k: K) -> u32 {
    match k {
        K::r8_or_mem | K::r8_reg | K::r8_opcode | K::al | K::cl => 8,
        K::r16_or_mem | K::r16_reg | K::r16_rm | K::r16_opcode | K::ax | K::dx => 16,
        K::r32_or_mem | K::r32_reg | K::r32_rm | K::r32_opcode | K::eax => 32,
        _ => 64,
    }
}

/// Fill the operands of `code` randomly.
fn fill(rng: &mut Rng, code: Code, class: Class) -> Option<Instruction> {
    let oc = code.op_code();
    let mut ops = Vec::with_capacity(4);
    for n in 0..oc.op_count() {
        let k = oc.op_kind(n);
        let op = match k {
            K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem => {
                if rng.chance(55) {
                    Op::Reg(reg_of_size(rng, op_bits(k)))
                } else {
                    Op::Mem(mem_operand(rng, class))
                }
            }
            K::xmm_or_mem => {
                if rng.chance(65) {
                    Op::Reg(xmm_reg(rng))
                } else {
                    Op::Mem(mem_operand(rng, class))
                }
            }
            K::mem => {
                if code.mnemonic() == Mnemonic::Lea {
                    Op::Mem(lea_operand(rng))
                } else {
                    Op::Mem(mem_operand(rng, class))
                }
            }
            K::r8_reg
            | K::r8_opcode
            | K::r16_reg
            | K::r16_rm
            | K::r16_opcode
            | K::r32_reg
            | K::r32_rm
            | K::r32_opcode
            | K::r64_reg
            | K::r64_rm
            | K::r64_opcode => Op::Reg(reg_of_size(rng, op_bits(k))),
            K::xmm_reg | K::xmm_rm => Op::Reg(xmm_reg(rng)),
            K::al => Op::Reg(Register::AL),
            K::cl => Op::Reg(Register::CL),
            K::ax => Op::Reg(Register::AX),
            K::dx => Op::Reg(Register::DX),
            K::eax => Op::Reg(Register::EAX),
            K::rax => Op::Reg(Register::RAX),
            _ => imm_for(rng, k),
        };
        ops.push(op);
    }
    let mut insn = make(code, &ops)?;
    if insn.op_count() > 0
        && insn.op0_kind() == iced_x86::OpKind::Memory
        && oc.can_use_lock_prefix()
        && rng.chance(30)
    {
        insn.set_has_lock_prefix(true);
    }
    Some(insn)
}

fn raw(code: Code, ops: &[Op]) -> Instruction {
    make(code, ops).expect("valid helper instruction")
}

/// Instructions that make the next one well-behaved most of the time
/// (division without #DE, bit offsets inside the sandbox).
fn conditioning(rng: &mut Rng, insn: &Instruction) -> Option<Instruction> {
    use Mnemonic::*;
    let m = insn.mnemonic();
    let oc = insn.code().op_code();
    if matches!(m, Div | Idiv) && rng.chance(85) {
        let bits = op_bits(oc.op_kind(0));
        return Some(match (m, bits) {
            (Div, 8) => raw(
                Code::Movzx_r32_rm8,
                &[Op::Reg(Register::EAX), Op::Reg(Register::AL)],
            ),
            (Div, _) => raw(
                Code::Xor_r32_rm32,
                &[Op::Reg(Register::EDX), Op::Reg(Register::EDX)],
            ),
            (_, 8) => Instruction::with(Code::Cbw),
            (_, 16) => Instruction::with(Code::Cwd),
            (_, 32) => Instruction::with(Code::Cdq),
            _ => Instruction::with(Code::Cqo),
        });
    }
    if matches!(m, Bt | Bts | Btr | Btc)
        && insn.op0_kind() == iced_x86::OpKind::Memory
        && insn.op1_kind() == iced_x86::OpKind::Register
    {
        let r = insn.op1_register();
        let v = rng.range_i64(-1024, 1023) as i32;
        return Some(match r.size() {
            2 => raw(Code::Mov_r16_imm16, &[Op::Reg(r), Op::Imm(v & 0xffff)]),
            4 => raw(Code::Mov_r32_imm32, &[Op::Reg(r), Op::Imm(v)]),
            _ => raw(Code::Mov_rm64_imm32, &[Op::Reg(r), Op::Imm(v)]),
        });
    }
    None
}

fn string_insn(rng: &mut Rng) -> Instruction {
    if rng.chance(10) {
        return Instruction::with(rng.pick(&[Code::Cld, Code::Std]));
    }
    let a = if rng.chance(15) { 32 } else { 64 };
    let kind = rng.below(5);
    let size = rng.below(4);
    let rep = match rng.below(3) {
        0 => RepPrefixKind::None,
        1 => RepPrefixKind::Repe,
        _ => {
            if kind >= 3 {
                RepPrefixKind::Repne
            } else {
                RepPrefixKind::Repe
            }
        }
    };
    let ds = Register::None;
    let r = match (kind, size) {
        (0, 0) => Instruction::with_movsb(a, ds, rep),
        (0, 1) => Instruction::with_movsw(a, ds, rep),
        (0, 2) => Instruction::with_movsd(a, ds, rep),
        (0, _) => Instruction::with_movsq(a, ds, rep),
        (1, 0) => Instruction::with_stosb(a, rep),
        (1, 1) => Instruction::with_stosw(a, rep),
        (1, 2) => Instruction::with_stosd(a, rep),
        (1, _) => Instruction::with_stosq(a, rep),
        (2, 0) => Instruction::with_lodsb(a, ds, rep),
        (2, 1) => Instruction::with_lodsw(a, ds, rep),
        (2, 2) => Instruction::with_lodsd(a, ds, rep),
        (2, _) => Instruction::with_lodsq(a, ds, rep),
        (3, 0) => Instruction::with_scasb(a, rep),
        (3, 1) => Instruction::with_scasw(a, rep),
        (3, 2) => Instruction::with_scasd(a, rep),
        (3, _) => Instruction::with_scasq(a, rep),
        (_, 0) => Instruction::with_cmpsb(a, ds, rep),
        (_, 1) => Instruction::with_cmpsw(a, ds, rep),
        (_, 2) => Instruction::with_cmpsd(a, ds, rep),
        (_, _) => Instruction::with_cmpsq(a, ds, rep),
    };
    r.expect("string instruction")
}

pub const F32_SPECIAL: [u32; 22] = [
    0,
    0x8000_0000,
    0x3f80_0000,
    0xbf80_0000,
    0x3fc0_0000,
    0x7f80_0000,
    0xff80_0000,
    0x7fc0_0000,
    0x7fa0_0000,
    0xffc0_0000,
    0xff80_0001,
    0x0000_0001,
    0x807f_ffff,
    0x7f7f_ffff,
    0x0080_0000,
    0x4f00_0000,
    0xcf00_0000,
    0x4eff_ffff,
    0x5f00_0000,
    0x3f00_0000,
    0x4020_0000,
    0xdf00_0000,
];
pub const F64_SPECIAL: [u64; 22] = [
    0,
    0x8000_0000_0000_0000,
    0x3ff0_0000_0000_0000,
    0xbff0_0000_0000_0000,
    0x3ff8_0000_0000_0000,
    0x7ff0_0000_0000_0000,
    0xfff0_0000_0000_0000,
    0x7ff8_0000_0000_0000,
    0x7ff4_0000_0000_0000,
    0xfff8_0000_0000_0000,
    0xfff0_0000_0000_0001,
    0x0000_0000_0000_0001,
    0x800f_ffff_ffff_ffff,
    0x7fef_ffff_ffff_ffff,
    0x0010_0000_0000_0000,
    0x41e0_0000_0000_0000, // 2^31
    0xc1e0_0000_0000_0000, // -2^31
    0x41df_ffff_ffc0_0000, // 2^31 - 1
    0x43e0_0000_0000_0000, // 2^63
    0xc3e0_0000_0000_0000, // -2^63
    0x3fe0_0000_0000_0000,
    0x4004_0000_0000_0000,
];

fn random_f32(rng: &mut Rng) -> u32 {
    match rng.below(4) {
        0 | 1 => rng.pick(&F32_SPECIAL),
        2 => (rng.next_u64() as u32 & 0x807f_ffff) | ((rng.range_i64(100, 160) as u32) << 23),
        _ => rng.next_u64() as u32,
    }
}

fn random_f64(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 | 1 => rng.pick(&F64_SPECIAL),
        2 => (rng.next_u64() & 0x800f_ffff_ffff_ffff) | ((rng.range_i64(1000, 1080) as u64) << 52),
        _ => rng.next_u64(),
    }
}

fn random_xmm(rng: &mut Rng) -> u128 {
    match rng.below(4) {
        0 => (0..4).fold(0u128, |acc, k| acc | (random_f32(rng) as u128) << (32 * k)),
        1 => random_f64(rng) as u128 | (random_f64(rng) as u128) << 64,
        2 => interesting(rng) as u128 | (interesting(rng) as u128) << 64,
        _ => rng.next_u64() as u128 | (rng.next_u64() as u128) << 64,
    }
}

fn fill_page(rng: &mut Rng, page: &mut [u8; PAGE], fp: bool) {
    if fp {
        for chunk in page.chunks_exact_mut(16) {
            let v = random_xmm(rng);
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    } else {
        for chunk in page.chunks_exact_mut(8) {
            let v = if rng.chance(25) {
                interesting(rng)
            } else {
                rng.next_u64()
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// iced `RflagsBits` to architectural RFLAGS bits.
pub fn iced_flags(b: u32) -> u64 {
    use iced_x86::RflagsBits as R;
    let mut f = 0;
    for (i, x) in [
        (R::OF, 11),
        (R::SF, 7),
        (R::ZF, 6),
        (R::AF, 4),
        (R::CF, 0),
        (R::PF, 2),
        (R::DF, 10),
        (R::AC, 18),
    ] {
        if b & i != 0 {
            f |= 1 << x;
        }
    }
    f
}

/// Shifts and rotates by CL, or by an immediate that masks to 0, may
/// leave the flags untouched.
fn count_may_be_zero(i: &Instruction) -> bool {
    use iced_x86::OpKind;
    use Mnemonic::*;
    if !matches!(
        i.mnemonic(),
        Rol | Ror | Rcl | Rcr | Shl | Sal | Shr | Sar | Shld | Shrd
    ) {
        return false;
    }
    let last = i.op_count() - 1;
    match i.op_kind(last) {
        OpKind::Register => i.op_register(last) == Register::CL,
        OpKind::Immediate8 => {
            let m = if i.op0_register().size() == 8 || i.memory_size().size() == 8 {
                63
            } else {
                31
            };
            i.immediate8() & m == 0
        }
        _ => false,
    }
}

/// Flags left undefined after executing `insns`, or None if some
/// instruction reads a flag that is undefined at that point.
pub fn undefined_flags(insns: &[Instruction]) -> Option<u64> {
    let mut undef = 0u64;
    for i in insns {
        if iced_flags(i.rflags_read()) & undef != 0 {
            return None;
        }
        let mut def = iced_flags(i.rflags_written() | i.rflags_cleared() | i.rflags_set());
        if count_may_be_zero(i) {
            def = 0; // a zero count leaves every flag as it was
        }
        undef = (undef & !def) | iced_flags(i.rflags_undefined());
    }
    Some(undef)
}

pub struct Generator {
    tables: Tables,
    enc: Encoder,
}

impl Default for Generator {
    fn default() -> Self {
        Self::new()
    }
}

impl Generator {
    pub fn new() -> Generator {
        Generator {
            tables: Tables::new(),
            enc: Encoder::new(64),
        }
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    fn encode_seq(&mut self, seq: &[Instruction]) -> Option<Vec<u8>> {
        let mut ip = SEQ_START;
        for i in seq {
            let n = self.enc.encode(i, ip).ok()?;
            ip += n as u64;
        }
        Some(self.enc.take_buffer())
    }

    /// A case, and how many candidate sequences were thrown away first.
    pub fn generate(&mut self, rng: &mut Rng, class: Class, max_insns: usize) -> (Case, [u64; 3]) {
        // [operands not fillable, not encodable, reads an undefined flag]
        let mut rejected = [0u64; 3];
        loop {
            let n = 1 + rng.below(max_insns.max(1) as u64) as usize;
            let mut seq = Vec::with_capacity(n + 2);
            while seq.len() < n {
                let insn = match class {
                    Class::Str => string_insn(rng),
                    Class::Int | Class::Sse => {
                        let list = if class == Class::Int {
                            &self.tables.int
                        } else {
                            &self.tables.sse
                        };
                        let code = list[rng.below(list.len() as u64) as usize];
                        match fill(rng, code, class) {
                            Some(i) => i,
                            None => {
                                rejected[0] += 1;
                                continue;
                            }
                        }
                    }
                };
                if let Some(pre) = conditioning(rng, &insn) {
                    seq.push(pre);
                }
                seq.push(insn);
            }
            let Some(code) = self.encode_seq(&seq) else {
                let _ = self.enc.take_buffer();
                rejected[1] += 1;
                continue;
            };
            let mut dec = Decoder::with_ip(64, &code, SEQ_START, DecoderOptions::NONE);
            let insns: Vec<Instruction> = dec.iter().collect();
            if insns.iter().any(|i| i.is_invalid()) || undefined_flags(&insns).is_none() {
                rejected[2] += 1;
                continue;
            }
            let all_a32 = insns.iter().all(|i| {
                !matches!(
                    i.op0_kind(),
                    iced_x86::OpKind::MemoryESRDI | iced_x86::OpKind::MemorySegRSI
                ) && !matches!(
                    i.op1_kind(),
                    iced_x86::OpKind::MemoryESRDI | iced_x86::OpKind::MemorySegRSI
                )
            });
            let input = self.inputs(rng, class, all_a32);
            let mut data = Box::new([0u8; PAGE]);
            let mut stack = Box::new([0u8; PAGE]);
            fill_page(rng, &mut data, class == Class::Sse);
            fill_page(rng, &mut stack, false);
            return (
                Case {
                    class,
                    code,
                    insns,
                    input,
                    data,
                    stack,
                },
                rejected,
            );
        }
    }

    fn inputs(&self, rng: &mut Rng, class: Class, all_a32: bool) -> Regs {
        let mut r = Regs::default();
        for g in r.gpr.iter_mut() {
            *g = interesting(rng);
        }
        r.gpr[3] = RBX_VALUE;
        r.gpr[4] = RSP_VALUE;
        r.gpr[6] = rng.below(16);
        r.gpr[7] = DATA_BASE + 0x200 + rng.below(0xc00);
        if class == Class::Str {
            r.gpr[6] = DATA_BASE + 0x200 + rng.below(0xc00);
            r.gpr[1] = if all_a32 && rng.chance(30) {
                rng.next_u64() & !0xffff_ffffu64
            } else {
                0
            } | rng.below(17);
            if rng.chance(5) {
                r.gpr[1] &= 0xffff_ffff;
            }
        }
        let status = rng.next_u64() & 0x8d5;
        let df = if rng.chance(if class == Class::Str { 50 } else { 15 }) {
            0x400
        } else {
            0
        };
        r.rflags = 0x202 | status | df;
        let rc = (rng.below(4) as u32) << 13;
        let ftz = if rng.chance(20) { 0x8000 } else { 0 };
        let daz = if rng.chance(20) { 0x40 } else { 0 };
        let flags = if rng.chance(20) {
            rng.next_u64() as u32 & 0x3f
        } else {
            0
        };
        r.mxcsr = 0x1f80 | rc | ftz | daz | flags;
        for x in r.xmm.iter_mut() {
            *x = random_xmm(rng);
        }
        r
    }
}

impl Generator {
    /// Forms of `class` that could not be generated in `tries` attempts
    /// (for checking the generator's coverage).
    pub fn unencodable(&mut self, class: Class, tries: u32) -> Vec<Code> {
        let list = if class == Class::Int {
            self.tables.int.clone()
        } else {
            self.tables.sse.clone()
        };
        let mut rng = Rng::new(99);
        let mut bad = Vec::new();
        for code in list {
            let ok = (0..tries).any(|_| {
                fill(&mut rng, code, class).is_some_and(|i| {
                    let ok = self.enc.encode(&i, SEQ_START).is_ok();
                    let _ = self.enc.take_buffer();
                    ok
                })
            });
            if !ok {
                bad.push(code);
            }
        }
        bad
    }
}

impl Generator {
    /// Encoder errors seen while generating `n` instructions of `class`.
    pub fn encode_errors(&mut self, class: Class, n: u32) -> Vec<String> {
        let mut rng = Rng::new(5);
        let mut out = Vec::new();
        let list = if class == Class::Int {
            self.tables.int.clone()
        } else {
            self.tables.sse.clone()
        };
        for _ in 0..n {
            let code = rng.pick(&list);
            if let Some(i) = fill(&mut rng, code, class) {
                if let Err(e) = self.enc.encode(&i, SEQ_START) {
                    out.push(format!("{code:?} {i}: {e}"));
                }
                let _ = self.enc.take_buffer();
            }
        }
        out
    }
}
