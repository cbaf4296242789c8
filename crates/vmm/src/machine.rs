//! A PC: guest RAM, the legacy devices on their buses, the boot, and the
//! vCPU loop that runs the software CPU and services timers and console.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devices::bus::lock;
use devices::clock::Clock;
use devices::ioapic::IsaIrqLine;
use devices::irq::IrqLine;
use devices::lapic::LapicConfig;
use devices::{
    AcpiPm, ApicBus, EventHandler, HostClock, IoApic, Lapic, MmioBus, PciHost, Pic, PioAlias,
    PioBus, Pit, Rtc, Serial, VmEvent, I8042,
};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use x86::{Cpu, CpuConfig, Exit, GuestRam, RamRegion};

use crate::boot::layout::{self, Layout};
use crate::boot::{self, BootConfig};
use crate::console::{self, RawTty, Waker};
use crate::vcpu::VcpuBus;

/// Largest vCPU count this build can run.
pub const MAX_CPUS: u8 = 1;
/// Advertised invariant TSC frequency.
pub const TSC_HZ: u64 = 2_000_000_000;

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_size: u64,
    pub cpus: u8,
    /// Exit instead of restarting when the guest reboots.
    pub no_reboot: bool,
    /// Print CPU statistics at exit.
    pub stats: bool,
    /// Load the compressed bzImage and let the guest decompress itself.
    pub guest_decompress: bool,
    /// CPU engine: interpreter or binary translator.
    pub engine: x86::Engine,
    /// Paravirtual (virtio-pci) devices.
    pub virtio: crate::pci_devices::VirtioConfig,
}

/// How a VM run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Poweroff,
    Reset,
    /// User pressed Ctrl-A x.
    Quit,
    /// Triple fault or other fatal CPU condition.
    Crashed(String),
}

const EV_NONE: u8 = 0;
const EV_RESET: u8 = 1;
const EV_POWEROFF: u8 = 2;

/// Run the VM until poweroff (restarting it on guest reboot unless
/// `no_reboot`). Returns the process exit code.
pub fn run(cfg: &VmConfig) -> anyhow::Result<i32> {
    if cfg.cpus == 0 {
        bail!("--cpus must be at least 1");
    }
    if cfg.cpus > MAX_CPUS {
        bail!(
            "--cpus {} is not supported yet: this build runs at most {} vCPU",
            cfg.cpus,
            MAX_CPUS
        );
    }
    let waker = Waker::new();
    let tty = RawTty::enable();
    let input = console::spawn_stdin(waker.clone(), tty.is_some());
    loop {
        let outcome = run_once(cfg, &waker, &input)?;
        match outcome {
            Outcome::Poweroff | Outcome::Quit => return Ok(0),
            Outcome::Reset if cfg.no_reboot => return Ok(0),
            Outcome::Reset => {
                eprintln!("\r\n[matryoshka] guest reboot: restarting the VM\r");
            }
            Outcome::Crashed(why) => {
                drop(tty);
                eprintln!("\n[matryoshka] VM stopped: {why}");
                return Ok(1);
            }
        }
    }
}

/// Ask for transparent huge pages behind guest RAM (hosts that set THP
/// to `madvise` give them only on request). The guest's memory is then
/// faulted in 2 MiB at a time, and the host TLB covers far more of it:
/// every guest access, and the soft MMU's page walks, go through host
/// pointers into this range. A refusal (THP off, old kernel) changes
/// nothing but speed.
fn advise_huge_pages(host: *mut u8, len: u64) {
    // SAFETY: `host..host + len` is one mapping owned by the caller;
    // MADV_HUGEPAGE changes how it is backed, never its contents.
    let r = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_HUGEPAGE) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "no huge pages for guest RAM");
    }
}

fn create_memory(mem_size: u64) -> anyhow::Result<(GuestMemoryMmap, Arc<GuestRam>)> {
    let regions = layout::ram_regions(mem_size);
    let mem = GuestMemoryMmap::from_ranges(&regions).context("allocating guest memory")?;
    let mut ram = Vec::new();
    for r in mem.iter() {
        let host = r
            .get_host_address(MemoryRegionAddress(0))
            .context("guest memory region has no host mapping")?;
        advise_huge_pages(host, r.len());
        ram.push(RamRegion {
            gpa: r.start_addr().0,
            len: r.len(),
            host,
        });
    }
    // SAFETY: the regions are the mmap'd RAM of `mem`, which the caller keeps
    // alive for as long as the GuestRam (both live for the whole VM run).
    let ram = unsafe { GuestRam::new(ram) };
    Ok((mem, Arc::new(ram)))
}

