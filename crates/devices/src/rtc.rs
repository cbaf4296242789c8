//! MC146818 CMOS RTC + 128 bytes of CMOS RAM at ports 0x70/0x71.
//!
//! Time is UTC from a wall-clock source (host time by default). Guest writes
//! to the time registers (while register B's SET bit is set) are kept as an
//! offset from the source. Periodic/alarm/update interrupts are not raised.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::bus::PioDevice;

pub const RTC_BASE: u16 = 0x70;
pub const RTC_LEN: u16 = 2;
pub const RTC_IRQ: u8 = 8;

const REG_SEC: usize = 0x00;
const REG_MIN: usize = 0x02;
const REG_HOUR: usize = 0x04;
const REG_WDAY: usize = 0x06;
const REG_MDAY: usize = 0x07;
const REG_MON: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const REG_CENTURY: usize = 0x32;

const B_SET: u8 = 0x80;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const A_UIP: u8 = 0x80;

/// Source of wall-clock time, injectable for tests.
pub type WallClock = Box<dyn Fn() -> SystemTime + Send>;

pub struct Rtc {
    cmos: [u8; 128],
    index: u8,
    wall: WallClock,
    /// Guest-set time minus source time, in seconds.
    offset_s: i64,
}

/// Breaks seconds since the Unix epoch into UTC civil time:
/// (year, month 1-12, day 1-31, hour, min, sec, weekday 0=Sunday).
pub fn civil_from_unix(secs: i64) -> (i64, u32, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + (m <= 2) as i64;
    let wday = (days + 4).rem_euclid(7) as u32; // 1970-01-01 was a Thursday
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
        wday,
    )
}

