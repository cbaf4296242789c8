//! Local APIC (one per vCPU): xAPIC MMIO at [`LAPIC_BASE`] and x2APIC MSRs
//! 0x800-0x8ff, with one-shot, periodic and TSC-deadline timers.
//!
//! The LAPIC never calls out to other devices, so it can be locked freely by
//! its vCPU thread. Side effects it cannot perform itself are queued:
//! * IPIs written to the ICR -> [`Lapic::take_ipis`], to be passed to
//!   [`ApicBus::send_ipi`];
//! * EOIs of level-triggered vectors -> [`Lapic::take_eoi_broadcasts`], to be
//!   passed to [`IoApic::end_of_interrupt`](crate::ioapic::IoApic::end_of_interrupt).
//!
//! [`ApicBus::flush`] does both; call it after every LAPIC MMIO/MSR write
//! with the LAPIC lock released.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::bus::{lock, MmioDevice};
use crate::clock::{ns_to_ticks, ticks_to_ns, tsc_to_ns, Clock};
use crate::ioapic::IoApic;
use crate::irq::{DeliveryMode, InterruptRequest, InterruptSink};

pub const LAPIC_BASE: u64 = 0xfee0_0000;
pub const LAPIC_LEN: u64 = 0x1000;

pub const MSR_IA32_APIC_BASE: u32 = 0x1b;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
pub const MSR_X2APIC_FIRST: u32 = 0x800;
pub const MSR_X2APIC_LAST: u32 = 0x8ff;

const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_EXTD: u64 = 1 << 10;
const APIC_BASE_ENABLE: u64 = 1 << 11;
/// Base address bits 12..51.
const APIC_BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

const VERSION: u32 = 0x0005_0014; // 6 LVT entries, integrated APIC
const SVR_ENABLE: u32 = 1 << 8;
const SVR_SUPPRESS_EOI_BROADCAST: u32 = 1 << 12;
const LVT_MASKED: u32 = 1 << 16;
const ICR_LOW_MASK: u32 = 0x000c_cfff;

const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_COUNT: usize = 6; // timer, thermal, perf, LINT0, LINT1, error

const TIMER_PERIODIC: u32 = 1;
const TIMER_TSC_DEADLINE: u32 = 2;

#[derive(Debug, Clone, Copy)]
pub struct LapicConfig {
    /// Guest TSC frequency; the guest TSC must be
    /// `clock::ns_to_tsc(clock.now_ns(), tsc_hz)`.
    pub tsc_hz: u64,
    /// LAPIC timer input clock (the "bus clock" before the divider).
    pub timer_hz: u64,
}

