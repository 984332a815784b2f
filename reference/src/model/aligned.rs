//! Buffers whose first element sits on a 64-byte (cache-line) boundary, for
//! the AMX operands and outputs of [`super::bf16`].
//!
//! Why: an AMX tile row is 64 bytes. `Vec` only promises the element's own
//! alignment, and glibc returns large blocks 16 bytes past a page boundary,
//! so every tile row of a `Vec`-backed operand straddled two cache lines: twice
//! the lines per tile load, and half the product's throughput on the dev box
//! (a C probe of the same loop: ~1070 GFLOP/s per core aligned, ~330-620 with
//! both operands 16 bytes off; see `docs/quantization.md`).
//!
//! Shape: a `Vec<T>` with one cache line of slack, and the offset of the first
//! aligned element. The slack is written with `T::default()` so that the whole
//! `Vec` is initialized; only `[off, off + len)` is ever handed out.
//! ```text
//!   buf: | slack (off elements) | data (len) | slack (PAD - off) |
//!          ^ buf.as_ptr()         ^ 64-byte aligned
//! ```
//! Nothing here changes a value: the same bits in a different place.

use std::mem::{size_of, MaybeUninit};
use std::ops::{Deref, DerefMut};

use ndarray::{s, Array1, Array2};

/// Bytes of the alignment (one cache line, one AMX tile row).
pub const ALIGN: usize = 64;

/// `len` values of `T`, the first on a 64-byte boundary (module doc).
///
/// `len <= capacity()`: the `buf.len() - pad` elements from `off` are all
/// initialized; [`Aligned::resize_within`] moves `len` inside them (a buffer
/// reused for operands of varying size).
pub struct Aligned<T> {
    buf: Vec<T>,
    off: usize,
    len: usize,
}

/// Elements of slack: one cache line's worth.
const fn pad<T>() -> usize {
    ALIGN / size_of::<T>()
}

/// Where the first 64-byte-aligned element of `buf`'s storage is, in elements
/// (at most `pad::<T>()` for a `T` whose size divides 64; 0 if none is, which
/// only costs speed).
fn first_aligned<T>(buf: &Vec<T>) -> usize {
    match buf.as_ptr().align_offset(ALIGN) {
        o if o <= pad::<T>() => o,
        _ => 0,
    }
}

impl<T: Copy + Default> Aligned<T> {
    /// `len` copies of `T::default()` (zeros for the numbers used here).
    pub fn zeroed(len: usize) -> Self {
        let buf = vec![T::default(); len + pad::<T>()];
        let off = first_aligned(&buf);
        Aligned { buf, off, len }
    }

    /// `len` values written by `init`, which receives the aligned slice.
    ///
    /// # Safety
    /// `init` must write every element of the slice it is given (through it
    /// or through its pointer) before returning.
    pub unsafe fn init_with(len: usize, init: impl FnOnce(&mut [MaybeUninit<T>])) -> Self {
        let total = len + pad::<T>();
        let mut buf: Vec<T> = Vec::with_capacity(total);
        let off = first_aligned(&buf);
        let spare = &mut buf.spare_capacity_mut()[..total];
        let (head, rest) = spare.split_at_mut(off);
        let (data, tail) = rest.split_at_mut(len);
        for x in head.iter_mut().chain(tail) {
            x.write(T::default());
        }
        init(data);
        // SAFETY: the slack was written above and the data by `init` (the
        // caller's promise): all `total` elements are initialized.
        unsafe { buf.set_len(total) };
        Aligned { buf, off, len }
    }

    /// Shrink or regrow the visible length to `len <= capacity()`. The
    /// elements keep whatever values they last had (all initialized).
    pub fn resize_within(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "Aligned::resize_within: {len} > capacity {}",
            self.capacity()
        );
        self.len = len;
    }

    /// The most elements [`Aligned::resize_within`] accepts: the storage
    /// less its slack (`off <= pad`, so they all lie after `off`).
    pub fn capacity(&self) -> usize {
        self.buf.len() - pad::<T>()
    }
}

