//! The on-disk encoding of a chain file. docs/FORMAT.md describes the same
//! thing in prose; keep them in step.
//!
//! Every decoder here takes untrusted bytes and returns `None` (or a
//! `FormatError`) on anything malformed; none of them panics or allocates
//! more than the input justifies.

use std::collections::BTreeMap;
use std::io;

use uuid::Uuid;

pub const FILE_MAGIC: [u8; 16] = *b"BLOCKSNAP-CHAIN\0";
pub const SEG_MAGIC: [u8; 8] = *b"BSNPSEG\0";
pub const FOOTER_MAGIC: [u8; 8] = *b"BSNPEND\0";
/// The format version this build writes and the newest it reads.
pub const VERSION: u32 = 1;
/// Bytes reserved for the file header at the start of the file.
pub const FILE_HEADER_LEN: u64 = 4096;
/// Bytes of the file header before its crc32.
const FILE_HEADER_BODY: usize = 72;
/// Segments start, and their data areas start, at multiples of this.
pub const ALIGN: u64 = 4096;
pub const FOOTER_LEN: u64 = 128;
const SEG_INFO_LEN: usize = 104;
/// Upper bound for a segment header area (names, descriptions and metadata).
pub const MAX_HEADER_LEN: u64 = 1 << 20;
/// Bytes per index extent record, without its per-block part.
pub const EXTENT_RECORD_LEN: u64 = 24;
/// Bytes per block of a data extent in the index (fingerprint and crc32).
pub const BLOCK_RECORD_LEN: u64 = 12;

pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 4 << 20;
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

/// Flag: the segment defines every block of its snapshot (needs no parent).
pub const FLAG_FULL: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a blocksnap chain file (wrong magic)")]
    WrongMagic,
    #[error("chain format version {found} is newer than this blocksnap understands (up to {VERSION}); upgrade blocksnap")]
    NewerVersion { found: u32 },
    #[error("file header checksum mismatch")]
    HeaderChecksum,
    #[error("invalid block size {0}: it must be a power of two from 4096 to 4194304")]
    BlockSize(u32),
}

/// Check a chain block size.
pub fn check_block_size(bs: u32) -> Result<(), FormatError> {
    if bs.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        Ok(())
    } else {
        Err(FormatError::BlockSize(bs))
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
    fn crc(&mut self) {
        let c = crc32fast::hash(&self.0);
        self.u32(c);
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

// ---------------------------------------------------------------- file header

/// The first 4096 bytes of a chain file; written once at creation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHeader {
    pub version: u32,
    pub chain_id: Uuid,
    pub block_size: u32,
    pub seed: u64,
    pub created_us: i64,
}

impl FileHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.bytes(&FILE_MAGIC);
        e.u32(self.version);
        e.u32(FILE_HEADER_BODY as u32);
        e.uuid(&self.chain_id);
        e.u32(self.block_size);
        e.u32(0);
        e.u64(self.seed);
        e.i64(self.created_us);
        e.u64(0);
        e.crc();
        let mut v = e.0;
        v.resize(FILE_HEADER_LEN as usize, 0);
        v
    }

    pub fn decode(b: &[u8]) -> Result<FileHeader, FormatError> {
        if b.len() < 16 || b[..16] != FILE_MAGIC {
            return Err(FormatError::WrongMagic);
        }
        let mut d = Dec::new(b);
        d.take(16);
        let version = d.u32().ok_or(FormatError::HeaderChecksum)?;
        if version > VERSION {
            return Err(FormatError::NewerVersion { found: version });
        }
        let len = d.u32().ok_or(FormatError::HeaderChecksum)? as usize;
        if len != FILE_HEADER_BODY || b.len() < len + 4 {
            return Err(FormatError::HeaderChecksum);
        }
        let stored = u32::from_le_bytes(b[len..len + 4].try_into().unwrap());
        if crc32fast::hash(&b[..len]) != stored {
            return Err(FormatError::HeaderChecksum);
        }
        let chain_id = d.uuid().ok_or(FormatError::HeaderChecksum)?;
        let block_size = d.u32().ok_or(FormatError::HeaderChecksum)?;
        d.u32();
        let seed = d.u64().ok_or(FormatError::HeaderChecksum)?;
        let created_us = d.i64().ok_or(FormatError::HeaderChecksum)?;
        Ok(FileHeader {
            version,
            chain_id,
            block_size,
            seed,
            created_us,
        })
    }
}

// ---------------------------------------------------------------- segments

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    /// A snapshot taken from a device.
    Snapshot = 1,
    /// A snapshot redefined by deleting its predecessor (blocks merged forward).
    Merge = 2,
    /// Records that the newest snapshot was deleted.
    Tombstone = 3,
}

impl SegmentKind {
    fn from_u32(v: u32) -> Option<SegmentKind> {
        match v {
            1 => Some(SegmentKind::Snapshot),
            2 => Some(SegmentKind::Merge),
            3 => Some(SegmentKind::Tombstone),
            _ => None,
        }
    }
}

