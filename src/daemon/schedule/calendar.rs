//! When a scheduled volume is due: the `schedule` of a volume in the
//! config, parsed, and the next due time after a given instant.
//!
//! Accepted forms (case-insensitive names):
//! - `minutely`, `hourly`, `daily`, `weekly`, `monthly`, `yearly`
//!   (`annually`): as systemd.time(7) defines them (`weekly` is Monday
//!   00:00, `monthly` the 1st at 00:00).
//! - `every N minutes`, `every N hours` (also `every N minute`, `every Nm`,
//!   `every Nh`, `every Nmin`): due at each multiple of N minutes since the
//!   Unix epoch (so `every 15m` is due at :00, :15, :30, :45; an interval
//!   that does not divide a day drifts against midnight). From 1 minute to
//!   24 hours.
//! - A subset of systemd's OnCalendar: `[WEEKDAYS] [DATE] [TIME] [ZONE]`,
//!   e.g. `Mon..Fri *-*-* 02:30`, `*:0/15`, `*-*-01 03:00:00 UTC`,
//!   `Sat,Sun 12:00`. DATE is `YEAR-MONTH-DAY` or `MONTH-DAY` (default
//!   every day), TIME `HOUR:MINUTE[:SECOND]` (default 00:00:00). Each
//!   component is `*` or a comma list of values, ranges `A..B` and steps
//!   `A/STEP`, `A..B/STEP`, `*/STEP`. WEEKDAYS is a comma list of names
//!   (`Mon`, `Monday`, ...) and ranges (`Mon..Fri`). SECOND must be one
//!   value: a schedule runs at most once a minute. ZONE is `UTC` or an IANA
//!   name (`Europe/Berlin`); without one the daemon's local time zone is
//!   used. Not supported: `~` (days from the end of the month), fractional
//!   seconds, repeated time specs.

use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// How far ahead a calendar is searched for its next due time (covers a
/// leap day and any weekday/date combination).
const SEARCH_DAYS: i32 = 366 * 8 + 7;

/// A parse error: which part of the schedule and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ScheduleError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> ScheduleError {
    ScheduleError {
        field,
        message: message.into(),
    }
}

/// A parsed schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    text: String,
    kind: Kind,
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    /// Due at every multiple of this many seconds since the epoch.
    Every(i64),
    Calendar(Box<Calendar>),
}

