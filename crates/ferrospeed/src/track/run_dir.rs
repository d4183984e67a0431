//! Run directories: picking a fresh, time-stamped name and writing the JSON files that live in one.

use super::TrackError;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Returns `base/<stem>-<YYYYmmdd-HHMMSS>` for the current UTC time, with `-2`, `-3`, … appended if that
/// path already exists, so two runs started in the same second still get separate directories.
/// Creates nothing: [`super::Tracker::create`] does, and refuses a directory that already holds a run.
pub fn fresh_run_dir(base: &Path, stem: &str) -> PathBuf {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let name = run_dir_name(stem, secs);
    let first = base.join(&name);
    if !first.exists() {
        return first;
    }
    let mut suffix: u64 = 2;
    loop {
        let candidate = base.join(format!("{name}-{suffix}"));
        if !candidate.exists() {
            return candidate;
        }
        suffix += 1;
    }
}

/// `<stem>-<YYYYmmdd-HHMMSS>` for `unix_secs` seconds after the epoch, in UTC.
fn run_dir_name(stem: &str, unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    format!("{stem}-{year:04}{month:02}{day:02}-{hour:02}{minute:02}{second:02}")
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day).
///
/// Howard Hinnant's `civil_from_days`: shift the year to start in March so the leap day is the last day
/// of the year, then split days into 400-year eras (146097 days each), years within the era, and months
/// of 153 days per five. Exact for every date, with no tables and no crate.
fn civil_from_days(days_since_epoch: u64) -> (u64, u32, u32) {
    let z = days_since_epoch + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u32;
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Writes `value` as pretty JSON to `path` through a temporary file and a rename, so readers see either
/// the whole file or none of it, never a half-written one.
pub(super) fn write_json_pretty(path: &Path, value: &serde_json::Value) -> Result<(), TrackError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|source| TrackError::Json { path: path.to_path_buf(), source })?;
    text.push('\n');
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let write = |p: &Path| -> std::io::Result<()> {
        let mut file = File::create(p)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()
    };
    write(&tmp).map_err(|source| TrackError::Write { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, path).map_err(|source| TrackError::Write { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_days() {
        for (days, expect) in [
            (0, (1970, 1, 1)),
            (59, (1970, 3, 1)),
            (11_016, (2000, 2, 29)),  // leap day of a year divisible by 400
            (11_017, (2000, 3, 1)),
            (19_675, (2023, 11, 14)), // 1_700_000_000 s
            (47_540, (2100, 2, 28)), // 2100 is not a leap year: Feb 28 is followed by Mar 1
            (47_541, (2100, 3, 1)),
        ] {
            assert_eq!(civil_from_days(days), expect, "days {days}");
        }
    }

    #[test]
    fn run_dir_name_formats_utc_timestamp() {
        assert_eq!(run_dir_name("gpt2", 0), "gpt2-19700101-000000");
        assert_eq!(run_dir_name("gpt2", 1_700_000_000), "gpt2-20231114-221320");
        assert_eq!(run_dir_name("run", 951_868_799), "run-20000229-235959");
    }

    #[test]
    fn fresh_run_dir_skips_existing_names() {
        let base = tempfile::tempdir().unwrap();
        let first = fresh_run_dir(base.path(), "exp");
        assert_eq!(first.parent(), Some(base.path()));
        let name = first.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("exp-") && name.len() == "exp-YYYYmmdd-HHMMSS".len(), "{name}");

        // Occupy the name (and its first suffix) and ask again within the same second, as a second run
        // started right after the first would. If the clock ticked meanwhile, a new unsuffixed name is fine.
        std::fs::create_dir(&first).unwrap();
        std::fs::create_dir(base.path().join(format!("{name}-2"))).unwrap();
        let next = fresh_run_dir(base.path(), "exp");
        assert!(!next.exists());
        let next_name = next.file_name().unwrap().to_str().unwrap();
        if next_name.starts_with(&name) {
            assert_eq!(next_name, format!("{name}-3"));
        }
    }

    #[test]
    fn json_files_are_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let value = serde_json::json!({"model": {"n_layer": 12}, "lr": 3e-4});
        write_json_pretty(&path, &value).unwrap();
        let back: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, value);
        assert!(!dir.path().join("config.json.tmp").exists());
    }
}
