//! System-level behaviour of the interpreter: page walks and page faults,
//! exception delivery (IST, stack switch, #DF, triple fault), SYSCALL/SYSRET,
//! IRETQ and INT gates across privilege levels, the real → protected → long
//! mode switch, CPUID and MSRs.
//!
//! Every test runs guest code and checks architectural state afterwards.
//! Exception handlers are stubs `mov r15d, vector; hlt`, so a test can see
//! which vector was delivered (r15) and inspect the frame at RSP.

use std::sync::Arc;

use iced_x86::code_asm::*;
use mat_x86::state::{cr0, efer, flags, seg_attr, Segment, CS, SS};
use mat_x86::testutil::*;
use mat_x86::{Cpu, CpuConfig, CpuState, Exit, GuestRam};

const RAM: u64 = 16 << 20;
const CODE: u64 = 0x10000;
const USER_CODE: u64 = 0x11000;
const IDT: u64 = 0x40000; // clear of the testutil tables at 0x1000..0x4000
const STUBS: u64 = 0x50000;
const STACK: u64 = 0x9000;
const TSS: u64 = 0x6000;
const RSP0: u64 = 0xb000;
const IST1: u64 = 0xc000;
const SENTINEL: u64 = 0xdead;

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

fn w64(cpu: &Cpu, a: u64, v: u64) {
    assert!(cpu.ram.write(a, &v.to_le_bytes()));
}

fn r64(cpu: &Cpu, a: u64) -> u64 {
    cpu.ram.read_u64(a).unwrap()
}

fn read_bytes(cpu: &Cpu, a: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    assert!(cpu.ram.read(a, &mut b));
    b
}

/// Write a 64-bit interrupt gate (type 0xE).
fn set_gate(cpu: &Cpu, vec: u8, target: u64, dpl: u64, ist: u64, present: bool) {
    let lo = (target & 0xffff)
        | (0x08 << 16)
        | (ist << 32)
        | (0xe << 40)
        | (dpl << 45)
        | ((present as u64) << 47)
        | (((target >> 16) & 0xffff) << 48);
    let hi = target >> 32;
    w64(cpu, IDT + vec as u64 * 16, lo);
    w64(cpu, IDT + vec as u64 * 16 + 8, hi);
}

fn stub(vec: u8) -> u64 {
    STUBS + vec as u64 * 16
}

/// Install the 64-bit TSS at `TSS` (RSP0 and IST1) and load TR from the state.
fn setup_tss(cpu: &mut Cpu) {
    w64(cpu, TSS + 4, RSP0);
    w64(cpu, TSS + 0x24, IST1);
    cpu.s.tr = Segment {
        selector: 0x28,
        base: TSS,
        limit: 0x67,
        attr: seg_attr::P | 0xb,
    };
}

/// A 64-bit CPL0 machine: `code` at CODE, an IDT with every vector pointing
/// at a stub, a TSS, RSP = STACK and r15 = SENTINEL.
fn machine(code: impl FnOnce(&mut CodeAssembler)) -> Cpu {
    let mut cpu = cpu64(RAM, &asm64(CODE, code), CODE);
    for v in 0..=255u8 {
        let mut s = vec![0x41, 0xbf];
        s.extend_from_slice(&(v as u32).to_le_bytes());
        s.push(0xf4);
        cpu.ram.write(stub(v), &s);
        set_gate(&cpu, v, stub(v), 0, 0, true);
    }
    cpu.s.idtr.base = IDT;
    cpu.s.idtr.limit = 0xfff;
    cpu.s.gpr[4] = STACK;
    cpu.s.gpr[15] = SENTINEL;
    setup_tss(&mut cpu);
    cpu
}

fn user_cs() -> Segment {
    Segment {
        selector: 0x1b,
        ..flat64_code(3)
    }
}

/// Drop to CPL3 directly through the state (the code must be user pages).
fn to_user(cpu: &mut Cpu, user_rsp: u64) {
    cpu.s.seg[CS] = user_cs();
    cpu.s.seg[SS] = flat_data(0x23, 3);
    cpu.s.gpr[4] = user_rsp;
}

/// Run until HLT and check that the stub for `vec` ran; return the frame at RSP.
fn expect_vector(cpu: &mut Cpu, vec: u8) -> Vec<u64> {
    let exit = cpu.run(100_000);
    assert_eq!(
        exit,
        Exit::Halted,
        "expected vector {vec}, r15={:#x} rip={:#x}",
        cpu.s.gpr[15],
        cpu.s.rip
    );
    assert_eq!(
        cpu.s.gpr[15], vec as u64,
        "delivered vector (rip={:#x})",
        cpu.s.rip
    );
    assert_eq!(cpu.s.rip, stub(vec) + 7);
    assert_eq!(cpu.s.cpl(), 0);
    let top = cpu.s.gpr[4];
    (0..6).map(|k| r64(cpu, top + 8 * k)).collect()
}

/// Run with `engine`, translating every block the first time it runs,
/// with a bus that ignores I/O.
fn hot_engine(cpu: &mut Cpu, engine: mat_x86::Engine) {
    cpu.bus = Box::new(QuietBus);
    cpu.set_engine(engine).unwrap();
    cpu.set_jit_threshold(1);
}

/// Two copies of a machine, translated (every block the first time it
/// runs) and interpreted, for lockstep comparisons.
fn hot_pair(make: impl Fn() -> Cpu) -> (Cpu, Cpu) {
    let mut pair = [make(), make()];
    hot_engine(&mut pair[0], mat_x86::Engine::Jit);
    hot_engine(&mut pair[1], mat_x86::Engine::Interp);
    let [jit, int] = pair;
    (jit, int)
}

/// Both run into a #PF: the same frame, registers and CR2.
fn same_page_fault(jit: &mut Cpu, int: &mut Cpu) {
    let f_j = expect_vector(jit, 14);
    let f_i = expect_vector(int, 14);
    assert_eq!(f_j, f_i, "#PF frame (jit vs interpreter)");
    assert_eq!(jit.s.gpr, int.s.gpr, "registers at the #PF");
    assert_eq!(jit.s.cr2, int.s.cr2, "CR2");
}

/// Run until HLT with no exception delivered.
fn expect_clean_halt(cpu: &mut Cpu) {
    let exit = cpu.run(100_000);
    assert_eq!(exit, Exit::Halted);
    assert_eq!(
        cpu.s.gpr[15], SENTINEL,
        "unexpected exception, rip={:#x}",
        cpu.s.rip
    );
}

/// With `fault`, run until the #PF stub halts and return its frame;
/// otherwise until a clean HLT (no frame).
fn fault_or_halt(cpu: &mut Cpu, fault: bool) -> Vec<u64> {
    if fault {
        expect_vector(cpu, 14)
    } else {
        expect_clean_halt(cpu);
        vec![]
    }
}

// ---------------------------------------------------------------------------
// 1. Page walks with 4 KiB pages.
// ---------------------------------------------------------------------------

const P4: u64 = 0x100000;
const P3: u64 = 0x101000;
const PD0: u64 = 0x102000;
const PD1: u64 = 0x103000;
const PT: u64 = 0x104000;

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

/// Linear address of 4 KiB page `i` in the test window, and its frame.
fn va(i: u64) -> u64 {
    0x4000_0000 + i * 0x1000
}
fn pa(i: u64) -> u64 {
    0x20_0000 + i * 0x1000
}

/// A machine with our own 4-level tables: the first 16 MiB identity mapped
/// with 2 MiB user pages, and linear 1 GiB.. mapped with 4 KiB pages
/// va(i) → pa(i) (P|RW|US, A/D clear) through PD1[0] → PT.
fn paging_machine(code: impl FnOnce(&mut CodeAssembler)) -> Cpu {
    let mut cpu = machine(code);
    for a in [P4, P3, PD0, PD1, PT] {
        cpu.ram.write(a, &[0u8; 4096]);
    }
    w64(&cpu, P4, P3 | P | RW | US);
    w64(&cpu, P3, PD0 | P | RW | US);
    w64(&cpu, P3 + 8, PD1 | P | RW | US);
    for k in 0..8 {
        w64(&cpu, PD0 + k * 8, (k << 21) | P | RW | US | PS);
    }
    w64(&cpu, PD1, PT | P | RW | US);
    for i in 0..16 {
        w64(&cpu, PT + i * 8, pa(i) | P | RW | US);
        w64(&cpu, pa(i), 0x1000 + i); // marker
    }
    cpu.s.cr3 = P4;
    cpu
}

fn set_pte(cpu: &Cpu, i: u64, v: u64) {
    w64(cpu, PT + i * 8, v);
}

/// [`paging_machine`] with va(`absent`), if any, not present.
fn paging_machine_without(code: impl FnOnce(&mut CodeAssembler), absent: Option<u64>) -> Cpu {
    let cpu = paging_machine(code);
    if let Some(i) = absent {
        set_pte(&cpu, i, 0);
    }
    cpu
}

#[test]
fn accessed_and_dirty_bits() {
    let mut cpu = paging_machine(|a| {
        a.mov(rax, qword_ptr(va(0))).unwrap();
        a.mov(rbx, 0x5555u64).unwrap();
        a.mov(qword_ptr(va(1)), rbx).unwrap();
        a.hlt().unwrap();
    });
    expect_clean_halt(&mut cpu);
    assert_eq!(cpu.s.gpr[0], 0x1000);
    assert_eq!(r64(&cpu, pa(1)), 0x5555);
    // Every level of the data walks is accessed.
    assert_ne!(r64(&cpu, P4) & A, 0, "PML4E accessed");
    assert_ne!(r64(&cpu, P3 + 8) & A, 0, "PDPTE accessed");
    assert_ne!(r64(&cpu, PD1) & A, 0, "PDE accessed");
    assert_ne!(r64(&cpu, PT) & A, 0, "PTE (read) accessed");
    assert_ne!(r64(&cpu, PT + 8) & A, 0, "PTE (write) accessed");
    // Dirty only on the leaf that was written.
    assert_eq!(r64(&cpu, PT) & D, 0, "read must not set D");
    assert_ne!(r64(&cpu, PT + 8) & D, 0, "write sets D on the leaf");
    assert_eq!(r64(&cpu, PD1) & D, 0, "no D on non-leaf entries");
    assert_eq!(r64(&cpu, P3 + 8) & D, 0);
    assert_eq!(r64(&cpu, P4) & D, 0);
    // Untouched entries stay untouched.
    assert_eq!(r64(&cpu, PT + 16) & (A | D), 0);
}

#[test]
fn dirty_bit_set_on_write_after_read_of_clean_page() {
    // A read first caches the page; the later write must still set D.
    let mut cpu = paging_machine(|a| {
        a.mov(rax, qword_ptr(va(2))).unwrap();
        a.mov(qword_ptr(va(2)), rax).unwrap();
        a.hlt().unwrap();
    });
    expect_clean_halt(&mut cpu);
    assert_eq!(r64(&cpu, PT + 16) & (A | D), A | D);
}

/// Run `body` against page 2 whose PTE is `pte`; at CPL3 if `user`.
fn pf_case(pte: u64, user: bool, body: impl FnOnce(&mut CodeAssembler)) -> Cpu {
    let mut cpu = paging_machine(|a| {
        body(a);
        a.hlt().unwrap();
    });
    set_pte(&cpu, 2, pte);
    if user {
        to_user(&mut cpu, 0x8000);
    }
    cpu
}

fn check_pf(cpu: &mut Cpu, err: u64, want_cr2: u64, rip: u64) {
    let f = expect_vector(cpu, 14);
    assert_eq!(f[0], err, "#PF error code");
    assert_eq!(cpu.s.cr2, want_cr2, "CR2");
    assert_eq!(f[1], rip, "faulting RIP");
}

fn load_va2(a: &mut CodeAssembler) {
    a.mov(rax, qword_ptr(va(2))).unwrap();
}
fn store_va2(a: &mut CodeAssembler) {
    a.mov(qword_ptr(va(2) + 8), rax).unwrap();
}

#[test]
fn pf_not_present_read_and_write() {
    let mut cpu = pf_case(0, false, load_va2);
    check_pf(&mut cpu, 0, va(2), CODE);
    let mut cpu = pf_case(0, false, store_va2);
    check_pf(&mut cpu, 2, va(2) + 8, CODE);
    let mut cpu = pf_case(pa(2) & !P, true, load_va2);
    check_pf(&mut cpu, 4, va(2), CODE);
    let f = r64(&cpu, RSP0 - 48 + 16);
    assert_eq!(f, 0x1b, "user CS in frame");
    let mut cpu = pf_case(0, true, store_va2);
    check_pf(&mut cpu, 6, va(2) + 8, CODE);
}

#[test]
fn pf_user_access_to_supervisor_page() {
    let mut cpu = pf_case(pa(2) | P | RW, true, load_va2);
    check_pf(&mut cpu, 5, va(2), CODE);
    let mut cpu = pf_case(pa(2) | P | RW, true, store_va2);
    check_pf(&mut cpu, 7, va(2) + 8, CODE);
    // Supervisor bit in a non-leaf entry also denies user access.
    let mut cpu = pf_case(pa(2) | P | RW | US, true, load_va2);
    w64(&cpu, PD1, PT | P | RW);
    check_pf(&mut cpu, 5, va(2), CODE);
    // CPL0 may read it.
    let mut cpu = pf_case(pa(2) | P | RW, false, load_va2);
    expect_clean_halt(&mut cpu);
    assert_eq!(cpu.s.gpr[0], 0x1002);
}

#[test]
fn pf_write_to_read_only_page() {
    // CPL3: always faults.
    let mut cpu = pf_case(pa(2) | P | US, true, store_va2);
    check_pf(&mut cpu, 7, va(2) + 8, CODE);
    // CPL3 read of the same page is fine (ends with #GP at HLT, CPL3).
    let mut cpu = pf_case(pa(2) | P | US, true, load_va2);
    let f = expect_vector(&mut cpu, 13);
    assert_eq!(cpu.s.gpr[0], 0x1002);
    assert_eq!(f[0], 0);
    // CPL0 with CR0.WP=1: faults.
    let mut cpu = pf_case(pa(2) | P | US, false, |a| {
        a.mov(rax, 0x77u64).unwrap();
        store_va2(a);
    });
    check_pf(&mut cpu, 3, va(2) + 8, CODE + 10);
    assert_ne!(r64(&cpu, pa(2) + 8), 0x77);
    // CPL0 with CR0.WP=0: succeeds.
    let mut cpu = pf_case(pa(2) | P | US, false, |a| {
        a.mov(rax, 0x77u64).unwrap();
        store_va2(a);
    });
    cpu.s.cr0 &= !cr0::WP;
    expect_clean_halt(&mut cpu);
    assert_eq!(r64(&cpu, pa(2) + 8), 0x77);
    // Read-only in a non-leaf entry counts too.
    let mut cpu = pf_case(pa(2) | P | RW | US, false, store_va2);
    w64(&cpu, PD1, PT | P | US);
    check_pf(&mut cpu, 3, va(2) + 8, CODE);
}

#[test]
fn pf_instruction_fetch_from_nx_page() {
    let jump = |a: &mut CodeAssembler| {
        a.mov(rax, va(2)).unwrap();
        a.jmp(rax).unwrap();
    };
    // NX set, EFER.NXE=1: fetch fault with I/D.
    let mut cpu = pf_case(pa(2) | P | RW | US | NX, false, jump);
    cpu.ram.write(pa(2), &[0xf4]);
    assert_ne!(cpu.s.efer & efer::NXE, 0);
    check_pf(&mut cpu, 0x11, va(2), va(2));
    // Data reads of an NX page are fine.
    let mut cpu = pf_case(pa(2) | P | RW | US | NX, false, load_va2);
    expect_clean_halt(&mut cpu);
    // Not-present fetch reports I/D too (NXE=1).
    let mut cpu = pf_case(0, false, jump);
    check_pf(&mut cpu, 0x10, va(2), va(2));
    // Without NX the code runs.
    let mut cpu = pf_case(pa(2) | P | RW | US, false, jump);
    cpu.ram.write(pa(2), &[0xf4]);
    expect_clean_halt(&mut cpu);
    assert_eq!(cpu.s.rip, va(2) + 1);
    // NX set while EFER.NXE=0 is a reserved bit (no I/D without NXE/SMEP).
    let mut cpu = pf_case(pa(2) | P | RW | US | NX, false, load_va2);
    cpu.s.efer &= !efer::NXE;
    check_pf(&mut cpu, 9, va(2), CODE);
}

#[test]
fn pf_reserved_bit() {
    // Bit 45 is above MAXPHYADDR (40).
    let mut cpu = pf_case(pa(2) | P | RW | US | (1 << 45), false, load_va2);
    check_pf(&mut cpu, 9, va(2), CODE);
    let mut cpu = pf_case(pa(2) | P | RW | US | (1 << 51), true, store_va2);
    check_pf(&mut cpu, 0xf, va(2) + 8, CODE);
    // PS in a PML4E is reserved (PML4[1] covers 512 GiB..1 TiB).
    let mut cpu = pf_case(pa(2) | P | RW | US, false, |a| {
        a.mov(rbx, 0x80_0000_0000u64).unwrap();
        a.mov(rax, qword_ptr(rbx)).unwrap();
    });
    w64(&cpu, P4 + 8, P3 | P | RW | US | PS);
    check_pf(&mut cpu, 9, 0x80_0000_0000, CODE + 10);
}

#[test]
fn large_pages_translate() {
    let mut cpu = paging_machine(|a| {
        a.mov(rax, qword_ptr(0x4020_0000u64 + 0x1238)).unwrap();
        a.mov(rdx, 0x8000_0000u64 + 0x60_5678).unwrap();
        a.mov(rbx, qword_ptr(rdx)).unwrap();
        a.mov(rcx, 0x99u64).unwrap();
        a.mov(qword_ptr(0x4020_0000u64 + 0x1f_fff0), rcx).unwrap();
        a.hlt().unwrap();
    });
    // 2 MiB page at linear 1 GiB + 2 MiB → physical 4 MiB.
    w64(&cpu, PD1 + 8, 0x40_0000 | P | RW | PS);
    // 1 GiB page at linear 2 GiB → physical 0.
    w64(&cpu, P3 + 16, P | RW | PS);
    w64(&cpu, 0x40_1238, 0x2222);
    w64(&cpu, 0x60_5678, 0x3333);
    expect_clean_halt(&mut cpu);
    assert_eq!(cpu.s.gpr[0], 0x2222);
    assert_eq!(cpu.s.gpr[3], 0x3333);
    assert_eq!(r64(&cpu, 0x5f_fff0), 0x99);
    assert_eq!(
        r64(&cpu, PD1 + 8) & (A | D),
        A | D,
        "2 MiB leaf gets A and D"
    );
    assert_eq!(r64(&cpu, P3 + 16) & (A | D), A, "1 GiB leaf read: A only");
}

#[test]
fn large_page_reserved_bits() {
    // Bits 20:13 of a 2 MiB PDE are reserved.
    let mut cpu = paging_machine(|a| {
        a.mov(rax, qword_ptr(0x4020_0000u64)).unwrap();
        a.hlt().unwrap();
    });
    w64(&cpu, PD1 + 8, 0x40_0000 | P | RW | PS | (1 << 13));
    check_pf(&mut cpu, 9, 0x4020_0000, CODE);
    // Bits 29:13 of a 1 GiB PDPTE are reserved.
    let mut cpu = paging_machine(|a| {
        a.mov(rdx, 0x8000_0000u64).unwrap();
        a.mov(rax, qword_ptr(rdx)).unwrap();
        a.hlt().unwrap();
    });
    w64(&cpu, P3 + 16, P | RW | PS | (1 << 21));
    check_pf(&mut cpu, 9, 0x8000_0000, CODE + 10);
}

#[test]
fn invlpg_makes_changed_pte_visible() {
    let mut cpu = paging_machine(|a| {
        a.mov(rax, qword_ptr(va(3))).unwrap();
        a.mov(rbx, pa(7) | P | RW | US).unwrap();
        a.mov(qword_ptr(PT + 3 * 8), rbx).unwrap();
        a.invlpg(byte_ptr(va(3))).unwrap();
        a.mov(rcx, qword_ptr(va(3))).unwrap();
        // Unmap and invalidate: the next access faults.
        a.mov(qword_ptr(PT + 3 * 8), 0).unwrap();
        a.invlpg(byte_ptr(va(3))).unwrap();
        a.mov(rdx, qword_ptr(va(3))).unwrap();
        a.hlt().unwrap();
    });
    let f = expect_vector(&mut cpu, 14);
    assert_eq!(cpu.s.gpr[0], 0x1003);
    assert_eq!(cpu.s.gpr[1], 0x1007);
    assert_eq!(f[0], 0);
    assert_eq!(cpu.s.cr2, va(3));
}

#[test]
fn cr3_reload_makes_changed_pte_visible() {
    let mut cpu = paging_machine(|a| {
        a.mov(rax, qword_ptr(va(3))).unwrap();
        a.mov(rbx, pa(8) | P | RW | US).unwrap();
        a.mov(qword_ptr(PT + 3 * 8), rbx).unwrap();
        a.mov(rdx, cr3).unwrap();
        a.mov(cr3, rdx).unwrap();
        a.mov(rcx, qword_ptr(va(3))).unwrap();
        // Write-protect, reload, write: faults.
        a.mov(rbx, pa(8) | P | US).unwrap();
        a.mov(qword_ptr(PT + 3 * 8), rbx).unwrap();
        a.mov(cr3, rdx).unwrap();
        a.mov(qword_ptr(va(3)), rcx).unwrap();
        a.hlt().unwrap();
    });
    let f = expect_vector(&mut cpu, 14);
    assert_eq!(cpu.s.gpr[0], 0x1003);
    assert_eq!(cpu.s.gpr[1], 0x1008);
    assert_eq!(f[0], 3);
    assert_eq!(cpu.s.cr2, va(3));
}

