//! Which scheduled snapshots a volume's `keep` rules no longer keep.
//!
//! The rules (sanoid, zfs-auto-snapshot and restic `--keep-*` semantics):
//! `hourly = N` keeps the newest snapshot of each of the N most recent
//! hours that have a snapshot; `daily`, `weekly` (ISO weeks, Monday to
//! Sunday) and `monthly` likewise. Periods are in the daemon's local time
//! zone. A snapshot kept by any rule is kept. The newest snapshot, and the
//! newest scheduled one, are always kept. Without any rule nothing is
//! pruned.
//!
//! Counting periods that have a snapshot (rather than the last N periods
//! of the calendar) means a daemon that was stopped for a week does not
//! delete a week's worth of history when it starts again.

use std::collections::BTreeSet;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use uuid::Uuid;

/// How many periods of each kind to keep (0: the rule is off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Keep {
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

impl Keep {
    /// No rule at all: nothing is pruned.
    pub fn is_empty(&self) -> bool {
        self.hourly == 0 && self.daily == 0 && self.weekly == 0 && self.monthly == 0
    }
}

impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
        if parts.is_empty() {
            f.write_str("all")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

/// A snapshot the rules may prune.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: Uuid,
    /// When it was taken (a scheduled one: the time of its run).
    pub at: Timestamp,
    /// Taken by the schedule (not through the API).
    pub scheduled: bool,
}

#[derive(Clone, Copy)]
enum Period {
    Hour,
    Day,
    Week,
    Month,
}

/// The period `t` falls in, as a comparable key.
fn bucket(p: Period, t: Timestamp, tz: &TimeZone) -> (i32, i32, i32, i32) {
    let z = t.to_zoned(tz.clone());
    let d = z.date();
    match p {
        Period::Hour => (
            d.year().into(),
            d.month().into(),
            d.day().into(),
            z.hour().into(),
        ),
        Period::Day => (d.year().into(), d.month().into(), d.day().into(), 0),
        Period::Week => {
            let w = d.iso_week_date();
            (w.year().into(), w.week().into(), 0, 0)
        }
        Period::Month => (d.year().into(), d.month().into(), 0, 0),
    }
}

