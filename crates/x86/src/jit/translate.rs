//! Block translator: guest x86-64 → host x86-64.
//!
//! Conventions inside translated code:
//! - host `r15` points at the [`Cpu`]; host `rsp` is the host stack;
//! - every other guest GPR lives in the host register of the same name;
//!   guest `rsp` and `r15` live in `cpu.s.gpr` and are loaded into a free
//!   host register around each instruction that names them; registers a
//!   block never names may be parked (see `Tx::parked`) and used as scratch;
//! - guest XMM0-15 live in host XMM0-15 (through CpuState around helpers);
//! - guest arithmetic flags live in host RFLAGS (host DF stays 0: guest DF is
//!   kept in `cpu.s.rflags` and only string instructions, run by helpers,
//!   read it). Emitted glue only uses flag-free instructions, or saves the
//!   flags with LAHF/SETO first.
//!
//! Whitelisted integer instructions run as themselves (register operands
//! unchanged; memory operands rewritten to a host pointer found through an
//! inline soft-TLB lookup). Anything else, and every TLB miss, calls the
//! interpreter's handler for that one instruction (a helper) with the state
//! synchronised, so faults are precise.

use std::mem::{offset_of, size_of};

use iced_x86::code_asm::*;
use iced_x86::{
    BlockEncoderOptions, Code, ConditionCode, Encoder, FlowControl, Instruction,
    InstructionInfoFactory, MemoryOperand, Mnemonic, OpAccess, OpKind, Register,
};

use super::{emit, JitCtx, ENTRY_SLOTS};
use crate::cpu::{Block, Cpu, DInsn};
use crate::mmu::TlbEntry;
use crate::state::{CpuState, Segment, CS, DS, ES, FS, GS, SS};

const GPR64: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

/// Guest registers held in host registers (all but rsp=4 and r15=15).
pub(super) const RESIDENT: [usize; 14] = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];

/// Scratch candidates, those compiled code names least first (r11 and
/// r10 are the ABI's temporaries), so that neighbouring blocks more often
/// park the same registers and chain with no stub (see `choose_parked`).
const POOL: [Register; 13] = [
    Register::R11,
    Register::R10,
    Register::R9,
    Register::R8,
    Register::R14,
    Register::R13,
    Register::R12,
    Register::RBP,
    Register::RBX,
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
];

fn gidx(r: Register) -> usize {
    GPR64.iter().position(|&g| g == r).unwrap_or(0)
}

fn r64(r: Register) -> AsmRegister64 {
    get_gpr64(r).unwrap_or(rax)
}

/// The same-numbered register with `size` bytes (no high-byte forms).
fn sized(full: Register, size: usize) -> Register {
    let i = gidx(full) as u32;
    let base = match size {
        1 => {
            // AL CL DL BL | SPL BPL SIL DIL | R8L..: skip AH..BH.
            return if i < 4 {
                Register::AL + i
            } else {
                Register::AL + (i + 4)
            };
        }
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    };
    base + i
}

// ---- offsets from host r15 (= *mut Cpu) ----------------------------------

fn o_s() -> usize {
    offset_of!(Cpu, s)
}
pub(super) fn o_gpr(i: usize) -> i32 {
    (o_s() + offset_of!(CpuState, gpr) + 8 * i) as i32
}
fn o_rip() -> i32 {
    (o_s() + offset_of!(CpuState, rip)) as i32
}
fn o_xmm(r: Register) -> i32 {
    let n = r as usize - Register::XMM0 as usize;
    (o_s() + offset_of!(CpuState, fpu) + offset_of!(crate::state::FpuState, xmm) + 16 * n) as i32
}
/// Offset of `field` of segment register `seg` in the Cpu.
macro_rules! o_seg {
    ($seg:expr, $field:ident) => {
        (o_s()
            + offset_of!(CpuState, seg)
            + $seg * size_of::<Segment>()
            + offset_of!(Segment, $field)) as i32
    };
}
fn o_irq_shadow() -> i32 {
    (o_s() + offset_of!(CpuState, irq_shadow)) as i32
}
fn o_rflags() -> i32 {
    (o_s() + offset_of!(CpuState, rflags)) as i32
}
macro_rules! o_ctx {
    ($f:ident) => {
        (offset_of!(Cpu, jctx) + offset_of!(JitCtx, $f)) as i32
    };
}
fn o_spill(k: usize) -> i32 {
    o_ctx!(spill) + 8 * k as i32
}

const SP_RAX: usize = 0;
const SP_A: usize = 1;
const SP_B: usize = 2;
const SP_C: usize = 3;
const SP_R1: usize = 4;
const SP_R2: usize = 5;
const SP_ENTRY: usize = 6;
/// Guest rcx around a flag-free TLB lookup when rcx is not parked.
const SP_RCX: usize = 7;
/// Parked registers (see [`Tx::parked`]): register `r` at
/// `SP_PARK0 + gidx(r)`, so that two blocks parking a register agree on
/// where its guest value is.
const SP_PARK0: usize = 8;
/// The return address of a call to a block's shared helper call.
const SP_RET: usize = SP_PARK0 + 16;
/// Host addresses of groups that found no free register (see
/// [`Home::Slot`]): `GROUP_SLOTS` slots from here.
const SP_GROUP0: usize = SP_RET + 1;
const GROUP_SLOTS: usize = 4;
/// Parked registers from which helper sites share one call sequence.
const SHARED_HELPER_PARKED: usize = 2;
/// Parked registers from which exits reload them through one shared copy.
const SHARED_UNPARK: usize = 3;

fn park_slot(r: Register) -> usize {
    SP_PARK0 + gidx(r)
}

pub(super) type R<T> = Result<T, IcedError>;

/// Why a block was not translated (the interpreter keeps running it).
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    #[error("assembling: {0}")]
    Asm(#[from] IcedError),
    #[error("a patch site or entry has no address after assembly")]
    Layout,
    #[error("a strided group without a register, or no scratch register for its limit")]
    Strided,
}

/// Fixed entry points shared by all blocks (assembled once at the start of
/// the code buffer).
#[derive(Clone, Copy, Default)]
pub struct Stubs {
    pub enter: u64,
    pub exit: u64,
    /// Exit to the target in cpu.s.rip through the jump cache.
    pub indirect: u64,
    pub helper: u64,
}

fn m(off: i32) -> AsmMemoryOperand {
    qword_ptr(r15 + off)
}

fn store_resident(a: &mut CodeAssembler, skip_rax: bool) -> R<()> {
    for &i in RESIDENT.iter() {
        if i == 0 && skip_rax {
            continue;
        }
        a.mov(m(o_gpr(i)), r64(GPR64[i]))?;
    }
    Ok(())
}

fn load_resident(a: &mut CodeAssembler, skip_rax: bool) -> R<()> {
    for &i in RESIDENT.iter() {
        if i == 0 && skip_rax {
            continue;
        }
        a.mov(r64(GPR64[i]), m(o_gpr(i)))?;
    }
    Ok(())
}

/// Guest XMM registers live in the host XMM registers of the same number
/// while translated code runs; these move them to and from CpuState.
fn store_all_xmm(a: &mut CodeAssembler) -> R<()> {
    for n in 0..16u32 {
        let r = Register::XMM0 + n;
        a.movdqu(xmmword_ptr(r15 + o_xmm(r)), get_xmm(r).unwrap_or(xmm0))?;
    }
    Ok(())
}

fn load_all_xmm(a: &mut CodeAssembler) -> R<()> {
    for n in 0..16u32 {
        let r = Register::XMM0 + n;
        a.movdqu(get_xmm(r).unwrap_or(xmm0), xmmword_ptr(r15 + o_xmm(r)))?;
    }
    Ok(())
}

/// Save host arithmetic flags into ctx.fl (clobbers rax).
fn save_flags(a: &mut CodeAssembler) -> R<()> {
    a.lahf()?;
    a.seto(al)?;
    a.mov(word_ptr(r15 + o_ctx!(fl)), ax)?;
    Ok(())
}

/// Load host arithmetic flags from ctx.fl (clobbers rax).
fn load_flags(a: &mut CodeAssembler) -> R<()> {
    a.movzx(eax, word_ptr(r15 + o_ctx!(fl)))?;
    a.add(al, 0x7f)?;
    a.sahf()?;
    Ok(())
}

/// Assemble the shared stubs at address `at`.
pub fn build_stubs(at: u64) -> R<(Vec<u8>, Stubs)> {
    let mut a = CodeAssembler::new(64)?;
    let mut l_enter = a.create_label();
    let mut l_leave = a.create_label();
    let mut l_exit = a.create_label();
    let mut l_helper = a.create_label();
    let mut l_hexit = a.create_label();
    let mut l_indirect = a.create_label();
    let mut l_miss = a.create_label();

    // enter(cpu: rdi, code: rsi)
    a.set_label(&mut l_enter)?;
    a.push(rbx)?;
    a.push(rbp)?;
    a.push(r12)?;
    a.push(r13)?;
    a.push(r14)?;
    a.push(r15)?;
    a.sub(rsp, 8)?;
    a.mov(r15, rdi)?;
    a.mov(m(o_ctx!(target)), rsi)?;
    load_flags(&mut a)?;
    load_resident(&mut a, false)?;
    load_all_xmm(&mut a)?;
    a.jmp(m(o_ctx!(target)))?;

    // leave: guest state already stored.
    a.set_label(&mut l_leave)?;
    a.add(rsp, 8)?;
    a.pop(r15)?;
    a.pop(r14)?;
    a.pop(r13)?;
    a.pop(r12)?;
    a.pop(rbp)?;
    a.pop(rbx)?;
    a.ret()?;

    // exit: guest rax already stored, rip and exit_site set.
    a.set_label(&mut l_exit)?;
    save_flags(&mut a)?;
    store_resident(&mut a, true)?;
    store_all_xmm(&mut a)?;
    a.jmp(l_leave)?;

    // helper: called with guest rax stored and ctx.arg = &DInsn. The
    // helper is Rust code, which clobbers every XMM register: they go
    // through CpuState (where the interpreter reads and writes them).
    a.set_label(&mut l_helper)?;
    save_flags(&mut a)?;
    store_resident(&mut a, true)?;
    store_all_xmm(&mut a)?;
    a.mov(rdi, r15)?;
    a.mov(rsi, m(o_ctx!(arg)))?;
    a.sub(rsp, 8)?;
    a.call(m(o_ctx!(helper)))?;
    a.add(rsp, 8)?;
    a.test(rax, rax)?;
    a.jnz(l_hexit)?;
    load_flags(&mut a)?;
    load_resident(&mut a, false)?;
    load_all_xmm(&mut a)?;
    a.ret()?;
    a.set_label(&mut l_hexit)?;
    a.add(rsp, 8)?;
    a.jmp(l_leave)?;

    // indirect: target in cpu.s.rip; guest state in host registers. Look
    // the target up in the jump cache and jump straight to its translation
    // when the current TLB still maps it to the same physical page.
    let tag = offset_of!(TlbEntry, exec_tag) as i32;
    let ppn = offset_of!(TlbEntry, ppn) as i32;
    a.set_label(&mut l_indirect)?;
    a.mov(m(o_spill(SP_RAX)), rax)?;
    a.mov(m(o_spill(SP_A)), rsi)?;
    a.mov(m(o_spill(SP_B)), rcx)?;
    a.mov(m(o_spill(SP_C)), rdx)?;
    a.lahf()?;
    a.seto(al)?;
    // The budget (the kick flag waits for the dispatcher: see
    // `KICK_INTERVAL`).
    a.cmp(byte_ptr(r15 + (o_ctx!(left) + 7)), 0)?;
    a.je(l_miss)?;
    a.mov(rcx, m(o_rip()))?;
    a.mov(rdx, rcx)?;
    a.shr(rdx, 10)?;
    a.xor(rdx, rcx)?;
    a.and(edx, (super::JC_SIZE - 1) as u32)?;
    a.shl(edx, 5)?;
    a.add(rdx, m(o_ctx!(jc_base)))?;
    a.cmp(rcx, qword_ptr(rdx))?;
    a.jne(l_miss)?;
    a.shr(rcx, 12)?;
    a.mov(esi, ecx)?;
    a.and(esi, (crate::mmu::TLB_SIZE - 1) as u32)?;
    a.imul_3(esi, esi, size_of::<TlbEntry>() as i32)?;
    a.add(rsi, m(o_ctx!(tlb_base)))?;
    a.cmp(rcx, qword_ptr(rsi + tag))?;
    a.jne(l_miss)?;
    a.mov(rcx, qword_ptr(rsi + ppn))?;
    a.cmp(rcx, qword_ptr(rdx + 16))?;
    a.jne(l_miss)?;
    a.mov(rcx, qword_ptr(rdx + 8))?;
    a.mov(m(o_ctx!(target)), rcx)?;
    a.add(al, 0x7f)?;
    a.sahf()?;
    a.mov(rax, m(o_spill(SP_RAX)))?;
    a.mov(rsi, m(o_spill(SP_A)))?;
    a.mov(rcx, m(o_spill(SP_B)))?;
    a.mov(rdx, m(o_spill(SP_C)))?;
    a.jmp(m(o_ctx!(target)))?;
    a.set_label(&mut l_miss)?;
    a.add(al, 0x7f)?;
    a.sahf()?;
    a.mov(rax, m(o_spill(SP_RAX)))?;
    a.mov(rsi, m(o_spill(SP_A)))?;
    a.mov(rcx, m(o_spill(SP_B)))?;
    a.mov(rdx, m(o_spill(SP_C)))?;
    a.mov(m(o_gpr(0)), rax)?;
    a.mov(m(o_ctx!(exit_site)), 0)?;
    a.jmp(l_exit)?;

    let res = a.assemble_options(at, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let stubs = Stubs {
        indirect: res.label_ip(&l_indirect)?,
        enter: res.label_ip(&l_enter)?,
        exit: res.label_ip(&l_exit)?,
        helper: res.label_ip(&l_helper)?,
    };
    Ok((res.inner.code_buffer, stubs))
}

/// A chainable exit: the 5-byte jmp at `site` may be patched to jump
/// straight to the block for `target` (same guest page as the source).
pub struct ChainSite {
    pub site: u64,
    /// Patchable jmp placed before the parked registers are reloaded:
    /// a target with the same parked set is entered at its count.
    pub fast_site: u64,
    pub target: u64,
}

pub struct Translation {
    pub code: Vec<u8>,
    pub entry: u64,
    /// Entry past the parking and the page checks (single-page blocks).
    pub count_entry: Option<u64>,
    /// The parked registers: bit `n` for guest register `n`.
    pub park_key: u64,
    pub chains: Vec<ChainSite>,
    /// Direct jumps to another page: (site of a 5-byte jmp that goes on
    /// to the jump-cache exit until patched to a guard, see
    /// [`GuardTemplate`]; target).
    pub far: Vec<(u64, u64)>,
    pub native: u32,
    pub helpers: u32,
    /// Strided groups (see `Stride`).
    pub strided: u32,
    /// Whether this is a loop counted in a 32-bit register whose 32-bit
    /// sums were followed (see `Z32`).
    pub z32: bool,
    /// Instructions left to helpers (diagnostics).
    #[allow(dead_code)]
    pub helper_codes: Vec<Code>,
}

struct Slow {
    label: CodeLabel,
    back: CodeLabel,
    dn: *const DInsn,
    /// The instruction's index in the block.
    k: usize,
    restore: Vec<(Register, usize)>,
    /// Guest rcx is in this register (the keeper), not in rcx.
    rcx_from: Option<Register>,
    /// Entered with the guest flags in ax (LAHF/SETO lookup).
    flags_in_ax: bool,
    /// Entered with the guest flags pushed on the host stack.
    popf: bool,
    /// The fast path goes on with guest rcx in this keeper (`rcx_out`):
    /// after the helper, put it there too.
    keep_rcx: Option<Register>,
}

/// What translated code may assume about the guest and the host.
#[derive(Clone, Copy)]
pub struct Opts {
    /// SSE instructions may run natively (CR0.TS/EM clear, CR4.OSFXSR set).
    pub sse: bool,
    /// SSE floating point may run natively (MXCSR masks every exception).
    pub fp: bool,
    /// The host has a fast PEXT: flag-free TLB lookups.
    pub bmi2: bool,
    /// Same-base accesses may share one TLB check ([`Group`]).
    pub groups: bool,
    /// Count events in `JitCtx::events` (see [`EVENTS`]).
    pub events: bool,
}

/// What translated code counts when `Opts::events` is set
/// (MATRYOSHKA_JIT_EVENTS=1): exact counts of the glue that runs, for
/// hosts without hardware counters. Each costs a PUSHFQ/INC/POPFQ, so
/// times are meaningless in such a run.
pub const EVENTS: [&str; 14] = [
    "entries past a page check",
    "chains through a stub",
    "block executions",
    "TLB lookups that hit",
    "full TLB lookups",
    "back-edge checks",
    "saves of guest rcx",
    "TLB lookups spilling their scratch registers",
    "jump-cache probes for direct jumps to another page",
    "jump-cache probes for indirect jumps and returns",
    "chains to another page through a guard",
    "side exits taken",
    "instructions with guest rsp or r15 moved through a host register",
    "TLB lookups that hit the entry cached in registers",
];
const EV_ENTRY: usize = 0;
const EV_STUB: usize = 1;
const EV_BLOCK: usize = 2;
const EV_HIT: usize = 3;
const EV_FULL_LOOKUP: usize = 4;
const EV_BACK_EDGE: usize = 5;
const EV_RCX_SAVE: usize = 6;
const EV_SPILL_LOOKUP: usize = 7;
const EV_JC_DIRECT: usize = 8;
const EV_JC_INDIRECT: usize = 9;
const EV_FAR_CHAIN: usize = 10;
const EV_SIDE_EXIT: usize = 11;
const EV_REMAP: usize = 12;
const EV_CACHED: usize = 13;

/// A chained jump between blocks of one page that park different
/// registers (`from`, `to`: their [`Translation::park_key`] bitmasks):
/// reload the guest values of the registers only the source parked, park
/// the ones only the target parks, then a `jmp rel32` (its last 5 bytes)
/// for the caller to patch to the target's count entry. The code does
/// not depend on where it is placed.
pub fn chain_stub(from: u64, to: u64, events: bool) -> R<Vec<u8>> {
    let mut a = CodeAssembler::new(64)?;
    count_event(&mut a, events, EV_STUB)?;
    for (n, &r) in GPR64.iter().enumerate() {
        match (from >> n & 1, to >> n & 1) {
            (1, 0) => a.mov(r64(r), m(o_spill(park_slot(r))))?,
            (0, 1) => a.mov(m(o_spill(park_slot(r))), r64(r))?,
            _ => {}
        }
    }
    a.db(&[0xe9, 0, 0, 0, 0])?;
    a.assemble(0)
}

/// The guard of direct jumps to a target from other pages, valid while
/// the TLB maps the target's page to one physical page for execution: the
/// budget check of the jump cache, then the TLB entry's exec tag
/// and page, all flag-free (jrcxz). Entered and left with the whole guest
/// state in registers. Two `jmp rel32` for the caller to patch: to the
/// target's translation (its full entry, which checks that the code is
/// unchanged) and to the jump-cache stub (rip = target), taken when a
/// check fails. Position-independent. Assembled once (iced's encoder is
/// slow for thousands of guards); [`GuardTemplate::instance`] fills in a
/// target's constants.
pub struct GuardTemplate {
    code: Vec<u8>,
    /// Byte offsets of the 4-byte displacements (tag, page, -ppn) and the
    /// 8-byte immediates (-vpn, target).
    tag: usize,
    page: usize,
    neg_ppn: usize,
    neg_vpn: usize,
    target: usize,
    /// Offsets of the jmp to the target's entry and of the one to the
    /// jump-cache stub.
    pub to_entry: usize,
    pub to_jc: usize,
}

impl GuardTemplate {
    /// None if iced encoded a placeholder in another size than the one
    /// `instance` writes (then no guards: jumps keep the jump cache).
    pub fn new(events: bool) -> Option<GuardTemplate> {
        Self::assemble(events).ok()?
    }

    fn assemble(events: bool) -> R<Option<GuardTemplate>> {
        // Placeholders that force 4-byte displacements and 8-byte
        // immediates, whatever values replace them.
        const DISP: i32 = 0x1000_0000;
        const IMM: u64 = 0x1122_3344_5566_7788;
        let mut a = CodeAssembler::new(64)?;
        let mut tag_ok = a.create_label();
        let mut page_ok = a.create_label();
        let mut fail = a.create_label();
        let mut fail_rcx = a.create_label();
        a.mov(m(o_spill(SP_A)), rcx)?;
        // `left` counts up from minus the budget: its top byte is 0 at the
        // end. (The kick flag waits for the dispatcher: see `KICK_INTERVAL`.)
        a.movzx(ecx, byte_ptr(r15 + (o_ctx!(left) + 7)))?;
        a.jrcxz(fail_rcx)?;
        a.mov(m(o_spill(SP_B)), rdx)?;
        a.mov(rdx, m(o_ctx!(tlb_base)))?;
        let i_tag = a.instructions().len();
        a.mov(rcx, qword_ptr(rdx + DISP))?;
        let i_vpn = a.instructions().len();
        a.mov(rdx, IMM)?;
        a.lea(rcx, qword_ptr(rcx + rdx))?;
        a.jrcxz(tag_ok)?;
        a.jmp(fail)?;
        a.set_label(&mut tag_ok)?;
        a.mov(rdx, m(o_ctx!(tlb_base)))?;
        let i_page = a.instructions().len();
        a.mov(rcx, qword_ptr(rdx + DISP))?;
        let i_ppn = a.instructions().len();
        a.lea(rcx, qword_ptr(rcx + DISP))?;
        a.jrcxz(page_ok)?;
        a.jmp(fail)?;
        a.set_label(&mut page_ok)?;
        a.mov(rdx, m(o_spill(SP_B)))?;
        a.mov(rcx, m(o_spill(SP_A)))?;
        count_event(&mut a, events, EV_FAR_CHAIN)?;
        let i_entry = a.instructions().len();
        a.db(&[0xe9, 0, 0, 0, 0])?;
        a.set_label(&mut fail)?;
        a.mov(rdx, m(o_spill(SP_B)))?;
        a.set_label(&mut fail_rcx)?;
        let i_target = a.instructions().len();
        a.mov(rcx, IMM)?;
        a.mov(m(o_rip()), rcx)?;
        a.mov(rcx, m(o_spill(SP_A)))?;
        let i_jc = a.instructions().len();
        a.db(&[0xe9, 0, 0, 0, 0])?;
        let res = a.assemble_options(
            0,
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS
                | BlockEncoderOptions::RETURN_CONSTANT_OFFSETS,
        )?;
        let r = &res.inner;
        let at = |k: usize| r.new_instruction_offsets[k] as usize;
        let disp = |k: usize| {
            let c = &r.constant_offsets.get(k)?;
            (c.displacement_size() == 4).then(|| at(k) + c.displacement_offset())
        };
        let imm = |k: usize| {
            let c = &r.constant_offsets.get(k)?;
            (c.immediate_size() == 8).then(|| at(k) + c.immediate_offset())
        };
        let (Some(tag), Some(page), Some(neg_ppn), Some(neg_vpn), Some(target)) = (
            disp(i_tag),
            disp(i_page),
            disp(i_ppn),
            imm(i_vpn),
            imm(i_target),
        ) else {
            return Ok(None);
        };
        Ok(Some(GuardTemplate {
            code: r.code_buffer.clone(),
            tag,
            page,
            neg_ppn,
            neg_vpn,
            target,
            to_entry: at(i_entry),
            to_jc: at(i_jc),
        }))
    }

    /// The guard for `target` in physical page `ppn`.
    pub fn instance(&self, target: u64, ppn: i32) -> Vec<u8> {
        const _: () = assert!(size_of::<TlbEntry>() == 64);
        let vpn = target >> 12;
        let at = 64 * (vpn as usize & (crate::mmu::TLB_SIZE - 1)) as i32;
        let mut c = self.code.clone();
        let mut put = |off: usize, b: &[u8]| c[off..off + b.len()].copy_from_slice(b);
        put(
            self.tag,
            &(at + offset_of!(TlbEntry, exec_tag) as i32).to_le_bytes(),
        );
        put(
            self.page,
            &(at + offset_of!(TlbEntry, ppn) as i32).to_le_bytes(),
        );
        put(self.neg_ppn, &ppn.wrapping_neg().to_le_bytes());
        put(self.neg_vpn, &vpn.wrapping_neg().to_le_bytes());
        put(self.target, &target.to_le_bytes());
        c
    }
}

/// Count event `k` (flags and registers unchanged).
fn count_event(a: &mut CodeAssembler, on: bool, k: usize) -> R<()> {
    if on {
        a.pushfq()?;
        a.inc(qword_ptr(r15 + (o_ctx!(events) + 8 * k as i32)))?;
        a.popfq()?;
    }
    Ok(())
}

thread_local! {
    /// The last translation's assembler and instruction list, whose
    /// buffers keep their size for the next one on this thread.
    static SPARE: std::cell::Cell<Option<(CodeAssembler, Vec<Instruction>)>> =
        const { std::cell::Cell::new(None) };
}

struct Tx<'a> {
    /// SSE instructions may run natively (CR0.TS/EM clear, CR4.OSFXSR set).
    sse: bool,
    /// Count events (`Opts::events`).
    events: bool,
    /// SSE floating point may run natively: the guest MXCSR masks every
    /// exception and is the host MXCSR while translated code runs.
    fp: bool,
    a: CodeAssembler,
    /// `a`'s instructions with the cache pairs' preloads filled in.
    list: Vec<Instruction>,
    stubs: Stubs,
    block: &'a Block,
    tlb_entry: usize,
    /// Chainable exits: (index of the patchable jmp, index of the fast
    /// one, target rip); indices into the assembler's instruction list.
    chain_sites: Vec<(usize, usize, u64)>,
    /// Patchable jmps before the jump-cache exit of direct jumps to
    /// another page: (instruction index, target).
    far_sites: Vec<(usize, u64)>,
    slow: Vec<Slow>,
    /// Failed group checks, out of line: (their label, the plain copy's
    /// label to go on at), entered with guest rcx where `save_rcx` put it.
    group_fails: Vec<(CodeLabel, CodeLabel)>,
    info: InstructionInfoFactory,
    native: u32,
    helpers: u32,
    /// Exits must go to the dispatcher (stale-code exit).
    no_jc: bool,
    /// The memory operand being translated must be 16-byte aligned.
    align16: bool,
    helper_codes: Vec<Code>,
    bmi2: bool,
    /// Host registers whose guest values are parked in spill slots for the
    /// whole block (the block never names them), so translated code may
    /// use them as scratch: stored at block entry, reloaded before every
    /// helper call and exit. rcx comes first when it is among them.
    parked: Vec<Register>,
    /// A parked register that holds guest rcx while rcx is scratch (the
    /// lookups' JRCXZ, the back-edge checks) when the block names rcx. A
    /// round trip through a spill slot instead puts a store and a load on
    /// rcx's dependency chain, which in a loop that keeps a value in rcx
    /// is the loop's critical path.
    keeper: Option<Register>,
    /// Guest rcx is in the keeper and host rcx is scratch, from a lookup
    /// whose restore was left for later: a run of instructions that do not
    /// name rcx shares one save and one restore (see [`Tx::lazy_rcx_ok`]).
    /// Join points (the plain copy's labels, a slow path's return) and
    /// everything that is not such an instruction restore it first.
    rcx_out: bool,
    /// The instruction being translated names rcx, which its host form
    /// names as the keeper (see [`Tx::host_form`]).
    rcx_ren: bool,
    /// The first copy's loop head (`l_count` while it is `l_loop`) has
    /// guest rcx in the keeper: a loop that keeps a value in rcx (a
    /// scan's bound, a sort's pivot) sets it aside once an entry, not
    /// around every lookup of every pass. Its back edges put it there.
    head_out: bool,
    /// Guest rcx was in the keeper at the body check (its exit puts it
    /// back).
    body_rcx_out: bool,
    /// The block's entry after parking (target of jumps to its own start).
    l_count: Option<CodeLabel>,
    /// Where a block that jumps back into its own page checks its budget
    /// (the kick flag waits for the dispatcher: see
    /// [`super::KICK_INTERVAL`]), when it has a point where the guest flags
    /// are dead (see [`Tx::count_add`]): the index of the instruction there
    /// and the out-of-line exit. Its back edges then check nothing.
    body_check: Option<(usize, CodeLabel)>,
    /// Index of the instruction being translated.
    cur_k: usize,
    /// The block's instruction count, and the instruction before which it
    /// is added (at the start if none: see [`flags_dead_before`]).
    count_n: usize,
    count_at: Option<usize>,
    /// Taken side exits, emitted after the body: (their label, the index
    /// of the branch, its target, whether guest rcx is in the keeper).
    side_exits: Vec<(CodeLabel, usize, u64, bool)>,
    /// Guest address of the instruction being translated, and how many
    /// fast lookups it has emitted (they key the entry slots).
    cur_rip: u64,
    cur_lookups: u64,
    /// The block's groups (see [`Group`]); empty while the plain copy is
    /// emitted.
    groups: Vec<Group>,
    /// The entry checks of a loop counted in a 32-bit register (see
    /// [`plan_groups`]).
    z32: Vec<(Register, u32)>,
    /// The group register of the instruction being translated when it is
    /// a group member (fast copy only), and for a stack group's member its
    /// access's offset from that register (see [`Group::rel`]).
    member: Option<(Home, Option<i64>)>,
    /// Register pairs parked in a block that loops on itself to cache one
    /// access site's TLB entry across passes (see [`Tx::lookup_fast`]):
    /// (minus its tag, scaled like the site's check; its addend), and
    /// the site that owns each: (instruction index, lookup number, write,
    /// alignment bits). The tag register holds 1, which matches nothing,
    /// from the block's count entry on and after every helper call.
    cache: Vec<(Register, Register)>,
    cache_owner: Vec<Option<(usize, u64, bool, usize)>>,
    /// Each cache pair's owner's entry slot, and the placeholders at the
    /// count entry that become its preload from that slot (see
    /// [`Tx::preload_pairs`]).
    cache_slot: Vec<i32>,
    preload_at: Vec<usize>,
    /// Miss paths of cached lookups, emitted last.
    cold_lookups: Vec<ColdLookup>,
    /// The block's shared helper call (see [`Tx::call_helper`]), once a
    /// site needs it.
    helper_tail: Option<CodeLabel>,
    /// The block's shared reload of its parked registers (see
    /// [`Tx::unpark`]), once an exit needs it.
    unpark_tail: Option<CodeLabel>,
    /// In a block that loops on itself, a parked register that holds the
    /// instruction count (`JitCtx::left`): each pass adds to it, so that
    /// the count's dependency chain runs through a register, not through
    /// memory. Loaded at the count entry and after helpers; stored only
    /// before what reads `left` (exits, helper calls, the flag-free
    /// back-edge check: see [`Tx::count_sync`]), not on every pass.
    counter: Option<Register>,
    /// The counter register holds the count (past the count entry's load;
    /// the stale-code exit before it must not store it).
    counter_live: bool,
    /// The lookup being emitted may leave the addend in its cache pair's
    /// register rather than copy it to the third scratch register; then
    /// `pair_addend` names that register (see [`Tx::native_mem_fast`]).
    want_pair_addend: bool,
    pair_addend: Option<Register>,
    /// Back-edge checks whose budget ran out, out of line: (their label,
    /// the exit to go on at), entered with guest rcx where `save_rcx(SP_ENTRY)`
    /// put it.
    budget_stops: Vec<(CodeLabel, CodeLabel)>,
    /// A group check just stored its host address to spill slot `.0` from
    /// register `.1`, and the assembler held `.2` instructions then: a
    /// member right after it takes the register as it is instead of
    /// reloading the slot (a store and a load on the access's address).
    spilled: Option<(usize, Register, usize)>,
    /// The lookup being emitted gets no cache pair (a hoisted check).
    no_pair: bool,
    /// While the first copy is emitted: the strided groups' registers and
    /// strides (see [`Stride`]), which its back edges advance.
    strided: Vec<(Register, Stride)>,
    /// How many of `strided` (from the first) each pass compares with its
    /// limit: all, or the first when they move in step (its limit then
    /// covers the others: see [`merge_limit`]).
    stride_checks: usize,
    /// While the first copy of a loop with strided groups is emitted: its
    /// passes leave out the body check's branch on the budget, as the
    /// hoisted checks made sure that every pass the limits let through
    /// fits in it (see [`budget_room`]).
    budget_free: bool,
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        // The buffers go to the next translation (iced's `reset` keeps them).
        if let Ok(fresh) = CodeAssembler::new(64) {
            let a = std::mem::replace(&mut self.a, fresh);
            SPARE.set(Some((a, std::mem::take(&mut self.list))));
        }
    }
}