/// Inverse of [`civil_from_unix`] (ignores weekday).
pub fn unix_from_civil(y: i64, m: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
    let y = y - (m <= 2) as i64;
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86400 + h as i64 * 3600 + mi as i64 * 60 + s as i64
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10 % 10) << 4) | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    (v >> 4) as u32 * 10 + (v & 0xf) as u32
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// RTC showing host time.
    pub fn new() -> Self {
        Self::with_wall_clock(Box::new(SystemTime::now))
    }

    pub fn with_wall_clock(wall: WallClock) -> Self {
        let mut cmos = [0u8; 128];
        cmos[REG_A] = 0x26; // 32.768 kHz divider, 1024 Hz periodic rate
        cmos[REG_B] = B_24H; // BCD, 24h
        cmos[REG_D] = 0x80; // valid RAM and time
        let mut rtc = Rtc {
            cmos,
            index: 0,
            wall,
            offset_s: 0,
        };
        rtc.refresh_time();
        rtc
    }

    /// Reads a CMOS byte (as the guest would, time registers included).
    pub fn cmos(&mut self, index: u8) -> u8 {
        self.read_reg(index & 0x7f)
    }

    /// Sets a CMOS RAM byte (e.g. BIOS-style memory size fields).
    pub fn set_cmos(&mut self, index: u8, value: u8) {
        self.cmos[(index & 0x7f) as usize] = value;
    }

    /// Fills the SeaBIOS/QEMU memory-size CMOS fields from guest RAM sizes:
    /// `below_4g` is RAM below 4 GiB, `above_4g` RAM mapped from 4 GiB up.
    pub fn set_memory_size(&mut self, below_4g: u64, above_4g: u64) {
        const K: u64 = 1024;
        const M: u64 = 1024 * K;
        self.set_cmos(0x15, (640 & 0xff) as u8);
        self.set_cmos(0x16, (640 >> 8) as u8);
        let ext_kb = (below_4g.saturating_sub(M) / K).min(0xffff);
        for base in [0x17u8, 0x30] {
            self.set_cmos(base, ext_kb as u8);
            self.set_cmos(base + 1, (ext_kb >> 8) as u8);
        }
        let above_16m = (below_4g.saturating_sub(16 * M) / (64 * K)).min(0xffff);
        self.set_cmos(0x34, above_16m as u8);
        self.set_cmos(0x35, (above_16m >> 8) as u8);
        let high = (above_4g / (64 * K)).min(0xff_ffff);
        self.set_cmos(0x5b, high as u8);
        self.set_cmos(0x5c, (high >> 8) as u8);
        self.set_cmos(0x5d, (high >> 16) as u8);
    }

    fn source_time(&self) -> (i64, u32) {
        let now = (self.wall)();
        match now.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                (
                    -(d.as_secs() as i64) - 1,
                    1_000_000_000 - d.subsec_nanos().max(1),
                )
            }
        }
    }

    fn encode(&self, v: u32) -> u8 {
        if self.cmos[REG_B] & B_DM_BINARY != 0 {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.cmos[REG_B] & B_DM_BINARY != 0 {
            v as u32
        } else {
            from_bcd(v)
        }
    }

    /// Recomputes the time registers from the wall clock (unless frozen by
    /// the SET bit).
    fn refresh_time(&mut self) {
        if self.cmos[REG_B] & B_SET != 0 {
            return;
        }
        let (secs, _) = self.source_time();
        let (y, mo, d, h, mi, s, wd) = civil_from_unix(secs.saturating_add(self.offset_s));
        self.cmos[REG_SEC] = self.encode(s);
        self.cmos[REG_MIN] = self.encode(mi);
        self.cmos[REG_HOUR] = if self.cmos[REG_B] & B_24H != 0 {
            self.encode(h)
        } else {
            let h12 = if h % 12 == 0 { 12 } else { h % 12 };
            self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
        };
        self.cmos[REG_WDAY] = self.encode(wd + 1);
        self.cmos[REG_MDAY] = self.encode(d);
        self.cmos[REG_MON] = self.encode(mo);
        self.cmos[REG_YEAR] = self.encode(y.rem_euclid(100) as u32);
        self.cmos[REG_CENTURY] = self.encode(y.div_euclid(100).clamp(0, 99) as u32);
    }

    /// Called when the guest clears SET: adopt the registers as the new time.
    fn latch_guest_time(&mut self) {
        let hour_reg = self.cmos[REG_HOUR];
        let h = if self.cmos[REG_B] & B_24H != 0 {
            self.decode(hour_reg)
        } else {
            let h = self.decode(hour_reg & 0x7f) % 12;
            h + if hour_reg & 0x80 != 0 { 12 } else { 0 }
        };
        let year = self.decode(self.cmos[REG_CENTURY]) as i64 * 100
            + self.decode(self.cmos[REG_YEAR]) as i64;
        let mon = self.decode(self.cmos[REG_MON]).clamp(1, 12);
        let day = self.decode(self.cmos[REG_MDAY]).clamp(1, 31);
        let t = unix_from_civil(
            year,
            mon,
            day,
            h.min(23),
            self.decode(self.cmos[REG_MIN]).min(59),
            self.decode(self.cmos[REG_SEC]).min(59),
        );
        self.offset_s = t - self.source_time().0;
    }

    fn read_reg(&mut self, idx: u8) -> u8 {
        let idx = idx as usize;
        match idx {
            REG_SEC | REG_MIN | REG_HOUR | REG_WDAY..=REG_YEAR | REG_CENTURY => {
                self.refresh_time();
                self.cmos[idx]
            }
            REG_A => {
                // UIP is set during the last 244 us before each second
                // rollover, as on hardware; drivers poll it to avoid tearing.
                let (_, ns) = self.source_time();
                let uip = self.cmos[REG_B] & B_SET == 0 && ns >= 1_000_000_000 - 244_000;
                (self.cmos[REG_A] & !A_UIP) | if uip { A_UIP } else { 0 }
            }
            REG_C => {
                // Interrupt flags; reading clears them. We never set any.
                std::mem::take(&mut self.cmos[REG_C])
            }
            REG_D => 0x80,
            _ => self.cmos[idx],
        }
    }

    fn write_reg(&mut self, idx: u8, val: u8) {
        let idx = idx as usize;
        match idx {
            REG_SEC | REG_MIN | REG_HOUR | REG_WDAY..=REG_YEAR | REG_CENTURY => {
                let running = self.cmos[REG_B] & B_SET == 0;
                if running {
                    self.refresh_time();
                }
                self.cmos[idx] = val;
                if running {
                    // Writing while running: apply immediately.
                    self.latch_guest_time();
                }
            }
            REG_A => self.cmos[REG_A] = val & !A_UIP,
            REG_B => {
                let old = self.cmos[REG_B];
                let new = val & !0x08; // SQWE unsupported
                                       // Bring the registers up to date in the old format first.
                self.refresh_time();
                if old & B_SET != 0 && new & B_SET == 0 {
                    // The guest wrote the time in the format in force while SET.
                    self.latch_guest_time();
                }
                self.cmos[REG_B] = new;
                self.refresh_time();
            }
            REG_C | REG_D => {}
            _ => self.cmos[idx] = val,
        }
    }
}

