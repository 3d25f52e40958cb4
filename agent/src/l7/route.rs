//! HTTP routes, shaped like Gateway API's HTTPRoute attached to a Service (the GAMMA mesh
//! profile) so the Kubernetes integration can feed the same type: matches on path, method and
//! headers; weighted backends (canary splits across Services); a request mirror; request and
//! per-try timeouts; retries.
//!
//! Which rule serves a request follows Gateway API precedence: an exact path beats a prefix, a
//! longer prefix beats a shorter one, then a rule with a method match, then the one with more
//! header matches, then config order. When routes attach to a service port and none matches,
//! the answer is 404, as Gateway API says; a service port without routes sends every request to
//! the service's own endpoints.
use std::{collections::HashSet, time::Duration};

use anyhow::{bail, Context, Result};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};

use crate::config::{is_dns_label, is_dns_subdomain};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    pub metadata: RouteMetadata,
    pub spec: HttpRouteSpec,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteMetadata {
    pub name: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// The services (of the route's namespace) whose traffic this route handles.
    pub parent_refs: Vec<ServiceRef>,
    pub rules: Vec<RouteRule>,
}

/// A service of the route's namespace, optionally one of its ports only.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct ServiceRef {
    pub name: String,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRule {
    /// Any one of them selects the rule; none = every request.
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    /// Where matching requests go, split by weight; none = the parent service itself.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
    #[serde(default)]
    pub timeouts: Option<RouteTimeouts>,
    #[serde(default)]
    pub retry: Option<RetrySpec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub method: Option<String>,
    /// All must be present with exactly these values.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    pub value: String,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    pub name: String,
    /// Defaults to the port the request was sent to.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteFilter {
    #[serde(rename = "type")]
    pub kind: FilterType,
    #[serde(default)]
    pub request_mirror: Option<RequestMirror>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum FilterType {
    RequestMirror,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: BackendRef,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteTimeouts {
    /// The whole request, retries included (Gateway API duration, e.g. "2s", "1m30s").
    #[serde(default)]
    pub request: Option<String>,
    /// Each try.
    #[serde(default)]
    pub backend_request: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    /// Retries after the first try (Gateway API's meaning of `attempts`).
    pub attempts: u32,
    /// Conditions by name: 5xx, gateway-error, connect-failure, reset, gRPC status names.
    #[serde(default)]
    pub on: Vec<String>,
    /// HTTP status codes retried in addition to `on`.
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub backoff: Option<String>,
    #[serde(default)]
    pub max_backoff: Option<String>,
    /// Retry methods that are not idempotent (POST, PATCH) too.
    #[serde(default)]
    pub non_idempotent: bool,
}

/// Parses a Gateway API duration: one to four `<number><unit>` parts, units h, m, s, ms
/// (e.g. "500ms", "1m30s").
pub fn parse_duration(text: &str) -> Result<Duration> {
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            bail!("duration {text:?}: expected 1 to 5 digits before each unit");
        }
        let value: u64 = rest[..digits]
            .parse()
            .with_context(|| format!("duration {text:?}"))?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            bail!("duration {text:?}: units are h, m, s and ms");
        };
        rest = &rest[len..];
        total += unit * u32::try_from(value).with_context(|| format!("duration {text:?}"))?;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        bail!("duration {text:?}: expected 1 to 4 parts such as \"2s\" or \"1m30s\"");
    }
    Ok(total)
}

/// A service port as routes refer to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortKey {
    pub namespace: String,
    pub name: String,
    pub port: u16,
}

