//! Converting between WIT `value`s and Postgres's wire formats.
//!
//! sqlx sends every parameter in the binary format, so a parameter's bytes must
//! match the type the *server* assigned to `$n`. The plugin, though, may send
//! untyped text (`text`), a type the server coerces (`int4` for an `int8`
//! column), or a string-carried type (`timestamptz("2024-...")`). One rule covers
//! all of them:
//!
//! 1. Prepare the statement, declaring the types the plugin's values carry and
//!    leaving untyped ones (`text`, `json`, `null`, `other`) unspecified, so the
//!    server infers them from context exactly as it would infer a quoted literal.
//!    sqlx caches the prepared statement, so this costs a round-trip only the
//!    first time a connection sees the SQL, and the later execute reuses it.
//! 2. A value whose binary form we have and whose type matches the server's is
//!    sent as is. Text into a text-like type is sent as its UTF-8 bytes.
//! 3. Everything else is converted *by Postgres*: one `select $1::text::T1, ...`
//!    turns the values' text forms into the server's binary form, using the
//!    types' own input functions (so `'2024-05-01 10:00+02'` means what it means
//!    in psql). That query runs only when a statement needs it.
//!
//! Results are decoded by column type into the matching `value` case. A type
//! without a case of its own (interval, arrays, ranges, enums, inet, money,
//! composites...) arrives in the binary format too, which is no text a plugin
//! can read even when its bytes happen to be valid UTF-8 (an `int4[]` is
//! mostly NULs). Those cells are rendered by Postgres's own output functions:
//! one `select $1::text, $2::text, ...` per batch of such cells, with each
//! value sent back in the binary form it came in, declared with its own type.
//! That query runs only when a result holds such a cell.

use std::borrow::Cow;
use std::fmt::Write as _;

use futures_util::TryStreamExt as _;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArgumentBuffer, PgArguments, PgRow, PgStatement, PgTypeInfo, PgValueRef};
use sqlx::{Arguments as _, Column as _, Executor as _, PgConnection, Row as _, Statement as _};
use sqlx::{SqlSafeStr as _, SqlStr, TypeInfo as _, ValueRef as _};

use super::bindings::sql::{Column, RowSet, Value};

