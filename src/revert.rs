//! Reverting a device in place to one of its snapshots, writing only the
//! blocks that differ.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use uuid::Uuid;

use crate::chain::read::{BlockReader, ReadError};
use crate::chain::{Chain, ChainError};
use crate::device::{Device, DeviceError};
use crate::fingerprint::hash_blocks;
use crate::sys;
use crate::take::Progress;

#[derive(Debug, thiserror::Error)]
pub enum RevertError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("{path} holds {size} bytes but snapshot {id} needs {needed}")]
    TooSmall {
        path: PathBuf,
        id: Uuid,
        size: u64,
        needed: u64,
    },
    #[error("cannot write {path} at offset {offset}")]
    Write {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The revert failed after it began writing: the device holds a mix.
    #[error("the device is partly reverted to snapshot {id} ({blocks_written} blocks written); revert again")]
    Partly {
        id: Uuid,
        blocks_written: u64,
        #[source]
        source: Box<RevertError>,
    },
}

impl RevertError {
    /// Whether the device may hold a mix of what it held and the snapshot.
    pub fn partly_reverted(&self) -> bool {
        matches!(self, RevertError::Partly { .. })
    }
}

/// What a revert did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevertOutcome {
    pub blocks_checked: u64,
    pub blocks_written: u64,
    pub bytes_written: u64,
}

/// Make `device` hold snapshot `id` of `chain` again. The device is opened
/// exclusively (it must not be mounted); each block is fingerprinted and only
/// blocks whose fingerprint differs from the snapshot's are written, so
/// running a revert again after it was interrupted finishes it. A failure
/// after the first write is [`RevertError::Partly`].
pub fn revert(
    chain: &Chain,
    id: Uuid,
    device: &Path,
    progress: Option<&Progress>,
) -> Result<RevertOutcome, RevertError> {
    let mut out = RevertOutcome::default();
    match write_differing(chain, id, device, progress, &mut out) {
        Ok(()) => Ok(out),
        Err(e) if out.blocks_written > 0 || matches!(e, RevertError::Write { .. }) => {
            Err(RevertError::Partly {
                id,
                blocks_written: out.blocks_written,
                source: Box::new(e),
            })
        }
        Err(e) => Err(e),
    }
}

fn write_differing(
    chain: &Chain,
    id: Uuid,
    device: &Path,
    progress: Option<&Progress>,
    out: &mut RevertOutcome,
) -> Result<(), RevertError> {
    let plan = chain.resolve_intact(id)?;
    let src = Device::open_rw(device)?;
    let size = plan.device_size();
    if src.size() < size {
        return Err(RevertError::TooSmall {
            path: device.to_path_buf(),
            id,
            size: src.size(),
            needed: size,
        });
    }
    let bs = plan.block_size as u64;
    let seed = chain.seed();
    // The snapshot's fingerprints, read as the scan reaches them.
    let mut want = plan.print_cursor(chain);
    src.invalidate_cache()?;
    let map = src.map()?;
    if let Some(p) = progress {
        p.total.store(size, Ordering::Relaxed);
    }
    let wfd = src.file().as_fd();
    let werr = |offset: u64| {
        move |source| RevertError::Write {
            path: device.to_path_buf(),
            offset,
            source,
        }
    };
    let tuning = crate::take::Tuning::default();
    let window = (tuning.window as u64 / bs).max(1) * bs;
    let reader = BlockReader::new(chain, &plan);
    let mut prints = vec![0u64; (window / bs) as usize];
    let mut run_i = 0usize;
    let mut buf = Vec::with_capacity(bs as usize);
    let zeros = vec![0u8; bs as usize];
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let nwin = size.div_ceil(window);
    let mut windows = 0u64;
    // The one windowed scan (shared with takes): prefetched, released behind.
    crate::device::scan_windows(
        &map,
        size,
        window,
        &|| false,
        |off, len| -> Result<(), RevertError> {
            let len = len as u64;
            let b0 = off / bs;
            let n = len.div_ceil(bs) as usize;
            hash_blocks(
                map.bytes(off, len as usize),
                bs as usize,
                seed,
                &mut prints[..n],
                threads,
            );
            map.check()?;
            for (i, p) in prints[..n].iter().enumerate() {
                let b = b0 + i as u64;
                out.blocks_checked += 1;
                if *p == want.get(b)? {
                    continue;
                }
                while plan.runs[run_i].block + plan.runs[run_i].count <= b {
                    run_i += 1;
                }
                let run = plan.runs[run_i];
                let blen = plan.block_len(b) as usize;
                let data: &[u8] = match reader.block(&run, b) {
                    None => &zeros[..blen],
                    Some(stored) => {
                        buf.clear();
                        reader.read(&mut buf, &[stored])?;
                        &buf[..blen]
                    }
                };
                sys::pwrite_full(wfd, data, b * bs).map_err(werr(b * bs))?;
                out.blocks_written += 1;
                out.bytes_written += blen as u64;
            }
            if let Some(p) = progress {
                p.done.store(off + len, Ordering::Relaxed);
            }
            windows += 1;
            if windows == nwin.div_ceil(2) {
                crate::fault::point(crate::fault::Point::RevertMid);
            }
            Ok(())
        },
    )?;
    drop(map);
    src.file().sync_all().map_err(werr(0))?;
    let _ = sys::drop_cache(wfd, 0, size);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Access;
    use crate::take::{take, TakeOptions};

    #[test]
    fn only_differing_blocks_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let mut data: Vec<u8> = (0..(3u64 << 20) / 8)
            .flat_map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).to_le_bytes())
            .collect();
        data.extend(vec![0u8; 1 << 20]);
        std::fs::write(&img, &data).unwrap();
        let chain_path = dir.path().join("c");
        let sys = std::sync::Arc::new(crate::quiesce::Host);
        let first = take(sys, &img, &chain_path, &TakeOptions::default()).unwrap();
        // Change 5 data blocks and 2 zero blocks.
        let mut changed = data.clone();
        for b in [0usize, 7, 100, 101, 700, 800, 900] {
            changed[b * 4096 + 17] ^= 0xff;
        }
        std::fs::write(&img, &changed).unwrap();
        let chain = Chain::open(&chain_path, Access::Read).unwrap();
        let out = revert(&chain, first.snapshot.id, &img, None).unwrap();
        assert_eq!(out.blocks_written, 7);
        assert_eq!(out.blocks_checked, 1024);
        assert!(std::fs::read(&img).unwrap() == data);
        // Nothing differs any more.
        let again = revert(&chain, first.snapshot.id, &img, None).unwrap();
        assert_eq!(again.blocks_written, 0);
    }
}
