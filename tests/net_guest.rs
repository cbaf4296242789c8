//! Integration tests: the default guest on a virtio-net NIC.
//!
//! * `user_network`: `--net user,hostfwd=...`: DHCP in the guest (busybox
//!   udhcpc), ping of the gateway, `wget` from the guest to an HTTP server on
//!   the host's 127.0.0.1 (via 10.0.2.2, small and 1 MiB bodies), and the
//!   guest's busybox `httpd` reached from the host through the forwarded port.
//! * `tap_network`: `--net tap,ifname=...` to a TAP the test creates with
//!   iproute2 (needs root and /dev/net/tun, which CI has): ping and HTTP both
//!   ways across the host link.
//!
//! Needs guest/out/ (built by guest/build.sh when missing). Run with --release.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::ensure_guest;

/// One VM at a time: the tests are CPU-bound on a software CPU.
static VM_LOCK: Mutex<()> = Mutex::new(());

use common::Vm;

fn start(net: &str) -> Vm {
    let out_dir = ensure_guest();
    let base = std::fs::read_to_string(out_dir.join("cmdline")).unwrap();
    let cmdline = format!("{} matryoshka.modules=virtio_pci,virtio_net", base.trim());
    Vm::spawn(
        Command::new(env!("CARGO_BIN_EXE_matryoshka"))
            .args(["run", "--no-reboot", "--net", net, "--cmdline", &cmdline])
            .args(common::test_args()),
    )
}

/// The default guest's shell and poweroff.
trait DefaultGuest {
    fn boot_to_shell(&mut self);
    fn poweroff(self);
}

impl DefaultGuest for Vm {
    fn boot_to_shell(&mut self) {
        self.wait_for("MATRYOSHKA-INIT-START", Duration::from_secs(180));
        self.wait_for("~ # ", Duration::from_secs(120));
    }

    fn poweroff(mut self) {
        self.send("poweroff -f");
        let st = self.wait_exit(Duration::from_secs(60));
        assert!(st.success(), "exit status {st}; console:\n{}", self.text());
    }
}

/// A 1 MiB body that is not trivially compressible or periodic.
fn big_body() -> Vec<u8> {
    let mut x = 0x2545_f491u32;
    (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 7) as u8
        })
        .collect()
}

/// `md5sum` of `data`, computed by the host's coreutils (busybox's matches).
fn md5sum(data: &[u8]) -> String {
    let mut c = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run md5sum (coreutils)");
    let mut stdin = c.stdin.take().unwrap();
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let out = c.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A tiny HTTP/1.0 server: `/big` is [`big_body`], anything else a page
/// naming the path. Serves until the test ends.
fn http_server(listener: TcpListener) {
    let big = Arc::new(big_body());
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { continue };
            let big = big.clone();
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut r = BufReader::new(c.try_clone().unwrap());
                if r.read_line(&mut line).is_err() {
                    return;
                }
                // Skip the request headers.
                let mut h = String::new();
                while r.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
                    h.clear();
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let body = if path == "/big" {
                    big.to_vec()
                } else {
                    format!("HOST-PAGE path={path}\n").into_bytes()
                };
                let _ = write!(
                    c,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(&body);
            });
        }
    });
}

/// GET `path` from `addr` with HTTP/1.0; returns the whole response.
fn http_get(addr: (Ipv4Addr, u16), path: &str) -> std::io::Result<String> {
    let mut c = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(10))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut s = String::new();
    c.read_to_string(&mut s)?;
    Ok(s)
}

