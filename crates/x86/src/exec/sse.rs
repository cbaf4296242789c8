//! SSE, SSE2, SSE3, SSSE3, SSE4.1 and SSE4.2.

use iced_x86::Instruction;

use super::Handler;

pub fn lookup(_i: &Instruction) -> Option<Handler> {
    None
}
