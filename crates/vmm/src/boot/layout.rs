//! Guest physical address map: where RAM lives, what the E820 table says,
//! and the fixed addresses of the boot structures we build.
//!
//! ```text
//! 0x0000_0500  boot GDT            0x0000_0520  boot IDT (empty)
//! 0x0000_7000  zero page           0x0000_8ff0  initial RSP (grows down)
//! 0x0000_9000  PML4, then PDPT, 4 PDs (identity map of 0..4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA ... 0x000f_ffff BIOS area: reserved in E820
//! 0x000e_0000  ACPI: RSDP first (BIOS scan area), other tables after
//! 0x0010_0000  bzImage protected-mode code (vmlinux ELF goes to its p_paddr)
//! ...          initrd at the top of low RAM (below initrd_addr_max)
//! 0xc000_0000  end of low RAM; PCI 32-bit MMIO window up to 0xfebf_ffff
//! 0xfec0_0000  IOAPIC             0xfee0_0000 local APIC
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

/// Flat boot GDT (null, null, code64 at 0x10, data at 0x18).
pub const BOOT_GDT: u64 = 0x500;
/// Empty boot IDT; the kernel installs its own before enabling interrupts.
pub const BOOT_IDT: u64 = 0x520;
/// `struct boot_params` ("zero page").
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer; between the zero page and the page tables.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the boot identity map.
pub const PML4: u64 = 0x9000;
/// The single PDPT (covers 512 GiB, we fill the first 4 entries).
pub const PDPT: u64 = 0xa000;
/// Four page directories of 2 MiB pages, one per GiB, at PD_BASE + i * 4 KiB.
pub const PD_BASE: u64 = 0xb000;
/// How much the boot identity map covers.
pub const IDENTITY_MAP_SIZE: u64 = 4 << 30;
/// Kernel command line (NUL-terminated).
pub const CMDLINE: u64 = 0x20000;
/// Largest command line we reserve room for (the kernel's cmdline_size is
/// usually 2047, we allow up to this much before the next structure).
pub const CMDLINE_MAX: u64 = 0x10000;
/// Start of the EBDA; everything from here to 1 MiB is reserved in E820.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables area inside the reserved BIOS region (RSDP must be in
/// 0xe0000..0xfffff for legacy scanning, 16-byte aligned).
pub const ACPI_START: u64 = 0xe0000;
/// End (exclusive) of the ACPI tables area.
pub const ACPI_END: u64 = 0x100000;
/// Where bzImage protected-mode code is loaded (classic code32_start).
pub const KERNEL_START: u64 = 0x100000;
/// Offset of the 64-bit entry point (startup_64) inside the bzImage
/// protected-mode code.
pub const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// Low RAM stops here; [3 GiB, 4 GiB) is the MMIO hole.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// First address above the MMIO hole.
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// 32-bit PCI BAR window advertised in the PCI0 _CRS.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_END: u64 = 0xfebf_ffff;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Number of IOAPIC redirection entries we describe (GSI 0..23).
pub const IOAPIC_PINS: u32 = 24;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// First GSI used for PCI INTx (16..23, level-triggered, active-low).
pub const PCI_INTX_GSI_BASE: u32 = 16;

/// ACPI fixed-hardware I/O ports described in the FADT; a device model
/// must implement these for poweroff (PM1a_CNT SLP_EN) and the PM timer.
pub const ACPI_PM1A_EVT_BLK: u16 = 0x600;
pub const ACPI_PM1A_CNT_BLK: u16 = 0x604;
pub const ACPI_PM_TMR_BLK: u16 = 0x608;
/// SCI interrupt (ISA IRQ 9 → GSI 9, level, active high).
pub const ACPI_SCI_IRQ: u16 = 9;
/// Reset register (PCI reset control, write 0x06 to reset).
pub const RESET_PORT: u16 = 0xcf9;
pub const RESET_VALUE: u8 = 0x06;

/// The GSI that PCI device `slot` (0..31) pin `pin` (0 = INTA .. 3 = INTD)
/// is routed to by the DSDT _PRT. Standard swizzle so neighbouring slots
/// spread over the 8 GSIs; a PCI device model must raise this GSI.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + ((slot as u32 + pin as u32) % 8)
}

/// E820 memory type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
    Acpi = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

/// RAM regions for a guest with `mem_size` bytes: one block below the
/// MMIO hole and, for more than 3 GiB, the remainder above 4 GiB. The
/// VMM creates its GuestMemoryMmap from exactly these.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let mut regions = Vec::new();
    let low = mem_size.min(MMIO_HOLE_START);
    if low > 0 {
        regions.push((GuestAddress(0), low as usize));
    }
    if mem_size > MMIO_HOLE_START {
        regions.push((
            GuestAddress(MMIO_HOLE_END),
            (mem_size - MMIO_HOLE_START) as usize,
        ));
    }
    regions
}

/// The guest's physical memory map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub mem_size: u64,
    /// End (exclusive) of RAM below the MMIO hole.
    pub lowmem_end: u64,
    /// RAM regions backing guest memory (see [`ram_regions`]).
    pub ram: Vec<(GuestAddress, usize)>,
    /// What the guest is told via boot_params.e820_table.
    pub e820: Vec<E820Entry>,
}

impl Layout {
    pub fn new(mem_size: u64) -> Self {
        let lowmem_end = mem_size.min(MMIO_HOLE_START);
        let mut e820 = Vec::new();
        let mut push = |addr: u64, end: u64, kind| {
            if end > addr {
                e820.push(E820Entry {
                    addr,
                    size: end - addr,
                    kind,
                });
            }
        };
        push(0, EBDA_START.min(lowmem_end), E820Type::Ram);
        // EBDA, VGA hole, option ROMs, BIOS (and our ACPI tables) stay
        // reserved so Linux never allocates them.
        push(EBDA_START, KERNEL_START, E820Type::Reserved);
        push(KERNEL_START, lowmem_end, E820Type::Ram);
        if mem_size > MMIO_HOLE_START {
            push(
                MMIO_HOLE_END,
                MMIO_HOLE_END + (mem_size - MMIO_HOLE_START),
                E820Type::Ram,
            );
        }
        Layout {
            mem_size,
            lowmem_end,
            ram: ram_regions(mem_size),
            e820,
        }
    }
}
