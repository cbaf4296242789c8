//! Integration test: a user-space JIT inside the default guest
//! (tests/programs/ujit.c, a static binary added to the initramfs): code
//! generated at run time, run often enough to be translated, then rewritten
//! in place, through a second (RW) mapping of the same memory, by itself,
//! and under W^X `mprotect` flips. Every call's result is checked in the
//! guest; the test checks the program's verdict and, on the translator, that
//! translations were made and invalidated.
//!
//! Needs guest/out/ (built by guest/build.sh when missing) and a C compiler
//! with a static libc (`apt-get install gcc libc6-dev`; CC overrides `cc`).
//! Run with --release.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::{ensure_guest, test_args, Vm};

/// Every call the program checks: ROUNDS x CALLS for `rwx`, `alias`, `wx`,
/// ROUNDS x CALLS/4 for `self`, and 64*65/2 x CALLS for `grow`.
const CALLS: u64 = 3 * 40 * 2000 + 40 * 500 + 64 * 65 / 2 * 2000;

fn compile_ujit(dir: &Path) -> PathBuf {
    let src = common::root().join("tests/programs/ujit.c");
    let bin = dir.join("ujit");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-O2", "-static", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| {
            panic!("this test needs a C compiler ({cc}: {e}): apt-get install gcc libc6-dev")
        });
    assert!(
        out.status.success(),
        "compiling {} failed (a static libc is needed: apt-get install libc6-dev):\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// A newc archive holding one executable file at the root, as Linux
/// unpacks it after the default initramfs (concatenated archives).
fn newc_with(name: &str, data: &[u8]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            name.len() + 1,
            0, // check
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let mut out = Vec::new();
    entry(&mut out, 1, 0o100_755, name, data);
    entry(&mut out, 0, 0, "TRAILER!!!", &[]);
    out
}

#[test]
fn user_space_jit_in_the_guest_runs_its_rewritten_code() {
    let guest = ensure_guest();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest_jit");
    std::fs::create_dir_all(&dir).unwrap();
    let bin = compile_ujit(&dir);
    let mut initrd = std::fs::read(guest.join("initramfs.cpio")).unwrap();
    initrd.extend(newc_with("ujit", &std::fs::read(&bin).unwrap()));
    let initrd_path = dir.join("initramfs-ujit.cpio");
    std::fs::write(&initrd_path, initrd).unwrap();

    let base = std::fs::read_to_string(guest.join("cmdline")).unwrap();
    let cmdline = format!("{} matryoshka.cmd=/ujit", base.trim());
    let args = test_args();
    let mut vm = Vm::spawn(
        Command::new(env!("CARGO_BIN_EXE_matryoshka"))
            .args(["run", "--no-reboot", "--stats", "--initrd"])
            .arg(&initrd_path)
            .args(["--cmdline", &cmdline])
            .args(&args),
    );
    vm.wait_for("MATRYOSHKA-CMD-EXIT", Duration::from_secs(600));
    let status = vm.wait_exit(Duration::from_secs(60));
    let text = vm.text();
    assert!(
        text.contains(&format!("UJIT-OK calls={CALLS}")) && text.contains("MATRYOSHKA-CMD-EXIT 0"),
        "the guest's JIT program failed:\n{text}"
    );
    assert!(status.success(), "VMM exit {status}:\n{text}");

    // On the translator, the run translated code and invalidated decoded
    // code (counts for the whole VM, boot included: the guest's verdict
    // above is what checks the rewritten code itself).
    if !args.iter().any(|a| a == "interp") {
        let number_before = |line: &str, what: &str| -> u64 {
            let head = &line[..line
                .find(what)
                .unwrap_or_else(|| panic!("no {what:?}: {line}"))];
            head.split_whitespace().last().unwrap().parse().unwrap()
        };
        let cpu = common::stats_line(&text, " invalidations");
        let jit = common::stats_line(&text, "jit:");
        assert!(number_before(cpu, " invalidations") > 0, "{cpu}");
        assert!(number_before(jit, " translations") > 0, "{jit}");
    }
}
