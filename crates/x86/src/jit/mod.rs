//! Dynamic binary translation (the `jit` CPU engine).
//!
//! Tiering: the interpreter runs a block until it has been executed
//! [`Jit::threshold`] times, then [`translate`] turns it into host code in
//! a dual-mapped [`codebuf::CodeBuf`]. Translated blocks end in exits that
//! either return to the dispatcher ([`Cpu::run`]) or, for targets in the
//! same guest page, are patched to jump straight to the target's
//! translation (chaining). Blocks entered from the dispatcher start by checking the
//! write generation of its guest pages, so self-modifying code, module
//! loading and DMA into code pages make stale translations leave at once.
//! Translated code checks its budget (at most [`KICK_INTERVAL`]
//! instructions an entry) on every cycle it can run through; the
//! dispatcher then reads the vCPU's kick flag, which bounds how long
//! translated code runs before pending interrupts are noticed.

pub mod codebuf;
mod emit;
mod translate;
mod worker;

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::cpu::{Block, Cpu, DInsn};
use crate::fasthash::FastMap;
use codebuf::CodeBuf;
use translate::Stubs;
use worker::{Job, Outcome, SharedCode, Worker};

/// Which engine runs guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Engine {
    /// Interpreter only.
    Interp,
    /// Interpreter for cold code, translated host code for hot blocks.
    #[default]
    Jit,
}

/// Scratch area addressed by translated code (through host r15 = &Cpu).
#[repr(C)]
#[derive(Default)]
pub struct JitCtx {
    pub(crate) spill: [u64; 29],
    /// Guest arithmetic flags as LAHF (bits 8..15) and SETO (bit 0).
    pub(crate) fl: u64,
    /// What to add to `left` if the helper about to be called leaves
    /// translated code: the count then covers the instructions up to and
    /// including the helper's (see `Tx::call_helper`; one less if it
    /// faults). Blocks have at most 64 instructions. Zero after each
    /// helper, so that sites whose fix is zero store nothing.
    ///
    /// With its padding, the 8 bytes that once held the kick flag's
    /// address: without them `syscall` ran 13% slower (an effect of where
    /// hot fields fall in `Cpu`, unchanged by aligning this struct to a
    /// cache line).
    pub(crate) hfix: i8,
    _pad: [u8; 7],
    /// Minus the instructions left in the budget (counts up; see exits).
    pub(crate) left: u64,
    /// Address of the patchable jmp of the exit taken (0: not chainable).
    pub(crate) exit_site: u64,
    pub(crate) tlb_base: u64,
    /// Where the enter stub and the jump cache's hit jump to; on the jump
    /// cache's miss, the guest RIP of the indirect branch that missed (see
    /// [`Cpu::jit_wild_branch`]). More fields here slowed `syscall` by 13%
    /// to 20% in several sessions (where hot fields of `Cpu` fall).
    pub(crate) target: u64,
    pub(crate) arg: u64,
    pub(crate) helper: u64,
    pub(crate) jc_base: u64,
    /// PEXT masks for the flag-free TLB lookup: the TLB index bits, and
    /// (`m_page[k]`) the page number with the low `k` address bits, which
    /// must be zero for a naturally aligned access of `1 << k` bytes.
    pub(crate) m_idx: u64,
    pub(crate) m_page: [u64; 5],
    /// The low four address bits (16-byte alignment checks of groups).
    pub(crate) m_low4: u64,
    /// The bus's interrupt hint word (non-zero: an interrupt may wait).
    pub(crate) hint: u64,
    /// The TLB array `eslots` point into.
    pub(crate) eslots_for: u64,
    /// Event counts (`translate::EVENTS`, MATRYOSHKA_JIT_EVENTS=1).
    pub(crate) events: [u64; translate::EVENTS.len()],
    /// Last TLB entry hit by each group of memory access sites (see
    /// `translate::lookup_fast`): always a pointer into the current array.
    pub(crate) eslots: EntrySlots,
}

/// Entry slots for the translated memory access sites. Few: `jit_run`
/// refills them all whenever the privilege level picks the other TLB
/// array, which a system call does twice (256 slots made the syscall
/// workload 25% slower; hot loops showed no difference down to 32).
pub(crate) const ENTRY_SLOTS: usize = 64;

#[repr(C)]
pub(crate) struct EntrySlots(pub(crate) [u64; ENTRY_SLOTS]);

impl Default for EntrySlots {
    fn default() -> Self {
        EntrySlots([0; ENTRY_SLOTS])
    }
}

/// Stands in for a bus without an interrupt hint: always raised.
static NO_HINT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Jump cache entry: guest rip -> translated entry, valid while the TLB
/// maps the rip to physical page `ppn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct JcEntry {
    lin: u64,
    entry: u64,
    ppn: u64,
    _pad: u64,
}

const JC_EMPTY: JcEntry = JcEntry {
    lin: 0,
    entry: 0,
    ppn: u64::MAX,
    _pad: 0,
};

/// 64K entries (2 MiB): the kernel code behind fork+exec returns to and
/// calls far more targets than 4K entries held (1.9M misses, each a trip
/// through the dispatcher, per 1000 fork+exec).
pub(crate) const JC_SIZE: usize = 65536;

/// The most blocks a trace strings together (see [`Cpu::jit_trace`]).
const TRACE_PARTS: usize = 4;

/// A block queued for the translator. The `Rc`s keep it, and the trace
/// translated in its place if there is one (see [`Cpu::jit_trace`]), alive
/// until the job comes back.
struct Queued {
    block: Rc<Block>,
    trace: Option<Rc<Block>>,
    /// The epoch it was queued in (a flush makes its job stale).
    epoch: u64,
}

/// Translator statistics (`--stats`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct JitStats {
    pub translations: u64,
    pub translate_failures: u64,
    pub translate_ms: f64,
    pub code_bytes: u64,
    /// Entries into translated code from the dispatcher (cache hits).
    pub entries: u64,
    pub chain_patches: u64,
    /// Chains through a stub (the two blocks park different registers).
    pub chain_stubs: u64,
    /// Direct jumps to another page patched to their target's guard.
    pub far_chains: u64,
    pub helper_calls: u64,
    pub helper_exits: u64,
    pub flushes: u64,
    /// Static counts over all translations.
    pub native_insns: u64,
    pub helper_insns: u64,
    /// Groups whose check covers the passes of a loop while they stay in
    /// one page (see `translate::Stride`).
    pub strided_groups: u64,
    /// Loops counted in a 32-bit register whose 32-bit sums the
    /// translator followed (see `translate::Z32`).
    pub z32_loops: u64,
    /// Blocks translated as traces that follow a hot taken branch.
    pub traces: u64,
}

