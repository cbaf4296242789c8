//! Linux boot: put a kernel, initrd, command line, boot_params, ACPI
//! tables and boot page tables into guest RAM and produce the BSP state
//! for the x86-64 64-bit boot protocol (Documentation/arch/x86/boot.rst).
//!
//! Two ways to load a bzImage:
//! * `direct_vmlinux` (default): decompress the payload on the host and
//!   load the vmlinux ELF; entry is startup_64 of the real kernel. Skips
//!   the guest decompressor (slow under a software CPU) and KASLR.
//! * otherwise: load the protected-mode code at 1 MiB and enter at +0x200
//!   so the in-guest decompressor runs.
//!
//! The kernel file may also be a plain vmlinux ELF (always loaded directly).

pub mod acpi;
pub mod elf;
pub mod image;
pub mod layout;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use x86::state::{
    cr0, cr4, efer, CpuState, DescriptorTable, Segment, CS, DS, ES, FS, GS, RSI, RSP, SS,
};

use elf::ElfImage;
use image::{BzImage, Compression};
use layout::*;

/// Largest kernel file we are willing to read.
const MAX_KERNEL_FILE: u64 = 256 << 20;

/// Boot GDT. Linux's 64-bit boot protocol wants __BOOT_CS = 0x10 (64-bit
/// flat code) and __BOOT_DS = 0x18 (flat data).
pub const BOOT_GDT_ENTRIES: [u64; 4] = [
    0,                     // null
    0,                     // unused (0x08)
    0x00af_9b00_0000_ffff, // 0x10: code, L=1, G=1, DPL0, readable, accessed
    0x00cf_9300_0000_ffff, // 0x18: data, D/B=1, G=1, writable, accessed
];
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootConfig {
    /// bzImage (or vmlinux ELF).
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Guest RAM in bytes (must match the memory the Layout was built for).
    pub mem_size: u64,
    pub cpus: u8,
    /// Decompress a bzImage on the host and enter vmlinux directly.
    pub direct_vmlinux: bool,
}

impl BootConfig {
    pub fn new(kernel: impl Into<PathBuf>, mem_size: u64) -> Self {
        BootConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            mem_size,
            cpus: 1,
            direct_vmlinux: true,
        }
    }
}

/// How the kernel was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// bzImage payload decompressed on the host, vmlinux ELF loaded.
    DecompressedBzImage,
    /// bzImage protected-mode code loaded, guest decompressor runs.
    BzImage,
    /// The kernel file itself was a vmlinux ELF.
    Elf,
}

/// Everything the VMM needs to start the BSP, plus what was placed where.
#[derive(Clone, Debug)]
pub struct BootResult {
    /// BSP state: 64-bit mode, RIP = entry, RSI = boot_params.
    pub cpu: CpuState,
    pub entry: u64,
    pub format: KernelFormat,
    /// Guest physical [start, end) ranges holding the kernel.
    pub kernel_ranges: Vec<(u64, u64)>,
    /// Guest physical [start, end) of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    pub boot_params: u64,
    pub cmdline: u64,
    pub rsdp: u64,
    /// Boot protocol version from the setup header (0 for plain ELF).
    pub protocol: u16,
}

