//! Integration test: the default guest with virtio-blk disks (raw, a qcow2
//! overlay on a qcow2 base made by qemu-img, a read-only raw disk) and
//! virtio-rng. The guest reads bytes the test wrote into the images, writes
//! with fsync, and the test SIGKILLs the VMM as soon as the guest reports
//! that its writes are synced: what the guest synced must be in the files
//! (for qcow2: `qemu-img check` clean, data visible via `qemu-img convert`,
//! the shared base untouched).
//!
//! Needs guest/out/ (built by guest/build.sh when missing) and qemu-img
//! (`apt-get install qemu-utils`). Run with --release.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{collect_output, ensure_guest};

fn qemu_img(args: &[&str]) -> String {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required for this test: apt-get install qemu-utils");
    assert!(
        o.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write_at(path: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// Runs the VM until `marker` appears in its output (then SIGKILLs it) or
/// it exits; returns the output.
fn run_until(args: &[String], marker: &str, timeout: Duration) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_matryoshka"))
        .arg("run")
        .arg("--no-reboot")
        .args(args)
        .args(common::test_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn matryoshka");
    let (out, readers) = collect_output(&mut child);
    let start = Instant::now();
    loop {
        if out.lock().unwrap().contains(marker) {
            // SIGKILL: no chance for the VMM to flush anything itself.
            child.kill().unwrap();
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timeout; output:\n{}", out.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.wait();
    for r in readers {
        let _ = r.join();
    }
    let s = out.lock().unwrap().clone();
    s
}

#[test]
fn virtio_blk_raw_qcow2_ro_and_rng() {
    let guest = ensure_guest();
    let dir = std::env::temp_dir().join(format!("mat-virtio-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("disk.raw");
    let ro = dir.join("ro.raw");
    let base_raw = dir.join("base.raw");
    let base = dir.join("base.qcow2");
    let overlay = dir.join("overlay.qcow2");
    for p in [&raw, &ro, &base_raw] {
        std::fs::File::create(p).unwrap().set_len(8 << 20).unwrap();
    }
    // Per-run 16-byte markers (the guest reads 16 bytes) so a stale image
    // can never pass.
    let tag = format!("{:08x}", std::process::id() ^ 0x5a5a_1234);
    let m_raw = format!("RAW-{tag}-001");
    let m_base = format!("BASE-{tag}-02");
    let m_ro = format!("RO-{tag}-0003");
    write_at(&raw, 0, m_raw.as_bytes());
    write_at(&base_raw, 0, m_base.as_bytes());
    write_at(&ro, 0, m_ro.as_bytes());
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        base_raw.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        overlay.to_str().unwrap(),
    ]);
    let ro_before = std::fs::read(&ro).unwrap();

    let w_raw = format!("GUESTRAW-{tag}");
    let w_qcow = format!("GUESTQCOW-{tag}");
    let cmd = format!(
        "for d in vda vdb vdc; do echo $d=$(head -c 16 /dev/$d); done; \
         echo RO-FLAG=$(cat /sys/block/vdc/ro); \
         echo {w_raw} > /tmp/a; dd if=/tmp/a of=/dev/vda bs=512 seek=8 conv=sync,fsync; \
         echo {w_qcow} > /tmp/b; dd if=/tmp/b of=/dev/vdb bs=512 seek=300 conv=sync,fsync; \
         dd if=/tmp/a of=/dev/vdc bs=512 seek=1 conv=sync,fsync; echo RO-WRITE-RC=$?; \
         echo RNG=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n'); \
         echo SYNCED-$((6*7)); sleep 1000"
    );
    let base_cmdline = std::fs::read_to_string(guest.join("cmdline")).unwrap();
    let args = vec![
        "--disk".to_string(),
        raw.display().to_string(),
        "--disk".to_string(),
        format!("{},format=qcow2", overlay.display()),
        "--disk".to_string(),
        format!("{},ro", ro.display()),
        "--cmdline".to_string(),
        format!(
            "{} matryoshka.modules=virtio_pci,virtio_blk,virtio-rng matryoshka.cmd=\"{cmd}\"",
            base_cmdline.trim()
        ),
    ];
    // The marker is computed by the guest shell: the kernel echoes the
    // command line, which must not match.
    let out = run_until(&args, "SYNCED-42", Duration::from_secs(300));
    let line = |key: &str| -> String {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key).map(str::to_string))
            .unwrap_or_else(|| panic!("no '{key}' line in guest output:\n{out}"))
    };
    assert_eq!(line("vda="), m_raw, "raw disk content\n{out}");
    assert_eq!(line("vdb="), m_base, "qcow2 overlay reads the base\n{out}");
    assert_eq!(line("vdc="), m_ro, "ro disk content\n{out}");
    assert_eq!(line("RO-FLAG="), "1", "read-only disk not marked ro\n{out}");
    assert_ne!(
        line("RO-WRITE-RC="),
        "0",
        "write to ro disk succeeded\n{out}"
    );
    let rng = line("RNG=");
    assert_eq!(rng.len(), 64, "hwrng gave {rng:?}\n{out}");
    assert_ne!(rng, "0".repeat(64));
    assert!(out.contains("SYNCED-42"), "{out}");

    // After SIGKILL: synced data is in the files.
    assert_eq!(read_at(&raw, 8 * 512, w_raw.len()), w_raw.as_bytes());
    assert_eq!(read_at(&raw, 0, m_raw.len()), m_raw.as_bytes());
    assert_eq!(std::fs::read(&ro).unwrap(), ro_before, "ro disk modified");
    let check = qemu_img(&["check", overlay.to_str().unwrap()]);
    assert!(check.contains("No errors"), "qemu-img check: {check}");
    let conv = dir.join("overlay-flat.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        overlay.to_str().unwrap(),
        conv.to_str().unwrap(),
    ]);
    assert_eq!(read_at(&conv, 300 * 512, w_qcow.len()), w_qcow.as_bytes());
    assert_eq!(read_at(&conv, 0, m_base.len()), m_base.as_bytes());
    // The shared base is untouched.
    qemu_img(&[
        "compare",
        base.to_str().unwrap(),
        base_raw.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
}
