//! The user-mode back-end driven by a second smoltcp interface acting as the
//! guest, exchanging frames in-process through the `NetBackend` trait.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration as StdDuration, Instant as StdInstant};

use net::user::{UserConfig, UserNet, DNS_IP, GATEWAY_IP, GUEST_IP};
use net::{HostFwd, NetBackend, MAX_FRAME};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{dhcpv4, icmp, tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, IpEndpoint,
};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The guest's NIC: frames go straight to/from the back-end.
struct Wire {
    net: UserNet,
    buf: Vec<u8>,
    /// Frames the guest sent (for the malformed-frame test to mutate).
    sent: Vec<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut UserNet, &'a mut Vec<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}
impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut v = vec![0; len];
        let r = f(&mut v);
        self.0.send(&v).unwrap();
        if self.1.len() < 64 {
            self.1.push(v);
        }
        r
    }
}

impl Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _t: Instant) -> Option<(Rx, Tx<'_>)> {
        let n = self.net.recv(&mut self.buf).unwrap()?;
        Some((
            Rx(self.buf[..n].to_vec()),
            Tx(&mut self.net, &mut self.sent),
        ))
    }
    fn transmit(&mut self, _t: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.net, &mut self.sent))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

struct Guest {
    iface: Interface,
    sockets: SocketSet<'static>,
    wire: Wire,
}

impl Guest {
    fn new(cfg: UserConfig, static_ip: bool) -> Guest {
        let net = UserNet::new(cfg).expect("start user-mode network");
        let mut wire = Wire {
            net,
            buf: vec![0; MAX_FRAME],
            sent: Vec::new(),
        };
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
        let mut iface = Interface::new(config, &mut wire, Instant::now());
        if static_ip {
            iface.update_ip_addrs(|a| {
                a.push(IpCidr::new(IpAddress::Ipv4(GUEST_IP), 24)).unwrap();
            });
            iface
                .routes_mut()
                .add_default_ipv4_route(GATEWAY_IP)
                .unwrap();
        }
        Guest {
            iface,
            sockets: SocketSet::new(Vec::new()),
            wire,
        }
    }

    /// Run the guest stack once, then sleep until the back-end has a frame
    /// or a guest timer is due (at most `max`).
    fn step(&mut self, max: StdDuration) {
        self.iface
            .poll(Instant::now(), &mut self.wire, &mut self.sockets);
        let wait = self
            .iface
            .poll_delay(Instant::now(), &self.sockets)
            .map(|d| StdDuration::from_micros(d.total_micros()))
            .unwrap_or(max)
            .min(max);
        let mut pfd = libc::pollfd {
            fd: self.wire.net.rx_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as i32) };
    }

    /// Step until `done` holds, failing after `secs`.
    fn until(&mut self, secs: u64, what: &str, mut done: impl FnMut(&mut Guest) -> bool) {
        let t0 = StdInstant::now();
        while !done(self) {
            assert!(
                t0.elapsed() < StdDuration::from_secs(secs),
                "timed out waiting for {what}"
            );
            self.step(StdDuration::from_millis(50));
        }
    }

    fn tcp(&mut self) -> SocketHandle {
        let s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        self.sockets.add(s)
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Connect to `remote` and return the socket once established (or
    /// whatever state it ended in after `secs`).
    fn connect(&mut self, remote: (Ipv4Addr, u16), local_port: u16) -> SocketHandle {
        let h = self.tcp();
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(
                cx,
                IpEndpoint::new(IpAddress::Ipv4(remote.0), remote.1),
                local_port,
            )
            .unwrap();
        h
    }

    fn recv_all(&mut self, h: SocketHandle, want: usize, secs: u64) -> Vec<u8> {
        let mut got = Vec::new();
        self.until(secs, "guest TCP data", |g| {
            let s = g.sock(h);
            while s.can_recv() {
                s.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                })
                .unwrap();
            }
            got.len() >= want || !s.may_recv()
        });
        got
    }

    fn send_all(&mut self, h: SocketHandle, data: &[u8], secs: u64) {
        let mut off = 0;
        self.until(secs, "guest TCP send", |g| {
            let s = g.sock(h);
            if s.can_send() {
                off += s.send_slice(&data[off..]).unwrap();
            }
            off == data.len()
        });
    }
}

fn static_guest() -> Guest {
    Guest::new(UserConfig::default(), true)
}