#[test]
fn invlpg_of_large_page_invalidates_whole_page() {
    // Two 4 KiB pieces of one 2 MiB page are cached; INVLPG of the first
    // must drop the translation of the whole large page.
    let mut cpu = paging_machine(|a| {
        a.mov(rax, qword_ptr(0x4020_0000u64)).unwrap();
        a.mov(rax, qword_ptr(0x4020_1000u64)).unwrap();
        a.mov(rbx, 0x60_0000u64 | P | RW | PS).unwrap();
        a.mov(qword_ptr(PD1 + 8), rbx).unwrap();
        a.invlpg(byte_ptr(0x4020_0000u64)).unwrap();
        a.mov(rcx, qword_ptr(0x4020_1000u64)).unwrap();
        a.hlt().unwrap();
    });
    w64(&cpu, PD1 + 8, 0x40_0000 | P | RW | PS);
    w64(&cpu, 0x40_1000, 0x4444);
    w64(&cpu, 0x60_1000, 0x6666);
    expect_clean_halt(&mut cpu);
    assert_eq!(cpu.s.gpr[0], 0x4444);
    assert_eq!(cpu.s.gpr[1], 0x6666);
}

// ---------------------------------------------------------------------------
// 2. Long-mode exception delivery.
// ---------------------------------------------------------------------------

#[test]
fn divide_error_frame() {
    let mut cpu = machine(|a| {
        a.mov(eax, 1).unwrap();
        a.xor(edx, edx).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.div(ecx).unwrap();
        a.hlt().unwrap();
    });
    let f = expect_vector(&mut cpu, 0);
    // No error code: frame is RIP, CS, RFLAGS, RSP, SS.
    assert_eq!(f[0], CODE + 9, "RIP of the DIV");
    assert_eq!(read_bytes(&cpu, f[0], 2), [0xf7, 0xf1]);
    assert_eq!(f[1], 0x08);
    assert_eq!(f[2] & flags::FIXED1, flags::FIXED1);
    assert_eq!(f[3], STACK);
    assert_eq!(f[4], 0x10);
    assert_eq!(cpu.s.gpr[4], STACK - 40);
}

#[test]
fn gp_error_code_from_bad_selector() {
    // Selector beyond the GDT limit.
    let mut cpu = machine(|a| {
        a.mov(eax, 0x48).unwrap();
        a.mov(ds, ax).unwrap();
        a.hlt().unwrap();
    });
    let f = expect_vector(&mut cpu, 13);
    assert_eq!(f[0], 0x48);
    assert_eq!(f[1], CODE + 5);
    // DPL3 data into SS at CPL0.
    let mut cpu = machine(|a| {
        a.mov(eax, 0x23).unwrap();
        a.mov(ss, ax).unwrap();
        a.hlt().unwrap();
    });
    let f = expect_vector(&mut cpu, 13);
    assert_eq!(f[0], 0x20);
    // A code segment is never a valid stack segment.
    let mut cpu = machine(|a| {
        a.mov(eax, 0x08).unwrap();
        a.mov(ss, ax).unwrap();
        a.hlt().unwrap();
    });
    let f = expect_vector(&mut cpu, 13);
    assert_eq!(f[0], 0x08);
}

#[test]
fn page_fault_frame_with_error_code() {
    let mut cpu = machine(|a| {
        a.mov(rbx, 0x2_0000_0000u64).unwrap();
        a.mov(qword_ptr(rbx), rax).unwrap();
        a.hlt().unwrap();
    });
    let f = expect_vector(&mut cpu, 14);
    assert_eq!(f[0], 2);
    assert_eq!(f[1], CODE + 10);
    assert_eq!(f[2], 0x08);
    assert_eq!(f[4], STACK);
    assert_eq!(cpu.s.cr2, 0x2_0000_0000);
    assert_eq!(cpu.s.rflags & flags::IF, 0);
}

#[test]
fn ist_switches_stack() {
    let mut cpu = machine(|a| {
        a.int3().unwrap();
        a.hlt().unwrap();
    });
    set_gate(&cpu, 3, stub(3), 0, 1, true);
    let f = expect_vector(&mut cpu, 3);
    assert_eq!(cpu.s.gpr[4], IST1 - 40);
    assert_eq!(f[0], CODE + 1, "INT3 returns after the instruction");
    assert_eq!(f[1], 0x08);
    assert_eq!(f[3], STACK, "old RSP");
    assert_eq!(f[4], 0x10, "old SS");
}

#[test]
fn ist_after_ltr() {
    let mut cpu = machine(|a| {
        a.mov(eax, 0x28).unwrap();
        a.ltr(ax).unwrap();
        a.ud2().unwrap();
    });
    // 16-byte available 64-bit TSS descriptor at 0x28.
    let lo = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89u64 << 40) | (((TSS >> 24) & 0xff) << 56);
    w64(&cpu, GDT + 0x28, lo);
    w64(&cpu, GDT + 0x30, TSS >> 32);
    cpu.s.gdtr.limit = 0x37;
    cpu.s.tr = Segment::default();
    set_gate(&cpu, 6, stub(6), 0, 1, true);
    let f = expect_vector(&mut cpu, 6);
    assert_eq!(cpu.s.tr.base, TSS);
    assert_eq!(cpu.s.tr.selector, 0x28);
    assert_eq!((r64(&cpu, GDT + 0x28) >> 40) & 0xf, 0xb, "TSS marked busy");
    assert_eq!(cpu.s.gpr[4], IST1 - 40);
    assert_eq!(
        read_bytes(&cpu, f[0], 2),
        [0x0f, 0x0b],
        "#UD returns to the UD2"
    );
}

#[test]
fn cpl3_interrupt_switches_to_rsp0() {
    let mut cpu = machine(|a| {
        a.int(0x80).unwrap();
    });
    set_gate(&cpu, 0x80, stub(0x80), 3, 0, true);
    to_user(&mut cpu, 0x8008);
    cpu.s.rflags |= flags::IF;
    let f = expect_vector(&mut cpu, 0x80);
    assert_eq!(cpu.s.gpr[4], RSP0 - 40);
    assert_eq!(f[0], CODE + 2);
    assert_eq!(f[1], 0x1b);
    assert_ne!(f[2] & flags::IF, 0);
    assert_eq!(f[3], 0x8008);
    assert_eq!(f[4], 0x23);
    assert_eq!(cpu.s.seg[CS].selector, 0x08);
    assert_eq!(
        cpu.s.seg[SS].selector & !3,
        0,
        "SS is NULL after a privilege change"
    );
    assert_eq!(cpu.s.rflags & flags::IF, 0, "interrupt gate clears IF");
}

#[test]
fn fault_in_pf_delivery_escalates_to_double_fault() {
    let mut cpu = machine(|a| {
        a.mov(rax, qword_ptr(0x2_0000_0000u64)).unwrap();
        a.hlt().unwrap();
    });
    set_gate(&cpu, 14, stub(14), 0, 0, false);
    let f = expect_vector(&mut cpu, 8);
    assert_eq!(f[0], 0, "#DF error code");
    assert_eq!(f[1], CODE);
    assert_eq!(f[2], 0x08);
}

#[test]
fn contributory_then_contributory_is_double_fault() {
    let mut cpu = machine(|a| {
        a.mov(eax, 0x48).unwrap();
        a.mov(ds, ax).unwrap();
        a.hlt().unwrap();
    });
    set_gate(&cpu, 13, stub(13), 0, 0, false);
    let f = expect_vector(&mut cpu, 8);
    assert_eq!(f[0], 0);
    assert_eq!(f[1], CODE + 5);
}

#[test]
fn benign_then_np_is_not_double_fault_and_sets_ext() {
    // #UD's gate is not present → #NP with the IDT error code (IDT bit, EXT
    // set since the event being delivered was an exception).
    let mut cpu = machine(|a| {
        a.ud2().unwrap();
    });
    set_gate(&cpu, 6, stub(6), 0, 0, false);
    let f = expect_vector(&mut cpu, 11);
    assert_eq!(f[0], 6 * 8 + 2 + 1);
    assert_eq!(f[1], CODE);
}

#[test]
fn fault_while_delivering_double_fault_is_triple_fault() {
    let mut cpu = machine(|a| {
        a.mov(rax, qword_ptr(0x2_0000_0000u64)).unwrap();
        a.hlt().unwrap();
    });
    set_gate(&cpu, 14, stub(14), 0, 0, false);
    set_gate(&cpu, 8, stub(8), 0, 0, false);
    assert!(matches!(cpu.run(100_000), Exit::Shutdown(_)));
}

#[test]
fn empty_idt_triple_faults() {
    let mut cpu = machine(|a| {
        a.ud2().unwrap();
    });
    cpu.s.idtr.limit = 0;
    assert!(matches!(cpu.run(100_000), Exit::Shutdown(_)));
    // Unmapped stack: #PF pushing the #PF frame → #DF → #PF → shutdown.
    let mut cpu = machine(|a| {
        a.ud2().unwrap();
    });
    cpu.s.gpr[4] = 0x2_0000_0000;
    assert!(matches!(cpu.run(100_000), Exit::Shutdown(_)));
}

// ---------------------------------------------------------------------------
// 3. SYSCALL / SYSRET.
// ---------------------------------------------------------------------------

const STAR: u32 = 0xc000_0081;
const LSTAR: u32 = 0xc000_0082;
const SFMASK: u32 = 0xc000_0084;

#[test]
fn syscall_sysret_round_trip() {
    let kernel_entry = 0x12000u64;
    let mut cpu = machine(|a| {
        // Program the MSRs from the guest.
        a.mov(ecx, STAR).unwrap();
        a.mov(eax, 0).unwrap();
        a.mov(edx, 0x0020_0008).unwrap(); // SYSRET base 0x20, SYSCALL CS 0x08
        a.wrmsr().unwrap();
        a.mov(ecx, LSTAR).unwrap();
        a.mov(eax, kernel_entry as u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, SFMASK).unwrap();
        a.mov(eax, 0x47700).unwrap(); // TF DF IF NT AC
        a.wrmsr().unwrap();
        a.mov(rcx, USER_CODE).unwrap();
        a.mov(r11, 0x602u64).unwrap(); // IF | DF
        a.mov(rsp, 0x8000u64).unwrap();
        a.sysretq().unwrap();
    });
    let user = asm64(USER_CODE, |a| {
        a.mov(r11, 0u64).unwrap();
        a.pushfq().unwrap();
        a.pop(r14).unwrap();
        a.mov(r12, cs).unwrap();
        a.mov(r13, ss).unwrap();
        a.stc().unwrap();
        a.syscall().unwrap();
    });
    cpu.ram.write(USER_CODE, &user);
    let after_syscall = USER_CODE + user.len() as u64;
    let kern = asm64(kernel_entry, |a| {
        a.mov(rbx, cs).unwrap();
        a.mov(rdx, ss).unwrap();
        a.hlt().unwrap();
    });
    cpu.ram.write(kernel_entry, &kern);
    expect_clean_halt(&mut cpu);
    // In user mode after SYSRETQ.
    assert_eq!(cpu.s.gpr[12], 0x33, "CS = STAR[63:48]+16 | 3");
    assert_eq!(cpu.s.gpr[13], 0x2b, "SS = STAR[63:48]+8 | 3");
    assert_eq!(cpu.s.gpr[14], 0x602, "RFLAGS from R11");
    // Back in the kernel after SYSCALL.
    assert_eq!(cpu.s.rip, kernel_entry + kern.len() as u64);
    assert_eq!(cpu.s.cpl(), 0);
    assert!(cpu.s.mode64());
    assert_eq!(cpu.s.gpr[3], 0x08);
    assert_eq!(cpu.s.gpr[2], 0x10);
    assert_eq!(cpu.s.gpr[1], after_syscall, "RCX = return RIP");
    assert_eq!(cpu.s.gpr[11], 0x603, "R11 = user RFLAGS");
    assert_eq!(cpu.s.rflags, 0x3, "RFLAGS masked by SFMASK");
    assert_eq!(cpu.s.gpr[4], 0x8000, "SYSCALL does not switch RSP");
    assert_eq!(cpu.s.star, 0x0020_0008_0000_0000);
}

#[test]
fn syscall_without_sce_is_ud_and_sysret_at_cpl3_is_gp() {
    let mut cpu = machine(|a| {
        a.syscall().unwrap();
    });
    cpu.s.efer &= !efer::SCE;
    let f = expect_vector(&mut cpu, 6);
    assert_eq!(f[0], CODE);
    let mut cpu = machine(|a| {
        a.sysretq().unwrap();
    });
    to_user(&mut cpu, 0x8000);
    let f = expect_vector(&mut cpu, 13);
    assert_eq!(f[0], 0);
    assert_eq!(f[1], CODE);
}

#[test]
fn sysret_non_canonical_rcx_is_gp() {
    let mut cpu = machine(|a| {
        a.mov(rcx, 0x0000_8000_0000_0000u64).unwrap();
        a.sysretq().unwrap();
    });
    cpu.s.star = 0x0020_0008_0000_0000;
    let f = expect_vector(&mut cpu, 13);
    assert_eq!(f[0], 0);
    assert_eq!(f[2], 0x08, "still in the kernel");
}

// ---------------------------------------------------------------------------
// 4. IRETQ to user mode and INT 0x80 back.
// ---------------------------------------------------------------------------

fn iret_to_user_machine(gate_dpl: u64) -> Cpu {
    let cpu = machine(|a| {
        a.push(0x23).unwrap();
        a.push(0x8000).unwrap();
        a.push(0x202).unwrap();
        a.push(0x1b).unwrap();
        a.mov(rax, USER_CODE).unwrap();
        a.push(rax).unwrap();
        a.iretq().unwrap();
    });
    let user = asm64(USER_CODE, |a| {
        a.mov(r12, cs).unwrap();
        a.mov(r13, ss).unwrap();
        a.mov(r14, rsp).unwrap();
        a.int(0x80).unwrap();
        a.hlt().unwrap();
    });
    cpu.ram.write(USER_CODE, &user);
    set_gate(&cpu, 0x80, stub(0x80), gate_dpl, 0, true);
    cpu
}

#[test]
fn iretq_to_user_and_int80_back() {
    let mut cpu = iret_to_user_machine(3);
    let f = expect_vector(&mut cpu, 0x80);
    assert_eq!(cpu.s.gpr[12], 0x1b);
    assert_eq!(cpu.s.gpr[13], 0x23);
    assert_eq!(cpu.s.gpr[14], 0x8000);
    assert_eq!(cpu.s.gpr[4], RSP0 - 40);
    assert_eq!(f[0], USER_CODE + 11, "INT returns after itself");
    assert_eq!(read_bytes(&cpu, f[0] - 2, 2), [0xcd, 0x80]);
    assert_eq!(f[1], 0x1b);
    assert_eq!(
        f[2] & (flags::IF | flags::FIXED1),
        flags::IF | flags::FIXED1
    );
    assert_eq!(f[3], 0x8000);
    assert_eq!(f[4], 0x23);
}

#[test]
fn int80_through_dpl0_gate_from_user_is_gp() {
    let mut cpu = iret_to_user_machine(0);
    let f = expect_vector(&mut cpu, 13);
    assert_eq!(f[0], 0x80 * 8 + 2, "IDT error code, EXT clear for INT n");
    assert_eq!(f[1], USER_CODE + 9, "#GP points at the INT");
    assert_eq!(f[2], 0x1b);
    assert_eq!(f[4], 0x8000);
}

#[test]
fn iretq_to_kernel_same_level() {
    let mut cpu = machine(|a| {
        a.mov(rax, rsp).unwrap();
        a.push(0x10).unwrap();
        a.push(rax).unwrap();
        a.pushfq().unwrap();
        a.push(0x08).unwrap();
        a.mov(rax, 0x12000u64).unwrap();
        a.push(rax).unwrap();
        a.iretq().unwrap();
    });
    cpu.ram.write(0x12000, &[0xf4]);
    expect_clean_halt(&mut cpu);
    assert_eq!(cpu.s.rip, 0x12001);
    assert_eq!(cpu.s.gpr[4], STACK);
    assert_eq!(cpu.s.cpl(), 0);
}

// ---------------------------------------------------------------------------
// 5. Real mode → protected mode → long mode.
// ---------------------------------------------------------------------------

#[test]
fn real_to_protected_to_long_mode() {
    let ram = Arc::new(GuestRam::anonymous(RAM));
    // Identity page tables at 0x1000 (2 MiB pages).
    let _ = long_mode_state(&ram, 1);
    const GDT16: u64 = 0x500;
    let gdt: [u64; 4] = [
        0,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00af_9a00_0000_ffff,
    ];
    for (k, d) in gdt.iter().enumerate() {
        ram.write(GDT16 + k as u64 * 8, &d.to_le_bytes());
    }
    // GDTR image at 0x7b00.
    let mut gdtr = vec![];
    gdtr.extend_from_slice(&(31u16).to_le_bytes());
    gdtr.extend_from_slice(&(GDT16 as u32).to_le_bytes());
    ram.write(0x7b00, &gdtr);
    // Real-mode IVT entry 0x21 → 0000:7e00.
    ram.write(0x21 * 4, &[0x00, 0x7e, 0x00, 0x00]);
    let mut a16 = CodeAssembler::new(16).unwrap();
    a16.mov(bx, 0x1234u32).unwrap();
    a16.iret().unwrap();
    ram.write(0x7e00, &a16.assemble(0x7e00).unwrap());

    let mut a16 = CodeAssembler::new(16).unwrap();
    a16.cli().unwrap();
    a16.xor(ax, ax).unwrap();
    a16.mov(ds, ax).unwrap();
    a16.mov(ss, ax).unwrap();
    a16.mov(sp, 0x7000u32).unwrap();
    a16.int(0x21).unwrap();
    a16.mov(si, sp).unwrap(); // SP restored by IRET
    a16.lgdt(ptr(0x7b00u32)).unwrap();
    a16.mov(eax, cr0).unwrap();
    a16.or(eax, 1).unwrap();
    a16.mov(cr0, eax).unwrap();
    a16.jmp_far(0x08, 0x8000).unwrap();
    ram.write(0x7c00, &a16.assemble(0x7c00).unwrap());

    let mut a32 = CodeAssembler::new(32).unwrap();
    a32.mov(ax, 0x10u32).unwrap();
    a32.mov(ds, ax).unwrap();
    a32.mov(es, ax).unwrap();
    a32.mov(ss, ax).unwrap();
    a32.mov(esp, 0x7000u32).unwrap();
    a32.mov(edi, cr0).unwrap(); // record: protected, 32-bit
    a32.mov(eax, cr4).unwrap();
    a32.or(eax, 0x20).unwrap(); // PAE
    a32.mov(cr4, eax).unwrap();
    a32.mov(eax, PML4 as u32).unwrap();
    a32.mov(cr3, eax).unwrap();
    a32.mov(ecx, 0xc000_0080u32).unwrap();
    a32.rdmsr().unwrap();
    a32.or(eax, 0x100).unwrap(); // LME
    a32.wrmsr().unwrap();
    a32.mov(eax, cr0).unwrap();
    a32.or(eax, 0x8000_0000u32).unwrap();
    a32.mov(cr0, eax).unwrap();
    a32.jmp_far(0x18, 0x9000).unwrap();
    ram.write(0x8000, &a32.assemble(0x8000).unwrap());

    let code64 = asm64(0x9000, |a| {
        a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
        a.mov(rbp, rsp).unwrap();
        a.hlt().unwrap();
    });
    ram.write(0x9000, &code64);

    let mut cpu = Cpu::new(ram, Box::new(NullBus::default()), CpuConfig::default());
    let mut st = CpuState::reset();
    st.seg[CS] = Segment::real(0);
    st.seg[CS].attr = CpuState::reset().seg[CS].attr;
    st.rip = 0x7c00;
    cpu.set_state(st);
    assert!(!cpu.s.protected());
    assert_eq!(cpu.run(100_000), Exit::Halted);
    assert_eq!(
        cpu.s.gpr[3] & 0xffff,
        0x1234,
        "real-mode INT through the IVT"
    );
    assert_eq!(
        cpu.s.gpr[6] & 0xffff,
        0x7000,
        "IRET popped the 3-word frame"
    );
    assert_eq!(cpu.s.gpr[7] & 1, 1, "CR0.PE seen from 32-bit code");
    assert!(cpu.s.mode64(), "64-bit mode at the end");
    assert_ne!(cpu.s.efer & efer::LMA, 0);
    assert_ne!(cpu.s.cr0 & cr0::PG, 0);
    assert_eq!(cpu.s.seg[CS].selector, 0x18);
    assert_eq!(cpu.s.gpr[0], 0x1122_3344_5566_7788);
    assert_eq!(cpu.s.gpr[5], 0x7000);
    assert_eq!(cpu.s.rip, 0x9000 + code64.len() as u64);
}

#[test]
fn real_mode_interrupt_frame() {
    let ram = Arc::new(GuestRam::anonymous(1 << 20));
    // IVT 0x40 → 1000:0010 (linear 0x10010): HLT.
    ram.write(0x40 * 4, &[0x10, 0x00, 0x00, 0x10]);
    ram.write(0x10010, &[0xf4]);
    let mut a16 = CodeAssembler::new(16).unwrap();
    a16.mov(ax, 0x2000u32).unwrap();
    a16.mov(ss, ax).unwrap();
    a16.mov(sp, 0x100u32).unwrap();
    a16.stc().unwrap();
    a16.sti().unwrap();
    a16.int(0x40).unwrap();
    let code = a16.assemble(0x500).unwrap();
    ram.write(0x500, &code);
    let mut cpu = Cpu::new(ram, Box::new(NullBus::default()), CpuConfig::default());
    let mut st = CpuState::reset();
    st.seg[CS] = Segment {
        attr: st.seg[CS].attr,
        ..Segment::real(0)
    };
    st.rip = 0x500;
    cpu.set_state(st);
    assert_eq!(cpu.run(1000), Exit::Halted);
    assert_eq!(cpu.s.seg[CS].selector, 0x1000);
    assert_eq!(cpu.s.seg[CS].base, 0x10000);
    assert_eq!(cpu.s.rip, 0x11);
    assert_eq!(cpu.s.gpr[4] & 0xffff, 0xfa);
    assert_eq!(cpu.s.rflags & flags::IF, 0, "INT clears IF");
    let mut fr = [0u8; 6];
    assert!(cpu.ram.read(0x200fa, &mut fr));
    let ip = u16::from_le_bytes([fr[0], fr[1]]);
    let fr_cs = u16::from_le_bytes([fr[2], fr[3]]);
    let fl = u16::from_le_bytes([fr[4], fr[5]]);
    assert_eq!(ip as u64, 0x500 + code.len() as u64, "return IP after INT");
    assert_eq!(fr_cs, 0);
    assert_eq!(fl as u64 & (flags::IF | flags::CF), flags::IF | flags::CF);
}

