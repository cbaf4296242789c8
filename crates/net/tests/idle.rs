//! The user-mode stack thread must sleep when there is nothing to do, even
//! with frames waiting for a guest that does not take them (its own process,
//! so other tests' threads do not disturb the measurement).

use std::time::Duration;

use net::user::{UserConfig, UserNet};
use net::NetBackend;

/// utime + stime (clock ticks) of this process's threads named `name`.
fn thread_ticks(name: &str) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    total
}

#[test]
fn idle_stack_thread_sleeps() {
    let mut n = UserNet::new(UserConfig::default()).unwrap();
    // Fill the queue towards the guest with ARP replies we never read:
    // requests for the gateway from a made-up guest.
    for i in 0..400u32 {
        let mut f = vec![0u8; 42];
        f[..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        f[28..32].copy_from_slice(&[10, 0, 2, 15]);
        f[38..42].copy_from_slice(&[10, 0, 2, 2]);
        n.send(&f).unwrap();
        if i % 100 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut buf = vec![0u8; net::MAX_FRAME];
    assert!(
        n.recv(&mut buf).unwrap().is_some(),
        "the gateway answered no ARP request"
    );
    let before = thread_ticks("net-user");
    std::thread::sleep(Duration::from_secs(2));
    let used = thread_ticks("net-user") - before;
    // A busy loop would use ~200 ticks (100 Hz clock) in 2 s.
    assert!(used <= 5, "net-user thread used {used} ticks while idle");
}