#[test]
fn dhcp_lease() {
    let mut g = Guest::new(UserConfig::default(), false);
    let dh = g.sockets.add(dhcpv4::Socket::new());
    let mut lease = None;
    g.until(10, "a DHCP lease", |g| {
        if let Some(dhcpv4::Event::Configured(c)) = g.sockets.get_mut::<dhcpv4::Socket>(dh).poll() {
            lease = Some((c.address, c.router, c.dns_servers.to_vec()));
        }
        lease.is_some()
    });
    let (addr, router, dns) = lease.unwrap();
    assert_eq!(addr, smoltcp::wire::Ipv4Cidr::new(GUEST_IP, 24));
    assert_eq!(router, Some(GATEWAY_IP));
    assert_eq!(dns, vec![DNS_IP]);
}

#[test]
fn guest_tcp_to_host_loopback_both_ways() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // 300 KB each way: several times the socket buffers, so flow control
    // (full buffers on both sides) is exercised.
    let up: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let down: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 241) as u8).collect();
    let (up2, down2) = (up.clone(), down.clone());
    let server = std::thread::spawn(move || {
        let (mut c, peer) = listener.accept().unwrap();
        assert!(peer.ip().is_loopback());
        let w = {
            let mut c = c.try_clone().unwrap();
            std::thread::spawn(move || {
                c.write_all(&down2).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        w.join().unwrap();
        assert!(got == up2, "host received {} bytes, wrong data", got.len());
    });

    let mut g = static_guest();
    let h = g.connect((GATEWAY_IP, port), 40000);
    g.until(10, "TCP established", |g| g.sock(h).may_send());
    // Interleave sending and receiving so neither side deadlocks on full buffers.
    let mut off = 0;
    let mut got = Vec::new();
    g.until(30, "TCP exchange", |g| {
        let s = g.sock(h);
        if off < up.len() && s.can_send() {
            off += s.send_slice(&up[off..]).unwrap();
            if off == up.len() {
                s.close();
            }
        }
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        off == up.len() && !s.may_recv()
    });
    assert!(
        got == down,
        "guest received {} bytes, wrong data",
        got.len()
    );
    g.until(10, "host side done", |_| server.is_finished());
    server.join().unwrap();
}

#[test]
fn guest_tcp_to_closed_port_is_refused() {
    // Find a port nobody listens on.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut g = static_guest();
    let h = g.connect((GATEWAY_IP, port), 40001);
    g.until(10, "RST", |g| g.sock(h).state() == tcp::State::Closed);
    // The DNS address has nothing but port 53.
    let h = g.connect((DNS_IP, 80), 40002);
    g.until(10, "RST from 10.0.2.3:80", |g| {
        g.sock(h).state() == tcp::State::Closed
    });
}

#[test]
fn hostfwd_reaches_guest_listener() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = UserConfig {
        hostfwd: vec![format!("tcp::{port}-:80").parse::<HostFwd>().unwrap()],
        ..Default::default()
    };
    let mut g = Guest::new(cfg, true);
    let h = g.tcp();
    g.sock(h).listen(80).unwrap();
    let client = std::thread::spawn(move || {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(StdDuration::from_secs(20)))
            .unwrap();
        c.write_all(b"ping from host").unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        got
    });
    g.until(10, "forwarded connection", |g| g.sock(h).may_recv());
    let remote = g.sock(h).remote_endpoint().unwrap();
    assert_eq!(remote.addr, IpAddress::Ipv4(GATEWAY_IP));
    let got = g.recv_all(h, 14, 10);
    assert_eq!(got, b"ping from host");
    g.send_all(h, b"pong from guest", 10);
    g.sock(h).close();
    g.until(10, "host client done", |_| client.is_finished());
    assert_eq!(client.join().unwrap(), b"pong from guest");
}

#[test]
fn udp_and_dns_relay() {
    // A fake DNS server and a UDP echo service on the host loopback.
    let dns = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns_addr = dns.local_addr().unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    for s in [dns, echo] {
        std::thread::spawn(move || {
            let mut b = [0u8; 1500];
            s.set_read_timeout(Some(StdDuration::from_secs(20)))
                .unwrap();
            while let Ok((n, from)) = s.recv_from(&mut b) {
                let mut r = b"re:".to_vec();
                r.extend_from_slice(&b[..n]);
                s.send_to(&r, from).unwrap();
            }
        });
    }
    let cfg = UserConfig {
        dns_server: Some(dns_addr),
        ..Default::default()
    };
    let mut g = Guest::new(cfg, true);
    let u = g.sockets.add(udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
    ));
    g.sockets.get_mut::<udp::Socket>(u).bind(5353).unwrap();
    for (dst, msg) in [
        (IpEndpoint::new(IpAddress::Ipv4(DNS_IP), 53), &b"query"[..]),
        (
            IpEndpoint::new(IpAddress::Ipv4(GATEWAY_IP), echo_port),
            b"hello",
        ),
    ] {
        g.sockets
            .get_mut::<udp::Socket>(u)
            .send_slice(msg, dst)
            .unwrap();
        let mut reply = None;
        g.until(10, "UDP reply", |g| {
            if let Ok((data, meta)) = g.sockets.get_mut::<udp::Socket>(u).recv() {
                reply = Some((data.to_vec(), meta.endpoint));
            }
            reply.is_some()
        });
        let (data, from) = reply.unwrap();
        assert_eq!(from, dst, "reply must come from the address the guest used");
        assert_eq!(data, [b"re:", msg].concat());
    }
}

