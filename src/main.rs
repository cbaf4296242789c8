//! `matryoshka` — the command-line front end. Thin: parses flags and hands
//! off to the VMM crate (or the CPU self-test / micro-benchmark).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

// The translator allocates and frees many small objects per block (the
// assembler's instruction lists); mimalloc halves that cost against glibc.
// Built without transparent huge pages (Cargo.toml: `no_thp`): zeroing its
// heap 2 MiB at a time cost the boot 0.15 s of system time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "matryoshka",
    version,
    about = "A virtual machine monitor with a software x86-64 CPU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a Linux guest (with no arguments: the default guest from guest/build.sh).
    Run(RunArgs),
    /// Built-in self-tests.
    Selftest {
        #[command(subcommand)]
        what: SelftestCmd,
    },
    /// Micro-benchmarks of the CPU engine.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Kernel image (bzImage).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory size, e.g. 512M or 2G.
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Exit when the guest reboots instead of restarting it.
    #[arg(long)]
    no_reboot: bool,
    /// Print CPU statistics when the VM stops.
    #[arg(long)]
    stats: bool,
    /// Load the compressed bzImage and run the kernel's own decompressor.
    #[arg(long)]
    guest_decompress: bool,
    /// CPU engine: `jit` translates hot guest code to host code, `interp`
    /// only interprets.
    #[arg(long, value_enum, default_value_t = CpuEngine::Jit)]
    cpu_engine: CpuEngine,
    /// virtio-blk disk: PATH[,ro][,format=raw|qcow2] (repeatable; /dev/vda,
    /// /dev/vdb, ... in order). The format is detected when not given.
    #[arg(long = "disk", value_name = "PATH[,ro][,format=raw|qcow2]")]
    disks: Vec<String>,
    /// Do not add the virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// Add a virtio-console (hvc0) that writes to stdout.
    #[arg(long)]
    console_virtio: bool,
    /// virtio-net NIC (repeatable): `user[,hostfwd=tcp:[HOSTADDR]:PORT-[GUESTADDR]:PORT]...`
    /// (unprivileged NAT: guest 10.0.2.15 by DHCP, gateway 10.0.2.2 = host
    /// 127.0.0.1, DNS 10.0.2.3) or `tap,ifname=NAME` (needs CAP_NET_ADMIN);
    /// either takes `mac=52:54:00:xx:xx:xx` (default: random).
    #[arg(long = "net", value_name = "user[,hostfwd=...]|tap,ifname=NAME")]
    nets: Vec<String>,
}

/// Parses a --disk value.
fn parse_disk(s: &str) -> anyhow::Result<vmm::virtio::DiskOptions> {
    let mut parts = s.split(',');
    let path = parts.next().filter(|p| !p.is_empty());
    let Some(path) = path else {
        bail!("--disk '{s}': missing path");
    };
    let mut d = vmm::virtio::DiskOptions {
        path: PathBuf::from(path),
        read_only: false,
        format: None,
    };
    for opt in parts {
        match opt {
            "ro" => d.read_only = true,
            "rw" => d.read_only = false,
            "format=raw" => d.format = Some(vmm::virtio::DiskFormat::Raw),
            "format=qcow2" => d.format = Some(vmm::virtio::DiskFormat::Qcow2),
            o => bail!("--disk '{s}': unknown option '{o}' (use ro, format=raw or format=qcow2)"),
        }
    }
    if !d.path.is_file() {
        bail!(
            "--disk '{s}': '{}' does not exist or is not a file",
            d.path.display()
        );
    }
    Ok(d)
}

