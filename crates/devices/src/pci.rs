//! PCI host bridge: configuration mechanism #1 (ports 0xcf8-0xcff), an
//! optional ECAM (MMCONFIG) window, and [`PciConfig`], a reusable type-0
//! configuration space with BAR sizing semantics for future devices
//! (virtio-pci).
//!
//! The host bridge at 00:00.0 is an Intel 440FX (8086:1237), class 0x0600.
//!
//! Map the `PciHost` at [`PCI_CONFIG_BASE`] (len 8). It also owns port
//! 0xcf9: byte accesses there go to its [`ResetControl`], while dword
//! accesses at 0xcf8 are the config address register. Optionally map the
//! same `Arc<Mutex<PciHost>>` on the MMIO bus as the ECAM window (offset =
//! bus << 20 | device << 15 | function << 12 | register), matching the
//! VMM's MCFG table.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::acpi_pm::ResetControl;
use crate::bus::{lock, MmioDevice, PioDevice};
use crate::{Error, EventHandler};

pub const PCI_CONFIG_BASE: u16 = 0xcf8;
pub const PCI_CONFIG_LEN: u16 = 8;
pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE: u16 = 0x1237;

/// A device's configuration space as seen by the host bridge.
pub trait PciDevice: Send {
    /// Reads the dword at `reg` (4-byte aligned, < 4096).
    fn config_read(&mut self, reg: u16) -> u32;
    /// Writes 1, 2 or 4 bytes at byte offset `offset`, never crossing a
    /// dword boundary.
    fn config_write(&mut self, offset: u16, data: &[u8]);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    /// Occupies this BAR slot and the next.
    Mem64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBar {
    /// Power of two; rounded up (minimum 16 for memory, 4 for I/O).
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

const CFG_SIZE: usize = 256;

/// A type-0 configuration header with write masks. BARs are sized by the
/// standard protocol: writes are masked to the BAR's address bits, so
/// writing all-ones reads back the size mask.
#[derive(Clone)]
pub struct PciConfig {
    bytes: [u8; CFG_SIZE],
    wmask: [u8; CFG_SIZE],
    w1cmask: [u8; CFG_SIZE],
    bars: [Option<PciBar>; 6],
    last_cap: Option<u8>,
    /// Where the next capability goes.
    next_cap: usize,
}

impl PciConfig {
    pub fn new(
        vendor: u16,
        device: u16,
        class: u8,
        subclass: u8,
        prog_if: u8,
        revision: u8,
    ) -> Self {
        let mut c = PciConfig {
            bytes: [0; CFG_SIZE],
            wmask: [0; CFG_SIZE],
            w1cmask: [0; CFG_SIZE],
            bars: [None; 6],
            last_cap: None,
            next_cap: 0x40,
        };
        c.set_u16(0x00, vendor);
        c.set_u16(0x02, device);
        c.bytes[0x08] = revision;
        c.bytes[0x09] = prog_if;
        c.bytes[0x0a] = subclass;
        c.bytes[0x0b] = class;
        // Command: I/O, memory, bus master, parity, SERR, INTx disable.
        c.wmask[0x04] = 0x47;
        c.wmask[0x05] = 0x05;
        // Status error bits are write-1-to-clear.
        c.w1cmask[0x07] = 0xf9;
        c.wmask[0x0c] = 0xff; // cache line size
        c.wmask[0x0d] = 0xff; // latency timer
        c.wmask[0x3c] = 0xff; // interrupt line
        c
    }

    pub fn set_u8(&mut self, off: usize, v: u8) {
        if let Some(b) = self.bytes.get_mut(off) {
            *b = v;
        }
    }

    pub fn set_u16(&mut self, off: usize, v: u16) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            self.set_u8(off + i, b);
        }
    }

