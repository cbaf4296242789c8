//! Integration test: boot the default guest (Debian's stock kernel + busybox
//! initramfs) on the software CPU, drive its shell over the serial console,
//! and check what it reports about the platform.
//!
//! Needs guest/out/ (built by guest/build.sh, which this test runs when the
//! files are missing — it downloads Debian packages). Run with --release.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ensure_guest() -> PathBuf {
    let out = root().join("guest/out");
    if !(out.join("vmlinuz").exists() && out.join("initramfs.cpio.gz").exists()) {
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

struct Vm {
    child: Child,
    out: Arc<Mutex<String>>,
    /// Where the next `wait_for` starts searching.
    cursor: usize,
}

impl Vm {
    fn start(extra: &[&str]) -> Vm {
        ensure_guest();
        let mut child = Command::new(env!("CARGO_BIN_EXE_matryoshka"))
            .arg("run")
            .arg("--no-reboot")
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn matryoshka");
        let out = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
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
            });
        }
        Vm {
            child,
            out,
            cursor: 0,
        }
    }

    fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Wait until `pat` appears after the cursor; returns the text from the
    /// cursor to the end of the match and moves the cursor past it.
    fn wait_for(&mut self, pat: &str, timeout: Duration) -> String {
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
                    "timed out waiting for {pat:?}; console so far:\n{}",
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

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Run a shell command and return its output between unique markers.
    /// The markers are built by the shell (`B""EGIN`) so the echoed command
    /// line itself never matches.
    fn sh(&mut self, cmd: &str, timeout: Duration) -> String {
        self.send(&format!("echo B''EGIN; {cmd}; echo E''ND"));
        self.wait_for("BEGIN", timeout);
        let seg = self.wait_for("END", timeout);
        seg.trim_end_matches("END").trim().replace('\r', "")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn boots_default_guest_to_shell_jit() {
    boots_default_guest_to_shell("jit");
}

#[test]
fn boots_default_guest_to_shell_interp() {
    boots_default_guest_to_shell("interp");
}

fn boots_default_guest_to_shell(engine: &str) {
    let out = ensure_guest();
    let kver = std::fs::read_to_string(out.join("kernel-version")).unwrap_or_default();
    let mut vm = Vm::start(&["--cpu-engine", engine]);
    vm.wait_for("MATRYOSHKA-INIT-START", Duration::from_secs(120));
    vm.wait_for("~ # ", Duration::from_secs(60));

    let uname = vm.sh("uname -r", Duration::from_secs(30));
    assert!(
        uname.contains(kver.trim()),
        "uname -r: {uname:?}, expected {kver:?}"
    );

    let cpuinfo = vm.sh("cat /proc/cpuinfo", Duration::from_secs(30));
    assert!(
        cpuinfo.contains("Matryoshka Virtual CPU"),
        "cpuinfo: {cpuinfo}"
    );
    for f in ["sse2", "sse4_1", "cx16", "lm", "nx", "tsc"] {
        assert!(
            cpuinfo.split_whitespace().any(|w| w == f),
            "cpuinfo lacks {f}: {cpuinfo}"
        );
    }

    let pci = vm.sh("ls /sys/bus/pci/devices", Duration::from_secs(30));
    assert!(pci.contains("0000:00:00.0"), "PCI devices: {pci:?}");

    // `sleep 2` against the host clock.
    vm.send("echo S''TART; sleep 2; echo S''TOP");
    vm.wait_for("START", Duration::from_secs(30));
    let t0 = Instant::now();
    vm.wait_for("STOP", Duration::from_secs(30));
    let slept = t0.elapsed().as_secs_f64();
    assert!(
        (1.8..3.5).contains(&slept),
        "guest sleep 2 took {slept:.2}s of host time"
    );

    // Guest date against the host date.
    let date = vm.sh("date +%s", Duration::from_secs(30));
    let guest: i64 = date
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("date: {date:?}"));
    let host = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest - host).abs() <= 5,
        "guest date {guest} vs host {host}"
    );

    // The kernel log must be free of warnings caused by the platform.
    let bad = vm.sh(
        "dmesg | grep -E 'WARNING|BUG|Call Trace|timed out|Oops' ; true",
        Duration::from_secs(30),
    );
    assert!(
        bad.trim().is_empty(),
        "kernel log has problems:\n{bad}\n--- full console:\n{}",
        vm.text()
    );

    vm.send("poweroff -f");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = vm.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "VM did not power off:\n{}",
            vm.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "exit status {status}; console:\n{}",
        vm.text()
    );
}

#[test]
fn bad_cli_input_gets_one_clear_error() {
    let bin = env!("CARGO_BIN_EXE_matryoshka");
    let cases: &[&[&str]] = &[
        &["run", "--kernel", "/nonexistent/vmlinuz"],
        &["run", "--memory", "12Q"],
        &["run", "--cpus", "64"],
        &["run", "--frobnicate"],
        &["run", "--kernel", "/etc/hostname"],
    ];
    for args in cases {
        let o = Command::new(bin)
            .args(*args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(
            err.to_lowercase().contains("error"),
            "{args:?}: no error message: {err}"
        );
    }
}
