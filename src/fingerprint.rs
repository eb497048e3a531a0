//! Per-block fingerprints: 64-bit seeded XXH3, and the fingerprint map of a
//! chain's newest snapshot kept in a side file for speed.
//!
//! A 32-bit CRC is not a fingerprint: it misses about one changed block in
//! four billion, and data can be crafted to collide. XXH3-64 keyed with a
//! random per-chain seed makes an accidental miss a 2^-64 event and a crafted
//! one require knowing the seed, which lives only in the chain file.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
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

const MAP_MAGIC: &[u8; 8] = b"BSNPFPM2";
/// The header takes the first page; the fingerprints start page-aligned.
const MAP_HEADER: u64 = 4096;
const MAP_HEADER_BODY: usize = 8 + 16 + 16 + 8 + 4 + 4 + 8 + 8;

/// Errors writing a take's fingerprint map.
#[derive(Debug, thiserror::Error)]
pub enum PrintFileError {
    #[error("cannot write the fingerprint map {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a fingerprint map file says it describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapHeader {
    pub chain_id: Uuid,
    pub snapshot_id: Uuid,
    pub device_size: u64,
    pub block_size: u32,
    pub seed: u64,
    pub count: u64,
}

impl MapHeader {
    fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(MAP_HEADER as usize);
        h.extend_from_slice(MAP_MAGIC);
        h.extend_from_slice(self.chain_id.as_bytes());
        h.extend_from_slice(self.snapshot_id.as_bytes());
        h.extend_from_slice(&self.device_size.to_le_bytes());
        h.extend_from_slice(&self.block_size.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&self.seed.to_le_bytes());
        h.extend_from_slice(&self.count.to_le_bytes());
        let crc = crc32fast::hash(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        h.resize(MAP_HEADER as usize, 0);
        h
    }

    /// Read the header of the map file at `path`; `None` if it is missing,
    /// not a map of this version, damaged, or of the wrong length.
    pub fn read(path: &Path) -> Option<MapHeader> {
        let f = File::open(path).ok()?;
        let mut b = [0u8; MAP_HEADER_BODY + 4];
        (&f).read_exact(&mut b).ok()?;
        if &b[..8] != MAP_MAGIC {
            return None;
        }
        let stored = u32::from_le_bytes(b[MAP_HEADER_BODY..].try_into().ok()?);
        if crc32fast::hash(&b[..MAP_HEADER_BODY]) != stored {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let h = MapHeader {
            chain_id: Uuid::from_slice(&b[8..24]).ok()?,
            snapshot_id: Uuid::from_slice(&b[24..40]).ok()?,
            device_size: u64_at(40),
            block_size: u32::from_le_bytes(b[48..52].try_into().ok()?),
            seed: u64_at(56),
            count: u64_at(64),
        };
        let len = f.metadata().ok()?.len();
        (len == MAP_HEADER + h.count.checked_mul(8)?).then_some(h)
    }
}

/// The fingerprints of a snapshot being taken, in a file read and written
/// through a shared mapping, so memory does not grow with the device: pages
/// are released behind the scan (dirty ones stay in the page cache and are
/// written back). It starts as a copy of the previous snapshot's map (or is
/// rebuilt from the chain, or starts empty), lives at `CHAIN.fpmap.tmp`
/// while the take runs, and replaces `CHAIN.fpmap` by rename only after the
/// chain commit, so a crash leaves either map whole.
#[derive(Debug)]
pub struct PrintFile {
    tmp: PathBuf,
    file: File,
    map: memmap2::MmapMut,
    count: u64,
    /// Fingerprints set since the last release, to bound resident pages.
    touched: usize,
    /// Sealed: the temporary file is handed over, not removed on drop.
    sealed: bool,
}

impl PrintFile {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> PrintFileError + '_ {
        move |source| PrintFileError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A map of `count` fingerprints at the temporary path of `side`: a copy
    /// of `copy_from` (a valid map, checked by the caller) grown or cut to
    /// `count`, or all zeros.
    pub fn create(
        side: &Path,
        copy_from: Option<&Path>,
        count: u64,
    ) -> Result<PrintFile, PrintFileError> {
        let tmp = tmp_path(side);
        let _ = std::fs::remove_file(&tmp);
        let err = Self::io(&tmp);
        // Owner-only: it holds the chain's fingerprint seed's products.
        let mut file = crate::util::private_options();
        file.read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW);
        let file = file.open(&tmp).map_err(err)?;
        if let Some(src) = copy_from {
            // copy_file_range: a reflink where the filesystem has them, an
            // in-kernel copy elsewhere; nothing passes through our memory.
            let mut from = File::open(src).map_err(Self::io(src))?;
            io::copy(&mut from, &mut (&file)).map_err(Self::io(&tmp))?;
        }
        file.set_len(MAP_HEADER + count * 8)
            .map_err(Self::io(&tmp))?;
        // Until the commit the header says nothing valid.
        sys_pwrite(&file, &[0u8; MAP_HEADER as usize], 0).map_err(Self::io(&tmp))?;
        // SAFETY: a shared read-write mapping of a file we created and hold
        // open; nobody else writes it (it has a fresh name and the chain's
        // lock is held). Its length is fixed for the mapping's lifetime.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(MAP_HEADER)
                .len((count * 8).max(8) as usize)
                .map_mut(&file)
        }
        .map_err(Self::io(&tmp))?;
        Ok(PrintFile {
            tmp,
            file,
            map,
            count,
            touched: 0,
            sealed: false,
        })
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    #[inline]
    pub fn get(&self, b: u64) -> u64 {
        let o = b as usize * 8;
        u64::from_le_bytes(self.map[o..o + 8].try_into().unwrap())
    }

