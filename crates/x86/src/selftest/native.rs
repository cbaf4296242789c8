//! Running a generated instruction sequence natively on the host CPU.
//!
//! Fixed pages are mapped at the same virtual addresses the emulated guest
//! uses (`CODE_BASE`, `DATA_BASE`, `STACK_BASE`), plus a control page
//! (`CTRL_BASE`) holding the input/output register images. A prologue saves
//! the host's callee-saved state, loads every GPR, RFLAGS, XMM0-15 and MXCSR
//! from the input image and jumps to the sequence; the sequence is followed
//! by a `jmp` to an epilogue that stores everything to the output image and
//! returns to Rust. A fault inside the code page is caught by a SIGSEGV /
//! SIGBUS / SIGILL / SIGFPE handler (on an alternate signal stack) that
//! records the signal and redirects the interrupted context's RIP to the
//! epilogue, so the stored state is the state before the faulting
//! instruction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use iced_x86::code_asm::*;

pub const CODE_BASE: u64 = 0x0010_0000;
pub const CODE_LEN: u64 = 0x2000;
/// Where the sequence starts (in both worlds).
pub const SEQ_START: u64 = CODE_BASE;
const EPILOGUE: u64 = CODE_BASE + 0x1000;
const PROLOGUE: u64 = CODE_BASE + 0x1800;
pub const DATA_BASE: u64 = 0x0020_0000;
pub const STACK_BASE: u64 = 0x0030_0000;
pub const PAGE: usize = 4096;
const CTRL_BASE: u64 = 0x0040_0000;
const IN: u64 = CTRL_BASE;
const OUT: u64 = CTRL_BASE + 0x400;
const HOST_RSP: u64 = CTRL_BASE + 0x800;
const HOST_MXCSR: u64 = CTRL_BASE + 0x808;
const F_SIGNO: u64 = CTRL_BASE + 0x810;
const F_CODE: u64 = CTRL_BASE + 0x818;
const F_RIP: u64 = CTRL_BASE + 0x820;
const F_ADDR: u64 = CTRL_BASE + 0x828;
const TMP_STACK_TOP: u64 = CTRL_BASE + 0x1000;

/// Offsets within a register image.
const R_GPR: u64 = 0;
const R_RFLAGS: u64 = 128;
const R_MXCSR: u64 = 136;
const R_XMM: u64 = 144;

/// One register image (input or output).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub mxcsr: u32,
    pub xmm: [u128; 16],
}

/// How a native run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativeFault {
    pub signo: i32,
    pub si_code: i32,
    pub rip: u64,
    pub addr: u64,
}

impl NativeFault {
    /// The x86 exception vector this signal most likely came from.
    pub fn vector(&self) -> u8 {
        match self.signo {
            libc::SIGFPE => {
                // FPE_INTDIV, FPE_INTOVF
                if self.si_code == 1 || self.si_code == 2 {
                    0
                } else {
                    19
                }
            }
            libc::SIGILL => 6,
            libc::SIGSEGV => {
                if self.si_code == 0x80 {
                    13 // SI_KERNEL: #GP
                } else {
                    14
                }
            }
            libc::SIGBUS => 17,
            libc::SIGTRAP => 1,
            _ => 255,
        }
    }
}

static LOCK: Mutex<()> = Mutex::new(());
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
static PAGES_OK: AtomicBool = AtomicBool::new(false);
static mut OLD_ACTIONS: [Option<libc::sigaction>; 32] = [None; 32];

const SIGNALS: [i32; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
];

