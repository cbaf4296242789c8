//! Integration tests: boot a full Debian 12 system (systemd, from
//! guest/out/debian.img, built by guest/debian/build-rootfs.sh) on the
//! software CPU through the busybox initramfs' `matryoshka.root=` switch_root,
//! with the disk on virtio-blk and the NIC on virtio-net user networking.
//!
//! Each test works on its own copy (or qcow2 overlay) of the image in
//! CARGO_TARGET_TMPDIR, so guest/out/debian.img is never written. The VMs run
//! one at a time (systemd boot is CPU-heavy and the CI machine is small).
//! Needs: guest/out/debian.img (the tests run the build script when it is
//! missing, which needs root and Debian's mirror), `qemu-img` (qemu-utils),
//! `e2fsck`/`debugfs` (e2fsprogs) and `sha256sum`. Run with --release.
//! MATRYOSHKA_DEBIAN_BOOT_TIMEOUT (seconds, default 900) bounds each boot;
//! MATRYOSHKA_TEST_ARGS adds `run` arguments (e.g. `--cpu-engine interp`);
//! MATRYOSHKA_TEST_ENGINE=qemu runs the same scenarios under QEMU TCG.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// One Debian VM at a time within this test binary.
static VM_LOCK: Mutex<()> = Mutex::new(());

mod common;
use common::root;

fn one_vm_at_a_time() -> MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn boot_timeout() -> Duration {
    let s = std::env::var("MATRYOSHKA_DEBIAN_BOOT_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(900);
    Duration::from_secs(s)
}

const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// A unique token so that no test can pass on stale data.
fn token(tag: &str) -> String {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{}-{n:x}", std::process::id())
}

fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "command -v {tool} || test -x /sbin/{tool} || test -x /usr/sbin/{tool}"
        ))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is required by this test: install it with `apt-get install {package}`"
    );
}

/// guest/out/{vmlinuz,initramfs.cpio,debian.img}, built if missing.
fn ensure_debian_image() -> PathBuf {
    let out = common::ensure_guest();
    let img = out.join("debian.img");
    if !img.exists() {
        let st = Command::new("bash")
            .arg(root().join("guest/debian/build-rootfs.sh"))
            .status()
            .expect("run guest/debian/build-rootfs.sh");
        assert!(
            st.success(),
            "guest/debian/build-rootfs.sh failed: these tests need guest/out/debian.img \
             (build it as root with network access to deb.debian.org; it installs debootstrap)"
        );
    }
    img
}

/// A fresh per-test directory for disk copies and overlays.
fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("debian-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Sparse copy of the Debian image (cp keeps the holes; 2 GiB → ~0.4 GiB).
fn copy_image(dst: &Path) {
    let src = ensure_debian_image();
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&src)
        .arg(dst)
        .status()
        .expect("run cp");
    assert!(st.success(), "cp {src:?} {dst:?} failed");
}