struct Platform {
    serial: Arc<Mutex<Serial>>,
    pit: Arc<Mutex<Pit>>,
    irq0: Arc<dyn IrqLine>,
}

fn run_once(
    cfg: &VmConfig,
    waker: &Arc<Waker>,
    input: &Arc<console::ConsoleInput>,
) -> anyhow::Result<Outcome> {
    let (mem, ram) = create_memory(cfg.mem_size)?;
    let layout = Layout::new(cfg.mem_size);
    let mut bc = BootConfig::new(cfg.kernel.clone(), cfg.mem_size);
    bc.initrd = cfg.initrd.clone();
    bc.cmdline = cfg.cmdline.clone();
    bc.cpus = cfg.cpus;
    bc.direct_vmlinux = !cfg.guest_decompress;
    let booted = boot::load_linux(&mem, &bc, &layout)?;
    tracing::info!(entry = format_args!("{:#x}", booted.entry), format = ?booted.format, "kernel loaded");

    let clock: Arc<dyn Clock> = Arc::new(HostClock::new());
    let event = Arc::new(AtomicU8::new(EV_NONE));
    let events: EventHandler = {
        let event = event.clone();
        let waker = waker.clone();
        Arc::new(move |e: VmEvent| {
            let v = match e {
                VmEvent::Reset => EV_RESET,
                VmEvent::Poweroff => EV_POWEROFF,
            };
            event.store(v, Ordering::SeqCst);
            waker.wake();
        })
    };

    // Interrupt fabric: LAPIC(s) ← APIC bus ← IOAPIC; 8259 PIC for ExtINT.
    let lapic_cfg = LapicConfig {
        tsc_hz: TSC_HZ,
        ..Default::default()
    };
    let lapics: Vec<Arc<Mutex<Lapic>>> = (0..cfg.cpus)
        .map(|i| {
            Arc::new(Mutex::new(Lapic::new(
                i as u32,
                i == 0,
                clock.clone(),
                lapic_cfg,
            )))
        })
        .collect();
    let apic_bus = {
        let waker = waker.clone();
        Arc::new(ApicBus::new(
            lapics.clone(),
            Some(Arc::new(move |_cpu| waker.wake())),
        ))
    };
    let ioapic = Arc::new(Mutex::new(IoApic::new(
        boot::acpi::ioapic_id(cfg.cpus),
        apic_bus.clone(),
    )));
    let pic = Arc::new(Mutex::new(Pic::new()));
    let isa = |irq: u8| -> Arc<dyn IrqLine> {
        Arc::new(IsaIrqLine {
            pic: pic.clone(),
            ioapic: ioapic.clone(),
            irq,
        })
    };

    let mut pio = PioBus::new();
    let mut mmio = MmioBus::new();
    let out: Box<dyn Write + Send> = Box::new(std::io::stdout());
    let serial = Arc::new(Mutex::new(Serial::new(isa(4), out)));
    pio.insert(0x3f8, 8, serial.clone())?;
    let pit = Arc::new(Mutex::new(Pit::new(clock.clone())));
    pio.insert(0x40, 4, pit.clone())?;
    pio.insert(
        0x61,
        1,
        Arc::new(Mutex::new(PioAlias::new(
            pit.clone(),
            devices::pit::PORT61_ALIAS_OFFSET,
        ))),
    )?;
    let mut rtc = Rtc::new();
    rtc.set_memory_size(
        cfg.mem_size.min(layout::MMIO_HOLE_START),
        cfg.mem_size.saturating_sub(layout::MMIO_HOLE_START),
    );
    pio.insert(0x70, 2, Arc::new(Mutex::new(rtc)))?;
    pio.insert(0x20, 2, pic.clone())?;
    pio.insert(
        0xa0,
        2,
        Arc::new(Mutex::new(PioAlias::new(
            pic.clone(),
            devices::pic::PIC_SLAVE_ALIAS_OFFSET,
        ))),
    )?;
    pio.insert(
        0x4d0,
        2,
        Arc::new(Mutex::new(PioAlias::new(
            pic.clone(),
            devices::pic::ELCR_ALIAS_OFFSET,
        ))),
    )?;
    let i8042 = Arc::new(Mutex::new(I8042::new(isa(1), isa(12), events.clone())));
    pio.insert(0x60, 1, i8042.clone())?;
    pio.insert(
        0x64,
        1,
        Arc::new(Mutex::new(PioAlias::new(
            i8042.clone(),
            devices::i8042::I8042_CMD_ALIAS_OFFSET,
        ))),
    )?;
    pio.insert(
        0x600,
        0xc,
        Arc::new(Mutex::new(AcpiPm::new(
            clock.clone(),
            events.clone(),
            Some(isa(9)),
        ))),
    )?;
    let pci = Arc::new(Mutex::new(PciHost::new(events.clone())));
    pio.insert(0xcf8, 8, pci.clone())?;
    mmio.insert(layout::IOAPIC_ADDR, 0x1000, ioapic.clone())?;
    let mut virtio = crate::pci_devices::VirtioBuilder::new(
        mem.clone(),
        ram.clone(),
        apic_bus.clone(),
        ioapic.clone(),
    );
    virtio.add_config(&pci, &cfg.virtio)?;
    virtio.finish(&mut mmio)?;
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);

    let plat = Platform {
        serial,
        pit,
        irq0: isa(0),
    };

    let bus = VcpuBus {
        index: 0,
        pio,
        mmio,
        lapic: lapics[0].clone(),
        apic_bus: apic_bus.clone(),
        ioapic: ioapic.clone(),
        pic: pic.clone(),
        hint: VcpuBus::connect_interrupts(&lapics[0], &pic),
        clock: clock.clone(),
        tsc_hz: TSC_HZ,
        io_trace: false,
    };
    let mut cpu = Cpu::new(
        ram,
        Box::new(bus),
        CpuConfig {
            apic_id: 0,
            cpu_count: cfg.cpus as u32,
            tsc_hz: TSC_HZ,
        },
    );
    cpu.set_engine(cfg.engine)
        .context("setting up the binary translator")?;
    // Translate on a second host thread where there is a second core (the
    // vCPU interprets a hot block until its translation is ready);
    // MATRYOSHKA_JIT_SYNC=1 translates on the vCPU thread (A/B, debugging).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores > 1 && std::env::var_os("MATRYOSHKA_JIT_SYNC").is_none() {
        cpu.set_jit_background(true)
            .context("starting the translator thread")?;
    }
    waker.add_kick(cpu.kick.clone());
    cpu.set_state(booted.cpu.clone());

    // Device timers are polled between CPU slices; this ticker bounds a
    // slice to ~1 ms of host time so periodic interrupts are not lost.
    let ticker_stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let kick = cpu.kick.clone();
        let stop = ticker_stop.clone();
        std::thread::Builder::new()
            .name("vcpu-ticker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    kick.store(true, Ordering::Relaxed);
                }
            })
            .context("spawning the timer thread")?
    };
    let started = Instant::now();
    let (outcome, halted) = vcpu_loop(&mut cpu, &plat, &lapics[0], &clock, &event, waker, input);
    ticker_stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    if cfg.stats {
        print_stats(&cpu, started.elapsed(), halted);
    }
    drop(mem);
    Ok(outcome)
}