/// The structural facts of a segment, stored twice: in its header and in its
/// footer, so that either one intact is enough to find the segment's parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegInfo {
    pub kind: SegmentKind,
    pub flags: u32,
    pub chain_id: Uuid,
    /// The snapshot this segment defines (nil for a tombstone).
    pub snapshot_id: Uuid,
    /// Position of the snapshot in the chain's order (creation order).
    pub seq: u64,
    /// Absolute file offset of the segment.
    pub start: u64,
    /// Length of the whole segment, footer included; a multiple of ALIGN.
    pub len: u64,
    /// Length of the header area (a multiple of ALIGN); data follows it.
    pub header_len: u64,
    pub data_len: u64,
    pub index_len: u64,
    pub index_crc: u32,
    pub block_size: u32,
    pub device_size: u64,
}

impl SegInfo {
    fn encode(&self, e: &mut Enc) {
        let before = e.0.len();
        e.u32(self.kind as u32);
        e.u32(self.flags);
        e.uuid(&self.chain_id);
        e.uuid(&self.snapshot_id);
        e.u64(self.seq);
        e.u64(self.start);
        e.u64(self.len);
        e.u64(self.header_len);
        e.u64(self.data_len);
        e.u64(self.index_len);
        e.u32(self.index_crc);
        e.u32(self.block_size);
        e.u64(self.device_size);
        debug_assert_eq!(e.0.len() - before, SEG_INFO_LEN);
    }

    fn decode(d: &mut Dec<'_>) -> Option<SegInfo> {
        let info = SegInfo {
            kind: SegmentKind::from_u32(d.u32()?)?,
            flags: d.u32()?,
            chain_id: d.uuid()?,
            snapshot_id: d.uuid()?,
            seq: d.u64()?,
            start: d.u64()?,
            len: d.u64()?,
            header_len: d.u64()?,
            data_len: d.u64()?,
            index_len: d.u64()?,
            index_crc: d.u32()?,
            block_size: d.u32()?,
            device_size: d.u64()?,
        };
        info.is_consistent().then_some(info)
    }

    /// The parts add up and sit where they should.
    fn is_consistent(&self) -> bool {
        let parts = self
            .header_len
            .checked_add(self.data_len)
            .and_then(|v| v.checked_add(self.index_len))
            .and_then(|v| v.checked_add(FOOTER_LEN));
        matches!(parts, Some(p) if p <= self.len)
            && self.start % ALIGN == 0
            && self.len % ALIGN == 0
            && self.header_len % ALIGN == 0
            && self.header_len >= ALIGN
            && self.header_len <= MAX_HEADER_LEN
            && self.start.checked_add(self.len).is_some()
            && check_block_size(self.block_size).is_ok()
    }

    pub fn end(&self) -> u64 {
        self.start + self.len
    }
    pub fn data_start(&self) -> u64 {
        self.start + self.header_len
    }
    pub fn index_start(&self) -> u64 {
        self.data_start() + self.data_len
    }
    pub fn is_full(&self) -> bool {
        self.flags & FLAG_FULL != 0
    }
}

/// Identity of the source a snapshot was taken from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceId {
    /// 0 unknown, 1 block device (a = rdev), 2 regular file (a = dev, b = inode).
    pub kind: u8,
    pub a: u64,
    pub b: u64,
}

/// Facts of a snapshot known only when its scan ends; in the commit record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SegStats {
    pub created_us: i64,
    /// The snapshot this one's changes apply to (nil for a full one).
    pub parent_id: Uuid,
    pub seed: u64,
    /// Bytes of blocks that differed from the parent (data and zero).
    pub changed_bytes: u64,
    /// Of those, bytes of all-zero blocks (stored without data).
    pub zero_bytes: u64,
    pub freeze_us: u64,
    pub scan_us: u64,
    /// How the snapshot was taken; `None` in segments written before the
    /// take record existed, and in tombstones.
    pub take: Option<TakeRecord>,
}

/// How a snapshot was taken (docs/FORMAT.md, "Take record").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TakeRecord {
    pub method: TakeMethod,
    /// Why the whole device was read; [`FullReason::None`] for a tracked take.
    pub reason: FullReason,
    /// Passes over the device while it was live: the first pass and every
    /// round re-reading what was written meanwhile (0: the device was
    /// quiesced before the first pass).
    pub rounds: u32,
    /// Blocks read while the volume was live (first pass and rounds).
    pub live_blocks: u64,
    /// Blocks read while the volume was frozen, unmounted or held.
    pub quiesced_blocks: u64,
    /// Blocks tracking reported written since the previous snapshot.
    pub tracked_blocks: u64,
    /// Verification: blocks that differed from the previous snapshot
    /// although tracking did not report them.
    pub unmarked_blocks: u64,
    /// The tracker instance (random per start; 0 without tracking).
    pub generation: u64,
    /// Microseconds of the live phase (before quiescing).
    pub live_us: u64,
}

