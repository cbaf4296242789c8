//! Intel 8254 programmable interval timer plus the port 0x61 "system control
//! port B" bits that gate channel 2 (used by Linux for TSC calibration).
//!
//! Map the `Pit` at [`PIT_BASE`] (len 4) and a
//! [`PioAlias`](crate::bus::PioAlias) at port 0x61 (len 1) with extra offset
//! [`PORT61_ALIAS_OFFSET`]. Channel 0 drives ISA IRQ0: the VMM calls
//! [`Pit::poll`] from its vCPU loop (and sleeps at most until
//! [`Pit::next_deadline_ns`]) and pulses IRQ0 when it returns non-zero.
//!
//! BCD counting is accepted but counted in binary.

use std::sync::Arc;

use crate::bus::PioDevice;
use crate::clock::{ns_to_ticks, ticks_to_ns, Clock};

pub const PIT_BASE: u16 = 0x40;
pub const PIT_LEN: u16 = 4;
pub const PIT_IRQ: u8 = 0;
/// Offset at which the Pit expects accesses to port 0x61 (0x61 - 0x40).
pub const PORT61_ALIAS_OFFSET: u16 = 0x21;
pub const PIT_HZ: u64 = 1_193_182;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Lo = 1,
    Hi = 2,
    LoHi = 3,
}

