//! Network back-ends for the guest's NIC. A back-end moves whole Ethernet
//! frames (no virtio header) between the guest and the host; it knows nothing
//! of virtio or of the CPU.
//!
//! * [`tap::Tap`]: a host TAP interface (`/dev/net/tun`), needs CAP_NET_ADMIN.
//! * [`user::UserNet`]: unprivileged user-mode networking in the style of
//!   QEMU's slirp, built on smoltcp: a gateway at 10.0.2.2 with a DHCP server,
//!   DNS relay at 10.0.2.3, TCP/UDP NAT to host sockets, and host→guest TCP
//!   port forwarding.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::io::RawFd;
use std::str::FromStr;

pub mod tap;
pub mod user;

/// Largest frame a back-end hands to the guest (64 KiB IP packet + Ethernet
/// header); guest receive buffers of this size never truncate a frame.
pub const MAX_FRAME: usize = 65_550;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open /dev/net/tun: {0} (load the `tun` kernel module)")]
    TunOpen(#[source] std::io::Error),
    #[error("cannot create TAP interface {ifname:?}: {err} (TAP needs root or CAP_NET_ADMIN; use `--net user` for unprivileged networking)")]
    TapCreate {
        ifname: String,
        #[source]
        err: std::io::Error,
    },
    #[error("invalid TAP interface name {0:?} (1 to 15 bytes, no NUL)")]
    TapName(String),
    #[error("TAP I/O: {0}")]
    TapIo(#[source] std::io::Error),
    #[error("cannot listen on {addr} for hostfwd: {err}")]
    HostFwd {
        addr: SocketAddrV4,
        #[source]
        err: std::io::Error,
    },
    #[error("user-mode network: {0}")]
    User(#[source] std::io::Error),
    #[error("invalid --net option {0:?}: {1}")]
    Parse(String, String),
}

/// A source and sink of Ethernet frames for one guest NIC.
///
/// The device model calls `send` for each frame the guest transmits and
/// `recv` while it has guest buffers to fill; it sleeps in poll() on
/// [`rx_fd`](NetBackend::rx_fd) while `recv` has nothing.
pub trait NetBackend: Send {
    /// Hand one frame from the guest to the back-end. Never blocks: a
    /// back-end that cannot take the frame now drops it, as a congested link
    /// would. Malformed frames are dropped, never an error.
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError>;
    /// Copy the next frame for the guest into `buf` and return its length, or
    /// `None` when no frame is ready. `buf` should hold [`MAX_FRAME`] bytes;
    /// a longer frame is dropped (user) or truncated (TAP). An error means
    /// the back-end cannot receive any more.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError>;
    /// A file descriptor that polls readable (level-triggered) while `recv`
    /// may return a frame.
    fn rx_fd(&self) -> RawFd;
}

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address in QEMU's 52:54:00
    /// prefix (bit 1 of the first byte set, bit 0 clear).
    pub fn random() -> MacAddr {
        use std::collections::hash_map::RandomState;
        use std::hash::{BuildHasher, Hasher};
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let r = h.finish().to_le_bytes();
        MacAddr([0x52, 0x54, 0x00, r[0], r[1], r[2]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<MacAddr, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "MAC address {s:?} must be six hex bytes like 52:54:00:12:34:56"
            ));
        }
        let mut m = [0u8; 6];
        for (b, p) in m.iter_mut().zip(parts) {
            *b = u8::from_str_radix(p, 16)
                .map_err(|_| format!("bad hex byte {p:?} in MAC {s:?}"))?;
        }
        if m[0] & 1 != 0 {
            return Err(format!("MAC {s:?} is a multicast address"));
        }
        Ok(MacAddr(m))
    }
}

/// A host→guest TCP port forward (`hostfwd=tcp:[hostaddr]:hostport-[guestaddr]:guestport`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFwd {
    /// Where to listen on the host. An empty host address means 127.0.0.1
    /// (QEMU uses 0.0.0.0; exposing the guest to the network must be explicit).
    pub host: SocketAddrV4,
    /// Where to connect in the guest; empty guest address means the DHCP address.
    pub guest: SocketAddrV4,
}

