//! Micro-benchmarks of the interpreter: emulated instructions per second on
//! a tight integer loop and on a mixed loop (memory, calls, shifts, SSE).

use std::time::Instant;

use iced_x86::code_asm::*;

use crate::testutil::{asm64, cpu64};
use crate::Exit;

fn measure(code: &[u8], insns: u64, engine: crate::Engine) -> f64 {
    let mut cpu = cpu64(64 << 20, code, 0x10000);
    cpu.set_engine(engine).expect("JIT code buffer");
    cpu.s.gpr[4] = 0x80_0000;
    let t = Instant::now();
    let mut left = insns;
    while left > 0 {
        let before = cpu.stats.instructions;
        match cpu.run(left.min(50_000_000)) {
            Exit::Budget | Exit::Kicked => {}
            other => panic!("benchmark loop stopped: {other:?}"),
        }
        left = left.saturating_sub(cpu.stats.instructions - before);
    }
    cpu.stats.instructions as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// `add; dec; jnz` forever.
pub fn tight_loop() -> Vec<u8> {
    asm64(0x10000, |a| {
        a.mov(rcx, u64::MAX).unwrap();
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.add(rax, rcx).unwrap();
        a.xor(rdx, rax).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
    })
}

/// Loads/stores, a call/ret, shifts, a multiply and an SSE add per iteration.
pub fn mixed_loop() -> Vec<u8> {
    asm64(0x10000, |a| {
        a.mov(rbx, 0x20_0000u64).unwrap();
        let mut top = a.create_label();
        let mut func = a.create_label();
        a.set_label(&mut top).unwrap();
        a.mov(rax, qword_ptr(rbx)).unwrap();
        a.add(rax, 3).unwrap();
        a.mov(qword_ptr(rbx + 8), rax).unwrap();
        a.shl(rax, 3).unwrap();
        a.imul_3(rdx, rax, 7).unwrap();
        a.call(func).unwrap();
        a.movzx(esi, byte_ptr(rbx + rcx)).unwrap();
        a.and(ecx, 0xff).unwrap();
        a.inc(ecx).unwrap();
        a.cmp(rax, rdx).unwrap();
        a.jmp(top).unwrap();
        a.set_label(&mut func).unwrap();
        a.push(rbx).unwrap();
        a.lea(rbx, qword_ptr(rbx + 16)).unwrap();
        a.pop(rbx).unwrap();
        a.ret().unwrap();
    })
}

/// Run both loops for `insns` instructions each; returns (name, MIPS).
pub fn run_all(insns: u64, engine: crate::Engine) -> Vec<(&'static str, f64)> {
    vec![
        ("tight-loop", measure(&tight_loop(), insns, engine)),
        ("mixed-loop", measure(&mixed_loop(), insns, engine)),
    ]
}

/// The first executable PT_LOAD segment of a 64-bit little-endian ELF
/// file (`matryoshka bench translate`): its bytes and its virtual address.
pub fn elf_text(f: &[u8]) -> Result<(&[u8], u64), String> {
    let bytes = |o: usize, n: usize| o.checked_add(n).and_then(|e| f.get(o..e));
    let u16_at = |o: usize| bytes(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| bytes(o, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| {
        bytes(o, 8).map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    };
    if f.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Err("truncated ELF header".into());
    };
    for k in 0..phnum as usize {
        let ph = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(k.checked_mul(phentsize as usize)?));
        let field =
            |off: usize, f: &dyn Fn(usize) -> Option<u64>| ph.and_then(|p| f(p.checked_add(off)?));
        let (Some(kind), Some(flags), Some(off), Some(vaddr), Some(size)) = (
            field(0, &|o| u32_at(o).map(u64::from)),
            field(4, &|o| u32_at(o).map(u64::from)),
            field(8, &u64_at),
            field(16, &u64_at),
            field(32, &u64_at),
        ) else {
            return Err(format!("truncated program header {k}"));
        };
        // PT_LOAD, PF_X.
        if kind == 1 && flags & 1 != 0 {
            let text = usize::try_from(off)
                .ok()
                .zip(usize::try_from(size).ok())
                .and_then(|(o, n)| bytes(o, n))
                .ok_or("the executable segment lies outside the file")?;
            return Ok((text, vaddr));
        }
    }
    Err("no executable segment".into())
}

#[cfg(test)]
mod tests {
    use super::elf_text;

    /// This test binary's code is found; garbage, truncated headers and
    /// program headers that point outside the file are errors, never
    /// panics.
    #[test]
    fn elf_text_reads_real_files_and_refuses_bad_ones() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let (text, vaddr) = elf_text(&me).expect("this test's own code");
        assert!(text.len() > 4096 && vaddr > 0);
        assert!(elf_text(b"").is_err());
        assert!(elf_text(b"MZ not an ELF file").is_err());
        assert!(elf_text(&me[..0x30]).is_err());
        let mut bad = me[..0x40].to_vec();
        bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(elf_text(&bad).is_err());
        let mut far = me.clone();
        let phoff = u64::from_le_bytes(far[0x20..0x28].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes([far[0x36], far[0x37]]) as usize;
        let phnum = u16::from_le_bytes([far[0x38], far[0x39]]) as usize;
        for k in 0..phnum {
            let p = phoff + k * phentsize;
            far[p + 8..p + 16].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        }
        assert!(elf_text(&far).is_err());
    }
}
