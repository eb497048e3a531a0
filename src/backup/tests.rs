//! The engine against an in-memory store: series of backups of a changing
//! image, restores, deletes, crashes, encryption and damage. The same
//! behaviours are tested against a real S3 server in tests/backup.rs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use uuid::Uuid;

use super::store::*;
use super::*;
use crate::chain::{Access, Chain};
use crate::take::{take, TakeOptions};

const BS: usize = 4096;

fn rand_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// An image of random 64 KiB runs and zero runs.
fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    for (i, c) in v.chunks_mut(64 << 10).enumerate() {
        if (i as u64 * 7 + seed) % 5 < 3 {
            let r = rand_bytes(seed * 1000 + i as u64, c.len());
            c.copy_from_slice(&r);
        }
    }
    v
}

/// Rewrite some blocks with new data and zero some others.
fn mutate(img: &mut [u8], round: u64) {
    let n = img.len() / BS;
    for k in 0..40u64 {
        let b = ((round * 7919 + k * 104_729) % n as u64) as usize;
        let data = if k % 5 == 0 {
            vec![0u8; BS]
        } else {
            rand_bytes(round * 100 + k, BS)
        };
        img[b * BS..(b + 1) * BS].copy_from_slice(&data);
    }
}

fn changed_bytes(old: &[u8], new: &[u8]) -> u64 {
    new.chunks(BS)
        .enumerate()
        .filter(|(i, c)| old.get(i * BS..(i * BS + c.len())) != Some(*c))
        .map(|(_, c)| c.len() as u64)
        .sum()
}

struct Fixture {
    dir: tempfile::TempDir,
    img: PathBuf,
    chain: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        Fixture {
            img: dir.path().join("img"),
            chain: dir.path().join("vol.chain"),
            dir,
        }
    }
    fn snap(&self, data: &[u8]) -> Uuid {
        std::fs::write(&self.img, data).unwrap();
        take(
            Arc::new(crate::quiesce::Host),
            &self.img,
            &self.chain,
            &TakeOptions::default(),
        )
        .unwrap()
        .snapshot
        .id
    }
    fn backup(&self, remote: &Remote, snap: Uuid, opts: BackupOptions) -> BackupOutcome {
        let chain = Chain::open(&self.chain, Access::Read).unwrap();
        create(&chain, snap, remote, &opts).unwrap()
    }
    fn restored(&self, remote: &Remote, id: Uuid) -> Vec<u8> {
        let t = self.dir.path().join(format!("r-{}", Uuid::new_v4()));
        restore(
            remote,
            "vol",
            &id.to_string(),
            &t,
            &RestoreOptions::default(),
        )
        .unwrap();
        let v = std::fs::read(&t).unwrap();
        std::fs::remove_file(&t).unwrap();
        v
    }
}

fn incremental() -> BackupOptions {
    BackupOptions {
        volume: "vol".into(),
        incremental: true,
        ..Default::default()
    }
}

fn tuning() -> Tuning {
    Tuning {
        object_size: 1 << 20,
        part_size: 5 << 20,
        concurrency: 2,
    }
}

fn mem_remote(key: Option<crypto::Key>) -> (Arc<MemStore>, Remote) {
    let s = Arc::new(MemStore::new("mem"));
    let r = Remote::with_store("mem", s.clone(), key, tuning());
    (s, r)
}

fn object_puts(s: &MemStore) -> Vec<String> {
    s.puts
        .lock()
        .unwrap()
        .iter()
        .filter(|k| k.contains("/objects/"))
        .cloned()
        .collect()
}

