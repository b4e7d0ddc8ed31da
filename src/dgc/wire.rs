//! The wire format of one rank's sparse message, and decoding with scatter-add.
//!
//! ```text
//! [count: u32 LE][indices][values]
//!   indices  U32:          count × u32 LE
//!            DeltaVarint:  count × LEB128(i_j − i_{j−1}), i_{−1} = 0, indices ascending
//!   values   F32:          count × f32 LE
//!            Bf16:         count × bf16 LE (round to nearest even)
//! ```
//!
//! Fixed-k exchange pads every message to exactly `k` pairs with index [`PAD_INDEX`] and value 0
//! (U32 indices only, so every message has the same length); decoding skips the padding.

use super::{IndexCoding, ValueFormat};
use crate::{Error, Result};
use half::bf16;

/// The index of a padding pair (never a real parameter index).
pub const PAD_INDEX: u32 = u32::MAX;

/// Bytes of one value in a format.
pub fn value_bytes(f: ValueFormat) -> usize {
    match f {
        ValueFormat::F32 => 4,
        ValueFormat::Bf16 => 2,
    }
}

/// The length of a fixed-k message with U32 indices.
pub fn fixed_len(k: usize, values: ValueFormat) -> usize {
    4 + k * (4 + value_bytes(values))
}

/// Round each value to what the format transmits (bf16 rounding, or nothing).
pub fn quantize(val: &mut [f32], f: ValueFormat) {
    if f == ValueFormat::Bf16 {
        for x in val {
            *x = bf16::from_f32(*x).to_f32();
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut x: u32) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u32> {
    let mut x: u64 = 0;
    for shift in (0..35).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        x |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return u32::try_from(x).ok();
        }
    }
    None
}

/// Encode `(idx, val)` (indices ascending when delta coded), padded to `pad_to` pairs with
/// [`PAD_INDEX`] when given (U32 only). Appends to `out` after clearing it.
pub fn encode(
    idx: &[u32],
    val: &[f32],
    coding: IndexCoding,
    values: ValueFormat,
    pad_to: Option<usize>,
    out: &mut Vec<u8>,
) -> Result<()> {
    if idx.len() != val.len() {
        return Err(Error::LengthMismatch {
            what: "dgc encode: values (one per index)".into(),
            expected: idx.len(),
            got: val.len(),
        });
    }
    let count = pad_to.unwrap_or(idx.len());
    if count < idx.len() {
        return Err(Error::InvalidArgument(format!(
            "dgc encode: {} pairs do not fit a fixed message of {count}",
            idx.len()
        )));
    }
    let count32 = u32::try_from(count)
        .map_err(|_| Error::InvalidArgument("dgc encode: more than u32::MAX pairs".into()))?;
    out.clear();
    out.extend_from_slice(&count32.to_le_bytes());
    match coding {
        IndexCoding::U32 => {
            for &i in idx {
                out.extend_from_slice(&i.to_le_bytes());
            }
            for _ in idx.len()..count {
                out.extend_from_slice(&PAD_INDEX.to_le_bytes());
            }
        }
        IndexCoding::DeltaVarint => {
            if pad_to.is_some_and(|p| p != idx.len()) {
                return Err(Error::InvalidArgument(
                    "dgc encode: delta-varint messages cannot be padded (use CountsThenGather)"
                        .into(),
                ));
            }
            let mut prev = 0u32;
            for (j, &i) in idx.iter().enumerate() {
                if j > 0 && i <= prev {
                    return Err(Error::InvalidArgument(format!(
                        "dgc encode: delta coding needs strictly ascending indices ({prev} then {i})"
                    )));
                }
                put_varint(out, i - prev);
                prev = i;
            }
        }
    }
    for &x in val {
        match values {
            ValueFormat::F32 => out.extend_from_slice(&x.to_le_bytes()),
            ValueFormat::Bf16 => out.extend_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes()),
        }
    }
    for _ in idx.len()..count {
        out.extend_from_slice(&vec![0u8; value_bytes(values)]);
    }
    Ok(())
}

fn malformed(why: String) -> Error {
    Error::InvalidArgument(format!("malformed DGC message: {why}"))
}

/// Decode one message into `(index, value)` pairs, padding skipped. Checks every index `< n` and
/// that the message is exactly consumed (trailing zero bytes are allowed: gather padding).
pub fn decode(
    msg: &[u8],
    n: usize,
    coding: IndexCoding,
    values: ValueFormat,
    mut f: impl FnMut(u32, f32),
) -> Result<usize> {
    let head: [u8; 4] = msg
        .get(..4)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| malformed(format!("{} bytes, shorter than its header", msg.len())))?;
    let count = u32::from_le_bytes(head) as usize;
    let vb = value_bytes(values);
    let mut pos = 4;
    let mut idx = Vec::with_capacity(count.min(msg.len()));
    match coding {
        IndexCoding::U32 => {
            let need = count
                .checked_mul(4 + vb)
                .and_then(|b| b.checked_add(4))
                .ok_or_else(|| malformed(format!("count {count} overflows")))?;
            if msg.len() < need {
                return Err(malformed(format!(
                    "count {count} needs {need} bytes, got {}",
                    msg.len()
                )));
            }
            for c in msg[4..4 + 4 * count].chunks_exact(4) {
                idx.push(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
            pos += 4 * count;
        }
        IndexCoding::DeltaVarint => {
            let mut prev = 0u32;
            for j in 0..count {
                let d = get_varint(msg, &mut pos)
                    .ok_or_else(|| malformed(format!("index {j} of {count}: bad varint")))?;
                if j > 0 && d == 0 {
                    return Err(malformed(format!("index {j}: repeated index")));
                }
                prev = prev
                    .checked_add(d)
                    .ok_or_else(|| malformed(format!("index {j} overflows u32")))?;
                idx.push(prev);
            }
        }
    }
    let vals = msg
        .get(pos..pos + count * vb)
        .ok_or_else(|| malformed(format!("values of {count} pairs are cut short")))?;
    if msg[pos + count * vb..].iter().any(|&b| b != 0) {
        return Err(malformed("non-zero bytes after the values".into()));
    }
    let mut real = 0;
    for (j, &i) in idx.iter().enumerate() {
        let x = match values {
            ValueFormat::F32 => {
                let c = &vals[4 * j..4 * j + 4];
                f32::from_le_bytes([c[0], c[1], c[2], c[3]])
            }
            ValueFormat::Bf16 => {
                let c = &vals[2 * j..2 * j + 2];
                bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()
            }
        };
        if i == PAD_INDEX && coding == IndexCoding::U32 {
            continue;
        }
        if i as usize >= n {
            return Err(malformed(format!(
                "index {i} out of range for {n} parameters"
            )));
        }
        f(i, x);
        real += 1;
    }
    Ok(real)
}

/// Decode every rank's message (`msgs[r]`) and scatter-add into `dense` (zeroed first) in rank
/// order, then divide by the number of messages (the average). Returns the pairs decoded.
pub fn decode_average(
    msgs: &[&[u8]],
    coding: IndexCoding,
    values: ValueFormat,
    dense: &mut [f32],
) -> Result<usize> {
    dense.fill(0.0);
    let n = dense.len();
    let mut total = 0;
    for (r, m) in msgs.iter().enumerate() {
        total += decode(m, n, coding, values, |i, x| dense[i as usize] += x)
            .map_err(|e| Error::InvalidArgument(format!("dgc: message from rank {r}: {e}")))?;
    }
    let w = msgs.len().max(1) as f32;
    if w != 1.0 {
        dense.iter_mut().for_each(|x| *x /= w);
    }
    Ok(total)
}