impl Default for LapicConfig {
    fn default() -> Self {
        LapicConfig {
            tsc_hz: 2_000_000_000,
            timer_hz: 1_000_000_000, // like KVM: 1 ns per timer tick
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shorthand {
    None,
    SelfOnly,
    AllIncludingSelf,
    AllExcludingSelf,
}

/// An inter-processor interrupt requested through the ICR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipi {
    pub vector: u8,
    pub delivery_mode: DeliveryMode,
    pub logical_destination: bool,
    pub level_triggered: bool,
    pub shorthand: Shorthand,
    /// xAPIC: the 8-bit destination field; x2APIC: 32 bits.
    pub destination: u32,
}

fn highest(bits: &[u32; 8]) -> Option<u8> {
    (0..8)
        .rev()
        .find(|&i| bits[i] != 0)
        .map(|i| (i * 32 + 31 - bits[i].leading_zeros() as usize) as u8)
}

fn set_bit(bits: &mut [u32; 8], v: u8, on: bool) {
    let (i, m) = ((v >> 5) as usize, 1u32 << (v & 31));
    if on {
        bits[i] |= m
    } else {
        bits[i] &= !m
    }
}

fn get_bit(bits: &[u32; 8], v: u8) -> bool {
    bits[(v >> 5) as usize] & (1 << (v & 31)) != 0
}

const HINT_IRQ: u32 = 1;
const HINT_NMI: u32 = 2;

/// Lock-free "this vCPU may have an interrupt to take" summary, so that the
/// vCPU's check at every block boundary is one atomic load, not a mutex, in
/// the common case where nothing is pending. One per vCPU, owned by its
/// [`Lapic`]; the [`Pic`](crate::pic::Pic) raises it too (see
/// [`Pic::connect_cpu`](crate::pic::Pic::connect_cpu)).
///
/// Protocol, which never loses an interrupt:
/// * Raise: every change to interrupt-controller state that can make an NMI
///   or a maskable interrupt deliverable to this CPU (IRR set, ISR or TPR
///   lowered, LAPIC enabled, LINT0/ExtINT, PIC INTR asserted, NMI) is
///   followed by `raise_*`, under the mutex that guards that state.
/// * Clear (the vCPU only): `clear_*` FIRST, then re-read the state under
///   the same mutexes, and `raise_*` again if something is deliverable.
///   If a concurrent change is missed by that re-read, its critical section
///   came after the vCPU's in that mutex's order, so the clear
///   happens-before its raise: the raise is later in the flag's
///   modification order and the bit stays set. If the change is seen, the
///   vCPU reports it (and re-raises). So no mutex is ever nested.
/// * Fast path: a load that misses a raise sees an interrupt still in
///   flight, as if it had been posted a moment later; the load is repeated
///   at every block boundary, and the poster's kick (unchanged) still ends
///   the vCPU's slice or HLT sleep.
///
/// The argument needs only the mutexes' happens-before edges; SeqCst is
/// used anyway (on x86 it costs the same: RMWs are locked either way and
/// loads are plain moves).
#[derive(Debug)]
pub struct InterruptHint(AtomicU32);

impl Default for InterruptHint {
    /// Starts raised, so the first check looks at the real state.
    fn default() -> Self {
        InterruptHint(AtomicU32::new(HINT_IRQ | HINT_NMI))
    }
}

impl InterruptHint {
    /// A maskable interrupt may have become deliverable.
    #[inline]
    pub fn raise_irq(&self) {
        self.0.fetch_or(HINT_IRQ, Ordering::SeqCst);
    }

    /// An NMI may be pending.
    #[inline]
    pub fn raise_nmi(&self) {
        self.0.fetch_or(HINT_NMI, Ordering::SeqCst);
    }

    #[inline]
    pub fn irq_maybe(&self) -> bool {
        self.0.load(Ordering::SeqCst) & HINT_IRQ != 0
    }

    #[inline]
    pub fn nmi_maybe(&self) -> bool {
        self.0.load(Ordering::SeqCst) & HINT_NMI != 0
    }

    /// Call BEFORE re-reading the state (see the type's protocol).
    #[inline]
    pub fn clear_irq(&self) {
        self.0.fetch_and(!HINT_IRQ, Ordering::SeqCst);
    }

    /// Call BEFORE re-reading the state (see the type's protocol).
    #[inline]
    pub fn clear_nmi(&self) {
        self.0.fetch_and(!HINT_NMI, Ordering::SeqCst);
    }

    /// The raw word (non-zero while raised), for readers that cannot call
    /// into this crate (the CPU's translated code).
    pub fn word(&self) -> &AtomicU32 {
        &self.0
    }
}

pub struct Lapic {
    clock: Arc<dyn Clock>,
    cfg: LapicConfig,
    initial_id: u32,
    id: u32,
    apic_base: u64,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    esr: u32,
    icr: u64,
    lvt: [u32; LVT_COUNT],
    lvt_cmci: u32,
    timer_initial: u32,
    timer_divide: u32,
    timer_start_ns: u64,
    timer_deadline_ns: Option<u64>,
    tsc_deadline: u64,
    ipis: Vec<Ipi>,
    eoi_broadcasts: Vec<u8>,
    nmi_pending: bool,
    init_pending: bool,
    sipi_vector: Option<u8>,
    extint_pending: bool,
    /// Raised after every change that can make something deliverable.
    hint: Arc<InterruptHint>,
}

impl Lapic {
    pub fn new(apic_id: u32, bsp: bool, clock: Arc<dyn Clock>, cfg: LapicConfig) -> Self {
        let mut l = Lapic {
            clock,
            cfg,
            initial_id: apic_id,
            id: apic_id,
            apic_base: LAPIC_BASE | APIC_BASE_ENABLE | if bsp { APIC_BASE_BSP } else { 0 },
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            icr: 0,
            lvt: [0; LVT_COUNT],
            lvt_cmci: 0,
            timer_initial: 0,
            timer_divide: 0,
            timer_start_ns: 0,
            timer_deadline_ns: None,
            tsc_deadline: 0,
            ipis: Vec::new(),
            eoi_broadcasts: Vec::new(),
            nmi_pending: false,
            init_pending: false,
            sipi_vector: None,
            extint_pending: false,
            hint: Arc::default(),
        };
        l.reset_registers();
        if bsp {
            // As KVM does: BSP LINT0 starts as unmasked ExtINT (virtual wire),
            // standing in for the BIOS that would normally set this up.
            l.lvt[LVT_LINT0] = 0x700;
        }
        l
    }

    /// Register state after power-on / INIT (ID and APIC base preserved).
    fn reset_registers(&mut self) {
        // Wholesale change (TPR/ISR drop too): let the CPU look again.
        self.hint.raise_irq();
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xffff_ffff;
        self.svr = 0xff;
        self.isr = [0; 8];
        self.tmr = [0; 8];
        self.irr = [0; 8];
        self.esr = 0;
        self.icr = 0;
        self.lvt = [LVT_MASKED; LVT_COUNT];
        self.lvt_cmci = LVT_MASKED;
        self.timer_initial = 0;
        self.timer_divide = 0;
        self.timer_deadline_ns = None;
        self.tsc_deadline = 0;
    }

    pub fn apic_id(&self) -> u32 {
        self.id
    }

    /// This CPU's lock-free pending summary (see [`InterruptHint`]).
    pub fn interrupt_hint(&self) -> &Arc<InterruptHint> {
        &self.hint
    }

    pub fn is_bsp(&self) -> bool {
        self.apic_base & APIC_BASE_BSP != 0
    }

    fn hw_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_ENABLE != 0
    }

    fn sw_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    pub fn x2apic_mode(&self) -> bool {
        self.apic_base & (APIC_BASE_EXTD | APIC_BASE_ENABLE) == APIC_BASE_EXTD | APIC_BASE_ENABLE
    }

    /// Whether the xAPIC MMIO page is live (hardware-enabled, not x2APIC).
    pub fn mmio_enabled(&self) -> bool {
        self.hw_enabled() && !self.x2apic_mode()
    }

    /// Guest-physical base of the xAPIC page (from IA32_APIC_BASE).
    pub fn mmio_base(&self) -> u64 {
        self.apic_base & APIC_BASE_ADDR_MASK
    }

    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// IA32_APIC_BASE write; false means #GP.
    pub fn set_apic_base(&mut self, val: u64) -> bool {
        let allowed = APIC_BASE_ADDR_MASK | APIC_BASE_EXTD | APIC_BASE_ENABLE | APIC_BASE_BSP;
        if val & !allowed != 0 {
            return false;
        }
        let en = val & APIC_BASE_ENABLE != 0;
        let x2 = val & APIC_BASE_EXTD != 0;
        let was_x2 = self.x2apic_mode();
        if x2 && !en {
            return false; // invalid state
        }
        if was_x2 && en && !x2 {
            return false; // x2APIC -> xAPIC directly is illegal
        }
        let was_en = self.hw_enabled();
        self.apic_base = (val & !APIC_BASE_BSP) | (self.apic_base & APIC_BASE_BSP);
        // Enabling can expose the IRR; disabling routes the PIC to the CPU.
        self.hint.raise_irq();
        if was_en && !en {
            self.reset_registers();
            self.id = self.initial_id;
        }
        if x2 && !was_x2 {
            self.id = self.initial_id;
            self.ldr = ((self.id >> 4) << 16) | (1 << (self.id & 0xf));
        }
        true
    }

    /// CR8 view of the TPR.
    pub fn cr8(&self) -> u64 {
        (self.tpr >> 4) as u64
    }

    pub fn set_cr8(&mut self, v: u64) {
        self.set_tpr(((v & 0xf) << 4) as u8);
    }

    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    pub fn set_tpr(&mut self, tpr: u8) {
        if tpr < self.tpr {
            // A lower priority threshold can unblock an IRR vector.
            self.hint.raise_irq();
        }
        self.tpr = tpr;
    }

    fn ppr(&self) -> u8 {
        let isrv = highest(&self.isr).unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Sets `vector` in the IRR (fixed/lowest-priority delivery).
    /// Returns false if the interrupt was dropped.
    pub fn accept_interrupt(&mut self, vector: u8, level_triggered: bool) -> bool {
        if !self.hw_enabled() || !self.sw_enabled() {
            return false;
        }
        if vector < 16 {
            self.esr |= 1 << 6; // received illegal vector
            return false;
        }
        set_bit(&mut self.irr, vector, true);
        set_bit(&mut self.tmr, vector, level_triggered);
        self.hint.raise_irq();
        true
    }

    /// Accepts any delivery mode from the APIC bus.
    pub fn deliver(&mut self, mode: DeliveryMode, vector: u8, level_triggered: bool) {
        match mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.accept_interrupt(vector, level_triggered);
            }
            DeliveryMode::Nmi => {
                self.nmi_pending = true;
                self.hint.raise_nmi();
            }
            DeliveryMode::Init => {
                self.reset_registers();
                self.init_pending = true;
                self.sipi_vector = None;
            }
            DeliveryMode::StartUp => self.sipi_vector = Some(vector),
            DeliveryMode::ExtInt => {
                // Opens the CPU to the PIC (accepts_pic_interrupts).
                self.extint_pending = true;
                self.hint.raise_irq();
            }
            DeliveryMode::Smi | DeliveryMode::Reserved => {}
        }
    }

