//! System instructions: control/debug registers, segment loads, far
//! transfers, IRET, descriptor tables, flags with privilege rules, CPUID,
//! MSRs, time stamp counter, SYSCALL/SYSRET, port I/O, cache/TLB control.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::{mask, seg_index, Handler};
use crate::cpu::Cpu;
use crate::exception::{Fault, XResult};
use crate::state::flags::*;
use crate::state::{cr0, cr4, efer, seg_attr, Segment, CS, DS, ES, FS, GS, SS};

pub fn lookup(i: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    Some(match i.mnemonic() {
        Mov => mov_sys,
        Push => push_seg,
        Pop => pop_seg,
        Lds | Les | Lfs | Lgs | Lss => load_far_ptr,
        Jmp => far_jmp,
        Call => far_call,
        Retf => far_ret,
        Iret | Iretd | Iretq => iret,
        Lgdt | Lidt => lgdt,
        Sgdt | Sidt => sgdt,
        Lldt => lldt,
        Ltr => ltr,
        Sldt => |c, i| {
            let v = c.s.ldtr.selector as u64;
            store_sel(c, i, v)
        },
        Str => |c, i| {
            let v = c.s.tr.selector as u64;
            store_sel(c, i, v)
        },
        Smsw => |c, i| {
            let v = c.s.cr0;
            store_sel(c, i, v)
        },
        Lmsw => lmsw,
        Clts => |c, _| {
            priv0(c)?;
            c.s.cr0 &= !cr0::TS;
            Ok(())
        },
        Lar | Lsl => lar_lsl,
        Verr | Verw => verr,
        Cli => cli,
        Sti => sti,
        Pushf | Pushfd | Pushfq => pushf,
        Popf | Popfd | Popfq => popf,
        Hlt => hlt,
        Cpuid => cpuid,
        Rdmsr => rdmsr,
        Wrmsr => wrmsr,
        Rdtsc => rdtsc,
        Rdtscp => rdtscp,
        Rdpmc => |_, _| Err(Fault::gp0()),
        Syscall => syscall,
        Sysret | Sysretq => sysret,
        Sysenter => sysenter,
        Sysexit | Sysexitq => sysexit,
        Swapgs => swapgs,
        Invlpg => invlpg,
        Wbinvd | Invd => |c, _| priv0(c),
        Clflush | Clflushopt => |c, i| {
            // Touch the line so a bad address faults as on hardware.
            let lin = c.mem_lin(i);
            c.read_u8(lin).map(|_| ())
        },
        In => in_,
        Out => out,
        _ => return None,
    })
}

fn priv0(cpu: &Cpu) -> XResult<()> {
    if cpu.s.cpl() != 0 {
        Err(Fault::gp0())
    } else {
        Ok(())
    }
}

fn store_sel(cpu: &mut Cpu, i: &Instruction, v: u64) -> XResult<()> {
    if i.op0_kind() == OpKind::Memory {
        let lin = cpu.mem_lin(i);
        cpu.write_u16(lin, v as u16)
    } else {
        let r = i.op0_register();
        let v = if r.size() > 2 { v & 0xffff } else { v };
        cpu.set_gpr(r, v);
        Ok(())
    }
}

// -------------------------------------------------------------------
// Control and debug registers.
// -------------------------------------------------------------------

const CR4_SUPPORTED: u64 = cr4::VME
    | cr4::PVI
    | cr4::TSD
    | cr4::DE
    | cr4::PSE
    | cr4::PAE
    | cr4::MCE
    | cr4::PGE
    | cr4::PCE
    | cr4::OSFXSR
    | cr4::OSXMMEXCPT
    | cr4::UMIP;

fn mov_sys(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let r0 = i.op0_register();
    let r1 = if i.op1_kind() == OpKind::Register {
        i.op1_register()
    } else {
        Register::None
    };
    if r0.is_segment_register() {
        let size = cpu.op_size(i, 1);
        let sel = (cpu.read_op(i, 1)? & mask(size)) as u16;
        if r0 == Register::CS {
            return Err(Fault::ud());
        }
        load_seg(cpu, seg_index(r0), sel)?;
        if r0 == Register::SS {
            cpu.s.irq_shadow = true;
        }
        cpu.end_block = true;
        return Ok(());
    }
    if r1.is_segment_register() {
        let sel = cpu.s.seg[seg_index(r1)].selector as u64;
        if i.op0_kind() == OpKind::Memory {
            let lin = cpu.mem_lin(i);
            return cpu.write_u16(lin, sel as u16);
        }
        // Register destination: zero-extended to the operand size.
        cpu.set_gpr(r0, sel);
        return Ok(());
    }
    priv0(cpu)?;
    if r0.is_cr() {
        let v = cpu.gpr(r1);
        let n = r0 as u32 - Register::CR0 as u32;
        write_cr(cpu, n, v)?;
        cpu.end_block = true;
        return Ok(());
    }
    if r1.is_cr() {
        let n = r1 as u32 - Register::CR0 as u32;
        let v = match n {
            0 => cpu.s.cr0,
            2 => cpu.s.cr2,
            3 => cpu.s.cr3,
            4 => cpu.s.cr4,
            8 => cpu.s.cr8,
            _ => return Err(Fault::ud()),
        };
        cpu.set_gpr(r0, if cpu.s.mode64() { v } else { v & 0xffff_ffff });
        return Ok(());
    }
    if r0.is_dr() {
        let n = (r0 as u32 - Register::DR0 as u32) as usize;
        let v = cpu.gpr(r1);
        match n {
            0..=3 => cpu.s.dr[n] = v,
            4 | 6 => cpu.s.dr[6] = (v & 0xf00f) | 0xffff_0ff0,
            5 | 7 => cpu.s.dr[7] = (v & 0xffff_2bff) | 0x400,
            _ => return Err(Fault::ud()),
        }
        return Ok(());
    }
    if r1.is_dr() {
        let n = (r1 as u32 - Register::DR0 as u32) as usize;
        let v = match n {
            0..=3 => cpu.s.dr[n],
            4 | 6 => cpu.s.dr[6],
            5 | 7 => cpu.s.dr[7],
            _ => return Err(Fault::ud()),
        };
        cpu.set_gpr(r0, v);
        return Ok(());
    }
    Err(Fault::ud())
}