pub struct Jit {
    /// The code buffer, shared with the translator thread.
    code: SharedCode,
    /// Flushes so far (the buffer's epoch as this thread last set it).
    epoch: u64,
    /// The background translator (None: translate on the vCPU thread).
    worker: Option<Worker>,
    /// Blocks queued for the translator, by job id.
    pending: FastMap<u64, Queued>,
    next_job: u64,
    stubs: Stubs,
    stub_len: usize,
    /// Patchable exit sites: site -> (target rip, source physical page,
    /// the site's fast jmp, the source's parked-register key).
    chains: FastMap<u64, (u64, u64, u64, u64)>,
    /// Block entry of a single-page block -> (entry past the parking and
    /// the page checks, parked key).
    fast_entries: FastMap<u64, (u64, u64)>,
    /// Direct jumps to another page (see `translate::GuardTemplate`) whose
    /// target has no translation yet: target rip -> patchable sites.
    far_pending: FastMap<u64, Vec<u64>>,
    /// The latest translation of each guest rip: (physical page, entry).
    far_latest: FastMap<u64, (u64, u64)>,
    /// Guards: (target rip, physical page) -> (guard, its jmp to the
    /// target's entry, repatched when the target is translated again).
    far_guards: FastMap<(u64, u64), (u64, u64)>,
    /// Chain stubs' code by (source key, target key): the same for every
    /// chain between two parked sets, so assembled once (for the current
    /// `events` setting).
    stub_code: FastMap<(u64, u64), Vec<u8>>,
    /// The guards' code, assembled once (for the current `events`
    /// setting); None if it cannot be, and then there are no guards.
    guard: Option<translate::GuardTemplate>,
    /// Translated blocks, kept alive while their code may run (the code
    /// points at their decoded instructions).
    blocks: Vec<Rc<Block>>,
    jc: Box<[JcEntry]>,
    pub threshold: u32,
    pub stats: JitStats,
    /// Translations so far assume SSE may run natively (CR0.TS and CR0.EM
    /// clear, CR4.OSFXSR set); losing that flushes them.
    sse: bool,
    /// Translations assume the guest MXCSR masks all exceptions (SSE
    /// floating point runs natively under it).
    fp: bool,
    /// Helper calls by instruction (MATRYOSHKA_JIT_PROFILE=1).
    profile: Option<HashMap<iced_x86::Code, u64>>,
    /// The host has a fast PEXT (BMI2): memory accesses use the flag-free
    /// TLB lookup (MATRYOSHKA_JIT_NO_BMI2=1 forces the LAHF/SAHF one).
    bmi2: bool,
    /// Same-base accesses share one TLB check (see `translate::Group`);
    /// MATRYOSHKA_JIT_NO_GROUPS=1 turns that off (A/B measurements).
    groups: bool,
    /// Translated code counts events (MATRYOSHKA_JIT_EVENTS=1).
    events: bool,
    /// `perf` symbol map of translated blocks (MATRYOSHKA_JIT_PERFMAP=1
    /// writes /tmp/perf-PID.map, which `perf report` reads).
    perf_map: Option<std::io::BufWriter<std::fs::File>>,
    /// Disassemble the translation of the block at this guest RIP
    /// (MATRYOSHKA_JIT_DUMP=<hex>), read once.
    dump: Option<u64>,
}

/// BMI2 with a fast PEXT: everything with BMI2 except AMD before Zen 3
/// (family 0x19), where PEXT is microcoded and slow.
fn fast_pext() -> bool {
    if std::env::var_os("MATRYOSHKA_JIT_NO_BMI2").is_some() || !is_x86_feature_detected!("bmi2") {
        return false;
    }
    let (v, f) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
    let amd = v.ebx == 0x6874_7541; // "Auth"
    let family = ((f.eax >> 8) & 0xf) + ((f.eax >> 20) & 0xff);
    !amd || family >= 0x19
}

const CODE_SIZE: usize = 64 << 20;
/// `Block::jit_entry` of a block queued for the background translator.
const PENDING: u64 = 2;
/// Blocks queued at most: past this the translator is behind, and hot
/// blocks wait (interpreted) for a place in the queue.
const MAX_PENDING: usize = 256;
/// Interpreted executions before a block is translated.
const DEFAULT_THRESHOLD: u32 = 32;
/// The most guest instructions one entry into translated code may run.
/// Loops check only their budget each pass (see `Tx::count_add`), not the
/// kick flag: the dispatcher reads that flag when the budget runs out, so
/// a kick (a pending interrupt, a request from the VMM) is noticed within
/// this many instructions: about a millisecond at the slowest translated
/// code's speed. (Leaving and entering again costs a microsecond or more:
/// at 1 << 17, `int` ran 3% slower in alternating runs.)
pub const KICK_INTERVAL: u64 = 1 << 20;

fn fl_from(rflags: u64) -> u64 {
    ((rflags & 0xd5) << 8) | ((rflags >> 11) & 1)
}

fn fl_merge(rflags: u64, fl: u64) -> u64 {
    (rflags & !0x8d5) | ((fl >> 8) & 0xd5) | ((fl & 1) << 11)
}

impl Jit {
    /// A translator whose code lands near `near` (the vCPU's heap data)
    /// when the host allows, so that blocks read the write generations of
    /// their pages (guest RAM's metadata, on the same heap) RIP-relative.
    pub fn new(near: u64) -> std::io::Result<Jit> {
        Self::with_size_near(CODE_SIZE, near)
    }

    pub fn with_size(size: usize) -> std::io::Result<Jit> {
        Self::with_size_near(size, 0)
    }

