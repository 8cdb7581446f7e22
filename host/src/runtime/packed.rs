//! The `packed-rows` layout of `query-packed` (`wit/jobhost.wit`): every cell
//! of a result in one buffer. Lowered as a `row-set`, a result costs the guest
//! one allocation, and so one call from the host into the guest, per row and
//! per string: ~300k instructions for a 50-row batch of three text columns
//! (BENCHMARKS.md). Packed, it costs one. The SDK decodes it
//! (`plugins/sdk/src/packed.rs`); the two tests pin the same bytes.

use super::bindings::sql::{PackedRows, RowSet, Value};
use super::values::string_carried;

/// `set`, packed. The statement, its checks and its limits are `query`'s: only
/// the way the rows reach the guest differs.
pub fn pack(set: RowSet) -> PackedRows {
    let RowSet { columns, rows } = set;
    let mut cells = Vec::with_capacity(rows.iter().flatten().map(packed_len).sum());
    for cell in rows.iter().flatten() {
        put(&mut cells, cell);
    }
    PackedRows {
        columns,
        // A result past u32::MAX rows would not fit the guest's memory either.
        rows: u32::try_from(rows.len()).unwrap_or(u32::MAX),
        cells,
    }
}

/// The tag of each `value` case: its index in the WIT variant.
fn tag(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Boolean(_) => 1,
        Value::Int2(_) => 2,
        Value::Int4(_) => 3,
        Value::Int8(_) => 4,
        Value::Float4(_) => 5,
        Value::Float8(_) => 6,
        Value::Numeric(_) => 7,
        Value::Text(_) => 8,
        Value::Bytea(_) => 9,
        Value::Json(_) => 10,
        Value::Uuid(_) => 11,
        Value::Date(_) => 12,
        Value::Time(_) => 13,
        Value::Timestamp(_) => 14,
        Value::Timestamptz(_) => 15,
        Value::Other(_) => 16,
    }
}

/// The string or bytes a case carries, if it carries one.
fn carried(v: &Value) -> Option<&[u8]> {
    match v {
        Value::Bytea(b) => Some(b),
        other => string_carried(other).map(str::as_bytes),
    }
}

/// Bytes `v` takes packed.
fn packed_len(v: &Value) -> usize {
    1 + match v {
        Value::Null => 0,
        Value::Boolean(_) => 1,
        Value::Int2(_) => 2,
        Value::Int4(_) | Value::Float4(_) => 4,
        Value::Int8(_) | Value::Float8(_) => 8,
        Value::Other((name, text)) => 8 + name.len() + text.len(),
        other => 4 + carried(other).map_or(0, <[u8]>::len),
    }
}

fn put(out: &mut Vec<u8>, v: &Value) {
    out.push(tag(v));
    match v {
        Value::Null => {}
        Value::Boolean(b) => out.push(u8::from(*b)),
        Value::Int2(i) => out.extend_from_slice(&i.to_le_bytes()),
        Value::Int4(i) => out.extend_from_slice(&i.to_le_bytes()),
        Value::Int8(i) => out.extend_from_slice(&i.to_le_bytes()),
        Value::Float4(f) => out.extend_from_slice(&f.to_bits().to_le_bytes()),
        Value::Float8(f) => out.extend_from_slice(&f.to_bits().to_le_bytes()),
        Value::Other((name, text)) => {
            put_bytes(out, name.as_bytes());
            put_bytes(out, text.as_bytes());
        }
        other => put_bytes(out, carried(other).unwrap_or_default()),
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Postgres caps a value at 1 GB, so its length fits a u32.
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::bindings::sql::Column;

    /// The bytes the SDK's `packed` test decodes: keep the two in step.
    #[test]
    fn a_row_packs_to_the_layout_the_wit_describes() {
        let set = RowSet {
            columns: vec![Column {
                name: "a".into(),
                type_name: "int4".into(),
            }],
            rows: vec![
                vec![Value::Int4(-2)],
                vec![Value::Null],
                vec![Value::Text("hé".into())],
                vec![Value::Other(("t".into(), "x".into()))],
            ],
        };
        let packed = pack(set);
        assert_eq!(packed.rows, 4);
        assert_eq!(packed.columns.len(), 1);
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            3, 0xfe, 0xff, 0xff, 0xff,
            0,
            8, 3, 0, 0, 0, b'h', 0xc3, 0xa9,
            16, 1, 0, 0, 0, b't', 1, 0, 0, 0, b'x',
        ];
        assert_eq!(packed.cells, expected);
        assert_eq!(packed.cells.capacity(), expected.len(), "sized up front");
    }

    #[test]
    fn every_case_packs_to_its_tag_and_its_length() {
        let every = vec![
            Value::Null,
            Value::Boolean(true),
            Value::Int2(1),
            Value::Int4(1),
            Value::Int8(1),
            Value::Float4(1.5),
            Value::Float8(1.5),
            Value::Numeric("1".into()),
            Value::Text("1".into()),
            Value::Bytea(vec![1]),
            Value::Json("1".into()),
            Value::Uuid("1".into()),
            Value::Date("1".into()),
            Value::Time("1".into()),
            Value::Timestamp("1".into()),
            Value::Timestamptz("1".into()),
            Value::Other(("1".into(), "1".into())),
        ];
        for (i, v) in every.iter().enumerate() {
            let mut out = Vec::new();
            put(&mut out, v);
            assert_eq!(usize::from(out[0]), i, "{v:?}");
            assert_eq!(out.len(), packed_len(v), "{v:?}");
        }
    }
}
