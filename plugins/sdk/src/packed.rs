//! Decoding `query-packed`'s rows (`packed-rows` in `wit/jobhost.wit`): every
//! cell of a result arrives in one buffer, one allocation in this guest per
//! result, where a `row-set` costs one per row and per string, each a call
//! from the host into the guest. The host's `runtime/packed.rs` writes the
//! layout; the two tests pin the same bytes.

use crate::bindings::jobhost::plugin::sql::{PackedRows, RowSet, Value};

/// The rows of `packed` as a [`RowSet`]; an error names what is malformed
/// (a host of another layout, which the WIT's version rules out).
pub(crate) fn unpack(packed: PackedRows) -> Result<RowSet, String> {
    let PackedRows {
        columns,
        rows,
        cells,
    } = packed;
    let mut reader = Reader { buf: &cells, at: 0 };
    let width = columns.len();
    let rows = (0..rows)
        .map(|_| (0..width).map(|_| reader.value()).collect())
        .collect::<Result<Vec<Vec<Value>>, String>>()?;
    if reader.at != cells.len() {
        return Err(format!(
            "{} bytes left after {} rows",
            cells.len() - reader.at,
            rows.len()
        ));
    }
    Ok(RowSet { columns, rows })
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let bytes = self
            .buf
            .get(self.at..self.at + N)
            .ok_or_else(|| format!("a cell ends past the buffer at byte {}", self.at))?;
        self.at += N;
        Ok(bytes.try_into().expect("N bytes"))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let len = u32::from_le_bytes(self.take()?) as usize;
        let bytes = self
            .buf
            .get(self.at..self.at + len)
            .ok_or_else(|| format!("a value of {len} bytes ends past the buffer"))?;
        self.at += len;
        Ok(bytes.to_vec())
    }

    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|e| format!("a string is not UTF-8: {e}"))
    }

    fn value(&mut self) -> Result<Value, String> {
        let [tag] = self.take()?;
        Ok(match tag {
            0 => Value::Null,
            1 => Value::Boolean(self.take::<1>()?[0] != 0),
            2 => Value::Int2(i16::from_le_bytes(self.take()?)),
            3 => Value::Int4(i32::from_le_bytes(self.take()?)),
            4 => Value::Int8(i64::from_le_bytes(self.take()?)),
            5 => Value::Float4(f32::from_bits(u32::from_le_bytes(self.take()?))),
            6 => Value::Float8(f64::from_bits(u64::from_le_bytes(self.take()?))),
            7 => Value::Numeric(self.string()?),
            8 => Value::Text(self.string()?),
            9 => Value::Bytea(self.bytes()?),
            10 => Value::Json(self.string()?),
            11 => Value::Uuid(self.string()?),
            12 => Value::Date(self.string()?),
            13 => Value::Time(self.string()?),
            14 => Value::Timestamp(self.string()?),
            15 => Value::Timestamptz(self.string()?),
            16 => Value::Other((self.string()?, self.string()?)),
            other => return Err(format!("unknown cell tag {other} at byte {}", self.at - 1)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::jobhost::plugin::sql::Column;

    /// The bytes the host's `packed` test writes: keep the two in step.
    #[test]
    fn the_hosts_layout_decodes_to_its_rows() {
        #[rustfmt::skip]
        let cells: Vec<u8> = vec![
            3, 0xfe, 0xff, 0xff, 0xff,
            0,
            8, 3, 0, 0, 0, b'h', 0xc3, 0xa9,
            16, 1, 0, 0, 0, b't', 1, 0, 0, 0, b'x',
        ];
        let columns = vec![Column {
            name: "a".into(),
            type_name: "int4".into(),
        }];
        let set = unpack(PackedRows {
            columns,
            rows: 4,
            cells,
        })
        .unwrap();
        // The bindings' types have `Debug`, not `PartialEq`.
        let expected = vec![
            vec![Value::Int4(-2)],
            vec![Value::Null],
            vec![Value::Text("hé".into())],
            vec![Value::Other(("t".into(), "x".into()))],
        ];
        assert_eq!(format!("{:?}", set.rows), format!("{expected:?}"));
    }

    #[test]
    fn a_short_or_long_buffer_is_an_error() {
        let packed = |rows, cells| PackedRows {
            columns: vec![Column {
                name: "a".into(),
                type_name: "int4".into(),
            }],
            rows,
            cells,
        };
        let short = unpack(packed(1, vec![8, 9, 0, 0, 0, b'x'])).unwrap_err();
        assert!(short.contains("past the buffer"), "{short}");
        let long = unpack(packed(1, vec![0, 0])).unwrap_err();
        assert!(long.contains("1 bytes left"), "{long}");
        let tag = unpack(packed(1, vec![17])).unwrap_err();
        assert!(tag.contains("unknown cell tag 17"), "{tag}");
    }
}