extern "C" fn on_signal(sig: i32, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes valid siginfo / ucontext pointers to an
    // SA_SIGINFO handler. We only do plain stores (async-signal-safe).
    unsafe {
        let uc = uc as *mut libc::ucontext_t;
        let gregs = &mut (*uc).uc_mcontext.gregs;
        let rip = gregs[libc::REG_RIP as usize] as u64;
        if PAGES_OK.load(Ordering::Relaxed) && (CODE_BASE..CODE_BASE + CODE_LEN).contains(&rip) {
            *(F_SIGNO as *mut u64) = sig as u64;
            *(F_CODE as *mut u64) = (*info).si_code as u64;
            *(F_RIP as *mut u64) = rip;
            *(F_ADDR as *mut u64) = (*info).si_addr() as u64;
            gregs[libc::REG_RIP as usize] = EPILOGUE as i64;
            return;
        }
        // Not ours: put the previous disposition back and let the fault
        // happen again under it.
        let old = OLD_ACTIONS[sig as usize & 31];
        match old {
            Some(a) => {
                libc::sigaction(sig, &a, std::ptr::null_mut());
            }
            None => {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

fn install_handlers() -> Result<(), String> {
    // SAFETY: plain sigaction calls with a valid handler; OLD_ACTIONS is
    // written once here, before any handler can read it for our pages.
    unsafe {
        for &sig in &SIGNALS {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, &sa, &mut old) != 0 {
                return Err(format!("sigaction({sig}) failed"));
            }
            OLD_ACTIONS[sig as usize & 31] = Some(old);
        }
    }
    Ok(())
}

fn map_fixed(addr: u64, len: usize, prot: i32) -> Result<(), String> {
    // SAFETY: MAP_FIXED_NOREPLACE never clobbers an existing mapping.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED || p as u64 != addr {
        return Err(format!(
            "cannot map {len:#x} bytes at {addr:#x}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn assemble(ip: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("assembler");
    f(&mut a).expect("assembles");
    a.assemble(ip).expect("assembles")
}

fn xmm(n: usize) -> AsmRegisterXmm {
    [
        xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
        xmm14, xmm15,
    ][n]
}

fn gpr(n: usize) -> AsmRegister64 {
    [
        rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
    ][n]
}

fn build_trampolines() -> (Vec<u8>, Vec<u8>) {
    let pro = assemble(PROLOGUE, |a| {
        for r in [rbx, rbp, r12, r13, r14, r15] {
            a.push(r)?;
        }
        a.pushfq()?;
        a.sub(rsp, 8)?;
        a.mov(qword_ptr(HOST_RSP), rsp)?;
        a.stmxcsr(dword_ptr(HOST_MXCSR))?;
        for n in 0..16 {
            a.movups(xmm(n), xmmword_ptr(IN + R_XMM + 16 * n as u64))?;
        }
        a.ldmxcsr(dword_ptr(IN + R_MXCSR))?;
        a.mov(rsp, TMP_STACK_TOP as i64)?;
        a.push(qword_ptr(IN + R_RFLAGS))?;
        a.popfq()?;
        for n in (0..16).filter(|&n| n != 4) {
            a.mov(gpr(n), qword_ptr(IN + R_GPR + 8 * n as u64))?;
        }
        a.mov(rsp, qword_ptr(IN + R_GPR + 32))?;
        a.jmp(SEQ_START)?;
        Ok(())
    });
    let epi = assemble(EPILOGUE, |a| {
        for n in 0..16 {
            a.mov(qword_ptr(OUT + R_GPR + 8 * n as u64), gpr(n))?;
        }
        a.mov(rsp, TMP_STACK_TOP as i64)?;
        a.pushfq()?;
        a.pop(rax)?;
        a.mov(qword_ptr(OUT + R_RFLAGS), rax)?;
        for n in 0..16 {
            a.movups(xmmword_ptr(OUT + R_XMM + 16 * n as u64), xmm(n))?;
        }
        a.stmxcsr(dword_ptr(OUT + R_MXCSR))?;
        a.ldmxcsr(dword_ptr(HOST_MXCSR))?;
        a.mov(rsp, qword_ptr(HOST_RSP))?;
        a.add(rsp, 8)?;
        a.popfq()?;
        for r in [r15, r14, r13, r12, rbp, rbx] {
            a.pop(r)?;
        }
        a.ret()?;
        Ok(())
    });
    (pro, epi)
}

fn setup_pages() -> Result<(), String> {
    map_fixed(
        CODE_BASE,
        CODE_LEN as usize,
        libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
    )?;
    map_fixed(DATA_BASE, PAGE, libc::PROT_READ | libc::PROT_WRITE)?;
    map_fixed(STACK_BASE, PAGE, libc::PROT_READ | libc::PROT_WRITE)?;
    map_fixed(CTRL_BASE, PAGE, libc::PROT_READ | libc::PROT_WRITE)?;
    let (pro, epi) = build_trampolines();
    assert!(pro.len() < 0x800 && epi.len() < 0x800);
    // SAFETY: the code mapping was just created RWX at CODE_BASE.
    unsafe {
        std::ptr::copy_nonoverlapping(pro.as_ptr(), PROLOGUE as *mut u8, pro.len());
        std::ptr::copy_nonoverlapping(epi.as_ptr(), EPILOGUE as *mut u8, epi.len());
    }
    PAGES_OK.store(true, Ordering::SeqCst);
    install_handlers()
}

/// Exclusive use of the fixed native pages (one runner per process at a time).
pub struct Native {
    _guard: MutexGuard<'static, ()>,
    altstack: Vec<u8>,
    old_altstack: libc::stack_t,
}

impl Native {
    pub fn new() -> Result<Native, String> {
        let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        INSTALLED.get_or_init(setup_pages).clone()?;
        // A signal frame with AVX-512 state is several KiB: give the handler
        // its own stack (the sandbox stack page is tiny and compared).
        let mut altstack = vec![0u8; 256 * 1024];
        let st = libc::stack_t {
            ss_sp: altstack.as_mut_ptr() as *mut libc::c_void,
            ss_flags: 0,
            ss_size: altstack.len(),
        };
        // SAFETY: valid stack_t; the old one is restored in Drop before the
        // buffer is freed.
        let mut old: libc::stack_t = unsafe { std::mem::zeroed() };
        if unsafe { libc::sigaltstack(&st, &mut old) } != 0 {
            return Err("sigaltstack failed".into());
        }
        Ok(Native {
            _guard: guard,
            altstack,
            old_altstack: old,
        })
    }

    /// Run `code` (followed by a jump to the epilogue) with `input`.
    /// `data` / `stack` are copied in before and out after the run.
    pub fn run(
        &mut self,
        code: &[u8],
        input: &Regs,
        data: &mut [u8; PAGE],
        stack: &mut [u8; PAGE],
    ) -> (Regs, Option<NativeFault>) {
        let end = SEQ_START + code.len() as u64;
        let jmp = assemble(end, |a| a.jmp(EPILOGUE));
        assert!(code.len() + jmp.len() < 0x1000);
        // SAFETY: all addresses are inside the fixed mappings created in
        // `setup_pages`, which live for the rest of the process; the mutex
        // in `self` gives this thread exclusive use. The prologue follows the
        // SysV ABI for callee-saved registers, RSP, DF and MXCSR; everything
        // else it clobbers is caller-saved. Faults inside the code page are
        // turned into a normal return through the epilogue by `on_signal`.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), SEQ_START as *mut u8, code.len());
            std::ptr::copy_nonoverlapping(jmp.as_ptr(), end as *mut u8, jmp.len());
            std::ptr::copy_nonoverlapping(data.as_ptr(), DATA_BASE as *mut u8, PAGE);
            std::ptr::copy_nonoverlapping(stack.as_ptr(), STACK_BASE as *mut u8, PAGE);
            let inp = IN as *mut u8;
            for n in 0..16 {
                *(inp.add(R_GPR as usize + 8 * n) as *mut u64) = input.gpr[n];
                *(inp.add(R_XMM as usize + 16 * n) as *mut u128) = input.xmm[n];
            }
            *(inp.add(R_RFLAGS as usize) as *mut u64) = input.rflags;
            *(inp.add(R_MXCSR as usize) as *mut u32) = input.mxcsr;
            *(F_SIGNO as *mut u64) = 0;
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            let f: extern "sysv64" fn() = std::mem::transmute(PROLOGUE as usize);
            f();
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            let out = OUT as *const u8;
            let mut r = Regs::default();
            for n in 0..16 {
                r.gpr[n] = *(out.add(R_GPR as usize + 8 * n) as *const u64);
                r.xmm[n] =
                    std::ptr::read_unaligned(out.add(R_XMM as usize + 16 * n) as *const u128);
            }
            r.rflags = *(out.add(R_RFLAGS as usize) as *const u64);
            r.mxcsr = *(out.add(R_MXCSR as usize) as *const u32);
            std::ptr::copy_nonoverlapping(DATA_BASE as *const u8, data.as_mut_ptr(), PAGE);
            std::ptr::copy_nonoverlapping(STACK_BASE as *const u8, stack.as_mut_ptr(), PAGE);
            let signo = *(F_SIGNO as *const u64);
            let fault = (signo != 0).then(|| NativeFault {
                signo: signo as i32,
                si_code: *(F_CODE as *const u64) as i32,
                rip: *(F_RIP as *const u64),
                addr: *(F_ADDR as *const u64),
            });
            (r, fault)
        }
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        // SAFETY: restores the thread's previous alternate signal stack
        // before our buffer is freed.
        unsafe {
            let mut old = self.old_altstack;
            if old.ss_sp.is_null() {
                old.ss_flags = libc::SS_DISABLE;
            }
            libc::sigaltstack(&old, std::ptr::null_mut());
        }
        let _ = &self.altstack;
    }
}
