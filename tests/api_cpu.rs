//! The safe and raw API's validation, which needs no GPU: every bad argument gives the right
//! `Error::InvalidArgument` before anything touches CUDA, and a missing driver is an error, not a
//! panic.

use dropfuse::dropout::{mask_words, raw};
use dropfuse::{Device, Dropout, Error, PhiloxState};

fn arg(e: Error) -> &'static str {
    e.argument()
        .unwrap_or_else(|| panic!("expected InvalidArgument, got {e:?}"))
}

#[test]
fn probability_must_be_in_unit_interval() {
    for p in [
        f64::NAN,
        -0.1,
        -0.0 - 1e-300,
        1.0 + 1e-12,
        1.5,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        assert_eq!(arg(Dropout::new(p).unwrap_err()), "p", "p = {p}");
    }
    for p in [0.0, 1e-9, 0.5, 0.999999, 1.0] {
        assert!(Dropout::new(p).is_ok(), "p = {p}");
    }
}

#[test]
fn threshold_and_scale_follow_the_contract() {
    let t = |p: f64| Dropout::new(p).unwrap().threshold();
    assert_eq!(t(0.0), 0);
    assert_eq!(t(1.0), 1 << 32);
    assert_eq!(t(0.5), 1 << 31);
    assert_eq!(t(1e-9), 4);
    assert_eq!(t(0.999999), 4_294_963_001);
    assert_eq!(t(1e-12), 0, "below 2^-33 rounds to keeping everything");
    assert_eq!(Dropout::new(0.0).unwrap().scale(), 1.0);
    assert_eq!(Dropout::new(0.5).unwrap().scale(), 2.0);
    assert_eq!(Dropout::new(0.1).unwrap().scale(), (1.0f64 / 0.9) as f32);
    assert_eq!(Dropout::new(1.0).unwrap().scale(), 0.0);
}

#[test]
fn api_threshold_and_scale_agree_with_the_reference() {
    // The API and the reference compute these independently; they must agree everywhere.
    let mut p = 0.0f64;
    while p <= 1.0 {
        let d = Dropout::new(p).unwrap();
        assert_eq!(
            d.threshold(),
            dropfuse::reference::dropout::drop_threshold(p).unwrap(),
            "p = {p}"
        );
        assert_eq!(
            d.scale(),
            dropfuse::reference::dropout::keep_scale(p).unwrap(),
            "p = {p}"
        );
        p += 0.000_731;
    }
}

#[test]
fn mask_words_is_ceil_n_over_32() {
    assert_eq!(mask_words(0), 0);
    assert_eq!(mask_words(1), 1);
    assert_eq!(mask_words(32), 1);
    assert_eq!(mask_words(33), 2);
    assert_eq!(mask_words((1 << 32) + 37), (1 << 27) + 2);
}

#[test]
fn raw_api_rejects_bad_pointers_and_sizes_before_any_cuda_call() {
    let d = Dropout::new(0.5).unwrap();
    let s = PhiloxState::new(1, 2);
    let stream = std::ptr::null_mut();
    let fake = 256usize as *mut f32; // never dereferenced: validation fails first
    let m = 512usize as *mut u32;
    unsafe {
        assert_eq!(
            arg(raw::forward::<f32>(&d, s, std::ptr::null(), fake, m, 10, stream).unwrap_err()),
            "x"
        );
        assert_eq!(
            arg(raw::forward::<f32>(&d, s, fake, std::ptr::null_mut(), m, 10, stream).unwrap_err()),
            "y"
        );
        assert_eq!(
            arg(raw::forward::<f32>(&d, s, fake, fake, m, 0, stream).unwrap_err()),
            "x"
        );
        assert_eq!(
            arg(raw::backward::<f32>(&d, std::ptr::null(), fake, fake, 10, stream).unwrap_err()),
            "mask"
        );
        assert_eq!(
            arg(raw::backward::<f32>(&d, m, std::ptr::null(), fake, 10, stream).unwrap_err()),
            "dy"
        );
        assert_eq!(
            arg(raw::backward::<f32>(&d, m, fake, std::ptr::null_mut(), 10, stream).unwrap_err()),
            "dx"
        );
        assert_eq!(
            arg(raw::mask(&d, s, std::ptr::null_mut(), 10, stream).unwrap_err()),
            "mask"
        );
        assert_eq!(arg(raw::mask(&d, s, m, 0, stream).unwrap_err()), "n");
        let shard = d.with_element_offset(u64::MAX - 5);
        assert_eq!(
            arg(raw::forward::<f32>(&shard, s, fake, fake, m, 10, stream).unwrap_err()),
            "element_offset"
        );
        assert_eq!(
            arg(raw::mask(&shard, s, m, 6, stream).unwrap_err()),
            "element_offset"
        );
    }
}

#[test]
fn device_without_driver_or_gpu_is_an_error_not_a_panic() {
    match Device::new(0) {
        Ok(dev) => {
            // A GPU host: the handle works and reports a sensible device.
            assert!(dev.sm_count().unwrap() > 0);
            println!("device 0: {}", dev.name().unwrap());
        }
        Err(Error::NoDriver) | Err(Error::NoDevice { .. }) => {}
        Err(e) => panic!("unexpected error without a GPU: {e:?}"),
    }
    // An ordinal past the last device is NoDevice (or NoDriver where there is no driver at all).
    match Device::new(4096) {
        Err(Error::NoDriver) | Err(Error::NoDevice { .. }) => {}
        other => panic!("device 4096: {other:?}"),
    }
    let _ = Device::count();
}

