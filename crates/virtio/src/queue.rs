//! Shared request plumbing for device models: descriptor chain collection
//! with limits, guest-memory copies that report DMA writes, used-ring
//! completion, and the worker thread that sleeps on the queue EventFds.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{ActivateContext, InterruptKind, MemWriteObserver, VirtioInterrupt};

/// One descriptor of a chain, as the device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub write: bool,
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor chain longer than {0} descriptors")]
    TooLong(usize),
    #[error("device-readable descriptor after a device-writable one")]
    BadOrder,
    #[error("descriptor chain carries more than {0} bytes")]
    TooBig(u64),
}

/// A popped chain: its head index (for the used ring) and its descriptors.
/// Loops and out-of-table indices end the chain (virtio-queue's TTL), so
/// collection always terminates.
pub struct Chain {
    pub head: u16,
    pub segs: Result<Vec<Seg>, ChainError>,
}

impl Chain {
    pub fn readable(&self) -> impl Iterator<Item = Seg> + '_ {
        self.segs.iter().flatten().copied().filter(|s| !s.write)
    }
    pub fn writable(&self) -> impl Iterator<Item = Seg> + '_ {
        self.segs.iter().flatten().copied().filter(|s| s.write)
    }
}

/// Pops the next available chain, collecting at most `max_descs`
/// descriptors and `max_bytes` bytes; readable descriptors must precede
/// writable ones (virtio 1.x 2.7.4.2).
pub fn pop_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    max_descs: usize,
    max_bytes: u64,
) -> Option<Chain> {
    let chain = queue.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let mut segs = Vec::new();
    let mut total = 0u64;
    let mut seen_write = false;
    let mut err = None;
    for d in chain {
        if segs.len() == max_descs {
            err = Some(ChainError::TooLong(max_descs));
            break;
        }
        if !d.is_write_only() && seen_write {
            err = Some(ChainError::BadOrder);
            break;
        }
        seen_write |= d.is_write_only();
        total += d.len() as u64;
        if total > max_bytes {
            err = Some(ChainError::TooBig(max_bytes));
            break;
        }
        segs.push(Seg {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
        });
    }
    Some(Chain {
        head,
        segs: match err {
            Some(e) => Err(e),
            None => Ok(segs),
        },
    })
}

/// Gathers the bytes of `segs` into `out` (up to `out.len()`); returns how
/// many were read, or None if guest memory could not be read.
pub fn gather(mem: &GuestMemoryMmap, segs: &[Seg], skip: u64, out: &mut [u8]) -> Option<usize> {
    let mut done = 0usize;
    let mut skip = skip;
    for s in segs {
        if done == out.len() {
            break;
        }
        let len = s.len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(out.len() - done);
        let addr = GuestAddress(s.addr.checked_add(skip)?);
        mem.read_slice(&mut out[done..done + n], addr).ok()?;
        done += n;
        skip = 0;
    }
    Some(done)
}

/// Scatters `data` into `segs` (skipping the first `skip` bytes of them),
/// reporting every write to the observer; returns bytes written, or None
/// on a guest memory error.
pub fn scatter(
    mem: &GuestMemoryMmap,
    obs: &dyn MemWriteObserver,
    segs: &[Seg],
    skip: u64,
    data: &[u8],
) -> Option<usize> {
    let mut done = 0usize;
    let mut skip = skip;
    for s in segs {
        if done == data.len() {
            break;
        }
        let len = s.len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(data.len() - done);
        let gpa = s.addr.checked_add(skip)?;
        mem.write_slice(&data[done..done + n], GuestAddress(gpa))
            .ok()?;
        obs.wrote(gpa, n as u64);
        done += n;
        skip = 0;
    }
    Some(done)
}

/// Puts a completed chain on the used ring and reports the ring write.
pub fn complete(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    obs: &dyn MemWriteObserver,
    head: u16,
    len: u32,
) {
    if let Err(e) = queue.add_used(mem, head, len) {
        tracing::warn!("virtio: cannot complete chain {head}: {e}");
    }
    report_used_ring(queue, obs);
}

/// The used ring (flags, idx, elements, avail_event) is device-written.
pub fn report_used_ring(queue: &Queue, obs: &dyn MemWriteObserver) {
    obs.wrote(queue.used_ring(), 6 + 8 * queue.size() as u64);
}

