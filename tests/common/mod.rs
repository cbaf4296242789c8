//! Harness shared by the integration tests that boot guests: building the
//! default guest, and driving a VM (or QEMU) through its serial console.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Extra `run` arguments for every VM a test boots, from
/// MATRYOSHKA_TEST_ARGS (e.g. "--cpu-engine interp": `.ci/run` runs the
/// guest tests once more that way, so that both engines pass them).
pub fn test_args() -> Vec<String> {
    std::env::var("MATRYOSHKA_TEST_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// The VMM's `--stats` line (a `[matryoshka]` line) that contains `what`,
/// e.g. "jit:" for the translator's; panics with the console otherwise.
pub fn stats_line<'a>(text: &'a str, what: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains("[matryoshka]") && l.contains(what))
        .unwrap_or_else(|| panic!("no statistics with {what:?}; console:\n{text}"))
}

/// guest/out with the default guest, built by guest/build.sh if missing.
pub fn ensure_guest() -> PathBuf {
    let out = root().join("guest/out");
    if !(out.join("vmlinuz").exists() && out.join("initramfs.cpio").exists()) {
        let st = Command::new("bash")
            .arg(root().join("guest/build.sh"))
            .status()
            .expect("run guest/build.sh");
        assert!(
            st.success(),
            "guest/build.sh failed: the default guest is required for this test"
        );
    }
    out
}

/// Collect a child's stdout and stderr into one string, in the background
/// (the readers end when the child closes its output).
pub fn collect_output(child: &mut Child) -> (Arc<Mutex<String>>, Vec<JoinHandle<()>>) {
    let out = Arc::new(Mutex::new(String::new()));
    let mut readers = Vec::new();
    for stream in [
        Box::new(child.stdout.take().expect("stdout piped")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("stderr piped")),
    ] {
        let out = out.clone();
        readers.push(std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }));
    }
    (out, readers)
}

/// A running VM: its console output (stdout and stderr) is collected in the
/// background; lines are sent to its stdin (the guest's serial port).
pub struct Vm {
    pub child: Child,
    out: Arc<Mutex<String>>,
    /// Where the next `wait_for` starts searching.
    cursor: usize,
    pub started: Instant,
    /// What `sh` waits for before the command's output.
    begin: &'static str,
}

impl Vm {
    pub fn spawn(cmd: &mut Command) -> Vm {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the VM");
        let (out, _readers) = collect_output(&mut child);
        Vm {
            child,
            out,
            cursor: 0,
            started: Instant::now(),
            begin: "BEGIN",
        }
    }

    /// `sh` waits for `marker` (e.g. "BEGIN\r\n") before the output.
    pub fn with_begin_marker(mut self, marker: &'static str) -> Vm {
        self.begin = marker;
        self
    }

    pub fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Wait until `pat` appears after the cursor; returns the text from the
    /// cursor to the end of the match and moves the cursor past it.
    pub fn wait_for(&mut self, pat: &str, timeout: Duration) -> String {
        let t0 = Instant::now();
        loop {
            {
                let s = self.out.lock().unwrap();
                if let Some(p) = s[self.cursor..].find(pat) {
                    let end = self.cursor + p + pat.len();
                    let seg = s[self.cursor..end].to_string();
                    self.cursor = end;
                    return seg;
                }
            }
            if t0.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {pat:?}; console so far:\n{}",
                    self.text()
                );
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "VM exited ({st}) while waiting for {pat:?}; console:\n{}",
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Run a shell command and return its output between markers the shell
    /// builds (`B''EGIN`), so the echoed command line itself never matches.
    pub fn sh(&mut self, cmd: &str, timeout: Duration) -> String {
        self.send(&format!("echo B''EGIN; {cmd}; echo E''ND"));
        self.wait_for(self.begin, timeout);
        let seg = self.wait_for("END", timeout);
        seg.trim_end_matches("END").trim().replace('\r', "")
    }

    /// Wait for the VMM to exit on its own (guest poweroff).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t0.elapsed() < timeout,
                "VM did not power off within {timeout:?}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
