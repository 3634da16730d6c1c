//! The JSON request body: read within a size limit, parsed once into a typed value, and every
//! failure turned into an error that names the problem (and the field, when there is one).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use crate::error::ApiError;
use crate::state::AppState;

/// A JSON body parsed into `T`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(ApiError::unsupported_media_type());
        }
        let limit = state.body_limit();
        let too_large = || {
            ApiError::too_large(
                "body_too_large",
                format!("the request body is larger than {limit} bytes"),
            )
        };
        // A declared length past the limit is refused before any of the body is read.
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| too_large())?;
        parse(&bytes).map(JsonBody)
    }
}

/// A missing content type is accepted as JSON; a declared one must be JSON.
fn is_json(value: Option<&header::HeaderValue>) -> bool {
    let Some(value) = value else { return true };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let mime = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Parses a JSON body, telling syntax errors (400) from errors of shape (422).
pub fn parse<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::invalid_json(
            "the request body is empty; send a JSON object",
        ));
    }
    // serde also accepts a struct written as an array of its fields; a request is an object.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => ApiError::invalid_field("the request body must be a JSON object"),
                Err(e) => ApiError::invalid_json(format!("the body is not valid JSON: {e}")),
            },
        );
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            Category::Data => {
                let message = if path == "." {
                    inner.to_string()
                } else {
                    format!("field `{path}`: {inner}")
                };
                ApiError::invalid_field(message)
            }
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::invalid_json(format!("the body is not valid JSON: {inner}"))
            }
        }
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::invalid_json(format!("trailing data after the JSON value: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use pyrunner_shared::RunRequest;

    fn status_and_message(body: &[u8]) -> (u16, String) {
        let err = parse::<RunRequest>(&Bytes::copy_from_slice(body)).unwrap_err();
        let response = axum::response::IntoResponse::into_response(err);
        (
            response.status().as_u16(),
            format!("{:?}", response.into_body()),
        )
    }

    #[test]
    fn syntax_errors_are_400_and_shape_errors_are_422() {
        assert_eq!(status_and_message(b"").0, 400);
        assert_eq!(status_and_message(b"{").0, 400);
        assert_eq!(status_and_message(b"{\"code\": \"\xff\"}").0, 400);
        assert_eq!(status_and_message(b"{\"code\": \"\\ud800\"}").0, 400);
        assert_eq!(status_and_message(b"{\"code\": \"1\"} x").0, 400);
        assert_eq!(status_and_message(b"{}").0, 422);
        assert_eq!(status_and_message(b"[]").0, 422);
        assert_eq!(status_and_message(b"[\"print(1)\"]").0, 422);
        assert_eq!(status_and_message(b"\"print(1)\"").0, 422);
        assert_eq!(status_and_message(b"[1,").0, 400);
        assert_eq!(status_and_message(b"{\"code\": 1}").0, 422);
        assert_eq!(
            status_and_message(b"{\"code\": \"1\", \"timeout_ms\": \"5\"}").0,
            422
        );
        assert_eq!(
            status_and_message(b"{\"code\": \"1\", \"timeout_ms\": -5}").0,
            422
        );
        assert_eq!(
            status_and_message(b"{\"code\": \"1\", \"extra\": 1}").0,
            422
        );
    }

    #[test]
    fn parses_a_valid_request() {
        let r: RunRequest = parse(&Bytes::from_static(
            b"{\"code\":\"print(1)\",\"stdin\":null}",
        ))
        .unwrap();
        assert_eq!(r.code, "print(1)");
        assert!(r.stdin.is_none());
    }

    #[test]
    fn content_types() {
        assert!(is_json(None));
        assert!(is_json(Some(&HeaderValue::from_static(
            "application/json; charset=utf-8"
        ))));
        assert!(is_json(Some(&HeaderValue::from_static(
            "application/vnd.api+json"
        ))));
        assert!(!is_json(Some(&HeaderValue::from_static(
            "application/x-www-form-urlencoded"
        ))));
        assert!(!is_json(Some(&HeaderValue::from_static("text/plain"))));
    }
}
