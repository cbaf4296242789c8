//! virtio-blk backed by a raw or qcow2 image (qcow2 through the `imago`
//! crate: backing-file chains, compressed clusters, allocation on write).
//!
//! Requests: IN, OUT, FLUSH (flush metadata + fsync, so data the guest
//! synced survives a SIGKILL of the VMM), GET_ID, DISCARD, WRITE_ZEROES.
//! Malformed requests complete with VIRTIO_BLK_S_IOERR (or UNSUPP for
//! unknown types); a chain without a writable status byte is completed
//! with length 0.

use std::io::Read;
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::queue::{complete, gather, pop_chain, scatter, QueueHandler, Seg, Worker};
use crate::{
    ActivateContext, Error, MemWriteObserver, Result, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
};

pub const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Largest segment (descriptor) size we accept (VIRTIO_BLK_F_SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request (VIRTIO_BLK_F_SEG_MAX); +2 for the
/// header and status descriptors.
pub const SEG_MAX: u32 = 126;
/// Most bytes per request; bounds the bounce buffer.
pub const MAX_REQUEST_BYTES: u64 = 8 << 20;
/// Sectors per DISCARD / WRITE_ZEROES segment.
const MAX_DISCARD_SECTORS: u32 = 1 << 22;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// How to open a disk image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    pub path: PathBuf,
    pub read_only: bool,
    /// None: detect from the qcow2 magic.
    pub format: Option<DiskFormat>,
}

/// Block storage behind a virtio-blk device.
pub trait DiskBackend: Send {
    fn size(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Makes all completed writes durable.
    fn flush(&mut self) -> std::io::Result<()>;
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()>;
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()>;
}

/// Raw and qcow2 images through imago.
struct ImagoDisk(FormatAccess<ImagoFile>);

impl DiskBackend for ImagoDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        // flush() writes back cached qcow2 metadata, sync() fsyncs the files.
        self.0.flush()?;
        self.0.sync()
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        // Advisory: a format that cannot discard simply keeps the data.
        if let Err(e) = self.0.discard_to_any(offset, len) {
            tracing::debug!("virtio-blk: discard not done: {e}");
        }
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.write_zeroes(offset, len)
    }
}

/// Detects the format from the first bytes (qcow2 magic "QFI\xfb").
pub fn detect_format(path: &Path) -> std::io::Result<DiskFormat> {
    let mut f = std::fs::File::open(path)?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic)?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    })
}

/// Opens a disk image (and, for qcow2, its backing chain read-only).
pub fn open_disk(opts: &DiskOptions) -> Result<Box<dyn DiskBackend>> {
    let err = |msg: String| Error::Disk {
        path: opts.path.display().to_string(),
        msg,
    };
    if !opts.path.exists() {
        return Err(err("no such file".into()));
    }
    let format = match opts.format {
        Some(f) => f,
        None => detect_format(&opts.path).map_err(|e| err(e.to_string()))?,
    };
    let gate = PermissiveImplicitOpenGate::default();
    let access = match format {
        DiskFormat::Raw => Raw::<ImagoFile>::builder_path(&opts.path)
            .write(!opts.read_only)
            .open(gate)
            .map(FormatAccess::new),
        DiskFormat::Qcow2 => Qcow2::<ImagoFile>::builder_path(&opts.path)
            .write(!opts.read_only)
            .open(gate)
            .map(FormatAccess::new),
    }
    .map_err(|e| err(format!("cannot open as {format:?}: {e}")))?;
    Ok(Box::new(ImagoDisk(access)))
}

pub struct Block {
    disk: Option<Box<dyn DiskBackend>>,
    capacity: u64,
    read_only: bool,
    id: [u8; 20],
    worker: Option<Worker>,
    /// Returned by the worker when it stops, for re-activation.
    disk_back: std::sync::Arc<std::sync::Mutex<Option<Box<dyn DiskBackend>>>>,
}

