//! Outbound HTTP for jobs granted it in `jobs.toml` (`[job.http]`), over
//! `wasi:http/outgoing-handler`. The host refuses anything outside the grant
//! before connecting; the refusal arrives here as an error.

use wasi::http::outgoing_handler;
use wasi::http::types::{ErrorCode, Fields, Method, OutgoingRequest, Scheme};
use wasi::io::streams::StreamError;

/// A response: status and the whole body.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The body bytes.
    pub body: Vec<u8>,
}

/// Why a request failed.
#[derive(Debug, Clone)]
pub struct HttpError(pub String);

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<HttpError> for crate::JobError {
    fn from(e: HttpError) -> Self {
        crate::JobError::new(format!("http: {e}"))
    }
}

fn code(e: ErrorCode) -> HttpError {
    HttpError(match e {
        ErrorCode::HttpRequestDenied => {
            "request denied by the host (not granted or not allow-listed)".into()
        }
        ErrorCode::DestinationIpProhibited => "destination address prohibited by the host".into(),
        other => format!("{other:?}"),
    })
}

/// `GET url` (`http://host[:port]/path` or `https://...`).
pub fn get(url: &str) -> Result<Response, HttpError> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", rest)) => (Scheme::Http, rest),
        Some(("https", rest)) => (Scheme::Https, rest),
        _ => return Err(HttpError(format!("unsupported URL `{url}`"))),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    let bad = |what: &str| HttpError(format!("invalid {what} in `{url}`"));
    request
        .set_method(&Method::Get)
        .map_err(|_| bad("method"))?;
    request
        .set_scheme(Some(&scheme))
        .map_err(|_| bad("scheme"))?;
    request
        .set_authority(Some(authority))
        .map_err(|_| bad("authority"))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|_| bad("path"))?;
    let pending = outgoing_handler::handle(request, None).map_err(code)?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(e))) => return Err(code(e)),
        Some(Err(())) | None => return Err(HttpError("response already taken".into())),
    };
    let status = response.status();
    let incoming = response
        .consume()
        .map_err(|_| HttpError("no body".into()))?;
    let stream = incoming
        .stream()
        .map_err(|_| HttpError("no body stream".into()))?;
    let mut body = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => body.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(HttpError(format!(
                    "reading the body failed: {}",
                    e.to_debug_string()
                )));
            }
        }
    }
    Ok(Response { status, body })
}
