//! Differential CPU self-test: random user-level instruction sequences run
//! natively on the host CPU and in the emulator; the results (GPRs, the
//! defined RFLAGS bits, XMM0-15, MXCSR, the sandbox data and stack pages and
//! the fault, if any) must agree.
//!
//! Both worlds use the same virtual addresses: the code at
//! [`native::SEQ_START`], a 4 KiB data page at [`native::DATA_BASE`] (RBX
//! points into its middle, every generated memory operand stays inside it)
//! and a 4 KiB stack page at [`native::STACK_BASE`]. The emulator runs the
//! sequence at CPL 3 over identity-mapped guest RAM.
//!
//! Entry point: [`run_cases`]. The last line of the report's `Display` is
//! exactly `cases=N mismatches=M`.

#![allow(clippy::needless_range_loop)]

pub mod gen;
pub mod loops;
pub mod native;

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::time::{Duration, Instant};

use iced_x86::{Formatter, Instruction, IntelFormatter};

use crate::cpu::Cpu;
use crate::state::{flags, CS, DS, ES, FS, GS, SS};
use crate::testutil::{cpu64, flat64_code, flat_data};
use gen::{Case, Generator, Rng};
use native::{Native, NativeFault, Regs, DATA_BASE, PAGE, SEQ_START, STACK_BASE};

/// Instruction classes the generator draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Integer ALU, shifts, multiply/divide, bit ops, moves, CMOV/SETcc,
    /// XCHG/XADD/CMPXCHG (also LOCKed), PUSH/POP, flag ops.
    Int,
    /// MOVS/STOS/LODS/SCAS/CMPS with and without REP, both directions.
    Str,
    /// Legacy-encoded SSE .. SSE4.2 (no MMX registers, no VEX).
    Sse,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Int, Class::Str, Class::Sse];

    pub fn name(self) -> &'static str {
        match self {
            Class::Int => "int",
            Class::Str => "str",
            Class::Sse => "sse",
        }
    }

    /// Parse a comma-separated list (`int,str,sse` or `all`).
    pub fn parse_list(s: &str) -> Result<Vec<Class>, String> {
        let mut v = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "all" {
                v.extend(Class::ALL);
            } else {
                v.push(part.parse()?);
            }
        }
        v.sort();
        v.dedup();
        if v.is_empty() {
            return Err("no instruction class given".into());
        }
        Ok(v)
    }
}

impl FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Class, String> {
        match s {
            "int" | "integer" => Ok(Class::Int),
            "str" | "string" => Ok(Class::Str),
            "sse" => Ok(Class::Sse),
            _ => Err(format!(
                "unknown instruction class `{s}` (expected int, str, sse or all)"
            )),
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub cases: u64,
    pub seed: u64,
    /// Generated instructions per case: 1..=this (plus helper instructions).
    pub max_insns_per_case: usize,
    pub classes: Vec<Class>,
    /// Index of the first case (cases are reproducible individually:
    /// `first_case = k, cases = 1` re-runs case k of a seed).
    pub first_case: u64,
    /// How many mismatches to describe in detail.
    pub max_reported: usize,
    /// Print progress to stderr every 100k cases.
    pub progress: bool,
    /// Self-check: flip bit 0 of the emulated RAX after every case.
    pub corrupt_emulated_rax: bool,
    /// Only describe mismatches whose key (e.g. `state: Bsr_r32_rm32`)
    /// contains this string (all are still counted).
    pub report_filter: Option<String>,
    /// Engine under test (the JIT translates every case on first use).
    pub engine: crate::Engine,
    /// JIT only: use the LAHF/SAHF soft-TLB lookup even where the host
    /// has a fast PEXT (the path hosts without BMI2 take).
    pub jit_no_bmi2: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cases: 10_000,
            seed: 1,
            max_insns_per_case: 4,
            classes: vec![Class::Int, Class::Str],
            first_case: 0,
            max_reported: 10,
            progress: true,
            corrupt_emulated_rax: false,
            report_filter: None,
            engine: crate::Engine::Interp,
            jit_no_bmi2: false,
        }
    }
}

