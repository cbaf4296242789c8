//! Transport and device-model tests, including a seeded random
//! ("fuzz") test that feeds hostile descriptor tables to every device.

use std::sync::{Arc, Mutex};

use devices::irq::RecordingIrq;
use devices::pci::PciDevice;
use devices::{InterruptRequest, InterruptSink, MmioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::blk::{Block, DiskBackend, S_IOERR, S_OK, S_UNSUPP};
use crate::pci::*;
use crate::queue::{drain_queue, FnObserver, QueueHandler};
use crate::{Console, Rng, VirtioPciDevice, VIRTIO_F_VERSION_1};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;

#[derive(Default)]
struct Sink(Mutex<Vec<InterruptRequest>>);
impl InterruptSink for Sink {
    fn deliver(&self, r: InterruptRequest) {
        self.0.lock().unwrap().push(r);
    }
}

fn mem() -> GuestMemoryMmap {
    // Two regions with a hole between them.
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)])
        .unwrap()
}

/// A split ring at DESC/AVAIL/USED that tests fill by hand.
struct Ring {
    q: Queue,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    fn new(m: &GuestMemoryMmap) -> Ring {
        let mut q = Queue::new(QSIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        m.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
        Ring {
            q,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Adds a chain of (addr, len, device-writable) descriptors.
    fn add(&mut self, m: &GuestMemoryMmap, segs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in segs.iter().enumerate() {
            let idx = self.next_desc;
            let last = i + 1 == segs.len();
            let flags: u16 = if last { 0 } else { 1 } | if w { 2 } else { 0 };
            let d = DESC + 16 * idx as u64;
            m.write_obj(addr, GuestAddress(d)).unwrap();
            m.write_obj(len, GuestAddress(d + 8)).unwrap();
            m.write_obj(flags, GuestAddress(d + 12)).unwrap();
            m.write_obj(idx + 1, GuestAddress(d + 14)).unwrap();
            self.next_desc += 1;
        }
        m.write_obj(
            head,
            GuestAddress(AVAIL + 4 + 2 * (self.avail_idx % QSIZE) as u64),
        )
        .unwrap();
        self.avail_idx += 1;
        m.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        head
    }

    fn used(&self, m: &GuestMemoryMmap, n: u16) -> (u32, u32) {
        let e = USED + 4 + 8 * (n % QSIZE) as u64;
        (
            m.read_obj(GuestAddress(e)).unwrap(),
            m.read_obj(GuestAddress(e + 4)).unwrap(),
        )
    }

    fn used_idx(&self, m: &GuestMemoryMmap) -> u16 {
        m.read_obj(GuestAddress(USED + 2)).unwrap()
    }
}

/// An in-memory disk.
struct MemDisk(Arc<Mutex<Vec<u8>>>);
impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }
}

fn in_memory(m: &GuestMemoryMmap, gpa: u64, len: u64) -> bool {
    len == 0
        || m.iter().any(|r| {
            gpa >= r.start_addr().0
                && gpa
                    .checked_add(len)
                    .is_some_and(|e| e <= r.start_addr().0 + r.len())
        })
}

fn checking_observer(m: &GuestMemoryMmap) -> FnObserver<impl Fn(u64, u64) + Send + Sync> {
    let m2 = m.clone();
    FnObserver(move |gpa, len| {
        assert!(
            in_memory(&m2, gpa, len),
            "device reported a write outside RAM: {gpa:#x}+{len:#x}"
        )
    })
}

fn blk_header(m: &GuestMemoryMmap, at: u64, ty: u32, sector: u64) {
    m.write_obj(ty, GuestAddress(at)).unwrap();
    m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    m.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

#[test]
fn blk_requests() {
    let m = mem();
    let obs = checking_observer(&m);
    let data = Arc::new(Mutex::new(vec![0u8; 64 * 512]));
    data.lock().unwrap()[512..516].copy_from_slice(b"ABCD");
    let mut dev = Block::new(Box::new(MemDisk(data.clone())), false, "serial-1");
    let mut h = dev.take_handler().unwrap();
    let mut r = Ring::new(&m);

    // IN sector 1.
    blk_header(&m, 0x4000, 0, 1);
    r.add(
        &m,
        &[(0x4000, 16, false), (0x5000, 512, true), (0x6000, 1, true)],
    );
    // OUT sector 2.
    blk_header(&m, 0x4100, 1, 2);
    m.write_slice(&[7u8; 512], GuestAddress(0x7000)).unwrap();
    r.add(
        &m,
        &[(0x4100, 16, false), (0x7000, 512, false), (0x6001, 1, true)],
    );
    // Out of range IN (sector 64 is past the end).
    blk_header(&m, 0x4200, 0, 64);
    r.add(
        &m,
        &[(0x4200, 16, false), (0x5000, 512, true), (0x6002, 1, true)],
    );
    // GET_ID.
    blk_header(&m, 0x4300, 8, 0);
    r.add(
        &m,
        &[(0x4300, 16, false), (0x8000, 20, true), (0x6003, 1, true)],
    );
    // Unknown type.
    blk_header(&m, 0x4400, 99, 0);
    r.add(&m, &[(0x4400, 16, false), (0x6004, 1, true)]);

    assert!(drain_queue(&mut h, 0, &mut r.q, &m, &obs, None));
    assert_eq!(r.used_idx(&m), 5);
    let st = |i: u64| m.read_obj::<u8>(GuestAddress(0x6000 + i)).unwrap();
    assert_eq!(st(0), S_OK);
    let mut b = [0u8; 4];
    m.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
    assert_eq!(&b, b"ABCD");
    assert_eq!(r.used(&m, 0).1, 513);
    assert_eq!(st(1), S_OK);
    assert_eq!(data.lock().unwrap()[1024..1536], [7u8; 512]);
    assert_eq!(st(2), S_IOERR);
    assert_eq!(st(3), S_OK);
    let mut id = [0u8; 8];
    m.read_slice(&mut id, GuestAddress(0x8000)).unwrap();
    assert_eq!(&id, b"serial-1");
    assert_eq!(st(4), S_UNSUPP);

    // Data buffer in the hole between the RAM regions.
    let mut r = Ring::new(&m);
    blk_header(&m, 0x4500, 0, 0);
    r.add(
        &m,
        &[(0x4500, 16, false), (0x18000, 512, true), (0x6005, 1, true)],
    );
    drain_queue(&mut h, 0, &mut r.q, &m, &obs, None);
    assert_eq!(r.used_idx(&m), 1);
    assert_eq!(st(5), S_IOERR);
}

#[test]
fn blk_read_only_refuses_writes() {
    let m = mem();
    let obs = checking_observer(&m);
    let data = Arc::new(Mutex::new(vec![1u8; 8 * 512]));
    let mut dev = Block::new(Box::new(MemDisk(data.clone())), true, "ro");
    assert_ne!(
        crate::VirtioDevice::device_features(&dev) & (1 << 5),
        0,
        "VIRTIO_BLK_F_RO advertised"
    );
    let mut h = dev.take_handler().unwrap();
    let mut r = Ring::new(&m);
    blk_header(&m, 0x4000, 1, 0);
    r.add(
        &m,
        &[(0x4000, 16, false), (0x7000, 512, false), (0x6000, 1, true)],
    );
    blk_header(&m, 0x4100, 13, 0); // WRITE_ZEROES
    m.write_obj([0u64, 1u64], GuestAddress(0x7200)).unwrap();
    r.add(
        &m,
        &[(0x4100, 16, false), (0x7200, 16, false), (0x6001, 1, true)],
    );
    drain_queue(&mut h, 0, &mut r.q, &m, &obs, None);
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x6000)).unwrap(), S_IOERR);
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x6001)).unwrap(), S_IOERR);
    assert!(data.lock().unwrap().iter().all(|&b| b == 1));
}

