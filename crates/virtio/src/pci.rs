//! virtio-pci modern transport (virtio 1.x section 4.1).
//!
//! One 32-bit memory BAR (BAR0, 32 KiB) holds every structure:
//!
//! | offset   | what |
//! |----------|------|
//! | 0x0000   | common configuration (`virtio_pci_common_cfg`) |
//! | 0x1000   | ISR status (read clears, deasserts INTx) |
//! | 0x2000   | device-specific configuration |
//! | 0x3000   | notifications: queue `n` at `0x3000 + 4 n` |
//! | 0x4000   | MSI-X table (16 bytes per vector) |
//! | 0x6000   | MSI-X pending bit array |
//!
//! The driver finds them through vendor-specific capabilities (ID 0x09) in
//! configuration space, plus the MSI-X capability. Interrupts go out as
//! MSI-X messages to an [`InterruptSink`] (the APIC bus), or, while MSI-X is
//! disabled, as a level-triggered INTx line with the ISR status register.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::{lock, MmioDevice};
use devices::pci::{BarKind, PciBar, PciConfig, PciDevice};
use devices::{InterruptSink, IrqLine, MsiMessage};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    ActivateContext, Error, InterruptKind, MemWriteObserver, Result, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + virtio device type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_OFF: u64 = 0x0000;
pub const COMMON_LEN: u64 = 0x38;
pub const ISR_OFF: u64 = 0x1000;
pub const DEVICE_CFG_OFF: u64 = 0x2000;
pub const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY_OFF: u64 = 0x3000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFF: u64 = 0x4000;
pub const MSIX_PBA_OFF: u64 = 0x6000;
/// "No vector" for msix_config / queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// Registers of the common configuration: (offset, size).
const COMMON_REGS: [(u64, u64); 16] = [
    (0x00, 4), // device_feature_select
    (0x04, 4), // device_feature
    (0x08, 4), // driver_feature_select
    (0x0c, 4), // driver_feature
    (0x10, 2), // config_msix_vector
    (0x12, 2), // num_queues
    (0x14, 1), // device_status
    (0x15, 1), // config_generation
    (0x16, 2), // queue_select
    (0x18, 2), // queue_size
    (0x1a, 2), // queue_msix_vector
    (0x1c, 2), // queue_enable
    (0x1e, 2), // queue_notify_off
    (0x20, 8), // queue_desc
    (0x28, 8), // queue_driver (avail ring)
    (0x30, 8), // queue_device (used ring)
];

fn common_reg(off: u64) -> Option<(u64, u64)> {
    COMMON_REGS
        .iter()
        .copied()
        .find(|&(s, n)| off >= s && off < s + n)
}

