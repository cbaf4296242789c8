//! Boot loader tests. Synthetic images cover the logic and the error
//! paths; the `real_kernel_*` tests (ignored by default) use Debian's
//! kernel from guest/out/vmlinuz (build it with guest/build.sh) or the
//! file named by $MATRYOSHKA_KERNEL.

use std::io::Write;
use std::path::PathBuf;

use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use x86::state::{cr0, cr4, efer, CS, DS, ES, RSI, SS};

use super::image::*;
use super::layout::*;
use super::*;

type Mem = GuestMemoryMmap<()>;

const MIB: u64 = 1 << 20;
const ELF_LOAD: u64 = 0x100_0000;

fn guest(mem_size: u64) -> (Mem, Layout) {
    let layout = Layout::new(mem_size);
    let mem = Mem::from_ranges(&layout.ram).expect("guest memory");
    (mem, layout)
}

/// A per-test scratch directory (removed on drop).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "mat-boot-{}-{}-{:?}",
            name,
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    fn file(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, data).expect("write scratch file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Tiny x86-64 ELF: one PT_LOAD at ELF_LOAD with `code` plus 0x1000 bss.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; 0x78];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // ELF64
    e[5] = 1; // little endian
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    e[24..32].copy_from_slice(&(ELF_LOAD + 0x10).to_le_bytes()); // entry
    e[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut e[0x40..0x78];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[8..16].copy_from_slice(&0x78u64.to_le_bytes()); // offset
    ph[16..24].copy_from_slice(&(0xffff_ffff_8100_0000u64).to_le_bytes()); // vaddr
    ph[24..32].copy_from_slice(&ELF_LOAD.to_le_bytes()); // paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64 + 0x1000).to_le_bytes());
    e.extend_from_slice(code);
    e
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut opts = lzma_rust2::XzOptions::with_preset(1);
    opts.set_check_sum_type(lzma_rust2::CheckType::Crc32);
    opts.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
    let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).expect("xz writer");
    w.write_all(data).expect("xz write");
    let mut out = w.finish().expect("xz finish");
    // Like the kernel build: decompressed size appended after the stream.
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// A bzImage-shaped blob: 2 setup sectors + protected-mode code whose
/// payload is `payload` at offset 0x200 (where startup_64 would be).
fn tiny_bzimage(version: u16, xloadflags: u16, payload: &[u8]) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut img = vec![0u8; (setup_sects as usize + 1) * 512];
    img[0x1f1] = setup_sects;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x200] = 0xeb; // jmp
    img[0x201] = 0x6a; // header ends at 0x26c
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    img[0x211] = LOADED_HIGH;
    img[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes());
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    img[0x234] = 1; // relocatable
    img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
    img[0x238..0x23c].copy_from_slice(&255u32.to_le_bytes()); // cmdline_size
    img[0x248..0x24c].copy_from_slice(&0x200u32.to_le_bytes()); // payload_offset
    img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    img[0x258..0x260].copy_from_slice(&ELF_LOAD.to_le_bytes()); // pref_address
    img[0x260..0x264].copy_from_slice(&(4 * MIB as u32).to_le_bytes()); // init_size
    img.extend_from_slice(&[0x90; 0x200]);
    img.extend_from_slice(payload);
    img
}

fn code() -> Vec<u8> {
    (0..0x300u32).map(|i| (i * 7) as u8).collect()
}

fn params(mem: &Mem) -> boot_params {
    mem.read_obj(GuestAddress(ZERO_PAGE)).expect("boot_params")
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn read(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr))
        .expect("guest read");
    v
}

fn u64_at(mem: &Mem, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).expect("guest read")
}

