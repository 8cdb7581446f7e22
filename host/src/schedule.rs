//! Schedules: which instants are a job's slots.
//!
//! A slot is an instant on the schedule's grid, identical on every host of a
//! fleet. `every` slots are `offset + k·every` since the Unix epoch; cron slots
//! are the expression's matches in its time zone. Hosts only decide *when to
//! look*; the runner decides whether a slot is due by the database clock.
//!
//! **Why an offset.** Aligned to the epoch alone, every job with the same
//! cadence fires at the same instant: a thousand `every = "1s"` jobs queue for
//! the pool at once each second and the last one starts hundreds of
//! milliseconds late. By default each job's grid is shifted by an offset
//! derived from its name ([`Schedule::spread_offset`]), the same on every host,
//! within `min(every, 1 min)`: the herd is spread out, and a job stays
//! predictable (an hourly job runs within the first minute of each hour, at
//! the same second every time). `offset = "0s"` in `jobs.toml` aligns a job to
//! the epoch (a 30 s job at :00 and :30); cron schedules are never shifted.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use sha2::{Digest, Sha256};

/// The widest default spread of `every` grids (see the module docs).
pub const MAX_SPREAD: Duration = Duration::from_secs(60);

/// When a job runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Every `period`, `offset` past each multiple of `period` since the Unix
    /// epoch (`offset < period`).
    Every {
        /// The cadence.
        period: Duration,
        /// Where the grid sits within a period.
        offset: Duration,
    },
    /// The matches of a cron expression.
    Cron(Box<CronSchedule>),
}

/// A parsed cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    text: String,
    cron: Cron,
    tz: chrono_tz::Tz,
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text && self.tz == other.tz
    }
}

impl CronSchedule {
    /// Parses a 5- or 6-field (with seconds) expression, in UTC.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(text)
            .map_err(|e| format!("invalid cron expression `{text}`: {e}"))?;
        Ok(Self {
            text: text.to_owned(),
            cron,
            tz: chrono_tz::UTC,
        })
    }

    /// The same expression evaluated in `tz`.
    pub fn in_zone(mut self, tz: chrono_tz::Tz) -> Self {
        self.tz = tz;
        self
    }
}

impl std::fmt::Display for Schedule {
    /// As `jobs.toml` would say it: `every 30s (offset 12.345s)`, `cron …`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Every { period, offset } => {
                write!(f, "every {}", humantime::format_duration(*period))?;
                if !offset.is_zero() {
                    write!(f, " (offset {})", humantime::format_duration(*offset))?;
                }
                Ok(())
            }
            Schedule::Cron(c) => write!(f, "cron `{}` ({})", c.text, c.tz),
        }
    }
}

impl Schedule {
    /// Every `period`, aligned to the Unix epoch (no offset).
    pub fn every(period: Duration) -> Self {
        Self::Every {
            period,
            offset: Duration::ZERO,
        }
    }

    /// The default offset of job `name`'s `every` grid: SHA-256 of the name,
    /// bytes 4..12 (the lock key uses 0..4), modulo `min(period, MAX_SPREAD)`,
    /// in whole milliseconds. Deterministic, so every host of a fleet computes
    /// the same slots; whole milliseconds, so a slot survives its round trip
    /// through Postgres (`timestamptz` keeps microseconds) unchanged.
    pub fn spread_offset(name: &str, period: Duration) -> Duration {
        let window = period.min(MAX_SPREAD).as_millis() as u64;
        if window == 0 {
            return Duration::ZERO;
        }
        let digest = Sha256::digest(name.as_bytes());
        let bits = u64::from_be_bytes(digest[4..12].try_into().expect("8 bytes"));
        Duration::from_millis(bits % window)
    }

    /// The latest slot at or before `t`, if any.
    pub fn slot_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every { period, offset } => grid(*period, *offset, t, 0),
            Schedule::Cron(c) => c
                .cron
                .find_previous_occurrence(&t.with_timezone(&c.tz), true)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
        }
    }

    /// The shortest time between two consecutive slots: the period of an
    /// `every` grid; for cron, the least gap among the next 256 matches after
    /// `from` (enough to see every gap of a daily or weekly pattern).
    pub fn min_gap(&self, from: DateTime<Utc>) -> Option<Duration> {
        match self {
            Schedule::Every { period, .. } => Some(*period),
            Schedule::Cron(_) => {
                let mut prev = self.next_after(from)?;
                let mut least: Option<Duration> = None;
                for _ in 0..256 {
                    let Some(next) = self.next_after(prev) else {
                        break;
                    };
                    let gap = (next - prev).to_std().unwrap_or(Duration::ZERO);
                    least = Some(least.map_or(gap, |l| l.min(gap)));
                    prev = next;
                }
                least
            }
        }
    }

    /// The first slot strictly after `t`, if any.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every { period, offset } => grid(*period, *offset, t, 1),
            Schedule::Cron(c) => c
                .cron
                .find_next_occurrence(&t.with_timezone(&c.tz), false)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
        }
    }
}