/// Problems with the kernel image contents.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelImageError {
    #[error("file is too short ({len} bytes) to hold the {what}")]
    Truncated { len: usize, what: &'static str },
    #[error("not a bzImage (no \"HdrS\" setup header magic at 0x202, or not loaded high) and not an ELF vmlinux")]
    NotBzImage,
    #[error("boot protocol {}.{:02} is too old (need 2.06 or newer)", .0 >> 8, .0 & 0xff)]
    ProtocolTooOld(u16),
    #[error("kernel (boot protocol {}.{:02}) does not advertise a 64-bit entry point (XLF_KERNEL_64)", .0 >> 8, .0 & 0xff)]
    No64BitEntry(u16),
    #[error("boot protocol {}.{:02} has no payload_offset/payload_length (need 2.08) for host-side decompression", .0 >> 8, .0 & 0xff)]
    NoPayloadInfo(u16),
    #[error("compressed payload at offset {offset:#x} length {len:#x} exceeds the {avail:#x} bytes of protected-mode code")]
    PayloadOutOfBounds { offset: u64, len: u64, avail: u64 },
    #[error("kernel payload compression {0:?} is not supported for host-side decompression (only XZ); boot with direct_vmlinux=false to let the kernel decompress itself")]
    UnsupportedCompression(Compression),
    #[error("decompressing the kernel payload failed: {0}")]
    Decompress(String),
    #[error("invalid vmlinux ELF: {0}")]
    BadElf(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel image {path}")]
    KernelRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel image {path} is too large ({size} bytes, limit {MAX_KERNEL_FILE})")]
    KernelTooLarge { path: PathBuf, size: u64 },
    #[error("invalid kernel image {path}")]
    InvalidKernel {
        path: PathBuf,
        #[source]
        source: KernelImageError,
    },
    #[error("cannot read initrd {path}")]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} is empty")]
    InitrdEmpty { path: PathBuf },
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM between the kernel end {lowest:#x} and {highest:#x} (limit from memory size and the kernel's initrd_addr_max)")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        lowest: u64,
        highest: u64,
    },
    #[error(
        "guest memory ({mem_size:#x} bytes) is too small: the kernel needs RAM up to {needed:#x}"
    )]
    MemoryTooSmall { mem_size: u64, needed: u64 },
    #[error("guest memory does not cover the layout's RAM region at {addr:#x} ({len:#x} bytes); build it from layout::ram_regions({mem_size:#x})")]
    MemoryMismatch { addr: u64, len: u64, mem_size: u64 },
    #[error("BootConfig.mem_size {config:#x} differs from the Layout's {layout:#x}")]
    LayoutMismatch { config: u64, layout: u64 },
    #[error("kernel command line is {len} bytes but this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("vCPU count {0} is out of range (1..=254)")]
    BadCpuCount(u8),
    #[error("kernel range {start:#x}..{end:#x} lies outside low RAM 0x100000..{lowmem_end:#x}")]
    KernelOutOfRange {
        start: u64,
        end: u64,
        lowmem_end: u64,
    },
    #[error("ACPI tables ({0} bytes) do not fit in 0xe0000..0x100000")]
    AcpiTooLarge(usize),
    #[error("writing {len} bytes to guest memory at {addr:#x} failed: {reason}")]
    GuestMemory {
        addr: u64,
        len: usize,
        reason: String,
    },
}

/// Write `data` at guest physical `addr`, mapping failures to a typed error.
pub(crate) fn write_guest<M: GuestMemory>(
    mem: &M,
    addr: u64,
    data: &[u8],
) -> Result<(), BootError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| BootError::GuestMemory {
            addr,
            len: data.len(),
            reason: e.to_string(),
        })
}

/// Host page size assumed for file mappings into guest RAM.
const HOST_PAGE: u64 = 4096;