/// A RIP-relative operand for absolute address `target` (the assembler
/// turns it into the displacement; see [`rip_reaches`]).
fn rip_rel(target: u64) -> MemoryOperand {
    MemoryOperand::with_base_displ(Register::RIP, target as i64)
}

/// Whether a RIP-relative operand in code placed at `at` (a block is far
/// smaller than the margin) reaches `target`.
fn rip_reaches(at: u64, target: u64) -> bool {
    const MARGIN: i64 = 1 << 24;
    let d = target.wrapping_sub(at) as i64;
    target != 0 && d > i32::MIN as i64 + MARGIN && d < i32::MAX as i64 - MARGIN
}

/// Translate `block` for placement at address `at`. Returns None when the
/// block cannot be translated (the interpreter keeps running it).
pub fn translate(
    block: &Block,
    page_gens: &[(*const u32, u32)],
    stubs: Stubs,
    at: u64,
    opts: Opts,
) -> Result<Translation, TranslateError> {
    let (a, list) = match SPARE.take() {
        Some((mut a, list)) => {
            a.reset();
            (a, list)
        }
        None => (CodeAssembler::new(64)?, Vec::new()),
    };
    let mut tx = Tx {
        sse: opts.sse,
        events: opts.events,
        fp: opts.fp,
        bmi2: opts.bmi2,
        parked: Vec::new(),
        keeper: None,
        rcx_out: false,
        rcx_ren: false,
        head_out: false,
        body_rcx_out: false,
        l_count: None,
        body_check: None,
        cur_k: 0,
        count_n: block.insns.len(),
        count_at: flags_dead_before(block),
        side_exits: Vec::new(),
        a,
        list,
        stubs,
        block,
        tlb_entry: size_of::<TlbEntry>(),
        chain_sites: Vec::new(),
        far_sites: Vec::new(),
        slow: Vec::new(),
        group_fails: Vec::new(),
        info: InstructionInfoFactory::new(),
        native: 0,
        helpers: 0,
        no_jc: false,
        align16: false,
        helper_codes: Vec::new(),
        cur_rip: 0,
        cur_lookups: 0,
        groups: Vec::new(),
        z32: Vec::new(),
        member: None,
        cache: Vec::new(),
        cache_owner: Vec::new(),
        cache_slot: Vec::new(),
        preload_at: Vec::new(),
        cold_lookups: Vec::new(),
        helper_tail: None,
        unpark_tail: None,
        counter: None,
        counter_live: false,
        spilled: None,
        no_pair: false,
        strided: Vec::new(),
        stride_checks: 0,
        budget_free: false,
        want_pair_addend: false,
        pair_addend: None,
        budget_stops: Vec::new(),
    };
    (tx.parked, tx.keeper) = choose_parked(block, &mut tx.info, opts.bmi2);
    let loops = loops_on_itself(block);
    // Where the guest flags are dead, one flag-clobbering ADD counts;
    // otherwise a flag-free load, LEA and store at the block's start.
    let add_at = tx.count_at;
    if opts.groups && tx.free3().is_some() {
        let free = unnamed(block, &mut tx.info, &tx.parked);
        // Up to 8 parked registers: each costs a store and a load around
        // every exit and helper call.
        let room = 8usize.saturating_sub(tx.parked.len());
        (tx.groups, tx.z32) = plan_groups(
            block,
            &mut tx.info,
            opts.sse,
            opts.fp,
            &free[..free.len().min(room)],
            loops && add_at.is_some(),
        );
        for g in tx.groups.iter() {
            if let Home::Reg(r) = g.home {
                if !tx.parked.contains(&r) {
                    tx.parked.push(r);
                }
            }
        }
    }
    if tx.free3().is_some() && loops {
        // Memory operands that get a lookup of their own, and groups.
        let member = |k: usize| tx.groups.iter().any(|g| g.members.contains(&k));
        let sites = block
            .insns
            .iter()
            .enumerate()
            .filter(|&(k, d)| d.insn.mnemonic() != Mnemonic::Lea && !member(k))
            .filter(|(_, d)| (0..d.insn.op_count()).any(|n| d.insn.op_kind(n) == OpKind::Memory))
            .count()
            // (A strided group's check runs again at each new page.)
            + tx.groups.iter().filter(|g| !g.hoist || g.stride.is_some()).count();
        let free = unnamed(block, &mut tx.info, &tx.parked);
        let room = 10usize.saturating_sub(tx.parked.len()).min(free.len());
        let pairs = sites.min(CACHE_PAIRS).min(room.saturating_sub(1) / 2);
        for p in free[..2 * pairs].chunks(2) {
            tx.cache.push((p[0], p[1]));
            tx.cache_owner.push(None);
            tx.cache_slot.push(0);
            tx.parked.extend([p[0], p[1]]);
        }
        if room > 2 * pairs {
            tx.counter = Some(free[2 * pairs]);
            tx.parked.push(free[2 * pairs]);
        }
    }
    // The entry is the first instruction (index 0).
    let mut l_stale = tx.a.create_label();
    count_event(&mut tx.a, tx.events, EV_ENTRY)?;
    tx.park_spill()?;
    // Check that the guest code is unchanged (a chained jump may arrive
    // here without passing the dispatcher), then count instructions.
    // Jumps back to the block's own start, and chained jumps from a block
    // of the same page (directly when it parks the same registers, else
    // through a chain stub), enter at the count (`l_count`): their source
    // checked this page and nothing can have written it since without
    // leaving translated code (a helper that writes decoded code exits).
    if !page_gens.is_empty() {
        tx.save_rcx(SP_ENTRY)?;
    }
    for &(ptr, gen) in page_gens {
        let a = &mut tx.a;
        let mut ok = a.create_label();
        if rip_reaches(at, ptr as u64) {
            let gen = rip_rel(ptr as u64);
            a.add_instruction(Instruction::with2(Code::Mov_r32_rm32, Register::ECX, gen)?)?;
        } else {
            a.mov(rcx, ptr as u64)?;
            a.mov(ecx, dword_ptr(rcx))?;
        }
        a.lea(ecx, dword_ptr(rcx + (gen.wrapping_neg() as i32)))?;
        a.jrcxz(ok)?;
        tx.restore_rcx(SP_ENTRY)?;
        let a = &mut tx.a;
        a.jmp(l_stale)?;
        a.set_label(&mut ok)?;
    }
    if !page_gens.is_empty() {
        tx.restore_rcx(SP_ENTRY)?;
    }
    let a = &mut tx.a;
    // (Keeps l_count off any label set above.)
    a.zero_bytes()?;
    let mut l_count = a.create_label();
    let count_idx = a.instructions().len();
    a.set_label(&mut l_count)?;
    // Chained entries come in here too: the cache registers hold another
    // block's scratch.
    // Each pair is emptied here, in room for its preload.
    for k in 0..tx.cache.len() {
        tx.preload_at.push(tx.a.instructions().len());
        empty_pair(&mut tx.a, tx.cache[k].0)?;
        for _ in 1..PRELOAD_LEN {
            tx.a.zero_bytes()?;
        }
    }
    tx.counter_load()?;
    tx.counter_live = true;
    let n = tx.count_n;
    // With groups the block is emitted twice: first the copy whose group
    // members skip their lookups, then, from the first group's head on,
    // the plain copy. The first copy goes on in the plain one at the
    // start of instruction k (`plain[k]`, same register state) when a
    // group check fails, and right after instruction k when a helper ran
    // it while a group is live: helpers reload the parked registers, so
    // the group registers no longer hold their addends.
    let groups = std::mem::take(&mut tx.groups);
    let plain: Vec<CodeLabel> = if groups.is_empty() {
        Vec::new()
    } else {
        (0..=n).map(|_| tx.a.create_label()).collect()
    };
    // Hoisted groups are checked here, before the passes: again after a
    // pass in the plain copy (its back edge comes here), never after one
    // in the first copy, which leaves their registers as they were.
    let hoisted = groups.iter().any(|g| g.hoist);
    let mut l_hoist = tx.a.create_label();
    let body_check = add_at.is_some_and(|k| has_back_edge(block, k)) && !tx.parked.is_empty();
    // (Strided groups are hoisted: both are set below or stay empty.)
    let mut strided: Vec<(Register, Stride)> = Vec::new();
    let mut budget_free = false;
    let mut z32_loop = false;
    if hoisted {
        // (Keeps l_hoist off l_count.)
        tx.a.zero_bytes()?;
        tx.a.set_label(&mut l_hoist)?;
        tx.a.zero_bytes()?;
        let z32 = std::mem::take(&mut tx.z32);
        z32_loop = !z32.is_empty();
        if !z32.is_empty() {
            tx.z32_check(&z32, plain[0])?;
        }
        // Their own lookups (the cache pairs were just cleared), but a
        // strided group's check runs again whenever the loop moves to
        // another page: its pair, preloaded at the count, often hits.
        for g in groups.iter().filter(|g| g.hoist) {
            tx.no_pair = g.stride.is_none();
            tx.group_check(g, plain[0], false)?;
        }
        tx.no_pair = false;
        // All checked: the strided groups' limits (flag-free, as a failed
        // check above goes on in the plain copy with the guest flags).
        // (Always there: groups are planned only with the lookup's scratch
        // registers, and strided ones only with a register; without them
        // the block would step no register and check no limit.)
        for g in groups.iter() {
            if let Some(st) = g.stride {
                let (Home::Reg(r), Some((sa, sb, _))) = (g.home, tx.free3()) else {
                    return Err(TranslateError::Strided);
                };
                stride_limit(&mut tx.a, g, st, r, (sa, sb))?;
                strided.push((r, st));
            }
        }
        tx.stride_checks = strided.len();
        // Strided groups that move in step: one limit, the tightest, in
        // the first one's slot, and one compare a pass.
        if let [(lead, st), rest @ ..] = &strided[..] {
            if !rest.is_empty() && rest.iter().all(|(_, s)| s.same_step(st)) {
                let t = tx.free3().ok_or(TranslateError::Strided)?;
                for &g in rest {
                    merge_limit(&mut tx.a, (*lead, *st), g, t)?;
                }
                tx.stride_checks = 1;
            }
        }
        // Each strided group's limit lets through at most 4 KiB / |step|
        // + 1 passes before the plain copy (whose back edge comes back
        // here): with room for that many in the budget, the first copy's
        // passes need not check it.
        // (Not known for a register's step.)
        let widest = strided.iter().map(|(_, s)| s.step.unsigned_abs()).max();
        let widest = widest.filter(|_| strided.iter().all(|(_, s)| s.by == Register::None));
        if let (Some(w), true) = (widest, body_check) {
            let passes = 0x1000 / w as usize + 2;
            budget_free = tx.budget_room(passes * n, plain[0])?;
        }
    }
    // Loops that check their budget in the body keep guest rcx in the
    // keeper from pass to pass (strided ones compare their limits with
    // it in rcx, for the plain copy).
    tx.head_out = body_check
        && strided.is_empty()
        && tx.keeper.is_some()
        && !tx.rcx_parked()
        && tx.rcx_stays_out();
    if tx.head_out {
        tx.save_rcx(SP_RCX)?;
    }
    let a = &mut tx.a;
    a.zero_bytes()?;
    let mut l_loop = a.create_label();
    a.set_label(&mut l_loop)?;
    count_event(a, tx.events, EV_BLOCK)?;
    tx.rcx_out = tx.head_out;
    tx.l_count = Some(l_loop);
    if let Some(k) = add_at.filter(|_| body_check) {
        tx.body_check = Some((k, a.create_label()));
    }
    if add_at.is_none() {
        tx.count_fix(n as i32)?;
    }
    let next = block.insns[n - 1].insn.next_ip();
    let mut ended = false;
    let strided_groups = strided.len() as u32;
    tx.strided = strided;
    tx.budget_free = budget_free;
    for (k, dn) in block.insns.iter().enumerate() {
        // The count expects guest rcx in rcx (its exit runs the rest of
        // the instruction from there); a group check takes it from either.
        if add_at == Some(k) && tx.stride_checks > 0 {
            tx.sync_rcx()?;
        }
        if add_at == Some(k) {
            // Where the flags are dead: will the next pass still be in the
            // pages the strided groups were checked for? If not, this one
            // ends in the plain copy, whose back edge checks them again.
            for &(r, st) in tx.strided[..tx.stride_checks].iter() {
                let a = &mut tx.a;
                a.cmp(r64(r), m(o_spill(st.limit)))?;
                if st.step > 0 || st.by != Register::None {
                    a.ja(plain[k])?;
                } else {
                    a.jb(plain[k])?;
                }
            }
        }
        // Before the count: a failed check enters the plain copy before
        // its count.
        for g in groups.iter().filter(|g| g.head() == k && !g.hoist) {
            tx.group_check(g, plain[k], add_at != Some(k))?;
        }
        if add_at == Some(k) {
            // (Where guest rcx is when the body check leaves.)
            tx.body_rcx_out = tx.rcx_out;
            tx.count_add(n)?;
        }
        tx.member = groups.iter().find_map(|g| {
            let j = g.members.iter().position(|&m| m == k)?;
            Some((g.home, g.rel.get(j).copied()))
        });
        let (helpers, slow) = (tx.helpers, tx.slow.len());
        tx.cur_k = k;
        ended = tx.insn(dn)?;
        tx.member = None;
        if ended {
            break;
        }
        if groups
            .iter()
            .any(|g| g.hoist || g.head() <= k && k < g.last())
        {
            for s in tx.slow[slow..].iter_mut() {
                s.back = plain[k + 1];
            }
            if tx.helpers > helpers {
                tx.a.jmp(plain[k + 1])?;
                ended = true;
                break;
            }
        }
    }
    if !ended {
        tx.exit_direct(next)?;
    }
    tx.strided.clear();
    tx.stride_checks = 0;
    tx.budget_free = false;
    // Every path below starts with guest rcx in rcx.
    tx.rcx_out = false;
    let first = groups
        .iter()
        .map(|g| if g.hoist { 0 } else { g.head() })
        .min();
    if let Some(first) = first {
        let mut plain = plain;
        // The plain copy's back edge checks the hoisted groups again.
        if hoisted {
            tx.l_count = Some(l_hoist);
            tx.head_out = false;
        }
        tx.uncounted(|tx| {
            let mut ended = false;
            let copy = block.insns.iter().zip(plain.iter_mut()).enumerate();
            for (k, (dn, label)) in copy.skip(first) {
                // plain[k] is a join point: jumps from the first copy
                // arrive with guest rcx in rcx.
                tx.sync_rcx()?;
                tx.a.set_label(label)?;
                tx.a.zero_bytes()?;
                if add_at == Some(k) {
                    // The body check's exit is the first copy's: it takes
                    // guest rcx from where that copy had it here.
                    if tx.body_rcx_out {
                        tx.save_rcx(SP_RCX)?;
                        tx.rcx_out = true;
                    }
                    tx.count_add(n)?;
                }
                tx.cur_k = k;
                ended = tx.insn(dn)?;
                if ended {
                    break;
                }
            }
            if !ended {
                tx.sync_rcx()?;
                tx.a.set_label(&mut plain[n])?;
                tx.a.zero_bytes()?;
                tx.exit_direct(next)?;
            }
            Ok(())
        })?;
    }
    // Taken side exits: the count covers the instructions run so far.
    for (mut l, k, target, out) in std::mem::take(&mut tx.side_exits) {
        tx.a.set_label(&mut l)?;
        tx.rcx_out = out;
        count_event(&mut tx.a, tx.events, EV_SIDE_EXIT)?;
        let delta = match add_at {
            Some(a) if k < a => k as i32 + 1,
            _ => k as i32 + 1 - n as i32,
        };
        tx.count_fix(delta)?;
        tx.cur_k = k;
        tx.exit_direct(target)?;
    }
    // Kicked or out of budget at the body check: run the instruction the
    // flags were dead before (so that the guest sees its flags, not the
    // count's), take back the count of the rest of the block, and leave.
    if let Some((k, mut cold)) = tx.body_check.take() {
        tx.a.set_label(&mut cold)?;
        let dn = &block.insns[k];
        tx.rcx_out = tx.body_rcx_out;
        tx.uncounted(|tx| {
            tx.cur_k = k;
            if !tx.insn(dn)? {
                tx.count_fix(k as i32 + 1 - n as i32)?;
                tx.no_jc = true;
                tx.exit_to(ExitTarget::Imm(dn.insn.next_ip()), None)?;
                tx.no_jc = false;
            }
            Ok(())
        })?;
    }
    // Stale code: leave with rip at the block start (before the counter's
    // load).
    tx.rcx_out = false;
    tx.a.set_label(&mut l_stale)?;
    tx.no_jc = true;
    tx.counter_live = false;
    tx.exit_to(ExitTarget::Imm(block.insns[0].insn.ip()), None)?;
    tx.counter_live = true;
    tx.no_jc = false;
    // Cold paths.
    for (mut at, slow) in std::mem::take(&mut tx.budget_stops) {
        tx.a.set_label(&mut at)?;
        tx.restore_rcx(SP_ENTRY)?;
        tx.a.jmp(slow)?;
    }
    for (mut at, fail) in std::mem::take(&mut tx.group_fails) {
        tx.a.set_label(&mut at)?;
        tx.restore_rcx(SP_RCX)?;
        tx.a.jmp(fail)?;
    }
    let slow = std::mem::take(&mut tx.slow);
    for mut s in slow {
        tx.a.set_label(&mut s.label)?;
        if s.popf {
            tx.a.popfq()?;
        }
        if s.flags_in_ax {
            // Entered with the guest flags in ax and guest rax spilled.
            tx.a.add(al, 0x7f)?;
            tx.a.sahf()?;
        }
        if let Some(k) = s.rcx_from {
            tx.a.mov(rcx, r64(k))?;
        }
        for &(r, k) in s.restore.iter() {
            tx.a.mov(r64(r), m(o_spill(k)))?;
        }
        tx.call_helper(s.dn, s.k)?;
        if let Some(k) = s.keep_rcx {
            tx.a.mov(r64(k), rcx)?;
        }
        tx.a.jmp(s.back)?;
    }
    for cold in std::mem::take(&mut tx.cold_lookups) {
        tx.cold_lookup(cold)?;
    }
    if let Some(mut l) = tx.unpark_tail.take() {
        tx.a.set_label(&mut l)?;
        tx.park_reload()?;
        tx.a.ret()?;
    }
    if let Some(mut l) = tx.helper_tail.take() {
        // Reached by CALL from each site: its return address goes aside,
        // so that the helper stub runs at the depth it expects (its exit
        // path pops exactly its own frame).
        tx.a.set_label(&mut l)?;
        tx.a.pop(qword_ptr(r15 + o_spill(SP_RET)))?;
        tx.park_reload()?;
        tx.a.call(tx.stubs.helper)?;
        tx.park_spill()?;
        tx.a.jmp(qword_ptr(r15 + o_spill(SP_RET)))?;
    }
    // The block's own assembler; iced's BlockEncoder for what it refuses
    // (a JRCXZ out of rel8 range, say; its code leaves the pairs empty).
    let list = match tx.preload_pairs()? {
        true => &tx.list[..],
        false => tx.a.instructions(),
    };
    let (code, offsets) = match emit::assemble(list, at) {
        Ok(r) => (r.code, r.offsets),
        Err(_) => {
            let r =
                tx.a.assemble_options(at, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
            (r.inner.code_buffer, r.inner.new_instruction_offsets)
        }
    };
    let addr = |idx: usize| -> Result<u64, TranslateError> {
        match offsets.get(idx) {
            Some(&o) if o != u32::MAX => Ok(at + o as u64),
            _ => Err(TranslateError::Layout),
        }
    };
    let mut chains = Vec::new();
    for &(site, fast, target) in tx.chain_sites.iter() {
        chains.push(ChainSite {
            site: addr(site)?,
            fast_site: addr(fast)?,
            target,
        });
    }
    let mut far = Vec::new();
    for &(site, target) in tx.far_sites.iter() {
        far.push((addr(site)?, target));
    }
    let single_page = block.pages[1].0 == u64::MAX;
    Ok(Translation {
        entry: addr(0)?,
        count_entry: if single_page {
            Some(addr(count_idx)?)
        } else {
            None
        },
        park_key: tx.parked.iter().fold(0, |k, &r| k | 1 << gidx(r)),
        code,
        chains,
        far,
        native: tx.native,
        helpers: tx.helpers,
        strided: strided_groups,
        z32: z32_loop,
        helper_codes: std::mem::take(&mut tx.helper_codes),
    })
}

/// Cache pairs at most per block that loops on itself (see [`Tx::cache`]).
const CACHE_PAIRS: usize = 2;

/// Empty the cache pair whose tag register is `t`: 1 matches no masked
/// address (see [`Tx::cache`]).
fn empty_pair(a: &mut CodeAssembler, t: Register) -> R<()> {
    a.add_instruction(Instruction::with2(Code::Mov_r32_imm32, sized(t, 4), 1u32)?)
}

/// The offset in a TLB entry of translated code's read or write tag.
fn tag_field(write: bool) -> i32 {
    (if write {
        offset_of!(TlbEntry, jit_write)
    } else {
        offset_of!(TlbEntry, jit_read)
    }) as i32
}

/// Scale the tag in `c` as a cache pair keeps it for a check of `bits`
/// low address bits (unscaled for [`RANGE`]): what the pair's check adds
/// to the masked address.
fn scale_tag(x: &mut CodeAssembler, c: AsmRegister64, bits: usize) -> R<()> {
    match bits {
        RANGE | 0 => Ok(()),
        1..=3 => x.lea(c, qword_ptr(c * (1 << bits))),
        _ => {
            x.lea(c, qword_ptr(c * 8))?;
            x.lea(c, qword_ptr(c + c))
        }
    }
}

/// Instructions reserved at the count entry for each cache pair's preload
/// (see [`Tx::preload_pairs`]).
const PRELOAD_LEN: usize = 5;

/// [`Tx::lookup_cached`]'s check of both ends of an access (any size up
/// to a page, any alignment) rather than of its alignment.
const RANGE: usize = usize::MAX;

/// rcx = vf + vl, the masked pages of the first and last byte of the
/// `size`-byte access at `regs.0` (`regs.2` is scratch): with vl - vf at
/// most 1, vf + vl - 2 tag is zero only when both are the tag's page.
fn lookup_ends(x: &mut CodeAssembler, regs: (Register, Register, Register), size: usize) -> R<()> {
    let (a, c) = (r64(regs.0), r64(regs.2));
    let page = m(o_ctx!(m_page));
    x.pext(rcx, a, page)?;
    x.lea(c, qword_ptr(a + (size as i32 - 1)))?;
    x.pext(c, c, page)?;
    x.lea(rcx, qword_ptr(rcx + c))
}

/// The full lookup: `b` = the entry at the TLB index of the address in
/// `a` (64-byte entries: index * 8 * 8), also left in the site's entry
/// slot (`slot`, an offset from r15).
fn tlb_index(x: &mut CodeAssembler, a: Register, b: Register, slot: i32) -> R<()> {
    let b = r64(b);
    x.pext(rcx, r64(a), m(o_ctx!(m_idx)))?;
    x.mov(b, m(o_ctx!(tlb_base)))?;
    x.lea(rcx, qword_ptr(rcx * 8))?;
    x.lea(b, qword_ptr(b + rcx * 8))?;
    x.mov(m(slot), b)
}

/// A cached lookup's miss path, emitted out of line (see
/// [`Tx::cold_lookup`]).
struct ColdLookup {
    miss: CodeLabel,
    back: CodeLabel,
    slow: CodeLabel,
    regs: (Register, Register, Register),
    size: usize,
    tag: i32,
    bits: usize,
    pair: (Register, Register),
    slot: i32,
    /// The access uses the pair's addend register itself (see
    /// [`Tx::pair_addend`]): every way back leaves the addend there.
    in_pair: bool,
}

/// The block jumps back to its own start (a loop that stays in its
/// translation, where a TLB entry may stay cached across passes).
fn loops_on_itself(block: &Block) -> bool {
    let start = block.insns[0].insn.ip();
    block
        .insns
        .iter()
        .any(|dn| direct_target(&dn.insn) == Some(start))
}

/// The target of a direct JMP or Jcc.
pub(super) fn direct_target(i: &Instruction) -> Option<u64> {
    let direct = matches!(
        i.flow_control(),
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
    ) && i.op0_kind() == OpKind::NearBranch64;
    direct.then(|| i.near_branch_target())
}

/// Registers to park for the whole block (see [`Tx::parked`]): rcx if the
/// block never names it (the flag-free branches test rcx), then, when the
/// host has a fast PEXT, three more (the lookups' scratch). Blocks without
/// memory accesses park them too: then chained blocks of a page more often
/// park the same registers, and the chain between them skips the parking
/// (27% fewer slow chains in the boot and in `int`).
fn choose_parked(
    block: &Block,
    info: &mut InstructionInfoFactory,
    bmi2: bool,
) -> (Vec<Register>, Option<Register>) {
    let used = named_gprs(block, info);
    // A jump back into the block checks the budget through rcx.
    let back_edge = has_back_edge(block, 0);
    let mut v = Vec::new();
    if !used[1] {
        v.push(Register::RCX);
    }
    let mut free = POOL
        .iter()
        .copied()
        .chain([Register::RAX])
        .filter(|&r| r != Register::RCX && !used[gidx(r)]);
    if bmi2 {
        let more: Vec<Register> = free.by_ref().take(3).collect();
        if more.len() == 3 {
            v.extend(more);
        }
    }
    let mut keeper = None;
    if used[1] && (v.len() == 3 || back_edge) {
        keeper = free.next();
        v.extend(keeper);
    }
    (v, keeper)
}

/// Accesses `[base + index * scale + disp]` by several instructions of a
/// block, with `base` and `index` unchanged between them: one check that
/// the whole byte range `[x + lo, x + end)` (x = base + index * scale)
/// lies in one page the TLB maps (for writing if any member writes), and
/// that the members that need 16-byte alignment have it, puts x plus the
/// host addend in `reg`; every member then runs as `[reg + disp]` with no
/// lookup of its own. When the check fails (a miss, a range crossing a
/// page, a page without fast access, a misaligned address) the block goes
/// on in its second, plain copy (see [`translate`]).
#[derive(Clone, Debug)]
struct Group {
    /// Instruction indices, ascending (never empty).
    members: Vec<usize>,
    base: Register,
    /// `Register::None` for `[base + disp]`.
    index: Register,
    scale: u32,
    /// A hoisted group's third register (`Register::None` if none), times
    /// `scale2`.
    index2: Register,
    scale2: u32,
    lo: i64,
    end: i64,
    write: bool,
    /// The displacement of the first member that needs 16-byte alignment
    /// (legacy SSE m128): every other such member's is congruent mod 16.
    align16: Option<i64>,
    /// The smallest member's size: a range wider than that holds several
    /// locations, so it need not be aligned to its own size.
    unit: i64,
    home: Home,
    /// Each member's offset from `base` (plus scaled index) as it was at
    /// the head, which the member uses as its displacement: for a stack
    /// group (`base` is rsp, see [`stack_access`]), and for a group with a
    /// member whose address is not its own displacement off those
    /// registers (they moved, or it names others: see [`Lin`]). Empty for
    /// other groups, whose members keep their own displacements.
    rel: Vec<i64>,
    /// For a group that is not a stack group: the variable part of its
    /// members' addresses (while planning), and the constant part of the
    /// head's base plus scaled index; for a group of RIP-relative
    /// accesses (`base` is RIP), the head's address, from which `lo`,
    /// `end` and `rel` count.
    terms: Terms,
    x0: i64,
    /// Checked once before the passes of a block that loops on itself,
    /// not at its head: its address does not change from pass to pass
    /// (`base` and `index` are then registers the block leaves as they
    /// were, or `base` is RIP), and the block runs no helper between its
    /// start and its back edge.
    hoist: bool,
    /// A hoisted group whose address moves by a constant from pass to
    /// pass of a counted loop (see [`Stride`]).
    stride: Option<Stride>,
}

/// A hoisted group whose address moves by `step` bytes from one pass to
/// the next (registers the loop steps by constants): its register moves
/// with it at the back edge. Where the count goes (the guest flags are
/// dead there: see [`flags_dead_before`]), each pass compares it with
/// the limit in spill slot `limit`, set when the group was checked: if
/// the next pass's range would leave that page, this pass ends in the
/// plain copy, whose back edge checks the group again. Not at the loop's
/// start: a fault there (when the check fails, in the plain copy) would
/// show the guest flags the compare left.
///
/// Under [`Z32`], the step may also name a register the loop leaves
/// alone and the entry checked below 2^24 (`by`, times `by_scale`): the
/// step is then `step` plus that, upward.
#[derive(Clone, Copy, Debug)]
struct Stride {
    step: i32,
    by: Register,
    by_scale: u32,
    limit: usize,
}

impl Stride {
    /// Both move their registers by the same amount.
    fn same_step(&self, o: &Stride) -> bool {
        (self.step, self.by, self.by_scale) == (o.step, o.by, o.by_scale)
    }
}

/// Where a group keeps its base plus scaled index plus host addend: a
/// register the block never names, or, in a block that has none to spare
/// (quicksort's partition loop names ten registers), a spill slot that
/// each member loads into a lookup scratch register: one load instead of
/// a lookup of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Home {
    Reg(Register),
    Slot(usize),
}

