//! virtio-rng (entropy device): fills device-writable buffers from the
//! host's `/dev/urandom`.

use std::fs::File;
use std::io::Read;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::queue::{complete, pop_chain, scatter, QueueHandler, Worker};
use crate::{
    ActivateContext, MemWriteObserver, Result, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_ID_RNG,
};

const QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most; the driver asks again for more.
const MAX_REQUEST: usize = 64 * 1024;

pub struct Rng {
    worker: Option<Worker>,
}

impl Rng {
    pub fn new() -> Self {
        Rng { worker: None }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

/// The request loop, separate from the thread for direct testing.
pub struct RngHandler {
    source: File,
}

impl RngHandler {
    pub fn new() -> Result<Self> {
        Ok(RngHandler {
            source: File::open("/dev/urandom")?,
        })
    }
}

impl QueueHandler for RngHandler {
    fn process(
        &mut self,
        _index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        obs: &dyn MemWriteObserver,
    ) -> bool {
        let mut any = false;
        while let Some(chain) = pop_chain(queue, mem, QUEUE_SIZE as usize, u32::MAX as u64) {
            let segs: Vec<_> = chain.writable().collect();
            let want = segs
                .iter()
                .map(|s| s.len as usize)
                .sum::<usize>()
                .min(MAX_REQUEST);
            let mut written = 0;
            if chain.segs.is_ok() && want > 0 {
                let mut buf = vec![0u8; want];
                if self.source.read_exact(&mut buf).is_ok() {
                    written = scatter(mem, obs, &segs, 0, &buf).unwrap_or(0);
                }
            }
            complete(queue, mem, obs, chain.head, written as u32);
            any = true;
        }
        any
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        self.worker = Some(Worker::spawn("virtio-rng", RngHandler::new()?, ctx)?);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        true
    }
}