/// How the blocks of a snapshot were found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TakeMethod {
    /// Every block of the device was read and compared.
    #[default]
    FullScan = 1,
    /// Only the blocks tracking reported written were read.
    Tracked = 2,
    /// Every block was read and compared, and the result checked against
    /// what tracking reported (verification).
    Verified = 3,
}

impl TakeMethod {
    fn from_u8(v: u8) -> Option<TakeMethod> {
        Some(match v {
            1 => TakeMethod::FullScan,
            2 => TakeMethod::Tracked,
            3 => TakeMethod::Verified,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            TakeMethod::FullScan => "full-scan",
            TakeMethod::Tracked => "tracked",
            TakeMethod::Verified => "verified",
        }
    }
}

/// Why a snapshot read the whole device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FullReason {
    #[default]
    None = 0,
    /// Asked for (`--full`).
    Requested = 1,
    /// The chain had no snapshot to compare with.
    First = 2,
    /// Write tracking is unavailable (no tracepoints, no permission).
    Unavailable = 3,
    /// The volume is a regular file, whose writes cannot be traced.
    ImageFile = 4,
    /// `blocksnap chain take` tracks only during its own run.
    SingleRun = 5,
    /// No snapshot was taken since tracking of the volume began (daemon start).
    NotYetTracked = 6,
    /// Tracking had a gap: lost records, a resized or replaced device, a
    /// changed CPU set.
    Gap = 7,
    /// The chain's newest snapshot is not the one tracking counts from
    /// (deleted, or taken by another program).
    OtherBaseline = 8,
    /// Every Nth snapshot checks tracking against a full diff.
    Verification = 9,
    /// Tracking had a gap during this take: the device was read whole
    /// while quiesced.
    GapDuringTake = 10,
}

