//! Decoding what the kernel writes into a perf ring buffer: records
//! (`PERF_RECORD_SAMPLE` with raw tracepoint data, `PERF_RECORD_LOST`) and the
//! block tracepoints' fields. Pure functions over bytes, so they are tested
//! without a kernel.

/// `PERF_RECORD_LOST`.
pub const RECORD_LOST: u32 = 2;
/// `PERF_RECORD_SAMPLE`.
pub const RECORD_SAMPLE: u32 = 9;

/// One record of the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// A sample's raw tracepoint data (with `PERF_SAMPLE_RAW` only).
    Sample(&'a [u8]),
    /// The kernel dropped `lost` records (the ring was full).
    Lost(u64),
    /// Any other record type, ignored.
    Other(u32),
}

/// Why bytes could not be decoded; the tracker treats any of these as a gap.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("a perf record header claims {0} bytes, fewer than its header")]
    ShortRecord(u16),
    #[error("a perf record runs past the data the kernel published")]
    Truncated,
    #[error("a sample's raw data is malformed")]
    BadSample,
}

/// Split `bytes` (records back to back, as copied out of the ring between
/// tail and head) into records.
pub fn records(bytes: &[u8]) -> impl Iterator<Item = Result<Record<'_>, RingError>> + '_ {
    let mut pos = 0usize;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || pos >= bytes.len() {
            return None;
        }
        let r = (|| {
            let h = bytes.get(pos..pos + 8).ok_or(RingError::Truncated)?;
            let kind = u32::from_le_bytes(h[0..4].try_into().unwrap());
            let size = u16::from_le_bytes(h[6..8].try_into().unwrap());
            if (size as usize) < 8 {
                return Err(RingError::ShortRecord(size));
            }
            let body = bytes
                .get(pos + 8..pos + size as usize)
                .ok_or(RingError::Truncated)?;
            pos += size as usize;
            Ok(match kind {
                RECORD_SAMPLE => {
                    let n = body
                        .get(0..4)
                        .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
                        .ok_or(RingError::BadSample)?;
                    Record::Sample(body.get(4..4 + n).ok_or(RingError::BadSample)?)
                }
                RECORD_LOST => {
                    let lost = body
                        .get(8..16)
                        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                        .ok_or(RingError::BadSample)?;
                    Record::Lost(lost)
                }
                other => Record::Other(other),
            })
        })();
        if r.is_err() {
            failed = true;
        }
        Some(r)
    })
}

/// Where a block tracepoint keeps the fields the tracker reads, from the
/// event's `format` file in tracefs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The tracepoint's id (`common_type` of its records).
    pub id: u16,
    pub dev: usize,
    pub sector: usize,
    pub nr_sector: usize,
    pub rwbs: usize,
    pub rwbs_len: usize,
}

/// Parse a tracefs `format` file. `None` if a needed field is missing or has
/// an unexpected size.
pub fn parse_format(text: &str) -> Option<Layout> {
    let mut id = None;
    let (mut dev, mut sector, mut nr, mut rwbs) = (None, None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("ID:") {
            id = v.trim().parse::<u16>().ok();
            continue;
        }
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = "";
        let (mut off, mut size) = (None, None);
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                off = v.parse::<usize>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse::<usize>().ok();
            } else if decl.is_empty() {
                decl = part;
            }
        }
        let (Some(off), Some(size)) = (off, size) else {
            continue;
        };
        let name = decl
            .rsplit(|c: char| c.is_whitespace())
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("");
        match name {
            "dev" if size == 4 => dev = Some(off),
            "sector" if size == 8 => sector = Some(off),
            "nr_sector" if size == 4 => nr = Some(off),
            "rwbs" if size >= 2 => rwbs = Some((off, size)),
            _ => {}
        }
    }
    let (rwbs, rwbs_len) = rwbs?;
    Some(Layout {
        id: id?,
        dev: dev?,
        sector: sector?,
        nr_sector: nr?,
        rwbs,
        rwbs_len,
    })
}

/// One block I/O the tracker saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockIo {
    /// Kernel device number (major << 20 | minor).
    pub dev: u32,
    pub sector: u64,
    pub nr_sector: u32,
    /// Whether it may change data: anything but a read or an empty flush.
    pub writes: bool,
}

/// Decode a raw sample of one of `layouts` (chosen by its `common_type`).
pub fn decode_sample(raw: &[u8], layouts: &[Layout]) -> Option<BlockIo> {
    let id = u16::from_le_bytes(raw.get(0..2)?.try_into().ok()?);
    let l = layouts.iter().find(|l| l.id == id)?;
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_le_bytes(raw.get(o..o + 4)?.try_into().ok()?)) };
    let dev = u32_at(l.dev)?;
    let sector = u64::from_le_bytes(raw.get(l.sector..l.sector + 8)?.try_into().ok()?);
    let nr_sector = u32_at(l.nr_sector)?;
    let rwbs = raw.get(l.rwbs..l.rwbs + l.rwbs_len)?;
    Some(BlockIo {
        dev,
        sector,
        nr_sector,
        writes: may_write(rwbs),
    })
}

/// Whether an I/O with this `rwbs` string may change data. The kernel's
/// `blk_fill_rwbs` writes an optional 'F' (preflush), then the operation:
/// 'R' read, 'W' write, 'D' discard, 'DE' secure erase, 'F' flush, 'N' for
/// anything else (write-zeroes among them on some kernels). Only reads are
/// certain not to write; everything else counts (over-reporting is allowed,
/// missing a write is not). An empty flush moves no sectors and so marks
/// nothing anyway.
pub fn may_write(rwbs: &[u8]) -> bool {
    let s: Vec<u8> = rwbs.iter().copied().take_while(|&c| c != 0).collect();
    let op = match s.as_slice() {
        [b'F', rest @ ..] if !rest.is_empty() => rest[0],
        [c, ..] => *c,
        [] => return true,
    };
    op != b'R'
}

