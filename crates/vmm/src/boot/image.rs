//! bzImage setup-header parsing and host-side payload decompression.
//!
//! Everything here works on an in-memory copy of the kernel file and
//! bounds-checks every access: the file is untrusted input.

use std::io::Read;

use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::ByteValued;

use super::KernelImageError;

/// Offset of the setup header inside the image (and inside boot_params).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// "HdrS".
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// loadflags bits.
pub const LOADED_HIGH: u8 = 1 << 0;
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// xloadflags: kernel has the 64-bit entry point at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// Oldest boot protocol we accept (cmdline_size, 64-bit capable kernels).
pub const MIN_PROTOCOL: u16 = 0x0206;
/// Protocol that introduced payload_offset/payload_length.
pub const PAYLOAD_PROTOCOL: u16 = 0x0208;
/// Protocol that introduced xloadflags.
pub const XLOADFLAGS_PROTOCOL: u16 = 0x020c;
/// Upper bound on a decompressed vmlinux; guards against decompression
/// bombs in a corrupt or malicious image (Debian's is ~63 MiB).
pub const MAX_VMLINUX_SIZE: usize = 512 << 20;

/// A parsed bzImage: the raw file plus the boot_params whose `hdr` holds
/// the image's setup header.
pub struct BzImage<'a> {
    pub image: &'a [u8],
    pub params: boot_params,
    /// Size in bytes of the real-mode setup part ((setup_sects + 1) * 512).
    pub setup_size: usize,
}

/// Compression of the embedded vmlinux, from the payload's magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Gzip,
    Bzip2,
    Lzma,
    Lzo,
    Lz4,
    Zstd,
    /// Payload is an uncompressed ELF (CONFIG_KERNEL_UNCOMPRESSED).
    None,
    Unknown,
}

impl Compression {
    pub fn detect(payload: &[u8]) -> Self {
        let starts = |m: &[u8]| payload.starts_with(m);
        if starts(b"\xfd7zXZ\0") {
            Compression::Xz
        } else if starts(b"\x1f\x8b") {
            Compression::Gzip
        } else if starts(b"BZh") {
            Compression::Bzip2
        } else if starts(b"\x5d\x00\x00") {
            Compression::Lzma
        } else if starts(b"\x89LZO") {
            Compression::Lzo
        } else if starts(b"\x02\x21\x4c\x18") {
            Compression::Lz4
        } else if starts(b"\x28\xb5\x2f\xfd") {
            Compression::Zstd
        } else if starts(b"\x7fELF") {
            Compression::None
        } else {
            Compression::Unknown
        }
    }
}

fn read_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

impl<'a> BzImage<'a> {
    /// Validate the setup header and copy it into a fresh boot_params.
    pub fn parse(image: &'a [u8]) -> Result<Self, KernelImageError> {
        let magic = read_u32(image, 0x202).ok_or(KernelImageError::Truncated {
            len: image.len(),
            what: "setup header",
        })?;
        if magic != HDRS_MAGIC {
            return Err(KernelImageError::NotBzImage);
        }
        let version = read_u16(image, 0x206).ok_or(KernelImageError::Truncated {
            len: image.len(),
            what: "setup header",
        })?;
        if version < MIN_PROTOCOL {
            return Err(KernelImageError::ProtocolTooOld(version));
        }

        // The header ends at 0x202 + the byte at 0x201 (the jump offset);
        // copy no more than our setup_header struct has room for.
        let jump = *image.get(0x201).ok_or(KernelImageError::Truncated {
            len: image.len(),
            what: "setup header",
        })? as usize;
        let hdr_end = (0x202 + jump).min(SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>());
        let hdr_bytes =
            image
                .get(SETUP_HEADER_OFFSET..hdr_end)
                .ok_or(KernelImageError::Truncated {
                    len: image.len(),
                    what: "setup header",
                })?;
        let mut params = boot_params::default();
        params.as_mut_slice()[SETUP_HEADER_OFFSET..hdr_end].copy_from_slice(hdr_bytes);

        if params.hdr.loadflags & LOADED_HIGH == 0 {
            // A zImage loads at 0x10000; nobody builds those any more.
            return Err(KernelImageError::NotBzImage);
        }
        let setup_sects = match params.hdr.setup_sects {
            0 => 4, // historical meaning of 0
            n => n as usize,
        };
        let setup_size = (setup_sects + 1) * 512;
        if setup_size >= image.len() {
            return Err(KernelImageError::Truncated {
                len: image.len(),
                what: "protected-mode kernel",
            });
        }
        Ok(BzImage {
            image,
            params,
            setup_size,
        })
    }