/// Well-known type OIDs (`pg_type.oid`, stable across Postgres versions).
mod oid {
    pub const UNSPECIFIED: u32 = 0;
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const UNKNOWN: u32 = 705;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// Why a statement did not produce a result.
#[derive(Debug)]
pub enum StatementError {
    /// The host refused it before it reached Postgres (bad parameter, ...).
    Refused(String),
    /// Postgres or the connection failed.
    Sqlx(sqlx::Error),
    /// The result exceeded the row cap.
    TooManyRows(usize),
}

impl From<sqlx::Error> for StatementError {
    fn from(e: sqlx::Error) -> Self {
        StatementError::Sqlx(e)
    }
}

/// A parameter whose binary bytes are final, declared with the server's OID.
struct RawParam {
    oid: u32,
    bytes: Option<Vec<u8>>,
}

impl sqlx::Type<sqlx::Postgres> for RawParam {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(oid::UNSPECIFIED))
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for RawParam {
    fn encode_by_ref(
        &self,
        buf: &mut PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        match &self.bytes {
            Some(b) => {
                buf.extend_from_slice(b);
                Ok(sqlx::encode::IsNull::No)
            }
            None => Ok(sqlx::encode::IsNull::Yes),
        }
    }

    fn produces(&self) -> Option<PgTypeInfo> {
        Some(PgTypeInfo::with_oid(Oid(self.oid)))
    }
}

impl RawParam {
    /// Bytes this value takes in a Bind message: its length, then its bytes.
    fn wire_size(&self) -> usize {
        4 + self.bytes.as_ref().map_or(0, Vec::len)
    }
}

/// What the plugin gave for one parameter, before the server's types are known.
enum Given {
    /// Binary bytes for the declared OID.
    Binary { oid: u32, bytes: Vec<u8> },
    /// Text for the declared OID (`UNSPECIFIED` = let the server infer).
    Text { oid: u32, text: String },
    /// NULL; the server infers its type.
    Null,
}

fn given(index: usize, v: Value) -> Result<Given, StatementError> {
    let bin = |oid: u32, bytes: Vec<u8>| Ok(Given::Binary { oid, bytes });
    let text = |oid: u32, text: String| Ok(Given::Text { oid, text });
    match v {
        Value::Null => Ok(Given::Null),
        Value::Boolean(b) => bin(oid::BOOL, vec![u8::from(b)]),
        Value::Int2(i) => bin(oid::INT2, i.to_be_bytes().to_vec()),
        Value::Int4(i) => bin(oid::INT4, i.to_be_bytes().to_vec()),
        Value::Int8(i) => bin(oid::INT8, i.to_be_bytes().to_vec()),
        Value::Float4(f) => bin(oid::FLOAT4, f.to_bits().to_be_bytes().to_vec()),
        Value::Float8(f) => bin(oid::FLOAT8, f.to_bits().to_be_bytes().to_vec()),
        Value::Bytea(b) => bin(oid::BYTEA, b),
        Value::Uuid(s) => {
            let u = uuid::Uuid::parse_str(&s).map_err(|e| {
                StatementError::Refused(format!(
                    "parameter ${}: invalid uuid `{s}`: {e}",
                    index + 1
                ))
            })?;
            bin(oid::UUID, u.as_bytes().to_vec())
        }
        Value::Json(s) => {
            serde_json::from_str::<serde::de::IgnoredAny>(&s).map_err(|e| {
                StatementError::Refused(format!("parameter ${}: invalid json: {e}", index + 1))
            })?;
            text(oid::UNSPECIFIED, s)
        }
        Value::Text(s) => text(oid::UNSPECIFIED, s),
        Value::Numeric(s) => text(oid::NUMERIC, s),
        Value::Date(s) => text(oid::DATE, s),
        Value::Time(s) => text(oid::TIME, s),
        Value::Timestamp(s) => text(oid::TIMESTAMP, s),
        Value::Timestamptz(s) => text(oid::TIMESTAMPTZ, s),
        // The named type is resolved by the server through the conversion query
        // below; declaring it unspecified lets the statement infer it meanwhile.
        Value::Other((_, s)) => text(oid::UNSPECIFIED, s),
    }
}

/// The text form Postgres's input function accepts for a binary-carried
/// parameter (`given`'s bytes for `oid`), used when the server wants another
/// type than the value carries.
fn text_form(oid: u32, bytes: &[u8]) -> String {
    // `given` wrote these bytes, so each width matches its type; anything
    // else (bytea) is sent as hex.
    fn be<const N: usize>(bytes: &[u8]) -> Option<[u8; N]> {
        bytes.try_into().ok()
    }
    let text = match oid {
        oid::BOOL => be(bytes).map(|[b]| (b != 0).to_string()),
        oid::INT2 => be(bytes).map(|b| i16::from_be_bytes(b).to_string()),
        oid::INT4 => be(bytes).map(|b| i32::from_be_bytes(b).to_string()),
        oid::INT8 => be(bytes).map(|b| i64::from_be_bytes(b).to_string()),
        oid::FLOAT4 => be(bytes).map(|b| float_text(f64::from(f32::from_be_bytes(b)))),
        oid::FLOAT8 => be(bytes).map(|b| float_text(f64::from_be_bytes(b))),
        oid::UUID => uuid::Uuid::from_slice(bytes)
            .ok()
            .map(|u| u.hyphenated().to_string()),
        _ => None,
    };
    text.unwrap_or_else(|| format!("\\x{}", hex::encode(bytes)))
}

/// The string a string-carried case holds (`numeric`, `text`, `json`, `uuid`,
/// dates and times); `None` for the others (`other` holds two).
pub(super) fn string_carried(v: &Value) -> Option<&str> {
    match v {
        Value::Numeric(s)
        | Value::Text(s)
        | Value::Json(s)
        | Value::Uuid(s)
        | Value::Date(s)
        | Value::Time(s)
        | Value::Timestamp(s)
        | Value::Timestamptz(s) => Some(s),
        _ => None,
    }
}

fn float_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else {
        f.to_string()
    }
}

