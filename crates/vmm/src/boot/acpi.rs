//! ACPI tables for a legacy-PC-like guest: RSDP → XSDT → {FADT, MADT},
//! FADT → {DSDT, FACS}. Built as one blob placed at ACPI_START so the
//! RSDP is found both via boot_params.acpi_rsdp_addr and by scanning
//! 0xe0000..0xfffff.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Name, Package,
    ResourceTemplate, Scope, IO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use super::layout::*;

pub const OEM_ID: [u8; 6] = *b"MATRYO";
pub const OEM_TABLE_ID: [u8; 8] = *b"MATRYOSH";
const OEM_REVISION: u32 = 1;

/// MADT flag: dual 8259 PICs present (Linux masks them when using the IOAPIC).
const MADT_PCAT_COMPAT: u32 = 1;
/// IAPC_BOOT_ARCH: LEGACY_DEVICES (RTC, etc. on ISA) | 8042 present.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;

/// A built set of tables and where each lives in guest memory.
pub struct AcpiTables {
    /// Guest address of `bytes[0]`.
    pub base: u64,
    pub bytes: Vec<u8>,
    pub rsdp_addr: u64,
    /// (signature, guest address, length) of each table, RSDP first.
    pub tables: Vec<([u8; 4], u64, usize)>,
}

/// Appends tables at aligned offsets and records their addresses.
struct Builder {
    base: u64,
    bytes: Vec<u8>,
    tables: Vec<([u8; 4], u64, usize)>,
}

impl Builder {
    fn add(&mut self, sig: [u8; 4], data: &[u8], align: usize) -> u64 {
        let off = self.bytes.len().next_multiple_of(align);
        self.bytes.resize(off, 0);
        self.bytes.extend_from_slice(data);
        let addr = self.base + off as u64;
        self.tables.push((sig, addr, data.len()));
        addr
    }
}

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// Build all tables for `cpus` vCPUs (APIC ids 0..cpus) to live at `base`.
pub fn build(base: u64, cpus: u8) -> AcpiTables {
    let mut b = Builder {
        base,
        bytes: Vec::new(),
        tables: Vec::new(),
    };
    // RSDP first at `base` (16-byte aligned for the legacy scan); its
    // XSDT address is patched in at the end once known.
    let rsdp_addr = b.add(*b"RSD ", &[0u8; 36], 16);

    let dsdt = dsdt();
    let dsdt_addr = b.add(*b"DSDT", dsdt.as_slice(), 16);
    let facs_addr = b.add(*b"FACS", &aml_bytes(&FACS::new()), 64);
    let fadt_addr = b.add(*b"FACP", &aml_bytes(&fadt(dsdt_addr, facs_addr)), 16);
    let madt_addr = b.add(*b"APIC", madt(cpus).as_slice(), 16);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = b.add(*b"XSDT", &aml_bytes(&xsdt), 16);

    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    b.bytes[..rsdp.len()].copy_from_slice(&rsdp);
    b.tables[0].2 = rsdp.len();

    AcpiTables {
        base,
        bytes: b.bytes,
        rsdp_addr,
        tables: b.tables,
    }
}

fn fadt(dsdt_addr: u64, facs_addr: u64) -> acpi_tables::fadt::FADT {
    let io_gas = |bits: u8, access: AccessSize, port: u16| {
        GAS::new(GasSpace::SystemIo, bits, 0, access, port as u64)
    };
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .preferred_pm_profile(PmProfile::Unspecified)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // Buttons are "control method" (i.e. absent here): no fixed
        // power/sleep button events for Linux to register.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    // SMI_CMD = 0: ACPI mode is always on, no enable handshake.
    f.sci_int = ACPI_SCI_IRQ.into();
    f.pm1a_evt_blk = (ACPI_PM1A_EVT_BLK as u32).into();
    f.pm1_evt_len = 4;
    f.pm1a_cnt_blk = (ACPI_PM1A_CNT_BLK as u32).into();
    f.pm1_cnt_len = 2;
    f.pm_tmr_blk = (ACPI_PM_TMR_BLK as u32).into();
    f.pm_tmr_len = 4;
    f.x_pm1a_evt_blk = io_gas(32, AccessSize::WordAccess, ACPI_PM1A_EVT_BLK);
    f.x_pm1a_cnt_blk = io_gas(16, AccessSize::WordAccess, ACPI_PM1A_CNT_BLK);
    f.x_pm_tmr_blk = io_gas(32, AccessSize::DwordAccess, ACPI_PM_TMR_BLK);
    f.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042).into();
    f.reset_reg = io_gas(8, AccessSize::ByteAccess, RESET_PORT);
    f.reset_value = RESET_VALUE;
    f.finalize()
}

