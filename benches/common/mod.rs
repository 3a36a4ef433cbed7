//! What the benches share: device setup, event timing of bursts of launches (the warm-up, the
//! median of event-timed windows, the copy baseline timed in the same run, the criterion groups),
//! the rows in the JSON-lines schema of `benches/peers/`, UTC dates, environment knobs and GB/s.
#![allow(dead_code)]

use std::fmt::{Display, Write as _};
use std::fs::File;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use dropfuse::cudarc::driver::sys::CUevent_flags;
use dropfuse::cudarc::driver::{CudaEvent, CudaSlice};
use dropfuse::{Device, Element, Error};

/// Burst timing: launches per event-timed window, windows (the median is reported), and launches
/// before a kernel's first window (clocks, caches, first-launch costs).
pub const LAUNCHES: u64 = 10;
pub const REPEATS: usize = 20;
pub const WARMUP: u64 = 5;

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

    /// Prints `row`'s text line and appends its JSON line to `DROPFUSE_BENCH_JSON` when set.
    pub fn row(&mut self, row: &Row) {
        let json = row.json(&self.meta);
        self.emit(&row.text(), &json);
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

/// Device 0 and the rows' output for the `family` benches, with cudarc's event tracking off; `None`
/// after printing `SKIPPED: <family> benches: no CUDA device (...)` when there is no device.
///
/// cudarc tracks every buffer's reads and writes with CUDA events once a context has a non-default
/// stream (as `Device::new` creates): each safe call then adds a cuStreamWaitEvent per buffer before
/// the launch and a cuEventRecord per buffer after it (dropout's forward with a mask: 5 waits,
/// 3 records, each with a context check), host time that dominates small kernels' launch rate. The
/// benches run everything on the one stream, in order, so that tracking protects nothing. It only
/// applies to buffers allocated after this call.
///
/// # Safety
///
/// Every buffer allocated on the device's context after this call (by the caller, or by dropfuse
/// objects on its behalf: workspaces, accumulators, routing tables) must be allocated, used and
/// freed on `dev.stream()` alone: an untracked buffer allocated on another stream may be used
/// before its (stream-ordered) allocation and zeroing finish, or freed while still in use.
pub unsafe fn device(family: &str) -> Option<(Device, Output)> {
    if dropfuse::HOST_EMULATION {
        println!(
            "SKIPPED: {family} benches: this is the host-emulation build (DROPFUSE_HOST_EMULATION): \
             its timings would mean nothing"
        );
        return None;
    }
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("SKIPPED: {family} benches: no CUDA device ({e})");
            return None;
        }
    };
    // SAFETY: the caller's contract.
    unsafe { dev.context().disable_event_tracking() };
    let gpu = dev.name().unwrap_or_else(|_| "unknown GPU".to_string());
    Some((dev, Output::new(gpu)))
}

/// Elements of the value pattern [`filled`] uploads once and copies over its buffer.
pub const PATTERN_LEN: usize = 1 << 20;

/// `n` elements on `dev`: the pattern `value(i)` of the first `min(n, PATTERN_LEN)` indices,
/// uploaded once and repeated by device copies, so no host buffer of `n` elements is needed.
pub fn filled<T: Element>(
    dev: &Device,
    n: usize,
    value: impl Fn(usize) -> f32,
) -> Result<CudaSlice<T>, Error> {
    let pattern: Vec<T> = (0..PATTERN_LEN.min(n)).map(|i| T::from_f32(value(i))).collect();
    let pattern = dev.upload(&pattern)?;
    let mut d = dev.zeros::<T>(n)?;
    for start in (0..n).step_by(pattern.len()) {
        let len = pattern.len().min(n - start);
        dev.stream()
            .memcpy_dtod(&pattern.slice(..len), &mut d.slice_mut(start..start + len))
            .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e))?;
    }
    Ok(d)
}

/// A pair of CUDA events (created once, with timing enabled, and re-recorded) on the device's
/// stream.
pub struct Timer {
    pub dev: Device,
    start: CudaEvent,
    end: CudaEvent,
}