/// Put `data` at guest physical `addr`, like [`write_guest`]. Where `file`
/// is given, its file holds the same bytes at the given offset: the whole
/// pages among them are mapped from the file copy-on-write instead of
/// copied (partial pages at either end are copied). A 60 MB kernel then costs neither a copy nor a
/// fault on the pages the guest never touches, and VMs booted from one file
/// share its unwritten pages through the host's page cache, as Firecracker
/// does with snapshot memory files. The file must not be truncated while the
/// VM runs (a read past its end would be a SIGBUS); the kernel cache never
/// rewrites a published file. Whatever later discards guest pages (a
/// balloon, say) must not use `MADV_DONTNEED` on such ranges: on a private
/// file mapping it brings back the file's bytes, not zeros.
pub(crate) fn place_guest<M: GuestMemory>(
    mem: &M,
    addr: u64,
    data: &[u8],
    file: Option<(&File, u64)>,
) -> Result<(), BootError> {
    if let Some((f, off)) = file {
        let start = addr.next_multiple_of(HOST_PAGE);
        let head = (start - addr) as usize;
        if off % HOST_PAGE == addr % HOST_PAGE && head < data.len() {
            let pages = (data.len() - head) & !(HOST_PAGE as usize - 1);
            if pages > 0 && map_private(mem, start, pages, Some((f, off + head as u64)))? {
                // Long runs of zero pages (a bss stored in the file) become
                // fresh anonymous memory again: the guest clears its bss, and
                // a write there should not copy a page of zeros.
                let body = &data[head..head + pages];
                let mut at = 0;
                while at < pages {
                    let zeros = body[at..]
                        .chunks_exact(HOST_PAGE as usize)
                        .take_while(|p| is_zero(p))
                        .count()
                        * HOST_PAGE as usize;
                    if zeros >= ZERO_RUN_MIN {
                        map_private(mem, start + at as u64, zeros, None)?;
                    }
                    at += zeros.max(HOST_PAGE as usize);
                }
                write_guest(mem, addr, &data[..head])?;
                return write_guest(mem, start + pages as u64, &data[head + pages..]);
            }
        }
    }
    write_guest(mem, addr, data)
}

/// Whether `b` is all zeros (no early exit, so it vectorises).
fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a | x) == 0
}

/// Shortest run of zero pages that [`place_guest`] maps anonymously (fewer
/// mappings than one per stray zero page).
const ZERO_RUN_MIN: usize = 64 * HOST_PAGE as usize;