impl Group {
    fn head(&self) -> usize {
        self.members[0]
    }
    fn last(&self) -> usize {
        self.members[self.members.len() - 1]
    }
}

/// The widest range a group may cover: the check adds the page numbers
/// of its first and last byte, which must differ by at most one.
const GROUP_SPAN: i64 = 2048;

/// `cur_lookups` while a group check looks up its range: more lookups
/// than one instruction makes, so the check keys an entry slot of its own.
const GROUP_LOOKUP: u64 = 7;

/// The `[base + index * scale + disp]` access of `i` a group may cover,
/// for instructions the fast memory path runs natively.
struct GroupAccess {
    base: Register,
    index: Register,
    scale: u32,
    disp: i64,
    size: i64,
    write: bool,
    /// A legacy SSE m128 operand: must be 16-byte aligned.
    align16: bool,
}

fn group_access(
    i: &Instruction,
    info: &mut InstructionInfoFactory,
    sse: bool,
    fp: bool,
) -> Option<GroupAccess> {
    if i.mnemonic() == Mnemonic::Lea || !native_ok(i, sse, fp) {
        return None;
    }
    let mut mem = false;
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Memory => mem = true,
            OpKind::Register => {
                let r = i.op_register(n);
                if !(r.is_gpr() || r.is_xmm()) {
                    return None;
                }
            }
            k if crate::exec::is_immediate(k) => {}
            _ => return None,
        }
    }
    let base = i.memory_base();
    let size = i.memory_size().size();
    let unaligned16 = matches!(
        i.mnemonic(),
        Mnemonic::Movdqu | Mnemonic::Movups | Mnemonic::Movupd | Mnemonic::Lddqu
    );
    let index = i.memory_index();
    if !mem
        || !matches!(size, 1 | 2 | 4 | 8 | 16)
        || !is64addr(i)
        || !(base.is_gpr64() || base == Register::RIP && index == Register::None)
        || base == Register::R15
        // rsp-based ones go to stack groups, which take no index.
        || base == Register::RSP && index != Register::None
        || !(index == Register::None || index.is_gpr64() && index != Register::R15)
        || matches!(i.memory_segment(), Register::FS | Register::GS)
        || matches!(
            i.mnemonic(),
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
        ) && i.op1_kind() == OpKind::Register
    {
        return None;
    }
    let info = info.info(i);
    if info.used_memory().len() != 1 {
        return None;
    }
    let write = crate::exec::is_write(info.used_memory()[0].access());
    Some(GroupAccess {
        base,
        index,
        scale: i.memory_index_scale(),
        disp: i.memory_displacement64() as i64,
        size: size as i64,
        write,
        align16: size == 16 && !unaligned16,
    })
}

/// A stack access that a stack group may cover (see [`stack_access`]).
struct StackAccess {
    /// Offset from rsp before the instruction, size (0: no access) and
    /// whether it writes.
    off: i64,
    size: i64,
    write: bool,
    align16: bool,
    /// What the instruction adds to rsp; None when it writes rsp in a way
    /// the planner does not follow.
    delta: Option<i64>,
}

/// The stack access of `i` and its change to rsp, for stack groups:
/// PUSH/POP of a 64-bit register or immediate, CALL (direct or through a
/// register), RET, and `[rsp + disp]` operands of instructions the fast
/// memory path runs natively; the forms of [`base_step`] move rsp by a
/// known amount without an access. These are
/// exactly the forms whose translations honour [`Tx::member`]'s offset
/// (`stack_op` and `native_mem_fast`); any other form is None. `ga` is
/// `i`'s [`group_access`].
fn stack_access(
    i: &Instruction,
    ga: Option<&GroupAccess>,
    writes_rsp: bool,
) -> Option<StackAccess> {
    let acc = |off, size, write, delta| {
        Some(StackAccess {
            off,
            size,
            write,
            align16: false,
            delta: Some(delta),
        })
    };
    let rsp_op0 = i.op0_kind() == OpKind::Register && i.op0_register() == Register::RSP;
    match i.code() {
        Code::Push_r64 | Code::Pushq_imm32 | Code::Pushq_imm8 | Code::Call_rel32_64 => {
            acc(-8, 8, true, -8)
        }
        Code::Call_rm64 if i.op0_kind() == OpKind::Register => acc(-8, 8, true, -8),
        Code::Pop_r64 if !rsp_op0 => acc(0, 8, false, 8),
        Code::Retnq => acc(0, 8, false, 8),
        Code::Retnq_imm16 => acc(0, 8, false, 8 + i.immediate16() as i64),
        _ => match base_step(i, Register::RSP) {
            Some(d) => acc(0, 0, false, d),
            None => {
                let x = ga.filter(|x| x.base == Register::RSP)?;
                Some(StackAccess {
                    off: x.disp,
                    size: x.size,
                    write: x.write,
                    align16: x.align16,
                    delta: (!writes_rsp).then_some(0),
                })
            }
        },
    }
}

/// What `i` adds to the 64-bit register `r` when that is a known amount:
/// `add`/`sub r, imm`, `inc`/`dec r` and `lea r, [r + disp]`.
fn base_step(i: &Instruction, r: Register) -> Option<i64> {
    if i.op0_kind() != OpKind::Register || i.op0_register() != r {
        return None;
    }
    match i.code() {
        Code::Add_rm64_imm8 | Code::Add_rm64_imm32 | Code::Add_RAX_imm32 => {
            Some(i.immediate(1) as i64)
        }
        Code::Sub_rm64_imm8 | Code::Sub_rm64_imm32 | Code::Sub_RAX_imm32 => {
            Some((i.immediate(1) as i64).wrapping_neg())
        }
        Code::Inc_rm64 => Some(1),
        Code::Dec_rm64 => Some(-1),
        Code::Lea_r64_m
            if is64addr(i) && i.memory_base() == r && i.memory_index() == Register::None =>
        {
            Some(i.memory_displacement64() as i64)
        }
        _ => None,
    }
}

/// A value while [`plan_groups`] walks a block: `k` plus a sum of
/// symbols times coefficients (`terms`: sorted by symbol, none zero).
/// Symbols 0 to 15 are the GPRs' values at the block's start; later ones
/// are values the planner does not follow. Two addresses with the same
/// terms differ by the difference of their `k`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lin {
    terms: Terms,
    k: i64,
}

/// The longest sum a [`Lin`] keeps: longer ones become fresh values.
const LIN_TERMS: usize = 3;

/// A [`Lin`]'s terms, held inline (the planner makes a few per guest
/// instruction): room for the sum of two kept ones before it is cut.
#[derive(Clone, Copy, Debug)]
struct Terms {
    n: u8,
    t: [(u32, i64); 2 * LIN_TERMS],
}

impl Terms {
    const EMPTY: Terms = Terms {
        n: 0,
        t: [(0, 0); 2 * LIN_TERMS],
    };

    fn insert(&mut self, at: usize, v: (u32, i64)) {
        let n = self.n as usize;
        self.t.copy_within(at..n, at + 1);
        self.t[at] = v;
        self.n += 1;
    }

    fn remove(&mut self, at: usize) {
        let n = self.n as usize;
        self.t.copy_within(at + 1..n, at);
        self.n -= 1;
    }
}

impl std::ops::Deref for Terms {
    type Target = [(u32, i64)];
    fn deref(&self) -> &[(u32, i64)] {
        &self.t[..self.n as usize]
    }
}

impl std::ops::DerefMut for Terms {
    fn deref_mut(&mut self) -> &mut [(u32, i64)] {
        &mut self.t[..self.n as usize]
    }
}

impl PartialEq for Terms {
    fn eq(&self, o: &Terms) -> bool {
        self[..] == o[..]
    }
}

impl Eq for Terms {}

impl Lin {
    fn sym(s: u32) -> Lin {
        let mut terms = Terms::EMPTY;
        terms.insert(0, (s, 1));
        Lin { terms, k: 0 }
    }

    fn konst(k: i64) -> Lin {
        Lin {
            terms: Terms::EMPTY,
            k,
        }
    }

    /// `self + c * o` (wrapping, as the CPU adds), None when too long.
    fn plus(&self, o: &Lin, c: i64) -> Option<Lin> {
        let mut terms = self.terms;
        for &(s, a) in o.terms.iter() {
            let a = a.wrapping_mul(c);
            match terms.binary_search_by_key(&s, |t| t.0) {
                Ok(n) => {
                    terms[n].1 = terms[n].1.wrapping_add(a);
                    if terms[n].1 == 0 {
                        terms.remove(n);
                    }
                }
                Err(n) if a != 0 => terms.insert(n, (s, a)),
                Err(_) => {}
            }
        }
        let k = self.k.wrapping_add(o.k.wrapping_mul(c));
        (terms.len() <= LIN_TERMS).then_some(Lin { terms, k })
    }
}

/// The GPRs as [`Lin`]s, by guest index, while [`plan_groups`] walks a
/// block.
struct Regs {
    r: [Lin; 16],
    fresh: u32,
    /// Planning a loop counted in a 32-bit register (see [`Z32`]).
    z: Option<Z32>,
}

/// A loop whose back edge is `cmp r32, C` (C < 2^31) or `cmp r32, r32`
/// (the bound register left alone by the loop, and checked below 2^31
/// before the first pass) and JB or JBE, as compilers emit for an
/// unsigned 32-bit index (a sieve's inner loop, `i < n` with `i += step`):
/// while it is planned, 32-bit operations on its registers are followed
/// as if 64-bit, where that is exact. Symbol `ind` (the compared
/// register) is below 2^31 at the start of each pass: checked before the
/// first, and the bound keeps it there at the others. The other symbols
/// in `bounded` are below 2^[`Z32_SHIFT`] (checked before the first pass)
/// and the loop leaves them alone. A 32-bit result is followed only when
/// it is a sum of those, with coefficients 1 to 8 and a positive offset,
/// that cannot reach 2^32: then it equals its 64-bit sum (no wrap, and
/// the high halves are zero). The checks also bound a strided group's
/// step by a register (see [`Stride`]), which keeps its host address in
/// its page.
#[derive(Clone, Copy, Debug)]
struct Z32 {
    ind: u32,
    bounded: u16,
    /// Registers whose value is such a followed 32-bit result.
    zw: u16,
    /// Whether any 32-bit result was followed.
    used: bool,
}

/// The bound [`Z32`] checks on the symbols it adds to its sums besides
/// the induction, as a power of two: such sums can name a few of them and
/// stay below 2^32.
const Z32_SHIFT: u32 = 24;

/// Symbols [`Z32`] may follow: guest rcx, rsp and r15 do not live in
/// their own host registers in translated code, where the checks read
/// them.
fn z32_symbol(s: u32) -> bool {
    s < 16 && !matches!(s, 1 | 4 | 15)
}

impl Regs {
    fn new() -> Regs {
        Regs {
            r: std::array::from_fn(|s| Lin::sym(s as u32)),
            fresh: 16,
            z: None,
        }
    }

    /// The 32-bit operation `i` writing `d` (a GPR64), under [`Z32`]: the
    /// sum it leaves (zero-extended), when that is followed.
    fn step32(&mut self, i: &Instruction, d: Register) -> Option<Lin> {
        let z = self.z?;
        let reg = |n: u32| {
            (i.op_count() > n && i.op_kind(n) == OpKind::Register).then(|| i.op_register(n))
        };
        // A source is its own start value, a followed 32-bit result, or
        // nothing else: the low half of a 64-bit sum is not its value.
        let clean = |r: Register| -> Option<Lin> {
            let r = r.full_register();
            let s = gidx(r);
            let v = self.r[s];
            let own = v.terms[..] == [(s as u32, 1)] && v.k == 0;
            (r.is_gpr64() && (own || z.zw & 1 << s != 0)).then_some(v)
        };
        let dst = || clean(d);
        let src = || reg(1).filter(|r| r.is_gpr32()).and_then(clean);
        let imm = || Lin::konst(i.immediate(1) as u32 as i32 as i64);
        let v = match i.code() {
            Code::Mov_r32_rm32 | Code::Mov_rm32_r32 => src()?,
            Code::Mov_r32_imm32 => Lin::konst(i.immediate(1) as u32 as i64),
            Code::Add_r32_rm32 | Code::Add_rm32_r32 => dst()?.plus(&src()?, 1)?,
            Code::Add_rm32_imm8 | Code::Add_rm32_imm32 | Code::Add_EAX_imm32 => {
                dst()?.plus(&imm(), 1)?
            }
            Code::Inc_rm32 => dst()?.plus(&Lin::konst(1), 1)?,
            Code::Lea_r32_m if is64addr(i) => {
                let (b, x) = (i.memory_base(), i.memory_index());
                let ok = |r: Register| r == Register::None || clean(r).is_some();
                if !(ok(b) && ok(x)) || b == Register::RIP {
                    return None;
                }
                let disp = i.memory_displacement64() as i64;
                self.addr(b, x, i.memory_index_scale(), disp)?
            }
            _ => return None,
        };
        // Its largest value, from the symbols' bounds.
        let mut top = u128::try_from(v.k).ok()?;
        let mut bounded = z.bounded;
        for &(s, c) in v.terms.iter() {
            if !z32_symbol(s) || !(1..=8).contains(&c) {
                return None;
            }
            let shift = if s == z.ind { 31 } else { Z32_SHIFT };
            bounded |= 1 << s;
            top += (c as u128) << shift;
        }
        (top < 1 << 32).then(|| {
            self.z = Some(Z32 {
                bounded,
                used: true,
                ..z
            });
            v
        })
    }

    /// `base` (None: 0, RIP: `disp` is the address) plus `index` times
    /// `scale` plus `disp`.
    fn addr(&self, base: Register, index: Register, scale: u32, disp: i64) -> Option<Lin> {
        let b = match base {
            Register::None | Register::RIP => Lin::konst(0),
            b => self.r[gidx(b)],
        };
        let b = b.plus(&Lin::konst(disp), 1)?;
        match index {
            Register::None => Some(b),
            x => b.plus(&self.r[gidx(x)], scale as i64),
        }
    }

    /// How far GPR symbol `s` moved since the block's start, when it is its
    /// start value plus a constant (0: unchanged); None otherwise.
    fn moved(&self, s: u32) -> Option<i64> {
        let v = self.r.get(s as usize)?;
        (v.terms[..] == [(s, 1)]).then_some(v.k)
    }

    /// Every register gets a fresh value.
    fn forget(&mut self) {
        for r in self.r.iter_mut() {
            *r = Lin::sym(self.fresh);
            self.fresh += 1;
        }
    }

    /// After `i`, which writes the GPRs `written`: the destination of a
    /// register copy, a 64-bit LEA, ADD or SUB of a register, a shift
    /// left by a constant or a [`base_step`] gets its new sum; any other
    /// register written gets a fresh value.
    fn step(&mut self, i: &Instruction, written: &[Register]) {
        let reg = |n: u32| {
            (i.op_count() > n && i.op_kind(n) == OpKind::Register).then(|| i.op_register(n))
        };
        let new = reg(0).filter(|d| d.is_gpr64()).and_then(|d| {
            let v = &self.r[gidx(d)];
            let src = || reg(1).filter(|s| s.is_gpr64()).map(|s| &self.r[gidx(s)]);
            let nv = match i.code() {
                Code::Mov_r64_rm64 | Code::Mov_rm64_r64 => src().copied(),
                Code::Add_r64_rm64 | Code::Add_rm64_r64 => v.plus(src()?, 1),
                Code::Sub_r64_rm64 | Code::Sub_rm64_r64 => v.plus(src()?, -1),
                Code::Shl_rm64_imm8 => {
                    Lin::konst(0).plus(v, 1i64.wrapping_shl(i.immediate8() as u32 & 63))
                }
                Code::Shl_rm64_1 => v.plus(v, 1),
                Code::Lea_r64_m if is64addr(i) => self.addr(
                    i.memory_base(),
                    i.memory_index(),
                    i.memory_index_scale(),
                    i.memory_displacement64() as i64,
                ),
                _ => base_step(i, d).and_then(|s| v.plus(&Lin::konst(s), 1)),
            }?;
            Some((d, nv))
        });
        let new32 = reg(0)
            .filter(|d| d.is_gpr32())
            .map(|d| d.full_register())
            .and_then(|d| Some((d, self.step32(i, d)?)));
        for &w in written.iter().filter(|w| w.is_gpr64()) {
            self.r[gidx(w)] = Lin::sym(self.fresh);
            self.fresh += 1;
            if let Some(z) = self.z.as_mut() {
                z.zw &= !(1 << gidx(w));
            }
        }
        if let Some((d, v)) = new {
            self.r[gidx(d)] = v;
        }
        if let Some((d, v)) = new32 {
            self.r[gidx(d)] = v;
            if let Some(z) = self.z.as_mut() {
                z.zw |= 1 << gidx(d);
            }
        }
    }

    /// How GPR symbol `s` moved since the block's start when that is a
    /// sum of symbols the block leaves alone plus a constant (the block's
    /// registers at its back edge).
    fn movement(&self, s: u32) -> Option<Lin> {
        let v = self.r.get(s as usize)?;
        let d = v.plus(&Lin::sym(s), -1)?;
        let still = |&(t, _): &(u32, i64)| self.moved(t) == Some(0);
        d.terms.iter().all(still).then_some(d)
    }
}

impl Group {
    /// Can an access of `size` bytes at `disp` (16-byte aligned when
    /// `align16`) join?
    fn fits(&self, disp: i64, size: i64, align16: bool) -> bool {
        self.end.max(disp + size) - self.lo.min(disp) <= GROUP_SPAN
            && match (align16, self.align16) {
                (true, Some(d0)) => (disp - d0).rem_euclid(16) == 0,
                _ => true,
            }
    }

    fn join(&mut self, k: usize, disp: i64, size: i64, write: bool, align16: bool) {
        self.members.push(k);
        self.lo = self.lo.min(disp);
        self.end = self.end.max(disp + size);
        self.unit = self.unit.min(size);
        self.write |= write;
        if align16 && self.align16.is_none() {
            self.align16 = Some(disp);
        }
    }
}

/// Find the groups of `block` (two members or more) and give each a host
/// register from `free` (registers the block never names), reusing one
/// once its group has ended. Groups left without a register are dropped.
/// Besides the groups of one base (and index), one stack group at a time
/// covers the stack accesses of a run of instructions that move rsp by
/// known amounts (a prologue's pushes, an epilogue's pops and RET):
/// offsets from rsp as it was at the group's head. With `hoist_ok` (the
/// block loops on itself and counts at an instruction inside), groups
/// whose addresses stay the same from pass to pass are hoisted (see
/// [`Group::hoist`]), even with a single member.
///
/// A loop counted in a 32-bit register (see [`Z32`]) is planned with its
/// 32-bit sums followed where that hoists a group; the checks its entry
/// must then make come back with the groups: registers, each to be below
/// 2^shift.
fn plan_groups(
    block: &Block,
    info: &mut InstructionInfoFactory,
    sse: bool,
    fp: bool,
    free: &[Register],
    hoist_ok: bool,
) -> (Vec<Group>, Vec<(Register, u32)>) {
    let (plain, _) = plan_with(block, info, sse, fp, free, hoist_ok, None);
    if let Some((ind, limit)) = z32_loop(block).filter(|_| hoist_ok) {
        let (groups, lin) = plan_with(block, info, sse, fp, free, true, Some(ind));
        // Only where that hoists more: its checks may fail where the
        // other plan's would not.
        let hoisted = |v: &[Group]| v.iter().filter(|g| g.hoist).count();
        if let Some(z) = lin
            .z
            .filter(|z| z.used && hoisted(&groups) > hoisted(&plain))
        {
            let bounded = (0..16u32).filter(|&s| z.bounded & 1 << s != 0);
            let still = bounded.clone().all(|s| s == ind || lin.moved(s) == Some(0));
            let ind_ok = lin.moved(ind) == Some(0) || z.zw & 1 << ind != 0;
            // A register bound must stay the same too.
            let limit_ok = limit.is_none_or(|b| lin.moved(b) == Some(0));
            if still && ind_ok && limit_ok {
                let shift = |s: u32| if s == ind { 31 } else { Z32_SHIFT };
                let mut checks: Vec<(Register, u32)> =
                    bounded.map(|s| (GPR64[s as usize], shift(s))).collect();
                checks.extend(limit.map(|b| (GPR64[b as usize], 31)));
                return (groups, checks);
            }
        }
    }
    (plain, Vec::new())
}

/// The induction symbol of a loop counted in a 32-bit register (see
/// [`Z32`]), and the symbol of its bound when that is a register: its back
/// edge compares that register with a constant below 2^31 or with a
/// register (checked below 2^31 with the others, and left alone by the
/// loop), and loops while below (or equal).
fn z32_loop(block: &Block) -> Option<(u32, Option<u32>)> {
    let (c, j) = back_edge(block)?;
    let below = matches!(j.condition_code(), ConditionCode::b | ConditionCode::be);
    if !below || c.op0_kind() != OpKind::Register {
        return None;
    }
    let sym = |r: Register| gidx(r.full_register()) as u32;
    let s = sym(c.op0_register());
    let limit = match c.code() {
        Code::Cmp_rm32_imm8 | Code::Cmp_rm32_imm32 | Code::Cmp_EAX_imm32
            if (c.immediate(1) as u32) < 1 << 31 =>
        {
            None
        }
        Code::Cmp_rm32_r32 | Code::Cmp_r32_rm32 if c.op1_kind() == OpKind::Register => {
            let b = sym(c.op1_register());
            if !z32_symbol(b) || b == s {
                return None;
            }
            Some(b)
        }
        _ => return None,
    };
    z32_symbol(s).then_some((s, limit))
}