/// Type name usable after `::` for a server-reported parameter type.
fn cast_target(ty: &PgTypeInfo, index: usize) -> Result<String, StatementError> {
    let name = ty.name();
    // Built-in names as sqlx reports them (`TIMESTAMPTZ`, `INT4[]`) are valid SQL.
    if name
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' || c == '[' || c == ']')
    {
        return Ok(name.to_owned());
    }
    if name.is_empty() || name == "?" {
        return Err(StatementError::Refused(format!(
            "parameter ${}: cannot determine its type; add a cast in the SQL",
            index + 1
        )));
    }
    // User-defined type (enum, domain): quote it; it resolves through the same
    // search_path as the statement itself.
    Ok(crate::db::quote_ident(name))
}

/// Prepares `sql` and binds `params` in the server's types (see module docs):
/// the arguments, and the prepared statement (its columns, for `query`).
/// `sql` is shared by the preparation and the execution that follows, and
/// the parameters' strings move into the arguments: a statement costs the
/// host no copy of either beyond the one sqlx encodes.
async fn bind(
    conn: &mut PgConnection,
    sql: &SqlStr,
    params: Vec<Value>,
) -> Result<(PgArguments, PgStatement), StatementError> {
    let count = params.len();
    let givens = params
        .into_iter()
        .enumerate()
        .map(|(i, v)| given(i, v))
        .collect::<Result<Vec<_>, _>>()?;
    let declared: Vec<PgTypeInfo> = givens
        .iter()
        .map(|g| match g {
            Given::Binary { oid, .. } | Given::Text { oid, .. } => PgTypeInfo::with_oid(Oid(*oid)),
            Given::Null => PgTypeInfo::with_oid(Oid(oid::UNSPECIFIED)),
        })
        .collect();
    let statement = conn.prepare_with(sql.clone(), &declared).await?;
    let server_types: &[PgTypeInfo] = match statement.parameters() {
        Some(sqlx::Either::Left(types)) => types,
        _ => &[],
    };
    if server_types.len() != count {
        return Err(StatementError::Refused(format!(
            "the statement has {} parameter(s) but {count} value(s) were given",
            server_types.len(),
        )));
    }

    // Decide per parameter: final bytes now, or text to convert by the server.
    let mut finals: Vec<Option<RawParam>> = Vec::with_capacity(count);
    let mut conversions: Vec<(usize, String, String)> = Vec::new(); // (index, cast target, text)
    for (i, (g, ty)) in givens.into_iter().zip(server_types).enumerate() {
        let server_oid = ty.oid().map_or(oid::UNSPECIFIED, |o| o.0);
        let raw = match g {
            Given::Null => Some(RawParam {
                oid: server_oid,
                bytes: None,
            }),
            Given::Binary { oid, bytes } if oid == server_oid => Some(RawParam {
                oid,
                bytes: Some(bytes),
            }),
            Given::Text { text, .. } if is_text_like(server_oid) => Some(RawParam {
                oid: server_oid,
                bytes: Some(text.into_bytes()),
            }),
            Given::Text { text, .. } if server_oid == oid::JSONB => {
                // jsonb's binary format: a version byte (1), then the JSON text.
                let mut bytes = Vec::with_capacity(text.len() + 1);
                bytes.push(1);
                bytes.extend_from_slice(text.as_bytes());
                Some(RawParam {
                    oid: server_oid,
                    bytes: Some(bytes),
                })
            }
            Given::Text { text, .. } => {
                conversions.push((i, cast_target(ty, i)?, text));
                None
            }
            Given::Binary { oid, bytes } => {
                conversions.push((i, cast_target(ty, i)?, text_form(oid, &bytes)));
                None
            }
        };
        finals.push(raw);
    }

    if !conversions.is_empty() {
        let mut select = String::from("select ");
        for (n, (_, target, _)) in conversions.iter().enumerate() {
            if n > 0 {
                select.push_str(", ");
            }
            let _ = write!(select, "${}::text::{target}", n + 1);
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(select));
        for (_, _, text) in &conversions {
            q = q.bind(text.as_str());
        }
        let row = q.fetch_one(&mut *conn).await?;
        for (n, (i, _, _)) in conversions.iter().enumerate() {
            let value = row.try_get_raw(n)?;
            let oid = value.type_info().oid().map_or(oid::UNSPECIFIED, |o| o.0);
            let bytes = if value.is_null() {
                None
            } else {
                Some(value.as_bytes().map_err(sqlx::Error::Decode)?.to_vec())
            };
            finals[*i] = Some(RawParam { oid, bytes });
        }
    }

    // One allocation for the whole message part: each value is its bytes
    // behind a 4-byte length.
    let mut args = PgArguments::default();
    let size = finals.iter().flatten().map(RawParam::wire_size).sum();
    args.reserve(finals.len(), size);
    for raw in finals {
        // Every slot was filled above: either directly or by the conversion.
        let raw =
            raw.ok_or_else(|| StatementError::Refused("internal: unbound parameter".into()))?;
        args.add(raw).map_err(sqlx::Error::Encode)?;
    }
    Ok((args, statement))
}