/// Checks routes against the services they name, naming the offending entry. `service_ports`
/// lists every (namespace, name, port) the config defines.
pub fn validate_routes(
    routes: &[HttpRoute],
    service_ports: &HashSet<ServicePortKey>,
) -> Result<()> {
    let mut seen = HashSet::new();
    for (index, route) in routes.iter().enumerate() {
        let RouteMetadata { name, namespace } = &route.metadata;
        let entry = format!("routes[{index}] ({namespace}/{name})");
        if !is_dns_subdomain(name) {
            bail!("{entry}: name {name:?} is not a valid route name (DNS subdomain)");
        }
        if !is_dns_label(namespace) {
            bail!("{entry}: namespace {namespace:?} is not a DNS label");
        }
        if !seen.insert((namespace, name)) {
            bail!("{entry}: route {namespace}/{name} is defined twice");
        }
        if route.spec.parent_refs.is_empty() {
            bail!("{entry}: spec.parentRefs names no service");
        }
        let has_port = |service: &str, port: u16| {
            service_ports.contains(&ServicePortKey {
                namespace: namespace.clone(),
                name: service.to_owned(),
                port,
            })
        };
        let has_service = |service: &str| {
            service_ports
                .iter()
                .any(|key| key.namespace == *namespace && key.name == service)
        };
        let mut parent_ports = Vec::new();
        for (p, parent) in route.spec.parent_refs.iter().enumerate() {
            let at = format!("{entry}: spec.parentRefs[{p}]");
            match parent.port {
                Some(port) if !has_port(&parent.name, port) => {
                    bail!(
                        "{at}: service {namespace}/{} has no port {port}",
                        parent.name
                    )
                }
                None if !has_service(&parent.name) => {
                    bail!("{at}: no service {namespace}/{}", parent.name)
                }
                Some(port) => parent_ports.push(port),
                None => parent_ports.extend(
                    service_ports
                        .iter()
                        .filter(|key| key.namespace == *namespace && key.name == parent.name)
                        .map(|key| key.port),
                ),
            }
        }
        if route.spec.rules.is_empty() {
            bail!("{entry}: spec.rules is empty");
        }
        for (r, rule) in route.spec.rules.iter().enumerate() {
            let at = format!("{entry}: spec.rules[{r}]");
            // A backend without a port takes the request's port: every parent port must exist
            // on the backend service.
            let check_backend = |backend: &BackendRef, field: &str| -> Result<()> {
                if !has_service(&backend.name) {
                    bail!("{at}.{field}: no service {namespace}/{}", backend.name);
                }
                let ports: Vec<u16> = match backend.port {
                    Some(port) => vec![port],
                    None => parent_ports.clone(),
                };
                for port in ports {
                    if !has_port(&backend.name, port) {
                        bail!(
                            "{at}.{field}: service {namespace}/{} has no port {port}",
                            backend.name
                        );
                    }
                }
                Ok(())
            };
            for (b, backend) in rule.backend_refs.iter().enumerate() {
                check_backend(backend, &format!("backendRefs[{b}]"))?;
            }
            if !rule.backend_refs.is_empty() && rule.backend_refs.iter().all(|b| b.weight == 0) {
                bail!("{at}.backendRefs: every weight is 0, no request could be served");
            }
            for (f, filter) in rule.filters.iter().enumerate() {
                match (&filter.kind, &filter.request_mirror) {
                    (FilterType::RequestMirror, Some(mirror)) => {
                        check_backend(&mirror.backend_ref, &format!("filters[{f}].requestMirror"))?
                    }
                    (FilterType::RequestMirror, None) => {
                        bail!("{at}.filters[{f}]: type RequestMirror needs requestMirror")
                    }
                }
            }
            for (m, matched) in rule.matches.iter().enumerate() {
                check_match(&format!("{at}.matches[{m}]"), matched)?;
            }
            if let Some(timeouts) = &rule.timeouts {
                compile_timeouts(timeouts).with_context(|| format!("{at}.timeouts"))?;
            }
            if let Some(retry) = &rule.retry {
                compile_retry(retry, None).with_context(|| format!("{at}.retry"))?;
            }
        }
    }
    Ok(())
}

fn check_match(at: &str, matched: &RouteMatch) -> Result<()> {
    if let Some(path) = &matched.path {
        if !path.value.starts_with('/') {
            bail!("{at}.path.value {:?} must start with /", path.value);
        }
    }
    if let Some(method) = &matched.method {
        Method::from_bytes(method.as_bytes())
            .with_context(|| format!("{at}.method {method:?} is not an HTTP method"))?;
    }
    for (h, header) in matched.headers.iter().enumerate() {
        HeaderName::from_bytes(header.name.as_bytes())
            .with_context(|| format!("{at}.headers[{h}].name {:?}", header.name))?;
        HeaderValue::from_str(&header.value)
            .with_context(|| format!("{at}.headers[{h}].value {:?}", header.value))?;
    }
    Ok(())
}

/// Request and per-try timeouts of a rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub request: Option<Duration>,
    pub per_try: Option<Duration>,
}

pub fn compile_timeouts(timeouts: &RouteTimeouts) -> Result<Timeouts> {
    let parse = |value: &Option<String>, field: &str| {
        value
            .as_deref()
            .map(|text| parse_duration(text).with_context(|| field.to_owned()))
            .transpose()
    };
    let compiled = Timeouts {
        request: parse(&timeouts.request, "request")?,
        per_try: parse(&timeouts.backend_request, "backendRequest")?,
    };
    if let (Some(request), Some(per_try)) = (compiled.request, compiled.per_try) {
        if per_try > request {
            bail!("backendRequest ({per_try:?}) is longer than request ({request:?})");
        }
    }
    if compiled.request == Some(Duration::ZERO) || compiled.per_try == Some(Duration::ZERO) {
        bail!("a timeout of 0 would fail every request; omit it for no timeout");
    }
    Ok(compiled)
}