/// The outcome of [`run_cases`].
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub cases: u64,
    pub mismatches: u64,
    /// Detailed, human-readable descriptions of the first mismatches.
    pub first_mismatches: Vec<String>,
    /// Generated sequences thrown away (and regenerated), by reason.
    pub skipped_by_reason: BTreeMap<String, u64>,
    /// Mismatches by kind and culprit instruction form (iced `Code`).
    pub mismatches_by_key: BTreeMap<String, u64>,
    /// Cases per class.
    pub cases_by_class: BTreeMap<String, u64>,
    /// Native faults seen (agreeing or not), by vector.
    pub native_faults: BTreeMap<String, u64>,
    pub elapsed: Duration,
    /// Set when the tester could not run at all (e.g. mmap failed).
    pub error: Option<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(e) = &self.error {
            writeln!(f, "error: {e}")?;
        }
        let secs = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "cpu self-test: {} cases in {:.2}s ({:.0} cases/s)",
            self.cases,
            secs,
            self.cases as f64 / secs.max(1e-9)
        )?;
        for (k, v) in &self.cases_by_class {
            writeln!(f, "  class {k}: {v} cases")?;
        }
        if !self.native_faults.is_empty() {
            let s: Vec<String> = self
                .native_faults
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(f, "  native faults: {}", s.join(" "))?;
        }
        if !self.skipped_by_reason.is_empty() {
            writeln!(f, "  regenerated sequences:")?;
            for (k, v) in &self.skipped_by_reason {
                writeln!(f, "    {k}: {v}")?;
            }
        }
        if !self.mismatches_by_key.is_empty() {
            writeln!(f, "mismatches by culprit instruction:")?;
            let mut v: Vec<_> = self.mismatches_by_key.iter().collect();
            v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            for (k, n) in v {
                writeln!(f, "  {n:8}  {k}")?;
            }
        }
        for m in &self.first_mismatches {
            writeln!(f, "{m}")?;
        }
        write!(f, "cases={} mismatches={}", self.cases, self.mismatches)
    }
}

/// Run in the emulator.
struct Emu {
    cpu: Cpu,
}

const RAM_SIZE: u64 = 8 << 20;

#[derive(Clone, PartialEq, Eq)]
struct Outcome {
    regs: Regs,
    /// (vector, rip, unimplemented)
    fault: Option<(u8, u64, bool)>,
    data: Box<[u8; PAGE]>,
    stack: Box<[u8; PAGE]>,
}

impl Emu {
    fn new(engine: crate::Engine, no_bmi2: bool) -> Emu {
        let mut cpu = cpu64(RAM_SIZE, &[], SEQ_START);
        if engine == crate::Engine::Jit {
            if let Err(e) = cpu.set_engine(engine) {
                panic!("cannot create the JIT code buffer: {e}");
            }
            cpu.set_jit_threshold(0);
            if no_bmi2 {
                cpu.set_jit_fast_lookup(false);
            }
            cpu.capture_faults = true;
        }
        let mut cs = flat64_code(3);
        cs.selector = 0x1b;
        cpu.s.seg[CS] = cs;
        for s in [DS, ES, SS, FS, GS] {
            cpu.s.seg[s] = flat_data(0x23, 3);
        }
        cpu.flush_tlb_all();
        Emu { cpu }
    }