#[test]
fn errors_print_what_was_expected() {
    let e = Dropout::new(2.0).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("`p`") && msg.contains("[0, 1]") && msg.contains('2'),
        "{msg}"
    );
    assert!(Error::NoDriver.to_string().contains("driver"));
}

#[test]
fn generator_never_hands_out_the_same_stream_twice() {
    let mut g = dropfuse::Generator::new(7);
    assert_eq!(g.seed(), 7);
    let a = g.next();
    let b = g.next();
    assert_eq!((a.seed, a.offset), (7, 0));
    assert_eq!((b.seed, b.offset), (7, 1));
    // a call that uses k streams (e.g. one per sample) reserves all of them
    let c = g.next_streams(5);
    assert_eq!(c.offset, 2);
    assert_eq!(g.offset(), 7);
    assert_eq!(g.next().offset, 7);
    // resuming from a checkpoint continues the sequence
    let mut resumed = dropfuse::Generator::with_offset(7, g.offset());
    assert_eq!(resumed.next(), g.next());
    // and distinct streams give distinct masks
    let m1 = dropfuse::reference::dropout::mask(0.5, a, 0, 256).unwrap();
    let m2 = dropfuse::reference::dropout::mask(0.5, b, 0, 256).unwrap();
    assert_ne!(m1, m2);
}

#[test]
fn raw_api_rejects_a_misaligned_device_philox_state_before_any_cuda_call() {
    let drop = Dropout::new(0.5).unwrap();
    let fake = 0x1000usize;
    for misalign in [1usize, 4, 7] {
        let rng = raw::RawRng::Device {
            state: (fake + misalign) as *const u64,
            add: 0,
        };
        // SAFETY: validation fails before any pointer is used or any CUDA call is made.
        let e = unsafe {
            raw::forward::<f32>(
                &drop,
                rng,
                fake as *const f32,
                fake as *mut f32,
                std::ptr::null_mut(),
                8,
                std::ptr::null_mut(),
            )
        }
        .unwrap_err();
        assert_eq!(arg(e), "rng", "misaligned by {misalign}");
        let e = unsafe { raw::mask(&drop, rng, fake as *mut u32, 8, std::ptr::null_mut()) }.unwrap_err();
        assert_eq!(arg(e), "rng", "mask, misaligned by {misalign}");
    }
    // A host state converts into the raw source unchanged.
    let host: raw::RawRng = PhiloxState::new(3, 4).into();
    assert_eq!(host, raw::RawRng::Host(PhiloxState::new(3, 4)));
}

#[test]
fn head_batch_comes_from_h_and_is_at_most_the_capacity() {
    use dropfuse::multi_sample::head_batch;
    let (d, cap) = (16usize, 64usize);
    // Any B in 1 ..= capacity, taken from h (B * D values) and matched by the labels.
    for b in [1usize, 5, 63, 64] {
        assert_eq!(head_batch(d, cap, b * d, b).unwrap(), b, "B = {b}");
    }
    assert_eq!(head_batch(1, 1, 1, 1).unwrap(), 1);
    // h: empty, not a multiple of D, above the capacity (also by one row).
    for h_len in [0usize, d - 1, 5 * d + 1, 65 * d, 1000 * d] {
        let e = head_batch(d, cap, h_len, h_len / d).unwrap_err();
        assert_eq!(arg(e.clone()), "h", "h of {h_len} values");
        let msg = e.to_string();
        assert!(msg.contains("1 ..= 64") && msg.contains("capacity"), "{msg}");
    }
    // labels: B from h, and the labels disagree.
    for (b, labels) in [(5usize, 4usize), (5, 6), (64, 0), (1, 64)] {
        let e = head_batch(d, cap, b * d, labels).unwrap_err();
        assert_eq!(arg(e.clone()), "labels", "B {b}, {labels} labels");
        assert!(e.to_string().contains(&format!("{b} labels")), "{e}");
    }
    // h is checked first: a batch above the capacity with matching labels is an h error.
    assert_eq!(arg(head_batch(d, cap, 65 * d, 65).unwrap_err()), "h");
    // D = 0 never reaches a workspace; it is still an error, not a division by zero.
    assert_eq!(arg(head_batch(0, cap, 0, 0).unwrap_err()), "h");
}

#[test]
fn head_bias_is_c_values_exactly_when_the_head_has_one() {
    use dropfuse::multi_sample::head_bias;
    let c = 10usize;
    assert!(head_bias(true, c, Some(c)).is_ok());
    assert!(head_bias(false, c, None).is_ok());
    // Missing, unexpected, or of another length than C (shorter would be read out of bounds).
    for (has, len) in [
        (true, None),
        (false, Some(c)),
        (true, Some(c - 1)),
        (true, Some(c + 1)),
        (true, Some(0)),
    ] {
        let e = head_bias(has, c, len).unwrap_err();
        assert_eq!(arg(e.clone()), "bias", "bias {has}, {len:?}");
        if has && len.is_some() {
            assert!(e.to_string().contains("10 values"), "{e}");
        }
    }
}
