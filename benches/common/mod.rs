//! What the benches share: the JSON-lines output in the schema of `benches/peers/`, UTC dates,
//! environment knobs and GB/s.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// GB/s (10^9 bytes per second) of `bytes` moved in `ms`.
pub fn gbps(bytes: u64, ms: f64) -> f64 {
    bytes as f64 / ms / 1e6
}

/// A JSON number with `decimals` decimals (`null` when not finite, which JSON cannot express).
pub fn json_num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "null".to_string()
    }
}

pub fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// The run's fields common to every JSON row.
pub struct Meta {
    pub gpu: String,
    /// UTC, `YYYY-MM-DD`.
    pub date: String,
    pub commit: String,
}

/// `YYYY-MM-DD` of the UTC day `secs` seconds after the Unix epoch (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian).
pub fn utc_date(secs: u64) -> String {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of the 400-year era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year, 0..=365
    let mp = (5 * doy + 2) / 153; // March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Where rows go: stdout, and `DROPFUSE_BENCH_JSON` when set.
pub struct Output {
    pub meta: Meta,
    json: Option<File>,
}

impl Output {
    pub fn new(gpu: String) -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let commit = std::env::var("DROPFUSE_COMMIT")
            .ok()
            .filter(|c| !c.trim().is_empty())
            .unwrap_or_else(|| "unknown".to_string());
        let json = std::env::var_os("DROPFUSE_BENCH_JSON").and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| eprintln!("cannot open DROPFUSE_BENCH_JSON={path:?}: {e}"))
                .ok()
        });
        Output {
            meta: Meta {
                gpu,
                date: utc_date(secs),
                commit,
            },
            json,
        }
    }

    /// Prints `text` and appends `json` (one JSON object) to `DROPFUSE_BENCH_JSON` when set.
    pub fn emit(&mut self, text: &str, json: &str) {
        println!("{text}");
        if let Some(file) = self.json.as_mut() {
            if let Err(e) = writeln!(file, "{json}") {
                eprintln!("cannot write DROPFUSE_BENCH_JSON: {e}");
            }
        }
    }
}

/// A log2 size from the environment variable `name`, `default` when unset or out of `range`.
pub fn env_log2(name: &str, default: u32, range: std::ops::RangeInclusive<u32>) -> u32 {
    match std::env::var(name) {
        Ok(s) => match s.trim().parse::<u32>() {
            Ok(v) if range.contains(&v) => v,
            _ => {
                eprintln!(
                    "{name}={s:?} is not a log2 size in {}..={}: using {default}",
                    range.start(),
                    range.end()
                );
                default
            }
        },
        Err(_) => default,
    }
}