#[test]
fn rng_and_console() {
    let m = mem();
    let obs = checking_observer(&m);
    let mut r = Ring::new(&m);
    r.add(&m, &[(0x5000, 64, true)]);
    r.add(&m, &[(0x5100, 8, false)]); // wrong direction: nothing written
    let mut h = crate::rng::RngHandler::new().unwrap();
    drain_queue(&mut h, 0, &mut r.q, &m, &obs, None);
    assert_eq!(r.used(&m, 0).1, 64);
    assert_eq!(r.used(&m, 1).1, 0);
    let mut b = [0u8; 64];
    m.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
    assert!(b.iter().any(|&x| x != 0));

    let out = Arc::new(Mutex::new(Vec::new()));
    struct W(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for W {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let con = Console::new(Box::new(W(out.clone()))).unwrap();
    let mut h = con.handler();
    let mut tx = Ring::new(&m);
    m.write_slice(b"hello hvc0", GuestAddress(0x9000)).unwrap();
    tx.add(&m, &[(0x9000, 10, false)]);
    drain_queue(&mut h, 1, &mut tx.q, &m, &obs, None);
    assert_eq!(&out.lock().unwrap()[..], b"hello hvc0");
    let mut rx = Ring::new(&m);
    rx.add(&m, &[(0xa000, 4, true)]);
    rx.add(&m, &[(0xa100, 64, true)]);
    con.input().push(b"typed!");
    drain_queue(&mut h, 0, &mut rx.q, &m, &obs, None);
    assert_eq!(rx.used(&m, 0).1, 4);
    assert_eq!(rx.used(&m, 1).1, 2);
    let mut b = [0u8; 4];
    m.read_slice(&mut b, GuestAddress(0xa000)).unwrap();
    assert_eq!(&b, b"type");
}

/// xorshift64*: deterministic, seedable.
struct Rand(u64);
impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_addr(r: &mut Rand) -> u64 {
    match r.below(6) {
        0 => r.below(0x10000),
        1 => 0x20000 + r.below(0x10000),
        2 => 0x10000 - r.below(64),      // straddles the end of region 0
        3 => 0x10000 + r.below(0x10000), // the hole
        4 => u64::MAX - r.below(4096),
        _ => r.next(),
    }
}

fn random_len(r: &mut Rand) -> u32 {
    match r.below(5) {
        0 => 0,
        1 => r.below(32) as u32,
        2 => r.below(4096) as u32,
        3 => 512 * r.below(8) as u32 + r.below(2) as u32,
        _ => r.next() as u32,
    }
}

/// Fills the descriptor table and avail ring with random content (some of
/// it well-formed block requests) and runs the handler.
fn fuzz_one<H: QueueHandler>(h: &mut H, index: u16, r: &mut Rand, m: &GuestMemoryMmap) {
    let obs = checking_observer(m);
    let mut q = Queue::new(QSIZE).unwrap();
    q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_ready(true);
    // Plausible request headers in RAM for descriptors to point at.
    for i in 0..8u64 {
        let ty = [0u32, 1, 4, 8, 11, 13, 99][r.below(7) as usize];
        blk_header(m, 0x4000 + 16 * i, ty, r.below(80));
    }
    for i in 0..QSIZE as u64 {
        let d = DESC + 16 * i;
        let addr = if r.below(3) == 0 {
            0x4000 + 16 * r.below(8)
        } else {
            random_addr(r)
        };
        let len = if (0x4000..0x4080).contains(&addr) {
            16
        } else {
            random_len(r)
        };
        let mut flags = r.below(8) as u16; // NEXT, WRITE, INDIRECT
        if r.below(4) == 0 {
            flags = 1; // long chains
        }
        let next = r.below(QSIZE as u64 + 4) as u16;
        m.write_obj(addr, GuestAddress(d)).unwrap();
        m.write_obj(len, GuestAddress(d + 8)).unwrap();
        m.write_obj(flags, GuestAddress(d + 12)).unwrap();
        m.write_obj(next, GuestAddress(d + 14)).unwrap();
    }
    let n = r.below(QSIZE as u64 * 2) as u16; // sometimes more than the ring holds
    for i in 0..QSIZE as u64 {
        let head = r.below(QSIZE as u64 + 2) as u16;
        m.write_obj(head, GuestAddress(AVAIL + 4 + 2 * i)).unwrap();
    }
    m.write_obj(n, GuestAddress(AVAIL + 2)).unwrap();
    let _ = drain_queue(h, index, &mut q, m, &obs, None);
}

#[test]
fn fuzz_devices_with_random_descriptor_tables() {
    let m = mem();
    let seed = std::env::var("VIRTIO_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1234_5678_9abc_def1u64);
    let mut r = Rand(seed | 1);
    let data = Arc::new(Mutex::new(vec![0u8; 64 * 512]));
    let mut blk = Block::new(Box::new(MemDisk(data.clone())), false, "fuzz");
    let mut blk = blk.take_handler().unwrap();
    let mut blk_ro = Block::new(Box::new(MemDisk(data)), true, "fuzz-ro");
    let mut blk_ro = blk_ro.take_handler().unwrap();
    let mut rng = crate::rng::RngHandler::new().unwrap();
    let con = Console::new(Box::new(std::io::sink())).unwrap();
    let mut con_h = con.handler();
    for i in 0..3000 {
        match i % 5 {
            0 => fuzz_one(&mut blk, 0, &mut r, &m),
            1 => fuzz_one(&mut blk_ro, 0, &mut r, &m),
            2 => fuzz_one(&mut rng, 0, &mut r, &m),
            3 => {
                con.input().push(b"some input bytes");
                fuzz_one(&mut con_h, 0, &mut r, &m)
            }
            _ => fuzz_one(&mut con_h, 1, &mut r, &m),
        }
    }
}

// --- transport ---------------------------------------------------------

struct Pci {
    dev: VirtioPciDevice,
    sink: Arc<Sink>,
    intx: Arc<RecordingIrq>,
}

fn pci_rng(m: &GuestMemoryMmap) -> Pci {
    let sink = Arc::new(Sink::default());
    let intx = Arc::new(RecordingIrq::default());
    let dev = VirtioPciDevice::new(
        Box::new(Rng::new()),
        m.clone(),
        Arc::new(crate::NullObserver),
        sink.clone(),
        intx.clone(),
    )
    .unwrap();
    Pci { dev, sink, intx }
}

fn rd(d: &mut VirtioPciDevice, off: u64, size: usize) -> u64 {
    let mut b = [0u8; 8];
    d.mmio_read(off, &mut b[..size]);
    u64::from_le_bytes(b)
}

fn wr(d: &mut VirtioPciDevice, off: u64, size: usize, v: u64) {
    d.mmio_write(off, &v.to_le_bytes()[..size]);
}

/// Walks the capability list: (id, offset) pairs.
fn caps(d: &mut VirtioPciDevice) -> Vec<(u8, u16)> {
    let mut out = Vec::new();
    let mut p = (d.config_read(0x34) & 0xff) as u16;
    while p != 0 && out.len() < 32 {
        let v = d.config_read(p);
        out.push((v as u8, p));
        p = ((v >> 8) & 0xff) as u16;
    }
    out
}

fn setup_queue(d: &mut VirtioPciDevice, size: u16) {
    wr(d, 0x16, 2, 0);
    assert_eq!(rd(d, 0x18, 2), 256, "max queue size");
    wr(d, 0x18, 2, size as u64);
    wr(d, 0x20, 4, DESC);
    wr(d, 0x24, 4, 0);
    wr(d, 0x28, 8, AVAIL);
    wr(d, 0x30, 4, USED);
    wr(d, 0x34, 4, 0);
    wr(d, 0x1c, 2, 1);
}

fn negotiate(d: &mut VirtioPciDevice) {
    wr(d, 0x14, 1, (STATUS_ACKNOWLEDGE | STATUS_DRIVER) as u64);
    wr(d, 0x08, 4, 1);
    wr(d, 0x0c, 4, VIRTIO_F_VERSION_1 >> 32);
    wr(d, 0x08, 4, 0);
    wr(d, 0x0c, 4, 0);
    wr(
        d,
        0x14,
        1,
        (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK) as u64,
    );
    assert_ne!(rd(d, 0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed().as_secs() < 10, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn pci_config_space_and_capabilities() {
    let m = mem();
    let mut p = pci_rng(&m);
    let d = &mut p.dev;
    assert_eq!(d.config_read(0), 0x1044_1af4);
    assert_eq!(d.config_read(0x08) & 0xff, 1, "modern revision");
    let cs = caps(d);
    let mut types = Vec::new();
    for &(id, off) in &cs {
        if id == 0x09 {
            let t = (d.config_read(off) >> 24) as u8;
            let bar = d.config_read(off + 4) as u8;
            assert_eq!(bar, 0);
            types.push(t);
        }
    }
    types.sort();
    assert_eq!(types, vec![1, 2, 3, 4]);
    let msix = cs.iter().find(|c| c.0 == 0x11).expect("MSI-X capability").1;
    assert_eq!((d.config_read(msix) >> 16) & 0x7ff, 1, "2 vectors");
    assert_eq!(d.config_read(msix + 4), MSIX_TABLE_OFF as u32);
    // BAR sizing.
    d.config_write(0x10, &u32::MAX.to_le_bytes());
    assert_eq!(d.config_read(0x10), !(BAR_SIZE as u32 - 1));
    d.set_bar_address(0xc000_8000);
    assert_eq!(d.bar_address(), 0xc000_8000);
    assert_eq!(d.bar_range(), None, "memory decoding off");
    d.config_write(0x04, &[0x06]);
    assert_eq!(d.bar_range(), Some((0xc000_8000, BAR_SIZE)));
}

#[test]
fn pci_feature_negotiation() {
    let m = mem();
    let mut p = pci_rng(&m);
    let d = &mut p.dev;
    wr(d, 0x00, 4, 1);
    assert_eq!(rd(d, 0x04, 4), 1, "VERSION_1 offered");
    // Accepting an unoffered feature (bit 0) fails FEATURES_OK.
    wr(d, 0x14, 1, 3);
    wr(d, 0x08, 4, 0);
    wr(d, 0x0c, 4, 1);
    wr(d, 0x08, 4, 1);
    wr(d, 0x0c, 4, 1);
    wr(d, 0x14, 1, 0xb);
    assert_eq!(rd(d, 0x14, 1), 3);
    // Without VERSION_1 too.
    wr(d, 0x14, 1, 0);
    wr(d, 0x14, 1, 3);
    wr(d, 0x14, 1, 0xb);
    assert_eq!(rd(d, 0x14, 1), 3);
    wr(d, 0x14, 1, 0);
    negotiate(d);
    // DRIVER_OK without valid queues: a queue outside RAM -> NEEDS_RESET.
    wr(d, 0x16, 2, 0);
    wr(d, 0x20, 8, 0x18000);
    wr(d, 0x28, 8, AVAIL);
    wr(d, 0x30, 8, USED);
    wr(d, 0x1c, 2, 1);
    wr(d, 0x14, 1, 0xf);
    assert_ne!(rd(d, 0x14, 1) as u8 & STATUS_NEEDS_RESET, 0);
    wr(d, 0x14, 1, 0);
    assert_eq!(rd(d, 0x14, 1), 0);
    assert_eq!(rd(d, 0x1c, 2), 0, "reset clears queue_enable");
    assert_eq!(rd(d, 0x18, 2), 256, "reset restores the size");
}

#[test]
fn pci_intx_and_isr() {
    let m = mem();
    let mut p = pci_rng(&m);
    let d = &mut p.dev;
    negotiate(d);
    setup_queue(d, QSIZE);
    let mut ring = Ring::new(&m);
    ring.add(&m, &[(0x5000, 32, true)]);
    wr(d, 0x14, 1, 0xf);
    assert_eq!(rd(d, 0x14, 1), 0xf);
    wr(d, NOTIFY_OFF, 2, 0);
    let irq = d.interrupt();
    wait_for("ISR", || irq.isr() & 1 != 0);
    assert!(p.intx.level());
    assert_eq!(rd(d, ISR_OFF, 1), 1, "ISR queue bit");
    assert!(!p.intx.level(), "reading ISR deasserts INTx");
    assert_eq!(rd(d, ISR_OFF, 1), 0);
    assert_eq!(ring.used_idx(&m), 1);
    assert!(p.sink.0.lock().unwrap().is_empty());
    wr(d, 0x14, 1, 0);
}

#[test]
fn pci_msix_delivery_masking_and_pba() {
    let m = mem();
    let mut p = pci_rng(&m);
    let d = &mut p.dev;
    let msix = caps(d).into_iter().find(|c| c.0 == 0x11).unwrap().1;
    // Enable MSI-X; table size bits stay read-only.
    d.config_write(msix + 2, &0xffffu16.to_le_bytes());
    assert_eq!(d.config_read(msix) >> 16, 0xc001);
    d.config_write(msix + 2, &0x8000u16.to_le_bytes());
    // Vector 1: APIC 0, vector 0x41, still masked.
    wr(d, MSIX_TABLE_OFF + 16, 4, 0xfee0_0000);
    wr(d, MSIX_TABLE_OFF + 20, 4, 0);
    wr(d, MSIX_TABLE_OFF + 24, 4, 0x41);
    negotiate(d);
    setup_queue(d, QSIZE);
    wr(d, 0x1a, 2, 1);
    assert_eq!(rd(d, 0x1a, 2), 1);
    wr(d, 0x1a, 2, 7);
    assert_eq!(rd(d, 0x1a, 2), NO_VECTOR as u64, "invalid vector refused");
    wr(d, 0x1a, 2, 1);
    let mut ring = Ring::new(&m);
    ring.add(&m, &[(0x5000, 32, true)]);
    wr(d, 0x14, 1, 0xf);
    wr(d, NOTIFY_OFF, 2, 0);
    wait_for("PBA bit", || {
        let mut b = [0u8; 8];
        p.dev.mmio_read(MSIX_PBA_OFF, &mut b);
        b[0] & 2 != 0
    });
    let d = &mut p.dev;
    assert!(
        p.sink.0.lock().unwrap().is_empty(),
        "masked vector must not fire"
    );
    wr(d, MSIX_TABLE_OFF + 28, 4, 0); // unmask
    assert_eq!(rd(d, MSIX_PBA_OFF, 8) & 2, 0);
    {
        let s = p.sink.0.lock().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].vector, 0x41);
    }
    ring.add(&m, &[(0x5100, 32, true)]);
    wr(d, NOTIFY_OFF, 2, 0);
    wait_for("second MSI", || p.sink.0.lock().unwrap().len() == 2);
    assert_eq!(p.intx.take_edges(), 0, "no INTx while MSI-X is on");
    wr(&mut p.dev, 0x14, 1, 0);
}