#[derive(Clone, Debug, PartialEq)]
struct Calendar {
    /// Bit i set: weekday i (Monday = 0) matches.
    weekdays: u8,
    /// `None`: every year.
    years: Option<Vec<i16>>,
    /// Bit m set: month m (1..=12) matches.
    months: u16,
    /// Bit d set: day d (1..=31) matches.
    days: u32,
    hours: Vec<i8>,
    minutes: Vec<i8>,
    second: i8,
    zone: Option<TimeZone>,
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Schedule {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Schedule, ScheduleError> {
        Schedule::parse(s)
    }
}

const WEEKDAYS: [(&str, &str); 7] = [
    ("mon", "monday"),
    ("tue", "tuesday"),
    ("wed", "wednesday"),
    ("thu", "thursday"),
    ("fri", "friday"),
    ("sat", "saturday"),
    ("sun", "sunday"),
];

fn weekday_index(s: &str) -> Option<u8> {
    let l = s.to_ascii_lowercase();
    WEEKDAYS
        .iter()
        .position(|(short, long)| l == *short || l == *long)
        .map(|i| i as u8)
}

fn weekday_bit(w: Weekday) -> u8 {
    1 << (w.to_monday_zero_offset() as u8)
}

/// Values `min..=max` a comma list of `*`, `A`, `A..B`, `A/S`, `A..B/S`,
/// `*/S` selects, sorted and deduplicated.
fn parse_values(
    field: &'static str,
    s: &str,
    min: i64,
    max: i64,
) -> Result<Vec<i64>, ScheduleError> {
    if s.is_empty() {
        return Err(bad(field, "is empty"));
    }
    let num = |t: &str| -> Result<i64, ScheduleError> {
        let v: i64 = t
            .parse()
            .map_err(|_| bad(field, format!("{t:?} is not a number")))?;
        if v < min || v > max {
            return Err(bad(field, format!("{v} is not in {min}..{max}")));
        }
        Ok(v)
    };
    let mut out = Vec::new();
    for item in s.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, st)) => {
                let step: i64 = st
                    .parse()
                    .map_err(|_| bad(field, format!("step {st:?} is not a number")))?;
                if step < 1 {
                    return Err(bad(field, format!("step {step} must be at least 1")));
                }
                (r, Some(step))
            }
            None => (item, None),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once("..") {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(bad(field, format!("range {a}..{b} is backwards")));
            }
            (a, b)
        } else {
            let a = num(range)?;
            // `A/S` runs from A to the end of the field.
            (a, if step.is_some() { max } else { a })
        };
        let step = step.unwrap_or(1);
        let mut v = lo;
        while v <= hi {
            out.push(v);
            v += step;
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn parse_weekdays(s: &str) -> Result<u8, ScheduleError> {
    const F: &str = "weekday";
    let name = |t: &str| {
        weekday_index(t).ok_or_else(|| {
            bad(
                F,
                format!("{t:?} is not a weekday (Mon, Tue, Wed, Thu, Fri, Sat, Sun)"),
            )
        })
    };
    let mut bits = 0u8;
    for item in s.split(',') {
        let range = item.split_once("..").or_else(|| item.split_once('-'));
        match range {
            Some((a, b)) => {
                let (a, b) = (name(a)?, name(b)?);
                if a > b {
                    return Err(bad(F, format!("range {item} is backwards")));
                }
                for i in a..=b {
                    bits |= 1 << i;
                }
            }
            None => bits |= 1 << name(item)?,
        }
    }
    Ok(bits)
}

fn bits<T: Into<i64> + Copy>(values: &[T]) -> u32 {
    values.iter().fold(0u32, |b, v| b | (1 << (*v).into()))
}

impl Schedule {
    /// The text the schedule was parsed from.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Parse a schedule (see the module's documentation).
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let norm = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let lower = norm.to_ascii_lowercase();
        let cal = |s: &str| Schedule::parse_calendar(s);
        let kind = match lower.as_str() {
            "" => return Err(bad("schedule", "is empty")),
            "minutely" => cal("*-*-* *:*:00")?,
            "hourly" => cal("*-*-* *:00:00")?,
            "daily" => cal("*-*-* 00:00:00")?,
            "weekly" => cal("Mon *-*-* 00:00:00")?,
            "monthly" => cal("*-*-01 00:00:00")?,
            "yearly" | "annually" => cal("*-01-01 00:00:00")?,
            l if l.starts_with("every ") || l == "every" => Schedule::parse_every(&l[5..])?,
            _ => cal(&norm)?,
        };
        let s = Schedule { text: norm, kind };
        // A calendar that can never match (Feb 30) is a mistake.
        if s.next_after(Timestamp::UNIX_EPOCH, &TimeZone::UTC)
            .is_none()
            && s.next_after(Timestamp::now(), &TimeZone::UTC).is_none()
        {
            return Err(bad("schedule", "never matches any date"));
        }
        Ok(s)
    }

    fn parse_every(rest: &str) -> Result<Kind, ScheduleError> {
        const F: &str = "interval";
        let rest = rest.trim();
        let split = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (n, unit) = rest.split_at(split);
        let n: i64 = n.parse().map_err(|_| {
            bad(
                F,
                format!("{rest:?} is not a number of minutes or hours (\"every 15 minutes\", \"every 2h\")"),
            )
        })?;
        let minutes = match unit.trim() {
            "m" | "min" | "mins" | "minute" | "minutes" => n,
            "h" | "hour" | "hours" => n.saturating_mul(60),
            other => {
                return Err(bad(
                    F,
                    format!(
                    "unit {other:?} is not minutes or hours (\"every 15 minutes\", \"every 2h\")"
                ),
                ))
            }
        };
        if !(1..=24 * 60).contains(&minutes) {
            return Err(bad(F, "must be from 1 minute to 24 hours"));
        }
        Ok(Kind::Every(minutes * 60))
    }

    fn parse_calendar(s: &str) -> Result<Kind, ScheduleError> {
        let mut words: Vec<&str> = s.split(' ').filter(|w| !w.is_empty()).collect();
        let mut zone = None;
        if let Some(last) = words.last() {
            if last.eq_ignore_ascii_case("utc") {
                zone = Some(TimeZone::UTC);
                words.pop();
            } else if last.contains('/') && last.starts_with(|c: char| c.is_ascii_alphabetic()) {
                let tz = jiff::tz::db()
                    .get(last)
                    .map_err(|_| bad("time zone", format!("{last:?} is not a known time zone")))?;
                zone = Some(tz);
                words.pop();
            }
        }
        if let [one] = words.as_slice() {
            if one.chars().all(|c| c.is_ascii_alphabetic()) && weekday_index(one).is_none() {
                return Err(bad(
                    "schedule",
                    format!("{one:?} is not a schedule: use hourly, daily, weekly, monthly, \"every N minutes\" or a calendar expression"),
                ));
            }
        }
        let mut weekdays = 0x7f;
        if let Some(first) = words.first() {
            if first.starts_with(|c: char| c.is_ascii_alphabetic()) {
                weekdays = parse_weekdays(first)?;
                words.remove(0);
            }
        }
        let (date, time) = match words.as_slice() {
            [] => (None, None),
            [d, t] => (Some(*d), Some(*t)),
            [one] if one.contains(':') => (None, Some(*one)),
            [one] if one.contains('-') => (Some(*one), None),
            [one] => {
                return Err(bad(
                    "schedule",
                    format!("{one:?} is neither a date (Y-M-D) nor a time (H:M[:S])"),
                ))
            }
            _ => {
                return Err(bad(
                    "schedule",
                    "expected [WEEKDAYS] [YEAR-MONTH-DAY] [HOUR:MINUTE[:SECOND]] [ZONE]",
                ))
            }
        };
        let (years, months, days) = match date {
            None => (None, 0x1ffe, 0xffff_fffe),
            Some(d) => {
                let parts: Vec<&str> = d.split('-').collect();
                let (y, m, dd) = match parts.as_slice() {
                    [y, m, dd] => (Some(*y), *m, *dd),
                    [m, dd] => (None, *m, *dd),
                    _ => {
                        return Err(bad(
                            "date",
                            format!("{d:?} is not YEAR-MONTH-DAY or MONTH-DAY"),
                        ))
                    }
                };
                let years = match y {
                    None | Some("*") => None,
                    Some(y) => Some(
                        parse_values("year", y, 1970, 2199)?
                            .into_iter()
                            .map(|v| v as i16)
                            .collect(),
                    ),
                };
                (
                    years,
                    bits(&parse_values("month", m, 1, 12)?) as u16,
                    bits(&parse_values("day", dd, 1, 31)?),
                )
            }
        };
        let (hours, minutes, second) = match time {
            None => (vec![0], vec![0], 0),
            Some(t) => {
                let parts: Vec<&str> = t.split(':').collect();
                let (h, m, sec) = match parts.as_slice() {
                    [h, m] => (*h, *m, None),
                    [h, m, s] => (*h, *m, Some(*s)),
                    _ => {
                        return Err(bad(
                            "time",
                            format!("{t:?} is not HOUR:MINUTE or HOUR:MINUTE:SECOND"),
                        ))
                    }
                };
                let second = match sec {
                    None => 0,
                    Some(s) => {
                        let v = parse_values("second", s, 0, 59)?;
                        if v.len() != 1 || s.contains(['*', ',', '/']) || s.contains("..") {
                            return Err(bad(
                                "second",
                                format!("{s:?} must be a single value: a schedule runs at most once a minute"),
                            ));
                        }
                        v[0] as i8
                    }
                };
                (
                    parse_values("hour", h, 0, 23)?
                        .into_iter()
                        .map(|v| v as i8)
                        .collect(),
                    parse_values("minute", m, 0, 59)?
                        .into_iter()
                        .map(|v| v as i8)
                        .collect(),
                    second,
                )
            }
        };
        Ok(Kind::Calendar(Box::new(Calendar {
            weekdays,
            years,
            months,
            days,
            hours,
            minutes,
            second,
            zone,
        })))
    }

    /// The first due time strictly after `t`, with `local` as the time zone
    /// of a calendar that names none. `None`: never again.
    pub fn next_after(&self, t: Timestamp, local: &TimeZone) -> Option<Timestamp> {
        match &self.kind {
            Kind::Every(n) => {
                let next = (t.as_second().div_euclid(*n) + 1).checked_mul(*n)?;
                Timestamp::from_second(next).ok()
            }
            Kind::Calendar(c) => c.next_after(t, local),
        }
    }
}