/// Map `len` bytes of the file from the offset (or fresh zeros, for `None`)
/// over guest RAM at `gpa` (all page aligned), private and writable. False
/// where the range is not inside one anonymous region (RAM untouched) or
/// the map fails (the range is then fresh zeroed memory, for the caller to
/// copy into).
fn map_private<M: GuestMemory>(
    mem: &M,
    gpa: u64,
    len: usize,
    file: Option<(&File, u64)>,
) -> Result<bool, BootError> {
    use std::os::fd::AsRawFd;
    use vm_memory::{GuestMemoryRegion, MemoryRegionAddress};
    let Some(r) = mem.find_region(GuestAddress(gpa)) else {
        return Ok(false);
    };
    // A file-backed region may be shared with another process (or be a
    // snapshot's file): only anonymous RAM is ours to remap.
    if r.file_offset().is_some() {
        return Ok(false);
    }
    let rel = gpa - r.start_addr().0;
    if rel.checked_add(len as u64).is_none_or(|e| e > r.len()) {
        return Ok(false);
    }
    let (fd, off, anon) = match file {
        Some((f, off)) => (f.as_raw_fd(), off, 0),
        None => (-1, 0, libc::MAP_ANONYMOUS),
    };
    let (Ok(host), Ok(off)) = (
        r.get_host_address(MemoryRegionAddress(rel)),
        libc::off_t::try_from(off),
    ) else {
        return Ok(false);
    };
    if !(host as u64).is_multiple_of(HOST_PAGE) {
        return Ok(false);
    }
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: [host, host + len) lies inside one mapped region of `mem`,
    // whose mapping lives as long as `mem`; MAP_FIXED replaces those pages
    // in place with the same protection, so every pointer into guest RAM
    // stays valid. Nothing reads guest RAM concurrently while a VM is set
    // up.
    let p = unsafe {
        libc::mmap(
            host.cast(),
            len,
            prot,
            // Like the RAM it replaces, no swap reserved up front.
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE | anon,
            fd,
            off,
        )
    };
    if p == host.cast() {
        return Ok(true);
    }
    // A failed MAP_FIXED may have unmapped the range: put fresh anonymous
    // memory back (the copy that follows fills it).
    // SAFETY: as above, with the region's own kind of mapping.
    let q = unsafe {
        libc::mmap(
            host.cast(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if q != host.cast() {
        return Err(BootError::GuestMemory {
            addr: gpa,
            len,
            reason: format!(
                "restoring guest RAM after a failed file mapping: {}",
                std::io::Error::last_os_error()
            ),
        });
    }
    Ok(false)
}

/// Load the kernel described by `cfg` into `mem` laid out as `layout`.
pub fn load_linux<M: GuestMemory>(
    mem: &M,
    cfg: &BootConfig,
    layout: &Layout,
) -> Result<BootResult, BootError> {
    if cfg.mem_size != layout.mem_size {
        return Err(BootError::LayoutMismatch {
            config: cfg.mem_size,
            layout: layout.mem_size,
        });
    }
    if cfg.cpus == 0 || cfg.cpus > 254 {
        return Err(BootError::BadCpuCount(cfg.cpus));
    }
    for &(addr, len) in &layout.ram {
        if !mem.check_range(addr, len) {
            return Err(BootError::MemoryMismatch {
                addr: addr.0,
                len: len as u64,
                mem_size: layout.mem_size,
            });
        }
    }
    // Below 1 MiB + a bit there's no room for any kernel at all.
    if layout.lowmem_end <= KERNEL_START {
        return Err(BootError::MemoryTooSmall {
            mem_size: layout.mem_size,
            needed: KERNEL_START + 1,
        });
    }

    let file = read_kernel(&cfg.kernel)?;
    let invalid = |source| BootError::InvalidKernel {
        path: cfg.kernel.clone(),
        source,
    };

    // --- kernel -----------------------------------------------------------
    let mut params;
    let entry;
    let format;
    let kernel_ranges;
    // End of the memory the kernel will use while booting; the initrd goes above.
    let kernel_end;
    if file.starts_with(b"\x7fELF") {
        let elf = ElfImage::parse(&file).map_err(invalid)?;
        params = synthetic_params();
        let (start, end) = elf.phys_range();
        check_kernel_range(layout, start, end)?;
        kernel_ranges = elf.load(mem, &file, None)?;
        entry = elf.entry;
        format = KernelFormat::Elf;
        kernel_end = end;
    } else {
        let bz = BzImage::parse(&file).map_err(invalid)?;
        params = bz.params;
        // Memory the kernel needs once it runs at its preferred address.
        let run_end = bz
            .pref_address()
            .max(KERNEL_START)
            .saturating_add(bz.init_size());
        if cfg.direct_vmlinux {
            let vmlinux = bz.decompress_vmlinux().map_err(invalid)?;
            let elf = ElfImage::parse(&vmlinux).map_err(invalid)?;
            let (start, end) = elf.phys_range();
            check_kernel_range(layout, start, end.max(run_end))?;
            kernel_ranges = elf.load(mem, &vmlinux, vmlinux.file())?;
            entry = elf.entry;
            format = KernelFormat::DecompressedBzImage;
            kernel_end = end.max(run_end);
        } else {
            bz.check_64bit_entry().map_err(invalid)?;
            let code = bz.protected_mode_code();
            let end = KERNEL_START + code.len() as u64;
            check_kernel_range(layout, KERNEL_START, end.max(run_end))?;
            write_guest(mem, KERNEL_START, code)?;
            params.hdr.code32_start = KERNEL_START as u32;
            kernel_ranges = vec![(KERNEL_START, end)];
            entry = KERNEL_START + BZIMAGE_ENTRY64_OFFSET;
            format = KernelFormat::BzImage;
            kernel_end = end.max(run_end);
        }
    }
    let protocol = if format == KernelFormat::Elf {
        0
    } else {
        params.hdr.version
    };

    // --- setup header fields owned by the boot loader ---------------------
    params.hdr.type_of_loader = 0xff; // "undefined" boot loader
    params.hdr.loadflags |= image::CAN_USE_HEAP;
    // Only meaningful to the 16-bit setup code we skip; set as a real
    // loader would (end of a 64 KiB real-mode segment minus 0x200).
    params.hdr.heap_end_ptr = 0xfe00;

    // --- command line ----------------------------------------------------
    let max_cmdline = (params.hdr.cmdline_size as usize).min(CMDLINE_MAX as usize - 1);
    if cfg.cmdline.len() > max_cmdline {
        return Err(BootError::CmdlineTooLong {
            len: cfg.cmdline.len(),
            max: max_cmdline,
        });
    }
    if cfg.cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut cmdline = cfg.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    write_guest(mem, CMDLINE, &cmdline)?;
    params.hdr.cmd_line_ptr = CMDLINE as u32;

    // --- initrd -------------------------------------------------------------
    let initrd = match &cfg.initrd {
        Some(path) => {
            let limit = (params.hdr.initrd_addr_max as u64 + 1)
                .min(layout.lowmem_end)
                .min(MMIO_HOLE_END);
            let (start, size) = load_initrd(mem, path, kernel_end, limit)?;
            params.hdr.ramdisk_image = start as u32;
            params.hdr.ramdisk_size = size as u32;
            Some((start, start + size))
        }
        None => None,
    };

    // --- ACPI -----------------------------------------------------------------
    let tables = acpi::build(ACPI_START, cfg.cpus);
    if ACPI_START + tables.bytes.len() as u64 > ACPI_END {
        return Err(BootError::AcpiTooLarge(tables.bytes.len()));
    }
    write_guest(mem, ACPI_START, &tables.bytes)?;
    params.acpi_rsdp_addr = tables.rsdp_addr;

    // --- E820 -----------------------------------------------------------------
    for (slot, e) in params.e820_table.iter_mut().zip(&layout.e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
        };
    }
    params.e820_entries = layout.e820.len().min(params.e820_table.len()) as u8;

    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|e| BootError::GuestMemory {
            addr: ZERO_PAGE,
            len: std::mem::size_of::<boot_params>(),
            reason: e.to_string(),
        })?;

    // --- CPU ------------------------------------------------------------------
    write_gdt_idt(mem)?;
    write_page_tables(mem)?;
    let cpu = initial_cpu_state(entry);
    tracing::debug!(
        ?format,
        entry = format_args!("{entry:#x}"),
        ?kernel_ranges,
        ?initrd,
        "linux loaded"
    );

    Ok(BootResult {
        cpu,
        entry,
        format,
        kernel_ranges,
        initrd,
        boot_params: ZERO_PAGE,
        cmdline: CMDLINE,
        rsdp: tables.rsdp_addr,
        protocol,
    })
}

fn read_kernel(path: &Path) -> Result<Vec<u8>, BootError> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_KERNEL_FILE {
        return Err(BootError::KernelTooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    std::fs::read(path).map_err(read_err)
}

fn check_kernel_range(layout: &Layout, start: u64, end: u64) -> Result<(), BootError> {
    if end > layout.lowmem_end {
        return Err(BootError::MemoryTooSmall {
            mem_size: layout.mem_size,
            needed: end,
        });
    }
    // Below 1 MiB live our boot structures and the BIOS area.
    if start < KERNEL_START || end < start {
        return Err(BootError::KernelOutOfRange {
            start,
            end,
            lowmem_end: layout.lowmem_end,
        });
    }
    Ok(())
}

/// Place the initrd page-aligned as high as possible below `limit` and
/// above `lowest`; returns (address, size).
fn load_initrd<M: GuestMemory>(
    mem: &M,
    path: &Path,
    lowest: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size == 0 {
        return Err(BootError::InitrdEmpty {
            path: path.to_path_buf(),
        });
    }
    let lowest = lowest.next_multiple_of(0x1000);
    let start = limit.checked_sub(size).map(|a| a & !0xfff);
    let start = match start {
        Some(s) if s >= lowest => s,
        _ => {
            return Err(BootError::InitrdTooLarge {
                path: path.to_path_buf(),
                size,
                lowest,
                highest: limit,
            })
        }
    };
    // Read straight into guest RAM: initrds can be tens of MiB.
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|e| BootError::GuestMemory {
            addr: start,
            len: size as usize,
            reason: e.to_string(),
        })?;
    Ok((start, size))
}

/// boot_params for a bare vmlinux ELF, which has no setup header: fill in
/// what a bzImage header would tell the kernel.
fn synthetic_params() -> boot_params {
    let mut p = boot_params::default();
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = image::HDRS_MAGIC;
    p.hdr.version = 0x020f;
    p.hdr.loadflags = image::LOADED_HIGH;
    p.hdr.kernel_alignment = 0x20_0000;
    p.hdr.cmdline_size = 2047;
    p.hdr.initrd_addr_max = 0x7fff_ffff;
    p.hdr.vid_mode = 0xffff;
    p
}

fn write_gdt_idt<M: GuestMemory>(mem: &M) -> Result<(), BootError> {
    let gdt: Vec<u8> = BOOT_GDT_ENTRIES
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    write_guest(mem, BOOT_GDT, &gdt)?;
    write_guest(mem, BOOT_IDT, &[0u8; 8])
}

/// Identity map 0..4 GiB with 2 MiB pages: PML4[0] → PDPT, PDPT[0..4] →
/// four PDs. Present | writable (| PS on the 2 MiB entries).
fn write_page_tables<M: GuestMemory>(mem: &M) -> Result<(), BootError> {
    const P_RW: u64 = 0x3;
    const PS: u64 = 0x80;
    let mut pml4 = [0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT | P_RW).to_le_bytes());
    write_guest(mem, PML4, &pml4)?;

    let gigs = IDENTITY_MAP_SIZE >> 30;
    let mut pdpt = [0u8; 4096];
    for i in 0..gigs {
        let pd = PD_BASE + i * 0x1000;
        pdpt[i as usize * 8..][..8].copy_from_slice(&(pd | P_RW).to_le_bytes());
        let mut dir = [0u8; 4096];
        for j in 0..512u64 {
            let phys = (i << 30) | (j << 21);
            dir[j as usize * 8..][..8].copy_from_slice(&(phys | P_RW | PS).to_le_bytes());
        }
        write_guest(mem, pd, &dir)?;
    }
    write_guest(mem, PDPT, &pdpt)
}

