//! JSON values for the fuzz targets whose input is JSON (shared like `harness.rs`; needs
//! `serde_json`).

#![allow(dead_code)]

use proptest::prelude::*;
use serde_json::Value;

use super::harness::text;

/// Any JSON value (bounded depth and size), with the numbers and strings parsers trip on.
pub fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(65535),
            Just(65536),
            Just(i64::from(u32::MAX)),
            Just(i64::MIN)
        ]
        .prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `valid` most of the time, else any JSON value (a field of a valid shape gone wrong).
pub fn or_any(valid: Value) -> impl Strategy<Value = Value> {
    prop_oneof![3 => Just(valid), 1 => json()]
}

/// An object whose fields are each kept, replaced by any value or dropped, plus extra
/// fields.
pub fn shaped(fields: Vec<(&'static str, Value)>) -> impl Strategy<Value = Value> {
    let per_field: Vec<_> = fields
        .into_iter()
        .map(|(k, v)| {
            prop_oneof![
                6 => Just(Some(v.clone())),
                2 => json().prop_map(Some),
                1 => Just(None),
            ]
            .prop_map(move |x| (k, x))
        })
        .collect();
    (
        per_field,
        proptest::collection::btree_map(text(), json(), 0..2),
    )
        .prop_map(|(fs, extra)| {
            let mut m = serde_json::Map::new();
            for (k, v) in extra {
                m.insert(k, v);
            }
            for (k, v) in fs {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            Value::Object(m)
        })
}
