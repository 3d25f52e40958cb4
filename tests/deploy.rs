//! The Kubernetes install in deploy/: it renders with kustomize; every object validates offline
//! against the Kubernetes API schemas (kubernetes-validate, strict) and the API server's rules those
//! schemas cannot express; the example custom objects validate against their CRDs and are read by
//! the agent's own types, which the CRD schemas mirror field for field; and the settings the agent
//! depends on (capabilities, host namespaces, mounts, probes, update strategy) hold.
//!
//! Needs kubectl and the Python package kubernetes-validate (`cargo xtask setup` installs both).
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::{json, Value};
use weft::{
    config::Config,
    l7::route::{validate_routes, HttpRoute, ServicePortKey},
    policy::{validate_policies, AuthorizationPolicy},
};

/// The Kubernetes release whose API schemas the manifests are checked against.
const KUBERNETES_VERSION: &str = "1.32.0";

const NAMESPACE: &str = "weft-system";

/// The capabilities the agent gets, each explained in deploy/daemonset.yaml.
const AGENT_CAPABILITIES: [&str; 6] = [
    "BPF",
    "PERFMON",
    "NET_ADMIN",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "SYS_RESOURCE",
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Splits a multi-document YAML stream into its non-empty documents.
fn documents(text: &str) -> Vec<Value> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line == "---" {
            let doc: Value = serde_yaml::from_str(&current)
                .unwrap_or_else(|e| panic!("YAML document does not parse: {e}\n{current}"));
            if !doc.is_null() {
                docs.push(doc);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs
}

/// `kubectl kustomize deploy/`: every object `kubectl apply -k deploy/` would apply.
fn render() -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir())
        .output()
        .expect("running kubectl (installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/ failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    documents(&String::from_utf8(out.stdout).expect("kustomize printed UTF-8"))
}

fn read_yaml(relative: &str) -> Value {
    let path = deploy_dir().join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut docs = documents(&text);
    assert_eq!(docs.len(), 1, "{relative} holds one object");
    docs.remove(0)
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the install has no {kind} {name}"))
}

/// The value at a JSON pointer, which must exist.
fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{pointer} is missing"))
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    at(value, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string"))
}

fn pod_spec(objects: &[Value]) -> &Value {
    at(find(objects, "DaemonSet", "weft"), "/spec/template/spec")
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    at(pod, "/containers")
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("the DaemonSet has no container {name}"))
}

fn strings(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{value} is not a list"))
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The agent's config file from the ConfigMap, as YAML.
fn config_file(objects: &[Value]) -> Value {
    serde_yaml::from_str(str_at(
        find(objects, "ConfigMap", "weft-config"),
        "/data/config.yaml",
    ))
    .expect("config.yaml is YAML")
}

/// The ConfigMap's `agent` and `identity` sections as the agent parses and validates them. The
/// `kubernetes` section is left out so this does not depend on the version of the agent that
/// reads it.
fn agent_config(objects: &[Value]) -> Config {
    let file = config_file(objects);
    let sections = json!({"agent": file["agent"], "identity": file["identity"]});
    Config::parse(&serde_yaml::to_string(&sections).unwrap())
        .unwrap_or_else(|e| panic!("the ConfigMap's agent config is refused: {e:#}"))
}

// ---------------------------------------------------------------------------------------------
// Offline schema validation (Python: kubernetes-validate and jsonschema)

/// Checks documents and prints one problem per line. `kubernetes`: every document against the
/// Kubernetes API schemas, strict (unknown fields fail), a missing schema being a problem too.
/// `custom`: each CRD's schema follows the API server's structural rules, and each custom object
/// validates against its CRD's openAPIV3Schema, unknown fields failing as with `kubectl apply`'s
/// default strict field validation.
const CHECKER: &str = r#"
import json, re, sys
try:
    import jsonschema
    import kubernetes_validate
except ImportError as e:
    print(f"{e}; run `cargo xtask setup`", file=sys.stderr)
    sys.exit(3)

mode, version, path = sys.argv[1:4]
with open(path) as f:
    data = json.load(f)
problems = []

def where(error):
    return ".".join(str(p) for p in error.absolute_path) or "(top)"

def name_of(doc):
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"

TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}