    pub fn version(&self) -> u16 {
        self.params.hdr.version
    }

    /// The 32/64-bit protected-mode part, loaded at code32_start.
    pub fn protected_mode_code(&self) -> &'a [u8] {
        // setup_size < image.len() was checked in parse().
        &self.image[self.setup_size..]
    }

    /// Requires a kernel that advertises the 64-bit entry point.
    pub fn check_64bit_entry(&self) -> Result<(), KernelImageError> {
        let version = self.version();
        if version < XLOADFLAGS_PROTOCOL || self.params.hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(KernelImageError::No64BitEntry(version));
        }
        Ok(())
    }

    /// Memory the kernel needs from its load address while it boots
    /// (decompressed image + bss + brk), per the header's init_size.
    pub fn init_size(&self) -> u64 {
        if self.version() >= 0x020a {
            self.params.hdr.init_size as u64
        } else {
            0
        }
    }

    /// Physical address the kernel prefers to run at (LOAD_PHYSICAL_ADDR).
    pub fn pref_address(&self) -> u64 {
        if self.version() >= 0x020a && self.params.hdr.pref_address != 0 {
            self.params.hdr.pref_address
        } else {
            0x100_0000
        }
    }

    /// The compressed vmlinux embedded in the protected-mode code.
    pub fn payload(&self) -> Result<&'a [u8], KernelImageError> {
        if self.version() < PAYLOAD_PROTOCOL {
            return Err(KernelImageError::NoPayloadInfo(self.version()));
        }
        let off = self.params.hdr.payload_offset as usize;
        let len = self.params.hdr.payload_length as usize;
        let code = self.protected_mode_code();
        off.checked_add(len)
            .and_then(|end| code.get(off..end))
            .filter(|p| !p.is_empty())
            .ok_or(KernelImageError::PayloadOutOfBounds {
                offset: off as u64,
                len: len as u64,
                avail: code.len() as u64,
            })
    }

    /// Decompress the payload on the host, giving the vmlinux ELF image.
    pub fn decompress_vmlinux(&self) -> Result<Vmlinux, KernelImageError> {
        let payload = self.payload()?;
        match Compression::detect(payload) {
            Compression::Xz => {
                if let Some(v) = cache::load(payload) {
                    return Ok(v);
                }
                let v = decompress_xz(payload)?;
                cache::store(payload, &v);
                Ok(Vmlinux::Owned(v))
            }
            Compression::None => Ok(Vmlinux::Owned(payload.to_vec())),
            other => Err(KernelImageError::UnsupportedCompression(other)),
        }
    }
}

/// A decompressed kernel: decoded now, or the cached copy mapped from the
/// host's page cache (no 66 MB of fresh memory to fault in and fill).
pub enum Vmlinux {
    Owned(Vec<u8>),
    Mapped {
        map: memmap2::Mmap,
        len: usize,
        file: std::fs::File,
    },
}

impl Vmlinux {
    /// The file whose start holds these bytes, when they are mapped.
    pub fn file(&self) -> Option<&std::fs::File> {
        match self {
            Vmlinux::Owned(_) => None,
            Vmlinux::Mapped { file, .. } => Some(file),
        }
    }
}

impl std::ops::Deref for Vmlinux {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Vmlinux::Owned(v) => v,
            Vmlinux::Mapped { map, len, .. } => &map[..*len],
        }
    }
}