/// [`plan_groups`] for one way of following the registers: `z`, the
/// induction symbol of a [`Z32`] loop, or none.
fn plan_with(
    block: &Block,
    info: &mut InstructionInfoFactory,
    sse: bool,
    fp: bool,
    free: &[Register],
    hoist_ok: bool,
    z: Option<u32>,
) -> (Vec<Group>, Regs) {
    let mut done: Vec<Group> = Vec::new();
    let mut open: Vec<Group> = Vec::new();
    let mut stack: Option<Group> = None;
    let mut lin = Regs::new();
    lin.z = z.map(|ind| Z32 {
        ind,
        bounded: 0,
        zw: 0,
        used: false,
    });
    let mut helper_before_end = false;
    // rsp before this instruction minus rsp before the stack group's head.
    let mut delta = 0i64;
    for (k, dn) in block.insns.iter().enumerate() {
        let i = &dn.insn;
        let written: Vec<Register> = info
            .info(i)
            .used_registers()
            .iter()
            .filter(|u| crate::exec::is_write(u.access()))
            .map(|u| u.register().full_register())
            .collect();
        let ga = group_access(i, info, sse, fp);
        let st = stack_access(i, ga.as_ref(), written.contains(&Register::RSP));
        if let Some(x) = st.as_ref().filter(|x| x.size > 0) {
            let off = delta + x.off;
            match stack.as_mut() {
                Some(g) if g.fits(off, x.size, x.align16) => {
                    g.join(k, off, x.size, x.write, x.align16);
                    g.rel.push(off);
                }
                _ => {
                    done.extend(stack.take());
                    delta = 0;
                    stack = Some(Group {
                        members: vec![k],
                        base: Register::RSP,
                        index: Register::None,
                        scale: 1,
                        index2: Register::None,
                        scale2: 1,
                        lo: x.off,
                        end: x.off + x.size,
                        write: x.write,
                        align16: x.align16.then_some(x.off),
                        unit: x.size,
                        home: Home::Reg(Register::None),
                        rel: vec![x.off],
                        terms: Terms::EMPTY,
                        x0: 0,
                        hoist: false,
                        stride: None,
                    });
                }
            }
        }
        if let Some(x) = ga.filter(|x| x.base != Register::RSP) {
            // A RIP-relative operand's displacement is its address: its
            // group counts from the head's address.
            let (disp, size) = (if x.base == Register::RIP { 0 } else { x.disp }, x.size);
            // The address as a sum of the registers' values at the block's
            // start: accesses whose addresses differ by a constant share a
            // group, whichever registers name them.
            let addr = lin.addr(x.base, x.index, x.scale, x.disp);
            let pos = addr
                .as_ref()
                .and_then(|a| open.iter().position(|g| g.terms == a.terms));
            // The offset from the head's base plus scaled index.
            let off = match (pos, &addr) {
                (Some(p), Some(a)) => a.k.wrapping_sub(open[p].x0),
                _ => disp,
            };
            // (Sums wrap: an offset beyond a displacement's reach joins
            // nothing.)
            let near = i32::try_from(off).is_ok();
            let fits = pos.is_some_and(|p| near && open[p].fits(off, size, x.align16));
            if let (Some(p), true) = (pos, fits) {
                open[p].join(k, off, size, x.write, x.align16);
                open[p].rel.push(off);
            } else if let Some(a) = addr {
                if let Some(p) = pos {
                    done.push(open.swap_remove(p));
                }
                open.push(Group {
                    members: vec![k],
                    base: x.base,
                    index: x.index,
                    scale: x.scale,
                    index2: Register::None,
                    scale2: 1,
                    lo: disp,
                    end: disp + size,
                    write: x.write,
                    align16: x.align16.then_some(disp),
                    unit: size,
                    home: Home::Reg(Register::None),
                    rel: vec![disp],
                    x0: a.k.wrapping_sub(disp),
                    terms: a.terms,
                    hoist: false,
                    stride: None,
                });
            }
        }
        // Instructions that leave for a helper end every group (the plain
        // copy takes over after them anyway), and the planner forgets what
        // it knew of the registers; a write to rsp by an unknown amount
        // ends the stack group.
        // A side exit or a followed JMP leaves the group registers alone:
        // a taken exit reloads the parked registers anyway.
        let inline = native_ok(i, sse, fp)
            || matches!(
                i.mnemonic(),
                Mnemonic::Lea | Mnemonic::Nop | Mnemonic::Endbr64 | Mnemonic::Push | Mnemonic::Pop
            )
            || passes_through(block, k);
        if !inline {
            done.append(&mut open);
            done.extend(stack.take());
            if k + 1 < block.insns.len() {
                helper_before_end = true;
                lin.forget();
            } else {
                // The back edge of a loop: what it writes (LOOP: rcx).
                lin.step(i, &written);
            }
            continue;
        }
        match st.as_ref().map(|x| x.delta) {
            Some(Some(d)) => delta += d,
            Some(None) => done.extend(stack.take()),
            None if written.contains(&Register::RSP) => done.extend(stack.take()),
            None => {}
        }
        // Registers that change get their new sums (or fresh values):
        // groups stay open, their members are found by address.
        lin.step(i, &written);
    }
    done.append(&mut open);
    done.extend(stack);
    let hoist_ok = hoist_ok && !helper_before_end;
    let strided = counted(block, &lin);
    (
        place_groups(block, done, &lin, free, hoist_ok, strided),
        lin,
    )
}

/// The block's back edge is a loop's count: its last two instructions
/// compare a register the loop steps by a constant (`lin`: the registers
/// at the back edge) with a constant or a register it leaves alone, and
/// jump back to the start. Such loops tend to run many passes an entry;
/// a loop that stops on the data it reads (quicksort's scans) often runs
/// one or two, for which a strided group's setup costs more than it saves.
fn counted(block: &Block, lin: &Regs) -> bool {
    let Some((c, _)) = back_edge(block) else {
        return false;
    };
    let moved = |r: Register| lin.moved(gidx(r) as u32).filter(|_| r.is_gpr64());
    // (Under `Z32`, by a sum of registers the loop leaves alone.)
    let stepped = |r: Register| {
        let s = gidx(r) as u32;
        moved(r).is_some_and(|k| k != 0)
            || lin.z.is_some_and(|z| z.ind == s)
                && lin
                    .movement(s)
                    .is_some_and(|d| !d.terms.is_empty() || d.k != 0)
    };
    let still = |r: Register| moved(r) == Some(0);
    let ops = match c.code() {
        Code::Cmp_rm64_imm8 | Code::Cmp_rm64_imm32 if c.op0_kind() == OpKind::Register => {
            Some((c.op0_register(), None))
        }
        // (A 32-bit compare of registers the loop steps as 64-bit ones
        // counts just the same.)
        Code::Cmp_rm32_imm8 | Code::Cmp_rm32_imm32 | Code::Cmp_EAX_imm32
            if c.op0_kind() == OpKind::Register =>
        {
            Some((c.op0_register().full_register(), None))
        }
        Code::Cmp_rm64_r64 | Code::Cmp_r64_rm64
            if c.op0_kind() == OpKind::Register && c.op1_kind() == OpKind::Register =>
        {
            Some((c.op0_register(), Some(c.op1_register())))
        }
        Code::Cmp_rm32_r32 | Code::Cmp_r32_rm32
            if c.op0_kind() == OpKind::Register && c.op1_kind() == OpKind::Register =>
        {
            let full = |r: Register| r.full_register();
            Some((full(c.op0_register()), Some(full(c.op1_register()))))
        }
        _ => None,
    };
    let Some((a, b)) = ops else {
        return false;
    };
    let other_still = |o: Option<Register>| o.is_none_or(still);
    stepped(a) && other_still(b) || b.is_some_and(stepped) && still(a)
}

/// The block's last two instructions when the last is a conditional
/// branch back to its start (and the one before, the loop's compare).
fn back_edge(block: &Block) -> Option<(&Instruction, &Instruction)> {
    let [.., c, j] = &block.insns[..] else {
        return None;
    };
    let (c, j) = (&c.insn, &j.insn);
    (j.flow_control() == FlowControl::ConditionalBranch
        && direct_target(j) == Some(block.insns[0].insn.ip()))
    .then_some((c, j))
}

/// The rest of [`plan_groups`] for the groups `done` it found: hoist
/// those that may be (strided ones only with `strided`), drop the ones
/// that do not pay, and give each a register or a spill slot.
fn place_groups(
    block: &Block,
    mut done: Vec<Group>,
    lin: &Regs,
    free: &[Register],
    hoist_ok: bool,
    strided: bool,
) -> Vec<Group> {
    if hoist_ok {
        for g in done.iter_mut() {
            hoist(g, lin, strided);
        }
    }
    // A group of one access pays when its check is hoisted.
    done.retain(|g| g.members.len() >= 2 || g.hoist);
    // Where every member's offset is its own displacement, members keep
    // their operands as they are.
    let keep = |g: &&mut Group| g.base != Register::RSP && g.base != Register::RIP;
    for g in done.iter_mut().filter(keep) {
        let own =
            |(&m, &r): (&usize, &i64)| block.insns[m].insn.memory_displacement64() as i64 == r;
        if g.members.iter().zip(g.rel.iter()).all(own) {
            g.rel.clear();
        }
    }
    // Interval colouring, first free register; hoisted groups first, live
    // through the whole block.
    done.sort_by_key(|g| (!g.hoist, g.head()));
    // Groups left without a register get a spill slot the same way.
    let mut busy_until: Vec<Option<usize>> = vec![None; free.len()];
    let mut slot_until: Vec<Option<usize>> = vec![None; GROUP_SLOTS];
    done.retain_mut(|g| {
        let (from, to) = match g.hoist {
            true => (0, usize::MAX),
            false => (g.head(), g.last()),
        };
        let first_free =
            |busy: &[Option<usize>]| busy.iter().position(|b| b.is_none_or(|last| last < from));
        if let Some(st) = g.stride.as_mut() {
            // A register its back edge steps, and a slot for its limit.
            let (Some(r), Some(k)) = (first_free(&busy_until), first_free(&slot_until)) else {
                return false;
            };
            busy_until[r] = Some(to);
            slot_until[k] = Some(to);
            g.home = Home::Reg(free[r]);
            st.limit = SP_GROUP0 + k;
        } else if let Some(r) = first_free(&busy_until) {
            busy_until[r] = Some(to);
            g.home = Home::Reg(free[r]);
        } else if let Some(k) = first_free(&slot_until) {
            slot_until[k] = Some(to);
            g.home = Home::Slot(SP_GROUP0 + k);
        } else {
            return false;
        }
        true
    });
    done.sort_by_key(|g| g.head());
    done
}

/// Store strided group `g`'s limit (see [`Stride`]): with its register
/// `r` just set for this pass, the last value of `r` (moving up; the
/// first, moving down) from which the next pass's range still lies in
/// the same page. Flag-free (a failed check before it goes on in the plain
/// copy with the guest flags), through `t`.
fn stride_limit(
    x: &mut CodeAssembler,
    g: &Group,
    st: Stride,
    r: Register,
    (t, t2): (Register, Register),
) -> R<()> {
    let (r, t, t2) = (r64(r), r64(t), r64(t2));
    let page = m(o_ctx!(m_page));
    x.lea(t, qword_ptr(r + g.lo as i32))?;
    x.pext(t, t, page)?;
    x.pdep(t, t, page)?;
    // Checked before the register moves on: the limit for it before.
    let off = if st.step > 0 || st.by != Register::None {
        0x1000 - g.end
    } else {
        -g.lo
    } - st.step as i64;
    x.lea(t, qword_ptr(t + off as i32))?;
    if st.by != Register::None {
        // Minus the register's part (NOT: -x - 1).
        x.lea(t2, qword_ptr(r64(st.by) * st.by_scale))?;
        x.not(t2)?;
        x.lea(t, qword_ptr(t + t2 + 1))?;
    }
    x.mov(m(o_spill(st.limit)), t)
}

/// Fold strided group `g`'s limit into `lead`'s (both just stored by
/// [`stride_limit`], with their registers set for the same pass; both move
/// by the same step): the value of `lead`'s register up to which (moving
/// up; down to which, moving down) both groups stay in their pages is the
/// smaller (larger) of its own limit and `g`'s moved by the registers'
/// difference. Flag-free (SARX spreads a sign, PDEP masks with it),
/// through the three registers `t`.
fn merge_limit(
    x: &mut CodeAssembler,
    lead: (Register, Stride),
    g: (Register, Stride),
    t: (Register, Register, Register),
) -> R<()> {
    let ((l, lst), (r, gst)) = ((r64(lead.0), lead.1), (r64(g.0), g.1));
    let (t1, t2, t3) = (r64(t.0), r64(t.1), r64(t.2));
    // v = g's limit - g's register + lead's register (NOT: -x - 1).
    x.mov(t2, r)?;
    x.not(t2)?;
    x.mov(t1, m(o_spill(gst.limit)))?;
    x.lea(t1, qword_ptr(t1 + t2 + 1))?;
    x.lea(t1, qword_ptr(t1 + l))?;
    // d = v - lead's limit; then min(d, 0), or max(d, 0) moving down.
    x.mov(t3, m(o_spill(lst.limit)))?;
    x.not(t3)?;
    x.lea(t2, qword_ptr(t1 + t3 + 1))?;
    x.mov(t3, 63u64)?;
    x.sarx(t3, t2, t3)?;
    x.pdep(t3, t2, t3)?;
    if lst.step < 0 {
        x.not(t3)?;
        x.lea(t3, qword_ptr(t2 + t3 + 1))?;
    }
    x.mov(t2, m(o_spill(lst.limit)))?;
    x.lea(t2, qword_ptr(t2 + t3))?;
    x.mov(m(o_spill(lst.limit)), t2)
}

/// Make `g` a hoisted group (see [`Group::hoist`]) when its address is the
/// same in every pass of a block that loops on itself: RIP-relative, or
/// a sum of at most two registers (the second scaled by 1, 2, 4 or 8,
/// neither rsp nor r15) that `lin`, the registers at the back edge, shows
/// unchanged; with `strided`, also when they move by constants that move
/// the address by at most 2 KiB a pass (see [`Stride`]). Its base and
/// index become those registers and its offsets count from their sum.
fn hoist(g: &mut Group, lin: &Regs, strided: bool) {
    if g.base == Register::RSP {
        return;
    }
    if g.base == Register::RIP {
        g.hoist = true;
        return;
    }
    let named = g.terms.iter().all(|&(s, _)| {
        let r = GPR64.get(s as usize).copied();
        r.is_some_and(|r| r != Register::RSP && r != Register::R15)
    });
    if !named {
        return;
    }
    // Each register that moves from pass to pass moves by a constant
    // (under `Z32`, plus a multiple of a register checked at entry).
    let (mut step, mut moved) = (Lin::konst(0), false);
    for &(s, c) in g.terms.iter() {
        let Some(d) = lin.movement(s) else {
            return;
        };
        moved |= d != Lin::konst(0);
        let Some(sum) = step.plus(&d, c) else {
            return;
        };
        step = sum;
    }
    let bounded = |r: u32| lin.z.is_some_and(|z| z.bounded & 1 << r != 0 && z.ind != r);
    let (by, by_scale) = match step.terms[..] {
        [] => (Register::None, 1),
        [(r, c)] if bounded(r) && matches!(c, 1 | 2 | 4 | 8) && step.k >= 0 => {
            (GPR64[r as usize], c as u32)
        }
        _ => return,
    };
    let k = step.k;
    let stride = match k {
        0 if !moved => None,
        _ if !strided => return,
        // Aligned members stay aligned only if the step keeps them.
        _ if g.align16.is_some() && (k % 16 != 0 || by != Register::None) => return,
        -2048..=2048 if k != 0 || by != Register::None => Some(Stride {
            step: k as i32,
            by,
            by_scale,
            limit: 0,
        }),
        _ => return,
    };
    let reg = |s: u32| GPR64[s as usize];
    let scaled = |c: i64| matches!(c, 1 | 2 | 4 | 8);
    // The base is a register counted once; the others are scaled.
    let form = g.terms.iter().position(|&(_, c)| c == 1).and_then(|b| {
        let (base, mut rest) = (reg(g.terms[b].0), g.terms.iter().enumerate());
        let mut next = || rest.find(|&(n, _)| n != b).map(|(_, &t)| t);
        let (x, y) = (next(), next());
        let one = |t: Option<(u32, i64)>| match t {
            None => Some((Register::None, 1)),
            Some((s, c)) if scaled(c) => Some((reg(s), c as u32)),
            _ => None,
        };
        let ((index, scale), (index2, scale2)) = (one(x)?, one(y)?);
        Some((base, index, scale, index2, scale2))
    });
    let Some((base, index, scale, index2, scale2)) = form else {
        return;
    };
    let x0 = g.x0;
    let fits = |v: i64| v.checked_add(x0).is_some_and(|v| i32::try_from(v).is_ok());
    if !(fits(g.lo) && fits(g.end) && g.rel.iter().all(|&r| fits(r))) {
        return;
    }
    g.lo += x0;
    g.end += x0;
    g.align16 = g.align16.map(|d| d + x0);
    for r in g.rel.iter_mut() {
        *r += x0;
    }
    (g.base, g.index, g.scale, g.x0, g.hoist) = (base, index, scale, 0, true);
    (g.index2, g.scale2) = (index2, scale2);
    g.stride = stride;
}

/// Instruction `k` of `block` is a branch the block goes on past: a side
/// exit (a Jcc, see [`crate::exec::side_exit`]) or a direct JMP the
/// decoder followed. Its translation is a host Jcc to cold code, or
/// nothing.
fn passes_through(block: &Block, k: usize) -> bool {
    let i = &block.insns[k].insn;
    let Some(next) = block.insns.get(k + 1) else {
        return false;
    };
    match i.flow_control() {
        FlowControl::ConditionalBranch => crate::exec::side_exit(i),
        FlowControl::UnconditionalBranch => {
            i.op_count() == 1
                && i.op0_kind() == OpKind::NearBranch64
                && next.insn.ip() == i.near_branch_target()
        }
        _ => false,
    }
}

/// The GPRs `block` names, explicitly or implicitly, by guest index.
fn named_gprs(block: &Block, info: &mut InstructionInfoFactory) -> [bool; 16] {
    let mut used = [false; 16];
    for dn in block.insns.iter() {
        for u in info.info(&dn.insn).used_registers() {
            let r = u.register();
            if r.is_gpr() {
                used[gidx(r.full_register())] = true;
            }
        }
    }
    used
}

/// Registers `block` never names (so free for the whole block), in
/// [`POOL`] order then rax, leaving out `taken`.
fn unnamed(block: &Block, info: &mut InstructionInfoFactory, taken: &[Register]) -> Vec<Register> {
    let used = named_gprs(block, info);
    POOL.iter()
        .copied()
        .chain([Register::RAX])
        .filter(|&r| !used[gidx(r)] && !taken.contains(&r))
        .collect()
}

/// The block has a direct jump (from its instruction `from` on) back to
/// its own code or before it: every cycle of chained code has such a jump,
/// so it checks the budget at the jump, or once per pass at
/// [`Tx::body_check`].
fn has_back_edge(block: &Block, from: usize) -> bool {
    block.insns[from..]
        .iter()
        .any(|dn| direct_target(&dn.insn).is_some_and(|t| t <= dn.insn.ip()))
}

/// The index of the first instruction of `block` before which the guest
/// arithmetic flags are dead: it overwrites all six without reading any,
/// and cannot fault or leave translated code before doing so (a fault
/// would show the guest the flags from before it). Every pass through the
/// block that reaches its end passes there, so the instruction count can
/// be a flag-clobbering ADD at that point.
fn flags_dead_before(block: &Block) -> Option<usize> {
    use iced_x86::RflagsBits as F;
    const ARITH: u32 = F::OF | F::SF | F::ZF | F::AF | F::CF | F::PF;
    block.insns.iter().position(|dn| {
        let i = &dn.insn;
        matches!(
            i.mnemonic(),
            Mnemonic::Add
                | Mnemonic::Sub
                | Mnemonic::Cmp
                | Mnemonic::Test
                | Mnemonic::And
                | Mnemonic::Or
                | Mnemonic::Xor
                | Mnemonic::Neg
        ) && (0..i.op_count()).all(|n| i.op_kind(n) != OpKind::Memory)
            && i.rflags_read() & ARITH == 0
            && i.rflags_modified() & ARITH == ARITH
    })
}

enum ExitTarget {
    Imm(u64),
    /// Target already stored in cpu.s.rip.
    Stored,
}

/// Runs as itself (given its operands fit): a whitelisted integer
/// instruction, or an SSE one while SSE (and, for floating point, the
/// MXCSR) allows.
fn native_ok(i: &Instruction, sse: bool, fp: bool) -> bool {
    whitelisted(i) || sse && (sse_whitelisted(i) || fp && sse_fp_whitelisted(i))
}

/// Integer instructions that behave identically when executed by the host
/// with the guest's operands (and cannot fault on register operands).
fn whitelisted(i: &Instruction) -> bool {
    use Mnemonic::*;
    matches!(
        i.mnemonic(),
        Add | Or
            | Adc
            | Sbb
            | And
            | Sub
            | Xor
            | Cmp
            | Test
            | Inc
            | Dec
            | Neg
            | Not
            | Mov
            | Movzx
            | Movsx
            | Movsxd
            | Xchg
            | Shl
            | Sal
            | Shr
            | Sar
            | Rol
            | Ror
            | Rcl
            | Rcr
            | Shld
            | Shrd
            | Imul
            | Mul
            | Bt
            | Bts
            | Btr
            | Btc
            | Bsf
            | Bsr
            | Bswap
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
            | Cbw
            | Cwde
            | Cdqe
            | Cwd
            | Cdq
            | Cqo
            | Nop
            | Popcnt
            | Xadd
            | Cmpxchg
            | Cmpxchg8b
            | Clc
            | Stc
            | Cmc
            | Movbe
            | Pause
            | Endbr64
            | Lfence
            | Mfence
            | Sfence
            | Cmpxchg16b
    ) || matches!(i.mnemonic(), Tzcnt | Lzcnt) && host_lzcnt_tzcnt()
}

/// The host runs TZCNT/LZCNT as such (not as BSF/BSR): the interpreter
/// gives them their BMI1/ABM meaning too.
fn host_lzcnt_tzcnt() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("bmi1") && is_x86_feature_detected!("lzcnt"))
}

/// Legacy (not VEX) encoding with only XMM and general registers.
fn legacy_xmm_gpr(i: &Instruction) -> bool {
    i.encoding() == iced_x86::EncodingKind::Legacy
        && (0..i.op_count()).all(|n| {
            i.op_kind(n) != OpKind::Register || {
                let r = i.op_register(n);
                r.is_xmm() || r.is_gpr()
            }
        })
}

/// Legacy-encoded SSE instructions that neither depend on MXCSR nor raise
/// SIMD floating-point exceptions: moves, logic, shuffles, packed integer.
fn sse_whitelisted(i: &Instruction) -> bool {
    use Mnemonic::*;
    legacy_xmm_gpr(i)
        && (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).is_xmm())
        && matches!(
            i.mnemonic(),
            Movd | Movq
                | Movdqa
                | Movdqu
                | Movaps
                | Movups
                | Movapd
                | Movupd
                | Movss
                | Movsd
                | Movlps
                | Movhps
                | Movlpd
                | Movhpd
                | Movlhps
                | Movhlps
                | Pxor
                | Por
                | Pand
                | Pandn
                | Xorps
                | Xorpd
                | Andps
                | Andpd
                | Andnps
                | Andnpd
                | Orps
                | Orpd
                | Paddb
                | Paddw
                | Paddd
                | Paddq
                | Psubb
                | Psubw
                | Psubd
                | Psubq
                | Paddsb
                | Paddsw
                | Paddusb
                | Paddusw
                | Psubsb
                | Psubsw
                | Psubusb
                | Psubusw
                | Pmullw
                | Pmulhw
                | Pmulhuw
                | Pmuludq
                | Pmaddwd
                | Pavgb
                | Pavgw
                | Pminub
                | Pmaxub
                | Pminsw
                | Pmaxsw
                | Psadbw
                | Pcmpeqb
                | Pcmpeqw
                | Pcmpeqd
                | Pcmpgtb
                | Pcmpgtw
                | Pcmpgtd
                | Pmovmskb
                | Movmskps
                | Movmskpd
                | Psllw
                | Pslld
                | Psllq
                | Psrlw
                | Psrld
                | Psrlq
                | Psraw
                | Psrad
                | Pslldq
                | Psrldq
                | Punpcklbw
                | Punpcklwd
                | Punpckldq
                | Punpcklqdq
                | Punpckhbw
                | Punpckhwd
                | Punpckhdq
                | Punpckhqdq
                | Packsswb
                | Packssdw
                | Packuswb
                | Pshufd
                | Pshuflw
                | Pshufhw
                | Shufps
                | Shufpd
                | Unpcklps
                | Unpckhps
                | Unpcklpd
                | Unpckhpd
                | Pextrw
                | Pinsrw
                | Pshufb
                | Palignr
                | Pabsb
                | Pabsw
                | Pabsd
                | Pminsd
                | Pminud
                | Pmaxsd
                | Pmaxud
                | Pminsb
                | Pmaxsb
                | Pminuw
                | Pmaxuw
                | Pmulld
                | Pmuldq
                | Pcmpeqq
                | Pcmpgtq
                | Pextrb
                | Pextrd
                | Pextrq
                | Pinsrb
                | Pinsrd
                | Pinsrq
                | Pmovzxbw
                | Pmovzxbd
                | Pmovzxbq
                | Pmovzxwd
                | Pmovzxwq
                | Pmovzxdq
                | Pmovsxbw
                | Pmovsxbd
                | Pmovsxbq
                | Pmovsxwd
                | Pmovsxwq
                | Pmovsxdq
                | Ptest
                | Packusdw
        )
}

/// Legacy SSE floating-point instructions: native only while the guest
/// MXCSR masks every exception (see `Tx::fp`).
fn sse_fp_whitelisted(i: &Instruction) -> bool {
    use Mnemonic::*;
    legacy_xmm_gpr(i)
        && matches!(
            i.mnemonic(),
            Addss
                | Addsd
                | Addps
                | Addpd
                | Subss
                | Subsd
                | Subps
                | Subpd
                | Mulss
                | Mulsd
                | Mulps
                | Mulpd
                | Divss
                | Divsd
                | Divps
                | Divpd
                | Sqrtss
                | Sqrtsd
                | Sqrtps
                | Sqrtpd
                | Minss
                | Minsd
                | Minps
                | Minpd
                | Maxss
                | Maxsd
                | Maxps
                | Maxpd
                | Cmpss
                | Cmpsd
                | Cmpps
                | Cmppd
                | Comiss
                | Comisd
                | Ucomiss
                | Ucomisd
                | Cvtsi2sd
                | Cvtsi2ss
                | Cvtsd2ss
                | Cvtss2sd
                | Cvttsd2si
                | Cvtsd2si
                | Cvttss2si
                | Cvtss2si
                | Cvtdq2pd
                | Cvtdq2ps
                | Cvtps2pd
                | Cvtpd2ps
                | Cvttps2dq
                | Cvtps2dq
                | Cvttpd2dq
                | Cvtpd2dq
                | Roundss
                | Roundsd
                | Roundps
                | Roundpd
                | Haddpd
                | Haddps
                | Hsubpd
                | Hsubps
                | Addsubpd
                | Addsubps
                | Dpps
                | Dppd
        )
}

