//! The tally as a checkpoint: a small little-endian blob.
//!
//! `NSPR`, format version (u32), payload fingerprint (u64), chunks done
//! (u64), the four power sums, min and max (f64), the histogram counts
//! (u32 length, u64 each), the tail (u32 length, then f64 loss and u32 path
//! each). 20,000 paths at 95% make about 13 KB.

use super::job::{CHUNK, Job};
use super::tally::{TailPath, Tally, worst_first};
use crate::KernelError;

const MAGIC: &[u8; 4] = b"NSPR";
const VERSION: u32 = 1;

pub fn encode(tally: &Tally, fingerprint: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(80 + 8 * tally.counts.len() + 12 * tally.tail.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out.extend_from_slice(&tally.chunks.to_le_bytes());
    for x in tally.sums.iter().chain([&tally.min, &tally.max]) {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.extend_from_slice(&(tally.counts.len() as u32).to_le_bytes());
    for count in &tally.counts {
        out.extend_from_slice(&count.to_le_bytes());
    }
    out.extend_from_slice(&(tally.tail.len() as u32).to_le_bytes());
    for path in &tally.tail {
        out.extend_from_slice(&path.loss.to_le_bytes());
        out.extend_from_slice(&path.path.to_le_bytes());
    }
    out
}

/// Reads a checkpoint back, and checks that it belongs to this job.
pub fn decode(bytes: &[u8], job: &Job, fingerprint: u64) -> Result<Tally, KernelError> {
    let broken =
        || KernelError::Permanent("checkpoint: unreadable or not from this payload".into());
    let mut reader = Reader(bytes);
    if reader.take::<4>().as_ref() != Some(MAGIC)
        || reader.u32() != Some(VERSION)
        || reader.u64() != Some(fingerprint)
    {
        return Err(broken());
    }
    let tally = read_tally(&mut reader).ok_or_else(broken)?;
    if !reader.0.is_empty() || tally.chunks > job.chunks() {
        return Err(broken());
    }
    let paths_done = (tally.chunks * CHUNK).min(job.paths);
    let consistent = tally.counts.len() == job.bins.count + 2
        && tally.tail.len() as u64 == paths_done.min(job.tail_cap as u64)
        && tally.tail.is_sorted_by(|a, b| worst_first(a, b).is_lt())
        && tally.tail.iter().all(|t| u64::from(t.path) < paths_done);
    if consistent { Ok(tally) } else { Err(broken()) }
}

fn read_tally(reader: &mut Reader) -> Option<Tally> {
    let chunks = reader.u64()?;
    let mut sums = [0.0; 4];
    for sum in &mut sums {
        *sum = reader.f64()?;
    }
    let (min, max) = (reader.f64()?, reader.f64()?);
    let bins = reader.u32()? as usize;
    let counts = (0..bins)
        .map(|_| reader.u64())
        .collect::<Option<Vec<_>>>()?;
    let tail_len = reader.u32()? as usize;
    let tail = (0..tail_len)
        .map(|_| {
            Some(TailPath {
                loss: reader.f64()?,
                path: reader.u32()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Tally {
        chunks,
        sums,
        min,
        max,
        counts,
        tail,
    })
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    fn f64(&mut self) -> Option<f64> {
        self.take().map(f64::from_le_bytes)
    }
}