#[derive(Debug, Clone)]
struct Channel {
    mode: u8,
    access: Access,
    bcd: bool,
    /// Programmed count; 0 means 65536.
    reload: u32,
    /// Clock time of the last (re)load, i.e. when counting started.
    start_ns: u64,
    /// Counting has been started (count written, and for modes 1/5 the gate
    /// triggered).
    running: bool,
    /// Mode 0/4 with gate low: count frozen at this many elapsed ticks.
    frozen_ticks: Option<u64>,
    gate: bool,
    write_lsb_pending: Option<u8>,
    read_hi_next: bool,
    latched_count: Option<(u16, bool)>, // (value, next byte is hi)
    latched_status: Option<u8>,
    null_count: bool,
    /// IRQ edges already reported by `poll` since `start_ns` (channel 0).
    edges_reported: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            mode: 0,
            access: Access::LoHi,
            bcd: false,
            reload: 0x10000,
            start_ns: 0,
            running: false,
            frozen_ticks: None,
            gate,
            write_lsb_pending: None,
            read_hi_next: false,
            latched_count: None,
            latched_status: None,
            null_count: true,
            edges_reported: 0,
        }
    }

    fn elapsed_ticks(&self, now: u64) -> u64 {
        if let Some(t) = self.frozen_ticks {
            return t;
        }
        ns_to_ticks(now.saturating_sub(self.start_ns), PIT_HZ)
    }

    fn count(&self, now: u64) -> u16 {
        if !self.running {
            return self.reload as u16;
        }
        let d = self.elapsed_ticks(now);
        let n = self.reload as u64;
        (match self.mode {
            2 => n - d % n,
            3 => n - (2 * d) % n,
            // Modes 0,1,4,5: counter keeps decrementing and wraps.
            _ => (n.wrapping_sub(d)) & 0xffff,
        }) as u16
    }

    fn out(&self, now: u64) -> bool {
        if !self.running {
            // After the control word: mode 0 output low, others high.
            return self.mode != 0;
        }
        let d = self.elapsed_ticks(now);
        let n = self.reload as u64;
        match self.mode {
            0 => d >= n,
            1 => d >= n,
            2 => !self.gate || d % n != n - 1,
            3 => !self.gate || d % n < n.div_ceil(2),
            _ => d != n, // 4, 5: one-tick low strobe at terminal count
        }
    }

    /// Number of rising edges of OUT since counting started.
    fn rising_edges(&self, now: u64) -> u64 {
        if !self.running || (!self.gate && matches!(self.mode, 2 | 3)) {
            return 0;
        }
        let d = self.elapsed_ticks(now);
        let n = self.reload as u64;
        match self.mode {
            0 | 1 => (d >= n) as u64,
            2 | 3 => d / n,
            _ => (d > n) as u64,
        }
    }

    /// Clock time of rising edge number `k` (1-based), if it will happen.
    fn edge_time_ns(&self, k: u64) -> Option<u64> {
        if !self.running || self.frozen_ticks.is_some() {
            return None;
        }
        let n = self.reload as u64;
        let ticks = match self.mode {
            0 | 1 if k == 1 => n,
            2 | 3 if self.gate => k.checked_mul(n)?,
            4 | 5 if k == 1 => n + 1,
            _ => return None,
        };
        Some(self.start_ns.saturating_add(ticks_to_ns(ticks, PIT_HZ)))
    }

    fn load(&mut self, value: u32, now: u64) {
        self.reload = if value == 0 { 0x10000 } else { value };
        self.null_count = false;
        self.start_ns = now;
        self.edges_reported = 0;
        self.frozen_ticks = None;
        // Modes 1 and 5 wait for a gate trigger.
        self.running = !matches!(self.mode, 1 | 5);
        if matches!(self.mode, 0 | 4) && !self.gate {
            self.frozen_ticks = Some(0);
        }
    }

    fn set_gate(&mut self, gate: bool, now: u64) {
        let rising = gate && !self.gate;
        let was_gate = self.gate;
        self.gate = gate;
        match self.mode {
            0 | 4 => {
                if !gate && was_gate && self.running {
                    self.frozen_ticks = Some(self.elapsed_ticks(now));
                } else if rising {
                    if let Some(t) = self.frozen_ticks.take() {
                        // Resume: rebase so elapsed ticks continue from t.
                        self.start_ns = now.saturating_sub(ticks_to_ns(t, PIT_HZ));
                    }
                }
            }
            1 | 5 if rising && !self.null_count => {
                self.running = true;
                self.start_ns = now;
                self.edges_reported = 0;
            }
            2 | 3 if rising && !self.null_count => {
                self.start_ns = now;
                self.edges_reported = 0;
            }
            _ => {}
        }
    }

    fn status(&self, now: u64) -> u8 {
        ((self.out(now) as u8) << 7)
            | ((self.null_count as u8) << 6)
            | ((self.access as u8) << 4)
            | (self.mode << 1)
            | self.bcd as u8
    }

    fn latch_count(&mut self, now: u64) {
        if self.latched_count.is_none() {
            self.latched_count = Some((self.count(now), false));
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(s) = self.latched_status.take() {
            return s;
        }
        if let Some((v, hi_next)) = self.latched_count {
            let (byte, done) = match self.access {
                Access::Lo => (v as u8, true),
                Access::Hi => ((v >> 8) as u8, true),
                Access::LoHi if !hi_next => (v as u8, false),
                Access::LoHi => ((v >> 8) as u8, true),
            };
            self.latched_count = if done { None } else { Some((v, true)) };
            return byte;
        }
        let v = self.count(now);
        match self.access {
            Access::Lo => v as u8,
            Access::Hi => (v >> 8) as u8,
            Access::LoHi => {
                self.read_hi_next = !self.read_hi_next;
                if self.read_hi_next {
                    v as u8
                } else {
                    (v >> 8) as u8
                }
            }
        }
    }

    fn write(&mut self, val: u8, now: u64) {
        match self.access {
            Access::Lo => self.load(val as u32, now),
            Access::Hi => self.load((val as u32) << 8, now),
            Access::LoHi => match self.write_lsb_pending.take() {
                None => self.write_lsb_pending = Some(val),
                Some(lo) => self.load(lo as u32 | (val as u32) << 8, now),
            },
        }
    }

    fn control(&mut self, cw: u8) {
        let access = match (cw >> 4) & 3 {
            1 => Access::Lo,
            2 => Access::Hi,
            _ => Access::LoHi,
        };
        self.access = access;
        // Modes 6 and 7 alias modes 2 and 3.
        let m = (cw >> 1) & 7;
        self.mode = if m >= 6 { m - 4 } else { m };
        self.bcd = cw & 1 != 0;
        self.running = false;
        self.frozen_ticks = None;
        self.null_count = true;
        self.write_lsb_pending = None;
        self.read_hi_next = false;
        self.latched_count = None;
        self.latched_status = None;
        self.edges_reported = 0;
    }
}

pub struct Pit {
    clock: Arc<dyn Clock>,
    ch: [Channel; 3],
    /// Port 0x61 bits 0..3 (gate 2, speaker enable, parity/IOCHK disables).
    port61: u8,
}

