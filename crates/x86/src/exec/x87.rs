//! x87 floating point, MMX, FXSAVE/FXRSTOR.

use iced_x86::Instruction;

use super::Handler;

pub fn lookup(_i: &Instruction) -> Option<Handler> {
    None
}
