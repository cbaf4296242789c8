//! User-mode networking: the guest sits on a private 10.0.2.0/24 LAN whose
//! gateway (10.0.2.2) is a smoltcp interface on a back-end thread. Like
//! QEMU's slirp, it needs no privileges:
//!
//! * DHCP: the guest gets 10.0.2.15, router 10.0.2.2, DNS 10.0.2.3.
//! * TCP from the guest: each new SYN starts a non-blocking host `connect()`
//!   to the destination (10.0.2.2 means the host's 127.0.0.1; 10.0.2.3:53 the
//!   host's resolver). Once it succeeds the SYN is handed to a smoltcp socket
//!   listening on exactly that destination (smoltcp's any-IP mode), which
//!   completes the handshake; if it fails the guest gets a RST ("connection
//!   refused"). Bytes are then pumped between the two sockets.
//! * UDP from the guest: relayed through one host UDP socket per flow
//!   (10.0.2.3:53 goes to the resolver from /etc/resolv.conf).
//! * ICMP echo to 10.0.2.2 / 10.0.2.3 is answered by smoltcp.
//! * `hostfwd`: a host listener whose connections become smoltcp connections
//!   from 10.0.2.2 to the guest.
//!
//! One thread polls the host sockets and a wake eventfd; smoltcp's timers set
//! the poll timeout. Queues and socket buffers are bounded; frames from the
//! guest are parsed with smoltcp's checked wire types and dropped if malformed.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr,
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress, IpAddress,
    IpCidr, IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{HostFwd, NetBackend, NetError, MAX_FRAME};

/// The gateway (and host loopback alias).
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS relay.
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The address the DHCP server hands out.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const PREFIX_LEN: u8 = 24;
/// The gateway's MAC (QEMU's slirp uses the same one).
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];

/// Frames waiting for the guest to take them.
const TO_GUEST_MAX: usize = 256;
/// Frames from the guest waiting for the stack thread.
const FROM_GUEST_MAX: usize = 256;
/// Per-connection smoltcp buffers (each direction).
const TCP_BUF: usize = 64 * 1024;
const MAX_TCP: usize = 256;
const MAX_PENDING: usize = 64;
const MAX_UDP: usize = 64;
const UDP_IDLE: Duration = Duration::from_secs(60);
const LEASE_SECS: u32 = 86_400;
/// Largest frame on the guest LAN (1500-byte MTU).
const LAN_FRAME: usize = 1514;

#[derive(Clone, Debug)]
pub struct UserConfig {
    pub hostfwd: Vec<HostFwd>,
    /// Where connections to 10.0.2.2 go on the host.
    pub host_loopback: Ipv4Addr,
    /// Where 10.0.2.3:53 is relayed; `None`: the first nameserver in
    /// /etc/resolv.conf (no DNS relay if there is none).
    pub dns_server: Option<SocketAddr>,
}

impl Default for UserConfig {
    fn default() -> Self {
        UserConfig {
            hostfwd: Vec::new(),
            host_loopback: Ipv4Addr::LOCALHOST,
            dns_server: None,
        }
    }
}

/// The first `nameserver` of /etc/resolv.conf, port 53.
pub fn host_resolver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| w.next()?.parse::<IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// State shared between the device model's thread and the stack thread.
struct Shared {
    to_guest: Mutex<VecDeque<Vec<u8>>>,
    /// Readable while `to_guest` is non-empty (written under its lock).
    rx_event: EventFd,
    from_guest: Mutex<VecDeque<Vec<u8>>>,
    /// Wakes the stack thread: frames from the guest, room in `to_guest`, stop.
    wake: EventFd,
    stop: AtomicBool,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Queue a frame for the guest; dropped when the queue is full.
    fn push_to_guest(&self, frame: Vec<u8>) -> bool {
        let mut q = locked(&self.to_guest);
        if q.len() >= TO_GUEST_MAX {
            return false;
        }
        q.push_back(frame);
        let _ = self.rx_event.write(1);
        true
    }
    fn to_guest_full(&self) -> bool {
        locked(&self.to_guest).len() >= TO_GUEST_MAX
    }
}

