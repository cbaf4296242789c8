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