def structural(node, at):
    """The API server's rules for CRD schemas that the CRD's own schema does not express."""
    if not isinstance(node, dict):
        return
    preserve = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    if not node.get("type") and not preserve:
        problems.append(f"{at}: no type (a structural schema types every node)")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{at}: properties and additionalProperties are mutually exclusive")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{at}: an array needs items")
    for name in node.get("required", []):
        if name not in node.get("properties", {}):
            problems.append(f"{at}: required {name} is not a property")
    for value in node.get("enum", []):
        if node.get("type") in TYPES and not isinstance(value, TYPES[node["type"]]):
            problems.append(f"{at}: enum value {value!r} is not a {node['type']}")
    if "default" in node:
        for e in jsonschema.Draft4Validator(node).iter_errors(node["default"]):
            problems.append(f"{at}: default {node['default']!r}: {e.message}")
    for key in ("allOf", "anyOf", "oneOf", "not"):
        if key in node:
            problems.append(f"{at}: {key} is not used by weft's schemas (keep them plain)")
    for name, sub in node.get("properties", {}).items():
        structural(sub, f"{at}.{name}")
    if isinstance(node.get("items"), dict):
        structural(node["items"], f"{at}[]")
    if isinstance(node.get("additionalProperties"), dict):
        structural(node["additionalProperties"], f"{at}{{}}")

