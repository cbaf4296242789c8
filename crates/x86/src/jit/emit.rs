//! Single-pass assembler for translated blocks (replaces iced's
//! BlockEncoder on the translation hot path).
//!
//! BlockEncoder boxes every instruction and encodes each one at least
//! twice while it iterates branch sizes to a fixpoint. Here every
//! instruction is encoded once, at address 0 with a dummy target, into a
//! reused scratch buffer (label JMP/Jcc in rel32 form; the common glue
//! forms by `encode_glue`, the rest by iced's encoder). Branch sizes are
//! then chosen on lengths alone: all label JMP/Jcc, JRCXZ and LOOP start
//! short and those that do not reach grow (JRCXZ and LOOP into three
//! instructions), until nothing changes (one or two passes; after a few,
//! it falls back to all long and shortens what fits). The final
//! offsets are computed and the bytes copied out with branch and
//! RIP-relative fields patched for the final addresses.

use std::cell::RefCell;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Encoder, IcedError, Instruction, InstructionBlock,
    OpKind, Register,
};

/// Result of [`assemble`].
pub(super) struct Assembled {
    pub code: Vec<u8>,
    /// Offset from `at` of each input instruction.
    pub offsets: Vec<u32>,
}

/// What an instruction's address-dependent field refers to.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Fix {
    /// Nothing depends on the address.
    #[default]
    None,
    /// Branch to the instruction with index `target`.
    BrLabel,
    /// Branch to the absolute address `target`.
    BrAbs,
    /// RIP-relative memory operand addressing instruction `target`.
    RipLabel,
    /// RIP-relative memory operand addressing absolute `target`.
    RipAbs,
}

#[derive(Clone, Copy, Default)]
struct Item {
    /// Offset of the long-form bytes in the scratch buffer, which is also
    /// the offset in the long layout.
    start: u32,
    /// Final offset.
    off: u32,
    /// Instruction index (label kinds) or absolute address.
    target: u64,
    fix: Fix,
    /// Long-form length.
    len: u8,
    /// Position and size of the field to patch in the long form.
    fix_off: u8,
    fix_size: u8,
    /// Short opcode (EB or 7x) when this is a label JMP/Jcc that has a
    /// rel8 form; 0 otherwise.
    short_op: u8,
    /// Prefix bytes before the opcode (short form: `pfx` + opcode + rel8).
    pfx: u8,
    /// The short form was chosen.
    short: bool,
}

impl Item {
    fn final_len(&self) -> u32 {
        if self.short {
            self.pfx as u32 + 2
        } else {
            self.len as u32
        }
    }
}