fn sha256(path: &Path) -> String {
    require_tool("sha256sum", "coreutils");
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(o.status.success(), "sha256sum {path:?} failed");
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

use common::Vm;

/// Boot the Debian image on `disk` (a `--disk` argument, e.g. "x.img" or
/// "x.qcow2,format=qcow2") with optional extra `run` arguments.
fn start(disk: &str, extra: &[&str]) -> Vm {
    let out_dir = root().join("guest/out");
    let base = std::fs::read_to_string(out_dir.join("cmdline")).unwrap_or_default();
    let cmdline = format!("{} matryoshka.root=/dev/vda", base.trim());
    let mut cmd = if std::env::var("MATRYOSHKA_TEST_ENGINE").as_deref() == Ok("qemu") {
        qemu_command(&out_dir, disk, &cmdline, extra)
    } else {
        let mut c = Command::new(env!("CARGO_BIN_EXE_matryoshka"));
        c.arg("run")
            .arg("--no-reboot")
            .args(["--memory", "1G"])
            .args(["--disk", disk])
            .args(["--cmdline", &cmdline])
            .args(extra)
            .args(common::test_args());
        c
    };
    Vm::spawn(&mut cmd).with_begin_marker("BEGIN\r\n")
}

trait DebianGuest {
    fn wait_for_shell(&mut self) -> Duration;
}

impl DebianGuest for Vm {
    /// Wait for the switch_root, systemd, and the autologin root shell;
    /// returns the boot time to the login prompt.
    fn wait_for_shell(&mut self) -> Duration {
        let t = boot_timeout();
        self.wait_for("MATRYOSHKA-SWITCH-ROOT", t);
        self.wait_for("login: root (automatic login)", t);
        let login = self.started.elapsed();
        self.wait_for(":~# ", t);
        eprintln!(
            "debian guest: login prompt after {:.1} s, shell after {:.1} s",
            login.as_secs_f64(),
            self.started.elapsed().as_secs_f64()
        );
        login
    }
}

/// MATRYOSHKA_TEST_ENGINE=qemu runs the same scenario under QEMU TCG, to tell
/// image problems from VMM problems. Translates `--disk`/`--net` arguments.
fn qemu_command(out_dir: &Path, disk: &str, cmdline: &str, extra: &[&str]) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-m", "1G", "-no-reboot", "-nographic"])
        .arg("-kernel")
        .arg(out_dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(out_dir.join("initramfs.cpio"))
        .args(["-append", cmdline]);
    let (path, opts) = disk.split_once(',').unwrap_or((disk, ""));
    let format = if opts.contains("format=qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    c.arg("-drive")
        .arg(format!("file={path},if=virtio,format={format}"));
    if let Some(i) = extra.iter().position(|a| *a == "--net") {
        let spec = extra[i + 1].trim_start_matches("user");
        c.args(["-netdev", &format!("user,id=n0{spec}")])
            .args(["-device", "virtio-net-pci,netdev=n0"]);
    } else {
        c.args(["-nic", "none"]);
    }
    c
}

/// Minimal HTTP server on host 127.0.0.1 answering every GET with `body`.
fn serve_http_once(body: String) -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        // Serve until the test process ends (the guest may retry).
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let resp = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = c.write_all(resp.as_bytes());
        }
    });
    (port, h)
}