// ---------------------------------------------------------------------------
// 6. CPUID and MSRs.
// ---------------------------------------------------------------------------

#[test]
fn cpuid_leaves_0_and_1() {
    let mut cpu = machine(|a| {
        a.xor(eax, eax).unwrap();
        a.cpuid().unwrap();
        a.mov(r8, rax).unwrap();
        a.mov(r9, rbx).unwrap();
        a.mov(r10, rdx).unwrap();
        a.mov(r11, rcx).unwrap();
        a.mov(eax, 1).unwrap();
        a.cpuid().unwrap();
        a.mov(r12, rax).unwrap();
        a.mov(r13, rcx).unwrap();
        a.mov(r14, rdx).unwrap();
        a.mov(eax, 0x8000_0001u32).unwrap();
        a.cpuid().unwrap();
        a.hlt().unwrap();
    });
    expect_clean_halt(&mut cpu);
    let g = &cpu.s.gpr;
    assert!(g[8] >= 1 && g[8] < 0x100, "max basic leaf {:#x}", g[8]);
    let mut vendor = vec![];
    for r in [g[9], g[10], g[11]] {
        vendor.extend_from_slice(&(r as u32).to_le_bytes());
    }
    assert!(
        vendor.iter().all(|c| c.is_ascii_alphanumeric()),
        "vendor {:?}",
        String::from_utf8_lossy(&vendor)
    );
    assert_eq!(g[9] >> 32, 0, "CPUID zero-extends");
    let family = (g[12] >> 8) & 0xf;
    assert_ne!(family, 0);
    let edx1 = g[14];
    for (bit, name) in [
        (0, "FPU"),
        (4, "TSC"),
        (5, "MSR"),
        (6, "PAE"),
        (8, "CX8"),
        (15, "CMOV"),
        (24, "FXSR"),
        (25, "SSE"),
        (26, "SSE2"),
    ] {
        assert_ne!(edx1 & (1 << bit), 0, "CPUID.1:EDX.{name}");
    }
    assert_ne!(g[2] & (1 << 29), 0, "CPUID.80000001:EDX.LM");
    assert_ne!(g[2] & (1 << 11), 0, "CPUID.80000001:EDX.SYSCALL");
}

#[test]
fn unknown_msr_read_is_gp() {
    let mut cpu = machine(|a| {
        a.mov(ecx, 0x1234_5678).unwrap();
        a.rdmsr().unwrap();
        a.hlt().unwrap();
    });
    let f = expect_vector(&mut cpu, 13);
    assert_eq!(f[0], 0);
    assert_eq!(f[1], CODE + 5);
    let mut cpu = machine(|a| {
        a.mov(ecx, 0x1234_5678).unwrap();
        a.wrmsr().unwrap();
        a.hlt().unwrap();
    });
    let f = expect_vector(&mut cpu, 13);
    assert_eq!(f[1], CODE + 5);
}

#[test]
fn lstar_round_trip_and_non_canonical_gp() {
    let mut cpu = machine(|a| {
        a.mov(ecx, LSTAR).unwrap();
        a.mov(eax, 0x1234_5678).unwrap();
        a.mov(edx, 0xffff_8000u32).unwrap();
        a.wrmsr().unwrap();
        a.xor(eax, eax).unwrap();
        a.xor(edx, edx).unwrap();
        a.rdmsr().unwrap();
        a.mov(r8, rax).unwrap();
        a.mov(r9, rdx).unwrap();
        a.mov(edx, 0x0000_8000u32).unwrap(); // non-canonical
        a.wrmsr().unwrap();
        a.hlt().unwrap();
    });
    let f = expect_vector(&mut cpu, 13);
    assert_eq!(cpu.s.gpr[8], 0x1234_5678);
    assert_eq!(cpu.s.gpr[9], 0xffff_8000);
    assert_eq!(
        cpu.s.lstar, 0xffff_8000_1234_5678,
        "failed WRMSR leaves LSTAR alone"
    );
    assert_eq!(f[0], 0);
    assert_eq!(read_bytes(&cpu, f[1], 2), [0x0f, 0x30], "#GP at the WRMSR");
}

#[test]
fn rdmsr_at_cpl3_is_gp() {
    let mut cpu = machine(|a| {
        a.mov(ecx, LSTAR).unwrap();
        a.rdmsr().unwrap();
    });
    to_user(&mut cpu, 0x8000);
    let f = expect_vector(&mut cpu, 13);
    assert_eq!(f[0], 0);
    assert_eq!(f[1], CODE + 5);
}

// ---------------------------------------------------------------------------
// The translator's inline forms of system and implicit-operand instructions.
// ---------------------------------------------------------------------------

/// A bus with no interrupts and an interrupt hint that says so, so that
/// translated STI takes its fast path.
struct QuietBus;

impl mat_x86::Bus for QuietBus {
    fn io_read(&mut self, _port: u16, _size: u8) -> u32 {
        u32::MAX
    }
    fn io_write(&mut self, _port: u16, _size: u8, _value: u32) {}
    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    fn irq_pending(&mut self) -> bool {
        false
    }
    fn irq_ack(&mut self) -> Option<u8> {
        None
    }
    fn rdmsr(&mut self, _msr: u32) -> Option<u64> {
        None
    }
    fn wrmsr(&mut self, _msr: u32, _value: u64) -> bool {
        false
    }
    fn tsc(&mut self) -> u64 {
        0
    }
    fn irq_hint(&self) -> Option<&std::sync::atomic::AtomicU32> {
        static QUIET: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        Some(&QUIET)
    }
}

/// CLI/STI/PUSHFQ, DIV r/m, BT* m,r, LEAVE, CALL [mem] and MOV r,Sreg run
/// inline in translated code: a hot loop of them must leave the same state
/// as the interpreter, and a #DE from a translated DIV must show the exact
/// RIP and flags.
#[test]
fn translated_inline_forms_match_the_interpreter() {
    const DATA: u64 = 0x30000;
    const FUNC: u64 = 0x31000;
    let run = |engine: mat_x86::Engine| {
        let mut cpu = machine(|a| {
            let mut top = a.create_label();
            a.mov(r12d, 300).unwrap();
            a.set_label(&mut top).unwrap();
            a.sti().unwrap();
            a.pushfq().unwrap();
            a.pop(rax).unwrap();
            a.cli().unwrap();
            a.pushfq().unwrap();
            a.pop(rbx).unwrap();
            a.add(r13, rax).unwrap();
            a.add(r13, rbx).unwrap();
            a.mov(eax, r12d).unwrap();
            a.imul_3(eax, eax, 0x0123_4567).unwrap();
            a.mov(edx, r12d).unwrap();
            a.shr(edx, 6).unwrap();
            a.mov(ecx, 1000).unwrap();
            a.div(ecx).unwrap();
            a.add(r14, rax).unwrap();
            a.add(r14, rdx).unwrap();
            a.mov(rax, DATA + 0x80).unwrap();
            a.lea(rsi, qword_ptr(r12 - 150)).unwrap();
            a.bts(qword_ptr(rax), rsi).unwrap();
            a.setc(dl).unwrap();
            a.add(r14, rdx).unwrap();
            a.lea(rsi, qword_ptr(r12 * 2)).unwrap();
            a.btr(qword_ptr(rax), rsi).unwrap();
            a.bt(dword_ptr(rax + 4), esi).unwrap();
            a.adc(r14, 0).unwrap();
            a.mov(qword_ptr(DATA + 0x200), r12).unwrap();
            a.mov(rax, r13).unwrap();
            a.xor(edx, edx).unwrap();
            a.div(qword_ptr(DATA + 0x200)).unwrap();
            a.add(r14, rax).unwrap();
            a.push(rbp).unwrap();
            a.mov(rbp, rsp).unwrap();
            a.sub(rsp, 24).unwrap();
            a.leave().unwrap();
            a.mov(rax, DATA + 0x100).unwrap();
            a.call(qword_ptr(rax)).unwrap();
            a.mov(r10d, ss).unwrap();
            a.add(r14, r10).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            // A divide error in translated code, with CF set.
            a.xor(ecx, ecx).unwrap();
            a.stc().unwrap();
            a.div(rcx).unwrap();
            a.hlt().unwrap();
        });
        w64(&cpu, DATA + 0x100, FUNC);
        // FUNC: inc r11; ret
        cpu.ram.write(FUNC, &[0x49, 0xff, 0xc3, 0xc3]);
        hot_engine(&mut cpu, engine);
        let frame = expect_vector(&mut cpu, 0);
        let stats = cpu.jit_stats().cloned();
        let at = read_bytes(&cpu, frame[0], 3);
        (cpu.s.gpr, frame, read_bytes(&cpu, DATA, 0x300), stats, at)
    };
    let (g_i, f_i, m_i, _, at) = run(mat_x86::Engine::Interp);
    let (g_j, f_j, m_j, stats, _) = run(mat_x86::Engine::Jit);
    let stats = stats.expect("jit stats");
    assert!(
        stats.translations > 0 && stats.native_insns > 20,
        "{stats:?}"
    );
    assert_eq!(g_j, g_i, "registers (jit vs interpreter)");
    assert_eq!(m_j, m_i, "memory (jit vs interpreter)");
    assert_eq!(f_j, f_i, "#DE frame (jit vs interpreter)");
    assert_eq!(at, [0x48, 0xf7, 0xf1], "the frame's RIP is the DIV");
    assert_eq!(f_i[2] & flags::CF, flags::CF, "CF as before the DIV");
    assert_eq!(f_i[2] & flags::IF, 0, "IF clear after the last CLI");
    assert_eq!(g_i[11], 300, "CALL [mem] ran every time");
}