    fn with_size_near(size: usize, near: u64) -> std::io::Result<Jit> {
        let events = std::env::var_os("MATRYOSHKA_JIT_EVENTS").is_some();
        let mut buf = CodeBuf::near(size, near)?;
        let at = buf.next_addr();
        let (code, stubs) = translate::build_stubs(at)
            .map_err(|e| std::io::Error::other(format!("assembling JIT stubs: {e}")))?;
        buf.push(&code)
            .ok_or_else(|| std::io::Error::other("JIT code buffer too small"))?;
        let mut jit = Jit {
            stub_len: buf.used(),
            code: Arc::new(std::sync::Mutex::new(worker::Code { buf, epoch: 0 })),
            epoch: 0,
            worker: None,
            pending: FastMap::default(),
            next_job: 0,
            stubs,
            chains: FastMap::default(),
            fast_entries: FastMap::default(),
            far_pending: FastMap::default(),
            far_latest: FastMap::default(),
            far_guards: FastMap::default(),
            guard: translate::GuardTemplate::new(events),
            stub_code: FastMap::default(),
            blocks: Vec::new(),
            jc: vec![JC_EMPTY; JC_SIZE].into_boxed_slice(),
            sse: false,
            fp: false,
            threshold: std::env::var("MATRYOSHKA_JIT_THRESHOLD")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_THRESHOLD),
            stats: JitStats::default(),
            profile: std::env::var_os("MATRYOSHKA_JIT_PROFILE").map(|_| HashMap::new()),
            bmi2: fast_pext(),
            groups: std::env::var_os("MATRYOSHKA_JIT_NO_GROUPS").is_none(),
            events,
            dump: std::env::var("MATRYOSHKA_JIT_DUMP")
                .ok()
                .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()),
            perf_map: std::env::var_os("MATRYOSHKA_JIT_PERFMAP").and_then(|_| {
                let path = format!("/tmp/perf-{}.map", std::process::id());
                std::fs::File::create(path)
                    .ok()
                    .map(std::io::BufWriter::new)
            }),
        };
        // The shared stubs, each up to the next one's start.
        let mut named = [
            (stubs.enter, "jit_enter"),
            (stubs.exit, "jit_exit"),
            (stubs.indirect, "jit_indirect"),
            (stubs.helper, "jit_helper_stub"),
        ];
        named.sort();
        let end = at + code.len() as u64;
        for (k, &(from, name)) in named.iter().enumerate() {
            let to = named.get(k + 1).map_or(end, |n| n.0);
            let len = to.saturating_sub(from) as usize;
            perf_name(&mut jit.perf_map, from, len, format_args!("{name}"));
        }
        Ok(jit)
    }

    /// Drop every translation (buffer full, or guest memory replaced).
    pub fn flush(&mut self) {
        // Queued blocks stay pending (the translator may be reading them)
        // until their jobs come back, to be dropped: they are of an old
        // epoch now.
        for b in self
            .blocks
            .iter()
            .chain(self.pending.values().map(|q| &q.block))
        {
            b.jit_entry.set(0);
            b.heat.store(0, Ordering::Relaxed);
        }
        self.blocks.clear();
        self.chains.clear();
        self.fast_entries.clear();
        self.far_pending.clear();
        self.far_latest.clear();
        self.far_guards.clear();
        self.jc.fill(JC_EMPTY);
        let mut c = worker::lock(&self.code);
        c.buf.reset(self.stub_len);
        c.epoch += 1;
        self.epoch = c.epoch;
        drop(c);
        self.stats.flushes += 1;
    }

    /// Translate on a background thread (true) or on the vCPU thread.
    /// Off by default: tests that count on a block being translated when
    /// it reaches the threshold need it off.
    pub fn set_background(&mut self, on: bool) -> std::io::Result<()> {
        if on && self.worker.is_none() {
            self.worker = Some(Worker::spawn(self.code.clone())?);
        } else if !on {
            self.drain_worker();
        }
        Ok(())
    }

    /// Stop the translator thread, dropping what it had not finished.
    fn drain_worker(&mut self) {
        // Joins the thread: no block is in use after this.
        self.worker.take();
        for (_, q) in self.pending.drain() {
            q.block.jit_entry.set(0);
        }
    }
}

impl Cpu {
    /// Select the execution engine.
    pub fn set_engine(&mut self, e: Engine) -> std::io::Result<()> {
        self.jit = match e {
            Engine::Interp => None,
            Engine::Jit => Some(Box::new(Jit::new(Arc::as_ptr(&self.kick) as u64)?)),
        };
        // Fixed for the life of the translator (the jump cache never moves).
        self.jctx.helper = jit_helper as *const () as u64;
        self.jctx.m_idx = ((crate::mmu::TLB_SIZE as u64) - 1) << 12;
        self.jctx.m_page = std::array::from_fn(|k| !0xfff | ((1 << k) - 1));
        self.jctx.m_low4 = 0xf;
        if let Some(j) = self.jit.as_ref() {
            self.jctx.jc_base = j.jc.as_ptr() as u64;
        }
        Ok(())
    }

    pub fn engine(&self) -> Engine {
        if self.jit.is_some() {
            Engine::Jit
        } else {
            Engine::Interp
        }
    }

    pub fn jit_stats(&self) -> Option<&JitStats> {
        self.jit.as_ref().map(|j| &j.stats)
    }

    /// The event counts of translated code, when it counts them
    /// (MATRYOSHKA_JIT_EVENTS=1): (what, how many).
    pub fn jit_events(&self) -> Option<Vec<(&'static str, u64)>> {
        self.jit.as_ref().filter(|j| j.events)?;
        Some(
            translate::EVENTS
                .iter()
                .copied()
                .zip(self.jctx.events)
                .collect(),
        )
    }

    /// Use the flag-free PEXT soft-TLB lookup (where the host has a fast
    /// PEXT) or always the LAHF/SAHF one. Drops existing translations.
    pub fn set_jit_fast_lookup(&mut self, on: bool) {
        if let Some(j) = self.jit.as_mut() {
            j.bmi2 = on && fast_pext();
            j.flush();
        }
    }

    /// Make translated code count events (see [`Self::jit_events`]), as
    /// MATRYOSHKA_JIT_EVENTS=1 does. Drops existing translations.
    pub fn set_jit_events(&mut self, on: bool) {
        if let Some(j) = self.jit.as_mut() {
            j.events = on;
            j.guard = translate::GuardTemplate::new(on);
            j.stub_code.clear();
            j.flush();
        }
    }

    /// Translate hot blocks on a background thread, so the vCPU keeps
    /// interpreting them meanwhile instead of waiting (see
    /// [`worker`]). Off by default.
    pub fn set_jit_background(&mut self, on: bool) -> std::io::Result<()> {
        match self.jit.as_mut() {
            Some(j) => j.set_background(on),
            None => Ok(()),
        }
    }

    /// Wait for the background translator to finish every queued block,
    /// and install the translations: tests and measurements that need to
    /// know what is translated call this between runs.
    pub fn jit_wait_idle(&mut self) {
        self.jit_collect(true);
    }

    /// Set the number of interpreted executions before a block is
    /// translated (0 and 1 translate on first use).
    pub fn set_jit_threshold(&mut self, n: u32) {
        if let Some(j) = self.jit.as_mut() {
            j.threshold = n;
        }
    }

    /// The most heat a block may start with: one interpreted run short of
    /// translation (see [`Cpu::jit_lookup`]).
    pub(crate) fn warm_heat(&self) -> u32 {
        self.jit.as_ref().map_or(0, |j| j.threshold / 2)
    }

