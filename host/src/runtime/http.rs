//! Outbound HTTP as a granted capability (`wasi:http/outgoing-handler`).
//!
//! Denied unless the job's `jobs.toml` entry has an `[job.http]` grant. A
//! granted request must name an allowed `host` or `host:port`; its host is then
//! resolved and **every** resolved address is checked *before any connection
//! is made*: loopback, RFC 1918, link-local (169.254/16, where cloud metadata
//! lives), CGNAT 100.64/10, IPv6 ULA and link-local, unspecified, broadcast and
//! multicast are refused unless the grant sets `allow-private = true`. Plain
//! HTTP is then sent to the address that was checked (no second lookup that a
//! rebinding DNS server could answer differently). Each request has a timeout
//! and a response-size cap. Refusals reach the plugin as wasi:http errors and
//! are logged with the job (`outbound HTTP refused`, `stage = "before-connect"`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

pub use crate::config::HttpGrant;

/// Why a request was refused before any connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The job has no HTTP grant.
    NotGranted,
    /// `host:port` is not in the job's allow-list.
    NotAllowed(String),
    /// The host resolves to an internal address and private targets are not allowed.
    Internal(IpAddr),
    /// The host did not resolve.
    Unresolvable(String),
    /// The URL has no host.
    NoHost,
    /// HTTPS, which cannot be pinned to the checked address (the TLS client
    /// resolves the host again), and the grant does not accept that.
    UnpinnedHttps,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotGranted => write!(f, "outbound HTTP is not granted to this job"),
            Refusal::NotAllowed(a) => write!(f, "`{a}` is not in the job's HTTP allow-list"),
            Refusal::Internal(ip) => write!(
                f,
                "{ip} is an internal address (loopback, private, link-local/metadata, CGNAT, ...); set allow-private to reach it"
            ),
            Refusal::Unresolvable(h) => write!(f, "`{h}` does not resolve"),
            Refusal::NoHost => write!(f, "the URL has no host"),
            Refusal::UnpinnedHttps => write!(
                f,
                "HTTPS cannot be pinned to the address that was checked (the TLS client resolves the host again, so a DNS answer that changes in between is not caught); set allow-unpinned-https in [job.http] to accept that"
            ),
        }
    }
}

/// Whether `ip` is an address jobs may not reach without `allow-private`.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64.0.0/10
                || a == 0 // "this network"
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
        }
    }
}

fn allowed(grant: &HttpGrant, host: &str, port: u16) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    grant.allow.iter().any(|entry| {
        let (h, p) = match entry.rsplit_once(':') {
            // `[::1]:8080`, `host:8080`; a bare IPv6 address has several colons.
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, p.parse::<u16>().ok()),
            _ => (entry.as_str(), None),
        };
        let h = h.trim_start_matches('[').trim_end_matches(']');
        h.eq_ignore_ascii_case(host) && p.is_none_or(|p| p == port)
    })
}

/// Decides a request before any connection: grant, allow-list, then every
/// resolved address. `resolve` is the resolver (a stub in tests).
pub async fn decide<R, F>(
    grant: Option<&HttpGrant>,
    host: Option<&str>,
    port: u16,
    https: bool,
    resolve: R,
) -> Result<Vec<SocketAddr>, Refusal>
where
    R: FnOnce(String, u16) -> F,
    F: Future<Output = std::io::Result<Vec<SocketAddr>>>,
{
    let grant = grant.ok_or(Refusal::NotGranted)?;
    let host = host.ok_or(Refusal::NoHost)?;
    if !allowed(grant, host, port) {
        return Err(Refusal::NotAllowed(format!("{host}:{port}")));
    }
    // Fail closed: plain HTTP goes to the checked address; HTTPS would not.
    if https && !grant.allow_unpinned_https {
        return Err(Refusal::UnpinnedHttps);
    }
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addrs = resolve(bare.clone(), port)
        .await
        .map_err(|_| Refusal::Unresolvable(bare.clone()))?;
    if addrs.is_empty() {
        return Err(Refusal::Unresolvable(bare));
    }
    if !grant.allow_private
        && let Some(bad) = addrs.iter().find(|a| is_internal(a.ip()))
    {
        return Err(Refusal::Internal(bad.ip()));
    }
    Ok(addrs)
}