/// The ids among `snaps` that no rule keeps, oldest first. `snaps` may be
/// in any order.
pub fn to_prune(snaps: &[Candidate], keep: &Keep, tz: &TimeZone) -> Vec<Uuid> {
    if keep.is_empty() || snaps.is_empty() {
        return Vec::new();
    }
    let mut sorted: Vec<&Candidate> = snaps.iter().collect();
    // Newest first; ties broken by id so the answer never depends on the
    // input's order.
    sorted.sort_by(|a, b| b.at.cmp(&a.at).then(b.id.cmp(&a.id)));
    let mut kept: BTreeSet<Uuid> = BTreeSet::new();
    kept.insert(sorted[0].id);
    if let Some(s) = sorted.iter().find(|s| s.scheduled) {
        kept.insert(s.id);
    }
    for (period, n) in [
        (Period::Hour, keep.hourly),
        (Period::Day, keep.daily),
        (Period::Week, keep.weekly),
        (Period::Month, keep.monthly),
    ] {
        let mut left = n;
        let mut last = None;
        for s in &sorted {
            if left == 0 {
                break;
            }
            let b = bucket(period, s.at, tz);
            if last != Some(b) {
                kept.insert(s.id);
                last = Some(b);
                left -= 1;
            }
        }
    }
    sorted
        .iter()
        .rev()
        .filter(|s| !kept.contains(&s.id))
        .map(|s| s.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;
    use proptest::prelude::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n + 1)
    }

    /// Snapshots every `step` from `start`, `n` of them; ids by position.
    fn every(start: &str, step: SignedDuration, n: usize) -> Vec<Candidate> {
        let mut t = ts(start);
        (0..n)
            .map(|i| {
                let c = Candidate {
                    id: id(i as u128),
                    at: t,
                    scheduled: true,
                };
                t = t.checked_add(step).unwrap();
                c
            })
            .collect()
    }

    /// The times of the snapshots kept.
    fn kept_times(snaps: &[Candidate], keep: &Keep, tz: &TimeZone) -> Vec<String> {
        let pruned: BTreeSet<Uuid> = to_prune(snaps, keep, tz).into_iter().collect();
        let mut v: Vec<String> = snaps
            .iter()
            .filter(|s| !pruned.contains(&s.id))
            .map(|s| s.at.to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn no_rule_prunes_nothing() {
        let s = every("2026-01-01T00:00:00Z", SignedDuration::from_hours(1), 100);
        assert!(to_prune(&s, &Keep::default(), &TimeZone::UTC).is_empty());
        assert!(to_prune(
            &[],
            &Keep {
                hourly: 1,
                ..Keep::default()
            },
            &TimeZone::UTC
        )
        .is_empty());
    }

    #[test]
    fn hourly_for_ten_days_with_hourly_and_daily_rules() {
        // 2026-01-01 00:00 .. 2026-01-10 23:00, every hour.
        let s = every("2026-01-01T00:00:00Z", SignedDuration::from_hours(1), 240);
        let keep = Keep {
            hourly: 24,
            daily: 7,
            ..Keep::default()
        };
        let kept = kept_times(&s, &keep, &TimeZone::UTC);
        let mut want: Vec<String> = (0..24)
            .map(|h| format!("2026-01-10T{h:02}:00:00Z"))
            .collect();
        // The newest of the 6 days before (the 10th is already kept).
        for d in 4..=9 {
            want.push(format!("2026-01-{d:02}T23:00:00Z"));
        }
        want.sort();
        assert_eq!(kept, want);
        // Oldest first.
        let pruned = to_prune(&s, &keep, &TimeZone::UTC);
        assert_eq!(pruned.len(), 240 - 30);
        assert_eq!(pruned[0], id(0));
    }

    #[test]
    fn the_newest_is_kept_and_each_period_keeps_its_newest() {
        let s = vec![
            Candidate {
                id: id(1),
                at: ts("2026-01-05T01:00:00Z"),
                scheduled: true,
            },
            Candidate {
                id: id(2),
                at: ts("2026-01-05T09:00:00Z"),
                scheduled: true,
            },
            Candidate {
                id: id(3),
                at: ts("2026-01-05T17:00:00Z"),
                scheduled: true,
            },
            Candidate {
                id: id(4),
                at: ts("2026-01-06T01:00:00Z"),
                scheduled: true,
            },
        ];
        let keep = Keep {
            daily: 1,
            ..Keep::default()
        };
        assert_eq!(to_prune(&s, &keep, &TimeZone::UTC), [id(1), id(2), id(3)]);
        let keep = Keep {
            daily: 2,
            ..Keep::default()
        };
        assert_eq!(to_prune(&s, &keep, &TimeZone::UTC), [id(1), id(2)]);
        let keep = Keep {
            daily: 5,
            ..Keep::default()
        };
        assert_eq!(to_prune(&s, &keep, &TimeZone::UTC), [id(1), id(2)]);
    }

    #[test]
    fn weeks_are_iso_weeks_and_months_calendar_months() {
        // Daily snapshots for 70 days from Thursday 2026-01-01.
        let s = every("2026-01-01T12:00:00Z", SignedDuration::from_hours(24), 70);
        let weekly = kept_times(
            &s,
            &Keep {
                weekly: 3,
                ..Keep::default()
            },
            &TimeZone::UTC,
        );
        // The last is Wednesday 2026-03-11; the Sundays before end weeks.
        assert_eq!(
            weekly,
            [
                "2026-03-01T12:00:00Z",
                "2026-03-08T12:00:00Z",
                "2026-03-11T12:00:00Z"
            ]
        );
        let monthly = kept_times(
            &s,
            &Keep {
                monthly: 12,
                ..Keep::default()
            },
            &TimeZone::UTC,
        );
        assert_eq!(
            monthly,
            [
                "2026-01-31T12:00:00Z",
                "2026-02-28T12:00:00Z",
                "2026-03-11T12:00:00Z"
            ]
        );
        // ISO week 53 of 2026 runs into 2027: one week, one snapshot.
        let s = every("2026-12-28T12:00:00Z", SignedDuration::from_hours(24), 8);
        let weekly = kept_times(
            &s,
            &Keep {
                weekly: 2,
                ..Keep::default()
            },
            &TimeZone::UTC,
        );
        assert_eq!(weekly, ["2027-01-03T12:00:00Z", "2027-01-04T12:00:00Z"]);
    }

    #[test]
    fn periods_are_local() {
        // 23:30 UTC is the next day in Berlin (UTC+1 in January).
        let berlin = jiff::tz::db().get("Europe/Berlin").unwrap();
        let s = vec![
            Candidate {
                id: id(1),
                at: ts("2026-01-05T22:30:00Z"),
                scheduled: true,
            },
            Candidate {
                id: id(2),
                at: ts("2026-01-05T23:30:00Z"),
                scheduled: true,
            },
            Candidate {
                id: id(3),
                at: ts("2026-01-06T12:00:00Z"),
                scheduled: true,
            },
        ];
        let keep = Keep {
            daily: 2,
            ..Keep::default()
        };
        assert_eq!(to_prune(&s, &keep, &TimeZone::UTC), [id(1)]);
        assert_eq!(to_prune(&s, &keep, &berlin), [id(2)]);
    }

    #[test]
    fn downtime_does_not_prune_history() {
        // Daily for 10 days, then the daemon is off for 30 days, then one.
        let mut s = every("2026-01-01T00:00:00Z", SignedDuration::from_hours(24), 10);
        s.push(Candidate {
            id: id(100),
            at: ts("2026-02-10T00:00:00Z"),
            scheduled: true,
        });
        let keep = Keep {
            daily: 7,
            ..Keep::default()
        };
        let kept = kept_times(&s, &keep, &TimeZone::UTC);
        assert_eq!(kept.len(), 7);
        assert_eq!(kept[0], "2026-01-05T00:00:00Z");
    }

    #[test]
    fn the_newest_scheduled_one_is_kept_among_api_snapshots() {
        let s = vec![
            Candidate {
                id: id(1),
                at: ts("2026-01-05T01:00:00Z"),
                scheduled: true,
            },
            Candidate {
                id: id(2),
                at: ts("2026-01-05T01:10:00Z"),
                scheduled: false,
            },
            Candidate {
                id: id(3),
                at: ts("2026-01-05T01:20:00Z"),
                scheduled: false,
            },
        ];
        let keep = Keep {
            hourly: 1,
            ..Keep::default()
        };
        assert_eq!(to_prune(&s, &keep, &TimeZone::UTC), [id(2)]);
    }

    #[test]
    fn display() {
        assert_eq!(Keep::default().to_string(), "all");
        let k = Keep {
            hourly: 24,
            monthly: 12,
            ..Keep::default()
        };
        assert_eq!(k.to_string(), "hourly=24,monthly=12");
    }

    fn arb_snaps() -> impl Strategy<Value = Vec<Candidate>> {
        // Up to 60 snapshots within about 400 days, some at the same instant.
        prop::collection::vec((0i64..400 * 24 * 6, any::<bool>()), 1..60).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (tenmin, scheduled))| Candidate {
                    id: id(i as u128),
                    at: ts("2026-01-01T00:00:00Z")
                        .checked_add(SignedDuration::from_mins(10 * tenmin))
                        .unwrap(),
                    scheduled,
                })
                .collect()
        })
    }

    fn arb_keep() -> impl Strategy<Value = Keep> {
        (0u32..30, 0u32..10, 0u32..6, 0u32..14).prop_map(|(hourly, daily, weekly, monthly)| Keep {
            hourly,
            daily,
            weekly,
            monthly,
        })
    }

    proptest! {
        /// Pruning again what pruning kept removes nothing more; the answer
        /// does not depend on the order; the newest and the newest
        /// scheduled ones stay; each rule's periods each keep one.
        #[test]
        fn pruning_is_stable(snaps in arb_snaps(), keep in arb_keep(), rot in 0usize..60) {
            let tz = jiff::tz::TimeZone::UTC;
            let pruned: BTreeSet<Uuid> = to_prune(&snaps, &keep, &tz).into_iter().collect();
            let mut rotated = snaps.clone();
            let r = rot % rotated.len();
            rotated.rotate_left(r);
            let again: BTreeSet<Uuid> = to_prune(&rotated, &keep, &tz).into_iter().collect();
            prop_assert_eq!(&pruned, &again);
            let left: Vec<Candidate> = snaps.iter().filter(|s| !pruned.contains(&s.id)).copied().collect();
            prop_assert!(to_prune(&left, &keep, &tz).is_empty());
            if keep.is_empty() {
                prop_assert!(pruned.is_empty());
                return Ok(());
            }
            let newest = snaps.iter().max_by(|a, b| a.at.cmp(&b.at).then(a.id.cmp(&b.id))).unwrap();
            prop_assert!(!pruned.contains(&newest.id));
            if let Some(ns) = snaps.iter().filter(|s| s.scheduled).max_by(|a, b| a.at.cmp(&b.at).then(a.id.cmp(&b.id))) {
                prop_assert!(!pruned.contains(&ns.id));
            }
            // Each of the `daily` newest days with a snapshot keeps exactly
            // its newest snapshot (plus possibly ones other rules keep).
            let mut days: Vec<(i32, i32, i32, i32)> = snaps.iter().map(|s| bucket(Period::Day, s.at, &tz)).collect();
            days.sort();
            days.dedup();
            days.reverse();
            for day in days.iter().take(keep.daily as usize) {
                let newest_of_day = snaps
                    .iter()
                    .filter(|s| bucket(Period::Day, s.at, &tz) == *day)
                    .max_by(|a, b| a.at.cmp(&b.at).then(a.id.cmp(&b.id)))
                    .unwrap();
                prop_assert!(!pruned.contains(&newest_of_day.id));
            }
            // Nothing is kept without a reason.
            let kept = snaps.len() - pruned.len();
            let bound = 2 + (keep.hourly + keep.daily + keep.weekly + keep.monthly) as usize;
            prop_assert!(kept <= bound, "kept {} > {}", kept, bound);
        }
    }
}
