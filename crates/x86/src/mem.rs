//! Guest physical memory as the CPU sees it: RAM regions backed by host
//! memory (owned by the VMM), plus per-page bookkeeping for translated code.
//!
//! Everything not covered by a RAM region is MMIO and goes to the [`Bus`].
//!
//! [`Bus`]: crate::bus::Bus

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

/// One contiguous RAM range, mapped at `host` in this process.
#[derive(Clone, Copy, Debug)]
pub struct RamRegion {
    pub gpa: u64,
    pub len: u64,
    pub host: *mut u8,
}

/// Guest RAM shared by all vCPUs of a VM.
pub struct GuestRam {
    regions: Vec<RamRegion>,
    /// Per 4 KiB page: non-zero when some vCPU holds decoded code from it.
    code_pages: Vec<AtomicU8>,
    /// Per 4 KiB page: bumped on every write that hits a code page; decoded
    /// blocks remember the generation they were built from.
    page_gen: Vec<AtomicU32>,
    /// RAM allocated by [`GuestRam::anonymous`], freed with this object.
    owned: Option<(*mut u8, std::alloc::Layout)>,
}

// SAFETY: the host pointers refer to mappings that the VMM keeps alive for
// the lifetime of the VM; concurrent guest accesses are the guest's business
// (as on real hardware) and are done with unaligned/atomic raw accesses.
unsafe impl Send for GuestRam {}
// SAFETY: see above.
unsafe impl Sync for GuestRam {}

impl Drop for GuestRam {
    fn drop(&mut self) {
        if let Some((host, layout)) = self.owned.take() {
            // SAFETY: allocated with this layout by `anonymous`; the last
            // user of the memory is gone with this object.
            unsafe { std::alloc::dealloc(host, layout) };
        }
    }
}

impl GuestRam {
    /// # Safety
    /// Each region's `host` must point to `len` bytes of readable and
    /// writable memory that outlives the returned object.
    pub unsafe fn new(mut regions: Vec<RamRegion>) -> Self {
        regions.sort_by_key(|r| r.gpa);
        let end = regions.iter().map(|r| r.gpa + r.len).max().unwrap_or(0);
        let pages = end.div_ceil(4096) as usize;
        GuestRam {
            regions,
            code_pages: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            page_gen: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            owned: None,
        }
    }

    /// Allocate anonymous RAM (for tests and the self-test harness).
    pub fn anonymous(size: u64) -> Self {
        let layout = std::alloc::Layout::from_size_align(size.max(4096) as usize, 4096)
            .expect("RAM size fits a layout");
        // SAFETY: non-zero size layout.
        let host = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!host.is_null(), "out of memory allocating guest RAM");
        // SAFETY: `host` points to `size` zeroed bytes, freed only when the
        // GuestRam goes (which everything using its pointers keeps alive).
        let mut ram = unsafe {
            Self::new(vec![RamRegion {
                gpa: 0,
                len: size,
                host,
            }])
        };
        ram.owned = Some((host, layout));
        ram
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Host pointer for `gpa` with at least `len` bytes valid in the same region.
    #[inline]
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        for r in &self.regions {
            if gpa >= r.gpa && gpa.checked_add(len)? <= r.gpa + r.len {
                // SAFETY: offset is within the region.
                return Some(unsafe { r.host.add((gpa - r.gpa) as usize) });
            }
        }
        None
    }

    pub fn is_ram(&self, gpa: u64) -> bool {
        self.host_ptr(gpa, 1).is_some()
    }

    /// Copy out of guest RAM; false if any byte is not RAM.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.host_ptr(gpa, buf.len() as u64) {
            Some(p) => {
                // SAFETY: host_ptr validated the range.
                unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
                true
            }
            None => false,
        }
    }

    /// Copy into guest RAM; false if any byte is not RAM.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        match self.host_ptr(gpa, buf.len() as u64) {
            Some(p) => {
                // SAFETY: host_ptr validated the range.
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), p, buf.len()) };
                self.note_write(gpa, buf.len() as u64);
                true
            }
            None => false,
        }
    }

    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b).then(|| u64::from_le_bytes(b))
    }

    /// Atomic access to an aligned 64-bit word (page-table A/D updates).
    pub fn atomic_u64(&self, gpa: u64) -> Option<&std::sync::atomic::AtomicU64> {
        if gpa & 7 != 0 {
            return None;
        }
        let p = self.host_ptr(gpa, 8)?;
        // SAFETY: aligned, in-bounds, lives as long as self.
        Some(unsafe { &*(p as *const std::sync::atomic::AtomicU64) })
    }

    /// Atomic access to an aligned 32-bit word.
    pub fn atomic_u32(&self, gpa: u64) -> Option<&AtomicU32> {
        if gpa & 3 != 0 {
            return None;
        }
        let p = self.host_ptr(gpa, 4)?;
        // SAFETY: aligned, in-bounds, lives as long as self.
        Some(unsafe { &*(p as *const AtomicU32) })
    }

    /// Mark a page as holding decoded code; returns its current generation.
    #[inline]
    pub fn mark_code(&self, ppn: u64) -> u32 {
        match self.code_pages.get(ppn as usize) {
            Some(f) => {
                f.store(1, Ordering::SeqCst);
                self.page_gen[ppn as usize].load(Ordering::SeqCst)
            }
            None => u32::MAX,
        }
    }

    /// Address of a page's write generation (for translated code).
    pub fn page_gen_ptr(&self, ppn: u64) -> Option<*const u32> {
        self.page_gen
            .get(ppn as usize)
            .map(|g| g as *const AtomicU32 as *const u32)
    }

    #[inline]
    pub fn page_gen(&self, ppn: u64) -> u32 {
        match self.page_gen.get(ppn as usize) {
            Some(g) => g.load(Ordering::Acquire),
            None => u32::MAX - 1, // never matches: code outside RAM is not cached
        }
    }

    #[inline]
    pub fn is_code_page(&self, ppn: u64) -> bool {
        self.code_pages
            .get(ppn as usize)
            .is_some_and(|f| f.load(Ordering::Relaxed) != 0)
    }

    /// Record a write to `[gpa, gpa+len)`: invalidates decoded code there.
    #[inline]
    pub fn note_write(&self, gpa: u64, len: u64) {
        let first = gpa >> 12;
        let last = (gpa + len.max(1) - 1) >> 12;
        for ppn in first..=last {
            if let Some(f) = self.code_pages.get(ppn as usize) {
                if f.load(Ordering::Relaxed) != 0 {
                    f.store(0, Ordering::SeqCst);
                    self.page_gen[ppn as usize].fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
}
