//! L4 authorization policy, shaped like a Kubernetes custom resource (metadata + spec) so the
//! Kubernetes integration can feed the same type.
//!
//! Evaluation follows Istio's L4 AuthorizationPolicy semantics: a policy applies to the workloads
//! of its own namespace that its selector picks; any matching DENY rule denies; otherwise, when an
//! ALLOW policy applies, one of the ALLOW rules must match; with no applicable policy the
//! connection is allowed.
use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::config::{is_dns_label, is_dns_subdomain};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub metadata: PolicyMetadata,
    pub spec: PolicySpec,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct PolicyMetadata {
    pub name: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    /// Workloads of the policy's namespace it applies to; absent = all of them.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    pub action: PolicyAction,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyAction {
    Allow,
    Deny,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// SPIFFE IDs, e.g. `spiffe://cluster.local/ns/prod/sa/web`.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// Checks policies as they come from the config file, naming the offending entry.
pub fn validate_policies(policies: &[AuthorizationPolicy]) -> Result<()> {
    let mut seen = HashSet::new();
    for (index, policy) in policies.iter().enumerate() {
        let PolicyMetadata { name, namespace } = &policy.metadata;
        let entry = format!("policies[{index}] ({namespace}/{name})");
        if !is_dns_subdomain(name) {
            bail!("{entry}: name {name:?} is not a valid policy name (DNS subdomain)");
        }
        if !is_dns_label(namespace) {
            bail!("{entry}: namespace {namespace:?} is not a DNS label");
        }
        if !seen.insert((namespace.as_str(), name.as_str())) {
            bail!("{entry}: policy {namespace}/{name} is defined twice");
        }
        if let Some(selector) = &policy.spec.selector {
            for (key, value) in &selector.match_labels {
                if key.is_empty() || value.is_empty() {
                    bail!(
                        "{entry}: selector.matchLabels has an empty key or value ({key:?}: {value:?})"
                    );
                }
            }
        }
        for (r, rule) in policy.spec.rules.iter().enumerate() {
            check_rule(&entry, &format!("rules[{r}]"), rule)?;
        }
    }
    Ok(())
}

fn check_rule(entry: &str, at: &str, rule: &Rule) -> Result<()> {
    for (f, from) in rule.from.iter().enumerate() {
        let source = &from.source;
        // An empty source would match every peer, plaintext included, which is never what a
        // written-out source means; omitting `from` is the explicit way to say "any source".
        if source.principals.is_empty() && source.namespaces.is_empty() {
            bail!(
                "{entry}: {at}.from[{f}].source names neither principals nor namespaces; \
                 omit `from` to match any source"
            );
        }
        for (p, principal) in source.principals.iter().enumerate() {
            if !is_spiffe_principal(principal) {
                bail!(
                    "{entry}: {at}.from[{f}].source.principals[{p}] {principal:?} is not of the \
                     form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
                );
            }
        }
        for (n, namespace) in source.namespaces.iter().enumerate() {
            if !is_dns_label(namespace) {
                bail!(
                    "{entry}: {at}.from[{f}].source.namespaces[{n}] {namespace:?} is not a DNS label"
                );
            }
        }
    }
    for (t, to) in rule.to.iter().enumerate() {
        let ports = &to.operation.ports;
        // Same ambiguity as an empty source: omitting `to` is the way to say "any port".
        if ports.is_empty() {
            bail!("{entry}: {at}.to[{t}].operation lists no ports; omit `to` to match any port");
        }
        if ports.contains(&0) {
            bail!("{entry}: {at}.to[{t}].operation.ports contains 0, which is not a port");
        }
    }
    Ok(())
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, the shape of the identities
/// weft issues; anything else could never equal a peer's identity, so it is a typo.
fn is_spiffe_principal(s: &str) -> bool {
    let Some(path) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let parts: Vec<&str> = path.split('/').collect();
    matches!(
        parts.as_slice(),
        [trust_domain, "ns", namespace, "sa", service_account]
            if is_trust_domain(trust_domain)
                && is_dns_label(namespace)
                && is_dns_subdomain(service_account)
    )
}

/// The SPIFFE trust-domain alphabet: lowercase letters, digits, `.`, `-` and `_`.
fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// Kubernetes object names: dot-separated DNS labels, at most 253 characters.
/// Who is connecting to what, as the destination agent sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// SPIFFE URI from the peer's certificate; `None` for plaintext.
    pub source_principal: Option<&'a str>,
    /// Namespace of the source identity; `None` for plaintext.
    pub source_namespace: Option<&'a str>,
    pub destination_namespace: &'a str,
    pub destination_labels: &'a BTreeMap<String, String>,
    pub destination_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        /// `namespace/name` of the DENY policy that matched, or [`NO_ALLOW_MATCHED`] when ALLOW
        /// policies apply and none of them matched.
        policy: String,
    },
}

