//! Per-block fingerprints: 64-bit seeded XXH3, and the fingerprint map of a
//! chain's newest snapshot kept in a side file for speed.
//!
//! A 32-bit CRC is not a fingerprint: it misses about one changed block in
//! four billion, and data can be crafted to collide. XXH3-64 keyed with a
//! random per-chain seed makes an accidental miss a 2^-64 event and a crafted
//! one require knowing the seed, which lives only in the chain file.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use uuid::Uuid;

/// Fingerprint of one block.
#[inline]
pub fn fingerprint(data: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(data, seed)
}

/// Whether every byte of `data` is zero.
#[inline]
pub fn is_zero(data: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: reinterpreting initialised bytes as u128 is valid for any bit
        // pattern; align_to only yields correctly aligned middle elements.
        unsafe { data.align_to::<u128>() }
    };
    prefix.iter().all(|&b| b == 0)
        && words.iter().all(|&w| w == 0)
        && suffix.iter().all(|&b| b == 0)
}

/// Fingerprints of all-zero blocks, cached per length.
#[derive(Debug, Clone)]
pub struct ZeroPrints {
    seed: u64,
    block_size: usize,
    full: u64,
}

impl ZeroPrints {
    pub fn new(seed: u64, block_size: usize) -> ZeroPrints {
        let zeros = vec![0u8; block_size];
        ZeroPrints {
            seed,
            block_size,
            full: fingerprint(&zeros, seed),
        }
    }

    /// The fingerprint of `len` zero bytes.
    pub fn get(&self, len: usize) -> u64 {
        if len == self.block_size {
            self.full
        } else {
            fingerprint(&vec![0u8; len], self.seed)
        }
    }
}

/// Fingerprint each block of `data` into `out`, on `threads` threads.
pub fn hash_blocks(data: &[u8], bs: usize, seed: u64, out: &mut [u64], threads: usize) {
    let hash = |data: &[u8], out: &mut [u64]| {
        for (o, block) in out.iter_mut().zip(data.chunks(bs)) {
            *o = fingerprint(block, seed);
        }
    };
    if threads <= 1 || out.len() < 64 {
        hash(data, out);
        return;
    }
    let per = out.len().div_ceil(threads);
    std::thread::scope(|s| {
        let mut parts = out.chunks_mut(per).zip(data.chunks(per * bs));
        let first = parts.next();
        for (o, d) in parts {
            s.spawn(move || hash(d, o));
        }
        if let Some((o, d)) = first {
            hash(d, o);
        }
    });
}

const MAP_MAGIC: &[u8; 8] = b"BSNPFPM1";
const MAP_HEADER: usize = 8 + 16 + 16 + 8 + 4 + 4 + 8 + 8;

/// Errors of the fingerprint side file. None of them is fatal to a snapshot:
/// the map is rebuilt from the chain.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("cannot read fingerprint map {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("fingerprint map {path} is damaged or does not belong to this chain")]
    Invalid { path: PathBuf },
}

/// The fingerprint of every block of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FingerprintMap {
    pub chain_id: Uuid,
    pub snapshot_id: Uuid,
    pub device_size: u64,
    pub block_size: u32,
    pub seed: u64,
    pub prints: Vec<u64>,
}

impl FingerprintMap {
    /// Write the map atomically: a temporary file, fsync, rename, fsync of the directory.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("fpmap.tmp");
        {
            // Owner-only: it holds the chain's fingerprint seed.
            let mut f = crate::util::create_private(&tmp)?;
            let mut header = Vec::with_capacity(MAP_HEADER);
            header.extend_from_slice(MAP_MAGIC);
            header.extend_from_slice(self.chain_id.as_bytes());
            header.extend_from_slice(self.snapshot_id.as_bytes());
            header.extend_from_slice(&self.device_size.to_le_bytes());
            header.extend_from_slice(&self.block_size.to_le_bytes());
            header.extend_from_slice(&0u32.to_le_bytes());
            header.extend_from_slice(&self.seed.to_le_bytes());
            header.extend_from_slice(&(self.prints.len() as u64).to_le_bytes());
            let mut crc = crc32fast::Hasher::new();
            crc.update(&header);
            let mut w = io::BufWriter::with_capacity(1 << 20, &mut f);
            w.write_all(&header)?;
            for chunk in self.prints.chunks(8192) {
                let bytes: Vec<u8> = chunk.iter().flat_map(|p| p.to_le_bytes()).collect();
                crc.update(&bytes);
                w.write_all(&bytes)?;
            }
            w.write_all(&crc.finalize().to_le_bytes())?;
            w.flush()?;
            drop(w);
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        crate::util::sync_parent(path)?;
        Ok(())
    }