impl FullReason {
    fn from_u8(v: u8) -> Option<FullReason> {
        use FullReason::*;
        Some(match v {
            0 => None,
            1 => Requested,
            2 => First,
            3 => Unavailable,
            4 => ImageFile,
            5 => SingleRun,
            6 => NotYetTracked,
            7 => Gap,
            8 => OtherBaseline,
            9 => Verification,
            10 => GapDuringTake,
            _ => return Option::None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        use FullReason::*;
        match self {
            None => "",
            Requested => "requested",
            First => "first snapshot",
            Unavailable => "write tracking unavailable",
            ImageFile => "image file (writes to files cannot be traced)",
            SingleRun => "chain take tracks only during its own run",
            NotYetTracked => "no snapshot since tracking began",
            Gap => "tracking had a gap",
            OtherBaseline => "the newest snapshot is not the one tracking counts from",
            Verification => "verification of tracking",
            GapDuringTake => "tracking had a gap during the take",
        }
    }
}

/// Offset of the take record in the commit record, and its length.
const TAKE_AT: usize = 192;
const TAKE_LEN: usize = 64;
const TAKE_VERSION: u16 = 1;

fn encode_take(e: &mut Enc, t: &TakeRecord) {
    let start = e.0.len();
    e.0.extend_from_slice(&TAKE_VERSION.to_le_bytes());
    e.0.extend_from_slice(&(TAKE_LEN as u16).to_le_bytes());
    e.u8(t.method as u8);
    e.u8(t.reason as u8);
    e.bytes(&[0, 0]);
    e.u32(t.rounds);
    e.u64(t.live_blocks);
    e.u64(t.quiesced_blocks);
    e.u64(t.tracked_blocks);
    e.u64(t.unmarked_blocks);
    e.u64(t.generation);
    e.u64(t.live_us);
    let crc = crc32fast::hash(&e.0[start..]);
    e.u32(crc);
    debug_assert_eq!(e.0.len() - start, TAKE_LEN);
}

/// The take record of a commit record; `None` when absent (zeros: older
/// writers), of a newer version, or not intact.
fn decode_take(b: &[u8]) -> Option<TakeRecord> {
    let r = b.get(TAKE_AT..TAKE_AT + TAKE_LEN)?;
    let version = u16::from_le_bytes(r[0..2].try_into().ok()?);
    let len = u16::from_le_bytes(r[2..4].try_into().ok()?) as usize;
    if version != TAKE_VERSION || len != TAKE_LEN {
        return None;
    }
    let stored = u32::from_le_bytes(r[TAKE_LEN - 4..].try_into().ok()?);
    if crc32fast::hash(&r[..TAKE_LEN - 4]) != stored {
        return None;
    }
    let mut d = Dec::new(&r[4..]);
    let method = TakeMethod::from_u8(d.u8()?)?;
    let reason = FullReason::from_u8(d.u8()?)?;
    d.take(2)?;
    Some(TakeRecord {
        method,
        reason,
        rounds: d.u32()?,
        live_blocks: d.u64()?,
        quiesced_blocks: d.u64()?,
        tracked_blocks: d.u64()?,
        unmarked_blocks: d.u64()?,
        generation: d.u64()?,
        live_us: d.u64()?,
    })
}

/// Descriptive facts of a snapshot, in the meta area after the commit record.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SegMeta {
    pub source: SourceId,
    pub source_path: String,
    pub name: String,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
}

/// Size of the commit record, the first sector of every segment. It is
/// written last, in one write of one sector, after everything else of the
/// segment is durable: all zeros means "never committed", anything else that
/// does not check out means damage.
pub const COMMIT_LEN: usize = 512;

/// What the first sector of a segment says.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // decoded once per segment on open; boxing buys nothing
pub enum Commit {
    /// A valid commit record.
    Valid {
        info: SegInfo,
        stats: SegStats,
        meta_len: u32,
        meta_crc: u32,
    },
    /// All zeros: the segment was never committed.
    Zero,
    /// A segment of a newer format version.
    Newer(u32),
    /// Non-zero and not valid: damaged.
    Damaged,
}

/// Header area length for a meta area of `meta_len` bytes.
pub fn header_len_for(meta_len: usize) -> u64 {
    crate::util::round_up(COMMIT_LEN as u64 + meta_len as u64, ALIGN)
}

/// Encode the commit record (exactly COMMIT_LEN bytes).
pub fn encode_commit(info: &SegInfo, stats: &SegStats, meta: &[u8]) -> Vec<u8> {
    let mut e = Enc::default();
    e.bytes(&SEG_MAGIC);
    e.u32(VERSION);
    e.u32(0);
    info.encode(&mut e);
    e.i64(stats.created_us);
    e.uuid(&stats.parent_id);
    e.u64(stats.seed);
    e.u64(stats.changed_bytes);
    e.u64(stats.zero_bytes);
    e.u64(stats.freeze_us);
    e.u64(stats.scan_us);
    e.u32(meta.len() as u32);
    e.u32(crc32fast::hash(meta));
    debug_assert_eq!(e.0.len(), TAKE_AT);
    if let Some(t) = &stats.take {
        encode_take(&mut e, t);
    }
    e.0.resize(COMMIT_LEN - 4, 0);
    e.crc();
    e.0
}

/// Decode the first sector of a segment.
pub fn decode_commit(b: &[u8]) -> Commit {
    if b.len() < COMMIT_LEN {
        return if b.iter().all(|&x| x == 0) {
            Commit::Zero
        } else {
            Commit::Damaged
        };
    }
    let b = &b[..COMMIT_LEN];
    if b.iter().all(|&x| x == 0) {
        return Commit::Zero;
    }
    // Every version keeps the magic, the version and this crc32 where they
    // are, so a newer segment is told apart from a damaged one.
    let stored = u32::from_le_bytes(b[COMMIT_LEN - 4..].try_into().unwrap());
    if b[..8] != SEG_MAGIC || crc32fast::hash(&b[..COMMIT_LEN - 4]) != stored {
        return Commit::Damaged;
    }
    let v = u32::from_le_bytes(b[8..12].try_into().unwrap());
    if v > VERSION {
        return Commit::Newer(v);
    }
    let parse = || -> Option<Commit> {
        let mut d = Dec::new(b);
        d.take(16)?;
        let info = SegInfo::decode(&mut d)?;
        let stats = SegStats {
            created_us: d.i64()?,
            parent_id: d.uuid()?,
            seed: d.u64()?,
            changed_bytes: d.u64()?,
            zero_bytes: d.u64()?,
            freeze_us: d.u64()?,
            scan_us: d.u64()?,
            take: decode_take(b),
        };
        let meta_len = d.u32()?;
        let meta_crc = d.u32()?;
        if COMMIT_LEN as u64 + meta_len as u64 > info.header_len {
            return None;
        }
        Some(Commit::Valid {
            info,
            stats,
            meta_len,
            meta_crc,
        })
    };
    parse().unwrap_or(Commit::Damaged)
}

/// Encode the meta area.
pub fn encode_meta(m: &SegMeta) -> Vec<u8> {
    let mut e = Enc::default();
    e.u8(m.source.kind);
    e.u64(m.source.a);
    e.u64(m.source.b);
    e.str(&m.source_path);
    e.str(&m.name);
    e.str(&m.description);
    e.u32(m.metadata.len() as u32);
    for (k, v) in &m.metadata {
        e.str(k);
        e.str(v);
    }
    e.0
}

/// Decode the meta area; `None` if malformed.
pub fn decode_meta(b: &[u8]) -> Option<SegMeta> {
    let mut d = Dec::new(b);
    let source = SourceId {
        kind: d.u8()?,
        a: d.u64()?,
        b: d.u64()?,
    };
    let source_path = d.str()?;
    let name = d.str()?;
    let description = d.str()?;
    let n = d.u32()? as usize;
    if n > b.len() / 8 {
        return None;
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n {
        let k = d.str()?;
        let v = d.str()?;
        metadata.insert(k, v);
    }
    (d.pos == b.len()).then_some(SegMeta {
        source,
        source_path,
        name,
        description,
        metadata,
    })
}

/// Encode a segment footer (exactly FOOTER_LEN bytes).
pub fn encode_footer(info: &SegInfo) -> Vec<u8> {
    let mut e = Enc::default();
    e.bytes(&FOOTER_MAGIC);
    e.u32(VERSION);
    info.encode(&mut e);
    e.0.resize(FOOTER_LEN as usize - 4, 0);
    e.crc();
    e.0
}

/// Decode a footer; `None` if it is not a valid, intact footer.
pub fn decode_footer(b: &[u8]) -> Option<SegInfo> {
    if b.len() != FOOTER_LEN as usize || b[..8] != FOOTER_MAGIC {
        return None;
    }
    let body = &b[..FOOTER_LEN as usize - 4];
    let stored = u32::from_le_bytes(b[FOOTER_LEN as usize - 4..].try_into().ok()?);
    if crc32fast::hash(body) != stored {
        return None;
    }
    let mut d = Dec::new(body);
    d.take(8)?;
    let version = d.u32()?;
    if version == 0 || version > VERSION {
        return None;
    }
    SegInfo::decode(&mut d)
}

// ---------------------------------------------------------------- index

/// Where an extent's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// All zeros; nothing stored.
    Zero,
    /// Stored at this absolute file offset, blocks back to back.
    Data(u64),
}

/// A run of consecutive device blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub block: u64,
    pub count: u32,
    pub location: Location,
    /// For data extents: position of this extent's first block in the
    /// index's `prints` and `crcs`.
    pub meta: u32,
}

