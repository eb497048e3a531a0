//! A backup's manifest: which blocks changed since its parent backup, where
//! each one's bytes are (object and offset) and its checksum. A full backup
//! has no parent; an incremental one lists only what differs from its
//! parent, so its manifest stays proportional to the change (the bytes an
//! incremental backup uploads are its changed blocks plus about 1%).
//! docs/BACKUP.md describes the encoding; keep the two in step.
//!
//! The image of backup B is built like a chain snapshot's: walk B, its
//! parent, its parent's parent... newest first, each block taken from the
//! first manifest that lists it, stopping at a full one.

use std::collections::HashMap;

use uuid::Uuid;

use super::crypto::{self, Key, Name, Sum};
use crate::chain::Bitmap;

pub const MAGIC: [u8; 8] = *b"BSNPBKM1";
pub const VERSION: u32 = 1;
/// Header flag: the body is sealed.
const FLAG_ENCRYPTED: u8 = 1;
/// Body flag: the backup defines every block (no parent).
pub const FLAG_FULL: u32 = 1;
/// Object flag: the object is sealed (and its checksums keyed).
const OBJ_ENCRYPTED: u8 = 1;

/// An object a manifest references.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub name: Name,
    /// Bytes of the object as stored (with the tag when sealed).
    pub stored_len: u64,
    /// Bytes of its plaintext: the blocks, back to back.
    pub plain_len: u64,
    pub encrypted: bool,
}

impl ObjectRef {
    /// Its key, relative to the remote's prefix.
    pub fn key(&self, volume: &str) -> String {
        object_key(volume, &self.name)
    }
}

/// The key of object `name` of `volume`.
pub fn object_key(volume: &str, name: &Name) -> String {
    format!("{volume}/objects/{}", crypto::hex(name))
}

/// Where a run of blocks is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    Zero,
    /// In `objects[object]` at plaintext byte `offset`, blocks back to back.
    Data {
        object: u32,
        offset: u64,
    },
}

/// A run of consecutive blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub block: u64,
    pub count: u32,
    pub loc: Loc,
    /// For data: index of the first block's checksum in `sums`.
    pub sum: usize,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.block + self.count as u64
    }
}

/// One backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub volume: String,
    pub id: Uuid,
    /// `None` for a full backup.
    pub parent: Option<Uuid>,
    /// Position in the volume's series (creation order); in the key.
    pub seq: u64,
    pub created_us: i64,
    pub snapshot_id: Uuid,
    pub snapshot_created_us: i64,
    pub snapshot_name: String,
    pub name: String,
    pub description: String,
    pub device_size: u64,
    pub block_size: u32,
    /// Bytes of blocks that differed from the parent (data and zero).
    pub changed_bytes: u64,
    /// Of those, bytes of all-zero blocks (not stored).
    pub zero_bytes: u64,
    /// Bytes of objects this backup uploaded (new to the remote).
    pub uploaded_bytes: u64,
    /// Key id of the key its new objects were sealed with (zero: none).
    pub key_id: [u8; 8],
    pub objects: Vec<ObjectRef>,
    pub extents: Vec<Extent>,
    pub sums: Vec<Sum>,
}

/// The key of a manifest.
pub fn manifest_key(volume: &str, seq: u64, id: Uuid) -> String {
    format!("{volume}/backups/{seq:020}-{id}")
}

/// Parse a manifest key (relative to the prefix) into volume, seq and id.
pub fn parse_manifest_key(key: &str) -> Option<(&str, u64, Uuid)> {
    let (volume, rest) = key.split_once("/backups/")?;
    let (seq, id) = rest.split_once('-')?;
    if seq.len() != 20 || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((volume, seq.parse().ok()?, Uuid::parse_str(id).ok()?))
}

/// Why a manifest did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("not a blocksnap backup manifest")]
    Magic,
    #[error(
        "manifest format version {0} is newer than this blocksnap understands; upgrade blocksnap"
    )]
    Newer(u32),
    #[error("it is encrypted; configure the remote's key_file")]
    NeedKey,
    #[error("it was encrypted with key {found}, but the configured key file is key {configured}: use the key file the backup was made with")]
    WrongKey { found: String, configured: String },
    #[error("it fails authentication or its checksum (damaged, or not the manifest stored under this name)")]
    Integrity,
    #[error("it belongs to volume {volume} backup {id}, not the one stored under this name")]
    Misplaced { volume: String, id: Uuid },
    #[error("it is malformed: {0}")]
    Malformed(String),
}