    pub fn set_u32(&mut self, off: usize, v: u32) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            self.set_u8(off + i, b);
        }
    }

    pub fn get_u16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.byte(off), self.byte(off + 1)])
    }

    pub fn get_u32(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.byte(off),
            self.byte(off + 1),
            self.byte(off + 2),
            self.byte(off + 3),
        ])
    }

    fn byte(&self, off: usize) -> u8 {
        self.bytes.get(off).copied().unwrap_or(0)
    }

    /// Makes config bytes `[off, off + len)` guest-writable.
    pub fn set_writable(&mut self, off: usize, len: usize) {
        for m in self.wmask.iter_mut().skip(off).take(len) {
            *m = 0xff;
        }
    }

    pub fn set_header_type(&mut self, t: u8) {
        self.bytes[0x0e] = t;
    }

    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.set_u16(0x2c, vendor);
        self.set_u16(0x2e, id);
    }

    /// INTx pin: 1 = INTA# ... 4 = INTD#, 0 = none.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[0x3d] = pin;
    }

    pub fn command(&self) -> u16 {
        self.get_u16(0x04)
    }

    /// Declares BAR `idx`. Returns false if the slot is invalid or taken.
    pub fn add_bar(&mut self, idx: usize, bar: PciBar) -> bool {
        let slots = if bar.kind == BarKind::Mem64 { 2 } else { 1 };
        if idx + slots > 6 || self.bars[idx..idx + slots].iter().any(Option::is_some) {
            return false;
        }
        if idx > 0
            && matches!(
                self.bars[idx - 1],
                Some(PciBar {
                    kind: BarKind::Mem64,
                    ..
                })
            )
        {
            return false;
        }
        let min = if bar.kind == BarKind::Io { 4 } else { 16 };
        let size = bar
            .size
            .max(min)
            .checked_next_power_of_two()
            .unwrap_or(1 << 63);
        let bar = PciBar { size, ..bar };
        let mask = !(size - 1);
        let off = 0x10 + idx * 4;
        let (low_flags, low_mask) = match bar.kind {
            BarKind::Io => (0x1u32, mask as u32 & !0x3),
            BarKind::Mem32 => ((bar.prefetchable as u32) << 3, mask as u32 & !0xf),
            BarKind::Mem64 => (0x4 | (bar.prefetchable as u32) << 3, mask as u32 & !0xf),
        };
        self.set_u32(off, low_flags);
        self.wmask[off..off + 4].copy_from_slice(&low_mask.to_le_bytes());
        if bar.kind == BarKind::Mem64 {
            self.set_u32(off + 4, 0);
            self.wmask[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[idx] = Some(bar);
        true
    }

    pub fn bar(&self, idx: usize) -> Option<PciBar> {
        self.bars.get(idx).copied().flatten()
    }

    /// Address programmed into BAR `idx` (None if undeclared).
    pub fn bar_address(&self, idx: usize) -> Option<u64> {
        let bar = self.bar(idx)?;
        let off = 0x10 + idx * 4;
        let low = self.get_u32(off) as u64;
        Some(match bar.kind {
            BarKind::Io => low & !0x3,
            BarKind::Mem32 => low & !0xf,
            BarKind::Mem64 => (low & !0xf) | (self.get_u32(off + 4) as u64) << 32,
        })
    }

    /// Appends a capability (`body` excludes the 2-byte ID/next header) to
    /// the capability list; returns its offset, or None if out of space.
    /// The body is read-only unless made writable with `set_writable`.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Option<u8> {
        let start = self.next_cap;
        let end = start + 2 + body.len();
        if end > CFG_SIZE {
            return None;
        }
        self.bytes[start] = id;
        self.bytes[start + 1] = 0;
        self.bytes[start + 2..end].copy_from_slice(body);
        match self.last_cap {
            None => self.bytes[0x34] = start as u8,
            Some(last) => self.bytes[last as usize + 1] = start as u8,
        }
        self.bytes[0x06] |= 0x10; // capability list present
        self.last_cap = Some(start as u8);
        self.next_cap = (end + 3) & !3;
        Some(start as u8)
    }

    pub fn read_u32(&self, reg: u16) -> u32 {
        let r = (reg & !3) as usize;
        if r + 4 > CFG_SIZE {
            return 0;
        }
        self.get_u32(r)
    }

    pub fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let o = offset as usize + i;
            if o >= CFG_SIZE {
                break;
            }
            let w = self.wmask[o];
            let c = self.w1cmask[o];
            let b = (self.bytes[o] & !w) | (v & w);
            self.bytes[o] = b & !(v & c);
        }
    }
}

impl PciDevice for PciConfig {
    fn config_read(&mut self, reg: u16) -> u32 {
        self.read_u32(reg)
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.write(offset, data)
    }
}

pub struct PciHost {
    address: u32,
    /// Bus 0 devices by devfn (device << 3 | function).
    devices: BTreeMap<u8, Arc<Mutex<dyn PciDevice>>>,
    reset: ResetControl,
}

impl PciHost {
    /// Creates the host with the 440FX host bridge at 00:00.0. `events`
    /// receives [`crate::VmEvent::Reset`] for writes to port 0xcf9.
    pub fn new(events: EventHandler) -> Self {
        let bridge = PciConfig::new(
            HOST_BRIDGE_VENDOR,
            HOST_BRIDGE_DEVICE,
            0x06,
            0x00,
            0x00,
            0x02,
        );
        let mut h = PciHost {
            address: 0,
            devices: BTreeMap::new(),
            reset: ResetControl::new(events),
        };
        h.devices.insert(0, Arc::new(Mutex::new(bridge)));
        h
    }