/// A device's per-queue request processing, run by [`Worker`] on its own
/// thread (and directly by tests).
pub trait QueueHandler: Send + 'static {
    /// Processes available chains on queue `index`; returns whether the
    /// driver should be interrupted.
    fn process(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        obs: &dyn MemWriteObserver,
    ) -> bool;

    /// Extra fds to wake up on (e.g. console input); `on_extra` is called
    /// with their position when readable.
    fn extra_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    fn on_extra(
        &mut self,
        _which: usize,
        _queues: &mut [(u16, Queue, EventFd)],
        _mem: &GuestMemoryMmap,
        _obs: &dyn MemWriteObserver,
        _irq: &dyn VirtioInterrupt,
    ) {
    }
}

/// Runs `process` with notifications suppressed until the ring is empty,
/// then re-enables them (re-checking for the race with a new buffer).
/// If the driver keeps refilling, gives up after a bounded number of rounds
/// and re-signals `kick` so the worker comes back after checking its stop fd.
pub fn drain_queue<H: QueueHandler + ?Sized>(
    h: &mut H,
    index: u16,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    obs: &dyn MemWriteObserver,
    kick: Option<&EventFd>,
) -> bool {
    let mut irq = false;
    // Bounded: a hostile driver that keeps refilling cannot pin the worker
    // forever without it ever re-checking its stop fd.
    let mut rounds = 0;
    loop {
        let _ = queue.disable_notification(mem);
        irq |= h.process(index, queue, mem, obs);
        report_used_ring(queue, obs);
        match queue.enable_notification(mem) {
            Ok(true) => {}
            _ => break,
        }
        rounds += 1;
        if rounds == 64 {
            if let Some(k) = kick {
                let _ = k.write(1);
            }
            break;
        }
    }
    irq
}

/// A device worker thread: waits on the queue EventFds (and the handler's
/// extra fds) with poll(2), so an idle device costs nothing.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn<H: QueueHandler>(
        name: &str,
        mut handler: H,
        ctx: ActivateContext,
    ) -> crate::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop2 = stop.try_clone()?;
        let ActivateContext {
            mem,
            interrupt,
            observer,
            mut queues,
        } = ctx;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                worker_loop(
                    &mut handler,
                    &stop2,
                    &mut queues,
                    &mem,
                    &*observer,
                    &*interrupt,
                )
            })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn worker_loop<H: QueueHandler>(
    h: &mut H,
    stop: &EventFd,
    queues: &mut [(u16, Queue, EventFd)],
    mem: &GuestMemoryMmap,
    obs: &dyn MemWriteObserver,
    irq: &dyn VirtioInterrupt,
) {
    let extra = h.extra_fds();
    let mut fds: Vec<libc::pollfd> = std::iter::once(stop.as_raw_fd())
        .chain(queues.iter().map(|q| q.2.as_raw_fd()))
        .chain(extra.iter().copied())
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // Buffers may have been queued before activation.
    for (idx, q, evt) in queues.iter_mut() {
        if drain_queue(h, *idx, q, mem, obs, Some(evt)) {
            irq.trigger(InterruptKind::Queue(*idx));
        }
    }
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of
        // the given length for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(
                "virtio worker: poll failed: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        for i in 0..queues.len() {
            if fds[1 + i].revents == 0 {
                continue;
            }
            let (idx, q, evt) = &mut queues[i];
            let _ = evt.read();
            if drain_queue(h, *idx, q, mem, obs, Some(evt)) {
                irq.trigger(InterruptKind::Queue(*idx));
            }
        }
        for k in 0..extra.len() {
            if fds[1 + queues.len() + k].revents != 0 {
                h.on_extra(k, queues, mem, obs, irq);
            }
        }
    }
}

/// Shared helper for tests and devices: an observer backed by a closure.
pub struct FnObserver<F: Fn(u64, u64) + Send + Sync>(pub F);

impl<F: Fn(u64, u64) + Send + Sync> MemWriteObserver for FnObserver<F> {
    fn wrote(&self, gpa: u64, len: u64) {
        (self.0)(gpa, len)
    }
}

/// Arc'd null interrupt for tests.
pub fn null_interrupt() -> Arc<dyn VirtioInterrupt> {
    struct N;
    impl VirtioInterrupt for N {
        fn trigger(&self, _: InterruptKind) {}
    }
    Arc::new(N)
}
