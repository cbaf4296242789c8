//! The narrow interface between the CPU and the machine it sits in.
//!
//! The CPU crate knows nothing about devices: port I/O, MMIO (any physical
//! address that is not RAM), the local interrupt controller, machine MSRs and
//! the time base all go through this trait, which the VMM implements per vCPU.

/// Machine services one vCPU needs. Implemented by the VMM.
pub trait Bus: Send {
    /// `IN` from `port`; `size` is 1, 2 or 4 bytes.
    fn io_read(&mut self, port: u16, size: u8) -> u32;
    /// `OUT` to `port`; `size` is 1, 2 or 4 bytes.
    fn io_write(&mut self, port: u16, size: u8, value: u32);
    /// Read from a guest physical address that is not RAM.
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]);
    /// Write to a guest physical address that is not RAM.
    fn mmio_write(&mut self, gpa: u64, data: &[u8]);
    /// A maskable interrupt is waiting to be delivered (used to wake HLT
    /// and to decide whether to run the acknowledge cycle).
    fn irq_pending(&mut self) -> bool;
    /// Interrupt acknowledge: the vector to deliver, or None if the request
    /// went away (spurious).
    fn irq_ack(&mut self) -> Option<u8>;
    /// Take a pending NMI, if any.
    fn nmi_take(&mut self) -> bool {
        false
    }
    /// MSRs that belong to the machine (APIC base, x2APIC, TSC deadline).
    /// `None` means "not a machine MSR": the CPU raises #GP.
    fn rdmsr(&mut self, msr: u32) -> Option<u64>;
    /// Returns false if the MSR is not handled by the machine (→ #GP).
    fn wrmsr(&mut self, msr: u32, value: u64) -> bool;
    /// The machine's time stamp counter (before the vCPU's TSC offset).
    fn tsc(&mut self) -> u64;
    /// Called when the guest writes CR8 (task priority).
    fn set_tpr(&mut self, _tpr: u8) {}
    /// A word that is non-zero whenever [`Bus::irq_pending`] or
    /// [`Bus::nmi_take`] might find something (it must stay raised while an
    /// interrupt is pending and the CPU has not asked). Translated code
    /// reads it so that STI can skip the dispatcher when nothing waits;
    /// `None` sends every STI the slow way.
    fn irq_hint(&self) -> Option<&std::sync::atomic::AtomicU32> {
        None
    }
}