impl Extent {
    pub fn end_block(&self) -> u64 {
        self.block + self.count as u64
    }
}

/// A segment's index: the snapshots it deletes, and its extents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Index {
    pub removes: Vec<Uuid>,
    pub extents: Vec<Extent>,
    /// Fingerprint of each block of each data extent.
    pub prints: Vec<u64>,
    /// crc32 of each block of each data extent, as stored.
    pub crcs: Vec<u32>,
}

const KIND_ZERO: u8 = 0;
const KIND_DATA: u8 = 1;

/// Encode an index's head: the snapshots it removes and how many extent
/// records follow.
pub fn encode_index_head(removes: &[Uuid], extents: u64) -> Vec<u8> {
    let mut e = Enc::default();
    e.u32(removes.len() as u32);
    for r in removes {
        e.uuid(r);
    }
    e.u64(extents);
    e.0
}

/// Append one extent record as an index holds it: its
/// [`EXTENT_RECORD_LEN`] bytes, then for data a fingerprint and crc per
/// block ([`BLOCK_RECORD_LEN`] bytes each).
pub fn encode_extent(
    out: &mut Vec<u8>,
    block: u64,
    count: u32,
    location: Location,
    prints: &[u64],
    crcs: &[u32],
) {
    let mut e = Enc(std::mem::take(out));
    e.u64(block);
    e.u32(count);
    match location {
        Location::Zero => {
            debug_assert!(prints.is_empty());
            e.u8(KIND_ZERO);
            e.bytes(&[0; 3]);
            e.u64(0);
        }
        Location::Data(off) => {
            debug_assert_eq!(prints.len(), count as usize);
            debug_assert_eq!(crcs.len(), count as usize);
            e.u8(KIND_DATA);
            e.bytes(&[0; 3]);
            e.u64(off);
            for (p, c) in prints.iter().zip(crcs) {
                e.u64(*p);
                e.u32(*c);
            }
        }
    }
    *out = e.0;
}

/// Decode an extent record's first [`EXTENT_RECORD_LEN`] bytes: block,
/// count and location (for data, `count` block records follow).
pub fn decode_extent_head(b: &[u8]) -> Option<(u64, u32, Location)> {
    let mut d = Dec::new(b);
    let block = d.u64()?;
    let count = d.u32()?;
    let kind = d.u8()?;
    d.take(3)?;
    let off = d.u64()?;
    match kind {
        KIND_ZERO => Some((block, count, Location::Zero)),
        KIND_DATA => Some((block, count, Location::Data(off))),
        _ => None,
    }
}