#[test]
fn a_series_round_trips_and_uploads_only_changes() {
    let f = Fixture::new();
    let (store, remote) = mem_remote(None);
    let mut img = image(8 << 20, 1);
    let mut images = Vec::new();
    let mut prev: Option<Vec<u8>> = None;
    for round in 0..6u64 {
        if round > 0 {
            mutate(&mut img, round);
        }
        let snap = f.snap(&img);
        let sent0 = store.bytes_sent();
        let out = f.backup(&remote, snap, incremental());
        let sent = store.bytes_sent() - sent0;
        let expected = prev
            .as_ref()
            .map_or(img.len() as u64, |p| changed_bytes(p, &img));
        if round == 0 {
            assert_eq!(out.diff, DiffSource::Full);
            assert!(out.info.full);
        } else {
            assert_eq!(out.diff, DiffSource::LocalState);
            assert_eq!(out.info.changed_bytes, expected, "round {round}");
            let data = expected - out.info.zero_bytes;
            assert!(
                sent as f64 <= 1.02 * data as f64 + 65536.0,
                "round {round}: sent {sent} for {data} changed data bytes"
            );
            // Only changed blocks were read.
            assert_eq!(out.read_bytes, data);
        }
        images.push((out.info.id, img.clone()));
        prev = Some(img.clone());
    }
    for (id, want) in &images {
        assert!(f.restored(&remote, *id) == *want, "backup {id} differs");
    }
    // Without the local state, the manifests tell the same change.
    mutate(&mut img, 99);
    let snap = f.snap(&img);
    let out = f.backup(
        &remote,
        snap,
        BackupOptions {
            no_local_state: true,
            ..incremental()
        },
    );
    assert_eq!(out.diff, DiffSource::Manifests);
    assert_eq!(
        out.info.changed_bytes,
        changed_bytes(prev.as_ref().unwrap(), &img)
    );
    assert!(f.restored(&remote, out.info.id) == img);
    // Full backups on request; a second one of the same snapshot finds
    // every object it needs already there.
    let full_opts = BackupOptions {
        incremental: false,
        ..incremental()
    };
    let full = f.backup(&remote, snap, full_opts.clone());
    assert!(full.info.full && full.objects_uploaded > 0);
    let again = f.backup(&remote, snap, full_opts);
    assert!(again.info.full && again.objects_uploaded == 0 && again.objects_reused > 0);
    assert!(f.restored(&remote, again.info.id) == img);
    let listed = list(&remote, Some("vol")).unwrap();
    assert_eq!(listed.len(), 9);
    assert!(verify(&remote, "vol", None, None, None).unwrap().ok());
}

#[test]
fn a_grown_and_a_shrunk_device_round_trip() {
    let f = Fixture::new();
    let (_s, remote) = mem_remote(None);
    let img = image(3 << 20, 2);
    let a = f.backup(&remote, f.snap(&img), incremental());
    // Grow by a partial block: new blocks and a longer last block.
    let mut grown = img.clone();
    grown.extend_from_slice(&rand_bytes(5, 3 * BS + 100));
    std::fs::remove_file(&f.chain).unwrap();
    let b = f.backup(&remote, f.snap(&grown), incremental());
    assert_eq!(b.diff, DiffSource::Manifests, "a new chain: no local state");
    assert_eq!(b.info.changed_bytes, 3 * BS as u64 + 100);
    let shrunk = grown[..(2 << 20) + 10].to_vec();
    std::fs::remove_file(&f.chain).unwrap();
    let c = f.backup(&remote, f.snap(&shrunk), incremental());
    assert!(f.restored(&remote, a.info.id) == img);
    assert!(f.restored(&remote, b.info.id) == grown);
    assert!(f.restored(&remote, c.info.id) == shrunk);
}

#[test]
fn deleting_from_the_middle_keeps_every_other_backup_exact() {
    let f = Fixture::new();
    let (store, remote) = mem_remote(None);
    let mut img = image(4 << 20, 3);
    let mut ids = Vec::new();
    for round in 0..5 {
        if round > 0 {
            mutate(&mut img, round + 10);
        }
        let out = f.backup(&remote, f.snap(&img), incremental());
        ids.push((out.info.id, img.clone()));
    }
    let gone = ids.remove(2);
    let d = delete(&remote, "vol", &gone.0.to_string()).unwrap();
    assert_eq!(d.merged_into, vec![ids[2].0]);
    for (id, want) in &ids {
        assert!(f.restored(&remote, *id) == *want);
    }
    // The full one too: its successor becomes full.
    let gone = ids.remove(0);
    delete(&remote, "vol", &gone.0.to_string()).unwrap();
    assert!(show(&remote, "vol", &ids[0].0.to_string()).unwrap().full);
    for (id, want) in &ids {
        assert!(f.restored(&remote, *id) == *want);
    }
    // Every object left is referenced; every referenced one is there.
    let mut referenced = std::collections::HashSet::new();
    for (s, i) in remote.backups("vol").unwrap() {
        for o in remote.manifest("vol", s, i).unwrap().objects {
            referenced.insert(o.key("vol"));
        }
    }
    let stored: std::collections::HashSet<String> = store
        .list("vol/objects/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(stored, referenced);
    assert!(verify(&remote, "vol", None, None, None).unwrap().ok());
    // The newest next: nothing to merge.
    let (last, _) = ids.pop().unwrap();
    assert!(delete(&remote, "vol", &last.to_string())
        .unwrap()
        .merged_into
        .is_empty());
    for (id, want) in &ids {
        assert!(f.restored(&remote, *id) == *want);
    }
    // The next incremental after deleting the newest compares with what
    // is now the newest: the local state no longer matches.
    let out = f.backup(&remote, f.snap(&img), incremental());
    assert_eq!(out.diff, DiffSource::Manifests);
    assert!(f.restored(&remote, out.info.id) == img);
}

/// A store whose puts start failing (as a dead server would) after a budget.
#[derive(Debug)]
struct Failing {
    inner: Arc<MemStore>,
    budget: AtomicI64,
}

impl Failing {
    fn spend(&self, key: &str) -> Result<(), StoreError> {
        if key.contains("/objects/") && self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(StoreError {
                remote: "mem".into(),
                op: "put",
                key: key.into(),
                attempts: 3,
                cause: Box::new(RequestError::Status {
                    status: 503,
                    code: "SlowDown".into(),
                    message: "injected".into(),
                }),
            });
        }
        Ok(())
    }
}