/// Translated blocks count their instructions with a flag-clobbering ADD
/// placed where the guest flags are dead (before the block's first
/// instruction that overwrites them all). A load before that point that
/// faults must still show the guest the flags from before the block.
#[test]
fn fault_before_the_count_shows_the_guest_flags() {
    let run = |engine: mat_x86::Engine| {
        let mut cpu = machine(|a| {
            let mut top = a.create_label();
            let mut skip = a.create_label();
            a.mov(r12d, 50).unwrap();
            a.mov(rsi, STACK - 64).unwrap();
            a.set_label(&mut top).unwrap();
            // Faults once rsi is unmapped, with the flags of DEC and STC.
            a.mov(rax, qword_ptr(rsi)).unwrap();
            a.add(r13, rax).unwrap();
            a.cmp(r12d, 2).unwrap();
            a.jne(skip).unwrap();
            a.mov(rsi, 0x2_0000_0000u64).unwrap();
            a.set_label(&mut skip).unwrap();
            a.dec(r12d).unwrap();
            a.stc().unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        hot_engine(&mut cpu, engine);
        let frame = expect_vector(&mut cpu, 14);
        (cpu.s.gpr, frame, cpu.jit_stats().cloned())
    };
    let (g_i, f_i, _) = run(mat_x86::Engine::Interp);
    let (g_j, f_j, stats) = run(mat_x86::Engine::Jit);
    ran_translated(stats);
    assert_eq!(g_j, g_i, "registers (jit vs interpreter)");
    assert_eq!(f_j, f_i, "#PF frame (jit vs interpreter)");
    assert_eq!(g_i[12], 1, "the fault comes on the last round");
    // DEC of 2 leaves 1: ZF, SF and PF clear; STC sets CF.
    let arith = flags::CF | flags::PF | flags::ZF | flags::SF | flags::OF;
    assert_eq!(f_i[3] & arith, flags::CF, "flags as before the load");
}

/// Translated loads and stores reuse the TLB entry each access site hit
/// last (entry slots). Remapping the page under such a site, and one
/// site alternating between two pages, must still read and write the
/// right frames: compared with the interpreter and with the expected sums.
#[test]
fn translated_accesses_follow_remapped_and_alternating_pages() {
    const N: u64 = 200;
    let run = |engine: mat_x86::Engine| {
        let mut cpu = paging_machine(|a| {
            let mut top = a.create_label();
            a.mov(r12d, N as u32).unwrap();
            a.set_label(&mut top).unwrap();
            // Site 1: always va(3), whose frame changes every round.
            a.mov(rax, qword_ptr(va(3))).unwrap();
            a.add(r13, rax).unwrap();
            // Site 2: a store alternating between va(8) and va(9).
            a.mov(edi, r12d).unwrap();
            a.and(edi, 1).unwrap();
            a.shl(edi, 12).unwrap();
            a.add(rdi, va(8) as i32).unwrap();
            a.mov(qword_ptr(rdi), r12).unwrap();
            // Site 3: a load of what site 2 stored.
            a.add(r14, qword_ptr(rdi)).unwrap();
            // Site 4: an 8-byte load alternating between inside va(11) and
            // straddling va(10)/va(11) (va(10) maps a frame that is not
            // the one before va(11)'s).
            a.mov(esi, r12d).unwrap();
            a.and(esi, 1).unwrap();
            a.shl(esi, 4).unwrap();
            a.add(rsi, (va(11) - 4) as i32).unwrap();
            a.add(r10, qword_ptr(rsi)).unwrap();
            // Site 5: the same for an unaligned 16-byte load, 8 bytes
            // either side of the page boundary or at va(11) + 8.
            a.movdqu(xmm0, xmmword_ptr(rsi - 4)).unwrap();
            a.paddq(xmm1, xmm0).unwrap();
            // Map va(3) to pa(4 + r12 % 4) for the next round.
            a.mov(ebx, r12d).unwrap();
            a.and(ebx, 3).unwrap();
            a.add(ebx, 4).unwrap();
            a.shl(rbx, 12).unwrap();
            a.add(rbx, (pa(0) | P | RW | US) as i32).unwrap();
            a.mov(qword_ptr(PT + 3 * 8), rbx).unwrap();
            a.invlpg(byte_ptr(va(3))).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.movq(r9, xmm1).unwrap();
            a.pshufd(xmm2, xmm1, 0xee).unwrap();
            a.movq(r8, xmm2).unwrap();
            a.hlt().unwrap();
        });
        set_pte(&cpu, 10, pa(14) | P | RW | US);
        w64(&cpu, pa(14) + 0xff8, 0x1111_2222_3333_4444);
        w64(&cpu, pa(10) + 0xff8, 0x5555_6666_7777_8888);
        w64(&cpu, pa(11), 0x9999_aaaa_bbbb_cccc);
        w64(&cpu, pa(11) + 0xc, 0xdddd_eeee_0000_0001);
        hot_engine(&mut cpu, engine);
        expect_clean_halt(&mut cpu);
        let stats = cpu.jit_stats().cloned();
        (cpu.s.gpr, r64(&cpu, pa(8)), r64(&cpu, pa(9)), stats)
    };
    let (g_i, p8_i, p9_i, _) = run(mat_x86::Engine::Interp);
    let (g_j, p8_j, p9_j, stats) = run(mat_x86::Engine::Jit);
    ran_translated(stats);
    assert_eq!(g_j, g_i, "registers (jit vs interpreter)");
    assert_eq!((p8_j, p9_j), (p8_i, p9_i), "stored values");
    // Round k (r12 = N - k) reads the frame mapped in round k - 1.
    let mut want = 0x1003;
    for r in (1..N).rev() {
        want += 0x1000 + 4 + (r + 1) % 4;
    }
    assert_eq!(g_i[13], want, "sum of the remapped loads");
    assert_eq!(g_i[14], (1..=N).sum::<u64>(), "each store read back");
    assert_eq!((p8_i, p9_i), (2, 1), "last stores to va(8) and va(9)");
    // Even r12: the straddling load, 4 bytes from pa(14)'s end and 4 from
    // pa(11)'s start; odd: the 8 bytes at va(11) + 12.
    let straddle = 0x1111_2222u64 | 0xbbbb_cccc << 32;
    let inside = 0xdddd_eeee_0000_0001u64;
    let want15 = (1..=N).fold(0u64, |s, r| {
        s.wrapping_add(if r % 2 == 0 { straddle } else { inside })
    });
    assert_eq!(g_i[10], want15, "straddling and inside loads");
    // The 16-byte load: pa(14)'s last 8 bytes and pa(11)'s first 8, or
    // the 16 bytes at pa(11) + 8.
    let sum16 = |lo: bool| {
        (1..=N).fold(0u64, |s, r| {
            let v = match (r % 2 == 0, lo) {
                (true, true) => 0x1111_2222_3333_4444,
                (true, false) => 0x9999_aaaa_bbbb_cccc,
                (false, true) => 0x0000_0001_0000_0000,
                (false, false) => 0xdddd_eeee,
            };
            s.wrapping_add(v)
        })
    };
    assert_eq!(
        (g_i[9], g_i[8]),
        (sum16(true), sum16(false)),
        "16-byte loads"
    );
}

/// Run `n` rounds of `body` (r12 counts down from `n`) on `engine`, with
/// rdi = `even` on even rounds and `even` - 16 on odd ones, va(6) mapped
/// to pa(14) (not adjacent to va(5)'s frame) and `cells` (physical)
/// holding `init(k)` for the k-th; the registers and the cells after.
fn straddling_rounds(
    engine: mat_x86::Engine,
    n: u32,
    even: u64,
    body: impl Fn(&mut CodeAssembler),
    cells: &[u64],
    init: impl Fn(usize) -> u64,
) -> ([u64; 16], Vec<u64>, Option<mat_x86::JitStats>) {
    let mut cpu = paging_machine(|a| {
        let mut top = a.create_label();
        a.mov(r12d, n).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(edi, r12d).unwrap();
        a.and(edi, 1).unwrap();
        a.shl(edi, 4).unwrap();
        a.neg(rdi).unwrap();
        a.add(rdi, even as i32).unwrap();
        body(a);
        a.dec(r12d).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    set_pte(&cpu, 6, pa(14) | P | RW | US);
    for (k, &at) in cells.iter().enumerate() {
        w64(&cpu, at, init(k));
    }
    hot_engine(&mut cpu, engine);
    expect_clean_halt(&mut cpu);
    let mem = cells.iter().map(|&at| r64(&cpu, at)).collect();
    (cpu.s.gpr, mem, cpu.jit_stats().cloned())
}

/// Same-base accesses of a translated block share one TLB check (groups:
/// `[rdi]`, `[rdi+8]`, `[rdi+16]` below). The group alternates between
/// lying inside va(5) and straddling va(5)/va(6), which map to frames that
/// are not adjacent, so its check fails every other round. Between its
/// members two other loads miss the TLB every round (va(3) and 0x3000
/// share a TLB index and evict each other), so their helpers run while
/// the group is live and the block must go on without the group's
/// register. Compared with the interpreter and with a model of the loop.
#[test]
fn grouped_accesses_survive_straddles_and_helpers() {
    const N: u64 = 100;
    let cells = [
        pa(5) + 0xfe8,
        pa(5) + 0xff0,
        pa(5) + 0xff8,
        pa(14),
        pa(14) + 8,
    ];
    // rdi = va(6) - 24 on odd rounds (inside va(5)), va(6) - 8 on even
    // ones (straddling).
    let run = |engine| {
        let body = |a: &mut CodeAssembler| {
            // On straddling rounds the first member is on va(6)'s side.
            a.mov(rax, qword_ptr(rdi + 8)).unwrap();
            a.mov(rdx, qword_ptr(va(3))).unwrap();
            a.add(rax, qword_ptr(rdi)).unwrap();
            a.mov(r8, qword_ptr(0x3000u64)).unwrap();
            a.add(rax, rdx).unwrap();
            a.add(rax, r8).unwrap();
            a.mov(qword_ptr(rdi + 16), rax).unwrap();
            a.add(r13, rax).unwrap();
        };
        straddling_rounds(engine, N as u32, va(6) - 8, body, &cells, |k| {
            0x0101_0101 << k
        })
    };
    let (g_i, m_i, _) = jit_agrees(run);
    // What the loop reads at 0x3000 (a page of the identity tables, the
    // same in every machine).
    let low = {
        let cpu = paging_machine(|a| a.hlt().unwrap());
        r64(&cpu, 0x3000)
    };
    // The model: qwords at va(6) - 24 .. va(6) + 16, in steps of 8.
    let mut m: Vec<u64> = (0..5).map(|k| 0x0101_0101u64 << k).collect();
    let mut sum = 0u64;
    for r in (1..=N).rev() {
        let b = if r % 2 == 1 { 0 } else { 2 };
        let v = m[b]
            .wrapping_add(m[b + 1])
            .wrapping_add(0x1003)
            .wrapping_add(low);
        m[b + 2] = v;
        sum = sum.wrapping_add(v);
    }
    assert_eq!(g_i[13], sum, "sum of the rounds");
    assert_eq!(m_i, m, "memory after the loop");
}

/// Groups in a block that names ten registers (quicksort's partition loop
/// does), which leaves the translator its three lookup scratch registers
/// and none to hold a group's address: each group keeps it in a spill
/// slot, which its members load. Two groups are live at once (`[rdi]`
/// and `[r8]`, different slots), with loads and stores; the `[rdi]` group
/// straddles va(5)/va(6) every other round (its check fails, the plain
/// copy runs), and a TLB miss between members (va(3) and 0x3000 evict
/// each other) sends the rest of the block to the plain copy while both
/// groups are live. Compared with the interpreter: a member that loaded
/// the other group's slot, or a slot left from another round, reads or
/// writes the wrong qword.
#[test]
fn spilled_groups_match_the_interpreter() {
    let cells: Vec<u64> = [0xfe8, 0xff0, 0xff8]
        .iter()
        .map(|&o| pa(5) + o)
        .chain([pa(14), pa(14) + 8])
        .chain((0..3).map(|k| pa(5) + 0x800 + 8 * k))
        .collect();
    let run = |engine| {
        let body = |a: &mut CodeAssembler| {
            a.mov(r8, va(5) + 0x800).unwrap();
            a.mov(rax, qword_ptr(rdi)).unwrap();
            a.mov(rbx, qword_ptr(r8)).unwrap();
            a.add(rax, qword_ptr(rdi + 8)).unwrap();
            a.mov(rdx, rbx).unwrap();
            a.add(rdx, qword_ptr(r8 + 8)).unwrap();
            a.mov(rsi, rax).unwrap();
            a.xor(rsi, rdx).unwrap();
            a.mov(rbp, rsi).unwrap();
            a.mov(r9, rbp).unwrap();
            a.add(r13, r9).unwrap();
            a.mov(qword_ptr(rdi + 16), rsi).unwrap();
            a.mov(qword_ptr(r8 + 16), rax).unwrap();
            a.mov(rbp, qword_ptr(va(3))).unwrap();
            a.add(rax, qword_ptr(rdi + 8)).unwrap();
            a.mov(r9, qword_ptr(0x3000u64)).unwrap();
            a.add(rbp, r9).unwrap();
            a.add(qword_ptr(r8), rbp).unwrap();
            a.add(r13, rax).unwrap();
        };
        let init = |k: usize| 0x0f1e_2d3c_4b5a_6978_u64.rotate_left(5 * k as u32);
        straddling_rounds(engine, 100, va(6) - 8, body, &cells, init)
    };
    let (g_i, _, _) = jit_agrees(run);
    assert_ne!(g_i[13], 0, "the loop summed something");
}

/// Accesses through different registers whose addresses differ by a
/// constant share one group: `[rdi]`, then `[rsi]` with rsi = rdi + 8
/// (LEA), `[rdi]` after `add rdi, 16`, `[rbx + 8]` with rbx a copy of rdi,
/// `[rsi + 24]` and `[r8 - 8]` with r8 = rbx shifted back by a SUB. The
/// range alternates between lying inside va(5) and straddling va(5)/va(6)
/// (frames not adjacent: the check fails and the plain copy runs); a
/// store goes through a register the planner cannot follow (loaded from
/// memory), at an offset that cycles through four values; after a LODSQ
/// (a helper that moves rsi)
/// the planner must not take rsi for what it was. Compared with the
/// interpreter: a member given a wrong offset reads or writes the wrong
/// qword.
#[test]
fn groups_by_address_match_the_interpreter() {
    let cells: Vec<u64> = (0..4)
        .map(|k| pa(5) + 0xfd8 + 8 * k)
        .chain((0..4).map(|k| pa(14) + 8 * k))
        .collect();
    // rdi = va(6) - 40 on odd rounds (the range is inside va(5)), va(6) -
    // 24 on even ones (it straddles).
    let run = |engine| {
        let body = |a: &mut CodeAssembler| {
            a.mov(rax, qword_ptr(rdi)).unwrap();
            a.lea(rsi, qword_ptr(rdi + 8)).unwrap();
            a.add(rax, qword_ptr(rsi)).unwrap();
            a.add(rdi, 16).unwrap();
            a.mov(qword_ptr(rdi), rax).unwrap();
            a.mov(rbx, rdi).unwrap();
            a.add(rax, qword_ptr(rbx + 8)).unwrap();
            a.mov(qword_ptr(rsi + 24), rax).unwrap();
            a.mov(r8, rbx).unwrap();
            a.sub(r8, 8).unwrap();
            a.xor(rax, qword_ptr(r8 - 8)).unwrap();
            // r8 = rdi, through memory: not followed.
            a.mov(qword_ptr(va(3)), rdi).unwrap();
            a.mov(r8, qword_ptr(va(3))).unwrap();
            a.mov(edx, r12d).unwrap();
            a.and(edx, 3).unwrap();
            a.shl(edx, 3).unwrap();
            a.add(r8, rdx).unwrap();
            a.mov(qword_ptr(r8 - 16), rax).unwrap();
            a.add(r13, rax).unwrap();
            // LODSQ leaves for a helper and moves rsi: afterwards rsi and
            // rbx (its copy from before) are 8 apart, not equal.
            a.lea(rsi, qword_ptr(rdi - 16)).unwrap();
            a.mov(rbx, rsi).unwrap();
            a.lodsq().unwrap();
            a.add(r13, qword_ptr(rsi)).unwrap();
            a.add(r13, qword_ptr(rbx + 16)).unwrap();
        };
        let init = |k: usize| 0x0123_4567_89ab_cdef_u64.rotate_left(8 * k as u32);
        straddling_rounds(engine, 96, va(6) - 24, body, &cells, init)
    };
    let (g_i, _, _) = jit_agrees(run);
    assert_ne!(g_i[13], 0, "the loop summed something");
}

/// A block that never names rax may park it (as a group's or a cache
/// pair's register). Its helper sites (here MOVSQ, every pass) share one
/// reload-call-park sequence; guest rax must still reach the helper and
/// come back unchanged. It failed when the sites stored host rax (the
/// group's pointer) as guest rax before the shared reload.
#[test]
fn helpers_keep_guest_rax_when_the_block_parks_it() {
    let run = |engine| {
        let mut cpu = paging_machine(|a| {
            let mut top = a.create_label();
            a.mov(rax, 0x5a5a_1234_8765_a5a5u64).unwrap();
            a.mov(r12d, 64).unwrap();
            a.mov(rsi, va(5) + 0x100).unwrap();
            a.set_label(&mut top).unwrap();
            a.mov(rdi, va(6) + 0x200).unwrap();
            a.mov(rbx, qword_ptr(rdi)).unwrap();
            a.add(rbx, qword_ptr(rdi + 8)).unwrap();
            a.mov(rdx, rbx).unwrap();
            a.xor(rdx, r12).unwrap();
            a.mov(rbp, rdx).unwrap();
            a.mov(r8, rbp).unwrap();
            a.mov(r9, r8).unwrap();
            a.add(r13, r9).unwrap();
            a.movsq().unwrap();
            a.add(rbx, qword_ptr(rdi + 8)).unwrap();
            a.mov(qword_ptr(rdi - 8), rbx).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        hot_engine(&mut cpu, engine);
        expect_clean_halt(&mut cpu);
        (cpu.s.gpr, read_bytes(&cpu, pa(6) + 0x200, 16))
    };
    let (g_i, m_i) = run(mat_x86::Engine::Interp);
    let (g_j, m_j) = run(mat_x86::Engine::Jit);
    assert_eq!(g_i[0], 0x5a5a_1234_8765_a5a5, "the interpreter keeps rax");
    assert_eq!(g_j, g_i, "registers (jit vs interpreter)");
    assert_eq!(m_j, m_i, "memory (jit vs interpreter)");
}

/// Run `code` with `engine` on a [`paging_machine`] whose va(6) and va(9)
/// map frames that are not the ones after va(5)'s and va(8)'s (pa(14),
/// pa(15)): doubles in the pages the loops use, other values in the
/// frames after their first pages (pa(6), pa(9)), so that an access that
/// kept the old page's addend past a page boundary reads those. Returns
/// the registers, the six frames and the translator's statistics.
fn run_on_split_pages(
    engine: mat_x86::Engine,
    code: impl FnOnce(&mut CodeAssembler),
) -> ([u64; 16], Vec<u8>, Option<mat_x86::JitStats>) {
    let mut cpu = paging_machine(code);
    set_pte(&cpu, 6, pa(14) | P | RW | US);
    set_pte(&cpu, 9, pa(15) | P | RW | US);
    for k in 0..512u64 {
        let v = |base: f64| (base + k as f64 * 0.25).to_bits();
        w64(&cpu, pa(5) + 8 * k, v(1.0));
        w64(&cpu, pa(14) + 8 * k, v(1000.0));
        w64(&cpu, pa(8) + 8 * k, v(-3.0));
        w64(&cpu, pa(15) + 8 * k, v(-5000.0));
        w64(&cpu, pa(6) + 8 * k, 0x7ff8_dead_0000_0000 | k);
        w64(&cpu, pa(9) + 8 * k, 0x7ff8_beef_0000_0000 | k);
    }
    hot_engine(&mut cpu, engine);
    expect_clean_halt(&mut cpu);
    let mem: Vec<u8> = [5, 14, 8, 15, 6, 9]
        .iter()
        .flat_map(|&i| read_bytes(&cpu, pa(i), 4096))
        .collect();
    (cpu.s.gpr, mem, cpu.jit_stats().cloned())
}

/// The loops of the strided-group tests, on [`run_on_split_pages`]'s
/// pages, 48 rounds (r12) from starts that move round by round, so that
/// their ranges cross from one page into the next at different passes or
/// stay in one page:
/// - up, a counted loop of SSE accesses through `[rdi + rcx]` (read) and
///   `[rsi + rcx]` (read-write), 0x200 bytes from 64 * (r12 & 7) past
///   0x180 before a page boundary; with `apart`, rsi's start is 64 *
///   ((r12 >> 3) & 7) past that instead (64 rounds then), so that either
///   may reach its page's end first;
/// - down through `[rbx]` (read), from 8 * (r12 & 7) below 0x80 past a
///   page boundary to 0x100 before it; with `apart`, also through
///   `[rbp]` (read-write), from 8 * ((r12 >> 3) & 7) below 0x80 past
///   another, both 0x180 bytes.
fn split_page_loops(a: &mut CodeAssembler, apart: bool) {
    let (mut outer, mut up, mut down) = (a.create_label(), a.create_label(), a.create_label());
    // `(r12 >> shift) & 7` times `scale` into eax.
    let part = |a: &mut CodeAssembler, shift: u32, scale: u32| {
        a.mov(eax, r12d).unwrap();
        if shift > 0 {
            a.shr(eax, shift).unwrap();
        }
        a.and(eax, 7).unwrap();
        a.shl(eax, scale).unwrap();
    };
    a.mov(r12d, if apart { 64 } else { 48 }).unwrap();
    a.set_label(&mut outer).unwrap();
    part(a, 0, 6);
    a.lea(rdi, qword_ptr(rax + (va(6) - 0x180) as i32)).unwrap();
    if apart {
        part(a, 3, 6);
    }
    a.lea(rsi, qword_ptr(rax + (va(9) - 0x180) as i32)).unwrap();
    a.cvtsi2sd(xmm1, r12d).unwrap();
    a.unpcklpd(xmm1, xmm1).unwrap();
    a.xor(ecx, ecx).unwrap();
    a.set_label(&mut up).unwrap();
    a.movapd(xmm0, xmmword_ptr(rdi + rcx)).unwrap();
    a.mulpd(xmm0, xmm1).unwrap();
    a.addpd(xmm0, xmmword_ptr(rsi + rcx)).unwrap();
    a.movaps(xmmword_ptr(rsi + rcx), xmm0).unwrap();
    a.add(rcx, 16).unwrap();
    a.cmp(rcx, 0x200).unwrap();
    a.jne(up).unwrap();
    part(a, 0, 3);
    a.mov(rbx, va(6) + 0x80).unwrap();
    a.sub(rbx, rax).unwrap();
    if apart {
        part(a, 3, 3);
        a.mov(rbp, va(9) + 0x80).unwrap();
        a.sub(rbp, rax).unwrap();
        a.lea(rdx, qword_ptr(rbx - 0x180)).unwrap();
    } else {
        a.mov(rdx, va(6) - 0x100).unwrap();
    }
    a.set_label(&mut down).unwrap();
    a.mov(rax, qword_ptr(rbx)).unwrap();
    a.add(r13, rax).unwrap();
    a.rol(r13, 5).unwrap();
    if apart {
        a.xor(qword_ptr(rbp), r13).unwrap();
    }
    a.sub(rbx, 8).unwrap();
    if apart {
        a.sub(rbp, 8).unwrap();
    }
    a.cmp(rbx, rdx).unwrap();
    a.jne(down).unwrap();
    a.dec(r12d).unwrap();
    a.jnz(outer).unwrap();
    a.hlt().unwrap();
}

/// Strided groups (a loop's accesses that move by a constant each pass,
/// checked once for all the passes that stay in one page): the loops of
/// [`split_page_loops`], compared with the interpreter; the loops must
/// have been translated with strided groups.
#[test]
fn strided_groups_cross_pages_like_the_interpreter() {
    let run = |engine| run_on_split_pages(engine, |a| split_page_loops(a, false));
    let (g_i, _, stats) = jit_agrees(run);
    assert!(stats.strided_groups >= 3, "strided groups: {stats:?}");
    assert_ne!(g_i[13], 0, "the downward loop summed something");
}

/// A sieve's inner loop as compilers emit it for a 32-bit index: the
/// index in eax stepped by edx (the prime), copied to esi for the address,
/// two passes unrolled with an exit between them, JBE at the back edge.
/// The translator follows its 32-bit sums and hoists both stores as
/// strided groups whose step is a register. On every other prime the loop
/// is entered with rax's high half set: the entry's check fails and the
/// plain copy runs the first pass. The sieve and the registers must match
/// the interpreter's, and the loop must have been translated so.
#[test]
fn a_sieve_counted_in_32_bits_matches_the_interpreter() {
    const N: u32 = 0x4000;
    let run = |engine| {
        let mut cpu = paging_machine(|a| {
            let mut outer = a.create_label();
            let mut inner = a.create_label();
            let mut next = a.create_label();
            a.mov(r14, va(10)).unwrap();
            a.mov(rdi, r14).unwrap();
            a.mov(ecx, N).unwrap();
            a.mov(al, 1).unwrap();
            a.rep().stosb().unwrap();
            a.mov(ebx, 2).unwrap();
            a.set_label(&mut outer).unwrap();
            a.cmp(byte_ptr(r14 + rbx), 0).unwrap();
            a.je(next).unwrap();
            a.mov(eax, ebx).unwrap();
            a.imul_2(eax, ebx).unwrap();
            a.mov(edx, ebx).unwrap();
            a.test(bl, 2).unwrap();
            a.jz(inner).unwrap();
            a.bts(rax, 32).unwrap();
            a.set_label(&mut inner).unwrap();
            for last in [false, true] {
                a.mov(esi, eax).unwrap();
                a.add(eax, edx).unwrap();
                a.mov(byte_ptr(r14 + rsi), 0).unwrap();
                a.cmp(eax, N as i32 - 1).unwrap();
                if last {
                    a.jbe(inner).unwrap();
                } else {
                    a.ja(next).unwrap();
                }
            }
            a.set_label(&mut next).unwrap();
            a.inc(ebx).unwrap();
            a.mov(eax, ebx).unwrap();
            a.imul_2(eax, ebx).unwrap();
            a.cmp(eax, N as i32).unwrap();
            a.jb(outer).unwrap();
            a.hlt().unwrap();
        });
        hot_engine(&mut cpu, engine);
        assert_eq!(cpu.run(10_000_000), Exit::Halted);
        assert_eq!(
            cpu.s.gpr[15], SENTINEL,
            "an exception, rip={:#x}",
            cpu.s.rip
        );
        let sieve: Vec<u8> = (10..14)
            .flat_map(|i| read_bytes(&cpu, pa(i), 4096))
            .collect();
        (cpu.s.gpr, sieve, cpu.jit_stats().cloned())
    };
    let (_, sieve, stats) = jit_agrees(run);
    assert!(stats.z32_loops >= 1, "loops counted in 32 bits: {stats:?}");
    assert!(stats.strided_groups >= 2, "strided groups: {stats:?}");
    // 1,900 primes below 16,384 (and 0 and 1 left marked).
    assert_eq!(sieve.iter().filter(|&&b| b == 1).count(), 1900 + 2);
}

/// The conditions under which the translator takes a loop's 32-bit sums
/// as 64-bit ones (its `Z32`) are checked at the loop's entry: the
/// counter below 2^31, and so is a bound in a register, which keeps the
/// counter below it at the later passes. The loop has two accesses,
/// `[r14 + rsi]` and `[r14 + rdi]` where rsi is the counter and edi the
/// counter plus 0x40, which wraps when the counter is just below 2^32
/// (the tables map the page 4 GiB above the window's first to another
/// frame, where a sum wrongly taken as 64-bit reaches). It is entered
/// twice: with plain values (and translated), then
/// - with an immediate bound, at a counter of 2^32 - 0x20: the check must
///   send the pass to the plain copy, else the second access goes 4 GiB
///   up;
/// - with a bound in ebx of 2^32 - 16: its check fails. (Without it, the
///   counter could pass 2^31 only after millions of passes through
///   mapped pages, which this test does not run.)
///
/// The translator must write where the interpreter does.
#[test]
fn loops_counted_in_32_bits_check_their_counter_and_bound() {
    let (pd, pt) = (0x105000u64, 0x106000u64);
    for register_bound in [false, true] {
        let run = |engine| {
            let mut cpu = paging_machine(|a| {
                let (mut outer, mut top) = (a.create_label(), a.create_label());
                let (mut out, mut done) = (a.create_label(), a.create_label());
                // First entry: plain values (translated there); second:
                // the ones that break a condition.
                a.mov(r14, va(0) + 0x100).unwrap();
                a.mov(r9d, 2).unwrap();
                a.mov(eax, 0x10).unwrap();
                a.mov(ebx, 0x100).unwrap();
                a.set_label(&mut outer).unwrap();
                a.xor(r8d, r8d).unwrap();
                // (Indirect: the loop's block starts at its start.)
                a.lea(r10, ptr(top)).unwrap();
                a.jmp(r10).unwrap();
                a.set_label(&mut top).unwrap();
                a.mov(esi, eax).unwrap();
                a.mov(byte_ptr(r14 + rsi), 1).unwrap();
                a.lea(edi, qword_ptr(rax + 0x40)).unwrap();
                a.mov(byte_ptr(r14 + rdi), 2).unwrap();
                // (Three passes: the second loop's counter never reaches
                // its bound again once it has wrapped.)
                a.add(r8, 1).unwrap();
                a.cmp(r8, 3).unwrap();
                a.jae(out).unwrap();
                if register_bound {
                    a.add(eax, 8).unwrap();
                    a.cmp(eax, ebx).unwrap();
                } else {
                    a.add(eax, 8).unwrap();
                    a.cmp(eax, 0x1000).unwrap();
                }
                a.jb(top).unwrap();
                a.set_label(&mut out).unwrap();
                a.dec(r9d).unwrap();
                a.jz(done).unwrap();
                if register_bound {
                    a.mov(eax, 0x10).unwrap();
                    a.mov(ebx, 0xffff_fff0u32).unwrap();
                } else {
                    a.mov(eax, 0xffff_ffe0u32).unwrap();
                    // (The TLB then has the page the first access
                    // reaches, for writing: the group check can pass.)
                    a.mov(r11, va(0) + (1 << 32)).unwrap();
                    a.mov(byte_ptr(r11 + 0xe0), 1).unwrap();
                }
                a.jmp(outer).unwrap();
                a.set_label(&mut done).unwrap();
                a.hlt().unwrap();
            });
            // 4 GiB above va(0) (P3[5]): another frame.
            cpu.ram.write(pd, &[0u8; 4096]);
            cpu.ram.write(pt, &[0u8; 4096]);
            w64(&cpu, P3 + 8 * 5, pd | P | RW | US);
            w64(&cpu, pd, pt | P | RW | US);
            w64(&cpu, pt, pa(20) | P | RW | US);
            hot_engine(&mut cpu, engine);
            expect_clean_halt(&mut cpu);
            let mem: Vec<u8> = [pa(0), pa(20)]
                .iter()
                .flat_map(|&a| read_bytes(&cpu, a, 4096))
                .collect();
            (cpu.s.gpr, mem, cpu.jit_stats().cloned())
        };
        let (_, mem, stats) = jit_agrees(run);
        assert!(stats.z32_loops >= 1, "loops counted in 32 bits: {stats:?}");
        if !register_bound {
            // The wrapped access wrote into the window's own page.
            assert_eq!(mem[0x120], 2);
        }
    }
}

/// A strided group's loop that runs into a page that is not present: the
/// pass that reaches it leaves for its check, which fails, and the plain
/// copy raises the #PF with the same frame, registers and CR2 as the
/// interpreter.
#[test]
fn strided_group_faults_where_the_interpreter_does() {
    let make = || {
        let cpu = paging_machine_without(
            |a| {
                let mut top = a.create_label();
                a.mov(rdi, va(7) - 0x200).unwrap();
                a.xor(ecx, ecx).unwrap();
                a.set_label(&mut top).unwrap();
                a.mov(rax, qword_ptr(rdi + rcx)).unwrap();
                a.add(r13, rax).unwrap();
                a.add(rcx, 8).unwrap();
                a.cmp(rcx, 0x400).unwrap();
                a.jne(top).unwrap();
                a.hlt().unwrap();
            },
            Some(7),
        );
        for k in 0..512u64 {
            w64(&cpu, pa(6) + 8 * k, k * 3 + 1);
        }
        cpu
    };
    let (mut jit, mut int) = hot_pair(make);
    same_page_fault(&mut jit, &mut int);
    assert_eq!(jit.s.cr2, va(7));
    let stats = ran_translated(jit.jit_stats().cloned());
    assert!(stats.strided_groups >= 1, "strided groups: {stats:?}");
}

/// A counted loop whose first instruction reads the carry its back edge's
/// CMP left (ADC; clear, where the check's compare would set it) gets
/// strided groups: their check each pass clobbers the flags, so it must
/// sit where the guest flags are dead (before the ADD), not at the loop's
/// start. Matches the interpreter.
#[test]
fn strided_checks_leave_the_flags_a_loop_reads() {
    let run = |engine: mat_x86::Engine| {
        let mut cpu = paging_machine(|a| {
            let mut top = a.create_label();
            a.mov(rdi, va(5) + 0x100).unwrap();
            a.mov(r8d, 200).unwrap();
            a.xor(ecx, ecx).unwrap();
            a.xor(eax, eax).unwrap();
            a.set_label(&mut top).unwrap();
            a.adc(rax, qword_ptr(rdi + rcx * 8)).unwrap();
            a.mov(qword_ptr(rdi + rcx * 8 + 0x400), rax).unwrap();
            a.add(rcx, 1).unwrap();
            // 200 - rcx: no borrow while the loop goes on (CF clear).
            a.cmp(r8, rcx).unwrap();
            a.jne(top).unwrap();
            a.hlt().unwrap();
        });
        for k in 0..200u64 {
            w64(&cpu, pa(5) + 0x100 + 8 * k, u64::MAX - k);
        }
        hot_engine(&mut cpu, engine);
        expect_clean_halt(&mut cpu);
        let stats = cpu.jit_stats().cloned();
        (cpu.s.gpr, read_bytes(&cpu, pa(5), 4096), stats)
    };
    let (_, _, stats) = jit_agrees(run);
    assert!(stats.strided_groups >= 1, "strided groups: {stats:?}");
}

/// Strided groups that move in step share one limit, compared once a
/// pass: the tightest of theirs. The loops of [`split_page_loops`] with
/// groups that start at different page offsets, so that either may be the
/// first to reach its page's end (a pass past the other group's limit
/// would read the other frame's values). Compared with the interpreter.
#[test]
fn strided_groups_in_step_stop_at_the_first_page_end() {
    let run = |engine| run_on_split_pages(engine, |a| split_page_loops(a, true));
    let (g_i, _, stats) = jit_agrees(run);
    assert!(stats.strided_groups >= 4, "strided groups: {stats:?}");
    assert_ne!(g_i[13], 0, "the downward loop summed something");
}

/// The first copy of a loop with strided groups checks no budget in its
/// passes: the hoisted checks send the loop to the plain copy unless the
/// budget has room for every pass the limits let through. Run in slices
/// of a small budget, the loop (a pass a page's worth of times) still
/// stops within a block of each slice's end, in step with the
/// interpreter; and with the whole budget it goes through its pages
/// without a stop.
#[test]
fn strided_loops_stop_when_the_budget_runs_out() {
    let make = || {
        paging_machine(|a| {
            let (mut outer, mut top) = (a.create_label(), a.create_label());
            a.mov(r12d, 3).unwrap();
            a.set_label(&mut outer).unwrap();
            a.mov(rdi, va(4) + 0x18).unwrap();
            a.xor(ecx, ecx).unwrap();
            a.set_label(&mut top).unwrap();
            a.mov(rax, qword_ptr(rdi + rcx)).unwrap();
            a.add(rbx, rax).unwrap();
            a.mov(qword_ptr(rdi + rcx + 0x10), rbx).unwrap();
            a.add(rcx, 8).unwrap();
            a.cmp(rcx, 0x3000).unwrap();
            a.jne(top).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(outer).unwrap();
            a.hlt().unwrap();
        })
    };
    let (mut jit, mut int) = hot_pair(make);
    let budget = 333;
    let mut slices = 0;
    loop {
        let before = jit.stats.instructions;
        let exit = jit.run(budget);
        let ran = jit.stats.instructions - before;
        if exit == Exit::Halted {
            break;
        }
        assert_eq!(exit, Exit::Budget);
        assert!(
            ran < budget + 16,
            "a slice of {budget} ran {ran} instructions"
        );
        slices += 1;
        while int.stats.instructions < jit.stats.instructions {
            assert!(int.step().is_none());
        }
        assert_eq!(jit.s.rip, int.s.rip, "rip after {slices} slices");
        assert_eq!(jit.s.gpr, int.s.gpr, "registers after {slices} slices");
    }
    assert_eq!(int.run(1_000_000), Exit::Halted);
    assert_eq!(jit.s.gpr, int.s.gpr, "registers at the end");
    assert_eq!(jit.stats.instructions, int.stats.instructions);
    same_memory(&jit, &int, pa(4), 4, "memory");
    let stats = ran_translated(jit.jit_stats().cloned());
    assert!(stats.strided_groups >= 1, "strided groups: {stats:?}");
    assert!(slices > 60, "{slices} slices");
}

/// A loop with two hoisted groups (bases the loop leaves alone) and
/// nothing to emit at its count entry (no cache pair, no count register)
/// translates (two labels once landed on one instruction there), and
/// matches the interpreter.
#[test]
fn hoisted_groups_translate() {
    let run = |engine: mat_x86::Engine| {
        let mut cpu = paging_machine(|a| {
            let (mut top, mut done) = (a.create_label(), a.create_label());
            a.mov(rbx, va(5) + 0x100).unwrap();
            a.mov(r8, va(6) + 0x200).unwrap();
            a.mov(r12d, 40).unwrap();
            a.xor(ebp, ebp).unwrap();
            a.set_label(&mut top).unwrap();
            a.mov(eax, dword_ptr(rbx + 0x28)).unwrap();
            a.add(rax, rdx).unwrap();
            a.mov(rcx, rax).unwrap();
            a.xor(rax, qword_ptr(rbx + 0xb8)).unwrap();
            a.bswap(rcx).unwrap();
            a.xor(rax, rcx).unwrap();
            a.mov(qword_ptr(r8), rax).unwrap();
            a.add(ebp, 1).unwrap();
            a.movsxd(r14, ebp).unwrap();
            a.cmp(r14, r12).unwrap();
            a.jae(done).unwrap();
            a.mov(rdx, qword_ptr(r8)).unwrap();
            a.test(rdx, rdx).unwrap();
            a.jne(top).unwrap();
            a.set_label(&mut done).unwrap();
            a.hlt().unwrap();
        });
        w64(&cpu, pa(5) + 0x128, 0x1234_5678);
        w64(&cpu, pa(5) + 0x1b8, 0x0f0f_0f0f_0f0f_0f0f);
        hot_engine(&mut cpu, engine);
        expect_clean_halt(&mut cpu);
        (
            cpu.s.gpr,
            r64(&cpu, pa(6) + 0x200),
            cpu.jit_stats().cloned(),
        )
    };
    let (g_i, m_i, _) = run(mat_x86::Engine::Interp);
    let (g_j, m_j, stats) = run(mat_x86::Engine::Jit);
    let stats = stats.expect("jit stats");
    assert_eq!(stats.translate_failures, 0, "{stats:?}");
    assert_eq!((g_j, m_j), (g_i, m_i));
}

/// Indexed groups with aligned SSE members: `[rsi + rcx*8 + d]` loads and
/// stores (MOVUPD, ADDPD, MOVAPS, MOV) share one check of the range and of
/// the 16-byte alignment of the ADDPD/MOVAPS address. Round by round the
/// range lies inside va(5), straddles va(5)/va(6) (frames not adjacent:
/// the check fails and the plain copy runs) or lies inside va(6), as rsi
/// and rcx change. Compared with the interpreter and with a model.
#[test]
fn indexed_groups_with_aligned_members_match_the_interpreter() {
    const N: u64 = 64;
    let at = |off: i64| {
        // va(5) ends at pa(5) + 0x1000; va(6) is pa(14).
        if off < 0 {
            (pa(5) as i64 + 0x1000 + off) as u64
        } else {
            pa(14) + off as u64
        }
    };
    let run = |engine: mat_x86::Engine| {
        let mut cpu = paging_machine(|a| {
            let mut top = a.create_label();
            a.mov(r12d, N as u32).unwrap();
            a.set_label(&mut top).unwrap();
            // rsi = va(6) - 32 + 16 * (r12 & 1); rcx = 2 * ((r12 >> 1) & 1).
            a.mov(esi, r12d).unwrap();
            a.and(esi, 1).unwrap();
            a.shl(esi, 4).unwrap();
            a.add(rsi, (va(6) - 32) as i32).unwrap();
            a.mov(ecx, r12d).unwrap();
            a.and(ecx, 2).unwrap();
            a.movupd(xmm0, xmmword_ptr(rsi + rcx * 8)).unwrap();
            a.addpd(xmm0, xmmword_ptr(rsi + rcx * 8 + 16)).unwrap();
            a.movaps(xmmword_ptr(rsi + rcx * 8 + 16), xmm0).unwrap();
            a.mov(rax, qword_ptr(rsi + rcx * 8 + 8)).unwrap();
            a.add(r13, rax).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.movq(r9, xmm0).unwrap();
            a.hlt().unwrap();
        });
        set_pte(&cpu, 6, pa(14) | P | RW | US);
        for k in -4..4i64 {
            w64(&cpu, at(8 * k), (k as f64 + 10.0).to_bits());
        }
        hot_engine(&mut cpu, engine);
        expect_clean_halt(&mut cpu);
        let stats = cpu.jit_stats().cloned();
        let mem: Vec<u64> = (-4..4).map(|k| r64(&cpu, at(8 * k))).collect();
        (cpu.s.gpr, mem, stats)
    };
    let (g_i, m_i, _) = jit_agrees(run);
    // The model: doubles at va(6) - 32 .. va(6) + 32, in steps of 8.
    let mut m: Vec<f64> = (-4..4).map(|k| k as f64 + 10.0).collect();
    let mut sum = 0u64;
    let mut last = 0.0;
    for r in (1..=N).rev() {
        let x = ((r & 1) * 2 + (r & 2)) as usize;
        m[x + 2] += m[x];
        m[x + 3] += m[x + 1];
        last = m[x + 2];
        sum = sum.wrapping_add(m[x + 1].to_bits());
    }
    assert_eq!(g_i[13], sum, "sum of the MOV loads");
    assert_eq!(g_i[9], last.to_bits(), "last ADDPD result");
    let want: Vec<u64> = m.iter().map(|v| v.to_bits()).collect();
    assert_eq!(m_i, want, "memory after the loop");
}

/// An aligned SSE member of a group whose address is not 16-byte aligned
/// fails the group's check, and the plain copy raises #GP(0) at that very
/// instruction with the state before it, as the interpreter does (here in
/// the last round, after translated rounds with aligned addresses).
#[test]
fn a_misaligned_group_member_faults_precisely() {
    let run = |engine: mat_x86::Engine| {
        let mut cpu = paging_machine(|a| {
            let mut top = a.create_label();
            a.mov(r12d, 20).unwrap();
            a.set_label(&mut top).unwrap();
            // rsi = va(5) + 64, or va(5) + 56 in the last round.
            a.cmp(r12d, 1).unwrap();
            a.sete(al).unwrap();
            a.movzx(eax, al).unwrap();
            a.shl(eax, 3).unwrap();
            a.mov(rsi, va(5) + 64).unwrap();
            a.sub(rsi, rax).unwrap();
            a.mov(ecx, 2).unwrap();
            a.mov(rdx, qword_ptr(rsi + rcx * 8 + 8)).unwrap();
            a.add(r13, rdx).unwrap();
            a.movdqa(xmm0, xmmword_ptr(rsi + rcx * 8 + 16)).unwrap();
            a.movdqa(xmmword_ptr(rsi + rcx * 8 + 32), xmm0).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        hot_engine(&mut cpu, engine);
        let frame = expect_vector(&mut cpu, 13);
        let mut g = cpu.s.gpr;
        g[4] = 0; // the handler's stack
        g[15] = 0;
        (frame, g, cpu.jit_stats().cloned())
    };
    let (f_i, g_i, _) = run(mat_x86::Engine::Interp);
    let (f_j, g_j, stats) = run(mat_x86::Engine::Jit);
    ran_translated(stats);
    assert_eq!(f_i[0], 0, "#GP(0)");
    assert_eq!(g_i[6], va(5) + 56, "faulted in the last round");
    assert_eq!(g_i[12], 1);
    assert_eq!(f_j, f_i, "exception frame (jit vs interpreter)");
    assert_eq!(g_j, g_i, "registers (jit vs interpreter)");
}

/// `run` under the interpreter and under the translator: the translator
/// ran translated code, and the two end with the same registers and the
/// same memory (whatever `run` reads back), which are returned with the
/// translator's statistics.
fn jit_agrees<M: PartialEq + std::fmt::Debug>(
    run: impl Fn(mat_x86::Engine) -> ([u64; 16], M, Option<mat_x86::JitStats>),
) -> ([u64; 16], M, mat_x86::JitStats) {
    let (g_i, m_i, _) = run(mat_x86::Engine::Interp);
    let (g_j, m_j, stats) = run(mat_x86::Engine::Jit);
    let stats = ran_translated(stats);
    assert_eq!(g_j, g_i, "registers (jit vs interpreter)");
    assert_eq!(m_j, m_i, "memory (jit vs interpreter)");
    (g_i, m_i, stats)
}

/// The jit run's statistics, after checking that it translated code and
/// entered it.
fn ran_translated(stats: Option<mat_x86::JitStats>) -> mat_x86::JitStats {
    let stats = stats.expect("jit stats");
    assert!(stats.translations > 0 && stats.entries > 0, "{stats:?}");
    stats
}

/// Assert that `n` frames of guest memory from physical `at` are the same
/// in both machines.
fn same_memory(jit: &Cpu, int: &Cpu, at: u64, n: usize, what: &str) {
    assert_eq!(
        read_bytes(jit, at, n * 4096),
        read_bytes(int, at, n * 4096),
        "{what}"
    );
}

/// Run `jit` to its HLT in slices of `budget` instructions; at every
/// budget exit, step `int` to the same point (rip and r12, the loop
/// counter) and compare registers, flags and the instruction count. Then
/// run `int` to its HLT (at most `limit` instructions in all) and compare
/// the end: registers, no exception, instructions, more than `min_exits`
/// budget exits, and translated code that ran.
fn lockstep(jit: &mut Cpu, int: &mut Cpu, budget: u64, limit: u64, min_exits: usize) {
    let mut exits = 0;
    loop {
        let exit = jit.run(budget);
        if exit == Exit::Halted {
            break;
        }
        assert_eq!(exit, Exit::Budget);
        exits += 1;
        while (int.s.rip, int.s.gpr[12]) != (jit.s.rip, jit.s.gpr[12]) {
            assert!(int.step().is_none());
            assert!(int.stats.instructions < limit, "interpreter ran away");
        }
        assert_eq!(jit.s.gpr, int.s.gpr, "registers at {:#x}", jit.s.rip);
        assert_eq!(jit.s.rflags & 0xcd5, int.s.rflags & 0xcd5, "flags");
        assert_eq!(
            jit.stats.instructions, int.stats.instructions,
            "instructions counted at {:#x}",
            jit.s.rip
        );
    }
    assert_eq!(int.run(limit), Exit::Halted);
    assert_eq!(jit.s.gpr, int.s.gpr, "registers at the end");
    assert_eq!(jit.s.gpr[15], SENTINEL, "no exception");
    assert_eq!(jit.stats.instructions, int.stats.instructions);
    assert!(exits > min_exits, "{exits} budget exits");
    let stats = jit.jit_stats().cloned().expect("jit stats");
    assert!(stats.translations > 0 && stats.entries > 0, "{stats:?}");
}

/// A paging machine running `prog` whose window from va(4) on reads as
/// page pa(4) throughout (and past its end, through a second page
/// table); with `fault`, va(6) is not present instead.
fn window_machine(prog: impl FnOnce(&mut CodeAssembler), fault: bool) -> Cpu {
    let cpu = paging_machine(prog);
    if fault {
        set_pte(&cpu, 6, 0);
    } else {
        for i in 4..16 {
            set_pte(&cpu, i, pa(4) | P | RW | US);
        }
        w64(&cpu, PD1 + 8, PT | P | RW | US);
    }
    cpu
}

/// 64-bit blocks go on past conditional branches (a taken one is a side
/// exit) and follow direct jumps forward in their page. The loop's block
/// has two side exits and a jump over a UD2, with memory accesses around;
/// the tails they lead to loop back through side exits, one of them
/// before its block's count (an ADD after it).
/// At every budget exit the translator's state, and its instruction
/// count, match an interpreter stepped to the same point; with `fault`, a
/// load past both side exits walks into a page that is not present, and
/// the #PF frame and registers match the interpreter's.
#[test]
fn side_exits_match_the_interpreter() {
    let prog = |a: &mut CodeAssembler| {
        let mut top = a.create_label();
        let mut every4 = a.create_label();
        let mut odd = a.create_label();
        a.mov(rsi, va(0)).unwrap();
        a.mov(r14, va(4)).unwrap();
        a.mov(r12d, 3000).unwrap();
        a.set_label(&mut top).unwrap();
        a.test(r12d, 3).unwrap();
        a.jz(every4).unwrap();
        a.mov(rax, qword_ptr(rsi)).unwrap();
        a.add(rbx, rax).unwrap();
        a.mov(rdx, qword_ptr(rsi + 8)).unwrap();
        // Followed by the decoder: the block goes on at its target.
        let mut over = a.create_label();
        a.jmp(over).unwrap();
        a.ud2().unwrap();
        a.set_label(&mut over).unwrap();
        a.add(rdi, rdx).unwrap();
        a.test(r12d, 1).unwrap();
        a.jnz(odd).unwrap();
        a.mov(qword_ptr(rsi + 16), rdi).unwrap();
        a.mov(r8, qword_ptr(r14)).unwrap();
        a.add(r14, 64).unwrap();
        a.add(rbp, r8).unwrap();
        a.dec(r12d).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut every4).unwrap();
        a.add(rbx, 7).unwrap();
        a.dec(r12d).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
        // A backward side exit before this block's count (its ADD).
        a.set_label(&mut odd).unwrap();
        a.mov(qword_ptr(rsi + 24), rbx).unwrap();
        a.dec(r12d).unwrap();
        a.jnz(top).unwrap();
        a.add(rbx, 3).unwrap();
        a.hlt().unwrap();
    };
    for fault in [false, true] {
        // 32 pages of 64-byte strides: va(4).. are read every other
        // round, past the end of the window without `fault`.
        let setup = || window_machine(prog, fault);
        let (mut jit, mut int) = hot_pair(setup);
        if fault {
            same_page_fault(&mut jit, &mut int);
            assert_eq!(jit.s.cr2, va(6));
            continue;
        }
        lockstep(&mut jit, &mut int, 777, 100_000, 10);
        assert_eq!(r64(&jit, pa(0) + 16), r64(&int, pa(0) + 16));
        assert_eq!(r64(&jit, pa(0) + 24), r64(&int, pa(0) + 24));
    }
}

/// A loop whose hot path skips two rare cases (`if` without `else`): the
/// decoder's blocks follow each branch's fall-through (the rare case), so
/// every pass would leave them by the taken branches. Once the interpreter
/// has seen the branches taken in most runs, the loop's block is
/// translated as a trace that follows them to their targets and on to the
/// back edge: one block that loops on itself. With `fault`, a load on the followed path walks into
/// a page that is not present; the #PF frame and registers match the
/// interpreter's. Otherwise the state matches at every budget exit and
/// the memory the rare case writes matches at the end.
#[test]
fn traces_that_follow_a_hot_branch_match_the_interpreter() {
    let prog = |a: &mut CodeAssembler| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.mov(rsi, va(0)).unwrap();
        a.mov(r14, va(4)).unwrap();
        a.mov(r12d, 3000).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(rax, qword_ptr(rsi)).unwrap();
        a.add(rbx, rax).unwrap();
        a.test(r12d, 15).unwrap();
        a.jnz(skip).unwrap();
        // The rare case: one pass in 16.
        a.add(rbp, rbx).unwrap();
        a.mov(qword_ptr(rsi + 8), rbp).unwrap();
        a.set_label(&mut skip).unwrap();
        a.mov(r8, qword_ptr(r14)).unwrap();
        a.add(r14, 8).unwrap();
        // Another: its block, too, is mostly left by its branch.
        let mut skip2 = a.create_label();
        a.cmp(r12d, 700).unwrap();
        a.jne(skip2).unwrap();
        a.add(r9, rbx).unwrap();
        a.mov(qword_ptr(rsi + 24), r9).unwrap();
        a.set_label(&mut skip2).unwrap();
        a.add(rdi, r8).unwrap();
        a.mov(qword_ptr(rsi + 16), rdi).unwrap();
        a.dec(r12d).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    };
    for fault in [false, true] {
        let setup = || {
            let cpu = window_machine(prog, fault);
            w64(&cpu, pa(0), 5);
            cpu
        };
        let (mut jit, mut int) = hot_pair(setup);
        // Interpreted runs first, for the branch's profile.
        jit.set_jit_threshold(8);
        if fault {
            same_page_fault(&mut jit, &mut int);
            assert_eq!(jit.s.cr2, va(6));
        } else {
            lockstep(&mut jit, &mut int, 777, 100_000, 10);
            assert_eq!(r64(&jit, pa(0) + 8), r64(&int, pa(0) + 8));
            assert_eq!(r64(&jit, pa(0) + 16), r64(&int, pa(0) + 16));
            assert_eq!(r64(&jit, pa(0) + 24), r64(&int, pa(0) + 24));
        }
        let stats = jit.jit_stats().cloned().expect("jit stats");
        assert!(stats.traces > 0, "a trace was made: {stats:?}");
    }
}

/// A lookup frees rcx for its own use by moving guest rcx to a keeper
/// register; when the next instructions do not name rcx it stays there
/// (one save and one restore for the run). Here a loop counts in rcx
/// around loads, a store and a BT m,r through three bases (no group), one
/// of them walking unaligned across pages so that its lookup takes the
/// slow path in some rounds, which must leave guest rcx in the keeper
/// too. State matches the interpreter at every budget exit, memory at the
/// end.
#[test]
fn rcx_kept_across_lookups_matches_the_interpreter() {
    let prog = |a: &mut CodeAssembler| {
        let mut top = a.create_label();
        a.mov(rsi, va(8)).unwrap();
        a.mov(rdi, va(0) + 0xf00).unwrap();
        a.mov(rbp, va(12)).unwrap();
        a.mov(ecx, 900).unwrap();
        // The round number for `lockstep`, which tells rounds apart by r12.
        a.mov(r12d, 900).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(rax, qword_ptr(rsi)).unwrap();
        a.add(rbx, rax).unwrap();
        a.mov(rdx, qword_ptr(rdi)).unwrap();
        a.add(rbx, rdx).unwrap();
        a.mov(qword_ptr(rbp), rbx).unwrap();
        // BT m,r (its own lookup, on a spilling path) with rcx still out.
        a.and(eax, 63).unwrap();
        a.bt(qword_ptr(rbp), rax).unwrap();
        a.adc(rbx, 0).unwrap();
        a.imul_3(rbx, rbx, 3).unwrap();
        a.xor(rbx, rcx).unwrap();
        a.lea(rsi, qword_ptr(rsi + 8)).unwrap();
        a.and(rsi, (va(8) | 0xfff) as i32).unwrap();
        a.lea(rdi, qword_ptr(rdi + 37)).unwrap();
        a.and(rdi, (va(0) | 0x7fff) as i32).unwrap();
        a.lea(rbp, qword_ptr(rbp + 8)).unwrap();
        a.and(rbp, (va(12) | 0xfff) as i32).unwrap();
        a.dec(r12d).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    };
    let (mut jit, mut int) = hot_pair(|| paging_machine(prog));
    lockstep(&mut jit, &mut int, 444, 100_000, 10);
    same_memory(&jit, &int, pa(12), 1, "memory");
}

/// Guest rcx as the index (or base) of memory operands while it is out in
/// the keeper: the address comes from the keeper, for a lone access, for
/// a group's check and for an access that straddles two pages (its slow
/// path). The registers and the instruction count match an interpreter
/// at every budget exit, and memory at the end; with a page that is not
/// present, the #PF frame and registers match too.
#[test]
fn rcx_addresses_from_the_keeper_match_the_interpreter() {
    let prog = |a: &mut CodeAssembler| {
        let mut top = a.create_label();
        a.mov(rsi, va(8)).unwrap();
        // Rounds 32.. straddle va(0) and va(1) (or fault in va(1)).
        a.mov(rdi, va(0) + 0xefc).unwrap();
        a.mov(rbp, va(12)).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.mov(r12d, 1500).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(rax, qword_ptr(rsi + rcx * 8)).unwrap();
        a.add(rbx, rax).unwrap();
        a.mov(rdx, qword_ptr(rdi + rcx * 8)).unwrap();
        a.add(rbx, rdx).unwrap();
        // A group: base rbp, index rcx.
        a.mov(qword_ptr(rbp + rcx * 8), rbx).unwrap();
        a.add(qword_ptr(rbp + rcx * 8 + 8), rdx).unwrap();
        a.mov(r8, qword_ptr(rcx + rsi)).unwrap();
        a.add(rbx, r8).unwrap();
        a.xor(rbx, rcx).unwrap();
        a.lea(ecx, dword_ptr(rcx + 1)).unwrap();
        a.and(ecx, 63).unwrap();
        a.dec(r12d).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    };
    for fault in [false, true] {
        let absent = fault.then_some(1);
        let (mut jit, mut int) = hot_pair(|| paging_machine_without(prog, absent));
        if fault {
            same_page_fault(&mut jit, &mut int);
            assert_eq!(jit.s.cr2 >> 12, va(1) >> 12, "the page that is not present");
            assert_eq!(jit.s.gpr[1], 32, "rcx at the fault");
            continue;
        }
        lockstep(&mut jit, &mut int, 321, 100_000, 10);
        same_memory(&jit, &int, pa(12), 1, "memory");
    }
}

/// A loop that keeps a value in rcx (a scan's bound, a sort's pivot) and
/// names it in its operands keeps guest rcx in the keeper from pass to
/// pass: its instructions name the keeper instead (a compare, a LEA with
/// rcx as base, a byte store of CL, an add to memory), its back edge and
/// its side exit leave it there, and its out-of-line code (a shift by CL,
/// which cannot be renamed, and a write to rcx) runs with it put back.
/// Registers, flags and the instruction count match the interpreter at
/// every budget exit (the body check's exit, also with rcx out), memory
/// at the end; with a page that is not present, the #PF frame and
/// registers of a fault taken with rcx out match too.
#[test]
fn rcx_named_in_a_loop_matches_the_interpreter() {
    let prog = |a: &mut CodeAssembler| {
        let (mut top, mut back, mut out) = (a.create_label(), a.create_label(), a.create_label());
        // Rounds 64.. read va(9) (or fault there).
        a.mov(rsi, va(8) + 0xf00).unwrap();
        a.mov(rbp, va(12)).unwrap();
        a.mov(ecx, 0x8000_0000u32).unwrap();
        a.mov(r12d, 1200).unwrap();
        a.mov(ebx, 12345).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(edx, dword_ptr(rsi)).unwrap();
        a.add(edx, ebx).unwrap();
        a.lea(ebx, dword_ptr(rbx + rbx * 4 + 0x0123_4567)).unwrap();
        a.xor(ebx, edx).unwrap();
        a.cmp(edx, ecx).unwrap();
        a.ja(out).unwrap();
        a.set_label(&mut back).unwrap();
        a.lea(rax, qword_ptr(rcx + rbx * 2)).unwrap();
        a.xor(eax, ecx).unwrap();
        a.mov(byte_ptr(rbp + 8), cl).unwrap();
        a.add(dword_ptr(rbp), ecx).unwrap();
        a.mov(dword_ptr(rsi), edx).unwrap();
        a.add(rsi, 4).unwrap();
        a.dec(r12d).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut out).unwrap();
        a.shl(eax, cl).unwrap();
        a.xor(ecx, 0x4000_0000).unwrap();
        a.add(qword_ptr(rbp + 16), rax).unwrap();
        a.jmp(back).unwrap();
    };
    for fault in [false, true] {
        let absent = fault.then_some(9);
        let (mut jit, mut int) = hot_pair(|| paging_machine_without(prog, absent));
        if fault {
            same_page_fault(&mut jit, &mut int);
            assert_eq!(jit.s.cr2 >> 12, va(9) >> 12, "the page that is not present");
            assert_eq!(jit.s.gpr[12], 1200 - 64, "the round of the fault");
            continue;
        }
        lockstep(&mut jit, &mut int, 333, 100_000, 10);
        same_memory(&jit, &int, pa(8), 3, "data");
        same_memory(&jit, &int, pa(12), 1, "memory");
    }
}

/// Loops made of random instructions that name rcx (as a source, a
/// destination, a byte or word part, a LEA's base, next to loads and
/// stores, and a shift by CL that needs rcx back), seeded: each matches
/// the interpreter at every budget exit and in memory at the end.
#[test]
fn rcx_named_in_random_loops_matches_the_interpreter() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..40 {
        let picks: Vec<(u64, i32)> = (0..8).map(|_| (next(17), next(32) as i32 * 8)).collect();
        let prog = |a: &mut CodeAssembler| {
            let mut top = a.create_label();
            a.mov(rsi, va(8)).unwrap();
            a.mov(rbp, va(12)).unwrap();
            a.mov(ecx, 0x1234_5678).unwrap();
            a.mov(ebx, 77).unwrap();
            a.mov(r12d, 300).unwrap();
            a.set_label(&mut top).unwrap();
            for &(k, off) in picks.iter() {
                match k {
                    0 => a.add(ecx, ebx).unwrap(),
                    1 => a.xor(rcx, rdx).unwrap(),
                    2 => a.cmp(edx, ecx).unwrap(),
                    3 => a.lea(rax, qword_ptr(rcx + rbx * 2 + 5)).unwrap(),
                    4 => a.lea(ecx, dword_ptr(rcx + rdx + 1)).unwrap(),
                    5 => a.mov(byte_ptr(rbp + off), cl).unwrap(),
                    6 => a.mov(word_ptr(rbp + off), cx).unwrap(),
                    7 => a.add(dword_ptr(rbp + off), ecx).unwrap(),
                    8 => a.mov(ecx, dword_ptr(rsi + off)).unwrap(),
                    9 => a.movzx(eax, cl).unwrap(),
                    10 => a.mov(cl, dl).unwrap(),
                    11 => a.xchg(ecx, edx).unwrap(),
                    12 => a.sub(rdx, rcx).unwrap(),
                    13 => a.mov(qword_ptr(rsi + off), rcx).unwrap(),
                    14 => a.add(rbx, qword_ptr(rsi + off)).unwrap(),
                    15 => a.shl(eax, cl).unwrap(),
                    _ => a.mov(rdx, rcx).unwrap(),
                }
                // Every flag defined before a budget exit can see them.
                a.add(edx, 3).unwrap();
            }
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        };
        let (mut jit, mut int) = hot_pair(|| paging_machine(prog));
        lockstep(&mut jit, &mut int, 61 + round, 100_000, 10);
        same_memory(&jit, &int, pa(8), 1, "data");
        same_memory(&jit, &int, pa(12), 1, "memory");
    }
}

/// A block that loops on itself keeps the TLB entries of its memory
/// sites in parked registers across passes (`Moving`: the accesses' base
/// moves every pass), or checks the accesses of a base it leaves alone
/// once before its passes (`Hoisted`; `Conflict` adds a load that misses
/// the TLB every pass, whose helper sends the pass to the plain copy,
/// whose back edge checks again). The loop has aligned and
/// misaligned accesses and, in one variant, a signed division (a helper,
/// after which the parked registers hold guest values: every register
/// the loop does not name holds minus va(3)'s page number, which would
/// pass for a cached entry of that page, with a wild addend; the cache is
/// empty after every helper, so that variant hits it never). Every 32 rounds a
/// block outside the loop
/// maps va(3) to the other of two frames (INVLPG) and comes back; at
/// every budget exit, and at the end, registers, the instruction count
/// and both frames match the interpreter. With `fault`, the remap at
/// round 128 (counting down) makes the page read-only: the next store
/// faults with the same frame and registers.
#[test]
fn cached_tlb_entries_match_the_interpreter() {
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Mode {
        Moving,
        Hoisted,
        Conflict,
    }
    let prog = |fault: bool, div: bool, mode: Mode| {
        move |a: &mut CodeAssembler| {
            let (mut top, mut remap, mut other) =
                (a.create_label(), a.create_label(), a.create_label());
            let poison = (va(3) >> 12).wrapping_neg();
            for r in [rdi, rbp, r8, r9, r10, r11, r13, r14] {
                a.mov(r, poison).unwrap();
            }
            a.mov(rsi, va(3) + 0x100).unwrap();
            a.mov(r12d, 1000).unwrap();
            a.mov(ecx, 7).unwrap();
            a.set_label(&mut top).unwrap();
            a.mov(rax, qword_ptr(rsi)).unwrap();
            a.add(rax, r12).unwrap();
            a.mov(qword_ptr(rsi + 8), rax).unwrap();
            a.mov(dword_ptr(rsi + 0x13), eax).unwrap();
            if div {
                a.cqo().unwrap();
                a.idiv(rcx).unwrap();
            }
            a.add(rbx, rax).unwrap();
            a.add(qword_ptr(rsi + 16), rbx).unwrap();
            a.movzx(eax, byte_ptr(rsi + 0x15)).unwrap();
            a.add(rbx, rax).unwrap();
            match mode {
                // Not an amount the group planner follows.
                Mode::Moving => a.xor(rsi, 8).unwrap(),
                // 0x3000 and va(3) share a TLB index.
                Mode::Conflict => a.add(rbx, qword_ptr(0x3000u64)).unwrap(),
                Mode::Hoisted => {}
            }
            a.test(r12d, 31).unwrap();
            a.jz(remap).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
            // Every 32 rounds: va(3) -> the other frame (read-only, with
            // `fault`, at round 128).
            a.set_label(&mut remap).unwrap();
            a.mov(rdx, qword_ptr(PT + 3 * 8)).unwrap();
            a.xor(rdx, (pa(3) ^ pa(9)) as i32).unwrap();
            if fault {
                a.cmp(r12d, 128).unwrap();
                a.jne(other).unwrap();
                a.and(rdx, !RW as i32).unwrap();
            }
            a.set_label(&mut other).unwrap();
            a.mov(qword_ptr(PT + 3 * 8), rdx).unwrap();
            a.invlpg(byte_ptr(rsi)).unwrap();
            a.dec(r12d).unwrap();
            a.jmp(top).unwrap();
        }
    };
    for mode in [Mode::Moving, Mode::Hoisted, Mode::Conflict] {
        for (fault, div) in [(false, false), (false, true), (true, false), (true, true)] {
            let (mut jit, mut int) = hot_pair(|| paging_machine(prog(fault, div, mode)));
            jit.set_jit_events(true);
            if fault {
                same_page_fault(&mut jit, &mut int);
                assert_eq!(jit.s.cr2 >> 12, va(3) >> 12, "the read-only page");
                assert_eq!(jit.s.gpr[12], 127, "faulted in the round after the remap");
                continue;
            }
            lockstep(&mut jit, &mut int, 333, 100_000, 10);
            for f in [3, 9] {
                same_memory(&jit, &int, pa(f), 1, &format!("frame {f} ({mode:?})"));
            }
            let ev = jit.jit_events().expect("events");
            let count = |what: &str| ev.iter().find(|e| e.0 == what).map_or(0, |e| e.1);
            let cached = count("TLB lookups that hit the entry cached in registers");
            let hits = count("TLB lookups that hit");
            match mode {
                Mode::Moving => assert!(div || cached > 500, "{cached} hits of cached entries"),
                // Checked on entering the loop only: 1000 passes, about 60
                // entries (the remaps and lockstep's exits).
                Mode::Hoisted => assert!(div || hits < 600, "{hits} TLB lookups"),
                Mode::Conflict => {}
            }
        }
    }
}

/// A loop's only access is 4 bytes at an odd address: every pass its
/// cache pair's check fails on the alignment, and the miss path finds the
/// entry of the page at the TLB index and hits without refilling the pair
/// (the access is inside the page). Until such a hit puts its addend there
/// (and empties the pair), the pair's addend register holds a wild value
/// here (the registers the loop does not name hold minus va(3)'s page
/// number): using it faults.
#[test]
fn misaligned_hits_of_cached_sites_match_the_interpreter() {
    let (mut jit, mut int) = hot_pair(|| {
        let cpu = paging_machine(|a| {
            let mut top = a.create_label();
            let poison = (va(3) >> 12).wrapping_neg();
            for r in [rdi, rbp, r8, r9, r10, r11, r13, r14] {
                a.mov(r, poison).unwrap();
            }
            a.mov(rsi, va(3) + 0x101).unwrap();
            a.mov(r12d, 300).unwrap();
            a.set_label(&mut top).unwrap();
            a.add(ebx, dword_ptr(rsi)).unwrap();
            // Not an amount the group planner follows.
            a.xor(rsi, 8).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        for k in 0..4 {
            w64(&cpu, pa(3) + 0x100 + 8 * k, 0x0102_0304_0506_0708 << k);
        }
        cpu
    });
    lockstep(&mut jit, &mut int, 200, 100_000, 3);
    assert_ne!(jit.s.gpr[3], 0, "the loop summed something");
}

/// Give pages 0xc00000 and 0xa00000 of a `paging_machine` 4 KiB pages of
/// their own, on frames elsewhere (0xe00000, 0xe01000): an identity-mapped
/// page's TLB addend is every other's. Fills their first 256 bytes, and
/// those of pages 0x300000 and 0x140000, with distinct words.
fn own_frames(cpu: &Cpu) {
    for (k, (pde, frame)) in [(6u64, 0xe0_0000u64), (5, 0xe0_1000)]
        .into_iter()
        .enumerate()
    {
        let pt = 0x10_5000 + 0x1000 * k as u64;
        cpu.ram.write(pt, &[0u8; 4096]);
        w64(cpu, pt, frame | P | RW | US);
        w64(cpu, PD0 + 8 * pde, pt | P | RW | US);
    }
    for (k, base) in [0xe0_0000u64, 0x30_0000, 0xe0_1000, 0x14_0000]
        .into_iter()
        .enumerate()
    {
        for j in 0..32 {
            w64(
                cpu,
                base + 8 * j,
                ((k as u64 + 1) * 0x0101_0000_0100_0000) | (j << 8) | 0x5a,
            );
        }
    }
}

/// A cached access site reads the addend from its pair's register. An
/// access whose page the pair's check refuses only for its alignment (it
/// stays in one page) takes the addend from the TLB entry into that
/// register and empties the pair. The loop's dword load alternates between
/// aligned addresses in one page and unaligned ones in another, mapped
/// with a different addend: an unaligned access read with the pair's
/// addend reads the other frame. Once as a plain access, once as a group
/// of two loads of one location (the group's check is the cached site).
/// Compared with the interpreter.
#[test]
fn unaligned_accesses_at_cached_sites_match_the_interpreter() {
    for grouped in [false, true] {
        let (mut jit, mut int) = hot_pair(|| {
            let cpu = paging_machine(|a| {
                let mut top = a.create_label();
                a.mov(rsi, 0xc0_0000u64).unwrap();
                a.mov(rdi, 0xa0_0001u64).unwrap();
                a.mov(r12d, 64).unwrap();
                a.set_label(&mut top).unwrap();
                a.mov(eax, dword_ptr(rsi)).unwrap();
                a.add(r13, rax).unwrap();
                a.imul_3(r13, r13, 3).unwrap();
                if grouped {
                    a.add(r13d, dword_ptr(rsi)).unwrap();
                }
                // Next pass the other page, 8 bytes on from this one's.
                a.mov(rdx, rsi).unwrap();
                a.mov(rsi, rdi).unwrap();
                a.lea(rdi, qword_ptr(rdx + 8)).unwrap();
                a.dec(r12d).unwrap();
                a.jnz(top).unwrap();
                a.hlt().unwrap();
            });
            own_frames(&cpu);
            cpu
        });
        lockstep(&mut jit, &mut int, 50, 100_000, 3);
        assert_eq!(jit.s.gpr[12], 0, "the loop ran to its end");
        assert_ne!(jit.s.gpr[13], 0, "the loop summed something");
    }
}

/// A loop's cache pairs are preloaded at its count entry from the entry
/// their sites' slots point to. The loop below is entered sixteen times,
/// its two sites alternating between pages whose numbers differ by the
/// factor of their checks' scaling (a dword site: pages 0x300 and 0xc00
/// = 4 * 0x300; a qword site: 0x140 and 0xa00 = 8 * 0x140), and mapped
/// with different addends (0xc00000 and 0xa00000 to frames elsewhere), so
/// an entry preloaded without its scaling matches the other page's
/// address and reads the wrong memory; other entries find their slot
/// right and hit on the preloaded addend (a wrong one faults the host).
/// Compared with the interpreter.
#[test]
fn preloaded_cache_pairs_match_the_interpreter() {
    let (mut jit, mut int) = hot_pair(|| {
        let cpu = paging_machine(|a| {
            let (mut outer, mut top) = (a.create_label(), a.create_label());
            let mut done = a.create_label();
            a.mov(rsi, 0xc0_0000u64).unwrap();
            a.mov(rdi, 0xa0_0000u64).unwrap();
            // Four passes an entry; r12 counts every pass (lockstep
            // finds the interpreter's matching point by rip and r12).
            a.mov(r12d, 64).unwrap();
            a.jmp(outer).unwrap();
            // The loop comes first, so that it is entered by a backward
            // JMP (which ends the block before it): nothing else looks up
            // its sites' slots between its entries.
            a.set_label(&mut top).unwrap();
            a.mov(eax, dword_ptr(rsi)).unwrap();
            a.add(r13, rax).unwrap();
            a.mov(rdx, qword_ptr(rdi)).unwrap();
            a.add(r14, rdx).unwrap();
            a.add(rsi, 4).unwrap();
            a.add(rdi, 8).unwrap();
            a.dec(r12d).unwrap();
            a.test(r12d, 3).unwrap();
            a.jnz(top).unwrap();
            a.xor(rsi, 0xf0_0000).unwrap();
            a.xor(rdi, 0xb4_0000).unwrap();
            a.test(r12d, r12d).unwrap();
            a.jz(done).unwrap();
            a.set_label(&mut outer).unwrap();
            a.mov(ecx, r12d).unwrap();
            a.jmp(top).unwrap();
            a.set_label(&mut done).unwrap();
            a.hlt().unwrap();
        });
        own_frames(&cpu);
        cpu
    });
    lockstep(&mut jit, &mut int, 100, 100_000, 3);
    assert_ne!(jit.s.gpr[13], 0, "the loop summed something");
}

/// Guest rsp and r15 have no host register: an instruction that names
/// them runs on a scratch register loaded from CpuState (unless the
/// instruction only writes all of it) and stored back (if it writes).
/// Reads, read-modify-writes, 8-, 16- and 32-bit writes (which keep, or
/// clear, the upper bits), conditional writes, exchanges and LEAs of both
/// match the interpreter at every budget exit.
#[test]
fn rsp_and_r15_operands_match_the_interpreter() {
    let prog = |a: &mut CodeAssembler| {
        let mut top = a.create_label();
        a.mov(r15, 0x1234_5678_9abc_def0u64).unwrap();
        a.mov(r12d, 500).unwrap();
        a.set_label(&mut top).unwrap();
        a.cmp(rbp, r15).unwrap();
        a.adc(rbx, 0).unwrap();
        a.add(r15, r12).unwrap();
        a.mov(r15b, bl).unwrap();
        a.mov(r14d, r15d).unwrap();
        a.add(rbx, r14).unwrap();
        a.lea(r15, qword_ptr(r15 + r12 * 2 + 8)).unwrap();
        a.xchg(r15, rdx).unwrap();
        a.xchg(rdx, r15).unwrap();
        a.mov(rbp, rsp).unwrap();
        a.sub(rsp, 16).unwrap();
        a.lea(rbp, qword_ptr(rsp + rbp + 8)).unwrap();
        a.add(rsp, 16).unwrap();
        a.test(r12b, 1).unwrap();
        a.cmovnz(r15, rbx).unwrap();
        a.bswap(r15).unwrap();
        a.mov(r15w, 0x55aa).unwrap();
        a.add(rbx, r15).unwrap();
        a.movzx(r15d, r15b).unwrap();
        a.add(rdx, r15).unwrap();
        a.mov(r15d, ebx).unwrap();
        a.shl(r15, 7).unwrap();
        a.or(r15, rdx).unwrap();
        a.dec(r12d).unwrap();
        a.jnz(top).unwrap();
        a.mov(r13, r15).unwrap();
        a.mov(r15, SENTINEL).unwrap();
        a.hlt().unwrap();
    };
    let (mut jit, mut int) = hot_pair(|| machine(prog));
    lockstep(&mut jit, &mut int, 555, 100_000, 10);
    assert_ne!(int.s.gpr[13], 0);
}

/// A group of accesses through one base (rsi) spans the block's side
/// exits: its head loads, a Jcc may leave, and members past it read and
/// write through the group's register. rsi walks 40 bytes a round over
/// eight pages, so some rounds' ranges cross a page (the check fails and
/// the plain copy runs them). Both exits are taken in some rounds and not
/// in others. Registers and the count match the interpreter at every
/// budget exit, and memory at the end; with `fault`, a page past the
/// first exit is not present and the #PF matches the interpreter's.
#[test]
fn groups_across_side_exits_match_the_interpreter() {
    let prog = |a: &mut CodeAssembler| {
        let (mut top, mut back) = (a.create_label(), a.create_label());
        let (mut every4, mut odd) = (a.create_label(), a.create_label());
        a.mov(rsi, va(0) + 0xf00).unwrap();
        a.mov(r12d, 2000).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(rax, qword_ptr(rsi)).unwrap();
        a.add(rbx, rax).unwrap();
        a.test(r12d, 3).unwrap();
        a.jz(every4).unwrap();
        a.mov(rdx, qword_ptr(rsi + 8)).unwrap();
        a.add(rdi, rdx).unwrap();
        a.test(r12d, 2).unwrap();
        a.jnz(odd).unwrap();
        a.mov(qword_ptr(rsi + 16), rdi).unwrap();
        a.add(rbp, qword_ptr(rsi + 24)).unwrap();
        a.set_label(&mut back).unwrap();
        a.lea(rsi, qword_ptr(rsi + 40)).unwrap();
        a.and(rsi, (va(0) | 0x7fff) as i32).unwrap();
        a.dec(r12d).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut every4).unwrap();
        a.mov(qword_ptr(rsi + 24), rbx).unwrap();
        a.jmp(back).unwrap();
        a.set_label(&mut odd).unwrap();
        a.add(rbx, qword_ptr(rsi + 16)).unwrap();
        a.jmp(back).unwrap();
    };
    for fault in [false, true] {
        let absent = fault.then_some(5);
        let (mut jit, mut int) = hot_pair(|| paging_machine_without(prog, absent));
        if fault {
            same_page_fault(&mut jit, &mut int);
            assert_eq!(jit.s.cr2 >> 12, va(5) >> 12, "the page that is not present");
            continue;
        }
        lockstep(&mut jit, &mut int, 333, 100_000, 10);
        same_memory(&jit, &int, pa(0), 8, "memory");
    }
}

/// Translated loops do not read the kick flag: an entry into translated
/// code runs at most `KICK_INTERVAL` instructions, so the dispatcher,
/// which does, runs at least that often. A loop that never leaves on its
/// own still comes back to the dispatcher once per interval, and a kick
/// set while it runs stops it. Once for a loop that checks its budget in
/// its body (an ADD kills the flags), once for one that checks it at its
/// back edge (INC leaves CF, so no instruction kills all the flags).
#[test]
fn translated_loops_leave_for_the_dispatcher_every_kick_interval() {
    // A loop that misses its budget never returns from `run`: fail loudly
    // instead of hanging the test run.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            for _ in 0..600 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
            }
            eprintln!("a translated loop ran for a minute without leaving: aborting");
            std::process::abort();
        })
    };
    for body_check in [true, false] {
        let mut cpu = machine(|a| {
            let mut top = a.create_label();
            a.mov(rsi, 0x30000u64).unwrap();
            a.set_label(&mut top).unwrap();
            a.mov(rax, qword_ptr(rsi)).unwrap();
            if body_check {
                a.add(rbx, rax).unwrap();
            } else {
                a.lea(rbx, qword_ptr(rbx + rax)).unwrap();
            }
            a.inc(r12).unwrap();
            a.jmp(top).unwrap();
        });
        hot_engine(&mut cpu, mat_x86::Engine::Jit);
        // Translated after its first pass; then 64 intervals' worth.
        assert_eq!(cpu.run(1_000), Exit::Budget);
        let entries = cpu.jit_stats().unwrap().entries;
        let (n0, r0) = (cpu.stats.instructions, cpu.s.gpr[12]);
        assert_eq!(cpu.run(64 * mat_x86::KICK_INTERVAL), Exit::Budget);
        let ran = cpu.stats.instructions - n0;
        assert!(ran >= 64 * mat_x86::KICK_INTERVAL, "{ran} instructions");
        assert!(
            ran < 64 * mat_x86::KICK_INTERVAL + 1000,
            "{ran} instructions for the budget"
        );
        assert_eq!(cpu.s.gpr[12] - r0, ran / 4, "every 4th instruction an INC");
        let entered = cpu.jit_stats().unwrap().entries - entries;
        assert!(
            entered >= 64,
            "{entered} entries into translated code for {ran} instructions"
        );
        // A kick from another thread while the loop runs stops it.
        let kick = cpu.kick.clone();
        let kicker = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            kick.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(cpu.run(1 << 34), Exit::Kicked);
        kicker.join().unwrap();
        assert_eq!(cpu.s.gpr[15], SENTINEL, "no exception");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    watchdog.join().unwrap();
}

/// A loop that jumps back to its own start checks its budget in its body,
/// where its instruction count is (an ADD, before the first instruction
/// that overwrites all the flags), not at the back edge.
/// Leaving there, it first runs that instruction: the guest sees its
/// flags, not the count's. The kick flag is read by the dispatcher, which
/// translated code leaves at least every `KICK_INTERVAL` instructions.
/// Every exit (budget, and kicks from another thread) is compared with an
/// interpreter stepped to the same point: registers, flags and the
/// instruction count.
#[test]
fn body_checks_leave_with_the_guest_flags() {
    const DATA: u64 = 0x30000;
    const ARITH: u64 = 0x8d5; // OF SF ZF AF PF CF
    let prog = |rounds: u32| {
        move |a: &mut CodeAssembler| {
            let mut top = a.create_label();
            a.mov(rsi, DATA).unwrap();
            a.mov(r12d, rounds).unwrap();
            a.mov(rbx, 1u64).unwrap();
            a.set_label(&mut top).unwrap();
            a.mov(rax, qword_ptr(rsi)).unwrap();
            // The count and the check go before this ADD (index 1); it sets CF
            // and ZF where the count's ADD of a negative count would not.
            a.add(rbx, rax).unwrap();
            a.lea(rdx, qword_ptr(rbx + 1)).unwrap();
            a.mov(qword_ptr(rsi + 8), rdx).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        }
    };
    let after_add = CODE + 10 + 6 + 10 + 3 + 3;
    let setup = |engine, rounds| {
        let mut cpu = machine(prog(rounds));
        cpu.ram.write(DATA, &u64::MAX.to_le_bytes());
        hot_engine(&mut cpu, engine);
        cpu
    };
    for kicks in [false, true] {
        // Kicks come when the host runs the kicking thread: a longer loop
        // gives it time (its exits are compared, not counted).
        let rounds = if kicks { 6_000_000 } else { 60_000 };
        let mut jit = setup(mat_x86::Engine::Jit, rounds);
        let mut int = setup(mat_x86::Engine::Interp, rounds);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut kicker = None;
        // Before the kicks, three budget exits with the background
        // translator waited for after each: blocks run interpreted until
        // their translations are installed, and a kick then stops them
        // elsewhere than at the body check.
        let mut warm = 0;
        let (mut exits, mut in_body, mut looping) = (0, 0, 0);
        // Kicked exits while looping that are not at the body check but
        // have another cause (`tails`, see the assertion below), and any
        // others (`stray`: rip and the previous exit's rip, from CODE, and
        // the instructions run in between).
        let (head, mut tails, mut stray, mut last) = (after_add - 6, 0, Vec::new(), 0);
        loop {
            let before = jit.stats.instructions;
            let exit = jit.run(if kicker.is_some() { 1 << 30 } else { 7_777 });
            if exit == Exit::Halted {
                break;
            }
            assert!(matches!(exit, Exit::Budget | Exit::Kicked), "{exit:?}");
            let (at, ran) = (jit.s.rip, jit.stats.instructions - before);
            if kicker.is_some() || !kicks {
                exits += 1;
                // Past the first pass (interpreted) and before the loop ends.
                let pass = 0 < jit.s.gpr[12] && jit.s.gpr[12] < rounds as u64 - 1;
                looping += pass as u32;
                in_body += (at == after_add) as u32;
                if pass && at != after_add {
                    // At most the rest of a pass (4 instructions) ran.
                    if at == head && last != head && ran <= 4 || at == last && ran == 0 {
                        tails += 1;
                    } else {
                        stray.push((at - CODE, last.wrapping_sub(CODE), ran, exit));
                    }
                }
            }
            last = at;
            let mut steps = 0;
            while (int.s.rip, int.s.gpr[12]) != (jit.s.rip, jit.s.gpr[12]) {
                assert!(int.step().is_none());
                steps += 1;
                // The whole loop is 36 M instructions.
                assert!(
                    steps < 50_000_000,
                    "interpreter never reached {:#x}",
                    jit.s.rip
                );
            }
            assert_eq!(jit.s.gpr, int.s.gpr, "registers at {:#x}", jit.s.rip);
            assert_eq!(
                jit.s.rflags & ARITH,
                int.s.rflags & ARITH,
                "flags at {:#x}",
                jit.s.rip
            );
            assert_eq!(
                jit.stats.instructions, int.stats.instructions,
                "instructions counted at {:#x}",
                jit.s.rip
            );
            if kicks && kicker.is_none() {
                jit.jit_wait_idle();
                warm += 1;
                if warm == 3 {
                    let (kick, stop) = (jit.kick.clone(), stop.clone());
                    kicker = Some(std::thread::spawn(move || {
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            kick.store(true, std::sync::atomic::Ordering::Relaxed);
                            std::thread::sleep(std::time::Duration::from_micros(200));
                        }
                    }));
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(k) = kicker {
            k.join().unwrap();
        }
        assert_eq!(jit.s.gpr[15], SENTINEL, "no exception");
        assert!(
            kicks || in_body > 0,
            "no exit from the body check ({exits} exits)"
        );
        // Kicked, translated code leaves when its entry's budget (at most
        // KICK_INTERVAL) runs out, here at the body check: every exit while
        // the loop runs comes from there (the first, interpreted, pass and
        // the HLT may see a kick too), except where a kick landed outside
        // translated code (`tails`; before they were counted, 3 of 37
        // full-suite runs here failed on one):
        // - at the loop's head, while the dispatcher interpreted the rest
        //   of the pass from the previous exit (a block not yet hot), with
        //   no translated pass in between;
        // - where the previous exit left off, with nothing run: the kick
        //   was already waiting when the test (slowly stepping the
        //   interpreter) ran the CPU again.
        // Whether a kick is waiting depends on the kicking thread's turns
        // on the host: `translated_loops_leave_for_the_dispatcher_every_kick_interval`
        // checks that kicks stop a loop.
        assert!(
            !kicks || looping == in_body + tails && stray.is_empty(),
            "{exits} exits for kicks, {looping} while looping, {in_body} at the body check, \
             {tails} explained otherwise; others: {stray:x?}"
        );
        let stats = jit.jit_stats().cloned().expect("jit stats");
        assert!(stats.translations > 0, "{stats:?}");
    }
}

/// Chained blocks of one page that park different registers (each parks
/// registers it never names) go through a chain stub that moves only the
/// registers the two park differently; the stubs sit at the top of the
/// code buffer, and a flush drops them with everything else. The loop's
/// three blocks name different registers, and the outcome matches the
/// interpreter's, with and without flushes. With event counting on, the
/// counts match what the loop must run.
#[test]
fn chain_stubs_between_blocks_that_park_differently() {
    const DATA: u64 = 0x30000;
    let run = |engine: mat_x86::Engine, flush: bool, events: bool| {
        let mut cpu = machine(|a| {
            let mut top = a.create_label();
            let mut skip = a.create_label();
            a.mov(r12d, 3000).unwrap();
            a.mov(rsi, DATA).unwrap();
            a.set_label(&mut top).unwrap();
            a.mov(rax, qword_ptr(rsi)).unwrap();
            a.add(rbx, rax).unwrap();
            a.add(r11, rbx).unwrap();
            a.test(r12d, 1).unwrap();
            a.jnz(skip).unwrap();
            // Ends the block (a taken JNZ is only a side exit).
            let mut second = a.create_label();
            a.jmp(second).unwrap();
            a.set_label(&mut second).unwrap();
            a.mov(rdx, qword_ptr(rsi + 8)).unwrap();
            a.mov(rcx, rdx).unwrap();
            a.add(r8, rcx).unwrap();
            a.xor(r9, r8).unwrap();
            a.add(r10, r9).unwrap();
            a.mov(qword_ptr(rsi + 8), r10).unwrap();
            a.set_label(&mut skip).unwrap();
            a.add(r14, r12).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        cpu.ram.write(DATA, &0x0123_4567_89ab_cdefu64.to_le_bytes());
        hot_engine(&mut cpu, engine);
        cpu.set_jit_events(events);
        let exit = loop {
            let exit = cpu.run(5_000);
            if exit != Exit::Budget {
                break exit;
            }
            if flush {
                cpu.flush_code();
            }
        };
        assert_eq!(exit, Exit::Halted);
        assert_eq!(cpu.s.gpr[15], SENTINEL, "no exception");
        if let Some(ev) = cpu.jit_events() {
            // Each round runs two blocks: the first, then the second or
            // (odd rounds) the loop's tail. Lookups: one in the first,
            // one group of two in the second; one backward jump each in
            // the second and the tail, both checked in the block's body
            // where its count is (the flags are dead before an ADD), so
            // without rcx; the second names rcx (the keeper saves it
            // around its lookup). Each budget exit (every 5 000
            // instructions) leaves from a body check and runs the start
            // of that block again.
            let n = |what: &str| ev.iter().find(|e| e.0 == what).map_or(0, |e| e.1);
            let within = |what: &str, lo: u64, hi: u64| {
                assert!((lo..=hi).contains(&n(what)), "{what}: {ev:?}");
            };
            // Only the flag-free lookups (a host with a fast PEXT) count.
            within("block executions", 6000, 6020);
            within("back-edge checks", 2990, 3020);
            within("entries past a page check", 1, 100);
            let lookups = n("TLB lookups that hit") + n("full TLB lookups");
            if lookups > 0 {
                assert!((4490..=4520).contains(&lookups), "{ev:?}");
                within("saves of guest rcx", 1490, 1510);
                within("chains through a stub", 5900, 6000);
            } else {
                // Only rcx is parked: the first block and the tail park
                // it, the second does not.
                within("saves of guest rcx", 1490, 1510);
                within("chains through a stub", 2900, 3000);
            }
        } else {
            assert!(!events || engine == mat_x86::Engine::Interp, "no events");
        }
        (
            cpu.s.gpr,
            read_bytes(&cpu, DATA, 16),
            cpu.jit_stats().cloned(),
        )
    };
    let (g_i, m_i, _) = run(mat_x86::Engine::Interp, false, false);
    for (flush, events) in [(false, false), (true, false), (false, true)] {
        let (g_j, m_j, stats) = run(mat_x86::Engine::Jit, flush, events);
        let stats = ran_translated(stats);
        // The middle block names rcx and the others do not: their parked
        // sets differ with or without BMI2.
        assert!(stats.chain_stubs > 0, "{stats:?}");
        assert_eq!(g_j, g_i, "registers (jit vs interpreter, flush {flush})");
        assert_eq!(m_j, m_i, "memory (jit vs interpreter, flush {flush})");
    }
}

/// With background translation the vCPU interprets a hot block until its
/// translation is ready and then runs that; a flush while jobs are queued
/// (here between short run slices) drops their results, and the blocks are
/// queued again. The outcome matches the interpreter's either way, and
/// translated code did run.
#[test]
fn background_translation_matches_interpreter() {
    const DATA: u64 = 0x30000;
    let run = |engine: mat_x86::Engine, flush_every: Option<u32>| {
        let mut cpu = machine(|a| {
            let mut top = a.create_label();
            let mut odd = a.create_label();
            a.mov(r12d, 200_000).unwrap();
            a.mov(rsi, DATA).unwrap();
            a.set_label(&mut top).unwrap();
            a.mov(rax, qword_ptr(rsi)).unwrap();
            a.imul_3(rax, rax, 0x1234_5679).unwrap();
            a.add(rax, r12).unwrap();
            a.mov(qword_ptr(rsi), rax).unwrap();
            a.test(r12d, 1).unwrap();
            a.jnz(odd).unwrap();
            a.xor(qword_ptr(rsi + 8), rax).unwrap();
            a.set_label(&mut odd).unwrap();
            a.ror(rax, 7).unwrap();
            a.add(qword_ptr(rsi + 16), rax).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        cpu.bus = Box::new(QuietBus);
        cpu.set_engine(engine).unwrap();
        cpu.set_jit_background(true).unwrap();
        cpu.set_jit_threshold(1);
        let mut slices = 0u32;
        let exit = loop {
            let exit = cpu.run(20_000);
            slices += 1;
            if exit != Exit::Budget || slices > 10_000 {
                break exit;
            }
            // A flush right after a slice catches the jobs it queued in
            // flight; otherwise they are installed before the next one.
            if flush_every.is_some_and(|n| slices.is_multiple_of(n)) {
                cpu.flush_code();
            } else {
                cpu.jit_wait_idle();
            }
        };
        assert_eq!(exit, Exit::Halted);
        assert_eq!(cpu.s.gpr[15], SENTINEL, "no exception");
        (
            cpu.s.gpr,
            read_bytes(&cpu, DATA, 24),
            cpu.jit_stats().cloned(),
        )
    };
    let (g_i, m_i, _) = run(mat_x86::Engine::Interp, None);
    for flush_every in [None, Some(1), Some(7)] {
        let (g_j, m_j, stats) = run(mat_x86::Engine::Jit, flush_every);
        let stats = stats.expect("jit stats");
        if flush_every != Some(1) {
            assert!(stats.translations > 0 && stats.entries > 0, "{stats:?}");
        }
        if flush_every.is_some() {
            assert!(stats.flushes > 10, "{stats:?}");
        }
        assert_eq!(g_j, g_i, "registers (jit vs interpreter, {flush_every:?})");
        assert_eq!(m_j, m_i, "memory (jit vs interpreter, {flush_every:?})");
    }
}

/// A block that names every general register leaves none to park, so its
/// memory accesses spill their scratch registers around the lookup
/// (`mem_prologue`). Indexed loads (one straddling two non-adjacent
/// frames in some round), an rcx base, a GS-based load, a store, PUSH and
/// POP match the interpreter with either lookup (flag-free PEXT, or
/// LAHF/SAHF), and a page fault in the last round shows the guest the
/// interpreter's frame and registers.
#[test]
fn register_starved_blocks_match_the_interpreter() {
    const N: u32 = 48;
    let rsi0 = va(6) - 8 * (N as u64 / 2) - 4;
    // gs:[rsi + 0x40] is va(3) + 0x140.
    let gs_base = (va(3) + 0x100).wrapping_sub(rsi0);
    let run = |engine: mat_x86::Engine, fast_lookup: bool, fault: bool| {
        let mut cpu = paging_machine(|a| {
            let mut top = a.create_label();
            a.mov(r12d, N).unwrap();
            // rsi + 8 * r12 - 8 is va(6) - 4 (straddling) when r12 = N/2 + 1.
            a.mov(rsi, rsi0).unwrap();
            a.set_label(&mut top).unwrap();
            a.mov(rax, qword_ptr(rsi + r12 * 8 - 8)).unwrap();
            a.mov(rcx, rsi).unwrap();
            if fault {
                // rcx + 16 is in va(7) in the last round (not present).
                a.cmp(r12d, 1).unwrap();
                a.sete(dl).unwrap();
                a.movzx(edx, dl).unwrap();
                a.shl(edx, 13).unwrap();
                a.add(rcx, rdx).unwrap();
            }
            a.add(rbx, qword_ptr(rcx + 16)).unwrap();
            a.mov(rdx, r8).unwrap();
            a.imul_2(rdx, r9).unwrap();
            a.push(rdx).unwrap();
            a.xor(rdi, rbp).unwrap();
            a.add(r10, r11).unwrap();
            a.mov(qword_ptr(rsi + r13 * 8 + 64), rbx).unwrap();
            a.add(rbp, qword_ptr(rcx + 0x40).gs()).unwrap();
            a.pop(r14).unwrap();
            a.add(r14, rax).unwrap();
            a.lea(r13, qword_ptr(r13 + 1)).unwrap();
            a.and(r13d, 31).unwrap();
            a.add(r8, r14).unwrap();
            a.add(r9, rdi).unwrap();
            a.sub(r11, r10).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        set_pte(&cpu, 6, pa(14) | P | RW | US);
        set_pte(&cpu, 7, 0);
        for k in 0..512 {
            w64(&cpu, pa(5) + 8 * k, 0x1111_0000_0000 + k * 0x0101_0101);
            w64(&cpu, pa(14) + 8 * k, 0x7777_0000_0000 + k * 0x0303_0303);
            w64(&cpu, pa(3) + 8 * k, k * k);
        }
        for (r, v) in [(8, 3u64), (9, 5), (10, 7), (11, 11), (5, 13), (7, 17)] {
            cpu.s.gpr[r] = v;
        }
        cpu.s.seg[mat_x86::state::GS].base = gs_base;
        hot_engine(&mut cpu, engine);
        cpu.set_jit_fast_lookup(fast_lookup);
        cpu.set_jit_events(true);
        let frame = fault_or_halt(&mut cpu, fault);
        if engine == mat_x86::Engine::Jit {
            let ev = cpu.jit_events().expect("jit events");
            let spilled = ev
                .iter()
                .find(|e| e.0 == "TLB lookups spilling their scratch registers")
                .map_or(0, |e| e.1);
            // Five accesses per round, from the second round on.
            assert!(spilled >= 5 * (N as u64 - 2), "{ev:?}");
        }
        let mut g = cpu.s.gpr;
        if fault {
            assert_eq!(cpu.s.cr2, rsi0 + 0x2000 + 16, "CR2");
            g[4] = 0; // the handler's stack
            g[15] = 0;
        }
        let mem: Vec<u64> = (0..512).map(|k| r64(&cpu, pa(5) + 8 * k)).collect();
        let stack = r64(&cpu, STACK - 8);
        (frame, g, mem, stack)
    };
    for fault in [false, true] {
        let want = run(mat_x86::Engine::Interp, true, fault);
        assert_eq!(want.1[12], if fault { 1 } else { 0 });
        for fast_lookup in [true, false] {
            let got = run(mat_x86::Engine::Jit, fast_lookup, fault);
            let what = format!("fault {fault}, fast lookup {fast_lookup}");
            assert_eq!(got.0, want.0, "exception frame: {what}");
            assert_eq!(got.1, want.1, "registers: {what}");
            assert_eq!(got.2, want.2, "memory: {what}");
            assert_eq!(got.3, want.3, "stack: {what}");
        }
    }
}

/// A prologue's run of pushes: rbx, rbp, r12 and the immediate `imm`.
fn push_frame(a: &mut CodeAssembler, imm: i32) {
    a.push(rbx).unwrap();
    a.push(rbp).unwrap();
    a.push(r12).unwrap();
    a.push(imm).unwrap();
}

/// A function's prologue and epilogue (pushes, `sub rsp`, `[rsp + disp]`
/// loads and stores, `add rsp`, pops, RET) share one check of the whole
/// frame (a stack group). The frame walks down across a page boundary
/// whose two pages map non-adjacent frames (the check fails and the
/// block's plain copy looks up each access); in the fault variant the
/// last round's frame reaches a page that is not present, and the #PF
/// (delivered on the IST stack) must show the interpreter's frame,
/// registers and memory.
#[test]
fn stack_groups_match_the_interpreter() {
    const N: u64 = 48;
    let run = |engine: mat_x86::Engine, fault: bool| {
        let mut cpu = paging_machine(|a| {
            let mut top = a.create_label();
            let mut f = a.create_label();
            let mut no_fault = a.create_label();
            a.mov(r12d, N as u32).unwrap();
            a.mov(r13, rsp).unwrap();
            a.mov(rbx, 0x1234u64).unwrap();
            a.mov(rdi, 0x77u64).unwrap();
            a.set_label(&mut top).unwrap();
            // rsp = va(6) + 0x40 - 8 * r12: the frame (0x48 bytes below
            // the return address) straddles va(5)/va(6) in some rounds.
            a.mov(rax, r12).unwrap();
            a.shl(rax, 3).unwrap();
            a.mov(rsp, va(6) + 0x40).unwrap();
            a.sub(rsp, rax).unwrap();
            if fault {
                a.cmp(r12d, 1).unwrap();
                a.jne(no_fault).unwrap();
                // va(7) is not present: the third push faults.
                a.mov(rsp, va(8) + 0x10).unwrap();
            }
            a.set_label(&mut no_fault).unwrap();
            a.call(f).unwrap();
            a.add(r14, rax).unwrap();
            a.mov(rsp, r13).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
            a.set_label(&mut f).unwrap();
            push_frame(a, 0x55);
            a.sub(rsp, 0x18).unwrap();
            a.mov(qword_ptr(rsp + 8), rdi).unwrap();
            a.mov(rax, qword_ptr(rsp + 0x18)).unwrap();
            a.add(rax, qword_ptr(rsp + 8)).unwrap();
            a.imul_3(rbp, rax, 3).unwrap();
            a.mov(qword_ptr(rsp + 0x10), rbp).unwrap();
            a.add(rbx, qword_ptr(rsp + 0x10)).unwrap();
            a.lea(rdi, qword_ptr(rdi + rax + 1)).unwrap();
            a.add(rsp, 0x18).unwrap();
            a.pop(rcx).unwrap();
            a.pop(r12).unwrap();
            a.pop(rbp).unwrap();
            a.add(rbx, rcx).unwrap();
            a.pop(rdx).unwrap();
            a.ret().unwrap();
        });
        set_pte(&cpu, 6, pa(14) | P | RW | US);
        set_pte(&cpu, 7, 0);
        set_gate(&cpu, 14, stub(14), 0, 1, true);
        hot_engine(&mut cpu, engine);
        cpu.set_jit_events(true);
        let frame = fault_or_halt(&mut cpu, fault);
        if engine == mat_x86::Engine::Jit && !fault {
            let ev = cpu.jit_events().expect("jit events");
            let n = |what: &str| ev.iter().find(|e| e.0 == what).map_or(0, |e| e.1);
            let lookups = n("TLB lookups that hit") + n("full TLB lookups");
            // Per round: the call's push and one check of the callee's
            // frame (14 lookups without the group), bar the 7 rounds whose
            // frame straddles the boundary (the plain copy's 14 and the
            // failed check): about 2 * 41 + 16 * 7 in all.
            assert!(lookups > 0 && lookups < 5 * N, "{ev:?}");
        }
        let mut mem: Vec<u64> = (0..512).map(|k| r64(&cpu, pa(5) + 8 * k)).collect();
        mem.extend((0..512).map(|k| r64(&cpu, pa(14) + 8 * k)));
        mem.extend((0..512).map(|k| r64(&cpu, pa(8) + 8 * k)));
        (frame, cpu.s.gpr, cpu.s.cr2, mem)
    };
    for fault in [false, true] {
        let want = run(mat_x86::Engine::Interp, fault);
        if fault {
            assert_eq!(want.2, va(8) - 8, "CR2");
        }
        // (frame, registers, CR2, memory)
        let got = run(mat_x86::Engine::Jit, fault);
        assert_eq!(got, want, "jit vs interpreter (fault {fault})");
    }
}

/// PUSH m64 (a plain, a GS-relative and an rsp-relative operand) and
/// SWAPGS run inline in translated code: the same registers, stack and
/// memory as the interpreter, also in a block that names every register
/// (its lookups spill scratch registers); in the fault variant the last
/// round's plain operand is on a page that is not present (the #PF shows
/// the interpreter's frame, CR2 and registers); SWAPGS at CPL 3 raises
/// #GP.
#[test]
fn pushes_from_memory_and_swapgs_match_the_interpreter() {
    const N: u32 = 40;
    const GS0: u64 = 0x3_0000;
    const KGS: u64 = 0x3_1000;
    let run = |engine: mat_x86::Engine, fault: bool, starved: bool| {
        let mut cpu = paging_machine(|a| {
            let mut top = a.create_label();
            let mut no_fault = a.create_label();
            a.mov(r12d, N).unwrap();
            a.set_label(&mut top).unwrap();
            if starved {
                // Name every register in the loop's blocks.
                for (x, y) in [(r8, r9), (r10, r11), (rdi, rbp), (rax, r13), (r14, r15)] {
                    a.xor(x, y).unwrap();
                }
            }
            a.mov(rsi, va(5)).unwrap();
            if fault {
                a.cmp(r12d, 1).unwrap();
                a.jne(no_fault).unwrap();
                a.mov(rsi, va(7) + 0x40).unwrap();
            }
            a.set_label(&mut no_fault).unwrap();
            a.push(qword_ptr(rsi + r12 * 8)).unwrap();
            a.push(qword_ptr(0x10).gs()).unwrap();
            a.push(qword_ptr(rsp + 8)).unwrap();
            if starved {
                a.xor(r8, r9).unwrap();
                a.xor(r10, r11).unwrap();
                a.xor(rdi, rbp).unwrap();
                a.xor(rax, r13).unwrap();
            }
            a.swapgs().unwrap();
            a.mov(rdx, qword_ptr(0x18).gs()).unwrap();
            a.swapgs().unwrap();
            a.add(rbx, rdx).unwrap();
            a.pop(rcx).unwrap();
            a.imul_2(rbx, rcx).unwrap();
            a.pop(rcx).unwrap();
            a.add(rbx, rcx).unwrap();
            a.pop(rcx).unwrap();
            a.xor(rbx, rcx).unwrap();
            a.add(qword_ptr(0x10).gs(), rbx).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        set_pte(&cpu, 7, 0);
        for k in 0..512 {
            w64(&cpu, pa(5) + 8 * k, 0x5151_0000 + k * 0x0102_0304);
        }
        w64(&cpu, GS0 + 0x10, 7);
        w64(&cpu, KGS + 0x18, 0x1234_5678);
        cpu.s.seg[mat_x86::state::GS].base = GS0;
        cpu.s.kernel_gs_base = KGS;
        hot_engine(&mut cpu, engine);
        let frame = fault_or_halt(&mut cpu, fault);
        let stats = cpu.jit_stats().cloned();
        let state = (
            frame,
            cpu.s.gpr,
            cpu.s.cr2,
            r64(&cpu, GS0 + 0x10),
            read_bytes(&cpu, STACK - 64, 64),
            cpu.s.seg[mat_x86::state::GS].base,
            cpu.s.kernel_gs_base,
        );
        (state, stats)
    };
    for (fault, starved) in [(false, false), (true, false), (false, true), (true, true)] {
        let (want, _) = run(mat_x86::Engine::Interp, fault, starved);
        if fault {
            assert_eq!(want.2, va(7) + 0x48, "CR2");
        }
        let (got, stats) = run(mat_x86::Engine::Jit, fault, starved);
        assert_eq!(
            got, want,
            "jit vs interpreter (fault {fault}, starved {starved})"
        );
        if !fault {
            // The loop's pushes and SWAPGS ran inline: a handful of
            // helper calls (the first rounds), not six per round.
            let stats = stats.expect("jit stats");
            assert!(stats.helper_calls < N as u64, "{stats:?}");
        }
    }
    // SWAPGS at CPL 3: #GP(0), under either engine.
    for engine in [mat_x86::Engine::Interp, mat_x86::Engine::Jit] {
        let mut cpu = machine(|a| {
            a.swapgs().unwrap();
            a.hlt().unwrap();
        });
        cpu.s.kernel_gs_base = KGS;
        hot_engine(&mut cpu, engine);
        to_user(&mut cpu, 0x8000);
        let f = expect_vector(&mut cpu, 13);
        assert_eq!((f[0], f[1]), (0, CODE), "error code and rip ({engine:?})");
        assert_eq!(cpu.s.kernel_gs_base, KGS, "no swap at CPL 3 ({engine:?})");
    }
}

/// SERIALIZE (advertised in CPUID.7.0:EDX[14]; Linux's sync_core() uses
/// it) runs as a no-op that ends the block, and translated code goes on
/// through the next block's full entry, whose page check would see code
/// another agent wrote (a same-page chain skips it): one entry past a page
/// check per round, no helper, and the interpreter's registers.
#[test]
fn serialize_refetches_through_a_page_check() {
    const N: u32 = 200;
    let run = |engine: mat_x86::Engine| {
        let mut cpu = machine(|a| {
            let mut top = a.create_label();
            a.mov(eax, 7).unwrap();
            a.xor(ecx, ecx).unwrap();
            a.cpuid().unwrap();
            a.mov(r8, rdx).unwrap();
            a.xor(ebx, ebx).unwrap();
            a.mov(r12d, N).unwrap();
            a.set_label(&mut top).unwrap();
            a.add(rbx, r12).unwrap();
            a.serialize().unwrap();
            a.add(rbx, 3).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        hot_engine(&mut cpu, engine);
        cpu.set_jit_events(true);
        expect_clean_halt(&mut cpu);
        assert_ne!(cpu.s.gpr[8] & (1 << 14), 0, "CPUID.7.0:EDX.SERIALIZE");
        if engine == mat_x86::Engine::Jit {
            let ev = cpu.jit_events().expect("jit events");
            let n = |what: &str| ev.iter().find(|e| e.0 == what).map_or(0, |e| e.1);
            assert!(n("entries past a page check") >= N as u64, "{ev:?}");
            let stats = cpu.jit_stats().expect("jit stats");
            assert!(stats.helper_calls < 5, "{stats:?}");
        }
        cpu.s.gpr
    };
    let want = run(mat_x86::Engine::Interp);
    assert_eq!(want[3], (1..=N as u64).sum::<u64>() + 3 * N as u64);
    assert_eq!(run(mat_x86::Engine::Jit), want);
}

/// INVLPG does not leave translated code: the helper drops the entry and
/// the code goes on through the next block's TLB and page checks. A loop
/// that remaps a data page and invalidates it each round reads the new
/// frame every time, with no exit to the dispatcher; code that remaps its
/// own page and invalidates it runs the new page's code next.
#[test]
fn invlpg_stays_in_translated_code_and_refetches() {
    const N: u32 = 100;
    let run = |engine: mat_x86::Engine| {
        let mut cpu = paging_machine(|a| {
            let mut top = a.create_label();
            a.mov(r12d, N).unwrap();
            a.set_label(&mut top).unwrap();
            a.add(rbx, qword_ptr(va(3))).unwrap();
            // PTE 3 alternates between pa(3) and pa(4).
            a.mov(rax, r12).unwrap();
            a.and(eax, 1).unwrap();
            a.shl(eax, 12).unwrap();
            a.add(rax, (pa(3) | P | RW | US) as i32).unwrap();
            a.mov(qword_ptr(PT + 3 * 8), rax).unwrap();
            a.invlpg(qword_ptr(va(3))).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            // Then the code at va(2), which remaps its own page.
            a.mov(rax, va(2)).unwrap();
            a.jmp(rax).unwrap();
        });
        // The same code in pa(2) and pa(9) up to the INVLPG; after it,
        // pa(9) adds 100 where pa(2) adds 1.
        let own = |imm: i32| {
            asm64(va(2), |a| {
                a.mov(rax, pa(9) | P | RW | US).unwrap();
                a.mov(qword_ptr(PT + 2 * 8), rax).unwrap();
                a.invlpg(qword_ptr(va(2))).unwrap();
                a.add(r13, imm).unwrap();
                a.hlt().unwrap();
            })
        };
        cpu.ram.write(pa(2), &own(1));
        cpu.ram.write(pa(9), &own(100));
        hot_engine(&mut cpu, engine);
        expect_clean_halt(&mut cpu);
        (cpu.s.gpr, cpu.jit_stats().cloned())
    };
    let (want, _) = run(mat_x86::Engine::Interp);
    // Markers (paging_machine): round r12 reads the frame the round
    // before chose, pa(4) after an odd r12; the first reads pa(3).
    assert_eq!(
        want[3],
        0x1004 * (N as u64 / 2 - 1) + 0x1003 * (N as u64 / 2 + 1)
    );
    assert_eq!(want[13], 100, "the remapped page's code ran");
    let (got, stats) = run(mat_x86::Engine::Jit);
    assert_eq!(got, want);
    let stats = stats.expect("jit stats");
    assert!(stats.helper_calls >= N as u64, "{stats:?}");
    assert!(stats.helper_exits < 10, "{stats:?}");
}

/// Direct calls to another page chain through a guard that checks the
/// TLB's mapping of the target page. The callee at va(2) is rewritten in
/// place (its new translation takes over the guard: no trip through the
/// dispatcher per call), then va(2) is remapped to another frame with
/// other code (the guard fails, the jump cache finds the new code). Every
/// phase must add what the code then in place adds, as the interpreter
/// does.
#[test]
fn calls_to_another_page_follow_rewrites_and_remaps() {
    const N: u32 = 300;
    let callee = |imm: u32| {
        let mut c = vec![0x48, 0x81, 0xc3]; // add rbx, imm32
        c.extend_from_slice(&imm.to_le_bytes());
        c.push(0xc3); // ret
        c
    };
    let run = |engine: mat_x86::Engine| {
        let mut cpu = paging_machine(|a| {
            let mut top = a.create_label();
            let mut no_rewrite = a.create_label();
            let mut no_remap = a.create_label();
            a.mov(r12d, N).unwrap();
            a.set_label(&mut top).unwrap();
            a.cmp(r12d, 2 * N / 3).unwrap();
            a.jne(no_rewrite).unwrap();
            a.mov(dword_ptr(va(2) + 3), 1000).unwrap();
            a.set_label(&mut no_rewrite).unwrap();
            a.cmp(r12d, N / 3).unwrap();
            a.jne(no_remap).unwrap();
            a.mov(rax, pa(9) | P | RW | US).unwrap();
            a.mov(qword_ptr(PT + 2 * 8), rax).unwrap();
            a.invlpg(qword_ptr(va(2))).unwrap();
            a.set_label(&mut no_remap).unwrap();
            a.call(va(2)).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        cpu.ram.write(pa(2), &callee(1));
        cpu.ram.write(pa(9), &callee(7));
        hot_engine(&mut cpu, engine);
        cpu.set_jit_events(true);
        expect_clean_halt(&mut cpu);
        if engine == mat_x86::Engine::Jit {
            let ev = cpu.jit_events().expect("jit events");
            let n = |what: &str| ev.iter().find(|e| e.0 == what).map_or(0, |e| e.1);
            // The guard passes in the first two phases, bar a few calls
            // around the rewrite.
            let through = n("chains to another page through a guard");
            assert!(through >= 2 * (N as u64) / 3 - 10, "{ev:?}");
            let stats = cpu.jit_stats().expect("jit stats");
            assert!(stats.far_chains >= 1, "{stats:?}");
            // Without the guard following the new translation, each call
            // of the second phase would leave for the dispatcher.
            assert!(stats.entries < 50, "{stats:?}");
        }
        cpu.s.gpr
    };
    let want = run(mat_x86::Engine::Interp);
    let n = N as u64 / 3;
    assert_eq!(want[3], n + 1000 * n + 7 * n, "rbx: the interpreter");
    assert_eq!(
        run(mat_x86::Engine::Jit),
        want,
        "registers (jit vs interpreter)"
    );
}

/// REP STOS in translated code: over rounds of fills of every size at
/// varying offsets and counts (zero included), forward and backward, some
/// crossing into a page whose frame is not the next one, the translated
/// run matches the interpreter at every budget exit (registers, flags,
/// instruction count) and in memory.
#[test]
fn rep_stos_in_translated_code_matches_the_interpreter() {
    const ROUNDS: u32 = 300;
    let prog = |a: &mut CodeAssembler| {
        let mut top = a.create_label();
        a.mov(r12d, ROUNDS).unwrap();
        a.set_label(&mut top).unwrap();
        // rdx = a pseudo-random word for this round.
        a.mov(eax, r12d).unwrap();
        a.imul_3(edx, eax, 0x9e37_79b1u32 as i32).unwrap();
        // stosb: offset 0..4095 in page 1, count 0..1023 (some cross).
        a.mov(edi, edx).unwrap();
        a.and(edi, 0xfff).unwrap();
        a.mov(rsi, va(1)).unwrap();
        a.add(rdi, rsi).unwrap();
        a.mov(ecx, edx).unwrap();
        a.shr(ecx, 12).unwrap();
        a.and(ecx, 0x3ff).unwrap();
        a.mov(eax, r12d).unwrap();
        a.cmp(r12d, 150).unwrap(); // flags the fill must keep
        a.rep().stosb().unwrap();
        a.adc(r13, 0).unwrap();
        a.add(r14, rdi).unwrap();
        a.add(r14, rcx).unwrap();
        // stosq: count 0..127 from a qword offset in page 2.
        a.mov(edi, edx).unwrap();
        a.shr(edi, 22).unwrap();
        a.and(edi, 0x1f8).unwrap();
        a.mov(rsi, va(2)).unwrap();
        a.add(rdi, rsi).unwrap();
        a.mov(ecx, edx).unwrap();
        a.and(ecx, 0x7f).unwrap();
        a.mov(rax, r13).unwrap();
        a.imul_2(rax, r12).unwrap();
        a.rep().stosq().unwrap();
        a.add(r14, rdi).unwrap();
        // stosw and stosd near the end of page 3 (some cross into 4).
        a.mov(edi, edx).unwrap();
        a.and(edi, 0x3e).unwrap();
        a.mov(rsi, va(4) - 64).unwrap();
        a.add(rdi, rsi).unwrap();
        a.mov(ecx, 20).unwrap();
        a.rep().stosw().unwrap();
        a.mov(ecx, edx).unwrap();
        a.shr(ecx, 28).unwrap();
        a.rep().stosd().unwrap();
        a.add(r14, rdi).unwrap();
        // Every 8th round, a backward fill (DF set).
        let mut fwd = a.create_label();
        a.test(r12d, 7).unwrap();
        a.jnz(fwd).unwrap();
        a.mov(rdi, va(3) + 0x800).unwrap();
        a.mov(ecx, 33).unwrap();
        a.std().unwrap();
        a.rep().stosb().unwrap();
        a.cld().unwrap();
        a.add(r14, rdi).unwrap();
        a.set_label(&mut fwd).unwrap();
        a.dec(r12d).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    };
    let setup = |engine| {
        let mut cpu = paging_machine(prog);
        // Pages that fills cross into are not the next frame: a fill
        // that ran on past its page in host memory would be seen.
        set_pte(&cpu, 2, pa(9) | P | RW | US);
        set_pte(&cpu, 4, pa(11) | P | RW | US);
        hot_engine(&mut cpu, engine);
        cpu
    };
    let mut jit = setup(mat_x86::Engine::Jit);
    let mut int = setup(mat_x86::Engine::Interp);
    lockstep(&mut jit, &mut int, 333, 1_000_000, 20);
    assert!(
        read_bytes(&jit, pa(1), 12 * 4096) == read_bytes(&int, pa(1), 12 * 4096),
        "filled memory differs"
    );
}

/// REP STOS over translated code (NOPs over a function's ADD)
/// invalidates the translation: later calls run the new code, with the
/// translator as with the interpreter.
#[test]
fn rep_stos_over_translated_code_invalidates_it() {
    let run = |engine| {
        let mut cpu = machine(|a| {
            let mut f = a.create_label();
            let mut first = a.create_label();
            let mut second = a.create_label();
            let mut done = a.create_label();
            a.mov(r12d, 50).unwrap();
            a.set_label(&mut first).unwrap();
            a.call(f).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(first).unwrap();
            a.lea(rdi, qword_ptr(f)).unwrap();
            a.mov(ecx, 4).unwrap();
            a.mov(al, 0x90).unwrap();
            a.rep().stosb().unwrap();
            a.mov(r12d, 50).unwrap();
            a.set_label(&mut second).unwrap();
            a.call(f).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(second).unwrap();
            a.jmp(done).unwrap();
            a.set_label(&mut f).unwrap();
            a.add(r13, 1).unwrap(); // 49 83 c5 01
            a.ret().unwrap();
            a.set_label(&mut done).unwrap();
            a.hlt().unwrap();
        });
        hot_engine(&mut cpu, engine);
        expect_clean_halt(&mut cpu);
        cpu.s.gpr[13]
    };
    assert_eq!(run(mat_x86::Engine::Interp), 50);
    assert_eq!(run(mat_x86::Engine::Jit), 50);
}

/// Runs of pushes and pops in a stack group leave guest rsp exact for an
/// instruction after the run that reads it (MOV from rsp, here in the
/// middle of the frame and after the pops) and at every budget exit
/// (lockstep with the interpreter). (It failed on a translator that
/// passed rsp along a run in a register and forgot the final store.)
#[test]
fn runs_of_pushes_and_pops_leave_rsp_exact() {
    let prog = |a: &mut CodeAssembler| {
        let mut top = a.create_label();
        let mut f = a.create_label();
        a.mov(r12d, 400).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(f).unwrap();
        a.dec(r12d).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut f).unwrap();
        push_frame(a, 7);
        a.mov(r8, rsp).unwrap();
        a.add(r14, r8).unwrap();
        a.mov(rbx, qword_ptr(rsp + 8)).unwrap();
        a.add(r13, rbx).unwrap();
        a.pop(r10).unwrap();
        a.pop(r12).unwrap();
        a.pop(rbp).unwrap();
        a.pop(rbx).unwrap();
        a.mov(r9, rsp).unwrap();
        a.add(r14, r9).unwrap();
        a.add(r13, r10).unwrap();
        a.ret().unwrap();
    };
    let (mut jit, mut int) = hot_pair(|| paging_machine(prog));
    lockstep(&mut jit, &mut int, 97, 100_000, 20);
}
