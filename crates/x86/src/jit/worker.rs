//! Background translation: a host thread per vCPU that turns hot blocks
//! into host code while the vCPU goes on interpreting them, so that
//! translation (about 22 µs a block, 0.3 s of the default guest's boot)
//! leaves the vCPU's critical path.
//!
//! The code buffer is shared: the translator appends at its end, and the
//! vCPU thread patches chain sites in code it has installed and resets the
//! buffer on a flush. A flush bumps the buffer's epoch; a translation
//! assembled for one epoch is only written if the epoch is still current,
//! and only installed by the vCPU if no flush came in between.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::codebuf::CodeBuf;
use super::translate::{self, Opts, Stubs, Translation};
use crate::cpu::Block;

/// The code buffer and the number of flushes it has seen.
pub(super) struct Code {
    pub buf: CodeBuf,
    pub epoch: u64,
}

pub(super) type SharedCode = Arc<Mutex<Code>>;

/// Lock the code buffer. A panic while it was held (only in `produce`,
/// between two plain field updates) leaves it consistent.
pub(super) fn lock(c: &Mutex<Code>) -> MutexGuard<'_, Code> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// One block to translate.
pub(super) struct Job {
    pub id: u64,
    /// The instructions to translate: the block's, or a trace's.
    pub block: *const Block,
    /// The block's heat (a trace has none of its own).
    pub heat: *const std::sync::atomic::AtomicU32,
    /// The buffer's epoch when the job was queued: after a flush the vCPU
    /// drops the job's result, so it is not translated at all (its code
    /// would take room in the emptied buffer from current jobs).
    pub epoch: u64,
    pub gens: Vec<(*const u32, u32)>,
    pub stubs: Stubs,
    pub opts: Opts,
}

// SAFETY: the vCPU thread keeps the block (and the trace, when `block`
// is one) alive (`Rc`s in `Jit::pending`) until the job's `Finished`
// comes back, so both pointers stay valid while the translator uses them.
// The translator reads only the fields that never change after decoding
// (pc, bitness, pages, insns) and the atomic heat, not the `Cell`s the
// vCPU thread updates, and never touches the `Rc`s' counts.
// The page-generation pointers are only embedded in the generated code.
unsafe impl Send for Job {}

pub(super) enum Outcome {
    /// Written to the buffer (in the epoch the job was queued in, when
    /// the vCPU still has it pending: only the vCPU flushes).
    Done(Translation),
    Failed(String),
    /// The buffer has no room (the vCPU thread must flush it).
    Full,
    /// Queued before a flush: not translated.
    Stale,
}

pub(super) struct Finished {
    pub id: u64,
    pub outcome: Outcome,
    pub ms: f64,
}

/// Translate `job` and append the code to the buffer, assembling it for
/// the address where it will land. The buffer is not locked while
/// assembling; if a flush moved its end meanwhile, assemble again.
pub(super) fn produce(code: &Mutex<Code>, job: &Job) -> Finished {
    let t0 = Instant::now();
    // SAFETY: see `Job`: the block outlives the job.
    let block = unsafe { &*job.block };
    let outcome = loop {
        let (at, epoch) = {
            let c = lock(code);
            (c.buf.next_addr(), c.epoch)
        };
        if epoch != job.epoch {
            break Outcome::Stale;
        }
        let t = match translate::translate(block, &job.gens, job.stubs, at, job.opts) {
            Ok(t) => t,
            Err(e) => break Outcome::Failed(e.to_string()),
        };
        let mut c = lock(code);
        if c.epoch != epoch || c.buf.next_addr() != at {
            continue;
        }
        break match c.buf.push(&t.code) {
            Some(_) => Outcome::Done(t),
            None => Outcome::Full,
        };
    };
    Finished {
        id: job.id,
        outcome,
        ms: t0.elapsed().as_secs_f64() * 1e3,
    }
}

/// The next job to translate: of those queued, the block the interpreter
/// has run most often (the newest among equals). In a boot, half of the
/// interpreted instructions were blocks waiting in a first-come queue
/// behind blocks requested earlier that had gone cold. None once the
/// vCPU side hangs up.
fn next_job(rx: &Receiver<Job>, queue: &mut Vec<Job>) -> Option<Job> {
    if queue.is_empty() {
        queue.push(wait_job(rx)?);
    }
    loop {
        match rx.try_recv() {
            Ok(j) => queue.push(j),
            Err(std::sync::mpsc::TryRecvError::Empty) => break,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
        }
    }
    // SAFETY: see `Job`: each queued block outlives its job.
    let heat = |j: &Job| unsafe { &*j.heat }.load(Ordering::Relaxed);
    let k = (0..queue.len()).max_by_key(|&k| (heat(&queue[k]), k))?;
    Some(queue.remove(k))
}

