//! A validated payload turned into a run: paths in fixed chunks, run in
//! parallel with rayon, folded into the tally in chunk order. Nothing that
//! depends on the number of threads or on scheduling reaches the numbers.

use rayon::prelude::*;

use super::input::Spec;
use super::isa::Isa;
use super::model::{LANES, Lanes, Model, Scratch};
use super::rng;
use super::tally::{Segment, TailPath, Tally};

/// Paths per chunk: the unit of parallel work and of checkpointing.
pub const CHUNK: u64 = 1_024;
/// Paths of the pilot run that fixes the histogram's range and the shift of the sums.
const PILOT_PATHS: u64 = 256;
const PILOT_STREAM: u64 = 0x0070_696c_6f74;
/// Tail paths per parallel task of the contribution pass.
const TAIL_TASK: usize = 256;

#[derive(Debug)]
pub struct Level {
    pub confidence: f64,
    /// How many of the worst paths make the tail: VaR is the last of them.
    pub tail: usize,
    /// Order statistics on each side of VaR used to estimate the density there.
    pub spacing: usize,
}

#[derive(Debug)]
pub struct Bins {
    pub low: f64,
    pub width: f64,
    pub count: usize,
}

impl Bins {
    /// Index into `Tally::counts`: 0 below the range, `count + 1` above.
    fn index(&self, pnl: f64) -> usize {
        let t = (pnl - self.low) / self.width;
        if t < 0.0 {
            0
        } else if t >= self.count as f64 {
            self.count + 1
        } else {
            t as usize + 1
        }
    }
}

#[derive(Debug)]
pub struct Job {
    pub model: Model,
    isa: Isa,
    key: u64,
    pub paths: u64,
    pub horizon_days: f64,
    pub levels: Vec<Level>,
    /// How many worst paths the tally keeps.
    pub tail_cap: usize,
    pub shift: f64,
    pub bins: Bins,
}

/// Per level: for each position, the sum of its losses over the tail paths and
/// the sum of their squares.
#[derive(Debug, Clone)]
pub struct TailSums {
    pub losses: Vec<f64>,
    pub squares: Vec<f64>,
}

impl Job {
    /// The job `spec` describes, its hot loops run with `isa`.
    pub fn new(spec: &Spec, isa: Isa) -> Self {
        let payload = &spec.payload;
        let model = Model::new(spec);
        let key = rng::hash(payload.seed, payload.account.as_bytes());
        let paths = payload.paths;
        let levels: Vec<Level> = payload
            .confidence
            .iter()
            .map(|&confidence| {
                // Ceiling of (1 − α)·N, forgiving the rounding of α itself.
                let exact = (1.0 - confidence) * paths as f64;
                let tail = ((exact - 1e-7).ceil() as usize).clamp(1, paths as usize);
                let spacing = (tail as f64).sqrt().ceil() as usize;
                Level {
                    confidence,
                    tail,
                    spacing,
                }
            })
            .collect();
        let tail_cap = levels
            .iter()
            .map(|level| (level.tail + level.spacing).min(paths as usize))
            .max()
            .unwrap_or(1);
        let (shift, bins) = isa.run(
            #[inline(always)]
            || pilot(&model, key, payload.histogram_bins),
        );
        Self {
            model,
            isa,
            key,
            paths,
            horizon_days: payload.horizon_days,
            levels,
            tail_cap,
            shift,
            bins,
        }
    }

    pub fn chunks(&self) -> u64 {
        self.paths.div_ceil(CHUNK)
    }

    /// Runs the chunks the tally lacks. Returns false if it stopped because
    /// `stop` turned true; the tally then holds every chunk finished in order.
    pub fn advance(&self, tally: &mut Tally, stop: &(dyn Fn() -> bool + Sync)) -> bool {
        let bins = self.bins.count;
        let segment = (tally.chunks..self.chunks())
            .into_par_iter()
            .map_init(
                || self.model.scratch(),
                |scratch, chunk| {
                    if stop() {
                        Segment::skipped(bins)
                    } else {
                        self.run_chunk(chunk, scratch)
                    }
                },
            )
            .reduce(|| Segment::empty(bins), |a, b| a.then(b, self.tail_cap));
        let complete = segment.complete;
        tally.absorb(segment, self.tail_cap);
        complete
    }

