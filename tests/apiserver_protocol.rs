//! The fake Kubernetes API server against kube's own client and watcher (no root needed): the
//! object builders deserialize as kube's types, lists page consistently, watches replay, filter,
//! bookmark, time out and expire (410) as the real server's do, and kube's watcher recovers from
//! 410 Gone, dropped connections and a server restart.
use std::{
    collections::BTreeSet,
    future::Future,
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{reflector, watcher, WatchStreamExt},
    Client, Config, ResourceExt,
};
use serde_json::{json, Value};
use weft_lab_tests::fake_apiserver::{
    endpoint_slice, namespace, pod, service, with_host_network, with_owner, FakeApiServer,
    ResourceKind, Verb,
};

const WAIT: Duration = Duration::from_secs(10);

fn start() -> FakeApiServer {
    FakeApiServer::start(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap()
}

/// A kube client configured from the server's kubeconfig.
async fn client(server: &FakeApiServer) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig()).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn web_pod(ns: &str, name: &str, node: &str, last_octet: u8, app: &str) -> Value {
    pod(
        ns,
        name,
        node,
        Some(Ipv4Addr::new(10, 244, 0, last_octet)),
        "default",
        &[("app", app)],
    )
}

type Events<K> = Pin<Box<dyn Stream<Item = kube::Result<WatchEvent<K>>> + Send>>;

async fn watch_pods(api: &Api<Pod>, params: &WatchParams, rv: &str) -> Events<Pod> {
    api.watch(params, rv).await.unwrap().boxed()
}

/// The next event that is not a bookmark.
async fn next_event(events: &mut Events<Pod>) -> WatchEvent<Pod> {
    loop {
        match tokio::time::timeout(WAIT, events.next()).await {
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => continue,
            Ok(Some(Ok(event))) => return event,
            other => panic!("expected a watch event, got {other:?}"),
        }
    }
}

fn describe(event: &WatchEvent<Pod>) -> (String, String, String) {
    match event {
        WatchEvent::Added(p) => ("ADDED".into(), p.name_any(), p.resource_version().unwrap()),
        WatchEvent::Modified(p) => (
            "MODIFIED".into(),
            p.name_any(),
            p.resource_version().unwrap(),
        ),
        WatchEvent::Deleted(p) => (
            "DELETED".into(),
            p.name_any(),
            p.resource_version().unwrap(),
        ),
        other => panic!("unexpected {other:?}"),
    }
}

