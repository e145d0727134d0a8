//! The whole kernel: accuracy against closed forms, properties, determinism
//! across thread counts, and interrupted runs resuming to the same bits.
//!
//! Accuracy tolerances: a Monte Carlo figure must be within 4 of its own
//! reported standard errors of the exact value (the seeds are fixed, so this
//! is a deterministic check, not a flaky one), and the reported standard
//! error must be small (below 2% of the figure); against the delta-normal
//! approximation, which is itself off by O(σ√T), within 1.5% plus 4 standard
//! errors at a one-day horizon.

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use serde_json::{Value, json};

use super::isa::Isa;
use super::job::Job;
use super::tally::Tally;
use super::{PortfolioKernel, demo_payload, input, math, report};
use crate::{Control, Kernel, KernelError, Outcome};

const Z95: f64 = 1.644_853_626_951_472_2;
const Z99: f64 = 2.326_347_874_040_840_8;

fn run(payload: &Value) -> Value {
    match PortfolioKernel::default().run(payload, None, &Control::new()) {
        Ok(Outcome::Done { result, .. }) => result,
        other => panic!("expected a result, got {other:?}"),
    }
}

fn figure(result: &Value, pointer: &str) -> f64 {
    result
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no {pointer}"))
}

fn single_asset(vol: f64, drift: f64, horizon_days: f64, paths: u64, seed: u64) -> Value {
    json!({
        "account": "single", "seed": seed, "horizon_days": horizon_days, "paths": paths,
        "confidence": [0.95, 0.99],
        "assets": [{"name": "A", "price": 100.0, "vol": vol, "drift": drift}],
        "correlation": [[1.0]],
        "positions": [{"asset": "A", "quantity": 10.0}],
    })
}

/// VaR and ES of 10 shares at 100 whose log-price moves N((μ − σ²/2)T, σ²T).
fn lognormal_var_es(vol: f64, drift: f64, years: f64, z: f64, alpha: f64) -> (f64, f64) {
    let (m, s) = ((drift - 0.5 * vol * vol) * years, vol * years.sqrt());
    let var = 1_000.0 * (1.0 - (m - s * z).exp());
    let es = 1_000.0 * (1.0 - (drift * years).exp() * math::norm_cdf(-z - s) / (1.0 - alpha));
    (var, es)
}

fn assert_within(name: &str, got: f64, se: f64, want: f64) {
    assert!(
        (got - want).abs() <= 4.0 * se,
        "{name}: {got} is not {want} within 4 x {se}"
    );
    assert!(
        se < 0.02 * want.abs(),
        "{name}: standard error {se} too large for {want}"
    );
}

#[test]
fn one_asset_matches_the_lognormal_closed_form() {
    let (vol, drift, days) = (0.3, 0.05, 20.0);
    let years = days / 252.0;
    let result = run(&single_asset(vol, drift, days, 100_000, 1));
    for (i, (z, alpha)) in [(Z95, 0.95), (Z99, 0.99)].into_iter().enumerate() {
        let (var, es) = lognormal_var_es(vol, drift, years, z, alpha);
        let level = |f: &str| figure(&result, &format!("/levels/{i}/{f}"));
        assert_within("VaR", level("var"), level("var_se"), var);
        assert_within("ES", level("es"), level("es_se"), es);
    }
    let growth = (drift * years).exp();
    let mean = 1_000.0 * (growth - 1.0);
    let stdev = 1_000.0 * growth * ((vol * vol * years).exp() - 1.0).sqrt();
    assert!((figure(&result, "/pnl/mean") - mean).abs() <= 4.0 * figure(&result, "/pnl/mean_se"));
    assert_within(
        "stdev",
        figure(&result, "/pnl/stdev"),
        figure(&result, "/pnl/stdev_se"),
        stdev,
    );
}

