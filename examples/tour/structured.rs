//! Structured dropout in the tour (`dropfuse::structured`): channel dropout (`Dropout2d`, every
//! kernel: mask, forward with and without the mask, in place, backward from the mask and
//! mask-free), then forward and backward of locked (variational) dropout, embedding-row dropout
//! and channels-last channel dropout (shared axes 1 and 2); decision masks and outputs bit for bit
//! against `dropfuse::reference::structured`.

use dropfuse::half::{bf16, f16};
use dropfuse::reference::structured as reference;
use dropfuse::{Device, Element, Generator, PhiloxState};

use crate::checks::structured::{self as check, Kind};
use crate::checks::Checks;
use crate::{
    download, element_mismatches, mask_mismatches, print_check_header, print_checks, push_rows, random_input,
    time_copy, time_ms, BoxResult, Family, Row, Scale,
};

pub const FAMILY: Family = Family { describe, gpu, cpu };

/// Drop probability.
const P: f64 = 0.1;

/// One layout of the tour.
struct Case {
    /// Prefix of the kernel names: `channel_2d`, `locked`, `embedding_rows`, `channels_last`.
    name: &'static str,
    kind: Kind,
    shape: &'static [usize],
    decision_offset: u64,
    /// Every kernel (else forward and backward from the mask only).
    all: bool,
}

/// The shapes scaled down for the CPU reference: channel dropout of 64 x 256 x 56 x 56
/// (f16) becomes 16 x 256 x 56 x 56 (12.8 M elements); the bench's locked 512 x 64 x 1024 becomes
/// 128 x 64 x 1024, the embedding 50257 x 1024 becomes 50257 x 256; channels-last 16 x 56 x 56 x 256.
fn cases(scale: Scale) -> Vec<Case> {
    let full = scale == Scale::Full;
    vec![
        Case {
            name: "channel_2d",
            kind: Kind::Channel,
            shape: if full { &[16, 256, 56, 56] } else { &[3, 8, 7, 9] },
            decision_offset: 0,
            all: true,
        },
        Case {
            name: "locked",
            kind: Kind::Locked(0),
            shape: if full { &[128, 64, 1024] } else { &[5, 3, 40] },
            decision_offset: 12345,
            all: false,
        },
        Case {
            name: "embedding_rows",
            kind: Kind::Rows,
            shape: if full { &[50257, 256] } else { &[37, 24] },
            decision_offset: 0,
            all: false,
        },
        Case {
            name: "channels_last",
            kind: Kind::Axes(vec![1, 2]),
            shape: if full { &[16, 56, 56, 256] } else { &[2, 5, 6, 8] },
            decision_offset: 0,
            all: false,
        },
    ]
}

impl Case {
    fn label(&self) -> String {
        let kind = match &self.kind {
            Kind::Channel => "channel (spatial axes shared)".to_string(),
            Kind::Locked(a) => format!("locked along axis {a}"),
            Kind::Rows => "one decision per row".to_string(),
            Kind::Axes(a) => format!("axes {a:?} shared"),
        };
        let offset = if self.decision_offset == 0 {
            String::new()
        } else {
            format!(", decision offset {}", self.decision_offset)
        };
        format!("{}: {:?}, {kind}{offset}", self.name, self.shape)
    }
}

fn describe(scale: Scale) -> Vec<String> {
    cases(scale)
        .iter()
        .map(|c| format!("structured dropout p = {P}: {}", c.label()))
        .collect()
}

fn gpu(dev: &Device, scale: Scale, rng: &mut Generator, rows: &mut Vec<Row>) -> BoxResult<()> {
    for (i, c) in cases(scale).iter().enumerate() {
        let seed = 50 + 3 * i as u64;
        gpu_case::<f16>(dev, c, rng.next(), seed, rows)?;
        gpu_case::<bf16>(dev, c, rng.next(), seed + 1, rows)?;
        gpu_case::<f32>(dev, c, rng.next(), seed + 2, rows)?;
    }
    Ok(())
}

