//! virtio-pci devices on the PCI host: slot and BAR assignment (there is
//! no firmware, so the VMM pre-assigns BAR0 of each device from the 32-bit
//! PCI window that the DSDT's PCI0 _CRS advertises), MSI-X to the APIC bus,
//! INTx to the IOAPIC pin of the slot's _PRT GSI, and DMA-write reporting
//! to the CPU's code cache.
//!
//! BAR re-programming by the guest is supported: the whole window is one
//! [`virtio::PciBarRouter`] on the MMIO bus that looks up each device's
//! BAR as currently programmed.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use devices::bus::lock;
use devices::ioapic::IoApicIrqLine;
use devices::{ApicBus, InterruptSink, IoApic, MmioBus, PciHost};
use virtio::{MemWriteObserver, PciBarRouter, VirtioDevice, VirtioPciDevice};
use vm_memory::GuestMemoryMmap;
use x86::GuestRam;

use crate::boot::layout;

/// Device DMA writes invalidate translated code on the written pages.
pub struct RamObserver(pub Arc<GuestRam>);

impl MemWriteObserver for RamObserver {
    fn wrote(&self, gpa: u64, len: u64) {
        self.0.note_write(gpa, len);
    }
}

/// Which paravirtual devices a VM gets.
#[derive(Clone, Debug, Default)]
pub struct VirtioConfig {
    pub disks: Vec<virtio::DiskOptions>,
    pub rng: bool,
    /// virtio-console (hvc0) writing to stdout; the serial port stays the
    /// main console.
    pub console: bool,
    /// virtio-net NICs (`--net`); a NIC without a MAC gets a random one.
    pub nets: Vec<net::NetSpec>,
}

/// Kernel command line for booting the default guest's initramfs into the
/// root filesystem on the first disk (see guest/build.sh: matryoshka.root=).
pub fn default_disk_cmdline(base: &str) -> String {
    format!("{base} matryoshka.root=/dev/vda")
}

/// Builds virtio-pci devices and places them on `pci`; returns the BAR
/// router to map at [`layout::PCI_MMIO32_START`].
pub struct VirtioBuilder {
    mem: GuestMemoryMmap,
    observer: Arc<dyn MemWriteObserver>,
    sink: Arc<dyn InterruptSink>,
    ioapic: Arc<Mutex<IoApic>>,
    router: PciBarRouter,
    next_bar: u64,
}

impl VirtioBuilder {
    pub fn new(
        mem: GuestMemoryMmap,
        ram: Arc<GuestRam>,
        apic_bus: Arc<ApicBus>,
        ioapic: Arc<Mutex<IoApic>>,
    ) -> Self {
        VirtioBuilder {
            mem,
            observer: Arc::new(RamObserver(ram)),
            sink: apic_bus,
            ioapic,
            router: PciBarRouter::new(layout::PCI_MMIO32_START),
            next_bar: layout::PCI_MMIO32_START,
        }
    }

    /// Adds `dev` in the lowest free slot of bus 0.
    pub fn add(&mut self, pci: &Mutex<PciHost>, dev: Box<dyn VirtioDevice>) -> anyhow::Result<()> {
        let mut host = lock(pci);
        let slot = host.free_slot().context("no free PCI slot")?;
        let bar = self.next_bar;
        if bar + virtio::pci::BAR_SIZE - 1 > layout::PCI_MMIO32_END {
            anyhow::bail!("PCI MMIO window full");
        }
        let intx = Arc::new(IoApicIrqLine {
            ioapic: self.ioapic.clone(),
            pin: layout::pci_intx_gsi(slot, 0) as usize,
        });
        let mut d = VirtioPciDevice::new(
            dev,
            self.mem.clone(),
            self.observer.clone(),
            self.sink.clone(),
            intx,
        )?;
        d.set_bar_address(bar);
        let d = Arc::new(Mutex::new(d));
        host.add_device(slot, 0, d.clone())?;
        self.router.add(d);
        self.next_bar += virtio::pci::BAR_SIZE;
        Ok(())
    }

    /// Creates the devices of `cfg`.
    pub fn add_config(&mut self, pci: &Mutex<PciHost>, cfg: &VirtioConfig) -> anyhow::Result<()> {
        for d in &cfg.disks {
            let blk = virtio::Block::open(d)?;
            self.add(pci, Box::new(blk))?;
        }
        for n in &cfg.nets {
            let backend = n.open()?;
            let mac = n.mac.unwrap_or_else(net::MacAddr::random);
            self.add(pci, Box::new(virtio::net::Net::new(mac, backend)))?;
        }
        if cfg.rng {
            self.add(pci, Box::new(virtio::Rng::new()))?;
        }
        if cfg.console {
            let c = virtio::Console::new(Box::new(std::io::stdout()))?;
            self.add(pci, Box::new(c))?;
        }
        Ok(())
    }

    /// Maps the BAR router over the 32-bit PCI window.
    pub fn finish(self, mmio: &mut MmioBus) -> anyhow::Result<()> {
        mmio.insert(
            layout::PCI_MMIO32_START,
            layout::PCI_MMIO32_END - layout::PCI_MMIO32_START + 1,
            Arc::new(Mutex::new(self.router)),
        )?;
        Ok(())
    }
}
