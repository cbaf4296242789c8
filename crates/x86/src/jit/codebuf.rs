//! Executable memory for translated code, mapped twice: a read-write view
//! the translator writes through and a read-execute view the host CPU runs.
//! No page is ever writable and executable through the same mapping.

use std::io;

pub struct CodeBuf {
    rw: *mut u8,
    rx: *mut u8,
    size: usize,
    /// Translations grow up from 0 to `used`; chain stubs grow down from
    /// `size` to `top`, so that a stub never moves where the next
    /// translation goes (the translator thread assembles for that address).
    used: usize,
    top: usize,
}

// SAFETY: the buffer belongs to one vCPU's translator; the vCPU thread and
// its translator thread reach it only through the mutex around it
// (`worker::Code`), and it unmaps nothing until dropped.
unsafe impl Send for CodeBuf {}

impl CodeBuf {
    pub fn new(size: usize) -> io::Result<CodeBuf> {
        Self::near(size, 0)
    }

    /// A buffer whose executable view the kernel places, if that range is
    /// free, just below `near` (0: anywhere), so that translated code can
    /// reach data there with RIP-relative operands. Only a hint: callers
    /// check the distance.
    pub fn near(size: usize, near: u64) -> io::Result<CodeBuf> {
        let size = size.next_multiple_of(4096);
        let hint = (near & !0x1f_ffff)
            .checked_sub(size as u64 + (64 << 20))
            .filter(|_| near != 0)
            .unwrap_or(0);
        // SAFETY: memfd_create with a valid C string; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"matryoshka-jit".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let map = |prot, at: u64| {
            // SAFETY: fresh shared mapping of our own memfd (at a hint
            // address, never MAP_FIXED: nothing is replaced); result checked.
            let p = unsafe { libc::mmap(at as *mut _, size, prot, libc::MAP_SHARED, fd, 0) };
            if p == libc::MAP_FAILED {
                Err(io::Error::last_os_error())
            } else {
                Ok(p as *mut u8)
            }
        };
        // SAFETY: fd is a valid memfd we own.
        let r = unsafe { libc::ftruncate(fd, size as libc::off_t) };
        let result = if r != 0 {
            Err(io::Error::last_os_error())
        } else {
            map(libc::PROT_READ | libc::PROT_WRITE, 0).and_then(|rw| {
                match map(libc::PROT_READ | libc::PROT_EXEC, hint) {
                    Ok(rx) => Ok(CodeBuf {
                        rw,
                        rx,
                        size,
                        used: 0,
                        top: size,
                    }),
                    Err(e) => {
                        // SAFETY: rw was mapped above with this size.
                        unsafe { libc::munmap(rw as *mut _, size) };
                        Err(e)
                    }
                }
            })
        };
        // SAFETY: the mappings keep the memory alive; the fd is not needed.
        unsafe { libc::close(fd) };
        result
    }

    /// Address (in the executable view) where the next code will go.
    pub fn next_addr(&self) -> u64 {
        self.rx as u64 + self.used as u64
    }

    pub fn free(&self) -> usize {
        self.top - self.used
    }

    pub fn used(&self) -> usize {
        self.used
    }

    /// Append `code` (assembled for address `next_addr()`); returns its
    /// executable address, or None when the buffer is full.
    pub fn push(&mut self, code: &[u8]) -> Option<u64> {
        if code.len() > self.free() {
            return None;
        }
        let at = self.next_addr();
        // SAFETY: [used, used+len) is inside the RW mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.add(self.used), code.len()) };
        // Keep entries 16-byte aligned for the host's fetch.
        self.used = (self.used + code.len()).next_multiple_of(16).min(self.top);
        Some(at)
    }

    /// Place position-independent `code` at the top end (16-byte
    /// aligned); returns its executable address, or None when the buffer
    /// is full.
    pub fn push_high(&mut self, code: &[u8]) -> Option<u64> {
        let top = self.top.checked_sub(code.len())? & !15;
        if top < self.used {
            return None;
        }
        // SAFETY: [top, top+len) is inside the RW mapping, above every
        // translation (checked above).
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.add(top), code.len()) };
        self.top = top;
        Some(self.rx as u64 + top as u64)
    }

    /// Rewrite the rel32 of the 5-byte `jmp` at executable address `site`
    /// so that it jumps to `target`.
    pub fn patch_jmp(&mut self, site: u64, target: u64) {
        let off = site.wrapping_sub(self.rx as u64) as usize;
        if off + 5 > self.used && (off < self.top || off + 5 > self.size) {
            return;
        }
        let rel = target.wrapping_sub(site + 5) as i64;
        if rel != rel as i32 as i64 {
            return;
        }
        // SAFETY: in-bounds (checked); the jmp's rel32 is written with one
        // aligned-or-not 4-byte store while no thread executes this vCPU's code.
        unsafe {
            let p = self.rw.add(off);
            debug_assert_eq!(*p, 0xe9);
            std::ptr::write_unaligned(p.add(1) as *mut i32, rel as i32);
        }
    }

    /// Forget all code (the caller drops every reference to it first).
    pub fn reset(&mut self, keep: usize) {
        self.used = keep;
        self.top = self.size;
    }
}

impl Drop for CodeBuf {
    fn drop(&mut self) {
        // SAFETY: both views were mapped with `size` bytes in `new`.
        unsafe {
            libc::munmap(self.rw as *mut _, self.size);
            libc::munmap(self.rx as *mut _, self.size);
        }
    }
}