/// Translate a virtual address through the boot page tables.
fn walk(mem: &Mem, cr3: u64, va: u64) -> Option<u64> {
    let pml4e = u64_at(mem, cr3 + ((va >> 39) & 511) * 8);
    if pml4e & 1 == 0 {
        return None;
    }
    let pdpte = u64_at(
        mem,
        (pml4e & 0x000f_ffff_ffff_f000) + ((va >> 30) & 511) * 8,
    );
    if pdpte & 1 == 0 {
        return None;
    }
    if pdpte & 0x80 != 0 {
        return Some((pdpte & 0x000f_ffff_c000_0000) | (va & 0x3fff_ffff));
    }
    let pde = u64_at(
        mem,
        (pdpte & 0x000f_ffff_ffff_f000) + ((va >> 21) & 511) * 8,
    );
    if pde & 1 == 0 || pde & 2 == 0 {
        return None;
    }
    assert!(pde & 0x80 != 0, "expected 2 MiB pages");
    Some((pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff))
}

fn check_cpu_and_tables(mem: &Mem, r: &BootResult) {
    let s = &r.cpu;
    assert_eq!(s.rip, r.entry);
    assert_eq!(s.gpr[RSI], ZERO_PAGE);
    assert_eq!(s.rflags, 2);
    assert_eq!(s.cr0 & (cr0::PE | cr0::PG), cr0::PE | cr0::PG);
    assert!(s.cr4 & cr4::PAE != 0);
    assert_eq!(s.efer & (efer::LME | efer::LMA), efer::LME | efer::LMA);
    assert!(s.long_mode());
    assert_eq!(s.seg[CS].selector, 0x10);
    assert!(s.seg[CS].long() && s.seg[CS].present());
    for i in [DS, ES, SS] {
        assert_eq!(s.seg[i].selector, 0x18);
        assert_eq!(s.seg[i].limit, 0xffff_ffff);
    }
    // GDT in memory matches the cached descriptors.
    for (sel, seg) in [(0x10u64, s.seg[CS]), (0x18, s.seg[DS])] {
        let raw = u64_at(mem, s.gdtr.base + sel);
        assert_eq!(Segment::from_descriptor(sel as u16, raw), seg);
    }
    assert!(s.gdtr.limit as u64 >= 0x1f);
    // Identity map of 0..4 GiB.
    for va in (0..IDENTITY_MAP_SIZE).step_by(0x20_0000) {
        assert_eq!(
            walk(mem, s.cr3, va + 0x1234),
            Some(va + 0x1234),
            "va {va:#x}"
        );
    }
    assert_eq!(walk(mem, s.cr3, IDENTITY_MAP_SIZE), None);
}

