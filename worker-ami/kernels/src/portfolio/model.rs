//! The market model and the portfolio's revaluation, a block of `LANES`
//! paths at a time: every inner loop runs over the lanes, so it vectorises.
//! The block functions are `#[inline(always)]`, so that each of `isa`'s
//! versions of the loops that call them gets its own vectors.
//!
//! Path `p` draws words `p·D .. (p+1)·D` of the account's stream (`D` is the
//! number of assets rounded up to even), turns them into standard normals,
//! correlates them with the Cholesky factor, moves every asset to
//! `S·exp((μ − σ²/2)·T + σ·√T·x)`, and revalues the positions there: shares
//! at the new price, options with Black-Scholes at their remaining life.

use super::input::{Asset, Kind, Position, Spec, TRADING_DAYS};
use super::{math, rng};

pub const LANES: usize = 16;
pub type Lanes = [f64; LANES];

#[derive(Debug)]
pub struct Model {
    draws_per_path: u64,
    /// Cholesky factor, packed by rows.
    factor: Vec<f64>,
    /// Per asset: (μ − σ²/2)·T and σ·√T.
    drift: Vec<f64>,
    vol: Vec<f64>,
    /// Per asset: Σ quantity·price over its equity positions.
    equity_weight: Vec<f64>,
    legs: Vec<Leg>,
    holdings: Vec<Holding>,
    /// The portfolio's value today.
    pub value: f64,
}

#[derive(Debug)]
enum Holding {
    Equity { asset: usize, weight: f64 },
    Option { leg: usize },
}

/// An option position.
#[derive(Debug)]
struct Leg {
    asset: usize,
    quantity: f64,
    price: f64,
    /// Its value per unit today.
    value: f64,
    /// +1 for a call, −1 for a put.
    sign: f64,
    pricing: Pricing,
}

#[derive(Debug)]
enum Pricing {
    /// Black-Scholes at the horizon: d1 = `d1_base + d1_slope·x` for the
    /// asset's correlated normal x; d2 = d1 − `spread`.
    BlackScholes {
        d1_base: f64,
        d1_slope: f64,
        spread: f64,
        discounted_strike: f64,
        /// price / discounted_strike: φ(d2) = φ(d1)·S_T/(K·e^(−rτ)), one exp fewer.
        forward_ratio: f64,
    },
    /// No volatility left: worth its forward intrinsic value. (An option that
    /// expires before the horizon is taken at its intrinsic value there.)
    Intrinsic { discounted_strike: f64 },
}

/// Black-Scholes value per unit; `sign` +1 for a call, −1 for a put.
fn black_scholes(sign: f64, price: f64, strike: f64, rate: f64, vol: f64, years: f64) -> f64 {
    let discounted = strike * math::exp(-rate * years.max(0.0));
    let spread = vol * years.max(0.0).sqrt();
    if spread == 0.0 {
        return (sign * (price - discounted)).max(0.0);
    }
    let d1 = (math::ln(price / strike) + (rate + 0.5 * vol * vol) * years) / spread;
    sign * (price * math::norm_cdf(sign * d1) - discounted * math::norm_cdf(sign * (d1 - spread)))
}

/// The per-thread buffers one block of paths needs; allocated once, reused.
#[derive(Debug)]
pub struct Scratch {
    normals: Vec<Lanes>,
    /// Per asset: the correlated standard normal, and S_T / S_0.
    moves: Vec<Lanes>,
    growth: Vec<Lanes>,
}

impl Model {
    pub fn new(spec: &Spec) -> Self {
        let payload = &spec.payload;
        let assets = &payload.assets;
        let horizon = payload.horizon_days / TRADING_DAYS;
        let mut equity_weight = vec![0.0; assets.len()];
        let mut legs = Vec::new();
        let mut value = 0.0;
        let holdings = payload
            .positions
            .iter()
            .zip(&spec.asset_of)
            .map(|(position, &asset)| {
                if position.kind == Kind::Equity {
                    let weight = position.quantity * assets[asset].price;
                    equity_weight[asset] += weight;
                    value += weight;
                    return Holding::Equity { asset, weight };
                }
                let leg = Leg::new(position, asset, &assets[asset], horizon, payload.rate);
                value += leg.quantity * leg.value;
                legs.push(leg);
                Holding::Option {
                    leg: legs.len() - 1,
                }
            })
            .collect();
        Self {
            draws_per_path: assets.len().next_multiple_of(2) as u64,
            factor: spec.factor.clone(),
            drift: assets
                .iter()
                .map(|a| (a.drift - 0.5 * a.vol * a.vol) * horizon)
                .collect(),
            vol: assets.iter().map(|a| a.vol * horizon.sqrt()).collect(),
            equity_weight,
            legs,
            holdings,
            value,
        }
    }