#[test]
fn linear_portfolio_matches_delta_normal_at_a_short_horizon() {
    let vols = [0.2, 0.3, 0.25];
    let prices = [50.0, 120.0, 80.0];
    let quantities = [300.0, -100.0, 200.0];
    let correlation = [[1.0, 0.5, 0.2], [0.5, 1.0, -0.3], [0.2, -0.3, 1.0]];
    let payload = json!({
        "seed": 3, "horizon_days": 1.0, "paths": 100_000, "confidence": [0.95, 0.99],
        "assets": (0..3).map(|i| json!({"name": format!("A{i}"), "price": prices[i], "vol": vols[i]})).collect::<Vec<_>>(),
        "correlation": correlation,
        "positions": (0..3).map(|i| json!({"asset": format!("A{i}"), "quantity": quantities[i]})).collect::<Vec<_>>(),
    });
    let result = run(&payload);
    let years = 1.0 / 252.0;
    let weights: Vec<f64> = (0..3)
        .map(|i| quantities[i] * prices[i] * vols[i])
        .collect();
    let variance: f64 = (0..3)
        .flat_map(|i| (0..3).map(move |j| (i, j)))
        .map(|(i, j)| weights[i] * weights[j] * correlation[i][j] * years)
        .sum();
    let sigma = variance.sqrt();
    for (i, (z, alpha)) in [(Z95, 0.95), (Z99, 0.99)].into_iter().enumerate() {
        let density = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let (var, es) = (z * sigma, sigma * density / (1.0 - alpha));
        let level = |f: &str| figure(&result, &format!("/levels/{i}/{f}"));
        for (name, got, se, want) in [
            ("VaR", level("var"), level("var_se"), var),
            ("ES", level("es"), level("es_se"), es),
        ] {
            assert!(
                (got - want).abs() <= 0.015 * want + 4.0 * se,
                "{name} {alpha}: {got} vs delta-normal {want}"
            );
        }
    }
}

#[test]
fn error_shrinks_like_one_over_root_paths() {
    let (vol, drift, days) = (0.25, 0.0, 10.0);
    let (var, _) = lognormal_var_es(vol, drift, days / 252.0, Z95, 0.95);
    let rms = |paths: u64| {
        let errors: Vec<(f64, f64)> = (0..16)
            .map(|seed| {
                let result = run(&single_asset(vol, drift, days, paths, seed));
                (
                    figure(&result, "/levels/0/var") - var,
                    figure(&result, "/pnl/mean_se"),
                )
            })
            .collect();
        let rms = (errors.iter().map(|(e, _)| e * e).sum::<f64>() / 16.0).sqrt();
        (rms, errors[0].1)
    };
    let (small_error, small_se) = rms(1_000);
    let (large_error, large_se) = rms(16_000);
    // 16 times the paths: a quarter of the error.
    let ratio = small_error / large_error;
    assert!((2.5..6.4).contains(&ratio), "error ratio {ratio}");
    let se_ratio = small_se / large_se;
    assert!(
        (3.6..4.4).contains(&se_ratio),
        "standard error ratio {se_ratio}"
    );
}

/// A small random portfolio: 1 to 3 assets (one-factor correlation), 1 to 5
/// positions of shares, calls and puts.
fn portfolio() -> impl Strategy<Value = Value> {
    let asset = (1.0..500.0_f64, 0.0..0.6_f64, -0.1..0.2_f64, -0.95..0.95_f64);
    let position = (
        0..3_usize,
        -100.0..100.0_f64,
        0..3_u8,
        0.7..1.3_f64,
        1.0..300.0_f64,
    );
    (
        prop::collection::vec(asset, 1..=3),
        prop::collection::vec(position, 1..=5),
        1..1_500_u64,
        any::<u64>(),
    )
        .prop_map(|(assets, positions, paths, seed)| {
            let n = assets.len();
            let correlation: Vec<Vec<f64>> = (0..n)
                .map(|i| (0..n).map(|j| if i == j { 1.0 } else { assets[i].3 * assets[j].3 }).collect())
                .collect();
            let positions: Vec<Value> = positions
                .iter()
                .map(|&(asset, quantity, kind, moneyness, expiry)| {
                    let asset = asset % n;
                    let name = format!("A{asset}");
                    match kind {
                        0 => json!({"asset": name, "quantity": quantity}),
                        _ => json!({
                            "asset": name, "quantity": quantity,
                            "kind": if kind == 1 { "call" } else { "put" },
                            "strike": assets[asset].0 * moneyness, "expiry_days": expiry,
                        }),
                    }
                })
                .collect();
            json!({
                "account": "prop", "seed": seed, "rate": 0.02, "horizon_days": 5.0, "paths": paths,
                "confidence": [0.9, 0.99],
                "assets": assets.iter().enumerate().map(|(i, a)| json!({"name": format!("A{i}"), "price": a.0, "vol": a.1, "drift": a.2})).collect::<Vec<_>>(),
                "correlation": correlation,
                "positions": positions,
            })
        })
}