/// Parse RSDP → XSDT → tables and check every checksum.
fn check_acpi(mem: &Mem, rsdp_addr: u64, cpus: u8) {
    let rsdp = read(mem, rsdp_addr, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
    let table = |addr: u64| {
        let hdr = read(mem, addr, 36);
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        let t = read(mem, addr, len);
        assert_eq!(
            sum(&t),
            0,
            "checksum of {}",
            String::from_utf8_lossy(&t[..4])
        );
        t
    };
    let xsdt = table(xsdt_addr);
    assert_eq!(&xsdt[..4], b"XSDT");
    let mut sigs = Vec::new();
    for e in xsdt[36..].chunks(8) {
        let t = table(u64::from_le_bytes(e.try_into().unwrap()));
        sigs.push(t[..4].to_vec());
        match &t[..4] {
            b"FACP" => {
                assert_eq!(t.len(), 276);
                assert_eq!(u16::from_le_bytes([t[46], t[47]]), 9, "SCI_INT");
                assert_eq!(
                    u32::from_le_bytes(t[48..52].try_into().unwrap()),
                    0,
                    "SMI_CMD"
                );
                let flags = u32::from_le_bytes(t[112..116].try_into().unwrap());
                assert!(flags & (1 << 20) == 0, "not HW-reduced");
                assert!(flags & (1 << 10) != 0, "RESET_REG_SUP");
                assert_eq!(t[116], 1, "reset reg in system I/O");
                assert_eq!(u64::from_le_bytes(t[120..128].try_into().unwrap()), 0xcf9);
                assert_eq!(t[128], 6);
                let dsdt = table(u64::from_le_bytes(t[140..148].try_into().unwrap()));
                assert_eq!(&dsdt[..4], b"DSDT");
                let has = |n: &[u8]| dsdt.windows(n.len()).any(|w| w == n);
                for n in [&b"_S5_"[..], b"PCI0", b"_PRT", b"COM1", b"_CRS"] {
                    assert!(has(n), "DSDT lacks {}", String::from_utf8_lossy(n));
                }
                let facs = u64::from_le_bytes(t[132..140].try_into().unwrap());
                assert_eq!(facs % 64, 0);
                assert_eq!(read(mem, facs, 4), b"FACS");
            }
            b"APIC" => {
                assert_eq!(
                    u32::from_le_bytes(t[36..40].try_into().unwrap()),
                    0xfee0_0000
                );
                assert_eq!(u32::from_le_bytes(t[40..44].try_into().unwrap()) & 1, 1);
                let mut counts = [0usize; 16];
                let mut off = 44;
                while off < t.len() {
                    let (ty, len) = (t[off] as usize, t[off + 1] as usize);
                    assert!(len >= 2);
                    counts[ty.min(15)] += 1;
                    if ty == 0 {
                        assert_eq!(t[off + 3] as usize, counts[0] - 1, "APIC id");
                        assert_eq!(t[off + 4] & 1, 1, "enabled");
                    }
                    if ty == 1 {
                        let a = u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap());
                        assert_eq!(a as u64, IOAPIC_ADDR);
                    }
                    off += len;
                }
                assert_eq!(off, t.len());
                assert_eq!(counts[0], cpus as usize, "local APICs");
                assert_eq!(counts[1], 1, "IOAPIC");
                assert_eq!(counts[2], 2, "interrupt source overrides");
                assert_eq!(counts[4], 1, "LAPIC NMI");
            }
            other => panic!("unexpected table {other:?}"),
        }
    }
    assert_eq!(sigs.len(), 2);
}

fn check_e820(p: &boot_params, layout: &Layout) {
    let n = p.e820_entries as usize;
    assert_eq!(n, layout.e820.len());
    for (raw, e) in p.e820_table[..n].iter().zip(&layout.e820) {
        let (addr, size, ty) = (raw.addr, raw.size, raw.type_);
        assert_eq!((addr, size, ty), (e.addr, e.size, e.kind as u32));
    }
}

#[test]
fn layout_small_and_large() {
    let l = Layout::new(512 * MIB);
    assert_eq!(l.ram, vec![(GuestAddress(0), 512 * MIB as usize)]);
    assert_eq!(l.e820.len(), 3);
    assert_eq!(
        l.e820[0],
        E820Entry {
            addr: 0,
            size: 0x9fc00,
            kind: E820Type::Ram
        }
    );
    assert_eq!(l.e820[1].kind, E820Type::Reserved);
    assert_eq!(
        l.e820[2],
        E820Entry {
            addr: 0x100000,
            size: 511 * MIB,
            kind: E820Type::Ram
        }
    );

    let l = Layout::new(6 << 30);
    assert_eq!(
        l.ram,
        vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 3 << 30)]
    );
    assert_eq!(
        l.e820.last().unwrap(),
        &E820Entry {
            addr: 4 << 30,
            size: 3 << 30,
            kind: E820Type::Ram
        }
    );
    assert!(l
        .e820
        .iter()
        .all(|e| e.addr + e.size <= 3 << 30 || e.addr >= 4 << 30));
    assert_eq!(pci_intx_gsi(0, 0), 16);
    assert_eq!(pci_intx_gsi(7, 3), 18);
}

#[test]
fn acpi_tables_checksums_and_madt() {
    for cpus in [1u8, 4] {
        let (mem, _) = guest(64 * MIB);
        let t = acpi::build(ACPI_START, cpus);
        assert!(t.bytes.len() < (ACPI_END - ACPI_START) as usize);
        mem.write_slice(&t.bytes, GuestAddress(ACPI_START)).unwrap();
        assert_eq!(t.rsdp_addr, ACPI_START);
        check_acpi(&mem, t.rsdp_addr, cpus);
    }
}