    /// Highest-priority deliverable vector, if any (does not acknowledge).
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.hw_enabled() || !self.sw_enabled() {
            return None;
        }
        let v = highest(&self.irr)?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }

    /// Interrupt acknowledge: moves the pending vector from IRR to ISR.
    /// Call when the CPU actually takes the interrupt (IF=1, no shadow).
    pub fn ack(&mut self) -> Option<u8> {
        let v = self.pending_vector()?;
        set_bit(&mut self.irr, v, false);
        set_bit(&mut self.isr, v, true);
        Some(v)
    }

    /// EOI: retires the highest in-service vector and returns it. Level
    /// vectors are also queued for [`Lapic::take_eoi_broadcasts`].
    pub fn eoi(&mut self) -> Option<u8> {
        let v = highest(&self.isr)?;
        set_bit(&mut self.isr, v, false);
        // The processor priority dropped: a blocked IRR vector may go.
        self.hint.raise_irq();
        if get_bit(&self.tmr, v) && self.svr & SVR_SUPPRESS_EOI_BROADCAST == 0 {
            self.eoi_broadcasts.push(v);
        }
        Some(v)
    }

    /// Whether PIC (8259) interrupts should reach this CPU: the APIC is
    /// hardware-disabled, an ExtINT was delivered through the APIC bus, or
    /// LINT0 is unmasked in ExtINT mode (virtual wire).
    pub fn accepts_pic_interrupts(&self) -> bool {
        if !self.hw_enabled() || self.extint_pending {
            return true;
        }
        let l = self.lvt[LVT_LINT0];
        l & LVT_MASKED == 0 && (l >> 8) & 7 == 7
    }

    /// Call after taking an interrupt from the PIC, to consume an ExtINT
    /// delivered through the APIC bus.
    pub fn clear_extint(&mut self) {
        self.extint_pending = false;
    }

    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi_pending)
    }

    /// True once per received INIT (the LAPIC registers were already reset;
    /// the VMM resets the vCPU and puts it in wait-for-SIPI).
    pub fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.init_pending)
    }

    /// SIPI vector (start address = vector << 12), if one was received.
    pub fn take_sipi(&mut self) -> Option<u8> {
        self.sipi_vector.take()
    }

    pub fn take_ipis(&mut self) -> Vec<Ipi> {
        std::mem::take(&mut self.ipis)
    }

    pub fn take_eoi_broadcasts(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.eoi_broadcasts)
    }

    /// Whether this APIC is addressed by `dest` in the given mode.
    pub fn matches_destination(&self, dest: u32, logical: bool) -> bool {
        if self.x2apic_mode() {
            if dest == 0xffff_ffff {
                return true;
            }
            if !logical {
                return dest == self.id;
            }
            return dest >> 16 == self.ldr >> 16 && dest & self.ldr & 0xffff != 0;
        }
        let dest = dest & 0xff;
        if dest == 0xff {
            return true;
        }
        if !logical {
            return dest == self.id & 0xff;
        }
        let l = self.ldr >> 24;
        if self.dfr >> 28 == 0xf {
            l & dest != 0 // flat model
        } else {
            l >> 4 == dest >> 4 && l & dest & 0xf != 0 // cluster model
        }
    }

    // ---- timer ----

    fn timer_mode(&self) -> u32 {
        (self.lvt[LVT_TIMER] >> 17) & 3
    }

    fn timer_divisor(&self) -> u64 {
        let v = (self.timer_divide & 3) | ((self.timer_divide & 8) >> 1);
        if v == 7 {
            1
        } else {
            2 << v
        }
    }

    fn timer_period_ns(&self) -> u64 {
        ticks_to_ns(
            self.timer_initial as u64 * self.timer_divisor(),
            self.cfg.timer_hz,
        )
        .max(1)
    }

    fn timer_ticks_since_start(&self, now: u64) -> u64 {
        ns_to_ticks(now.saturating_sub(self.timer_start_ns), self.cfg.timer_hz)
            / self.timer_divisor()
    }

    fn current_count(&self) -> u32 {
        let mode = self.timer_mode();
        if mode == TIMER_TSC_DEADLINE || self.timer_initial == 0 || self.timer_deadline_ns.is_none()
        {
            return 0;
        }
        let t = self.timer_ticks_since_start(self.clock.now_ns());
        let n = self.timer_initial as u64;
        if mode == TIMER_PERIODIC {
            (n - t % n) as u32
        } else {
            n.saturating_sub(t) as u32
        }
    }

    fn arm_count_timer(&mut self) {
        self.timer_start_ns = self.clock.now_ns();
        self.timer_deadline_ns = if self.timer_initial == 0 {
            None
        } else {
            Some(self.timer_start_ns.saturating_add(self.timer_period_ns()))
        };
    }

    /// Fires the timer if due (sets the IRR unless LVT timer is masked).
    /// Call from the vCPU loop; returns true if it expired.
    pub fn poll_timer(&mut self) -> bool {
        let Some(deadline) = self.timer_deadline_ns else {
            return false;
        };
        let now = self.clock.now_ns();
        if now < deadline {
            return false;
        }
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept_interrupt(lvt as u8, false);
        }
        match self.timer_mode() {
            TIMER_PERIODIC => {
                // Missed periods are coalesced into one interrupt.
                let p = self.timer_period_ns();
                let k = (now - self.timer_start_ns) / p + 1;
                self.timer_deadline_ns =
                    Some(self.timer_start_ns.saturating_add(k.saturating_mul(p)));
            }
            TIMER_TSC_DEADLINE => {
                self.tsc_deadline = 0;
                self.timer_deadline_ns = None;
            }
            _ => self.timer_deadline_ns = None,
        }
        true
    }

    /// Clock time at which the timer next expires.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.timer_deadline_ns
    }

    fn write_tsc_deadline(&mut self, val: u64) {
        if self.timer_mode() != TIMER_TSC_DEADLINE {
            return; // ignored in other modes
        }
        self.tsc_deadline = val;
        self.timer_deadline_ns = (val != 0).then(|| tsc_to_ns(val, self.cfg.tsc_hz));
    }

    // ---- registers ----

    /// Reads the 32-bit register at MMIO offset `off` (16-byte aligned).
    fn read_reg(&self, off: u32) -> Option<u32> {
        let x2 = self.x2apic_mode();
        Some(match off {
            0x20 => {
                if x2 {
                    self.id
                } else {
                    self.id << 24
                }
            }
            0x30 => VERSION,
            0x80 => self.tpr as u32,
            0x90 => 0,
            0xa0 => self.ppr() as u32,
            0xb0 if !x2 => 0,
            0xd0 => self.ldr,
            0xe0 if !x2 => self.dfr,
            0xf0 => self.svr,
            0x100..=0x170 => self.isr[((off - 0x100) >> 4) as usize],
            0x180..=0x1f0 => self.tmr[((off - 0x180) >> 4) as usize],
            0x200..=0x270 => self.irr[((off - 0x200) >> 4) as usize],
            0x280 => self.esr,
            0x2f0 => self.lvt_cmci,
            0x300 => self.icr as u32,
            0x310 if !x2 => (self.icr >> 32) as u32,
            0x320..=0x370 => self.lvt[((off - 0x320) >> 4) as usize],
            0x380 => self.timer_initial,
            0x390 => self.current_count(),
            0x3e0 => self.timer_divide,
            _ => return None,
        })
    }

    /// Writes a register; false if the register doesn't exist / is
    /// read-only (x2APIC raises #GP for those).
    fn write_reg(&mut self, off: u32, val: u32) -> bool {
        let x2 = self.x2apic_mode();
        match off {
            0x20 if !x2 => self.id = val >> 24,
            0x80 => self.set_tpr(val as u8),
            0xb0 => {
                self.eoi();
            }
            0xd0 if !x2 => self.ldr = val & 0xff00_0000,
            0xe0 if !x2 => self.dfr = val | 0x0fff_ffff,
            0xf0 => {
                self.svr = val & 0x13ff;
                self.hint.raise_irq(); // software enable exposes the IRR
                if !self.sw_enabled() {
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                    self.lvt_cmci |= LVT_MASKED;
                }
            }
            0x280 => self.esr = 0,
            0x2f0 => self.lvt_cmci = self.mask_lvt(val & 0x107ff),
            0x300 => {
                let high = if x2 { 0 } else { self.icr & !0xffff_ffff };
                // Delivery status (bit 12) always reads idle.
                self.icr = high | (val & ICR_LOW_MASK) as u64;
                self.send_icr();
            }
            0x310 if !x2 => self.icr = (self.icr & 0xffff_ffff) | ((val as u64) << 32),
            0x320..=0x370 => {
                let i = ((off - 0x320) >> 4) as usize;
                let writable = match i {
                    LVT_TIMER => 0x700ff,
                    3 | 4 => 0x1a7ff, // LINT0/1: remote IRR (bit 14) is RO
                    5 => 0x100ff,
                    _ => 0x107ff,
                };
                let old_mode = self.timer_mode();
                self.lvt[i] = self.mask_lvt(val & writable);
                if i == LVT_LINT0 {
                    // May open the virtual wire to the PIC.
                    self.hint.raise_irq();
                }
                if i == LVT_TIMER && self.timer_mode() != old_mode {
                    // Switching timer modes disarms the timer.
                    self.timer_initial = 0;
                    self.timer_deadline_ns = None;
                    self.tsc_deadline = 0;
                }
            }
            0x380 => {
                if self.timer_mode() != TIMER_TSC_DEADLINE {
                    self.timer_initial = val;
                    self.arm_count_timer();
                }
            }
            0x3e0 => self.timer_divide = val & 0xb,
            0x3f0 if x2 => {
                self.accept_interrupt(val as u8, false);
            }
            _ => return false,
        }
        true
    }

    fn mask_lvt(&self, v: u32) -> u32 {
        if self.sw_enabled() {
            v
        } else {
            v | LVT_MASKED
        }
    }

    fn send_icr(&mut self) {
        let low = self.icr as u32;
        let mode = DeliveryMode::from_bits(low >> 8);
        let level_assert = low & (1 << 14) != 0;
        let level_triggered = low & (1 << 15) != 0;
        // Legacy "INIT level de-assert" has no effect on modern CPUs.
        if mode == DeliveryMode::Init && level_triggered && !level_assert {
            return;
        }
        let shorthand = match (low >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        };
        let destination = if self.x2apic_mode() {
            (self.icr >> 32) as u32
        } else {
            (self.icr >> 56) as u32
        };
        if shorthand == Shorthand::SelfOnly {
            self.deliver(mode, low as u8, level_triggered);
            return;
        }
        self.ipis.push(Ipi {
            vector: low as u8,
            delivery_mode: mode,
            logical_destination: low & (1 << 11) != 0,
            level_triggered,
            shorthand,
            destination,
        });
    }

    /// Whether `msr` belongs to the LAPIC (route only these to
    /// `rdmsr`/`wrmsr`, whose None/false then means #GP).
    pub fn handles_msr(msr: u32) -> bool {
        matches!(
            msr,
            MSR_IA32_APIC_BASE | MSR_IA32_TSC_DEADLINE | MSR_X2APIC_FIRST..=MSR_X2APIC_LAST
        )
    }

    /// RDMSR for APIC-related MSRs; None means #GP (or not an APIC MSR).
    pub fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        match msr {
            MSR_IA32_APIC_BASE => Some(self.apic_base),
            MSR_IA32_TSC_DEADLINE => Some(if self.timer_mode() == TIMER_TSC_DEADLINE {
                self.tsc_deadline
            } else {
                0
            }),
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST if self.x2apic_mode() => {
                let off = (msr - MSR_X2APIC_FIRST) << 4;
                if off == 0x300 {
                    return Some(self.icr);
                }
                self.read_reg(off).map(u64::from)
            }
            _ => None,
        }
    }

    /// WRMSR for APIC-related MSRs; false means #GP (or not an APIC MSR).
    pub fn wrmsr(&mut self, msr: u32, val: u64) -> bool {
        match msr {
            MSR_IA32_APIC_BASE => self.set_apic_base(val),
            MSR_IA32_TSC_DEADLINE => {
                self.write_tsc_deadline(val);
                true
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST if self.x2apic_mode() => {
                let off = (msr - MSR_X2APIC_FIRST) << 4;
                if off == 0x300 {
                    self.icr = val & (0xffff_ffff_0000_0000 | ICR_LOW_MASK as u64);
                    self.send_icr();
                    return true;
                }
                if val >> 32 != 0 {
                    return false;
                }
                self.write_reg(off, val as u32)
            }
            _ => false,
        }
    }
}

