//! The task payload: its shape, and the checks that make bad input a
//! permanent error naming the field.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::linalg;
use crate::KernelError;

/// Horizon and expiries are counted in trading days.
pub const TRADING_DAYS: f64 = 252.0;

const MAX_ASSETS: usize = 1_024;
pub(super) const MAX_POSITIONS: usize = 10_000;
const MAX_LEVELS: usize = 16;
const MAX_BINS: usize = 1_024;
/// The most tail paths a level may have: the tally keeps them all (12 bytes
/// each in a checkpoint).
const MAX_TAIL: f64 = 2_000_000.0;
const MAX_HORIZON_DAYS: f64 = 2_520.0;
const MAX_EXPIRY_DAYS: f64 = 25_200.0;
/// Bounds on prices, strikes and quantities that keep every P&L finite.
const MIN_PRICE: f64 = 1e-9;
const MAX_PRICE: f64 = 1e12;
const MAX_QUANTITY: f64 = 1e12;
const MAX_VOL: f64 = 5.0;
const MAX_DRIFT: f64 = 5.0;
const MAX_RATE: f64 = 1.0;
/// How far the correlation matrix may be from symmetric with a unit diagonal.
const MATRIX_TOLERANCE: f64 = 1e-9;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// With `seed`, names the random stream.
    #[serde(default)]
    pub account: String,
    #[serde(default)]
    pub seed: u64,
    pub assets: Vec<Asset>,
    /// Correlation of the assets' log-returns, in the order of `assets`.
    pub correlation: Vec<Vec<f64>>,
    pub positions: Vec<Position>,
    /// Risk-free rate (continuously compounded, per year) for option values.
    #[serde(default)]
    pub rate: f64,
    pub horizon_days: f64,
    pub paths: u64,
    /// Confidence levels for VaR and ES, e.g. `[0.95, 0.99]`.
    pub confidence: Vec<f64>,
    #[serde(default = "default_bins")]
    pub histogram_bins: usize,
}

fn default_bins() -> usize {
    32
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Asset {
    pub name: String,
    pub price: f64,
    /// Annual volatility of the log-price.
    pub vol: f64,
    /// Annual expected return (real-world drift).
    #[serde(default)]
    pub drift: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Equity,
    Call,
    Put,
}

/// Shares of an asset, or European options on it (one share per unit).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    pub asset: String,
    pub quantity: f64,
    #[serde(default)]
    pub kind: Kind,
    pub strike: Option<f64>,
    pub expiry_days: Option<f64>,
}

/// A payload that passed every check, with what the checks computed.
#[derive(Debug)]
pub struct Spec {
    pub payload: Payload,
    /// The index in `assets` of each position's asset.
    pub asset_of: Vec<usize>,
    /// Cholesky factor of `correlation`, packed by rows.
    pub factor: Vec<f64>,
}

fn invalid(message: String) -> KernelError {
    KernelError::Permanent(message)
}

fn check(ok: bool, message: impl FnOnce() -> String) -> Result<(), KernelError> {
    if ok { Ok(()) } else { Err(invalid(message())) }
}

fn in_range(x: f64, low: f64, high: f64) -> bool {
    x.is_finite() && (low..=high).contains(&x)
}

pub fn parse(value: &Value, max_paths: u64) -> Result<Spec, KernelError> {
    let payload = Payload::deserialize(value).map_err(|e| invalid(e.to_string()))?;
    check((1..=max_paths).contains(&payload.paths), || {
        format!("paths: must be between 1 and {max_paths}")
    })?;
    check(payload.paths <= u64::from(u32::MAX), || {
        "paths: too many".into()
    })?;
    check(
        payload.horizon_days.is_finite()
            && payload.horizon_days > 0.0
            && payload.horizon_days <= MAX_HORIZON_DAYS,
        || format!("horizon_days: must be above 0 and at most {MAX_HORIZON_DAYS}"),
    )?;
    check(in_range(payload.rate, -MAX_RATE, MAX_RATE), || {
        format!("rate: must be between -{MAX_RATE} and {MAX_RATE}")
    })?;
    check((1..=MAX_LEVELS).contains(&payload.confidence.len()), || {
        format!("confidence: give 1 to {MAX_LEVELS} levels")
    })?;
    for (i, level) in payload.confidence.iter().enumerate() {
        check(level.is_finite() && (0.5..1.0).contains(level), || {
            format!("confidence[{i}]: must be at least 0.5 and below 1")
        })?;
        check((1.0 - level) * payload.paths as f64 <= MAX_TAIL, || {
            format!(
                "confidence[{i}]: (1 - confidence) x paths must be at most {MAX_TAIL}, the tail the kernel keeps"
            )
        })?;
    }
    check((1..=MAX_BINS).contains(&payload.histogram_bins), || {
        format!("histogram_bins: must be between 1 and {MAX_BINS}")
    })?;
    let index = check_assets(&payload.assets)?;
    let factor = check_correlation(&payload.correlation, payload.assets.len())?;
    let asset_of = check_positions(&payload.positions, &index)?;
    Ok(Spec {
        payload,
        asset_of,
        factor,
    })
}