impl<T> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl<T> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

impl<T: Copy + Default> Clone for Aligned<T> {
    /// A fresh aligned buffer (a cloned `Vec` may land at another offset).
    fn clone(&self) -> Self {
        // SAFETY: the closure writes every element (a copy of `self`).
        unsafe {
            Aligned::init_with(self.len, |out| {
                for (o, &v) in out.iter_mut().zip(self.iter()) {
                    o.write(v);
                }
            })
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: PartialEq> PartialEq for Aligned<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

/// An `[rows, cols]` f32 array whose first element is 64-byte aligned, every
/// value written by `init` (row-major slice; the same contract as
/// [`Aligned::init_with`]). The array keeps the slack in its storage.
///
/// # Safety
/// `init` must write every element of the slice it is given.
pub unsafe fn array2_with(
    rows: usize,
    cols: usize,
    init: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> Array2<f32> {
    // SAFETY: forwarded to the caller.
    let a = unsafe { Aligned::init_with(rows * cols, init) };
    let Aligned { buf, off, len } = a;
    Array1::from_vec(buf)
        .slice_move(s![off..off + len])
        .into_shape_with_order((rows, cols))
        .expect("a contiguous run of rows x cols")
}

/// [`array2_with`] filled with zeros.
pub fn array2_zeroed(rows: usize, cols: usize) -> Array2<f32> {
    // SAFETY: every element is written.
    unsafe {
        array2_with(rows, cols, |out| {
            for o in out {
                o.write(0.0);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_aligned(p: *const u8) {
        assert_eq!(p as usize % ALIGN, 0, "{p:p} is not on a 64-byte boundary");
    }

    #[test]
    fn buffers_start_on_a_cache_line_and_keep_their_values() {
        for len in [0usize, 1, 7, 32, 1000, 100_000] {
            let z = Aligned::<u16>::zeroed(len);
            assert_eq!(z.len(), len);
            assert!(z.iter().all(|&v| v == 0));
            if len > 0 {
                check_aligned(z.as_ptr().cast());
            }
            // SAFETY: every element written.
            let a = unsafe {
                Aligned::<u32>::init_with(len, |out| {
                    for (i, o) in out.iter_mut().enumerate() {
                        o.write(i as u32 * 3 + 1);
                    }
                })
            };
            let c = a.clone();
            for b in [&a, &c] {
                assert_eq!(b.len(), len);
                assert!(b.iter().enumerate().all(|(i, &v)| v == i as u32 * 3 + 1));
                if len > 0 {
                    check_aligned(b.as_ptr().cast());
                }
            }
            assert_eq!(a, c);
        }
        let mut r = Aligned::<u16>::zeroed(100);
        r[99] = 7;
        r.resize_within(10);
        assert_eq!((r.len(), r.capacity()), (10, 100));
        r.resize_within(100);
        assert_eq!(r[99], 7, "regrowing keeps the old values");
        check_aligned(r.as_ptr().cast());
    }

    #[test]
    #[should_panic(expected = "capacity")]
    fn resizing_past_the_capacity_panics() {
        Aligned::<u32>::zeroed(8).resize_within(9);
    }

    #[test]
    fn arrays_are_row_major_and_aligned() {
        // SAFETY: every element written.
        let a = unsafe {
            array2_with(33, 17, |out| {
                for (i, o) in out.iter_mut().enumerate() {
                    o.write(i as f32);
                }
            })
        };
        assert_eq!(a.dim(), (33, 17));
        check_aligned(a.as_ptr().cast());
        assert_eq!(a[[2, 5]], (2 * 17 + 5) as f32);
        assert_eq!(a.as_slice().expect("standard layout").len(), 33 * 17);
        let z = array2_zeroed(4, 64);
        check_aligned(z.as_ptr().cast());
        assert!(z.iter().all(|&v| v == 0.0));
    }
}
