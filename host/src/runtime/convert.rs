//! Conversion between JSON and component-model values, driven by the function's types.
//!
//! The mapping is documented in the crate docs ("JSON values").
//!
//! Resources, futures and streams cannot cross JSON and are refused.

use std::fmt;

use serde_json::{Map, Number, Value};
use wasmtime::component::Val;
use wasmtime::component::types::Type;

/// One step of the path to the value that failed to convert.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Index(usize),
    Field(String),
}

/// A JSON value that does not fit the type the function expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertError {
    /// Path inside the argument, innermost last (empty for the argument itself).
    path: Vec<Segment>,
    /// What the type accepts.
    pub expected: String,
    /// What was found instead.
    pub found: String,
}

impl ConvertError {
    fn new(expected: impl Into<String>, found: &Value) -> Self {
        Self {
            path: Vec::new(),
            expected: expected.into(),
            found: describe_json(found),
        }
    }

    /// A value of another store that is not of the `expected` type.
    pub(crate) fn mismatch(expected: String, found: &Val) -> Self {
        Self {
            path: Vec::new(),
            expected,
            found: format!("{found:?}").chars().take(120).collect(),
        }
    }

    fn at(mut self, segment: Segment) -> Self {
        self.path.push(segment);
        self
    }

    /// The path to the offending value inside the argument, e.g. `[2].label`; empty when the
    /// argument itself is at fault.
    pub fn path(&self) -> String {
        let mut out = String::new();
        for segment in self.path.iter().rev() {
            match segment {
                Segment::Index(i) => out.push_str(&format!("[{i}]")),
                Segment::Field(name) => out.push_str(&format!(".{name}")),
            }
        }
        out
    }
}

impl fmt::Display for ConvertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path();
        if path.is_empty() {
            write!(f, "expected {}, found {}", self.expected, self.found)
        } else {
            write!(
                f,
                "at {path}: expected {}, found {}",
                self.expected, self.found
            )
        }
    }
}

