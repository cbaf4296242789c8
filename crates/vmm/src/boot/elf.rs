//! Minimal, bounds-checked ELF64 loader for vmlinux: copies PT_LOAD
//! segments to their physical addresses and zeroes the bss tails.

use vm_memory::GuestMemory;

use super::KernelImageError;

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const EM_X86_64: u16 = 62;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

/// One PT_LOAD segment: where it goes and how much of it comes from the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub vaddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub memsz: u64,
    /// p_flags (PF_X = 1, PF_W = 2, PF_R = 4).
    pub flags: u32,
}

/// The parts of an ELF image the loader needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    /// e_entry translated to a physical address.
    pub entry: u64,
    pub segments: Vec<Segment>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn bad(msg: &'static str) -> KernelImageError {
    KernelImageError::BadElf(msg)
}

impl ElfImage {
    pub fn parse(data: &[u8]) -> Result<Self, KernelImageError> {
        if data.len() < EHDR_SIZE || &data[..4] != b"\x7fELF" {
            return Err(bad("missing ELF magic or header truncated"));
        }
        if data[4] != 2 || data[5] != 1 {
            return Err(bad("not a little-endian ELF64 file"));
        }
        let machine = u16_at(data, 18).ok_or(bad("header truncated"))?;
        if machine != EM_X86_64 {
            return Err(bad("not an x86-64 ELF file"));
        }
        let e_entry = u64_at(data, 24).ok_or(bad("header truncated"))?;
        let phoff = u64_at(data, 32).ok_or(bad("header truncated"))?;
        let phentsize = u16_at(data, 54).ok_or(bad("header truncated"))? as usize;
        let phnum = u16_at(data, 56).ok_or(bad("header truncated"))? as usize;
        if phentsize < PHDR_SIZE {
            return Err(bad("program header entries too small"));
        }
        let mut segments = Vec::new();
        for i in 0..phnum {
            let at = usize::try_from(phoff)
                .ok()
                .and_then(|p| p.checked_add(i * phentsize))
                .ok_or(bad("program header table out of bounds"))?;
            let ph = at
                .checked_add(PHDR_SIZE)
                .and_then(|end| data.get(at..end))
                .ok_or(bad("program header table out of bounds"))?;
            if u32_at(ph, 0) != Some(PT_LOAD) {
                continue;
            }
            let field = |off| u64_at(ph, off).ok_or(bad("program header truncated"));
            let seg = Segment {
                flags: u32_at(ph, 4).ok_or(bad("program header truncated"))?,
                offset: field(8)?,
                vaddr: field(16)?,
                paddr: field(24)?,
                filesz: field(32)?,
                memsz: field(40)?,
            };
            if seg.filesz > seg.memsz {
                return Err(bad("segment file size exceeds memory size"));
            }
            let file_end = seg.offset.checked_add(seg.filesz);
            if file_end.is_none_or(|end| end > data.len() as u64) {
                return Err(bad("segment data lies outside the file"));
            }
            if seg.paddr.checked_add(seg.memsz).is_none() {
                return Err(bad("segment address overflows"));
            }
            segments.push(seg);
        }
        if segments.is_empty() {
            return Err(bad("no loadable segments"));
        }
        // vmlinux's e_entry is already physical (phys_startup_64), but a
        // virtual entry is translated through the segment containing it.
        let entry = segments
            .iter()
            .find(|s| e_entry >= s.vaddr && e_entry - s.vaddr < s.memsz)
            .filter(|s| s.vaddr != s.paddr)
            .map(|s| e_entry - s.vaddr + s.paddr)
            .unwrap_or(e_entry);
        Ok(ElfImage { entry, segments })
    }

    /// The file bytes and the virtual address of the first executable
    /// segment (`matryoshka bench translate` translates its code); `data`
    /// is the file `parse` read.
    pub fn code<'a>(&self, data: &'a [u8]) -> Option<(&'a [u8], u64)> {
        let s = self.segments.iter().find(|s| s.flags & PF_X != 0)?;
        // Offsets were bounds-checked in parse().
        Some((
            &data[s.offset as usize..(s.offset + s.filesz) as usize],
            s.vaddr,
        ))
    }

    /// Lowest physical address and end (exclusive) of the loaded image.
    pub fn phys_range(&self) -> (u64, u64) {
        let start = self.segments.iter().map(|s| s.paddr).min().unwrap_or(0);
        let end = self
            .segments
            .iter()
            .map(|s| s.paddr + s.memsz)
            .max()
            .unwrap_or(0);
        (start, end)
    }

    /// Put segments into guest memory; returns the (start, end) ranges
    /// written. `file`, when given, holds `data` from its start: whole
    /// pages are then mapped from it (see [`super::place_guest`]).
    pub fn load<M: GuestMemory>(
        &self,
        mem: &M,
        data: &[u8],
        file: Option<&std::fs::File>,
    ) -> Result<Vec<(u64, u64)>, super::BootError> {
        let mut ranges = Vec::new();
        for s in &self.segments {
            // Offsets were bounds-checked in parse().
            let src = &data[s.offset as usize..(s.offset + s.filesz) as usize];
            super::place_guest(mem, s.paddr, src, file.map(|f| (f, s.offset)))?;
            // Zero the bss tail explicitly; guest RAM may be reused.
            let mut at = s.paddr + s.filesz;
            let end = s.paddr + s.memsz;
            let zeros = vec![0u8; 1 << 20];
            while at < end {
                let n = ((end - at) as usize).min(zeros.len());
                super::write_guest(mem, at, &zeros[..n])?;
                at += n as u64;
            }
            ranges.push((s.paddr, end));
        }
        Ok(ranges)
    }
}