/// The retry policy a rule's `retry` block describes; `per_try` comes from its timeouts.
pub fn compile_retry(
    retry: &RetrySpec,
    per_try: Option<Duration>,
) -> Result<super::retry::RetryPolicy> {
    const MAX_RETRIES: u32 = 10;
    if retry.attempts > MAX_RETRIES {
        bail!(
            "attempts {} is more than {MAX_RETRIES} retries",
            retry.attempts
        );
    }
    let mut on = super::retry::RetryOn::parse(&retry.on).context("on")?;
    for code in &retry.codes {
        if !(100..=599).contains(code) {
            bail!("codes: {code} is not an HTTP status code");
        }
        on.status_codes.push(*code);
    }
    let defaults = super::retry::RetryPolicy::default();
    let duration = |value: &Option<String>, default: Duration, field: &str| {
        value
            .as_deref()
            .map_or(Ok(default), parse_duration)
            .with_context(|| field.to_owned())
    };
    let backoff_base = duration(&retry.backoff, defaults.backoff_base, "backoff")?;
    let backoff_max = duration(&retry.max_backoff, defaults.backoff_max, "maxBackoff")?;
    if backoff_max < backoff_base {
        bail!("maxBackoff ({backoff_max:?}) is shorter than backoff ({backoff_base:?})");
    }
    Ok(super::retry::RetryPolicy {
        attempts: retry.attempts + 1,
        per_try_timeout: per_try,
        backoff_base,
        backoff_max,
        on,
        non_idempotent: retry.non_idempotent,
    })
}

/// Whether `matched` selects a request with this method, path and headers.
pub fn matches(matched: &RouteMatch, method: &Method, path: &str, headers: &HeaderMap) -> bool {
    let path_ok = match &matched.path {
        None => true,
        Some(PathMatch {
            kind: PathMatchType::Exact,
            value,
        }) => path == value,
        Some(PathMatch {
            kind: PathMatchType::PathPrefix,
            value,
        }) => path_has_prefix(path, value),
    };
    path_ok
        && matched
            .method
            .as_deref()
            .is_none_or(|m| m == method.as_str())
        && matched.headers.iter().all(|h| {
            headers
                .get_all(h.name.as_str())
                .iter()
                .any(|v| v.as_bytes() == h.value.as_bytes())
        })
}

/// Gateway API prefixes match whole path segments: `/api` matches `/api` and `/api/x`, not
/// `/apix`.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