impl MmioDevice for Lapic {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if !self.mmio_enabled() {
            data.fill(0xff);
            return;
        }
        let within = (offset & 0xf) as usize;
        let v = if within < 4 {
            self.read_reg((offset & 0xff0) as u32).unwrap_or(0)
        } else {
            0
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(within + i).copied().unwrap_or(0);
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        // Only aligned 32-bit (or wider) writes are architecturally defined.
        if !self.mmio_enabled() || offset & 0xf != 0 || data.len() < 4 || offset >= LAPIC_LEN {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset as u32, v);
    }
}

/// The APIC bus connecting all LAPICs: implements [`InterruptSink`] for the
/// IOAPIC/MSIs and routes IPIs. `kick(cpu_index)` is called after an
/// interrupt is posted to a LAPIC, so the VMM can wake a halted vCPU.
pub struct ApicBus {
    lapics: Vec<Arc<Mutex<Lapic>>>,
    kick: Option<Arc<dyn Fn(usize) + Send + Sync>>,
}

impl ApicBus {
    pub fn new(
        lapics: Vec<Arc<Mutex<Lapic>>>,
        kick: Option<Arc<dyn Fn(usize) + Send + Sync>>,
    ) -> Self {
        ApicBus { lapics, kick }
    }

    pub fn lapic(&self, cpu: usize) -> Option<&Arc<Mutex<Lapic>>> {
        self.lapics.get(cpu)
    }