impl Pit {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Pit {
            clock,
            ch: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
        }
    }

    /// Number of channel-0 (IRQ0) rising edges that became due since the
    /// previous call. The VMM pulses IRQ0 once if this is non-zero (or
    /// once per edge if it wants to avoid losing ticks).
    pub fn poll(&mut self) -> u32 {
        let now = self.clock.now_ns();
        let c = &mut self.ch[0];
        let edges = c.rising_edges(now);
        let new = edges.saturating_sub(c.edges_reported);
        c.edges_reported = edges.max(c.edges_reported);
        new.min(u32::MAX as u64) as u32
    }

    /// Clock time of the next channel-0 IRQ edge not yet reported by `poll`.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let c = &self.ch[0];
        c.edge_time_ns(c.edges_reported + 1)
    }

    /// Current OUT level of `channel` (0..3).
    pub fn output(&self, channel: usize) -> bool {
        self.ch
            .get(channel)
            .is_some_and(|c| c.out(self.clock.now_ns()))
    }

    fn read_port61(&self, now: u64) -> u8 {
        // Bit 4 toggles every ~15 us (DRAM refresh); bit 5 is channel 2 OUT.
        let refresh = ((now / 15_085) & 1) as u8;
        (self.port61 & 0x0f) | (refresh << 4) | ((self.ch[2].out(now) as u8) << 5)
    }

    fn write_port61(&mut self, val: u8, now: u64) {
        self.port61 = val & 0x0f;
        self.ch[2].set_gate(val & 1 != 0, now);
    }

    fn read_byte(&mut self, off: u16, now: u64) -> u8 {
        match off {
            0..=2 => self.ch[off as usize].read(now),
            PORT61_ALIAS_OFFSET => self.read_port61(now),
            _ => 0xff, // control word register is write-only
        }
    }

    fn write_byte(&mut self, off: u16, val: u8, now: u64) {
        match off {
            0..=2 => self.ch[off as usize].write(val, now),
            3 => {
                let sel = (val >> 6) as usize;
                if sel == 3 {
                    // Read-back: bit 5 clear = latch count, bit 4 clear =
                    // latch status, bits 1..3 select channels.
                    for i in 0..3 {
                        if val & (2 << i) == 0 {
                            continue;
                        }
                        let c = &mut self.ch[i];
                        if val & 0x10 == 0 && c.latched_status.is_none() {
                            c.latched_status = Some(c.status(now));
                        }
                        if val & 0x20 == 0 {
                            c.latch_count(now);
                        }
                    }
                } else if (val >> 4) & 3 == 0 {
                    self.ch[sel].latch_count(now);
                } else {
                    self.ch[sel].control(val);
                }
            }
            PORT61_ALIAS_OFFSET => self.write_port61(val, now),
            _ => {}
        }
    }
}

