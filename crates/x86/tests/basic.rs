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
    let gate_lo: u64 = 0x0000 | (0x08 << 16) | (0x8e << 40) | ((0x20000u64 >> 16) << 48);
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
