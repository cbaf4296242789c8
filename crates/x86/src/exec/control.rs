//! Near control transfers: JMP, Jcc, CALL, RET, LOOP, JrCXZ, INT n.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::{mask, Handler};
use crate::cpu::Cpu;
use crate::exception::{Fault, XResult};
use crate::mmu::canonical;
use crate::state::flags::*;

pub fn lookup(i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    Some(match i.mnemonic() {
        Jmp if !is_far(i) => jmp,
        Jo | Jno | Jb | Jae | Je | Jne | Jbe | Ja | Js | Jns | Jp | Jnp | Jl | Jge | Jle | Jg => {
            jcc
        }
        Call if !is_far(i) => call,
        Ret => ret,
        Loop | Loope | Loopne => loop_,
        Jcxz | Jecxz | Jrcxz => jcxz,
        Int => |c, i| c.software_interrupt(i.immediate8()),
        Int3 => |c, _| c.software_interrupt(crate::exception::BP),
        Into => |c, _| {
            if c.s.mode64() {
                return Err(Fault::ud());
            }
            if c.flag(OF) {
                c.software_interrupt(crate::exception::OF)
            } else {
                Ok(())
            }
        },
        Int1 => |c, _| c.software_interrupt(crate::exception::DB),
        Ud0 | Ud1 | Ud2 => super::op_ud,
        _ => return None,
    })
}

fn is_far(i: &Instruction) -> bool {
    use iced_x86::MemorySize::*;
    matches!(i.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32)
        || (i.op0_kind() == OpKind::Memory
            && matches!(i.memory_size(), SegPtr16 | SegPtr32 | SegPtr64))
}

/// Operand size of a near branch target (2, 4 or 8).
#[inline(always)]
fn branch_size(cpu: &Cpu, i: &Instruction) -> usize {
    match i.op0_kind() {
        OpKind::NearBranch16 => 2,
        OpKind::NearBranch32 => 4,
        OpKind::NearBranch64 => 8,
        OpKind::Register => i.op0_register().size(),
        OpKind::Memory => i.memory_size().size(),
        _ => cpu.default_addr_size(),
    }
}

/// Set the branch target, enforcing canonical form in 64-bit mode and the
/// CS limit elsewhere (approximated by operand-size truncation).
#[inline(always)]
fn branch_to(cpu: &mut Cpu, target: u64, size: usize) -> XResult<()> {
    let t = target & mask(size);
    if cpu.s.mode64() && !canonical(t) {
        return Err(Fault::gp0());
    }
    cpu.next_rip = t;
    Ok(())
}

fn target(cpu: &mut Cpu, i: &Instruction) -> XResult<u64> {
    match i.op0_kind() {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
            Ok(i.near_branch_target())
        }
        _ => cpu.read_op(i, 0),
    }
}

fn jmp(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let t = target(cpu, i)?;
    branch_to(cpu, t, branch_size(cpu, i))
}

fn jcc(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    if cpu.cond(i.condition_code()) {
        branch_to(cpu, i.near_branch_target(), branch_size(cpu, i))
    } else {
        Ok(())
    }
}

fn call(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.stack_op_size(i);
    let t = target(cpu, i)?;
    let ret = cpu.next_rip;
    // Check the target before pushing so a bad target leaves RSP intact.
    if cpu.s.mode64() && !canonical(t & mask(size)) {
        return Err(Fault::gp0());
    }
    cpu.push(size, ret)?;
    branch_to(cpu, t, size)
}

fn ret(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.stack_op_size(i);
    let t = cpu.peek(size, 0)?;
    if cpu.s.mode64() && !canonical(t) {
        return Err(Fault::gp0());
    }
    cpu.pop(size)?;
    if i.op_count() > 0 {
        let extra = i.immediate16() as u64;
        let sz = cpu.stack_addr_size();
        let sp = cpu.reg_sized(4, sz).wrapping_add(extra);
        cpu.set_reg_sized(4, sz, sp);
    }
    cpu.next_rip = t & mask(size);
    Ok(())
}

/// Count register width for LOOP/JrCXZ is the address size.
fn count_size(i: &Instruction) -> usize {
    match i.op1_kind() {
        OpKind::Register => i.op1_register().size(),
        _ => 0,
    }
}

fn cx_size(cpu: &Cpu, i: &Instruction) -> usize {
    let s = count_size(i);
    if s != 0 {
        return s;
    }
    match i.mnemonic() {
        Mnemonic::Jcxz => 2,
        Mnemonic::Jecxz => 4,
        Mnemonic::Jrcxz => 8,
        _ => {
            // LOOP: iced encodes the counter in the code name.
            let name = format!("{:?}", i.code());
            if name.contains("_CX") {
                2
            } else if name.contains("_ECX") {
                4
            } else if name.contains("_RCX") {
                8
            } else {
                cpu.default_addr_size()
            }
        }
    }
}

fn loop_(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let sz = cx_size(cpu, i);
    let c = cpu.reg_sized(1, sz).wrapping_sub(1) & mask(sz);
    cpu.set_reg_sized(1, sz, c);
    let zf = cpu.flag(ZF);
    let take = c != 0
        && match i.mnemonic() {
            Mnemonic::Loope => zf,
            Mnemonic::Loopne => !zf,
            _ => true,
        };
    if take {
        branch_to(cpu, i.near_branch_target(), branch_size(cpu, i))
    } else {
        Ok(())
    }
}

fn jcxz(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let sz = cx_size(cpu, i);
    if cpu.reg_sized(1, sz) == 0 {
        branch_to(cpu, i.near_branch_target(), branch_size(cpu, i))
    } else {
        Ok(())
    }
}
