//! Architectural exceptions raised by instruction execution.

use thiserror::Error;

pub const DE: u8 = 0;
pub const DB: u8 = 1;
pub const NMI: u8 = 2;
pub const BP: u8 = 3;
pub const OF: u8 = 4;
pub const BR: u8 = 5;
pub const UD: u8 = 6;
pub const NM: u8 = 7;
pub const DF: u8 = 8;
pub const TS: u8 = 10;
pub const NP: u8 = 11;
pub const SS: u8 = 12;
pub const GP: u8 = 13;
pub const PF: u8 = 14;
pub const MF: u8 = 16;
pub const AC: u8 = 17;
pub const MC: u8 = 18;
pub const XM: u8 = 19;

/// A fault or trap to be delivered to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("exception {vector} (error code {error_code:?}, cr2 {cr2:?})")]
pub struct Fault {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// Faulting linear address for #PF.
    pub cr2: Option<u64>,
}

impl Fault {
    pub const fn new(vector: u8) -> Self {
        Fault {
            vector,
            error_code: None,
            cr2: None,
        }
    }
    pub const fn with_code(vector: u8, code: u32) -> Self {
        Fault {
            vector,
            error_code: Some(code),
            cr2: None,
        }
    }
    pub const fn ud() -> Self {
        Self::new(UD)
    }
    pub const fn gp(code: u32) -> Self {
        Self::with_code(GP, code)
    }
    pub const fn gp0() -> Self {
        Self::with_code(GP, 0)
    }
    pub const fn de() -> Self {
        Self::new(DE)
    }
    pub const fn nm() -> Self {
        Self::new(NM)
    }
    pub const fn ss(code: u32) -> Self {
        Self::with_code(SS, code)
    }
    pub const fn np(code: u32) -> Self {
        Self::with_code(NP, code)
    }
    pub const fn ts(code: u32) -> Self {
        Self::with_code(TS, code)
    }
    pub const fn pf(code: u32, addr: u64) -> Self {
        Fault {
            vector: PF,
            error_code: Some(code),
            cr2: Some(addr),
        }
    }
    /// Contributory exceptions for the double-fault rules.
    pub fn contributory(&self) -> bool {
        matches!(self.vector, DE | TS | NP | SS | GP)
    }
}

/// Result of executing guest code; `Err` carries an exception to deliver.
pub type XResult<T> = Result<T, Fault>;