#[test]
fn synthetic_bzimage_host_decompression() {
    let s = Scratch::new("direct");
    let elf = tiny_elf(&code());
    let kernel = s.file("bzImage", &tiny_bzimage(0x020f, XLF_KERNEL_64, &xz(&elf)));
    let initrd_data: Vec<u8> = (0..0x2345u32).map(|i| i as u8).collect();
    let initrd = s.file("initrd", &initrd_data);
    let (mem, layout) = guest(128 * MIB);
    let mut cfg = BootConfig::new(&kernel, 128 * MIB);
    cfg.initrd = Some(initrd);
    cfg.cmdline = "console=ttyS0 panic=-1".into();
    cfg.cpus = 2;
    let r = load_linux(&mem, &cfg, &layout).expect("boot");

    assert_eq!(r.format, KernelFormat::DecompressedBzImage);
    assert_eq!(r.entry, ELF_LOAD + 0x10);
    assert_eq!(r.kernel_ranges, vec![(ELF_LOAD, ELF_LOAD + 0x300 + 0x1000)]);
    assert_eq!(read(&mem, ELF_LOAD, 0x300), code());
    assert!(read(&mem, ELF_LOAD + 0x300, 0x1000).iter().all(|&b| b == 0));

    let p = params(&mem);
    assert_eq!({ p.hdr.header }, HDRS_MAGIC);
    assert_eq!({ p.hdr.version }, 0x020f);
    assert_eq!(p.hdr.type_of_loader, 0xff);
    assert!(p.hdr.loadflags & CAN_USE_HEAP != 0);
    assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE as u32);
    assert_eq!(
        read(&mem, CMDLINE, cfg.cmdline.len() + 1),
        b"console=ttyS0 panic=-1\0"
    );
    let (rd_start, rd_size) = ({ p.hdr.ramdisk_image } as u64, { p.hdr.ramdisk_size }
        as u64);
    assert_eq!(rd_size, initrd_data.len() as u64);
    assert_eq!(rd_start % 0x1000, 0);
    assert!(rd_start + rd_size <= 128 * MIB && rd_start + rd_size > 128 * MIB - 0x1000);
    assert_eq!(r.initrd, Some((rd_start, rd_start + rd_size)));
    assert_eq!(read(&mem, rd_start, initrd_data.len()), initrd_data);
    assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
    check_e820(&p, &layout);
    check_cpu_and_tables(&mem, &r);
    check_acpi(&mem, r.rsdp, 2);
}

#[test]
fn synthetic_bzimage_guest_decompression() {
    let s = Scratch::new("bz");
    let payload = xz(&tiny_elf(&code()));
    let image = tiny_bzimage(0x020f, XLF_KERNEL_64, &payload);
    let kernel = s.file("bzImage", &image);
    let (mem, layout) = guest(64 * MIB);
    let mut cfg = BootConfig::new(&kernel, 64 * MIB);
    cfg.direct_vmlinux = false;
    let r = load_linux(&mem, &cfg, &layout).expect("boot");
    assert_eq!(r.format, KernelFormat::BzImage);
    assert_eq!(r.entry, 0x100200);
    let pm = &image[1024..];
    assert_eq!(
        r.kernel_ranges,
        vec![(0x100000, 0x100000 + pm.len() as u64)]
    );
    assert_eq!(read(&mem, 0x100000, pm.len()), pm);
    let p = params(&mem);
    assert_eq!({ p.hdr.code32_start }, 0x100000);
    assert_eq!({ p.hdr.ramdisk_image }, 0);
    assert_eq!(read(&mem, CMDLINE, 1), [0]);
    check_cpu_and_tables(&mem, &r);
}

