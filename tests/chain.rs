//! Lab tests of calls through chains of services: retry budgets and retry-exhaustion marking
//! keep a failing leaf from multiplying load, and deadlines propagate hop by hop (need root).
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Result};
use serde_json::Value;
use weft_lab_tests::{start_meshed_agents, App, TestLab, APP_PORT};
use xtask::{
    agent::Mesh,
    lab::{Lab, Pod},
    pki::TestCa,
};

const APP: &str = env!("CARGO_BIN_EXE_weft-testapp");

/// `requests` calls from a1 into the chain's first service, `concurrency` at a time, with
/// `extra` load arguments; the load summary.
fn call_chain(lab: &Lab, requests: u64, concurrency: u64, extra: &[&str]) -> Result<Value> {
    weft_lab_tests::load_url(
        APP,
        lab.pod("a1")?,
        "http://10.96.1.1/",
        requests,
        concurrency,
        extra,
    )
}

/// `weft-testapp serve` in `pod`, named after it.
fn serve(pod: &Pod, args: &[&str]) -> Result<App> {
    App::serve(APP, pod, &pod.name, args)
}

/// The chain's services: `svc-<i>` at 10.96.1.<i>:80 in front of the pod labelled `hop-<i>`;
/// with `retries`, a route retrying 5xx five times; `budget` is each service's retry_budget.
fn chain_mesh(lab: &Lab, hops: &[&str], retries: bool, budget: &str) -> Result<Mesh> {
    let ca = TestCa::new("weft lab mesh CA")?;
    let (cert, key) = ca.write(&lab.dir.join("ca"))?;
    let mut mesh = Mesh::new(lab, cert, key);
    for (i, pod) in hops.iter().enumerate() {
        mesh.workload_mut(pod)?.labels =
            Box::leak(format!("{{app: hop-{}}}", i + 1).into_boxed_str());
        mesh.services.push_str(&format!(
            "  - {{name: svc-{n}, namespace: lab, vips: [10.96.1.{n}], ports: [{{port: 80, target_port: {APP_PORT}}}], selector: {{app: hop-{n}}}, retry_budget: {budget}}}\n",
            n = i + 1
        ));
        if retries {
            mesh.routes.push_str(&format!(
                "  - metadata: {{name: svc-{n}, namespace: lab}}\n    spec:\n      parentRefs: [{{name: svc-{n}}}]\n      rules: [{{retry: {{attempts: 5, on: [5xx], backoff: 1ms, maxBackoff: 2ms}}}}]\n",
                n = i + 1
            ));
        }
    }
    Ok(mesh)
}

/// Apps of the chain: each hop calls the next service, the last one `leaf_args`.
fn start_chain(lab: &Lab, hops: &[&str], leaf_args: &[&str]) -> Result<Vec<App>> {
    let mut apps = Vec::new();
    for (i, name) in hops.iter().enumerate() {
        let pod = lab.pod(name)?;
        let app = if i + 1 == hops.len() {
            serve(pod, leaf_args)?
        } else {
            serve(pod, &["--next", &format!("http://10.96.1.{}/", i + 2)])?
        };
        apps.push(app);
    }
    Ok(apps)
}

/// Entry a1 → b1 → a2 → b2 → a3 (the leaf): every call crosses between the two nodes.
const CHAIN: [&str; 4] = ["b1", "a2", "b2", "a3"];

#[test]
fn a_failing_leaf_under_four_retrying_hops_sees_at_most_1_3x_the_entry_load() -> Result<()> {
    let lab = TestLab::up("chnrt", 2, 3)?;
    let budget = "{ratio: 0.2, min_per_second: 10, window_ms: 10000}";
    let mesh = chain_mesh(&lab, &CHAIN, true, budget)?;
    let agents = start_meshed_agents(&lab, &mesh)?;
    let apps = start_chain(&lab, &CHAIN, &["--fail-percent", "100"])?;
    let entry = 2000;
    let summary = call_chain(&lab, entry, 8, &[])?;
    ensure!(
        summary["status"]["503"] == entry,
        "every call fails at the leaf: {summary}"
    );
    let leaf = apps[3].counter("requests")?;
    let first_hop = apps[0].counter("requests")?;
    eprintln!("entry {entry}, first hop {first_hop}, leaf {leaf}");
    ensure!(
        first_hop == entry,
        "the entry's agent retried marked failures: hop 1 saw {first_hop} of {entry}"
    );
    ensure!(
        leaf as f64 <= 1.3 * entry as f64,
        "the leaf saw {leaf} requests for {entry} entering the chain"
    );
    // Retries did happen, at the hop next to the leaf only, within its budget.
    ensure!(leaf > entry, "no retry reached the leaf ({leaf})");
    let suppressed: u64 = agents
        .iter()
        .map(|a| {
            a.stats().map(|s| {
                s["services"]["lab/svc-4:80"]["retries_suppressed"]
                    .as_u64()
                    .unwrap_or(0)
            })
        })
        .sum::<Result<u64>>()?;
    ensure!(suppressed > 0, "the budget never refused a retry");
    Ok(())
}

