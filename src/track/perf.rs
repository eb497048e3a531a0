//! The kernel side of tracking: the block tracepoints opened with
//! `perf_event_open` on every CPU, one ring buffer per CPU shared by the
//! CPU's events, and draining those rings.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::ring::{self, BlockIo, Layout, Record};

/// The tracepoints read: submissions (`block_bio_queue`: every bio, a
/// partition's already remapped to its disk) and completions
/// (`block_rq_complete` for request-based devices, `block_bio_complete` for
/// bio-based ones). Completions catch writes that were already in flight when
/// tracking began: they were submitted unseen but complete seen.
pub const TRACEPOINTS: [&str; 3] = ["block_bio_queue", "block_rq_complete", "block_bio_complete"];

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_SAMPLE_RAW: u64 = 1 << 10;
const PERF_FORMAT_LOST: u64 = 1 << 4;
const ATTR_DISABLED: u64 = 1 << 0;
const ATTR_WATERMARK: u64 = 1 << 14;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
const IOC_ENABLE: libc::c_ulong = 0x2400;
const IOC_SET_OUTPUT: libc::c_ulong = 0x2405;
const IOC_SET_FILTER: libc::c_ulong = 0x4008_2406;

/// `struct perf_event_attr` up to `sig_data` (PERF_ATTR_SIZE_VER7).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Attr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_watermark: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
    aux_sample_size: u32,
    reserved_3: u32,
    sig_data: u64,
}

/// Errors opening the tracer. Any of them means "no tracking": the daemon
/// says so once and works as without it.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    #[error("the block tracepoints are not available (no tracefs with events/block)")]
    NoTracefs(#[source] io::Error),
    #[error("the format of tracepoint block:{0} is not the one expected")]
    Format(String),
    #[error("perf_event_open of block:{tracepoint} on CPU {cpu} failed (needs CAP_PERFMON or CAP_SYS_ADMIN)")]
    Open {
        tracepoint: String,
        cpu: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot map the perf ring buffer of CPU {cpu}")]
    Map {
        cpu: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the online CPUs")]
    Cpus(#[source] io::Error),
}

/// The online CPUs, from /sys/devices/system/cpu/online ("0-3,5").
pub fn online_cpus() -> io::Result<Vec<u32>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
    parse_cpu_list(text.trim())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad CPU list"))
}

pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<u32>().ok()?..=b.parse::<u32>().ok()?),
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// Read the tracepoints' layouts from tracefs, mounting a private instance
/// when none is mounted (and unmounting it right after).
fn layouts() -> Result<Vec<Layout>, PerfError> {
    let read_from = |root: &Path| -> io::Result<Vec<String>> {
        TRACEPOINTS
            .iter()
            .map(|t| std::fs::read_to_string(root.join("events/block").join(t).join("format")))
            .collect()
    };
    let mut texts = None;
    for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if let Ok(t) = read_from(Path::new(root)) {
            texts = Some(t);
            break;
        }
    }
    let texts = match texts {
        Some(t) => t,
        None => {
            // Trackers started together in one process would otherwise share
            // the mount point, and one's unmount would take another's mount
            // away mid-read (EBUSY, "no tracefs"): one at a time, each with
            // its own directory.
            static MOUNTING: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
            let mut n = MOUNTING.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            let dir = PathBuf::from(format!(
                "/run/blocksnap-tracefs.{}.{}",
                std::process::id(),
                *n
            ));
            let _ = std::fs::create_dir(&dir);
            let mounted = nix::mount::mount(
                Some("nodev"),
                &dir,
                Some("tracefs"),
                nix::mount::MsFlags::MS_NOSUID
                    | nix::mount::MsFlags::MS_NODEV
                    | nix::mount::MsFlags::MS_NOEXEC,
                None::<&str>,
            );
            let r = match mounted {
                Ok(()) => {
                    let r = read_from(&dir);
                    let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
                    r
                }
                Err(e) => Err(io::Error::from_raw_os_error(e as i32)),
            };
            let _ = std::fs::remove_dir(&dir);
            r.map_err(PerfError::NoTracefs)?
        }
    };
    TRACEPOINTS
        .iter()
        .zip(texts)
        .map(|(t, text)| ring::parse_format(&text).ok_or_else(|| PerfError::Format(t.to_string())))
        .collect()
}