#[test]
fn plain_elf_kernel() {
    let s = Scratch::new("elf");
    let kernel = s.file("vmlinux", &tiny_elf(&code()));
    let (mem, layout) = guest(64 * MIB);
    let r = load_linux(&mem, &BootConfig::new(&kernel, 64 * MIB), &layout).expect("boot");
    assert_eq!(r.format, KernelFormat::Elf);
    assert_eq!(r.entry, ELF_LOAD + 0x10);
    let p = params(&mem);
    assert_eq!({ p.hdr.boot_flag }, 0xaa55);
    assert_eq!({ p.hdr.header }, HDRS_MAGIC);
    check_cpu_and_tables(&mem, &r);
}

fn boot_err(image: &[u8], tweak: impl FnOnce(&mut BootConfig)) -> BootError {
    let s = Scratch::new("err");
    let kernel = s.file("k", image);
    let (mem, layout) = guest(64 * MIB);
    let mut cfg = BootConfig::new(&kernel, 64 * MIB);
    tweak(&mut cfg);
    let layout = if cfg.mem_size != 64 * MIB {
        Layout::new(cfg.mem_size)
    } else {
        layout
    };
    match load_linux(&mem, &cfg, &layout) {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            // Every error must render a useful message.
            assert!(!e.to_string().is_empty());
            e
        }
    }
}

fn image_err(e: BootError) -> KernelImageError {
    match e {
        BootError::InvalidKernel { source, .. } => source,
        other => panic!("expected InvalidKernel, got {other}"),
    }
}