#[derive(Debug, Clone, Copy)]
struct QueueCfg {
    max: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueCfg {
    fn new(max: u16) -> Self {
        QueueCfg {
            max,
            size: max,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

struct MsixInner {
    /// Table entries: address low/high, data, vector control (bit 0 mask).
    entries: Vec<[u8; 16]>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

impl MsixInner {
    fn message(&self, v: usize) -> MsiMessage {
        let e = &self.entries[v];
        let w = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
        MsiMessage {
            address: w(0) as u64 | (w(4) as u64) << 32,
            data: w(8),
        }
    }
    fn entry_masked(&self, v: usize) -> bool {
        self.entries[v][12] & 1 != 0
    }
    /// Messages that became deliverable (pending and now unmasked).
    fn take_deliverable(&mut self) -> Vec<MsiMessage> {
        if !self.enabled || self.function_masked {
            return Vec::new();
        }
        let mut out = Vec::new();
        for v in 0..self.entries.len() {
            if self.pending[v] && !self.entry_masked(v) {
                self.pending[v] = false;
                out.push(self.message(v));
            }
        }
        out
    }
}

/// The transport's interrupt, shared with device workers.
pub struct PciInterrupt {
    msix: Mutex<MsixInner>,
    isr: AtomicU8,
    intx: Arc<dyn IrqLine>,
    sink: Arc<dyn InterruptSink>,
}

impl PciInterrupt {
    fn send(&self, msgs: Vec<MsiMessage>) {
        for m in msgs {
            match m.to_request() {
                Some(req) => self.sink.deliver(req),
                None => tracing::debug!("virtio-pci: MSI-X message {m:?} not for the APIC"),
            }
        }
    }

    /// Current ISR status (without clearing it); for tests and debugging.
    pub fn isr(&self) -> u8 {
        self.isr.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: InterruptKind) {
        let mut g = lock(&self.msix);
        if g.enabled {
            let v = match kind {
                InterruptKind::Config => g.config_vector,
                InterruptKind::Queue(q) => g
                    .queue_vectors
                    .get(q as usize)
                    .copied()
                    .unwrap_or(NO_VECTOR),
            } as usize;
            if v >= g.entries.len() {
                return;
            }
            if g.function_masked || g.entry_masked(v) {
                g.pending[v] = true;
                return;
            }
            let m = g.message(v);
            drop(g);
            self.send(vec![m]);
        } else {
            drop(g);
            let bit = match kind {
                InterruptKind::Queue(_) => 1,
                InterruptKind::Config => 2,
            };
            self.isr.fetch_or(bit, Ordering::SeqCst);
            self.intx.set_level(true);
        }
    }
}

/// A virtio device on PCI (modern transport only).
pub struct VirtioPciDevice {
    cfg: PciConfig,
    msix_cap: usize,
    nvec: u16,
    dev: Box<dyn VirtioDevice>,
    irq: Arc<PciInterrupt>,
    mem: GuestMemoryMmap,
    observer: Arc<dyn MemWriteObserver>,
    queues: Vec<QueueCfg>,
    notify: Vec<EventFd>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    active: bool,
    /// Set when the device model could not be reset for re-activation.
    broken: bool,
}

fn vendor_cap(cfg_type: u8, offset: u64, len: u64, extra: Option<u32>) -> Vec<u8> {
    // Body after the 2-byte (id, next) header: cap_len, cfg_type, bar, id,
    // padding[2], offset, length [, notify_off_multiplier].
    let cap_len = if extra.is_some() { 20u8 } else { 16 };
    let mut b = vec![cap_len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(len as u32).to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

fn pci_class(device_type: u32) -> (u8, u8) {
    match device_type {
        crate::VIRTIO_ID_NET => (0x02, 0x00),
        crate::VIRTIO_ID_BLOCK => (0x01, 0x00),
        crate::VIRTIO_ID_CONSOLE => (0x07, 0x80),
        _ => (0xff, 0x00),
    }
}

impl VirtioPciDevice {
    /// Wraps `dev`. `intx` is the device's INTx line (its _PRT GSI),
    /// `sink` receives MSI-X messages.
    pub fn new(
        dev: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        observer: Arc<dyn MemWriteObserver>,
        sink: Arc<dyn InterruptSink>,
        intx: Arc<dyn IrqLine>,
    ) -> Result<Self> {
        let ty = dev.device_type();
        let maxes = dev.queue_max_sizes();
        let nq = maxes.len();
        if nq == 0
            || nq > 64
            || maxes
                .iter()
                .any(|&m| m == 0 || !m.is_power_of_two() || m > 32768)
        {
            return Err(Error::Activate(format!("invalid queue sizes {maxes:?}")));
        }
        let nvec = nq as u16 + 1;
        let (class, subclass) = pci_class(ty);
        let mut cfg = PciConfig::new(
            VIRTIO_PCI_VENDOR,
            VIRTIO_PCI_DEVICE_BASE + ty as u16,
            class,
            subclass,
            0,
            1, // revision 1: modern-only device
        );
        cfg.set_subsystem(VIRTIO_PCI_VENDOR, 0x1100);
        cfg.set_interrupt_pin(1);
        cfg.add_bar(
            0,
            PciBar {
                size: BAR_SIZE,
                kind: BarKind::Mem32,
                prefetchable: false,
            },
        );
        let caps = [
            vendor_cap(CFG_COMMON, COMMON_OFF, COMMON_LEN, None),
            vendor_cap(CFG_ISR, ISR_OFF, 1, None),
            vendor_cap(CFG_DEVICE, DEVICE_CFG_OFF, DEVICE_CFG_LEN, None),
            vendor_cap(
                CFG_NOTIFY,
                NOTIFY_OFF,
                NOTIFY_MULTIPLIER as u64 * nq as u64,
                Some(NOTIFY_MULTIPLIER),
            ),
        ];
        for c in caps {
            cfg.add_capability(CAP_VENDOR, &c)
                .ok_or_else(|| Error::Activate("PCI capability space full".into()))?;
        }
        let mut msix = Vec::new();
        msix.extend_from_slice(&(nvec - 1).to_le_bytes());
        msix.extend_from_slice(&(MSIX_TABLE_OFF as u32).to_le_bytes());
        msix.extend_from_slice(&(MSIX_PBA_OFF as u32).to_le_bytes());
        let msix_cap = cfg
            .add_capability(CAP_MSIX, &msix)
            .ok_or_else(|| Error::Activate("PCI capability space full".into()))?
            as usize;
        // Message control's enable (bit 15) and function mask (bit 14).
        cfg.set_writable(msix_cap + 3, 1);

        let mut entry = [0u8; 16];
        entry[12] = 1; // masked at reset
        let irq = Arc::new(PciInterrupt {
            msix: Mutex::new(MsixInner {
                entries: vec![entry; nvec as usize],
                pending: vec![false; nvec as usize],
                enabled: false,
                function_masked: false,
                config_vector: NO_VECTOR,
                queue_vectors: vec![NO_VECTOR; nq],
            }),
            isr: AtomicU8::new(0),
            intx,
            sink,
        });
        let notify = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(VirtioPciDevice {
            cfg,
            msix_cap,
            nvec,
            dev,
            irq,
            mem,
            observer,
            queues: maxes.into_iter().map(QueueCfg::new).collect(),
            notify,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            active: false,
            broken: false,
        })
    }

    /// Pre-assigns BAR0 (there is no firmware to do it); `addr` must be
    /// aligned to [`BAR_SIZE`].
    pub fn set_bar_address(&mut self, addr: u64) {
        self.cfg.write(0x10, &(addr as u32).to_le_bytes());
    }

    /// BAR0's current guest-physical range, if memory decoding is on and
    /// the BAR holds an address (the guest may re-program it at any time).
    pub fn bar_range(&self) -> Option<(u64, u64)> {
        let addr = self.cfg.bar_address(0)?;
        (self.cfg.command() & 0x2 != 0 && addr != 0).then_some((addr, BAR_SIZE))
    }

    /// Like [`Self::bar_range`] but ignoring the command register; used
    /// by the VMM when it pre-assigns.
    pub fn bar_address(&self) -> u64 {
        self.cfg.bar_address(0).unwrap_or(0)
    }

    pub fn interrupt(&self) -> Arc<PciInterrupt> {
        self.irq.clone()
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn device_type(&self) -> u32 {
        self.dev.device_type()
    }

    /// Raises a configuration-change interrupt (e.g. disk resize).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.irq.trigger(InterruptKind::Config);
    }

    fn device_features(&self) -> u64 {
        self.dev.device_features() | VIRTIO_F_VERSION_1
    }

    fn common_get(&self, start: u64) -> u64 {
        let q = self.queues.get(self.queue_select as usize);
        let msix = lock(&self.irq.msix);
        match start {
            0x00 => self.device_feature_select as u64,
            0x04 => match self.device_feature_select {
                0 => self.device_features() & 0xffff_ffff,
                1 => self.device_features() >> 32,
                _ => 0,
            },
            0x08 => self.driver_feature_select as u64,
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => msix.config_vector as u64,
            0x12 => self.queues.len() as u64,
            0x14 => self.status as u64,
            0x15 => self.config_generation as u64,
            0x16 => self.queue_select as u64,
            0x18 => q.map_or(0, |q| q.size as u64),
            0x1a => msix
                .queue_vectors
                .get(self.queue_select as usize)
                .map_or(NO_VECTOR as u64, |&v| v as u64),
            0x1c => q.map_or(0, |q| q.ready as u64),
            0x1e => self.queue_select as u64,
            0x20 => q.map_or(0, |q| q.desc),
            0x28 => q.map_or(0, |q| q.avail),
            0x30 => q.map_or(0, |q| q.used),
            _ => 0,
        }
    }

    fn common_set(&mut self, start: u64, v: u64) {
        let qs = self.queue_select as usize;
        // Queue configuration is frozen while the device runs.
        let can_cfg_queue = !self.active && qs < self.queues.len();
        match start {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | (v & 0xffff_ffff)
                }
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            0x10 => {
                let v = if v < self.nvec as u64 {
                    v as u16
                } else {
                    NO_VECTOR
                };
                lock(&self.irq.msix).config_vector = v;
            }
            0x14 => self.set_status(v as u8),
            0x16 => self.queue_select = v as u16,
            0x18 if can_cfg_queue => self.queues[qs].size = v as u16,
            0x1a if qs < self.queues.len() => {
                let v = if v < self.nvec as u64 {
                    v as u16
                } else {
                    NO_VECTOR
                };
                lock(&self.irq.msix).queue_vectors[qs] = v;
            }
            0x1c if can_cfg_queue => self.queues[qs].ready = v & 1 == 1,
            0x20 if can_cfg_queue => self.queues[qs].desc = v,
            0x28 if can_cfg_queue => self.queues[qs].avail = v,
            0x30 if can_cfg_queue => self.queues[qs].used = v,
            _ => {}
        }
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        let newly = v & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.device_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                tracing::warn!(
                    "virtio-pci: driver features {:#x} not acceptable (offered {offered:#x})",
                    self.driver_features
                );
                v &= !STATUS_FEATURES_OK;
            } else {
                self.dev.ack_features(self.driver_features);
            }
        }
        if newly & STATUS_DRIVER_OK != 0 && !self.active {
            if v & STATUS_FEATURES_OK == 0 || self.broken {
                v |= STATUS_NEEDS_RESET;
            } else if let Err(e) = self.activate() {
                tracing::warn!(
                    "virtio-pci: activation of device type {} failed: {e}",
                    self.dev.device_type()
                );
                v |= STATUS_NEEDS_RESET;
            } else {
                self.active = true;
            }
        }
        self.status = v;
    }

    fn activate(&mut self) -> Result<()> {
        let mut queues = Vec::new();
        for (i, qc) in self.queues.iter().enumerate() {
            if !qc.ready {
                continue;
            }
            let mut q = Queue::new(qc.max)?;
            q.try_set_size(qc.size)?;
            q.try_set_desc_table_address(GuestAddress(qc.desc))?;
            q.try_set_avail_ring_address(GuestAddress(qc.avail))?;
            q.try_set_used_ring_address(GuestAddress(qc.used))?;
            q.set_ready(true);
            if !q.is_valid(&self.mem) {
                return Err(Error::QueueMissing(i as u16));
            }
            queues.push((i as u16, q, self.notify[i].try_clone()?));
        }
        self.dev.activate(ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.irq.clone(),
            observer: self.observer.clone(),
            queues,
        })
    }

    /// Device reset (status 0 written, or a PCI-level reset).
    pub fn reset(&mut self) {
        if self.active && !self.dev.reset() {
            self.broken = true;
        }
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueCfg::new(q.max);
        }
        for e in &self.notify {
            let _ = e.read();
        }
        {
            let mut m = lock(&self.irq.msix);
            m.config_vector = NO_VECTOR;
            m.queue_vectors.iter_mut().for_each(|v| *v = NO_VECTOR);
        }
        self.irq.isr.store(0, Ordering::SeqCst);
        self.irq.intx.set_level(false);
    }

    fn msix_ctrl_sync(&mut self) {
        let ctrl = self.cfg.get_u16(self.msix_cap + 2);
        let fixed = (self.nvec - 1) | (ctrl & 0xc000);
        self.cfg.set_u16(self.msix_cap + 2, fixed);
        let msgs = {
            let mut m = lock(&self.irq.msix);
            m.enabled = ctrl & 0x8000 != 0;
            m.function_masked = ctrl & 0x4000 != 0;
            m.take_deliverable()
        };
        if ctrl & 0x8000 != 0 {
            // INTx is not used while MSI-X is on.
            self.irq.intx.set_level(false);
        }
        self.irq.send(msgs);
    }

    fn bar_read_inner(&mut self, off: u64, data: &mut [u8]) {
        data.fill(0);
        match off {
            o if o < COMMON_OFF + COMMON_LEN => {
                for (i, b) in data.iter_mut().enumerate() {
                    if let Some((s, _)) = common_reg(o + i as u64) {
                        *b = (self.common_get(s) >> (8 * (o + i as u64 - s))) as u8;
                    }
                }
            }
            ISR_OFF => {
                data[0] = self.irq.isr.swap(0, Ordering::SeqCst);
                self.irq.intx.set_level(false);
            }
            o if (DEVICE_CFG_OFF..DEVICE_CFG_OFF + DEVICE_CFG_LEN).contains(&o) => {
                self.dev.read_config(o - DEVICE_CFG_OFF, data);
            }
            o if (MSIX_TABLE_OFF..MSIX_TABLE_OFF + 16 * self.nvec as u64).contains(&o) => {
                let m = lock(&self.irq.msix);
                for (i, b) in data.iter_mut().enumerate() {
                    let x = o - MSIX_TABLE_OFF + i as u64;
                    if let Some(e) = m.entries.get((x / 16) as usize) {
                        *b = e[(x % 16) as usize];
                    }
                }
            }
            o if (MSIX_PBA_OFF..MSIX_PBA_OFF + 8).contains(&o) => {
                let m = lock(&self.irq.msix);
                for (i, b) in data.iter_mut().enumerate() {
                    let byte = (o - MSIX_PBA_OFF) as usize + i;
                    for bit in 0..8 {
                        if m.pending.get(byte * 8 + bit).copied().unwrap_or(false) {
                            *b |= 1 << bit;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn bar_write_inner(&mut self, off: u64, data: &[u8]) {
        match off {
            o if o < COMMON_OFF + COMMON_LEN => {
                let mut i = 0u64;
                while (i as usize) < data.len() {
                    let Some((s, n)) = common_reg(o + i) else {
                        i += 1;
                        continue;
                    };
                    let mut v = self.common_get(s);
                    while (i as usize) < data.len() && o + i < s + n {
                        let sh = 8 * (o + i - s);
                        v = (v & !(0xff << sh)) | (data[i as usize] as u64) << sh;
                        i += 1;
                    }
                    self.common_set(s, v);
                }
            }
            o if (DEVICE_CFG_OFF..DEVICE_CFG_OFF + DEVICE_CFG_LEN).contains(&o) => {
                self.dev.write_config(o - DEVICE_CFG_OFF, data);
            }
            o if (NOTIFY_OFF..NOTIFY_OFF + NOTIFY_MULTIPLIER as u64 * self.queues.len() as u64)
                .contains(&o) =>
            {
                let q = ((o - NOTIFY_OFF) / NOTIFY_MULTIPLIER as u64) as usize;
                if self.active {
                    let _ = self.notify[q].write(1);
                }
            }
            o if (MSIX_TABLE_OFF..MSIX_TABLE_OFF + 16 * self.nvec as u64).contains(&o) => {
                let msgs = {
                    let mut m = lock(&self.irq.msix);
                    for (i, &b) in data.iter().enumerate() {
                        let x = o - MSIX_TABLE_OFF + i as u64;
                        if let Some(e) = m.entries.get_mut((x / 16) as usize) {
                            e[(x % 16) as usize] = b;
                        }
                    }
                    m.take_deliverable()
                };
                self.irq.send(msgs);
            }
            _ => {}
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg: u16) -> u32 {
        self.cfg.read_u32(reg)
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.cfg.write(offset, data);
        let o = offset as usize;
        if o < self.msix_cap + 4 && o + data.len() > self.msix_cap + 2 {
            self.msix_ctrl_sync();
        }
    }
}

impl MmioDevice for VirtioPciDevice {
    /// `offset` is relative to BAR0.
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        self.bar_read_inner(offset, data)
    }
    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        self.bar_write_inner(offset, data)
    }
}

/// Routes the PCI MMIO window to the devices' BARs at whatever addresses
/// the guest currently has programmed (so BAR re-assignment by the guest
/// just works). Map it on the MMIO bus over the whole 32-bit window.
pub struct PciBarRouter {
    base: u64,
    devices: Vec<Arc<Mutex<VirtioPciDevice>>>,
}

impl PciBarRouter {
    /// `base` is the guest-physical address where the router is mapped.
    pub fn new(base: u64) -> Self {
        PciBarRouter {
            base,
            devices: Vec::new(),
        }
    }

    pub fn add(&mut self, dev: Arc<Mutex<VirtioPciDevice>>) {
        self.devices.push(dev);
    }

    fn with_device(&self, offset: u64, f: impl FnOnce(&mut VirtioPciDevice, u64)) -> bool {
        let Some(addr) = self.base.checked_add(offset) else {
            return false;
        };
        for d in &self.devices {
            let mut g = lock(d);
            if let Some((b, len)) = g.bar_range() {
                if addr >= b && addr - b < len {
                    f(&mut g, addr - b);
                    return true;
                }
            }
        }
        false
    }
}

impl MmioDevice for PciBarRouter {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if !self.with_device(offset, |d, o| d.mmio_read(o, data)) {
            data.fill(0xff);
        }
    }
    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        self.with_device(offset, |d, o| d.mmio_write(o, data));
    }
}