/// Write a control register with the architectural checks and side effects.
pub fn write_cr(cpu: &mut Cpu, n: u32, v: u64) -> XResult<()> {
    match n {
        0 => {
            if v >> 32 != 0 {
                return Err(Fault::gp0());
            }
            let v = v | cr0::ET;
            if v & cr0::PG != 0 && v & cr0::PE == 0 {
                return Err(Fault::gp0());
            }
            if v & cr0::NW != 0 && v & cr0::CD == 0 {
                return Err(Fault::gp0());
            }
            let old = cpu.s.cr0;
            if old & cr0::PG == 0 && v & cr0::PG != 0 && cpu.s.efer & efer::LME != 0 {
                if cpu.s.cr4 & cr4::PAE == 0 {
                    return Err(Fault::gp0());
                }
                cpu.s.efer |= efer::LMA;
            }
            if old & cr0::PG != 0 && v & cr0::PG == 0 {
                if cpu.s.mode64() {
                    return Err(Fault::gp0());
                }
                cpu.s.efer &= !efer::LMA;
            }
            cpu.s.cr0 = v;
            if (old ^ v) & (cr0::PG | cr0::WP | cr0::PE) != 0 {
                cpu.flush_tlb_all();
            }
        }
        2 => cpu.s.cr2 = v,
        3 => {
            if cpu.s.long_mode() && v >> crate::mmu::PHYS_ADDR_BITS != 0 {
                return Err(Fault::gp0());
            }
            cpu.s.cr3 = v;
            cpu.flush_tlb_nonglobal();
        }
        4 => {
            if v & !CR4_SUPPORTED != 0 {
                return Err(Fault::gp0());
            }
            if cpu.s.long_mode() && v & cr4::PAE == 0 {
                return Err(Fault::gp0());
            }
            let old = cpu.s.cr4;
            cpu.s.cr4 = v;
            if (old ^ v) & (cr4::PGE | cr4::PAE | cr4::PSE | cr4::SMEP | cr4::SMAP | cr4::PCIDE)
                != 0
            {
                cpu.flush_tlb_all();
            }
        }
        8 => {
            if v & !0xf != 0 {
                return Err(Fault::gp0());
            }
            cpu.s.cr8 = v;
            cpu.bus.set_tpr(v as u8);
        }
        _ => return Err(Fault::ud()),
    }
    Ok(())
}

fn lmsw(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    priv0(cpu)?;
    let v = cpu.read_op(i, 0)? & 0xf;
    // LMSW can set PE but never clear it.
    let new = (cpu.s.cr0 & !0xe) | v | (cpu.s.cr0 & cr0::PE);
    write_cr(cpu, 0, new)?;
    cpu.end_block = true;
    Ok(())
}

// -------------------------------------------------------------------
// Segments.
// -------------------------------------------------------------------