fn close(a: f64, b: f64, scale: f64) -> bool {
    (a - b).abs() <= 1e-9 * (a.abs().max(b.abs()) + scale)
}

fn scale_quantities(payload: &Value, factor: f64) -> Value {
    let mut scaled = payload.clone();
    for position in scaled["positions"].as_array_mut().expect("positions") {
        position["quantity"] = json!(position["quantity"].as_f64().expect("quantity") * factor);
    }
    scaled
}

/// The figures that must agree between two runs of equivalent portfolios.
fn headline(result: &Value) -> Vec<f64> {
    let mut figures = vec![figure(result, "/pnl/mean"), figure(result, "/pnl/stdev")];
    for i in 0..2 {
        figures.push(figure(result, &format!("/levels/{i}/var")));
        figures.push(figure(result, &format!("/levels/{i}/es")));
    }
    figures
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn figures_are_consistent(payload in portfolio()) {
        let result = run(&payload);
        let scale = figure(&result, "/pnl/stdev") + figure(&result, "/pnl/mean").abs() + 1.0;
        let mut last = (f64::NEG_INFINITY, f64::NEG_INFINITY);
        for i in 0..2 {
            let level = |f: &str| figure(&result, &format!("/levels/{i}/{f}"));
            let (var, es) = (level("var"), level("es"));
            prop_assert!(es >= var - 1e-9 * scale);
            prop_assert!(var >= last.0 && es >= last.1);
            last = (var, es);
            let contributions: f64 = result["levels"][i]["es_contributions"]
                .as_array().expect("contributions").iter().filter_map(Value::as_f64).sum();
            prop_assert!(close(contributions, es, scale), "{contributions} vs {es}");
        }
        let counts: u64 = result["histogram"]["counts"].as_array().expect("counts").iter().filter_map(Value::as_u64).sum::<u64>()
            + result["histogram"]["below"].as_u64().expect("below") + result["histogram"]["above"].as_u64().expect("above");
        prop_assert_eq!(counts, payload["paths"].as_u64().expect("paths"));
        let (min, mean, max) = (figure(&result, "/pnl/min"), figure(&result, "/pnl/mean"), figure(&result, "/pnl/max"));
        prop_assert!(min - 1e-9 * scale <= mean && mean <= max + 1e-9 * scale);
    }

    #[test]
    fn scaling_positions_scales_every_figure(payload in portfolio(), factor in 0.1..10.0_f64) {
        let (base, scaled) = (run(&payload), run(&scale_quantities(&payload, factor)));
        let scale = figure(&base, "/pnl/stdev") + figure(&base, "/pnl/mean").abs() + 1.0;
        for (a, b) in headline(&base).into_iter().zip(headline(&scaled)) {
            prop_assert!(close(a * factor, b, scale * factor), "{a} x {factor} vs {b}");
        }
    }

    #[test]
    fn a_mirrored_portfolio_mirrors_the_distribution(payload in portfolio()) {
        let (long, short) = (run(&payload), run(&scale_quantities(&payload, -1.0)));
        let scale = figure(&long, "/pnl/stdev") + figure(&long, "/pnl/mean").abs() + 1.0;
        prop_assert!(close(figure(&long, "/pnl/mean"), -figure(&short, "/pnl/mean"), scale));
        prop_assert!(close(figure(&long, "/pnl/stdev"), figure(&short, "/pnl/stdev"), scale));
        prop_assert!(close(figure(&long, "/pnl/min"), -figure(&short, "/pnl/max"), scale));
    }

    #[test]
    fn without_volatility_every_path_is_the_same(payload in portfolio()) {
        let mut payload = payload;
        for asset in payload["assets"].as_array_mut().expect("assets") {
            asset["vol"] = json!(0.0);
        }
        let result = run(&payload);
        let mean = figure(&result, "/pnl/mean");
        let scale = mean.abs() + 1.0;
        prop_assert!(figure(&result, "/pnl/stdev") <= 1e-9 * scale);
        for i in 0..2 {
            let level = |f: &str| figure(&result, &format!("/levels/{i}/{f}"));
            prop_assert!(close(level("var"), -mean, scale) && close(level("es"), -mean, scale));
            prop_assert!(level("var_se") <= 1e-9 * scale && level("es_se") <= 1e-9 * scale);
        }
    }

    #[test]
    fn one_path_is_its_own_tail(payload in portfolio()) {
        let mut payload = payload;
        payload["paths"] = json!(1);
        let result = run(&payload);
        let mean = figure(&result, "/pnl/mean");
        prop_assert_eq!(figure(&result, "/pnl/stdev"), 0.0);
        for i in 0..2 {
            let level = |f: &str| figure(&result, &format!("/levels/{i}/{f}"));
            prop_assert!(close(level("var"), -mean, mean.abs()) && close(level("es"), -mean, mean.abs()));
            prop_assert_eq!(level("var_se"), 0.0);
        }
    }

    #[test]
    fn identical_assets_act_as_one(
        price in 1.0..500.0_f64, vol in 0.0..0.6_f64, split in -100.0..100.0_f64,
        rest in -100.0..100.0_f64, strike in 0.7..1.3_f64, paths in 1..1_500_u64,
    ) {
        let asset = |name: &str| json!({"name": name, "price": price, "vol": vol, "drift": 0.03});
        let call = |name: &str| json!({"asset": name, "quantity": 5.0, "kind": "call", "strike": price * strike, "expiry_days": 60.0});
        let base = json!({"account": "twins", "horizon_days": 10.0, "paths": paths, "confidence": [0.9, 0.99]});
        let mut one = base.clone();
        one["assets"] = json!([asset("A")]);
        one["correlation"] = json!([[1.0]]);
        one["positions"] = json!([{"asset": "A", "quantity": split + rest}, call("A")]);
        let mut two = base;
        two["assets"] = json!([asset("A"), asset("B")]);
        two["correlation"] = json!([[1.0, 1.0], [1.0, 1.0]]);
        two["positions"] = json!([{"asset": "A", "quantity": split}, {"asset": "B", "quantity": rest}, call("B")]);
        let (one, two) = (run(&one), run(&two));
        let scale = figure(&one, "/pnl/stdev") + figure(&one, "/pnl/mean").abs() + price;
        for (a, b) in headline(&one).into_iter().zip(headline(&two)) {
            prop_assert!(close(a, b, scale), "{a} vs {b}");
        }
    }
}