impl Manifest {
    pub fn key(&self) -> String {
        manifest_key(&self.volume, self.seq, self.id)
    }

    pub fn is_full(&self) -> bool {
        self.parent.is_none()
    }

    pub fn nblocks(&self) -> u64 {
        self.device_size.div_ceil(self.block_size as u64)
    }

    /// Bytes of block `b` of the image (the last one may be short).
    pub fn block_len(&self, b: u64) -> u64 {
        block_len(self.device_size, self.block_size, b)
    }

    /// Encode, sealing the body if `key` is given.
    pub fn encode(&self, key: Option<&Key>) -> Vec<u8> {
        let header = self.header(key);
        let body = self.body();
        let mut out = header.clone();
        match key {
            Some(k) => out.extend_from_slice(&crypto::seal_manifest(k, &header, &body)),
            None => {
                out.extend_from_slice(&body);
                out.extend_from_slice(&crypto::manifest_hash(&header, &body));
            }
        }
        out
    }

    fn header(&self, key: Option<&Key>) -> Vec<u8> {
        let mut e = Enc::default();
        e.bytes(&MAGIC);
        e.u32(VERSION);
        e.u8(if key.is_some() { FLAG_ENCRYPTED } else { 0 });
        e.bytes(&key.map(|k| k.id()).unwrap_or([0; 8]));
        e.uuid(&self.id);
        e.u64(self.seq);
        e.str(&self.volume);
        e.0
    }

    fn body(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.uuid(&self.parent.unwrap_or(Uuid::nil()));
        e.i64(self.created_us);
        e.uuid(&self.snapshot_id);
        e.i64(self.snapshot_created_us);
        e.str(&self.snapshot_name);
        e.str(&self.name);
        e.str(&self.description);
        e.u64(self.device_size);
        e.u32(self.block_size);
        e.u32(if self.parent.is_none() { FLAG_FULL } else { 0 });
        e.u64(self.changed_bytes);
        e.u64(self.zero_bytes);
        e.u64(self.uploaded_bytes);
        e.bytes(&self.key_id);
        e.u32(self.objects.len() as u32);
        for o in &self.objects {
            e.bytes(&o.name);
            e.u64(o.stored_len);
            e.u64(o.plain_len);
            e.u8(if o.encrypted { OBJ_ENCRYPTED } else { 0 });
        }
        e.u64(self.extents.len() as u64);
        for x in &self.extents {
            e.u64(x.block);
            e.u32(x.count);
            match x.loc {
                Loc::Zero => e.u8(0),
                Loc::Data { object, offset } => {
                    e.u8(1);
                    e.u32(object);
                    e.u64(offset);
                    for s in &self.sums[x.sum..x.sum + x.count as usize] {
                        e.bytes(s);
                    }
                }
            }
        }
        e.0
    }

    /// Decode and check a manifest read from `volume`/`seq`/`id`'s key.
    pub fn decode(
        b: &[u8],
        key: Option<&Key>,
        volume: &str,
        seq: u64,
        id: Uuid,
    ) -> Result<Manifest, ManifestError> {
        if b.len() < 8 || b[..8] != MAGIC {
            return Err(ManifestError::Magic);
        }
        let mut d = Dec::new(b);
        d.take(8);
        let short = || ManifestError::Malformed("cut short".into());
        let version = d.u32().ok_or_else(short)?;
        if version > VERSION {
            return Err(ManifestError::Newer(version));
        }
        let flags = d.u8().ok_or_else(short)?;
        let key_id: [u8; 8] = d.take(8).ok_or_else(short)?.try_into().unwrap();
        let hid = d.uuid().ok_or_else(short)?;
        let hseq = d.u64().ok_or_else(short)?;
        let hvol = d.str().ok_or_else(short)?;
        let header = &b[..d.pos];
        let body = if flags & FLAG_ENCRYPTED != 0 {
            let k = key.ok_or(ManifestError::NeedKey)?;
            if k.id() != key_id {
                return Err(ManifestError::WrongKey {
                    found: crypto::hex(&key_id),
                    configured: k.id_hex(),
                });
            }
            crypto::open_manifest(k, header, &b[d.pos..]).map_err(|_| ManifestError::Integrity)?
        } else {
            if b.len() < d.pos + 32 {
                return Err(short());
            }
            let body = &b[d.pos..b.len() - 32];
            if crypto::manifest_hash(header, body)[..] != b[b.len() - 32..] {
                return Err(ManifestError::Integrity);
            }
            body.to_vec()
        };
        if hid != id || hvol != volume || hseq != seq {
            return Err(ManifestError::Misplaced {
                volume: hvol,
                id: hid,
            });
        }
        let m = decode_body(&body, hvol, hid, hseq).ok_or_else(short)?;
        m.check().map_err(ManifestError::Malformed)?;
        Ok(m)
    }