def strict(node):
    """The schema with unknown fields refused wherever fields are listed."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "properties" in node:
        node["properties"] = {k: strict(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = strict(node[key])
    return node

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

if mode == "kubernetes":
    for doc in data:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name_of(doc)}: {where(e)}: {e.message}")
        except Exception as e:
            problems.append(f"{name_of(doc)}: {getattr(e, 'message', e)}")
elif mode == "custom":
    served = {}
    for crd in data["crds"]:
        spec = crd["spec"]
        crd_name = crd["metadata"]["name"]
        if crd_name != f"{spec['names']['plural']}.{spec['group']}":
            problems.append(f"{crd_name}: the name must be <plural>.<group>")
        if sum(1 for v in spec["versions"] if v.get("storage")) != 1:
            problems.append(f"{crd_name}: exactly one version is stored")
        for v in spec["versions"]:
            schema = v["schema"]["openAPIV3Schema"]
            structural(schema, f"{crd_name}/{v['name']}")
            if v.get("served"):
                served[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = (spec, schema)
    for obj in data["objects"]:
        name = name_of(obj)
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key not in served:
            problems.append(f"{name}: no CRD serves {key[0]} {key[1]}")
            continue
        spec, schema = served[key]
        metadata = obj.get("metadata") or {}
        if not DNS_SUBDOMAIN.match(metadata.get("name") or ""):
            problems.append(f"{name}: metadata.name is not a DNS subdomain")
        if spec["scope"] == "Namespaced" and not DNS_LABEL.match(metadata.get("namespace") or ""):
            problems.append(f"{name}: metadata.namespace is missing or not a DNS label")
        for e in jsonschema.Draft4Validator(strict(schema)).iter_errors(obj):
            problems.append(f"{name}: {where(e)}: {e.message}")
elif mode == "yaml11":
    # The files as kubectl reads them: PyYAML, like kubectl's YAML library, follows YAML 1.1.
    import yaml
    loaded = []
    for file in data:
        with open(file) as f:
            loaded.append(list(yaml.safe_load_all(f)))
    print(json.dumps(loaded, default=str))
else:
    sys.exit(f"unknown mode {mode}")

for problem in problems:
    print(problem)
"#;

/// Runs [`CHECKER`] on `input`; returns its problems (none: everything validated).
fn check(mode: &str, input: &Value) -> Vec<String> {
    let path = std::env::temp_dir().join(format!(
        "weft-deploy-{}-{mode}-{}.json",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&path, serde_json::to_vec(input).unwrap()).unwrap();
    let out = Command::new("python3")
        .args(["-c", CHECKER, mode, KUBERNETES_VERSION])
        .arg(&path)
        .output()
        .expect("running python3 (installed by `cargo xtask setup`)");
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "the {mode} check could not run ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn kustomize_renders_the_whole_install() {
    let objects = render();
    let found: BTreeSet<(String, String)> = objects
        .iter()
        .map(|o| {
            (
                str_at(o, "/kind").to_owned(),
                str_at(o, "/metadata/name").to_owned(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("Namespace", NAMESPACE),
        ("CustomResourceDefinition", "authorizationpolicies.weft.dev"),
        ("CustomResourceDefinition", "httproutes.weft.dev"),
        ("ServiceAccount", "weft"),
        ("ClusterRole", "weft"),
        ("ClusterRoleBinding", "weft"),
        ("ConfigMap", "weft-config"),
        ("DaemonSet", "weft"),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), n.to_string()))
    .collect();
    assert_eq!(
        found, expected,
        "the objects kubectl apply -k deploy/ applies"
    );
    assert_eq!(objects.len(), expected.len(), "an object is listed twice");
    for object in &objects {
        let namespaced = matches!(
            object["kind"].as_str(),
            Some("ServiceAccount" | "ConfigMap" | "DaemonSet")
        );
        let namespace = object.pointer("/metadata/namespace");
        if namespaced {
            assert_eq!(namespace, Some(&json!(NAMESPACE)), "{}", object["kind"]);
        } else {
            assert_eq!(namespace, None, "{} is cluster-scoped", object["kind"]);
        }
    }
}

#[test]
fn objects_validate_against_the_kubernetes_api_schemas() {
    let objects = render();
    let problems = check("kubernetes", &json!(objects));
    assert!(
        problems.is_empty(),
        "against Kubernetes {KUBERNETES_VERSION}:\n{}",
        problems.join("\n")
    );

    // The check itself catches a misspelt field, a wrong type and a kind it has no schema for.
    let mut broken = objects.clone();
    for object in &mut broken {
        match object["kind"].as_str() {
            Some("DaemonSet") => {
                object["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
            }
            Some("ClusterRole") => object["rules"][0]["verbs"] = json!("get"),
            _ => {}
        }
    }
    broken.push(json!({"apiVersion": "v1", "kind": "Nonsense", "metadata": {"name": "x"}}));
    let problems = check("kubernetes", &json!(broken)).join("\n");
    for expected in ["hostNetwrok", "ClusterRole/weft", "Nonsense"] {
        assert!(problems.contains(expected), "{expected}: {problems}");
    }
}

/// The API server's validation rules that the OpenAPI schemas cannot express, for what this
/// install uses.
#[test]
fn objects_pass_the_api_server_rules_beyond_the_schemas() {
    let objects = render();
    let daemonset = find(&objects, "DaemonSet", "weft");
    let pod = pod_spec(&objects);

    // Rolling updates of a DaemonSet: exactly one of maxSurge and maxUnavailable is non-zero.
    let rolling = at(daemonset, "/spec/updateStrategy/rollingUpdate");
    let nonzero = |v: &Value| !(v.is_null() || *v == json!(0) || *v == json!("0%"));
    assert!(
        nonzero(&rolling["maxSurge"]) != nonzero(&rolling["maxUnavailable"]),
        "exactly one of maxSurge and maxUnavailable may be non-zero: {rolling}"
    );
    // The selector picks the template's pods.
    for (key, value) in at(daemonset, "/spec/selector/matchLabels")
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &daemonset["spec"]["template"]["metadata"]["labels"][key], value,
            "the selector's {key} is not on the template"
        );
    }

    let volumes: BTreeMap<&str, &Value> = at(pod, "/volumes")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (str_at(v, "/name"), v))
        .collect();
    let mut used = BTreeSet::new();
    for c in at(pod, "/containers").as_array().unwrap() {
        let name = str_at(c, "/name");
        let sc = &c["securityContext"];
        let privileged = sc["privileged"] == json!(true);
        if sc["allowPrivilegeEscalation"] == json!(false) {
            assert!(!privileged, "{name}: privileged needs privilege escalation");
            let added = c.pointer("/securityContext/capabilities/add");
            let added = added.map(strings).unwrap_or_default();
            assert!(
                !added.contains("SYS_ADMIN") && !added.contains("CAP_SYS_ADMIN"),
                "{name}: allowPrivilegeEscalation false cannot go with SYS_ADMIN"
            );
        }
        let mut paths = HashSet::new();
        for mount in c["volumeMounts"].as_array().into_iter().flatten() {
            let volume = str_at(mount, "/name");
            assert!(volumes.contains_key(volume), "{name}: no volume {volume}");
            used.insert(volume);
            assert!(
                paths.insert(str_at(mount, "/mountPath")),
                "{name}: two mounts at {}",
                mount["mountPath"]
            );
            if mount["mountPropagation"] == "Bidirectional" {
                assert!(
                    privileged,
                    "{name}: Bidirectional propagation is for privileged containers only"
                );
            }
        }
        // With hostNetwork every container port is a host port, which blocks the surge pod of an
        // update from the node its predecessor holds.
        if pod["hostNetwork"] == json!(true) && nonzero(&rolling["maxSurge"]) {
            assert!(
                c["ports"].as_array().is_none_or(|p| p.is_empty()),
                "{name}: ports with hostNetwork and maxSurge stall updates"
            );
        }
    }
    let unused: Vec<_> = volumes.keys().filter(|v| !used.contains(*v)).collect();
    assert!(unused.is_empty(), "volumes nothing mounts: {unused:?}");
    for projected in volumes.values().filter_map(|v| v.get("projected")) {
        let mut paths = HashSet::new();
        for source in at(projected, "/sources").as_array().unwrap() {
            for item in source.as_object().unwrap().values() {
                for item in item["items"].as_array().into_iter().flatten() {
                    assert!(paths.insert(str_at(item, "/path")), "{item} twice");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The custom resources: CRD schemas, example objects and the agent's types

/// One custom kind: its CRD, its example and how the agent reads an object of it.
struct Kind {
    crd: &'static str,
    example: &'static str,
    /// Deserializes an object into the agent's type and validates it as the agent does; returns
    /// the agent's value serialized back.
    read: fn(&Value) -> Result<Value, String>,
}

const KINDS: [Kind; 2] = [
    Kind {
        crd: "authorizationpolicies.weft.dev",
        example: "examples/authorizationpolicy.yaml",
        read: read_policy,
    },
    Kind {
        crd: "httproutes.weft.dev",
        example: "examples/httproute.yaml",
        read: read_route,
    },
];

/// What the agent takes of a Kubernetes object: its name, namespace and spec.
fn agent_input(object: &Value) -> Value {
    json!({
        "metadata": {
            "name": object["metadata"]["name"],
            "namespace": object["metadata"]["namespace"],
        },
        "spec": object["spec"],
    })
}

fn read_policy(object: &Value) -> Result<Value, String> {
    let policy: AuthorizationPolicy =
        serde_json::from_value(agent_input(object)).map_err(|e| e.to_string())?;
    validate_policies(std::slice::from_ref(&policy)).map_err(|e| format!("{e:#}"))?;
    Ok(serde_json::to_value(&policy).unwrap())
}

/// The Services the example route refers to, each with port 80.
const EXAMPLE_SERVICES: [&str; 3] = ["cart", "cart-canary", "cart-shadow"];

fn read_route(object: &Value) -> Result<Value, String> {
    let route: HttpRoute =
        serde_json::from_value(agent_input(object)).map_err(|e| e.to_string())?;
    let services: HashSet<ServicePortKey> = EXAMPLE_SERVICES
        .iter()
        .map(|name| ServicePortKey {
            namespace: route.metadata.namespace.clone(),
            name: name.to_string(),
            port: 80,
        })
        .collect();
    validate_routes(std::slice::from_ref(&route), &services).map_err(|e| format!("{e:#}"))?;
    Ok(serde_json::to_value(&route).unwrap())
}

fn crd_schema<'a>(objects: &'a [Value], crd: &str) -> &'a Value {
    let versions = at(
        find(objects, "CustomResourceDefinition", crd),
        "/spec/versions",
    );
    let version = versions
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "v1alpha1")
        .unwrap_or_else(|| panic!("{crd} has no v1alpha1"));
    at(version, "/schema/openAPIV3Schema")
}

#[test]
fn crds_serve_the_kinds_the_agent_reads() {
    let objects = render();
    for (crd, kind, plural) in [
        (
            "authorizationpolicies.weft.dev",
            "AuthorizationPolicy",
            "authorizationpolicies",
        ),
        ("httproutes.weft.dev", "HTTPRoute", "httproutes"),
    ] {
        let spec = at(find(&objects, "CustomResourceDefinition", crd), "/spec");
        assert_eq!(spec["group"], "weft.dev", "{crd}");
        assert_eq!(spec["scope"], "Namespaced", "{crd}");
        assert_eq!(spec["names"]["kind"], kind, "{crd}");
        assert_eq!(spec["names"]["plural"], plural, "{crd}");
        let versions = at(spec, "/versions").as_array().unwrap();
        assert_eq!(versions.len(), 1, "{crd}");
        assert_eq!(versions[0]["name"], "v1alpha1", "{crd}");
        assert_eq!(versions[0]["served"], true, "{crd}");
        assert_eq!(versions[0]["storage"], true, "{crd}");
    }
}

#[test]
fn examples_validate_against_their_crds() {
    let objects = render();
    let crds: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .collect();
    let examples: Vec<Value> = KINDS.iter().map(|k| read_yaml(k.example)).collect();
    let problems = check("custom", &json!({"crds": crds, "objects": examples}));
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The check catches an unknown field, a value outside an enum, a missing required field, a
    // broken pattern and an object without a namespace.
    let mut policy = examples[0].clone();
    policy["spec"]["rules"][0]["form"] = json!([]);
    policy["spec"]["action"] = json!("allow");
    let mut route = examples[1].clone();
    route["spec"]["rules"][1]["retry"]
        .as_object_mut()
        .unwrap()
        .remove("attempts");
    route["spec"]["rules"][1]["timeouts"]["request"] = json!("3 seconds");
    route["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    let problems = check("custom", &json!({"crds": crds, "objects": [policy, route]})).join("\n");
    for expected in [
        "'form'",
        "'allow' is not one of",
        "'attempts' is a required property",
        "'3 seconds' does not match",
        "metadata.namespace",
    ] {
        assert!(problems.contains(expected), "{expected}: {problems}");
    }
}

/// kubectl reads YAML 1.1 (a bare `on` or `yes` is a boolean, `0400` octal), serde_yaml 1.2: the
/// examples must mean the same in both, or the API server gets other objects than the agent's
/// types were checked with here.
#[test]
fn examples_read_the_same_in_yaml_1_1_as_kubectl_reads_them() {
    let paths: Vec<PathBuf> = KINDS.iter().map(|k| deploy_dir().join(k.example)).collect();
    let lines = check("yaml11", &json!(paths));
    let read: Vec<Vec<Value>> = serde_json::from_str(&lines.concat()).unwrap();
    for (kind, docs) in KINDS.iter().zip(read) {
        assert_eq!(
            docs,
            [read_yaml(kind.example)],
            "{}: kubectl reads it differently (quote words YAML 1.1 takes for booleans)",
            kind.example
        );
    }
}

#[test]
fn examples_are_read_by_the_agent() {
    for kind in &KINDS {
        let object = read_yaml(kind.example);
        if let Err(e) = (kind.read)(&object) {
            panic!("{}: the agent refuses it: {e}", kind.example);
        }
    }
}

/// Where a value sits in an example, and the schema node that describes it.
struct Site<'a> {
    /// JSON pointer into the object.
    pointer: String,
    /// The same place with array indices as `[]`: how the schema names it.
    path: String,
    schema: &'a Value,
    /// Whether the value is a property of an object with `properties` (not a map entry or item).
    property: bool,
}

fn sites<'a>(
    value: &Value,
    schema: &'a Value,
    pointer: String,
    path: String,
    property: bool,
    out: &mut Vec<Site<'a>>,
) {
    out.push(Site {
        pointer: pointer.clone(),
        path: path.clone(),
        schema,
        property,
    });
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                let escaped = key.replace('~', "~0").replace('/', "~1");
                if let Some(sub) = schema.pointer(&format!("/properties/{escaped}")) {
                    let path = format!("{path}.{key}");
                    sites(item, sub, format!("{pointer}/{escaped}"), path, true, out);
                } else if let Some(sub) =
                    schema.get("additionalProperties").filter(|s| s.is_object())
                {
                    let path = format!("{path}{{}}");
                    sites(item, sub, format!("{pointer}/{escaped}"), path, false, out);
                } else {
                    panic!("{path}.{key} is not in the schema");
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let sub = &schema["items"];
                let path = format!("{path}[]");
                sites(item, sub, format!("{pointer}/{i}"), path, false, out);
            }
        }
        _ => {}
    }
}

/// Every property path the schema defines.
fn schema_paths(schema: &Value, path: String, out: &mut BTreeSet<String>) {
    out.insert(path.clone());
    if let Some(properties) = schema["properties"].as_object() {
        for (key, sub) in properties {
            schema_paths(sub, format!("{path}.{key}"), out);
        }
    }
    if schema["items"].is_object() {
        schema_paths(&schema["items"], format!("{path}[]"), out);
    }
    if schema["additionalProperties"].is_object() {
        schema_paths(&schema["additionalProperties"], format!("{path}{{}}"), out);
    }
}

/// Every key of every object of `value` (nulls included), named as [`schema_paths`] names them;
/// a key the schema lacks is named as a property.
fn value_key_paths(value: &Value, schema: &Value, path: String, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                let (path, sub) = match schema.pointer(&format!("/properties/{key}")) {
                    Some(sub) => (format!("{path}.{key}"), sub),
                    None => match schema.get("additionalProperties").filter(|s| s.is_object()) {
                        Some(sub) => (format!("{path}{{}}"), sub),
                        None => (format!("{path}.{key}"), &Value::Null),
                    },
                };
                out.insert(path.clone());
                value_key_paths(item, sub, path, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                value_key_paths(item, &schema["items"], format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

/// Whether the agent read `example` as written: the same values, and for every field the example
/// leaves out, nothing (null or an empty list) or the schema's default.
fn same_reading(example: &Value, read: &Value, schema: &Value, path: &str) -> Result<(), String> {
    match (example, read) {
        (Value::Object(written), Value::Object(read)) => {
            for key in written.keys() {
                if !read.contains_key(key) {
                    return Err(format!("{path}.{key} is lost"));
                }
            }
            for (key, value) in read {
                let sub = schema
                    .pointer(&format!("/properties/{key}"))
                    .or_else(|| schema.get("additionalProperties"))
                    .unwrap_or(&Value::Null);
                let here = format!("{path}.{key}");
                match written.get(key) {
                    Some(w) => same_reading(w, value, sub, &here)?,
                    None if value.is_null() || *value == json!([]) => {}
                    None if sub.get("default") == Some(value) => {}
                    None => {
                        return Err(format!(
                        "{here}: the agent makes it {value} when absent; the CRD's default is {}",
                        sub.get("default").unwrap_or(&Value::Null)
                    ))
                    }
                }
            }
            Ok(())
        }
        (Value::Array(written), Value::Array(read)) if written.len() == read.len() => written
            .iter()
            .zip(read)
            .try_for_each(|(w, r)| same_reading(w, r, &schema["items"], &format!("{path}[]"))),
        _ if example == read => Ok(()),
        _ => Err(format!("{path}: written {example}, read {read}")),
    }
}

fn split_pointer(pointer: &str) -> (&str, String) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    (parent, key.replace("~1", "/").replace("~0", "~"))
}

/// The CRD schemas say what the agent's types say: the same fields under the same names, the same
/// required fields, the same enums, the same value types. The examples use every field, so:
/// every schema field is in the example, which the agent reads (its types refuse unknown fields);
/// every field the agent's types have comes back when it serializes what it read.
#[test]
fn crd_schemas_follow_the_agent_types() {
    let objects = render();
    for kind in &KINDS {
        let example = read_yaml(kind.example);
        let schema = crd_schema(&objects, kind.crd);
        let spec_schema = at(schema, "/properties/spec");
        let read = |object: &Value| (kind.read)(object);
        let accepted = |object: &Value| read(object).is_ok();
        let name = kind.example;
        let read_back = read(&example).unwrap_or_else(|e| panic!("{name}: {e}"));

        // Every field of the schema is in the example.
        let mut defined = BTreeSet::new();
        schema_paths(spec_schema, "spec".into(), &mut defined);
        let mut site_list = Vec::new();
        sites(
            &example["spec"],
            spec_schema,
            "/spec".into(),
            "spec".into(),
            true,
            &mut site_list,
        );
        let used: BTreeSet<String> = site_list.iter().map(|s| s.path.clone()).collect();
        let unused: Vec<_> = defined.difference(&used).collect();
        assert!(unused.is_empty(), "{name} does not use {unused:?}");

        // Every field the agent's type has is in the schema, under the same name.
        let mut agent_keys = BTreeSet::new();
        value_key_paths(
            &read_back["spec"],
            spec_schema,
            "spec".into(),
            &mut agent_keys,
        );
        let unknown: Vec<_> = agent_keys.difference(&defined).collect();
        assert!(
            unknown.is_empty(),
            "{name}: the agent's type has fields the CRD lacks: {unknown:?}"
        );
        if let Err(e) = same_reading(&example["spec"], &read_back["spec"], spec_schema, "spec") {
            panic!("{name}: {e}");
        }

        for site in &site_list {
            let here = format!("{name} {}", site.path);
            // Required fields: required in the schema exactly when the agent refuses the
            // object without them.
            if site.property {
                let (parent, key) = split_pointer(&site.pointer);
                let mut without = example.clone();
                without
                    .pointer_mut(parent)
                    .and_then(Value::as_object_mut)
                    .unwrap()
                    .remove(&key);
                let parent_schema = match site_list.iter().find(|s| s.pointer == parent) {
                    Some(parent) => parent.schema,
                    None => schema,
                };
                let required = parent_schema["required"]
                    .as_array()
                    .is_some_and(|r| r.contains(&json!(key)));
                let refused = match read(&without) {
                    Ok(read_back) => {
                        // Left out, a field with a default in the schema reads as that default.
                        if let Some(default) = site.schema.get("default") {
                            assert_eq!(
                                read_back.pointer(&site.pointer),
                                Some(default),
                                "{here}: the CRD's default is not the agent's"
                            );
                        }
                        false
                    }
                    Err(_) => true,
                };
                assert_eq!(
                    required,
                    refused,
                    "{here}: the agent {} the object without it; required in the CRD: {required}",
                    if refused { "refuses" } else { "takes" }
                );
            }
            let value = example.pointer(&site.pointer).unwrap();
            let replaced = |new: Value| {
                let mut object = example.clone();
                *object.pointer_mut(&site.pointer).unwrap() = new;
                object
            };
            // A list the agent refuses empty is non-empty in the schema too.
            if value.is_array() && !accepted(&replaced(json!([]))) {
                assert!(
                    site.schema["minItems"].as_u64().unwrap_or(0) >= 1,
                    "{here}: the agent refuses it empty; the CRD needs minItems: 1"
                );
            }
            // Enums: each value of the schema is one the agent takes, and no other is.
            if let Some(values) = site.schema["enum"].as_array() {
                for v in values {
                    assert!(
                        accepted(&replaced(v.clone())),
                        "{here}: the agent refuses {v}"
                    );
                }
                let other = json!(format!("{}x", values[0].as_str().unwrap()));
                assert!(!accepted(&replaced(other.clone())), "{here}: {other}");
            }
            // Value types: the agent refuses a value of another JSON type.
            let wrong = match value {
                Value::String(_) => json!(7),
                Value::Number(_) | Value::Bool(_) | Value::Array(_) | Value::Object(_) => {
                    json!("text")
                }
                Value::Null => continue,
            };
            assert!(
                !accepted(&replaced(wrong)),
                "{here}: the agent takes another type than {}",
                site.schema["type"]
            );
            let schema_type = site.schema["type"].as_str().unwrap_or("");
            let json_type = match value {
                Value::String(_) => "string",
                Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
                Value::Number(_) => "number",
                Value::Bool(_) => "boolean",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
                Value::Null => "null",
            };
            assert_eq!(schema_type, json_type, "{here}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's DaemonSet

#[test]
fn agent_runs_unprivileged_with_exactly_the_capabilities_it_needs() {
    let objects = render();
    let pod = pod_spec(&objects);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "weft");
    assert!(
        at(pod, "/tolerations")
            .as_array()
            .unwrap()
            .contains(&json!({"operator": "Exists"})),
        "the agent tolerates every taint"
    );

    for c in at(pod, "/containers").as_array().unwrap() {
        let name = str_at(c, "/name");
        let sc = at(c, "/securityContext");
        assert_eq!(sc["privileged"], false, "{name} is not privileged");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(
            strings(at(sc, "/capabilities/drop")),
            set(&["ALL"]),
            "{name}"
        );
        let added = sc
            .pointer("/capabilities/add")
            .map(strings)
            .unwrap_or_default();
        let expected = if name == "agent" {
            set(&AGENT_CAPABILITIES)
        } else {
            BTreeSet::new()
        };
        assert_eq!(added, expected, "{name}: capabilities added");
        for profile in ["seccompProfile", "appArmorProfile"] {
            for scope in [sc, pod.get("securityContext").unwrap_or(&Value::Null)] {
                assert_ne!(scope[profile]["type"], "Unconfined", "{name}: {profile}");
            }
        }
    }
    let agent = container(pod, "agent");
    assert_eq!(agent["securityContext"]["runAsUser"], 0);
    assert_eq!(agent["image"], "weft:0.1.0");
    assert_eq!(
        agent["command"],
        json!(["weft", "run", "--config", "/etc/weft/config.yaml"])
    );
    assert!(
        at(agent, "/env").as_array().unwrap().contains(&json!({
            "name": "WEFT_NODE_NAME",
            "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}
        })),
        "WEFT_NODE_NAME comes from spec.nodeName"
    );
    let cni = container(pod, "install-cni");
    assert_eq!(cni["image"], agent["image"]);
    assert_eq!(
        cni["command"],
        json!([
            "weft-cni",
            "install",
            "--cni-bin-dir",
            "/host/opt/cni/bin",
            "--cni-conf-dir",
            "/host/etc/cni/net.d",
            "--watch"
        ])
    );
    for c in [agent, cni] {
        assert!(
            c.pointer("/resources/requests/cpu").is_some()
                && c.pointer("/resources/requests/memory").is_some()
                && c.pointer("/resources/limits/memory").is_some(),
            "{}: requests and a memory limit",
            c["name"]
        );
    }
}

#[test]
fn update_starts_the_new_agent_before_stopping_the_old() {
    let objects = render();
    let daemonset = find(&objects, "DaemonSet", "weft");
    assert_eq!(
        at(daemonset, "/spec/updateStrategy"),
        &json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    // The old agent gets to drain before the kubelet kills it.
    let grace_ms = at(pod_spec(&objects), "/terminationGracePeriodSeconds")
        .as_u64()
        .unwrap()
        * 1000;
    let drain_ms = agent_config(&objects).agent.drain_timeout_ms;
    assert!(
        grace_ms >= drain_ms + 2000,
        "terminationGracePeriodSeconds {grace_ms} ms leaves no margin over drain_timeout_ms {drain_ms}"
    );
}

#[test]
fn probes_and_scraping_reach_the_agent_where_it_listens() {
    let objects = render();
    let config = agent_config(&objects);
    let agent = container(pod_spec(&objects), "agent");
    let admin = config.agent.admin_addr;
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/healthz")] {
        let get = at(agent, &format!("/{probe}/httpGet"));
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["host"], admin.ip().to_string(), "{probe}");
        assert_eq!(get["port"], admin.port(), "{probe}");
    }
    let annotations = at(
        find(&objects, "DaemonSet", "weft"),
        "/spec/template/metadata/annotations",
    );
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(
        annotations["prometheus.io/port"],
        config.agent.metrics_addr.port().to_string()
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    assert!(
        config.agent.metrics_addr.ip().is_unspecified(),
        "a scraper reaches /metrics on the node's address"
    );
}

#[test]
fn cluster_role_only_reads_what_the_agent_watches() {
    let objects = render();
    let role = find(&objects, "ClusterRole", "weft");
    let mut granted = BTreeSet::new();
    for rule in at(role, "/rules").as_array().unwrap() {
        assert_eq!(
            strings(at(rule, "/verbs")),
            set(&["list", "watch"]),
            "{rule}"
        );
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
        for group in strings(at(rule, "/apiGroups")) {
            for resource in strings(at(rule, "/resources")) {
                granted.insert(format!("{group}/{resource}"));
            }
        }
    }
    assert_eq!(
        granted,
        set(&[
            "/namespaces",
            "/pods",
            "/services",
            "discovery.k8s.io/endpointslices",
            "weft.dev/authorizationpolicies",
            "weft.dev/httproutes",
        ])
    );
    let binding = find(&objects, "ClusterRoleBinding", "weft");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "weft"})
    );
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "weft", "namespace": NAMESPACE}])
    );
    find(&objects, "ServiceAccount", "weft");
}

/// The mount of `pod`'s container that holds `path`, with its volume.
fn mount_of<'a>(pod: &'a Value, container_name: &str, path: &str) -> (&'a Value, &'a Value) {
    let mount = at(container(pod, container_name), "/volumeMounts")
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let at = str_at(m, "/mountPath");
            path == at || path.starts_with(&format!("{at}/"))
        })
        .max_by_key(|m| str_at(m, "/mountPath").len())
        .unwrap_or_else(|| panic!("{container_name}: nothing is mounted at {path}"));
    let volume = at(pod, "/volumes")
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    (mount, volume)
}

#[test]
fn the_agent_config_and_the_paths_it_names_are_mounted() {
    let objects = render();
    let config = agent_config(&objects);
    let file = config_file(&objects);
    assert_eq!(
        file["kubernetes"],
        json!({"enabled": true, "cni_dir": "/var/run/weft", "proc_root": "/host/proc"})
    );
    let pod = pod_spec(&objects);

    // The config file itself, from the ConfigMap.
    let (_, volume) = mount_of(pod, "agent", "/etc/weft/config.yaml");
    assert!(
        at(volume, "/projected/sources")
            .as_array()
            .unwrap()
            .contains(&json!({"configMap": {"name": "weft-config",
                "items": [{"key": "config.yaml", "path": "config.yaml"}]}})),
        "/etc/weft/config.yaml is the ConfigMap's config.yaml"
    );

    // The CA, from the Secret weft-ca.
    let identity = config.identity.expect("the mesh identity is configured");
    assert_eq!(identity.trust_domain, "cluster.local");
    for (file, key) in [(&identity.ca_cert, "ca.crt"), (&identity.ca_key, "ca.key")] {
        let file = file.to_str().unwrap();
        let (mount, volume) = mount_of(pod, "agent", file);
        let relative = file
            .strip_prefix(&format!("{}/", str_at(mount, "/mountPath")))
            .unwrap();
        let secret = at(volume, "/projected/sources")
            .as_array()
            .unwrap()
            .iter()
            .find_map(|s| s.get("secret"))
            .unwrap_or_else(|| panic!("{file} is not from a Secret"));
        assert_eq!(secret["name"], "weft-ca");
        assert!(
            at(secret, "/items")
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["key"] == key && i["path"] == relative),
            "{file} is the Secret's {key}"
        );
    }

    // Host paths: (container, path it uses, where the mount is, host directory, written to,
    // propagation). The handover's pins and record are on the host, so the next agent finds them.
    let cgroup = config.agent.cgroup_path.to_str().unwrap();
    let cni_dir = str_at(&file, "/kubernetes/cni_dir");
    let proc_root = str_at(&file, "/kubernetes/proc_root");
    let handover = config.agent.handover.expect("rolling updates hand over");
    let pins = handover.bpf_pin_dir.to_str().unwrap();
    let state = handover.state_dir.to_str().unwrap();
    let host_to_container = Some("HostToContainer");
    for (container_name, path, mount_path, host, writable, propagation) in [
        ("agent", cgroup, cgroup, "/sys/fs/cgroup", false, None),
        (
            "agent",
            pins,
            "/host/sys/fs/bpf",
            "/sys/fs/bpf",
            true,
            host_to_container,
        ),
        (
            "agent",
            "/var/run/netns",
            "/var/run/netns",
            "/var/run/netns",
            false,
            host_to_container,
        ),
        ("agent", cni_dir, cni_dir, "/var/run/weft", true, None),
        // Pods' sysctls are written through it.
        ("agent", proc_root, proc_root, "/proc", true, None),
        ("agent", state, state, "/var/run/weft", true, None),
        (
            "install-cni",
            "/host/opt/cni/bin",
            "/host/opt/cni/bin",
            "/opt/cni/bin",
            true,
            None,
        ),
        (
            "install-cni",
            "/host/etc/cni/net.d",
            "/host/etc/cni/net.d",
            "/etc/cni/net.d",
            true,
            None,
        ),
    ] {
        let (mount, volume) = mount_of(pod, container_name, path);
        assert_eq!(str_at(mount, "/mountPath"), mount_path, "{path}");
        assert_eq!(str_at(volume, "/hostPath/path"), host, "{path}");
        if writable {
            assert_ne!(mount["readOnly"], true, "{path} is written to");
            // The runtime's default AppArmor profile denies writes below /sys but cgroups.
            assert!(
                !mount_path.starts_with("/sys/"),
                "{path} is written to: mount it elsewhere"
            );
        }
        assert_eq!(
            mount["mountPropagation"].as_str(),
            propagation,
            "{path}: mount propagation"
        );
    }
}
