//! Graph-safe randomness cases (`dropfuse::rng::DevicePhilox`): dropout reading `{seed, offset}`
//! from device memory must draw exactly what the host state `{seed, offset + add}` draws.
//!
//! Kernels: `dropout_device_philox` (forward with the mask through `state.at(add)`, compared bit
//! for bit with `dropfuse::reference::dropout` at the host state `{seed, offset + add}` (wrapping)
//! and with the same call given that host state; the device state must be unchanged) and
//! `dropout_device_philox_advance` (`advance(add)`, then the mask-free forward reading the device
//! offset itself; the state read back must be `offset + add`). Keys: the dropout keys (`dtype`,
//! `kernel`, `n`, `p`, `seed`, `offset`, `eo`, `xo`, `yo`, `mo`, `data`) and `add`.
//!
//! Without a GPU the case runs the dropout self-checks (`cpu_case` of `examples/fuzz.rs`) on the
//! host state `{seed, offset + add}`: the device state lives on the GPU.

use dropfuse::dropout::mask_words;
use dropfuse::reference::dropout as reference;
use dropfuse::rng::DevicePhilox;
use dropfuse::{DType, Device, Dropout, PhiloxState};
use rand::rngs::StdRng;
use rand::Rng;

use crate::{
    compare, compare_out_of_place, draw_element_offset, draw_n, draw_p, draw_u64, padded, sentinel, values,
    Case, Fields, FuzzElement, Kernel, Spec as CaseSpec, MASK_SENTINEL,
};

/// The kernels of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Forward,
    Advance,
}

const KEYS: [&str; 12] = [
    "dtype", "kernel", "n", "p", "seed", "offset", "add", "eo", "xo", "yo", "mo", "data",
];

impl Op {
    pub const ALL: [Op; 2] = [Op::Forward, Op::Advance];
    pub fn name(self) -> &'static str {
        match self {
            Op::Forward => "dropout_device_philox",
            Op::Advance => "dropout_device_philox_advance",
        }
    }
    pub fn keys(self) -> &'static [&'static str] {
        &KEYS
    }
}

/// The graph part of a case: the stream added to the device offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    add: u64,
}

impl Spec {
    pub fn numel(&self) -> usize {
        0
    }

    pub fn value(&self, key: &str) -> String {
        match key {
            "add" => self.add.to_string(),
            _ => unreachable!("graph cases have no key {key}"),
        }
    }

    pub fn parse(_op: Op, f: &Fields<'_>) -> Result<Self, String> {
        Ok(Spec { add: f.num("add")? })
    }
}

/// A case: a dropout case (length, `p`, Philox state, element offset, view offsets) and `add`
/// (0, small, wrapping the offset around 2^64, random).
pub fn draw(rng: &mut StdRng, dtype: DType, max_n: usize) -> Case {
    let op = Op::ALL[rng.random_range(0..Op::ALL.len())];
    let n = draw_n(rng, max_n);
    let offset = draw_u64(rng);
    let add = match rng.random_range(0..5u32) {
        0 => 0,
        1 => rng.random_range(1..100),
        2 => (u64::MAX - offset).wrapping_add(rng.random_range(0..3)),
        _ => rng.random(),
    };
    Case {
        n,
        p: draw_p(rng),
        seed: draw_u64(rng),
        offset,
        eo: draw_element_offset(rng, n),
        xo: rng.random_range(0..8),
        yo: rng.random_range(0..8),
        mo: rng.random_range(0..4),
        data: rng.random(),
        ..Case::of(dtype, Kernel::Graph(op), CaseSpec::Graph(Spec { add }))
    }
}

/// The host state the device state with `add` stands for.
fn host_state(c: &Case, s: &Spec) -> PhiloxState {
    PhiloxState::new(c.seed, c.offset.wrapping_add(s.add))
}

/// Case `c` (operation `op`, part `s`) for element type `T`: on the GPU `dev`, or the dropout
/// self-checks at the host state without one. Returns the failures.
pub fn run<T: FuzzElement>(
    dev: Option<&Device>,
    c: &Case,
    op: Op,
    s: &Spec,
) -> dropfuse::Result<Vec<String>> {
    let host = host_state(c, s);
    let Some(dev) = dev else {
        let plain = Case {
            kernel: Kernel::Forward,
            offset: host.offset,
            spec: CaseSpec::Dropout,
            ..*c
        };
        return crate::cpu_case::<T>(&plain);
    };
    let st = dev.stream();
    let (n, words) = (c.n, mask_words(c.n));
    let drop = Dropout::new(c.p)?.with_element_offset(c.eo);
    let fill = sentinel::<T>();
    let x: Vec<T> = values(n, c.data);
    let (want_y, want_mask) = reference::forward(&x, c.p, host, c.eo)?;
    let x_host = padded(c.xo, &x, fill);
    let xb = dev.upload(&x_host)?;
    let mut yb = dev.upload(&padded(c.yo, &vec![fill; n], fill))?;
    let mut mb = dev.upload(&padded(c.mo, &vec![MASK_SENTINEL; words], MASK_SENTINEL))?;
    let start = PhiloxState::new(c.seed, c.offset);
    let mut state = DevicePhilox::new(st, start)?;
    let xv = xb.slice(c.xo..c.xo + n);
    let mut yv = yb.slice_mut(c.yo..c.yo + n);
    let name = op.name();
    let mut bad = Vec::new();
    let want_state = match op {
        Op::Forward => {
            drop.forward(
                st,
                state.at(s.add),
                &xv,
                &mut yv,
                &mut mb.slice_mut(c.mo..c.mo + words),
            )?;
            // The same call with the host state.
            let mut y2 = dev.zeros::<T>(n)?;
            let mut m2 = dev.zeros::<u32>(words)?;
            drop.forward(st, host, &xv, &mut y2, &mut m2)?;
            compare(
                &format!("{name} y vs the host-state call"),
                &dev.download(&y2)?,
                0,
                &want_y,
                fill,
                true,
                &mut bad,
            );
            compare(
                &format!("{name} mask vs the host-state call"),
                &dev.download(&m2)?,
                0,
                &want_mask,
                0,
                false,
                &mut bad,
            );
            start
        }
        Op::Advance => {
            state.advance(st, s.add)?;
            drop.forward_maskless(st, &state, &xv, &mut yv)?;
            host
        }
    };
    let got_state = state.get(st)?;
    if got_state != want_state {
        bad.push(format!("{name}: device state {got_state:?}, want {want_state:?}"));
    }
    let mask_want: &[u32] = if op == Op::Forward { &want_mask } else { &[] };
    compare(
        &format!("{name} mask"),
        &dev.download(&mb)?,
        c.mo,
        mask_want,
        MASK_SENTINEL,
        false,
        &mut bad,
    );
    compare_out_of_place(name, dev, (&yb, c.yo, &want_y), (&xb, &x_host), &mut bad)?;
    Ok(bad)
}