impl Tx<'_> {
    fn used_full_regs(&mut self, i: &Instruction) -> Vec<Register> {
        let info = self.info.info(i);
        let mut v: Vec<Register> = info
            .used_registers()
            .iter()
            .map(|u| u.register().full_register())
            .filter(|r| r.is_gpr64())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn pick(&self, avoid: &[Register], n: usize) -> Option<Vec<Register>> {
        let v: Vec<Register> = POOL
            .iter()
            .copied()
            .filter(|r| !avoid.contains(r))
            .take(n)
            .collect();
        (v.len() == n).then_some(v)
    }

    /// Translate one instruction; returns true when it ended the block.
    fn insn(&mut self, dn: &DInsn) -> R<bool> {
        let i = &dn.insn;
        self.cur_rip = i.ip();
        self.cur_lookups = 0;
        if !self.lazy_rcx_ok(i) && !self.branch_keeps_rcx(i) {
            self.sync_rcx()?;
        }
        // Control flow.
        match i.flow_control() {
            FlowControl::Next => {}
            FlowControl::UnconditionalBranch
                if matches!(i.op0_kind(), OpKind::NearBranch64) && i.op_count() == 1 =>
            {
                self.native += 1;
                let next = self.block.insns.get(self.cur_k + 1);
                if next.is_some_and(|n| n.insn.ip() == i.near_branch_target()) {
                    // Followed by the decoder: the target comes next.
                    return Ok(false);
                }
                self.exit_direct(i.near_branch_target())?;
                return Ok(true);
            }
            // The forms a decoded block may go on past (its side exits).
            FlowControl::ConditionalBranch if crate::exec::side_exit(i) => {
                self.native += 1;
                if let Some(next) = self.block.insns.get(self.cur_k + 1) {
                    // A side exit: the block goes on when not taken, or,
                    // in a trace that follows the branch (see
                    // `Cpu::jit_trace`), when taken.
                    let (cc, exit) = match followed_taken(i, &next.insn) {
                        false => (i.condition_code(), i.near_branch_target()),
                        true => {
                            let mut n = *i;
                            n.negate_condition_code();
                            (n.condition_code(), i.next_ip())
                        }
                    };
                    let taken = self.a.create_label();
                    jcc(&mut self.a, cc, taken)?;
                    self.side_exits
                        .push((taken, self.cur_k, exit, self.rcx_out));
                    return Ok(false);
                }
                let start = self.block.insns[0].insn.ip();
                if let (Some(l), Some(_)) = (self.l_count, self.checked()) {
                    if i.near_branch_target() == start {
                        // A loop on itself that checks in its body.
                        self.stride_on()?;
                        if self.head_out {
                            // Guest rcx goes round in the keeper.
                            self.save_rcx(SP_RCX)?;
                            self.rcx_out = true;
                        }
                        jcc(&mut self.a, i.condition_code(), l)?;
                        self.exit_direct(i.next_ip())?;
                        return Ok(true);
                    }
                }
                let mut taken = self.a.create_label();
                jcc(&mut self.a, i.condition_code(), taken)?;
                self.exit_direct(i.next_ip())?;
                self.a.set_label(&mut taken)?;
                self.exit_direct(i.near_branch_target())?;
                return Ok(true);
            }
            FlowControl::Call if i.code() == Code::Call_rel32_64 => {
                self.native += 1;
                self.push(dn, PushSrc::Imm(i.next_ip()))?;
                self.exit_direct(i.near_branch_target())?;
                return Ok(true);
            }
            FlowControl::Return if matches!(i.code(), Code::Retnq | Code::Retnq_imm16) => {
                self.native += 1;
                let extra = if i.code() == Code::Retnq_imm16 {
                    i.immediate16() as i32
                } else {
                    0
                };
                self.ret(dn, extra)?;
                return Ok(true);
            }
            FlowControl::IndirectBranch | FlowControl::IndirectCall
                if matches!(i.code(), Code::Jmp_rm64 | Code::Call_rm64)
                    && i.op0_kind() == OpKind::Register =>
            {
                self.native += 1;
                // The target register is read before a CALL's push.
                let t = i.op0_register();
                if t == Register::RSP || t == Register::R15 {
                    self.a.mov(m(o_spill(SP_RAX)), rax)?;
                    self.a.mov(rax, m(o_gpr(gidx(t))))?;
                    self.a.mov(m(o_rip()), rax)?;
                    self.a.mov(rax, m(o_spill(SP_RAX)))?;
                } else {
                    self.a.mov(m(o_rip()), r64(t))?;
                }
                if i.code() == Code::Call_rm64 {
                    self.push(dn, PushSrc::Imm(i.next_ip()))?;
                }
                self.note_branch(i.ip())?;
                self.exit_to(ExitTarget::Stored, None)?;
                return Ok(true);
            }
            FlowControl::IndirectBranch | FlowControl::IndirectCall
                if matches!(i.code(), Code::Jmp_rm64 | Code::Call_rm64)
                    && i.op0_kind() == OpKind::Memory
                    && self.indirect_mem(dn)? =>
            {
                self.native += 1;
                return Ok(true);
            }
            _ => {
                self.helper_insn(dn)?;
                self.exit_direct(i.next_ip())?;
                return Ok(true);
            }
        }
        if self.system_inline(dn)? {
            self.native += 1;
            return Ok(false);
        }
        if crate::exec::refetch_only(i) {
            // INVLPG's helper drops the TLB entry and does not leave (see
            // `jit_helper`); SERIALIZE has nothing to wait for. The next
            // instruction is fetched anew: a guard or the jump cache
            // checks its mapping, its full entry its page (the same-page
            // chain would skip that). In a boot: 70 K INVLPG (the kernel's
            // text patching maps and unmaps a page), 100 K SERIALIZE
            // (Linux's sync_core(), an IRET to itself without it).
            if i.mnemonic() == Mnemonic::Serialize {
                self.native += 1;
            } else {
                self.helper_insn(dn)?;
            }
            self.exit_far(i.next_ip())?;
            return Ok(true);
        }
        if crate::exec::ends_block(i) {
            self.helper_insn(dn)?;
            self.exit_direct(i.next_ip())?;
            return Ok(true);
        }
        match i.code() {
            Code::Push_r64 => {
                self.native += 1;
                self.push(dn, PushSrc::Reg(i.op0_register()))?;
                return Ok(false);
            }
            Code::Pushq_imm32 | Code::Pushq_imm8 => {
                self.native += 1;
                self.push(dn, PushSrc::Imm(i.immediate(0)))?;
                return Ok(false);
            }
            Code::Pop_r64 => {
                self.native += 1;
                self.pop(dn, i.op0_register())?;
                return Ok(false);
            }
            Code::Push_rm64 if i.op0_kind() == OpKind::Memory && self.push_mem(dn)? => {
                self.native += 1;
                return Ok(false);
            }
            _ => {}
        }
        if i.mnemonic() == Mnemonic::Lea && self.lea(i)? {
            self.native += 1;
            return Ok(false);
        }
        if hint_only(i) {
            self.native += 1;
            return Ok(false);
        }
        if native_ok(i, self.sse, self.fp) && self.native_insn(dn)? {
            self.native += 1;
            return Ok(false);
        }
        self.sync_rcx()?;
        self.helper_insn(dn)?;
        Ok(false)
    }

    /// The keeper while it holds guest rcx (`rcx_out`).
    fn rcx_in(&self) -> Option<Register> {
        self.keeper.filter(|_| self.rcx_out)
    }

    /// Put guest rcx back in rcx if a lookup left it in the keeper.
    fn sync_rcx(&mut self) -> R<()> {
        if self.rcx_out {
            self.restore_rcx(SP_RCX)?;
        }
        Ok(())
    }

    /// May `i` be translated with guest rcx still in the keeper? Only
    /// instructions run as themselves that name no rcx (explicitly or
    /// implicitly) but perhaps in their address: register forms, and the
    /// fast memory path, whose lookup then needs no save and computes the
    /// address from the keeper (`ea_fast`); any other path they fall back
    /// to restores rcx first (`sync_rcx`).
    fn lazy_rcx_ok(&mut self, i: &Instruction) -> bool {
        self.rcx_ren = false;
        if !self.rcx_out {
            return false;
        }
        match self.rcx_form(i) {
            Some(ren) => {
                self.rcx_ren = ren;
                true
            }
            None => false,
        }
    }

    /// Can `i` run with guest rcx in the keeper (see [`Tx::lazy_rcx_ok`])?
    /// Some(true) when its host form names the keeper instead of rcx
    /// ([`Tx::host_form`]), Some(false) when it does not name rcx (but
    /// perhaps in its address), None when it needs guest rcx in rcx.
    fn rcx_form(&mut self, i: &Instruction) -> Option<bool> {
        if hint_only(i) {
            // Translated to nothing.
            return Some(false);
        }
        let lea = i.mnemonic() == Mnemonic::Lea;
        if !((native_ok(i, self.sse, self.fp) || lea)
            && (is64addr(i) || (0..i.op_count()).all(|n| i.op_kind(n) != OpKind::Memory)))
        {
            return None;
        }
        // An access's address may name rcx: its lookup takes it from the
        // keeper (`ea_fast`). A LEA's is renamed with its operands.
        let mut ni = *i;
        if !lea {
            if ni.memory_base() == Register::RCX {
                ni.set_memory_base(Register::RAX);
            }
            if ni.memory_index() == Register::RCX {
                ni.set_memory_index(Register::RAX);
            }
        }
        if !self.used_full_regs(&ni).contains(&Register::RCX) {
            return Some(false);
        }
        // Instructions naming rcx name the keeper instead, in the forms
        // that go through `native_insn` or `lea` (PUSH and POP have their
        // own paths; BT with a memory operand reads its bit offset).
        let plain = i.flow_control() == FlowControl::Next
            && !matches!(i.code(), Code::Push_r64 | Code::Pop_r64 | Code::Push_rm64)
            && !matches!(
                i.mnemonic(),
                Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
            );
        let ni = rcx_renamed(&ni, self.keeper.filter(|_| plain)?)?;
        (!self.used_full_regs(&ni).contains(&Register::RCX) && encodable(&ni)).then_some(true)
    }

    /// Does every instruction of the block run with guest rcx in the
    /// keeper: instructions [`Tx::rcx_form`] allows, NOPs, branches that
    /// keep it there ([`Tx::branch_keeps_rcx`], and the back edge)? A
    /// loop whose head expects it there ([`Tx::head_out`]) would
    /// otherwise put it back and set it aside again every pass.
    fn rcx_stays_out(&mut self) -> bool {
        let block = self.block;
        block.insns.iter().enumerate().all(|(k, d)| {
            let i = &d.insn;
            match i.flow_control() {
                FlowControl::ConditionalBranch => crate::exec::side_exit(i),
                FlowControl::UnconditionalBranch => passes_through(block, k),
                _ => self.rcx_form(i).is_some(),
            }
        })
    }

    /// May branch `i` be taken with guest rcx still in the keeper? Side
    /// exits (their out-of-line exits put it back), and the back edge of
    /// a loop whose head expects it there ([`Tx::head_out`]).
    fn branch_keeps_rcx(&self, i: &Instruction) -> bool {
        // A side exit, or a JMP the decoder followed (nothing emitted).
        let back_edge = || {
            self.head_out
                && self.l_count.is_some()
                && self.checked().is_some()
                && i.flow_control() == FlowControl::ConditionalBranch
                && crate::exec::side_exit(i)
                && i.near_branch_target() == self.block.insns[0].insn.ip()
        };
        self.rcx_out && (passes_through(self.block, self.cur_k) || back_edge())
    }

    /// The instruction to emit for guest instruction `i`: with
    /// [`Tx::rcx_ren`], its explicit rcx operands (and a LEA's rcx
    /// address registers) renamed to the keeper, which holds guest rcx.
    fn host_form(&self, i: &Instruction) -> Instruction {
        let k = self.keeper.filter(|_| self.rcx_ren && self.rcx_out);
        k.and_then(|k| rcx_renamed(i, k)).unwrap_or(*i)
    }

    /// Call the helper for instruction `k` of the block (`dn`).
    fn call_helper(&mut self, dn: *const DInsn, k: usize) -> R<()> {
        self.count_sync()?;
        // If the helper leaves, the count must cover instructions up to k
        // (like a side exit's): what to add to it then.
        let fix = match self.count_at {
            Some(at) if k < at => k as i32 + 1,
            _ => k as i32 + 1 - self.count_n as i32,
        };
        if fix != 0 {
            const _: () = assert!(crate::cpu::MAX_BLOCK_INSNS <= i8::MAX as usize);
            self.a.mov(byte_ptr(r15 + o_ctx!(hfix)), fix)?;
        }
        // With registers parked, every site of the block shares one copy
        // of the reload, the call and the new parking (see `translate`):
        // helper sites are most of a block's cold code.
        let shared = self.parked.len() >= SHARED_HELPER_PARKED;
        if !shared {
            self.park_reload()?;
        } else if self.parked.contains(&Register::RAX) {
            // The site stores guest rax (the helper stub stores every
            // other register): a parked rax comes back from its slot
            // first.
            self.a.mov(rax, m(o_spill(park_slot(Register::RAX))))?;
        }
        let a = &mut self.a;
        a.mov(m(o_gpr(0)), rax)?;
        a.mov(rax, dn as u64)?;
        a.mov(m(o_ctx!(arg)), rax)?;
        if shared {
            let l = *self.helper_tail.get_or_insert_with(|| a.create_label());
            a.call(l)?;
        } else {
            a.call(self.stubs.helper)?;
            // The helper may have changed any register: park the new values.
            self.park_spill()?;
        }
        // The cache registers now hold guest values, and the helper may
        // have changed the TLB.
        self.cache_clear()?;
        self.counter_load()
    }

    /// Run `f`, which emits one lookup, letting a cached lookup leave the
    /// addend in its pair's register: that register, if it did (else the
    /// addend is in the lookup's third scratch register).
    fn in_pair<T>(&mut self, f: impl FnOnce(&mut Self) -> R<T>) -> (R<T>, Option<Register>) {
        self.want_pair_addend = true;
        let r = f(self);
        self.want_pair_addend = false;
        (r, self.pair_addend.take())
    }

    /// Store the counter register (see [`Tx::counter`]) to `left`, for
    /// what reads it there.
    fn count_sync(&mut self) -> R<()> {
        match self.counter.filter(|_| self.counter_live) {
            Some(c) => self.a.mov(m(o_ctx!(left)), r64(c)),
            None => Ok(()),
        }
    }

    /// Load the counter register (see [`Tx::counter`]) from `left`.
    fn counter_load(&mut self) -> R<()> {
        match self.counter {
            Some(c) => self.a.mov(r64(c), m(o_ctx!(left))),
            None => Ok(()),
        }
    }

    /// Set `list` to the block's instructions (true; false when there is
    /// nothing to preload and they are `a`'s as they are), with each cache pair's
    /// placeholders at the count entry replaced by a load of the entry its owner's slot
    /// points to (minus its tag scaled like the owner's check, and its
    /// addend): a loop entered for a pass or two (quicksort's scans) then
    /// hits on its first pass instead of taking the miss path. Any entry
    /// of the current TLB array is a valid pair (the check compares the
    /// tag), so a slot that points elsewhere only costs that miss.
    fn preload_pairs(&mut self) -> R<bool> {
        let Some((_, b, _)) = self.free3().filter(|_| !self.preload_at.is_empty()) else {
            return Ok(false);
        };
        self.list.clear();
        self.list.extend_from_slice(self.a.instructions());
        let list = &mut self.list;
        let b = r64(b);
        for (k, &at) in self.preload_at.iter().enumerate() {
            let (Some((_, _, write, bits)), Some(&(t, ad))) =
                (self.cache_owner[k], self.cache.get(k))
            else {
                continue;
            };
            let (t, ad) = (r64(t), r64(ad));
            let mut x = CodeAssembler::new(64)?;
            x.mov(b, m(self.cache_slot[k]))?;
            x.mov(t, qword_ptr(b + tag_field(write)))?;
            scale_tag(&mut x, t, bits)?;
            x.mov(ad, qword_ptr(b + offset_of!(TlbEntry, addend) as i32))?;
            let ins = x.instructions();
            let Some(dst) = list
                .get_mut(at..at + PRELOAD_LEN)
                .filter(|_| ins.len() <= PRELOAD_LEN)
            else {
                continue;
            };
            // The pair's emptying (which may hold the count entry's
            // label) and the room after it.
            let empty = Instruction::with(Code::Zero_bytes);
            for (j, d) in dst.iter_mut().enumerate() {
                let ip = d.ip();
                *d = ins.get(j).copied().unwrap_or(empty);
                d.set_ip(ip);
            }
        }
        Ok(true)
    }

    /// Empty every cached TLB entry (see [`Tx::cache`]): a tag of 1 never
    /// matches, as a masked address plus a real tag is zero on a match
    /// and masked addresses are below 2^40.
    fn cache_clear(&mut self) -> R<()> {
        for k in 0..self.cache.len() {
            empty_pair(&mut self.a, self.cache[k].0)?;
        }
        Ok(())
    }

    /// The cache pair of the lookup being emitted (`cur_k`, `cur_lookups`)
    /// for a check of `k` low bits, if the block has one for it: the one
    /// it owns already (the plain copy and a body check's exit emit the
    /// instruction again), else a free one.
    /// `slot` is the lookup's entry slot, from which the pair is preloaded.
    fn cache_pair(&mut self, write: bool, k: usize, slot: i32) -> Option<(Register, Register)> {
        if self.no_pair {
            return None;
        }
        let key = (self.cur_k, self.cur_lookups, write, k);
        let i = self
            .cache_owner
            .iter()
            .position(|&o| o == Some(key))
            .or_else(|| self.cache_owner.iter().position(|o| o.is_none()))?;
        self.cache_owner[i] = Some(key);
        self.cache_slot[i] = slot;
        Some(self.cache[i])
    }

    fn rcx_parked(&self) -> bool {
        self.parked.first() == Some(&Register::RCX)
    }

    /// Free rcx for scratch use: guest rcx goes to the keeper register,
    /// or to spill slot `slot` in blocks without one. Nothing when rcx is
    /// parked.
    fn save_rcx(&mut self, slot: usize) -> R<()> {
        if self.rcx_parked() || self.rcx_out {
            return Ok(());
        }
        count_event(&mut self.a, self.events, EV_RCX_SAVE)?;
        match self.keeper {
            Some(k) => self.a.mov(r64(k), rcx),
            None => self.a.mov(m(o_spill(slot)), rcx),
        }
    }

    /// Put guest rcx back after [`Self::save_rcx`].
    fn restore_rcx(&mut self, slot: usize) -> R<()> {
        self.rcx_out = false;
        if self.rcx_parked() {
            return Ok(());
        }
        match self.keeper {
            Some(k) => self.a.mov(rcx, r64(k)),
            None => self.a.mov(rcx, m(o_spill(slot))),
        }
    }

    /// Parked registers other than rcx (scratch for the fast TLB path).
    fn free3(&self) -> Option<(Register, Register, Register)> {
        let mut v = self.parked.iter().copied().filter(|&r| r != Register::RCX);
        let three = (v.next()?, v.next()?, v.next()?);
        self.bmi2.then_some(three)
    }

    fn park_spill(&mut self) -> R<()> {
        for &r in self.parked.iter() {
            self.a.mov(m(o_spill(park_slot(r))), r64(r))?;
        }
        Ok(())
    }

    fn park_reload(&mut self) -> R<()> {
        for &r in self.parked.iter() {
            self.a.mov(r64(r), m(o_spill(park_slot(r))))?;
        }
        Ok(())
    }

    /// Reload the parked registers before an exit that is cold or chained
    /// past the reload: inline when there are few, else through a call of
    /// the block's one copy (each copy costs translation time and cache
    /// lines). Exits to the jump cache and to other pages, hot paths,
    /// reload inline.
    fn unpark(&mut self) -> R<()> {
        if self.parked.len() < SHARED_UNPARK {
            return self.park_reload();
        }
        let a = &mut self.a;
        let l = *self.unpark_tail.get_or_insert_with(|| a.create_label());
        a.call(l)
    }

    fn helper_insn(&mut self, dn: &DInsn) -> R<()> {
        self.sync_rcx()?;
        self.helpers += 1;
        self.helper_codes.push(dn.insn.code());
        self.call_helper(dn as *const DInsn, self.cur_k)
    }

    /// Note the indirect branch at `rip`, about to go through the jump
    /// cache with its target in `s.rip`: a miss leaves it in `target` for
    /// `Cpu::jit_wild_branch` (a hit overwrites it).
    fn note_branch(&mut self, rip: u64) -> R<()> {
        let at = o_ctx!(target);
        match i32::try_from(rip as i64) {
            // Sign-extended: user code low, kernel code in the top 2 GiB.
            Ok(v) => self.a.mov(qword_ptr(r15 + at), v),
            Err(_) => {
                self.a.mov(dword_ptr(r15 + at), rip as u32)?;
                self.a.mov(dword_ptr(r15 + at + 4), (rip >> 32) as u32)
            }
        }
    }

    /// Leave translated code for the dispatcher, rip = target.
    fn exit_to(&mut self, t: ExitTarget, site: Option<CodeLabel>) -> R<()> {
        self.sync_rcx()?;
        self.count_sync()?;
        if site.is_none() && !self.no_jc {
            // On to the jump cache: a hot path (returns, indirect jumps).
            self.park_reload()?;
        } else {
            self.unpark()?;
        }
        self.exit_tail(t, site)
    }

    /// [`Self::exit_to`] with the parked registers already reloaded.
    fn exit_tail(&mut self, t: ExitTarget, site: Option<CodeLabel>) -> R<()> {
        let a = &mut self.a;
        if site.is_none() && !self.no_jc {
            // Through the jump cache (target stored in cpu.s.rip).
            let ev = match t {
                ExitTarget::Imm(_) => EV_JC_DIRECT,
                _ => EV_JC_INDIRECT,
            };
            count_event(a, self.events, ev)?;
            if let ExitTarget::Imm(v) = t {
                if let Ok(v) = i32::try_from(v as i64) {
                    // Sign-extended: user code low, kernel code in the top 2 GiB.
                    a.mov(m(o_rip()), v)?;
                } else {
                    a.mov(m(o_spill(SP_ENTRY)), rcx)?;
                    a.mov(rcx, v)?;
                    a.mov(m(o_rip()), rcx)?;
                    a.mov(rcx, m(o_spill(SP_ENTRY)))?;
                }
            }
            a.jmp(self.stubs.indirect)?;
            return Ok(());
        }
        a.mov(m(o_gpr(0)), rax)?;
        if let ExitTarget::Imm(v) = t {
            a.mov(rax, v)?;
            a.mov(m(o_rip()), rax)?;
        }
        match site {
            Some(l) => {
                a.lea(rax, qword_ptr(l))?;
                a.mov(m(o_ctx!(exit_site)), rax)?;
            }
            None => a.mov(m(o_ctx!(exit_site)), 0)?,
        }
        a.jmp(self.stubs.exit)?;
        Ok(())
    }

    /// Exit to `target` through its full entry, which checks that its
    /// page is unchanged: through the jump cache until the site is patched
    /// to the target's guard (see `GuardTemplate`).
    fn exit_far(&mut self, target: u64) -> R<()> {
        self.sync_rcx()?;
        self.count_sync()?;
        // Hot once its site is patched to a guard.
        self.park_reload()?;
        if !self.no_jc {
            let idx = self.a.instructions().len();
            self.a.db(&[0xe9, 0, 0, 0, 0])?;
            self.far_sites.push((idx, target));
        }
        self.exit_tail(ExitTarget::Imm(target), None)
    }

    /// Emit, through `f`, a second copy of instructions the statistics
    /// already counted (the plain copy after the group copy, the body
    /// check's exit): they keep the first copy's counts.
    fn uncounted(&mut self, f: impl FnOnce(&mut Self) -> R<()>) -> R<()> {
        let (native, helpers, codes) = (self.native, self.helpers, self.helper_codes.len());
        let r = f(self);
        self.native = native;
        self.helpers = helpers;
        self.helper_codes.truncate(codes);
        r
    }

    /// Count the block's `n` instructions where the guest flags are dead.
    /// In a block with a body check, also leave (out of line) when the
    /// budget ran out (`left` counts up from -budget: the sign): one
    /// untaken branch a pass instead of the back edge's flag-free check
    /// (guest rcx set aside, a load, JRCXZ). The kick flag is not read here:
    /// `jit_run` gives translated code at most [`super::KICK_INTERVAL`]
    /// instructions, and the dispatcher reads the flag when they run out.
    fn count_add(&mut self, n: usize) -> R<()> {
        let a = &mut self.a;
        match self.counter {
            Some(c) => a.add(r64(c), n as i32)?,
            None => a.add(qword_ptr(r15 + o_ctx!(left)), n as i32)?,
        }
        if let Some((_, cold)) = self.body_check.filter(|_| !self.budget_free) {
            count_event(a, self.events, EV_BACK_EDGE)?;
            a.jns(cold)?;
        }
        Ok(())
    }

    /// Before the passes of a loop with strided groups (see
    /// [`Tx::budget_free`]): unless the budget has room for `more`
    /// instructions, go on in the plain copy at `plain`, which checks it
    /// every pass. False (and nothing emitted) where `more` is too large
    /// to be worth it. Flag-free: the guest flags may be live here.
    fn budget_room(&mut self, more: usize, plain: CodeLabel) -> R<bool> {
        let Some((t, _, _)) = self.free3().filter(|_| more < 1 << 24) else {
            return Ok(false);
        };
        let t = r64(t);
        let a = &mut self.a;
        match self.counter {
            Some(c) => a.lea(t, qword_ptr(r64(c) + more as i32))?,
            None => {
                a.mov(t, m(o_ctx!(left)))?;
                a.lea(t, qword_ptr(t + more as i32))?;
            }
        }
        // `left` counts up from -budget: room while it stays negative.
        a.not(t)?;
        self.save_rcx(SP_RCX)?;
        self.a.mov(rcx, 1u64 << 63)?;
        self.a.pext(rcx, t, rcx)?;
        self.on_if_rcx_zero(plain)?;
        Ok(true)
    }

    /// After [`Self::save_rcx`] and a flag-free test that leaves rcx zero
    /// when it passes: go on if it did, else to `fail`; guest rcx back
    /// either way.
    fn on_if_rcx_zero(&mut self, fail: CodeLabel) -> R<()> {
        let mut on = self.a.create_label();
        self.a.jrcxz(on)?;
        self.restore_rcx(SP_RCX)?;
        self.a.jmp(fail)?;
        self.a.set_label(&mut on)?;
        self.restore_rcx(SP_RCX)
    }

    /// Before the first pass of a loop counted in a 32-bit register (see
    /// [`Z32`]): each register in `checks` is below 2^shift, or the pass
    /// goes on in the plain copy (flag-free).
    fn z32_check(&mut self, checks: &[(Register, u32)], plain: CodeLabel) -> R<()> {
        let Some((sa, sb, sc)) = self.free3() else {
            self.sync_rcx()?;
            return self.a.jmp(plain);
        };
        let (sa, sb, sc) = (r64(sa), r64(sb), r64(sc));
        // The sum of what each has at or above its bound: zero if all
        // are below.
        for (n, &(r, shift)) in checks.iter().enumerate() {
            let a = &mut self.a;
            a.mov(sc, shift as u64)?;
            if n == 0 {
                a.shrx(sa, r64(r), sc)?;
            } else {
                a.shrx(sb, r64(r), sc)?;
                a.lea(sa, qword_ptr(sa + sb))?;
            }
        }
        self.save_rcx(SP_RCX)?;
        self.a.mov(rcx, sa)?;
        self.on_if_rcx_zero(plain)
    }

    /// The body check, when this pass through the block has passed it
    /// (the instruction being translated comes at or after it).
    fn checked(&self) -> Option<(usize, CodeLabel)> {
        self.body_check.filter(|&(k, _)| self.cur_k >= k)
    }

    /// A parked register free between guest instructions for the count
    /// and the body check: one other than rcx when there is one, so that
    /// guest rcx stays put.
    fn scratch(&self) -> Option<Register> {
        let mut p = self.parked.iter().copied();
        p.clone().find(|&r| r != Register::RCX).or_else(|| p.next())
    }

    /// Add `delta` to the instruction count without touching the flags
    /// (load, LEA, store), through [`Self::scratch`], else through rcx
    /// saved around it.
    fn count_fix(&mut self, delta: i32) -> R<()> {
        if delta == 0 {
            return Ok(());
        }
        if let Some(c) = self.counter {
            // (Stored by whatever reads it next: see `count_sync`.)
            return self.a.lea(r64(c), qword_ptr(r64(c) + delta));
        }
        let r = self.scratch();
        let cnt = r.map_or(rcx, r64);
        let a = &mut self.a;
        if r.is_none() {
            a.mov(m(o_spill(SP_ENTRY)), rcx)?;
        }
        a.mov(cnt, m(o_ctx!(left)))?;
        a.lea(cnt, qword_ptr(cnt + delta))?;
        a.mov(m(o_ctx!(left)), cnt)?;
        if r.is_none() {
            a.mov(rcx, m(o_spill(SP_ENTRY)))?;
        }
        Ok(())
    }

    /// Exit to a known target; chainable when it is in the same guest page.
    fn exit_direct(&mut self, target: u64) -> R<()> {
        self.sync_rcx()?;
        if target >> 12 != self.block.lin_pc >> 12 {
            return self.exit_far(target);
        }
        // Chained blocks, the back-edge check and the dispatcher read the
        // count from `left` (`exit_far` stores it itself).
        self.count_sync()?;
        let a = &mut self.a;
        let mut slow = a.create_label();
        let mut site = a.create_label();
        // Leave for the dispatcher when the budget ran out: `left` counts
        // up from -budget, so its top byte becomes 0 when it reaches 0.
        // Flag-free (jrcxz, not taken on the way on; the way out is cold).
        // Only jumps that do not go forward past this block check: chained
        // code can only run on without bound through a cycle, and every
        // cycle has such a jump (jumps to other pages check in their guard
        // or the indirect stub). The kick flag waits for the dispatcher
        // (see `KICK_INTERVAL`).
        let last_ip = self.block.insns.last().map_or(0, |d| d.insn.ip());
        if target <= last_ip && self.checked().is_none() {
            count_event(&mut self.a, self.events, EV_BACK_EDGE)?;
            self.save_rcx(SP_ENTRY)?;
            let a = &mut self.a;
            let stop = a.create_label();
            a.movzx(ecx, byte_ptr(r15 + (o_ctx!(left) + 7)))?;
            a.jrcxz(stop)?;
            self.budget_stops.push((stop, slow));
            self.restore_rcx(SP_ENTRY)?;
        }
        let a = &mut self.a;
        if target == self.block.insns[0].insn.ip() {
            if let Some(l) = self.l_count {
                // A loop on itself: straight back, registers still parked.
                self.stride_on()?;
                if self.head_out {
                    self.save_rcx(SP_RCX)?;
                }
                let a = &mut self.a;
                a.jmp(l)?;
                a.set_label(&mut slow)?;
                return self.exit_to(ExitTarget::Imm(target), None);
            }
        }
        // Two patchable jmp rel32, both to the next instruction until one
        // is patched: the first skips the reload (same parked set).
        let fast_idx = a.instructions().len();
        a.db(&[0xe9, 0, 0, 0, 0])?;
        self.unpark()?;
        let a = &mut self.a;
        let site_idx = a.instructions().len();
        a.set_label(&mut site)?;
        a.db(&[0xe9, 0, 0, 0, 0])?;
        a.set_label(&mut slow)?;
        self.chain_sites.push((site_idx, fast_idx, target));
        if target > last_ip {
            // Only the unpatched site falls through to `slow` (no back-edge
            // check jumps there): the registers are reloaded already.
            return self.exit_tail(ExitTarget::Imm(target), Some(site));
        }
        // The count is stored (above); the counter register may hold its
        // guest value again (the unpatched site falls through here).
        let live = std::mem::replace(&mut self.counter_live, false);
        self.exit_to(ExitTarget::Imm(target), Some(site))?;
        self.counter_live = live;
        Ok(())
    }

    /// Flag-free soft-TLB lookup (BMI2). `sa` holds the linear address;
    /// rcx, `sb` and `sc` are free (parked or spilled). On a hit it falls
    /// through with `sc` = the entry's addend (host pointer = sa + sc);
    /// otherwise it jumps to the returned label. Flags are untouched, so
    /// the slow path sees the exact guest state.
    ///
    /// Each access site first tries the TLB entry it hit last time (kept
    /// in one of [`ENTRY_SLOTS`] slots chosen by a hash of its guest
    /// address): loops touch the same page again and again, and that skips
    /// the index computation. A slot always points at some entry of the
    /// current TLB array (`jit_run` refills them when the array changes),
    /// and an entry whose tag matches the page is the page's translation
    /// wherever the pointer came from, so a stale or shared slot only
    /// costs the full lookup. The slot's entry need not sit at the index
    /// of the first byte, so the last byte's page alone would prove
    /// nothing: the slot is tried for naturally aligned accesses (the
    /// check includes the low address bits, and such an access cannot
    /// cross a page) and for the others (unaligned 16-byte forms, group
    /// ranges of up to 4 KiB) with both the first and the last byte's page
    /// checked. With `unaligned`, a range whose size would allow the
    /// aligned form is checked at both ends too (a group range of several
    /// locations: an aligned check would miss half its passes).
    ///
    /// In a block that loops on itself, a site that gets one of the
    /// block's cache pairs ([`Tx::cache`]) keeps its entry in registers
    /// instead ([`Self::lookup_cached`]).
    fn lookup_fast(
        &mut self,
        (sa, sb, sc): (Register, Register, Register),
        size: usize,
        write: bool,
        align16: bool,
        unaligned: bool,
    ) -> R<CodeLabel> {
        let (a_, b, c) = (r64(sa), r64(sb), r64(sc));
        let tag = tag_field(write);
        const _: () = assert!(size_of::<TlbEntry>() == 64);
        let aligned_form = align16 || !unaligned && size <= 8 && size.is_power_of_two();
        let bits = match (align16, aligned_form) {
            (true, _) => 4,
            (false, true) => size.trailing_zeros() as usize,
            (false, false) => RANGE,
        };
        let key = self
            .cur_rip
            .wrapping_add(self.cur_lookups.wrapping_mul(0x9e37_79b9))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let slot = o_ctx!(eslots) + 8 * (key >> (64 - ENTRY_SLOTS.trailing_zeros())) as i32;
        let pair = self.cache_pair(write, bits, slot);
        self.cur_lookups += 1;
        if let Some(pair) = pair {
            return self.lookup_cached((sa, sb, sc), size, tag, bits, pair, slot);
        }
        let x = &mut self.a;
        let slow = x.create_label();
        let mut hit = x.create_label();
        // rcx = (vpn << k | src & ((1 << k) - 1)) - (tag << k) for the
        // entry at b: zero exactly when src is in the entry's page and its
        // low k bits are clear.
        let tag_cmp = |x: &mut CodeAssembler, src: AsmRegister64, k: usize| -> R<()> {
            x.pext(rcx, src, m(o_ctx!(m_page) + 8 * k as i32))?;
            x.mov(c, qword_ptr(b + tag))?;
            match k {
                0..=3 => x.lea(rcx, qword_ptr(rcx + c * (1 << k))),
                _ => {
                    x.lea(c, qword_ptr(c * 8))?;
                    x.lea(rcx, qword_ptr(rcx + c * 2))
                }
            }
        };
        // The entry at b (at the index of the first byte) must map the
        // page of the access: an aligned SSE form also needs its low 4
        // bits clear; any other takes the page of its last byte, so a
        // crossing access never matches (that page's tag cannot sit at
        // this index).
        let check = |x: &mut CodeAssembler| -> R<()> {
            if align16 {
                tag_cmp(x, a_, 4)
            } else if size > 1 {
                x.lea(rcx, qword_ptr(a_ + (size as i32 - 1)))?;
                tag_cmp(x, rcx, 0)
            } else {
                tag_cmp(x, a_, 0)
            }
        };
        x.mov(b, m(slot))?;
        if !aligned_form {
            // MOVUPS and friends, and group ranges: rcx = vf + vl - 2 tag,
            // with vf, vl the pages of the first and last byte. As vl - vf
            // is 0 or 1 (size at most 4 KiB), an even sum of 2 tag needs
            // vf = vl = tag: a crossing access never matches.
            lookup_ends(x, (sa, sb, sc), size)?;
            x.mov(c, qword_ptr(b + tag))?;
            x.lea(rcx, qword_ptr(rcx + c * 2))?;
        } else {
            tag_cmp(x, a_, size.trailing_zeros() as usize)?;
        }
        x.jrcxz(hit)?;
        count_event(x, self.events, EV_FULL_LOOKUP)?;
        tlb_index(x, sa, sb, slot)?;
        check(x)?;
        x.jrcxz(hit)?;
        x.jmp(slow)?;
        x.set_label(&mut hit)?;
        count_event(x, self.events, EV_HIT)?;
        x.mov(c, qword_ptr(b + offset_of!(TlbEntry, addend) as i32))?;
        Ok(slow)
    }

    /// [`Self::lookup_fast`] for an access site that owns a cache pair
    /// (`pair`: minus the tag of the entry it hit last, scaled by
    /// `1 << bits`, and that entry's addend): the check is PEXT, LEA and
    /// JRCXZ, with no load. A miss tries the site's entry slot, then the
    /// entry at the TLB index, and refills the pair; as everything that
    /// may change the TLB is a helper
    /// (after which the pair is cleared) or outside translated code (the
    /// count entry clears it), a pair always holds an entry that is
    /// current. Checks that the access is naturally aligned (`bits` low
    /// bits clear: it cannot cross a page), else (`bits` = [`RANGE`]) that
    /// its first and last bytes are in the entry's page, like
    /// `lookup_fast` does for unaligned forms and groups.
    fn lookup_cached(
        &mut self,
        regs: (Register, Register, Register),
        size: usize,
        tag: i32,
        bits: usize,
        pair: (Register, Register),
        slot: i32,
    ) -> R<CodeLabel> {
        let (a_, c) = (r64(regs.0), r64(regs.2));
        let (t, ad) = (r64(pair.0), r64(pair.1));
        let x = &mut self.a;
        let (slow, miss, back) = (x.create_label(), x.create_label(), x.create_label());
        let mut hit = x.create_label();
        let range = bits == RANGE;
        if range {
            lookup_ends(x, regs, size)?;
            x.lea(rcx, qword_ptr(rcx + t * 2))?;
        } else {
            x.pext(rcx, a_, m(o_ctx!(m_page) + 8 * bits as i32))?;
            x.lea(rcx, qword_ptr(rcx + t))?;
        }
        x.jrcxz(hit)?;
        x.jmp(miss)?;
        x.set_label(&mut hit)?;
        x.zero_bytes()?;
        count_event(x, self.events, EV_CACHED)?;
        count_event(x, self.events, EV_HIT)?;
        let in_pair = std::mem::take(&mut self.want_pair_addend);
        if in_pair {
            self.pair_addend = Some(pair.1);
        } else {
            x.mov(c, ad)?;
        }
        let mut back = back;
        x.set_label(&mut back)?;
        x.zero_bytes()?;
        self.cold_lookups.push(ColdLookup {
            miss,
            back,
            slow,
            regs,
            size,
            tag,
            bits,
            pair,
            slot,
            in_pair,
        });
        Ok(slow)
    }

    /// The miss path of [`Self::lookup_cached`], out of line: the site's
    /// entry slot, then the entry at the TLB index; a hit refills the
    /// pair (an access that is not aligned but within the entry's page
    /// is a hit that does not) and goes back with the addend in the third
    /// register, anything else goes to the slow path.
    fn cold_lookup(&mut self, cold: ColdLookup) -> R<()> {
        let ColdLookup {
            mut miss,
            back,
            slow,
            regs,
            size,
            tag,
            bits,
            pair,
            slot,
            in_pair,
        } = cold;
        let (a_, b, c) = (r64(regs.0), r64(regs.1), r64(regs.2));
        let (t, ad) = (r64(pair.0), r64(pair.1));
        let range = bits == RANGE;
        let x = &mut self.a;
        let mut fill = x.create_label();
        x.set_label(&mut miss)?;
        // rcx = 0 when the entry at b maps the access; c = its tag, scaled
        // like the masked address (as the pair keeps it).
        let check = |x: &mut CodeAssembler| -> R<()> {
            if range {
                lookup_ends(x, regs, size)?;
                x.mov(c, qword_ptr(b + tag))?;
                return x.lea(rcx, qword_ptr(rcx + c * 2));
            }
            x.mov(c, qword_ptr(b + tag))?;
            scale_tag(x, c, bits)?;
            x.pext(rcx, a_, m(o_ctx!(m_page) + 8 * bits as i32))?;
            x.lea(rcx, qword_ptr(rcx + c))
        };
        x.mov(b, m(slot))?;
        check(x)?;
        x.jrcxz(fill)?;
        count_event(x, self.events, EV_FULL_LOOKUP)?;
        tlb_index(x, regs.0, regs.1, slot)?;
        check(x)?;
        x.jrcxz(fill)?;
        if !range && bits != 4 && size > 1 {
            // Not aligned: still a hit (not cached) when the entry at the
            // first byte's index maps the page of the last byte (a
            // crossing access never matches: see `lookup_fast`).
            let mut odd = x.create_label();
            x.lea(rcx, qword_ptr(a_ + (size as i32 - 1)))?;
            x.pext(rcx, rcx, m(o_ctx!(m_page)))?;
            x.mov(c, qword_ptr(b + tag))?;
            x.lea(rcx, qword_ptr(rcx + c))?;
            x.jrcxz(odd)?;
            x.jmp(slow)?;
            x.set_label(&mut odd)?;
            count_event(x, self.events, EV_HIT)?;
            if in_pair {
                // The addend goes where the access reads it; the pair's
                // tag no longer goes with it.
                x.mov(ad, qword_ptr(b + offset_of!(TlbEntry, addend) as i32))?;
                empty_pair(x, pair.0)?;
            } else {
                x.mov(c, qword_ptr(b + offset_of!(TlbEntry, addend) as i32))?;
            }
            x.jmp(back)?;
        } else {
            x.jmp(slow)?;
        }
        x.set_label(&mut fill)?;
        count_event(x, self.events, EV_HIT)?;
        x.mov(t, c)?;
        x.mov(ad, qword_ptr(b + offset_of!(TlbEntry, addend) as i32))?;
        x.mov(c, ad)?;
        x.jmp(back)
    }

    /// Establish group `g` (see [`Group`]) before its first member: its
    /// register gets x (its base plus scaled index) plus the addend of the
    /// one page that holds the whole range `[x + lo, x + end)`, else jump
    /// to `fail`: a flag-free [`Self::lookup_fast`] of the range as one
    /// unaligned access, and the alignment of its aligned SSE members;
    /// else (a miss) go on at `fail`, the plain copy, with guest rcx in
    /// rcx. With `keep_out`, guest rcx may stay in the keeper afterwards.
    fn group_check(&mut self, g: &Group, fail: CodeLabel, keep_out: bool) -> R<()> {
        let Some((sa, sb, sc)) = self.free3() else {
            self.sync_rcx()?;
            return self.a.jmp(fail);
        };
        // Before rcx is saved: the base or the index may be guest rcx
        // (in the keeper while it is out). A stack group's base, rsp,
        // lives in CpuState.
        let rcx_in = self.rcx_in();
        let (base, index) = (rcx_home(g.base, rcx_in), rcx_home(g.index, rcx_in));
        if g.base == Register::RIP {
            self.a.mov(r64(sa), g.x0.wrapping_add(g.lo) as u64)?;
        } else {
            let x = if g.base == Register::RSP {
                self.a.mov(r64(sa), m(o_gpr(4)))?;
                qword_ptr(r64(sa) + g.lo as i32)
            } else if g.index == Register::None {
                qword_ptr(r64(base) + g.lo as i32)
            } else {
                qword_ptr(r64(base) + r64(index) * g.scale + g.lo as i32)
            };
            self.a.lea(r64(sa), x)?;
            if g.index2 != Register::None {
                let index2 = rcx_home(g.index2, rcx_in);
                self.a
                    .lea(r64(sa), qword_ptr(r64(sa) + r64(index2) * g.scale2))?;
            }
        }
        self.save_rcx(SP_RCX)?;
        // Its own entry slot and cache pair: keyed apart from the head's
        // own lookup (in the plain copy), which `insn` numbers from 0.
        self.cur_rip = self.block.insns[g.head()].insn.ip();
        let k = std::mem::replace(&mut self.cur_k, g.head());
        self.cur_lookups = GROUP_LOOKUP;
        let size = (g.end - g.lo) as usize;
        // One aligned 16-byte location: the lookup's own alignment check.
        let one16 = g.align16 == Some(g.lo) && size == 16;
        // A range of several locations is checked at both ends: its
        // alignment to its own size is chance.
        let spread = size as i64 > g.unit;
        let (miss, addend) =
            self.in_pair(|tx| tx.lookup_fast((sa, sb, sc), size, g.write, one16, spread));
        let (miss, addend) = (miss?, addend.unwrap_or(sc));
        self.cur_k = k;
        if let (Some(d0), false) = (g.align16, one16) {
            // The aligned members' addresses: x + d0 (mod 16).
            let mut aligned = self.a.create_label();
            self.a.lea(rcx, qword_ptr(r64(sa) + (d0 - g.lo) as i32))?;
            self.a.pext(rcx, rcx, m(o_ctx!(m_low4)))?;
            self.a.jrcxz(aligned)?;
            self.a.jmp(miss)?;
            self.a.set_label(&mut aligned)?;
        }
        let host = qword_ptr(r64(sa) + r64(addend) - g.lo as i32);
        match g.home {
            Home::Reg(r) => self.a.lea(r64(r), host)?,
            Home::Slot(k) => {
                self.a.lea(r64(sa), host)?;
                self.a.mov(m(o_spill(k)), r64(sa))?;
            }
        }
        if keep_out && self.keeper.is_some() && !self.rcx_parked() {
            self.rcx_out = true;
        } else {
            self.restore_rcx(SP_RCX)?;
        }
        self.group_fails.push((miss, fail));
        self.a.zero_bytes()?;
        if let Home::Slot(k) = g.home {
            self.spilled = Some((k, sa, self.a.instructions().len()));
        }
        Ok(())
    }

    /// Before a jump back to the start of the first copy: each strided
    /// group's register moves on to the next pass (flag-free).
    fn stride_on(&mut self) -> R<()> {
        for &(r, st) in self.strided.iter() {
            let to = match st.by {
                Register::None => qword_ptr(r64(r) + st.step),
                by => qword_ptr(r64(r) + r64(by) * st.by_scale + st.step),
            };
            self.a.lea(r64(r), to)?;
        }
        Ok(())
    }

    /// The register holding a group member's host base: the group's own,
    /// or `scratch` loaded from the group's spill slot.
    fn member_base(&mut self, home: Home, scratch: Register) -> R<Register> {
        match home {
            Home::Reg(r) => Ok(r),
            Home::Slot(k) => {
                let now = (k, scratch, self.a.instructions().len());
                if self.spilled.take() != Some(now) {
                    self.a.mov(r64(scratch), m(o_spill(k)))?;
                }
                Ok(scratch)
            }
        }
    }

    /// Linear address of a memory operand into `sa` (guest rsp/r15 read
    /// from CpuState through `sa`/`sb`, FS/GS base added), flag-free.
    /// False (nothing emitted) for other address sizes.
    fn ea_fast(&mut self, i: &Instruction, sa: Register, sb: Register) -> R<bool> {
        if !is64addr(i) {
            return Ok(false);
        }
        let rcx_in = self.rcx_in();
        ea_no_seg(&mut self.a, i, sa, sb, rcx_in)?;
        let x = &mut self.a;
        let seg = i.memory_segment();
        if seg == Register::FS || seg == Register::GS {
            let s = if seg == Register::FS { FS } else { GS };
            x.mov(r64(sb), m(o_seg!(s, base)))?;
            x.lea(r64(sa), qword_ptr(r64(sa) + r64(sb)))?;
        }
        Ok(true)
    }

    /// The linear address of `i`'s memory operand into `sa`, then the
    /// flag-free lookup (see [`Self::lookup_fast`]), with guest rcx kept
    /// aside around it ([`Self::save_rcx`]). Returns the miss label;
    /// None (nothing emitted) for address forms this path does not handle.
    #[allow(clippy::too_many_arguments)]
    fn operand_lookup(
        &mut self,
        i: &Instruction,
        sa: Register,
        sb: Register,
        sc: Register,
        size: usize,
        write: bool,
        align16: bool,
    ) -> R<Option<CodeLabel>> {
        self.operand_lookup_keep(i, (sa, sb, sc), size, write, align16, false)
    }

    /// [`Self::operand_lookup`]; with `keep_out`, guest rcx stays in the
    /// keeper afterwards (`rcx_out`) where the block has one.
    fn operand_lookup_keep(
        &mut self,
        i: &Instruction,
        (sa, sb, sc): (Register, Register, Register),
        size: usize,
        write: bool,
        align16: bool,
        keep_out: bool,
    ) -> R<Option<CodeLabel>> {
        if !is64addr(i) {
            return Ok(None);
        }
        self.save_rcx(SP_RCX)?;
        self.ea_fast(i, sa, sb)?;
        let slow = self.lookup_fast((sa, sb, sc), size, write, align16, false)?;
        if keep_out && self.keeper.is_some() && !self.rcx_parked() {
            self.rcx_out = true;
        } else {
            self.restore_rcx(SP_RCX)?;
        }
        Ok(Some(slow))
    }

    /// The guest register that is the whole address of `i`'s memory
    /// operand ([reg], no index, displacement or FS/GS base), when the
    /// lookup can read it in place: not rsp/r15 (kept in CpuState) and not
    /// rcx (the lookup's scratch).
    fn plain_base(i: &Instruction) -> Option<Register> {
        let b = i.memory_base();
        let plain = is64addr(i)
            && b.is_gpr64()
            && !matches!(b, Register::RSP | Register::R15 | Register::RCX)
            && i.memory_index() == Register::None
            && i.memory_displacement64() == 0
            && !matches!(i.memory_segment(), Register::FS | Register::GS);
        plain.then_some(b)
    }

    /// The fast memory path for a whitelisted instruction (see
    /// [`Self::lookup_fast`]); false when it does not apply.
    fn native_mem_fast(&mut self, dn: &DInsn, size: usize, write: bool, align16: bool) -> R<bool> {
        let Some((sa, sb, sc)) = self.free3() else {
            return Ok(false);
        };
        let i = &self.host_form(&dn.insn);
        if !is64addr(i) {
            return Ok(false);
        }
        let used = self.used_full_regs(i);
        // Register operands naming rsp/r15 need a host register too.
        let mut avoid = used.clone();
        avoid.extend(self.parked.iter().copied());
        avoid.extend([Register::RSP, Register::R15, Register::RCX]);
        let reg_ops: Vec<Register> = (0..i.op_count())
            .filter(|&n| i.op_kind(n) == OpKind::Register)
            .map(|n| i.op_register(n).full_register())
            .collect();
        let need = [Register::RSP, Register::R15]
            .iter()
            .filter(|r| reg_ops.contains(r))
            .count();
        let Some(free) = self.pick(&avoid, need) else {
            return Ok(false);
        };
        let remap = Remap::new(&reg_ops, &free);
        // A group member: its group's register holds the host address of
        // its base plus scaled index, checked when the group began.
        if let Some((home, rel)) = self.member {
            let g = self.member_base(home, sa)?;
            let mut ni = *i;
            remap.rewrite_registers(&mut ni);
            ni.set_memory_base(g);
            ni.set_memory_index(Register::None);
            ni.set_memory_index_scale(1);
            ni.set_segment_prefix(Register::None);
            if let Some(d) = rel {
                ni.set_memory_displacement64(d as u64);
                ni.set_memory_displ_size(if d == 0 { 0 } else { 1 });
            }
            let still = self.used_full_regs(&ni);
            if encodable(&ni) && !still.contains(&Register::RSP) && !still.contains(&Register::R15)
            {
                self.remap_in(&remap)?;
                self.a.add_instruction(no_ip(&ni))?;
                self.remap_out(&remap)?;
                return Ok(true);
            }
        }
        // A plain [reg] operand needs no address computation: the lookup
        // and the instruction use the guest register itself.
        let direct = Self::plain_base(i);
        let ni = remap.rewrite_with_memory(i, direct.unwrap_or(sa), sc);
        // Implicit rsp/r15 uses would run on the host's registers.
        let still: Vec<Register> = self.used_full_regs(&ni);
        if still.contains(&Register::RSP) || still.contains(&Register::R15) {
            return Ok(false);
        }
        if !encodable(&ni) {
            return Ok(false);
        }
        let addr = direct.unwrap_or(sa);
        // Guest rcx may stay in the keeper past this instruction when it
        // does not name rcx (the next one restores it if it needs to).
        let keep = !self.used_full_regs(&ni).contains(&Register::RCX);
        // A cached lookup may leave the addend in its pair's register,
        // which the access then reads itself: one move fewer.
        let (lookup, addend) = self
            .in_pair(|tx| tx.operand_lookup_keep(i, (addr, sb, sc), size, write, align16, keep));
        let mut ni = ni;
        if let Some(ad) = addend {
            ni.set_memory_index(ad);
        }
        let Some(slow) = lookup? else {
            return Ok(false);
        };
        self.remap_in(&remap)?;
        self.a.add_instruction(no_ip(&ni))?;
        self.remap_out(&remap)?;
        let mut back = self.a.create_label();
        self.defer_fast(slow, back, dn);
        self.a.set_label(&mut back)?;
        self.a.zero_bytes()?;
        Ok(true)
    }

    /// Cold path of a fast lookup: exact guest state is in the registers
    /// (rcx in its slot when not parked); the helper runs the instruction.
    fn defer_fast(&mut self, slow: CodeLabel, back: CodeLabel, dn: &DInsn) {
        // Guest rcx is where save_rcx put it.
        let rcx_from = if self.rcx_parked() { None } else { self.keeper };
        let restore = if self.rcx_parked() || rcx_from.is_some() {
            vec![]
        } else {
            vec![(Register::RCX, SP_RCX)]
        };
        let keep_rcx = if self.rcx_out { self.keeper } else { None };
        self.slow.push(Slow {
            label: slow,
            back,
            dn: dn as *const DInsn,
            k: self.cur_k,
            rcx_from,
            restore,
            flags_in_ax: false,
            popf: false,
            keep_rcx,
        });
    }

    /// PUSH/POP/RET: look up the stack slot (`rsp - 8` for a push, else
    /// `rsp`) and let `f` emit the access with the slot operand, a register
    /// holding the slot's linear address and a scratch register. The slow
    /// path (the helper runs the whole instruction) resumes at the returned
    /// label, which the caller places. None when no scratch registers are
    /// free.
    fn stack_op(
        &mut self,
        dn: &DInsn,
        slot: StackSlot,
        avoid: &[Register],
        f: &dyn Fn(&mut CodeAssembler, AsmMemoryOperand, Register, Register) -> R<()>,
    ) -> R<Option<CodeLabel>> {
        let back = self.a.create_label();
        let rsp_off = o_gpr(4);
        let push = slot == StackSlot::Push;
        let lin = move |x: &mut CodeAssembler, sa: Register| -> R<()> {
            match slot {
                StackSlot::Push => {
                    x.mov(r64(sa), m(rsp_off))?;
                    x.lea(r64(sa), qword_ptr(r64(sa) - 8))
                }
                StackSlot::Pop => x.mov(r64(sa), m(rsp_off)),
                StackSlot::Rbp => x.mov(r64(sa), rbp),
            }
        };
        if let (Some((home, Some(rel))), Some((sa, sb, sc))) = (self.member, self.free3()) {
            // A stack group's member: its group checked the slot.
            let g = self.member_base(home, sc)?;
            lin(&mut self.a, sa)?;
            f(&mut self.a, qword_ptr(r64(g) + rel as i32), sa, sb)?;
            return Ok(Some(back));
        }
        if let Some((sa, sb, sc)) = self.free3() {
            self.save_rcx(SP_RCX)?;
            lin(&mut self.a, sa)?;
            let slow = self.lookup_fast((sa, sb, sc), 8, push, false, false)?;
            self.restore_rcx(SP_RCX)?;
            f(&mut self.a, qword_ptr(r64(sa) + r64(sc)), sa, sb)?;
            self.defer_fast(slow, back, dn);
            return Ok(Some(back));
        }
        let Some(s) = self.pick(&self.prologue_avoid(avoid), 3) else {
            return Ok(None);
        };
        let (sa, sb, sc) = (s[0], s[1], s[2]);
        let slow = self.mem_prologue(sa, sb, sc, &|x| lin(x, sa), Register::None, 8, push)?;
        // The host pointer moves to sc (spilled) so that sa holds the
        // linear address again, as on the fast path.
        self.a.mov(r64(sc), r64(sa))?;
        lin(&mut self.a, sa)?;
        f(&mut self.a, qword_ptr(r64(sc)), sa, sb)?;
        let restore = vec![(sa, SP_A), (sb, SP_B), (sc, SP_C)];
        for &(r, k) in restore.iter() {
            self.a.mov(r64(r), m(o_spill(k)))?;
        }
        self.defer_slow(slow, back, dn, restore)?;
        Ok(Some(back))
    }

    /// Spill `regs` into the given slots.
    fn spill(&mut self, regs: &[(Register, usize)]) -> R<()> {
        for &(r, k) in regs {
            self.a.mov(m(o_spill(k)), r64(r))?;
        }
        Ok(())
    }

    /// With the linear address in `sa` and flags saved in ax (guest rax
    /// spilled), look up the soft TLB; on a hit `sa` becomes the host
    /// pointer, else jump to `slow` (flags still in ax).
    fn tlb_lookup(
        &mut self,
        sa: Register,
        sb: Register,
        sc: Register,
        size: usize,
        write: bool,
        slow: CodeLabel,
    ) -> R<()> {
        let (a, b, c) = (r64(sa), r64(sb), r64(sc));
        let tag = if write {
            offset_of!(TlbEntry, write_tag)
        } else {
            offset_of!(TlbEntry, read_tag)
        } as i32;
        let x = &mut self.a;
        x.mov(b, a)?;
        x.shr(b, 12)?;
        x.mov(c, b)?;
        x.and(c, (crate::mmu::TLB_SIZE - 1) as i32)?;
        x.imul_3(c, c, self.tlb_entry as i32)?;
        x.add(c, m(o_ctx!(tlb_base)))?;
        x.cmp(b, qword_ptr(c + tag))?;
        x.jne(slow)?;
        if self.align16 {
            x.test(a, 15)?;
            x.jnz(slow)?;
        }
        if size > 1 {
            x.lea(b, qword_ptr(a + (size as i32 - 1)))?;
            x.xor(b, a)?;
            x.test(b, -4096)?;
            x.jnz(slow)?;
        }
        x.add(a, qword_ptr(c + offset_of!(TlbEntry, addend) as i32))?;
        Ok(())
    }

    /// Registers [`Self::mem_prologue`]'s scratch must not be: `regs`,
    /// rsp and r15 (never in host registers), rax without BMI2 (the flags
    /// go through ax) and rcx with it (the lookup's own scratch).
    fn prologue_avoid(&self, regs: &[Register]) -> Vec<Register> {
        let mut v = regs.to_vec();
        v.extend([Register::RAX, Register::RSP, Register::R15]);
        if self.bmi2 {
            v.push(Register::RCX);
        }
        v
    }

    /// Common prologue for a memory access in a block without three
    /// parked registers: spills, address into `sa`, TLB lookup; on a hit
    /// `sa` holds the host pointer and every other register its guest
    /// value. Returns the slow label, which [`Self::defer_slow`] handles.
    /// With BMI2 the lookup is [`Self::lookup_fast`] (flag-free; rcx is
    /// saved in its slot unless parked), else the flags go through ax
    /// (guest rax spilled) around a lookup that clobbers them. `sa`, `sb`
    /// and `sc` are never rcx, nor rax without BMI2.
    #[allow(clippy::too_many_arguments)]
    fn mem_prologue(
        &mut self,
        sa: Register,
        sb: Register,
        sc: Register,
        ea: &dyn Fn(&mut CodeAssembler) -> R<()>,
        seg: Register,
        size: usize,
        write: bool,
    ) -> R<CodeLabel> {
        count_event(&mut self.a, self.events, EV_SPILL_LOOKUP)?;
        // Saves guest rcx by hand below (only blocks without the lookup
        // scratch come here, which never leave rcx out).
        self.sync_rcx()?;
        if self.bmi2 {
            self.spill(&[(sa, SP_A), (sb, SP_B), (sc, SP_C)])?;
            let keep_rcx = !self.rcx_parked();
            if keep_rcx {
                self.a.mov(m(o_spill(SP_RCX)), rcx)?;
            }
            // The address may name rcx: computed before the lookup
            // clobbers it.
            ea(&mut self.a)?;
            if seg == Register::FS || seg == Register::GS {
                let s = if seg == Register::FS { FS } else { GS };
                self.a.mov(r64(sb), m(o_seg!(s, base)))?;
                self.a.lea(r64(sa), qword_ptr(r64(sa) + r64(sb)))?;
            }
            let slow = self.lookup_fast((sa, sb, sc), size, write, self.align16, false)?;
            self.a.lea(r64(sa), qword_ptr(r64(sa) + r64(sc)))?;
            if keep_rcx {
                self.a.mov(rcx, m(o_spill(SP_RCX)))?;
            }
            self.a.mov(r64(sb), m(o_spill(SP_B)))?;
            self.a.mov(r64(sc), m(o_spill(SP_C)))?;
            return Ok(slow);
        }
        self.spill(&[(Register::RAX, SP_RAX), (sa, SP_A), (sb, SP_B), (sc, SP_C)])?;
        ea(&mut self.a)?;
        save_flags_only(&mut self.a)?;
        if seg == Register::FS || seg == Register::GS {
            let s = if seg == Register::FS { FS } else { GS };
            self.a.add(r64(sa), m(o_seg!(s, base)))?;
        }
        let slow = self.a.create_label();
        self.tlb_lookup(sa, sb, sc, size, write, slow)?;
        // Fast path: flags back, scratch b/c and rax back.
        self.a.add(al, 0x7f)?;
        self.a.sahf()?;
        self.a.mov(rax, m(o_spill(SP_RAX)))?;
        self.a.mov(r64(sb), m(o_spill(SP_B)))?;
        self.a.mov(r64(sc), m(o_spill(SP_C)))?;
        Ok(slow)
    }

    /// Emit the cold path for `slow`: flags back from ax, every spilled
    /// register back, helper for the whole instruction, resume at `back`.
    fn defer_slow(
        &mut self,
        slow: CodeLabel,
        back: CodeLabel,
        dn: &DInsn,
        restore: Vec<(Register, usize)>,
    ) -> R<()> {
        // See mem_prologue: with BMI2 the slow label is entered with the
        // flags untouched and guest rcx in its slot (unless parked), else
        // with the flags in ax and guest rax spilled.
        let mut restore_all = Vec::new();
        if !self.bmi2 {
            restore_all.push((Register::RAX, SP_RAX));
        }
        restore_all.extend(restore);
        if self.bmi2 && !self.rcx_parked() {
            restore_all.push((Register::RCX, SP_RCX));
        }
        self.slow.push(Slow {
            label: slow,
            back,
            dn: dn as *const DInsn,
            k: self.cur_k,
            restore: restore_all,
            rcx_from: None,
            keep_rcx: None,
            flags_in_ax: !self.bmi2,
            popf: false,
        });
        Ok(())
    }

    fn push(&mut self, dn: &DInsn, src: PushSrc) -> R<()> {
        let f = move |a: &mut CodeAssembler, mo: AsmMemoryOperand, sa: Register, sb: Register| {
            match src {
                PushSrc::Imm(v) => {
                    a.mov(r64(sb), v)?;
                    a.mov(mo, r64(sb))?;
                }
                PushSrc::Reg(r) if r == Register::RSP || r == Register::R15 => {
                    a.mov(r64(sb), m(o_gpr(gidx(r))))?;
                    a.mov(mo, r64(sb))?;
                }
                PushSrc::Reg(r) => a.mov(mo, r64(r))?,
                PushSrc::Spill(k) => {
                    a.mov(r64(sb), m(o_spill(k)))?;
                    a.mov(mo, r64(sb))?;
                }
            }
            a.mov(m(o_gpr(4)), r64(sa))
        };
        let avoid: &[Register] = match src {
            PushSrc::Reg(r) => &[r],
            PushSrc::Imm(_) | PushSrc::Spill(_) => &[],
        };
        // For call: the helper performed the whole call and exits (rip
        // changed), so the resume point is only reached by plain pushes.
        if !self.stack_inline(dn, StackSlot::Push, avoid, &f)? {
            self.helper_insn(dn)?;
        }
        Ok(())
    }

    /// A [`Self::stack_op`] whose slow path resumes right after the access
    /// (every stack access but RET's). False when no scratch registers are
    /// free (nothing emitted).
    fn stack_inline(
        &mut self,
        dn: &DInsn,
        slot: StackSlot,
        avoid: &[Register],
        f: &dyn Fn(&mut CodeAssembler, AsmMemoryOperand, Register, Register) -> R<()>,
    ) -> R<bool> {
        let Some(mut back) = self.stack_op(dn, slot, avoid, f)? else {
            return Ok(false);
        };
        self.a.set_label(&mut back)?;
        self.a.zero_bytes()?;
        Ok(true)
    }

    fn pop(&mut self, dn: &DInsn, dst: Register) -> R<()> {
        let f = move |a: &mut CodeAssembler, mo: AsmMemoryOperand, sa: Register, sb: Register| {
            a.mov(r64(sb), mo)?;
            a.lea(r64(sa), qword_ptr(r64(sa) + 8))?;
            a.mov(m(o_gpr(4)), r64(sa))?;
            if dst == Register::RSP || dst == Register::R15 {
                a.mov(m(o_gpr(gidx(dst))), r64(sb))
            } else {
                a.mov(r64(dst), r64(sb))
            }
        };
        if !self.stack_inline(dn, StackSlot::Pop, &[dst], &f)? {
            self.helper_insn(dn)?;
        }
        Ok(())
    }

    /// PUSH m64 (the kernel's entry code pushes per-CPU values): the
    /// operand through a lookup into a spill slot, then a plain push of
    /// it. Either lookup's slow path runs the whole instruction (the load
    /// alone changes nothing). With three parked registers the lookup is
    /// the flag-free fast one; otherwise (entry code names every
    /// register) scratch registers are spilled around it. False (nothing
    /// emitted) for other address sizes or when no scratch is free.
    fn push_mem(&mut self, dn: &DInsn) -> R<bool> {
        let i = &dn.insn;
        if !is64addr(i) {
            return Ok(false);
        }
        let mut back = self.a.create_label();
        if let Some((sa, sb, sc)) = self.free3() {
            let Some(slow) = self.operand_lookup(i, sa, sb, sc, 8, false, false)? else {
                return Ok(false);
            };
            self.a.mov(r64(sb), qword_ptr(r64(sa) + r64(sc)))?;
            self.a.mov(m(o_spill(SP_R1)), r64(sb))?;
            self.defer_fast(slow, back, dn);
        } else {
            let used = self.used_full_regs(i);
            let Some(s) = self.pick(&self.prologue_avoid(&used), 3) else {
                return Ok(false);
            };
            let (sa, sb, sc) = (s[0], s[1], s[2]);
            let slow = self.mem_prologue(
                sa,
                sb,
                sc,
                &|x: &mut CodeAssembler| ea_no_seg(x, i, sa, sb, None),
                i.memory_segment(),
                8,
                false,
            )?;
            self.a.mov(r64(sa), qword_ptr(r64(sa)))?;
            self.a.mov(m(o_spill(SP_R1)), r64(sa))?;
            self.a.mov(r64(sa), m(o_spill(SP_A)))?;
            let restore = vec![(sa, SP_A), (sb, SP_B), (sc, SP_C)];
            self.defer_slow(slow, back, dn, restore)?;
        }
        self.push(dn, PushSrc::Spill(SP_R1))?;
        self.a.set_label(&mut back)?;
        self.a.zero_bytes()?;
        Ok(true)
    }

    /// SWAPGS at CPL 0: exchange the GS base and IA32_KERNEL_GS_BASE in
    /// CpuState (translated code is 64-bit code, where only CPL > 0 makes
    /// it fault: the helper raises the #GP). Guest flags are saved on the
    /// host stack around the privilege test, as for CLI/STI.
    fn swapgs(&mut self, dn: &DInsn) -> R<bool> {
        let slow = self.a.create_label();
        let mut back = self.a.create_label();
        // Two scratch registers: parked ones, or rax and rdx spilled (an
        // XCHG with memory would be an implicitly locked one).
        let (t, u, spill) = match self.free3() {
            Some((sa, sb, _)) => (r64(sa), r64(sb), false),
            None => (rax, rdx, true),
        };
        let kgs = m(o_s() as i32 + offset_of!(CpuState, kernel_gs_base) as i32);
        let a = &mut self.a;
        a.pushfq()?;
        a.test(byte_ptr(r15 + o_seg!(CS, attr)), 0x60)?;
        a.jnz(slow)?;
        if spill {
            a.mov(m(o_spill(SP_R1)), rax)?;
            a.mov(m(o_spill(SP_R2)), rdx)?;
        }
        a.mov(t, m(o_seg!(GS, base)))?;
        a.mov(u, kgs)?;
        a.mov(m(o_seg!(GS, base)), u)?;
        a.mov(kgs, t)?;
        if spill {
            a.mov(rax, m(o_spill(SP_R1)))?;
            a.mov(rdx, m(o_spill(SP_R2)))?;
        }
        a.popfq()?;
        a.set_label(&mut back)?;
        a.zero_bytes()?;
        self.defer_plain(slow, back, dn, true);
        Ok(true)
    }

    fn ret(&mut self, dn: &DInsn, extra: i32) -> R<()> {
        let f = move |a: &mut CodeAssembler, mo: AsmMemoryOperand, sa: Register, sb: Register| {
            a.mov(r64(sb), mo)?;
            a.mov(m(o_rip()), r64(sb))?;
            a.lea(r64(sa), qword_ptr(r64(sa) + (8 + extra)))?;
            a.mov(m(o_gpr(4)), r64(sa))
        };
        let Some(mut back) = self.stack_op(dn, StackSlot::Pop, &[], &f)? else {
            self.helper_insn(dn)?;
            return self.exit_to(ExitTarget::Imm(dn.insn.next_ip()), None);
        };
        self.note_branch(dn.insn.ip())?;
        self.exit_to(ExitTarget::Stored, None)?;
        // Slow path: the helper runs the whole RET; it only comes back if
        // the return address happens to be the next instruction.
        self.a.set_label(&mut back)?;
        self.exit_to(ExitTarget::Imm(dn.insn.next_ip()), None)
    }

    /// Sensitive or implicit-operand instructions with a short inline
    /// form. False when `dn` is none of them or its operands do not fit
    /// (the caller then uses the helper).
    fn system_inline(&mut self, dn: &DInsn) -> R<bool> {
        let i = &dn.insn;
        match i.code() {
            Code::Cli => self.if_flag(dn, false),
            Code::Sti => self.if_flag(dn, true),
            Code::Pushfq => self.pushf(dn),
            Code::Leaveq => self.leave(dn),
            Code::Swapgs => self.swapgs(dn),
            Code::Mov_r32m16_Sreg | Code::Mov_r64m16_Sreg | Code::Mov_rm16_Sreg => {
                self.read_sreg(i)
            }
            Code::Div_rm64 | Code::Div_rm32 => self.div(dn),
            _ => Ok(false),
        }
    }

    /// A cold path that runs the helper for the whole instruction and
    /// resumes at `back`; `popf` first drops host flags pushed on the host
    /// stack.
    fn defer_plain(&mut self, slow: CodeLabel, back: CodeLabel, dn: &DInsn, popf: bool) {
        self.slow.push(Slow {
            label: slow,
            back,
            dn: dn as *const DInsn,
            k: self.cur_k,
            restore: vec![],
            rcx_from: None,
            keep_rcx: None,
            flags_in_ax: false,
            popf,
        });
    }

    /// CLI / STI at CPL 0: clear or set IF in the guest RFLAGS (guest
    /// arithmetic flags saved on the host stack around the test). STI
    /// leaves for the helper when the bus's interrupt hint is raised, so a
    /// waiting interrupt is delivered right after the next instruction.
    fn if_flag(&mut self, dn: &DInsn, set: bool) -> R<bool> {
        let slow = self.a.create_label();
        let mut back = self.a.create_label();
        self.a.pushfq()?;
        self.a.test(byte_ptr(r15 + o_seg!(CS, attr)), 0x60)?;
        self.a.jnz(slow)?;
        if set {
            self.save_rcx(SP_RCX)?;
            self.a.mov(rcx, m(o_ctx!(hint)))?;
            self.a.cmp(dword_ptr(rcx), 0)?;
            self.restore_rcx(SP_RCX)?;
            let a = &mut self.a;
            a.jne(slow)?;
            a.or(dword_ptr(r15 + o_rflags()), 0x200)?;
            // The shadow holds off an interrupt that arrives from now
            // until the next instruction (STI; HLT must not lose it); the
            // dispatcher honours and clears it.
            a.mov(byte_ptr(r15 + o_irq_shadow()), 1)?;
        } else {
            self.a.and(dword_ptr(r15 + o_rflags()), !0x200)?;
        }
        let a = &mut self.a;
        a.popfq()?;
        a.set_label(&mut back)?;
        a.zero_bytes()?;
        self.defer_plain(slow, back, dn, true);
        Ok(true)
    }

    /// PUSHFQ: the guest's arithmetic flags (host RFLAGS) merged into the
    /// rest of the guest RFLAGS (VM and RF are never pushed).
    fn pushf(&mut self, dn: &DInsn) -> R<bool> {
        let rfl = o_rflags();
        let f = move |a: &mut CodeAssembler, mo: AsmMemoryOperand, sa: Register, sb: Register| {
            let b = r64(sb);
            a.pushfq()?;
            a.mov(b, qword_ptr(rsp))?;
            a.xor(b, qword_ptr(r15 + rfl))?;
            a.and(b, 0x8d5)?;
            a.xor(b, qword_ptr(r15 + rfl))?;
            a.and(b, !0x3_0000)?;
            a.popfq()?;
            a.mov(mo, b)?;
            a.mov(m(o_gpr(4)), r64(sa))
        };
        self.stack_inline(dn, StackSlot::Push, &[], &f)
    }

    /// LEAVE: rsp = rbp + 8, rbp = [rbp].
    fn leave(&mut self, dn: &DInsn) -> R<bool> {
        let f = move |a: &mut CodeAssembler, mo: AsmMemoryOperand, sa: Register, sb: Register| {
            a.mov(r64(sb), mo)?;
            a.lea(r64(sa), qword_ptr(r64(sa) + 8))?;
            a.mov(m(o_gpr(4)), r64(sa))?;
            a.mov(rbp, r64(sb))
        };
        self.stack_inline(dn, StackSlot::Rbp, &[Register::RBP], &f)
    }

    /// MOV reg, Sreg: the selector, zero-extended to 32 bits (a 16-bit
    /// destination keeps its upper bits).
    fn read_sreg(&mut self, i: &Instruction) -> R<bool> {
        if i.op0_kind() != OpKind::Register {
            return Ok(false);
        }
        let dst = i.op0_register();
        let full = dst.full_register();
        if full == Register::RSP || full == Register::R15 {
            return Ok(false);
        }
        let seg = match i.op1_register() {
            Register::ES => ES,
            Register::CS => CS,
            Register::SS => SS,
            Register::DS => DS,
            Register::FS => FS,
            Register::GS => GS,
            _ => return Ok(false),
        };
        let sel = word_ptr(r15 + o_seg!(seg, selector));
        if dst.size() == 2 {
            self.a.mov(get_gpr16(dst).unwrap_or(ax), sel)?;
        } else {
            self.a
                .movzx(get_gpr32(sized(full, 4)).unwrap_or(eax), sel)?;
        }
        Ok(true)
    }

    /// DIV r/m32 and r/m64 run natively when they cannot fault: a
    /// divisor above the high half of the dividend (edx/rdx), which also
    /// rules out zero. Otherwise the helper runs it (and raises #DE) with
    /// the guest flags untouched: the compare runs between PUSHFQ/POPFQ.
    /// A memory divisor is read through the soft TLB into a scratch
    /// register first.
    fn div(&mut self, dn: &DInsn) -> R<bool> {
        let i = &dn.insn;
        let wide = i.code() == Code::Div_rm64;
        let mut ni = no_ip(i);
        let mut back = self.a.create_label();
        let src = if i.op0_kind() == OpKind::Register {
            let full = i.op0_register().full_register();
            if full == Register::RSP || full == Register::R15 {
                return Ok(false);
            }
            full
        } else {
            let Some((sa, sb, sc)) = self.free3() else {
                return Ok(false);
            };
            let size = if wide { 8 } else { 4 };
            let Some(slow) = self.operand_lookup(i, sa, sb, sc, size, false, false)? else {
                return Ok(false);
            };
            self.defer_fast(slow, back, dn);
            let mo = qword_ptr(r64(sa) + r64(sc));
            if wide {
                self.a.mov(r64(sb), mo)?;
                ni = Instruction::with1(Code::Div_rm64, sb)?;
            } else {
                let sb32 = sized(sb, 4);
                self.a
                    .mov(get_gpr32(sb32).unwrap_or(eax), dword_ptr(r64(sa) + r64(sc)))?;
                ni = Instruction::with1(Code::Div_rm32, sb32)?;
            }
            sb
        };
        let a = &mut self.a;
        let slow = a.create_label();
        a.pushfq()?;
        if wide {
            a.cmp(rdx, r64(src))?;
        } else {
            a.cmp(edx, get_gpr32(sized(src, 4)).unwrap_or(eax))?;
        }
        a.jae(slow)?;
        a.popfq()?;
        a.add_instruction(no_ip(&ni))?;
        a.set_label(&mut back)?;
        a.zero_bytes()?;
        self.defer_plain(slow, back, dn, true);
        Ok(true)
    }

    /// JMP/CALL through a memory operand: the target is read through the
    /// soft TLB into cpu.s.rip, then (CALL) the return address is pushed
    /// and the block leaves through the jump cache. A TLB miss runs the
    /// whole instruction in the helper. False when no scratch registers
    /// are parked.
    fn indirect_mem(&mut self, dn: &DInsn) -> R<bool> {
        let Some((sa, sb, sc)) = self.free3() else {
            return Ok(false);
        };
        let i = &dn.insn;
        let Some(slow) = self.operand_lookup(i, sa, sb, sc, 8, false, false)? else {
            return Ok(false);
        };
        self.a.mov(r64(sb), qword_ptr(r64(sa) + r64(sc)))?;
        self.a.mov(m(o_rip()), r64(sb))?;
        let mut back = self.a.create_label();
        self.defer_fast(slow, back, dn);
        if i.code() == Code::Call_rm64 {
            self.push(dn, PushSrc::Imm(i.next_ip()))?;
        }
        self.note_branch(i.ip())?;
        self.exit_to(ExitTarget::Stored, None)?;
        // The helper ran the whole instruction; it only comes back when
        // the target is the next instruction.
        self.a.set_label(&mut back)?;
        self.exit_to(ExitTarget::Imm(i.next_ip()), None)?;
        Ok(true)
    }

    /// BT/BTS/BTR/BTC m32/m64 with a register bit offset: the operand
    /// addressed is `ea + (offset >> 5 or 6) * size` (signed). The TLB is
    /// looked up for that element, and the instruction runs natively on
    /// `[ea + addend]` (the CPU adds the element offset itself).
    fn bt_mem(&mut self, dn: &DInsn, write: bool) -> R<bool> {
        let Some((sa, sb, sc)) = self.free3() else {
            return Ok(false);
        };
        let i = &dn.insn;
        let size = i.memory_size().size();
        let off = i.op1_register();
        let full = off.full_register();
        if !is64addr(i) || !matches!(size, 4 | 8) || full == Register::RSP || full == Register::R15
        {
            return Ok(false);
        }
        let ni = no_ip(&Remap(vec![]).rewrite_with_memory(i, sa, sc));
        if !encodable(&ni) {
            return Ok(false);
        }
        self.save_rcx(SP_RCX)?;
        if !self.ea_fast(i, sa, sb)? {
            return Ok(false);
        }
        let a = &mut self.a;
        if size == 8 {
            a.mov(get_gpr32(sized(sc, 4)).unwrap_or(eax), 6)?;
            a.sarx(r64(sb), r64(full), r64(sc))?;
            a.lea(r64(sa), qword_ptr(r64(sa) + r64(sb) * 8))?;
        } else {
            let sc32 = get_gpr32(sized(sc, 4)).unwrap_or(eax);
            let sb32 = get_gpr32(sized(sb, 4)).unwrap_or(eax);
            a.mov(sc32, 5)?;
            a.sarx(sb32, get_gpr32(sized(full, 4)).unwrap_or(eax), sc32)?;
            a.movsxd(r64(sb), sb32)?;
            a.lea(r64(sa), qword_ptr(r64(sa) + r64(sb) * 4))?;
        }
        let slow = self.lookup_fast((sa, sb, sc), size, write, false, false)?;
        self.restore_rcx(SP_RCX)?;
        // The operand's own address again (guest rcx is back in place).
        self.ea_fast(i, sa, sb)?;
        self.a.add_instruction(no_ip(&ni))?;
        let mut back = self.a.create_label();
        self.defer_fast(slow, back, dn);
        self.a.set_label(&mut back)?;
        self.a.zero_bytes()?;
        Ok(true)
    }

    /// LEA: no memory access; rewrite RIP-relative forms and remap rsp/r15.
    fn lea(&mut self, i: &Instruction) -> R<bool> {
        let i = &self.host_form(i);
        let dst = i.op0_register();
        let size = dst.size();
        if i.memory_base() == Register::RIP || i.memory_base() == Register::EIP {
            let v = i.memory_displacement64() & crate::exec::mask(size);
            let d = if dst.full_register() == Register::RSP || dst.full_register() == Register::R15
            {
                None
            } else {
                Some(dst)
            };
            match (d, size) {
                (Some(d), 8) => self.a.mov(r64(d), v)?,
                (Some(d), 4) => self.a.mov(get_gpr32(d).unwrap_or(eax), v as u32)?,
                _ => return Ok(false),
            }
            return Ok(true);
        }
        self.remapped_plain(i)
    }

    /// A register-only whitelisted instruction, or one with a memory operand.
    fn native_insn(&mut self, dn: &DInsn) -> R<bool> {
        let i = &dn.insn;
        let mut mem = None;
        for n in 0..i.op_count() {
            match i.op_kind(n) {
                OpKind::Register => {
                    let r = i.op_register(n);
                    if !(r.is_gpr()
                        || r.is_xmm()
                            && self.sse
                            && (sse_whitelisted(i) || self.fp && sse_fp_whitelisted(i)))
                    {
                        return Ok(false);
                    }
                }
                OpKind::Memory => mem = Some(n),
                k if crate::exec::is_immediate(k) => {}
                _ => return Ok(false),
            }
        }
        let Some(n) = mem else {
            return self.remapped_plain(i);
        };
        let size = i.memory_size().size();
        let sse_mem = sse_whitelisted(i) || self.fp && sse_fp_whitelisted(i);
        let cx16 = i.mnemonic() == Mnemonic::Cmpxchg16b;
        if !(matches!(size, 1 | 2 | 4 | 8) || size == 16 && (sse_mem || cx16)) {
            return Ok(false);
        }
        // Legacy SSE m128 operands (and CMPXCHG16B's) must be 16-byte
        // aligned (#GP otherwise, which the helper raises); only the
        // explicitly unaligned moves are exempt.
        self.align16 = size == 16
            && !matches!(
                i.mnemonic(),
                Mnemonic::Movdqu | Mnemonic::Movups | Mnemonic::Movupd | Mnemonic::Lddqu
            );
        // BT* with a register bit offset addresses beyond the operand.
        if matches!(
            i.mnemonic(),
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
        ) && i.op1_kind() == OpKind::Register
        {
            return self.bt_mem(dn, i.mnemonic() != Mnemonic::Bt);
        }
        let info = self.info.info(i);
        if info.used_memory().len() != 1 {
            return Ok(false);
        }
        let access = info.used_memory()[0].access();
        let write = crate::exec::is_write(access);
        let _ = n;
        if self.native_mem_fast(dn, size, write, self.align16)? {
            self.align16 = false;
            return Ok(true);
        }
        self.sync_rcx()?;
        let used = self.used_full_regs(i);
        let avoid = self.prologue_avoid(&used);
        let uses_rsp = used.contains(&Register::RSP);
        let uses_r15 = used.contains(&Register::R15);
        let need = 3 + uses_rsp as usize + uses_r15 as usize;
        let Some(s) = self.pick(&avoid, need) else {
            return Ok(false);
        };
        let (sa, sb, sc) = (s[0], s[1], s[2]);
        let remap = Remap::new(&used, &s[3..]);
        // The rewritten instruction: memory operand [sa], rsp/r15 remapped.
        let ni = remap.rewrite_with_memory(i, sa, Register::None);
        if !encodable(&ni) {
            return Ok(false);
        }
        // The address computation, with rsp/r15 loaded into their remaps.
        let base = i.memory_base();
        let index = i.memory_index();
        let ea_abs = base == Register::RIP
            || base == Register::EIP
            || (base == Register::None && index == Register::None);
        let abs = if is64addr(i) {
            i.memory_displacement64()
        } else {
            i.memory_displacement64() & 0xffff_ffff
        };
        let lea = if ea_abs {
            None
        } else {
            let addr32 = !is64addr(i);
            let disp = if addr32 {
                i.memory_displacement32() as i64
            } else {
                i.memory_displacement64() as i64
            };
            let mo = MemoryOperand::new(
                remap.map(base),
                remap.map(index),
                i.memory_index_scale(),
                disp,
                if disp == 0 {
                    0
                } else if addr32 {
                    4
                } else {
                    8
                },
                false,
                Register::None,
            );
            let li = Instruction::with2(Code::Lea_r64_m, sa, mo)?;
            if !encodable(&li) {
                return Ok(false);
            }
            Some(li)
        };
        // Remaps are loaded before computing the address.
        self.remap_in(&remap)?;
        let seg = i.memory_segment();
        let slow = self.mem_prologue(
            sa,
            sb,
            sc,
            &|x: &mut CodeAssembler| match lea {
                Some(li) => x.add_instruction(no_ip(&li)),
                None => x.mov(r64(sa), abs),
            },
            seg,
            size,
            write,
        )?;
        self.align16 = false;
        self.a.add_instruction(no_ip(&ni))?;
        self.remap_out(&remap)?;
        self.a.mov(r64(sa), m(o_spill(SP_A)))?;
        let mut back = self.a.create_label();
        let mut restore = vec![(sa, SP_A), (sb, SP_B), (sc, SP_C)];
        restore.extend(remap.spills());
        self.defer_slow(slow, back, dn, restore)?;
        self.a.set_label(&mut back)?;
        self.a.zero_bytes()?;
        Ok(true)
    }

    /// Register-only instruction (or LEA without RIP): run as is, with
    /// guest rsp/r15 loaded into free host registers around it.
    fn remapped_plain(&mut self, i: &Instruction) -> R<bool> {
        let i = &self.host_form(i);
        let used = self.used_full_regs(i);
        let uses_rsp = used.contains(&Register::RSP);
        let uses_r15 = used.contains(&Register::R15);
        if !uses_rsp && !uses_r15 {
            if !encodable(i) {
                return Ok(false);
            }
            self.a.add_instruction(no_ip(i))?;
            return Ok(true);
        }
        // Implicit rsp users (push/pop/enter/...) are not handled here.
        let info = self.info.info(i);
        if !info.used_memory().is_empty() {
            return Ok(false);
        }
        // On the lookup scratch registers where the block parks them (they
        // hold nothing between instructions: no spill), else on free
        // registers spilled around the instruction.
        let scratch = self.free3().map(|(s0, s1, _)| vec![s0, s1]);
        let hosts = match scratch.clone() {
            Some(s) => s,
            None => {
                let mut avoid = used.clone();
                avoid.extend([Register::RSP, Register::R15]);
                let need = uses_rsp as usize + uses_r15 as usize;
                let Some(s) = self.pick(&avoid, need) else {
                    return Ok(false);
                };
                s
            }
        };
        let remap = Remap::new(&used, &hosts);
        let mut ni = *i;
        remap.rewrite_registers(&mut ni);
        // LEA's address registers (None for other instructions).
        ni.set_memory_base(remap.map(ni.memory_base()));
        ni.set_memory_index(remap.map(ni.memory_index()));
        // An implicit use of rsp/r15 that was not rewritten would run on
        // the host's registers: refuse.
        let still: Vec<Register> = self.used_full_regs(&ni);
        if still.contains(&Register::RSP) || still.contains(&Register::R15) {
            return Ok(false);
        }
        if !encodable(&ni) {
            return Ok(false);
        }
        if scratch.is_none() {
            self.remap_in(&remap)?;
            self.a.add_instruction(no_ip(&ni))?;
            self.remap_out(&remap)?;
            return Ok(true);
        }
        // The scratch holds nothing: load the guest register only if `i`
        // reads it (or writes 8 or 16 bits of it), store it only if `i`
        // writes it.
        count_event(&mut self.a, self.events, EV_REMAP)?;
        let info = self.info.info(i);
        let mut stores = Vec::new();
        for &(g, h, _) in remap.0.iter() {
            let (mut load, mut store) = (false, false);
            for u in info.used_registers() {
                if u.register().full_register() != g {
                    continue;
                }
                match u.access() {
                    OpAccess::Read | OpAccess::CondRead => load = true,
                    OpAccess::Write => {
                        store = true;
                        load |= u.register().size() < 4;
                    }
                    _ => (load, store) = (true, true),
                }
            }
            if load {
                self.a.mov(r64(h), m(o_gpr(gidx(g))))?;
            }
            if store {
                stores.push((g, h));
            }
        }
        self.a.add_instruction(no_ip(&ni))?;
        for (g, h) in stores {
            self.a.mov(m(o_gpr(gidx(g))), r64(h))?;
        }
        Ok(true)
    }

    /// Spill the remap registers and load guest rsp/r15 into them.
    fn remap_in(&mut self, remap: &Remap) -> R<()> {
        if !remap.0.is_empty() {
            count_event(&mut self.a, self.events, EV_REMAP)?;
        }
        for &(g, h, k) in remap.0.iter() {
            self.a.mov(m(o_spill(k)), r64(h))?;
            self.a.mov(r64(h), m(o_gpr(gidx(g))))?;
        }
        Ok(())
    }

    /// Store guest rsp/r15 back and restore the remap registers.
    fn remap_out(&mut self, remap: &Remap) -> R<()> {
        for &(g, h, k) in remap.0.iter() {
            self.a.mov(m(o_gpr(gidx(g))), r64(h))?;
            self.a.mov(r64(h), m(o_spill(k)))?;
        }
        Ok(())
    }
}