impl FromStr for HostFwd {
    type Err = String;
    fn from_str(s: &str) -> Result<HostFwd, String> {
        let rest = s.strip_prefix("tcp:").ok_or_else(|| {
            format!(
                "hostfwd {s:?}: only tcp:[hostaddr]:hostport-[guestaddr]:guestport is supported"
            )
        })?;
        let (h, g) = rest
            .split_once('-')
            .ok_or_else(|| format!("hostfwd {s:?}: missing '-' between host and guest parts"))?;
        let parse = |part: &str, default: Ipv4Addr| -> Result<SocketAddrV4, String> {
            let (a, p) = part
                .rsplit_once(':')
                .ok_or_else(|| format!("hostfwd {s:?}: {part:?} is not [addr]:port"))?;
            let addr = if a.is_empty() {
                default
            } else {
                a.parse()
                    .map_err(|_| format!("hostfwd {s:?}: bad IPv4 address {a:?}"))?
            };
            let port: u16 = p
                .parse()
                .map_err(|_| format!("hostfwd {s:?}: bad port {p:?}"))?;
            if port == 0 {
                return Err(format!("hostfwd {s:?}: port 0"));
            }
            Ok(SocketAddrV4::new(addr, port))
        };
        Ok(HostFwd {
            host: parse(h, Ipv4Addr::LOCALHOST)?,
            guest: parse(g, user::GUEST_IP)?,
        })
    }
}

/// Which back-end a NIC uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    User { hostfwd: Vec<HostFwd> },
    Tap { ifname: String },
}

/// One `--net` option: `user[,hostfwd=...][,mac=...]` or `tap,ifname=NAME[,mac=...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    pub backend: BackendSpec,
    pub mac: Option<MacAddr>,
}

impl FromStr for NetSpec {
    type Err = NetError;
    fn from_str(s: &str) -> Result<NetSpec, NetError> {
        let err = |m: String| NetError::Parse(s.to_string(), m);
        let mut parts = s.split(',');
        let kind = parts.next().unwrap_or("");
        let mut mac = None;
        let mut hostfwd = Vec::new();
        let mut ifname = None;
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| err(format!("{p:?} is not key=value")))?;
            match (kind, k) {
                (_, "mac") => mac = Some(v.parse().map_err(err)?),
                ("user", "hostfwd") => hostfwd.push(v.parse().map_err(err)?),
                ("tap", "ifname") => ifname = Some(v.to_string()),
                _ => return Err(err(format!("unknown option {k:?} for {kind:?}"))),
            }
        }
        let backend = match kind {
            "user" => BackendSpec::User { hostfwd },
            "tap" => BackendSpec::Tap {
                ifname: ifname.ok_or_else(|| err("tap needs ifname=NAME".into()))?,
            },
            _ => {
                return Err(err(format!(
                    "unknown back-end {kind:?}: use `user[,hostfwd=tcp::HOSTPORT-:GUESTPORT]` or `tap,ifname=NAME`"
                )))
            }
        };
        Ok(NetSpec { backend, mac })
    }
}

impl NetSpec {
    /// Open the back-end (starts the user-mode stack thread, creates the TAP).
    pub fn open(&self) -> Result<Box<dyn NetBackend>, NetError> {
        Ok(match &self.backend {
            BackendSpec::User { hostfwd } => Box::new(user::UserNet::new(user::UserConfig {
                hostfwd: hostfwd.clone(),
                ..Default::default()
            })?),
            BackendSpec::Tap { ifname } => Box::new(tap::Tap::open(ifname)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_net_specs() {
        let s: NetSpec = "user,hostfwd=tcp::8080-:80,hostfwd=tcp:0.0.0.0:2222-10.0.2.15:22"
            .parse()
            .unwrap();
        assert_eq!(
            s.backend,
            BackendSpec::User {
                hostfwd: vec![
                    HostFwd {
                        host: "127.0.0.1:8080".parse().unwrap(),
                        guest: "10.0.2.15:80".parse().unwrap()
                    },
                    HostFwd {
                        host: "0.0.0.0:2222".parse().unwrap(),
                        guest: "10.0.2.15:22".parse().unwrap()
                    }
                ]
            }
        );
        assert_eq!(s.mac, None);
        let t: NetSpec = "tap,ifname=tap0,mac=52:54:00:aa:bb:cc".parse().unwrap();
        assert_eq!(
            t.backend,
            BackendSpec::Tap {
                ifname: "tap0".into()
            }
        );
        assert_eq!(t.mac, Some(MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc])));
        for bad in [
            "",
            "slirp",
            "tap",
            "user,hostfwd=udp::53-:53",
            "user,hostfwd=tcp::0-:80",
            "user,hostfwd=tcp::80",
            "user,ifname=x",
            "user,mac=01:00:00:00:00:00",
            "user,mac=zz:00:00:00:00:00",
            "user,junk",
        ] {
            assert!(bad.parse::<NetSpec>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn random_mac_is_local_unicast() {
        let m = MacAddr::random();
        assert_eq!(m.0[0] & 3, 2, "{m}");
        assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
    }
}