    /// Structural checks: sorted, non-overlapping extents inside the
    /// device, data inside its object.
    pub fn check(&self) -> Result<(), String> {
        if crate::chain::format::check_block_size(self.block_size).is_err() {
            return Err(format!("invalid block size {}", self.block_size));
        }
        let n = self.nblocks();
        let bs = self.block_size as u64;
        let mut next = 0u64;
        let mut sums = 0usize;
        for x in &self.extents {
            if x.count == 0
                || x.block < next
                || x.block.checked_add(x.count as u64).is_none_or(|e| e > n)
            {
                return Err(format!(
                    "extent at block {} is out of order or outside the device",
                    x.block
                ));
            }
            next = x.end();
            if let Loc::Data { object, offset } = x.loc {
                let o = self
                    .objects
                    .get(object as usize)
                    .ok_or_else(|| format!("extent at block {} names a missing object", x.block))?;
                let len = (x.end() * bs).min(self.device_size) - x.block * bs;
                if offset.checked_add(len).is_none_or(|e| e > o.plain_len) {
                    return Err(format!(
                        "extent at block {} lies outside its object",
                        x.block
                    ));
                }
                if x.sum != sums {
                    return Err("checksum index out of step".into());
                }
                sums += x.count as usize;
            }
        }
        if sums != self.sums.len() {
            return Err("checksum count out of step".into());
        }
        // A full backup lists every block (zeros as zero extents).
        let covered: u64 = self.extents.iter().map(|x| x.count as u64).sum();
        if self.parent.is_none() && covered != n {
            return Err("a full backup does not cover every block".into());
        }
        Ok(())
    }
}

pub fn block_len(device_size: u64, block_size: u32, b: u64) -> u64 {
    let bs = block_size as u64;
    (device_size - b * bs).min(bs)
}

fn decode_body(b: &[u8], volume: String, id: Uuid, seq: u64) -> Option<Manifest> {
    let mut d = Dec::new(b);
    let parent = d.uuid()?;
    let created_us = d.i64()?;
    let snapshot_id = d.uuid()?;
    let snapshot_created_us = d.i64()?;
    let snapshot_name = d.str()?;
    let name = d.str()?;
    let description = d.str()?;
    let device_size = d.u64()?;
    let block_size = d.u32()?;
    let flags = d.u32()?;
    let changed_bytes = d.u64()?;
    let zero_bytes = d.u64()?;
    let uploaded_bytes = d.u64()?;
    let key_id: [u8; 8] = d.take(8)?.try_into().ok()?;
    let no = d.u32()? as usize;
    if no > b.len() / 49 {
        return None;
    }
    let mut objects = Vec::with_capacity(no);
    for _ in 0..no {
        let name: Name = d.take(32)?.try_into().ok()?;
        let stored_len = d.u64()?;
        let plain_len = d.u64()?;
        let f = d.u8()?;
        objects.push(ObjectRef {
            name,
            stored_len,
            plain_len,
            encrypted: f & OBJ_ENCRYPTED != 0,
        });
    }
    let ne = d.u64()?;
    if ne > (b.len() / 13) as u64 {
        return None;
    }
    let mut extents = Vec::with_capacity(ne as usize);
    let mut sums = Vec::new();
    for _ in 0..ne {
        let block = d.u64()?;
        let count = d.u32()?;
        let kind = d.u8()?;
        let (loc, sum) = match kind {
            0 => (Loc::Zero, 0),
            1 => {
                let object = d.u32()?;
                let offset = d.u64()?;
                let at = sums.len();
                if (count as usize).checked_mul(16)? > b.len() - d.pos {
                    return None;
                }
                for _ in 0..count {
                    sums.push(d.take(16)?.try_into().ok()?);
                }
                (Loc::Data { object, offset }, at)
            }
            _ => return None,
        };
        extents.push(Extent {
            block,
            count,
            loc,
            sum,
        });
    }
    if d.pos != b.len() {
        return None;
    }
    let is_full = flags & FLAG_FULL != 0;
    if is_full != parent.is_nil() {
        return None;
    }
    Some(Manifest {
        volume,
        id,
        parent: (!parent.is_nil()).then_some(parent),
        seq,
        created_us,
        snapshot_id,
        snapshot_created_us,
        snapshot_name,
        name,
        description,
        device_size,
        block_size,
        changed_bytes,
        zero_bytes,
        uploaded_bytes,
        key_id,
        objects,
        extents,
        sums,
    })
}