/// How long the translator polls for a job before it sleeps. A job sent
/// to a sleeping thread costs the vCPU thread a futex wake-up (a system
/// call; about 2% of a boot's samples, one per translation); in a boot,
/// jobs come every 50 µs or so.
const POLL: Duration = Duration::from_micros(100);

/// The next job, polled for a while, then waited for (None once the vCPU
/// side hangs up).
fn wait_job(rx: &Receiver<Job>) -> Option<Job> {
    let t0 = Instant::now();
    loop {
        for _ in 0..64 {
            match rx.try_recv() {
                Ok(j) => return Some(j),
                Err(std::sync::mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
            }
        }
        if t0.elapsed() > POLL {
            return rx.recv().ok();
        }
    }
}

/// The translator thread and its two queues.
pub(super) struct Worker {
    jobs: Option<Sender<Job>>,
    done: Receiver<Finished>,
    /// Finished jobs not yet received: the dispatcher polls this one word
    /// (a channel's `try_recv` costs several percent of a boot).
    ready: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(code: SharedCode) -> std::io::Result<Worker> {
        let (jobs, rx) = channel::<Job>();
        let (tx, done) = channel();
        let ready = Arc::new(AtomicUsize::new(0));
        let ready2 = ready.clone();
        let thread = std::thread::Builder::new()
            .name("matryoshka-jit".into())
            .spawn(move || {
                let mut queue = Vec::new();
                while let Some(job) = next_job(&rx, &mut queue) {
                    // A translator bug fails this block (the interpreter
                    // keeps running it), not the VM.
                    let f = catch_unwind(AssertUnwindSafe(|| produce(&code, &job))).unwrap_or_else(
                        |_| Finished {
                            id: job.id,
                            outcome: Outcome::Failed("translator panicked".into()),
                            ms: 0.0,
                        },
                    );
                    if tx.send(f).is_err() {
                        break;
                    }
                    ready2.fetch_add(1, Ordering::Release);
                }
            })?;
        Ok(Worker {
            jobs: Some(jobs),
            done,
            ready,
            thread: Some(thread),
        })
    }

    /// The next finished job: Ok(None) if there is none yet (or, with
    /// `wait`, after waiting for one), Err if the thread is gone.
    pub fn receive(&self, wait: bool) -> Result<Option<Finished>, ()> {
        if !wait && self.ready.load(Ordering::Acquire) == 0 {
            return Ok(None);
        }
        let got = if wait {
            self.done.recv().map_err(|_| ())
        } else {
            match self.done.try_recv() {
                Ok(f) => Ok(f),
                // Counted but not yet visible: next time.
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(None),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(()),
            }
        }?;
        self.ready.fetch_sub(1, Ordering::Relaxed);
        Ok(Some(got))
    }

    /// Queue a job; false if the thread is gone.
    pub fn send(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }
}

impl Drop for Worker {
    /// Stop the thread and wait for it: it must not touch a block or the
    /// buffer after the `Jit` that owns them is gone.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(heat: u32) -> Block {
        Block {
            lin_pc: 0x1000,
            phys_pc: 0x1000,
            bitness: 64,
            pages: [(1, 0), (u64::MAX, 0)],
            insns: Box::new([]),
            jit_entry: Default::default(),
            heat: heat.into(),
            exits: Default::default(),
        }
    }

    fn job(id: u64, b: &Block) -> Job {
        Job {
            id,
            block: b,
            heat: &b.heat,
            epoch: 0,
            gens: Vec::new(),
            stubs: Stubs::default(),
            opts: Opts {
                sse: true,
                fp: true,
                bmi2: false,
                groups: true,
                events: false,
            },
        }
    }

    /// The translator takes the hottest queued block first, the newest
    /// among equally hot ones, sees heat that changed while queued, and
    /// stops once the vCPU side hangs up, queued jobs or not.
    #[test]
    fn translator_takes_the_hottest_queued_block_first() {
        let blocks: Vec<Block> = [32, 40, 32, 90, 40].into_iter().map(block).collect();
        let (tx, rx) = channel();
        let mut queue = Vec::new();
        for (id, b) in blocks.iter().enumerate() {
            tx.send(job(id as u64, b)).unwrap();
        }
        let mut order = Vec::new();
        order.push(next_job(&rx, &mut queue).unwrap().id);
        // Block 0 heats up while it waits.
        blocks[0].heat.store(95, Ordering::Relaxed);
        for _ in 0..4 {
            order.push(next_job(&rx, &mut queue).unwrap().id);
        }
        assert_eq!(order, [3, 0, 4, 1, 2]);
        tx.send(job(9, &blocks[1])).unwrap();
        drop(tx);
        assert!(next_job(&rx, &mut queue).is_none(), "ran after hang-up");
    }
}