/// What [`Decision::Deny`] names when the connection was denied for lack of a matching ALLOW rule.
pub const NO_ALLOW_MATCHED: &str = "no ALLOW policy matched";

/// Policies arranged for per-connection evaluation; build once per config.
///
/// Expects policies that passed [`validate_policies`]; fields left empty constrain nothing.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    /// A policy only ever applies to workloads of its own namespace, so one lookup narrows the
    /// candidates to those that can matter.
    by_namespace: HashMap<String, NamespacePolicies>,
}

#[derive(Clone, Debug, Default)]
struct NamespacePolicies {
    deny: Vec<CompiledPolicy>,
    allow: Vec<CompiledPolicy>,
}

#[derive(Clone, Debug)]
struct CompiledPolicy {
    /// `namespace/name`, formatted once rather than on every denial.
    id: String,
    /// Empty when the policy has no selector: it then applies to the whole namespace.
    match_labels: BTreeMap<String, String>,
    rules: Vec<Rule>,
}

impl PolicySet {
    pub fn new(policies: &[AuthorizationPolicy]) -> Self {
        let mut by_namespace: HashMap<String, NamespacePolicies> = HashMap::new();
        for policy in policies {
            let compiled = CompiledPolicy {
                id: format!("{}/{}", policy.metadata.namespace, policy.metadata.name),
                match_labels: policy
                    .spec
                    .selector
                    .as_ref()
                    .map(|selector| selector.match_labels.clone())
                    .unwrap_or_default(),
                rules: policy.spec.rules.clone(),
            };
            let namespace = by_namespace
                .entry(policy.metadata.namespace.clone())
                .or_default();
            match policy.spec.action {
                PolicyAction::Deny => namespace.deny.push(compiled),
                PolicyAction::Allow => namespace.allow.push(compiled),
            }
        }
        Self { by_namespace }
    }

    pub fn is_empty(&self) -> bool {
        self.by_namespace.is_empty()
    }

    pub fn evaluate(&self, request: &Request) -> Decision {
        let Some(policies) = self.by_namespace.get(request.destination_namespace) else {
            return Decision::Allow;
        };
        let labels = request.destination_labels;
        let deny = policies
            .deny
            .iter()
            .filter(|policy| policy.selects(labels))
            .find(|policy| policy.matches(request));
        if let Some(policy) = deny {
            return Decision::Deny {
                policy: policy.id.clone(),
            };
        }
        let mut allow = policies
            .allow
            .iter()
            .filter(|policy| policy.selects(labels))
            .peekable();
        if allow.peek().is_none() {
            return Decision::Allow;
        }
        // An applicable ALLOW policy turns the default around, even one without rules.
        if allow.any(|policy| policy.matches(request)) {
            Decision::Allow
        } else {
            Decision::Deny {
                policy: NO_ALLOW_MATCHED.to_owned(),
            }
        }
    }
}