    fn run(&mut self, code: &[u8], input: &Regs, data: &[u8; PAGE], stack: &[u8; PAGE]) -> Outcome {
        let cpu = &mut self.cpu;
        let mut bytes = Vec::with_capacity(code.len() + 2);
        bytes.extend_from_slice(code);
        bytes.extend_from_slice(&[0x0f, 0x0b]); // UD2 ends the decoded block
        cpu.ram.write(SEQ_START, &bytes);
        cpu.ram.write(DATA_BASE, data);
        cpu.ram.write(STACK_BASE, stack);
        cpu.s.gpr = input.gpr;
        cpu.s.rip = SEQ_START;
        cpu.s.rflags = input.rflags | flags::FIXED1 | flags::IF;
        cpu.s.fpu.xmm = input.xmm;
        cpu.s.fpu.mxcsr = input.mxcsr;
        let end = SEQ_START + code.len() as u64;
        let unimpl0 = cpu.stats.unimplemented;
        let mut fault = None;
        let mut steps = 0u32;
        if cpu.engine() == crate::Engine::Jit {
            cpu.captured_fault = None;
            match cpu.run(1_000_000) {
                crate::Exit::Shutdown(_) => {}
                _ => fault = Some((0xff, cpu.s.rip, false)),
            }
            match cpu.captured_fault.take() {
                Some(f) if f.vector == 6 && cpu.s.rip == end => {}
                Some(f) => fault = Some((f.vector, cpu.s.rip, cpu.stats.unimplemented != unimpl0)),
                None => fault = Some((0xff, cpu.s.rip, false)),
            }
            steps = u32::MAX;
        }
        while cpu.s.rip != end && steps != u32::MAX {
            if let Some(f) = cpu.step() {
                fault = Some((f.vector, cpu.s.rip, cpu.stats.unimplemented != unimpl0));
                break;
            }
            steps += 1;
            if steps > 1_000_000 || !(SEQ_START..end).contains(&cpu.s.rip) && cpu.s.rip != end {
                fault = Some((0xff, cpu.s.rip, false));
                break;
            }
        }
        let mut d = Box::new([0u8; PAGE]);
        let mut s = Box::new([0u8; PAGE]);
        cpu.ram.read(DATA_BASE, &mut d[..]);
        cpu.ram.read(STACK_BASE, &mut s[..]);
        Outcome {
            regs: Regs {
                gpr: cpu.s.gpr,
                rflags: cpu.s.rflags,
                mxcsr: cpu.s.fpu.mxcsr,
                xmm: cpu.s.fpu.xmm,
            },
            fault,
            data: d,
            stack: s,
        }
    }
}

fn run_native(n: &mut Native, code: &[u8], case: &Case) -> Outcome {
    let mut data = case.data.clone();
    let mut stack = case.stack.clone();
    let (regs, f) = n.run(code, &case.input, &mut data, &mut stack);
    Outcome {
        regs,
        fault: f.map(|f: NativeFault| (f.vector(), f.rip, false)),
        data,
        stack,
    }
}

fn fault_class(v: u8) -> u8 {
    match v {
        12 | 13 | 14 | 17 => 13,
        v => v,
    }
}

fn vector_name(v: u8) -> String {
    match v {
        0 => "#DE".into(),
        1 => "#DB".into(),
        6 => "#UD".into(),
        12 => "#SS".into(),
        13 => "#GP".into(),
        14 => "#PF".into(),
        17 => "#AC".into(),
        19 => "#XM".into(),
        0xff => "runaway".into(),
        v => format!("#{v}"),
    }
}

const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

/// Number of instructions that completed natively (the faulting one excluded).
fn executed(insns: &[Instruction], o: &Outcome) -> usize {
    match o.fault {
        Some((_, rip, _)) => insns
            .iter()
            .position(|i| i.ip() == rip)
            .unwrap_or(insns.len()),
        None => insns.len(),
    }
}

/// Differences between the native (`n`) and emulated (`e`) outcomes.
fn diff(insns: &[Instruction], n: &Outcome, e: &Outcome) -> Vec<String> {
    let mut out = Vec::new();
    let nf = n.fault.map(|(v, r, _)| (fault_class(v), r));
    let ef = e.fault.map(|(v, r, _)| (fault_class(v), r));
    if nf != ef {
        let show = |f: Option<(u8, u64, bool)>| match f {
            None => "none".to_string(),
            Some((v, rip, u)) => format!(
                "{} at {rip:#x}{}",
                vector_name(v),
                if u {
                    " (unimplemented in emulator)"
                } else {
                    ""
                }
            ),
        };
        out.push(format!(
            "fault: native={} emulated={}",
            show(n.fault),
            show(e.fault)
        ));
    }
    let count = executed(insns, n);
    let undef = gen::undefined_flags(&insns[..count]).unwrap_or(flags::STATUS);
    for r in 0..16 {
        if n.regs.gpr[r] != e.regs.gpr[r] {
            out.push(format!(
                "{}: native={:#018x} emulated={:#018x}",
                GPR_NAMES[r], n.regs.gpr[r], e.regs.gpr[r]
            ));
        }
    }
    let fmask = (flags::STATUS | flags::DF) & !undef;
    let fd = (n.regs.rflags ^ e.regs.rflags) & fmask;
    if fd != 0 {
        out.push(format!(
            "rflags: native={:#x} emulated={:#x} differing [{}] (compared mask {:#x})",
            n.regs.rflags,
            e.regs.rflags,
            flag_names(fd),
            fmask
        ));
    }
    for r in 0..16 {
        if n.regs.xmm[r] != e.regs.xmm[r] {
            out.push(format!(
                "xmm{r}: native={:#034x} emulated={:#034x}",
                n.regs.xmm[r], e.regs.xmm[r]
            ));
        }
    }
    if n.regs.mxcsr != e.regs.mxcsr {
        out.push(format!(
            "mxcsr: native={:#x} emulated={:#x}",
            n.regs.mxcsr, e.regs.mxcsr
        ));
    }
    for (name, base, a, b) in [
        ("data", DATA_BASE, &n.data, &e.data),
        ("stack", STACK_BASE, &n.stack, &e.stack),
    ] {
        let mut shown = 0;
        let mut total = 0;
        let mut line = String::new();
        for k in 0..PAGE {
            if a[k] != b[k] {
                total += 1;
                if shown < 32 {
                    let _ = write!(line, " [{:#x}] {:02x}/{:02x}", base + k as u64, a[k], b[k]);
                    shown += 1;
                }
            }
        }
        if total > 0 {
            out.push(format!(
                "{name} page: {total} bytes differ (native/emulated):{line}"
            ));
        }
    }
    out
}