/// Load a data/stack segment register with protected-mode checks.
pub fn load_seg(cpu: &mut Cpu, idx: usize, sel: u16) -> XResult<()> {
    if !cpu.s.protected() || cpu.s.v86() {
        let mut s = Segment::real(sel);
        // Keep cached attributes other than the base in real mode ("unreal" mode).
        if !cpu.s.v86() {
            s.limit = cpu.s.seg[idx].limit;
            s.attr = cpu.s.seg[idx].attr;
        }
        cpu.s.seg[idx] = s;
        return Ok(());
    }
    let cpl = cpu.s.cpl();
    let rpl = (sel & 3) as u8;
    if sel & 0xfffc == 0 {
        if idx == SS && !(cpu.s.mode64() && cpl != 3 && rpl == cpl) {
            return Err(Fault::gp0());
        }
        cpu.s.seg[idx] = Segment {
            selector: sel,
            base: if idx == FS || idx == GS {
                cpu.s.seg[idx].base
            } else {
                0
            },
            limit: 0,
            attr: if idx == SS {
                seg_attr::DB | ((cpl as u16) << 5)
            } else {
                0
            },
        };
        if idx == FS || idx == GS {
            // Intel keeps the base on a null load in 64-bit mode; AMD zeroes it.
            cpu.s.seg[idx].base = 0;
        }
        return Ok(());
    }
    let raw = cpu.read_descriptor(sel)?;
    let seg = Segment::from_descriptor(sel, raw);
    let err = (sel & 0xfffc) as u32;
    let dpl = seg.dpl();
    let code = seg.attr & seg_attr::CODE != 0;
    if seg.attr & seg_attr::S == 0 {
        return Err(Fault::gp(err));
    }
    if idx == SS {
        if code || seg.attr & seg_attr::WRITABLE == 0 || rpl != cpl || dpl != cpl {
            return Err(Fault::gp(err));
        }
        if !seg.present() {
            return Err(Fault::ss(err));
        }
    } else {
        if code && seg.attr & seg_attr::WRITABLE == 0 {
            return Err(Fault::gp(err)); // execute-only code
        }
        let conforming = code && seg.attr & 4 != 0;
        if !conforming && (rpl > dpl || cpl > dpl) {
            return Err(Fault::gp(err));
        }
        if !seg.present() {
            return Err(Fault::np(err));
        }
    }
    cpu.mark_descriptor_accessed(sel, raw)?;
    let mut seg = seg;
    seg.attr |= seg_attr::ACCESSED;
    cpu.s.seg[idx] = seg;
    Ok(())
}

fn push_seg(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.stack_op_size(i);
    let sel = cpu.s.seg[seg_index(i.op0_register())].selector as u64;
    cpu.push(size, sel)
}

fn pop_seg(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = cpu.stack_op_size(i);
    let sel = cpu.peek(size, 0)? as u16;
    let idx = seg_index(i.op0_register());
    load_seg(cpu, idx, sel)?;
    cpu.pop(size)?;
    if idx == SS {
        cpu.s.irq_shadow = true;
    }
    cpu.end_block = true;
    Ok(())
}

fn load_far_ptr(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = i.op0_register().size();
    let lin = cpu.mem_lin(i);
    let off = cpu.read_sized(lin, size)?;
    let sel = cpu.read_u16(cpu.mask_lin(lin.wrapping_add(size as u64)))?;
    let idx = match i.mnemonic() {
        Mnemonic::Lds => DS,
        Mnemonic::Les => ES,
        Mnemonic::Lfs => FS,
        Mnemonic::Lgs => GS,
        _ => SS,
    };
    load_seg(cpu, idx, sel)?;
    cpu.set_gpr(i.op0_register(), off);
    cpu.end_block = true;
    Ok(())
}

/// Read a far pointer operand: (selector, offset, operand size).
fn far_target(cpu: &mut Cpu, i: &Instruction) -> XResult<(u16, u64, usize)> {
    match i.op0_kind() {
        OpKind::FarBranch16 => Ok((i.far_branch_selector(), i.far_branch16() as u64, 2)),
        OpKind::FarBranch32 => Ok((i.far_branch_selector(), i.far_branch32() as u64, 4)),
        _ => {
            let size = i.memory_size().size() - 2;
            let lin = cpu.mem_lin(i);
            let off = cpu.read_sized(lin, size)?;
            let sel = cpu.read_u16(cpu.mask_lin(lin.wrapping_add(size as u64)))?;
            Ok((sel, off, size))
        }
    }
}

/// Load CS for a far JMP/CALL/RET to `sel` at privilege `new_cpl`.
fn load_cs(cpu: &mut Cpu, sel: u16, new_cpl: Option<u8>) -> XResult<Segment> {
    if !cpu.s.protected() || cpu.s.v86() {
        let mut s = Segment::real(sel);
        s.attr = cpu.s.seg[CS].attr & !(seg_attr::DB | seg_attr::L);
        s.attr |= seg_attr::CODE | seg_attr::S | seg_attr::P;
        if cpu.s.v86() {
            s.attr |= 3 << 5;
        }
        return Ok(s);
    }
    let err = (sel & 0xfffc) as u32;
    if sel & 0xfffc == 0 {
        return Err(Fault::gp0());
    }
    let raw = cpu.read_descriptor(sel)?;
    let mut seg = Segment::from_descriptor(sel, raw);
    if seg.attr & seg_attr::S == 0 {
        // Call gates, task gates and TSS targets are not supported.
        return Err(Fault::gp(err));
    }
    if seg.attr & seg_attr::CODE == 0 {
        return Err(Fault::gp(err));
    }
    let cpl = cpu.s.cpl();
    let dpl = seg.dpl();
    let rpl = (sel & 3) as u8;
    let conforming = seg.attr & 4 != 0;
    let target_cpl = new_cpl.unwrap_or(cpl);
    if new_cpl.is_none() {
        if conforming {
            if dpl > cpl {
                return Err(Fault::gp(err));
            }
        } else if rpl > cpl || dpl != cpl {
            return Err(Fault::gp(err));
        }
    } else if (conforming && dpl > target_cpl) || (!conforming && dpl != target_cpl) {
        return Err(Fault::gp(err));
    }
    if !seg.present() {
        return Err(Fault::np(err));
    }
    if cpu.s.long_mode() && seg.long() && seg.default_big() {
        return Err(Fault::gp(err));
    }
    cpu.mark_descriptor_accessed(sel, raw)?;
    seg.attr |= seg_attr::ACCESSED;
    seg.selector = (sel & !3) | target_cpl as u16;
    seg.attr = (seg.attr & !(3 << 5))
        | if conforming {
            dpl as u16
        } else {
            target_cpl as u16
        } << 5;
    if !cpu.s.long_mode() {
        seg.attr &= !seg_attr::L;
    }
    Ok(seg)
}

