//! The market model and the portfolio's revaluation, a block of `LANES`
//! paths at a time: every inner loop runs over the lanes, so it vectorises.
//!
//! Path `p` draws words `p·D .. (p+1)·D` of the account's stream (`D` is the
//! number of assets rounded up to even), turns them into standard normals,
//! correlates them with the Cholesky factor, moves every asset to
//! `S·exp((μ − σ²/2)·T + σ·√T·x)`, and revalues the positions there: shares
//! at the new price, options with Black-Scholes at their remaining life.

use super::input::{Kind, Spec, TRADING_DAYS};
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
    BlackScholes { d1_base: f64, d1_slope: f64, spread: f64, discounted_strike: f64 },
    /// Expired by the horizon, or no volatility left: worth its (forward) intrinsic value.
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
        let rate = payload.rate;
        let mut equity_weight = vec![0.0; assets.len()];
        let mut legs = Vec::new();
        let mut value = 0.0;
        let holdings = payload
            .positions
            .iter()
            .zip(&spec.asset_of)
            .map(|(position, &asset)| {
                let underlying = &assets[asset];
                let sign = match position.kind {
                    Kind::Equity => {
                        let weight = position.quantity * underlying.price;
                        equity_weight[asset] += weight;
                        value += weight;
                        return Holding::Equity { asset, weight };
                    }
                    Kind::Call => 1.0,
                    Kind::Put => -1.0,
                };
                let (strike, expiry) = (
                    position.strike.unwrap_or_default(),
                    position.expiry_days.unwrap_or_default() / TRADING_DAYS,
                );
                let vol = underlying.vol;
                let left = expiry - horizon;
                let unit_value = black_scholes(sign, underlying.price, strike, rate, vol, expiry);
                value += position.quantity * unit_value;
                let discounted_strike = strike * math::exp(-rate * left.max(0.0));
                let spread = vol * left.max(0.0).sqrt();
                let pricing = if spread > 0.0 {
                    let log_moneyness = math::ln(underlying.price / strike);
                    let drift = (underlying.drift - 0.5 * vol * vol) * horizon;
                    Pricing::BlackScholes {
                        d1_base: (log_moneyness + drift + (rate + 0.5 * vol * vol) * left) / spread,
                        d1_slope: vol * horizon.sqrt() / spread,
                        spread,
                        discounted_strike,
                    }
                } else {
                    Pricing::Intrinsic { discounted_strike }
                };
                legs.push(Leg {
                    asset,
                    quantity: position.quantity,
                    price: underlying.price,
                    value: unit_value,
                    sign,
                    pricing,
                });
                Holding::Option { leg: legs.len() - 1 }
            })
            .collect();
        Self {
            draws_per_path: assets.len().next_multiple_of(2) as u64,
            factor: spec.factor.clone(),
            drift: assets.iter().map(|a| (a.drift - 0.5 * a.vol * a.vol) * horizon).collect(),
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
    pub fn simulate(&self, key: u64, paths: &[u64; LANES], scratch: &mut Scratch) {
        for (pair, normals) in scratch.normals.chunks_exact_mut(2).enumerate() {
            let (first, second) = normals.split_at_mut(1);
            let offset = 2 * pair as u64;
            for lane in 0..LANES {
                let counter = paths[lane] * self.draws_per_path + offset;
                let (a, b) = rng::normal_pair(rng::word(key, counter), rng::word(key, counter + 1));
                first[0][lane] = a;
                second[0][lane] = b;
            }
        }
        let mut row_start = 0;
        for (asset, (moves, growth)) in scratch.moves.iter_mut().zip(&mut scratch.growth).enumerate() {
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
    /// Value per unit at the horizon on each path.
    fn values(&self, scratch: &Scratch, out: &mut Lanes) {
        let (moves, growth) = (&scratch.moves[self.asset], &scratch.growth[self.asset]);
        let sign = self.sign;
        match self.pricing {
            Pricing::BlackScholes { d1_base, d1_slope, spread, discounted_strike } => {
                for lane in 0..LANES {
                    let d1 = d1_base + d1_slope * moves[lane];
                    let price = self.price * growth[lane];
                    out[lane] = sign
                        * (price * math::norm_cdf(sign * d1)
                            - discounted_strike * math::norm_cdf(sign * (d1 - spread)));
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
    use super::*;

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
        assert_eq!(black_scholes(1.0, 42.0, 40.0, 0.1, 0.0, 0.5), 42.0 - 40.0 * math::exp(-0.05));
    }
}