/// The user-mode network back-end (see the module docs).
pub struct UserNet {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl UserNet {
    /// Bind the hostfwd listeners and start the stack thread.
    pub fn new(cfg: UserConfig) -> Result<UserNet, NetError> {
        let mut listeners = Vec::new();
        for f in &cfg.hostfwd {
            let l =
                TcpListener::bind(f.host).map_err(|err| NetError::HostFwd { addr: f.host, err })?;
            l.set_nonblocking(true).map_err(NetError::User)?;
            listeners.push((l, f.clone()));
        }
        let shared = Arc::new(Shared {
            to_guest: Mutex::new(VecDeque::new()),
            rx_event: EventFd::new(EFD_NONBLOCK).map_err(NetError::User)?,
            from_guest: Mutex::new(VecDeque::new()),
            wake: EventFd::new(EFD_NONBLOCK).map_err(NetError::User)?,
            stop: AtomicBool::new(false),
        });
        let dns = cfg.dns_server.or_else(host_resolver);
        let mut stack = Stack::new(shared.clone(), listeners, cfg.host_loopback, dns);
        let thread = std::thread::Builder::new()
            .name("net-user".into())
            .spawn(move || stack.run())
            .map_err(NetError::User)?;
        Ok(UserNet {
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for UserNet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl NetBackend for UserNet {
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        if frame.len() < 14 || frame.len() > MAX_FRAME {
            return Ok(());
        }
        let mut q = locked(&self.shared.from_guest);
        if q.len() < FROM_GUEST_MAX {
            q.push_back(frame.to_vec());
            drop(q);
            let _ = self.shared.wake.write(1);
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        let mut q = locked(&self.shared.to_guest);
        loop {
            let was_full = q.len() >= TO_GUEST_MAX;
            let f = q.pop_front();
            if q.is_empty() {
                // Keep the eventfd level-triggered: readable iff frames wait.
                let _ = self.shared.rx_event.read();
            }
            if was_full {
                let _ = self.shared.wake.write(1);
            }
            match f {
                None => return Ok(None),
                Some(f) if f.len() <= buf.len() => {
                    buf[..f.len()].copy_from_slice(&f);
                    return Ok(Some(f.len()));
                }
                Some(_) => continue,
            }
        }
    }

    fn rx_fd(&self) -> RawFd {
        self.shared.rx_event.as_raw_fd()
    }
}

/// smoltcp's view of the guest link: frames we chose to give it, and the
/// shared queue towards the guest.
struct QueueDevice {
    rx: VecDeque<Vec<u8>>,
    shared: Arc<Shared>,
}

struct RxTok(Vec<u8>);
struct TxTok<'a>(&'a Shared);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut v = vec![0u8; len];
        let r = f(&mut v);
        self.0.push_to_guest(v);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(RxTok, TxTok<'_>)> {
        let f = self.rx.pop_front()?;
        Some((RxTok(f), TxTok(&self.shared)))
    }

    fn transmit(&mut self, _t: Instant) -> Option<TxTok<'_>> {
        // Refusing makes smoltcp keep the data queued (backpressure).
        (!self.shared.to_guest_full()).then_some(TxTok(&self.shared))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = LAN_FRAME;
        c
    }
}

/// A guest-initiated flow: guest endpoint → the destination it addressed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FlowKey {
    guest: SocketAddrV4,
    dst: SocketAddrV4,
}

/// A TCP connection between a smoltcp socket and a host socket.
struct Conn {
    handle: SocketHandle,
    host: TcpStream,
    /// Guest-initiated connections; `None` for hostfwd ones.
    flow: Option<FlowKey>,
    /// Port on 10.0.2.2 of a hostfwd connection.
    fwd_port: u16,
    host_eof: bool,
    host_wr_shut: bool,
    /// The host socket reported hang-up/error: poll() would keep reporting
    /// it, so it is no longer polled (it is still read and written).
    hup: bool,
}

/// A host connect() in progress for a guest SYN, which waits here.
struct Pending {
    key: FlowKey,
    sock: socket2::Socket,
    syn: Vec<u8>,
    syn_seq: TcpSeqNumber,
    ready: bool,
}

struct UdpFlow {
    key: FlowKey,
    sock: UdpSocket,
    last: Instant,
}

struct Stack {
    shared: Arc<Shared>,
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: QueueDevice,
    conns: Vec<Conn>,
    pending: Vec<Pending>,
    udp: Vec<UdpFlow>,
    listeners: Vec<(TcpListener, HostFwd)>,
    guest_mac: EthernetAddress,
    loopback: Ipv4Addr,
    dns: Option<SocketAddr>,
    next_port: u16,
    buf: Vec<u8>,
}

fn in_lan(ip: Ipv4Addr) -> bool {
    u32::from(ip) >> (32 - PREFIX_LEN) == u32::from(GATEWAY_IP) >> (32 - PREFIX_LEN)
}

/// Ethernet + IPv4 frame around a payload written by `emit`.
fn ipv4_frame(
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: IpProtocol,
    payload_len: usize,
    emit: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len,
        hop_limit: 64,
    };
    let mut buf = vec![0u8; 14 + ip.buffer_len() + payload_len];
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let mut pkt = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip.emit(&mut pkt, &ChecksumCapabilities::default());
    emit(pkt.payload_mut());
    buf
}