impl Store for Failing {
    fn remote(&self) -> &str {
        "mem"
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn put(&self, key: &str, body: &[u8], mode: PutMode) -> Result<Put, StoreError> {
        self.spend(key)?;
        self.inner.put(key, body, mode)
    }
    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.inner.list(prefix)
    }
    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list_dirs(prefix)
    }
    fn create_multipart(&self, key: &str) -> Result<String, StoreError> {
        self.inner.create_multipart(key)
    }
    fn upload_part(&self, key: &str, id: &str, n: u16, body: &[u8]) -> Result<String, StoreError> {
        self.spend(key)?;
        self.inner.upload_part(key, id, n, body)
    }
    fn complete_multipart(&self, k: &str, id: &str, p: &[(u16, String)]) -> Result<(), StoreError> {
        self.inner.complete_multipart(k, id, p)
    }
    fn abort_multipart(&self, key: &str, id: &str) -> Result<(), StoreError> {
        self.inner.abort_multipart(key, id)
    }
    fn list_multipart(&self, prefix: &str) -> Result<Vec<Upload>, StoreError> {
        self.inner.list_multipart(prefix)
    }
    fn list_parts(&self, key: &str, id: &str) -> Result<Vec<Part>, StoreError> {
        self.inner.list_parts(key, id)
    }
    fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent()
    }
}

#[test]
fn a_failed_backup_leaves_nothing_complete_and_resumes_without_reuploading() {
    let f = Fixture::new();
    let mem = Arc::new(MemStore::new("mem"));
    // Objects of 12 MiB in parts of 5 MiB, so a multipart upload is cut
    // in the middle too.
    let tuning = Tuning {
        object_size: 12 << 20,
        part_size: 5 << 20,
        concurrency: 1,
    };
    let failing = Arc::new(Failing {
        inner: mem.clone(),
        budget: AtomicI64::new(4),
    });
    let bad = Remote::with_store("mem", failing, None, tuning);
    let img: Vec<u8> = rand_bytes(7, 40 << 20);
    let snap = f.snap(&img);
    let chain = Chain::open(&f.chain, Access::Read).unwrap();
    let e = create(&chain, snap, &bad, &incremental()).unwrap_err();
    assert!(crate::util::error_chain(&e).contains("503"), "{e}");
    assert!(bad.backups("vol").unwrap().is_empty(), "nothing complete");
    assert!(mem.get("vol/lock").unwrap().is_none(), "lock released");
    let before = object_puts(&mem).len();
    assert_eq!(before, 4, "four uploads went through before the failure");
    let good = Remote::with_store("mem", mem.clone(), None, tuning);
    let out = create(&chain, snap, &good, &incremental()).unwrap();
    let puts = object_puts(&mem);
    let mut seen = HashMap::new();
    for p in &puts {
        *seen.entry(p.clone()).or_insert(0) += 1;
    }
    assert!(
        seen.values().all(|&n| n == 1),
        "uploaded twice: {:?}",
        seen.iter().filter(|(_, &n)| n > 1).collect::<Vec<_>>()
    );
    assert!(out.objects_reused >= 1, "{out:?}");
    assert!(f.restored(&good, out.info.id) == img);
}