/// Converts `value` to a component value of type `ty`.
pub(crate) fn json_to_val(ty: &Type, value: &Value) -> Result<Val, ConvertError> {
    Ok(match ty {
        Type::Bool => Val::Bool(
            value
                .as_bool()
                .ok_or_else(|| ConvertError::new("a boolean", value))?,
        ),
        Type::S8 => Val::S8(int(value, "s8")?),
        Type::U8 => Val::U8(int(value, "u8")?),
        Type::S16 => Val::S16(int(value, "s16")?),
        Type::U16 => Val::U16(int(value, "u16")?),
        Type::S32 => Val::S32(int(value, "s32")?),
        Type::U32 => Val::U32(int(value, "u32")?),
        Type::S64 => Val::S64(int(value, "s64")?),
        Type::U64 => Val::U64(int(value, "u64")?),
        // f32 parameters take the nearest f32, as any JSON decoder would.
        Type::Float32 => Val::Float32(float(value)? as f32),
        Type::Float64 => Val::Float64(float(value)?),
        Type::Char => {
            let expected = "a string of one character";
            let text = value
                .as_str()
                .ok_or_else(|| ConvertError::new(expected, value))?;
            let mut chars = text.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => Val::Char(c),
                _ => return Err(ConvertError::new(expected, value)),
            }
        }
        Type::String => Val::String(
            value
                .as_str()
                .ok_or_else(|| ConvertError::new("a string", value))?
                .to_string(),
        ),
        Type::List(list) => {
            let items = value
                .as_array()
                .ok_or_else(|| ConvertError::new("an array (list)", value))?;
            let elem = list.ty();
            Val::List(convert_items(items.iter().map(|item| (&elem, item)))?)
        }
        Type::FixedLengthList(list) => {
            let items = value
                .as_array()
                .filter(|items| usize::try_from(list.len()).is_ok_and(|len| len == items.len()));
            let items = items.ok_or_else(|| {
                ConvertError::new(format!("an array of {} elements", list.len()), value)
            })?;
            let elem = list.ty();
            Val::FixedLengthList(convert_items(items.iter().map(|item| (&elem, item)))?)
        }
        Type::Tuple(tuple) => {
            let types: Vec<Type> = tuple.types().collect();
            let items = value
                .as_array()
                .filter(|items| items.len() == types.len())
                .ok_or_else(|| {
                    ConvertError::new(
                        format!("an array of {} elements (tuple)", types.len()),
                        value,
                    )
                })?;
            Val::Tuple(convert_items(types.iter().zip(items))?)
        }
        Type::Record(record) => {
            let names: Vec<&str> = record.fields().map(|f| f.name).collect();
            let expected = || format!("an object with fields {}", names.join(", "));
            let object = value
                .as_object()
                .ok_or_else(|| ConvertError::new(expected(), value))?;
            if let Some(unknown) = object.keys().find(|k| !names.contains(&k.as_str())) {
                return Err(ConvertError {
                    path: Vec::new(),
                    expected: expected(),
                    found: format!("unknown field {unknown:?}"),
                });
            }
            let mut fields = Vec::with_capacity(names.len());
            for field in record.fields() {
                let val = match (object.get(field.name), &field.ty) {
                    (None, Type::Option(_)) => Val::Option(None),
                    (None, _) => {
                        return Err(ConvertError {
                            path: vec![Segment::Field(field.name.to_string())],
                            expected: describe_type(&field.ty),
                            found: "nothing (missing field)".to_string(),
                        });
                    }
                    (Some(v), ty) => json_to_val(ty, v)
                        .map_err(|e| e.at(Segment::Field(field.name.to_string())))?,
                };
                fields.push((field.name.to_string(), val));
            }
            Val::Record(fields)
        }
        Type::Option(option) => match value {
            Value::Null => Val::Option(None),
            other => Val::Option(Some(Box::new(json_to_val(&option.ty(), other)?))),
        },
        Type::Result(result) => {
            let expected = "an object {\"ok\": …} or {\"err\": …}";
            let (key, payload) =
                single_entry(value).ok_or_else(|| ConvertError::new(expected, value))?;
            let (ty, is_ok) = match key {
                "ok" => (result.ok(), true),
                "err" => (result.err(), false),
                _ => return Err(ConvertError::new(expected, value)),
            };
            let payload = match (ty, payload) {
                (None, Value::Null) => None,
                (None, other) => {
                    return Err(ConvertError::new("null (no payload)", other)
                        .at(Segment::Field(key.to_string())));
                }
                (Some(ty), v) => Some(Box::new(
                    json_to_val(&ty, v).map_err(|e| e.at(Segment::Field(key.to_string())))?,
                )),
            };
            Val::Result(if is_ok { Ok(payload) } else { Err(payload) })
        }
        Type::Enum(enum_ty) => {
            let names: Vec<&str> = enum_ty.names().collect();
            match value.as_str() {
                Some(name) if names.contains(&name) => Val::Enum(name.to_string()),
                _ => {
                    return Err(ConvertError::new(
                        format!("one of {}", quoted(&names)),
                        value,
                    ));
                }
            }
        }
        Type::Variant(variant) => {
            let names: Vec<&str> = variant.cases().map(|c| c.name).collect();
            let expected = || format!("{{\"case\": payload}} with a case among {}", quoted(&names));
            let (name, payload) = match value {
                Value::String(name) => (name.as_str(), None),
                other => {
                    let (name, payload) =
                        single_entry(other).ok_or_else(|| ConvertError::new(expected(), value))?;
                    (name, Some(payload))
                }
            };
            let case = variant
                .cases()
                .find(|c| c.name == name)
                .ok_or_else(|| ConvertError::new(expected(), value))?;
            let payload = match (case.ty, payload) {
                (None, None | Some(Value::Null)) => None,
                (None, Some(other)) => {
                    return Err(ConvertError::new("null (case without payload)", other)
                        .at(Segment::Field(name.to_string())));
                }
                (Some(_), None) => {
                    return Err(ConvertError::new(
                        format!("{{\"{name}\": payload}}: this case has a payload"),
                        value,
                    ));
                }
                (Some(ty), Some(v)) => Some(Box::new(
                    json_to_val(&ty, v).map_err(|e| e.at(Segment::Field(name.to_string())))?,
                )),
            };
            Val::Variant(name.to_string(), payload)
        }
        Type::Flags(flags) => {
            let names: Vec<&str> = flags.names().collect();
            let expected = || format!("an array of flag names among {}", quoted(&names));
            let items = value
                .as_array()
                .ok_or_else(|| ConvertError::new(expected(), value))?;
            let mut set: Vec<String> = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(name) if names.contains(&name) => {
                        if !set.iter().any(|s| s == name) {
                            set.push(name.to_string());
                        }
                    }
                    _ => return Err(ConvertError::new(expected(), item).at(Segment::Index(i))),
                }
            }
            Val::Flags(set)
        }
        Type::Map(map) => {
            let (key_ty, value_ty) = (map.key(), map.value());
            let mut entries = Vec::new();
            match value {
                Value::Object(object) if matches!(key_ty, Type::String) => {
                    for (k, v) in object {
                        let val = json_to_val(&value_ty, v)
                            .map_err(|e| e.at(Segment::Field(k.clone())))?;
                        entries.push((Val::String(k.clone()), val));
                    }
                }
                Value::Array(pairs) => {
                    for (i, pair) in pairs.iter().enumerate() {
                        let (k, v) = match pair.as_array().map(Vec::as_slice) {
                            Some([k, v]) => (k, v),
                            _ => {
                                return Err(ConvertError::new("a [key, value] pair", pair)
                                    .at(Segment::Index(i)));
                            }
                        };
                        let key = json_to_val(&key_ty, k)
                            .map_err(|e| e.at(Segment::Index(0)).at(Segment::Index(i)))?;
                        let val = json_to_val(&value_ty, v)
                            .map_err(|e| e.at(Segment::Index(1)).at(Segment::Index(i)))?;
                        entries.push((key, val));
                    }
                }
                _ => {
                    return Err(ConvertError::new(
                        "an object (string keys) or an array of [key, value] pairs",
                        value,
                    ));
                }
            }
            Val::Map(entries)
        }
        Type::Own(_) | Type::Borrow(_) => {
            return Err(ConvertError::new(
                "a resource handle, which JSON cannot carry",
                value,
            ));
        }
        Type::Future(_) | Type::Stream(_) | Type::ErrorContext => {
            return Err(ConvertError::new(
                "an async value (future, stream, error-context), which JSON cannot carry",
                value,
            ));
        }
    })
}