fn with_paths(mut payload: Value, paths: u64) -> Value {
    payload["paths"] = json!(paths);
    payload
}

#[test]
fn same_bits_on_one_thread_and_two() {
    let payload = with_paths(demo_payload("acme", 7), 5_000);
    let on = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| run(&payload)).to_string()
    };
    assert_eq!(on(1), on(2));
}

/// Fixed figures of one run: the same bits from a debug build, a release
/// build, on x86-64 with or without AVX2 and AVX-512, and on arm64 (no libm,
/// no FMA contraction, no reassociation: nothing depends on the machine).
#[test]
fn known_figures_to_the_last_bit() {
    let result = run(&with_paths(demo_payload("acme", 3), 2_000));
    assert_eq!(figure(&result, "/levels/1/var"), 1_056_347.171_522_688_8);
    assert_eq!(figure(&result, "/levels/1/es"), 1_165_754.865_432_491);
    assert_eq!(figure(&result, "/pnl/stdev"), 492_818.662_340_132_05);
}

/// The whole result, with the hot loops compiled for `isa`.
fn run_on(isa: Isa, payload: &Value) -> String {
    let spec = input::parse(payload, PortfolioKernel::DEFAULT_MAX_PATHS).expect("valid");
    let job = Job::new(&spec, isa);
    let mut tally = Tally::new(job.bins.count);
    assert!(job.advance(&mut tally, &|| false));
    report::report(&job, &tally).0.to_string()
}