async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request over a fresh connection: (status, body).
fn raw_request(server: &FakeApiServer, method: &str, target: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

#[tokio::test]
async fn builders_deserialize_as_kube_types() {
    let server = start();
    let client = client(&server).await;
    server.apply(namespace("lab", &[("weft.dev/mesh", "enabled")]));
    let rs_pod = with_owner(
        pod(
            "lab",
            "web-5d8f7c9b4-x7k2p",
            "node-1",
            Some(Ipv4Addr::new(10, 244, 1, 5)),
            "web",
            &[("app", "web"), ("pod-template-hash", "5d8f7c9b4")],
        ),
        "apps/v1",
        "ReplicaSet",
        "web-5d8f7c9b4",
    );
    server.apply(rs_pod);
    server.apply(pod("lab", "pending", "node-1", None, "default", &[]));
    server.apply(with_host_network(pod(
        "kube-system",
        "agent",
        "node-1",
        Some(Ipv4Addr::new(192, 0, 2, 1)),
        "weft",
        &[],
    )));
    server.apply(service(
        "lab",
        "web",
        Some(Ipv4Addr::new(10, 96, 0, 10)),
        &[("http", 80, 8080, Some("http")), ("grpc", 9090, 9090, None)],
    ));
    server.apply(service("lab", "db", None, &[("", 5432, 5432, None)]));
    server.apply(endpoint_slice(
        "lab",
        "web",
        &[
            (
                Ipv4Addr::new(10, 244, 1, 5),
                true,
                "node-1",
                "web-5d8f7c9b4-x7k2p",
            ),
            (
                Ipv4Addr::new(10, 244, 2, 6),
                false,
                "node-2",
                "web-5d8f7c9b4-q9z8w",
            ),
        ],
        &[("http", 8080, Some("http"))],
    ));

    let ns: Namespace = Api::all(client.clone()).get("lab").await.unwrap();
    assert_eq!(ns.labels()["kubernetes.io/metadata.name"], "lab");
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Active"));

    let pods: Api<Pod> = Api::namespaced(client.clone(), "lab");
    let web = pods.get("web-5d8f7c9b4-x7k2p").await.unwrap();
    assert_eq!(web.labels()["pod-template-hash"], "5d8f7c9b4");
    assert_eq!(web.uid().unwrap().len(), 36);
    assert!(web.creation_timestamp().is_some());
    let owner = &web.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("ReplicaSet", "web-5d8f7c9b4", Some(true))
    );
    let spec = web.spec.unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("node-1"));
    assert_eq!(spec.service_account_name.as_deref(), Some("web"));
    assert_eq!(spec.containers.len(), 1);
    let status = web.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.5"));
    assert_eq!(status.pod_ips.unwrap()[0].ip, "10.244.1.5");

    let pending = pods.get("pending").await.unwrap().status.unwrap();
    assert_eq!(
        (pending.phase.as_deref(), pending.pod_ip),
        (Some("Pending"), None)
    );
    let agent: Pod = Api::namespaced(client.clone(), "kube-system")
        .get("agent")
        .await
        .unwrap();
    assert_eq!(agent.spec.unwrap().host_network, Some(true));

    let services: Api<Service> = Api::namespaced(client.clone(), "lab");
    let web = services.get("web").await.unwrap().spec.unwrap();
    assert_eq!(web.cluster_ip.as_deref(), Some("10.96.0.10"));
    let ports = web.ports.unwrap();
    assert_eq!(
        (
            ports[0].name.as_deref(),
            ports[0].port,
            ports[0].app_protocol.as_deref()
        ),
        (Some("http"), 80, Some("http"))
    );
    assert_eq!(
        services
            .get("db")
            .await
            .unwrap()
            .spec
            .unwrap()
            .cluster_ip
            .as_deref(),
        Some("None")
    );

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "lab");
    let list = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    let slice = &list.items[0];
    assert!(slice.name_any().starts_with("web-"));
    assert_eq!(slice.address_type, "IPv4");
    let endpoints = slice.endpoints.as_ref().unwrap();
    assert_eq!(endpoints[1].conditions.as_ref().unwrap().ready, Some(false));
    assert_eq!(
        endpoints[0].target_ref.as_ref().unwrap().name.as_deref(),
        Some("web-5d8f7c9b4-x7k2p")
    );
    assert_eq!(slice.ports.as_ref().unwrap()[0].port, Some(8080));

    // Applying the same slice again keeps its name: one object, replaced.
    let rv = server.apply(endpoint_slice("lab", "web", &[], &[("http", 8080, None)]));
    let list = slices.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].resource_version(), Some(rv));
    // An update that changes nothing is no write.
    let before = server.resource_version();
    let same = server.get(ResourceKind::Services, "lab", "web").unwrap();
    assert_eq!(
        server.apply(same),
        server.get(ResourceKind::Services, "lab", "web").unwrap()["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
    );
    assert_eq!(server.resource_version(), before);
}

