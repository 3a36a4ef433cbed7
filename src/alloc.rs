//! Fallible allocation for the host-side code (the CPU reference and the plans): a size no `Vec`
//! can hold (more than `isize::MAX` bytes: `Vec`'s capacity-overflow panic) or that the allocator
//! refuses (an abort) becomes an [`Error::InvalidArgument`] naming the argument that set it.

use crate::error::{Error, Result};

/// An empty vector with room for `len` elements, or an invalid-argument error named `name`.
pub(crate) fn with_capacity<T>(name: &'static str, len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        Error::invalid(
            name,
            "a size whose buffer can be allocated",
            format!("{len} elements of {} bytes", std::mem::size_of::<T>()),
        )
    })?;
    Ok(v)
}

/// `vec![value; len]`, or an invalid-argument error named `name` when it cannot be allocated.
pub(crate) fn filled<T: Clone>(name: &'static str, len: usize, value: T) -> Result<Vec<T>> {
    let mut v = with_capacity(name, len)?;
    v.resize(len, value);
    Ok(v)
}

/// Whether `len` elements of `T` fit the largest allocation a `Vec` may make (`isize::MAX`
/// bytes): for sizes an infallible method allocates later, checked when they are set.
pub(crate) fn fits<T>(len: usize) -> bool {
    len.checked_mul(std::mem::size_of::<T>())
        .is_some_and(|bytes| bytes <= isize::MAX as usize)
}
