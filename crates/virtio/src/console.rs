//! virtio-console with a single port (hvc0): transmitq bytes go to an
//! output writer, bytes pushed into [`ConsoleInput`] go to the receiveq.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::queue::{complete, drain_queue, gather, pop_chain, scatter, QueueHandler, Worker};
use crate::{
    ActivateContext, InterruptKind, MemWriteObserver, Result, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_ID_CONSOLE,
};

const QUEUE_SIZE: u16 = 256;
const RX: u16 = 0;
const TX: u16 = 1;
/// Largest single transmit we copy; longer chains are truncated.
const MAX_TX: u64 = 64 * 1024;
/// Input kept while the guest has no receive buffers.
const MAX_PENDING_INPUT: usize = 64 * 1024;

/// Host → guest bytes for the console; `push` may be called from any thread.
pub struct ConsoleInput {
    buf: Mutex<VecDeque<u8>>,
    evt: EventFd,
}

impl ConsoleInput {
    pub fn push(&self, bytes: &[u8]) {
        let mut b = lock(&self.buf);
        let room = MAX_PENDING_INPUT.saturating_sub(b.len());
        b.extend(&bytes[..bytes.len().min(room)]);
        drop(b);
        let _ = self.evt.write(1);
    }
}

pub struct Console {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    input: Arc<ConsoleInput>,
    worker: Option<Worker>,
}

impl Console {
    pub fn new(out: Box<dyn Write + Send>) -> Result<Self> {
        Ok(Console {
            out: Arc::new(Mutex::new(out)),
            input: Arc::new(ConsoleInput {
                buf: Mutex::new(VecDeque::new()),
                evt: EventFd::new(EFD_NONBLOCK)?,
            }),
            worker: None,
        })
    }

    pub fn input(&self) -> Arc<ConsoleInput> {
        self.input.clone()
    }

    /// A handler for direct use (tests).
    pub fn handler(&self) -> ConsoleHandler {
        ConsoleHandler {
            out: self.out.clone(),
            input: self.input.clone(),
        }
    }
}

pub struct ConsoleHandler {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    input: Arc<ConsoleInput>,
}

impl ConsoleHandler {
    fn fill_rx(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        obs: &dyn MemWriteObserver,
    ) -> bool {
        let mut any = false;
        loop {
            let mut pending = lock(&self.input.buf);
            if pending.is_empty() {
                break;
            }
            let Some(chain) = pop_chain(queue, mem, QUEUE_SIZE as usize, u32::MAX as u64) else {
                break;
            };
            let segs: Vec<_> = chain.writable().collect();
            let room: usize = segs.iter().map(|s| s.len as usize).sum();
            let n = room.min(pending.len());
            let data: Vec<u8> = pending.iter().take(n).copied().collect();
            let written = if chain.segs.is_ok() {
                scatter(mem, obs, &segs, 0, &data).unwrap_or(0)
            } else {
                0
            };
            pending.drain(..written);
            drop(pending);
            complete(queue, mem, obs, chain.head, written as u32);
            any = true;
        }
        any
    }
}

impl QueueHandler for ConsoleHandler {
    fn process(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        obs: &dyn MemWriteObserver,
    ) -> bool {
        if index != TX {
            return self.fill_rx(queue, mem, obs);
        }
        let mut any = false;
        while let Some(chain) = pop_chain(queue, mem, QUEUE_SIZE as usize, u32::MAX as u64) {
            let segs: Vec<_> = chain.readable().collect();
            let len = segs.iter().map(|s| s.len as u64).sum::<u64>().min(MAX_TX) as usize;
            if chain.segs.is_ok() && len > 0 {
                let mut buf = vec![0u8; len];
                if let Some(n) = gather(mem, &segs, 0, &mut buf) {
                    let mut o = lock(&self.out);
                    let _ = o.write_all(&buf[..n]);
                    let _ = o.flush();
                }
            }
            complete(queue, mem, obs, chain.head, 0);
            any = true;
        }
        any
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.input.evt.as_raw_fd()]
    }

    fn on_extra(
        &mut self,
        _which: usize,
        queues: &mut [(u16, Queue, EventFd)],
        mem: &GuestMemoryMmap,
        obs: &dyn MemWriteObserver,
        irq: &dyn VirtioInterrupt,
    ) {
        let _ = self.input.evt.read();
        if let Some((_, q, evt)) = queues.iter_mut().find(|q| q.0 == RX) {
            if drain_queue(self, RX, q, mem, obs, Some(evt)) {
                irq.trigger(InterruptKind::Queue(RX));
            }
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        self.worker = Some(Worker::spawn("virtio-console", self.handler(), ctx)?);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        true
    }
}