    pub fn lapics(&self) -> &[Arc<Mutex<Lapic>>] {
        &self.lapics
    }

    fn post(&self, cpu: usize, mode: DeliveryMode, vector: u8, level: bool) {
        lock(&self.lapics[cpu]).deliver(mode, vector, level);
        if let Some(k) = &self.kick {
            k(cpu);
        }
    }

    fn targets(&self, dest: u32, logical: bool, lowest: bool) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.lapics.len())
            .filter(|&i| lock(&self.lapics[i]).matches_destination(dest, logical))
            .collect();
        if lowest {
            // No real arbitration: the first matching CPU wins.
            v.truncate(1);
        }
        v
    }

    /// Routes an IPI sent by CPU index `from`. Must be called with no LAPIC
    /// lock held.
    pub fn send_ipi(&self, from: usize, ipi: Ipi) {
        let lowest = ipi.delivery_mode == DeliveryMode::LowestPriority;
        let targets: Vec<usize> = match ipi.shorthand {
            Shorthand::None => self.targets(ipi.destination, ipi.logical_destination, lowest),
            Shorthand::SelfOnly => vec![from],
            Shorthand::AllIncludingSelf => (0..self.lapics.len()).collect(),
            Shorthand::AllExcludingSelf => (0..self.lapics.len()).filter(|&i| i != from).collect(),
        };
        for cpu in targets.into_iter().filter(|&c| c < self.lapics.len()) {
            self.post(cpu, ipi.delivery_mode, ipi.vector, ipi.level_triggered);
        }
    }

    /// Drains CPU `cpu`'s queued IPIs and level EOIs and dispatches them.
    /// Call after LAPIC register writes, with no LAPIC lock held.
    pub fn flush(&self, cpu: usize, ioapic: Option<&Mutex<IoApic>>) {
        let Some(l) = self.lapics.get(cpu) else {
            return;
        };
        let (ipis, eois) = {
            let mut l = lock(l);
            (l.take_ipis(), l.take_eoi_broadcasts())
        };
        for ipi in ipis {
            self.send_ipi(cpu, ipi);
        }
        if let Some(io) = ioapic {
            for v in eois {
                lock(io).end_of_interrupt(v);
            }
        }
    }
}