/// Reused buffers and encoder (no per-instruction heap allocation).
struct State {
    enc: Encoder,
    items: Vec<Item>,
    /// (label id, instruction index), sorted by id.
    labels: Vec<(u64, u32)>,
    /// Optimistic short/near passes before the fallback (tests lower it).
    opt_passes: usize,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Inputs above this many instructions go to BlockEncoder (keeps every
/// offset well inside u32; never reached by translated blocks).
const MAX_INSTRS: usize = 1 << 24;

/// Passes for the short/near choice (see `run`).
const RELAX_PASSES: usize = 8;

/// Encode `instrs` (as produced by `CodeAssembler::instructions()`) for
/// placement at `at`; same semantics as BlockEncoder with
/// RETURN_NEW_INSTRUCTION_OFFSETS, given that instructions without a
/// label have `ip() == 0`:
/// - `ip() != 0` is a label id;
/// - a near branch or a RIP-relative memory operand whose target is a
///   label id refers to that instruction, any other target is absolute;
/// - label JMP/Jcc use rel8 when it fits, otherwise rel32; branches to
///   absolute targets use rel32 where the instruction has it;
/// - rel8-only branches (JRCXZ, LOOP) that do not reach become, as in
///   BlockEncoder, the branch over a short JMP to a JMP rel32 (9 bytes);
/// - targets beyond ±2 GiB are errors (BlockEncoder would rewrite them).
pub(super) fn assemble(instrs: &[Instruction], at: u64) -> Result<Assembled, IcedError> {
    STATE.with(|s| match s.try_borrow_mut() {
        Ok(mut g) => {
            let st = match &mut *g {
                Some(st) => st,
                None => g.insert(State::new()?),
            };
            st.run(instrs, at)
        }
        // Re-entered (cannot happen today): use a fresh state.
        Err(_) => State::new()?.run(instrs, at),
    })
}

/// The slow path, for inputs the fast path does not handle.
fn via_block_encoder(instrs: &[Instruction], at: u64) -> Result<Assembled, IcedError> {
    let r = BlockEncoder::encode(
        64,
        InstructionBlock::new(instrs, at),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    Ok(Assembled {
        code: r.code_buffer,
        offsets: r.new_instruction_offsets,
    })
}

/// Does `v` fit a signed field of `size` bytes?
fn fits(v: i64, size: u8) -> bool {
    match size {
        1 => i8::try_from(v).is_ok(),
        2 => i16::try_from(v).is_ok(),
        4 => i32::try_from(v).is_ok(),
        _ => false,
    }
}

impl State {
    fn new() -> Result<State, IcedError> {
        Ok(State {
            enc: Encoder::try_new(64)?,
            items: Vec::new(),
            labels: Vec::new(),
            opt_passes: RELAX_PASSES,
        })
    }

    /// `f` on the scratch buffer the encoder writes into (the direct
    /// encodings append to the same bytes).
    fn with_scratch<T>(&mut self, f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
        let mut b = self.enc.take_buffer();
        let r = f(&mut b);
        self.enc.set_buffer(b);
        r
    }

    fn label(&self, id: u64) -> Option<u32> {
        if id == 0 {
            return None;
        }
        self.labels
            .binary_search_by_key(&id, |l| l.0)
            .ok()
            .map(|k| self.labels[k].1)
    }

    /// Offsets for the current short/near choices.
    fn layout(&mut self) {
        let mut off = 0u32;
        for it in self.items.iter_mut() {
            it.off = off;
            off += it.final_len();
        }
    }

    /// Does label branch `i`, in its current form, reach its target in the
    /// current layout? (A shortened branch's own size is part of a
    /// backward distance: `final_len` gives the form being tried.)
    fn branch_fits(&self, i: usize) -> bool {
        let it = &self.items[i];
        let Some(t) = self.items.get(it.target as usize) else {
            return false;
        };
        let d = t.off as i64 - (it.off as i64 + it.final_len() as i64);
        fits(d, if it.short { 1 } else { it.fix_size })
    }

    fn run(&mut self, instrs: &[Instruction], at: u64) -> Result<Assembled, IcedError> {
        if instrs.len() > MAX_INSTRS {
            return via_block_encoder(instrs, at);
        }
        self.labels.clear();
        for (i, ins) in instrs.iter().enumerate() {
            if ins.ip() != 0 {
                self.labels.push((ins.ip(), i as u32));
            }
        }
        self.labels.sort_unstable_by_key(|l| l.0);
        if self.labels.windows(2).any(|w| w[0].0 == w[1].0) {
            // BlockEncoder reports the duplicate.
            return via_block_encoder(instrs, at);
        }
        self.with_scratch(|b| b.clear());
        self.items.clear();

        // Long layout: encode each instruction once.
        let mut pos = 0u32;
        for ins in instrs {
            let mut it = Item {
                start: pos,
                ..Item::default()
            };
            let len;
            if ins.op0_kind() == OpKind::NearBranch64 {
                let t = ins.near_branch64();
                (it.fix, it.target) = match self.label(t) {
                    Some(k) => (Fix::BrLabel, k as u64),
                    None => (Fix::BrAbs, t),
                };
                let near = ins.code().as_near_branch();
                let direct = self.with_scratch(|b| encode_branch(near, ins, b));
                if let Some((n, fo, fs)) = direct {
                    (len, it.fix_off, it.fix_size) = (n, fo, fs);
                } else {
                    let mut x = *ins;
                    x.set_code(near);
                    x.set_near_branch64(0);
                    len = self.enc.encode(&x, 0)?;
                    let co = self.enc.get_constant_offsets();
                    it.fix_off = co.immediate_offset() as u8;
                    it.fix_size = co.immediate_size() as u8;
                }
                if it.fix_size == 1 && it.fix_off as usize + 1 == len {
                    // A rel8-only branch (JRCXZ, LOOP): its long form
                    // branches over a short JMP to a JMP rel32, as
                    // BlockEncoder writes it. Short when it reaches.
                    let pfx = it.fix_off - 1;
                    let op = self.with_scratch(|b| {
                        let op = b[it.start as usize + pfx as usize];
                        b.truncate(it.start as usize + pfx as usize + 1);
                        b.extend_from_slice(&[0x02, 0xeb, 0x05, 0xe9, 0, 0, 0, 0]);
                        op
                    });
                    (it.fix_off, it.fix_size, it.pfx) = (pfx + 5, 4, pfx);
                    if it.fix == Fix::BrLabel {
                        it.short_op = op;
                    }
                    it.len = pfx + 9;
                    pos += it.len as u32;
                    self.items.push(it);
                    continue;
                }
                // JMP rel32 (E9) / Jcc rel32 (0F 8x) with a rel8 form.
                if it.fix == Fix::BrLabel
                    && near.as_short_branch() != near
                    && it.fix_size == 4
                    && it.fix_off as usize + 4 == len
                {
                    let (op, opc_len) = if near == Code::Jmp_rel32_64 {
                        (0xeb, 1)
                    } else {
                        (
                            0x70 | ((near.condition_code() as u8).wrapping_sub(1) & 0xf),
                            2,
                        )
                    };
                    if near == Code::Jmp_rel32_64 || near.condition_code() as u8 != 0 {
                        if let Some(pfx) = it.fix_off.checked_sub(opc_len) {
                            it.short_op = op;
                            it.pfx = pfx;
                        }
                    }
                }
            } else if ins.memory_base() == Register::RIP {
                let t = ins.memory_displacement64();
                (it.fix, it.target) = match self.label(t) {
                    Some(k) => (Fix::RipLabel, k as u64),
                    None => (Fix::RipAbs, t),
                };
                let direct = self.with_scratch(|b| encode_lea_rip(ins, b));
                if let Some((n, fo)) = direct {
                    (len, it.fix_off, it.fix_size) = (n, fo, 4);
                } else {
                    let mut x = *ins;
                    x.set_memory_displacement64(0);
                    len = self.enc.encode(&x, 0)?;
                    let co = self.enc.get_constant_offsets();
                    it.fix_off = co.displacement_offset() as u8;
                    it.fix_size = co.displacement_size() as u8;
                }
            } else if ins.memory_base() == Register::EIP {
                // 32-bit RIP-relative addressing: never emitted by the
                // translator, left to BlockEncoder.
                return via_block_encoder(instrs, at);
            } else {
                let fast = self.with_scratch(|b| encode_glue(ins, b));
                len = match fast {
                    Some(n) => n,
                    None => self.enc.encode(ins, 0)?,
                };
            }
            it.len = len as u8;
            pos += len as u32;
            self.items.push(it);
        }

        // Short/near choice for label JMP/Jcc. First optimistic, as
        // BlockEncoder: all short, lengthen those that do not fit until
        // nothing changes (the smallest code; one or two passes in
        // practice). If that has not settled after a few passes: all long,
        // then shorten those that fit; distances only shrink when a branch
        // is shortened, so every choice made stays valid.
        let n = self.items.len();
        for it in self.items.iter_mut() {
            it.short = it.short_op != 0;
        }
        let mut settled = false;
        for _ in 0..self.opt_passes {
            self.layout();
            let mut changed = false;
            for i in 0..n {
                let it = self.items[i];
                if it.short && !self.branch_fits(i) {
                    self.items[i].short = false;
                    changed = true;
                }
            }
            if !changed {
                settled = true;
                break;
            }
        }
        if !settled {
            for it in self.items.iter_mut() {
                it.short = false;
            }
            for _ in 0..RELAX_PASSES {
                self.layout();
                let mut changed = false;
                for i in 0..n {
                    let it = self.items[i];
                    if it.short_op != 0 && !it.short {
                        // Would it fit in short form, others as they are?
                        self.items[i].short = true;
                        if self.branch_fits(i) {
                            changed = true;
                        } else {
                            self.items[i].short = false;
                        }
                    }
                }
                if !changed {
                    break;
                }
            }
        }

        // Final layout.
        let mut offsets = Vec::with_capacity(n);
        let mut off = 0u32;
        for it in self.items.iter_mut() {
            it.off = off;
            offsets.push(off);
            off += it.final_len();
        }

        // Copy out (the long forms between two short ones in one piece),
        // then patch.
        let scratch = self.enc.take_buffer();
        let mut code = Vec::with_capacity(off as usize);
        let mut run = 0;
        for it in self.items.iter().filter(|it| it.short) {
            let s = it.start as usize;
            code.extend_from_slice(&scratch[run..s + it.pfx as usize]);
            code.push(it.short_op);
            code.push(0);
            run = s + it.len as usize;
        }
        code.extend_from_slice(&scratch[run..]);
        debug_assert_eq!(code.len(), off as usize);
        let mut err = None;
        for (i, it) in self.items.iter().enumerate() {
            let target = match it.fix {
                Fix::None => continue,
                Fix::BrLabel | Fix::RipLabel => match self.items.get(it.target as usize) {
                    Some(t) => at.wrapping_add(t.off as u64),
                    None => 0,
                },
                Fix::BrAbs | Fix::RipAbs => it.target,
            };
            let (fo, fs) = if it.short {
                (it.pfx + 1, 1)
            } else {
                (it.fix_off, it.fix_size)
            };
            let flen = it.final_len();
            let next = at.wrapping_add((it.off + flen) as u64);
            let diff = target.wrapping_sub(next) as i64;
            if !fits(diff, fs) {
                err = Some((i, target, at.wrapping_add(it.off as u64)));
                break;
            }
            let p = (it.off + fo as u32) as usize;
            code[p..p + fs as usize].copy_from_slice(&diff.to_le_bytes()[..fs as usize]);
        }
        self.enc.set_buffer(scratch);
        if let Some((i, target, ip)) = err {
            return self.range_error(instrs, i, target, ip, at);
        }
        Ok(Assembled { code, offsets })
    }

    /// Instruction `i` cannot reach `target` from `ip`: let the encoder
    /// describe the problem.
    fn range_error(
        &mut self,
        instrs: &[Instruction],
        i: usize,
        target: u64,
        ip: u64,
        at: u64,
    ) -> Result<Assembled, IcedError> {
        let mut x = instrs[i];
        if self.items[i].fix == Fix::BrLabel || self.items[i].fix == Fix::BrAbs {
            x.set_code(x.code().as_near_branch());
            x.set_near_branch64(target);
        } else {
            x.set_memory_displacement64(target);
        }
        match self.enc.encode(&x, ip) {
            Err(e) => Err(e),
            // Not expected: our range check and the encoder's agree.
            Ok(_) => via_block_encoder(instrs, at),
        }
    }
}

/// Direct encodings of the forms that make up most of the glue (register
/// moves, loads and stores of the context block, LEA, immediates, PEXT,
/// data): the bytes iced's encoder would produce, without its generic
/// operand handling. None for anything else.
fn encode_glue(ins: &Instruction, out: &mut Vec<u8>) -> Option<usize> {
    if !plain(ins) {
        return None;
    }
    let start = out.len();
    match ins.code() {
        Code::Zero_bytes => {}
        Code::DeclareByte => {
            for k in 0..ins.declare_data_len() {
                out.push(ins.get_declare_byte_value(k));
            }
        }
        Code::Mov_r64_imm64 => {
            let r = gpr64(ins.op0_register())?;
            out.push(0x48 | (r >> 3));
            out.push(0xb8 | (r & 7));
            out.extend_from_slice(&ins.immediate64().to_le_bytes());
        }
        Code::Mov_rm64_r64 | Code::Mov_r64_rm64 | Code::Lea_r64_m => {
            let (opcode, reg, rm) = match ins.code() {
                Code::Mov_rm64_r64 => (0x89, ins.op1_register(), 0),
                Code::Mov_r64_rm64 => (0x8b, ins.op0_register(), 1),
                _ => (0x8d, ins.op0_register(), 1),
            };
            let reg = gpr64(reg)?;
            if ins.op_kind(rm) == OpKind::Register {
                // Register to register (MOV only; iced uses 89 /r).
                if ins.code() != Code::Mov_rm64_r64 {
                    return None;
                }
                let dst = gpr64(ins.op0_register())?;
                out.push(0x48 | ((reg >> 3) << 2) | (dst >> 3));
                out.push(opcode);
                out.push(0xc0 | ((reg & 7) << 3) | (dst & 7));
            } else {
                let m = Mem::of(ins)?;
                out.push(0x48 | ((reg >> 3) << 2) | m.xb());
                out.push(opcode);
                m.write(reg, out);
            }
        }
        Code::Mov_r32_rm32 | Code::Lea_r32_m if ins.op_kind(1) == OpKind::Memory => {
            // 32-bit destination, 64-bit address: REX only when needed.
            let reg = gpr32(ins.op0_register())?;
            let m = Mem::of(ins)?;
            let rex = ((reg >> 3) << 2) | m.xb();
            if rex != 0 {
                out.push(0x40 | rex);
            }
            out.push(if ins.code() == Code::Lea_r32_m {
                0x8d
            } else {
                0x8b
            });
            m.write(reg, out);
        }
        Code::Mov_rm64_imm32 => {
            if ins.op0_kind() == OpKind::Register {
                let r = gpr64(ins.op0_register())?;
                out.extend_from_slice(&[0x48 | (r >> 3), 0xc7, 0xc0 | (r & 7)]);
            } else {
                let m = Mem::of(ins)?;
                out.push(0x48 | m.xb());
                out.push(0xc7);
                m.write(0, out);
            }
            out.extend_from_slice(&ins.immediate32().to_le_bytes());
        }
        Code::VEX_Pext_r64_r64_rm64 => {
            // VEX.LZ.F3.0F38.W1 F5 /r (the three-byte form: map 0F38).
            let reg = gpr64(ins.op0_register())?;
            let v = gpr64(ins.op1_register())?;
            let (xb, m) = if ins.op2_kind() == OpKind::Register {
                (gpr64(ins.op2_register())? >> 3, None)
            } else {
                let m = Mem::of(ins)?;
                (m.xb(), Some(m))
            };
            out.push(0xc4);
            out.push(((!(((reg >> 3) << 2) | xb) & 7) << 5) | 0x02);
            out.push(0x80 | ((!v & 15) << 3) | 0x02);
            out.push(0xf5);
            match m {
                Some(m) => m.write(reg, out),
                None => out.push(0xc0 | ((reg & 7) << 3) | (gpr64(ins.op2_register())? & 7)),
            }
        }
        _ => return None,
    }
    Some(out.len() - start)
}

/// No prefixes beyond those the code implies.
fn plain(ins: &Instruction) -> bool {
    !(ins.has_lock_prefix()
        || ins.has_rep_prefix()
        || ins.has_repne_prefix()
        || ins.segment_prefix() != Register::None)
}

/// A JMP, CALL or Jcc in its rel32 form, or a JRCXZ, with a zero
/// displacement: (length, offset and size of the displacement). None for
/// other branches.
fn encode_branch(near: Code, ins: &Instruction, out: &mut Vec<u8>) -> Option<(usize, u8, u8)> {
    if !plain(ins) {
        return None;
    }
    match near {
        Code::Jmp_rel32_64 | Code::Call_rel32_64 => {
            out.push(if near == Code::Jmp_rel32_64 {
                0xe9
            } else {
                0xe8
            });
            out.extend_from_slice(&[0; 4]);
            Some((5, 1, 4))
        }
        Code::Jrcxz_rel8_64 => {
            out.extend_from_slice(&[0xe3, 0]);
            Some((2, 1, 1))
        }
        _ if near.is_jcc_near() => {
            let cc = (near.condition_code() as u8).wrapping_sub(1) & 0xf;
            out.extend_from_slice(&[0x0f, 0x80 | cc, 0, 0, 0, 0]);
            Some((6, 2, 4))
        }
        _ => None,
    }
}

/// `lea r64, [rip + disp32]` with a zero displacement: (length, offset of
/// the displacement). None for other RIP-relative forms.
fn encode_lea_rip(ins: &Instruction, out: &mut Vec<u8>) -> Option<(usize, u8)> {
    if ins.code() != Code::Lea_r64_m || !plain(ins) || ins.memory_index() != Register::None {
        return None;
    }
    let reg = gpr64(ins.op0_register())?;
    out.extend_from_slice(&[
        0x48 | ((reg >> 3) << 2),
        0x8d,
        ((reg & 7) << 3) | 5,
        0,
        0,
        0,
        0,
    ]);
    Some((7, 3))
}

/// Number (0-15) of a 64-bit general register.
fn gpr64(r: Register) -> Option<u8> {
    r.is_gpr64().then(|| r.number() as u8)
}

/// Number (0-15) of a 32-bit general register.
fn gpr32(r: Register) -> Option<u8> {
    r.is_gpr32().then(|| r.number() as u8)
}

/// A memory operand `[base + index*scale + disp]` with 64-bit registers,
/// or `[index*scale + disp32]` (no RIP, no absolute address), as iced
/// encodes it.
struct Mem {
    base: Option<u8>,
    index: Option<u8>,
    scale: u8,
    /// ModRM mod: 0 (no displacement), 1 (disp8) or 2 (disp32).
    md: u8,
    disp: i32,
}

impl Mem {
    fn of(ins: &Instruction) -> Option<Mem> {
        let index = match ins.memory_index() {
            Register::None => None,
            r => Some(gpr64(r).filter(|&n| n != 4)?),
        };
        let base = match ins.memory_base() {
            // No base: an index is required (else the form is absolute).
            Register::None if index.is_some() => None,
            r => Some(gpr64(r)?),
        };
        let scale = match ins.memory_index_scale() {
            1 => 0u8,
            2 => 1,
            4 => 2,
            8 => 3,
            _ => return None,
        };
        let disp = i32::try_from(ins.memory_displacement64() as i64).ok()?;
        if index.is_none() && scale != 0 {
            return None;
        }
        // The displacement size as iced picks it: the operand's size hint
        // (0: none, 1: disp8 if it fits, 8: disp32); rbp/r13 as a base
        // always take one (mod 00 would mean no base). Without a base it
        // is always a disp32 (mod 00, SIB base 101).
        let md: u8 = match (base, ins.memory_displ_size(), disp) {
            (None, 0 | 1 | 8, _) => 0,
            (Some(b), 0, 0) if b & 7 == 5 => 1,
            (_, 0, 0) => 0,
            (_, 1, d) if i8::try_from(d).is_ok() => 1,
            (_, 1 | 8, _) => 2,
            _ => return None,
        };
        Some(Mem {
            base,
            index,
            scale,
            md,
            disp,
        })
    }

    /// REX.X and REX.B (bits 1 and 0).
    fn xb(&self) -> u8 {
        ((self.index.unwrap_or(0) >> 3) << 1) | (self.base.unwrap_or(0) >> 3)
    }

    /// ModRM (+ SIB) + displacement, with `reg` in ModRM.reg.
    fn write(&self, reg: u8, out: &mut Vec<u8>) {
        let Some(base) = self.base else {
            out.push(((reg & 7) << 3) | 4);
            out.push((self.scale << 6) | ((self.index.unwrap_or(4) & 7) << 3) | 5);
            out.extend_from_slice(&self.disp.to_le_bytes());
            return;
        };
        if self.index.is_some() || base & 7 == 4 {
            out.push((self.md << 6) | ((reg & 7) << 3) | 4);
            out.push((self.scale << 6) | ((self.index.unwrap_or(4) & 7) << 3) | (base & 7));
        } else {
            out.push((self.md << 6) | ((reg & 7) << 3) | (base & 7));
        }
        match self.md {
            1 => out.push(self.disp as i8 as u8),
            2 => out.extend_from_slice(&self.disp.to_le_bytes()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, MemoryOperand};

    use crate::selftest::gen::Rng;

    fn fmt(f: &mut IntelFormatter, i: &Instruction) -> String {
        let mut s = String::new();
        f.format(i, &mut s);
        s
    }

    /// Label id -> instruction index, as the assembler sees them.
    fn label_index(instrs: &[Instruction], id: u64) -> Option<usize> {
        if id == 0 {
            return None;
        }
        instrs.iter().position(|i| i.ip() == id)
    }

    /// Checks that `out` encodes `instrs` at `at`: each instruction decodes
    /// at its offset to the same instruction (modulo short/near branch
    /// form) with label targets resolved to the labelled instruction's
    /// address and other targets kept absolute.
    fn check(instrs: &[Instruction], at: u64, out: &Assembled) -> Result<(), String> {
        if out.offsets.len() != instrs.len() {
            return Err(format!(
                "{} offsets for {} instrs",
                out.offsets.len(),
                instrs.len()
            ));
        }
        let mut f = IntelFormatter::new();
        let mut enc = Encoder::new(64);
        for (k, ins) in instrs.iter().enumerate() {
            let off = out.offsets[k] as usize;
            let end = out
                .offsets
                .get(k + 1)
                .map_or(out.code.len(), |&o| o as usize);
            if end < off || end > out.code.len() {
                return Err(format!("#{k}: bad offsets {off}..{end}"));
            }
            let bytes = &out.code[off..end];
            let ip = at.wrapping_add(off as u64);
            if ins.code() == Code::DeclareByte {
                let want: Vec<u8> = (0..ins.declare_data_len())
                    .map(|j| ins.get_declare_byte_value(j))
                    .collect();
                if bytes != want.as_slice() {
                    return Err(format!("#{k}: db {bytes:02x?} != {want:02x?}"));
                }
                continue;
            }
            let d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE).decode();
            let resolve = |t: u64| match label_index(instrs, t) {
                Some(j) => at.wrapping_add(out.offsets[j] as u64),
                None => t,
            };
            if ins.op0_kind() == OpKind::NearBranch64
                && d.code() == ins.code()
                && ins.code().as_near_branch() == ins.code()
                && ins.code().as_short_branch() == ins.code()
                && d.len() + 7 == bytes.len()
            {
                // A rel8-only branch's long form: over `jmp short +5` to
                // `jmp rel32 target`.
                let (n, t) = (d.len(), resolve(ins.near_branch64()));
                let j = Decoder::with_ip(64, &bytes[n + 2..], ip + n as u64 + 2, 0).decode();
                if d.near_branch_target() != ip + n as u64 + 2
                    || bytes[n..n + 2] != [0xeb, 0x05]
                    || j.code() != Code::Jmp_rel32_64
                    || j.near_branch_target() != t
                {
                    return Err(format!("#{k}: long form {bytes:02x?}, want target {t:#x}"));
                }
                continue;
            }
            if d.len() != bytes.len() {
                return Err(format!(
                    "#{k}: decoded {} bytes of {}",
                    d.len(),
                    bytes.len()
                ));
            }
            let mut want = *ins;
            want.set_ip(ip);
            if ins.op0_kind() == OpKind::NearBranch64 {
                if d.code().as_near_branch() != ins.code().as_near_branch() {
                    return Err(format!("#{k}: code {:?} != {:?}", d.code(), ins.code()));
                }
                let t = resolve(ins.near_branch64());
                if d.near_branch_target() != t {
                    return Err(format!(
                        "#{k}: {} targets {:#x}, want {t:#x}",
                        fmt(&mut f, &d),
                        d.near_branch_target()
                    ));
                }
                want.set_code(d.code());
                want.set_near_branch64(t);
            } else {
                if d.code() != ins.code() {
                    return Err(format!("#{k}: code {:?} != {:?}", d.code(), ins.code()));
                }
                if ins.memory_base() == Register::RIP {
                    let t = resolve(ins.memory_displacement64());
                    if d.ip_rel_memory_address() != t {
                        return Err(format!(
                            "#{k}: {} addresses {:#x}, want {t:#x}",
                            fmt(&mut f, &d),
                            d.ip_rel_memory_address()
                        ));
                    }
                    want.set_memory_displacement64(t);
                }
            }
            let (a, b) = (fmt(&mut f, &d), fmt(&mut f, &want));
            if a != b {
                return Err(format!("#{k}: decoded `{a}`, want `{b}`"));
            }
            // Same bytes as iced's encoder for the resolved instruction.
            let _ = enc.take_buffer();
            enc.encode(&want, ip)
                .map_err(|e| format!("#{k}: re-encode: {e}"))?;
            let re = enc.take_buffer();
            if re != bytes {
                return Err(format!("#{k} `{b}`: {bytes:02x?} != encoder's {re:02x?}"));
            }
        }
        Ok(())
    }

    const AT: u64 = 0x7f00_1234_5000;
    /// Far from AT but within ±2 GiB (stubs elsewhere in the code buffer).
    const STUB: u64 = AT - 0x3000_0000;

    /// A random list; returns the assembler and whether it has rel8-only
    /// branches to arbitrary labels (which may legitimately be out of range).
    fn random_list(r: &mut Rng) -> Result<(CodeAssembler, bool), IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let n = 1 + r.below(90) as usize;
        let nl = 1 + r.below(8) as usize;
        let mut labels: Vec<CodeLabel> = (0..nl).map(|_| a.create_label()).collect();
        // Distinct positions for the labels (label k at pos[k]).
        let mut pos: Vec<usize> = Vec::new();
        while pos.len() < nl.min(n) {
            let p = r.below(n as u64) as usize;
            if !pos.contains(&p) {
                pos.push(p);
            }
        }
        let nl = pos.len();
        let filler = r.below(4);
        let mut risky = false;
        let gprs = [
            rax, rcx, rdx, rbx, rsi, rdi, r8, r9, r10, r11, r12, r13, r14,
        ];
        let xmms = [xmm0, xmm1, xmm7, xmm8, xmm15];
        for p in 0..n {
            if let Some(k) = pos.iter().position(|&q| q == p) {
                a.set_label(&mut labels[k])?;
            }
            let l = labels[r.below(nl as u64) as usize];
            let g = gprs[r.below(gprs.len() as u64) as usize];
            let g2 = gprs[r.below(gprs.len() as u64) as usize];
            let x = xmms[r.below(xmms.len() as u64) as usize];
            let disp = r.below(0x2000) as i32 - 0x100;
            match r.below(22) {
                0 => a.jmp(l)?,
                1 => a.je(l)?,
                2 => a.jne(l)?,
                3 => a.jb(l)?,
                4 => a.jg(l)?,
                5 => a.call(l)?,
                6 => a.lea(g, ptr(l))?,
                7 => a.jmp(STUB + r.below(0x1000))?,
                8 => a.call(STUB + r.below(0x1000))?,
                9 => a.jb(STUB + r.below(0x1000))?,
                10 => {
                    // CodeAssembler's ptr(u64) is absolute [disp32]; build
                    // a RIP-relative operand to an absolute address by hand.
                    let m = MemoryOperand::with_base_displ(
                        Register::RIP,
                        (STUB + r.below(0x1000)) as i64,
                    );
                    a.add_instruction(Instruction::with2(Code::Lea_r64_m, Register::RAX, m)?)?
                }
                11 => a.db(&[0xe9, 0, 0, 0, 0])?,
                12 => {
                    // jrcxz over a jmp (always in range).
                    let mut ok = a.create_label();
                    a.jrcxz(ok)?;
                    a.jmp(l)?;
                    a.set_label(&mut ok)?;
                    a.nop()?;
                }
                13 if r.below(8) == 0 => {
                    a.jrcxz(l)?;
                    risky = true;
                }
                14 => a.mov(qword_ptr(r15 + disp), g)?,
                15 => a.mov(g, qword_ptr(r15 + disp))?,
                16 => a.add(g, g2)?,
                17 => a.movdqu(x, xmmword_ptr(r15 + disp))?,
                18 => a.paddd(x, xmms[0])?,
                19 => a.mov(g, 0x1234_5678_9abc_def0u64)?,
                20 => {
                    // Filler: pushes distances around the rel8 boundary.
                    for _ in 0..filler {
                        a.mov(dword_ptr(r15 + disp), 0x1234_5678)?;
                    }
                    a.nop()?;
                }
                _ => a.cmp(dword_ptr(r15 + disp), 7)?,
            }
        }
        Ok((a, risky))
    }

    #[test]
    fn random_lists_match_block_encoder() {
        const CASES: usize = 10_000;
        let mut r = Rng::new(0x9e37_79b9_7f4a_7c15);
        let (mut ok, mut short_wins, mut equal, mut risky_ok, mut max_excess) = (0, 0, 0, 0, 0);
        for case in 0..CASES {
            let (mut a, risky) = random_list(&mut r).expect("build list");
            let instrs = a.instructions().to_vec();
            let be = a
                .assemble_options(AT, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
                .expect("BlockEncoder");
            match assemble(&instrs, AT) {
                Ok(out) => {
                    if let Err(e) = check(&instrs, AT, &out) {
                        panic!("case {case}: {e}\n{instrs:#?}");
                    }
                    let be_len = be.inner.code_buffer.len();
                    let excess = out.code.len() as i64 - be_len as i64;
                    max_excess = max_excess.max(excess);
                    assert!(
                        excess <= 0,
                        "case {case}: {} bytes vs BlockEncoder's {be_len}",
                        out.code.len()
                    );
                    if out.code.len() == be_len {
                        equal += 1;
                    } else if out.code.len() < be_len {
                        short_wins += 1;
                    }
                    ok += 1;
                    risky_ok += risky as usize;
                }
                Err(e) => panic!("case {case}: {e}\n{instrs:#?}"),
            }
        }
        println!(
            "ok {ok} (same size as BlockEncoder {equal}, smaller {short_wins}, \
             at most {max_excess} bytes larger), {risky_ok} with a JRCXZ to any label"
        );
        assert!(risky_ok > 100, "too few JRCXZ cases: {risky_ok}");
    }

    /// The all-long-then-shorten fallback (used when the optimistic
    /// choice does not settle) is correct too, and never much larger.
    #[test]
    fn pessimistic_fallback() {
        let mut st = State::new().unwrap();
        st.opt_passes = 0;
        let mut r = Rng::new(0x1234_5678_9abc_def1);
        let (mut ok, mut max_excess) = (0, 0);
        for case in 0..3000 {
            let (a, _) = random_list(&mut r).expect("build list");
            let instrs = a.instructions();
            let Ok(out) = st.run(instrs, AT) else {
                continue;
            };
            if let Err(e) = check(instrs, AT, &out) {
                panic!("case {case}: {e}\n{instrs:#?}");
            }
            let best = assemble(instrs, AT).unwrap().code.len();
            max_excess = max_excess.max(out.code.len() as i64 - best as i64);
            ok += 1;
        }
        println!("fallback: ok {ok}, at most {max_excess} bytes larger than optimistic");
        assert!(ok > 2500, "too few successful cases: {ok}");
    }

    /// Short/near boundary: a jmp over k bytes, forward and backward.
    #[test]
    fn rel8_boundary() {
        for k in 100..160u32 {
            for back in [false, true] {
                let mut a = CodeAssembler::new(64).unwrap();
                let mut l = a.create_label();
                let mut end = a.create_label();
                if back {
                    a.set_label(&mut l).unwrap();
                }
                if !back {
                    a.je(l).unwrap();
                }
                a.db(&vec![0x90; k as usize]).unwrap();
                if back {
                    a.jne(l).unwrap();
                } else {
                    a.set_label(&mut l).unwrap();
                }
                a.jmp(end).unwrap();
                a.set_label(&mut end).unwrap();
                a.nop().unwrap();
                let instrs = a.instructions().to_vec();
                let out = assemble(&instrs, AT).unwrap();
                check(&instrs, AT, &out).unwrap();
                let be = a.assemble(AT).unwrap();
                // Optimal here: short exactly when the rel8 fits.
                let short = if back { k + 2 <= 128 } else { k <= 127 };
                assert_eq!(
                    out.code.len() as u32,
                    k + 1 + 2 + if short { 2 } else { 6 },
                    "k={k} back={back}"
                );
                assert!(out.code.len() <= be.len(), "k={k} back={back}");
            }
        }
    }

    #[test]
    fn checker_catches_wrong_label() {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut l1 = a.create_label();
        let mut l2 = a.create_label();
        a.jmp(l1).unwrap();
        a.lea(rax, ptr(l2)).unwrap();
        a.set_label(&mut l1).unwrap();
        a.nop().unwrap();
        a.set_label(&mut l2).unwrap();
        a.nop().unwrap();
        let good = a.instructions().to_vec();
        let out = assemble(&good, AT).unwrap();
        check(&good, AT, &out).unwrap();
        // Same code checked against a list whose jmp targets l2.
        let mut bad = good.clone();
        bad[0].set_near_branch64(good[3].ip());
        assert!(check(&bad, AT, &out).is_err());
        // And one whose lea addresses l1.
        let mut bad = good.clone();
        bad[1].set_memory_displacement64(good[2].ip());
        assert!(check(&bad, AT, &out).is_err());
        // Corrupted bytes.
        let mut out2 = Assembled {
            code: out.code.clone(),
            offsets: out.offsets.clone(),
        };
        out2.code[1] ^= 1;
        assert!(check(&good, AT, &out2).is_err());
    }

    /// JRCXZ and LOOP stay short exactly while the rel8 reaches, and
    /// take the 9-byte long form beyond, forward and backward.
    #[test]
    fn rel8_only_branches_grow() {
        for k in 110..140usize {
            for back in [false, true] {
                let mut a = CodeAssembler::new(64).unwrap();
                let mut l = a.create_label();
                if back {
                    a.set_label(&mut l).unwrap();
                    a.db(&vec![0x90; k]).unwrap();
                    a.loop_(l).unwrap();
                } else {
                    a.jrcxz(l).unwrap();
                    a.db(&vec![0x90; k]).unwrap();
                    a.set_label(&mut l).unwrap();
                }
                a.nop().unwrap();
                let instrs = a.instructions().to_vec();
                let out = assemble(&instrs, AT).unwrap();
                check(&instrs, AT, &out).unwrap();
                let short = if back { k + 2 <= 128 } else { k <= 127 };
                let want = k + 1 + if short { 2 } else { 9 };
                assert_eq!(out.code.len(), want, "k={k} back={back}");
                let be = a.assemble(AT).unwrap().len();
                assert!(want <= be, "k={k} back={back}: BlockEncoder {be}");
            }
        }
        // The checker refuses a long form that lands elsewhere.
        let mut a = CodeAssembler::new(64).unwrap();
        let mut l = a.create_label();
        a.jrcxz(l).unwrap();
        a.db(&[0x90; 200]).unwrap();
        a.set_label(&mut l).unwrap();
        a.nop().unwrap();
        let instrs = a.instructions().to_vec();
        let mut out = assemble(&instrs, AT).unwrap();
        check(&instrs, AT, &out).unwrap();
        out.code[5] ^= 1;
        assert!(check(&instrs, AT, &out).is_err());
    }

    #[test]
    fn out_of_range_is_err() {
        // Absolute targets beyond ±2 GiB.
        let mut a = CodeAssembler::new(64).unwrap();
        a.call(AT + (3 << 30)).unwrap();
        assert!(assemble(a.instructions(), AT).is_err());
        let mut a = CodeAssembler::new(64).unwrap();
        a.lea(rax, ptr(AT - (3 << 30))).unwrap();
        assert!(assemble(a.instructions(), AT).is_err());
        // Duplicate label ids (BlockEncoder's error), invalid instruction.
        let mut i = Instruction::with(Code::Nopd);
        i.set_ip(5);
        assert!(assemble(&[i, i], AT).is_err());
        assert!(assemble(&[Instruction::default()], AT).is_err());
        // Empty list.
        let out = assemble(&[], AT).unwrap();
        assert!(out.code.is_empty() && out.offsets.is_empty());
    }

    /// A list shaped like a translated block.
    fn block_like() -> CodeAssembler {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut stale = a.create_label();
        let mut ok = a.create_label();
        a.mov(qword_ptr(r15 + 0x208), rcx).unwrap();
        a.mov(rcx, 0x7f12_3456_7000u64).unwrap();
        a.mov(ecx, dword_ptr(rcx)).unwrap();
        a.lea(ecx, dword_ptr(rcx - 7)).unwrap();
        a.jrcxz(ok).unwrap();
        a.jmp(stale).unwrap();
        a.set_label(&mut ok).unwrap();
        a.nop().unwrap();
        let mut slows = Vec::new();
        for k in 0..8 {
            let mut back = a.create_label();
            let slow = a.create_label();
            a.mov(rax, qword_ptr(r15 + 8 * k)).unwrap();
            a.mov(rdx, qword_ptr(r15 + 0x100 + 8 * k)).unwrap();
            a.add(rax, rdx).unwrap();
            a.mov(qword_ptr(r15 + 8 * k), rax).unwrap();
            a.lea(rsi, qword_ptr(rax + 0x40)).unwrap();
            a.cmp(rsi, qword_ptr(r15 + 0x300)).unwrap();
            a.jne(slow).unwrap();
            a.movdqu(xmm1, xmmword_ptr(r15 + 0x400 + 16 * k)).unwrap();
            a.set_label(&mut back).unwrap();
            a.mov(qword_ptr(r15 + 0x500), rsi).unwrap();
            slows.push((slow, back));
        }
        let mut site = a.create_label();
        a.mov(qword_ptr(r15 + 0x600), 0x1234).unwrap();
        a.set_label(&mut site).unwrap();
        a.db(&[0xe9, 0, 0, 0, 0]).unwrap();
        a.lea(rax, ptr(site)).unwrap();
        a.jmp(STUB).unwrap();
        a.set_label(&mut stale).unwrap();
        a.mov(qword_ptr(r15 + 0x600), 0).unwrap();
        a.jmp(STUB + 0x40).unwrap();
        for (mut slow, back) in slows {
            a.set_label(&mut slow).unwrap();
            a.mov(rcx, qword_ptr(r15 + 0x210)).unwrap();
            a.mov(qword_ptr(r15 + 0x218), rcx).unwrap();
            a.call(STUB + 0x80).unwrap();
            a.jmp(back).unwrap();
        }
        a
    }

    #[test]
    fn block_like_list() {
        let a = block_like();
        let instrs = a.instructions();
        let out = assemble(instrs, AT).unwrap();
        check(instrs, AT, &out).unwrap();
    }

    /// `cargo test --release -p mat-x86 jit::emit::tests::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn speed() {
        use std::time::Instant;
        let a = block_like();
        let instrs = a.instructions().to_vec();
        let n = instrs.len();
        let iters = 20_000;
        let t = Instant::now();
        let mut sum = 0;
        for _ in 0..iters {
            sum += assemble(std::hint::black_box(&instrs), AT)
                .unwrap()
                .code
                .len();
        }
        let ours = t.elapsed().as_nanos() as f64 / (iters * n) as f64;
        let t = Instant::now();
        for _ in 0..iters {
            let r = BlockEncoder::encode(
                64,
                InstructionBlock::new(std::hint::black_box(&instrs), AT),
                BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
            )
            .unwrap();
            sum += r.code_buffer.len();
        }
        let theirs = t.elapsed().as_nanos() as f64 / (iters * n) as f64;
        println!(
            "{n} instructions: emit {ours:.1} ns/insn, BlockEncoder {theirs:.1} ns/insn ({:.1}x) [{sum}]",
            theirs / ours
        );
    }

    /// The direct glue encodings give exactly iced's bytes, over every
    /// register pairing and a spread of displacements and scales.
    #[test]
    fn glue_encodings_match_iced() {
        use iced_x86::MemoryOperand;
        let regs: Vec<Register> = (0..16u32).map(|n| Register::RAX + n).collect();
        let r32 = |r: Register| Register::EAX + r.number() as u32;
        let disps = [
            0i64,
            1,
            -1,
            0x7f,
            -0x80,
            0x80,
            -0x81,
            0x5f8,
            -0x1000,
            0x7fff_ffff,
            -0x8000_0000,
        ];
        let mut enc = Encoder::new(64);
        let mut n = 0;
        let mut check = |ins: Instruction| {
            let mut ours = Vec::new();
            let Some(len) = encode_glue(&ins, &mut ours) else {
                return;
            };
            enc.encode(&ins, 0)
                .expect("a form iced refuses was encoded");
            let want = enc.take_buffer();
            assert_eq!(ours, want, "{ins} ({:?})", ins.code());
            assert_eq!(len, want.len());
            n += 1;
        };
        for &r in &regs {
            for &b in &regs {
                check(Instruction::with2(Code::Mov_rm64_r64, b, r).unwrap());
                check(Instruction::with2(Code::Mov_rm64_imm32, b, -5i32).unwrap());
                check(Instruction::with3(Code::VEX_Pext_r64_r64_rm64, r, b, regs[3]).unwrap());
                check(Instruction::with3(Code::VEX_Pext_r64_r64_rm64, b, regs[9], r).unwrap());
                check(
                    Instruction::with2(
                        Code::Mov_r64_imm64,
                        r,
                        0x1234_5678_9abc_def0u64 ^ b.number() as u64,
                    )
                    .unwrap(),
                );
                for (d, dsz) in disps.iter().flat_map(|&d| [(d, 0u32), (d, 1), (d, 8)]) {
                    let mo =
                        MemoryOperand::new(b, Register::None, 1, d, dsz, false, Register::None);
                    check(Instruction::with2(Code::Mov_rm64_r64, mo, r).unwrap());
                    check(Instruction::with2(Code::Mov_r64_rm64, r, mo).unwrap());
                    check(Instruction::with2(Code::Lea_r64_m, r, mo).unwrap());
                    check(Instruction::with2(Code::Mov_r32_rm32, r32(r), mo).unwrap());
                    check(Instruction::with2(Code::Lea_r32_m, r32(r), mo).unwrap());
                    check(Instruction::with2(Code::Mov_rm64_imm32, mo, d as i32).unwrap());
                    check(Instruction::with3(Code::VEX_Pext_r64_r64_rm64, r, b, mo).unwrap());
                    for &x in &regs {
                        if x == Register::RSP {
                            continue;
                        }
                        for sc in [1u32, 2, 4, 8] {
                            for base in [b, Register::None] {
                                let mo =
                                    MemoryOperand::new(base, x, sc, d, dsz, false, Register::None);
                                check(Instruction::with2(Code::Lea_r64_m, r, mo).unwrap());
                                check(Instruction::with2(Code::Mov_r64_rm64, r, mo).unwrap());
                                check(Instruction::with2(Code::Lea_r32_m, r32(r), mo).unwrap());
                            }
                            let mo = MemoryOperand::new(b, x, sc, d, dsz, false, Register::None);
                            check(
                                Instruction::with3(Code::VEX_Pext_r64_r64_rm64, r, x, mo).unwrap(),
                            );
                        }
                    }
                }
            }
        }
        check(Instruction::with(Code::Zero_bytes));
        check(Instruction::with_declare_byte(&[0xe9, 1, 2, 3, 4]).unwrap());
        assert!(n > 100_000, "only {n} forms checked");
        // Each form is encoded directly (not left to iced).
        let mo = |b, x| MemoryOperand::new(b, x, 8, -0x7de9, 8, false, Register::None);
        let (g9, g13) = (Register::R9, Register::R13);
        for ins in [
            Instruction::with2(Code::Lea_r64_m, g9, mo(Register::None, g13)),
            Instruction::with2(Code::Mov_r32_rm32, Register::R10D, mo(g13, g9)),
            Instruction::with2(Code::Lea_r32_m, Register::EAX, mo(Register::None, g9)),
            Instruction::with2(Code::Mov_rm64_imm32, mo(g9, g13), 7),
            Instruction::with3(Code::VEX_Pext_r64_r64_rm64, g9, g13, mo(g13, g9)),
            Instruction::with3(Code::VEX_Pext_r64_r64_rm64, g9, g13, Register::RAX),
        ] {
            let ins = ins.unwrap();
            assert!(encode_glue(&ins, &mut Vec::new()).is_some(), "{ins}");
        }
        // Forms left to iced.
        let mut out = Vec::new();
        let seg = Instruction::with2(
            Code::Mov_r64_rm64,
            Register::RAX,
            MemoryOperand::new(Register::RBX, Register::None, 1, 0, 0, false, Register::GS),
        )
        .unwrap();
        assert_eq!(encode_glue(&seg, &mut out), None);
        let rip = Instruction::with2(
            Code::Lea_r64_m,
            Register::RAX,
            MemoryOperand::new(
                Register::RIP,
                Register::None,
                1,
                0x1000,
                8,
                false,
                Register::None,
            ),
        )
        .unwrap();
        assert_eq!(encode_glue(&rip, &mut out), None);
        assert!(out.is_empty());
    }
}
