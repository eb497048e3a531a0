//! Wall-clock time behind a trait, so what depends on the date (schedules,
//! retention) can be tested without sleeping.
//!
//! - [`SystemClock`]: the real clock.
//! - [`TestClock`]: set and advanced by a test.
//! - [`FileClock`]: reads the time from a file on every call. blocksnapd
//!   uses it only when `BLOCKSNAP_TEST_CLOCK_FILE` is set in its
//!   environment (integration tests drive a real daemon's schedules with
//!   it, as `BLOCKSNAP_FAULT_POINT` drives its crash points). Never set it
//!   on a production host.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use jiff::{SignedDuration, Timestamp};

/// The environment variable that makes blocksnapd read its schedule clock
/// from a file (tests only).
pub const TEST_CLOCK_ENV: &str = "BLOCKSNAP_TEST_CLOCK_FILE";

/// Where "now" comes from.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current wall-clock time.
    fn now(&self) -> Timestamp;
    /// Whether this clock is the real one (a scheduler may then sleep until
    /// the next due time; with any other clock it polls).
    fn is_real(&self) -> bool {
        false
    }
}

/// The system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
    fn is_real(&self) -> bool {
        true
    }
}

/// A clock a test sets.
#[derive(Debug)]
pub struct TestClock(Mutex<Timestamp>);

impl TestClock {
    pub fn new(t: Timestamp) -> TestClock {
        TestClock(Mutex::new(t))
    }
    pub fn set(&self, t: Timestamp) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }
    pub fn advance(&self, d: SignedDuration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t = t.saturating_add(d).expect("a signed duration never fails");
    }
}

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A clock read from a file holding an RFC 3339 time
/// ("2026-01-01T01:00:00Z") or whole seconds since the epoch. A file that
/// cannot be read or parsed leaves the last good time (the real time
/// before the first good read).
#[derive(Debug)]
pub struct FileClock {
    path: PathBuf,
    last: Mutex<Timestamp>,
}

impl FileClock {
    pub fn new(path: &Path) -> FileClock {
        FileClock {
            path: path.to_path_buf(),
            last: Mutex::new(Timestamp::now()),
        }
    }

    /// The file clock named by `BLOCKSNAP_TEST_CLOCK_FILE`, if it is set.
    pub fn from_env() -> Option<FileClock> {
        let p = std::env::var_os(TEST_CLOCK_ENV)?;
        (!p.is_empty()).then(|| FileClock::new(Path::new(&p)))
    }
}

/// Parse a clock file's text.
pub fn parse_time(text: &str) -> Option<Timestamp> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<i64>() {
        return Timestamp::from_second(secs).ok();
    }
    t.parse::<Timestamp>().ok()
}

impl Clock for FileClock {
    fn now(&self) -> Timestamp {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|s| parse_time(&s))
        {
            *last = t;
        }
        *last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_clock_moves_only_when_told() {
        let t0: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        let c = TestClock::new(t0);
        assert_eq!(c.now(), t0);
        c.advance(SignedDuration::from_hours(2));
        assert_eq!(c.now(), "2026-03-01T02:00:00Z".parse().unwrap());
        assert!(!c.is_real());
        assert!(SystemClock.is_real());
    }

    #[test]
    fn file_clock_reads_the_file_and_keeps_the_last_good_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("clock");
        std::fs::write(&p, "2026-01-01T01:00:00Z\n").unwrap();
        let c = FileClock::new(&p);
        assert_eq!(c.now(), "2026-01-01T01:00:00Z".parse().unwrap());
        std::fs::write(&p, "1767229200").unwrap();
        assert_eq!(c.now(), Timestamp::from_second(1767229200).unwrap());
        std::fs::write(&p, "garbage").unwrap();
        assert_eq!(c.now(), Timestamp::from_second(1767229200).unwrap());
        std::fs::remove_file(&p).unwrap();
        assert_eq!(c.now(), Timestamp::from_second(1767229200).unwrap());
    }
}