fn convert_items<'a>(
    items: impl Iterator<Item = (&'a Type, &'a Value)>,
) -> Result<Vec<Val>, ConvertError> {
    items
        .enumerate()
        .map(|(i, (ty, item))| json_to_val(ty, item).map_err(|e| e.at(Segment::Index(i))))
        .collect()
}

fn single_entry(value: &Value) -> Option<(&str, &Value)> {
    let object = value.as_object()?;
    if object.len() != 1 {
        return None;
    }
    object.iter().next().map(|(k, v)| (k.as_str(), v))
}

fn int<T>(value: &Value, name: &str) -> Result<T, ConvertError>
where
    T: TryFrom<i64> + TryFrom<u64> + Bounded,
{
    let expected = || format!("an integer in {}..={} ({name})", T::MIN_TEXT, T::MAX_TEXT);
    let number = value
        .as_number()
        .ok_or_else(|| ConvertError::new(expected(), value))?;
    let converted = if let Some(n) = number.as_i64() {
        T::try_from(n).ok()
    } else if let Some(n) = number.as_u64() {
        T::try_from(n).ok()
    } else {
        None
    };
    converted.ok_or_else(|| ConvertError::new(expected(), value))
}

/// Text of an integer type's bounds, for error messages.
trait Bounded {
    const MIN_TEXT: &'static str;
    const MAX_TEXT: &'static str;
}

macro_rules! bounded {
    ($($t:ty => $min:literal, $max:literal;)*) => {
        $(impl Bounded for $t {
            const MIN_TEXT: &'static str = $min;
            const MAX_TEXT: &'static str = $max;
        })*
    };
}

bounded! {
    i8 => "-128", "127";
    u8 => "0", "255";
    i16 => "-32768", "32767";
    u16 => "0", "65535";
    i32 => "-2147483648", "2147483647";
    u32 => "0", "4294967295";
    i64 => "-9223372036854775808", "9223372036854775807";
    u64 => "0", "18446744073709551615";
}

fn float(value: &Value) -> Result<f64, ConvertError> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "inf" | "Infinity" => Some(f64::INFINITY),
            "-inf" | "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
    .ok_or_else(|| ConvertError::new("a number (or \"NaN\", \"inf\", \"-inf\")", value))
}

fn quoted(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A short description of a JSON value for error messages.
fn describe_json(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) if s.chars().count() > 40 => {
            let head: String = s.chars().take(40).collect();
            format!("string {head:?}…")
        }
        Value::String(s) => format!("string {s:?}"),
        Value::Array(items) => format!("an array of {} elements", items.len()),
        Value::Object(object) => format!("an object with {} fields", object.len()),
    }
}