/// Guest rsp and r15 have no host register of their own: around one
/// instruction they are mapped to free host registers, as
/// (guest, host, spill slot of the host register's guest value).
struct Remap(Vec<(Register, Register, usize)>);

impl Remap {
    /// Map whichever of rsp/r15 `used` names onto `free` (in order).
    fn new(used: &[Register], free: &[Register]) -> Remap {
        let mut v = Vec::new();
        let mut free = free.iter();
        for (g, slot) in [(Register::RSP, SP_R1), (Register::R15, SP_R2)] {
            if used.contains(&g) {
                if let Some(&h) = free.next() {
                    v.push((g, h, slot));
                }
            }
        }
        Remap(v)
    }

    /// `r` with rsp/r15 replaced by their host register of the same size.
    fn map(&self, r: Register) -> Register {
        if r == Register::None {
            return r;
        }
        match self.0.iter().find(|(g, _, _)| *g == r.full_register()) {
            Some(&(_, h, _)) => sized(h, r.size()),
            None => r,
        }
    }

    /// Rewrite the explicit register operands.
    fn rewrite_registers(&self, ni: &mut Instruction) {
        for n in 0..ni.op_count() {
            if ni.op_kind(n) == OpKind::Register {
                ni.set_op_register(n, self.map(ni.op_register(n)));
            }
        }
    }

