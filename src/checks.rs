//! Length checks that several GPU modules ([`crate::skip`], [`crate::routing`],
//! [`crate::multi_sample`]) make with the same wording: one copy here, so that the same check
//! always raises the same error. The CPU reference ([`crate::reference`]) keeps its own checks on
//! purpose: the oracle must stay independent of the kernel side.

use crate::error::{Error, Result};

/// Error `name` unless a buffer of `len` elements holds exactly `expected` (`what` says why).
pub(crate) fn check_len(name: &'static str, len: usize, expected: usize, what: &str) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::invalid(
            name,
            format!("{expected} elements ({what})"),
            format!("{len} elements"),
        ))
    }
}

/// [`check_len`] for a tensor of `rows x row_len` elements; error `name` also when that product
/// overflows `usize`.
pub(crate) fn check_rows(
    name: &'static str,
    len: usize,
    rows: usize,
    row_len: usize,
    what: &str,
) -> Result<()> {
    let expected = rows
        .checked_mul(row_len)
        .ok_or_else(|| Error::invalid(name, "a number of elements that fits in usize", "an overflow"))?;
    check_len(name, len, expected, what)
}

/// The rows of a compact buffer named `name` (its capacity): any whole number of rows of
/// `row_len` elements (`row_len >= 1`, checked by the caller).
pub(crate) fn compact_rows(name: &'static str, len: usize, row_len: usize) -> Result<usize> {
    if len % row_len != 0 {
        Err(Error::invalid(
            name,
            format!("a whole number of rows of {row_len} elements"),
            format!("{len} elements"),
        ))
    } else {
        Ok(len / row_len)
    }
}
