//! What the simulation keeps of the paths it has run: for one chunk, or for
//! all the chunks done so far. This is what a checkpoint holds.
//!
//! Mean and standard deviation come from power sums; the histogram is counts
//! on bins fixed before the run; VaR and ES need the tail of the loss
//! distribution, so the tally keeps the worst `cap` paths exactly, each as
//! (loss, path index): 12 bytes a path. `cap` is what the highest tail
//! fraction needs (plus a margin for the density estimate behind VaR's
//! standard error), e.g. 1,200 entries for 20,000 paths at 95%. Per-position
//! contributions are not kept: the kernel re-simulates the tail paths from
//! their indices at the end.

use std::cmp::Ordering;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TailPath {
    pub loss: f64,
    pub path: u32,
}

/// Worst loss first; equal losses by path index, so the order is total.
pub fn worst_first(a: &TailPath, b: &TailPath) -> Ordering {
    b.loss.total_cmp(&a.loss).then(a.path.cmp(&b.path))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tally {
    pub chunks: u64,
    /// Σ (pnl − shift)^p for p = 1..=4, summed path by path in path order.
    pub sums: [f64; 4],
    pub min: f64,
    pub max: f64,
    /// Histogram of P&L: below the range, the bins, above the range.
    pub counts: Vec<u64>,
    /// The worst paths, worst first.
    pub tail: Vec<TailPath>,
}

impl Tally {
    pub fn new(bins: usize) -> Self {
        Self {
            chunks: 0,
            sums: [0.0; 4],
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            counts: vec![0; bins + 2],
            tail: Vec::new(),
        }
    }

    /// Adds one path's P&L, measured from `shift`, to the sums.
    pub fn add(&mut self, pnl: f64, shift: f64, bin: usize) {
        let d = pnl - shift;
        let d2 = d * d;
        self.sums[0] += d;
        self.sums[1] += d2;
        self.sums[2] += d2 * d;
        self.sums[3] += d2 * d2;
        self.min = self.min.min(pnl);
        self.max = self.max.max(pnl);
        self.counts[bin] += 1;
    }

    /// Folds in the next chunk's sums and counts (not its tail: see `merge_tail`).
    /// Chunks must come in order, so that the sums are the same bits however
    /// the chunks were scheduled.
    pub fn absorb(&mut self, chunk: &Tally) {
        self.chunks += 1;
        for (sum, part) in self.sums.iter_mut().zip(chunk.sums) {
            *sum += part;
        }
        self.min = self.min.min(chunk.min);
        self.max = self.max.max(chunk.max);
        for (count, part) in self.counts.iter_mut().zip(&chunk.counts) {
            *count += part;
        }
    }

    /// Keeps the `cap` worst of the tail and `more` (sorted worst first).
    pub fn merge_tail(&mut self, more: Vec<TailPath>, cap: usize) {
        self.tail.extend(more);
        // Two sorted runs: the stable sort merges them in linear time.
        self.tail.sort_by(worst_first);
        self.tail.truncate(cap);
    }
}

/// The `cap` worst of `paths`, worst first.
pub fn worst(mut paths: Vec<TailPath>, cap: usize) -> Vec<TailPath> {
    if paths.len() > cap && cap > 0 {
        paths.select_nth_unstable_by(cap - 1, worst_first);
    }
    paths.truncate(cap);
    paths.sort_unstable_by(worst_first);
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(losses: &[(f64, u32)]) -> Vec<TailPath> {
        losses.iter().map(|&(loss, path)| TailPath { loss, path }).collect()
    }

    #[test]
    fn keeps_the_worst_in_a_total_order() {
        let paths = tail(&[(1.0, 0), (5.0, 1), (3.0, 2), (5.0, 3), (-2.0, 4)]);
        assert_eq!(worst(paths.clone(), 3), tail(&[(5.0, 1), (5.0, 3), (3.0, 2)]));
        let mut tally = Tally::new(1);
        tally.merge_tail(worst(paths[..2].to_vec(), 3), 3);
        tally.merge_tail(worst(paths[2..].to_vec(), 3), 3);
        assert_eq!(tally.tail, worst(paths, 3));
    }
}
