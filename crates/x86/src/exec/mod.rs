//! Instruction semantics, one module per family. A handler is chosen once
//! per instruction at decode time (`handler_for`) and cached in the block.

use iced_x86::{ConditionCode, FlowControl, Instruction, Mnemonic, OpKind, Register};

use crate::cpu::Cpu;
use crate::exception::{Fault, XResult};
use crate::state::flags::*;

pub mod alu;
pub mod control;
pub mod data;
pub mod sse;
pub mod string;
pub mod system;
pub mod x87;

pub type Handler = fn(&mut Cpu, &Instruction) -> XResult<()>;

/// Pick the handler for a decoded instruction.
pub fn handler_for(i: &Instruction) -> Handler {
    if i.is_invalid() {
        return op_ud;
    }
    alu::lookup(i)
        .or_else(|| data::lookup(i))
        .or_else(|| control::lookup(i))
        .or_else(|| string::lookup(i))
        .or_else(|| system::lookup(i))
        .or_else(|| sse::lookup(i))
        .or_else(|| x87::lookup(i))
        .unwrap_or(op_unimplemented)
}

/// Block enders after which only the next instruction's fetch must be
/// redone (its mapping and bytes checked again): nothing else the rest of
/// the block was decoded under has changed. Translated code goes on
/// through the next block's guard or jump cache and its page check
/// instead of leaving for the dispatcher.
pub fn refetch_only(i: &Instruction) -> bool {
    matches!(i.mnemonic(), Mnemonic::Invlpg | Mnemonic::Serialize)
}

/// Instructions after which the rest of a block must not run with the
/// state it was decoded under (mode, paging, interrupt flag changes).
pub fn ends_block(i: &Instruction) -> bool {
    use Mnemonic::*;
    matches!(
        i.mnemonic(),
        Mov | Pop
            | Lgdt
            | Lidt
            | Lldt
            | Ltr
            | Lmsw
            | Clts
            | Invlpg
            | Wrmsr
            | Sti
            | Popf
            | Popfd
            | Popfq
            | Hlt
            | Cpuid
            | Xsetbv
            | Fxrstor
            | Fxrstor64
            | Xrstor
            | Xrstor64
            | Swapgs
            | Serialize
            | Wbinvd
            | Invd
            | Rsm
            | Lss
            | Lfs
            | Lgs
            | Lds
            | Les
            | In
            | Out
            | Insb
            | Insw
            | Insd
            | Outsb
            | Outsw
            | Outsd
    ) && (i.mnemonic() != Mov || is_sys_mov(i))
        && (i.mnemonic() != Pop
            || i.op0_kind() == OpKind::Register && i.op0_register().is_segment_register())
}

/// A conditional near branch a decoded block may go on past (a side exit
/// when taken): Jcc, not the rcx-testing forms (JRCXZ, LOOP...), which the
/// translator hands to the interpreter. The translator runs exactly these
/// as host Jcc.
pub fn side_exit(i: &Instruction) -> bool {
    i.flow_control() == FlowControl::ConditionalBranch
        && matches!(i.op0_kind(), OpKind::NearBranch64)
        && i.condition_code() != ConditionCode::None
        && !matches!(
            i.mnemonic(),
            Mnemonic::Jrcxz | Mnemonic::Jecxz | Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne
        )
}