/// The `wasi:http` hooks of one run: the job's grant, enforced in `send_request`.
pub struct HttpPolicy {
    job: Arc<str>,
    grant: Option<HttpGrant>,
}

impl HttpPolicy {
    /// The policy for `job` with its grant (`None`: all requests refused).
    pub fn new(job: Arc<str>, grant: Option<HttpGrant>) -> Self {
        Self { job, grant }
    }
}

type ResponseFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                ),
                HttpError,
            >,
        > + Send,
>;

impl WasiHttpHooks for HttpPolicy {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> ResponseFuture {
        let _ = fut;
        let job = self.job.clone();
        let grant = self.grant.clone();
        Box::new(async move {
            let uri = request.uri().clone();
            let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
            let decided = decide(grant.as_ref(), uri.host(), port, https, |h, p| async move {
                tokio::net::lookup_host((h.as_str(), p))
                    .await
                    .map(Iterator::collect)
            })
            .await;
            let addrs = match decided {
                Ok(a) => a,
                Err(refusal) => {
                    tracing::warn!(job = %job, authority = %authority, reason = %refusal, stage = "before-connect", "outbound HTTP refused");
                    return Err(match refusal {
                        Refusal::Internal(_) => HttpError::DestinationIpProhibited,
                        Refusal::Unresolvable(_) | Refusal::NoHost => {
                            HttpError::DestinationNotFound
                        }
                        Refusal::NotGranted | Refusal::NotAllowed(_) | Refusal::UnpinnedHttps => {
                            HttpError::HttpRequestDenied
                        }
                    });
                }
            };
            let Some(grant) = grant else {
                return Err(HttpError::HttpRequestDenied);
            };
            tracing::debug!(job = %job, authority = %authority, addr = %addrs[0], "outbound HTTP allowed");
            if !https {
                // Send to the address that was checked, not a second lookup.
                // Fail closed: a request that cannot be pinned is not sent.
                match pin(uri, addrs[0]) {
                    Some(u) => *request.uri_mut() = u,
                    None => {
                        tracing::warn!(job = %job, authority = %authority, stage = "pin", "outbound HTTP refused: cannot pin the request to the checked address");
                        return Err(HttpError::HttpRequestDenied);
                    }
                }
            }
            let cap = |given: Option<Duration>| {
                Some(given.map_or(grant.timeout, |g| g.min(grant.timeout)))
            };
            let options = RequestOptions {
                connect_timeout: cap(options.as_ref().and_then(|o| o.connect_timeout)),
                first_byte_timeout: cap(options.as_ref().and_then(|o| o.first_byte_timeout)),
                between_bytes_timeout: cap(options.as_ref().and_then(|o| o.between_bytes_timeout)),
            };
            let (response, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            let limit = grant.max_response_bytes;
            let response = response.map(|body| {
                http_body_util::Limited::new(body, limit)
                    .map_err(move |e| match e.downcast::<HttpError>() {
                        Ok(e) => *e,
                        Err(_) => HttpError::HttpResponseBodySize(Some(limit as u64)),
                    })
                    .boxed_unsync()
            });
            Ok((response, Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

/// `uri` with its authority replaced by the checked address, or `None` if
/// that cannot be built.
fn pin(uri: http::Uri, addr: SocketAddr) -> Option<http::Uri> {
    let mut parts = uri.into_parts();
    parts.authority = Some(addr.to_string().parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_pinned_to_the_checked_address() {
        let uri: http::Uri = "http://example.test:8080/a?b=1".parse().unwrap();
        let v4 = pin(uri.clone(), "127.0.0.1:8080".parse().unwrap()).unwrap();
        assert_eq!(v4.to_string(), "http://127.0.0.1:8080/a?b=1");
        let v6 = pin(uri, "[::1]:8080".parse().unwrap()).unwrap();
        assert_eq!(v6.to_string(), "http://[::1]:8080/a?b=1");
    }

    fn grant(allow: &[&str], allow_private: bool) -> HttpGrant {
        HttpGrant {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            allow_private,
            allow_unpinned_https: false,
            timeout: Duration::from_secs(5),
            max_response_bytes: 1 << 20,
        }
    }

    #[tokio::test]
    async fn https_is_refused_unless_the_grant_accepts_unpinned_tls() {
        let mut g = grant(&["status.example.com"], false);
        let refused = decide(
            Some(&g),
            Some("status.example.com"),
            443,
            true,
            stub("93.184.216.34"),
        )
        .await
        .unwrap_err();
        assert_eq!(refused, Refusal::UnpinnedHttps);
        assert!(refused.to_string().contains("allow-unpinned-https"));
        // Plain HTTP to the same host is checked and pinned.
        assert!(
            decide(
                Some(&g),
                Some("status.example.com"),
                80,
                false,
                stub("93.184.216.34")
            )
            .await
            .is_ok()
        );
        g.allow_unpinned_https = true;
        assert!(
            decide(
                Some(&g),
                Some("status.example.com"),
                443,
                true,
                stub("93.184.216.34")
            )
            .await
            .is_ok()
        );
        // Internal addresses stay refused over HTTPS too.
        assert_eq!(
            decide(
                Some(&g),
                Some("status.example.com"),
                443,
                true,
                stub("10.0.0.1")
            )
            .await,
            Err(Refusal::Internal("10.0.0.1".parse().unwrap()))
        );
    }

    /// A resolver that answers from a table and never touches the network.
    fn stub(
        ip: &'static str,
    ) -> impl FnOnce(String, u16) -> std::future::Ready<std::io::Result<Vec<SocketAddr>>> {
        move |_, port| std::future::ready(Ok(vec![SocketAddr::new(ip.parse().unwrap(), port)]))
    }

    #[tokio::test]
    async fn metadata_and_private_addresses_are_refused_before_connecting() {
        let g = grant(
            &[
                "169.254.169.254",
                "10.0.0.1",
                "internal.example",
                "[::1]:80",
            ],
            false,
        );
        for (host, ip) in [
            ("169.254.169.254", "169.254.169.254"),
            ("10.0.0.1", "10.0.0.1"),
            // DNS that points a public-looking name at a private address.
            ("internal.example", "192.168.1.10"),
            ("internal.example", "100.64.0.1"),
            ("internal.example", "fd00::1"),
            ("internal.example", "fe80::1"),
            ("internal.example", "::ffff:127.0.0.1"),
            ("[::1]", "::1"),
        ] {
            let verdict = decide(Some(&g), Some(host), 80, false, stub(ip)).await;
            assert_eq!(
                verdict,
                Err(Refusal::Internal(ip.parse().unwrap())),
                "{host} -> {ip}"
            );
        }
    }

    #[tokio::test]
    async fn the_grant_and_allow_list_come_first() {
        let refused = decide(None, Some("example.com"), 80, false, stub("93.184.216.34")).await;
        assert_eq!(refused, Err(Refusal::NotGranted));
        let g = grant(&["api.example.com:443", "example.com"], false);
        assert_eq!(
            decide(
                Some(&g),
                Some("other.com"),
                80,
                false,
                stub("93.184.216.34")
            )
            .await,
            Err(Refusal::NotAllowed("other.com:80".into()))
        );
        assert_eq!(
            decide(
                Some(&g),
                Some("api.example.com"),
                80,
                false,
                stub("93.184.216.34")
            )
            .await,
            Err(Refusal::NotAllowed("api.example.com:80".into()))
        );
        assert!(
            decide(
                Some(&g),
                Some("API.example.com"),
                443,
                false,
                stub("93.184.216.34")
            )
            .await
            .is_ok()
        );
        assert!(
            decide(
                Some(&g),
                Some("example.com"),
                8080,
                false,
                stub("93.184.216.34")
            )
            .await
            .is_ok()
        );
    }

    #[tokio::test]
    async fn allow_private_opens_internal_addresses() {
        let g = grant(&["127.0.0.1"], true);
        assert!(
            decide(Some(&g), Some("127.0.0.1"), 8080, false, stub("127.0.0.1"))
                .await
                .is_ok()
        );
    }

    #[test]
    fn public_addresses_are_not_internal() {
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "100.128.0.1",
            "172.32.0.1",
        ] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "172.16.0.1",
            "172.31.255.255",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
    }
}