    #[inline]
    pub fn set(&mut self, b: u64, v: u64) {
        let o = b as usize * 8;
        self.map[o..o + 8].copy_from_slice(&v.to_le_bytes());
        self.touched += 1;
    }

    /// Release the pages of fingerprints `[from, to)` from this process.
    pub fn release(&mut self, from: u64, to: u64) {
        let page = 4096usize;
        let a = (from as usize * 8) / page * page;
        let b = ((to.min(self.count) as usize * 8).div_ceil(page) * page).min(self.map.len());
        if b > a {
            // SAFETY: MADV_DONTNEED on a shared file mapping only drops our
            // page table entries; dirty pages stay in the page cache and are
            // written back, later accesses fault them in again. No reference
            // into the range is held.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
            };
        }
    }

    /// Release everything once many scattered fingerprints were set.
    pub fn release_if_busy(&mut self) {
        if self.touched >= 1 << 16 {
            self.release(0, self.count);
            self.touched = 0;
        }
    }

    /// Make the map durable and name it `header`'s; the caller then
    /// [`PrintFile::install`]s it once the chain commit is durable.
    pub fn seal(mut self, header: &MapHeader) -> Result<SealedMap, PrintFileError> {
        self.map.flush().map_err(Self::io(&self.tmp))?;
        sys_pwrite(&self.file, &header.encode(), 0).map_err(Self::io(&self.tmp))?;
        self.file.sync_all().map_err(Self::io(&self.tmp))?;
        self.sealed = true;
        Ok(SealedMap {
            tmp: Some(self.tmp.clone()),
        })
    }
}

/// A complete map waiting for its snapshot's commit; removed if dropped
/// without being installed.
#[derive(Debug)]
pub struct SealedMap {
    tmp: Option<PathBuf>,
}

impl SealedMap {
    /// Replace the side file.
    pub fn install(mut self, side: &Path) -> io::Result<()> {
        let tmp = self.tmp.take().expect("installed once");
        std::fs::rename(&tmp, side)?;
        crate::util::sync_parent(side)
    }
}

impl Drop for SealedMap {
    fn drop(&mut self) {
        if let Some(t) = self.tmp.take() {
            let _ = std::fs::remove_file(t);
        }
    }
}

impl Drop for PrintFile {
    fn drop(&mut self) {
        // An abandoned take leaves no temporary map behind.
        if !self.sealed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn tmp_path(side: &Path) -> PathBuf {
    let mut name = side.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    side.with_file_name(name)
}

fn sys_pwrite(f: &File, b: &[u8], off: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.write_all_at(b, off)
}

const MAP_MAGIC_V1: &[u8; 8] = b"BSNPFPM1";
const MAP_HEADER_V1: usize = 8 + 16 + 16 + 8 + 4 + 4 + 8 + 8;

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

/// The fingerprint of every block of one snapshot, in memory, saved whole
/// (format `BSNPFPM1`). Backups keep their per-remote state in it; takes use
/// the mapped [`PrintFile`].
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
            let mut header = Vec::with_capacity(MAP_HEADER_V1);
            header.extend_from_slice(MAP_MAGIC_V1);
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
        let mut header = [0u8; MAP_HEADER_V1];
        r.read_exact(&mut header).map_err(|_| invalid())?;
        if &header[..8] != MAP_MAGIC_V1 {
            return Err(invalid());
        }
        let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap());
        let file_chain = Uuid::from_slice(&header[8..24]).map_err(|_| invalid())?;
        let snapshot_id = Uuid::from_slice(&header[24..40]).map_err(|_| invalid())?;
        let device_size = u64_at(40);
        let block_size = u32::from_le_bytes(header[48..52].try_into().unwrap());
        let seed = u64_at(56);
        let count = u64_at(64);
        if file_chain != chain_id || file_len != MAP_HEADER_V1 as u64 + count * 8 + 4 {
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
    fn map_file_copies_grows_seals_and_installs() {
        let dir = tempfile::tempdir().unwrap();
        let side = dir.path().join("c.chain.fpmap");
        let h = MapHeader {
            chain_id: Uuid::new_v4(),
            snapshot_id: Uuid::new_v4(),
            device_size: 3 * 4096 + 7,
            block_size: 4096,
            seed: 42,
            count: 4,
        };
        let mut m = PrintFile::create(&side, None, 4).unwrap();
        for b in 0..4 {
            assert_eq!(m.get(b), 0);
            m.set(b, b * 10 + 1);
        }
        m.release(0, 4);
        assert_eq!(m.get(3), 31);
        assert!(
            MapHeader::read(&tmp_path(&side)).is_none(),
            "valid before sealing"
        );
        m.seal(&h).unwrap().install(&side).unwrap();
        assert_eq!(MapHeader::read(&side), Some(h));
        // The next take starts from a copy, grown by two blocks.
        let mut n = PrintFile::create(&side, Some(&side), 6).unwrap();
        assert_eq!((n.get(2), n.get(4), n.len()), (21, 0, 6));
        n.set(5, 9);
        // Abandoned: the side file is untouched and no temporary remains.
        drop(n);
        assert!(!tmp_path(&side).exists());
        assert_eq!(MapHeader::read(&side), Some(h));
        // Damage to the header is detected.
        let mut bytes = std::fs::read(&side).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&side, &bytes).unwrap();
        assert!(MapHeader::read(&side).is_none());
        assert!(MapHeader::read(&dir.path().join("none")).is_none());
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
        bytes[MAP_HEADER_V1 + 3] ^= 1;
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