fn check_assets(assets: &[Asset]) -> Result<HashMap<&str, usize>, KernelError> {
    check((1..=MAX_ASSETS).contains(&assets.len()), || {
        format!("assets: give 1 to {MAX_ASSETS}")
    })?;
    let mut index = HashMap::new();
    for (i, asset) in assets.iter().enumerate() {
        check(!asset.name.is_empty(), || {
            format!("assets[{i}].name: empty")
        })?;
        check(index.insert(asset.name.as_str(), i).is_none(), || {
            format!("assets[{i}].name: {:?} appears twice", asset.name)
        })?;
        check(in_range(asset.price, MIN_PRICE, MAX_PRICE), || {
            format!("assets[{i}].price: must be between {MIN_PRICE} and {MAX_PRICE}")
        })?;
        check(in_range(asset.vol, 0.0, MAX_VOL), || {
            format!("assets[{i}].vol: must be between 0 and {MAX_VOL}")
        })?;
        check(in_range(asset.drift, -MAX_DRIFT, MAX_DRIFT), || {
            format!("assets[{i}].drift: must be between -{MAX_DRIFT} and {MAX_DRIFT}")
        })?;
    }
    Ok(index)
}

fn check_correlation(matrix: &[Vec<f64>], n: usize) -> Result<Vec<f64>, KernelError> {
    check(
        matrix.len() == n && matrix.iter().all(|row| row.len() == n),
        || format!("correlation: must be a {n}x{n} matrix, one row and column per asset"),
    )?;
    for (i, row) in matrix.iter().enumerate() {
        for (j, &c) in row.iter().enumerate() {
            check(c.is_finite() && c.abs() <= 1.0 + MATRIX_TOLERANCE, || {
                format!("correlation[{i}][{j}]: must be between -1 and 1")
            })?;
            check((c - matrix[j][i]).abs() <= MATRIX_TOLERANCE, || {
                format!("correlation: not symmetric at [{i}][{j}]")
            })?;
        }
        check((row[i] - 1.0).abs() <= MATRIX_TOLERANCE, || {
            format!("correlation[{i}][{i}]: the diagonal must be 1")
        })?;
    }
    linalg::cholesky(matrix).map_err(|row| {
        invalid(format!(
            "correlation: not positive semi-definite (fails at row {row}, asset {row} against those before it)"
        ))
    })
}

fn check_positions(
    positions: &[Position],
    index: &HashMap<&str, usize>,
) -> Result<Vec<usize>, KernelError> {
    check((1..=MAX_POSITIONS).contains(&positions.len()), || {
        format!("positions: give 1 to {MAX_POSITIONS}")
    })?;
    positions
        .iter()
        .enumerate()
        .map(|(i, position)| {
            let asset = *index.get(position.asset.as_str()).ok_or_else(|| {
                invalid(format!("positions[{i}].asset: no asset named {:?}", position.asset))
            })?;
            check(in_range(position.quantity, -MAX_QUANTITY, MAX_QUANTITY), || {
                format!("positions[{i}].quantity: must be a number of magnitude at most {MAX_QUANTITY}")
            })?;
            match position.kind {
                Kind::Equity => check(
                    position.strike.is_none() && position.expiry_days.is_none(),
                    || format!("positions[{i}]: strike and expiry_days are for options only"),
                )?,
                Kind::Call | Kind::Put => {
                    let strike = position.strike.unwrap_or(f64::NAN);
                    check(in_range(strike, MIN_PRICE, MAX_PRICE), || {
                        format!("positions[{i}].strike: an option needs one between {MIN_PRICE} and {MAX_PRICE}")
                    })?;
                    let expiry = position.expiry_days.unwrap_or(f64::NAN);
                    check(expiry.is_finite() && expiry > 0.0 && expiry <= MAX_EXPIRY_DAYS, || {
                        format!("positions[{i}].expiry_days: an option needs one above 0 and at most {MAX_EXPIRY_DAYS}")
                    })?;
                }
            }
            Ok(asset)
        })
        .collect()
}