    /// The translated entry for `block`, translating it once it is hot.
    pub(crate) fn jit_lookup(
        &mut self,
        block: &Rc<Block>,
        chain: Option<(u64, u64, u64)>,
    ) -> Option<u64> {
        use crate::state::{cr0, cr4};
        let sse = self.s.cr0 & (cr0::TS | cr0::EM) == 0 && self.s.cr4 & cr4::OSFXSR != 0;
        let fp = self.s.fpu.mxcsr & 0x1f80 == 0x1f80;
        if self.jit.as_ref()?.worker.is_some() {
            self.jit_collect(false);
        }
        let jit = self.jit.as_mut()?;
        if jit.sse != sse || jit.fp != fp {
            // Translations made without native SSE (or SSE floating point)
            // send those instructions to helpers, which is right in either
            // state: only losing a permission invalidates them.
            if jit.sse && !sse || jit.fp && !fp {
                jit.flush();
            }
            jit.sse = sse;
            jit.fp = fp;
        }
        let e = block.jit_entry.get();
        let entry = match e {
            0 => {
                let h = block.heat_up();
                let jit = self.jit.as_ref()?;
                if h < jit.threshold {
                    return None;
                }
                self.jit_translate(block)?
            }
            1 => return None,
            // Queued: still heating, which moves it up the queue.
            PENDING => {
                block.heat_up();
                return None;
            }
            e => e,
        };
        if let Some(jit) = self.jit.as_mut() {
            let lin = block.lin_pc;
            let i = ((lin ^ (lin >> 10)) as usize) & (JC_SIZE - 1);
            jit.jc[i] = JcEntry {
                lin,
                entry,
                ppn: block.phys_pc >> 12,
                _pad: 0,
            };
        }
        if let Some((site, target, ppn)) = chain {
            if block.lin_pc == target && block.phys_pc >> 12 == ppn {
                let jit = self.jit.as_mut()?;
                if let Some((_, _, fast_site, key)) = jit.chains.remove(&site) {
                    let mut c = worker::lock(&jit.code);
                    // Same page: past the target's parking and page
                    // check, directly when it parks the same registers,
                    // else through a stub that moves only the registers
                    // the two park differently (a full buffer: the full
                    // entry).
                    match jit.fast_entries.get(&entry) {
                        Some(&(ce, k)) if k == key => c.buf.patch_jmp(fast_site, ce),
                        Some(&(ce, k)) => {
                            if !jit.stub_code.contains_key(&(key, k)) {
                                if let Ok(code) = translate::chain_stub(key, k, jit.events) {
                                    jit.stub_code.insert((key, k), code);
                                }
                            }
                            let stub = jit
                                .stub_code
                                .get(&(key, k))
                                .and_then(|code| Some((c.buf.push_high(code)?, code.len())));
                            match stub {
                                Some((s, len)) => {
                                    c.buf.patch_jmp(s + len as u64 - 5, ce);
                                    c.buf.patch_jmp(fast_site, s);
                                    jit.stats.chain_stubs += 1;
                                    perf_name(
                                        &mut jit.perf_map,
                                        s,
                                        len,
                                        format_args!("chain_stub_{target:x}"),
                                    );
                                }
                                None => c.buf.patch_jmp(site, entry),
                            }
                        }
                        None => c.buf.patch_jmp(site, entry),
                    }
                    jit.stats.chain_patches += 1;
                }
            }
        }
        Some(entry)
    }

    /// Where the translation of `block` checks that its pages still hold
    /// the code it was made from: each page's generation counter and the
    /// generation decoded. None when a page has no counter (not RAM) or
    /// the block is marked as not to be translated.
    fn page_gens(&self, block: &Block) -> Option<Vec<(*const u32, u32)>> {
        block
            .pages
            .iter()
            .filter(|&&(ppn, _)| ppn != u64::MAX)
            .map(|&(ppn, gen)| Some((self.ram.page_gen_ptr(ppn)?, gen)).filter(|_| gen != u32::MAX))
            .collect()
    }

    fn jit_translate(&mut self, block: &Rc<Block>) -> Option<u64> {
        let jit = self.jit.as_ref()?;
        if jit.worker.is_some() && jit.pending.len() >= MAX_PENDING {
            // The translator is behind: ask again on a later run.
            return None;
        }
        let Some(gens) = self.page_gens(block) else {
            block.jit_entry.set(1);
            return None;
        };
        let trace = self.jit_trace(block);
        let jit = self.jit.as_mut()?;
        let id = jit.next_job;
        jit.next_job += 1;
        let job = Job {
            id,
            block: Rc::as_ptr(trace.as_ref().unwrap_or(block)),
            heat: &block.heat,
            epoch: jit.epoch,
            gens,
            stubs: jit.stubs,
            opts: translate::Opts {
                sse: jit.sse,
                fp: jit.fp,
                bmi2: jit.bmi2,
                groups: jit.groups,
                events: jit.events,
            },
        };
        if let Some(w) = jit.worker.as_ref() {
            if w.send(job) {
                let q = Queued {
                    block: block.clone(),
                    trace,
                    epoch: jit.epoch,
                };
                jit.pending.insert(id, q);
                block.jit_entry.set(PENDING);
                return None;
            }
            // The thread is gone: translate here from now on.
            jit.drain_worker();
            return None;
        }
        let mut f = worker::produce(&jit.code, &job);
        if matches!(f.outcome, Outcome::Full) {
            jit.stats.translate_ms += f.ms;
            jit.flush();
            f = worker::produce(&jit.code, &job);
        }
        jit.stats.translate_ms += f.ms;
        jit.install(block, trace.as_ref(), f.outcome)
    }

