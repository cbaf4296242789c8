//! Port-I/O and MMIO device traits and a generic address-range bus.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::Error;

/// A device on the x86 port-I/O bus. `offset` is relative to the range base
/// under which the device was inserted. `data.len()` is the access size.
pub trait PioDevice: Send {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]);
    fn pio_write(&mut self, offset: u16, data: &[u8]);
}

/// A memory-mapped device. `offset` is relative to the range base.
pub trait MmioDevice: Send {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}

/// Locks a mutex, ignoring poisoning: a panicked device thread must not take
/// the whole VM down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Range<T: ?Sized> {
    len: u64,
    dev: Arc<Mutex<T>>,
}

/// Maps non-overlapping `[base, base + len)` ranges to devices.
pub struct IoBus<T: ?Sized> {
    ranges: BTreeMap<u64, Range<T>>,
}

pub type PioBus = IoBus<dyn PioDevice>;
pub type MmioBus = IoBus<dyn MmioDevice>;

impl<T: ?Sized> Default for IoBus<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: ?Sized> IoBus<T> {
    pub fn new() -> Self {
        IoBus {
            ranges: BTreeMap::new(),
        }
    }

    /// Maps `dev` at `[base, base + len)`. Fails on zero length, address
    /// overflow or overlap with an existing range.
    pub fn insert(&mut self, base: u64, len: u64, dev: Arc<Mutex<T>>) -> Result<(), Error> {
        if len == 0 {
            return Err(Error::ZeroLengthRange { base });
        }
        let end = base
            .checked_add(len - 1)
            .ok_or(Error::RangeOverflow { base, len })?;
        // The nearest range starting at or below `end` is the only candidate
        // that can overlap, since ranges are disjoint.
        if let Some((&b, r)) = self.ranges.range(..=end).next_back() {
            if b + (r.len - 1) >= base {
                return Err(Error::RangeOverlap {
                    base,
                    len,
                    existing_base: b,
                    existing_len: r.len,
                });
            }
        }
        self.ranges.insert(base, Range { len, dev });
        Ok(())
    }

    /// Unmaps the range starting exactly at `base`, returning its device.
    pub fn remove(&mut self, base: u64) -> Option<Arc<Mutex<T>>> {
        self.ranges.remove(&base).map(|r| r.dev)
    }

    /// Finds the device covering `addr`: returns (range base, device).
    pub fn lookup(&self, addr: u64) -> Option<(u64, &Arc<Mutex<T>>)> {
        let (&b, r) = self.ranges.range(..=addr).next_back()?;
        (addr - b < r.len).then_some((b, &r.dev))
    }

    /// Iterates over (base, len) of all mapped ranges.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&b, r)| (b, r.len))
    }
}

impl IoBus<dyn PioDevice> {
    /// Dispatches a port read; returns false (data = 0xff..) if unmapped.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.lookup(port as u64) {
            Some((base, dev)) => {
                lock(dev).pio_read(port - base as u16, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a port write; returns false (write dropped) if unmapped.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.lookup(port as u64) {
            Some((base, dev)) => {
                lock(dev).pio_write(port - base as u16, data);
                true
            }
            None => false,
        }
    }
}

impl IoBus<dyn MmioDevice> {
    /// Dispatches an MMIO read; returns false (data = 0xff..) if unmapped.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                lock(dev).mmio_read(addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches an MMIO write; returns false (write dropped) if unmapped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                lock(dev).mmio_write(addr - base, data);
                true
            }
            None => false,
        }
    }
}

/// Exposes a second port range of a multi-range device (e.g. PIC slave at
/// 0xa0, PIT's port 0x61) by forwarding with `offset + extra` to a device
/// already mapped elsewhere. Each device documents the `extra` it expects.
pub struct PioAlias {
    dev: Arc<Mutex<dyn PioDevice>>,
    extra: u16,
}

impl PioAlias {
    pub fn new(dev: Arc<Mutex<dyn PioDevice>>, extra: u16) -> Self {
        PioAlias { dev, extra }
    }
}

impl PioDevice for PioAlias {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        lock(&self.dev).pio_read(offset.wrapping_add(self.extra), data)
    }
    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        lock(&self.dev).pio_write(offset.wrapping_add(self.extra), data)
    }
}

/// Helper for byte-register devices: a multi-byte access at `offset` is
/// treated as consecutive byte accesses at `offset`, `offset + 1`, ...
pub(crate) fn read_bytes(offset: u16, data: &mut [u8], mut f: impl FnMut(u16) -> u8) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = f(offset.wrapping_add(i as u16));
    }
}

pub(crate) fn write_bytes(offset: u16, data: &[u8], mut f: impl FnMut(u16, u8)) {
    for (i, &b) in data.iter().enumerate() {
        f(offset.wrapping_add(i as u16), b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch([u8; 4]);
    impl PioDevice for Scratch {
        fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
            read_bytes(offset, data, |o| *self.0.get(o as usize).unwrap_or(&0xff));
        }
        fn pio_write(&mut self, offset: u16, data: &[u8]) {
            write_bytes(offset, data, |o, v| {
                if let Some(b) = self.0.get_mut(o as usize) {
                    *b = v
                }
            });
        }
    }

    #[test]
    fn overlap_and_dispatch() {
        let mut bus = PioBus::new();
        let d: Arc<Mutex<dyn PioDevice>> = Arc::new(Mutex::new(Scratch([0; 4])));
        bus.insert(0x100, 4, d.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x103, 2, d.clone()),
            Err(Error::RangeOverlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xfe, 3, d.clone()),
            Err(Error::RangeOverlap { .. })
        ));
        assert!(matches!(
            bus.insert(0, 0, d.clone()),
            Err(Error::ZeroLengthRange { .. })
        ));
        bus.insert(0xfc, 4, d.clone()).unwrap();
        bus.insert(0x104, 1, Arc::new(Mutex::new(PioAlias::new(d.clone(), 3))))
            .unwrap();

        assert!(bus.write(0x101, &[0x12, 0x34]));
        let mut b = [0u8; 2];
        assert!(bus.read(0x101, &mut b));
        assert_eq!(b, [0x12, 0x34]);
        bus.write(0x104, &[0x77]);
        let mut b = [0u8; 1];
        bus.read(0x103, &mut b);
        assert_eq!(b[0], 0x77);
        let mut b = [0u8; 4];
        assert!(!bus.read(0x200, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(0x200, &b));
        assert!(bus.lookup(0x105).is_none());
        assert!(bus.remove(0x104).is_some());
        assert!(bus.lookup(0x104).is_none());
    }

    #[test]
    fn mmio_top_of_space() {
        let mut bus = MmioBus::new();
        struct M;
        impl MmioDevice for M {
            fn mmio_read(&mut self, o: u64, d: &mut [u8]) {
                d.fill(o as u8)
            }
            fn mmio_write(&mut self, _: u64, _: &[u8]) {}
        }
        let m: Arc<Mutex<dyn MmioDevice>> = Arc::new(Mutex::new(M));
        bus.insert(u64::MAX - 15, 16, m.clone()).unwrap();
        assert!(matches!(
            bus.insert(u64::MAX - 15, 17, m.clone()),
            Err(Error::RangeOverflow { .. })
        ));
        let mut b = [0u8; 1];
        assert!(bus.read(u64::MAX, &mut b));
        assert_eq!(b[0], 15);
    }
}