impl PioDevice for Rtc {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        crate::bus::read_bytes(offset, data, |o| match o {
            0 => 0xff, // index register is write-only
            1 => {
                let i = self.index;
                self.read_reg(i)
            }
            _ => 0xff,
        });
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        crate::bus::write_bytes(offset, data, |o, v| match o {
            0 => self.index = v & 0x7f, // bit 7 is the NMI mask: ignored
            1 => {
                let i = self.index;
                self.write_reg(i, v)
            }
            _ => {}
        });
    }
}

/// A wall clock frozen at `secs` + `nanos` since the epoch (for tests).
pub fn fixed_wall_clock(secs: u64, nanos: u32) -> WallClock {
    Box::new(move || UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(r: &mut Rtc, idx: u8) -> u8 {
        r.pio_write(0, &[idx | 0x80]);
        let mut b = [0];
        r.pio_read(1, &mut b);
        b[0]
    }

    fn write(r: &mut Rtc, idx: u8, v: u8) {
        r.pio_write(0, &[idx]);
        r.pio_write(1, &[v]);
    }

    // 2024-02-29 13:45:56 UTC, a Thursday.
    const T: u64 = 1_709_214_356;

    #[test]
    fn civil_conversion() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1, 0, 0, 0, 4));
        assert_eq!(civil_from_unix(T as i64), (2024, 2, 29, 13, 45, 56, 4));
        assert_eq!(unix_from_civil(2024, 2, 29, 13, 45, 56), T as i64);
    }

    #[test]
    fn bcd_and_binary() {
        let mut r = Rtc::with_wall_clock(fixed_wall_clock(T, 0));
        assert_eq!(read(&mut r, 0x00), 0x56);
        assert_eq!(read(&mut r, 0x02), 0x45);
        assert_eq!(read(&mut r, 0x04), 0x13);
        assert_eq!(read(&mut r, 0x06), 0x05); // Thursday = 5 (Sunday = 1)
        assert_eq!(read(&mut r, 0x07), 0x29);
        assert_eq!(read(&mut r, 0x08), 0x02);
        assert_eq!(read(&mut r, 0x09), 0x24);
        assert_eq!(read(&mut r, 0x32), 0x20);
        assert_eq!(read(&mut r, 0x0a) & 0x80, 0);
        assert_eq!(read(&mut r, 0x0d), 0x80);

        write(&mut r, 0x0b, 0x06); // binary, 24h
        assert_eq!(read(&mut r, 0x00), 56);
        assert_eq!(read(&mut r, 0x04), 13);
        assert_eq!(read(&mut r, 0x09), 24);
        write(&mut r, 0x0b, 0x04); // binary, 12h
        assert_eq!(read(&mut r, 0x04), 0x80 | 1);
    }

    #[test]
    fn uip_and_set_time() {
        let mut r = Rtc::with_wall_clock(fixed_wall_clock(T, 999_900_000));
        assert_eq!(read(&mut r, 0x0a) & 0x80, 0x80);
        let mut r = Rtc::with_wall_clock(fixed_wall_clock(T, 0));
        write(&mut r, 0x0b, 0x82); // SET, BCD, 24h
        write(&mut r, 0x04, 0x01); // 01:45:56
        write(&mut r, 0x0b, 0x02);
        assert_eq!(read(&mut r, 0x04), 0x01);
        assert_eq!(read(&mut r, 0x02), 0x45);
        assert_eq!(read(&mut r, 0x07), 0x29);
    }

    #[test]
    fn cmos_ram() {
        let mut r = Rtc::with_wall_clock(fixed_wall_clock(T, 0));
        r.set_memory_size(3 << 30, 1 << 30);
        assert_eq!(r.cmos(0x5c), 0x40); // 1 GiB / 64 KiB = 0x4000
        write(&mut r, 0x40, 0xab);
        assert_eq!(read(&mut r, 0x40), 0xab);
        let mut b = [0u8; 4];
        r.pio_read(0, &mut b);
        r.pio_write(1, &[1, 2, 3, 4]);
    }
}