fn far_jmp(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let (sel, off, size) = far_target(cpu, i)?;
    let cs = load_cs(cpu, sel, None)?;
    cpu.s.seg[CS] = cs;
    cpu.next_rip = off & mask(size.min(8));
    cpu.end_block = true;
    Ok(())
}

fn far_call(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let (sel, off, size) = far_target(cpu, i)?;
    let cs = load_cs(cpu, sel, None)?;
    let old_sp = cpu.s.gpr[4];
    let old_cs = cpu.s.seg[CS].selector as u64;
    let ret = cpu.next_rip;
    let r = cpu.push(size, old_cs).and_then(|_| cpu.push(size, ret));
    if let Err(f) = r {
        cpu.s.gpr[4] = old_sp;
        return Err(f);
    }
    cpu.s.seg[CS] = cs;
    cpu.next_rip = off & mask(size);
    cpu.end_block = true;
    Ok(())
}

fn far_ret(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = match i.code() {
        iced_x86::Code::Retfw | iced_x86::Code::Retfw_imm16 => 2,
        iced_x86::Code::Retfq | iced_x86::Code::Retfq_imm16 => 8,
        _ => 4,
    };
    let extra = if i.op_count() > 0 {
        i.immediate16() as u64
    } else {
        0
    };
    let off = cpu.peek(size, 0)?;
    let sel = cpu.peek(size, size as u64)? as u16;
    let cpl = cpu.s.cpl();
    let rpl = (sel & 3) as u8;
    if cpu.s.protected() && !cpu.s.v86() && rpl > cpl {
        // Return to an outer privilege level: also pops SS:RSP.
        let cs = load_cs(cpu, sel, Some(rpl))?;
        let sp = cpu.peek(size, 2 * size as u64 + extra)?;
        let ss = cpu.peek(size, 3 * size as u64 + extra)? as u16;
        cpu.s.seg[CS] = cs;
        load_seg(cpu, SS, ss)?;
        cpu.s.gpr[4] = sp.wrapping_add(extra);
        for idx in [ES, DS, FS, GS] {
            let s = cpu.s.seg[idx];
            let data_or_nonconf = s.attr & seg_attr::CODE == 0 || s.attr & 4 == 0;
            if data_or_nonconf && s.dpl() < rpl {
                cpu.s.seg[idx] = Segment {
                    selector: 0,
                    base: 0,
                    limit: 0,
                    attr: 0,
                };
            }
        }
    } else {
        let cs = load_cs(cpu, sel, None)?;
        cpu.pop(size)?;
        cpu.pop(size)?;
        let sz = cpu.stack_addr_size();
        let sp = cpu.reg_sized(4, sz).wrapping_add(extra);
        cpu.set_reg_sized(4, sz, sp);
        cpu.s.seg[CS] = cs;
    }
    cpu.next_rip = off & mask(size);
    cpu.end_block = true;
    Ok(())
}

/// Apply RFLAGS from IRET/POPF with the privilege rules for IOPL and IF.
fn write_flags(cpu: &mut Cpu, v: u64, size: usize, cpl: u8) {
    let iopl = ((cpu.s.rflags >> 12) & 3) as u8;
    let mut m = CF | PF | AF | ZF | SF | TF | DF | OF | NT | AC | ID | RF;
    if cpl == 0 {
        m |= IOPL | VIF | VIP;
    }
    if cpl <= iopl {
        m |= IF;
    }
    m &= mask(size);
    cpu.s.rflags = (cpu.s.rflags & !m) | (v & m) | FIXED1;
}

