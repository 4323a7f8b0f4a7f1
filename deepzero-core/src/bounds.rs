//! Sizes taken from settings are checked before anything is allocated.
//!
//! A setting such as the number of RGE directions decides how much memory a step holds. An
//! absurd value must be an error that names the setting, not a `capacity overflow` panic or an
//! allocation abort minutes into a run: [`check_memory`] compares what `count` items of
//! `bytes_each` bytes need with the memory the machine has available now.

use crate::error::{Error, Result, Setting};

/// Bytes of memory available to a new allocation now (Linux: `MemAvailable` of
/// `/proc/meminfo`); `None` where the system does not say.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Check that `count` items of `bytes_each` bytes (`what`: "direction seeds") fit into memory;
/// the error names `setting` and the sizes.
pub fn check_memory(setting: Setting, count: usize, bytes_each: usize, what: &str) -> Result<()> {
    check_memory_within(setting, count, bytes_each, what, available_memory())
}

/// [`check_memory`] against `available` bytes (`None`: only the address space bounds it).
pub fn check_memory_within(
    setting: Setting,
    count: usize,
    bytes_each: usize,
    what: &str,
    available: Option<u64>,
) -> Result<()> {
    let limit = available
        .unwrap_or(isize::MAX as u64)
        .min(isize::MAX as u64);
    let needed = (count as u128) * (bytes_each as u128);
    if needed > limit as u128 {
        let have = match available {
            Some(a) => format!("{} of memory are available", human_bytes(a as u128)),
            None => "no allocation can be that large".into(),
        };
        return Err(Error::invalid(
            setting,
            format!(
                "is {count}: its {what} would need {}, but {have}; use a smaller value",
                human_bytes(needed)
            ),
        ));
    }
    Ok(())
}

/// `1.5 GiB`-style sizes.
pub fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_beyond_memory_or_address_space_are_errors_naming_the_setting() {
        let gib = 1u64 << 30;
        check_memory_within(Setting::Directions, 1000, 8, "seeds", Some(gib)).unwrap();
        let err = check_memory_within(Setting::Directions, 1 << 30, 8, "seeds", Some(gib))
            .unwrap_err()
            .to_string();
        assert!(err.contains("RGE directions"), "{err}");
        assert!(err.contains("8.0 GiB") && err.contains("1.0 GiB"), "{err}");
        // usize::MAX items would overflow a byte count in usize: still an error, not a panic.
        let err = check_memory_within(Setting::Directions, usize::MAX, 8, "seeds", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no allocation can be that large"), "{err}");
    }

    #[test]
    fn available_memory_is_positive_where_known() {
        if let Some(m) = available_memory() {
            assert!(m > 0);
        }
    }

    #[test]
    fn human_bytes_picks_the_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