    /// Adds a device on bus 0. Multi-function devices must set header type
    /// bit 7 in function 0 for the guest to look at other functions.
    pub fn add_device(
        &mut self,
        device: u8,
        function: u8,
        dev: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), Error> {
        let devfn = device
            .checked_shl(3)
            .filter(|_| device < 32 && function < 8);
        let Some(devfn) = devfn.map(|d| d | function) else {
            return Err(Error::PciSlotUnavailable {
                bus: 0,
                device,
                function,
            });
        };
        if self.devices.contains_key(&devfn) {
            return Err(Error::PciSlotUnavailable {
                bus: 0,
                device,
                function,
            });
        }
        self.devices.insert(devfn, dev);
        Ok(())
    }

    /// Lowest free device number on bus 0, if any.
    pub fn free_slot(&self) -> Option<u8> {
        (1..32).find(|d| !self.devices.contains_key(&(d << 3)))
    }

    /// Dword config read; absent functions read all-ones.
    pub fn config_read(&self, bus: u8, devfn: u8, reg: u16) -> u32 {
        if bus != 0 || reg >= 4096 {
            return 0xffff_ffff;
        }
        match self.devices.get(&devfn) {
            Some(d) => lock(d).config_read(reg & !3),
            None => 0xffff_ffff,
        }
    }

    /// Config write of `data` at byte offset `reg` (clipped to its dword).
    pub fn config_write(&self, bus: u8, devfn: u8, reg: u16, data: &[u8]) {
        if bus != 0 || reg >= 4096 || data.is_empty() {
            return;
        }
        let room = 4 - (reg & 3) as usize;
        let data = &data[..data.len().min(room)];
        if let Some(d) = self.devices.get(&devfn) {
            lock(d).config_write(reg, data);
        }
    }

    fn read_into(&self, bus: u8, devfn: u8, reg: u16, data: &mut [u8]) {
        let v = self.config_read(bus, devfn, reg & !3).to_le_bytes();
        let start = (reg & 3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(start + i).copied().unwrap_or(0xff);
        }
    }

    fn decode_address(&self) -> Option<(u8, u8, u16)> {
        let a = self.address;
        (a & 0x8000_0000 != 0).then_some(((a >> 16) as u8, (a >> 8) as u8, (a & 0xfc) as u16))
    }

    fn decode_ecam(offset: u64) -> Option<(u8, u8, u16)> {
        (offset < 256 << 20).then_some({
            (
                (offset >> 20) as u8,
                (offset >> 12) as u8,
                (offset & 0xfff) as u16,
            )
        })
    }
}

impl PioDevice for PciHost {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (1, 1) => data[0] = self.reset.read(),
            (4..=7, _) => match self.decode_address() {
                Some((bus, devfn, reg)) => self.read_into(bus, devfn, reg + (offset - 4), data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.address = v & !3;
            }
            (1, 1) => self.reset.write(data[0]),
            (4..=7, _) => {
                if let Some((bus, devfn, reg)) = self.decode_address() {
                    self.config_write(bus, devfn, reg + (offset - 4), data);
                }
            }
            _ => {}
        }
    }
}