fn flag_names(f: u64) -> String {
    let mut v = Vec::new();
    for (b, n) in [
        (0, "CF"),
        (2, "PF"),
        (4, "AF"),
        (6, "ZF"),
        (7, "SF"),
        (10, "DF"),
        (11, "OF"),
    ] {
        if f & (1 << b) != 0 {
            v.push(n);
        }
    }
    v.join(" ")
}

fn disasm(insns: &[Instruction], code: &[u8]) -> String {
    let mut fmt = IntelFormatter::new();
    let mut s = String::new();
    for i in insns {
        let off = (i.ip() - SEQ_START) as usize;
        let bytes: Vec<String> = code[off..off + i.len()]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut t = String::new();
        fmt.format(i, &mut t);
        let _ = writeln!(
            s,
            "    {:#x}  {:<32} {}    ({:?})",
            i.ip(),
            bytes.join(" "),
            t,
            i.code()
        );
    }
    s
}

struct Tester {
    native: Native,
    emu: Emu,
    corrupt: bool,
}

impl Tester {
    fn outcomes(&mut self, code: &[u8], case: &Case) -> (Outcome, Outcome) {
        let n = run_native(&mut self.native, code, case);
        let mut e = self.emu.run(code, &case.input, &case.data, &case.stack);
        if self.corrupt {
            e.regs.gpr[0] ^= 1;
        }
        (n, e)
    }

    /// Find the first instruction after which the outcomes differ.
    fn culprit(&mut self, case: &Case) -> usize {
        for k in 1..case.insns.len() {
            let end = (case.insns[k].ip() - SEQ_START) as usize;
            let code = &case.code[..end];
            let (n, e) = self.outcomes(code, case);
            if !diff(&case.insns[..k], &n, &e).is_empty() {
                return k - 1;
            }
        }
        case.insns.len() - 1
    }
}