#[test]
fn encryption_hides_the_data_and_names_a_wrong_key() {
    let f = Fixture::new();
    let key = crypto::Key::from_master(&[42; 32]);
    let (store, remote) = mem_remote(Some(key.clone()));
    let img = image(2 << 20, 9);
    let out = f.backup(&remote, f.snap(&img), incremental());
    assert!(out.info.encrypted);
    let probes: Vec<&[u8]> = img
        .chunks(BS)
        .filter(|c| c.iter().any(|&b| b != 0))
        .map(|c| &c[..32])
        .take(50)
        .collect();
    store.with_objects(|objs| {
        for (k, v) in objs.iter() {
            for p in &probes {
                assert!(!v.windows(32).any(|w| w == *p), "plaintext in {k}");
            }
        }
    });
    assert!(f.restored(&remote, out.info.id) == img);
    let wrong = Remote::with_store(
        "mem",
        store.clone(),
        Some(crypto::Key::from_master(&[43; 32])),
        tuning(),
    );
    let t = f.dir.path().join("wrong");
    let e = restore(
        &wrong,
        "vol",
        &out.info.id.to_string(),
        &t,
        &Default::default(),
    )
    .unwrap_err();
    let msg = crate::util::error_chain(&e);
    assert!(
        msg.contains("key file") && msg.contains(&key.id_hex()),
        "{msg}"
    );
    let none = Remote::with_store("mem", store, None, tuning());
    let e = restore(
        &none,
        "vol",
        &out.info.id.to_string(),
        &t,
        &Default::default(),
    )
    .unwrap_err();
    assert!(crate::util::error_chain(&e).contains("key_file"), "{e}");
}

#[test]
fn damage_is_named_by_verify_and_stops_a_restore() {
    let f = Fixture::new();
    let (store, remote) = mem_remote(None);
    let img = image(4 << 20, 4);
    let a = f.backup(&remote, f.snap(&img), incremental());
    let mut img2 = img.clone();
    mutate(&mut img2, 5);
    let b = f.backup(&remote, f.snap(&img2), incremental());
    let keys: Vec<String> = store
        .list("vol/objects/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    let m_a = remote.manifest("vol", 1, a.info.id).unwrap();
    let damaged = m_a.objects[0].key("vol");
    let missing = m_a.objects[1].key("vol");
    assert!(keys.contains(&damaged) && keys.contains(&missing));
    store.with_objects(|o| {
        o.get_mut(&damaged).unwrap()[100] ^= 1;
        o.remove(&missing);
    });
    let r = verify(&remote, "vol", None, None, None).unwrap();
    assert!(!r.ok());
    let text: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter()
            .any(|t| t.contains(&damaged) && t.contains("damaged")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains(&missing) && t.contains("missing")),
        "{text:?}"
    );
    assert_eq!(r.problems.len(), 2, "{text:?}");
    // Both backups need them: both name them.
    assert!(text.iter().all(|t| t.contains(&a.info.id.to_string())));
    let t = f.dir.path().join("t");
    let e = restore(
        &remote,
        "vol",
        &b.info.id.to_string(),
        &t,
        &Default::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            BackupError::DamagedObject { .. } | BackupError::MissingObject { .. }
        ),
        "{e}"
    );
    // A damaged manifest is named too.
    let mkey = remote.manifest("vol", 2, b.info.id).unwrap().key();
    store.with_objects(|o| o.get_mut(&mkey).unwrap()[60] ^= 1);
    let r = verify(&remote, "vol", Some(&b.info.id.to_string()), None, None).unwrap();
    assert!(
        r.problems
            .iter()
            .any(|p| matches!(p, Problem::Manifest { key, .. } if *key == mkey)),
        "{:?}",
        r.problems
    );
    // And gc refuses to guess what that manifest needs.
    assert!(matches!(
        gc(&remote, "vol"),
        Err(BackupError::GcRefused { .. })
    ));
}

#[test]
fn restore_overwrites_an_existing_file_exactly() {
    let f = Fixture::new();
    let (_s, remote) = mem_remote(None);
    let img = image(2 << 20, 6);
    let out = f.backup(&remote, f.snap(&img), incremental());
    let t: &Path = &f.dir.path().join("existing");
    std::fs::write(t, rand_bytes(1, 3 << 20)).unwrap();
    restore(
        &remote,
        "vol",
        &out.info.id.to_string()[..8],
        t,
        &Default::default(),
    )
    .unwrap();
    assert!(std::fs::read(t).unwrap() == img);
    // Zero runs are holes: fewer blocks allocated than the image's size.
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(t).unwrap();
    assert!(
        md.blocks() * 512 < img.len() as u64,
        "{} allocated",
        md.blocks() * 512
    );
}

#[test]
fn a_restored_image_is_owner_only_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: umask has no failure mode; 022 is the usual default anyway.
    unsafe { libc::umask(0o022) };
    let f = Fixture::new();
    let (_s, remote) = mem_remote(None);
    let img = image(1 << 20, 7);
    let out = f.backup(&remote, f.snap(&img), incremental());
    let t = f.dir.path().join("new.img");
    restore(
        &remote,
        "vol",
        &out.info.id.to_string(),
        &t,
        &Default::default(),
    )
    .unwrap();
    let mode = std::fs::metadata(&t).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "restored image is {mode:o}");
}