fn perf_event_open(attr: &Attr, cpu: u32) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, initialised perf_event_attr whose `size`
    // field says how much of it the kernel may read; pid -1 with a CPU is a
    // system-wide event on that CPU; no group. The returned descriptor is
    // owned by us from here on.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr as *const Attr,
            -1 as libc::pid_t,
            cpu as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn ioctl_arg(fd: &OwnedFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: a perf ioctl on a perf event descriptor we own; `arg` is an
    // integer or (SET_FILTER) a pointer the caller keeps alive for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One CPU's ring buffer.
struct Ring {
    cpu: u32,
    base: *mut u8,
    map_len: usize,
    data_offset: usize,
    data_size: usize,
}

// SAFETY: the mapping is owned by the Ring and only touched through &mut self
// (the tracker drains under a mutex); the pointer is not shared otherwise.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `Perf::open`, which
        // nothing references any more.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.map_len) };
    }
}

/// `struct perf_event_mmap_page` offsets.
const DATA_HEAD: usize = 1024;
const DATA_TAIL: usize = 1032;
const DATA_OFFSET: usize = 1040;
const DATA_SIZE: usize = 1048;

impl Ring {
    /// Copy out every record the kernel published and hand the space back.
    fn drain(&mut self, into: &mut Vec<u8>) {
        // SAFETY: DATA_HEAD/DATA_TAIL lie inside the first (control) page of
        // our live mapping; data_head is written by the kernel, so it is read
        // volatile and followed by an acquire fence (the kernel publishes the
        // records before the head); we are the only writer of data_tail.
        let (head, tail) = unsafe {
            let head = std::ptr::read_volatile(self.base.add(DATA_HEAD) as *const u64);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            let tail = std::ptr::read_volatile(self.base.add(DATA_TAIL) as *const u64);
            (head, tail)
        };
        into.clear();
        let n = head.wrapping_sub(tail) as usize;
        if n == 0 {
            return;
        }
        let n = n.min(self.data_size);
        let start = (tail as usize) % self.data_size;
        let first = n.min(self.data_size - start);
        // SAFETY: both ranges lie inside the data area of our mapping
        // (data_offset .. data_offset + data_size), which the kernel does not
        // overwrite before we advance data_tail below.
        unsafe {
            let data = self.base.add(self.data_offset);
            into.extend_from_slice(std::slice::from_raw_parts(data.add(start), first));
            into.extend_from_slice(std::slice::from_raw_parts(data, n - first));
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            std::ptr::write_volatile(self.base.add(DATA_TAIL) as *mut u64, head);
        }
    }
}

/// One opened tracepoint on one CPU.
struct Event {
    fd: OwnedFd,
    /// Lost-sample count last read (PERF_FORMAT_LOST).
    lost: u64,
}

/// What a drain found.
#[derive(Debug, Default)]
pub struct Drained {
    /// Records the kernel reported dropped (LOST records or lost counters).
    pub lost: u64,
    /// Undecodable ring contents (treated like lost records).
    pub malformed: bool,
}

/// Every CPU's events and rings.
pub struct Perf {
    layouts: Vec<Layout>,
    cpus: Vec<u32>,
    rings: Vec<Ring>,
    events: Vec<Event>,
    scratch: Vec<u8>,
    pages: usize,
}

impl std::fmt::Debug for Perf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Perf").field("cpus", &self.cpus).finish()
    }
}