/// How specific a match is, for Gateway API precedence: larger wins.
pub fn specificity(matched: &RouteMatch) -> (u8, usize, bool, usize) {
    let (exact, prefix_len) = match &matched.path {
        Some(PathMatch {
            kind: PathMatchType::Exact,
            value,
        }) => (1, value.len()),
        Some(PathMatch {
            kind: PathMatchType::PathPrefix,
            value,
        }) => (0, value.trim_end_matches('/').len()),
        None => (0, 0),
    };
    (
        exact,
        prefix_len,
        matched.method.is_some(),
        matched.headers.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_gateway_api() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("1h1m1s1ms").unwrap(),
            Duration::from_millis(3_661_001)
        );
        for bad in [
            "",
            "2",
            "s",
            "1.5s",
            "2d",
            "1h1m1s1ms1s",
            "123456s",
            "-1s",
            "2 s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    fn request_match(path: Option<(PathMatchType, &str)>, headers: &[(&str, &str)]) -> RouteMatch {
        RouteMatch {
            path: path.map(|(kind, value)| PathMatch {
                kind,
                value: value.to_owned(),
            }),
            method: None,
            headers: headers
                .iter()
                .map(|(name, value)| HeaderMatch {
                    name: (*name).to_owned(),
                    value: (*value).to_owned(),
                })
                .collect(),
        }
    }

    #[test]
    fn prefixes_match_whole_segments_and_headers_exactly() {
        let api = request_match(Some((PathMatchType::PathPrefix, "/api/")), &[]);
        let none = HeaderMap::new();
        assert!(matches(&api, &Method::GET, "/api", &none));
        assert!(matches(&api, &Method::GET, "/api/v1", &none));
        assert!(!matches(&api, &Method::GET, "/apix", &none));
        let root = request_match(Some((PathMatchType::PathPrefix, "/")), &[]);
        assert!(matches(&root, &Method::GET, "/anything", &none));
        let exact = request_match(Some((PathMatchType::Exact, "/a")), &[]);
        assert!(!matches(&exact, &Method::GET, "/a/b", &none));
        let tenant = request_match(None, &[("x-tenant", "blue")]);
        let mut headers = HeaderMap::new();
        assert!(!matches(&tenant, &Method::GET, "/", &headers));
        headers.insert("x-tenant", HeaderValue::from_static("green"));
        assert!(!matches(&tenant, &Method::GET, "/", &headers));
        headers.append("x-tenant", HeaderValue::from_static("blue"));
        assert!(matches(&tenant, &Method::GET, "/", &headers));
        let post = RouteMatch {
            method: Some("POST".into()),
            ..RouteMatch::default()
        };
        assert!(!matches(&post, &Method::GET, "/", &none));
        assert!(matches(&post, &Method::POST, "/", &none));
    }

    #[test]
    fn precedence_orders_exact_then_longer_prefix_then_method_then_headers() {
        let exact = request_match(Some((PathMatchType::Exact, "/a")), &[]);
        let long = request_match(Some((PathMatchType::PathPrefix, "/a/b")), &[]);
        let short = request_match(Some((PathMatchType::PathPrefix, "/a")), &[("x", "1")]);
        let with_method = RouteMatch {
            method: Some("GET".into()),
            ..request_match(Some((PathMatchType::PathPrefix, "/a")), &[])
        };
        assert!(specificity(&exact) > specificity(&long));
        assert!(specificity(&long) > specificity(&short));
        assert!(specificity(&with_method) > specificity(&short));
    }

    fn ports() -> HashSet<ServicePortKey> {
        ["echo", "echo-v2"]
            .iter()
            .map(|name| ServicePortKey {
                namespace: "default".into(),
                name: (*name).into(),
                port: 80,
            })
            .collect()
    }

    fn route(yaml: &str) -> Vec<HttpRoute> {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn routes_are_checked_against_services() {
        let good = route(
            "- metadata: {name: r, namespace: default}\n  spec:\n    parentRefs: [{name: echo, port: 80}]\n    rules:\n      - backendRefs: [{name: echo, weight: 90}, {name: echo-v2, weight: 10}]\n        filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo-v2}}}]\n        timeouts: {request: 2s, backendRequest: 500ms}\n        retry: {attempts: 5, on: [gateway-error, connect-failure], codes: [429]}\n",
        );
        validate_routes(&good, &ports()).unwrap();
        let cases = [
            ("parentRefs: [{name: nope}]", "no service default/nope"),
            ("parentRefs: [{name: echo, port: 81}]", "has no port 81"),
        ];
        for (parent, expected) in cases {
            let bad = route(&format!(
                "- metadata: {{name: r, namespace: default}}\n  spec:\n    {parent}\n    rules: [{{}}]\n"
            ));
            let err = format!("{:#}", validate_routes(&bad, &ports()).unwrap_err());
            assert!(err.contains(expected) && err.contains("routes[0]"), "{err}");
        }
        let rule_cases = [
            (
                "{backendRefs: [{name: gone}]}",
                "backendRefs[0]: no service",
            ),
            (
                "{backendRefs: [{name: echo, weight: 0}]}",
                "every weight is 0",
            ),
            ("{filters: [{type: RequestMirror}]}", "needs requestMirror"),
            (
                "{timeouts: {request: 1s, backendRequest: 2s}}",
                "longer than",
            ),
            ("{timeouts: {request: 2 seconds}}", "request"),
            ("{retry: {attempts: 3, on: [sometimes]}}", "sometimes"),
            ("{retry: {attempts: 50}}", "more than 10"),
            ("{retry: {attempts: 1, codes: [42]}}", "not an HTTP status"),
            ("{matches: [{path: {value: api}}]}", "must start with /"),
            (
                "{matches: [{headers: [{name: 'a b', value: x}]}]}",
                "headers[0].name",
            ),
        ];
        for (rule, expected) in rule_cases {
            let bad = route(&format!(
                "- metadata: {{name: r, namespace: default}}\n  spec:\n    parentRefs: [{{name: echo}}]\n    rules: [{rule}]\n"
            ));
            let err = format!("{:#}", validate_routes(&bad, &ports()).unwrap_err());
            assert!(err.contains(expected), "{rule}: {err}");
        }
    }

    #[test]
    fn retry_attempts_count_retries_and_take_the_per_try_timeout() {
        let spec = RetrySpec {
            attempts: 5,
            on: vec!["5xx".into()],
            ..RetrySpec::default()
        };
        let policy = compile_retry(&spec, Some(Duration::from_millis(300))).unwrap();
        assert_eq!(policy.attempts, 6);
        assert_eq!(policy.per_try_timeout, Some(Duration::from_millis(300)));
        assert!(policy.on.server_errors);
    }
}
