//! Matryoshka's software x86-64 CPU.
//!
//! Guest code is decoded with iced-x86 into blocks cached by guest physical
//! address and mode (`cpu`), executed by per-family handlers (`exec`), with
//! memory reached through a soft TLB over the page walker (`mmu`). The CPU
//! knows nothing of devices: port I/O, MMIO, interrupts, machine MSRs and
//! time reach the machine through the [`bus::Bus`] trait.

pub mod bench;
pub mod bus;
pub mod cpu;
pub mod cpuid;
pub mod exception;
pub mod exec;
mod fasthash;
pub mod hostalu;
pub mod interrupts;
pub mod jit;
pub mod mem;
pub mod mmu;
pub mod msr;
pub mod selftest;
pub mod state;
pub mod testutil;

pub use bus::Bus;
pub use cpu::{Cpu, CpuConfig, Exit, Stats};
pub use exception::Fault;
pub use jit::{Engine, JitStats, KICK_INTERVAL};
pub use mem::{GuestRam, RamRegion};
pub use state::CpuState;
