//! The finished tally turned into the task's result and its one-line summary.
//!
//! Standard errors are the usual large-sample ones: σ/√N for the mean; the
//! delta method for the standard deviation, √((m₄ − σ⁴)/(4σ²N)); for VaR
//! √(α(1−α)/N)/f(VaR), with the density f estimated from the spacing of the
//! order statistics around VaR; for ES √((Var(L | tail) + α(ES − VaR)²)/k)
//! over the k tail paths; for a contribution, the spread of that position's
//! losses over the tail paths divided by √k.

use serde_json::{Value, json};

use super::job::{Job, Level, TailSums};
use super::tally::{TailPath, Tally};

pub fn report(job: &Job, tally: &Tally) -> (Value, String) {
    let n = job.paths as f64;
    let [s1, s2, s3, s4] = tally.sums.map(|s| s / n);
    let mean = job.shift + s1;
    let m2 = (s2 - s1 * s1).max(0.0);
    let m4 = (s4 - 4.0 * s1 * s3 + 6.0 * s1 * s1 * s2 - 3.0 * s1 * s1 * s1 * s1).max(0.0);
    let stdev = if job.paths > 1 {
        (m2 * n / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    let stdev_se = if m2 > 0.0 {
        ((m4 - m2 * m2).max(0.0) / (4.0 * m2 * n)).sqrt()
    } else {
        0.0
    };
    let (levels, headlines): (Vec<Value>, Vec<Headline>) = job
        .levels
        .iter()
        .zip(job.tail_sums(&tally.tail))
        .map(|(level, sums)| level_report(level, &tally.tail, &sums, n))
        .unzip();
    let bins = job.bins.count;
    let result = json!({
        "paths": job.paths,
        "horizon_days": job.horizon_days,
        "value": job.model.value,
        "pnl": {
            "mean": mean,
            "mean_se": stdev / n.sqrt(),
            "stdev": stdev,
            "stdev_se": stdev_se,
            "min": tally.min,
            "max": tally.max,
        },
        "levels": levels,
        "histogram": {
            "of": "pnl",
            "low": job.bins.low,
            "bin_width": job.bins.width,
            "counts": &tally.counts[1..=bins],
            "below": tally.counts[0],
            "above": tally.counts[bins + 1],
        },
    });
    (result, summary(job.paths, &headlines))
}

/// The figures of one level that the summary shows.
#[derive(Debug, Clone, Copy)]
struct Headline {
    confidence: f64,
    var: f64,
    es: f64,
}

fn level_report(level: &Level, tail: &[TailPath], sums: &TailSums, n: f64) -> (Value, Headline) {
    let k = level.tail;
    let alpha = level.confidence;
    let var = tail[k - 1].loss;
    let es = tail[..k].iter().map(|t| t.loss).sum::<f64>() / k as f64;
    let low = (k - 1).saturating_sub(level.spacing);
    let high = (k - 1 + level.spacing).min(tail.len() - 1);
    let var_se = if high > low {
        let inverse_density = (tail[low].loss - tail[high].loss) * n / (high - low) as f64;
        (alpha * (1.0 - alpha) / n).sqrt() * inverse_density
    } else {
        0.0
    };
    let tail_variance = tail[..k]
        .iter()
        .map(|t| (t.loss - es) * (t.loss - es))
        .sum::<f64>()
        / k as f64;
    let es_se = ((tail_variance + alpha * (es - var) * (es - var)) / k as f64).sqrt();
    let kf = k as f64;
    let contributions: Vec<f64> = sums.losses.iter().map(|s| s / kf).collect();
    let contribution_se: Vec<f64> = contributions
        .iter()
        .zip(&sums.squares)
        .map(|(c, sq)| ((sq / kf - c * c).max(0.0) / kf).sqrt())
        .collect();
    let figures = json!({
        "confidence": alpha,
        "var": var,
        "var_se": var_se,
        "es": es,
        "es_se": es_se,
        "tail_paths": k,
        "es_contributions": contributions,
        "es_contribution_se": contribution_se,
    });
    (
        figures,
        Headline {
            confidence: alpha,
            var,
            es,
        },
    )
}

/// E.g. "VaR99 1.23M ES99 1.50M (20k paths)", at the highest level.
fn summary(paths: u64, headlines: &[Headline]) -> String {
    let top = headlines
        .iter()
        .max_by(|a, b| a.confidence.total_cmp(&b.confidence))
        .expect("at least one level");
    let label = (top.confidence * 1e4).round() / 1e2;
    format!(
        "VaR{label} {} ES{label} {} ({} paths)",
        money(top.var),
        money(top.es),
        count(paths),
    )
}

/// Three significant figures with a k/M/B suffix.
fn money(x: f64) -> String {
    let (value, suffix) = [(1e9, "B"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(scale, _)| x.abs() >= *scale)
        .map_or((x, ""), |(scale, suffix)| (x / scale, suffix));
    let decimals = if value.abs() >= 100.0 {
        0
    } else if value.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.decimals$}{suffix}")
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_money_and_counts() {
        assert_eq!(money(1_234_567.0), "1.23M");
        assert_eq!(money(-45_600.0), "-45.6k");
        assert_eq!(money(999.4), "999");
        assert_eq!(money(0.5), "0.50");
        assert_eq!(count(20_000), "20k");
        assert_eq!(count(2_000_000), "2M");
        assert_eq!(count(1_500), "1500");
    }
}