#[test]
fn without_budgets_the_same_chain_multiplies_load_at_the_leaf() -> Result<()> {
    let lab = TestLab::up("chnnb", 2, 3)?;
    let mesh = chain_mesh(&lab, &CHAIN, true, "null")?;
    let _agents = start_meshed_agents(&lab, &mesh)?;
    let apps = start_chain(&lab, &CHAIN, &["--fail-percent", "100"])?;
    let entry = 300;
    call_chain(&lab, entry, 8, &[])?;
    let leaf = apps[3].counter("requests")?;
    // Five retries at the hop next to the leaf, for every call.
    ensure!(
        leaf == 6 * entry,
        "without a budget the leaf should see 6x the entry load, saw {leaf} for {entry}"
    );
    Ok(())
}

fn unix_ms_in(delay: Duration) -> Result<String> {
    let at = SystemTime::now() + delay;
    Ok(at.duration_since(UNIX_EPOCH)?.as_millis().to_string())
}

#[test]
fn deadlines_cut_a_slow_chain_at_the_edge_and_never_reach_the_leaf_late() -> Result<()> {
    let lab = TestLab::up("chndl", 2, 3)?;
    let hops = ["b1", "a2"];
    let mesh = chain_mesh(&lab, &hops, false, "{}")?;
    let _agents = start_meshed_agents(&lab, &mesh)?;
    // The leaf sleeps far beyond any deadline.
    let apps = start_chain(&lab, &hops, &["--delay-ms", "2000"])?;
    let deadline_ms = 500;
    let header = format!(
        "x-weft-deadline:{}",
        unix_ms_in(Duration::from_millis(deadline_ms))?
    );
    let summary = call_chain(&lab, 20, 20, &["--header", &header])?;
    ensure!(summary["status"]["504"] == 20, "{summary}");
    let slowest_ms = summary["latency_us"]["max"].as_f64().unwrap_or(f64::MAX) / 1000.0;
    ensure!(
        slowest_ms <= deadline_ms as f64 * 1.1,
        "the caller got its 504 after {slowest_ms} ms for a {deadline_ms} ms deadline"
    );
    ensure!(
        apps[1].counter("requests")? == 20,
        "the leaf got every request in time"
    );
    ensure!(
        apps[1].counter("late")? == 0,
        "a request reached the leaf after its deadline"
    );

    // Past on arrival: answered 504 by the first agent, no app sees it.
    let past = format!("x-weft-deadline:{}", unix_ms_in(Duration::ZERO)?);
    let summary = call_chain(&lab, 10, 1, &["--header", &past])?;
    ensure!(summary["status"]["504"] == 10, "{summary}");
    ensure!(
        apps[0].counter("requests")? == 20,
        "an expired request reached the first app"
    );
    Ok(())
}

#[test]
fn a_deadline_that_passes_inside_an_app_stops_at_that_app_s_agent() -> Result<()> {
    let lab = TestLab::up("chndm", 2, 3)?;
    let hops = ["b1", "a2"];
    let mesh = chain_mesh(&lab, &hops, false, "{}")?;
    let _agents = start_meshed_agents(&lab, &mesh)?;
    // b1 works 300 ms before calling on; the deadline is 200 ms away.
    let mut apps = vec![serve(
        lab.pod("b1")?,
        &["--delay-ms", "300", "--next", "http://10.96.1.2/"],
    )?];
    apps.push(serve(lab.pod("a2")?, &[])?);
    let header = format!(
        "x-weft-deadline:{}",
        unix_ms_in(Duration::from_millis(200))?
    );
    let summary = call_chain(&lab, 5, 5, &["--header", &header])?;
    ensure!(summary["status"]["504"] == 5, "{summary}");
    ensure!(
        apps[0].counter("requests")? == 5,
        "b1 got the requests while they had time"
    );
    ensure!(
        apps[1].counter("requests")? == 0,
        "the leaf got requests past their deadline"
    );
    Ok(())
}