    /// `i` with rsp/r15 operands remapped and its memory operand replaced
    /// by `[base + index]` (a host pointer, no segment).
    fn rewrite_with_memory(&self, i: &Instruction, base: Register, index: Register) -> Instruction {
        let mut ni = *i;
        self.rewrite_registers(&mut ni);
        ni.set_memory_base(base);
        ni.set_memory_index(index);
        ni.set_memory_index_scale(1);
        ni.set_memory_displacement64(0);
        ni.set_memory_displ_size(0);
        ni.set_segment_prefix(Register::None);
        ni
    }

    fn spills(&self) -> Vec<(Register, usize)> {
        self.0.iter().map(|&(_, h, k)| (h, k)).collect()
    }
}

/// The stack slot a [`Tx::stack_op`] accesses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StackSlot {
    /// `[rsp - 8]`
    Push,
    /// `[rsp]`
    Pop,
    /// `[rbp]` (LEAVE)
    Rbp,
}

/// `i` without its address: the block assembler reads a non-zero ip as
/// a label.
fn no_ip(i: &Instruction) -> Instruction {
    let mut n = *i;
    n.set_ip(0);
    n
}

#[derive(Clone, Copy)]
enum PushSrc {
    Imm(u64),
    Reg(Register),
    /// A value already loaded into this spill slot (PUSH m64).
    Spill(usize),
}

