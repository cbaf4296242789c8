use iced_x86::code_asm::*;
use mat_x86::testutil::*;
use mat_x86::Exit;

#[test]
fn loop_sums() {
    let code = asm64(0x10000, |a| {
        a.mov(rax, 0u64).unwrap();
        a.mov(rcx, 1000u64).unwrap();
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.add(rax, rcx).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let mut cpu = cpu64(16 << 20, &code, 0x10000);
    cpu.s.gpr[4] = 0x8000;
    assert_eq!(cpu.run(1_000_000), Exit::Halted);
    assert_eq!(cpu.s.gpr[0], 500500);
}

#[test]
fn page_fault_delivered_via_idt() {
    // IDT at 0x3000 with #PF handler at 0x20000 that HLTs.
    let code = asm64(0x10000, |a| {
        a.mov(rax, qword_ptr(0x4000_0000u64 * 8)).unwrap(); // unmapped (above 1 GiB)
        a.hlt().unwrap();
    });
    let mut cpu = cpu64(16 << 20, &code, 0x10000);
    let handler = asm64(0x20000, |a| {
        a.hlt().unwrap();
    });
    cpu.ram.write(0x20000, &handler);
    // Handler offset 0x20000: low 16 bits are 0, bits 31:16 go at 48.
    let gate_lo: u64 = (0x08 << 16) | (0x8e << 40) | ((0x20000u64 >> 16) << 48);
    cpu.ram.write(0x3000 + 14 * 16, &gate_lo.to_le_bytes());
    cpu.ram.write(0x3000 + 14 * 16 + 8, &0u64.to_le_bytes());
    cpu.s.idtr.base = 0x3000;
    cpu.s.idtr.limit = 0xfff;
    cpu.s.gpr[4] = 0x9000;
    assert_eq!(cpu.run(1000), Exit::Halted);
    assert_eq!(cpu.s.rip, 0x20001);
    assert_eq!(cpu.s.cr2, 0x2_0000_0000);
    // Frame: error code (not present, read, supervisor = 0), RIP, CS, RFLAGS, RSP, SS
    let err = cpu.ram.read_u64(0x9000 - 48).unwrap();
    let rip = cpu.ram.read_u64(0x9000 - 40).unwrap();
    assert_eq!(err, 0);
    assert_eq!(rip, 0x10000);
}

/// Self-modifying code: a store into an already-decoded block must take
/// effect the next time that code runs (Linux patches itself at boot).
#[test]
fn self_modifying_code_is_seen() {
    // Loop twice over a `mov eax, imm32`; between the passes, overwrite the
    // immediate in place. The second pass must see the new value.
    let code = asm64(0x10000, |a| {
        let mut again = a.create_label();
        a.mov(ecx, 2u32).unwrap();
        a.set_label(&mut again).unwrap();
        a.mov(eax, 0x1111_1111u32).unwrap();
        a.add(rbx, rax).unwrap();
        // Patch the immediate (1 byte of opcode + 4 bytes imm at patch_site).
        a.mov(dword_ptr(0x10000 + 6), 0x2222_2222u32).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(again).unwrap();
        a.hlt().unwrap();
    });
    // `mov ecx, 2` is 5 bytes, so the `mov eax, imm32` (B8 imm32) is at
    // 0x10005 and its immediate at 0x10006.
    assert_eq!(code[5], 0xb8, "layout assumption");
    let mut cpu = cpu64(16 << 20, &code, 0x10000);
    cpu.s.gpr[4] = 0x8000;
    assert_eq!(cpu.run(1000), Exit::Halted);
    assert_eq!(cpu.s.gpr[3], 0x1111_1111 + 0x2222_2222);
    assert!(cpu.stats.block_invalidations > 0);
}

/// The whole CPU state round-trips through serde (snapshots build on this).
#[test]
fn cpu_state_serializes() {
    let code = asm64(0x10000, |a| {
        a.hlt().unwrap();
    });
    let mut cpu = cpu64(16 << 20, &code, 0x10000);
    cpu.s.fpu.xmm[3] = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
    cpu.s.gpr[9] = 42;
    let json = serde_json::to_string(&cpu.s).unwrap();
    let back: mat_x86::CpuState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cpu.s);
}

/// REP MOVS over overlapping ranges, both directions, against an
/// element-by-element model: a destination below the source takes the
/// host's bulk copy (memmove), one above it must replicate the source the
/// way the element loop does. Ranges cross pages and elements straddle
/// the overlap (distance 2 with 4-byte elements).
#[test]
fn rep_movs_overlapping_matches_element_model() {
    let base = 0x10_0ff0u64;
    // (element size, destination - source in bytes, count)
    let cases: [(usize, i64, u64); 6] = [
        (1, -1, 9000),
        (1, -16, 5000),
        (4, -2, 3000),
        (8, -8, 1500),
        (1, 1, 3000),
        (4, 2, 1000),
    ];
    for (size, delta, count) in cases {
        let code = asm64(0x10000, |a| {
            a.cld().unwrap();
            match size {
                1 => a.rep().movsb().unwrap(),
                4 => a.rep().movsd().unwrap(),
                _ => a.rep().movsq().unwrap(),
            }
            a.hlt().unwrap();
        });
        let mut cpu = cpu64(16 << 20, &code, 0x10000);
        let span = size * count as usize + 64;
        let init: Vec<u8> = (0..span + 64).map(|i| (i * 7 + i / 251) as u8).collect();
        assert!(cpu.ram.write(base, &init));
        let src = base + 32;
        let dst = (src as i64 + delta) as u64;
        cpu.s.gpr[6] = src;
        cpu.s.gpr[7] = dst;
        cpu.s.gpr[1] = count;
        cpu.s.gpr[4] = 0x8000;
        let mut left = 100;
        while cpu.run(1_000_000) != Exit::Halted {
            left -= 1;
            assert!(left > 0, "rep movs did not finish");
        }
        // The model: read each element, then write it, in order.
        let mut want = init.clone();
        let (s0, d0) = ((src - base) as usize, (dst - base) as usize);
        for k in 0..count as usize {
            let e: Vec<u8> = want[s0 + k * size..s0 + (k + 1) * size].to_vec();
            want[d0 + k * size..d0 + (k + 1) * size].copy_from_slice(&e);
        }
        let mut got = vec![0u8; init.len()];
        assert!(cpu.ram.read(base, &mut got));
        assert!(
            got == want,
            "size {size} delta {delta}: memory differs from the element model"
        );
        let n = (size as u64) * count;
        assert_eq!(cpu.s.gpr[6], src + n);
        assert_eq!(cpu.s.gpr[7], dst + n);
        assert_eq!(cpu.s.gpr[1], 0);
    }
}