#[test]
fn missing_kernel_file() {
    let (mem, layout) = guest(64 * MIB);
    let cfg = BootConfig::new("/nonexistent/vmlinuz", 64 * MIB);
    let e = load_linux(&mem, &cfg, &layout).unwrap_err();
    assert!(matches!(e, BootError::KernelRead { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/vmlinuz"));
}

#[test]
fn garbage_and_truncated_kernels() {
    assert!(matches!(
        image_err(boot_err(b"", |_| {})),
        KernelImageError::Truncated { .. }
    ));
    assert!(matches!(
        image_err(boot_err(&[0x42; 100], |_| {})),
        KernelImageError::Truncated { .. }
    ));
    assert_eq!(
        image_err(boot_err(&[0x42; 4096], |_| {})),
        KernelImageError::NotBzImage
    );
    // Valid header but the file ends inside the setup sectors.
    let img = tiny_bzimage(0x020f, XLF_KERNEL_64, &xz(&tiny_elf(&code())));
    assert!(matches!(
        image_err(boot_err(&img[..0x300], |_| {})),
        KernelImageError::Truncated { .. }
    ));
    // Header claims a payload beyond the end of the file.
    assert!(matches!(
        image_err(boot_err(&img[..img.len() - 100], |_| {})),
        KernelImageError::PayloadOutOfBounds { .. }
    ));
    // Corrupt XZ data.
    let mut bad = img.clone();
    let mid = 1024 + 0x200 + 40;
    for b in &mut bad[mid..mid + 32] {
        *b ^= 0x5a;
    }
    assert!(matches!(
        image_err(boot_err(&bad, |_| {})),
        KernelImageError::Decompress(_)
    ));
    // Payload decodes but is not an ELF.
    let not_elf = tiny_bzimage(0x020f, XLF_KERNEL_64, &xz(&[0xcc; 5000]));
    assert!(matches!(
        image_err(boot_err(&not_elf, |_| {})),
        KernelImageError::BadElf(_)
    ));
    // Payload in an unsupported format.
    let gz = tiny_bzimage(0x020f, XLF_KERNEL_64, b"\x1f\x8b\x08\x00garbage");
    assert_eq!(
        image_err(boot_err(&gz, |_| {})),
        KernelImageError::UnsupportedCompression(Compression::Gzip)
    );
    // Truncated ELF inside a valid XZ payload.
    let elf = tiny_elf(&code());
    let cut = tiny_bzimage(0x020f, XLF_KERNEL_64, &xz(&elf[..0x100]));
    assert!(matches!(
        image_err(boot_err(&cut, |_| {})),
        KernelImageError::BadElf(_)
    ));
    // A bare truncated ELF file.
    assert!(matches!(
        image_err(boot_err(&elf[..0x50], |_| {})),
        KernelImageError::BadElf(_)
    ));
}

#[test]
fn protocol_checks() {
    let payload = xz(&tiny_elf(&code()));
    let old = tiny_bzimage(0x0204, 0, &payload);
    assert_eq!(
        image_err(boot_err(&old, |_| {})),
        KernelImageError::ProtocolTooOld(0x0204)
    );
    let no64 = tiny_bzimage(0x020f, 0, &payload);
    assert_eq!(
        image_err(boot_err(&no64, |c| c.direct_vmlinux = false)),
        KernelImageError::No64BitEntry(0x020f)
    );
    let no_payload = tiny_bzimage(0x0206, 0, &payload);
    assert_eq!(
        image_err(boot_err(&no_payload, |_| {})),
        KernelImageError::NoPayloadInfo(0x0206)
    );
}

#[test]
fn config_errors() {
    let img = tiny_bzimage(0x020f, XLF_KERNEL_64, &xz(&tiny_elf(&code())));
    let e = boot_err(&img, |c| c.cmdline = "x".repeat(256));
    assert!(
        matches!(e, BootError::CmdlineTooLong { len: 256, max: 255 }),
        "{e}"
    );
    let e = boot_err(&img, |c| c.cmdline = "a\0b".into());
    assert!(matches!(e, BootError::CmdlineNul), "{e}");
    let e = boot_err(&img, |c| c.cpus = 0);
    assert!(matches!(e, BootError::BadCpuCount(0)), "{e}");
    let e = boot_err(&img, |c| c.initrd = Some("/nonexistent/initrd".into()));
    assert!(matches!(e, BootError::InitrdRead { .. }), "{e}");

    // Memory smaller than the kernel's init_size needs.
    let s = Scratch::new("small");
    let kernel = s.file("k", &img);
    let (mem, layout) = guest(8 * MIB);
    let e = load_linux(&mem, &BootConfig::new(&kernel, 8 * MIB), &layout).unwrap_err();
    assert!(matches!(e, BootError::MemoryTooSmall { .. }), "{e}");

    // Layout claims more RAM than the guest memory has.
    let (mem, _) = guest(8 * MIB);
    let e = load_linux(
        &mem,
        &BootConfig::new(&kernel, 64 * MIB),
        &Layout::new(64 * MIB),
    )
    .unwrap_err();
    assert!(matches!(e, BootError::MemoryMismatch { .. }), "{e}");
    let cfg = BootConfig::new(&kernel, 8 * MIB);
    let e = load_linux(&mem, &cfg, &Layout::new(64 * MIB)).unwrap_err();
    assert!(matches!(e, BootError::LayoutMismatch { .. }), "{e}");

    // Initrd larger than the space above the kernel (sparse file: no I/O).
    let huge = s.0.join("huge");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(60 * MIB)
        .unwrap();
    let (mem, layout) = guest(64 * MIB);
    let mut cfg = BootConfig::new(&kernel, 64 * MIB);
    cfg.initrd = Some(huge);
    let e = load_linux(&mem, &cfg, &layout).unwrap_err();
    assert!(matches!(e, BootError::InitrdTooLarge { .. }), "{e}");
    let empty = s.file("empty", b"");
    cfg.initrd = Some(empty);
    let e = load_linux(&mem, &cfg, &layout).unwrap_err();
    assert!(matches!(e, BootError::InitrdEmpty { .. }), "{e}");
}

/// Corrupted headers and truncations must give errors, never panics.
#[test]
fn mutated_images_never_panic() {
    let s = Scratch::new("fuzz");
    let elf = tiny_elf(&code());
    let base = tiny_bzimage(0x020f, XLF_KERNEL_64, &xz(&elf));
    let (mem, layout) = guest(32 * MIB);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..300 {
        let mut img = if round % 3 == 0 {
            elf.clone()
        } else {
            base.clone()
        };
        // Hit the header / ELF header area hardest.
        for _ in 0..1 + rand() % 4 {
            let span = if rand() % 2 == 0 { 0x300 } else { img.len() };
            let at = (rand() as usize) % span.min(img.len());
            img[at] = rand() as u8;
        }
        if rand() % 4 == 0 {
            img.truncate((rand() as usize) % img.len());
        }
        let kernel = s.file("k", &img);
        for direct in [true, false] {
            let mut cfg = BootConfig::new(&kernel, 32 * MIB);
            cfg.direct_vmlinux = direct;
            let _ = load_linux(&mem, &cfg, &layout);
        }
    }
}

// ---------------------------------------------------------------------------
// Real Debian kernel (ignored by default; needs the built guest).

fn real_kernel() -> PathBuf {
    let path = std::env::var_os("MATRYOSHKA_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/out/vmlinuz")
        });
    if !path.exists() {
        panic!(
            "\n\n*** real-kernel test needs {} ***\n*** build it with guest/build.sh (or set MATRYOSHKA_KERNEL) ***\n",
            path.display()
        );
    }
    path
}

/// initramfs.cpio next to the kernel, if the guest build made one.
fn real_initrd(kernel: &std::path::Path) -> Option<PathBuf> {
    let p = kernel.with_file_name("initramfs.cpio");
    p.exists().then_some(p)
}

#[test]
#[ignore = "needs guest/out/vmlinuz: run guest/build.sh"]
fn real_kernel_header_and_decompression() {
    let data = std::fs::read(real_kernel()).expect("read kernel");
    let bz = BzImage::parse(&data).expect("parse");
    assert!(bz.version() >= 0x020c, "protocol {:#x}", bz.version());
    bz.check_64bit_entry().expect("64-bit entry");
    assert_eq!(Compression::detect(bz.payload().unwrap()), Compression::Xz);
    let t = std::time::Instant::now();
    let vmlinux = bz.decompress_vmlinux().expect("decompress");
    eprintln!("decompressed {} bytes in {:?}", vmlinux.len(), t.elapsed());
    let elf = elf::ElfImage::parse(&vmlinux).expect("vmlinux ELF");
    assert_eq!(elf.entry, 0x100_0000, "startup_64 at LOAD_PHYSICAL_ADDR");
    let (start, end) = elf.phys_range();
    assert_eq!(start, 0x100_0000);
    assert!(end <= bz.pref_address() + bz.init_size());
}

#[test]
#[ignore = "needs guest/out/vmlinuz: run guest/build.sh"]
fn real_kernel_load_both_paths() {
    let kernel = real_kernel();
    for direct in [true, false] {
        let (mem, layout) = guest(512 * MIB);
        let mut cfg = BootConfig::new(&kernel, 512 * MIB);
        cfg.direct_vmlinux = direct;
        cfg.cpus = 2;
        cfg.cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1".into();
        cfg.initrd = real_initrd(&kernel);
        let t = std::time::Instant::now();
        let r = load_linux(&mem, &cfg, &layout).expect("load");
        eprintln!("direct={direct}: loaded in {:?}: {r:?}", t.elapsed());
        let p = params(&mem);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE as u32);
        assert_eq!(read(&mem, CMDLINE, cfg.cmdline.len() + 1).last(), Some(&0));
        check_e820(&p, &layout);
        check_cpu_and_tables(&mem, &r);
        check_acpi(&mem, r.rsdp, 2);
        if let Some((start, end)) = r.initrd {
            assert_eq!({ p.hdr.ramdisk_image } as u64, start);
            assert_eq!({ p.hdr.ramdisk_size } as u64, end - start);
            assert!(end <= 512 * MIB);
            assert!(start >= r.kernel_ranges.iter().map(|k| k.1).max().unwrap());
        }
        if direct {
            assert_eq!(r.entry, 0x100_0000);
            // startup_64 begins with a real instruction, not zeros.
            assert_ne!(read(&mem, r.entry, 16), vec![0u8; 16]);
        } else {
            assert_eq!(r.entry, 0x100200);
        }
    }
}