fn is_text_like(oid: u32) -> bool {
    matches!(
        oid,
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::UNKNOWN | oid::JSON
    )
}

/// Runs a row-returning statement; at most `max_rows` rows are accepted.
pub async fn query(
    conn: &mut PgConnection,
    sql: String,
    params: Vec<Value>,
    max_rows: usize,
) -> Result<RowSet, StatementError> {
    let sql = shared(sql);
    let (args, statement) = bind(conn, &sql, params).await?;
    let columns = statement
        .columns()
        .iter()
        .map(|c| Column {
            name: c.name().to_owned(),
            type_name: c.type_info().name().to_ascii_lowercase(),
        })
        .collect();
    let mut rows = Vec::new();
    let mut unrendered = Vec::new();
    {
        let mut stream = conn.fetch(sqlx::query_with(sql, args));
        while let Some(row) = stream.try_next().await? {
            if rows.len() == max_rows {
                return Err(StatementError::TooManyRows(max_rows));
            }
            rows.push(decode_row(&row, rows.len(), &mut unrendered)?);
        }
    }
    render_others(conn, &mut rows, unrendered).await?;
    Ok(RowSet { columns, rows })
}

/// The statement's text, shared by its preparation and its execution.
fn shared(sql: String) -> SqlStr {
    sqlx::AssertSqlSafe(std::sync::Arc::<str>::from(sql)).into_sql_str()
}

/// A result cell of a type without a `value` case of its own, still in the
/// binary form the server sent; `render_others` asks the server for its text.
struct Unrendered {
    row: usize,
    column: usize,
    oid: u32,
    bytes: Vec<u8>,
}

/// Parameters per rendering query: bounds its size, and keeps the number of
/// distinct statements (cached per connection) small.
const RENDER_BATCH: usize = 64;

/// Fills in the text of every `other` cell by Postgres's output functions
/// (see the module docs).
async fn render_others(
    conn: &mut PgConnection,
    rows: &mut [Vec<Value>],
    cells: Vec<Unrendered>,
) -> Result<(), StatementError> {
    for batch in cells.chunks(RENDER_BATCH) {
        // sqlx caches a prepared statement by its text, with the parameter
        // types of its first use: the types go into the text (as a comment)
        // so that another mix of types is another statement.
        let mut select = String::from("select ");
        for n in 1..=batch.len() {
            if n > 1 {
                select.push_str(", ");
            }
            let _ = write!(select, "${n}::text");
        }
        let oids: Vec<String> = batch.iter().map(|c| c.oid.to_string()).collect();
        let _ = write!(select, " /* {} */", oids.join(" "));
        let mut args = PgArguments::default();
        for cell in batch {
            args.add(RawParam {
                oid: cell.oid,
                bytes: Some(cell.bytes.clone()),
            })
            .map_err(sqlx::Error::Encode)?;
        }
        let row = sqlx::query_with(sqlx::AssertSqlSafe(select), args)
            .fetch_one(&mut *conn)
            .await?;
        for (n, cell) in batch.iter().enumerate() {
            let text: String = row.try_get(n)?;
            if let Some(Value::Other((_, slot))) =
                rows.get_mut(cell.row).and_then(|r| r.get_mut(cell.column))
            {
                *slot = text;
            }
        }
    }
    Ok(())
}

/// Runs a statement and returns the rows it affected.
pub async fn execute(
    conn: &mut PgConnection,
    sql: String,
    params: Vec<Value>,
) -> Result<u64, StatementError> {
    let sql = shared(sql);
    let (args, _) = bind(conn, &sql, params).await?;
    let done = sqlx::query_with(sql, args).execute(conn).await?;
    Ok(done.rows_affected())
}