/// The address of `i`'s memory operand (64-bit addressing), segment base
/// not included, into `sa`; guest rsp/r15 are read from CpuState through
/// `sa` (base) and `sb` (index). With `rcx_in`, guest rcx is in that
/// register (the keeper, see `Tx::rcx_out`), not in rcx. Flag-free.
fn ea_no_seg(
    x: &mut CodeAssembler,
    i: &Instruction,
    sa: Register,
    sb: Register,
    rcx_in: Option<Register>,
) -> R<()> {
    let base = rcx_home(i.memory_base(), rcx_in);
    let index = rcx_home(i.memory_index(), rcx_in);
    let disp = i.memory_displacement64() as i64;
    if base == Register::RIP || base == Register::None && index == Register::None {
        return x.mov(r64(sa), i.memory_displacement64());
    }
    let mut b = base;
    let mut ix = index;
    if b == Register::RSP || b == Register::R15 {
        x.mov(r64(sa), m(o_gpr(gidx(b))))?;
        b = sa;
    }
    if ix == Register::R15 {
        x.mov(r64(sb), m(o_gpr(gidx(ix))))?;
        ix = sb;
    }
    // A plain [reg] operand passed in place (see `plain_base`) already
    // holds the address.
    if !(b == sa && ix == Register::None && disp == 0) {
        let mo = MemoryOperand::new(
            b,
            ix,
            i.memory_index_scale(),
            disp,
            if disp == 0 { 0 } else { 8 },
            false,
            Register::None,
        );
        let li = Instruction::with2(Code::Lea_r64_m, sa, mo)?;
        x.add_instruction(no_ip(&li))?;
    }
    Ok(())
}

/// Where guest register `r` is: in `rcx_in` (the keeper) when that holds
/// guest rcx and `r` is rcx, else in itself.
fn rcx_home(r: Register, rcx_in: Option<Register>) -> Register {
    match rcx_in {
        Some(k) if r == Register::RCX => k,
        _ => r,
    }
}

fn is64addr(i: &Instruction) -> bool {
    let b = i.memory_base();
    let x = i.memory_index();
    !(b.is_gpr32() || x.is_gpr32() || b == Register::EIP)
}

/// Save flags into ax without storing them (guest rax already spilled).
fn save_flags_only(a: &mut CodeAssembler) -> R<()> {
    a.lahf()?;
    a.seto(al)?;
    Ok(())
}

/// NOPs and hints, translated to nothing: multi-byte NOPs have a memory
/// operand that is never accessed; prefetches are hints that never fault.
fn hint_only(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        Mnemonic::Nop
            | Mnemonic::Endbr64
            | Mnemonic::Pause
            | Mnemonic::Prefetcht0
            | Mnemonic::Prefetcht1
            | Mnemonic::Prefetcht2
            | Mnemonic::Prefetchnta
            | Mnemonic::Prefetchw
    )
}

/// `i` with the keeper `k` for every rcx among its register operands (and
/// in a LEA's address), where it has such a form: not CH, not CL as a
/// shift count.
fn rcx_renamed(i: &Instruction, k: Register) -> Option<Instruction> {
    let mut ni = *i;
    let to_k = |r: Register| match r.full_register() == Register::RCX {
        true => sized(k, r.size()),
        false => r,
    };
    for n in 0..ni.op_count() {
        if ni.op_kind(n) == OpKind::Register {
            let r = ni.op_register(n);
            if r == Register::CH || r == Register::CL && shifts_by_cl(i) {
                return None;
            }
            ni.set_op_register(n, to_k(r));
        }
    }
    if ni.mnemonic() == Mnemonic::Lea {
        ni.set_memory_base(to_k(ni.memory_base()));
        ni.set_memory_index(to_k(ni.memory_index()));
    }
    Some(ni)
}

/// Shifts and rotates, whose CL count operand is fixed.
fn shifts_by_cl(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        Mnemonic::Shl
            | Mnemonic::Sal
            | Mnemonic::Shr
            | Mnemonic::Sar
            | Mnemonic::Rol
            | Mnemonic::Ror
            | Mnemonic::Rcl
            | Mnemonic::Rcr
            | Mnemonic::Shld
            | Mnemonic::Shrd
    )
}

fn encodable(i: &Instruction) -> bool {
    thread_local! {
        static ENC: std::cell::RefCell<Encoder> = std::cell::RefCell::new(Encoder::new(64));
    }
    ENC.with(|e| {
        let mut e = e.borrow_mut();
        let ok = e.encode(i, 0x1000).is_ok();
        let _ = e.take_buffer();
        ok
    })
}

/// Conditional branch `i`, followed in its block by `next`, goes on
/// there when taken: a trace made it so (a decoded block goes on past a
/// conditional branch only when it is not taken). A branch to the next
/// instruction goes on there either way, as a side exit.
fn followed_taken(i: &Instruction, next: &Instruction) -> bool {
    let t = i.near_branch_target();
    next.ip() == t && t != i.next_ip()
}

fn jcc(a: &mut CodeAssembler, cc: ConditionCode, l: CodeLabel) -> R<()> {
    match cc {
        ConditionCode::o => a.jo(l),
        ConditionCode::no => a.jno(l),
        ConditionCode::b => a.jb(l),
        ConditionCode::ae => a.jae(l),
        ConditionCode::e => a.je(l),
        ConditionCode::ne => a.jne(l),
        ConditionCode::be => a.jbe(l),
        ConditionCode::a => a.ja(l),
        ConditionCode::s => a.js(l),
        ConditionCode::ns => a.jns(l),
        ConditionCode::p => a.jp(l),
        ConditionCode::np => a.jnp(l),
        ConditionCode::l => a.jl(l),
        ConditionCode::ge => a.jge(l),
        ConditionCode::le => a.jle(l),
        ConditionCode::g => a.jg(l),
        ConditionCode::None => a.jmp(l),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::Decoder;

    /// A guard made from the template checks the TLB entry of its own
    /// target's page against that page and physical page, and stores its
    /// own target when it fails; both jmps sit where the template says.
    #[test]
    fn guard_instances_carry_their_target() {
        let t = GuardTemplate::new(false).expect("guard template");
        for (target, ppn) in [(0xffff_ffff_8123_4567u64, 0x1_2345), (0x40_1000, 7)] {
            let code = t.instance(target, ppn);
            let insns: Vec<Instruction> = Decoder::new(64, &code, 0).into_iter().collect();
            let at = 64 * (target >> 12 & (crate::mmu::TLB_SIZE as u64 - 1));
            let loads: Vec<u64> = insns
                .iter()
                .filter(|i| i.code() == Code::Mov_r64_rm64 && i.memory_base() == Register::RDX)
                .map(|i| i.memory_displacement64())
                .collect();
            let tag = at + offset_of!(TlbEntry, exec_tag) as u64;
            let page = at + offset_of!(TlbEntry, ppn) as u64;
            assert_eq!(loads, [tag, page]);
            let imms: Vec<u64> = insns
                .iter()
                .filter(|i| i.code() == Code::Mov_r64_imm64)
                .map(|i| i.immediate64())
                .collect();
            assert_eq!(imms, [(target >> 12).wrapping_neg(), target]);
            let leas: Vec<u64> = insns
                .iter()
                .filter(|i| i.code() == Code::Lea_r64_m && i.memory_index() == Register::None)
                .map(|i| i.memory_displacement64())
                .collect();
            assert_eq!(leas, [-(ppn as i64) as u64]);
            assert_eq!((code[t.to_entry], code[t.to_jc]), (0xe9, 0xe9));
        }
    }

    /// `code`, assembled at 0x400000, as one block.
    fn block_of(code: &[u8]) -> Block {
        let mut d = Decoder::with_ip(64, code, 0x40_0000, iced_x86::DecoderOptions::NONE);
        let insns: Vec<DInsn> = d
            .iter()
            .map(|insn| DInsn {
                handler: crate::exec::handler_for(&insn),
                insn,
            })
            .collect();
        Block {
            lin_pc: 0x40_0000,
            phys_pc: 0x40_0000,
            bitness: 64,
            pages: [(0x400, 0), (u64::MAX, 0)],
            insns: insns.into_boxed_slice(),
            jit_entry: Default::default(),
            heat: Default::default(),
            exits: Default::default(),
        }
    }

    /// Translate `code` as one block; returns (native, helper) counts.
    fn counts(code: &[u8]) -> (u32, u32) {
        let block = block_of(code);
        let gen = 0u32;
        let stubs = Stubs {
            enter: 0x1000,
            exit: 0x1100,
            indirect: 0x1200,
            helper: 0x1300,
        };
        let t = translate(
            &block,
            &[(&gen as *const u32, 0)],
            stubs,
            0x2000,
            Opts {
                sse: true,
                fp: true,
                bmi2: true,
                groups: true,
                events: false,
            },
        )
        .expect("translates");
        eprintln!("helpers: {:?}", t.helper_codes);
        (t.native, t.helpers)
    }

    fn asm(f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        f(&mut a);
        a.assemble(0x40_0000).unwrap()
    }

    #[test]
    fn common_memory_forms_run_natively() {
        let code = asm(|a| {
            a.mov(rax, qword_ptr(rbx + 8)).unwrap();
            a.mov(qword_ptr(rsp + 0x10), rcx).unwrap();
            a.mov(rdx, qword_ptr(r15 + rax * 8 - 0x100)).unwrap();
            a.add(dword_ptr(0x40_1234u64), 1).unwrap();
            a.movzx(eax, byte_ptr(rdi + rsi)).unwrap();
            a.mov(r8, qword_ptr(0x1000u64).gs()).unwrap();
            a.cmp(qword_ptr(rbp - 8), r15).unwrap();
            a.lock().xadd(qword_ptr(rbx), rax).unwrap();
            a.nop_1(dword_ptr(rax + rax)).unwrap();
            a.lea(rsp, qword_ptr(rsp + 0x20)).unwrap();
            a.push(r15).unwrap();
            a.pop(rbx).unwrap();
            a.ret().unwrap();
        });
        let (native, helpers) = counts(&code);
        assert_eq!(
            helpers, 0,
            "every instruction above has a native translation"
        );
        assert_eq!(native, 13);
    }

    #[test]
    fn signed_division_and_system_instructions_use_helpers() {
        let code = asm(|a| {
            a.idiv(rcx).unwrap();
            a.rdtsc().unwrap();
        });
        let (_, helpers) = counts(&code);
        assert_eq!(helpers, 2);
    }

    #[test]
    fn common_kernel_instructions_have_inline_forms() {
        let code = asm(|a| {
            a.pushfq().unwrap();
            a.cli().unwrap();
            a.div(rcx).unwrap();
            a.div(qword_ptr(rbx + 8)).unwrap();
            a.div(ecx).unwrap();
            a.bt(qword_ptr(rdi), rsi).unwrap();
            a.lock().bts(qword_ptr(rdi + 16), rsi).unwrap();
            a.btr(dword_ptr(rdi), esi).unwrap();
            a.mov(eax, ds).unwrap();
            a.lfence().unwrap();
            a.lock().cmpxchg16b(xmmword_ptr(rdi)).unwrap();
            a.leave().unwrap();
            a.sti().unwrap();
        });
        let (native, helpers) = counts(&code);
        assert_eq!(helpers, 0, "no helper for these");
        assert_eq!(native, 13);
        let code = asm(|a| a.call(qword_ptr(rax + 0x10)).unwrap());
        assert_eq!(counts(&code), (1, 0));
    }

    /// Groups that find no free register keep their address in spill
    /// slots, one per group live at a time, and get registers while there
    /// are some: quicksort's partition step (`[rdi]`, `[rdi+4]` and
    /// `[r8]`, `[r8-4]`, the two ranges overlapping in time) with none,
    /// one and two free registers.
    #[test]
    fn groups_without_registers_get_spill_slots() {
        use iced_x86::code_asm::*;
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(edx, dword_ptr(rdi)).unwrap();
        a.mov(esi, dword_ptr(r8)).unwrap();
        a.cmp(edx, esi).unwrap();
        a.mov(eax, dword_ptr(rdi + 4)).unwrap();
        a.mov(ebx, dword_ptr(r8 - 4)).unwrap();
        a.mov(dword_ptr(rdi + 4), ebx).unwrap();
        a.mov(dword_ptr(r8 - 4), eax).unwrap();
        a.mov(dword_ptr(rdi + 0x800), eax).unwrap(); // a group of its own
        a.mov(ecx, dword_ptr(rdi + 0x804)).unwrap();
        a.ret().unwrap();
        let block = block_of(&a.assemble(0x40_0000).unwrap());
        let homes = |free: &[Register]| -> Vec<(usize, Home)> {
            let mut info = InstructionInfoFactory::new();
            plan_groups(&block, &mut info, true, true, free, false)
                .0
                .iter()
                .map(|g| (g.head(), g.home))
                .collect()
        };
        let slot = |k: usize| Home::Slot(SP_GROUP0 + k);
        // Heads: [rdi] at 0, [r8] at 1, [rdi+0x800] at 7 (after the first
        // two have ended: it takes the first slot or register again).
        assert_eq!(homes(&[]), [(0, slot(0)), (1, slot(1)), (7, slot(0))]);
        let (x, y) = (Register::R11, Register::R14);
        assert_eq!(
            homes(&[x]),
            [(0, Home::Reg(x)), (1, slot(0)), (7, Home::Reg(x))]
        );
        assert_eq!(
            homes(&[x, y]),
            [(0, Home::Reg(x)), (1, Home::Reg(y)), (7, Home::Reg(x))]
        );
    }

    /// The group planner's registers: copies, LEA, ADD/SUB of an
    /// immediate or a register, shifts and INC/DEC give sums of the
    /// starting values; anything else written gets a value of its own.
    #[test]
    fn planner_follows_register_sums() {
        use iced_x86::code_asm::*;
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(rax, rdi).unwrap(); // rax = rdi
        a.lea(rsi, qword_ptr(rdi + rbx * 4 + 8)).unwrap(); // rdi + 4 rbx + 8
        a.add(rax, 16).unwrap(); // rdi + 16
        a.sub(rsi, rbx).unwrap(); // rdi + 3 rbx + 8
        a.shl(rbx, 3).unwrap(); // 8 rbx
        a.dec(rdi).unwrap(); // rdi - 1
        a.add(ecx, 1).unwrap(); // 32-bit: not followed
        a.mov(rdx, qword_ptr(rax)).unwrap(); // loaded: not followed
        let code = a.assemble(0).unwrap();
        let mut info = InstructionInfoFactory::new();
        let mut regs = Regs::new();
        for i in Decoder::new(64, &code, 0).into_iter() {
            let written: Vec<Register> = info
                .info(&i)
                .used_registers()
                .iter()
                .filter(|u| matches!(u.access(), OpAccess::Write | OpAccess::ReadWrite))
                .map(|u| u.register().full_register())
                .collect();
            regs.step(&i, &written);
        }
        let sym = |r: Register| gidx(r) as u32;
        let lin = |terms: &[(Register, i64)], k: i64| Lin {
            terms: terms
                .iter()
                .enumerate()
                .fold(Terms::EMPTY, |mut t, (j, &(r, c))| {
                    t.insert(j, (sym(r), c));
                    t
                }),
            k,
        };
        assert_eq!(regs.r[gidx(Register::RAX)], lin(&[(Register::RDI, 1)], 16));
        assert_eq!(
            regs.r[gidx(Register::RSI)],
            lin(&[(Register::RBX, 3), (Register::RDI, 1)], 8)
        );
        assert_eq!(regs.r[gidx(Register::RBX)], lin(&[(Register::RBX, 8)], 0));
        assert_eq!(regs.r[gidx(Register::RDI)], lin(&[(Register::RDI, 1)], -1));
        for r in [Register::RCX, Register::RDX] {
            let v = &regs.r[gidx(r)];
            assert!(
                v.terms.len() == 1 && v.terms[0].0 >= 16 && v.k == 0,
                "{r:?}: {v:?}"
            );
        }
        assert_eq!(
            regs.addr(Register::RSI, Register::RBX, 2, -8),
            Some(lin(&[(Register::RBX, 19), (Register::RDI, 1)], 0))
        );
        regs.forget();
        assert!(regs.r.iter().all(|v| v.terms[0].0 >= 16));
    }
}