/// The grid point `steps` after the latest one at or before `t`.
fn grid(
    period: Duration,
    offset: Duration,
    t: DateTime<Utc>,
    steps: i128,
) -> Option<DateTime<Utc>> {
    let step = period.as_nanos() as i128;
    let offset = offset.as_nanos() as i128;
    let since = t.timestamp_nanos_opt()? as i128 - offset;
    let slot = (since.div_euclid(step) + steps) * step + offset;
    Some(Utc.timestamp_nanos(i64::try_from(slot).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn every_without_offset_is_aligned_to_the_epoch() {
        let s = Schedule::every(Duration::from_secs(30));
        assert_eq!(
            s.slot_at_or_before(at("2024-01-01T00:00:45Z")),
            Some(at("2024-01-01T00:00:30Z"))
        );
        assert_eq!(
            s.slot_at_or_before(at("2024-01-01T00:00:30Z")),
            Some(at("2024-01-01T00:00:30Z"))
        );
        assert_eq!(
            s.next_after(at("2024-01-01T00:00:30Z")),
            Some(at("2024-01-01T00:01:00Z"))
        );
        let ms = Schedule::every(Duration::from_millis(250));
        assert_eq!(
            ms.next_after(at("2024-01-01T00:00:00.1Z")),
            Some(at("2024-01-01T00:00:00.25Z"))
        );
    }

    #[test]
    fn an_offset_shifts_the_grid() {
        let s = Schedule::Every {
            period: Duration::from_secs(30),
            offset: Duration::from_secs(7),
        };
        assert_eq!(
            s.slot_at_or_before(at("2024-01-01T00:00:45Z")),
            Some(at("2024-01-01T00:00:37Z"))
        );
        assert_eq!(
            s.slot_at_or_before(at("2024-01-01T00:00:05Z")),
            Some(at("2023-12-31T23:59:37Z"))
        );
        assert_eq!(
            s.next_after(at("2024-01-01T00:00:37Z")),
            Some(at("2024-01-01T00:01:07Z"))
        );
    }

    #[test]
    fn spread_offsets_are_stable_bounded_and_spread() {
        let second = Duration::from_secs(1);
        // Pinned: a change would move every job's slots on a fleet upgrade.
        // Literal values (SHA-256 bytes 4..12 of the name, big-endian, modulo
        // the window in ms), computed outside this code.
        assert_eq!(
            Schedule::spread_offset("integrity-hash-retry", second),
            Duration::from_millis(687)
        );
        assert_eq!(
            Schedule::spread_offset("integrity-hash-retry", Duration::from_secs(30)),
            Duration::from_millis(23_687)
        );
        assert_eq!(
            Schedule::spread_offset("integrity-hash-retry", Duration::from_secs(3600)),
            Duration::from_millis(23_687)
        );
        // Within the period, and within MAX_SPREAD of long periods.
        let day = Duration::from_secs(86_400);
        for i in 0..200 {
            let name = format!("job-{i}");
            assert!(Schedule::spread_offset(&name, second) < second);
            assert!(Schedule::spread_offset(&name, day) < MAX_SPREAD);
        }
        // 1000 jobs at 1 s: no 10 ms bucket of the second holds more than a
        // few dozen of them (uniform would be 10 per bucket).
        let mut buckets = [0u32; 100];
        for i in 0..1000 {
            let off = Schedule::spread_offset(&format!("scale-{i}"), second);
            buckets[(off.as_millis() / 10) as usize] += 1;
        }
        assert!(buckets.iter().all(|n| *n < 30), "{buckets:?}");
    }

    #[test]
    fn cron_with_seconds_and_zone() {
        let s = Schedule::Cron(Box::new(CronSchedule::parse("*/10 * * * * *").unwrap()));
        assert_eq!(
            s.next_after(at("2024-01-01T00:00:05Z")),
            Some(at("2024-01-01T00:00:10Z"))
        );
        assert_eq!(
            s.slot_at_or_before(at("2024-01-01T00:00:15Z")),
            Some(at("2024-01-01T00:00:10Z"))
        );
        // 02:00 in Berlin is 01:00 UTC in winter.
        let berlin = Schedule::Cron(Box::new(
            CronSchedule::parse("0 0 2 * * *")
                .unwrap()
                .in_zone(chrono_tz::Europe::Berlin),
        ));
        assert_eq!(
            berlin.next_after(at("2024-01-01T00:00:00Z")),
            Some(at("2024-01-01T01:00:00Z"))
        );
    }

    #[test]
    fn invalid_cron_is_an_error() {
        assert!(CronSchedule::parse("61 * * * *").is_err());
        assert!(CronSchedule::parse("not cron").is_err());
    }
}
