//! Differential test: random user-level instruction sequences run natively
//! and in the emulator must agree (see `mat_x86::selftest`).

use mat_x86::selftest::{run_cases, Class, Config};

fn cfg(classes: &[Class], cases: u64, seed: u64) -> Config {
    let env = |k: &str| std::env::var(k).ok().and_then(|s| s.parse().ok());
    let cases = env("DIFFTEST_CASES").unwrap_or(cases);
    let seed = env("DIFFTEST_SEED").unwrap_or(seed);
    let max_insns_per_case = env("DIFFTEST_MAX_INSNS").unwrap_or(4) as usize;
    Config {
        cases,
        seed,
        max_insns_per_case,
        classes: classes.to_vec(),
        max_reported: 8,
        progress: false,
        report_filter: std::env::var("DIFFTEST_FILTER").ok(),
        ..Config::default()
    }
}

/// Run `c` and require no error and no mismatch.
fn assert_clean(c: &Config) {
    let r = run_cases(c);
    println!("{r}");
    assert!(r.error.is_none());
    assert_eq!(r.mismatches, 0, "see the report above");
}

#[test]
fn integer_matches_native() {
    assert_clean(&cfg(&[Class::Int, Class::Str], 20_000, 0x1234_5678));
}

#[test]
fn sse_matches_native() {
    assert_clean(&cfg(&[Class::Sse], 20_000, 0x05ee_d55e));
}

/// The binary translator against the host (it translates every case on
/// first use; TLB misses and non-native instructions go through helpers,
/// so both paths are covered).
#[test]
fn jit_integer_matches_native() {
    let mut c = cfg(&[Class::Int, Class::Str], 20_000, 0x0bad_cafe);
    c.engine = mat_x86::Engine::Jit;
    assert_clean(&c);
}

/// The same through the LAHF/SAHF soft-TLB lookup that hosts without a
/// fast PEXT use.
#[test]
fn jit_integer_matches_native_without_bmi2() {
    let mut c = cfg(&[Class::Int, Class::Str], 10_000, 0x0b0b_cafe);
    c.engine = mat_x86::Engine::Jit;
    c.jit_no_bmi2 = true;
    assert_clean(&c);
}

#[test]
fn jit_sse_matches_native() {
    let mut c = cfg(&[Class::Sse], 10_000, 0x5eed_0f5e);
    c.engine = mat_x86::Engine::Jit;
    assert_clean(&c);
}

#[test]
fn jit_tester_can_fail() {
    let mut c = cfg(&[Class::Int], 200, 9);
    c.engine = mat_x86::Engine::Jit;
    c.corrupt_emulated_rax = true;
    let r = run_cases(&c);
    assert_eq!(r.mismatches, r.cases, "{r}");
}

#[test]
fn tester_can_fail() {
    let mut c = cfg(&[Class::Int], 200, 7);
    c.corrupt_emulated_rax = true;
    let r = run_cases(&c);
    assert!(r.error.is_none(), "{r}");
    assert_eq!(
        r.mismatches, r.cases,
        "every corrupted case must be reported"
    );
    assert!(
        r.first_mismatches[0].contains("rax: native="),
        "{}",
        r.first_mismatches[0]
    );
    assert!(r
        .to_string()
        .ends_with(&format!("cases={} mismatches={}", r.cases, r.mismatches)));
}

/// Every instruction form in the generator's tables can actually be
/// generated (a form that never encodes would silently go untested).
/// `cargo test ... -- --nocapture generator_coverage` lists the forms.
#[test]
fn generator_coverage() {
    let mut g = mat_x86::selftest::gen::Generator::new();
    let t = g.tables();
    println!("int: {} forms: {:?}", t.int.len(), t.int);
    println!("sse: {} forms: {:?}", t.sse.len(), t.sse);
    assert!(t.int.len() > 400 && t.sse.len() > 250);
    assert_eq!(g.unencodable(Class::Int, 200), vec![]);
    assert_eq!(g.unencodable(Class::Sse, 200), vec![]);
    for e in g
        .encode_errors(Class::Sse, 2000)
        .iter()
        .chain(&g.encode_errors(Class::Int, 2000))
        .take(10)
    {
        println!("encoder rejected: {e}");
    }
}