impl Perf {
    /// Open the tracepoints on every online CPU with rings of `pages` pages
    /// (a power of two) and the filter for `devs` (kernel device numbers).
    pub fn open(pages: usize, devs: &[u32]) -> Result<Perf, PerfError> {
        let layouts = layouts()?;
        let cpus = online_cpus().map_err(PerfError::Cpus)?;
        let page = page_size();
        let pages = pages.max(1).next_power_of_two();
        let mut rings = Vec::new();
        let mut events: Vec<Event> = Vec::new();
        for &cpu in &cpus {
            let mut leader: Option<usize> = None;
            for (t, l) in TRACEPOINTS.iter().zip(&layouts) {
                let attr = Attr {
                    kind: PERF_TYPE_TRACEPOINT,
                    size: std::mem::size_of::<Attr>() as u32,
                    config: l.id as u64,
                    sample_period: 1,
                    sample_type: PERF_SAMPLE_RAW,
                    read_format: PERF_FORMAT_LOST,
                    flags: ATTR_DISABLED | ATTR_WATERMARK,
                    wakeup_watermark: (pages * page / 4) as u32,
                    ..Default::default()
                };
                let fd = perf_event_open(&attr, cpu).map_err(|source| PerfError::Open {
                    tracepoint: t.to_string(),
                    cpu,
                    source,
                })?;
                match leader {
                    None => {
                        let map_len = (pages + 1) * page;
                        // SAFETY: a shared read-write mapping of a perf event
                        // descriptor we own, of 1 + 2^n pages as perf requires;
                        // the kernel owns its contents' layout.
                        let base = unsafe {
                            libc::mmap(
                                std::ptr::null_mut(),
                                map_len,
                                libc::PROT_READ | libc::PROT_WRITE,
                                libc::MAP_SHARED,
                                fd.as_raw_fd(),
                                0,
                            )
                        };
                        if base == libc::MAP_FAILED {
                            return Err(PerfError::Map {
                                cpu,
                                source: io::Error::last_os_error(),
                            });
                        }
                        let base = base as *mut u8;
                        // SAFETY: the control page is mapped; these fields are
                        // set by the kernel before mmap returns (0 on old
                        // kernels, where the data area follows the first page).
                        let (off, size) = unsafe {
                            (
                                std::ptr::read_volatile(base.add(DATA_OFFSET) as *const u64)
                                    as usize,
                                std::ptr::read_volatile(base.add(DATA_SIZE) as *const u64) as usize,
                            )
                        };
                        let (data_offset, data_size) = if size == 0 {
                            (page, pages * page)
                        } else {
                            (off, size)
                        };
                        rings.push(Ring {
                            cpu,
                            base,
                            map_len,
                            data_offset,
                            data_size,
                        });
                        leader = Some(events.len());
                    }
                    Some(i) => {
                        let lfd: &OwnedFd = &events[i].fd;
                        ioctl_arg(&fd, IOC_SET_OUTPUT, lfd.as_raw_fd() as libc::c_ulong).map_err(
                            |source| PerfError::Open {
                                tracepoint: t.to_string(),
                                cpu,
                                source,
                            },
                        )?;
                    }
                }
                events.push(Event { fd, lost: 0 });
            }
        }
        let mut p = Perf {
            layouts,
            cpus,
            rings,
            events,
            scratch: Vec::new(),
            pages,
        };
        p.set_devices(devs);
        for e in &p.events {
            ioctl_arg(&e.fd, IOC_ENABLE, 0).map_err(|source| PerfError::Open {
                tracepoint: "enable".into(),
                cpu: 0,
                source,
            })?;
        }
        Ok(p)
    }

    pub fn ring_pages(&self) -> usize {
        self.pages
    }

    pub fn cpus(&self) -> &[u32] {
        &self.cpus
    }