#[tokio::test]
async fn custom_resources_are_served_at_their_group_paths() {
    let server = start();
    let client = client(&server).await;
    server.apply(json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-web", "namespace": "lab"},
        "spec": {"rules": [{"from": [{"serviceAccounts": ["web"]}]}]},
    }));
    server.apply(json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "HTTPRoute",
        "metadata": {"name": "split", "namespace": "other"},
        "spec": {},
    }));
    for (kind, plural, name) in [
        ("AuthorizationPolicy", "authorizationpolicies", "allow-web"),
        ("HTTPRoute", "httproutes", "split"),
    ] {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("weft.dev", "v1alpha1", kind),
            plural,
        );
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let list = api.list(&ListParams::default()).await.unwrap();
        assert_eq!(
            list.items.iter().map(|o| o.name_any()).collect::<Vec<_>>(),
            [name]
        );
    }
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("weft.dev", "v1alpha1", "AuthorizationPolicy"),
        "authorizationpolicies",
    );
    let lab: Api<DynamicObject> = Api::namespaced_with(client.clone(), "lab", &resource);
    assert_eq!(
        lab.get("allow-web").await.unwrap().data["spec"]["rules"][0]["from"][0]["serviceAccounts"]
            [0],
        "web"
    );
    let other: Api<DynamicObject> = Api::namespaced_with(client, "other", &resource);
    assert!(other
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
    let path = ResourceKind::AuthorizationPolicies.namespaced_path("other");
    assert_eq!(
        path,
        "/apis/weft.dev/v1alpha1/namespaces/other/authorizationpolicies"
    );
    assert_eq!(server.count(Verb::List, &path), 1);
}