    /// A trace for hot `block` when its interpreted runs mostly left it by
    /// one taken conditional branch forward within its page: the block up
    /// to that branch, then the block cached at its target (decoded from
    /// the same page and generation), and so on while each of those is
    /// mostly left the same way (up to [`TRACE_PARTS`] blocks), up to and
    /// including a branch back to the block's start. Translated, those
    /// branches go on when taken and leave when not: a loop whose hot path
    /// skips rare cases (`if` without `else`) becomes one block that loops
    /// on itself instead of blocks that chain through side exits every
    /// pass.
    fn jit_trace(&self, block: &Block) -> Option<Rc<Block>> {
        use crate::cpu::{ExitProfile, MAX_BLOCK_INSNS, SIDE_EXIT_REGS};
        let single = |b: &Block| b.pages[1].0 == u64::MAX;
        if block.bitness != 64 || !single(block) {
            return None;
        }
        // The branch `b`'s runs mostly take, and the block at its target.
        let follow = |b: &Block| {
            let k = b.exits.hot(b.heat.load(Ordering::Relaxed))?;
            let j = &b.insns.get(k)?.insn;
            let t = j.near_branch_target();
            if !(crate::exec::side_exit(j) && t > j.next_ip() && (t ^ block.lin_pc) >> 12 == 0) {
                return None;
            }
            let phys = (block.phys_pc & !0xfff) | (t & 0xfff);
            let to = self.blocks.get(&(phys, t, 64))?;
            (to.pages == block.pages && single(to)).then_some((k, to))
        };
        let back = |d: &DInsn| translate::direct_target(&d.insn) == Some(block.lin_pc);
        let (k, mut next) = follow(block)?;
        let mut insns: Vec<DInsn> = block.insns[..=k].to_vec();
        for part in 2..=TRACE_PARTS {
            let b = &next.insns;
            // (A decoded block may already be that long.)
            let room = MAX_BLOCK_INSNS.saturating_sub(1 + insns.len());
            // Up to the loop's back edge, if it has one.
            let n = match b[..b.len().min(room)].iter().position(back) {
                Some(e) => e + 1,
                None => b.len().min(room),
            };
            match follow(next) {
                Some((k, to)) if k + 1 < n && part < TRACE_PARTS => {
                    insns.extend_from_slice(&b[..=k]);
                    next = to;
                }
                _ => {
                    insns.extend_from_slice(&b[..n]);
                    break;
                }
            }
        }
        let named = insns
            .iter()
            .fold(0u16, |m, d| m | crate::exec::named_gprs(&d.insn));
        if insns.len() == k + 1 || named.count_ones() > SIDE_EXIT_REGS {
            return None;
        }
        Some(Rc::new(Block {
            lin_pc: block.lin_pc,
            phys_pc: block.phys_pc,
            bitness: 64,
            pages: block.pages,
            insns: insns.into_boxed_slice(),
            jit_entry: Default::default(),
            heat: Default::default(),
            exits: ExitProfile::default(),
        }))
    }

    /// Install the translations the background translator has finished;
    /// with `wait`, every queued one (waiting for the translator).
    fn jit_collect(&mut self, wait: bool) {
        let Some(jit) = self.jit.as_mut() else {
            return;
        };
        loop {
            let Some(w) = jit.worker.as_ref() else {
                return;
            };
            let f = match w.receive(wait && !jit.pending.is_empty()) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(()) => {
                    // The thread is gone.
                    jit.drain_worker();
                    return;
                }
            };
            jit.stats.translate_ms += f.ms;
            let Some(Queued {
                block,
                trace,
                epoch,
            }) = jit.pending.remove(&f.id)
            else {
                continue;
            };
            if epoch != jit.epoch {
                // Queued before a flush (which reset the block).
                continue;
            }
            if matches!(f.outcome, Outcome::Full) {
                // No longer pending, so the flush would not reset it.
                block.jit_entry.set(0);
                block.heat.store(0, Ordering::Relaxed);
                jit.flush();
                continue;
            }
            // The block is no longer cached (its page was written, or it
            // was evicted): nothing would run its code.
            if Rc::strong_count(&block) == 1 {
                continue;
            }
            jit.install(&block, trace.as_ref(), f.outcome);
        }
    }
}

impl Jit {
    /// Make a finished translation of `block` runnable; the block's entry.
    /// `trace`: the trace translated in the block's place (its code points
    /// at the trace's instructions).
    fn install(
        &mut self,
        block: &Rc<Block>,
        trace: Option<&Rc<Block>>,
        outcome: Outcome,
    ) -> Option<u64> {
        let t = match outcome {
            Outcome::Done(t) => t,
            Outcome::Full => {
                // No room even in an empty buffer.
                block.jit_entry.set(1);
                return None;
            }
            // (Only from the translator thread, whose stale jobs are
            // dropped before they get here.)
            Outcome::Stale => return None,
            Outcome::Failed(e) => {
                tracing::debug!(rip = format_args!("{:#x}", block.lin_pc), error = %e, "block not translated");
                self.stats.translate_failures += 1;
                block.jit_entry.set(1);
                return None;
            }
        };
        if self.dump == Some(block.lin_pc) {
            use iced_x86::Formatter;
            let mut d = iced_x86::Decoder::with_ip(64, &t.code, t.entry, 0);
            let mut f = iced_x86::IntelFormatter::new();
            for i in &mut d {
                let mut out = String::new();
                f.format(&i, &mut out);
                eprintln!("{:x} {out}", i.ip());
            }
        }
        perf_name(
            &mut self.perf_map,
            t.entry,
            t.code.len(),
            format_args!("guest_{:x}", block.lin_pc),
        );
        let src_ppn = block.phys_pc >> 12;
        for c in t.chains.iter() {
            self.chains
                .insert(c.site, (c.target, src_ppn, c.fast_site, t.park_key));
        }
        if let Some(ce) = t.count_entry {
            self.fast_entries.insert(t.entry, (ce, t.park_key));
        }
        self.link_far(block, &t);
        self.stats.translations += 1;
        self.stats.code_bytes += t.code.len() as u64;
        self.stats.native_insns += t.native as u64;
        self.stats.helper_insns += t.helpers as u64;
        self.stats.strided_groups += t.strided as u64;
        self.stats.z32_loops += t.z32 as u64;
        self.blocks.push(block.clone());
        if let Some(tr) = trace {
            self.blocks.push(tr.clone());
            self.stats.traces += 1;
        }
        block.jit_entry.set(t.entry);
        Some(t.entry)
    }
}

/// Name `len` bytes of code at `at` in the `perf` symbol map, if one is
/// being written (see [`Jit::perf_map`]).
fn perf_name(
    map: &mut Option<std::io::BufWriter<std::fs::File>>,
    at: u64,
    len: usize,
    name: std::fmt::Arguments,
) {
    if let Some(f) = map.as_mut() {
        use std::io::Write;
        let _ = writeln!(f, "{at:x} {len:x} {name}");
    }
}