impl CompiledPolicy {
    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }

    /// No rules match nothing: an ALLOW policy without rules allows nothing and a DENY policy
    /// without rules denies nothing.
    fn matches(&self, request: &Request) -> bool {
        self.rules.iter().any(|rule| rule.matches(request))
    }
}

impl Rule {
    fn matches(&self, request: &Request) -> bool {
        let from =
            self.from.is_empty() || self.from.iter().any(|from| from.source.matches(request));
        let to = self.to.is_empty()
            || self.to.iter().any(|to| {
                let ports = &to.operation.ports;
                ports.is_empty() || ports.contains(&request.destination_port)
            });
        from && to
    }
}

impl Source {
    fn matches(&self, request: &Request) -> bool {
        allows(&self.principals, request.source_principal)
            && allows(&self.namespaces, request.source_namespace)
    }
}

/// An empty list constrains nothing; otherwise the value must be one of its entries, so a missing
/// value (a plaintext peer has no identity) matches no non-empty list.
fn allows(list: &[String], value: Option<&str>) -> bool {
    list.is_empty() || value.is_some_and(|value| list.iter().any(|entry| entry == value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Vec<AuthorizationPolicy> {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn set(yaml: &str) -> PolicySet {
        let policies = parse(yaml);
        validate_policies(&policies).unwrap();
        PolicySet::new(&policies)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const WEB: &str = "spiffe://cluster.local/ns/front/sa/web";
    const BATCH: &str = "spiffe://cluster.local/ns/jobs/sa/batch";

    /// An mTLS request from `principal` (whose namespace is its `/ns/` segment) to a `prod`
    /// workload labelled app=db.
    fn from_principal(set: &PolicySet, principal: &str, port: u16) -> Decision {
        let namespace = principal.split('/').nth(4);
        let db = labels(&[("app", "db"), ("tier", "data")]);
        set.evaluate(&Request {
            source_principal: Some(principal),
            source_namespace: namespace,
            destination_namespace: "prod",
            destination_labels: &db,
            destination_port: port,
        })
    }

    fn plaintext(set: &PolicySet, port: u16) -> Decision {
        let db = labels(&[("app", "db"), ("tier", "data")]);
        set.evaluate(&Request {
            source_principal: None,
            source_namespace: None,
            destination_namespace: "prod",
            destination_labels: &db,
            destination_port: port,
        })
    }

    fn denied_by(policy: &str) -> Decision {
        Decision::Deny {
            policy: policy.to_owned(),
        }
    }

    #[test]
    fn no_policies_allow_everything() {
        let empty = PolicySet::new(&[]);
        assert!(empty.is_empty());
        assert_eq!(from_principal(&empty, WEB, 5432), Decision::Allow);
        assert_eq!(plaintext(&empty, 5432), Decision::Allow);
    }

    #[test]
    fn deny_blocks_exactly_the_selected_principal() {
        let set = set(&format!(
            "
- metadata: {{name: no-batch, namespace: prod}}
  spec:
    selector: {{matchLabels: {{app: db}}}}
    action: DENY
    rules:
      - from: [{{source: {{principals: ['{BATCH}']}}}}]
"
        ));
        assert!(!set.is_empty());
        assert_eq!(
            from_principal(&set, BATCH, 5432),
            denied_by("prod/no-batch")
        );
        assert_eq!(from_principal(&set, WEB, 5432), Decision::Allow);
        assert_eq!(plaintext(&set, 5432), Decision::Allow);
    }

    #[test]
    fn deny_wins_over_allow() {
        let set = set(&format!(
            "
- metadata: {{name: allow-all-known, namespace: prod}}
  spec:
    action: ALLOW
    rules:
      - from: [{{source: {{principals: ['{WEB}', '{BATCH}']}}}}]
- metadata: {{name: no-jobs, namespace: prod}}
  spec:
    action: DENY
    rules:
      - from: [{{source: {{namespaces: [jobs]}}}}]
"
        ));
        assert_eq!(from_principal(&set, WEB, 5432), Decision::Allow);
        assert_eq!(from_principal(&set, BATCH, 5432), denied_by("prod/no-jobs"));
    }

    #[test]
    fn allow_policy_denies_unmatched_sources() {
        let set = set(&format!(
            "
- metadata: {{name: web-only, namespace: prod}}
  spec:
    selector: {{matchLabels: {{app: db}}}}
    action: ALLOW
    rules:
      - from: [{{source: {{principals: ['{WEB}']}}}}]
"
        ));
        assert_eq!(from_principal(&set, WEB, 5432), Decision::Allow);
        assert_eq!(
            from_principal(&set, BATCH, 5432),
            denied_by(NO_ALLOW_MATCHED)
        );
        assert_eq!(plaintext(&set, 5432), denied_by(NO_ALLOW_MATCHED));
    }

    #[test]
    fn policies_without_rules_follow_istio() {
        let allow_nothing = set("[{metadata: {name: a, namespace: prod}, spec: {action: ALLOW}}]");
        assert_eq!(
            from_principal(&allow_nothing, WEB, 80),
            denied_by(NO_ALLOW_MATCHED)
        );
        let deny_nothing = set("[{metadata: {name: d, namespace: prod}, spec: {action: DENY}}]");
        assert_eq!(from_principal(&deny_nothing, WEB, 80), Decision::Allow);
        // An empty rule, in contrast, matches every request.
        let deny_all =
            set("[{metadata: {name: d, namespace: prod}, spec: {action: DENY, rules: [{}]}}]");
        assert_eq!(from_principal(&deny_all, WEB, 80), denied_by("prod/d"));
        assert_eq!(plaintext(&deny_all, 80), denied_by("prod/d"));
    }

    #[test]
    fn selector_decides_applicability() {
        let deny = |selector: &str| {
            set(&format!(
                "[{{metadata: {{name: d, namespace: prod}}, spec: {{action: DENY, {selector} rules: [{{}}]}}}}]"
            ))
        };
        // Every selector label must be present on the workload with the same value.
        let mismatch = deny("selector: {matchLabels: {app: cache}},");
        assert_eq!(from_principal(&mismatch, WEB, 80), Decision::Allow);
        let missing = deny("selector: {matchLabels: {app: db, zone: a}},");
        assert_eq!(from_principal(&missing, WEB, 80), Decision::Allow);
        let subset = deny("selector: {matchLabels: {tier: data}},");
        assert_eq!(from_principal(&subset, WEB, 80), denied_by("prod/d"));
        let whole_namespace = deny("");
        assert_eq!(
            from_principal(&whole_namespace, WEB, 80),
            denied_by("prod/d")
        );
        // A mismatched ALLOW policy does not flip the default either.
        let allow = set(&format!(
            "[{{metadata: {{name: a, namespace: prod}}, spec: {{action: ALLOW, selector: {{matchLabels: {{app: cache}}}}, rules: [{{from: [{{source: {{principals: ['{BATCH}']}}}}]}}]}}}}]"
        ));
        assert_eq!(from_principal(&allow, WEB, 80), Decision::Allow);
    }

    #[test]
    fn policies_of_other_namespaces_do_not_apply() {
        let set = set("
- metadata: {name: d, namespace: staging}
  spec: {action: DENY, rules: [{}]}
- metadata: {name: a, namespace: staging}
  spec: {action: ALLOW}
");
        assert!(!set.is_empty());
        assert_eq!(from_principal(&set, WEB, 80), Decision::Allow);
        assert_eq!(plaintext(&set, 80), Decision::Allow);
    }

    #[test]
    fn ports_restrict_rules() {
        let set = set(&format!(
            "
- metadata: {{name: web-to-pg, namespace: prod}}
  spec:
    action: ALLOW
    rules:
      - from: [{{source: {{principals: ['{WEB}']}}}}]
        to: [{{operation: {{ports: [5432]}}}}, {{operation: {{ports: [9187, 9188]}}}}]
      - to: [{{operation: {{ports: [8080]}}}}]
- metadata: {{name: no-admin, namespace: prod}}
  spec:
    action: DENY
    rules:
      - to: [{{operation: {{ports: [8081]}}}}]
"
        ));
        for port in [5432, 9187, 9188, 8080] {
            assert_eq!(from_principal(&set, WEB, port), Decision::Allow, "{port}");
        }
        assert_eq!(from_principal(&set, WEB, 22), denied_by(NO_ALLOW_MATCHED));
        assert_eq!(
            from_principal(&set, BATCH, 5432),
            denied_by(NO_ALLOW_MATCHED)
        );
        assert_eq!(from_principal(&set, BATCH, 8080), Decision::Allow);
        assert_eq!(from_principal(&set, WEB, 8081), denied_by("prod/no-admin"));
    }

    #[test]
    fn sources_and_principals_with_namespaces() {
        let set = set(&format!(
            "
- metadata: {{name: a, namespace: prod}}
  spec:
    action: ALLOW
    rules:
      - from:
          - source: {{principals: ['{WEB}'], namespaces: [jobs]}}
          - source: {{namespaces: [ops, infra]}}
"
        ));
        // Both fields of one source must hold: WEB is not in `jobs`.
        assert_eq!(from_principal(&set, WEB, 80), denied_by(NO_ALLOW_MATCHED));
        assert_eq!(from_principal(&set, BATCH, 80), denied_by(NO_ALLOW_MATCHED));
        // Any source of the list may match.
        let infra = "spiffe://cluster.local/ns/infra/sa/backup";
        assert_eq!(from_principal(&set, infra, 80), Decision::Allow);
    }

    #[test]
    fn plaintext_never_matches_named_sources() {
        let set = set(&format!(
            "
- metadata: {{name: no-web, namespace: prod}}
  spec:
    action: DENY
    rules: [{{from: [{{source: {{principals: ['{WEB}']}}}}]}}]
- metadata: {{name: no-ns, namespace: prod}}
  spec:
    action: DENY
    rules: [{{from: [{{source: {{namespaces: [front]}}}}]}}]
- metadata: {{name: ports-only, namespace: prod}}
  spec:
    action: ALLOW
    rules:
      - to: [{{operation: {{ports: [80]}}}}]
      - from: [{{source: {{namespaces: [jobs]}}}}]
"
        ));
        // Named sources neither deny nor allow plaintext; a rule without `from` does allow it.
        assert_eq!(plaintext(&set, 80), Decision::Allow);
        assert_eq!(plaintext(&set, 443), denied_by(NO_ALLOW_MATCHED));
        assert_eq!(from_principal(&set, BATCH, 443), Decision::Allow);
        assert_eq!(from_principal(&set, WEB, 80), denied_by("prod/no-web"));
    }

    #[test]
    fn valid_policies_pass_validation() {
        let policies = parse(&format!(
            "
- metadata: {{name: web-to-pg.v2, namespace: prod}}
  spec:
    selector: {{matchLabels: {{app.kubernetes.io/name: db}}}}
    action: ALLOW
    rules:
      - from: [{{source: {{principals: ['{WEB}', 'spiffe://other_td.example/ns/a/sa/b.c']}}}}]
        to: [{{operation: {{ports: [5432]}}}}]
      - {{}}
- metadata: {{name: web-to-pg.v2, namespace: staging}}
  spec: {{action: DENY}}
"
        ));
        validate_policies(&policies).unwrap();
    }

    fn error_of(yaml: &str) -> String {
        format!("{:#}", validate_policies(&parse(yaml)).unwrap_err())
    }

    /// A single DENY policy `prod/p` with `rules: [<rule>]`.
    fn rule_error(rule: &str) -> String {
        error_of(&format!(
            "[{{metadata: {{name: p, namespace: prod}}, spec: {{action: DENY, rules: [{rule}]}}}}]"
        ))
    }

    #[test]
    fn invalid_policies_are_rejected_with_their_entry() {
        let err = error_of("[{metadata: {name: Bad_Name, namespace: prod}, spec: {action: DENY}}]");
        assert!(
            err.contains("policies[0] (prod/Bad_Name)") && err.contains("DNS subdomain"),
            "{err}"
        );
        let err = error_of("[{metadata: {name: p, namespace: a.b}, spec: {action: DENY}}]");
        assert!(
            err.contains("policies[0] (a.b/p)") && err.contains("DNS label"),
            "{err}"
        );
        let err = error_of(
            "
- {metadata: {name: p, namespace: prod}, spec: {action: DENY}}
- {metadata: {name: p, namespace: other}, spec: {action: DENY}}
- {metadata: {name: p, namespace: prod}, spec: {action: ALLOW}}
",
        );
        assert!(
            err.contains("policies[2] (prod/p)") && err.contains("twice"),
            "{err}"
        );
        for labels in ["{'': db}", "{app: ''}"] {
            let err = error_of(&format!(
                "[{{metadata: {{name: p, namespace: prod}}, spec: {{action: DENY, selector: {{matchLabels: {labels}}}}}}}]"
            ));
            assert!(
                err.contains("policies[0] (prod/p)") && err.contains("matchLabels"),
                "{err}"
            );
        }
    }

    #[test]
    fn invalid_rules_are_rejected_with_their_path() {
        for principal in [
            "cluster.local/ns/front/sa/web",
            "spiffe:///ns/front/sa/web",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/ns/front/sa/",
            "spiffe://cluster.local/ns/front/sa/web/extra",
            "spiffe://cluster.local/namespace/front/sa/web",
            "spiffe://cluster.local/ns/front/serviceaccount/web",
            "spiffe://Cluster.Local/ns/front/sa/web",
            "spiffe://cluster.local/ns/front/sa/*",
        ] {
            let err = rule_error(&format!(
                "{{from: [{{source: {{principals: ['{WEB}', '{principal}']}}}}]}}"
            ));
            assert!(
                err.contains("policies[0] (prod/p): rules[0].from[0].source.principals[1]")
                    && err.contains("spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"),
                "{principal}: {err}"
            );
        }
        let err =
            rule_error("{}, {from: [{source: {namespaces: [ok]}}, {source: {namespaces: [Bad]}}]}");
        assert!(
            err.contains("policies[0] (prod/p): rules[1].from[1].source.namespaces[0]")
                && err.contains("DNS label"),
            "{err}"
        );
        let err = rule_error("{from: [{source: {}}]}");
        assert!(
            err.contains("policies[0] (prod/p): rules[0].from[0].source")
                && err.contains("neither principals nor namespaces"),
            "{err}"
        );
        let err = rule_error("{to: [{operation: {ports: [80, 0]}}]}");
        assert!(
            err.contains("policies[0] (prod/p): rules[0].to[0].operation.ports")
                && err.contains("contains 0"),
            "{err}"
        );
        let err = rule_error("{to: [{operation: {ports: [80]}}, {operation: {}}]}");
        assert!(
            err.contains("policies[0] (prod/p): rules[0].to[1].operation")
                && err.contains("no ports"),
            "{err}"
        );
    }

    #[test]
    fn yaml_shape_is_strict() {
        let unknown = "[{metadata: {name: p, namespace: prod}, spec: {action: DENY, rulez: []}}]";
        assert!(serde_yaml::from_str::<Vec<AuthorizationPolicy>>(unknown).is_err());
        let action = "[{metadata: {name: p, namespace: prod}, spec: {action: AUDIT}}]";
        assert!(serde_yaml::from_str::<Vec<AuthorizationPolicy>>(action).is_err());
    }
}