/// Where one run of an overlay comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    Zero,
    /// In `objects[object]` of the overlay at `offset`; checksums from `sums[sum..]`.
    Data {
        object: u32,
        offset: u64,
        sum: usize,
    },
}

/// A run of an overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub block: u64,
    pub count: u64,
    pub src: Src,
}

/// Manifests laid over each other, newest first: for every block of
/// `nblocks`, the newest one that lists it.
#[derive(Debug, Clone, Default)]
pub struct Overlay {
    pub objects: Vec<ObjectRef>,
    /// Sorted by block, not overlapping.
    pub runs: Vec<Run>,
    pub sums: Vec<Sum>,
    /// Blocks of `[0, nblocks)` that no manifest lists.
    pub missing: u64,
}

impl Overlay {
    /// Lay `manifests` (newest first) over each other for the first
    /// `nblocks` blocks, each block from the newest manifest listing it.
    pub fn build(manifests: &[&Manifest], nblocks: u64) -> Overlay {
        let mut filled = Bitmap::new(nblocks);
        let mut remaining = nblocks;
        let mut out = Overlay::default();
        let mut obj_index: HashMap<Name, u32> = HashMap::new();
        for m in manifests {
            if remaining == 0 {
                break;
            }
            let bs = m.block_size as u64;
            for x in &m.extents {
                let end = x.end().min(nblocks);
                let mut b = x.block;
                while b < end {
                    let Some(start) = filled.next_clear(b, end) else {
                        break;
                    };
                    let stop = filled.next_set(start, end).unwrap_or(end);
                    filled.set_range(start, stop);
                    remaining -= stop - start;
                    let delta = start - x.block;
                    let src = match x.loc {
                        Loc::Zero => Src::Zero,
                        Loc::Data { object, offset } => {
                            let o = m.objects[object as usize];
                            let gi = *obj_index.entry(o.name).or_insert_with(|| {
                                out.objects.push(o);
                                (out.objects.len() - 1) as u32
                            });
                            let sum = out.sums.len();
                            let from = x.sum + delta as usize;
                            out.sums
                                .extend_from_slice(&m.sums[from..from + (stop - start) as usize]);
                            Src::Data {
                                object: gi,
                                offset: offset + delta * bs,
                                sum,
                            }
                        }
                    };
                    out.runs.push(Run {
                        block: start,
                        count: stop - start,
                        src,
                    });
                    b = stop;
                }
            }
            if m.is_full() {
                break;
            }
        }
        out.runs.sort_by_key(|r| r.block);
        out.missing = remaining;
        out
    }

    /// The checksum of every block (`None` for zero blocks and blocks no
    /// manifest lists), for comparing an image with a new snapshot.
    pub fn block_sums(&self, nblocks: u64) -> Vec<Option<Sum>> {
        let mut out = vec![None; nblocks as usize];
        for r in &self.runs {
            if let Src::Data { sum, .. } = r.src {
                for i in 0..r.count {
                    out[(r.block + i) as usize] = Some(self.sums[sum + i as usize]);
                }
            }
        }
        out
    }