fn describe(
    case_no: u64,
    cfg: &Config,
    case: &Case,
    n: &Outcome,
    diffs: &[String],
    culprit: usize,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "--- mismatch in case {case_no} (seed {:#x}, class {}; reproduce with first_case={case_no} cases=1)",
        cfg.seed,
        case.class.name()
    );
    let _ = writeln!(s, "  code ({} bytes at {SEQ_START:#x}):", case.code.len());
    s.push_str(&disasm(&case.insns, &case.code));
    let _ = writeln!(
        s,
        "  first differing after instruction #{culprit} ({} of {} completed natively)",
        executed(&case.insns, n),
        case.insns.len()
    );
    let _ = writeln!(s, "  inputs:");
    for row in 0..4 {
        let mut line = String::from("   ");
        for r in row * 4..row * 4 + 4 {
            let _ = write!(line, " {:>3}={:#018x}", GPR_NAMES[r], case.input.gpr[r]);
        }
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(
        s,
        "    rflags={:#x} mxcsr={:#x}",
        case.input.rflags, case.input.mxcsr
    );
    let uses_xmm = case.class == Class::Sse;
    if uses_xmm {
        for r in 0..16 {
            let _ = writeln!(s, "    xmm{r}={:#034x}", case.input.xmm[r]);
        }
    }
    let mem: Vec<&Instruction> = case
        .insns
        .iter()
        .filter(|i| (0..i.op_count()).any(|k| i.op_kind(k) == iced_x86::OpKind::Memory))
        .collect();
    for i in mem {
        let addr = if i.memory_base() == iced_x86::Register::RIP
            || i.memory_base() == iced_x86::Register::EIP
        {
            None
        } else {
            let get = |r: iced_x86::Register| -> u64 {
                if r == iced_x86::Register::None {
                    0
                } else {
                    case.input.gpr[r.full_register().number() - iced_x86::Register::RAX.number()]
                }
            };
            let a = get(i.memory_base())
                .wrapping_add(get(i.memory_index()).wrapping_mul(i.memory_index_scale() as u64))
                .wrapping_add(i.memory_displacement64());
            Some(a)
        };
        if let Some(a) = addr {
            if (DATA_BASE..DATA_BASE + PAGE as u64 - 16).contains(&a) {
                let off = (a - DATA_BASE) as usize;
                let bytes: Vec<String> = case.data[off..off + 16]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let _ = writeln!(s, "    memory at {a:#x} (input regs): {}", bytes.join(" "));
            }
        }
    }
    let _ = writeln!(s, "  differences:");
    for d in diffs {
        let _ = writeln!(s, "    {d}");
    }
    s
}

/// Run `cfg.cases` random cases; see the module documentation.
pub fn run_cases(cfg: &Config) -> Report {
    let start = Instant::now();
    let mut report = Report::default();
    let native = match Native::new() {
        Ok(n) => n,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    let mut t = Tester {
        native,
        emu: Emu::new(cfg.engine, cfg.jit_no_bmi2),
        corrupt: cfg.corrupt_emulated_rax,
    };
    let mut gen = Generator::new();
    let classes = if cfg.classes.is_empty() {
        vec![Class::Int]
    } else {
        cfg.classes.clone()
    };
    for case_no in cfg.first_case..cfg.first_case + cfg.cases {
        let mut rng = Rng::new(cfg.seed ^ case_no.wrapping_mul(0xd1b5_4a32_d192_ed03));
        rng.next_u64();
        let class = classes[rng.below(classes.len() as u64) as usize];
        let (case, rejected) = gen.generate(&mut rng, class, cfg.max_insns_per_case);
        for (k, why) in [
            "operands not fillable",
            "not encodable",
            "reads a flag left undefined",
        ]
        .iter()
        .enumerate()
        {
            if rejected[k] > 0 {
                *report.skipped_by_reason.entry(why.to_string()).or_default() += rejected[k];
            }
        }
        *report
            .cases_by_class
            .entry(class.name().into())
            .or_default() += 1;
        let (n, e) = t.outcomes(&case.code, &case);
        if let Some((v, _, _)) = n.fault {
            *report.native_faults.entry(vector_name(v)).or_default() += 1;
        }
        report.cases += 1;
        let diffs = diff(&case.insns, &n, &e);
        if !diffs.is_empty() {
            report.mismatches += 1;
            let culprit = if case.insns.len() > 1 {
                t.culprit(&case)
            } else {
                0
            };
            let ci = &case.insns[culprit];
            let kind = match (n.fault, e.fault) {
                (None, Some((6, _, true))) => "unimplemented (#UD)",
                (a, b)
                    if a.map(|f| (fault_class(f.0), f.1)) != b.map(|f| (fault_class(f.0), f.1)) =>
                {
                    "fault"
                }
                _ => "state",
            };
            let lock = if ci.has_lock_prefix() { "lock " } else { "" };
            let key = format!("{kind}: {lock}{:?}", ci.code());
            let wanted = cfg.report_filter.as_deref().is_none_or(|f| key.contains(f));
            *report.mismatches_by_key.entry(key).or_default() += 1;
            if wanted && report.first_mismatches.len() < cfg.max_reported {
                report
                    .first_mismatches
                    .push(describe(case_no, cfg, &case, &n, &diffs, culprit));
            }
        }
        if cfg.progress && report.cases % 100_000 == 0 {
            eprintln!(
                "cpu self-test: {} cases, {} mismatches, {:.1}s",
                report.cases,
                report.mismatches,
                start.elapsed().as_secs_f64()
            );
        }
    }
    report.elapsed = start.elapsed();
    report
}
