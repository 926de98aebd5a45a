//! Helpers of the unit tests: random edits of valid input, for the decoders' fuzz tests.

use proptest::collection::vec;
use proptest::num::{u8, usize};
use proptest::strategy::Strategy;

/// One edit of a byte string: at a position, replace a byte, insert one, or cut there.
#[derive(Debug, Clone)]
pub(crate) struct Edit {
    at: usize,
    byte: u8,
    how: u8,
}

/// From `min` to 8 random edits.
pub(crate) fn edits(min: usize) -> impl Strategy<Value = Vec<Edit>> {
    vec(
        (usize::ANY, u8::ANY, 0..3u8).prop_map(|(at, byte, how)| Edit { at, byte, how }),
        min..8,
    )
}

/// `input` with `edits` applied in turn.
pub(crate) fn mutated(input: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = input.to_vec();
    for edit in edits {
        let at = edit.at % (out.len() + 1);
        match edit.how {
            0 if at < out.len() => out[at] = edit.byte,
            1 => out.insert(at, edit.byte),
            _ => out.truncate(at),
        }
    }
    out
}