fn iret(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = match i.mnemonic() {
        Mnemonic::Iretq => 8,
        Mnemonic::Iretd => 4,
        _ => 2,
    };
    cpu.end_block = true;
    cpu.s.nmi_blocked = false;
    if !cpu.s.protected() {
        let ip = cpu.peek(size, 0)?;
        let cs = cpu.peek(size, size as u64)? as u16;
        let fl = cpu.peek(size, 2 * size as u64)?;
        if size == 4 && ip >> 16 != 0 {
            return Err(Fault::gp0());
        }
        for _ in 0..3 {
            cpu.pop(size)?;
        }
        cpu.s.seg[CS].selector = cs;
        cpu.s.seg[CS].base = (cs as u64) << 4;
        write_flags(cpu, fl, size, 0);
        cpu.next_rip = ip & mask(size);
        return Ok(());
    }
    if cpu.s.v86() {
        return Err(Fault::gp0());
    }
    if cpu.s.rflags & NT != 0 && !cpu.s.long_mode() {
        cpu.shutdown = Some("IRET with NT (task return) is not supported".into());
        return Ok(());
    }
    let cpl = cpu.s.cpl();
    let rip = cpu.peek(size, 0)?;
    let sel = cpu.peek(size, size as u64)? as u16;
    let fl = cpu.peek(size, 2 * size as u64)?;
    let rpl = (sel & 3) as u8;
    if rpl < cpl {
        return Err(Fault::gp((sel & 0xfffc) as u32));
    }
    if !cpu.s.long_mode() && fl & VM != 0 && cpl == 0 {
        cpu.shutdown = Some("IRET to virtual-8086 mode is not supported".into());
        return Ok(());
    }
    let cs = load_cs(cpu, sel, Some(rpl))?;
    let to_outer = rpl > cpl;
    let pops_ss = to_outer || cpu.s.mode64();
    let (new_sp, new_ss) = if pops_ss {
        (
            cpu.peek(size, 3 * size as u64)?,
            cpu.peek(size, 4 * size as u64)? as u16,
        )
    } else {
        (0, 0)
    };
    if cs.long() {
        let top = (rip as i64) >> 47;
        if top != 0 && top != -1 {
            return Err(Fault::gp0());
        }
    }
    // Commit: CS first so SS checks use the new CPL.
    let old_ss = cpu.s.seg[SS];
    let old_cs = cpu.s.seg[CS];
    cpu.s.seg[CS] = cs;
    if pops_ss {
        if let Err(f) = load_seg(cpu, SS, new_ss) {
            cpu.s.seg[CS] = old_cs;
            cpu.s.seg[SS] = old_ss;
            return Err(f);
        }
        cpu.s.gpr[4] = if size == 8 {
            new_sp
        } else {
            (cpu.s.gpr[4] & !mask(size)) | (new_sp & mask(size))
        };
    } else {
        for _ in 0..3 {
            cpu.pop(size)?;
        }
    }
    write_flags(cpu, fl, size, cpl);
    if to_outer {
        for idx in [ES, DS, FS, GS] {
            let s = cpu.s.seg[idx];
            let data_or_nonconf = s.attr & seg_attr::CODE == 0 || s.attr & 4 == 0;
            if data_or_nonconf && s.dpl() < rpl && s.selector & 0xfffc != 0 {
                cpu.s.seg[idx].selector = 0;
                cpu.s.seg[idx].attr = 0;
            }
        }
    }
    cpu.next_rip = rip & mask(size);
    Ok(())
}

// -------------------------------------------------------------------
// Descriptor tables.
// -------------------------------------------------------------------

fn lgdt(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    priv0(cpu)?;
    let lin = cpu.mem_lin(i);
    let limit = cpu.read_u16(lin)?;
    let base_lin = cpu.mask_lin(lin.wrapping_add(2));
    let mut base = if cpu.s.mode64() {
        cpu.read_u64(base_lin)?
    } else {
        cpu.read_u32(base_lin)? as u64
    };
    if !cpu.s.mode64() && cpu.op_size_is16(i) {
        base &= 0x00ff_ffff;
    }
    let t = crate::state::DescriptorTable { base, limit };
    if i.mnemonic() == Mnemonic::Lgdt {
        cpu.s.gdtr = t;
    } else {
        cpu.s.idtr = t;
    }
    Ok(())
}

impl Cpu {
    fn op_size_is16(&self, i: &Instruction) -> bool {
        // LGDT with a 16-bit operand size only loads 24 bits of base.
        matches!(
            i.code(),
            iced_x86::Code::Lgdt_m1632_16 | iced_x86::Code::Lidt_m1632_16
        )
    }
}

fn sgdt(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    if cpu.s.cr4 & cr4::UMIP != 0 {
        priv0(cpu)?;
    }
    let t = if i.mnemonic() == Mnemonic::Sgdt {
        cpu.s.gdtr
    } else {
        cpu.s.idtr
    };
    let lin = cpu.mem_lin(i);
    cpu.write_u16(lin, t.limit)?;
    let bl = cpu.mask_lin(lin.wrapping_add(2));
    if cpu.s.mode64() {
        cpu.write_u64(bl, t.base)
    } else {
        cpu.write_u32(bl, t.base as u32)
    }
}

fn lldt(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    priv0(cpu)?;
    if !cpu.s.protected() || cpu.s.v86() {
        return Err(Fault::ud());
    }
    let sel = cpu.read_op(i, 0)? as u16;
    if sel & 0xfffc == 0 {
        cpu.s.ldtr = Segment {
            selector: sel,
            ..Default::default()
        };
        return Ok(());
    }
    if sel & 4 != 0 {
        return Err(Fault::gp((sel & 0xfffc) as u32));
    }
    let (lo, hi) = if cpu.s.long_mode() {
        cpu.read_descriptor16(sel)?
    } else {
        (cpu.read_descriptor(sel)?, 0)
    };
    let mut seg = Segment::from_descriptor(sel, lo);
    if seg.attr & seg_attr::S != 0 || seg.attr & 0xf != 2 {
        return Err(Fault::gp((sel & 0xfffc) as u32));
    }
    if !seg.present() {
        return Err(Fault::np((sel & 0xfffc) as u32));
    }
    if cpu.s.long_mode() {
        seg.base |= (hi & 0xffff_ffff) << 32;
    }
    cpu.s.ldtr = seg;
    Ok(())
}