#[tokio::test]
async fn list_pages_are_consistent_and_filtered() {
    let server = start();
    let client = client(&server).await;
    let mut names = Vec::new();
    for i in 0..7u8 {
        let (ns, app, node) = if i < 4 {
            ("a", "web", "node-1")
        } else {
            ("b", "db", "node-2")
        };
        let name = format!("p{i}");
        let mut p = web_pod(ns, &name, node, i + 1, app);
        if i % 2 == 0 {
            p["metadata"]["labels"]["tier"] = json!("front");
        }
        server.apply(p);
        names.push(name);
    }
    let api: Api<Pod> = Api::all(client.clone());
    let first = api.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(first.items.len(), 3);
    assert_eq!(first.metadata.remaining_item_count, Some(4));
    let list_rv = first.metadata.resource_version.clone().unwrap();
    // Writes between pages do not show in the pages of a list already begun.
    server.delete(ResourceKind::Pods, "b", "p5");
    server.apply(web_pod("b", "p9", "node-2", 9, "db"));
    let mut seen: Vec<String> = first.items.iter().map(|p| p.name_any()).collect();
    let mut token = first.metadata.continue_;
    while let Some(t) = token {
        let page = api
            .list(&ListParams::default().limit(3).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version.as_deref(),
            Some(list_rv.as_str())
        );
        seen.extend(page.items.iter().map(|p| p.name_any()));
        token = page.metadata.continue_.filter(|t| !t.is_empty());
    }
    assert_eq!(seen, names);
    assert_eq!(server.count(Verb::List, "/api/v1/pods"), 3);

    let names_of = |list: kube::core::ObjectList<Pod>| {
        list.items.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    };
    let select = |labels: &str, fields: &str| {
        let api = api.clone();
        let params = ListParams::default().labels(labels).fields(fields);
        async move { names_of(api.list(&params).await.unwrap()) }
    };
    assert_eq!(select("app=web", "").await, ["p0", "p1", "p2", "p3"]);
    assert_eq!(select("app!=web,tier", "").await, ["p4", "p6"]);
    assert_eq!(select("!tier", "").await, ["p1", "p3", "p9"]);
    assert_eq!(
        select("app in (db, cache),tier notin (back)", "").await,
        ["p4", "p6", "p9"]
    );
    assert_eq!(
        select("", "spec.nodeName=node-2,metadata.name!=p4").await,
        ["p6", "p9"]
    );
    assert_eq!(
        select("tier=front", "metadata.namespace=a").await,
        ["p0", "p2"]
    );
    let in_b: Api<Pod> = Api::namespaced(client.clone(), "b");
    assert_eq!(
        names_of(in_b.list(&ListParams::default()).await.unwrap()),
        ["p4", "p6", "p9"]
    );

    // A list at an exact, older resourceVersion, and one the history no longer reaches.
    let at = api
        .list(
            &ListParams::default()
                .at(&list_rv)
                .matching(kube::api::VersionMatch::Exact),
        )
        .await
        .unwrap();
    assert_eq!(names_of(at), names);
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    server.compact();
    let err = api
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(first.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_replays_history_then_streams() {
    let server = start();
    let api: Api<Pod> = Api::all(client(&server).await);
    let rv1 = server.apply(web_pod("lab", "a", "node-1", 1, "web"));
    server.apply(web_pod("lab", "b", "node-1", 2, "web"));
    server.apply(web_pod("lab", "a", "node-1", 3, "web"));
    let rv4 = server.delete(ResourceKind::Pods, "lab", "b").unwrap();
    // Another type's change moves the resourceVersion but is not a pod event.
    server.apply(service(
        "lab",
        "web",
        Some(Ipv4Addr::new(10, 96, 0, 1)),
        &[("http", 80, 80, None)],
    ));

    let mut events = watch_pods(&api, &WatchParams::default(), &rv1).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(describe(&next_event(&mut events).await));
    }
    assert_eq!(
        seen,
        [
            ("ADDED".into(), "b".into(), "2".into()),
            ("MODIFIED".into(), "a".into(), "3".into()),
            ("DELETED".into(), "b".into(), rv4),
        ]
    );
    let rv6 = server.apply(web_pod("lab", "c", "node-2", 4, "db"));
    assert_eq!(
        describe(&next_event(&mut events).await),
        ("ADDED".into(), "c".into(), rv6)
    );

    // Without a resourceVersion: the current objects as ADDED, then changes.
    let mut events = watch_pods(&api, &WatchParams::default(), "0").await;
    let mut names = BTreeSet::new();
    for _ in 0..2 {
        let (kind, name, _) = describe(&next_event(&mut events).await);
        assert_eq!(kind, "ADDED");
        names.insert(name);
    }
    assert_eq!(names, BTreeSet::from(["a".into(), "c".into()]));
    server.delete(ResourceKind::Pods, "lab", "a");
    assert_eq!(describe(&next_event(&mut events).await).0, "DELETED");
    let watch = server
        .requests()
        .into_iter()
        .rfind(|r| r.verb == Verb::Watch)
        .unwrap();
    assert_eq!(watch.param("watch"), Some("true"));
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
}

#[tokio::test]
async fn watch_turns_selector_transitions_into_added_and_deleted() {
    let server = start();
    let api: Api<Pod> = Api::all(client(&server).await);
    let rv = server.apply(web_pod("lab", "a", "node-1", 1, "web"));
    let params = WatchParams::default()
        .labels("app=web")
        .fields("spec.nodeName=node-1");
    let mut events = watch_pods(&api, &params, &rv).await;
    server.apply(web_pod("lab", "other", "node-1", 2, "db"));
    server.apply(web_pod("lab", "elsewhere", "node-2", 3, "web"));
    server.apply(web_pod("lab", "a", "node-1", 4, "web"));
    let moved = server.apply(web_pod("lab", "a", "node-1", 4, "db"));
    server.apply(web_pod("lab", "a", "node-1", 5, "web"));
    let (kind, name, _) = describe(&next_event(&mut events).await);
    assert_eq!((kind.as_str(), name.as_str()), ("MODIFIED", "a"));
    // Leaving the selection: DELETED, with the last matching state at the change's version.
    match next_event(&mut events).await {
        WatchEvent::Deleted(p) => {
            assert_eq!(p.resource_version(), Some(moved));
            assert_eq!(p.labels()["app"], "web");
        }
        other => panic!("expected DELETED, got {other:?}"),
    }
    let (kind, name, _) = describe(&next_event(&mut events).await);
    assert_eq!((kind.as_str(), name.as_str()), ("ADDED", "a"));
}

#[tokio::test]
async fn compaction_gives_410_gone_and_ends_the_watch() {
    let server = start();
    let api: Api<Pod> = Api::all(client(&server).await);
    let rv = server.apply(web_pod("lab", "a", "node-1", 1, "web"));
    server.apply(web_pod("lab", "b", "node-1", 2, "web"));
    server.compact();
    let mut events = watch_pods(&api, &WatchParams::default(), &rv).await;
    match tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert_eq!(
                status.message,
                format!("too old resource version: {rv} (3)")
            );
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    assert!(tokio::time::timeout(WAIT, events.next())
        .await
        .unwrap()
        .is_none());
    // A fresh list's resourceVersion can be watched from.
    let list = api.list(&ListParams::default()).await.unwrap();
    let mut events = watch_pods(
        &api,
        &WatchParams::default(),
        &list.metadata.resource_version.unwrap(),
    )
    .await;
    server.apply(web_pod("lab", "c", "node-1", 3, "web"));
    assert_eq!(describe(&next_event(&mut events).await).1, "c");
}

async fn bookmark(events: &mut Events<Pod>) -> String {
    match tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        Some(Ok(WatchEvent::Bookmark(b))) => b.metadata.resource_version,
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn bookmarks_carry_the_latest_resource_version() {
    let server = start();
    server.set_bookmark_interval(Duration::from_millis(100));
    let api: Api<Pod> = Api::all(client(&server).await);
    let rv = server.apply(web_pod("lab", "a", "node-1", 1, "web"));
    let mut events = watch_pods(&api, &WatchParams::default(), &rv).await;
    assert_eq!(bookmark(&mut events).await, rv);
    // A change of another type moves the bookmark on: nothing of this type happened up to it.
    let later = server.apply(service("lab", "web", None, &[("http", 80, 80, None)]));
    // (One more at the old version may have been on its way.)
    let mut next = bookmark(&mut events).await;
    if next == rv {
        next = bookmark(&mut events).await;
    }
    assert_eq!(next, later);
    // Without allowWatchBookmarks, none.
    let mut quiet = watch_pods(&api, &WatchParams::default().disable_bookmarks(), &rv).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), quiet.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn watch_ends_after_its_timeout() {
    let server = start();
    let api: Api<Pod> = Api::all(client(&server).await);
    let mut events = watch_pods(
        &api,
        &WatchParams::default().timeout(1).disable_bookmarks(),
        "0",
    )
    .await;
    let started = std::time::Instant::now();
    assert!(tokio::time::timeout(WAIT, events.next())
        .await
        .unwrap()
        .is_none());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn dropped_watches_end_mid_stream() {
    let server = start();
    let api: Api<Pod> = Api::all(client(&server).await);
    let rv = server.apply(web_pod("lab", "a", "node-1", 1, "web"));
    let mut events = watch_pods(&api, &WatchParams::default().disable_bookmarks(), &rv).await;
    server.drop_watches();
    // kube reads the cut (an unexpected EOF in the chunked body) as the end of the watch.
    assert!(matches!(
        tokio::time::timeout(WAIT, events.next()).await.unwrap(),
        None | Some(Err(_))
    ));

    // On the wire: the body stops without its last chunk; connections without a watch stay.
    let mut idle = TcpStream::connect(server.addr()).unwrap();
    let mut watching = TcpStream::connect(server.addr()).unwrap();
    write!(
        watching,
        "GET /api/v1/pods?watch=true HTTP/1.1\r\nHost: fake\r\n\r\n"
    )
    .unwrap();
    let mut received = Vec::new();
    while !String::from_utf8_lossy(&received).contains(r#""type":"ADDED""#) {
        let mut buf = [0u8; 4096];
        let n = watching.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buf[..n]);
    }
    server.drop_watches();
    watching.read_to_end(&mut received).unwrap();
    let received = String::from_utf8(received).unwrap();
    assert!(
        received.starts_with("HTTP/1.1 200") && received.contains("transfer-encoding: chunked"),
        "{received}"
    );
    assert!(!received.ends_with("0\r\n\r\n"), "{received}");
    write!(
        idle,
        "GET /api/v1/pods HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    idle.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn pause_refuses_connections_and_resume_rebinds_the_address() {
    let server = start();
    let api: Api<Pod> = Api::all(client(&server).await);
    let mut events = watch_pods(&api, &WatchParams::default().disable_bookmarks(), "0").await;
    server.pause();
    assert!(matches!(
        tokio::time::timeout(WAIT, events.next()).await.unwrap(),
        None | Some(Err(_))
    ));
    assert_eq!(
        TcpStream::connect(server.addr()).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    server.apply(web_pod("lab", "a", "node-1", 1, "web"));
    server.resume().unwrap();
    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items[0].name_any(), "a");
    // A second pause and resume right away: the address is free again at once.
    server.pause();
    server.resume().unwrap();
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[test]
fn malformed_requests_get_status_answers() {
    let server = start();
    server.apply(web_pod("lab", "a", "node-1", 1, "web"));
    let status = |target: &str, code: u16, reason: &str, message: &str| {
        let (got, body) = raw_request(&server, "GET", target);
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (got, body["kind"].as_str(), body["reason"].as_str()),
            (code, Some("Status"), Some(reason)),
            "{target}: {body}"
        );
        assert_eq!(body["code"], code);
        assert!(
            body["message"].as_str().unwrap().contains(message),
            "{target}: {body}"
        );
    };
    status("/api/v1/pods?limit=ten", 400, "BadRequest", "limit");
    status(
        "/api/v1/pods?resourceVersion=abc",
        400,
        "BadRequest",
        "invalid resource version",
    );
    status(
        "/api/v1/pods?labelSelector=app%3D%3Dweb%20x",
        400,
        "BadRequest",
        "unable to parse requirement",
    );
    status(
        "/api/v1/pods?labelSelector=app%20in%20(web",
        400,
        "BadRequest",
        "unable to parse requirement",
    );
    status(
        "/api/v1/pods?fieldSelector=spec.foo%3Dx",
        400,
        "BadRequest",
        "field label not supported: spec.foo",
    );
    status(
        "/api/v1/services?fieldSelector=spec.nodeName%3Dx",
        400,
        "BadRequest",
        "field label not supported",
    );
    status(
        "/api/v1/pods?fieldSelector=spec.nodeName",
        400,
        "BadRequest",
        "invalid selector",
    );
    status(
        "/api/v1/pods?continue=garbage",
        400,
        "BadRequest",
        "continue key is not valid",
    );
    status(
        "/api/v1/pods?resourceVersionMatch=Sometime",
        422,
        "Invalid",
        "resourceVersionMatch",
    );
    status(
        "/api/v1/pods?watch=1&sendInitialEvents=true",
        422,
        "Invalid",
        "sendInitialEvents",
    );
    status(
        "/api/v1/pods?resourceVersion=99&resourceVersionMatch=Exact",
        504,
        "Timeout",
        "Too large resource version",
    );
    status(
        "/api/v1/pods?watch=true&resourceVersion=99",
        504,
        "Timeout",
        "Too large resource version: 99, current: 1",
    );
    status(
        "/api/v1/namespaces/lab/pods/missing",
        404,
        "NotFound",
        "pods \"missing\" not found",
    );
    status(
        "/api/v1/widgets",
        404,
        "NotFound",
        "could not find the requested resource",
    );
    status(
        "/api/v1/namespaces/lab/namespaces",
        404,
        "NotFound",
        "could not find",
    );
    let (code, body) = raw_request(&server, "DELETE", "/api/v1/namespaces/lab/pods/a");
    assert_eq!(code, 405, "{body}");
    // `watch=1` is a watch, as is any value but 0/false/f; bodies are newline-delimited events.
    let (code, body) = raw_request(
        &server,
        "GET",
        "/api/v1/namespaces/lab/pods?watch=1&timeoutSeconds=1",
    );
    assert_eq!(code, 200);
    assert!(
        body.contains(r#"{"object":{"apiVersion":"v1","kind":"Pod""#)
            || body.contains(r#""type":"ADDED""#),
        "{body}"
    );
    let (_, body) = raw_request(&server, "GET", "/api/v1/pods?watch=false");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["kind"],
        "PodList"
    );
    let verbs: Vec<Verb> = server.requests().iter().map(|r| r.verb).collect();
    assert_eq!(verbs.iter().filter(|v| **v == Verb::Watch).count(), 3);
    assert_eq!(verbs.iter().filter(|v| **v == Verb::Other).count(), 3);
}

/// kube's watcher, as the agent runs it (reflector, default backoff), recovers from everything the
/// server can do to it, re-listing only after 410 Gone.
#[tokio::test]
async fn kube_watcher_recovers_from_410_dropped_connections_and_restarts() {
    let server = start();
    server.set_bookmark_interval(Duration::from_millis(200));
    let client = client(&server).await;
    for i in 1..=5u8 {
        server.apply(web_pod("lab", &format!("p{i}"), "node-1", i, "web"));
    }
    let (store, writer) = reflector::store::<Pod>();
    let errors = Arc::new(AtomicUsize::new(0));
    let watcher_errors = errors.clone();
    let config = watcher::Config::default().page_size(2);
    tokio::spawn(
        reflector(writer, watcher(Api::<Pod>::all(client), config))
            .default_backoff()
            .for_each(move |event| {
                if event.is_err() {
                    watcher_errors.fetch_add(1, Ordering::SeqCst);
                }
                async {}
            }),
    );
    let names = || {
        let store = store.clone();
        async move {
            store
                .state()
                .iter()
                .map(|p| p.name_any())
                .collect::<BTreeSet<String>>()
        }
    };
    let expect = |wanted: &'static [&'static str]| async move {
        let wanted: BTreeSet<String> = wanted.iter().map(|s| s.to_string()).collect();
        eventually(&format!("{wanted:?}"), || {
            let names = names();
            let wanted = wanted.clone();
            async move { names.await == wanted }
        })
        .await
    };
    expect(&["p1", "p2", "p3", "p4", "p5"]).await;
    // Pages of two: three list requests, the later ones with a continue token.
    assert_eq!(ResourceKind::Pods.path(), "/api/v1/pods");
    let lists = || server.count(Verb::List, &ResourceKind::Pods.path());
    let watches = || server.count(Verb::Watch, &ResourceKind::Pods.path());
    assert_eq!(lists(), 3);
    assert!(server
        .requests()
        .iter()
        .any(|r| r.verb == Verb::List && r.param("continue").is_some()));
    eventually("a watch", || async { watches() == 1 }).await;

    // A dropped connection: the watch resumes from the last resourceVersion, without a list.
    server.drop_watches();
    server.apply(web_pod("lab", "p6", "node-1", 6, "web"));
    expect(&["p1", "p2", "p3", "p4", "p5", "p6"]).await;
    eventually("a resumed watch", || async { watches() >= 2 }).await;
    assert_eq!(lists(), 3);

    // 410 Gone: the watcher starts over with a list, and sees what changed meanwhile.
    server.compact();
    server.drop_watches();
    server.delete(ResourceKind::Pods, "lab", "p1");
    expect(&["p2", "p3", "p4", "p5", "p6"]).await;
    eventually("a re-list", || async { lists() >= 6 }).await;
    let errors_before_restart = errors.load(Ordering::SeqCst);
    // The 410 is the one error the watcher reports; a dropped connection is a plain resume.
    assert_eq!(errors_before_restart, 1);

    // A restart: connections refused for a while, then the watch resumes.
    server.pause();
    server.apply(web_pod("lab", "p7", "node-1", 7, "web"));
    server.delete(ResourceKind::Pods, "lab", "p2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.resume().unwrap();
    expect(&["p3", "p4", "p5", "p6", "p7"]).await;

    for request in server.requests() {
        eprintln!("{:?} {} {:?}", request.verb, request.path, request.query);
    }
}

/// kube's streaming-list mode: one watch with sendInitialEvents, ended by the annotated bookmark.
#[tokio::test]
async fn kube_streaming_list_watcher() {
    let server = start();
    let client = client(&server).await;
    server.apply(web_pod("lab", "a", "node-1", 1, "web"));
    server.apply(web_pod("lab", "b", "node-2", 2, "web"));
    let (store, writer) = reflector::store::<Pod>();
    let config = watcher::Config::default()
        .streaming_lists()
        .fields("spec.nodeName=node-1");
    let ready = store.clone();
    tokio::spawn(
        reflector(
            writer,
            watcher(Api::<Pod>::namespaced(client, "lab"), config),
        )
        .default_backoff()
        .for_each(|_| async {}),
    );
    tokio::time::timeout(WAIT, ready.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .state()
            .iter()
            .map(|p| p.name_any())
            .collect::<Vec<_>>(),
        ["a"]
    );
    server.apply(web_pod("lab", "c", "node-1", 3, "web"));
    eventually("c", || async { store.state().len() == 2 }).await;
    assert_eq!(server.count(Verb::List, "/api/v1/namespaces/lab/pods"), 0);
    let watch = &server.requests()[0];
    assert_eq!(
        (
            watch.verb,
            watch.param("sendInitialEvents"),
            watch.param("fieldSelector")
        ),
        (Verb::Watch, Some("true"), Some("spec.nodeName=node-1"))
    );
}

#[tokio::test]
async fn tokio_listener_and_kubeconfig() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = FakeApiServer::start_tokio(listener).unwrap();
    assert!(server
        .kubeconfig()
        .contains(&format!("server: http://{}", server.addr())));
    server.apply(namespace("lab", &[]));
    let namespaces: Api<Namespace> = Api::all(client(&server).await);
    assert_eq!(
        namespaces
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_eq!(
        server.delete(ResourceKind::Namespaces, "", "lab"),
        Some(server.resource_version())
    );
    assert!(server.get(ResourceKind::Namespaces, "", "lab").is_none());
    assert!(namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
}

/// A listener bound inside another network namespace is bound there again on `resume` (as root,
/// which making the namespace needs; skipped otherwise).
#[test]
fn resume_rebinds_in_the_listeners_network_namespace() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: making a network namespace needs root");
        return;
    }
    type Job = Box<dyn FnOnce() + Send>;
    let (jobs, queue) = std::sync::mpsc::channel::<Job>();
    // A thread in a namespace of its own, with its loopback up, for binding and connecting there.
    let netns_thread = std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(up.success());
        for job in queue {
            job();
        }
    });
    let in_netns = |job: Box<dyn FnOnce() -> (u16, String) + Send>| {
        let (reply, answer) = std::sync::mpsc::channel();
        jobs.send(Box::new(move || reply.send(job()).unwrap()))
            .unwrap();
        answer.recv().unwrap()
    };
    let (bound, listener) = std::sync::mpsc::channel();
    jobs.send(Box::new(move || {
        bound
            .send(TcpListener::bind("127.0.0.77:0").unwrap())
            .unwrap()
    }))
    .unwrap();
    let server = Arc::new(FakeApiServer::start(listener.recv().unwrap()).unwrap());
    server.apply(namespace("lab", &[]));
    let get = {
        let server = server.clone();
        move || -> Box<dyn FnOnce() -> (u16, String) + Send> {
            let server = server.clone();
            Box::new(move || raw_request(&server, "GET", "/api/v1/namespaces"))
        }
    };
    assert_eq!(in_netns(get()).0, 200);
    // Not in this thread's namespace (where nothing else uses that loopback address).
    assert!(TcpStream::connect(server.addr()).is_err());
    server.pause();
    server.resume().unwrap();
    assert_eq!(in_netns(get()).0, 200);
    assert!(TcpStream::connect(server.addr()).is_err());
    drop(get);
    drop(jobs);
    netns_thread.join().unwrap();
}