/// An access that may write (a register or memory operand).
pub fn is_write(a: iced_x86::OpAccess) -> bool {
    use iced_x86::OpAccess;
    matches!(
        a,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}

/// An immediate operand, of any width.
pub fn is_immediate(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// The general registers an instruction names explicitly (operands and
/// address registers), as a mask of their numbers.
pub fn named_gprs(i: &Instruction) -> u16 {
    let bit = |r: Register| {
        if r.is_gpr() {
            1u16 << (r.full_register().number() & 15)
        } else {
            0
        }
    };
    let mut m = bit(i.memory_base()) | bit(i.memory_index());
    for n in 0..i.op_count() {
        if i.op_kind(n) == OpKind::Register {
            m |= bit(i.op_register(n));
        }
    }
    m
}

/// MOV to or from a control or debug register, or to a segment register
/// (reading a selector changes nothing).
fn is_sys_mov(i: &Instruction) -> bool {
    (0..i.op_count()).any(|n| {
        i.op_kind(n) == OpKind::Register && {
            let r = i.op_register(n);
            r.is_cr() || r.is_dr() || n == 0 && r.is_segment_register()
        }
    })
}

pub fn op_ud(_: &mut Cpu, _: &Instruction) -> XResult<()> {
    Err(Fault::ud())
}

fn op_unimplemented(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    cpu.stats.unimplemented += 1;
    let name = format!("{:?}", i.code());
    if cpu.unimpl_seen.insert(name.clone()) {
        tracing::warn!(code = %name, rip = format_args!("{:#x}", cpu.s.rip), "unimplemented instruction: #UD");
    }
    Err(Fault::ud())
}

// -------------------------------------------------------------------
// Operand access shared by every family.
// -------------------------------------------------------------------

/// Mask for an operand of `size` bytes.
#[inline(always)]
pub fn mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// Sign-extend the low `size` bytes of `v`.
#[inline(always)]
pub fn sext(v: u64, size: usize) -> u64 {
    match size {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}

/// Index into `gpr` and the kind of sub-register access.
#[inline(always)]
fn gpr_slot(r: Register) -> (usize, u8) {
    let n = r as u32;
    let al = Register::AL as u32;
    let ax = Register::AX as u32;
    let eax = Register::EAX as u32;
    let rax = Register::RAX as u32;
    if n >= rax && n < rax + 16 {
        ((n - rax) as usize, 8)
    } else if n >= eax && n < eax + 16 {
        ((n - eax) as usize, 4)
    } else if n >= ax && n < ax + 16 {
        ((n - ax) as usize, 2)
    } else {
        // AL CL DL BL AH CH DH BH SPL BPL SIL DIL R8L..R15L
        let k = n - al;
        if (4..8).contains(&k) {
            ((k - 4) as usize, 0) // high byte
        } else if k < 4 {
            (k as usize, 1)
        } else {
            ((k - 4) as usize, 1)
        }
    }
}

impl Cpu {
    /// Read a general register (zero-extended).
    #[inline(always)]
    pub fn gpr(&self, r: Register) -> u64 {
        let (idx, kind) = gpr_slot(r);
        let v = self.s.gpr[idx];
        match kind {
            8 => v,
            4 => v & 0xffff_ffff,
            2 => v & 0xffff,
            1 => v & 0xff,
            _ => (v >> 8) & 0xff,
        }
    }

    /// Write a general register with x86-64 merge rules (32-bit writes
    /// zero-extend, 8/16-bit writes merge).
    #[inline(always)]
    pub fn set_gpr(&mut self, r: Register, v: u64) {
        let (idx, kind) = gpr_slot(r);
        let old = self.s.gpr[idx];
        self.s.gpr[idx] = match kind {
            8 => v,
            4 => v & 0xffff_ffff,
            2 => (old & !0xffff) | (v & 0xffff),
            1 => (old & !0xff) | (v & 0xff),
            _ => (old & !0xff00) | ((v & 0xff) << 8),
        };
    }

    /// Register by index with an operand size (for implicit operands).
    #[inline(always)]
    pub fn reg_sized(&self, idx: usize, size: usize) -> u64 {
        self.s.gpr[idx] & mask(size)
    }

    #[inline(always)]
    pub fn set_reg_sized(&mut self, idx: usize, size: usize, v: u64) {
        let old = self.s.gpr[idx];
        self.s.gpr[idx] = match size {
            8 => v,
            4 => v & 0xffff_ffff,
            _ => (old & !mask(size)) | (v & mask(size)),
        };
    }

    /// Address size in bytes of the instruction's memory operand.
    #[inline(always)]
    pub fn addr_size(&self, i: &Instruction) -> usize {
        let b = i.memory_base();
        if b != Register::None {
            return match b {
                Register::RIP => 8,
                Register::EIP => 4,
                _ => b.size(),
            };
        }
        let x = i.memory_index();
        if x != Register::None {
            return x.size();
        }
        match i.memory_displ_size() {
            2 => 2,
            4 => 4,
            8 => 8,
            _ => self.default_addr_size(),
        }
    }

    #[inline(always)]
    pub fn default_addr_size(&self) -> usize {
        match self.s.bitness() {
            64 => 8,
            32 => 4,
            _ => 2,
        }
    }

    /// Effective address (offset within the segment) of the memory operand.
    #[inline(always)]
    pub fn ea(&self, i: &Instruction) -> u64 {
        let mut a = i.memory_displacement64();
        let b = i.memory_base();
        if b != Register::None && b != Register::RIP && b != Register::EIP {
            a = a.wrapping_add(self.gpr(b));
        }
        let x = i.memory_index();
        if x != Register::None {
            a = a.wrapping_add(self.gpr(x) << i.memory_index_scale().trailing_zeros());
        }
        a & mask(self.addr_size(i))
    }

    /// Linear address of the memory operand.
    #[inline(always)]
    pub fn mem_lin(&self, i: &Instruction) -> u64 {
        let seg = seg_index(i.memory_segment());
        self.mask_lin(self.seg_base(seg).wrapping_add(self.ea(i)))
    }

    /// Size in bytes of operand `n`.
    #[inline(always)]
    pub fn op_size(&self, i: &Instruction, n: u32) -> usize {
        match i.op_kind(n) {
            OpKind::Register => i.op_register(n).size(),
            OpKind::Memory => i.memory_size().size(),
            OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
            OpKind::Immediate16 => 2,
            OpKind::Immediate32 => 4,
            _ => 8,
        }
    }

    /// Read operand `n` zero-extended to 64 bits (immediates are sign-
    /// extended to 64 bits by the decoder; callers mask to their size).
    #[inline(always)]
    pub fn read_op(&mut self, i: &Instruction, n: u32) -> XResult<u64> {
        match i.op_kind(n) {
            OpKind::Register => Ok(self.gpr(i.op_register(n))),
            OpKind::Memory => {
                let lin = self.mem_lin(i);
                self.read_sized(lin, i.memory_size().size())
            }
            _ => Ok(i.immediate(n)),
        }
    }

    /// Write operand `n` (register or memory).
    #[inline(always)]
    pub fn write_op(&mut self, i: &Instruction, n: u32, v: u64) -> XResult<()> {
        match i.op_kind(n) {
            OpKind::Register => {
                self.set_gpr(i.op_register(n), v);
                Ok(())
            }
            _ => {
                let lin = self.mem_lin(i);
                self.write_sized(lin, i.memory_size().size(), v)
            }
        }
    }

    /// Replace the status flags selected by `which`.
    #[inline(always)]
    pub fn set_flags(&mut self, which: u64, new: u64) {
        self.s.rflags = (self.s.rflags & !which) | (new & which);
    }

    #[inline(always)]
    pub fn flag(&self, f: u64) -> bool {
        self.s.rflags & f != 0
    }

    /// Evaluate a condition code against RFLAGS.
    #[inline(always)]
    pub fn cond(&self, cc: ConditionCode) -> bool {
        let f = self.s.rflags;
        let cf = f & CF != 0;
        let zf = f & ZF != 0;
        let sf = f & SF != 0;
        let of = f & OF != 0;
        let pf = f & PF != 0;
        match cc {
            ConditionCode::o => of,
            ConditionCode::no => !of,
            ConditionCode::b => cf,
            ConditionCode::ae => !cf,
            ConditionCode::e => zf,
            ConditionCode::ne => !zf,
            ConditionCode::be => cf || zf,
            ConditionCode::a => !cf && !zf,
            ConditionCode::s => sf,
            ConditionCode::ns => !sf,
            ConditionCode::p => pf,
            ConditionCode::np => !pf,
            ConditionCode::l => sf != of,
            ConditionCode::ge => sf == of,
            ConditionCode::le => zf || sf != of,
            ConditionCode::g => !zf && sf == of,
            ConditionCode::None => true,
        }
    }

    /// Operand size of the instruction's main operation for stack-like
    /// implicit operands (PUSH imm, CALL, RET...): 2, 4 or 8.
    #[inline(always)]
    pub fn stack_op_size(&self, i: &Instruction) -> usize {
        let s = i.stack_pointer_increment().unsigned_abs() as usize;
        if s == 2 || s == 4 || s == 8 {
            s
        } else if self.s.mode64() {
            8
        } else if self.s.bitness() == 32 {
            4
        } else {
            2
        }
    }

    /// Atomic (LOCK) or plain read-modify-write of the memory operand.
    /// `f` maps the old value to (new value, flags); returns the old value
    /// and flags of the successful update.
    pub fn rmw_mem(
        &mut self,
        i: &Instruction,
        size: usize,
        mut f: impl FnMut(u64) -> (u64, u64),
    ) -> XResult<(u64, u64)> {
        let lin = self.mem_lin(i);
        if i.has_lock_prefix() {
            if let Some(p) = self.atomic_host_ptr(lin, size)? {
                // SAFETY: `p` points into guest RAM, aligned for `size`,
                // within one page; atomics make the update indivisible
                // with respect to other vCPUs.
                return Ok(unsafe { atomic_rmw(p, size, &mut f) });
            }
        }
        let old = self.read_sized(lin, size)?;
        let (new, fl) = f(old);
        self.write_sized(lin, size, new)?;
        Ok((old, fl))
    }
}

/// # Safety
/// `p` must be valid for `size` bytes and aligned to `size`.
unsafe fn atomic_rmw(p: *mut u8, size: usize, f: &mut impl FnMut(u64) -> (u64, u64)) -> (u64, u64) {
    use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering::SeqCst};
    macro_rules! cas_loop {
        ($at:ty, $t:ty) => {{
            let a = &*(p as *const $at);
            let mut old = a.load(SeqCst);
            loop {
                let (new, fl) = f(old as u64);
                match a.compare_exchange(old, new as $t, SeqCst, SeqCst) {
                    Ok(_) => break (old as u64, fl),
                    Err(cur) => old = cur,
                }
            }
        }};
    }
    match size {
        1 => cas_loop!(AtomicU8, u8),
        2 => cas_loop!(AtomicU16, u16),
        4 => cas_loop!(AtomicU32, u32),
        _ => cas_loop!(AtomicU64, u64),
    }
}

/// iced segment register → state index.
#[inline(always)]
pub fn seg_index(r: Register) -> usize {
    match r {
        Register::ES => 0,
        Register::CS => 1,
        Register::SS => 2,
        Register::DS => 3,
        Register::FS => 4,
        Register::GS => 5,
        _ => 3,
    }
}