fn ltr(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    priv0(cpu)?;
    if !cpu.s.protected() || cpu.s.v86() {
        return Err(Fault::ud());
    }
    let sel = cpu.read_op(i, 0)? as u16;
    let err = (sel & 0xfffc) as u32;
    if sel & 0xfffc == 0 || sel & 4 != 0 {
        return Err(Fault::gp(err));
    }
    let (lo, hi) = if cpu.s.long_mode() {
        cpu.read_descriptor16(sel)?
    } else {
        (cpu.read_descriptor(sel)?, 0)
    };
    let mut seg = Segment::from_descriptor(sel, lo);
    let ty = seg.attr & 0xf;
    if seg.attr & seg_attr::S != 0 || (ty != 1 && ty != 9) {
        return Err(Fault::gp(err));
    }
    if !seg.present() {
        return Err(Fault::np(err));
    }
    if cpu.s.long_mode() {
        seg.base |= (hi & 0xffff_ffff) << 32;
    }
    // Mark busy in the descriptor and the cache.
    let base = cpu.s.gdtr.base + (sel & !7) as u64;
    cpu.write_sys_u64(base, lo | (2 << 40))?;
    seg.attr |= 2;
    cpu.s.tr = seg;
    Ok(())
}

fn lar_lsl(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    if !cpu.s.protected() || cpu.s.v86() {
        return Err(Fault::ud());
    }
    let sel = cpu.read_op(i, 1)? as u16;
    let ok_desc = if sel & 0xfffc == 0 {
        None
    } else {
        let (base, limit) = if sel & 4 != 0 {
            (cpu.s.ldtr.base, cpu.s.ldtr.limit as u64)
        } else {
            (cpu.s.gdtr.base, cpu.s.gdtr.limit as u64)
        };
        let off = (sel & !7) as u64;
        if off + 7 > limit {
            None
        } else {
            Some(cpu.read_sys_u64(base + off)?)
        }
    };
    let Some(raw) = ok_desc else {
        cpu.s.rflags &= !ZF;
        return Ok(());
    };
    let seg = Segment::from_descriptor(sel, raw);
    let cpl = cpu.s.cpl();
    let rpl = (sel & 3) as u8;
    let conforming_code =
        seg.attr & seg_attr::S != 0 && seg.attr & seg_attr::CODE != 0 && seg.attr & 4 != 0;
    let sys_ok = if seg.attr & seg_attr::S == 0 {
        let ty = seg.attr & 0xf;
        if i.mnemonic() == Mnemonic::Lsl {
            matches!(ty, 1 | 2 | 3 | 9 | 11)
        } else {
            matches!(ty, 1 | 2 | 3 | 4 | 5 | 9 | 11 | 12)
        }
    } else {
        true
    };
    if !sys_ok || (!conforming_code && (seg.dpl() < cpl || seg.dpl() < rpl)) {
        cpu.s.rflags &= !ZF;
        return Ok(());
    }
    let v = if i.mnemonic() == Mnemonic::Lsl {
        seg.limit as u64
    } else {
        raw >> 32 & 0x00f0_ff00
    };
    cpu.set_gpr(i.op0_register(), v);
    cpu.s.rflags |= ZF;
    Ok(())
}

fn verr(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    if !cpu.s.protected() || cpu.s.v86() {
        return Err(Fault::ud());
    }
    let sel = cpu.read_op(i, 0)? as u16;
    let ok = if sel & 0xfffc == 0 {
        false
    } else {
        match cpu.read_descriptor(sel) {
            Ok(raw) => {
                let s = Segment::from_descriptor(sel, raw);
                let code = s.attr & seg_attr::CODE != 0;
                let conf = code && s.attr & 4 != 0;
                let priv_ok = conf || (s.dpl() >= cpu.s.cpl() && s.dpl() >= (sel & 3) as u8);
                s.attr & seg_attr::S != 0
                    && priv_ok
                    && if i.mnemonic() == Mnemonic::Verr {
                        !code || s.attr & seg_attr::WRITABLE != 0
                    } else {
                        !code && s.attr & seg_attr::WRITABLE != 0
                    }
            }
            Err(_) => false,
        }
    };
    cpu.set_flags(ZF, if ok { ZF } else { 0 });
    Ok(())
}

// -------------------------------------------------------------------
// Flags and interrupts.
// -------------------------------------------------------------------

fn iopl(cpu: &Cpu) -> u8 {
    ((cpu.s.rflags >> 12) & 3) as u8
}

fn cli(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    if cpu.s.protected() && cpu.s.cpl() > iopl(cpu) {
        return Err(Fault::gp0());
    }
    cpu.s.rflags &= !IF;
    Ok(())
}

fn sti(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    if cpu.s.protected() && cpu.s.cpl() > iopl(cpu) {
        return Err(Fault::gp0());
    }
    if cpu.s.rflags & IF == 0 {
        cpu.s.irq_shadow = true;
    }
    cpu.s.rflags |= IF;
    cpu.end_block = true;
    Ok(())
}