impl Calendar {
    fn date_matches(&self, d: Date) -> bool {
        self.weekdays & weekday_bit(d.weekday()) != 0
            && self.months & (1 << d.month()) != 0
            && self.days & (1 << d.day()) != 0
            && self.years.as_ref().is_none_or(|ys| ys.contains(&d.year()))
    }

    fn next_after(&self, t: Timestamp, local: &TimeZone) -> Option<Timestamp> {
        let tz = self.zone.as_ref().unwrap_or(local);
        let mut day = t.to_zoned(tz.clone()).date();
        for _ in 0..SEARCH_DAYS {
            if let Some(ys) = &self.years {
                if ys.iter().all(|y| *y < day.year()) {
                    return None;
                }
            }
            if self.date_matches(day) {
                for &h in &self.hours {
                    for &m in &self.minutes {
                        let civil = day.at(h, m, self.second, 0);
                        // A time in a DST gap is moved forward past the gap;
                        // one in a fold is its earlier instance.
                        let Ok(z) = civil.to_zoned(tz.clone()) else {
                            continue;
                        };
                        if z.timestamp() > t {
                            return Some(z.timestamp());
                        }
                    }
                }
            }
            day = day.tomorrow().ok()?;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(sched: &str, after: &str) -> String {
        Schedule::parse(sched)
            .unwrap()
            .next_after(ts(after), &TimeZone::UTC)
            .map(|t| t.to_string())
            .unwrap_or_else(|| "never".into())
    }

    /// The first `n` due times after `after`.
    fn series(sched: &str, after: &str, n: usize) -> Vec<String> {
        let s = Schedule::parse(sched).unwrap();
        let mut t = ts(after);
        let mut out = Vec::new();
        for _ in 0..n {
            t = s.next_after(t, &TimeZone::UTC).unwrap();
            out.push(t.to_string());
        }
        out
    }

    #[test]
    fn shorthands() {
        assert_eq!(
            next("hourly", "2026-05-04T10:00:00Z"),
            "2026-05-04T11:00:00Z"
        );
        assert_eq!(
            next("hourly", "2026-05-04T10:59:59Z"),
            "2026-05-04T11:00:00Z"
        );
        assert_eq!(
            next("Hourly", "2026-05-04T10:00:00.5Z"),
            "2026-05-04T11:00:00Z"
        );
        assert_eq!(
            next("daily", "2026-05-04T10:00:00Z"),
            "2026-05-05T00:00:00Z"
        );
        assert_eq!(
            next("daily", "2026-12-31T23:59:59Z"),
            "2027-01-01T00:00:00Z"
        );
        // 2026-05-04 is a Monday.
        assert_eq!(
            next("weekly", "2026-05-04T00:00:00Z"),
            "2026-05-11T00:00:00Z"
        );
        assert_eq!(
            next("weekly", "2026-05-03T23:00:00Z"),
            "2026-05-04T00:00:00Z"
        );
        assert_eq!(
            next("monthly", "2026-01-31T12:00:00Z"),
            "2026-02-01T00:00:00Z"
        );
        assert_eq!(
            next("yearly", "2026-01-01T00:00:00Z"),
            "2027-01-01T00:00:00Z"
        );
        assert_eq!(
            next("minutely", "2026-01-01T00:00:30Z"),
            "2026-01-01T00:01:00Z"
        );
    }

    #[test]
    fn intervals_are_aligned_to_the_epoch() {
        assert_eq!(
            series("every 15 minutes", "2026-05-04T10:07:00Z", 3),
            [
                "2026-05-04T10:15:00Z",
                "2026-05-04T10:30:00Z",
                "2026-05-04T10:45:00Z"
            ]
        );
        assert_eq!(
            next("every 15m", "2026-05-04T10:15:00Z"),
            "2026-05-04T10:30:00Z"
        );
        assert_eq!(
            next("every 2h", "2026-05-04T10:15:00Z"),
            "2026-05-04T12:00:00Z"
        );
        assert_eq!(
            next("every 1 minute", "2026-05-04T10:15:00Z"),
            "2026-05-04T10:16:00Z"
        );
        assert_eq!(
            next("every  90   min", "2026-05-04T00:00:00Z"),
            "2026-05-04T01:30:00Z"
        );
        assert_eq!(
            next("every 24 hours", "2026-05-04T00:00:00Z"),
            "2026-05-05T00:00:00Z"
        );
    }

    #[test]
    fn calendars() {
        assert_eq!(
            series("*:0/15", "2026-05-04T10:07:00Z", 3),
            [
                "2026-05-04T10:15:00Z",
                "2026-05-04T10:30:00Z",
                "2026-05-04T10:45:00Z"
            ]
        );
        // Friday 2026-05-08 23:00 → Monday 02:30.
        assert_eq!(
            next("Mon..Fri *-*-* 02:30", "2026-05-08T23:00:00Z"),
            "2026-05-11T02:30:00Z"
        );
        assert_eq!(
            next("Mon-Fri 02:30", "2026-05-09T03:00:00Z"),
            "2026-05-11T02:30:00Z"
        );
        assert_eq!(
            series("Sat,Sun 12:00", "2026-05-04T00:00:00Z", 3),
            [
                "2026-05-09T12:00:00Z",
                "2026-05-10T12:00:00Z",
                "2026-05-16T12:00:00Z"
            ]
        );
        assert_eq!(
            series("*-*-* 08,20:00:00", "2026-05-04T09:00:00Z", 3),
            [
                "2026-05-04T20:00:00Z",
                "2026-05-05T08:00:00Z",
                "2026-05-05T20:00:00Z"
            ]
        );
        assert_eq!(
            series("*-*-* 09..11:30", "2026-05-04T09:30:00Z", 3),
            [
                "2026-05-04T10:30:00Z",
                "2026-05-04T11:30:00Z",
                "2026-05-05T09:30:00Z"
            ]
        );
        assert_eq!(
            series("*-*-* */6:00", "2026-05-04T01:00:00Z", 3),
            [
                "2026-05-04T06:00:00Z",
                "2026-05-04T12:00:00Z",
                "2026-05-04T18:00:00Z"
            ]
        );
        // The 31st skips months without one.
        assert_eq!(
            series("*-*-31 00:00", "2026-01-31T00:00:00Z", 2),
            ["2026-03-31T00:00:00Z", "2026-05-31T00:00:00Z"]
        );
        // A leap day.
        assert_eq!(
            next("*-02-29 00:00", "2026-01-01T00:00:00Z"),
            "2028-02-29T00:00:00Z"
        );
        assert_eq!(
            next("02-29", "2026-01-01T00:00:00Z"),
            "2028-02-29T00:00:00Z"
        );
        // Years, and running out of them.
        assert_eq!(
            next("2027-01-01", "2026-06-01T00:00:00Z"),
            "2027-01-01T00:00:00Z"
        );
        assert_eq!(next("2027-01-01", "2027-06-01T00:00:00Z"), "never");
        // Seconds, and a time zone.
        assert_eq!(
            next("*-*-* 03:00:30", "2026-05-04T03:00:30Z"),
            "2026-05-05T03:00:30Z"
        );
        assert_eq!(
            next("*-*-* 03:00 Europe/Berlin", "2026-05-04T00:00:00Z"),
            "2026-05-04T01:00:00Z"
        );
        assert_eq!(
            next("daily", "2026-05-04T00:00:00Z"),
            "2026-05-05T00:00:00Z"
        );
    }

    #[test]
    fn local_time_zone_and_daylight_saving() {
        let berlin = jiff::tz::db().get("Europe/Berlin").unwrap();
        let s = Schedule::parse("daily").unwrap();
        // Midnight in Berlin (summer: UTC+2).
        assert_eq!(
            s.next_after(ts("2026-05-04T12:00:00Z"), &berlin).unwrap(),
            ts("2026-05-04T22:00:00Z")
        );
        // 02:30 does not exist on 2026-03-29 in Berlin: run at 03:30 (UTC 01:30).
        let s = Schedule::parse("*-*-* 02:30").unwrap();
        assert_eq!(
            s.next_after(ts("2026-03-28T12:00:00Z"), &berlin).unwrap(),
            ts("2026-03-29T01:30:00Z")
        );
        // 02:30 happens twice on 2026-10-25: run once, at the first.
        let first = s.next_after(ts("2026-10-24T12:00:00Z"), &berlin).unwrap();
        assert_eq!(first, ts("2026-10-25T00:30:00Z"));
        let then = s.next_after(first, &berlin).unwrap();
        assert_eq!(then, ts("2026-10-26T01:30:00Z"));
        // Hourly across the fold: the repeated local hour runs once (at its
        // first instance).
        let h = Schedule::parse("hourly").unwrap();
        let mut t = ts("2026-10-24T23:30:00Z");
        let mut got = Vec::new();
        for _ in 0..4 {
            t = h.next_after(t, &berlin).unwrap();
            got.push(t.to_string());
        }
        assert_eq!(
            got,
            [
                "2026-10-25T00:00:00Z",
                "2026-10-25T02:00:00Z",
                "2026-10-25T03:00:00Z",
                "2026-10-25T04:00:00Z"
            ]
        );
    }

    #[test]
    fn mistakes_name_their_field() {
        for (text, field, needle) in [
            ("", "schedule", "empty"),
            ("sometimes", "schedule", "not a schedule"),
            ("Mon,Someday 12:00", "weekday", "not a weekday"),
            ("every", "interval", "not a number"),
            ("every 0 minutes", "interval", "1 minute"),
            ("every 25h", "interval", "24 hours"),
            ("every 5 seconds", "interval", "unit"),
            ("every 10s", "interval", "unit"),
            ("*-*-* 25:00", "hour", "25 is not in 0..23"),
            ("*-*-* 12:60", "minute", "60 is not in 0..59"),
            ("*-13-01", "month", "13"),
            ("*-02-32", "day", "32"),
            ("*-02-30", "schedule", "never matches"),
            ("*-*-* 12:00:*", "second", "single value"),
            ("*-*-* 12:00:0/10", "second", "single value"),
            ("*-*-* 12:00:61", "second", "61"),
            ("*-*-* 5..3:00", "hour", "backwards"),
            ("*-*-* */0:00", "hour", "step 0"),
            ("*-*-* x:00", "hour", "not a number"),
            ("Fri..Mon 12:00", "weekday", "backwards"),
            ("Mon 12:00 Mars/Olympus", "time zone", "not a known"),
            ("1-2-3-4", "date", "YEAR-MONTH-DAY"),
            ("12", "schedule", "neither a date"),
            ("Mon 2026-01-01 12:00 UTC extra", "schedule", "expected"),
            ("1:2:3:4", "time", "HOUR:MINUTE"),
        ] {
            let e = Schedule::parse(text).expect_err(text);
            assert_eq!(e.field, field, "{text:?}: {e}");
            assert!(e.message.contains(needle), "{text:?}: {e} lacks {needle:?}");
        }
    }

    #[test]
    fn display_is_the_normalised_text() {
        let s = Schedule::parse("  Mon..Fri   02:30 ").unwrap();
        assert_eq!(s.to_string(), "Mon..Fri 02:30");
    }
}