fn vcpu_loop(
    cpu: &mut Cpu,
    plat: &Platform,
    lapic: &Arc<Mutex<Lapic>>,
    clock: &Arc<dyn Clock>,
    event: &AtomicU8,
    waker: &Waker,
    input: &console::ConsoleInput,
) -> (Outcome, Duration) {
    // Time spent waiting for an interrupt (`--stats`).
    let mut halted = Duration::ZERO;
    // Upper bound on instructions per slice; the ticker usually ends it first.
    const SLICE: u64 = 2_000_000;
    loop {
        // Console input.
        {
            let mut q = input.queue.lock().unwrap_or_else(|e| e.into_inner());
            if !q.is_empty() {
                let bytes: Vec<u8> = q.drain(..).collect();
                drop(q);
                lock(&plat.serial).enqueue_input(&bytes);
            }
        }
        if input.quit.load(Ordering::SeqCst) {
            return (Outcome::Quit, halted);
        }
        match event.swap(EV_NONE, Ordering::SeqCst) {
            EV_POWEROFF => return (Outcome::Poweroff, halted),
            EV_RESET => return (Outcome::Reset, halted),
            _ => {}
        }
        // Timers.
        let edges = lock(&plat.pit).poll();
        if edges > 0 {
            plat.irq0.pulse();
        }
        lock(lapic).poll_timer();

        match cpu.run(SLICE) {
            Exit::Budget | Exit::Kicked => {}
            Exit::Halted => {
                // Sleep until the next timer deadline or an external wake-up.
                let now = clock.now_ns();
                let next = [
                    lock(&plat.pit).next_deadline_ns(),
                    lock(lapic).next_deadline_ns(),
                ]
                .into_iter()
                .flatten()
                .min();
                let wait = match next {
                    Some(t) if t <= now => continue,
                    Some(t) => Duration::from_nanos((t - now).min(100_000_000)),
                    None => Duration::from_millis(100),
                };
                if cpu.bus.irq_pending() && cpu.s.rflags & x86::state::flags::IF != 0 {
                    continue;
                }
                let t0 = Instant::now();
                waker.wait(wait);
                halted += t0.elapsed();
            }
            Exit::Shutdown(why) => {
                eprintln!("\n[matryoshka] {why}");
                eprintln!("{}", dump_state(cpu));
                return (Outcome::Crashed(why), halted);
            }
        }
    }
}