impl Block {
    /// `id` is returned by GET_ID (up to 20 bytes, e.g. the file name).
    pub fn new(disk: Box<dyn DiskBackend>, read_only: bool, id: &str) -> Self {
        let mut idb = [0u8; 20];
        let n = id.len().min(20);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Block {
            capacity: disk.size() / SECTOR,
            disk: Some(disk),
            read_only,
            id: idb,
            worker: None,
            disk_back: Default::default(),
        }
    }

    pub fn open(opts: &DiskOptions) -> Result<Self> {
        let disk = open_disk(opts)?;
        let id = opts
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Block::new(disk, opts.read_only, &id))
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        // max_discard_sectors, max_discard_seg, discard_sector_alignment
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        // max_write_zeroes_sectors, max_write_zeroes_seg, may_unmap
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c
    }

    /// A request handler owning the disk, for direct use (tests).
    pub fn take_handler(&mut self) -> Option<BlockHandler> {
        let disk = self
            .disk
            .take()
            .or_else(|| devices::bus::lock(&self.disk_back).take())?;
        Some(BlockHandler {
            disk,
            capacity: self.capacity,
            read_only: self.read_only,
            id: self.id,
            give_back: self.disk_back.clone(),
        })
    }
}

/// Processes virtio-blk requests against a disk.
pub struct BlockHandler {
    disk: Box<dyn DiskBackend>,
    capacity: u64,
    read_only: bool,
    id: [u8; 20],
    give_back: std::sync::Arc<std::sync::Mutex<Option<Box<dyn DiskBackend>>>>,
}

impl Drop for BlockHandler {
    fn drop(&mut self) {
        // Hand the disk back to the device so a reset + re-activation works.
        let disk = std::mem::replace(&mut self.disk, Box::new(NoDisk));
        *devices::bus::lock(&self.give_back) = Some(disk);
    }
}

struct NoDisk;
impl DiskBackend for NoDisk {
    fn size(&self) -> u64 {
        0
    }
    fn read_at(&mut self, _: &mut [u8], _: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::NotConnected.into())
    }
    fn write_at(&mut self, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::NotConnected.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, _: u64, _: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::NotConnected.into())
    }
}

/// Splits the writable segments into (data, status byte address).
fn split_status(w: &[Seg]) -> Option<(Vec<Seg>, u64)> {
    let last = w.last()?;
    if last.len == 0 {
        return None;
    }
    let status = last.addr.checked_add(last.len as u64 - 1)?;
    let mut data = w.to_vec();
    let l = data.len() - 1;
    data[l].len -= 1;
    if data[l].len == 0 {
        data.pop();
    }
    Some((data, status))
}

impl BlockHandler {
    fn in_range(&self, sector: u64, bytes: u64) -> bool {
        bytes.is_multiple_of(SECTOR)
            && sector
                .checked_add(bytes / SECTOR)
                .is_some_and(|end| end <= self.capacity)
    }