/// `place_guest` from a file: the guest sees exactly the bytes (copied
/// partial pages at both ends, mapped pages between, a long zero run as
/// fresh zeros even over RAM that held data), RAM around the range keeps
/// its contents, guest writes never reach the file, and an offset that
/// does not line up with the address falls back to a copy.
#[test]
fn placing_from_a_file_maps_whole_pages_copy_on_write() {
    let page = HOST_PAGE as usize;
    let (mem, _) = guest(64 * MIB);
    let s = Scratch::new("place");
    // The file: a page of filler, then the data to place starting 0x123
    // into its second page: 3 pages of pattern, a zero run, pattern again,
    // ending inside a page.
    let mut data = Vec::new();
    data.extend((0..3 * page - 0x123).map(|i| (i % 251) as u8 | 1));
    data.extend(std::iter::repeat_n(0u8, ZERO_RUN_MIN + 2 * page));
    data.extend((0..page + 0x77).map(|i| (i % 13) as u8 | 0x40));
    let mut file = vec![0xeeu8; page + 0x123];
    file.extend_from_slice(&data);
    file.extend_from_slice(&[0xdd; 0x300]);
    let path = s.file("image", &file);
    let f = std::fs::File::open(&path).unwrap();

    for (addr, off) in [
        (0x20_0123u64, page as u64 + 0x123),
        (0x40_0456, page as u64 + 0x123),
    ] {
        // RAM that held data, as on a reboot: the zero run must come back
        // as zeros, and the bytes around the range must stay.
        let span = data.len() + 2 * page;
        let before = addr - page as u64;
        mem.write_slice(&vec![0xaa; span + page], GuestAddress(before))
            .unwrap();
        place_guest(&mem, addr, &data, Some((&f, off))).unwrap();
        let mut got = vec![0u8; data.len()];
        mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
        assert!(got == data, "guest bytes at {addr:#x} differ from the file");
        let mut edge = [0u8; 16];
        mem.read_slice(&mut edge, GuestAddress(addr - 16)).unwrap();
        assert_eq!(edge, [0xaa; 16], "bytes before the range changed");
        mem.read_slice(&mut edge, GuestAddress(addr + data.len() as u64))
            .unwrap();
        assert_eq!(edge, [0xaa; 16], "bytes after the range changed");
        // Writes land in the guest only (private mapping).
        mem.write_slice(&[0x5a; 64], GuestAddress(addr + page as u64))
            .unwrap();
        mem.write_slice(&[0x5a; 64], GuestAddress(addr + 4 * page as u64))
            .unwrap();
    }
    drop(f);
    assert!(
        std::fs::read(&path).unwrap() == file,
        "guest writes reached the file"
    );
}

/// `matryoshka bench translate` takes its blocks from an ELF file's first
/// executable segment: this test binary's code is found; garbage,
/// truncated headers and program headers that point outside the file are
/// errors, never panics.
#[test]
fn elf_code_reads_real_files_and_refuses_bad_ones() {
    let code = |f: &[u8]| -> Option<(usize, u64)> {
        let img = elf::ElfImage::parse(f).ok()?;
        img.code(f).map(|(t, v)| (t.len(), v))
    };
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let (len, vaddr) = code(&me).expect("this test's own code");
    assert!(len > 4096 && vaddr > 0);
    assert!(code(b"").is_none());
    assert!(code(b"MZ not an ELF file").is_none());
    assert!(code(&me[..0x30]).is_none());
    let mut bad = me[..0x40].to_vec();
    bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(code(&bad).is_none());
    let mut far = me.clone();
    let phoff = u64::from_le_bytes(far[0x20..0x28].try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes([far[0x36], far[0x37]]) as usize;
    let phnum = u16::from_le_bytes([far[0x38], far[0x39]]) as usize;
    for k in 0..phnum {
        let p = phoff + k * phentsize;
        far[p + 8..p + 16].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
    }
    assert!(code(&far).is_none());
}