/// Human-readable CPU state for crash reports.
pub fn dump_state(cpu: &Cpu) -> String {
    let s = &cpu.s;
    let names = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    let mut out = String::new();
    for (k, n) in names.iter().enumerate() {
        out += &format!(
            "{n:>4}={:016x}{}",
            s.gpr[k],
            if k % 4 == 3 { "\n" } else { " " }
        );
    }
    out += &format!(
        " rip={:016x} rflags={:08x} cpl={} cs={:04x} ss={:04x}\n cr0={:08x} cr2={:016x} cr3={:016x} cr4={:08x} efer={:x}\n",
        s.rip,
        s.rflags,
        s.cpl(),
        s.seg[1].selector,
        s.seg[2].selector,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer
    );
    out
}

fn print_stats(cpu: &Cpu, elapsed: Duration, halted: Duration) {
    let st = &cpu.stats;
    let secs = elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "\r\n[matryoshka] {:.2}s ({:.2}s halted), {} instructions ({:.1} M/s; {} interpreted), {} blocks decoded, {} invalidations, {} exceptions, {} interrupts, {} unimplemented\r",
        secs,
        halted.as_secs_f64(),
        st.instructions,
        st.instructions as f64 / secs / 1e6,
        st.instructions - st.translated,
        st.blocks_decoded,
        st.block_invalidations,
        st.exceptions,
        st.interrupts,
        st.unimplemented
    );
    if let Some(j) = cpu.jit_stats() {
        eprintln!(
            "[matryoshka] jit: {} translations ({} failed, {:.1} ms, {} KiB code; {} native / {} helper insns; {} strided groups, {} in 32-bit loops, {} traces), {} dispatcher entries, {} chain patches ({} through stubs, {} to other pages), {} helper calls ({} exits), {} flushes\r",
            j.translations,
            j.translate_failures,
            j.translate_ms,
            j.code_bytes / 1024,
            j.native_insns,
            j.helper_insns,
            j.strided_groups,
            j.z32_loops,
            j.traces,
            j.entries,
            j.chain_patches,
            j.chain_stubs,
            j.far_chains,
            j.helper_calls,
            j.helper_exits,
            j.flushes
        );
    }
    if let Some(ev) = cpu.jit_events() {
        let v: Vec<String> = ev.iter().map(|(what, n)| format!("{n} {what}")).collect();
        eprintln!("[matryoshka] jit events: {}\r", v.join(", "));
    }
}