impl PioDevice for Pit {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        let now = self.clock.now_ns();
        crate::bus::read_bytes(offset, data, |o| self.read_byte(o, now));
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        let now = self.clock.now_ns();
        crate::bus::write_bytes(offset, data, |o, v| self.write_byte(o, v, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn setup() -> (Arc<ManualClock>, Pit) {
        let c = Arc::new(ManualClock::new(1_000_000));
        let p = Pit::new(c.clone());
        (c, p)
    }

    fn rd(p: &mut Pit, off: u16) -> u8 {
        let mut b = [0];
        p.pio_read(off, &mut b);
        b[0]
    }

    fn tick_ns(t: u64) -> u64 {
        ticks_to_ns(t, PIT_HZ)
    }

    #[test]
    fn mode2_rate_generator_and_irq() {
        let (c, mut p) = setup();
        p.pio_write(3, &[0x34]); // ch0, lohi, mode 2
        p.pio_write(0, &[0x9c]);
        p.pio_write(0, &[0x2e]); // 11932 -> ~100 Hz
        assert_eq!(p.poll(), 0);
        let period = tick_ns(11932);
        let first = p.next_deadline_ns().unwrap();
        assert_eq!(first, 1_000_000 + period);
        c.set_ns(first - 1);
        assert_eq!(p.poll(), 0);
        c.set_ns(first);
        assert_eq!(p.poll(), 1);
        assert_eq!(p.poll(), 0);
        assert_eq!(
            p.next_deadline_ns().unwrap(),
            1_000_000 + tick_ns(2 * 11932)
        );
        // Late poll: several edges accumulated.
        c.advance_ns(3 * period);
        assert_eq!(p.poll(), 3);

        // Counting: 100 ticks after a fresh load the count is reload - 100.
        p.pio_write(0, &[0x9c]);
        p.pio_write(0, &[0x2e]);
        c.advance_ns(tick_ns(100));
        p.pio_write(3, &[0x00]); // latch ch0
        c.advance_ns(tick_ns(50)); // latched value must not move
        let lo = rd(&mut p, 0) as u16;
        let hi = rd(&mut p, 0) as u16;
        assert_eq!(lo | hi << 8, 11932 - 100);
    }

    #[test]
    fn mode3_square_wave() {
        let (c, mut p) = setup();
        p.pio_write(3, &[0x36]);
        p.pio_write(0, &[100]);
        p.pio_write(0, &[0]);
        assert!(p.output(0));
        c.advance_ns(tick_ns(10));
        // Mode 3 decrements by two.
        let lo = rd(&mut p, 0);
        let _hi = rd(&mut p, 0);
        assert_eq!(lo, 80);
        c.advance_ns(tick_ns(45)); // 55 ticks: second half, output low
        assert!(!p.output(0));
        c.advance_ns(tick_ns(45)); // 100 ticks: new period
        assert!(p.output(0));
        assert_eq!(p.poll(), 1);
    }

    #[test]
    fn channel2_gate_and_port61_calibration() {
        let (c, mut p) = setup();
        // Linux pit_calibrate_tsc: gate high, speaker off, mode 0 lohi.
        p.pio_write(PORT61_ALIAS_OFFSET, &[0x01]);
        p.pio_write(3, &[0xb0]);
        p.pio_write(2, &[0xff]);
        p.pio_write(2, &[0xff]);
        assert_eq!(rd(&mut p, PORT61_ALIAS_OFFSET) & 0x20, 0);
        c.advance_ns(tick_ns(0xfffe));
        assert_eq!(rd(&mut p, PORT61_ALIAS_OFFSET) & 0x20, 0);
        c.advance_ns(tick_ns(1));
        assert_eq!(rd(&mut p, PORT61_ALIAS_OFFSET) & 0x21, 0x21);

        // Gate low pauses mode 0 counting.
        p.pio_write(3, &[0xb0]);
        p.pio_write(2, &[0x00]);
        p.pio_write(2, &[0x10]); // 0x1000
        c.advance_ns(tick_ns(0x100));
        p.pio_write(PORT61_ALIAS_OFFSET, &[0x00]);
        c.advance_ns(tick_ns(0x500));
        p.pio_write(PORT61_ALIAS_OFFSET, &[0x01]);
        p.pio_write(3, &[0x80]); // latch ch2
        let lo = rd(&mut p, 2) as u16;
        let hi = rd(&mut p, 2) as u16;
        assert!(
            (0x0eff..=0x0f00).contains(&(lo | hi << 8)),
            "{:#x}",
            lo | hi << 8
        );
    }

    #[test]
    fn readback_status_and_count() {
        let (c, mut p) = setup();
        p.pio_write(3, &[0x30]); // ch0 lohi mode 0
                                 // Before the count is written: null count set, OUT low.
        p.pio_write(3, &[0xe2]); // read-back status ch0 only
        assert_eq!(rd(&mut p, 0), 0x70);
        p.pio_write(0, &[0x10]);
        p.pio_write(0, &[0x00]);
        c.advance_ns(tick_ns(0x20));
        p.pio_write(3, &[0xc2]); // read-back count + status ch0
        assert_eq!(rd(&mut p, 0), 0xb0); // OUT high, null count clear
        assert_eq!(rd(&mut p, 0), 0xf0); // 0x10 - 0x20 wraps: 0xfff0
        assert_eq!(rd(&mut p, 0), 0xff);
        assert_eq!(p.poll(), 1); // mode 0 interrupts on terminal count once
        c.advance_ns(1_000_000_000);
        assert_eq!(p.poll(), 0);
        assert_eq!(p.next_deadline_ns(), None);
    }

    #[test]
    fn lobyte_only_and_junk() {
        let (c, mut p) = setup();
        p.pio_write(3, &[0x14]); // ch0 lobyte mode 2
        p.pio_write(0, &[50]);
        c.advance_ns(tick_ns(5));
        assert_eq!(rd(&mut p, 0), 45);
        assert_eq!(rd(&mut p, 3), 0xff);
        let mut b = [0u8; 4];
        p.pio_read(0xfffe, &mut b);
        p.pio_write(0xfffe, &[0xff; 4]);
        p.pio_write(3, &[0xfe]);
    }
}