    pub fn positions(&self) -> usize {
        self.holdings.len()
    }

    pub fn scratch(&self) -> Scratch {
        let assets = self.drift.len();
        Scratch {
            normals: vec![[0.0; LANES]; self.draws_per_path as usize],
            moves: vec![[0.0; LANES]; assets],
            growth: vec![[0.0; LANES]; assets],
        }
    }

    /// Moves the market along `paths` of stream `key`, into `scratch`.
    #[inline(always)]
    pub fn simulate(&self, key: u64, paths: &[u64; LANES], scratch: &mut Scratch) {
        let first: [u64; LANES] =
            std::array::from_fn(|lane| rng::state(key, paths[lane] * self.draws_per_path));
        // In stages over the lanes: short loop bodies let the CPU overlap lanes.
        for (pair, normals) in scratch.normals.chunks_exact_mut(2).enumerate() {
            let offset = (2 * pair as u64).wrapping_mul(rng::GAMMA);
            let mut words = [[0; LANES]; 2];
            for lane in 0..LANES {
                let state = first[lane].wrapping_add(offset);
                words[0][lane] = rng::mix(state);
                words[1][lane] = rng::mix(state.wrapping_add(rng::GAMMA));
            }
            let radius = words[0].map(rng::radius);
            let angle = words[1];
            let (z0, z1) = normals.split_at_mut(1);
            for lane in 0..LANES {
                let (cos, sin) = rng::direction(angle[lane]);
                z0[0][lane] = radius[lane] * cos;
                z1[0][lane] = radius[lane] * sin;
            }
        }
        let mut row_start = 0;
        for (asset, (moves, growth)) in scratch
            .moves
            .iter_mut()
            .zip(&mut scratch.growth)
            .enumerate()
        {
            let row = &self.factor[row_start..=row_start + asset];
            row_start += asset + 1;
            let mut x = [0.0; LANES];
            for (l, z) in row.iter().zip(&scratch.normals) {
                for lane in 0..LANES {
                    x[lane] += l * z[lane];
                }
            }
            let (drift, vol) = (self.drift[asset], self.vol[asset]);
            for lane in 0..LANES {
                growth[lane] = math::exp(drift + vol * x[lane]);
            }
            *moves = x;
        }
    }

    /// The portfolio's P&L on each path of the last `simulate`.
    #[inline(always)]
    pub fn pnl(&self, scratch: &Scratch, pnl: &mut Lanes) {
        *pnl = [0.0; LANES];
        for (&weight, growth) in self.equity_weight.iter().zip(&scratch.growth) {
            if weight != 0.0 {
                for lane in 0..LANES {
                    pnl[lane] += weight * (growth[lane] - 1.0);
                }
            }
        }
        let mut values = [0.0; LANES];
        for leg in &self.legs {
            leg.values(scratch, &mut values);
            for lane in 0..LANES {
                pnl[lane] += leg.quantity * (values[lane] - leg.value);
            }
        }
    }

    /// One position's P&L on each path of the last `simulate`.
    #[inline(always)]
    pub fn position_pnl(&self, position: usize, scratch: &Scratch, pnl: &mut Lanes) {
        match self.holdings[position] {
            Holding::Equity { asset, weight } => {
                for (p, g) in pnl.iter_mut().zip(&scratch.growth[asset]) {
                    *p = weight * (g - 1.0);
                }
            }
            Holding::Option { leg } => {
                let leg = &self.legs[leg];
                leg.values(scratch, pnl);
                for p in pnl.iter_mut() {
                    *p = leg.quantity * (*p - leg.value);
                }
            }
        }
    }
}

impl Leg {
    fn new(position: &Position, asset: usize, underlying: &Asset, horizon: f64, rate: f64) -> Self {
        let sign = if position.kind == Kind::Call {
            1.0
        } else {
            -1.0
        };
        let strike = position.strike.unwrap_or_default();
        let expiry = position.expiry_days.unwrap_or_default() / TRADING_DAYS;
        let (price, vol) = (underlying.price, underlying.vol);
        let left = (expiry - horizon).max(0.0);
        let discounted_strike = strike * math::exp(-rate * left);
        let spread = vol * left.sqrt();
        let pricing = if spread > 0.0 {
            let drift = (underlying.drift - 0.5 * vol * vol) * horizon;
            Pricing::BlackScholes {
                d1_base: (math::ln(price / strike) + drift + (rate + 0.5 * vol * vol) * left)
                    / spread,
                d1_slope: vol * horizon.sqrt() / spread,
                spread,
                discounted_strike,
                forward_ratio: price / discounted_strike,
            }
        } else {
            Pricing::Intrinsic { discounted_strike }
        };
        Self {
            asset,
            quantity: position.quantity,
            price,
            value: black_scholes(sign, price, strike, rate, vol, expiry),
            sign,
            pricing,
        }
    }

