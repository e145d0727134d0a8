//! Made-up but realistic portfolios, for the demo and the benchmark: shares
//! in a few sectors (a market factor plus a sector factor make the
//! correlation), and options on some of them.

use serde_json::{Value, json};

use super::rng;

/// Paths in a demo task: about 12 ms of one core in a release build, 1 s in a debug build.
const DEMO_PATHS: u64 = 20_000;
const DEMO_STREAM: u64 = 0x6465_6d6f;
const BENCH_STREAM: u64 = 0x0062_656e_6368;
const SECTORS: [&str; 4] = ["TECH", "BANK", "ENRG", "HLTH"];

/// One account's portfolio: 16 to 35 shares and 4 to 15 options (20 to 50
/// positions), 20,000 paths over 10 days at 95% and 99%.
pub fn demo_payload(account: &str, seed: u64) -> Value {
    let mut draw = Draw {
        key: rng::hash(seed, account.as_bytes()) ^ DEMO_STREAM,
        counter: 0,
    };
    let assets = 16 + draw.below(20);
    let options = 4 + draw.below(12);
    generate(account, seed, assets, options, DEMO_PATHS, &mut draw)
}

/// The benchmark's portfolio: 40 share and 10 option positions.
pub fn bench_payload(paths: u64) -> Value {
    let mut draw = Draw {
        key: BENCH_STREAM,
        counter: 0,
    };
    generate("bench", 1, 40, 10, paths, &mut draw)
}

struct Draw {
    key: u64,
    counter: u64,
}

impl Draw {
    fn unit(&mut self) -> f64 {
        self.counter += 1;
        (rng::word(self.key, self.counter) >> 11) as f64 / (1_u64 << 53) as f64
    }

    fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n - 1)
    }
}

fn round_to(x: f64, step: f64) -> f64 {
    (x / step).round() * step
}

fn generate(
    account: &str,
    seed: u64,
    assets: usize,
    options: usize,
    paths: u64,
    draw: &mut Draw,
) -> Value {
    struct Name {
        sector: usize,
        market: f64,
        own: f64,
        price: f64,
    }
    let names: Vec<Name> = (0..assets)
        .map(|_| Name {
            sector: draw.below(SECTORS.len()),
            market: draw.uniform(0.3, 0.7),
            own: draw.uniform(0.2, 0.5),
            price: round_to(draw.uniform(10.0, 400.0), 0.01),
        })
        .collect();
    let ticker = |i: usize| format!("{}{i:02}", SECTORS[names[i].sector]);
    let asset_list: Vec<Value> = (0..assets)
        .map(|i| {
            json!({
                "name": ticker(i),
                "price": names[i].price,
                "vol": round_to(draw.uniform(0.15, 0.55), 0.001),
                "drift": round_to(draw.uniform(0.0, 0.1), 0.001),
            })
        })
        .collect();
    // One market factor and one factor per sector: positive definite by construction.
    let correlation: Vec<Vec<f64>> = (0..assets)
        .map(|i| {
            (0..assets)
                .map(|j| {
                    let (a, b) = (&names[i], &names[j]);
                    if i == j {
                        1.0
                    } else {
                        let sector = if a.sector == b.sector {
                            a.own * b.own
                        } else {
                            0.0
                        };
                        round_to(a.market * b.market + sector, 1e-4)
                    }
                })
                .collect()
        })
        .collect();
    let mut positions: Vec<Value> = (0..assets)
        .map(|i| {
            let shares = round_to(draw.uniform(100.0, 5_000.0), 10.0);
            let short = draw.unit() < 0.2;
            json!({"asset": ticker(i), "quantity": if short { -shares } else { shares }})
        })
        .collect();
    positions.extend((0..options).map(|_| {
        let i = draw.below(assets);
        let kind = if draw.unit() < 0.5 { "call" } else { "put" };
        let contracts = round_to(draw.uniform(10.0, 200.0), 10.0);
        let quantity = if draw.unit() < 0.4 {
            -contracts
        } else {
            contracts
        };
        json!({
            "asset": ticker(i),
            "quantity": quantity,
            "kind": kind,
            "strike": round_to(names[i].price * draw.uniform(0.85, 1.15), 0.5),
            "expiry_days": (5 + draw.below(246)) as f64,
        })
    }));
    json!({
        "account": account,
        "seed": seed,
        "rate": 0.03,
        "horizon_days": 10.0,
        "paths": paths,
        "confidence": [0.95, 0.99],
        "assets": asset_list,
        "correlation": correlation,
        "positions": positions,
    })
}

/// A demo portfolio of at least `min_bytes` of JSON (up to the kernel's
/// most positions): the demo's, with more share positions on its names.
pub fn sized_payload(account: &str, seed: u64, min_bytes: usize) -> Value {
    let mut payload = demo_payload(account, seed);
    let names: Vec<Value> = payload["assets"]
        .as_array()
        .map(|assets| assets.iter().map(|a| a["name"].clone()).collect())
        .unwrap_or_default();
    let mut size = payload.to_string().len();
    if let Some(positions) = payload["positions"].as_array_mut() {
        let mut draw = Draw {
            key: rng::hash(seed, account.as_bytes()) ^ DEMO_STREAM ^ 1,
            counter: 0,
        };
        while size < min_bytes && positions.len() < super::input::MAX_POSITIONS {
            let position = json!({
                "asset": names[draw.below(names.len())],
                "quantity": round_to(draw.uniform(100.0, 5_000.0), 10.0),
            });
            // The entry, and the comma before it.
            size += position.to_string().len() + 1;
            positions.push(position);
        }
    }
    payload
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sized_payload_reaches_its_size_and_stays_valid() {
        let base = demo_payload("acct-1", 7).to_string().len();
        for min_bytes in [0, 20_000, 300_000] {
            let payload = sized_payload("acct-1", 7, min_bytes);
            let size = payload.to_string().len();
            assert!(size >= min_bytes, "{size} < {min_bytes}");
            assert!(
                size < min_bytes.max(base) + 100,
                "{size} overshoots {min_bytes}"
            );
            if let Err(error) = crate::portfolio::input::parse(&payload, DEMO_PATHS) {
                panic!("{min_bytes}: {error}");
            }
        }
    }
}
