//! Schedules: which instants are a job's slots.
//!
//! A slot is an instant on the schedule's grid, identical on every host of a
//! fleet: `every` slots are multiples of the interval since the Unix epoch (so a
//! 30 s job's slots are :00 and :30 on every host), cron slots are the
//! expression's matches in its time zone. Hosts only decide *when to look*; the
//! runner decides whether a slot is due by the database clock.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// When a job runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Every fixed interval, aligned to the Unix epoch.
    Every(Duration),
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

impl Schedule {
    /// The latest slot at or before `t`, if any.
    pub fn slot_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(every) => {
                let step = every.as_nanos() as i128;
                let now = t.timestamp_nanos_opt()? as i128;
                let slot = now.div_euclid(step) * step;
                Some(Utc.timestamp_nanos(i64::try_from(slot).ok()?))
            }
            Schedule::Cron(c) => c
                .cron
                .find_previous_occurrence(&t.with_timezone(&c.tz), true)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
        }
    }

    /// The first slot strictly after `t`, if any.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(every) => {
                let step = every.as_nanos() as i128;
                let now = t.timestamp_nanos_opt()? as i128;
                let slot = (now.div_euclid(step) + 1) * step;
                Some(Utc.timestamp_nanos(i64::try_from(slot).ok()?))
            }
            Schedule::Cron(c) => c
                .cron
                .find_next_occurrence(&t.with_timezone(&c.tz), false)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn every_is_aligned_to_the_epoch() {
        let s = Schedule::Every(Duration::from_secs(30));
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
        let ms = Schedule::Every(Duration::from_millis(250));
        assert_eq!(
            ms.next_after(at("2024-01-01T00:00:00.1Z")),
            Some(at("2024-01-01T00:00:00.25Z"))
        );
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