fn decode_row(
    row: &PgRow,
    index: usize,
    unrendered: &mut Vec<Unrendered>,
) -> Result<Vec<Value>, sqlx::Error> {
    (0..row.len())
        .map(|column| {
            let value = row.try_get_raw(column)?;
            match decode_cell(value.clone()).map_err(sqlx::Error::Decode)? {
                Some(v) => Ok(v),
                None => {
                    let ty = value.type_info().into_owned();
                    unrendered.push(Unrendered {
                        row: index,
                        column,
                        oid: ty.oid().map_or(oid::UNSPECIFIED, |o| o.0),
                        bytes: value.as_bytes().map_err(sqlx::Error::Decode)?.to_vec(),
                    });
                    // The text is filled in by `render_others`.
                    Ok(Value::Other((
                        ty.name().to_ascii_lowercase(),
                        String::new(),
                    )))
                }
            }
        })
        .collect()
}

/// Decodes a cell into its `value` case; `None` for a type without one, whose
/// text the server renders afterwards.
fn decode_cell(v: PgValueRef<'_>) -> Result<Option<Value>, sqlx::error::BoxDynError> {
    use sqlx::Decode as _;
    if v.is_null() {
        return Ok(Some(Value::Null));
    }
    let ty: Cow<'_, PgTypeInfo> = v.type_info();
    let oid = ty.oid().map_or(oid::UNSPECIFIED, |o| o.0);
    let bytes = v.as_bytes()?;
    let utf8 = || String::from_utf8(bytes.to_vec());
    Ok(Some(match oid {
        oid::BOOL => Value::Boolean(bool::decode(v)?),
        oid::INT2 => Value::Int2(i16::decode(v)?),
        oid::INT4 => Value::Int4(i32::decode(v)?),
        oid::INT8 => Value::Int8(i64::decode(v)?),
        oid::FLOAT4 => Value::Float4(f32::decode(v)?),
        oid::FLOAT8 => Value::Float8(f64::decode(v)?),
        oid::NUMERIC => Value::Numeric(numeric_text(bytes)?),
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::UNKNOWN => Value::Text(utf8()?),
        oid::BYTEA => Value::Bytea(bytes.to_vec()),
        oid::JSON => Value::Json(utf8()?),
        oid::JSONB => Value::Json(String::from_utf8(
            bytes.get(1..).unwrap_or_default().to_vec(),
        )?),
        oid::UUID => Value::Uuid(uuid::Uuid::decode(v)?.to_string()),
        // Dates and times outside chrono's range (and ±infinity) are rendered
        // by the server as `other`. Decoded here, not by sqlx: its chrono
        // decoders panic on `infinity` (they add days to an epoch unchecked).
        oid::DATE => match date(bytes) {
            Some(d) => Value::Date(d.format("%Y-%m-%d").to_string()),
            None => return Ok(None),
        },
        oid::TIME => Value::Time(
            chrono::NaiveTime::decode(v)?
                .format("%H:%M:%S%.f")
                .to_string(),
        ),
        oid::TIMESTAMP => match timestamp(bytes) {
            Some(d) => Value::Timestamp(d.format("%Y-%m-%dT%H:%M:%S%.f").to_string()),
            None => return Ok(None),
        },
        oid::TIMESTAMPTZ => match timestamp(bytes) {
            Some(d) => Value::Timestamptz(
                d.and_utc()
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ),
            None => return Ok(None),
        },
        _ => return Ok(None),
    }))
}

/// The days since 2000-01-01 of a binary `date`, if chrono can hold it.
fn date(bytes: &[u8]) -> Option<chrono::NaiveDate> {
    let days = i32::from_be_bytes(bytes.try_into().ok()?);
    chrono::NaiveDate::from_ymd_opt(2000, 1, 1)?
        .checked_add_signed(chrono::TimeDelta::try_days(days.into())?)
}

/// The microseconds since 2000-01-01 of a binary `timestamp` or
/// `timestamptz` (UTC), if chrono can hold it.
fn timestamp(bytes: &[u8]) -> Option<chrono::NaiveDateTime> {
    let micros = i64::from_be_bytes(bytes.try_into().ok()?);
    chrono::NaiveDate::from_ymd_opt(2000, 1, 1)?
        .and_hms_opt(0, 0, 0)?
        .checked_add_signed(chrono::TimeDelta::microseconds(micros))
}

