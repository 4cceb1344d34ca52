//! The JSON of an Open Inference Protocol `infer` request, read into
//! bounded types: memory stays a small multiple of the request's size.
//!
//! Read into `serde_json::Value`, 18 MB of numbers in `data` took 760 MB
//! for a request that ends in 400 anyway. Here every list is bounded while
//! it is read (inputs, outputs, shape dimensions, `data` elements, parameter
//! entries), `data` takes strings only (a BYTES element is a file) and a
//! parameter takes scalars only, so a request of another shape is refused
//! at its first wrong value, before anything is built from the rest.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Most images in one `infer` request (`shape [N]`, `N` at most this).
pub const MAX_BATCH: usize = 8;
/// Most inputs or outputs a request may list (one input is served; the
/// rest are refused by name afterwards, with the protocol's message).
pub const MAX_TENSORS: usize = 8;
/// Most dimensions of a shape.
pub const MAX_DIMS: usize = 8;
/// Most entries of a `parameters` object.
pub const MAX_PARAMETERS: usize = 16;

/// A JSON list of at most `N` items.
#[derive(Debug, Default)]
pub struct Bounded<T, const N: usize>(pub Vec<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Bounded<T, N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Items<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for Items<T, N> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a list of at most {N} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if items.len() == N {
                        return Err(de::Error::custom(format!("a list of more than {N} items")));
                    }
                    items.push(item);
                }
                Ok(items)
            }
        }
        deserializer
            .deserialize_seq(Items::<T, N>(PhantomData))
            .map(Self)
    }
}

/// The `data` of a BYTES tensor: its string elements, nested lists
/// flattened, at most [`MAX_BATCH`].
#[derive(Debug, Default)]
pub struct Strings(pub Vec<String>);

struct Flatten<'a>(&'a mut Vec<String>);

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("BYTES elements: strings, or lists of them")
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
        if self.0.len() == MAX_BATCH {
            return Err(E::custom(format!(
                "more than {MAX_BATCH} elements (the most images in one request)"
            )));
        }
        self.0.push(text.to_owned());
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Strings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut out = Vec::new();
        Flatten(&mut out).deserialize(deserializer)?;
        Ok(Self(out))
    }
}

/// A `parameters` object: at most [`MAX_PARAMETERS`] entries, each a
/// scalar (bool, number or string), as the protocol's parameters are.
#[derive(Debug, Default)]
pub struct Parameters(pub Map<String, Value>);

struct Scalar;

impl<'de> Visitor<'de> for Scalar {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a parameter value: a bool, a number or a string")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

struct ScalarValue(Value);

impl<'de> Deserialize<'de> for ScalarValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Scalar).map(Self)
    }
}

impl<'de> Deserialize<'de> for Parameters {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Map<String, Value>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an object of at most {MAX_PARAMETERS} parameters")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Map::new();
                while let Some((key, ScalarValue(value))) = map.next_entry::<String, _>()? {
                    if out.len() == MAX_PARAMETERS {
                        return Err(de::Error::custom(format!(
                            "more than {MAX_PARAMETERS} parameters"
                        )));
                    }
                    out.insert(key, value);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_map(Entries).map(Self)
    }
}

impl Serialize for Parameters {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_bounded_while_read() {
        let ok: Bounded<i64, 3> = serde_json::from_str("[1, 2, 3]").unwrap();
        assert_eq!(ok.0, vec![1, 2, 3]);
        assert!(serde_json::from_str::<Bounded<i64, 3>>("[1, 2, 3, 4]").is_err());
        let s: Strings = serde_json::from_str(r#"[["a"], "b", [["c"]]]"#).unwrap();
        assert_eq!(s.0, vec!["a", "b", "c"]);
        let s: Strings = serde_json::from_str(r#""one""#).unwrap();
        assert_eq!(s.0, vec!["one"]);
        for bad in ["[1]", r#"["a", 2]"#, r#"{"a": "b"}"#, "null"] {
            assert!(serde_json::from_str::<Strings>(bad).is_err(), "{bad}");
        }
        let nine = format!("[{}]", ["\"x\""; MAX_BATCH + 1].join(","));
        assert!(serde_json::from_str::<Strings>(&nine).is_err());
        let p: Parameters =
            serde_json::from_str(r#"{"a": 1, "b": true, "c": "x", "d": 0.5}"#).unwrap();
        assert_eq!(p.0.len(), 4);
        for bad in [r#"{"a": [1]}"#, r#"{"a": {"b": 1}}"#, "[]"] {
            assert!(serde_json::from_str::<Parameters>(bad).is_err(), "{bad}");
        }
        let many = format!(
            "{{{}}}",
            (0..=MAX_PARAMETERS)
                .map(|i| format!("\"k{i}\": 1"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(serde_json::from_str::<Parameters>(&many).is_err());
    }
}
