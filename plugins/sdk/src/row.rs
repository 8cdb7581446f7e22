//! Decoding result rows straight into Rust types with serde: a struct by
//! column name, a tuple by position, a single value from a one-column row.
//!
//! No JSON on the way: each cell's `value` case feeds the serde visitor
//! directly, so an `int8` stays an `i64`, a `numeric` is parsed exactly into
//! the type asked for (`i64`, `f64`, `String`, or any type that deserializes
//! from a string, such as a decimal crate's), and a `json` column decodes into
//! any `Deserialize` type (or stays its text for a `String`). Every error names
//! the column and its Postgres type.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor,
};

use crate::{Column, Value};

/// Why a row did not decode into the type asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError(String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

impl de::Error for DecodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DecodeError(msg.to_string())
    }
}

/// Decodes one row (`cells` aligned with `columns`) into `T`.
pub fn decode<T: de::DeserializeOwned>(
    columns: &[Column],
    cells: Vec<Value>,
) -> Result<T, DecodeError> {
    T::deserialize(RowDeserializer { columns, cells })
}

/// A row: a map of column name to cell (structs, maps), a sequence of cells
/// (tuples, `Vec`s), or, with one column, that cell itself.
struct RowDeserializer<'a> {
    columns: &'a [Column],
    cells: Vec<Value>,
}

impl<'a> RowDeserializer<'a> {
    /// The only cell, for a scalar target (`query_one::<i64>("select count(*) ...")`).
    fn single(self) -> Result<CellDeserializer<'a>, DecodeError> {
        match (self.columns, self.cells.len()) {
            ([column], 1) => Ok(CellDeserializer {
                column,
                value: self.cells.into_iter().next().unwrap_or(Value::Null),
            }),
            (_, n) => Err(DecodeError(format!(
                "a row of {n} columns ({}) cannot decode into a single value: decode it into a struct or a tuple",
                names(self.columns)
            ))),
        }
    }

    fn map(self) -> Result<RowMap<'a>, DecodeError> {
        // Two columns of one name would silently overwrite each other.
        for (i, c) in self.columns.iter().enumerate() {
            if self.columns[..i].iter().any(|d| d.name == c.name) {
                return Err(DecodeError(format!(
                    "the result has two columns named `{}`: alias one of them (`as ...`) to decode rows by name",
                    c.name
                )));
            }
        }
        Ok(RowMap {
            columns: self.columns.iter(),
            cells: self.cells.into_iter(),
            value: None,
        })
    }
}

fn names(columns: &[Column]) -> String {
    columns
        .iter()
        .map(|c| format!("`{}`", c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

macro_rules! forward_to_single {
    ($($method:ident),*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
            self.single()?.$method(visitor)
        })*
    };
}

impl<'de> Deserializer<'de> for RowDeserializer<'_> {
    type Error = DecodeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_map(self.map()?)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        visitor.visit_map(self.map()?)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_map(self.map()?)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        if len != self.columns.len() {
            return Err(DecodeError(format!(
                "a row of {} columns ({}) cannot decode into a tuple of {len}",
                self.columns.len(),
                names(self.columns)
            )));
        }
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        self.deserialize_tuple(len, visitor)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_seq(RowSeq {
            columns: self.columns.iter(),
            cells: self.cells.into_iter(),
        })
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        visitor.visit_newtype_struct(self)
    }

    forward_to_single!(
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_identifier,
        deserialize_ignored_any
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        self.single()?.deserialize_unit_struct(name, visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        self.single()?.deserialize_enum(name, variants, visitor)
    }
}

struct RowMap<'a> {
    columns: std::slice::Iter<'a, Column>,
    cells: std::vec::IntoIter<Value>,
    value: Option<(&'a Column, Value)>,
}

impl<'de> MapAccess<'de> for RowMap<'_> {
    type Error = DecodeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DecodeError> {
        match (self.columns.next(), self.cells.next()) {
            (Some(column), Some(value)) => {
                self.value = Some((column, value));
                seed.deserialize(column.name.as_str().into_deserializer())
                    .map(Some)
            }
            _ => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DecodeError> {
        let (column, value) = self
            .value
            .take()
            .ok_or_else(|| DecodeError("a value without its column".into()))?;
        seed.deserialize(CellDeserializer { column, value })
    }
}

struct RowSeq<'a> {
    columns: std::slice::Iter<'a, Column>,
    cells: std::vec::IntoIter<Value>,
}

