//! Paravirtual virtio devices for Matryoshka: the contract between the
//! virtio-pci transport ([`pci::VirtioPciDevice`]) and device models
//! (block, rng, console; net lives in its own module).
//!
//! A device model implements [`VirtioDevice`]. The transport owns the PCI
//! function, negotiates features, sets up the queues and, when the driver
//! sets DRIVER_OK, hands everything the device needs to
//! [`VirtioDevice::activate`] in an [`ActivateContext`]. Devices process
//! requests on their own worker threads, woken by the per-queue
//! [`EventFd`]s the transport signals on guest notifies.

use std::sync::Arc;

pub use virtio_queue::Queue;
pub use vm_memory::GuestMemoryMmap;
pub use vmm_sys_util::eventfd::EventFd;

/// virtio device IDs (virtio 1.x section 5).
pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const VIRTIO_ID_CONSOLE: u32 = 3;
pub const VIRTIO_ID_RNG: u32 = 4;

/// Feature bit: the device complies with virtio 1.x (mandatory for the
/// modern transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Tells the VMM that a device wrote guest memory (DMA), so the CPU can
/// invalidate translated code on those pages and (later) dirty tracking can
/// record them. EVERY device write into guest memory must be reported.
pub trait MemWriteObserver: Send + Sync {
    fn wrote(&self, gpa: u64, len: u64);
}

/// An observer that ignores writes (tests, tools).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullObserver;

impl MemWriteObserver for NullObserver {
    fn wrote(&self, _gpa: u64, _len: u64) {}
}

/// Which interrupt a device raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device configuration changed.
    Config,
    /// The used ring of this queue was updated.
    Queue(u16),
}

/// Implemented by the transport (MSI-X vector or INTx + ISR status).
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, kind: InterruptKind);
}

/// What the device model receives at DRIVER_OK: the memory, the interrupt,
/// and for each enabled queue its index, the `virtio_queue::Queue`, and an
/// `EventFd` that the transport signals when the driver notifies that queue.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub observer: Arc<dyn MemWriteObserver>,
    pub queues: Vec<(u16, Queue, EventFd)>,
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// VIRTIO_ID_NET=1, BLOCK=2, CONSOLE=3, RNG=4.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Offered features; must include [`VIRTIO_F_VERSION_1`].
    fn device_features(&self) -> u64;
    /// The features the driver accepted (a subset of `device_features`).
    fn ack_features(&mut self, _features: u64) {}
    /// Reads device-specific configuration at `offset`; bytes beyond the
    /// config are left as zero by the caller's buffer.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Start processing (typically spawns a worker thread that polls the
    /// queue EventFds).
    fn activate(&mut self, ctx: ActivateContext) -> Result<()>;
    /// Stop workers and drop queues; return true if the device can be
    /// re-activated.
    fn reset(&mut self) -> bool;
}

/// Copy the bytes of `config` at `offset` into `data`; bytes past its end
/// read as zero (a `read_config` for devices with a byte-image config).
pub fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| config.get(usize::try_from(o).ok()?))
            .copied()
            .unwrap_or(0);
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("device activation failed: {0}")]
    Activate(String),
    #[error("queue {0} is missing or was not enabled by the driver")]
    QueueMissing(u16),
    #[error("virtio queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("disk image {path}: {msg}")]
    Disk { path: String, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

pub mod blk;
pub mod console;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;

pub use blk::{Block, DiskFormat, DiskOptions};
pub use console::{Console, ConsoleInput};
pub use pci::{PciBarRouter, VirtioPciDevice};
pub use rng::Rng;

#[cfg(test)]
mod tests;
