//! Conversions between protobuf `Struct`/`Value`/`Timestamp` and JSON/RFC 3339, with the
//! checks that make untrusted input safe to store (finite numbers, bounded depth).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};

/// Deepest nesting accepted in details.
pub const MAX_DEPTH: usize = 32;

/// A protobuf `Struct` as a JSON object.
///
/// # Errors
///
/// A reason when a number is not finite or nesting is deeper than [`MAX_DEPTH`].
pub fn struct_to_json(value: &prost_types::Struct) -> Result<Map<String, Value>, String> {
    fields_to_json(value, 1)
}

fn fields_to_json(value: &prost_types::Struct, depth: usize) -> Result<Map<String, Value>, String> {
    if depth > MAX_DEPTH {
        return Err(format!("details nest deeper than {MAX_DEPTH} levels"));
    }
    value
        .fields
        .iter()
        .map(|(key, value)| Ok((key.clone(), value_to_json(value, depth)?)))
        .collect()
}

fn value_to_json(value: &prost_types::Value, depth: usize) -> Result<Value, String> {
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => Value::Number(
            Number::from_f64(*n)
                .ok_or_else(|| "details hold a NaN or infinite number".to_owned())?,
        ),
        Some(Kind::StructValue(inner)) => Value::Object(fields_to_json(inner, depth + 1)?),
        Some(Kind::ListValue(list)) => {
            if depth + 1 > MAX_DEPTH {
                return Err(format!("details nest deeper than {MAX_DEPTH} levels"));
            }
            Value::Array(
                list.values
                    .iter()
                    .map(|v| value_to_json(v, depth + 1))
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

/// A JSON object as a protobuf `Struct` (numbers become doubles, as `Struct` requires).
pub fn json_to_struct(map: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(value: &Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(json_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A protobuf timestamp as RFC 3339 (UTC, nanoseconds).
///
/// # Errors
///
/// When the timestamp is out of range or malformed.
pub fn timestamp_to_rfc3339(timestamp: &prost_types::Timestamp) -> Result<String, String> {
    let time = timestamp_to_system(timestamp)?;
    Ok(humantime::format_rfc3339_nanos(time).to_string())
}

/// A protobuf timestamp as a `SystemTime`.
///
/// # Errors
///
/// When the nanos are out of range or the time is before 1970 or after 9999.
pub fn timestamp_to_system(timestamp: &prost_types::Timestamp) -> Result<SystemTime, String> {
    let nanos = u32::try_from(timestamp.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| "timestamp nanos out of range".to_owned())?;
    let seconds = u64::try_from(timestamp.seconds)
        .ok()
        .filter(|s| *s < 253_402_300_800)
        .ok_or_else(|| "timestamp outside 1970..9999".to_owned())?;
    Ok(UNIX_EPOCH + Duration::new(seconds, nanos))
}

/// RFC 3339 text (as stored) back to a protobuf timestamp.
pub fn rfc3339_to_timestamp(text: &str) -> Option<prost_types::Timestamp> {
    humantime::parse_rfc3339(text)
        .ok()
        .map(prost_types::Timestamp::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(n: f64) -> prost_types::Value {
        prost_types::Value {
            kind: Some(Kind::NumberValue(n)),
        }
    }

    #[test]
    fn round_trips_nested_values() {
        let json: Map<String, Value> =
            serde_json::from_str(r#"{"a":1.5,"b":[true,null,"x"],"c":{"d":"e"}}"#).expect("json");
        assert_eq!(struct_to_json(&json_to_struct(&json)).expect("valid"), json);
    }

    #[test]
    fn refuses_non_finite_numbers_and_deep_nesting() {
        let mut bad = prost_types::Struct::default();
        bad.fields.insert("n".to_owned(), number(f64::NAN));
        assert!(struct_to_json(&bad).is_err());

        let mut deep = prost_types::Struct::default();
        for _ in 0..40 {
            let mut outer = prost_types::Struct::default();
            outer.fields.insert(
                "x".to_owned(),
                prost_types::Value {
                    kind: Some(Kind::StructValue(deep)),
                },
            );
            deep = outer;
        }
        assert!(
            struct_to_json(&deep)
                .expect_err("too deep")
                .contains("deeper")
        );
    }

    #[test]
    fn timestamps_are_checked_and_formatted() {
        let ok = prost_types::Timestamp {
            seconds: 1_767_225_600,
            nanos: 5,
        };
        assert_eq!(
            timestamp_to_rfc3339(&ok).expect("valid"),
            "2026-01-01T00:00:00.000000005Z"
        );
        assert!(
            timestamp_to_rfc3339(&prost_types::Timestamp {
                seconds: -1,
                nanos: 0
            })
            .is_err()
        );
        assert!(
            timestamp_to_rfc3339(&prost_types::Timestamp {
                seconds: 0,
                nanos: -1
            })
            .is_err()
        );
        assert!(
            timestamp_to_rfc3339(&prost_types::Timestamp {
                seconds: 0,
                nanos: 1_000_000_000
            })
            .is_err()
        );
        assert_eq!(
            rfc3339_to_timestamp("2026-01-01T00:00:00.000000005Z"),
            Some(ok)
        );
    }
}