    fn run_chunk(&self, chunk: u64, scratch: &mut Scratch) -> Segment {
        let start = chunk * CHUNK;
        let end = (start + CHUNK).min(self.paths);
        let mut pnl = vec![0.0; (end - start) as usize];
        self.isa.run(
            #[inline(always)]
            || {
                let mut block_pnl = [0.0; LANES];
                for (block, out) in (start..end).step_by(LANES).zip(pnl.chunks_mut(LANES)) {
                    let paths = std::array::from_fn(|lane| (block + lane as u64).min(end - 1));
                    self.model.simulate(self.key, &paths, scratch);
                    self.model.pnl(scratch, &mut block_pnl);
                    out.copy_from_slice(&block_pnl[..out.len()]);
                }
            },
        );
        let paths = (start as u32..)
            .zip(pnl)
            .map(|(path, pnl)| (path, pnl, self.bins.index(pnl)));
        Segment::chunk(paths, self.shift, self.bins.count, self.tail_cap)
    }

    /// Re-simulates the tail paths to split each level's tail loss by position.
    pub fn tail_sums(&self, tail: &[TailPath]) -> Vec<TailSums> {
        let deepest = self
            .levels
            .iter()
            .map(|l| l.tail)
            .max()
            .unwrap_or(0)
            .min(tail.len());
        let empty = || {
            let zeros = vec![0.0; self.model.positions()];
            vec![
                TailSums {
                    losses: zeros.clone(),
                    squares: zeros
                };
                self.levels.len()
            ]
        };
        let parts: Vec<Vec<TailSums>> = tail[..deepest]
            .par_chunks(TAIL_TASK)
            .enumerate()
            .map(|(task, paths)| self.tail_task(task * TAIL_TASK, paths, empty()))
            .collect();
        parts.into_iter().fold(empty(), |mut total, part| {
            for (sums, part) in total.iter_mut().zip(part) {
                for (sum, p) in sums.losses.iter_mut().zip(part.losses) {
                    *sum += p;
                }
                for (sum, p) in sums.squares.iter_mut().zip(part.squares) {
                    *sum += p;
                }
            }
            total
        })
    }

    fn tail_task(
        &self,
        first_rank: usize,
        paths: &[TailPath],
        mut sums: Vec<TailSums>,
    ) -> Vec<TailSums> {
        let mut scratch = self.model.scratch();
        let mut pnl: Lanes = [0.0; LANES];
        self.isa.run(
            #[inline(always)]
            || {
                for (block_index, block) in paths.chunks(LANES).enumerate() {
                    let ids = std::array::from_fn(|lane| {
                        u64::from(block[lane.min(block.len() - 1)].path)
                    });
                    self.model.simulate(self.key, &ids, &mut scratch);
                    let first = first_rank + block_index * LANES;
                    for position in 0..self.model.positions() {
                        self.model.position_pnl(position, &scratch, &mut pnl);
                        for (rank, p) in (first..).zip(&pnl[..block.len()]) {
                            let loss = -p;
                            for (level, sums) in self.levels.iter().zip(sums.iter_mut()) {
                                if rank < level.tail {
                                    sums.losses[position] += loss;
                                    sums.squares[position] += loss * loss;
                                }
                            }
                        }
                    }
                }
            },
        );
        sums
    }
}

/// A short run on its own stream: its mean becomes the shift of the power
/// sums (which keeps them well conditioned), its spread the histogram's range.
#[inline(always)]
fn pilot(model: &Model, key: u64, bins: usize) -> (f64, Bins) {
    let key = rng::mix(key ^ PILOT_STREAM);
    let mut scratch = model.scratch();
    let mut pnl = [0.0; LANES];
    let (mut sum, mut min, mut max) = (0.0, f64::INFINITY, f64::NEG_INFINITY);
    for block in (0..PILOT_PATHS).step_by(LANES) {
        let paths = std::array::from_fn(|lane| block + lane as u64);
        model.simulate(key, &paths, &mut scratch);
        model.pnl(&scratch, &mut pnl);
        for &p in &pnl {
            sum += p;
            min = min.min(p);
            max = max.max(p);
        }
    }
    let shift = sum / PILOT_PATHS as f64;
    let span = max - min;
    let (low, high) = if span > 1e-12 * max.abs().max(min.abs()).max(1.0) {
        (min - 0.5 * span, max + 0.5 * span)
    } else {
        (shift - 0.5, shift + 0.5)
    };
    (
        shift,
        Bins {
            low,
            width: (high - low) / bins as f64,
            count: bins,
        },
    )
}