impl Jit {
    /// Direct jumps between pages: patch this translation's far sites to
    /// the guards of targets already translated (the others wait in
    /// `far_pending`), and the sites waiting for this block to its guard;
    /// a guard of this block from an earlier translation (its page was
    /// written since) jumps to this one from now on.
    fn link_far(&mut self, block: &Block, t: &translate::Translation) {
        let (lin, ppn) = (block.lin_pc, block.phys_pc >> 12);
        let code = self.code.clone();
        let mut c = worker::lock(&code);
        self.far_latest.insert(lin, (ppn, t.entry));
        if let Some(&(_, to_entry)) = self.far_guards.get(&(lin, ppn)) {
            c.buf.patch_jmp(to_entry, t.entry);
        }
        if let Some(sites) = self.far_pending.remove(&lin) {
            if let Some(g) = self.far_guard(&mut c, lin, ppn, t.entry) {
                for s in sites {
                    c.buf.patch_jmp(s, g);
                    self.stats.far_chains += 1;
                }
            }
        }
        for &(site, target) in t.far.iter() {
            match self.far_latest.get(&target) {
                Some(&(p, e)) => {
                    if let Some(g) = self.far_guard(&mut c, target, p, e) {
                        c.buf.patch_jmp(site, g);
                        self.stats.far_chains += 1;
                    }
                }
                None => self.far_pending.entry(target).or_default().push(site),
            }
        }
    }

    /// The guard for `target` in physical page `ppn` (made on first use,
    /// at the top of the buffer); None when the buffer is full.
    fn far_guard(
        &mut self,
        c: &mut worker::Code,
        target: u64,
        ppn: u64,
        entry: u64,
    ) -> Option<u64> {
        if let Some(&(g, _)) = self.far_guards.get(&(target, ppn)) {
            return Some(g);
        }
        let p = i32::try_from(ppn).ok()?;
        let t = self.guard.as_ref()?;
        let (code, to_entry, to_jc) = (t.instance(target, p), t.to_entry as u64, t.to_jc as u64);
        let g = c.buf.push_high(&code)?;
        perf_name(
            &mut self.perf_map,
            g,
            code.len(),
            format_args!("guard_{target:x}"),
        );
        c.buf.patch_jmp(g + to_entry, entry);
        c.buf.patch_jmp(g + to_jc, self.stubs.indirect);
        self.far_guards.insert((target, ppn), (g, g + to_entry));
        Some(g)
    }
}

impl Cpu {
    /// Run translated code from `entry` until it exits; returns the chain
    /// request for the next block, if the exit was chainable.
    pub(crate) fn jit_run(&mut self, entry: u64, budget: u64) -> Option<(u64, u64, u64)> {
        let enter = self.jit.as_ref()?.stubs.enter;
        self.jctx.fl = fl_from(self.s.rflags);
        self.jctx.tlb_base = self.tlb.e[self.user_mode() as usize].as_ptr() as u64;
        if self.jctx.eslots_for != self.jctx.tlb_base {
            // Translated code trusts every slot to point into this array.
            self.jctx.eslots.0 = [self.jctx.tlb_base; ENTRY_SLOTS];
            self.jctx.eslots_for = self.jctx.tlb_base;
        }
        let left0 = (budget.clamp(1, KICK_INTERVAL) as i64).wrapping_neg() as u64;
        self.jctx.left = left0;
        self.jctx.exit_site = 0;
        // The bus (owned by this Cpu) keeps the word alive while the
        // translated code runs.
        self.jctx.hint = self.bus.irq_hint().unwrap_or(&NO_HINT) as *const _ as u64;
        // SAFETY: `enter` is the stub assembled by build_stubs in the
        // executable view; it saves the host callee-saved registers, runs
        // translated code that only touches this Cpu (via r15), guest RAM
        // through TLB host pointers, and the helper, and returns normally.
        // Translated code runs under the guest's MXCSR (native SSE floating
        // point); it is read back afterwards for the sticky exception flags.
        let host_mxcsr = get_mxcsr();
        // LDMXCSR is slow (serialising on some hosts): skip it when the
        // guest runs with the host's value, as it usually does.
        if self.s.fpu.mxcsr != host_mxcsr {
            set_mxcsr(self.s.fpu.mxcsr);
        }
        unsafe {
            let f: extern "C" fn(*mut Cpu, u64) = std::mem::transmute(enter as usize);
            f(self as *mut Cpu, entry);
        }
        self.s.fpu.mxcsr = get_mxcsr();
        if self.s.fpu.mxcsr != host_mxcsr {
            set_mxcsr(host_mxcsr);
        }
        self.s.rflags = fl_merge(self.s.rflags, self.jctx.fl);
        self.stats.instructions += self.jctx.left.wrapping_sub(left0);
        let site = self.jctx.exit_site;
        let jit = self.jit.as_mut()?;
        jit.stats.entries += 1;
        if site != 0 {
            if let Some(&(target, ppn, _, _)) = jit.chains.get(&site) {
                if self.s.rip == target {
                    return Some((site, target, ppn));
                }
            }
        }
        None
    }

    /// Translated code took an indirect branch to a non-canonical address
    /// (`s.rip`): it left through the jump cache with the branch done
    /// (RSP popped or pushed, the instruction counted), but the branch must
    /// fault itself, with its own RIP and the registers from before it, as
    /// it does in the interpreter and on the host. Undo it and let the
    /// interpreter run it, when the branch at `jctx.target` is indirect and
    /// goes to `s.rip` from the state before it (else leave all as it is).
    /// A CALL's return address stays written below the stack pointer.
    pub(crate) fn jit_wild_branch(&mut self) {
        use iced_x86::Code;
        let (target, rsp) = (self.s.rip, self.s.gpr[4]);
        self.s.rip = self.jctx.target;
        let Ok(block) = self.fetch_block() else {
            self.s.rip = target;
            return;
        };
        let i = block.insns[0].insn;
        let undo = match i.code() {
            Code::Retnq => Some(8),
            Code::Retnq_imm16 => Some(8 + i.immediate16() as u64),
            Code::Call_rm64 => Some(8u64.wrapping_neg()),
            Code::Jmp_rm64 => Some(0),
            _ => None,
        };
        let Some(undo) = undo else {
            self.s.rip = target;
            return;
        };
        self.s.gpr[4] = rsp.wrapping_sub(undo);
        let again = match i.code() {
            Code::Retnq | Code::Retnq_imm16 => self.peek(8, 0),
            _ => self.read_op(&i, 0),
        };
        if again != Ok(target) {
            (self.s.rip, self.s.gpr[4]) = (target, rsp);
            return;
        }
        self.stats.instructions = self.stats.instructions.saturating_sub(1);
        if let Some(f) = self.step() {
            self.raise(f);
        }
    }
}

