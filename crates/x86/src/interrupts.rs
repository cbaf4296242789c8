//! Exception and interrupt delivery (real mode IVT, protected-mode and
//! long-mode IDT with stack switching and IST), double/triple fault rules,
//! and descriptor-table helpers shared with far transfers.

use crate::cpu::Cpu;
use crate::exception::{self as exc, Fault, XResult};
use crate::mmu::{Access, AccessKind};
use crate::state::{flags, seg_attr, Segment, CS, SS};

/// How an event entered the CPU; decides the return address and checks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EventKind {
    /// A fault: return to the faulting instruction.
    Fault,
    /// External interrupt or NMI: return to the current instruction.
    External,
    /// INT n / INT3 / INTO: gate DPL is checked, return after the instruction.
    Software,
}

fn sys_read(kind: AccessKind) -> Access {
    Access { kind, user: false }
}

impl Cpu {
    /// Deliver a fault raised by an instruction (RIP still points at it).
    pub(crate) fn raise(&mut self, f: Fault) {
        self.stats.exceptions += 1;
        if self.capture_faults {
            // Test harnesses: stop with the fault instead of delivering it.
            self.captured_fault = Some(f);
            self.shutdown = Some(format!("fault {} captured", f.vector));
            return;
        }
        self.deliver(f.vector, f.error_code, f.cr2, EventKind::Fault);
    }

    /// Deliver an external interrupt or NMI (`external`), or a software one.
    pub(crate) fn deliver_interrupt(
        &mut self,
        vector: u8,
        error_code: Option<u32>,
        external: bool,
    ) {
        let kind = if external {
            EventKind::External
        } else {
            EventKind::Software
        };
        self.deliver(vector, error_code, None, kind);
    }

    /// Software interrupt from INT n / INT3 / INTO: returns a fault to raise
    /// if delivery itself faulted (already handled), so always Ok.
    pub(crate) fn software_interrupt(&mut self, vector: u8) -> XResult<()> {
        self.deliver(vector, None, None, EventKind::Software);
        // RIP was set by delivery; do not let the run loop overwrite it.
        self.next_rip = self.s.rip;
        self.end_block = true;
        Ok(())
    }

    fn deliver(&mut self, vector: u8, error_code: Option<u32>, cr2: Option<u64>, kind: EventKind) {
        let mut cur = (vector, error_code, kind);
        if let Some(a) = cr2 {
            self.s.cr2 = a;
        }
        loop {
            self.end_block = true;
            match self.try_deliver(cur.0, cur.1, cur.2) {
                Ok(()) => return,
                Err(f2) => {
                    if let Some(a) = f2.cr2 {
                        self.s.cr2 = a;
                    }
                    let first = cur.0;
                    if first == exc::DF {
                        self.shutdown = Some(format!(
                            "triple fault: exception {} while delivering double fault",
                            f2.vector
                        ));
                        return;
                    }
                    let first_contrib =
                        matches!(first, exc::DE | exc::TS | exc::NP | exc::SS | exc::GP);
                    let double = cur.2 == EventKind::Fault
                        && ((first_contrib && f2.contributory())
                            || (first == exc::PF && (f2.contributory() || f2.vector == exc::PF)));
                    cur = if double {
                        (exc::DF, Some(0), EventKind::Fault)
                    } else {
                        (f2.vector, f2.error_code, EventKind::Fault)
                    };
                }
            }
        }
    }

    fn try_deliver(&mut self, vector: u8, error_code: Option<u32>, kind: EventKind) -> XResult<()> {
        let return_rip = if kind == EventKind::Software {
            self.next_rip
        } else {
            self.s.rip
        };
        self.s.halted = false;
        if vector == exc::NMI && kind == EventKind::External {
            self.s.nmi_blocked = true;
        }
        if !self.s.protected() {
            return self.deliver_real(vector, return_rip);
        }
        // EXT: set unless delivering a software interrupt (INT n/INT3/INTO);
        // an earlier exception counts as external to the program (SDM 6.13).
        let ext = (kind != EventKind::Software) as u32;
        if self.s.long_mode() {
            self.deliver_long(vector, error_code, kind, return_rip, ext)
        } else {
            self.deliver_prot32(vector, error_code, kind, return_rip, ext)
        }
    }

