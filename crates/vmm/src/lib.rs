//! The VMM: wires guest memory, devices, vCPUs and boot together.

pub mod boot;
pub mod console;
pub mod machine;
pub mod pci_devices;
pub mod vcpu;

pub use machine::{run, VmConfig, MAX_CPUS};
pub use pci_devices::{default_disk_cmdline, VirtioConfig};
pub use virtio;

/// Parse a memory size such as `512M`, `1G`, `2048K` or a plain number of MiB.
pub fn parse_mem_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty memory size".into());
    }
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some(c) if c.is_ascii_digit() => (t, 1 << 20),
        _ => {
            return Err(format!(
                "invalid memory size '{s}': use a number with K, M or G (e.g. 512M)"
            ))
        }
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid memory size '{s}': use a number with K, M or G (e.g. 512M)")
    })?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("memory size '{s}' is too large"))?;
    if bytes < (64 << 20) {
        return Err(format!(
            "memory size '{s}' is too small: at least 64M is needed"
        ));
    }
    if bytes > (64 << 30) {
        return Err(format!("memory size '{s}' is too large: at most 64G"));
    }
    if bytes % 4096 != 0 {
        return Err(format!("memory size '{s}' must be a multiple of 4K"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::parse_mem_size;

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem_size("512M"), Ok(512 << 20));
        assert_eq!(parse_mem_size("1g"), Ok(1 << 30));
        assert_eq!(parse_mem_size("256"), Ok(256 << 20));
        assert!(parse_mem_size("12Q").is_err());
        assert!(parse_mem_size("1M").is_err());
        assert!(parse_mem_size("99999999999G").is_err());
        assert!(parse_mem_size("").is_err());
    }
}