impl MmioDevice for PciHost {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::decode_ecam(offset) {
            Some((bus, devfn, reg)) => self.read_into(bus, devfn, reg, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bus, devfn, reg)) = Self::decode_ecam(offset) {
            self.config_write(bus, devfn, reg, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi_pm::tests::recorder;
    use crate::VmEvent;

    fn cfg_read(h: &mut PciHost, dev: u8, reg: u8, size: usize) -> u32 {
        h.pio_write(
            0,
            &(0x8000_0000u32 | (dev as u32) << 11 | (reg as u32 & 0xfc)).to_le_bytes(),
        );
        let mut b = [0u8; 4];
        h.pio_read(4 + (reg & 3) as u16, &mut b[..size]);
        u32::from_le_bytes(b)
    }

    fn cfg_write(h: &mut PciHost, dev: u8, reg: u8, data: &[u8]) {
        h.pio_write(
            0,
            &(0x8000_0000u32 | (dev as u32) << 11 | (reg as u32 & 0xfc)).to_le_bytes(),
        );
        h.pio_write(4 + (reg & 3) as u16, data);
    }

    #[test]
    fn mechanism1() {
        let (ev, h) = recorder();
        let mut host = PciHost::new(h);
        assert_eq!(cfg_read(&mut host, 0, 0, 4), 0x1237_8086);
        assert_eq!(cfg_read(&mut host, 0, 2, 2), 0x1237);
        assert_eq!(cfg_read(&mut host, 0, 0x0b, 1), 0x06);
        assert_eq!(cfg_read(&mut host, 0, 0x08, 4) >> 8, 0x06_0000);
        assert_eq!(cfg_read(&mut host, 5, 0, 4), 0xffff_ffff);
        // Address register reads back; Linux's pci_check_type1 probe.
        host.pio_write(3, &[0x01]);
        host.pio_write(0, &0x8000_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        host.pio_read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        // Disabled address: data reads all-ones.
        host.pio_write(0, &0u32.to_le_bytes());
        host.pio_read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Command register is writable, vendor ID is not.
        cfg_write(&mut host, 0, 0x04, &[0x07, 0x00]);
        assert_eq!(cfg_read(&mut host, 0, 0x04, 2), 0x07);
        cfg_write(&mut host, 0, 0x00, &[0, 0, 0, 0]);
        assert_eq!(cfg_read(&mut host, 0, 0, 4), 0x1237_8086);
        // 0xcf9 byte write resets.
        host.pio_write(1, &[0x06]);
        assert_eq!(*ev.lock().unwrap(), vec![VmEvent::Reset]);
        // ECAM view of the same space.
        let mut e = [0u8; 2];
        host.mmio_read(2, &mut e);
        assert_eq!(u16::from_le_bytes(e), 0x1237);
        host.mmio_read(1 << 15, &mut e);
        assert_eq!(e, [0xff; 2]);
        host.mmio_read(u64::MAX, &mut e);
        host.mmio_write(u64::MAX - 1, &[1, 2, 3, 4]);
        host.pio_write(7, &[1, 2, 3, 4]);
    }

    #[test]
    fn bar_sizing_and_devices() {
        let (_, h) = recorder();
        let mut host = PciHost::new(h);
        let mut c = PciConfig::new(0x1af4, 0x1041, 0x02, 0x00, 0x00, 0x01);
        assert!(c.add_bar(
            0,
            PciBar {
                size: 0x100,
                kind: BarKind::Io,
                prefetchable: false
            }
        ));
        assert!(c.add_bar(
            1,
            PciBar {
                size: 0x1000,
                kind: BarKind::Mem32,
                prefetchable: false
            }
        ));
        assert!(c.add_bar(
            2,
            PciBar {
                size: 0x4000,
                kind: BarKind::Mem64,
                prefetchable: true
            }
        ));
        assert!(!c.add_bar(
            3,
            PciBar {
                size: 16,
                kind: BarKind::Mem32,
                prefetchable: false
            }
        ));
        assert_eq!(c.add_capability(0x09, &[0x10, 0, 0]), Some(0x40));
        assert_eq!(c.add_capability(0x05, &[0; 12]), Some(0x48));
        let dev = Arc::new(Mutex::new(c));
        host.add_device(3, 0, dev.clone()).unwrap();
        assert!(host.add_device(3, 0, dev.clone()).is_err());
        assert!(host.add_device(32, 0, dev.clone()).is_err());
        assert_eq!(host.free_slot(), Some(1));

        assert_eq!(cfg_read(&mut host, 3, 0, 4), 0x1041_1af4);
        for reg in [0x10u8, 0x14, 0x18, 0x1c, 0x20, 0x30] {
            cfg_write(&mut host, 3, reg, &[0xff; 4]);
        }
        assert_eq!(cfg_read(&mut host, 3, 0x10, 4), 0xffff_ff01);
        assert_eq!(cfg_read(&mut host, 3, 0x14, 4), 0xffff_f000);
        assert_eq!(cfg_read(&mut host, 3, 0x18, 4), 0xffff_c00c);
        assert_eq!(cfg_read(&mut host, 3, 0x1c, 4), 0xffff_ffff);
        assert_eq!(cfg_read(&mut host, 3, 0x20, 4), 0);
        assert_eq!(cfg_read(&mut host, 3, 0x30, 4), 0);
        cfg_write(&mut host, 3, 0x18, &0xe000_0000u32.to_le_bytes());
        cfg_write(&mut host, 3, 0x1c, &1u32.to_le_bytes());
        assert_eq!(lock(&dev).bar_address(2), Some(0x1_e000_0000));
        // Unaligned byte write inside a BAR.
        cfg_write(&mut host, 3, 0x11, &[0xc0]);
        assert_eq!(lock(&dev).bar_address(0), Some(0xffff_c000));
        // Capability list.
        assert_eq!(cfg_read(&mut host, 3, 0x34, 1), 0x40);
        assert_eq!(cfg_read(&mut host, 3, 0x40, 4) & 0xffff, 0x4809);
        assert_eq!(cfg_read(&mut host, 3, 0x06, 2) & 0x10, 0x10);
    }
}