    /// Value per unit at the horizon on each path.
    #[inline(always)]
    fn values(&self, scratch: &Scratch, out: &mut Lanes) {
        let (moves, growth) = (&scratch.moves[self.asset], &scratch.growth[self.asset]);
        let sign = self.sign;
        match self.pricing {
            Pricing::BlackScholes {
                d1_base,
                d1_slope,
                spread,
                discounted_strike,
                forward_ratio,
            } => {
                let d1: Lanes = std::array::from_fn(|lane| d1_base + d1_slope * moves[lane]);
                let gauss1 = d1.map(|d| math::exp(-0.5 * d * d));
                for lane in 0..LANES {
                    // Bounded inputs keep the ratio below 1e150, so where gauss1
                    // underflows, gauss2 is negligible too.
                    let gauss2 = gauss1[lane] * (forward_ratio * growth[lane]);
                    let n1 = math::norm_cdf_given(sign * d1[lane], gauss1[lane]);
                    let n2 = math::norm_cdf_given(sign * (d1[lane] - spread), gauss2);
                    out[lane] = sign * (self.price * growth[lane] * n1 - discounted_strike * n2);
                }
            }
            Pricing::Intrinsic { discounted_strike } => {
                for lane in 0..LANES {
                    out[lane] = (sign * (self.price * growth[lane] - discounted_strike)).max(0.0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::portfolio::input;

    #[test]
    fn options_are_revalued_with_black_scholes_at_the_horizon() {
        let (rate, vol, horizon) = (0.03, 0.3, 10.0);
        // (strike, expiry in days, +1 call / −1 put); the last one expires first.
        let options = [(105.0, 60.0, 1.0), (95.0, 30.0, -1.0), (99.0, 5.0, 1.0)];
        let positions: Vec<_> = options
            .iter()
            .map(|&(strike, days, sign)| {
                let kind = if sign > 0.0 { "call" } else { "put" };
                json!({"asset": "A", "quantity": 2.0, "kind": kind, "strike": strike, "expiry_days": days})
            })
            .collect();
        let payload = json!({
            "rate": rate, "horizon_days": horizon, "paths": 16, "confidence": [0.99],
            "assets": [{"name": "A", "price": 100.0, "vol": vol, "drift": 0.05}],
            "correlation": [[1.0]], "positions": positions,
        });
        let model = Model::new(&input::parse(&payload, 16).expect("valid"));
        let mut scratch = model.scratch();
        model.simulate(9, &std::array::from_fn(|lane| lane as u64), &mut scratch);
        let mut pnl = [0.0; LANES];
        for (position, &(strike, days, sign)) in options.iter().enumerate() {
            model.position_pnl(position, &scratch, &mut pnl);
            let today = black_scholes(sign, 100.0, strike, rate, vol, days / TRADING_DAYS);
            for (lane, pnl) in pnl.iter().enumerate() {
                let price = 100.0 * scratch.growth[0][lane];
                let left = (days - horizon) / TRADING_DAYS;
                let then = black_scholes(sign, price, strike, rate, vol, left);
                assert!(
                    (pnl - 2.0 * (then - today)).abs() < 1e-10,
                    "position {position}"
                );
            }
        }
    }

    #[test]
    fn black_scholes_matches_known_prices() {
        // Hull's textbook example: S 42, K 40, r 10%, vol 20%, half a year.
        let call = black_scholes(1.0, 42.0, 40.0, 0.1, 0.2, 0.5);
        let put = black_scholes(-1.0, 42.0, 40.0, 0.1, 0.2, 0.5);
        assert!((call - 4.759_422_392).abs() < 1e-8, "{call}");
        assert!((put - 0.808_599_372).abs() < 1e-8, "{put}");
        // Put-call parity.
        let forward = 42.0 - 40.0 * (-0.05_f64).exp();
        assert!((call - put - forward).abs() < 1e-12);
        assert_eq!(
            black_scholes(1.0, 42.0, 40.0, 0.1, 0.0, 0.5),
            42.0 - 40.0 * math::exp(-0.05)
        );
    }
}