    /// Limit the events to writes of `devs` in the kernel (fewer records).
    /// If the kernel refuses the filter, every block I/O is recorded and
    /// sorted out here: slower, equally correct.
    pub fn set_devices(&mut self, devs: &[u32]) {
        if devs.is_empty() {
            return;
        }
        let devs_expr = devs
            .iter()
            .map(|d| format!("dev == {d}"))
            .collect::<Vec<_>>()
            .join(" || ");
        let candidates = [
            format!("({devs_expr}) && !(rwbs ~ \"R*\")"),
            format!("({devs_expr})"),
        ];
        for f in &candidates {
            let c = std::ffi::CString::new(f.as_str()).expect("no NUL");
            let ok = self
                .events
                .iter()
                .all(|e| ioctl_arg(&e.fd, IOC_SET_FILTER, c.as_ptr() as libc::c_ulong).is_ok());
            if ok {
                tracing::debug!(filter = %f, "tracepoint filter set");
                return;
            }
        }
        // Clear any half-applied filter: record everything.
        let c = std::ffi::CString::new("0").expect("no NUL");
        for e in &self.events {
            let _ = ioctl_arg(&e.fd, IOC_SET_FILTER, c.as_ptr() as libc::c_ulong);
        }
        tracing::warn!("the kernel refused the tracepoint filter; every block write is recorded and filtered in blocksnap");
    }

    /// Drain every ring, calling `io` for each decoded write, and check the
    /// kernel's lost counters.
    pub fn drain(&mut self, mut io: impl FnMut(BlockIo)) -> Drained {
        let mut out = Drained::default();
        for r in &mut self.rings {
            r.drain(&mut self.scratch);
            for rec in ring::records(&self.scratch) {
                match rec {
                    Ok(Record::Sample(raw)) => match ring::decode_sample(raw, &self.layouts) {
                        Some(b) => io(b),
                        None => out.malformed = true,
                    },
                    Ok(Record::Lost(n)) => out.lost += n.max(1),
                    Ok(Record::Other(_)) => {}
                    Err(e) => {
                        tracing::error!(cpu = r.cpu, "perf ring: {e}");
                        out.malformed = true;
                        break;
                    }
                }
            }
        }
        // The ring may have overflowed since the last LOST record was
        // written (the kernel writes it only once space frees up): the
        // per-event counters say so at once.
        for e in &mut self.events {
            let mut buf = [0u64; 2];
            // SAFETY: reading into a live 16-byte buffer from a descriptor we
            // own; with read_format PERF_FORMAT_LOST the kernel writes
            // { value, lost }.
            let n = unsafe {
                libc::read(
                    e.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    std::mem::size_of_val(&buf),
                )
            };
            if n != 16 {
                out.malformed = true;
                continue;
            }
            if buf[1] > e.lost {
                out.lost += buf[1] - e.lost;
                e.lost = buf[1];
            }
        }
        out
    }

    /// Descriptors to wait on: one per CPU ring (duplicates, so a waiter
    /// outside the tracker's lock never polls a closed descriptor).
    pub fn wait_fds(&self) -> Vec<OwnedFd> {
        let mut out = Vec::new();
        let per_cpu = TRACEPOINTS.len();
        for e in self.events.iter().step_by(per_cpu) {
            if let Ok(fd) = e.fd.try_clone() {
                out.push(fd);
            }
        }
        out
    }
}

/// Wait until one of `fds` (perf events) passes its ring's wakeup
/// watermark, or `timeout` runs out.
pub fn wait(fds: &[OwnedFd], timeout: std::time::Duration) {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a live array of pollfd of the given length, whose
    // descriptors are owned by the caller for the duration of the call.
    unsafe {
        libc::poll(
            p.as_mut_ptr(),
            p.len() as libc::nfds_t,
            timeout.as_millis().min(i32::MAX as u128) as libc::c_int,
        )
    };
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0-3,5,7-8"), Some(vec![0, 1, 2, 3, 5, 7, 8]));
        assert_eq!(parse_cpu_list("x"), None);
    }
}