fn pushf(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    if cpu.s.v86() && iopl(cpu) < 3 {
        return Err(Fault::gp0());
    }
    let size = cpu.stack_op_size(i);
    // VM and RF are never pushed.
    let v = cpu.s.rflags & !(VM | RF);
    cpu.push(size, v)
}

fn popf(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    if cpu.s.v86() && iopl(cpu) < 3 {
        return Err(Fault::gp0());
    }
    let size = cpu.stack_op_size(i);
    let v = cpu.pop(size)?;
    let cpl = if cpu.s.protected() { cpu.s.cpl() } else { 0 };
    let was_if = cpu.s.rflags & IF;
    write_flags(cpu, v & !RF, size, cpl);
    let _ = was_if;
    cpu.end_block = true;
    Ok(())
}

fn hlt(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    priv0(cpu)?;
    cpu.s.halted = true;
    cpu.end_block = true;
    Ok(())
}

// -------------------------------------------------------------------
// Identification, MSRs, time.
// -------------------------------------------------------------------

fn cpuid(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    let leaf = cpu.s.gpr[0] as u32;
    let sub = cpu.s.gpr[1] as u32;
    let r = crate::cpuid::cpuid(&cpu.config, leaf, sub);
    cpu.s.gpr[0] = r[0] as u64;
    cpu.s.gpr[3] = r[1] as u64;
    cpu.s.gpr[1] = r[2] as u64;
    cpu.s.gpr[2] = r[3] as u64;
    Ok(())
}

fn rdmsr(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    priv0(cpu)?;
    let msr = cpu.s.gpr[1] as u32;
    let v = crate::msr::read(cpu, msr)?;
    cpu.s.gpr[0] = v & 0xffff_ffff;
    cpu.s.gpr[2] = v >> 32;
    Ok(())
}

fn wrmsr(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    priv0(cpu)?;
    let msr = cpu.s.gpr[1] as u32;
    let v = (cpu.s.gpr[0] & 0xffff_ffff) | (cpu.s.gpr[2] << 32);
    crate::msr::write(cpu, msr, v)?;
    cpu.end_block = true;
    Ok(())
}

fn rdtsc(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    if cpu.s.cr4 & cr4::TSD != 0 && cpu.s.cpl() != 0 {
        return Err(Fault::gp0());
    }
    let t = cpu.tsc();
    cpu.s.gpr[0] = t & 0xffff_ffff;
    cpu.s.gpr[2] = t >> 32;
    Ok(())
}

fn rdtscp(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    rdtsc(cpu, i)?;
    cpu.s.gpr[1] = cpu.s.tsc_aux & 0xffff_ffff;
    Ok(())
}

impl Cpu {
    /// Guest TSC: machine TSC plus this vCPU's offset.
    pub fn tsc(&mut self) -> u64 {
        self.bus.tsc().wrapping_add(self.s.tsc_offset as u64)
    }
}

// -------------------------------------------------------------------
// Fast system calls.
// -------------------------------------------------------------------

fn flat_code64(sel: u16, dpl: u16) -> Segment {
    Segment {
        selector: sel,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0xb | seg_attr::S | seg_attr::P | seg_attr::L | seg_attr::G | (dpl << 5),
    }
}

fn flat_code32(sel: u16, dpl: u16) -> Segment {
    Segment {
        selector: sel,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0xb | seg_attr::S | seg_attr::P | seg_attr::DB | seg_attr::G | (dpl << 5),
    }
}

fn flat_data(sel: u16, dpl: u16) -> Segment {
    Segment {
        selector: sel,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0x3 | seg_attr::S | seg_attr::P | seg_attr::DB | seg_attr::G | (dpl << 5),
    }
}

fn syscall(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    if cpu.s.efer & efer::SCE == 0 || !cpu.s.long_mode() {
        return Err(Fault::ud());
    }
    let sel = ((cpu.s.star >> 32) & 0xfffc) as u16;
    cpu.s.gpr[1] = cpu.next_rip;
    cpu.s.gpr[11] = cpu.s.rflags & !RF;
    let target = if cpu.s.mode64() {
        cpu.s.lstar
    } else {
        cpu.s.cstar
    };
    cpu.s.rflags &= !(cpu.s.sfmask | RF);
    cpu.s.rflags |= FIXED1;
    cpu.s.seg[CS] = flat_code64(sel, 0);
    cpu.s.seg[SS] = flat_data(sel + 8, 0);
    cpu.next_rip = target;
    cpu.end_block = true;
    Ok(())
}

fn sysret(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    if cpu.s.efer & efer::SCE == 0 || !cpu.s.long_mode() {
        return Err(Fault::ud());
    }
    priv0(cpu)?;
    if !cpu.s.mode64() {
        return Err(Fault::ud());
    }
    let base = ((cpu.s.star >> 48) & 0xffff) as u16;
    let rip;
    if i.mnemonic() == Mnemonic::Sysretq {
        rip = cpu.s.gpr[1];
        let top = (rip as i64) >> 47;
        if top != 0 && top != -1 {
            return Err(Fault::gp0());
        }
        cpu.s.seg[CS] = flat_code64((base + 16) | 3, 3);
    } else {
        rip = cpu.s.gpr[1] & 0xffff_ffff;
        cpu.s.seg[CS] = flat_code32(base | 3, 3);
    }
    cpu.s.rflags = (cpu.s.gpr[11] & 0x3c_7fd7) | FIXED1;
    // SS selector is loaded; its cached attributes stay flat (as on Intel).
    cpu.s.seg[SS] = flat_data((base + 8) | 3, 3);
    cpu.next_rip = rip;
    cpu.end_block = true;
    Ok(())
}