fn udp_frame(
    dst_mac: EthernetAddress,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    data: &[u8],
) -> Vec<u8> {
    ipv4_frame(
        EthernetAddress(GATEWAY_MAC),
        dst_mac,
        *src.ip(),
        *dst.ip(),
        IpProtocol::Udp,
        8 + data.len(),
        |p| {
            UdpRepr {
                src_port: src.port(),
                dst_port: dst.port(),
            }
            .emit(
                &mut UdpPacket::new_unchecked(p),
                &IpAddress::Ipv4(*src.ip()),
                &IpAddress::Ipv4(*dst.ip()),
                data.len(),
                |d| d.copy_from_slice(data),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

fn new_tcp_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUF]),
        tcp::SocketBuffer::new(vec![0; TCP_BUF]),
    );
    // Give up on a guest that stops acknowledging, so sockets are not leaked.
    s.set_timeout(Some(Duration::from_secs(60)));
    s.set_nagle_enabled(false);
    s
}

/// The guest has sent FIN (or the connection is gone).
fn guest_done(s: tcp::State) -> bool {
    use tcp::State::*;
    matches!(s, CloseWait | LastAck | Closing | TimeWait | Closed)
}

enum ReadResult {
    Data,
    Eof,
    Block,
    Fail,
}

impl Stack {
    fn new(
        shared: Arc<Shared>,
        listeners: Vec<(TcpListener, HostFwd)>,
        loopback: Ipv4Addr,
        dns: Option<SocketAddr>,
    ) -> Stack {
        let mut dev = QueueDevice {
            rx: VecDeque::new(),
            shared: shared.clone(),
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        config.random_seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u8(0);
            h.finish()
        };
        let mut iface = Interface::new(config, &mut dev, Instant::now());
        iface.update_ip_addrs(|a| {
            // Capacity is 2 (smoltcp's default): exactly these two.
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(GATEWAY_IP), PREFIX_LEN));
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(DNS_IP), PREFIX_LEN));
        });
        // Accept TCP for any destination: each NATed connection's smoltcp
        // socket listens on the address the guest asked for.
        iface.set_any_ip(true);
        Stack {
            shared,
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            conns: Vec::new(),
            pending: Vec::new(),
            udp: Vec::new(),
            listeners,
            guest_mac: EthernetAddress::BROADCAST,
            loopback,
            dns,
            next_port: 49152,
            buf: vec![0u8; 65536],
        }
    }

    fn run(&mut self) {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        // What each pollfd after the wake fd is.
        let mut tags: Vec<(u8, usize)> = Vec::new();
        const T_PENDING: u8 = 0;
        const T_CONN: u8 = 1;
        const T_OTHER: u8 = 2;
        while !self.shared.stop.load(Ordering::SeqCst) {
            let _ = self.shared.wake.read();
            let frames: Vec<Vec<u8>> = locked(&self.shared.from_guest).drain(..).collect();
            for f in frames {
                self.ingress(f);
            }
            self.finish_connects();
            self.accept_forwards();
            self.udp_from_host();
            for _ in 0..16 {
                self.iface
                    .poll(Instant::now(), &mut self.dev, &mut self.sockets);
                if !self.pump() {
                    break;
                }
            }
            self.reap();

            let now = Instant::now();
            let mut timeout: i32 = match self.iface.poll_delay(now, &self.sockets) {
                Some(d) => d.total_millis().clamp(1, 60_000) as i32,
                None => -1,
            };
            if timeout == 1 && self.shared.to_guest_full() {
                // smoltcp waits for room towards the guest; recv() wakes us.
                timeout = -1;
            }
            if !self.udp.is_empty() && !(0..=5_000).contains(&timeout) {
                timeout = 5_000;
            }

            fds.clear();
            tags.clear();
            let pfd = |fd: RawFd, events: libc::c_short| libc::pollfd {
                fd,
                events,
                revents: 0,
            };
            fds.push(pfd(self.shared.wake.as_raw_fd(), libc::POLLIN));
            for (l, _) in &self.listeners {
                fds.push(pfd(l.as_raw_fd(), libc::POLLIN));
                tags.push((T_OTHER, 0));
            }
            for f in &self.udp {
                fds.push(pfd(f.sock.as_raw_fd(), libc::POLLIN));
                tags.push((T_OTHER, 0));
            }
            for (i, p) in self.pending.iter().enumerate() {
                fds.push(pfd(p.sock.as_raw_fd(), libc::POLLOUT));
                tags.push((T_PENDING, i));
            }
            for (i, c) in self.conns.iter().enumerate() {
                let s = self.sockets.get::<tcp::Socket>(c.handle);
                let mut ev = 0;
                if !c.host_eof && s.can_send() {
                    ev |= libc::POLLIN;
                }
                if !c.host_wr_shut && s.recv_queue() > 0 {
                    ev |= libc::POLLOUT;
                }
                let fd = if ev == 0 || c.hup {
                    -1
                } else {
                    c.host.as_raw_fd()
                };
                fds.push(pfd(fd, ev));
                tags.push((T_CONN, i));
            }
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs
            // whose descriptors stay open for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n <= 0 {
                continue;
            }
            for (fd, &(tag, i)) in fds[1..].iter().zip(&tags) {
                if fd.revents == 0 {
                    continue;
                }
                match tag {
                    T_PENDING => self.pending[i].ready = true,
                    T_CONN if fd.revents & (libc::POLLHUP | libc::POLLERR) != 0 => {
                        self.conns[i].hup = true
                    }
                    _ => {}
                }
            }
        }
    }

    /// Classify a frame from the guest: ours to answer (DHCP, UDP NAT, new
    /// TCP connections) or smoltcp's (ARP, ICMP, established TCP).
    fn ingress(&mut self, frame: Vec<u8>) {
        let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else {
            return;
        };
        let src_mac = eth.src_addr();
        if !src_mac.is_unicast() {
            return;
        }
        self.guest_mac = src_mac;
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                let Ok(p) = ArpPacket::new_checked(eth.payload()) else {
                    return;
                };
                let Ok(ArpRepr::EthernetIpv4 {
                    operation,
                    source_hardware_addr,
                    source_protocol_addr,
                    target_protocol_addr,
                    ..
                }) = ArpRepr::parse(&p)
                else {
                    return;
                };
                // smoltcp learns neighbours from ARP: accept only consistent
                // claims about addresses on this LAN.
                if source_hardware_addr != src_mac || !in_lan(source_protocol_addr) {
                    return;
                }
                // With any-IP smoltcp would claim every address; only the
                // gateway and DNS exist on this LAN.
                if operation == ArpOperation::Request
                    && target_protocol_addr != GATEWAY_IP
                    && target_protocol_addr != DNS_IP
                {
                    return;
                }
                self.dev.rx.push_back(frame);
            }
            EthernetProtocol::Ipv4 => self.ingress_ipv4(frame),
            _ => {}
        }
    }

    fn ingress_ipv4(&mut self, frame: Vec<u8>) {
        let caps = ChecksumCapabilities::default();
        let eth = EthernetFrame::new_unchecked(&frame[..]);
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return;
        };
        let Ok(repr) = Ipv4Repr::parse(&ip, &caps) else {
            return;
        };
        if ip.more_frags() || ip.frag_offset() != 0 {
            return; // fragments: not supported (Linux sets DF on TCP)
        }
        let (src, dst) = (repr.src_addr, repr.dst_addr);
        let payload = ip.payload();
        match repr.next_header {
            IpProtocol::Udp => {
                let Ok(udp) = UdpPacket::new_checked(payload) else {
                    return;
                };
                let Ok(u) = UdpRepr::parse(&udp, &src.into(), &dst.into(), &caps) else {
                    return;
                };
                if u.dst_port == 67 {
                    self.dhcp(udp.payload());
                } else if in_lan(src) {
                    let key = FlowKey {
                        guest: SocketAddrV4::new(src, u.src_port),
                        dst: SocketAddrV4::new(dst, u.dst_port),
                    };
                    let data = udp.payload().to_vec();
                    self.udp_to_host(key, &data);
                }
            }
            IpProtocol::Tcp => {
                if !in_lan(src) {
                    return;
                }
                let Ok(tcp) = TcpPacket::new_checked(payload) else {
                    return;
                };
                if !tcp.verify_checksum(&src.into(), &dst.into()) {
                    return;
                }
                let key = FlowKey {
                    guest: SocketAddrV4::new(src, tcp.src_port()),
                    dst: SocketAddrV4::new(dst, tcp.dst_port()),
                };
                if tcp.syn() && !tcp.ack() && !tcp.rst() {
                    let seq = tcp.seq_number();
                    self.guest_syn(frame, key, seq);
                } else {
                    self.dev.rx.push_back(frame);
                }
            }
            IpProtocol::Icmp if dst == GATEWAY_IP || dst == DNS_IP => {
                self.dev.rx.push_back(frame);
            }
            _ => {}
        }
    }

    /// Where a guest destination leads on the host, if anywhere.
    fn map_dst(&self, dst: SocketAddrV4) -> Option<SocketAddr> {
        let ip = *dst.ip();
        if dst.port() == 0 {
            None
        } else if ip == GATEWAY_IP {
            Some(SocketAddr::new(self.loopback.into(), dst.port()))
        } else if ip == DNS_IP {
            if dst.port() == 53 {
                self.dns
            } else {
                None
            }
        } else if in_lan(ip)
            || ip.is_loopback()
            || ip.is_multicast()
            || ip.is_broadcast()
            || ip.is_unspecified()
        {
            None
        } else {
            Some(SocketAddr::V4(dst))
        }
    }

    fn guest_syn(&mut self, frame: Vec<u8>, key: FlowKey, seq: TcpSeqNumber) {
        if self.conns.iter().any(|c| c.flow == Some(key)) {
            // A retransmitted SYN for a connection smoltcp already has.
            self.dev.rx.push_back(frame);
            return;
        }
        if self.pending.iter().any(|p| p.key == key) {
            return; // still connecting on the host
        }
        let Some(target) = self.map_dst(key.dst) else {
            self.send_rst(key, seq);
            return;
        };
        if self.pending.len() >= MAX_PENDING || self.conns.len() >= MAX_TCP {
            self.send_rst(key, seq);
            return;
        }
        let sock = match socket2::Socket::new(
            socket2::Domain::for_address(target),
            socket2::Type::STREAM,
            None,
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("net-user: socket: {e}");
                self.send_rst(key, seq);
                return;
            }
        };
        let ready = match sock
            .set_nonblocking(true)
            .and_then(|_| sock.connect(&target.into()))
        {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
            Err(_) => {
                self.send_rst(key, seq);
                return;
            }
        };
        self.pending.push(Pending {
            key,
            sock,
            syn: frame,
            syn_seq: seq,
            ready,
        });
    }

    /// Complete host connects that poll() reported: hand the held SYN to a
    /// new smoltcp socket, or refuse the guest's connection.
    fn finish_connects(&mut self) {
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            if !p.ready {
                i += 1;
                continue;
            }
            let failed = !matches!(p.sock.take_error(), Ok(None));
            let connected = !failed && p.sock.peer_addr().is_ok();
            if !failed && !connected {
                p.ready = false; // not yet (spurious wake-up)
                i += 1;
                continue;
            }
            let p = self.pending.swap_remove(i);
            if failed {
                self.send_rst(p.key, p.syn_seq);
                continue;
            }
            let mut s = new_tcp_socket();
            let local = IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(*p.key.dst.ip())),
                port: p.key.dst.port(),
            };
            if s.listen(local).is_err() {
                self.send_rst(p.key, p.syn_seq);
                continue;
            }
            let host: TcpStream = p.sock.into();
            let _ = host.set_nodelay(true);
            let handle = self.sockets.add(s);
            self.dev.rx.push_back(p.syn);
            self.conns.push(Conn {
                handle,
                host,
                flow: Some(p.key),
                fwd_port: 0,
                host_eof: false,
                host_wr_shut: false,
                hup: false,
            });
        }
    }

    /// RST|ACK answering a guest SYN (connection refused).
    fn send_rst(&mut self, key: FlowKey, syn_seq: TcpSeqNumber) {
        let repr = TcpRepr {
            src_port: key.dst.port(),
            dst_port: key.guest.port(),
            control: TcpControl::Rst,
            seq_number: TcpSeqNumber(0),
            ack_number: Some(syn_seq + 1),
            window_len: 0,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let (src, dst) = (*key.dst.ip(), *key.guest.ip());
        let frame = ipv4_frame(
            EthernetAddress(GATEWAY_MAC),
            self.guest_mac,
            src,
            dst,
            IpProtocol::Tcp,
            repr.buffer_len(),
            |p| {
                repr.emit(
                    &mut TcpPacket::new_unchecked(p),
                    &src.into(),
                    &dst.into(),
                    &ChecksumCapabilities::default(),
                )
            },
        );
        self.shared.push_to_guest(frame);
    }

    fn alloc_port(&mut self) -> u16 {
        loop {
            let p = self.next_port;
            self.next_port = if p == u16::MAX { 49152 } else { p + 1 };
            if !self
                .conns
                .iter()
                .any(|c| c.flow.is_none() && c.fwd_port == p)
            {
                return p;
            }
        }
    }

    fn accept_forwards(&mut self) {
        let mut accepted = Vec::new();
        for (l, f) in &self.listeners {
            while let Ok((stream, _)) = l.accept() {
                accepted.push((stream, f.guest));
            }
        }
        for (stream, guest) in accepted {
            if self.conns.len() >= MAX_TCP || stream.set_nonblocking(true).is_err() {
                continue; // dropping the stream closes it
            }
            let _ = stream.set_nodelay(true);
            let port = self.alloc_port();
            let mut s = new_tcp_socket();
            let remote = IpEndpoint::new(IpAddress::Ipv4(*guest.ip()), guest.port());
            let local = IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(GATEWAY_IP)),
                port,
            };
            if s.connect(self.iface.context(), remote, local).is_err() {
                continue;
            }
            let handle = self.sockets.add(s);
            self.conns.push(Conn {
                handle,
                host: stream,
                flow: None,
                fwd_port: port,
                host_eof: false,
                host_wr_shut: false,
                hup: false,
            });
        }
    }

    /// Move bytes between each smoltcp socket and its host socket, within
    /// the room both sides have. Returns whether anything moved.
    fn pump(&mut self) -> bool {
        let mut progress = false;
        for c in &mut self.conns {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            // Guest → host.
            while !c.host_wr_shut && s.can_recv() {
                let host = &c.host;
                let r = s.recv(|buf| match (&*host).write(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(n)) if n > 0 => progress = true,
                    Ok(Err(e)) if e.kind() != ErrorKind::WouldBlock => {
                        s.abort();
                        c.host_wr_shut = true;
                        c.host_eof = true;
                        progress = true;
                    }
                    _ => break,
                }
            }
            if !c.host_wr_shut && s.recv_queue() == 0 && guest_done(s.state()) {
                let _ = c.host.shutdown(Shutdown::Write);
                c.host_wr_shut = true;
                progress = true;
            }
            // Host → guest.
            while !c.host_eof && s.can_send() {
                let host = &c.host;
                let r = s.send(|buf| match (&*host).read(buf) {
                    Ok(0) => (0, ReadResult::Eof),
                    Ok(n) => (n, ReadResult::Data),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => (0, ReadResult::Block),
                    Err(_) => (0, ReadResult::Fail),
                });
                match r {
                    Ok(ReadResult::Data) => progress = true,
                    Ok(ReadResult::Eof) => {
                        c.host_eof = true;
                        s.close();
                        progress = true;
                    }
                    Ok(ReadResult::Fail) => {
                        c.host_eof = true;
                        c.host_wr_shut = true;
                        s.abort();
                        progress = true;
                    }
                    _ => break,
                }
            }
        }
        progress
    }

    /// Drop connections smoltcp has finished with (closing the host side),
    /// and listeners whose held SYN smoltcp refused.
    fn reap(&mut self) {
        let sockets = &mut self.sockets;
        self.conns.retain(|c| {
            let st = sockets.get::<tcp::Socket>(c.handle).state();
            let keep = !matches!(st, tcp::State::Closed | tcp::State::Listen);
            if !keep {
                sockets.remove(c.handle);
            }
            keep
        });
    }

    fn udp_to_host(&mut self, key: FlowKey, data: &[u8]) {
        let now = Instant::now();
        if let Some(f) = self.udp.iter_mut().find(|f| f.key == key) {
            let _ = f.sock.send(data);
            f.last = now;
            return;
        }
        let Some(target) = self.map_dst(key.dst) else {
            return;
        };
        if self.udp.len() >= MAX_UDP {
            // Evict the least recently used flow.
            if let Some(i) = (0..self.udp.len()).min_by_key(|&i| self.udp[i].last) {
                self.udp.swap_remove(i);
            }
        }
        let bind: SocketAddr = match target {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = match UdpSocket::bind(bind)
            .and_then(|s| s.connect(target).map(|_| s))
            .and_then(|s| s.set_nonblocking(true).map(|_| s))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("net-user: UDP socket for {target}: {e}");
                return;
            }
        };
        let _ = sock.send(data);
        self.udp.push(UdpFlow {
            key,
            sock,
            last: now,
        });
    }

    fn udp_from_host(&mut self) {
        let now = Instant::now();
        let mut out = Vec::new();
        for f in &mut self.udp {
            // Bounded per flow per round so one busy flow cannot starve others.
            for _ in 0..32 {
                match f.sock.recv(&mut self.buf) {
                    Ok(n) if 42 + n <= LAN_FRAME => {
                        out.push(udp_frame(
                            self.guest_mac,
                            f.key.dst,
                            f.key.guest,
                            &self.buf[..n],
                        ));
                        f.last = now;
                    }
                    Ok(_) => {} // would need IP fragmentation: dropped
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break, // e.g. ECONNREFUSED from an ICMP error
                }
            }
        }
        for frame in out {
            self.shared.push_to_guest(frame);
        }
        self.udp.retain(|f| now - f.last < UDP_IDLE);
    }

    /// A one-lease DHCP server: everyone gets 10.0.2.15.
    fn dhcp(&mut self, data: &[u8]) {
        let Ok(pkt) = DhcpPacket::new_checked(data) else {
            return;
        };
        let Ok(req) = DhcpRepr::parse(&pkt) else {
            return;
        };
        let (kind, yiaddr) = match req.message_type {
            DhcpMessageType::Discover => (DhcpMessageType::Offer, GUEST_IP),
            DhcpMessageType::Request => {
                if req.server_identifier.is_some_and(|s| s != GATEWAY_IP) {
                    return; // the client chose another server
                }
                let want = req.requested_ip.unwrap_or(req.client_ip);
                if want == GUEST_IP {
                    (DhcpMessageType::Ack, GUEST_IP)
                } else {
                    (DhcpMessageType::Nak, Ipv4Addr::UNSPECIFIED)
                }
            }
            _ => return,
        };
        let nak = kind == DhcpMessageType::Nak;
        let dns = DNS_IP.octets();
        let dns_opt = [DhcpOption {
            kind: 6,
            data: &dns,
        }];
        let reply = DhcpRepr {
            message_type: kind,
            transaction_id: req.transaction_id,
            secs: 0,
            client_hardware_address: req.client_hardware_address,
            client_ip: Ipv4Addr::UNSPECIFIED,
            your_ip: yiaddr,
            server_ip: if nak {
                Ipv4Addr::UNSPECIFIED
            } else {
                GATEWAY_IP
            },
            router: (!nak).then_some(GATEWAY_IP),
            subnet_mask: (!nak).then_some(Ipv4Addr::new(255, 255, 255, 0)),
            relay_agent_ip: req.relay_agent_ip,
            broadcast: false,
            requested_ip: None,
            client_identifier: None,
            server_identifier: Some(GATEWAY_IP),
            parameter_request_list: None,
            dns_servers: None,
            max_size: None,
            lease_duration: (!nak).then_some(LEASE_SECS),
            renew_duration: None,
            rebind_duration: None,
            additional_options: if nak { &[] } else { &dns_opt },
        };
        // BOOTP's minimum message size is 300 bytes; the rest is padding.
        let mut buf = vec![0u8; reply.buffer_len().max(300)];
        if reply
            .emit(&mut DhcpPacket::new_unchecked(&mut buf[..]))
            .is_err()
        {
            return;
        }
        let frame = ipv4_frame(
            EthernetAddress(GATEWAY_MAC),
            EthernetAddress::BROADCAST,
            GATEWAY_IP,
            Ipv4Addr::BROADCAST,
            IpProtocol::Udp,
            8 + buf.len(),
            |p| {
                UdpRepr {
                    src_port: 67,
                    dst_port: 68,
                }
                .emit(
                    &mut UdpPacket::new_unchecked(p),
                    &IpAddress::Ipv4(GATEWAY_IP),
                    &IpAddress::Ipv4(Ipv4Addr::BROADCAST),
                    buf.len(),
                    |d| d.copy_from_slice(&buf),
                    &ChecksumCapabilities::default(),
                )
            },
        );
        self.shared.push_to_guest(frame);
    }
}