/// Whether `val` is a value of type `ty` (for values that come from another store, as a linked
/// call in process passes them: the two components' types need not agree).
pub(crate) fn val_matches(val: &Val, ty: &Type) -> bool {
    let all = |vals: &[Val], ty: &Type| vals.iter().all(|v| val_matches(v, ty));
    let payload = |val: &Option<Box<Val>>, ty: Option<Type>| match (val, ty) {
        (None, None) => true,
        (Some(v), Some(t)) => val_matches(v, &t),
        _ => false,
    };
    match (ty, val) {
        (Type::Bool, Val::Bool(_))
        | (Type::S8, Val::S8(_))
        | (Type::U8, Val::U8(_))
        | (Type::S16, Val::S16(_))
        | (Type::U16, Val::U16(_))
        | (Type::S32, Val::S32(_))
        | (Type::U32, Val::U32(_))
        | (Type::S64, Val::S64(_))
        | (Type::U64, Val::U64(_))
        | (Type::Float32, Val::Float32(_))
        | (Type::Float64, Val::Float64(_))
        | (Type::Char, Val::Char(_))
        | (Type::String, Val::String(_)) => true,
        (Type::List(list), Val::List(items)) => all(items, &list.ty()),
        (Type::FixedLengthList(list), Val::FixedLengthList(items)) => {
            usize::try_from(list.len()).is_ok_and(|len| len == items.len())
                && all(items, &list.ty())
        }
        (Type::Tuple(tuple), Val::Tuple(items)) => {
            let types: Vec<Type> = tuple.types().collect();
            types.len() == items.len() && items.iter().zip(&types).all(|(v, t)| val_matches(v, t))
        }
        (Type::Record(record), Val::Record(fields)) => {
            let types: Vec<_> = record.fields().collect();
            types.len() == fields.len()
                && fields
                    .iter()
                    .zip(&types)
                    .all(|((name, v), field)| name == field.name && val_matches(v, &field.ty))
        }
        (Type::Option(option), Val::Option(value)) => {
            value.as_ref().is_none_or(|v| val_matches(v, &option.ty()))
        }
        (Type::Result(result), Val::Result(Ok(value))) => payload(value, result.ok()),
        (Type::Result(result), Val::Result(Err(value))) => payload(value, result.err()),
        (Type::Enum(e), Val::Enum(name)) => e.names().any(|n| n == name),
        (Type::Variant(variant), Val::Variant(name, value)) => variant
            .cases()
            .find(|c| c.name == name)
            .is_some_and(|case| payload(value, case.ty)),
        (Type::Flags(flags), Val::Flags(set)) => {
            let names: Vec<&str> = flags.names().collect();
            set.iter().all(|f| names.contains(&f.as_str()))
        }
        (Type::Map(map), Val::Map(entries)) => {
            let (key, value) = (map.key(), map.value());
            entries
                .iter()
                .all(|(k, v)| val_matches(k, &key) && val_matches(v, &value))
        }
        // Resources belong to the store that made them; nothing else crosses.
        _ => false,
    }
}

/// A short description of a component type for error messages.
pub(crate) fn describe_type(ty: &Type) -> String {
    match ty {
        Type::Bool => "a boolean".to_string(),
        Type::S8 => "an integer in -128..=127 (s8)".to_string(),
        Type::U8 => "an integer in 0..=255 (u8)".to_string(),
        Type::S16 => "an integer in -32768..=32767 (s16)".to_string(),
        Type::U16 => "an integer in 0..=65535 (u16)".to_string(),
        Type::S32 => "an integer in -2147483648..=2147483647 (s32)".to_string(),
        Type::U32 => "an integer in 0..=4294967295 (u32)".to_string(),
        Type::S64 => "an integer (s64)".to_string(),
        Type::U64 => "an integer in 0..=18446744073709551615 (u64)".to_string(),
        Type::Float32 | Type::Float64 => "a number".to_string(),
        Type::Char => "a string of one character".to_string(),
        Type::String => "a string".to_string(),
        Type::List(_) | Type::FixedLengthList(_) => "an array (list)".to_string(),
        Type::Tuple(t) => format!("an array of {} elements (tuple)", t.types().len()),
        Type::Record(_) => "an object (record)".to_string(),
        Type::Option(o) => format!("null or {}", describe_type(&o.ty())),
        Type::Result(_) => "an object {\"ok\": …} or {\"err\": …}".to_string(),
        Type::Enum(e) => format!("one of {}", quoted(&e.names().collect::<Vec<_>>())),
        Type::Variant(_) => "an object {\"case\": payload}".to_string(),
        Type::Flags(_) => "an array of flag names".to_string(),
        Type::Map(_) => "an object or an array of [key, value] pairs".to_string(),
        Type::Own(_) | Type::Borrow(_) => "a resource handle".to_string(),
        Type::Future(_) | Type::Stream(_) | Type::ErrorContext => "an async value".to_string(),
    }
}