/// MADT built by hand: acpi_tables' MADT can't set PCAT_COMPAT nor emit
/// interrupt source overrides.
fn madt(cpus: u8) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 3, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, LAPIC_ADDR as u32);
    t.write_u32(40, MADT_PCAT_COMPAT);
    let mut e = Vec::new();
    for id in 0..cpus {
        // Processor Local APIC: type 0, len 8, uid, apic id, flags=enabled.
        e.extend_from_slice(&[0, 8, id, id]);
        e.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, len 12, id, reserved, address, GSI base.
    e.extend_from_slice(&[1, 12, ioapic_id(cpus), 0]);
    e.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source overrides: type 2, len 10, bus 0 (ISA), irq, gsi, flags.
    // Flags: polarity bits 0-1 (1 = active high), trigger bits 2-3
    // (1 = edge, 3 = level).
    let mut iso = |irq: u8, gsi: u32, flags: u16| {
        e.extend_from_slice(&[2, 10, 0, irq]);
        e.extend_from_slice(&gsi.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
    };
    iso(0, 2, 0x1 | (0x1 << 2)); // PIT on IOAPIC pin 2, edge, high
    iso(ACPI_SCI_IRQ as u8, ACPI_SCI_IRQ as u32, 0x1 | (0x3 << 2)); // SCI, level, high
                                                                    // Local APIC NMI: type 4, len 6, all processors, flags edge/high, LINT1.
    e.extend_from_slice(&[4, 6, 0xff]);
    e.extend_from_slice(&(0x1u16 | (0x1 << 2)).to_le_bytes());
    e.push(1);
    t.append_slice(&e);
    t
}

/// IOAPIC id: right after the vCPUs' APIC ids so they never collide.
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

fn dsdt() -> Sdt {
    // Revision 2: 64-bit AML integers.
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();

    // \_S5_: SLP_TYP 5 for PM1a/PM1b; poweroff writes SLP_TYP<<10|SLP_EN
    // to PM1a_CNT.
    let five: u8 = 5;
    let zero: u8 = 0;
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&five, &five, &zero, &zero]),
    )
    .to_aml_bytes(&mut body);

    let pci0 = pci_root();
    let com1 = isa_device("COM1", "PNP0501", 0, &[(0x3f8, 8)], &[4]);
    let rtc = isa_device("RTC_", "PNP0B00", 0, &[(0x70, 2)], &[8]);
    let kbd = isa_device("PS2K", "PNP0303", 0, &[(0x60, 1), (0x64, 1)], &[1]);
    Scope::new(
        "\\_SB_".into(),
        vec![&RawAml(pci0), &RawAml(com1), &RawAml(rtc), &RawAml(kbd)],
    )
    .to_aml_bytes(&mut body);

    t.append_slice(&body);
    t
}

/// Pre-serialized AML, so helpers can return owned bytes instead of
/// borrowed object trees.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// A fixed-resource legacy device: I/O ranges (base, len) and ISA IRQs.
fn isa_device(name: &str, hid: &str, uid: u8, io: &[(u16, u8)], irqs: &[u32]) -> Vec<u8> {
    let ios: Vec<IO> = io
        .iter()
        .map(|&(base, len)| IO::new(base, base, 1, len))
        .collect();
    // ISA interrupts: edge-triggered, active high, exclusive.
    let ints: Vec<Interrupt> = irqs
        .iter()
        .map(|&n| Interrupt::new(true, true, false, false, n))
        .collect();
    let mut res: Vec<&dyn Aml> = Vec::new();
    res.extend(ios.iter().map(|x| x as &dyn Aml));
    res.extend(ints.iter().map(|x| x as &dyn Aml));
    let crs = ResourceTemplate::new(res);
    let hid = EISAName::new(hid);
    aml_bytes(&Device::new(
        name.into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_UID".into(), &uid),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// \_SB_.PCI0: host bridge decoding CF8/CFC config ports, all other I/O,
/// and the 32-bit BAR window; _PRT routes INTx to GSI 16-23.
fn pci_root() -> Vec<u8> {
    let bus = AddressSpace::<u16>::new_bus_number(0, 0xff);
    let cfg_io = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = AddressSpace::<u16>::new_io(0x0000, 0x0cf7, None);
    let io_hi = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        PCI_MMIO32_END as u32,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &cfg_io, &io_lo, &io_hi, &mmio32]);

    // _PRT entries: {slot<<16 | 0xffff, pin, source (0 = GSI), GSI}.
    let mut prt_entries: Vec<Vec<u8>> = Vec::new();
    for slot in 0u8..32 {
        for pin in 0u8..4 {
            let addr: u32 = ((slot as u32) << 16) | 0xffff;
            let gsi = pci_intx_gsi(slot, pin);
            let zero: u8 = 0;
            prt_entries.push(aml_bytes(&Package::new(vec![&addr, &pin, &zero, &gsi])));
        }
    }
    let raw: Vec<RawAml> = prt_entries.into_iter().map(RawAml).collect();
    let prt = Package::new(raw.iter().map(|r| r as &dyn Aml).collect());

    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let zero: u8 = 0;
    aml_bytes(&Device::new(
        "PCI0".into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_CID".into(), &cid),
            &Name::new("_ADR".into(), &zero),
            &Name::new("_SEG".into(), &zero),
            &Name::new("_UID".into(), &zero),
            &Name::new("_BBN".into(), &zero),
            &Name::new("_CRS".into(), &crs),
            &Name::new("_PRT".into(), &prt),
        ],
    ))
}
