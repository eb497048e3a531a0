//! Reading requests: JSON bodies, the wrapping object, typed fields with
//! errors naming the field, list parameters.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::errors::ApiError;
use crate::defaults::{BODY_LIMIT, LIST_LIMIT};

pub type ApiResult<T> = Result<T, ApiError>;

/// Read a JSON request body: at most 1 MiB, JSON content type (or none).
pub async fn read_json(headers: &HeaderMap, body: Body) -> ApiResult<Value> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if ct != "application/json" {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Unsupported Content-Type {ct:?}: send application/json"),
            ));
        }
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request is too large: the limit is {BODY_LIMIT} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > BODY_LIMIT as u64 {
            return Err(too_large());
        }
    }
    let bytes = axum::body::to_bytes(body, BODY_LIMIT)
        .await
        .map_err(|_| too_large())?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "Malformed request body: the body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("Malformed request body: {e}")))
}

/// Take `key` from a JSON object body; a body without it is 422, as in the reference.
pub fn wrapped(body: Value, key: &str) -> ApiResult<Value> {
    match body {
        Value::Object(mut m) => m.remove(key).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("Unable to process the contained instructions: the body needs a \"{key}\" object"),
            )
        }),
        _ => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("Unable to process the contained instructions: the body must be a JSON object with \"{key}\""),
        )),
    }
}

/// Read a JSON body, take its `key` object and deserialize it strictly.
pub async fn parse<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    key: &str,
) -> ApiResult<T> {
    typed(key, wrapped(read_json(headers, body).await?, key)?)
}

/// Deserialize strictly; the message names the field at fault.
pub fn typed<T: DeserializeOwned>(key: &str, v: Value) -> ApiResult<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            key.to_string()
        } else {
            format!("{key}.{path}")
        };
        ApiError::bad_request(format!("Invalid input for field {field}: {}", e.inner()))
    })
}

/// `force`: a JSON bool, 0/1, or a string true/false/yes/no/y/n/1/0 in any case.
pub fn parse_force(v: Option<&Value>) -> ApiResult<bool> {
    parse_bool("force", v)
}

/// `full` (a snapshot that stores every block): spelled as `force` is.
pub fn parse_full(v: Option<&Value>) -> ApiResult<bool> {
    parse_bool("full", v)
}

/// A boolean field as the reference spells `force`; a bad value is a 400
/// naming the field.
pub fn parse_bool(field: &str, v: Option<&Value>) -> ApiResult<bool> {
    let invalid = |s: &str| ApiError::bad_request(format!("Invalid value '{s}' for {field}. "));
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(1) => Ok(true),
            Some(0) => Ok(false),
            _ => Err(invalid(&n.to_string())),
        },
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "1" | "on" | "t" => Ok(true),
            "false" | "no" | "n" | "0" | "off" | "f" => Ok(false),
            _ => Err(invalid(s)),
        },
        Some(other) => Err(invalid(&other.to_string())),
    }
}

/// A size in GB: a number or a string of digits. Anything else is given to
/// the operation as 0, which it refuses with the size message.
pub fn parse_size(v: &Option<Value>) -> Option<u64> {
    match v {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_u64().unwrap_or(0)),
        Some(Value::String(s)) => Some(s.trim().parse::<u64>().unwrap_or(0)),
        Some(_) => Some(0),
    }
}

/// List parameters of v1: limit, offset and filters.
#[derive(Debug, Default)]
pub struct ListParams {
    pub limit: usize,
    pub offset: usize,
    pub status: Option<String>,
    pub volume_id: Option<String>,
    pub display_name: Option<String>,
}

pub fn list_params(q: &BTreeMap<String, String>) -> ApiResult<ListParams> {
    let num = |name: &str| -> ApiResult<Option<i64>> {
        match q.get(name) {
            None => Ok(None),
            Some(v) => {
                let n: i64 = v.trim().parse().map_err(|_| {
                    ApiError::bad_request(format!("{name} param must be an integer"))
                })?;
                if n < 0 {
                    return Err(ApiError::bad_request(format!(
                        "{name} param must be positive"
                    )));
                }
                Ok(Some(n))
            }
        }
    };
    let limit = match num("limit")? {
        None | Some(0) => LIST_LIMIT,
        Some(n) => (n as usize).min(LIST_LIMIT),
    };
    Ok(ListParams {
        limit,
        offset: num("offset")?.unwrap_or(0) as usize,
        status: q.get("status").cloned(),
        volume_id: q.get("volume_id").cloned(),
        display_name: q.get("display_name").cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn force_accepts_the_references_spellings() {
        for (v, want) in [
            (json!(true), true),
            (json!(false), false),
            (json!("YES"), true),
            (json!("n"), false),
            (json!("1"), true),
            (json!("0"), false),
            (json!("True"), true),
            (json!(1), true),
            (json!(0), false),
        ] {
            assert_eq!(parse_force(Some(&v)).unwrap(), want, "{v}");
        }
        assert!(!parse_force(None).unwrap());
        let e = parse_force(Some(&json!("maybe"))).unwrap_err();
        assert_eq!(e.message, "Invalid value 'maybe' for force. ");
        assert!(parse_force(Some(&json!(2))).is_err());
        assert!(parse_force(Some(&json!([]))).is_err());
    }

    #[test]
    fn full_is_spelled_as_force_and_a_bad_value_names_it() {
        assert!(parse_full(Some(&json!(true))).unwrap());
        assert!(parse_full(Some(&json!("yes"))).unwrap());
        assert!(!parse_full(Some(&json!(0))).unwrap());
        assert!(!parse_full(None).unwrap());
        let e = parse_full(Some(&json!("always"))).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.message, "Invalid value 'always' for full. ");
    }

    #[test]
    fn list_params_follow_the_reference() {
        let q = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(list_params(&q(&[])).unwrap().limit, 1000);
        assert_eq!(list_params(&q(&[("limit", "0")])).unwrap().limit, 1000);
        assert_eq!(list_params(&q(&[("limit", "5000")])).unwrap().limit, 1000);
        assert_eq!(
            list_params(&q(&[("limit", "3"), ("offset", "2")]))
                .unwrap()
                .offset,
            2
        );
        assert_eq!(
            list_params(&q(&[("limit", "x")])).unwrap_err().message,
            "limit param must be an integer"
        );
        assert_eq!(
            list_params(&q(&[("limit", "-1")])).unwrap_err().message,
            "limit param must be positive"
        );
        assert_eq!(
            list_params(&q(&[("offset", "-1")])).unwrap_err().message,
            "offset param must be positive"
        );
    }

    #[test]
    fn sizes_that_are_not_whole_gb_become_zero() {
        assert_eq!(parse_size(&None), None);
        assert_eq!(parse_size(&Some(json!(3))), Some(3));
        assert_eq!(parse_size(&Some(json!("4"))), Some(4));
        assert_eq!(parse_size(&Some(json!(-1))), Some(0));
        assert_eq!(parse_size(&Some(json!(1.5))), Some(0));
        assert_eq!(parse_size(&Some(json!([1]))), Some(0));
    }
}