/// Decode a kernel XZ payload. Linux appends the decompressed size as a
/// little-endian u32 after the XZ stream; it's only used as a size hint
/// and sanity check (the decoder stops at the end of the first stream).
pub fn decompress_xz(payload: &[u8]) -> Result<Vec<u8>, KernelImageError> {
    let hint = payload
        .len()
        .checked_sub(4)
        .and_then(|at| read_u32(payload, at))
        .map(|n| n as usize)
        .filter(|&n| n <= MAX_VMLINUX_SIZE);
    let mut out = Vec::with_capacity(hint.unwrap_or(0));
    let reader = lzma_rust2::XzReader::new(payload, false);
    // Read one byte past the cap so an oversized result is detectable.
    reader
        .take(MAX_VMLINUX_SIZE as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| KernelImageError::Decompress(e.to_string()))?;
    if out.len() > MAX_VMLINUX_SIZE {
        return Err(KernelImageError::Decompress(format!(
            "decompressed kernel exceeds {MAX_VMLINUX_SIZE} bytes"
        )));
    }
    if let Some(expected) = hint {
        if expected != out.len() {
            return Err(KernelImageError::Decompress(format!(
                "decompressed {} bytes but the image says {expected}",
                out.len()
            )));
        }
    }
    Ok(out)
}

/// Host cache of decompressed kernels (decompressing a distribution kernel
/// costs about half a second). Entries are keyed by a hash of the
/// compressed payload and carry a hash of their content, checked on load;
/// any problem just means decompressing again.
/// Location: `$MATRYOSHKA_CACHE_DIR`, else `$XDG_CACHE_HOME/matryoshka`, else
/// `~/.cache/matryoshka`. `MATRYOSHKA_CACHE_DIR=off` disables it.
mod cache {
    use std::path::{Path, PathBuf};

    fn dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("MATRYOSHKA_CACHE_DIR") {
            return (d != "off").then(|| PathBuf::from(d));
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return Some(PathBuf::from(d).join("matryoshka"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/matryoshka"))
    }

    /// Keys the cache and checks a cached file for corruption; not a
    /// defence against a forged file (whoever can write the cache can run
    /// as the user anyway). The structure of XXH64 (four lanes of
    /// multiply-rotate-multiply rounds over 32-byte chunks, then an
    /// avalanche): about 10 GB/s, where SipHash took 40 ms of every boot
    /// on the 66 MB vmlinux.
    fn hash(b: &[u8]) -> u64 {
        const P1: u64 = 0x9e37_79b1_85eb_ca87;
        const P2: u64 = 0xc2b2_ae3d_27d4_eb4f;
        const P3: u64 = 0x1656_67b1_9e37_79f9;
        let round = |acc: u64, w: u64| {
            acc.wrapping_add(w.wrapping_mul(P2))
                .rotate_left(31)
                .wrapping_mul(P1)
        };
        let word = |c: &[u8], i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&c[8 * i..8 * i + 8]);
            u64::from_le_bytes(x)
        };
        let mut h = [P1.wrapping_add(P2), P2, 0, P1.wrapping_neg()];
        let mut chunks = b.chunks_exact(32);
        for c in &mut chunks {
            for (i, h) in h.iter_mut().enumerate() {
                *h = round(*h, word(c, i));
            }
        }
        // The tail, zero-padded, marked with its length so that padding
        // and data differ.
        let mut tail = [0u8; 32];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        tail[31] ^= rest.len() as u8 | 0x80;
        for (i, h) in h.iter_mut().enumerate() {
            *h = round(*h, word(&tail, i));
        }
        let mut out = (b.len() as u64).wrapping_mul(P3);
        for v in h {
            out = (out ^ round(0, v)).wrapping_mul(P1).wrapping_add(P3);
        }
        out ^= out >> 33;
        out = out.wrapping_mul(P2);
        out ^= out >> 29;
        out = out.wrapping_mul(P3);
        out ^ out >> 32
    }

    fn path(dir: &Path, payload: &[u8]) -> PathBuf {
        dir.join(format!(
            "vmlinux-{:x}-{:016x}",
            payload.len(),
            hash(payload)
        ))
    }

    pub fn load(payload: &[u8]) -> Option<super::Vmlinux> {
        load_from(&dir()?, payload)
    }

    pub fn store(payload: &[u8], vmlinux: &[u8]) {
        if let Some(d) = dir() {
            store_in(&d, payload, vmlinux);
        }
    }