impl Index {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = encode_index_head(&self.removes, self.extents.len() as u64);
        for x in &self.extents {
            let (prints, crcs): (&[u64], &[u32]) = match x.location {
                Location::Zero => (&[], &[]),
                Location::Data(_) => {
                    let m = x.meta as usize;
                    let n = x.count as usize;
                    (&self.prints[m..m + n], &self.crcs[m..m + n])
                }
            };
            encode_extent(&mut out, x.block, x.count, x.location, prints, crcs);
        }
        out
    }

    /// Bytes the encoded index will take.
    pub fn encoded_len(&self) -> u64 {
        4 + 16 * self.removes.len() as u64
            + 8
            + self.extents.len() as u64 * EXTENT_RECORD_LEN
            + self.prints.len() as u64 * BLOCK_RECORD_LEN
    }

    /// Decode an index; `None` if malformed. Extents must be sorted, not
    /// overlap, and carry one fingerprint and crc per data block.
    pub fn decode(b: &[u8]) -> Option<Index> {
        let mut d = Dec::new(b);
        let nr = d.u32()? as usize;
        if nr > b.len() / 16 {
            return None;
        }
        let mut removes = Vec::with_capacity(nr);
        for _ in 0..nr {
            removes.push(d.uuid()?);
        }
        let ne = d.u64()?;
        if ne > (b.len() as u64) / EXTENT_RECORD_LEN {
            return None;
        }
        let mut extents = Vec::with_capacity(ne as usize);
        let mut prints = Vec::new();
        let mut crcs = Vec::new();
        let mut next_free = 0u64;
        for _ in 0..ne {
            let block = d.u64()?;
            let count = d.u32()?;
            let kind = d.u8()?;
            d.take(3)?;
            let off = d.u64()?;
            if count == 0 || block < next_free {
                return None;
            }
            next_free = block.checked_add(count as u64)?;
            let location = match kind {
                KIND_ZERO => Location::Zero,
                KIND_DATA => {
                    let need = (count as u64).checked_mul(BLOCK_RECORD_LEN)?;
                    if need > (b.len() - d.pos) as u64 {
                        return None;
                    }
                    for _ in 0..count {
                        prints.push(d.u64()?);
                        crcs.push(d.u32()?);
                    }
                    Location::Data(off)
                }
                _ => return None,
            };
            let meta = match location {
                Location::Zero => 0,
                Location::Data(_) => u32::try_from(prints.len() - count as usize).ok()?,
            };
            extents.push(Extent {
                block,
                count,
                location,
                meta,
            });
        }
        if d.pos != b.len() {
            return None;
        }
        Some(Index {
            removes,
            extents,
            prints,
            crcs,
        })
    }
}

/// A segment's index without its block records: the snapshots it removes
/// and its extents, with where each data extent's fingerprints and crc32s
/// are in the file. What restores, deletes and reclaims need held in
/// memory; the block records (12 bytes a stored block) are read as needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexExtents {
    pub removes: Vec<Uuid>,
    /// As [`Index::extents`]: `meta` counts the data blocks before each.
    pub extents: Vec<Extent>,
    /// Bytes of the index before its first extent record.
    pub head_len: u64,
}

impl IndexExtents {
    /// Where, counted from the index's start, the block record of block
    /// `delta` of `extents[k]` is.
    pub fn record_at(&self, k: usize, delta: u64) -> u64 {
        self.head_len
            + (k as u64 + 1) * EXTENT_RECORD_LEN
            + (self.extents[k].meta as u64 + delta) * BLOCK_RECORD_LEN
    }
}