    /// Load the map if it exists, is intact and belongs to `chain_id`;
    /// `Ok(None)` if there is no file. Streams the file: one copy of the map
    /// in memory.
    pub fn load(path: &Path, chain_id: Uuid) -> Result<Option<FingerprintMap>, MapError> {
        let io_err = |source| MapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid = || MapError::Invalid {
            path: path.to_path_buf(),
        };
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let file_len = f.metadata().map_err(io_err)?.len();
        let mut r = io::BufReader::with_capacity(1 << 20, f);
        let mut header = [0u8; MAP_HEADER];
        r.read_exact(&mut header).map_err(|_| invalid())?;
        if &header[..8] != MAP_MAGIC {
            return Err(invalid());
        }
        let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap());
        let file_chain = Uuid::from_slice(&header[8..24]).map_err(|_| invalid())?;
        let snapshot_id = Uuid::from_slice(&header[24..40]).map_err(|_| invalid())?;
        let device_size = u64_at(40);
        let block_size = u32::from_le_bytes(header[48..52].try_into().unwrap());
        let seed = u64_at(56);
        let count = u64_at(64);
        if file_chain != chain_id || file_len != MAP_HEADER as u64 + count * 8 + 4 {
            return Err(invalid());
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        let mut prints = Vec::with_capacity(count as usize);
        let mut chunk = vec![0u8; 64 << 10];
        let mut left = count * 8;
        while left > 0 {
            let n = (left as usize).min(chunk.len());
            r.read_exact(&mut chunk[..n]).map_err(|_| invalid())?;
            crc.update(&chunk[..n]);
            prints.extend(
                chunk[..n]
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap())),
            );
            left -= n as u64;
        }
        let mut stored = [0u8; 4];
        r.read_exact(&mut stored).map_err(|_| invalid())?;
        if crc.finalize() != u32::from_le_bytes(stored) {
            return Err(invalid());
        }
        Ok(Some(FingerprintMap {
            chain_id,
            snapshot_id,
            device_size,
            block_size,
            seed,
            prints,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_sees_the_last_byte() {
        let mut b = vec![0u8; 4096];
        assert!(is_zero(&b));
        b[4095] = 1;
        assert!(!is_zero(&b));
        b[4095] = 0;
        b[0] = 1;
        assert!(!is_zero(&b));
        // Unaligned slices.
        let c = vec![0u8; 4099];
        assert!(is_zero(&c[1..]));
        let mut d = c.clone();
        d[4098] = 9;
        assert!(!is_zero(&d[3..]));
    }

    #[test]
    fn fingerprint_depends_on_seed_and_content() {
        let a = vec![1u8; 4096];
        let mut b = a.clone();
        b[4095] = 2;
        assert_ne!(fingerprint(&a, 1), fingerprint(&b, 1));
        assert_ne!(fingerprint(&a, 1), fingerprint(&a, 2));
        let z = ZeroPrints::new(5, 4096);
        assert_eq!(z.get(4096), fingerprint(&[0u8; 4096], 5));
        assert_eq!(z.get(100), fingerprint(&[0u8; 100], 5));
    }

    #[test]
    fn map_round_trip_and_damage_detection() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.fpmap");
        let chain = Uuid::new_v4();
        let m = FingerprintMap {
            chain_id: chain,
            snapshot_id: Uuid::new_v4(),
            device_size: 3 * 4096 + 7,
            block_size: 4096,
            seed: 42,
            prints: vec![1, 2, 3, 4],
        };
        m.save(&p).unwrap();
        assert_eq!(FingerprintMap::load(&p, chain).unwrap().unwrap(), m);
        assert!(matches!(
            FingerprintMap::load(&p, Uuid::new_v4()),
            Err(MapError::Invalid { .. })
        ));
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[MAP_HEADER + 3] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(
            FingerprintMap::load(&p, chain),
            Err(MapError::Invalid { .. })
        ));
        assert!(FingerprintMap::load(&dir.path().join("none"), chain)
            .unwrap()
            .is_none());
    }
}