impl InterruptSink for ApicBus {
    fn deliver(&self, r: InterruptRequest) {
        let lowest = r.delivery_mode == DeliveryMode::LowestPriority;
        for cpu in self.targets(r.destination, r.logical_destination, lowest) {
            self.post(cpu, r.delivery_mode, r.vector, r.level_triggered);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ns_to_tsc, ManualClock};

    fn setup() -> (Arc<ManualClock>, Lapic) {
        let c = Arc::new(ManualClock::new(1000));
        let l = Lapic::new(0, true, c.clone(), LapicConfig::default());
        (c, l)
    }

    fn w(l: &mut Lapic, off: u64, v: u32) {
        l.mmio_write(off, &v.to_le_bytes());
    }
    fn r(l: &mut Lapic, off: u64) -> u32 {
        let mut b = [0u8; 4];
        l.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn reset_state_and_enable() {
        let (_, mut l) = setup();
        assert_eq!(r(&mut l, 0x30), 0x50014);
        assert_eq!(r(&mut l, 0xf0), 0xff);
        assert!(l.accepts_pic_interrupts());
        // Software-disabled: no delivery.
        assert!(!l.accept_interrupt(0x40, false));
        w(&mut l, 0xf0, 0x1ff);
        assert!(l.accept_interrupt(0x40, false));
        assert_eq!(l.pending_vector(), Some(0x40));
        assert_eq!(l.rdmsr(MSR_IA32_APIC_BASE), Some(0xfee0_0900));
        // Bad guest input never panics.
        let mut junk = [0u8; 16];
        l.mmio_read(0xffd, &mut junk);
        l.mmio_write(0xff0, &junk);
        l.mmio_write(0x5000, &junk);
        l.mmio_write(0x3, &junk[..1]);
        assert!(!l.accept_interrupt(3, false));
        assert_eq!(r(&mut l, 0x280), 0x40);
    }

    #[test]
    fn priority_tpr_and_eoi() {
        let (_, mut l) = setup();
        w(&mut l, 0xf0, 0x1ff);
        l.accept_interrupt(0x31, false);
        l.accept_interrupt(0x52, true);
        assert_eq!(l.ack(), Some(0x52));
        assert_eq!(r(&mut l, 0xa0), 0x50); // PPR
                                           // 0x31 is a lower class than the in-service 0x52.
        assert_eq!(l.pending_vector(), None);
        l.accept_interrupt(0x61, false);
        assert_eq!(l.ack(), Some(0x61));
        w(&mut l, 0xb0, 0);
        assert!(l.take_eoi_broadcasts().is_empty()); // 0x61 was edge
        w(&mut l, 0xb0, 0);
        assert_eq!(l.take_eoi_broadcasts(), vec![0x52]);
        assert_eq!(l.pending_vector(), Some(0x31));
        l.set_cr8(3);
        assert_eq!(l.pending_vector(), None);
        assert_eq!(r(&mut l, 0x80), 0x30);
        l.set_cr8(2);
        assert_eq!(l.ack(), Some(0x31));
        assert_eq!(r(&mut l, 0x100 + 0x10), 1 << 17); // ISR bit 0x31
    }

    /// Every change that can make something deliverable raises the hint.
    #[test]
    fn interrupt_hint_raises() {
        let (c, mut l) = setup();
        let h = l.interrupt_hint().clone();
        assert!(h.irq_maybe() && h.nmi_maybe(), "starts raised");
        h.clear_irq();
        h.clear_nmi();
        let cleared = |h: &InterruptHint| {
            let was = h.irq_maybe();
            h.clear_irq();
            was
        };
        w(&mut l, 0xf0, 0x1ff);
        assert!(cleared(&h), "SVR enable");
        l.accept_interrupt(0x50, false);
        assert!(cleared(&h), "IRR");
        l.ack();
        assert!(!cleared(&h), "ack only lowers");
        w(&mut l, 0x80, 0x20);
        assert!(!cleared(&h), "raising TPR only lowers");
        w(&mut l, 0x80, 0x10);
        assert!(cleared(&h), "TPR lowered");
        l.set_cr8(0);
        assert!(cleared(&h), "CR8 lowered");
        w(&mut l, 0xb0, 0);
        assert!(cleared(&h), "EOI");
        w(&mut l, 0x350, 0x700);
        assert!(cleared(&h), "LINT0");
        w(&mut l, 0x300, 0x4_0051);
        assert!(cleared(&h), "self IPI");
        w(&mut l, 0x3e0, 0xb); // divide by 1
        w(&mut l, 0x320, 0x52);
        w(&mut l, 0x380, 10);
        assert!(!cleared(&h), "timer armed, not fired");
        c.advance_ns(10);
        l.poll_timer();
        assert!(cleared(&h), "timer fired");
        l.deliver(DeliveryMode::ExtInt, 0, false);
        assert!(cleared(&h), "ExtINT");
        assert!(!h.nmi_maybe());
        l.deliver(DeliveryMode::Nmi, 0, false);
        assert!(h.nmi_maybe() && !h.irq_maybe());
        assert!(l.wrmsr(MSR_IA32_APIC_BASE, 0xfee0_0100));
        assert!(cleared(&h), "APIC disabled: PIC reaches the CPU");
    }

    #[test]
    fn oneshot_and_periodic_timer() {
        let (c, mut l) = setup();
        w(&mut l, 0xf0, 0x1ff);
        w(&mut l, 0x3e0, 0x3); // divide by 16
        w(&mut l, 0x320, 0x40); // one-shot, vector 0x40
        w(&mut l, 0x380, 1000); // 16000 ns at 1 GHz
        assert_eq!(l.next_deadline_ns(), Some(17_000));
        c.advance_ns(8000);
        assert_eq!(r(&mut l, 0x390), 500);
        assert!(!l.poll_timer());
        c.advance_ns(8000);
        assert!(l.poll_timer());
        assert_eq!(l.ack(), Some(0x40));
        assert_eq!(r(&mut l, 0x390), 0);
        assert_eq!(l.next_deadline_ns(), None);
        l.eoi();

        w(&mut l, 0x320, 0x20041); // periodic, vector 0x41
        w(&mut l, 0x3e0, 0xb); // divide by 1
        w(&mut l, 0x380, 100);
        let start = c.now_ns();
        c.advance_ns(250);
        assert_eq!(r(&mut l, 0x390), 50);
        assert!(l.poll_timer());
        assert_eq!(l.next_deadline_ns(), Some(start + 300));
        assert_eq!(l.ack(), Some(0x41));
        l.eoi();
        c.advance_ns(50);
        assert!(l.poll_timer());
        assert_eq!(l.pending_vector(), Some(0x41));
        // Masked: expires but no interrupt.
        l.ack();
        l.eoi();
        w(&mut l, 0x320, 0x30041);
        c.advance_ns(100);
        assert!(l.poll_timer());
        assert_eq!(l.pending_vector(), None);
        // Stopping with initial count 0.
        w(&mut l, 0x380, 0);
        assert_eq!(l.next_deadline_ns(), None);
    }

    #[test]
    fn tsc_deadline_timer() {
        let (c, mut l) = setup();
        let hz = LapicConfig::default().tsc_hz;
        w(&mut l, 0xf0, 0x1ff);
        // Ignored outside TSC-deadline mode.
        assert!(l.wrmsr(MSR_IA32_TSC_DEADLINE, 5));
        assert_eq!(l.rdmsr(MSR_IA32_TSC_DEADLINE), Some(0));
        w(&mut l, 0x320, 0x40050);
        let target = ns_to_tsc(c.now_ns() + 5000, hz);
        l.wrmsr(MSR_IA32_TSC_DEADLINE, target);
        assert_eq!(l.rdmsr(MSR_IA32_TSC_DEADLINE), Some(target));
        w(&mut l, 0x380, 12345); // ignored in this mode
        assert_eq!(r(&mut l, 0x380), 0);
        c.advance_ns(4999);
        assert!(!l.poll_timer());
        c.advance_ns(1);
        assert!(l.poll_timer());
        assert_eq!(l.ack(), Some(0x50));
        assert_eq!(l.rdmsr(MSR_IA32_TSC_DEADLINE), Some(0));
        // A deadline in the past fires at once; 0 disarms.
        l.wrmsr(MSR_IA32_TSC_DEADLINE, 1);
        assert!(l.poll_timer());
        l.wrmsr(MSR_IA32_TSC_DEADLINE, ns_to_tsc(c.now_ns() + 10, hz));
        l.wrmsr(MSR_IA32_TSC_DEADLINE, 0);
        assert_eq!(l.next_deadline_ns(), None);
    }

    #[test]
    fn x2apic_msrs_and_ipis() {
        let c = Arc::new(ManualClock::new(0));
        let l0 = Arc::new(Mutex::new(Lapic::new(
            0,
            true,
            c.clone(),
            LapicConfig::default(),
        )));
        let l1 = Arc::new(Mutex::new(Lapic::new(
            1,
            false,
            c.clone(),
            LapicConfig::default(),
        )));
        let bus = ApicBus::new(vec![l0.clone(), l1.clone()], None);
        {
            let mut a = lock(&l1);
            assert!(!a.accepts_pic_interrupts()); // AP LINT0 masked
            w(&mut a, 0xf0, 0x1ff);
            assert_eq!(r(&mut a, 0x20), 1 << 24);
        }
        {
            let mut b = lock(&l0);
            assert_eq!(b.rdmsr(0x802), None); // x2APIC MSRs need x2APIC mode
            assert!(!b.wrmsr(MSR_IA32_APIC_BASE, 0xfee0_0400)); // EXTD without EN
            assert!(b.wrmsr(MSR_IA32_APIC_BASE, 0xfee0_0c00));
            assert!(b.x2apic_mode());
            assert_eq!(b.rdmsr(0x802), Some(0));
            assert_eq!(b.rdmsr(0x80d), Some(1)); // LDR
            assert!(b.wrmsr(0x80f, 0x1ff));
            // INIT + SIPI to APIC 1, then fixed IPI to all-excluding-self.
            assert!(b.wrmsr(0x830, (1u64 << 32) | 0x4500));
            assert!(b.wrmsr(0x830, (1u64 << 32) | 0x4698));
            assert!(b.wrmsr(0x830, 0xc_0000 | 0x61));
            assert!(b.wrmsr(0x83f, 0x70)); // self IPI
            assert_eq!(b.pending_vector(), Some(0x70));
            assert!(!b.wrmsr(0x80e, 0)); // no DFR in x2APIC mode
            assert!(!b.wrmsr(MSR_IA32_APIC_BASE, 0xfee0_0800)); // x2 -> xAPIC
        }
        bus.flush(0, None);
        let mut a = lock(&l1);
        assert!(a.take_init());
        assert_eq!(a.take_sipi(), Some(0x98));
        // INIT reset the APIC, so the fixed IPI was dropped (SW disabled).
        assert_eq!(a.pending_vector(), None);
        drop(a);

        // IOAPIC-style delivery by logical flat destination.
        {
            let mut a = lock(&l1);
            w(&mut a, 0xf0, 0x1ff);
            w(&mut a, 0xd0, 0x0200_0000);
        }
        bus.deliver(InterruptRequest {
            vector: 0x33,
            destination: 0x02,
            logical_destination: true,
            delivery_mode: DeliveryMode::Fixed,
            level_triggered: true,
        });
        let mut a = lock(&l1);
        assert_eq!(a.ack(), Some(0x33));
        assert_eq!(a.eoi(), Some(0x33));
        assert_eq!(a.take_eoi_broadcasts(), vec![0x33]);
    }
}