impl Timer {
    pub fn new(dev: &Device) -> Result<Self, Error> {
        // `None` would create events with timing disabled.
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let ev = |e| Error::driver("cuEventCreate", e);
        Ok(Timer {
            dev: dev.clone(),
            start: dev.context().new_event(flags).map_err(ev)?,
            end: dev.context().new_event(flags).map_err(ev)?,
        })
    }

    /// Records the start event.
    pub fn start(&self) -> Result<(), Error> {
        self.start
            .record(self.dev.stream())
            .map_err(|e| Error::driver("cuEventRecord", e))
    }

    /// Records the end event and returns the GPU time since the start event (waits for both).
    pub fn stop(&self) -> Result<Duration, Error> {
        self.end
            .record(self.dev.stream())
            .map_err(|e| Error::driver("cuEventRecord", e))?;
        let ms = self
            .start
            .elapsed_ms(&self.end)
            .map_err(|e| Error::driver("cuEventElapsedTime", e))?;
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }
}

/// A bench's kernels, their launches and their rows; the provided methods time them.
pub trait Burst {
    type Kernel: Copy + PartialEq;

    fn timer(&self) -> &Timer;

    /// Enqueues one launch of `k` (no synchronization).
    fn launch(&mut self, k: Self::Kernel) -> Result<(), Error>;

    /// `k`'s row without its timing: kernel name, dtype, `n`, bytes, shape, parameters.
    fn row(&self, k: Self::Kernel) -> Row;

    /// GPU time of `launches` back-to-back launches of `k` (CUDA events).
    fn time(&mut self, k: Self::Kernel, launches: u64) -> Result<Duration, Error> {
        self.timer().start()?;
        for _ in 0..launches {
            self.launch(k)?;
        }
        self.timer().stop()
    }

    /// Milliseconds per launch of `launches` launches.
    fn ms_per_launch(&mut self, k: Self::Kernel, launches: u64) -> Result<f64, Error> {
        Ok(self.time(k, launches)?.as_secs_f64() * 1e3 / launches as f64)
    }

    /// Median milliseconds per launch over `repeats` timings of `launches` launches (no warm-up).
    fn median_ms(&mut self, k: Self::Kernel, launches: u64, repeats: usize) -> Result<f64, Error> {
        let mut ms = (0..repeats)
            .map(|_| self.ms_per_launch(k, launches))
            .collect::<Result<Vec<f64>, Error>>()?;
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    }

    /// `WARMUP` launches, untimed.
    fn warm_up(&mut self, k: Self::Kernel) -> Result<(), Error> {
        self.time(k, WARMUP).map(drop)
    }

    /// Burst timing: the warm-up, then the median of `REPEATS` windows of `LAUNCHES` launches.
    fn burst_ms(&mut self, k: Self::Kernel) -> Result<f64, Error> {
        self.warm_up(k)?;
        self.median_ms(k, LAUNCHES, REPEATS)
    }

    /// [`Burst::burst_ms`] in a row.
    fn burst_row(&mut self, k: Self::Kernel) -> Result<Row, Error> {
        let ms = self.burst_ms(k)?;
        Ok(self.row(k).burst(ms))
    }
}

/// Times `copy` (the bandwidth baseline) with `measure`, emits its row (its own baseline), then
/// times and emits every other kernel of `kernels`, in order, against the copy. `what` names the
/// rows in panic messages.
pub fn rows_against_copy<B: Burst>(
    out: &mut Output,
    b: &mut B,
    what: &str,
    copy: B::Kernel,
    kernels: &[B::Kernel],
    mut measure: impl FnMut(&mut B, B::Kernel) -> Result<Row, Error>,
) {
    let mut time = |b: &mut B, k| measure(b, k).unwrap_or_else(|e| panic!("{what} {}: {e}", b.row(k).kernel));
    let copy_row = time(b, copy);
    let baseline = (copy_row.ms, copy_row.bytes);
    out.row(&copy_row.baseline(baseline));
    for &k in kernels.iter().filter(|&&k| k != copy) {
        let row = time(b, k);
        out.row(&row.baseline(baseline));
    }
}