#[test]
fn gateway_answers_ping_and_other_hosts_do_not() {
    let mut g = static_guest();
    let h = g.sockets.add(icmp::Socket::new(
        icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0; 1024]),
        icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0; 1024]),
    ));
    g.sockets
        .get_mut::<icmp::Socket>(h)
        .bind(icmp::Endpoint::Ident(0x1234))
        .unwrap();
    let ping = |g: &mut Guest, dst: Ipv4Addr, seq: u16| {
        let repr = Icmpv4Repr::EchoRequest {
            ident: 0x1234,
            seq_no: seq,
            data: b"matryoshka",
        };
        let s = g.sockets.get_mut::<icmp::Socket>(h);
        let buf = s.send(repr.buffer_len(), IpAddress::Ipv4(dst)).unwrap();
        repr.emit(
            &mut Icmpv4Packet::new_unchecked(buf),
            &smoltcp::phy::ChecksumCapabilities::default(),
        );
    };
    let reply = |g: &mut Guest| -> Option<(IpAddress, u16)> {
        let s = g.sockets.get_mut::<icmp::Socket>(h);
        let (data, from) = s.recv().ok()?;
        let p = Icmpv4Packet::new_checked(data).ok()?;
        match Icmpv4Repr::parse(&p, &Default::default()).ok()? {
            Icmpv4Repr::EchoReply { seq_no, .. } => Some((from, seq_no)),
            _ => None,
        }
    };
    // An outside address first: nothing answers (no ICMP NAT).
    ping(&mut g, Ipv4Addr::new(192, 0, 2, 1), 1);
    let t0 = StdInstant::now();
    while t0.elapsed() < StdDuration::from_millis(500) {
        g.step(StdDuration::from_millis(20));
        assert_eq!(reply(&mut g), None);
    }
    ping(&mut g, GATEWAY_IP, 2);
    let mut got = None;
    g.until(10, "echo reply", |g| {
        got = reply(g);
        got.is_some()
    });
    assert_eq!(got, Some((IpAddress::Ipv4(GATEWAY_IP), 2)));
}

#[test]
fn survives_malformed_frames() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut g = static_guest();
    // Collect real frames (ARP, SYN, ...) from a refused connection attempt
    // and a DHCP discover, then feed truncated and corrupted variants.
    let dh = g.sockets.add(dhcpv4::Socket::new());
    let h = g.connect((GATEWAY_IP, port), 40100);
    g.until(10, "connection", |g| g.sock(h).may_send());
    g.until(10, "DHCP discover", |g| g.wire.sent.len() >= 4);
    g.sockets.remove(dh);
    let samples = g.wire.sent.clone();
    let mut rng = 0x1234_5678u32;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        rng
    };
    let mut count = 0;
    for f in &samples {
        for cut in 0..f.len() {
            g.wire.net.send(&f[..cut]).unwrap();
            count += 1;
        }
        for _ in 0..200 {
            let mut m = f.clone();
            for _ in 0..1 + next() % 4 {
                let i = next() as usize % m.len();
                m[i] = next() as u8;
            }
            g.wire.net.send(&m).unwrap();
            count += 1;
        }
        // Keep the queues moving.
        for _ in 0..5 {
            g.step(StdDuration::from_millis(1));
        }
    }
    for len in [0, 1, 13, 14, 15, 60, 1514, 9000, MAX_FRAME, MAX_FRAME + 1] {
        let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        g.wire.net.send(&junk).unwrap();
        count += 1;
    }
    assert!(count > 1000);
    // Still working: the established connection carries data.
    let host = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut b = [0u8; 11];
        c.set_read_timeout(Some(StdDuration::from_secs(10)))
            .unwrap();
        c.read_exact(&mut b).unwrap();
        c.write_all(b"yes").unwrap();
        b
    });
    g.send_all(h, b"still alive", 10);
    assert_eq!(g.recv_all(h, 3, 10), b"yes");
    assert_eq!(&host.join().unwrap(), b"still alive");
}