fn sysenter(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    if !cpu.s.protected() || cpu.s.sysenter_cs & 0xfffc == 0 {
        return Err(Fault::gp0());
    }
    let sel = (cpu.s.sysenter_cs & 0xfffc) as u16;
    cpu.s.rflags &= !(VM | IF | RF);
    if cpu.s.long_mode() {
        cpu.s.seg[CS] = flat_code64(sel, 0);
        cpu.next_rip = cpu.s.sysenter_eip;
        cpu.s.gpr[4] = cpu.s.sysenter_esp;
    } else {
        cpu.s.seg[CS] = flat_code32(sel, 0);
        cpu.next_rip = cpu.s.sysenter_eip & 0xffff_ffff;
        cpu.s.gpr[4] = cpu.s.sysenter_esp & 0xffff_ffff;
    }
    cpu.s.seg[SS] = flat_data(sel + 8, 0);
    cpu.end_block = true;
    Ok(())
}

fn sysexit(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    if !cpu.s.protected() || cpu.s.sysenter_cs & 0xfffc == 0 {
        return Err(Fault::gp0());
    }
    priv0(cpu)?;
    let base = (cpu.s.sysenter_cs & 0xfffc) as u16;
    if i.mnemonic() == Mnemonic::Sysexitq {
        cpu.s.seg[CS] = flat_code64((base + 32) | 3, 3);
        cpu.s.seg[SS] = flat_data((base + 40) | 3, 3);
        cpu.next_rip = cpu.s.gpr[2];
        cpu.s.gpr[4] = cpu.s.gpr[1];
    } else {
        cpu.s.seg[CS] = flat_code32((base + 16) | 3, 3);
        cpu.s.seg[SS] = flat_data((base + 24) | 3, 3);
        cpu.next_rip = cpu.s.gpr[2] & 0xffff_ffff;
        cpu.s.gpr[4] = cpu.s.gpr[1] & 0xffff_ffff;
    }
    cpu.end_block = true;
    Ok(())
}

fn swapgs(cpu: &mut Cpu, _: &Instruction) -> XResult<()> {
    if !cpu.s.mode64() {
        return Err(Fault::ud());
    }
    priv0(cpu)?;
    std::mem::swap(&mut cpu.s.seg[GS].base, &mut cpu.s.kernel_gs_base);
    Ok(())
}

fn invlpg(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    priv0(cpu)?;
    let lin = cpu.mem_lin(i);
    cpu.flush_tlb_page(lin);
    Ok(())
}

// -------------------------------------------------------------------
// Port I/O.
// -------------------------------------------------------------------

impl Cpu {
    /// I/O permission: CPL ≤ IOPL, or the TSS I/O bitmap allows the ports.
    pub fn check_io(&mut self, port: u16, size: usize) -> XResult<()> {
        if !self.s.protected() || (self.s.cpl() <= iopl(self) && !self.s.v86()) {
            return Ok(());
        }
        let tr = self.s.tr;
        let ty = tr.attr & 0xf;
        if ty != 9 && ty != 11 || tr.limit < 0x67 {
            return Err(Fault::gp0());
        }
        let acc = crate::mmu::Access {
            kind: crate::mmu::AccessKind::Read,
            user: false,
        };
        let mut b = [0u8; 2];
        self.read_bytes_as(tr.base + 0x66, &mut b, acc)?;
        let map = u16::from_le_bytes(b) as u64;
        let off = map + port as u64 / 8;
        if off + 1 > tr.limit as u64 {
            return Err(Fault::gp0());
        }
        self.read_bytes_as(tr.base + off, &mut b, acc)?;
        let bits = u16::from_le_bytes(b) >> (port % 8);
        if bits & ((1 << size) - 1) != 0 {
            return Err(Fault::gp0());
        }
        Ok(())
    }
}

fn io_port(cpu: &Cpu, i: &Instruction, n: u32) -> u16 {
    if i.op_kind(n) == OpKind::Immediate8 {
        i.immediate8() as u16
    } else {
        cpu.s.gpr[2] as u16
    }
}

fn in_(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = i.op0_register().size();
    let port = io_port(cpu, i, 1);
    cpu.check_io(port, size)?;
    let v = cpu.bus.io_read(port, size as u8) as u64;
    cpu.set_gpr(i.op0_register(), v & mask(size));
    Ok(())
}

fn out(cpu: &mut Cpu, i: &Instruction) -> XResult<()> {
    let size = i.op1_register().size();
    let port = io_port(cpu, i, 0);
    cpu.check_io(port, size)?;
    let v = cpu.gpr(i.op1_register());
    cpu.bus.io_write(port, size as u8, v as u32);
    Ok(())
}
