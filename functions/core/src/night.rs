//! The night: when a run must be done by. A run opens at the night's start
//! (EventBridge Scheduler's cron in the stack's time zone, or the button)
//! and its deadline is the next `NightEnd` on the wall clock of that zone,
//! daylight-saving changes included.

use chrono::{DateTime, Days, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NightWindow {
    /// Local time the night's work must be done by.
    pub end: NaiveTime,
    pub timezone: Tz,
}

impl NightWindow {
    /// `end` as `HH:MM`, `timezone` an IANA name (`Europe/London`).
    pub fn parse(end: &str, timezone: &str) -> Result<Self, String> {
        let end = NaiveTime::parse_from_str(end, "%H:%M")
            .map_err(|_| format!("{end:?} is not a time of day (HH:MM)"))?;
        let timezone = timezone
            .parse::<Tz>()
            .map_err(|_| format!("{timezone:?} is not an IANA time zone"))?;
        Ok(Self { end, timezone })
    }

    /// The deadline of a run opened at `opened_at`: the first `end` on the
    /// zone's wall clock after it. An `end` that a clock change skips (a
    /// spring-forward gap) is the first instant after the gap; one it
    /// repeats is its first occurrence.
    pub fn deadline(&self, opened_at: DateTime<Utc>) -> DateTime<Utc> {
        let local_day = opened_at.with_timezone(&self.timezone).date_naive();
        (0..=2)
            .filter_map(|days| local_day.checked_add_days(Days::new(days)))
            .filter_map(|day| self.instant(day.and_time(self.end)))
            .find(|candidate| *candidate > opened_at)
            .unwrap_or(opened_at)
    }

    fn instant(&self, local: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
        let zone = &self.timezone;
        zone.from_local_datetime(&local)
            .earliest()
            // In a gap, the same wall-clock reading an hour on exists.
            .or_else(|| {
                zone.from_local_datetime(&(local + chrono::Duration::hours(1)))
                    .earliest()
            })
            .map(|t| t.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn london() -> NightWindow {
        NightWindow::parse("06:00", "Europe/London").unwrap()
    }

    #[test]
    fn a_night_opened_in_the_evening_ends_the_next_morning() {
        // 22:00 BST is 21:00 UTC; 06:00 BST the next morning is 05:00 UTC.
        assert_eq!(
            london().deadline(at("2026-07-01T21:00:00Z")),
            at("2026-07-02T05:00:00Z")
        );
        // Opened after midnight: the same morning.
        assert_eq!(
            london().deadline(at("2026-07-02T00:30:00Z")),
            at("2026-07-02T05:00:00Z")
        );
    }

    #[test]
    fn deadlines_follow_the_wall_clock_across_daylight_saving_changes() {
        // Clocks go back on 25 October 2026: opened at 22:00 BST, due at 06:00 GMT.
        assert_eq!(
            london().deadline(at("2026-10-24T21:00:00Z")),
            at("2026-10-25T06:00:00Z")
        );
        // Clocks go forward on 29 March 2026: opened at 22:00 GMT, due at 06:00 BST.
        assert_eq!(
            london().deadline(at("2026-03-28T22:00:00Z")),
            at("2026-03-29T05:00:00Z")
        );
    }

    #[test]
    fn an_end_the_clock_skips_is_the_first_instant_after_the_gap() {
        let night = NightWindow::parse("01:30", "Europe/London").unwrap();
        // 01:30 does not exist on 29 March 2026 in London: 02:30 BST = 01:30 UTC.
        assert_eq!(
            night.deadline(at("2026-03-28T22:00:00Z")),
            at("2026-03-29T01:30:00Z")
        );
    }

    #[test]
    fn bad_settings_are_named() {
        assert!(
            NightWindow::parse("6am", "Europe/London")
                .unwrap_err()
                .contains("6am")
        );
        assert!(
            NightWindow::parse("06:00", "Mars/Olympus")
                .unwrap_err()
                .contains("Mars")
        );
    }
}
