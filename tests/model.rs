//! Property test: the chain against a simple in-memory model. Random
//! sequences of writes, growth, takes (incremental and full), deletes and
//! restores; every restore must equal the model's copy of that snapshot.

use std::sync::Arc;

use blocksnap::chain::restore::{restore, RestoreOptions};
use blocksnap::chain::verify::verify;
use blocksnap::chain::{delete::delete, Access, Chain};
use blocksnap::take::{take, TakeError, TakeOptions};
use proptest::prelude::*;

const BS: usize = 4096;

#[derive(Clone, Debug)]
enum Op {
    /// Overwrite `blocks` blocks from `block` with pseudo-random bytes.
    Write {
        block: usize,
        blocks: usize,
        seed: u64,
    },
    /// Zero a run of blocks.
    Zero {
        block: usize,
        blocks: usize,
    },
    /// Set one byte (an almost-zero block when it lands in zeros).
    Poke {
        offset: usize,
        value: u8,
    },
    /// Grow the device by some bytes (not always whole blocks).
    Grow {
        bytes: usize,
    },
    /// Shrink it: the next take must be full.
    Shrink {
        bytes: usize,
    },
    Take,
    TakeFull,
    Delete {
        pick: usize,
    },
    Restore {
        pick: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..64, 1usize..8, any::<u64>()).prop_map(|(block, blocks, seed)| Op::Write { block, blocks, seed }),
        2 => (0usize..64, 1usize..16).prop_map(|(block, blocks)| Op::Zero { block, blocks }),
        2 => (0usize..(64 * BS), 1u8..=255).prop_map(|(offset, value)| Op::Poke { offset, value }),
        1 => (1usize..(3 * BS)).prop_map(|bytes| Op::Grow { bytes }),
        1 => (1usize..(3 * BS)).prop_map(|bytes| Op::Shrink { bytes }),
        4 => Just(Op::Take),
        1 => Just(Op::TakeFull),
        2 => any::<usize>().prop_map(|pick| Op::Delete { pick }),
        2 => any::<usize>().prop_map(|pick| Op::Restore { pick }),
    ]
}

fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn restored(chain: &std::path::Path, id: uuid::Uuid, dir: &std::path::Path) -> Vec<u8> {
    let c = Chain::open(chain, Access::Read).unwrap();
    let t = dir.join(format!("r-{id}"));
    restore(&c, id, &t, &RestoreOptions::default()).unwrap();
    let b = std::fs::read(&t).unwrap();
    std::fs::remove_file(&t).unwrap();
    b
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dev.img");
    let chain = dir.path().join("dev.chain");
    // 64 blocks and a short last block.
    let mut image = bytes(1, 64 * BS + 1000);
    for b in (0..64).step_by(3) {
        image[b * BS..(b + 1) * BS].fill(0);
    }
    std::fs::write(&img, &image).unwrap();
    let mut model: Vec<(uuid::Uuid, Vec<u8>)> = Vec::new();
    let sys = Arc::new(blocksnap::quiesce::Host);
    for op in ops {
        match op {
            Op::Write {
                block,
                blocks,
                seed,
            } => {
                let start = (block * BS).min(image.len());
                let end = ((block + blocks) * BS).min(image.len());
                let data = bytes(seed, end - start);
                image[start..end].copy_from_slice(&data);
            }
            Op::Zero { block, blocks } => {
                let start = (block * BS).min(image.len());
                let end = ((block + blocks) * BS).min(image.len());
                image[start..end].fill(0);
            }
            Op::Poke { offset, value } => {
                let o = offset % image.len();
                image[o] = value;
            }
            Op::Grow { bytes: n } => {
                let more = bytes(n as u64, n);
                image.extend_from_slice(&more);
            }
            Op::Shrink { bytes: n } => {
                let keep = image.len().saturating_sub(n).max(BS);
                image.truncate(keep);
            }
            Op::Take | Op::TakeFull => {
                std::fs::write(&img, &image).unwrap();
                let mut opts = TakeOptions {
                    full: matches!(op, Op::TakeFull),
                    ..Default::default()
                };
                let out = match take(sys.clone(), &img, &chain, &opts) {
                    Ok(o) => o,
                    // A device smaller than the newest snapshot needs a full one.
                    Err(TakeError::Shrunk { now, .. }) => {
                        prop_assert_eq!(now, image.len() as u64);
                        opts.full = true;
                        take(sys.clone(), &img, &chain, &opts).unwrap()
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("take failed: {e}"))),
                };
                model.push((out.snapshot.id, image.clone()));
            }
            Op::Delete { pick } => {
                if !model.is_empty() {
                    let (id, _) = model.remove(pick % model.len());
                    let mut c = Chain::open(&chain, Access::Write).unwrap();
                    delete(&mut c, id).unwrap();
                }
            }
            Op::Restore { pick } => {
                if !model.is_empty() {
                    let (id, want) = &model[pick % model.len()];
                    let got = restored(&chain, *id, dir.path());
                    prop_assert!(got == *want, "restore of {} differs from the model", id);
                }
            }
        }
    }
    if chain.exists() {
        let c = Chain::open(&chain, Access::Read).unwrap();
        let ids: Vec<uuid::Uuid> = c.snapshots().iter().map(|s| s.id).collect();
        let want: Vec<uuid::Uuid> = model.iter().map(|m| m.0).collect();
        prop_assert_eq!(ids, want);
        let report = verify(&c, None);
        prop_assert!(report.ok(), "verify: {:?}", report.problems);
        for (id, want) in &model {
            let got = restored(&chain, *id, dir.path());
            prop_assert!(
                got == *want,
                "final restore of {} differs from the model",
                id
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]
    #[test]
    fn the_chain_behaves_like_the_model(ops in prop::collection::vec(op(), 1..48)) {
        run(ops)?;
    }
}
