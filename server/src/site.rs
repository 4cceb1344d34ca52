//! Which hosts and sites may use the service from a browser.
//!
//! Without a token (the default) a page on any other site open in an
//! engineer's browser could post a form here (no preflight for a form), and
//! a rebound DNS name could read the answers. So every request but the
//! health checks must name an accepted `Host`: an IP address, `localhost`
//! (or a `*.localhost` name), or one given with `--allow-host` (`*.example`
//! for a domain's names, `*` for any); rebinding always carries the
//! attacker's own name. And a request that can change something (any
//! method but GET, HEAD and OPTIONS) is refused when the browser says it
//! comes from another site: `Sec-Fetch-Site` other than `same-origin` or
//! `none`, or an `Origin` that is not this server's. Programs (curl,
//! tritonclient, bots) send neither header and are not affected; the web
//! page's own requests are same-origin.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

/// Routes open without a token and to any host (health checks leak
/// nothing, and probes name the pod by its address or any name).
pub const HEALTH_ROUTES: [&str; 4] = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"];

/// The host part of a `Host` value or an origin's authority, lower-cased,
/// without the port (IPv6 keeps its brackets off).
fn host_name(authority: &str) -> String {
    let authority = authority.trim();
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `host` (from [`host_name`]) is accepted with the extra names
/// `allowed` (`--allow-host`).
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    if host.parse::<IpAddr>().is_ok() || host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    allowed.iter().any(|pattern| {
        let pattern = pattern.trim().trim_end_matches('.').to_ascii_lowercase();
        match pattern.strip_prefix('*') {
            Some("") => true,
            Some(suffix) if suffix.starts_with('.') => host.ends_with(suffix),
            _ => host == pattern,
        }
    })
}

/// Why a browser request from another site is refused, if it is.
fn cross_site(headers: &HeaderMap) -> Option<String> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site")
        && !matches!(site.trim(), "same-origin" | "none")
    {
        return Some(format!(
            "a write from another site (Sec-Fetch-Site: {site}) is refused; use the page this \
             server serves, or a program (no Origin header)"
        ));
    }
    let origin = text(header::ORIGIN.as_str())?;
    let host = text(header::HOST.as_str()).unwrap_or("");
    let authority = origin
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'));
    let same = authority.is_some_and(|a| a.eq_ignore_ascii_case(host.trim()));
    (!same).then(|| {
        format!(
            "a write from another origin ({origin}) is refused; use the page this server serves, \
             or a program (no Origin header)"
        )
    })
}

/// Refuses requests for a host not accepted and writes from other sites
/// (the module's rules), with 403.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if HEALTH_ROUTES.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let headers = request.headers();
    if let Some(host) = headers.get(header::HOST) {
        let name = host.to_str().map(host_name).unwrap_or_default();
        if !host_allowed(&name, &state.config().allowed_hosts) {
            return ApiError::forbidden(
                "host_not_allowed",
                format!(
                    "the host {name:?} is not served; start the server with --allow-host \
                     {name} to accept it"
                ),
            )
            .into_response();
        }
    }
    let reads = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !reads && let Some(reason) = cross_site(headers) {
        return ApiError::forbidden("cross_site", reason).into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn hosts_accepted_by_default_and_by_pattern() {
        for ok in [
            "127.0.0.1:8080",
            "[::1]:80",
            "localhost",
            "LOCALHOST:1",
            "a.localhost",
            "10.0.0.7",
        ] {
            assert!(host_allowed(&host_name(ok), &[]), "{ok}");
        }
        for bad in ["evil.example:8080", "localhost.evil.example", "example", ""] {
            assert!(!host_allowed(&host_name(bad), &[]), "{bad}");
        }
        let allowed = vec![
            "cells.factory.example".to_owned(),
            "*.svc.cluster.local".to_owned(),
        ];
        assert!(host_allowed(
            &host_name("cells.factory.example:8080"),
            &allowed
        ));
        assert!(host_allowed(&host_name("x.ns.svc.cluster.local"), &allowed));
        assert!(!host_allowed(
            &host_name("svc.cluster.local.evil"),
            &allowed
        ));
        assert!(host_allowed("anything", &["*".to_owned()]));
    }

    #[test]
    fn writes_from_other_sites_are_named() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.insert(*k, HeaderValue::from_static(v));
            }
            map
        };
        assert!(cross_site(&headers(&[("host", "127.0.0.1:8080")])).is_none());
        assert!(
            cross_site(&headers(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://127.0.0.1:8080"),
                ("sec-fetch-site", "same-origin"),
            ]))
            .is_none()
        );
        for bad in [
            &[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://evil.example"),
            ][..],
            &[("host", "127.0.0.1:8080"), ("origin", "null")],
            &[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://127.0.0.1:9090"),
            ],
            &[("host", "127.0.0.1:8080"), ("sec-fetch-site", "cross-site")],
            &[("host", "127.0.0.1:8080"), ("sec-fetch-site", "same-site")],
        ] {
            assert!(cross_site(&headers(bad)).is_some(), "{bad:?}");
        }
    }
}