    /// Turn the overlay into the extents, objects and checksums of a
    /// manifest (merging adjacent runs where they continue each other).
    pub fn into_parts(self, block_size: u32) -> (Vec<ObjectRef>, Vec<Extent>, Vec<Sum>) {
        let bs = block_size as u64;
        let mut used: HashMap<u32, u32> = HashMap::new();
        let mut objects = Vec::new();
        let mut extents: Vec<Extent> = Vec::new();
        let mut sums = Vec::new();
        for r in &self.runs {
            let mut block = r.block;
            let mut left = r.count;
            while left > 0 {
                let count = left.min(u32::MAX as u64) as u32;
                let done = r.count - left;
                let loc = match r.src {
                    Src::Zero => Loc::Zero,
                    Src::Data { object, offset, .. } => {
                        let oi = *used.entry(object).or_insert_with(|| {
                            objects.push(self.objects[object as usize]);
                            (objects.len() - 1) as u32
                        });
                        Loc::Data {
                            object: oi,
                            offset: offset + done * bs,
                        }
                    }
                };
                let sum = sums.len();
                if let Src::Data { sum: s, .. } = r.src {
                    let from = s + done as usize;
                    sums.extend_from_slice(&self.sums[from..from + count as usize]);
                }
                // Continue the previous extent when this run carries on from it.
                let merged = match (extents.last_mut(), loc) {
                    (Some(p), Loc::Zero) if p.loc == Loc::Zero && p.end() == block => {
                        p.count.checked_add(count).map(|c| p.count = c).is_some()
                    }
                    (Some(p), Loc::Data { object, offset })
                        if p.end() == block
                            && matches!(p.loc, Loc::Data { object: po, offset: poff }
                            if po == object && poff + p.count as u64 * bs == offset) =>
                    {
                        p.count.checked_add(count).map(|c| p.count = c).is_some()
                    }
                    _ => false,
                };
                if !merged {
                    extents.push(Extent {
                        block,
                        count,
                        loc,
                        sum,
                    });
                }
                block += count as u64;
                left -= count as u64;
            }
        }
        (objects, extents, sums)
    }
}

// ---------------------------------------------------------------- encoding

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn uuid(&mut self, v: &Uuid) {
        self.0.extend_from_slice(v.as_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v.as_bytes());
    }
}