    fn deliver_real(&mut self, vector: u8, return_rip: u64) -> XResult<()> {
        let ent = vector as u64 * 4;
        if ent + 3 > self.s.idtr.limit as u64 {
            return Err(Fault::gp0());
        }
        let mut b = [0u8; 4];
        self.read_bytes_as(self.s.idtr.base + ent, &mut b, sys_read(AccessKind::Read))?;
        let ip = u16::from_le_bytes([b[0], b[1]]);
        let cs = u16::from_le_bytes([b[2], b[3]]);
        self.push(2, self.s.rflags)?;
        self.push(2, self.s.seg[CS].selector as u64)?;
        self.push(2, return_rip)?;
        self.s.rflags &= !(flags::IF | flags::TF | flags::AC | flags::RF);
        self.s.seg[CS].selector = cs;
        self.s.seg[CS].base = (cs as u64) << 4;
        self.s.rip = ip as u64;
        Ok(())
    }

    fn read_gate(&mut self, vector: u8, size: u64, ext: u32) -> XResult<(u64, u64)> {
        let idt_err = (vector as u32) * 8 + 2 + ext;
        let off = vector as u64 * size;
        if off + size - 1 > self.s.idtr.limit as u64 {
            return Err(Fault::gp(idt_err));
        }
        let lo = self.read_sys_u64(self.s.idtr.base + off)?;
        let hi = if size == 16 {
            self.read_sys_u64(self.s.idtr.base + off + 8)?
        } else {
            0
        };
        Ok((lo, hi))
    }

    pub(crate) fn read_sys_u64(&mut self, lin: u64) -> XResult<u64> {
        let mut b = [0u8; 8];
        self.read_bytes_as(lin, &mut b, sys_read(AccessKind::Read))?;
        Ok(u64::from_le_bytes(b))
    }

    pub(crate) fn write_sys_u64(&mut self, lin: u64, v: u64) -> XResult<()> {
        self.write_bytes_as(lin, &v.to_le_bytes(), sys_read(AccessKind::Write))
    }

    /// Read the 8-byte descriptor named by `sel` from the GDT or LDT.
    pub(crate) fn read_descriptor(&mut self, sel: u16) -> XResult<u64> {
        let (base, limit) = if sel & 4 != 0 {
            (self.s.ldtr.base, self.s.ldtr.limit as u64)
        } else {
            (self.s.gdtr.base, self.s.gdtr.limit as u64)
        };
        let off = (sel & !7) as u64;
        if off + 7 > limit {
            return Err(Fault::gp((sel & 0xfffc) as u32));
        }
        self.read_sys_u64(base + off)
    }

    /// Set the accessed bit of a descriptor in memory, as hardware does.
    pub(crate) fn mark_descriptor_accessed(&mut self, sel: u16, raw: u64) -> XResult<()> {
        if raw & (1 << 40) == 0 {
            let base = if sel & 4 != 0 {
                self.s.ldtr.base
            } else {
                self.s.gdtr.base
            };
            self.write_sys_u64(base + (sel & !7) as u64, raw | (1 << 40))?;
        }
        Ok(())
    }

    /// Read the 16-byte (system) descriptor for `sel` in long mode.
    pub(crate) fn read_descriptor16(&mut self, sel: u16) -> XResult<(u64, u64)> {
        let lo = self.read_descriptor(sel)?;
        let base = if sel & 4 != 0 {
            self.s.ldtr.base
        } else {
            self.s.gdtr.base
        };
        let limit = if sel & 4 != 0 {
            self.s.ldtr.limit as u64
        } else {
            self.s.gdtr.limit as u64
        };
        let off = (sel & !7) as u64 + 8;
        if off + 7 > limit {
            return Err(Fault::gp((sel & 0xfffc) as u32));
        }
        let hi = self.read_sys_u64(base + off)?;
        Ok((lo, hi))
    }