/// A result that cannot be returned as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FromValError {
    /// Its JSON encoding exceeds the budget; `at_least` bytes were counted before stopping.
    TooLarge { at_least: usize },
    /// It holds something JSON cannot carry (a resource, future or stream).
    Unsupported(&'static str),
}

/// Converts a component value to JSON, failing as soon as the encoding would exceed `budget`
/// bytes (approximately: strings count their length plus quotes, other nodes a few bytes).
pub(crate) fn val_to_json(val: &Val, budget: &mut Budget) -> Result<Value, FromValError> {
    budget.spend(8)?;
    Ok(match val {
        Val::Bool(b) => Value::Bool(*b),
        Val::S8(n) => Value::from(*n),
        Val::U8(n) => Value::from(*n),
        Val::S16(n) => Value::from(*n),
        Val::U16(n) => Value::from(*n),
        Val::S32(n) => Value::from(*n),
        Val::U32(n) => Value::from(*n),
        Val::S64(n) => Value::from(*n),
        Val::U64(n) => Value::from(*n),
        Val::Float32(f) => float_json(f64::from(*f)),
        Val::Float64(f) => float_json(*f),
        Val::Char(c) => Value::String(c.to_string()),
        Val::String(s) => {
            budget.spend(s.len())?;
            Value::String(s.clone())
        }
        Val::List(items) | Val::Tuple(items) | Val::FixedLengthList(items) => Value::Array(
            items
                .iter()
                .map(|item| val_to_json(item, budget))
                .collect::<Result<_, _>>()?,
        ),
        Val::Record(fields) => {
            let mut object = Map::with_capacity(fields.len());
            for (name, value) in fields {
                budget.spend(name.len())?;
                object.insert(name.clone(), val_to_json(value, budget)?);
            }
            Value::Object(object)
        }
        Val::Variant(name, payload) => match payload {
            None => Value::String(name.clone()),
            Some(payload) => tagged(name, Some(payload), budget)?,
        },
        Val::Enum(name) => Value::String(name.clone()),
        Val::Option(None) => Value::Null,
        Val::Option(Some(inner)) => val_to_json(inner, budget)?,
        Val::Result(Ok(payload)) => tagged("ok", payload.as_deref(), budget)?,
        Val::Result(Err(payload)) => tagged("err", payload.as_deref(), budget)?,
        Val::Flags(names) => Value::Array(names.iter().cloned().map(Value::String).collect()),
        Val::Map(entries) => {
            if entries.iter().all(|(k, _)| matches!(k, Val::String(_))) {
                let mut object = Map::with_capacity(entries.len());
                for (k, v) in entries {
                    if let Val::String(k) = k {
                        budget.spend(k.len())?;
                        object.insert(k.clone(), val_to_json(v, budget)?);
                    }
                }
                Value::Object(object)
            } else {
                Value::Array(
                    entries
                        .iter()
                        .map(|(k, v)| {
                            Ok(Value::Array(vec![
                                val_to_json(k, budget)?,
                                val_to_json(v, budget)?,
                            ]))
                        })
                        .collect::<Result<_, _>>()?,
                )
            }
        }
        Val::Resource(_) => return Err(FromValError::Unsupported("a resource handle")),
        Val::Future(_) | Val::Stream(_) | Val::ErrorContext(_) => {
            return Err(FromValError::Unsupported("an async value"));
        }
    })
}

fn tagged(name: &str, payload: Option<&Val>, budget: &mut Budget) -> Result<Value, FromValError> {
    let inner = match payload {
        Some(payload) => val_to_json(payload, budget)?,
        None => Value::Null,
    };
    let mut object = Map::with_capacity(1);
    object.insert(name.to_string(), inner);
    Ok(Value::Object(object))
}

fn float_json(f: f64) -> Value {
    match Number::from_f64(f) {
        Some(n) => Value::Number(n),
        None if f.is_nan() => Value::String("NaN".to_string()),
        None if f > 0.0 => Value::String("inf".to_string()),
        None => Value::String("-inf".to_string()),
    }
}

/// The byte budget of a result's JSON encoding.
#[derive(Debug)]
pub(crate) struct Budget {
    spent: usize,
    limit: usize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Self {
        Self { spent: 0, limit }
    }

    fn spend(&mut self, bytes: usize) -> Result<(), FromValError> {
        self.spent = self.spent.saturating_add(bytes);
        if self.spent > self.limit {
            Err(FromValError::TooLarge {
                at_least: self.spent,
            })
        } else {
            Ok(())
        }
    }
}