/// Called from translated code to run one instruction with the interpreter.
/// Returns non-zero when translated code must leave (control transfer,
/// exception, I/O, or state the translation depends on changed).
extern "C" fn jit_helper(cpu: *mut Cpu, di: *const DInsn) -> u64 {
    // SAFETY: translated code passes the Cpu it was entered with (jit_run
    // holds `&mut Cpu` for the whole call) and a DInsn inside a Block that
    // Jit::blocks keeps alive while its translation exists.
    let (cpu, di) = unsafe { (&mut *cpu, &*di) };
    let mxcsr = get_mxcsr();
    cpu.s.fpu.mxcsr = mxcsr;
    cpu.s.rflags = fl_merge(cpu.s.rflags, cpu.jctx.fl);
    cpu.s.rip = di.insn.ip();
    cpu.next_rip = di.insn.next_ip();
    cpu.io_touched = false;
    // An inline STI leaves its shadow set until the dispatcher next runs;
    // only a shadow this instruction starts is a reason to leave.
    let shadow0 = cpu.s.irq_shadow;
    let mut faulted = false;
    let exit = match (di.handler)(cpu, &di.insn) {
        Ok(()) => {
            cpu.s.rip = cpu.next_rip;
            cpu.end_block
                || cpu.next_rip != di.insn.next_ip()
                || cpu.io_touched
                || cpu.s.irq_shadow && !shadow0
                || cpu.s.halted
                || cpu.shutdown.is_some()
                // Translations of the refetch-only enders leave through
                // the next block's checks (`exit_far`): no need to stop.
                || crate::exec::ends_block(&di.insn) && !crate::exec::refetch_only(&di.insn)
                // MXCSR may now unmask exceptions: the dispatcher decides
                // whether SSE floating point may still run natively.
                || di.insn.mnemonic() == iced_x86::Mnemonic::Ldmxcsr
        }
        Err(f) => {
            cpu.raise(f);
            faulted = true;
            true
        }
    };
    if exit {
        // The block's count covers instructions after this one (or none of
        // them yet): make it cover exactly those that ran.
        let ran = cpu.jctx.hfix as i64 - faulted as i64;
        cpu.jctx.left = cpu.jctx.left.wrapping_add(ran as u64);
    }
    // Sites whose fix is zero store nothing.
    cpu.jctx.hfix = 0;
    cpu.end_block = false;
    cpu.jctx.fl = fl_from(cpu.s.rflags);
    if cpu.s.fpu.mxcsr != mxcsr {
        set_mxcsr(cpu.s.fpu.mxcsr);
    }
    cpu.jctx.exit_site = 0;
    if let Some(j) = cpu.jit.as_mut() {
        j.stats.helper_calls += 1;
        j.stats.helper_exits += exit as u64;
        if let Some(p) = j.profile.as_mut() {
            *p.entry(di.insn.code()).or_default() += 1;
        }
    }
    exit as u64
}

impl Drop for Jit {
    fn drop(&mut self) {
        // Before the queued blocks go.
        self.drain_worker();
        if let Some(p) = self.profile.take() {
            let mut v: Vec<_> = p.into_iter().collect();
            v.sort_by_key(|e| std::cmp::Reverse(e.1));
            eprintln!("[matryoshka] jit helper calls by instruction:\r");
            for (code, n) in v.iter().take(40) {
                eprintln!("  {n:>12} {code:?}\r");
            }
        }
    }
}

fn get_mxcsr() -> u32 {
    let mut v: u32 = 0;
    // SAFETY: STMXCSR stores 4 bytes to a valid local.
    unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack)) };
    v
}