/// HTTP GET from the host with retries (the guest server may still be starting).
fn http_get(port: u16, deadline: Duration) -> String {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < deadline {
        match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let _ = s.write_all(b"GET /index.html HTTP/1.0\r\nHost: guest\r\n\r\n");
                let mut resp = String::new();
                match s.read_to_string(&mut resp) {
                    Ok(_) if resp.starts_with("HTTP/1.") => return resp,
                    Ok(_) => last = format!("short response {resp:?}"),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("HTTP GET 127.0.0.1:{port} failed for {deadline:?}: {last}");
}

/// (a) systemd boots to the autologin root shell on ttyS0; (d) user networking
/// both ways: guest→host through the 10.0.2.2 gateway, host→guest via hostfwd.
#[test]
fn debian_boots_to_root_shell_and_networks() {
    let _one = one_vm_at_a_time();
    let dir = scratch("shell");
    let img = dir.join("disk.img");
    copy_image(&img);
    let kver = std::fs::read_to_string(root().join("guest/out/kernel-version")).unwrap();

    let host_token = token("host-page");
    let (host_port, _server) = serve_http_once(host_token.clone());
    let fwd_port = free_port();
    let net = format!("user,hostfwd=tcp:127.0.0.1:{fwd_port}-:8080");
    let mut vm = start(img.to_str().unwrap(), &["--net", &net]);
    vm.wait_for_shell();

    let uname = vm.sh("uname -r", CMD_TIMEOUT);
    assert!(
        uname.contains(kver.trim()),
        "uname -r: {uname:?}, expected {kver:?}"
    );
    let os = vm.sh("cat /etc/os-release", CMD_TIMEOUT);
    assert!(os.contains("bookworm"), "os-release: {os}");
    let whoami = vm.sh("id -u; tty", CMD_TIMEOUT);
    assert!(
        whoami.starts_with('0') && whoami.contains("/dev/ttyS0"),
        "id/tty: {whoami:?}"
    );
    let mnt = vm.sh("findmnt -n -o SOURCE,FSTYPE,OPTIONS /", CMD_TIMEOUT);
    assert!(
        mnt.contains("/dev/vda") && mnt.contains("ext4") && mnt.contains("rw"),
        "root mount: {mnt:?}"
    );
    let pid1 = vm.sh("cat /proc/1/comm", CMD_TIMEOUT);
    assert!(pid1.ends_with("systemd"), "PID 1 is {pid1:?}");
    let state = vm.sh(
        "systemctl is-system-running --wait; systemctl --failed --no-legend --plain",
        Duration::from_secs(600),
    );
    assert!(
        state.starts_with("running"),
        "systemd state: {state}\n--- console:\n{}",
        vm.text()
    );

    // DHCP (systemd-networkd) on the virtio NIC, then guest → host.
    let addr = vm.sh(
        "for i in $(seq 120); do ip -4 -o addr show scope global | grep -q 'inet 10\\.0\\.2\\.' && break; sleep 1; done; ip -4 -o addr show scope global",
        Duration::from_secs(180),
    );
    assert!(
        addr.contains("inet 10.0.2."),
        "no DHCP lease on 10.0.2.0/24: {addr:?}"
    );
    let page = vm.sh(
        &format!("timeout 60 busybox wget -q -O - http://10.0.2.2:{host_port}/"),
        Duration::from_secs(120),
    );
    assert!(
        page.contains(&host_token),
        "guest fetched {page:?} from the host, expected {host_token:?}"
    );

    // Host → guest through hostfwd to busybox httpd in the guest.
    let guest_token = token("guest-page");
    vm.sh(
        &format!(
            "mkdir -p /tmp/www && echo {guest_token} > /tmp/www/index.html && busybox httpd -p 8080 -h /tmp/www && echo started"
        ),
        CMD_TIMEOUT,
    );
    let resp = http_get(fwd_port, Duration::from_secs(120));
    assert!(
        resp.starts_with("HTTP/1.") && resp.contains(" 200 ") && resp.contains(&guest_token),
        "host fetched from the guest via hostfwd: {resp:?}"
    );

    // The kernel log must be free of platform-caused problems.
    let bad = vm.sh(
        "dmesg | grep -E 'WARNING|BUG|Call Trace|Oops|I/O error|EXT4-fs error' ; true",
        CMD_TIMEOUT,
    );
    assert!(bad.trim().is_empty(), "kernel log has problems:\n{bad}");

    // A clean systemd shutdown powers the VM off with status 0.
    vm.send("systemctl poweroff");
    let st = vm.wait_exit(Duration::from_secs(300));
    assert!(st.success(), "exit status {st}; console:\n{}", vm.text());
}

/// (b) Data written and synced survives the VMM being SIGKILLed.
#[test]
fn debian_data_survives_vmm_sigkill() {
    let _one = one_vm_at_a_time();
    let dir = scratch("sigkill");
    let img = dir.join("disk.img");
    copy_image(&img);
    let tok = token("persist");

    let mut vm = start(img.to_str().unwrap(), &[]);
    vm.wait_for_shell();
    let w = vm.sh(
        &format!("echo {tok} > /root/persist.txt && sync && echo synced-ok"),
        CMD_TIMEOUT,
    );
    assert!(w.contains("synced-ok"), "write failed: {w:?}");
    // Child::kill is SIGKILL: no chance for the VMM to flush anything else.
    vm.child.kill().unwrap();
    let st = vm.child.wait().unwrap();
    assert!(!st.success(), "VMM exit after SIGKILL: {st}");
    drop(vm);

    let mut vm = start(img.to_str().unwrap(), &[]);
    vm.wait_for_shell();
    let r = vm.sh("cat /root/persist.txt", CMD_TIMEOUT);
    assert!(
        r.contains(&tok),
        "after SIGKILL + reboot read {r:?}, expected {tok:?}"
    );
    let bad = vm.sh(
        "dmesg | grep -E 'EXT4-fs error|I/O error' ; true",
        CMD_TIMEOUT,
    );
    assert!(bad.trim().is_empty(), "kernel log: {bad}");
}

/// (c) Boot from a qcow2 overlay over a read-only raw base: writes land in the
/// overlay and the base stays bit-for-bit unchanged.
#[test]
fn debian_qcow2_overlay_keeps_base_unchanged() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("e2fsck", "e2fsprogs");
    require_tool("debugfs", "e2fsprogs");
    let _one = one_vm_at_a_time();
    let dir = scratch("qcow2");
    let base = dir.join("base.img");
    copy_image(&base);
    let mut perms = std::fs::metadata(&base).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&base, perms).unwrap();
    let before = sha256(&base);

    let overlay = dir.join("overlay.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&overlay)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create failed");
    let overlay_before = std::fs::metadata(&overlay).unwrap().len();

    let tok = token("overlay");
    let disk = format!("{},format=qcow2", overlay.display());
    let mut vm = start(&disk, &[]);
    vm.wait_for_shell();
    let w = vm.sh(
        &format!(
            "echo {tok} > /root/overlay.txt && dd if=/dev/urandom of=/root/blob bs=1M count=8 2>/dev/null && sync && md5sum /root/blob"
        ),
        CMD_TIMEOUT,
    );
    let guest_md5 = w
        .lines()
        .find(|l| l.contains("/root/blob"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("md5sum output: {w:?}"))
        .to_string();
    vm.send("systemctl poweroff");
    let st = vm.wait_exit(Duration::from_secs(300));
    assert!(st.success(), "exit status {st}; console:\n{}", vm.text());

    assert_eq!(
        before,
        sha256(&base),
        "the read-only base image was modified"
    );
    let overlay_after = std::fs::metadata(&overlay).unwrap().len();
    assert!(
        overlay_after > overlay_before + 8 * 1024 * 1024,
        "overlay did not grow by the 8 MiB written: {overlay_before} -> {overlay_after}"
    );
    let check = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Flatten the overlay and read the files with the host's ext4 tools.
    let flat = dir.join("flat.img");
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-O", "raw"])
        .arg(&overlay)
        .arg(&flat)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert failed");
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&flat)
        .output()
        .unwrap();
    assert!(
        fsck.status.code() == Some(0),
        "e2fsck on the flattened overlay: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let cat = |p: &str| {
        Command::new("debugfs")
            .args(["-R", &format!("cat {p}")])
            .arg(&flat)
            .output()
            .unwrap()
            .stdout
    };
    let txt = String::from_utf8_lossy(&cat("/root/overlay.txt")).to_string();
    assert!(txt.contains(&tok), "overlay.txt in the overlay: {txt:?}");
    let blob = cat("/root/blob");
    assert_eq!(blob.len(), 8 << 20, "blob size in the overlay");
    let host_md5 = {
        let p = dir.join("blob");
        std::fs::write(&p, &blob).unwrap();
        let o = Command::new("md5sum").arg(&p).output().unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(
        guest_md5, host_md5,
        "blob content differs between guest and overlay"
    );
    let base_txt = Command::new("debugfs")
        .args(["-R", "stat /root/overlay.txt"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&base_txt.stdout).contains("Inode:"),
        "the base image has the file written to the overlay"
    );
}

/// The initramfs' `matryoshka.root=` falls back cleanly when there is no disk:
/// a clear message, then the usual `matryoshka.cmd` path (no panic, no hang).
#[test]
fn initramfs_root_switch_without_disk_falls_back() {
    let out_dir = root().join("guest/out");
    if !out_dir.join("initramfs.cpio").exists() {
        let st = Command::new("bash")
            .arg(root().join("guest/build.sh"))
            .status()
            .expect("run guest/build.sh");
        assert!(st.success(), "guest/build.sh failed");
    }
    let base = std::fs::read_to_string(out_dir.join("cmdline")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_matryoshka"))
        .args(["run", "--no-reboot", "--cmdline"])
        .arg(format!(
            "{} matryoshka.root=/dev/vda matryoshka.cmd=true",
            base.trim()
        ))
        .stdin(Stdio::null())
        .output()
        .expect("run matryoshka");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("MATRYOSHKA-ROOT-FAILED: no block device /dev/vda"),
        "no fallback message:\n{text}"
    );
    assert!(
        text.contains("MATRYOSHKA-CMD-EXIT 0"),
        "cmd did not run:\n{text}"
    );
    assert!(o.status.success(), "exit status {}:\n{text}", o.status);
}
