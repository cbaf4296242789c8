//! The host side of the serial console: stdin → guest, with a raw terminal
//! and QEMU-style `Ctrl-A` escapes when stdin is a tty.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Wakes the vCPU loop (from HLT waits) and asks the CPU to leave `run`.
pub struct Waker {
    pending: Mutex<bool>,
    cv: Condvar,
    kicks: Mutex<Vec<Arc<AtomicBool>>>,
}

impl Waker {
    pub fn new() -> Arc<Self> {
        Arc::new(Waker {
            pending: Mutex::new(false),
            cv: Condvar::new(),
            kicks: Mutex::new(Vec::new()),
        })
    }

    pub fn add_kick(&self, k: Arc<AtomicBool>) {
        self.kicks.lock().unwrap_or_else(|e| e.into_inner()).push(k);
    }

    pub fn wake(&self) {
        for k in self.kicks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            k.store(true, Ordering::Relaxed);
        }
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Sleep until woken or `timeout` elapses.
    pub fn wait(&self, timeout: std::time::Duration) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !*p {
            p = self
                .cv
                .wait_timeout(p, timeout)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *p = false;
    }
}

/// Input for the guest's serial port plus the "user asked to quit" flag.
pub struct ConsoleInput {
    pub queue: Mutex<VecDeque<u8>>,
    pub quit: AtomicBool,
}

/// Puts the terminal in raw mode and restores it when dropped.
pub struct RawTty {
    fd: i32,
    saved: libc::termios,
}

impl RawTty {
    pub fn enable() -> Option<RawTty> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: isatty/tcgetattr/tcsetattr only read/write the termios
        // struct we pass for a valid file descriptor.
        unsafe {
            if libc::isatty(fd) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            // Keep output post-processing so guest "\n" renders sanely.
            t.c_oflag |= libc::OPOST;
            if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(RawTty { fd, saved })
        }
    }
}

impl Drop for RawTty {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved from the same descriptor.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}

const ESCAPE_HELP: &str =
    "\r\nC-a h    print this help\r\nC-a x    exit the VM\r\nC-a C-a  send C-a to the guest\r\n";

/// Start the stdin reader thread. With a tty, `Ctrl-A x` quits and
/// `Ctrl-A h` prints help; with a pipe or file, bytes pass through as-is.
pub fn spawn_stdin(waker: Arc<Waker>, tty: bool) -> Arc<ConsoleInput> {
    let input = Arc::new(ConsoleInput {
        queue: Mutex::new(VecDeque::new()),
        quit: AtomicBool::new(false),
    });
    let inp = input.clone();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 4096];
            let mut escape = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut out = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if !tty {
                        out.push(b);
                        continue;
                    }
                    if escape {
                        escape = false;
                        match b {
                            b'x' | b'X' => {
                                inp.quit.store(true, Ordering::SeqCst);
                                waker.wake();
                                return;
                            }
                            b'h' | b'H' | b'?' => eprint!("{ESCAPE_HELP}"),
                            0x01 => out.push(0x01),
                            _ => {}
                        }
                    } else if b == 0x01 {
                        escape = true;
                    } else {
                        out.push(b);
                    }
                }
                if !out.is_empty() {
                    inp.queue
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(out);
                    waker.wake();
                }
            }
        })
        .expect("spawn stdin thread");
    input
}
