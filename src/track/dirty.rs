//! A sparse dirty bitmap over 4 KiB units of a device.
//!
//! Memory grows with the regions written, not with the device: the bitmap is
//! split into chunks of 32768 units (128 MiB of device, 4 KiB of memory),
//! allocated on first write. Past a memory cap the set gives up on detail and
//! says "everything" ([`DirtySet::is_all`]), which only ever over-reports.

use std::collections::BTreeMap;

/// Bytes per tracked unit.
pub const UNIT: u64 = 4096;
const CHUNK_BITS: u64 = 32768;
const CHUNK_WORDS: usize = (CHUNK_BITS / 64) as usize;

/// Set of dirty units.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtySet {
    chunks: BTreeMap<u64, Box<[u64; CHUNK_WORDS]>>,
    /// Every unit is dirty (the set grew past its memory cap).
    all: bool,
    /// Most chunks kept before collapsing to `all` (0: no cap).
    cap_chunks: usize,
}

impl DirtySet {
    /// An empty set that collapses to "all" past `cap_bytes` of memory.
    pub fn with_cap(cap_bytes: usize) -> DirtySet {
        DirtySet {
            cap_chunks: cap_bytes / (CHUNK_WORDS * 8),
            ..Default::default()
        }
    }

    pub fn is_all(&self) -> bool {
        self.all
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.chunks.is_empty()
    }

    /// Mark every unit (over-report on purpose).
    pub fn set_all(&mut self) {
        self.all = true;
        self.chunks.clear();
    }

    /// Mark units `[from, to)`.
    pub fn mark(&mut self, from: u64, to: u64) {
        if self.all || from >= to {
            return;
        }
        let mut u = from;
        while u < to {
            let c = u / CHUNK_BITS;
            let end = to.min((c + 1) * CHUNK_BITS);
            if !self.chunks.contains_key(&c) {
                if self.cap_chunks > 0 && self.chunks.len() >= self.cap_chunks {
                    self.set_all();
                    return;
                }
                self.chunks.insert(c, Box::new([0u64; CHUNK_WORDS]));
            }
            let words = self.chunks.get_mut(&c).expect("inserted");
            let mut i = u - c * CHUNK_BITS;
            let e = end - c * CHUNK_BITS;
            while i < e {
                if i % 64 == 0 && e - i >= 64 {
                    words[(i / 64) as usize] = u64::MAX;
                    i += 64;
                } else {
                    words[(i / 64) as usize] |= 1 << (i % 64);
                    i += 1;
                }
            }
            u = end;
        }
    }

    /// Mark the units that bytes `[from, to)` touch.
    pub fn mark_bytes(&mut self, from: u64, to: u64) {
        if to > from {
            self.mark(from / UNIT, to.div_ceil(UNIT));
        }
    }

    pub fn contains(&self, u: u64) -> bool {
        if self.all {
            return true;
        }
        self.chunks
            .get(&(u / CHUNK_BITS))
            .is_some_and(|w| w[((u % CHUNK_BITS) / 64) as usize] & (1 << (u % 64)) != 0)
    }

    /// Add every unit of `other`.
    pub fn union(&mut self, other: &DirtySet) {
        if self.all {
            return;
        }
        if other.all {
            self.set_all();
            return;
        }
        for (c, w) in &other.chunks {
            if !self.chunks.contains_key(c)
                && self.cap_chunks > 0
                && self.chunks.len() >= self.cap_chunks
            {
                self.set_all();
                return;
            }
            let mine = self
                .chunks
                .entry(*c)
                .or_insert_with(|| Box::new([0u64; CHUNK_WORDS]));
            for (a, b) in mine.iter_mut().zip(w.iter()) {
                *a |= *b;
            }
        }
    }

    /// Number of dirty units (`None` when the set is "all").
    pub fn count(&self) -> Option<u64> {
        if self.all {
            return None;
        }
        Some(
            self.chunks
                .values()
                .map(|w| w.iter().map(|x| x.count_ones() as u64).sum::<u64>())
                .sum(),
        )
    }

    /// Dirty units in ascending order (nothing when the set is "all": ask
    /// [`DirtySet::is_all`] first).
    pub fn units(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks.iter().flat_map(|(c, w)| {
            let base = c * CHUNK_BITS;
            w.iter().enumerate().flat_map(move |(i, &word)| {
                let mut bits = word;
                std::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let t = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    Some(base + i as u64 * 64 + t)
                })
            })
        })
    }

    /// Dirty blocks of `block_size` bytes (a multiple of [`UNIT`]) below
    /// `nblocks`, ascending, each once.
    pub fn blocks(&self, block_size: u64, nblocks: u64) -> Vec<u64> {
        let per = (block_size / UNIT).max(1);
        let mut out: Vec<u64> = Vec::new();
        for u in self.units() {
            let b = u / per;
            if b >= nblocks {
                break;
            }
            if out.last() != Some(&b) {
                out.push(b);
            }
        }
        out
    }

    /// Bytes of memory held.
    pub fn memory(&self) -> usize {
        self.chunks.len() * (CHUNK_WORDS * 8 + 64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_ranges_across_words_and_chunks() {
        let mut d = DirtySet::default();
        assert!(d.is_empty());
        d.mark(3, 5);
        d.mark(60, 200);
        d.mark(CHUNK_BITS - 2, CHUNK_BITS + 3);
        let units: Vec<u64> = d.units().collect();
        let mut want: Vec<u64> = vec![3, 4];
        want.extend(60..200);
        want.extend(CHUNK_BITS - 2..CHUNK_BITS + 3);
        assert_eq!(units, want);
        assert_eq!(d.count(), Some(want.len() as u64));
        assert!(d.contains(199) && !d.contains(200) && !d.contains(2));
        assert_eq!(d.chunks.len(), 2);
    }

    #[test]
    fn bytes_round_outwards() {
        let mut d = DirtySet::default();
        // 512 bytes in the middle of unit 2, and a write straddling 5/6.
        d.mark_bytes(2 * UNIT + 512, 2 * UNIT + 1024);
        d.mark_bytes(6 * UNIT - 1, 6 * UNIT + 1);
        d.mark_bytes(100, 100);
        assert_eq!(d.units().collect::<Vec<_>>(), vec![2, 5, 6]);
    }

    #[test]
    fn blocks_of_larger_size_are_deduplicated() {
        let mut d = DirtySet::default();
        d.mark(0, 1);
        d.mark(3, 5);
        d.mark(17, 18);
        // 16 KiB blocks: units 0..4 -> block 0, 4..8 -> 1, 16..20 -> 4.
        assert_eq!(d.blocks(16384, 100), vec![0, 1, 4]);
        assert_eq!(d.blocks(16384, 2), vec![0, 1]);
        assert_eq!(d.blocks(4096, 100), vec![0, 3, 4, 17]);
    }

    #[test]
    fn union_and_cap_collapse_to_all() {
        let mut a = DirtySet::with_cap(2 * CHUNK_WORDS * 8);
        a.mark(1, 2);
        let mut b = DirtySet::default();
        b.mark(CHUNK_BITS * 5, CHUNK_BITS * 5 + 1);
        a.union(&b);
        assert_eq!(a.units().collect::<Vec<_>>(), vec![1, CHUNK_BITS * 5]);
        // A third chunk exceeds the cap: the set says "all" from then on.
        a.mark(CHUNK_BITS * 9, CHUNK_BITS * 9 + 1);
        assert!(a.is_all() && !a.is_empty() && a.contains(12345));
        assert_eq!(a.count(), None);
        let mut c = DirtySet::default();
        c.union(&a);
        assert!(c.is_all());
    }
}