/// Kernel device number (major << 20 | minor) of a userspace `st_rdev`.
pub fn kernel_dev(rdev: u64) -> u32 {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    ((major << 20) | (minor & 0xfffff)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUEUE_FORMAT: &str = "name: block_bio_queue
ID: 2097
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:char rwbs[10];\toffset:28;\tsize:10;\tsigned:0;
\tfield:char comm[16];\toffset:38;\tsize:16;\tsigned:0;

print fmt: \"%d,%d %s %llu + %u [%s]\", REC->dev
";

    fn raw_queue(dev: u32, sector: u64, nr: u32, rwbs: &str) -> Vec<u8> {
        let mut r = vec![0u8; 56];
        r[0..2].copy_from_slice(&2097u16.to_le_bytes());
        r[8..12].copy_from_slice(&dev.to_le_bytes());
        r[16..24].copy_from_slice(&sector.to_le_bytes());
        r[24..28].copy_from_slice(&nr.to_le_bytes());
        r[28..28 + rwbs.len()].copy_from_slice(rwbs.as_bytes());
        r
    }

    fn sample_record(raw: &[u8]) -> Vec<u8> {
        // u32 size + raw, padded so the record is a multiple of 8.
        let body = 4 + raw.len();
        let size = (8 + body).div_ceil(8) * 8;
        let mut v = Vec::new();
        v.extend_from_slice(&RECORD_SAMPLE.to_le_bytes());
        v.extend_from_slice(&0u16.to_le_bytes());
        v.extend_from_slice(&(size as u16).to_le_bytes());
        v.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        v.extend_from_slice(raw);
        v.resize(size, 0);
        v
    }

    fn lost_record(n: u64) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&RECORD_LOST.to_le_bytes());
        v.extend_from_slice(&0u16.to_le_bytes());
        v.extend_from_slice(&24u16.to_le_bytes());
        v.extend_from_slice(&7u64.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
        v
    }

    #[test]
    fn format_file_is_parsed() {
        let l = parse_format(QUEUE_FORMAT).unwrap();
        assert_eq!(
            l,
            Layout {
                id: 2097,
                dev: 8,
                sector: 16,
                nr_sector: 24,
                rwbs: 28,
                rwbs_len: 10
            }
        );
        assert!(parse_format("ID: 5\n").is_none());
    }

    #[test]
    fn samples_lost_records_and_others_are_split() {
        let l = parse_format(QUEUE_FORMAT).unwrap();
        let mut bytes = sample_record(&raw_queue(7 << 20 | 3, 2048, 8, "WS"));
        bytes.extend(lost_record(42));
        let mut other = vec![0u8; 16];
        other[0] = 3;
        other[6] = 16;
        bytes.extend(&other);
        bytes.extend(sample_record(&raw_queue(7 << 20 | 3, 0, 16, "RA")));
        let recs: Vec<_> = records(&bytes).collect::<Result<_, _>>().unwrap();
        assert_eq!(recs.len(), 4);
        let Record::Sample(raw) = recs[0] else {
            panic!("{:?}", recs[0])
        };
        assert_eq!(
            decode_sample(raw, &[l]),
            Some(BlockIo {
                dev: 7 << 20 | 3,
                sector: 2048,
                nr_sector: 8,
                writes: true
            })
        );
        assert_eq!(recs[1], Record::Lost(42));
        assert_eq!(recs[2], Record::Other(3));
        let Record::Sample(raw) = recs[3] else {
            panic!()
        };
        assert!(!decode_sample(raw, &[l]).unwrap().writes);
        // An unknown tracepoint id decodes to nothing.
        let mut unknown = raw_queue(1, 1, 1, "W");
        unknown[0] = 1;
        assert_eq!(decode_sample(&unknown, &[l]), None);
    }

    #[test]
    fn malformed_rings_are_errors_not_panics() {
        let good = sample_record(&raw_queue(1, 2, 3, "W"));
        for n in 1..good.len() {
            let r: Result<Vec<_>, _> = records(&good[..n]).collect();
            assert!(r.is_err(), "cut at {n} accepted");
        }
        let mut zero_size = good.clone();
        zero_size[6] = 0;
        zero_size[7] = 0;
        assert_eq!(
            records(&zero_size).next(),
            Some(Err(RingError::ShortRecord(0)))
        );
        let mut bad_raw = good.clone();
        bad_raw[8..12].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(records(&bad_raw).next(), Some(Err(RingError::BadSample)));
    }

    #[test]
    fn only_reads_are_not_writes() {
        for w in [
            "W", "WS", "WSM", "FWFSM", "FWS", "D", "DE", "N", "F", "", "Z",
        ] {
            assert!(may_write(w.as_bytes()), "{w}");
        }
        for r in ["R", "RA", "RS", "RSM", "RM"] {
            assert!(!may_write(r.as_bytes()), "{r}");
        }
        assert!(!may_write(b"R\0\0\0W"));
    }

    #[test]
    fn device_numbers_convert() {
        // loop9: 7:9; a large minor; a large major.
        assert_eq!(kernel_dev(libc::makedev(7, 9)), 7 << 20 | 9);
        assert_eq!(kernel_dev(libc::makedev(259, 300)), 259 << 20 | 300);
        assert_eq!(kernel_dev(libc::makedev(4000, 70000)), 4000 << 20 | 70000);
    }
}
