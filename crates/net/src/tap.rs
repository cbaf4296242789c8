//! A host TAP interface: frames the guest sends appear on the host's
//! `ifname`, and frames routed to it go to the guest.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use crate::{NetBackend, NetError};

/// `_IOW('T', 202, int)` from <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attach to (creating if needed) the TAP interface `ifname`. The caller
    /// configures and brings the host side up (`ip link set NAME up`).
    pub fn open(ifname: &str) -> Result<Tap, NetError> {
        let bytes = ifname.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(NetError::TapName(ifname.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(NetError::TunOpen)?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr`
        // is, on a /dev/net/tun descriptor we own.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut ifr) };
        if r < 0 {
            return Err(NetError::TapCreate {
                ifname: ifname.to_string(),
                err: std::io::Error::last_os_error(),
            });
        }
        let name: Vec<u8> = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(Tap {
            file,
            name: String::from_utf8_lossy(&name).into_owned(),
        })
    }

    /// The interface name the kernel gave us.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        match self.file.write(frame) {
            Ok(_) => Ok(()),
            // Full queue, interface down (EIO) or a frame the kernel rejects
            // (EINVAL): the frame is lost, as on a real link.
            Err(e)
                if e.kind() == ErrorKind::WouldBlock
                    || matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) =>
            {
                Ok(())
            }
            Err(e) => Err(NetError::TapIo(e)),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(NetError::TapIo(e)),
        }
    }

    fn rx_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names() {
        for n in ["", "0123456789abcdef", "a\0b"] {
            assert!(matches!(Tap::open(n), Err(NetError::TapName(_))), "{n:?}");
        }
    }
}