impl<'de> SeqAccess<'de> for RowSeq<'_> {
    type Error = DecodeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DecodeError> {
        match (self.columns.next(), self.cells.next()) {
            (Some(column), Some(value)) => seed
                .deserialize(CellDeserializer { column, value })
                .map(Some),
            _ => Ok(None),
        }
    }
}

/// One cell, decoded by its `value` case into what the target asks for.
struct CellDeserializer<'a> {
    column: &'a Column,
    value: Value,
}

impl CellDeserializer<'_> {
    /// Prefixes an error with the column and its type.
    fn context(&self, e: DecodeError) -> DecodeError {
        DecodeError(format!(
            "column `{}` ({}): {e}",
            self.column.name, self.column.type_name
        ))
    }

    /// A string-carried number (`numeric`, or text) parsed into the number
    /// type the target asks for.
    fn parse<T: std::str::FromStr>(&self, what: &str) -> Result<T, DecodeError>
    where
        T::Err: fmt::Display,
    {
        match &self.value {
            Value::Numeric(s) | Value::Text(s) => s.parse().map_err(|e| {
                self.context(DecodeError(format!("`{s}` is not a valid {what}: {e}")))
            }),
            _ => Err(self.context(DecodeError(format!("not a number for {what}")))),
        }
    }
}

macro_rules! numeric {
    ($($method:ident => $t:ty, $visit:ident);* $(;)?) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
            match self.value {
                Value::Numeric(_) => {
                    let n: $t = self.parse(stringify!($t))?;
                    visitor.$visit(n).map_err(|e| self.context(e))
                }
                _ => self.deserialize_any(visitor),
            }
        })*
    };
}