/// Fetch from the host, retrying while the guest server starts.
fn http_get_retry(addr: (Ipv4Addr, u16), path: &str, vm: &Vm) -> String {
    let t0 = Instant::now();
    loop {
        match http_get(addr, path) {
            Ok(s) if s.contains("200 OK") => return s,
            r => {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "GET {path} from {addr:?}: {r:?}; console:\n{}",
                    vm.text()
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const T: Duration = Duration::from_secs(120);

/// Starts busybox httpd on port 80 serving a page with `token`.
fn start_guest_httpd(vm: &mut Vm, token: &str) {
    vm.sh(
        &format!("mkdir -p /www && echo {token} > /www/index.html && httpd -p 80 -h /www"),
        T,
    );
}

#[test]
fn user_network() {
    let _serial = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host.local_addr().unwrap().port();
    http_server(host);
    let fwd = free_port();

    let mut vm = start(&format!("user,hostfwd=tcp::{fwd}-:80"));
    vm.boot_to_shell();

    let dhcp = vm.sh(
        "udhcpc -i eth0 -n -q -t 5 2>&1; ip -4 addr show eth0; ip route; cat /etc/resolv.conf",
        T,
    );
    assert!(dhcp.contains("inet 10.0.2.15/24"), "DHCP: {dhcp}");
    assert!(dhcp.contains("default via 10.0.2.2"), "DHCP: {dhcp}");
    assert!(dhcp.contains("nameserver 10.0.2.3"), "DHCP: {dhcp}");

    let ping = vm.sh("ping -c 2 10.0.2.2", T);
    assert!(ping.contains("2 packets received"), "ping: {ping}");

    // (a) guest → host loopback service through the gateway address.
    let page = vm.sh(&format!("wget -q -O- http://10.0.2.2:{host_port}/hello"), T);
    assert!(page.contains("HOST-PAGE path=/hello"), "wget: {page}");
    let t0 = Instant::now();
    let sum = vm.sh(
        &format!("wget -q -O- http://10.0.2.2:{host_port}/big | md5sum"),
        T,
    );
    let secs = t0.elapsed().as_secs_f64();
    let want = md5sum(&big_body());
    assert!(
        sum.contains(&want),
        "1 MiB download: md5sum {sum:?}, want {want:?}"
    );
    eprintln!("guest wget of 1 MiB over user networking: {secs:.2}s");

    // (b) host → guest httpd through the forwarded port.
    start_guest_httpd(&mut vm, "GUEST-PAGE-USER");
    let resp = http_get_retry((Ipv4Addr::LOCALHOST, fwd), "/index.html", &vm);
    assert!(resp.contains("GUEST-PAGE-USER"), "hostfwd: {resp}");

    vm.poweroff();
}

/// Runs `ip ARGS`, failing loudly.
fn ip(args: &str) {
    let st = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("run `ip` (install iproute2)");
    assert!(st.success(), "`ip {args}` failed ({st})");
}

struct TapIf(String);

impl Drop for TapIf {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

#[test]
fn tap_network() {
    // Effective UID: the second field of /proc/self/status's Uid line.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert!(
        euid == "0" && std::path::Path::new("/dev/net/tun").exists(),
        "tap_network needs root (CAP_NET_ADMIN) and /dev/net/tun to create a TAP \
         interface; run the tests as root (CI does), with the `tun` module loaded"
    );
    let _serial = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let name = format!("mtap{}", std::process::id() % 100_000);
    let _ = Command::new("ip").args(["link", "del", &name]).status();
    ip(&format!("tuntap add dev {name} mode tap"));
    let tap = TapIf(name.clone());
    // A link-local-ish private /30 that nothing else on the host should use.
    let (host_ip, guest_ip) = (
        Ipv4Addr::new(172, 30, 213, 1),
        Ipv4Addr::new(172, 30, 213, 2),
    );
    ip(&format!("addr add {host_ip}/30 dev {name}"));
    ip(&format!("link set {name} up"));

    let host = TcpListener::bind((host_ip, 0)).unwrap();
    let host_port = host.local_addr().unwrap().port();
    http_server(host);

    let mut vm = start(&format!("tap,ifname={name}"));
    vm.boot_to_shell();
    let cfg = vm.sh(
        &format!("ip addr add {guest_ip}/30 dev eth0 && ip link set eth0 up && ping -c 2 -w 20 {host_ip}"),
        T,
    );
    assert!(cfg.contains("2 packets received"), "ping over tap: {cfg}");
    let page = vm.sh(&format!("wget -q -O- http://{host_ip}:{host_port}/tap"), T);
    assert!(
        page.contains("HOST-PAGE path=/tap"),
        "wget over tap: {page}"
    );

    start_guest_httpd(&mut vm, "GUEST-PAGE-TAP");
    let resp = http_get_retry((guest_ip, 80), "/index.html", &vm);
    assert!(
        resp.contains("GUEST-PAGE-TAP"),
        "host → guest over tap: {resp}"
    );

    vm.poweroff();
    drop(tap);
}

#[test]
fn bad_net_options_get_one_clear_error() {
    let bin = env!("CARGO_BIN_EXE_matryoshka");
    for (arg, says) in [
        ("slirp", "unknown back-end"),
        ("user,hostfwd=udp::53-:53", "only tcp"),
        ("user,hostfwd=tcp::99999-:80", "bad port"),
        ("tap", "ifname"),
        ("user,mac=01:00:00:00:00:01", "multicast"),
        (
            "tap,ifname=this-name-is-too-long",
            "invalid TAP interface name",
        ),
    ] {
        let o = Command::new(bin)
            .args(["run", "--net", arg])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "--net {arg} succeeded");
        assert!(!err.contains("panicked"), "--net {arg} panicked: {err}");
        assert!(
            err.contains("error") && err.contains(says),
            "--net {arg}: expected an error about {says:?}: {err}"
        );
    }
}