/// BSP state for the 64-bit boot protocol.
pub fn initial_cpu_state(entry: u64) -> CpuState {
    let mut s = CpuState::reset();
    s.gpr = [0; 16];
    s.gpr[RSI] = ZERO_PAGE;
    s.gpr[RSP] = BOOT_STACK;
    s.rip = entry;
    s.rflags = x86::state::flags::FIXED1;
    let code = Segment::from_descriptor(BOOT_CS, BOOT_GDT_ENTRIES[2]);
    let data = Segment::from_descriptor(BOOT_DS, BOOT_GDT_ENTRIES[3]);
    s.seg[CS] = code;
    for i in [ES, SS, DS, FS, GS] {
        s.seg[i] = data;
    }
    s.gdtr = DescriptorTable {
        base: BOOT_GDT,
        limit: (BOOT_GDT_ENTRIES.len() * 8 - 1) as u16,
    };
    s.idtr = DescriptorTable {
        base: BOOT_IDT,
        limit: 7,
    };
    s.cr0 = cr0::PE | cr0::ET | cr0::NE | cr0::PG;
    s.cr3 = PML4;
    s.cr4 = cr4::PAE;
    s.efer = efer::LME | efer::LMA;
    // Firmware leaves MTRRs enabled with write-back default; Linux skips
    // PAT setup when it finds them disabled.
    s.mtrr_def_type = (1 << 11) | 6;
    s
}