    fn load_from(dir: &Path, payload: &[u8]) -> Option<super::Vmlinux> {
        let f = std::fs::File::open(path(dir, payload)).ok()?;
        // SAFETY: a read-only mapping of a cache file. `store` never
        // writes a published file in place (it renames a finished
        // temporary over it), so the bytes cannot change under the map;
        // they are hashed before use. The loader maps the same file into
        // guest RAM (copy-on-write), which relies on that too. Populated
        // at once: the hash reads every page.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&f) }.ok()?;
        let len = map.len().checked_sub(8)?;
        let want = u64::from_le_bytes(map[len..].try_into().ok()?);
        (hash(&map[..len]) == want).then_some(super::Vmlinux::Mapped { map, len, file: f })
    }

    fn store_in(dir: &Path, payload: &[u8], vmlinux: &[u8]) {
        let p = path(dir, payload);
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let r = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(p.parent().unwrap_or(&p))?;
            let mut data = Vec::with_capacity(vmlinux.len() + 8);
            data.extend_from_slice(vmlinux);
            data.extend_from_slice(&hash(vmlinux).to_le_bytes());
            std::fs::write(&tmp, &data)?;
            std::fs::rename(&tmp, &p)?;
            // A cached kernel of the same compressed size under another
            // hash is this kernel cached by an older hash function (a
            // different kernel of exactly the same size is unlikely):
            // remove it so the cache does not grow by 66 MB per change.
            if let (Some(dir), Some(name)) = (p.parent(), p.file_name()) {
                let prefix = format!("vmlinux-{:x}-", payload.len());
                for e in std::fs::read_dir(dir)?.flatten() {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    if n.starts_with(&prefix)
                        && !n.contains(".tmp")
                        && *n != *name.to_string_lossy()
                    {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(error = %e, "not caching the decompressed kernel");
        }
    }

    #[cfg(test)]
    mod tests {
        use super::{hash, load_from, path, store_in};

        /// A stored kernel comes back mapped and byte for byte; a cached
        /// file changed in place or cut short is refused (the caller then
        /// decompresses again).
        #[test]
        fn cached_kernels_come_back_mapped_and_damaged_ones_are_refused() {
            let dir = std::env::temp_dir().join(format!("mat-cache-test-{}", std::process::id()));
            let payload = b"compressed kernel";
            let vmlinux: Vec<u8> = (0..100_000u32).map(|i| (i ^ i >> 9) as u8).collect();
            assert!(load_from(&dir, payload).is_none(), "empty cache");
            store_in(&dir, payload, &vmlinux);
            let got = load_from(&dir, payload).expect("cached");
            assert!(matches!(got, super::super::Vmlinux::Mapped { .. }));
            assert_eq!(&got[..], &vmlinux[..]);
            drop(got);
            let file = path(&dir, payload);
            let mut bytes = std::fs::read(&file).unwrap();
            bytes[4321] ^= 0x10;
            std::fs::write(&file, &bytes).unwrap();
            assert!(load_from(&dir, payload).is_none(), "flipped bit");
            bytes[4321] ^= 0x10;
            std::fs::write(&file, &bytes[..bytes.len() - 1]).unwrap();
            assert!(load_from(&dir, payload).is_none(), "truncated");
            std::fs::write(&file, &bytes).unwrap();
            assert!(load_from(&dir, payload).is_some(), "repaired");
            std::fs::remove_dir_all(&dir).unwrap();
        }

        /// A corrupted or truncated cache file must fail the check: every
        /// single-bit flip, in the 32-byte chunks and in the tail, and every
        /// truncation changes the hash.
        #[test]
        fn hash_sees_every_bit_flip_and_truncation() {
            let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 13) as u8).collect();
            let h = hash(&data);
            let mut seen = std::collections::HashSet::new();
            for pos in 0..data.len() {
                for bit in 0..8 {
                    let mut d = data.clone();
                    d[pos] ^= 1 << bit;
                    assert!(seen.insert(hash(&d)), "collision at byte {pos} bit {bit}");
                }
            }
            for len in 0..data.len() {
                assert!(seen.insert(hash(&data[..len])), "collision at length {len}");
            }
            assert!(!seen.contains(&h));
            assert_ne!(hash(&[0u8; 31]), hash(&[0u8; 32]));
        }
    }
}
