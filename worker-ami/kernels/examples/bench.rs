//! The portfolio-risk benchmark's Rust half: paths per second on one thread
//! and on all of them, for a 50-position portfolio with 10 options.
//! `bench/run.sh` builds and runs it, then runs the NumPy version.
//!
//! `cargo run --release --example bench -p nightshift-kernels -- [--paths N] [--repeat R] [--payload-out FILE]`

use std::error::Error;
use std::time::Instant;

use nightshift_kernels::portfolio::bench_payload;
use nightshift_kernels::{Control, Kernel, Outcome, PortfolioKernel};
use serde_json::Value;

fn main() -> Result<(), Box<dyn Error>> {
    let mut paths = 200_000_u64;
    let mut repeat = 5;
    let mut payload_out = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--paths" => paths = value()?.parse()?,
            "--repeat" => repeat = value()?.parse()?,
            "--payload-out" => payload_out = Some(value()?),
            _ => return Err(format!("unknown argument {arg}").into()),
        }
    }
    let payload = bench_payload(paths);
    if let Some(file) = payload_out {
        std::fs::write(file, payload.to_string())?;
    }
    let threads = std::thread::available_parallelism()?.get();
    let one = paths_per_second(&payload, 1, repeat)?;
    let all = paths_per_second(&payload, threads, repeat)?;
    let scaling = all / one;
    println!("nightshift paths/s 1 thread: {one:.0}");
    println!("nightshift paths/s {threads} threads: {all:.0}");
    println!(
        "nightshift scaling {threads} threads / 1 thread: {scaling:.2} (parallel efficiency {:.2})",
        scaling / threads as f64
    );
    Ok(())
}

/// The best of `repeat` runs, on a pool of `threads`.
fn paths_per_second(payload: &Value, threads: usize, repeat: usize) -> Result<f64, Box<dyn Error>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let kernel = PortfolioKernel::default();
    let mut best = f64::INFINITY;
    let mut summary = String::new();
    for _ in 0..repeat {
        let started = Instant::now();
        let outcome = pool.install(|| kernel.run(payload, None, &Control::new()))?;
        best = best.min(started.elapsed().as_secs_f64());
        let Outcome::Done { summary: line, .. } = outcome else {
            return Err("the benchmark run stopped".into());
        };
        summary = line;
    }
    if threads == 1 {
        eprintln!("nightshift: {summary}");
    }
    let paths = payload["paths"].as_u64().ok_or("payload without paths")?;
    Ok(paths as f64 / best)
}