/// [`rows_against_copy`] with burst timing.
pub fn burst_rows<B: Burst>(out: &mut Output, b: &mut B, what: &str, copy: B::Kernel, kernels: &[B::Kernel]) {
    rows_against_copy(out, b, what, copy, kernels, B::burst_row);
}

/// Registers `kernels` with criterion as the group `name` (10 samples, 0.3 s warm-up, 1 s
/// measurement), each timed with [`Burst::time`].
pub fn group<B: Burst>(c: &mut Criterion, name: String, b: &mut B, kernels: &[B::Kernel]) {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1000));
    register(&mut group, b, kernels);
    group.finish();
}

/// Adds `kernels` to `group`: throughput their bytes, timed with [`Burst::time`].
pub fn register<B: Burst>(group: &mut BenchmarkGroup<'_, WallTime>, b: &mut B, kernels: &[B::Kernel]) {
    for &k in kernels {
        let row = b.row(k);
        group.throughput(Throughput::Bytes(row.bytes));
        group.bench_function(row.kernel.clone(), |bencher| {
            bencher.iter_custom(|iters| b.time(k, iters).unwrap_or_else(|e| panic!("{}: {e}", row.kernel)))
        });
    }
}

/// One row: a text line (`DROPFUSE_BENCH key=value ...`) and a JSON line in the schema of
/// `benches/peers/`, with the keys in this order: `impl` (`copy` for the copy, else `dropfuse`),
/// `kernel`, `dtype`, `n`, `shape` (when given), the [`Row::param`]s, `method`, `launches`,
/// `repeats`, `ms`, `bytes`, `gbps`, `copy_ms`, `copy_gbps`, `copy_fraction` (`null` without a
/// [`Row::baseline`]), the [`Row::extra`]s, `gpu`, `date`, `commit`, `side`.
#[derive(Debug, Clone)]
pub struct Row {
    pub kernel: String,
    pub dtype: &'static str,
    pub n: usize,
    /// Bytes one launch reads plus writes.
    pub bytes: u64,
    pub shape: Option<String>,
    /// JSON fields after `shape`: key and JSON value.
    pub params: Vec<(&'static str, String)>,
    pub method: &'static str,
    pub launches: u64,
    pub repeats: usize,
    /// Median milliseconds per launch.
    pub ms: f64,
    /// The copy's milliseconds and bytes.
    pub copy: Option<(f64, u64)>,
    /// Text fields at the end of the text line: key and value.
    pub notes: Vec<(&'static str, String)>,
    /// JSON fields after `copy_fraction`: key and JSON value.
    pub extras: Vec<(&'static str, String)>,
}

impl Row {
    /// An untimed row (burst method, `ms` NaN) of `kernel`.
    pub fn new(kernel: impl Into<String>, dtype: &'static str, n: usize, bytes: u64) -> Self {
        Row {
            kernel: kernel.into(),
            dtype,
            n,
            bytes,
            shape: None,
            params: Vec::new(),
            method: "burst",
            launches: LAUNCHES,
            repeats: REPEATS,
            ms: f64::NAN,
            copy: None,
            notes: Vec::new(),
            extras: Vec::new(),
        }
    }

    pub fn shape(mut self, shape: impl Into<String>) -> Self {
        self.shape = Some(shape.into());
        self
    }

    /// A JSON field after `shape` (`value` written as it displays: a number or `true`/`false`).
    pub fn param(mut self, key: &'static str, value: impl Display) -> Self {
        self.params.push((key, value.to_string()));
        self
    }

    /// A field at the end of the text line.
    pub fn note(mut self, key: &'static str, value: impl Display) -> Self {
        self.notes.push((key, value.to_string()));
        self
    }

    /// A JSON field after `copy_fraction` (`value` already JSON).
    pub fn extra(mut self, key: &'static str, value: impl Display) -> Self {
        self.extras.push((key, value.to_string()));
        self
    }

    /// Timed by `method` with `repeats` windows of `launches` launches: `ms` per launch.
    pub fn timed(mut self, method: &'static str, launches: u64, repeats: usize, ms: f64) -> Self {
        (self.method, self.launches, self.repeats, self.ms) = (method, launches, repeats, ms);
        self
    }

    /// Burst timing (`REPEATS` windows of `LAUNCHES` launches): `ms` per launch.
    pub fn burst(self, ms: f64) -> Self {
        self.timed("burst", LAUNCHES, REPEATS, ms)
    }

    /// Against the copy's `(ms, bytes)`, timed in the same run.
    pub fn baseline(mut self, copy: (f64, u64)) -> Self {
        self.copy = Some(copy);
        self
    }

    pub fn gbps(&self) -> f64 {
        gbps(self.bytes, self.ms)
    }

    /// The copy's GB/s and the row's fraction of it.
    fn copy_gbps_fraction(&self) -> Option<(f64, f64, f64)> {
        self.copy.map(|(copy_ms, copy_bytes)| {
            let copy_gbps = gbps(copy_bytes, copy_ms);
            (copy_ms, copy_gbps, self.gbps() / copy_gbps)
        })
    }

    /// The greppable stdout line.
    pub fn text(&self) -> String {
        let mut s = format!(
            "DROPFUSE_BENCH method={} kernel={} dtype={} n={}",
            self.method, self.kernel, self.dtype, self.n
        );
        if let Some(shape) = &self.shape {
            let _ = write!(s, " shape={shape}");
        }
        let _ = write!(
            s,
            " ms={:.5} bytes={} gbps={:.1}",
            self.ms,
            self.bytes,
            self.gbps()
        );
        if let Some((copy_ms, copy_gbps, frac)) = self.copy_gbps_fraction() {
            let _ = write!(
                s,
                " copy_ms={copy_ms:.5} copy_gbps={copy_gbps:.1} copy_fraction={frac:.3}"
            );
        }
        for (key, value) in &self.notes {
            let _ = write!(s, " {key}={value}");
        }
        s
    }

    /// The JSON line (one object).
    pub fn json(&self, meta: &Meta) -> String {
        let mut s = format!(
            "{{\"impl\":\"{}\",\"kernel\":\"{}\",\"dtype\":\"{}\",\"n\":{}",
            if self.kernel == "copy" { "copy" } else { "dropfuse" },
            json_escape(&self.kernel),
            json_escape(self.dtype),
            self.n,
        );
        if let Some(shape) = &self.shape {
            let _ = write!(s, ",\"shape\":\"{}\"", json_escape(shape));
        }
        for (key, value) in &self.params {
            let _ = write!(s, ",\"{key}\":{value}");
        }
        let _ = write!(
            s,
            ",\"method\":\"{}\",\"launches\":{},\"repeats\":{},\"ms\":{},\"bytes\":{},\"gbps\":{}",
            self.method,
            self.launches,
            self.repeats,
            json_num(self.ms, 7),
            self.bytes,
            json_num(self.gbps(), 3),
        );
        let _ = match self.copy_gbps_fraction() {
            Some((copy_ms, copy_gbps, frac)) => write!(
                s,
                ",\"copy_ms\":{},\"copy_gbps\":{},\"copy_fraction\":{}",
                json_num(copy_ms, 7),
                json_num(copy_gbps, 3),
                json_num(frac, 5),
            ),
            None => write!(s, ",\"copy_ms\":null,\"copy_gbps\":null,\"copy_fraction\":null"),
        };
        for (key, value) in &self.extras {
            let _ = write!(s, ",\"{key}\":{value}");
        }
        let _ = write!(
            s,
            ",\"gpu\":\"{}\",\"date\":\"{}\",\"commit\":\"{}\",\"side\":\"dropfuse\"}}",
            json_escape(&meta.gpu),
            meta.date,
            json_escape(&meta.commit),
        );
        s
    }
}