    /// Load a code segment for an interrupt/far transfer target at `cpl`.
    fn load_cs_for_gate(&mut self, sel: u16, ext: u32) -> XResult<Segment> {
        if sel & 0xfffc == 0 {
            return Err(Fault::gp(ext));
        }
        let raw = self.read_descriptor(sel)?;
        let seg = Segment::from_descriptor(sel, raw);
        if seg.attr & seg_attr::S == 0 || seg.attr & seg_attr::CODE == 0 {
            return Err(Fault::gp((sel & 0xfffc) as u32 | ext));
        }
        if !seg.present() {
            return Err(Fault::np((sel & 0xfffc) as u32 | ext));
        }
        Ok(seg)
    }

    fn deliver_long(
        &mut self,
        vector: u8,
        error_code: Option<u32>,
        kind: EventKind,
        return_rip: u64,
        ext: u32,
    ) -> XResult<()> {
        let (lo, hi) = self.read_gate(vector, 16, ext)?;
        let gtype = (lo >> 40) & 0xf;
        let dpl = ((lo >> 45) & 3) as u8;
        let present = lo & (1 << 47) != 0;
        let idt_err = (vector as u32) * 8 + 2 + ext;
        if gtype != 0xe && gtype != 0xf {
            return Err(Fault::gp(idt_err));
        }
        let cpl = self.s.cpl();
        if kind == EventKind::Software && dpl < cpl {
            return Err(Fault::gp(idt_err));
        }
        if !present {
            return Err(Fault::np(idt_err));
        }
        let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32);
        let sel = ((lo >> 16) & 0xffff) as u16;
        let ist = (lo >> 32) & 7;
        let mut cs = self.load_cs_for_gate(sel, ext)?;
        if !cs.long() || cs.default_big() {
            return Err(Fault::gp((sel & 0xfffc) as u32 | ext));
        }
        // Conforming code keeps the current privilege level.
        let new_cpl = if cs.attr & 4 != 0 { cpl } else { cs.dpl() };
        if new_cpl > cpl {
            return Err(Fault::gp((sel & 0xfffc) as u32 | ext));
        }
        let old_ss = self.s.seg[SS];
        let old_rsp = self.s.gpr[4];
        let old_rflags = self.s.rflags;
        let old_cs = self.s.seg[CS].selector;
        let mut new_rsp = old_rsp;
        if ist != 0 {
            new_rsp = self.read_tss64(0x24 + (ist - 1) * 8)?;
        } else if new_cpl < cpl {
            new_rsp = self.read_tss64(4 + new_cpl as u64 * 8)?;
        }
        new_rsp &= !0xf;
        // Build the frame with supervisor writes at the new stack.
        let mut frame = vec![
            old_ss.selector as u64,
            old_rsp,
            old_rflags,
            old_cs as u64,
            return_rip,
        ];
        if let Some(e) = error_code {
            frame.push(e as u64);
        }
        let acc = Access {
            kind: AccessKind::Write,
            user: false,
        };
        let mut sp = new_rsp;
        for v in &frame {
            sp = sp.wrapping_sub(8);
            self.write_bytes_as(sp, &v.to_le_bytes(), acc)?;
        }
        // Commit.
        if new_cpl < cpl {
            self.s.seg[SS] = Segment {
                selector: new_cpl as u16,
                base: 0,
                limit: 0,
                attr: seg_attr::DB
                    | seg_attr::P
                    | seg_attr::S
                    | seg_attr::WRITABLE
                    | ((new_cpl as u16) << 5),
            };
            // A NULL SS is "unusable" in 64-bit mode; keep the attributes sane.
        }
        cs.selector = (sel & !3) | new_cpl as u16;
        cs.attr = (cs.attr & !(3 << 5)) | ((new_cpl as u16) << 5) | seg_attr::ACCESSED;
        self.s.seg[CS] = cs;
        self.s.gpr[4] = sp;
        self.s.rip = target;
        self.s.rflags &= !(flags::TF | flags::NT | flags::RF | flags::VM);
        if gtype == 0xe {
            self.s.rflags &= !flags::IF;
        }
        Ok(())
    }

    fn read_tss64(&mut self, off: u64) -> XResult<u64> {
        if off + 7 > self.s.tr.limit as u64 {
            return Err(Fault::ts((self.s.tr.selector & 0xfffc) as u32));
        }
        self.read_sys_u64(self.s.tr.base + off)
    }

    fn deliver_prot32(
        &mut self,
        vector: u8,
        error_code: Option<u32>,
        kind: EventKind,
        return_rip: u64,
        ext: u32,
    ) -> XResult<()> {
        if self.s.v86() {
            self.shutdown = Some("virtual-8086 mode interrupts are not supported".into());
            return Ok(());
        }
        let (lo, _) = self.read_gate(vector, 8, ext)?;
        let gtype = (lo >> 40) & 0xf;
        let dpl = ((lo >> 45) & 3) as u8;
        let present = lo & (1 << 47) != 0;
        let idt_err = (vector as u32) * 8 + 2 + ext;
        let gate32 = match gtype {
            0xe | 0xf => true,
            0x6 | 0x7 => false,
            0x5 => {
                self.shutdown = Some("task gates are not supported".into());
                return Ok(());
            }
            _ => return Err(Fault::gp(idt_err)),
        };
        let cpl = self.s.cpl();
        if kind == EventKind::Software && dpl < cpl {
            return Err(Fault::gp(idt_err));
        }
        if !present {
            return Err(Fault::np(idt_err));
        }
        let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
        let sel = ((lo >> 16) & 0xffff) as u16;
        let mut cs = self.load_cs_for_gate(sel, ext)?;
        let new_cpl = if cs.attr & 4 != 0 { cpl } else { cs.dpl() };
        if new_cpl > cpl {
            return Err(Fault::gp((sel & 0xfffc) as u32 | ext));
        }
        let size = if gate32 { 4 } else { 2 };
        let old_ss = self.s.seg[SS];
        let old_esp = self.s.gpr[4];
        let mut frame: Vec<u64> = Vec::with_capacity(6);
        if new_cpl < cpl {
            // Stack switch from the 32-bit TSS.
            let off = 4 + new_cpl as u64 * 8;
            if off + 5 > self.s.tr.limit as u64 {
                return Err(Fault::ts((self.s.tr.selector & 0xfffc) as u32));
            }
            let mut b = [0u8; 6];
            self.read_bytes_as(self.s.tr.base + off, &mut b, sys_read(AccessKind::Read))?;
            let esp = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64;
            let ss_sel = u16::from_le_bytes([b[4], b[5]]);
            let raw = self.read_descriptor(ss_sel)?;
            let ss = Segment::from_descriptor(ss_sel, raw);
            if !ss.present() {
                return Err(Fault::ss((ss_sel & 0xfffc) as u32));
            }
            self.s.seg[SS] = ss;
            self.s.gpr[4] = esp;
            frame.push(old_ss.selector as u64);
            frame.push(old_esp);
        }
        frame.push(self.s.rflags);
        frame.push(self.s.seg[CS].selector as u64);
        frame.push(return_rip);
        if let Some(e) = error_code {
            frame.push(e as u64);
        }
        for v in frame {
            if let Err(f) = self.push_sys(size, v) {
                self.s.seg[SS] = old_ss;
                self.s.gpr[4] = old_esp;
                return Err(f);
            }
        }
        cs.selector = (sel & !3) | new_cpl as u16;
        cs.attr = (cs.attr & !(3 << 5)) | ((new_cpl as u16) << 5) | seg_attr::ACCESSED;
        self.s.seg[CS] = cs;
        self.s.rip = target;
        self.s.rflags &= !(flags::TF | flags::NT | flags::RF | flags::VM);
        if gtype & 1 == 0 {
            self.s.rflags &= !flags::IF;
        }
        Ok(())
    }

    /// Push with supervisor permissions (interrupt frames).
    fn push_sys(&mut self, size: usize, v: u64) -> XResult<()> {
        let mask = if self.s.seg[SS].default_big() {
            0xffff_ffff
        } else {
            0xffff
        };
        let sp = self.s.gpr[4];
        let new_sp = sp.wrapping_sub(size as u64) & mask;
        let lin = self.s.seg[SS].base.wrapping_add(new_sp);
        let bytes = v.to_le_bytes();
        self.write_bytes_as(
            lin,
            &bytes[..size],
            Access {
                kind: AccessKind::Write,
                user: false,
            },
        )?;
        self.s.gpr[4] = (sp & !mask) | new_sp;
        Ok(())
    }
}
