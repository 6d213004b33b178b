//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
//! the HTTP status SDKs map to their exception classes.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::web::server::ApiError;

#[derive(Debug)]
pub struct OpenAiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
}

impl OpenAiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: message.into(),
            param: None,
        }
    }

    /// A bad request field (400).
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(400, message)
        }
    }

    /// OpenAI's `type` and `code` for the status.
    fn kind(&self) -> (&'static str, Option<&'static str>) {
        match self.status.as_u16() {
            400 => ("invalid_request_error", None),
            401 => ("authentication_error", Some("invalid_api_key")),
            402 => ("insufficient_quota", Some("insufficient_quota")),
            404 => ("invalid_request_error", Some("model_not_found")),
            429 => ("rate_limit_error", Some("rate_limit_exceeded")),
            503 => ("server_error", Some("model_not_ready")),
            _ => ("server_error", None),
        }
    }
}

impl OpenAiError {
    /// `{"error": {...}}`: the response body, and the event a failed stream ends with.
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.kind();
        json!({ "error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": code,
        }})
    }
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self::new(e.status.as_u16(), e.message)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
