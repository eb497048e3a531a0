//! Last line of defence against SIGBUS from a device mapping.
//!
//! The scan prefaults every window with `MADV_POPULATE_READ`, which reports an
//! I/O error as an error code. A page can still be reclaimed between the
//! prefault and the access and then fail to read back; the kernel answers that
//! access with SIGBUS, which would kill the daemon. This module installs a
//! SIGBUS handler that, for an address inside a registered mapping, replaces
//! the failing page with an anonymous zero page, records the address and
//! returns, so the access completes (reading zeros) and the scan, which checks
//! [`Registration::take_fault`] before it trusts a window, fails that snapshot
//! cleanly. Faults at any other address go to the handler that was installed
//! before ours (Rust's own stack-overflow handler), or the default action.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

const SLOTS: usize = 64;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    fault: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    fault: AtomicUsize::new(0),
};
static REGISTRY: [Slot; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Once = Once::new();
static mut PREVIOUS: MaybeUninit<libc::sigaction> = MaybeUninit::uninit();

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a handler installed with SA_SIGINFO.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in REGISTRY.iter() {
        let start = slot.start.load(Ordering::Acquire);
        let end = slot.end.load(Ordering::Acquire);
        if start != 0 && addr >= start && addr < end {
            let page = page_size();
            let page_addr = addr & !(page - 1);
            // SAFETY: the page lies inside a read-only mapping this process
            // registered and still owns (registrations are removed before the
            // mapping is dropped). MAP_FIXED over it with an anonymous page
            // only changes what that page reads as; mmap is a plain system call.
            let r = unsafe {
                libc::mmap(
                    page_addr as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                let _ = slot
                    .fault
                    .compare_exchange(0, addr, Ordering::AcqRel, Ordering::Acquire);
                return;
            }
        }
    }
    // Not ours: hand over to whoever was installed before us.
    // SAFETY: PREVIOUS was written once in `install` before this handler could run.
    let prev = unsafe { (*std::ptr::addr_of!(PREVIOUS)).assume_init_ref() };
    if prev.sa_flags & libc::SA_SIGINFO != 0 && prev.sa_sigaction > libc::SIG_IGN {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has
        // the three-argument signature; we pass the arguments we were given.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(prev.sa_sigaction) };
        f(sig, info, ctx);
    } else if prev.sa_sigaction > libc::SIG_IGN {
        // SAFETY: a non-SA_SIGINFO handler has the one-argument signature.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev.sa_sigaction) };
        f(sig);
    } else {
        // Restore the default action; returning re-executes the faulting access,
        // which then terminates the process as it would have without us.
        // SAFETY: resetting a signal disposition to SIG_DFL.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
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

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: we build a zeroed sigaction, fill in the handler and flags and
        // install it; the previous action is stored into PREVIOUS exactly once,
        // before any fault in a registered range can occur.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            libc::sigemptyset(&mut action.sa_mask);
            let mut prev: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, &action, &mut prev);
            (*std::ptr::addr_of_mut!(PREVIOUS)).write(prev);
        }
    });
}

/// A mapping registered with the SIGBUS handler; unregistered on drop.
#[derive(Debug)]
pub struct Registration {
    slot: Option<usize>,
    start: usize,
}

impl Registration {
    /// Register `[start, start+len)`. If all slots are taken the mapping is
    /// not protected by the handler (the prefault still is); this is logged.
    pub fn new(start: *const u8, len: usize) -> Registration {
        install();
        let start = start as usize;
        for (i, slot) in REGISTRY.iter().enumerate() {
            if slot
                .start
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.fault.store(0, Ordering::Release);
                slot.end.store(start + len, Ordering::Release);
                slot.start.store(start, Ordering::Release);
                return Registration {
                    slot: Some(i),
                    start,
                };
            }
        }
        tracing::warn!("all SIGBUS registration slots in use; mapping relies on prefault only");
        Registration { slot: None, start }
    }

    /// The byte offset (from the mapping's start) of the first access that
    /// faulted since the last call, if any.
    pub fn take_fault(&self) -> Option<u64> {
        let slot = &REGISTRY[self.slot?];
        let addr = slot.fault.swap(0, Ordering::AcqRel);
        (addr != 0).then(|| (addr - self.start) as u64)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let slot = &REGISTRY[i];
            slot.end.store(0, Ordering::Release);
            slot.start.store(0, Ordering::Release);
        }
    }
}