/// Renders Postgres's binary `numeric` as its exact decimal text.
///
/// Layout: ndigits, weight, sign, dscale (each 16 bit), then `ndigits` base-10000
/// digits; the first digit is worth 10000^weight.
fn numeric_text(b: &[u8]) -> Result<String, sqlx::error::BoxDynError> {
    let word = |i: usize| -> Result<u16, sqlx::error::BoxDynError> {
        b.get(i * 2..i * 2 + 2)
            .map(|w| u16::from_be_bytes([w[0], w[1]]))
            .ok_or_else(|| "truncated numeric".into())
    };
    let ndigits = word(0)? as usize;
    let weight = word(1)? as i16 as i32;
    let sign = word(2)?;
    let dscale = word(3)? as usize;
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        _ => {}
    }
    let digits = (0..ndigits)
        .map(|i| word(4 + i))
        .collect::<Result<Vec<_>, _>>()?;
    let digit = |pos: i32| -> u16 {
        // pos: power of 10000, weight = first digit's power.
        let idx = weight - pos;
        if idx >= 0 && (idx as usize) < digits.len() {
            digits[idx as usize]
        } else {
            0
        }
    };
    let mut out = String::new();
    if sign == 0x4000 {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        for pos in (0..=weight).rev() {
            if pos == weight {
                let _ = write!(out, "{}", digit(pos));
            } else {
                let _ = write!(out, "{:04}", digit(pos));
            }
        }
    }
    if dscale > 0 {
        out.push('.');
        let mut frac = String::new();
        let mut pos = -1;
        while frac.len() < dscale {
            let _ = write!(frac, "{:04}", digit(pos));
            pos -= 1;
        }
        frac.truncate(dscale);
        out.push_str(&frac);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{Given, Value, given, numeric_text, text_form};

    /// A binary-carried parameter the server wants as another type is sent
    /// as text through that type's input function: the text its bytes give
    /// back is the value's own (signs, widths, floats' special values, hex).
    #[test]
    fn binary_parameters_give_their_text_form_back() {
        let cases = [
            (Value::Boolean(true), "true"),
            (Value::Boolean(false), "false"),
            (Value::Int2(-5), "-5"),
            (Value::Int4(i32::MIN), "-2147483648"),
            (Value::Int8(i64::MAX), "9223372036854775807"),
            (Value::Float4(-1.5), "-1.5"),
            (Value::Float8(0.1), "0.1"),
            (Value::Float8(f64::NAN), "NaN"),
            (Value::Float8(f64::NEG_INFINITY), "-Infinity"),
            (Value::Bytea(vec![0xde, 0xad]), "\\xdead"),
            (
                Value::Uuid("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11".into()),
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            ),
        ];
        for (value, text) in cases {
            let shown = format!("{value:?}");
            match given(0, value) {
                Ok(Given::Binary { oid, bytes }) => {
                    assert_eq!(text_form(oid, &bytes), text, "{shown}");
                }
                _ => panic!("{shown} is not carried in binary"),
            }
        }
    }

    fn enc(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [ndigits, weight as u16, sign, dscale].iter().chain(digits) {
            b.extend_from_slice(&w.to_be_bytes());
        }
        b
    }

    #[test]
    fn numeric_renders_exactly() {
        // 12345.678 = [1, 2345, 6780], weight 1, dscale 3
        assert_eq!(
            numeric_text(&enc(3, 1, 0, 3, &[1, 2345, 6780])).unwrap(),
            "12345.678"
        );
        // -0.0001 = [1], weight -1, dscale 4
        assert_eq!(
            numeric_text(&enc(1, -1, 0x4000, 4, &[1])).unwrap(),
            "-0.0001"
        );
        // 100000000 = 1 * 10000^2: trailing zero digits are not stored
        assert_eq!(numeric_text(&enc(1, 2, 0, 0, &[1])).unwrap(), "100000000");
        assert_eq!(numeric_text(&enc(0, 0, 0, 2, &[])).unwrap(), "0.00");
        assert_eq!(numeric_text(&enc(0, 0, 0xC000, 0, &[])).unwrap(), "NaN");
    }
}
