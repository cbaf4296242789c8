//! Integration test: boot the default guest (Debian's stock kernel + busybox
//! initramfs) on the software CPU, drive its shell over the serial console,
//! and check what it reports about the platform.
//!
//! Needs guest/out/ (built by guest/build.sh, which this test runs when the
//! files are missing — it downloads Debian packages). Run with --release.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

mod common;
use common::{ensure_guest, Vm};

fn start(extra: &[&str]) -> Vm {
    ensure_guest();
    Vm::spawn(
        Command::new(env!("CARGO_BIN_EXE_matryoshka"))
            .arg("run")
            .arg("--no-reboot")
            .args(extra),
    )
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
    let mut vm = start(&["--cpu-engine", engine, "--stats"]);
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

    // The kernel loads a module it asks for (ext4, for a mount) through
    // /sbin/modprobe, which /init links (the image leaves it out while
    // the kernel boots: see guest/build.sh).
    let fs = vm.sh(
        "grep -cw ext4 /proc/filesystems; mount -t ext4 /dev/null /mnt 2>/dev/null; grep -cw ext4 /proc/filesystems",
        Duration::from_secs(60),
    );
    let counts: Vec<&str> = fs.lines().map(str::trim).filter(|l| l.len() == 1).collect();
    assert_eq!(counts, ["0", "1"], "ext4 before and after a mount: {fs:?}");

    // The i8042's keyboard answers atkbd's probe (each byte of a reply
    // its own interrupt).
    let input = vm.sh("cat /proc/bus/input/devices", Duration::from_secs(30));
    assert!(
        input.contains("AT Translated Set 2 keyboard"),
        "input devices: {input:?}"
    );

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
        "dmesg | grep -E 'WARNING|BUG|Call Trace|timed out|Oops|Unable to init' ; true",
        Duration::from_secs(30),
    );
    assert!(
        bad.trim().is_empty(),
        "kernel log has problems:\n{bad}\n--- full console:\n{}",
        vm.text()
    );

    vm.send("poweroff -f");
    let status = vm.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "exit status {status}; console:\n{}",
        vm.text()
    );
    // The translator refuses no block of a real guest (a refusal leaves
    // the block to the interpreter: correct, but a translator bug).
    if engine == "jit" {
        let text = vm.text();
        let stats = common::stats_line(&text, "jit:");
        assert!(stats.contains("(0 failed,"), "{stats}");
    }
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