/// Decode an index of `len` bytes read from `r` as [`Index::decode`] does,
/// with the same checks, but keeping only its extents: the block records
/// are read through and not kept, so memory goes with the number of
/// extents, not of stored blocks. Returns the extents (`None` if the index
/// is malformed) and the crc32 of all `len` bytes.
pub fn scan_index(r: &mut impl io::Read, len: u64) -> io::Result<(Option<IndexExtents>, u32)> {
    struct Src<'a, R> {
        r: &'a mut R,
        left: u64,
        crc: crc32fast::Hasher,
        /// Block records are read through this and dropped (one buffer for
        /// the whole scan: an index may hold millions of small extents).
        scratch: Vec<u8>,
    }
    impl<R: io::Read> Src<'_, R> {
        /// Exactly `buf.len()` more bytes, or `false` if the index ends first.
        fn fill(&mut self, buf: &mut [u8]) -> io::Result<bool> {
            if (buf.len() as u64) > self.left {
                return Ok(false);
            }
            self.r.read_exact(buf)?;
            self.crc.update(buf);
            self.left -= buf.len() as u64;
            Ok(true)
        }
        fn skip(&mut self, mut n: u64) -> io::Result<bool> {
            if n > self.left {
                return Ok(false);
            }
            let mut scratch = std::mem::take(&mut self.scratch);
            if scratch.is_empty() {
                // Left empty by an earlier failed skip.
                scratch = vec![0; 8192];
            }
            while n > 0 {
                let k = n.min(scratch.len() as u64) as usize;
                self.fill(&mut scratch[..k])?;
                n -= k as u64;
            }
            self.scratch = scratch;
            Ok(true)
        }
    }
    let mut src = Src {
        r,
        left: len,
        crc: crc32fast::Hasher::new(),
        scratch: vec![0; 8192],
    };
    let scan = |src: &mut Src<'_, _>| -> io::Result<Option<IndexExtents>> {
        let mut b4 = [0u8; 4];
        if !src.fill(&mut b4)? {
            return Ok(None);
        }
        let nr = u32::from_le_bytes(b4) as u64;
        if nr > len / 16 {
            return Ok(None);
        }
        let mut removes = Vec::with_capacity(nr as usize);
        for _ in 0..nr {
            let mut u = [0u8; 16];
            if !src.fill(&mut u)? {
                return Ok(None);
            }
            removes.push(Uuid::from_bytes(u));
        }
        let mut b8 = [0u8; 8];
        if !src.fill(&mut b8)? {
            return Ok(None);
        }
        let ne = u64::from_le_bytes(b8);
        if ne > len / EXTENT_RECORD_LEN {
            return Ok(None);
        }
        let head_len = 4 + 16 * nr + 8;
        let mut extents = Vec::with_capacity(ne as usize);
        let mut blocks = 0u64;
        let mut next_free = 0u64;
        for _ in 0..ne {
            let mut head = [0u8; EXTENT_RECORD_LEN as usize];
            if !src.fill(&mut head)? {
                return Ok(None);
            }
            let Some((block, count, location)) = decode_extent_head(&head) else {
                return Ok(None);
            };
            if count == 0 || block < next_free {
                return Ok(None);
            }
            let Some(end) = block.checked_add(count as u64) else {
                return Ok(None);
            };
            next_free = end;
            let meta = match location {
                Location::Zero => 0,
                Location::Data(_) => {
                    let Ok(meta) = u32::try_from(blocks) else {
                        return Ok(None);
                    };
                    if !src.skip(count as u64 * BLOCK_RECORD_LEN)? {
                        return Ok(None);
                    }
                    blocks += count as u64;
                    meta
                }
            };
            extents.push(Extent {
                block,
                count,
                location,
                meta,
            });
        }
        if src.left != 0 {
            return Ok(None);
        }
        Ok(Some(IndexExtents {
            removes,
            extents,
            head_len,
        }))
    };
    let found = scan(&mut src)?;
    // Whatever is left still counts towards the crc the caller checks.
    let rest = src.left;
    src.skip(rest)?;
    Ok((found, src.crc.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SegInfo {
        SegInfo {
            kind: SegmentKind::Snapshot,
            flags: FLAG_FULL,
            chain_id: Uuid::new_v4(),
            snapshot_id: Uuid::new_v4(),
            seq: 3,
            start: 8192,
            len: 16384,
            header_len: 4096,
            data_len: 8192,
            index_len: 100,
            index_crc: 77,
            block_size: 4096,
            device_size: 1 << 20,
        }
    }

    #[test]
    fn file_header_round_trip_and_errors() {
        let h = FileHeader {
            version: VERSION,
            chain_id: Uuid::new_v4(),
            block_size: 4096,
            seed: 99,
            created_us: 123,
        };
        let b = h.encode();
        assert_eq!(b.len(), FILE_HEADER_LEN as usize);
        assert_eq!(FileHeader::decode(&b).unwrap(), h);
        let mut bad = b.clone();
        bad[0] = b'X';
        assert_eq!(FileHeader::decode(&bad), Err(FormatError::WrongMagic));
        let mut bad = b.clone();
        bad[30] ^= 1;
        assert_eq!(FileHeader::decode(&bad), Err(FormatError::HeaderChecksum));
        let mut newer = b.clone();
        newer[16..20].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            FileHeader::decode(&newer),
            Err(FormatError::NewerVersion { found: 2 })
        );
    }

    #[test]
    fn commit_meta_and_footer_round_trip() {
        let mut meta = SegMeta {
            name: "snap-001".into(),
            description: "Daily Backup".into(),
            ..Default::default()
        };
        meta.metadata.insert("k".into(), "v".into());
        let mb = encode_meta(&meta);
        assert_eq!(decode_meta(&mb).unwrap(), meta);
        let stats = SegStats {
            created_us: 5,
            changed_bytes: 4096,
            take: Some(TakeRecord {
                method: TakeMethod::Tracked,
                reason: FullReason::None,
                rounds: 3,
                live_blocks: 1000,
                quiesced_blocks: 7,
                tracked_blocks: 900,
                unmarked_blocks: 0,
                generation: 0xfeed,
                live_us: 12345,
            }),
            ..Default::default()
        };
        let seg = info();
        // Without a take record (as every older segment) the area is zero.
        let plain = SegStats {
            take: None,
            ..stats
        };
        let pc = encode_commit(&seg, &plain, &[]);
        assert!(pc[TAKE_AT..COMMIT_LEN - 4].iter().all(|&b| b == 0));
        assert!(matches!(decode_commit(&pc), Commit::Valid { stats, .. } if stats.take.is_none()));
        for r in 0..=10u8 {
            assert_eq!(FullReason::from_u8(r).map(|x| x as u8), Some(r));
        }
        let c = encode_commit(&seg, &stats, &mb);
        assert_eq!(c.len(), COMMIT_LEN);
        assert_eq!(
            decode_commit(&c),
            Commit::Valid {
                info: seg,
                stats,
                meta_len: mb.len() as u32,
                meta_crc: crc32fast::hash(&mb)
            }
        );
        for i in 0..COMMIT_LEN {
            let mut bad = c.clone();
            bad[i] ^= 0x10;
            assert_eq!(
                decode_commit(&bad),
                Commit::Damaged,
                "flip at {i} undetected"
            );
        }
        assert_eq!(decode_commit(&[0u8; COMMIT_LEN]), Commit::Zero);
        assert_eq!(decode_commit(&[0u8; 100]), Commit::Zero);
        let mut newer = c.clone();
        newer[8..12].copy_from_slice(&9u32.to_le_bytes());
        let crc = crc32fast::hash(&newer[..COMMIT_LEN - 4]);
        newer[COMMIT_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_commit(&newer), Commit::Newer(9));
        let f = encode_footer(&seg);
        assert_eq!(f.len(), FOOTER_LEN as usize);
        assert_eq!(decode_footer(&f).unwrap(), seg);
        for i in 0..f.len() {
            let mut bad = f.clone();
            bad[i] ^= 1;
            assert!(decode_footer(&bad).is_none(), "flip at {i} undetected");
        }
        for n in 0..mb.len() {
            assert!(decode_meta(&mb[..n]).is_none());
        }
    }

    #[test]
    fn index_round_trip_and_rejects_garbage() {
        let idx = Index {
            removes: vec![Uuid::new_v4()],
            extents: vec![
                Extent {
                    block: 0,
                    count: 2,
                    location: Location::Data(4096),
                    meta: 0,
                },
                Extent {
                    block: 5,
                    count: 10,
                    location: Location::Zero,
                    meta: 0,
                },
                Extent {
                    block: 20,
                    count: 1,
                    location: Location::Data(12288),
                    meta: 2,
                },
            ],
            prints: vec![1, 2, 3],
            crcs: vec![4, 5, 6],
        };
        let b = idx.encode();
        assert_eq!(b.len() as u64, idx.encoded_len());
        assert_eq!(Index::decode(&b).unwrap(), idx);
        scans_as_decoded(&b);
        let light = scan(&b).unwrap();
        // The block records are where the light index says.
        assert_eq!(light.record_at(0, 1), 4 + 16 + 8 + 24 + 12);
        assert_eq!(
            &b[light.record_at(2, 0) as usize..][..8],
            &3u64.to_le_bytes()
        );
        // Truncations never decode.
        for n in 0..b.len() {
            assert!(Index::decode(&b[..n]).is_none());
            scans_as_decoded(&b[..n]);
        }
        // Overlapping extents are refused.
        let mut overlap = idx.clone();
        overlap.extents[1].block = 1;
        assert!(Index::decode(&overlap.encode()).is_none());
        scans_as_decoded(&overlap.encode());
        // A huge extent count with no bytes behind it does not allocate.
        let mut huge = Vec::new();
        huge.extend_from_slice(&0u32.to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Index::decode(&huge).is_none());
        scans_as_decoded(&huge);
        // Every single-byte change scans as it decodes.
        for i in 0..b.len() {
            for v in [0u8, 1, 0x80, 0xff] {
                let mut m = b.clone();
                m[i] = v;
                scans_as_decoded(&m);
            }
        }
    }

    fn scan(b: &[u8]) -> Option<IndexExtents> {
        let (found, crc) = scan_index(&mut &b[..], b.len() as u64).unwrap();
        assert_eq!(crc, crc32fast::hash(b));
        found
    }

    /// [`scan_index`] accepts exactly what [`Index::decode`] accepts, with
    /// the same removes and extents, and hashes every byte.
    fn scans_as_decoded(b: &[u8]) {
        match (Index::decode(b), scan(b)) {
            (None, None) => {}
            (Some(full), Some(light)) => {
                assert_eq!(full.removes, light.removes);
                assert_eq!(full.extents, light.extents);
                // The records it points at hold the decoded prints and crcs.
                for (k, x) in light.extents.iter().enumerate() {
                    if let Location::Data(_) = x.location {
                        for d in 0..x.count as u64 {
                            let at = light.record_at(k, d) as usize;
                            let m = x.meta as usize + d as usize;
                            assert_eq!(b[at..at + 8], full.prints[m].to_le_bytes());
                            assert_eq!(b[at + 8..at + 12], full.crcs[m].to_le_bytes());
                        }
                    }
                }
            }
            (full, light) => panic!("decode {full:?} but scan {light:?}"),
        }
    }

    /// Commit records written before the take record existed (the fuzz
    /// seed) still decode, as having no take record.
    #[test]
    fn old_commit_records_read_without_a_take_record() {
        let seed = include_bytes!("../../fuzz/seeds/chain_records/commit");
        match decode_commit(seed) {
            Commit::Valid { stats, .. } => assert_eq!(stats.take, None),
            other => panic!("the seed no longer decodes: {other:?}"),
        }
    }

    #[test]
    fn block_size_rules() {
        assert!(check_block_size(4096).is_ok());
        assert!(check_block_size(4 << 20).is_ok());
        assert!(check_block_size(2048).is_err());
        assert!(check_block_size(12288).is_err());
        assert!(check_block_size(8 << 20).is_err());
    }
}