#[derive(Subcommand)]
enum SelftestCmd {
    /// Differential test of the CPU against the host processor.
    Cpu {
        #[arg(long, default_value_t = 100_000)]
        cases: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Instruction classes, comma separated (e.g. int,sse).
        #[arg(long)]
        class: Option<String>,
        /// Engine under test (jit translates every case).
        #[arg(long, value_enum, default_value_t = CpuEngine::Interp)]
        cpu_engine: CpuEngine,
    },
    /// Random looping programs, translated and interpreted in lockstep.
    Loops {
        #[arg(long, default_value_t = 1000)]
        programs: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Translate on a second thread (runs then differ in timing, and
        /// a mismatch may not repeat).
        #[arg(long)]
        background: bool,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Emulated instructions per second on a tight and a mixed loop.
    Cpu {
        #[arg(long, default_value_t = 200_000_000)]
        insns: u64,
        /// CPU engine to measure.
        #[arg(long, value_enum, default_value_t = CpuEngine::Jit)]
        cpu_engine: CpuEngine,
    },
    /// Translator throughput: blocks of a 64-bit ELF file's code (this
    /// program's by default), translated without running them.
    Translate {
        /// ELF executable whose executable segment supplies the blocks.
        #[arg(long)]
        elf: Option<PathBuf>,
        /// Blocks to translate.
        #[arg(long, default_value_t = 20_000)]
        blocks: usize,
        /// Rounds; the fastest counts.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

/// The CPU execution engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CpuEngine {
    /// Interpreter over cached decoded blocks.
    Interp,
    /// Binary translation of hot blocks (interpreter for cold code).
    Jit,
}

impl From<CpuEngine> for x86::Engine {
    fn from(e: CpuEngine) -> Self {
        match e {
            CpuEngine::Interp => x86::Engine::Interp,
            CpuEngine::Jit => x86::Engine::Jit,
        }
    }
}

fn guest_dir() -> PathBuf {
    std::env::var_os("MATRYOSHKA_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("guest"))
}

/// Build the default guest if it is missing (the script caches its output).
fn ensure_default_guest() -> anyhow::Result<PathBuf> {
    let dir = guest_dir();
    let out = dir.join("out");
    if !(out.join("vmlinuz").exists() && out.join("initramfs.cpio").exists()) {
        let script = dir.join("build.sh");
        eprintln!(
            "[matryoshka] building the default guest with {}",
            script.display()
        );
        let st = std::process::Command::new("bash")
            .arg(&script)
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !st.success() {
            bail!("{} failed ({st})", script.display());
        }
    }
    Ok(out)
}

fn run(args: RunArgs) -> anyhow::Result<i32> {
    let mem_size = vmm::parse_mem_size(&args.memory).map_err(anyhow::Error::msg)?;
    if args.cpus == 0 || args.cpus > vmm::MAX_CPUS {
        bail!(
            "--cpus {}: this build supports 1 to {} vCPU(s)",
            args.cpus,
            vmm::MAX_CPUS
        );
    }
    let disks = args
        .disks
        .iter()
        .map(|d| parse_disk(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let nets = args
        .nets
        .iter()
        .map(|n| {
            let mut spec: net::NetSpec = n.parse()?;
            // Chosen once, so the guest keeps its MAC across reboots.
            spec.mac.get_or_insert_with(net::MacAddr::random);
            Ok(spec)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (kernel, initrd, cmdline) = match args.kernel {
        Some(k) => (
            k,
            args.initrd,
            args.cmdline.unwrap_or_else(|| "console=ttyS0".into()),
        ),
        None => {
            let out = ensure_default_guest()?;
            let cmdline = match args.cmdline {
                Some(c) => c,
                None => {
                    let base = std::fs::read_to_string(out.join("cmdline"))
                        .map(|s| s.trim().to_string())
                        .unwrap_or_else(|_| "console=ttyS0".into());
                    if disks.is_empty() {
                        base
                    } else {
                        vmm::default_disk_cmdline(&base)
                    }
                }
            };
            (
                out.join("vmlinuz"),
                Some(args.initrd.unwrap_or_else(|| out.join("initramfs.cpio"))),
                cmdline,
            )
        }
    };
    for (what, p) in [("kernel", Some(&kernel)), ("initrd", initrd.as_ref())] {
        if let Some(p) = p {
            if !p.is_file() {
                bail!("{what} '{}' does not exist or is not a file", p.display());
            }
        }
    }
    let cfg = vmm::VmConfig {
        kernel,
        initrd,
        cmdline,
        mem_size,
        cpus: args.cpus,
        no_reboot: args.no_reboot,
        stats: args.stats,
        guest_decompress: args.guest_decompress,
        engine: args.cpu_engine.into(),
        virtio: vmm::VirtioConfig {
            disks,
            rng: !args.no_rng,
            console: args.console_virtio,
            nets,
        },
    };
    vmm::run(&cfg)
}

fn selftest_cpu(
    cases: u64,
    seed: u64,
    class: Option<String>,
    engine: CpuEngine,
) -> anyhow::Result<i32> {
    use x86::selftest::{run_cases, Class, Config};
    let classes = match class {
        Some(c) => Class::parse_list(&c).map_err(anyhow::Error::msg)?,
        None => Class::ALL.to_vec(),
    };
    let cfg = Config {
        cases,
        seed,
        classes,
        engine: engine.into(),
        ..Config::default()
    };
    let report = run_cases(&cfg);
    // The report's last line is `cases=N mismatches=M`.
    println!("{report}");
    Ok(if report.mismatches == 0 && report.error.is_none() {
        0
    } else {
        1
    })
}

fn selftest_loops(programs: u64, seed: u64, background: bool) -> anyhow::Result<i32> {
    let report = x86::selftest::loops::run_programs(programs, seed, background);
    // The report's last line is `programs=N mismatches=M`.
    println!("{report}");
    Ok(if report.mismatches == 0 { 0 } else { 1 })
}

fn bench_cpu(insns: u64, engine: CpuEngine) -> anyhow::Result<i32> {
    for (name, r) in x86::bench::run_all(insns, engine.into()) {
        println!("{name:<12} {:>8.1} M instructions/s", r);
    }
    Ok(0)
}

fn bench_translate(elf: Option<PathBuf>, blocks: usize, rounds: usize) -> anyhow::Result<i32> {
    let path = match elf {
        Some(p) => p,
        None => std::env::current_exe().context("this program's path")?,
    };
    let file = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let image =
        vmm::boot::elf::ElfImage::parse(&file).with_context(|| path.display().to_string())?;
    let (text, vaddr) = image
        .code(&file)
        .with_context(|| format!("{}: no executable segment", path.display()))?;
    // Guest RAM holds the code at its address (a few MiB, under 1 GiB).
    // Code linked higher (a kernel's) is placed at its offset in the low
    // GiB: the translator's work per block does not depend on where.
    let vaddr = if vaddr.saturating_add(text.len() as u64) > 1 << 30 {
        vaddr & ((1 << 30) - 1)
    } else {
        vaddr
    };
    if vaddr + text.len() as u64 > 1 << 30 {
        anyhow::bail!("{}: code does not fit below 1 GiB", path.display());
    }
    let r = x86::jit::bench_translate(text, vaddr, blocks, rounds);
    println!(
        "{} blocks ({} refused), {:.1} guest instructions and {:.0} bytes of host code per block, {:.1} us per block (code hash {:016x})",
        r.blocks,
        r.failed,
        r.guest_insns as f64 / r.blocks.max(1) as f64,
        r.code_bytes as f64 / r.blocks.max(1) as f64,
        r.ns_per_block / 1e3,
        r.code_hash
    );
    Ok(0)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MATRYOSHKA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Selftest {
            what:
                SelftestCmd::Cpu {
                    cases,
                    seed,
                    class,
                    cpu_engine,
                },
        } => selftest_cpu(cases, seed, class, cpu_engine),
        Cmd::Selftest {
            what:
                SelftestCmd::Loops {
                    programs,
                    seed,
                    background,
                },
        } => selftest_loops(programs, seed, background),
        Cmd::Bench {
            what: BenchCmd::Cpu { insns, cpu_engine },
        } => bench_cpu(insns, cpu_engine),
        Cmd::Bench {
            what:
                BenchCmd::Translate {
                    elf,
                    blocks,
                    rounds,
                },
        } => bench_translate(elf, blocks, rounds),
    };
    match r {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("matryoshka: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