struct Dec<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn new(b: &'a [u8]) -> Self {
        Dec { b, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn uuid(&mut self) -> Option<Uuid> {
        Uuid::from_slice(self.take(16)?).ok()
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(parent: Option<Uuid>) -> Manifest {
        let o = ObjectRef {
            name: [7; 32],
            stored_len: 3 * 4096 + 16,
            plain_len: 3 * 4096,
            encrypted: true,
        };
        Manifest {
            volume: "vol-1".into(),
            id: Uuid::new_v4(),
            parent,
            seq: 4,
            created_us: 10,
            snapshot_id: Uuid::new_v4(),
            snapshot_created_us: 9,
            snapshot_name: "snap".into(),
            name: "nightly".into(),
            description: "d".into(),
            device_size: 10 * 4096,
            block_size: 4096,
            changed_bytes: 5 * 4096,
            zero_bytes: 2 * 4096,
            uploaded_bytes: o.stored_len,
            key_id: [1; 8],
            objects: vec![o],
            extents: vec![
                Extent {
                    block: 1,
                    count: 2,
                    loc: Loc::Data {
                        object: 0,
                        offset: 0,
                    },
                    sum: 0,
                },
                Extent {
                    block: 5,
                    count: 2,
                    loc: Loc::Zero,
                    sum: 0,
                },
                Extent {
                    block: 9,
                    count: 1,
                    loc: Loc::Data {
                        object: 0,
                        offset: 2 * 4096,
                    },
                    sum: 2,
                },
            ],
            sums: vec![[1; 16], [2; 16], [3; 16]],
        }
    }

    #[test]
    fn round_trip_plain_and_sealed() {
        let m = sample(Some(Uuid::new_v4()));
        let k = Key::from_master(&[3; 32]);
        for key in [None, Some(&k)] {
            let b = m.encode(key);
            let back = Manifest::decode(&b, key, &m.volume, m.seq, m.id).unwrap();
            assert_eq!(back, m);
            // Every single flipped bit is caught.
            for i in (0..b.len()).step_by(7) {
                let mut bad = b.clone();
                bad[i] ^= 0x04;
                assert!(
                    Manifest::decode(&bad, key, &m.volume, m.seq, m.id).is_err(),
                    "flip at {i} undetected"
                );
            }
            // Cut short: refused, never a panic.
            for n in (0..b.len()).step_by(5) {
                assert!(Manifest::decode(&b[..n], key, &m.volume, m.seq, m.id).is_err());
            }
            // Stored under another backup's name: refused.
            assert!(matches!(
                Manifest::decode(&b, key, &m.volume, m.seq, Uuid::new_v4()),
                Err(ManifestError::Misplaced { .. })
            ));
        }
        let sealed = m.encode(Some(&k));
        assert_eq!(
            Manifest::decode(&sealed, None, &m.volume, m.seq, m.id),
            Err(ManifestError::NeedKey)
        );
        assert!(matches!(
            Manifest::decode(
                &sealed,
                Some(&Key::from_master(&[4; 32])),
                &m.volume,
                m.seq,
                m.id
            ),
            Err(ManifestError::WrongKey { .. })
        ));
    }

    #[test]
    fn extents_outside_the_device_are_refused_not_wrapped() {
        let mut m = sample(Some(Uuid::new_v4()));
        // Its end wraps around to block 3.
        m.extents[2] = Extent {
            block: u64::MAX - 1,
            count: 5,
            loc: Loc::Zero,
            sum: 0,
        };
        m.sums.pop();
        assert!(m.check().is_err());
        let b = m.encode(None);
        assert!(matches!(
            Manifest::decode(&b, None, &m.volume, m.seq, m.id),
            Err(ManifestError::Malformed(_))
        ));
        let mut m = sample(None);
        m.extents.pop();
        assert!(m.check().is_err(), "a full backup must cover every block");
    }

    #[test]
    fn keys_parse() {
        let id = Uuid::new_v4();
        let k = manifest_key("v", 12, id);
        assert_eq!(parse_manifest_key(&k), Some(("v", 12, id)));
        assert_eq!(parse_manifest_key("v/backups/12-x"), None);
        assert_eq!(parse_manifest_key("v/objects/ab"), None);
    }

    #[test]
    fn overlays_take_each_block_from_the_newest() {
        let full = {
            let mut m = sample(None);
            m.extents = vec![
                Extent {
                    block: 0,
                    count: 3,
                    loc: Loc::Data {
                        object: 0,
                        offset: 0,
                    },
                    sum: 0,
                },
                Extent {
                    block: 3,
                    count: 7,
                    loc: Loc::Zero,
                    sum: 0,
                },
            ];
            m
        };
        full.check().unwrap();
        let inc = sample(Some(full.id));
        inc.check().unwrap();
        let o = Overlay::build(&[&inc, &full], 10);
        assert_eq!(o.missing, 0);
        let sums = o.block_sums(10);
        assert_eq!(sums[0], Some([1; 16])); // from the full
        assert_eq!(sums[1], Some([1; 16])); // from the increment
        assert_eq!(sums[2], Some([2; 16]));
        assert_eq!(sums[5], None); // zero
        assert_eq!(sums[9], Some([3; 16]));
        let covered: u64 = o.runs.iter().map(|r| r.count).sum();
        assert_eq!(covered, 10);
        // Without the full one, blocks are missing.
        assert_eq!(Overlay::build(&[&inc], 10).missing, 5);
        // Back into a manifest's parts: the same image.
        let (objects, extents, s) = o.clone().into_parts(4096);
        let mut merged = inc.clone();
        merged.parent = None;
        merged.objects = objects;
        merged.extents = extents;
        merged.sums = s;
        merged.check().unwrap();
        assert_eq!(Overlay::build(&[&merged], 10).block_sums(10), sums);
    }
}