/// Each instruction set this CPU has (AVX2, AVX-512 on x86-64) gives the
/// baseline build's bits: the wider vectors run the same operations.
#[test]
fn every_instruction_set_gives_the_same_bits() {
    let payloads = [("acme", 3, 2_000), ("globex", 8, 3_001), ("hooli", 1, 517)]
        .map(|(account, seed, paths)| with_paths(demo_payload(account, seed), paths));
    for payload in &payloads {
        let baseline = run_on(Isa::baseline(), payload);
        for isa in Isa::supported() {
            assert_eq!(run_on(isa, payload), baseline, "{isa:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn every_instruction_set_gives_the_same_bits_on_any_portfolio(payload in portfolio()) {
        let baseline = run_on(Isa::baseline(), &payload);
        for isa in Isa::supported() {
            prop_assert_eq!(run_on(isa, &payload), baseline.clone(), "{:?}", isa);
        }
    }
}

/// Runs `payload` to the end, stopping after `stops[i]` chunk starts in the
/// i-th attempt and resuming from each attempt's checkpoint.
fn run_interrupted(payload: &Value, stops: &[usize]) -> Value {
    let kernel = PortfolioKernel::default();
    let mut checkpoint: Option<Vec<u8>> = None;
    for &after in stops.iter().chain(std::iter::repeat(&usize::MAX)) {
        let started = AtomicUsize::new(0);
        let stop = || started.fetch_add(1, Ordering::SeqCst) >= after;
        match kernel.run_until(payload, checkpoint.as_deref(), &stop) {
            Ok(Outcome::Done { result, .. }) => return result,
            Ok(Outcome::Stopped {
                checkpoint: Some(bytes),
            }) => {
                assert!(
                    bytes.len() < 64 * 1024,
                    "checkpoint of {} bytes",
                    bytes.len()
                );
                checkpoint = Some(bytes);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    unreachable!("the last attempt never stops")
}

#[test]
fn interrupted_runs_resume_to_the_same_bits() {
    let payload = with_paths(demo_payload("globex", 11), 6_000);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    pool.install(|| {
        let whole = run(&payload).to_string();
        for stops in [&[0][..], &[1, 1, 1], &[3, 0, 2], &[5], &[2, 7]] {
            assert_eq!(
                run_interrupted(&payload, stops).to_string(),
                whole,
                "stops {stops:?}"
            );
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn resuming_at_random_chunk_boundaries_gives_the_same_bits(stops in prop::collection::vec(0..8_usize, 1..4)) {
        let payload = with_paths(demo_payload("initech", 5), 4_500);
        prop_assert_eq!(run_interrupted(&payload, &stops).to_string(), run(&payload).to_string());
    }
}

#[test]
fn a_stop_request_returns_a_checkpoint_to_resume_from() {
    let payload = with_paths(demo_payload("acme", 1), 3_000);
    let kernel = PortfolioKernel::default();
    let control = Control::new();
    control.request_stop();
    let Ok(Outcome::Stopped {
        checkpoint: Some(checkpoint),
    }) = kernel.run(&payload, None, &control)
    else {
        panic!("expected a checkpoint");
    };
    let resumed = kernel
        .run(&payload, Some(&checkpoint), &Control::new())
        .expect("resumes");
    let Outcome::Done { result, summary } = resumed else {
        panic!("expected a result")
    };
    assert_eq!(result, run(&payload));
    assert!(
        summary.starts_with("VaR99 ") && summary.ends_with(" (3k paths)"),
        "{summary}"
    );

    let other = with_paths(demo_payload("acme", 2), 3_000);
    let error = kernel
        .run(&other, Some(&checkpoint), &Control::new())
        .unwrap_err();
    assert!(matches!(error, KernelError::Permanent(_)));
    let truncated = &checkpoint[..checkpoint.len() - 1];
    for broken in [&b"garbage"[..], truncated] {
        let error = kernel
            .run(&payload, Some(broken), &Control::new())
            .unwrap_err();
        assert!(matches!(error, KernelError::Permanent(_)));
    }
}

#[test]
fn bad_input_is_a_permanent_error_naming_the_field() {
    let good = single_asset(0.2, 0.0, 10.0, 100, 0);
    let kernel = PortfolioKernel { max_paths: 1_000 };
    let cases: [(&str, Value, &str); 14] = [
        ("/correlation", json!([[1.0, 0.0]]), "correlation"),
        ("/correlation", json!([[2.0]]), "correlation[0][0]"),
        ("/assets/0/vol", json!(-0.1), "assets[0].vol"),
        ("/assets/0/price", json!(0.0), "assets[0].price"),
        ("/paths", json!(0), "paths"),
        ("/paths", json!(1_001), "paths"),
        ("/horizon_days", json!(0.0), "horizon_days"),
        ("/confidence", json!([1.0]), "confidence[0]"),
        ("/confidence", json!([]), "confidence"),
        ("/positions/0/asset", json!("B"), "positions[0].asset"),
        ("/positions/0/strike", json!(100.0), "positions[0]"),
        ("/positions/0/kind", json!("call"), "positions[0].strike"),
        ("/positions/0/quantity", json!(f64::NAN), "null"),
        ("/histogram_bins", json!(0), "histogram_bins"),
    ];
    for (pointer, value, named) in cases {
        let mut payload = good.clone();
        let (parent, field) = pointer.rsplit_once('/').expect("a pointer");
        payload.pointer_mut(parent).expect("parent")[field] = value;
        match kernel.run(&payload, None, &Control::new()) {
            Err(KernelError::Permanent(message)) => {
                assert!(message.contains(named), "{pointer}: {message}")
            }
            other => panic!("{pointer}: expected a permanent error, got {other:?}"),
        }
    }
    let mut deep = single_asset(0.2, 0.0, 10.0, 10_000_000, 0);
    deep["confidence"] = json!([0.5]);
    let error = PortfolioKernel::default().run(&deep, None, &Control::new());
    assert!(
        matches!(error, Err(KernelError::Permanent(m)) if m.contains("the tail the kernel keeps"))
    );
}

#[test]
fn rejects_a_correlation_that_is_not_positive_semidefinite_or_symmetric() {
    let mut payload = json!({
        "horizon_days": 1.0, "paths": 10, "confidence": [0.99],
        "assets": [{"name": "A", "price": 1.0, "vol": 0.1}, {"name": "B", "price": 1.0, "vol": 0.1}, {"name": "C", "price": 1.0, "vol": 0.1}],
        "correlation": [[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]],
        "positions": [{"asset": "A", "quantity": 1.0}],
    });
    let message =
        |payload: &Value| match PortfolioKernel::default().run(payload, None, &Control::new()) {
            Err(KernelError::Permanent(message)) => message,
            other => panic!("expected a permanent error, got {other:?}"),
        };
    assert!(message(&payload).contains("not positive semi-definite"));
    payload["correlation"] = json!([[1.0, 0.5, 0.0], [0.4, 1.0, 0.0], [0.0, 0.0, 1.0]]);
    assert!(message(&payload).contains("not symmetric"));
}

#[test]
fn demo_payloads_are_valid_and_differ_by_account() {
    let sizes: Vec<usize> = ["acme", "globex", "initech", "umbrella", "hooli"]
        .iter()
        .map(|account| {
            let payload = demo_payload(account, 0);
            assert_eq!(payload["paths"], 20_000);
            let positions = payload["positions"].as_array().expect("positions").len();
            assert!((20..=50).contains(&positions), "{positions} positions");
            run(&with_paths(payload, 500));
            positions
        })
        .collect();
    assert!(sizes.windows(2).any(|w| w[0] != w[1]));
    assert_eq!(demo_payload("acme", 0), demo_payload("acme", 0));
    assert_ne!(demo_payload("acme", 0), demo_payload("acme", 1));
}
