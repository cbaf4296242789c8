//! Asking a running vCPU to stop, from any thread.
//!
//! The flag is the truth. While the vCPU is inside [`crate::Cpu::run`], a
//! kick also sets a byte inside that Cpu (the *mirror*), placed so that
//! translated code checks it and its instruction budget with one load on
//! every backward jump. The mirror only makes the stop quick: `run` always
//! decides by the flag.

use std::sync::atomic::{fence, AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Kick {
    flag: AtomicBool,
    mirror: Mutex<Mirror>,
}

struct Mirror(*const AtomicU8);

impl Default for Mirror {
    fn default() -> Self {
        Mirror(std::ptr::null())
    }
}

// SAFETY: the pointer is only dereferenced under the mutex, and only
// between `attach` and `detach`, which the owning Cpu calls around the
// whole of `run` while it holds `&mut self` (so the byte neither moves nor
// goes away in between).
unsafe impl Send for Mirror {}

impl Kick {
    /// Make the vCPU leave `run` with `Exit::Kicked` soon.
    pub fn kick(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let m = self.mirror.lock().unwrap_or_else(|e| e.into_inner());
        if !m.0.is_null() {
            // SAFETY: attached, so the byte is alive (see `Mirror`).
            unsafe { (*m.0).store(1, Ordering::SeqCst) };
        }
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// Whether a kick is pending (`mirror` is the attached byte), clearing
    /// it. A kick that lands while this runs is either taken now or leaves
    /// the mirror set, so that translated code stops at its next check.
    pub(crate) fn take(&self, mirror: &AtomicU8) -> bool {
        if !self.flag.load(Ordering::Relaxed) && mirror.load(Ordering::Relaxed) == 0 {
            return false;
        }
        mirror.store(0, Ordering::SeqCst);
        // The clear above must not pass the read of the flag below: a
        // kicker sets the flag before the mirror.
        fence(Ordering::SeqCst);
        self.flag.swap(false, Ordering::SeqCst)
    }

    pub(crate) fn attach(&self, mirror: &AtomicU8) {
        self.mirror.lock().unwrap_or_else(|e| e.into_inner()).0 = mirror;
        if self.flag.load(Ordering::SeqCst) {
            mirror.store(1, Ordering::SeqCst);
        }
    }

    pub(crate) fn detach(&self) {
        self.mirror.lock().unwrap_or_else(|e| e.into_inner()).0 = std::ptr::null();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kick_sets_the_attached_mirror_and_is_taken_once() {
        let k = Kick::default();
        let m = AtomicU8::new(0);
        k.kick();
        assert_eq!(m.load(Ordering::SeqCst), 0, "not attached yet");
        k.attach(&m);
        assert_eq!(
            m.load(Ordering::SeqCst),
            1,
            "a pending kick shows on attach"
        );
        assert!(k.take(&m));
        assert_eq!(m.load(Ordering::SeqCst), 0);
        assert!(!k.take(&m));
        k.kick();
        assert_eq!(m.load(Ordering::SeqCst), 1);
        k.detach();
        assert!(k.take(&m));
        k.kick();
        assert_eq!(m.load(Ordering::SeqCst), 0, "detached: the flag only");
        assert!(k.is_set());
    }

    #[test]
    fn a_stale_mirror_without_the_flag_is_cleared_and_not_a_kick() {
        let k = Kick::default();
        let m = AtomicU8::new(1);
        k.attach(&m);
        assert!(!k.take(&m));
        assert_eq!(m.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn kicks_from_another_thread_reach_the_mirror() {
        let k = std::sync::Arc::new(Kick::default());
        let m = Box::new(AtomicU8::new(0));
        k.attach(&m);
        let k2 = k.clone();
        std::thread::spawn(move || k2.kick()).join().unwrap();
        assert_eq!(m.load(Ordering::SeqCst), 1);
        k.detach();
        assert!(k.take(&m));
    }
}