    /// Executes one request; returns (status, bytes written to the guest
    /// before the status byte).
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        obs: &dyn MemWriteObserver,
        readable: &[Seg],
        wdata: &[Seg],
    ) -> (u8, u32) {
        let mut hdr = [0u8; 16];
        if gather(mem, readable, 0, &mut hdr) != Some(16) {
            return (S_IOERR, 0);
        }
        let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        let rlen: u64 = readable.iter().map(|s| s.len as u64).sum::<u64>() - 16;
        let wlen: u64 = wdata.iter().map(|s| s.len as u64).sum();
        if wdata.len() + readable.len() > SEG_MAX as usize + 2
            || wdata
                .iter()
                .chain(readable.iter())
                .any(|s| s.len > SIZE_MAX.max(16))
        {
            return (S_IOERR, 0);
        }
        match ty {
            T_IN => {
                if !self.in_range(sector, wlen) || wlen > MAX_REQUEST_BYTES {
                    return (S_IOERR, 0);
                }
                let mut buf = vec![0u8; wlen as usize];
                if self.disk.read_at(&mut buf, sector * SECTOR).is_err() {
                    return (S_IOERR, 0);
                }
                match scatter(mem, obs, wdata, 0, &buf) {
                    Some(n) => (S_OK, n as u32),
                    None => (S_IOERR, 0),
                }
            }
            T_OUT => {
                if self.read_only || !self.in_range(sector, rlen) || rlen > MAX_REQUEST_BYTES {
                    return (S_IOERR, 0);
                }
                let mut buf = vec![0u8; rlen as usize];
                if gather(mem, readable, 16, &mut buf) != Some(buf.len()) {
                    return (S_IOERR, 0);
                }
                match self.disk.write_at(&buf, sector * SECTOR) {
                    Ok(()) => (S_OK, 0),
                    Err(_) => (S_IOERR, 0),
                }
            }
            T_FLUSH => match self.disk.flush() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush failed: {e}");
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => match scatter(mem, obs, wdata, 0, &self.id[..(wlen.min(20) as usize)]) {
                Some(n) => (S_OK, n as u32),
                None => (S_IOERR, 0),
            },
            T_DISCARD | T_WRITE_ZEROES => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                // Segments of {sector u64, num_sectors u32, flags u32}.
                if rlen == 0 || !rlen.is_multiple_of(16) || rlen > 16 * 64 {
                    return (S_IOERR, 0);
                }
                let mut segs = vec![0u8; rlen as usize];
                if gather(mem, readable, 16, &mut segs) != Some(segs.len()) {
                    return (S_IOERR, 0);
                }
                for s in segs.chunks_exact(16) {
                    let start = u64::from_le_bytes(s[0..8].try_into().unwrap_or_default());
                    let num = u32::from_le_bytes(s[8..12].try_into().unwrap_or_default());
                    let flags = u32::from_le_bytes(s[12..16].try_into().unwrap_or_default());
                    if num > MAX_DISCARD_SECTORS
                        || !self.in_range(start, num as u64 * SECTOR)
                        || flags & !1 != 0
                    {
                        return (S_IOERR, 0);
                    }
                    let r = if ty == T_DISCARD {
                        self.disk.discard(start * SECTOR, num as u64 * SECTOR)
                    } else {
                        self.disk.write_zeroes(start * SECTOR, num as u64 * SECTOR)
                    };
                    if r.is_err() {
                        return (S_IOERR, 0);
                    }
                }
                (S_OK, 0)
            }
            _ => (S_UNSUPP, 0),
        }
    }
}

impl QueueHandler for BlockHandler {
    fn process(
        &mut self,
        _index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        obs: &dyn MemWriteObserver,
    ) -> bool {
        let mut any = false;
        let max_descs = SEG_MAX as usize + 2;
        while let Some(chain) = pop_chain(queue, mem, max_descs, MAX_REQUEST_BYTES + 4096) {
            any = true;
            let readable: Vec<Seg> = chain.readable().collect();
            let writable: Vec<Seg> = chain.writable().collect();
            let Some((wdata, status_addr)) = split_status(&writable) else {
                complete(queue, mem, obs, chain.head, 0);
                continue;
            };
            let (status, n) = if chain.segs.is_err() {
                (S_IOERR, 0)
            } else {
                self.execute(mem, obs, &readable, &wdata)
            };
            let len = match scatter(
                mem,
                obs,
                &[Seg {
                    addr: status_addr,
                    len: 1,
                    write: true,
                }],
                0,
                &[status],
            ) {
                Some(1) => n + 1,
                _ => n,
            };
            complete(queue, mem, obs, chain.head, len);
        }
        any
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn device_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.read_only {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::copy_config(&self.config_bytes(), offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        let h = self
            .take_handler()
            .ok_or_else(|| Error::Activate("disk already in use".into()))?;
        self.worker = Some(Worker::spawn("virtio-blk", h, ctx)?);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        // The handler's Drop returned the disk; flush what the guest wrote.
        if let Some(d) = devices::bus::lock(&self.disk_back).as_mut() {
            let _ = d.flush();
        }
        true
    }
}