fn set_mxcsr(v: u32) {
    // Reserved bits would #GP; the guest value was validated by LDMXCSR /
    // FXRSTOR emulation, but mask anyway.
    let v = v & 0xffff;
    // SAFETY: LDMXCSR loads 4 bytes from a valid local.
    unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &v, options(nostack)) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{asm64, cpu64};
    use iced_x86::code_asm::*;

    /// rax = 1 + 2 + ... + 100000, then HLT; translated in the background
    /// (the loop runs long enough for its translation to arrive).
    fn summing_cpu() -> Cpu {
        let code = asm64(0x10000, |a| {
            let mut top = a.create_label();
            a.mov(ecx, 100_000).unwrap();
            a.set_label(&mut top).unwrap();
            a.add(rax, rcx).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        let mut cpu = cpu64(16 << 20, &code, 0x10000);
        cpu.set_engine(Engine::Jit).unwrap();
        cpu.set_jit_background(true).unwrap();
        cpu.set_jit_threshold(1);
        cpu
    }

    fn jit(cpu: &Cpu) -> &Jit {
        cpu.jit.as_ref().expect("jit engine")
    }

    /// Runs of the one-block loop at 0x10000 until its translations reach
    /// `n`.
    fn runs_until_translated(cpu: &mut Cpu, n: u64) -> u32 {
        let mut runs = 0;
        while jit(cpu).stats.translations < n {
            cpu.run(2);
            runs += 1;
            assert!(runs < 100, "never translated");
        }
        runs
    }

    /// A block made stale by a write elsewhere in its page (Linux patches
    /// kernel text while it boots) and decoded again to the same
    /// instructions keeps its heat: it is translated again after half
    /// the threshold's runs. A block whose own bytes changed starts cold.
    #[test]
    fn stale_blocks_that_decode_the_same_keep_their_heat() {
        let code = asm64(0x10000, |a| {
            let mut top = a.create_label();
            a.set_label(&mut top).unwrap();
            a.inc(rax).unwrap();
            a.jmp(top).unwrap();
        });
        let mut cpu = cpu64(16 << 20, &code, 0x10000);
        cpu.set_engine(Engine::Jit).unwrap();
        cpu.set_jit_threshold(8);
        assert_eq!(runs_until_translated(&mut cpu, 1), 8);
        // Elsewhere in the page: the same instructions, warm.
        cpu.phys_write(0x10800, &[0x90]);
        assert_eq!(runs_until_translated(&mut cpu, 2), 4);
        // `inc rax` (48 ff c0) becomes `inc rcx` (48 ff c1): cold.
        cpu.phys_write(0x10002, &[0xc1]);
        assert_eq!(runs_until_translated(&mut cpu, 3), 8);
        let before = cpu.s.gpr[1];
        cpu.run(20);
        assert!(cpu.s.gpr[1] > before, "the patched code runs");
    }

    #[test]
    fn background_translations_are_installed_and_run() {
        let mut cpu = summing_cpu();
        cpu.run(1);
        assert!(!jit(&cpu).pending.is_empty(), "the first block is queued");
        cpu.jit_wait_idle();
        assert_eq!(jit(&cpu).stats.translations, 1);
        // Queues the loop's block, which then runs translated.
        cpu.run(10);
        cpu.jit_wait_idle();
        assert_eq!(cpu.run(1_000_000), crate::Exit::Halted);
        assert_eq!(cpu.s.gpr[0], 5_000_050_000);
        let s = &jit(&cpu).stats;
        assert!(s.translations >= 2 && s.entries > 0, "{s:?}");
    }

    /// A translation queued before a flush is written for the old buffer
    /// (or over code of the new one): it must never be installed. Both
    /// kinds of flush: of the translations alone (a full buffer, lost SSE
    /// permission), where the decoded block stays cached, and of all
    /// decoded code.
    #[test]
    fn a_flush_drops_translations_queued_before_it() {
        for all_code in [false, true] {
            let mut cpu = summing_cpu();
            cpu.run(1);
            assert!(!jit(&cpu).pending.is_empty(), "the first block is queued");
            if all_code {
                cpu.flush_code();
            } else {
                cpu.jit.as_mut().unwrap().flush();
            }
            cpu.jit_wait_idle();
            let j = jit(&cpu);
            assert_eq!(j.stats.translations, 0, "{:?}", j.stats);
            assert!(j.blocks.is_empty());
            // The blocks are queued again, and the guest gets its answer.
            cpu.run(10);
            cpu.jit_wait_idle();
            assert_eq!(cpu.run(1_000_000), crate::Exit::Halted);
            assert_eq!(cpu.s.gpr[0], 5_000_050_000);
            assert!(jit(&cpu).stats.translations > 0);
        }
    }

    /// A translation that finds the buffer full makes the vCPU flush it;
    /// that block and the others are queued again. Here 24 blocks that
    /// run in turn do not fit in a small buffer, so it fills again and
    /// again, and blocks keep being translated: none is left waiting for
    /// a job that will never come back.
    #[test]
    fn a_full_buffer_in_the_background_flushes_and_translates_again() {
        let code = asm64(0x10000, |a| {
            let mut top = a.create_label();
            a.mov(ecx, 20_000).unwrap();
            a.set_label(&mut top).unwrap();
            for k in 1..=24 {
                let mut next = a.create_label();
                a.add(rax, k).unwrap();
                // Never taken (rcx counts down from 20 000), and ends the
                // block (a direct JMP forward would be followed).
                a.jrcxz(next).unwrap();
                a.set_label(&mut next).unwrap();
            }
            a.dec(ecx).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        let mut cpu = cpu64(16 << 20, &code, 0x10000);
        cpu.set_engine(Engine::Jit).unwrap();
        let small = Jit::with_size(4096).unwrap();
        cpu.jctx.jc_base = small.jc.as_ptr() as u64;
        cpu.jit = Some(Box::new(small));
        cpu.set_jit_background(true).unwrap();
        cpu.set_jit_threshold(1);
        let mut translated = Vec::new();
        let exit = loop {
            let exit = cpu.run(5_000);
            cpu.jit_wait_idle();
            translated.push(jit(&cpu).stats.translations);
            if exit != crate::Exit::Budget {
                break exit;
            }
        };
        assert_eq!(exit, crate::Exit::Halted);
        assert_eq!(cpu.s.gpr[0], 20_000 * 300);
        let s = &jit(&cpu).stats;
        assert!(s.flushes > 10, "{s:?}");
        let n = translated.len();
        assert!(
            translated[n - 1] > translated[n / 2],
            "translations stopped: {translated:?}"
        );
    }
}

/// What [`bench_translate`] measured.
#[derive(Debug, Default)]
pub struct TranslateBench {
    /// Blocks translated (each once per round).
    pub blocks: usize,
    /// Of those, blocks the translator refused.
    pub failed: usize,
    /// Guest instructions in the translated blocks.
    pub guest_insns: usize,
    /// Host code produced by one round.
    pub code_bytes: usize,
    /// The fastest round's time per block.
    pub ns_per_block: f64,
    /// A hash of the code one round produced: equal before and after a
    /// change that should only make the translator faster.
    pub code_hash: u64,
}

/// Translation throughput (`matryoshka bench translate`): up to `max`
/// blocks of 64-bit `code` placed at `base` (one at the start and one
/// after each control transfer, as a linear walk finds them), each
/// translated once per round; the fastest of `rounds` rounds. The code is
/// produced, never run: it measures the translator alone, without the
/// background thread's scheduling, which swings a boot's figure.
pub fn bench_translate(code: &[u8], base: u64, max: usize, rounds: usize) -> TranslateBench {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    let ram_size = (base + code.len() as u64 + (16 << 20)).next_multiple_of(1 << 21);
    let mut cpu = crate::testutil::cpu64(ram_size, code, base);
    let mut starts = vec![base];
    let mut d = Decoder::with_ip(64, code, base, DecoderOptions::NONE);
    while d.can_decode() && starts.len() < max {
        let i = d.decode();
        if !i.is_invalid() && i.flow_control() != FlowControl::Next {
            starts.push(i.next_ip());
        }
    }
    let mut blocks = Vec::new();
    for rip in starts {
        cpu.s.rip = rip;
        let Ok(b) = cpu.fetch_block() else { continue };
        if let Some(gens) = cpu.page_gens(&b) {
            // Generation addresses are only embedded in the code: fixed
            // ones (by page) keep the code hash independent of the heap.
            let gens = gens
                .iter()
                .zip(b.pages)
                .map(|(&(_, g), (ppn, _))| ((0x200_0000_0000 + ppn * 4) as *const u32, g))
                .collect::<Vec<_>>();
            blocks.push((b, gens));
        }
    }
    // Stub addresses and a code address that rel32 reaches, as in a
    // real buffer; nothing is executed.
    let stubs = translate::Stubs {
        enter: 0x1000,
        exit: 0x1100,
        indirect: 0x1200,
        helper: 0x1300,
    };
    let opts = translate::Opts {
        sse: true,
        fp: true,
        bmi2: fast_pext(),
        groups: true,
        events: false,
    };
    let mut out = TranslateBench {
        blocks: blocks.len(),
        ns_per_block: f64::INFINITY,
        ..TranslateBench::default()
    };
    for _ in 0..rounds.max(1) {
        let (mut failed, mut insns, mut bytes) = (0, 0, 0);
        let mut hash = std::hash::DefaultHasher::new();
        let t = std::time::Instant::now();
        for (b, gens) in blocks.iter() {
            match translate::translate(b, gens, stubs, 0x100_0000, opts) {
                Ok(t) => {
                    insns += b.insns.len();
                    bytes += t.code.len();
                    std::hash::Hash::hash(&t.code, &mut hash);
                }
                Err(_) => failed += 1,
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / blocks.len().max(1) as f64;
        out.ns_per_block = out.ns_per_block.min(ns);
        (out.failed, out.guest_insns, out.code_bytes) = (failed, insns, bytes);
        out.code_hash = std::hash::Hasher::finish(&hash);
    }
    out
}