impl<'de> Deserializer<'de> for CellDeserializer<'_> {
    type Error = DecodeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        let column = self.column;
        let context = |e: DecodeError| {
            DecodeError(format!(
                "column `{}` ({}): {e}",
                column.name, column.type_name
            ))
        };
        match self.value {
            Value::Null => visitor.visit_none(),
            Value::Boolean(b) => visitor.visit_bool(b),
            Value::Int2(i) => visitor.visit_i16(i),
            Value::Int4(i) => visitor.visit_i32(i),
            Value::Int8(i) => visitor.visit_i64(i),
            Value::Float4(f) => visitor.visit_f32(f),
            Value::Float8(f) => visitor.visit_f64(f),
            Value::Bytea(b) => visitor.visit_byte_buf(b),
            Value::Json(s) => {
                // A structured target decodes the document; `String` keeps the
                // text. A reader, not `from_str`: nothing borrows from the cell.
                let mut de = serde_json::Deserializer::from_reader(s.as_bytes());
                de.deserialize_any(visitor)
                    .map_err(|e| DecodeError(format!("invalid json for the target type: {e}")))
            }
            other => match crate::string_carried(other) {
                Ok(s) => visitor.visit_string(s),
                // Every case is handled above or is string-carried.
                Err(_) => visitor.visit_none(),
            },
        }
        .map_err(context)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.value {
            // A json column into a `String`: its text, not a decoded document.
            Value::Json(s) => visitor.visit_string(s),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.value {
            // `Vec<u8>` asks for a sequence, not bytes: give it the bytes one by one.
            Value::Bytea(b) => visitor.visit_seq(de::value::SeqDeserializer::new(b.into_iter())),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        // A Postgres enum or a text column into a Rust unit-variant enum.
        let column = self.column;
        match self.value {
            Value::Text(s) | Value::Other((_, s)) => visitor
                .visit_enum(s.into_deserializer())
                .map_err(|e: DecodeError| {
                    DecodeError(format!(
                        "column `{}` ({}): {e}",
                        column.name, column.type_name
                    ))
                }),
            _ => self.deserialize_any(visitor),
        }
    }

    numeric!(
        deserialize_i8 => i8, visit_i8;
        deserialize_i16 => i16, visit_i16;
        deserialize_i32 => i32, visit_i32;
        deserialize_i64 => i64, visit_i64;
        deserialize_i128 => i128, visit_i128;
        deserialize_u8 => u8, visit_u8;
        deserialize_u16 => u16, visit_u16;
        deserialize_u32 => u32, visit_u32;
        deserialize_u64 => u64, visit_u64;
        deserialize_u128 => u128, visit_u128;
        deserialize_f32 => f32, visit_f32;
        deserialize_f64 => f64, visit_f64;
    );

    serde::forward_to_deserialize_any! {
        bool char bytes byte_buf unit_struct tuple tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    fn cols(spec: &[(&str, &str)]) -> Vec<Column> {
        spec.iter()
            .map(|(n, t)| Column {
                name: (*n).into(),
                type_name: (*t).into(),
            })
            .collect()
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Event {
        id: i64,
        amount: f64,
        exact: String,
        note: Option<String>,
        payload: BTreeMap<String, u32>,
        raw: String,
        state: State,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum State {
        Pending,
        Done,
    }

    #[test]
    fn structs_decode_by_name_without_json() {
        let columns = cols(&[
            ("id", "int8"),
            ("amount", "numeric"),
            ("exact", "numeric"),
            ("note", "text"),
            ("payload", "jsonb"),
            ("raw", "jsonb"),
            ("state", "status"),
        ]);
        let row = vec![
            Value::Int8(9_007_199_254_740_993),
            Value::Numeric("12.50".into()),
            Value::Numeric("0.1000000000000000000001".into()),
            Value::Null,
            Value::Json(r#"{"a": 1}"#.into()),
            Value::Json(r#"{"b": 2}"#.into()),
            Value::Other(("status".into(), "done".into())),
        ];
        let event: Event = decode(&columns, row).unwrap();
        assert_eq!(
            event,
            Event {
                id: 9_007_199_254_740_993,
                amount: 12.5,
                exact: "0.1000000000000000000001".into(),
                note: None,
                payload: [("a".to_owned(), 1)].into(),
                raw: r#"{"b": 2}"#.into(),
                state: State::Done,
            }
        );
    }

    #[test]
    fn tuples_and_single_values_decode_by_position() {
        let columns = cols(&[("id", "int4"), ("name", "text")]);
        let (id, name): (i64, String) =
            decode(&columns, vec![Value::Int4(7), Value::Text("x".into())]).unwrap();
        assert_eq!((id, name.as_str()), (7, "x"));
        let count: i64 = decode(&cols(&[("count", "int8")]), vec![Value::Int8(3)]).unwrap();
        let (bytes,): (Vec<u8>,) =
            decode(&cols(&[("b", "bytea")]), vec![Value::Bytea(vec![0, 255])]).unwrap();
        assert_eq!(bytes, [0, 255]);
        assert_eq!(count, 3);
        let big: u64 = decode(
            &cols(&[("n", "numeric")]),
            vec![Value::Numeric("18446744073709551615".into())],
        )
        .unwrap();
        assert_eq!(big, u64::MAX);
    }

    #[test]
    fn errors_name_the_column() {
        let columns = cols(&[("id", "int8"), ("id", "int8")]);
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Id {
            id: i64,
        }
        let e = decode::<Id>(&columns, vec![Value::Int8(1), Value::Int8(2)]).unwrap_err();
        assert!(e.to_string().contains("two columns named `id`"), "{e}");

        let columns = cols(&[("n", "int8")]);
        let e = decode::<(i8,)>(&columns, vec![Value::Int8(300)]).unwrap_err();
        assert!(e.to_string().starts_with("column `n` (int8): "), "{e}");

        let e = decode::<(i32, i32)>(&columns, vec![Value::Int8(1)]).unwrap_err();
        assert!(e.to_string().contains("tuple of 2"), "{e}");

        let columns = cols(&[("n", "numeric")]);
        let e = decode::<i64>(&columns, vec![Value::Numeric("1.5".into())]).unwrap_err();
        assert!(
            e.to_string()
                .contains("column `n` (numeric): `1.5` is not a valid i64"),
            "{e}"
        );

        let columns = cols(&[("missing", "int4")]);
        let e = decode::<Id>(&columns, vec![Value::Int4(1)]).unwrap_err();
        assert!(e.to_string().contains("missing field `id`"), "{e}");
    }
}