fn gpu_case<T: Element>(
    dev: &Device,
    c: &Case,
    state: PhiloxState,
    seed: u64,
    rows: &mut Vec<Row>,
) -> BoxResult<()> {
    let s = dev.stream();
    let drop = c.kind.api(c.shape, P)?.with_decision_offset(c.decision_offset)?;
    let layout = drop.layout().clone();
    let n = drop.numel();
    let size = T::DTYPE.size() as u64;
    let x_host: Vec<T> = random_input(n, seed);
    let dy_host: Vec<T> = random_input(n, seed ^ 0xd1);
    let (want_y, want_mask) = reference::forward(&x_host, &layout, P, state, c.decision_offset)?;
    let want_dx = reference::backward_from_mask(&dy_host, &layout, &want_mask, P)?;

    let x = dev.upload(&x_host)?;
    let dy = dev.upload(&dy_host)?;
    let mut y = dev.zeros::<T>(n)?;
    let mut dx = dev.zeros::<T>(n)?;
    let mut mask = dev.zeros::<u32>(drop.mask_words())?;
    drop.forward(s, state, &x, &mut y, &mut mask)?;
    let fwd_bad =
        element_mismatches(&download(dev, &y)?, &want_y) + mask_mismatches(&dev.download(&mask)?, &want_mask);
    drop.backward(s, &mask, &dy, &mut dx)?;
    let bwd_bad = element_mismatches(&download(dev, &dx)?, &want_dx);

    let data = 2 * n as u64 * size;
    let mbytes = 4 * drop.mask_words() as u64;
    let copy_ms = time_copy(dev, &x)?;
    let fwd_ms = time_ms(dev, || drop.forward(s, state, &x, &mut y, &mut mask))?;
    let bwd_ms = time_ms(dev, || drop.backward(s, &mask, &dy, &mut dx))?;
    let mut table = vec![
        ("forward", fwd_bad, fwd_ms, data + mbytes),
        ("backward", bwd_bad, bwd_ms, data + mbytes),
    ];
    if c.all {
        let mut m2 = dev.zeros::<u32>(drop.mask_words())?;
        drop.mask(s, state, &mut m2)?;
        let mask_bad = mask_mismatches(&dev.download(&m2)?, &want_mask);
        let mut y2 = dev.zeros::<T>(n)?;
        drop.forward_maskless(s, state, &x, &mut y2)?;
        let ml_bad = element_mismatches(&download(dev, &y2)?, &want_y);
        let mut xi = dev.upload(&x_host)?;
        let mut m3 = dev.zeros::<u32>(drop.mask_words())?;
        drop.forward_inplace(s, state, &mut xi, &mut m3)?;
        let ip_bad = element_mismatches(&download(dev, &xi)?, &want_y)
            + mask_mismatches(&dev.download(&m3)?, &want_mask);
        let mut dx2 = dev.zeros::<T>(n)?;
        drop.backward_maskless(s, state, &dy, &mut dx2)?;
        let bml_bad = element_mismatches(&download(dev, &dx2)?, &want_dx);

        let mask_ms = time_ms(dev, || drop.mask(s, state, &mut m2))?;
        let ml_ms = time_ms(dev, || drop.forward_maskless(s, state, &x, &mut y2))?;
        let ip_ms = time_ms(dev, || drop.forward_inplace(s, state, &mut xi, &mut m3))?;
        let bml_ms = time_ms(dev, || drop.backward_maskless(s, state, &dy, &mut dx2))?;
        table = vec![
            ("mask", mask_bad, mask_ms, mbytes),
            table[0],
            ("forward_maskless", ml_bad, ml_ms, data),
            ("forward_inplace", ip_bad, ip_ms, data + mbytes),
            table[1],
            ("backward_maskless", bml_bad, bml_ms, data),
        ];
    }
    let table = table
        .into_iter()
        .map(|(k, bad, ms, bytes)| (format!("{}_{k}", c.name), bad, ms, bytes));
    push_rows(rows, T::DTYPE.name(), n, (copy_ms, data), table);
    Ok(())
}

fn cpu(scale: Scale, rng: &mut Generator) -> BoxResult<bool> {
    let mut ok = true;
    for (i, c) in cases(scale).iter().enumerate() {
        println!("CPU reference: structured dropout p = {P}: {}\n", c.label());
        print_check_header();
        let seed = 50 + 3 * i as u64;
        ok &= cpu_case::<f16>(c, rng.next(), seed)?;
        ok &= cpu_case::<bf16>(c, rng.next(), seed + 1)?;
        ok &= cpu_case::<f32>(c, rng.next(), seed + 2)?;
        println!();
    }
    // A layout of more alternating groups than the kernels take: rejected before any launch.
    println!("CPU reference: structured dropout: layouts the safe API rejects\n");
    print_check_header();
    let mut checks = Checks::new();
    let shape = [2usize; 9];
    let axes = Kind::Axes(vec![1, 3, 5, 7]);
    let want = check::decision_indices(&shape, &axes.shared(shape.len()));
    check::check_api_layout(&mut checks, &axes, &shape, P, &want);
    ok &= print_checks("-", shape.iter().product(), &checks);
    Ok(ok)
}

/// The structured reference's self-checks on case `c` for dtype `T`; prints one row each.
fn cpu_case<T: Element>(c: &Case, state: PhiloxState, seed: u64) -> BoxResult<bool> {
    let n: usize = c.shape.iter().product();
    let x: Vec<T> = random_input(n, seed);
    let dy: Vec<T> = random_input(n, seed ^ 0xd1);
    let mut checks = Checks::new();
    let want = check::decision_indices(c.shape, &c.kind.shared(c.shape.len()));
    check::check_api_layout(&mut checks, &c.kind, c.shape, P, &want);
    let (_, mask) = check::check_structured(
        &mut checks,
        &c.kind,
        c.shape,
        &x,
        &dy,
        P,
        state,
        c.decision_offset,
    )?;
    // Keep rate of the decisions within 6 sigma of 1 - p.
    let decisions = want.iter().max().map_or(0, |&d| d + 1);
    let kept: usize = mask.iter().map(|w| w.count_ones() as usize).sum();
    let rate = kept as f64 / decisions as f64;
    let sigma = (P * (1.0 - P) / decisions as f64).sqrt();
    checks.check(
        format!("decision keep rate {rate:.3} vs 1 - p (+-6 sigma)"),
        (rate - (1.0 - P)).abs() <= 6.0 * sigma,
    );
    Ok(print_checks(T::DTYPE.name(), n, &checks))
}
