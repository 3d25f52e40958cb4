//! weft-cni: the chained CNI plugin that asks the node's weft agent to enroll a pod before its
//! containers start, and the installer that puts it in place.
//!
//! As a plugin (`CNI_COMMAND` set, run by the container runtime) it comes after the pod network's
//! own plugin in the node's conflist and passes that plugin's result through unchanged; the
//! protocol with the agent is in `weft::cni`. `weft-cni install` copies this binary into the CNI
//! bin dir and chains it into the node's CNI config (`--watch` keeps it there), and
//! `weft-cni uninstall` takes both out again.
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// The plugin's name: its binary in the CNI bin dir and its `type` in the conflist.
const PLUGIN_NAME: &str = "weft-cni";

/// Installs or removes weft's CNI plugin on a node (run by the container runtime, with
/// CNI_COMMAND set, it is the plugin itself).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy this binary into the CNI bin dir and chain weft-cni into the node's CNI config.
    Install {
        #[command(flatten)]
        dirs: Dirs,
        /// Keep running and chain weft-cni again whenever the pod network rewrites its config.
        /// SIGTERM stops the watch and leaves weft-cni installed.
        #[arg(long)]
        watch: bool,
    },
    /// Remove weft-cni from the node's CNI config and its binary from the CNI bin dir.
    Uninstall {
        #[command(flatten)]
        dirs: Dirs,
    },
}

#[derive(Args)]
struct Dirs {
    /// Where the container runtime finds CNI plugins (e.g. /opt/cni/bin).
    #[arg(long)]
    cni_bin_dir: std::path::PathBuf,
    /// Where the container runtime reads CNI configs (e.g. /etc/cni/net.d).
    #[arg(long)]
    cni_conf_dir: std::path::PathBuf,
}

fn main() -> ExitCode {
    if let Some(command) = std::env::var_os("CNI_COMMAND") {
        return plugin::run(&command.to_string_lossy());
    }
    let cli = Cli::parse();
    weft::logging::init();
    let result = match &cli.command {
        Command::Install { dirs, watch } => install::install(dirs, *watch),
        Command::Uninstall { dirs } => install::uninstall(dirs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The plugin: one CNI invocation.
mod plugin {
    use std::{
        collections::BTreeMap,
        fmt::Display,
        io::{Read, Write},
        net::{IpAddr, Ipv4Addr},
        path::{Path, PathBuf},
        process::ExitCode,
        time::Duration,
    };

    use serde::{Deserialize, Serialize};
    use serde_json::value::RawValue;
    use weft::cni::{self, CniCommand, CniRequest, CniResponse};

    const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
    const LATEST_VERSION: &str = "1.1.0";
    /// DEL is best effort: the pod goes away whatever the agent says, and a slow DEL would hold
    /// up the runtime's teardown.
    const DEL_TIMEOUT: Duration = Duration::from_secs(2);

    // Well-known CNI error codes, and weft-cni's own (100 and up).
    const INCOMPATIBLE_VERSION: u32 = 1;
    const INVALID_ENVIRONMENT: u32 = 4;
    const IO_FAILURE: u32 = 5;
    const DECODE_FAILURE: u32 = 6;
    const INVALID_CONFIG: u32 = 7;
    const TRY_AGAIN_LATER: u32 = 11;
    const NOT_AVAILABLE: u32 = 50;
    const NOT_CHAINED: u32 = 100;
    const AGENT_ERROR: u32 = 101;

    /// A failed invocation: printed as CNI error JSON on stdout, and the plugin exits non-zero.
    #[derive(Debug, PartialEq)]
    pub struct CniError {
        code: u32,
        msg: String,
        details: String,
    }

    impl CniError {
        fn new(code: u32, msg: impl Into<String>, details: impl Display) -> Self {
            Self {
                code,
                msg: msg.into(),
                details: details.to_string(),
            }
        }
    }

    #[derive(Serialize)]
    struct ErrorOutput<'a> {
        #[serde(rename = "cniVersion")]
        cni_version: &'a str,
        code: u32,
        msg: &'a str,
        details: &'a str,
    }

    /// The plugin's entry of the conflist, as the runtime passes it on stdin. Unknown keys (the
    /// runtime's `name`, `type`, `runtimeConfig`, ...) are ignored.
    #[derive(Debug, Deserialize)]
    struct NetConf {
        #[serde(rename = "cniVersion", default)]
        cni_version: String,
        /// The chain's result so far; kept as text so it is passed on byte for byte.
        #[serde(rename = "prevResult")]
        prev_result: Option<Box<RawValue>>,
        #[serde(default = "default_agent_socket")]
        agent_socket: PathBuf,
        /// Whether a pod of a meshed namespace must wait while the agent is unreachable.
        #[serde(default = "default_fail_closed")]
        fail_closed: bool,
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        /// Where the agent keeps the namespaces file.
        #[serde(default = "default_cni_dir")]
        cni_dir: PathBuf,
    }

    fn default_agent_socket() -> PathBuf {
        cni::socket_path(Path::new(cni::DEFAULT_DIR))
    }

    fn default_fail_closed() -> bool {
        true
    }

    fn default_timeout_ms() -> u64 {
        10_000
    }

    fn default_cni_dir() -> PathBuf {
        PathBuf::from(cni::DEFAULT_DIR)
    }

    impl NetConf {
        fn timeout(&self) -> Duration {
            Duration::from_millis(self.timeout_ms)
        }
    }

    /// The CNI_* environment of the invocation.
    #[derive(Debug, Default)]
    pub struct Invocation {
        pub command: String,
        pub container_id: Option<String>,
        pub netns: Option<String>,
        pub ifname: Option<String>,
        pub args: Option<String>,
    }

    impl Invocation {
        fn from_env(command: &str) -> Self {
            let var = |name| std::env::var(name).ok().filter(|value| !value.is_empty());
            Self {
                command: command.to_owned(),
                container_id: var("CNI_CONTAINERID"),
                netns: var("CNI_NETNS"),
                ifname: var("CNI_IFNAME"),
                args: var("CNI_ARGS"),
            }
        }
    }

    /// Runs one invocation: prints its result or error on stdout and returns the exit code.
    pub fn run(command: &str) -> ExitCode {
        let invocation = Invocation::from_env(command);
        let mut stdin = Vec::new();
        // VERSION needs no config; not reading keeps a hand-run `CNI_COMMAND=VERSION` from waiting.
        let read = if command == "VERSION" {
            Ok(())
        } else {
            std::io::stdin().read_to_end(&mut stdin).map(drop)
        };
        let outcome = match read {
            Ok(()) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|err| CniError::new(IO_FAILURE, "cannot start weft-cni", err))
                .and_then(|runtime| runtime.block_on(execute(&invocation, &stdin))),
            Err(err) => Err(CniError::new(
                IO_FAILURE,
                "cannot read the network configuration from stdin",
                err,
            )),
        };
        let (text, code) = match outcome {
            Ok(None) => return ExitCode::SUCCESS,
            Ok(Some(result)) => (result, ExitCode::SUCCESS),
            Err(err) => {
                eprintln!(
                    "{PLUGIN}: {}: {}",
                    err.msg,
                    err.details,
                    PLUGIN = super::PLUGIN_NAME
                );
                (error_json(&err, &stdin), ExitCode::FAILURE)
            }
        };
        let mut stdout = std::io::stdout().lock();
        if let Err(err) = stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
        {
            eprintln!("{}: writing to stdout: {err}", super::PLUGIN_NAME);
            return ExitCode::FAILURE;
        }
        code
    }

    /// `err` as the CNI error JSON, in the config's CNI version when that is one we speak.
    fn error_json(err: &CniError, stdin: &[u8]) -> String {
        #[derive(Deserialize)]
        struct Version {
            #[serde(rename = "cniVersion")]
            cni_version: String,
        }
        let requested = serde_json::from_slice::<Version>(stdin).ok();
        let cni_version = requested
            .as_ref()
            .map(|v| v.cni_version.as_str())
            .filter(|v| SUPPORTED_VERSIONS.contains(v))
            .unwrap_or(LATEST_VERSION);
        let output = ErrorOutput {
            cni_version,
            code: err.code,
            msg: &err.msg,
            details: &err.details,
        };
        serde_json::to_string(&output).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"{LATEST_VERSION}","code":{},"msg":"weft-cni failed"}}"#,
                err.code
            )
        })
    }

    /// What the invocation prints on success (`None`: nothing), or its error.
    pub async fn execute(
        invocation: &Invocation,
        stdin: &[u8],
    ) -> Result<Option<String>, CniError> {
        match invocation.command.as_str() {
            "ADD" => add(invocation, &parse_config(stdin)?).await.map(Some),
            "DEL" => {
                del(invocation, stdin).await;
                Ok(None)
            }
            "CHECK" => check(invocation, &parse_config(stdin)?)
                .await
                .map(|()| None),
            "STATUS" => status(&parse_config(stdin)?).await.map(|()| None),
            "VERSION" => Ok(Some(version_json())),
            // Nothing of weft's outlives a pod that the runtime could collect.
            "GC" => Ok(None),
            other => Err(CniError::new(
                INVALID_ENVIRONMENT,
                "unknown CNI_COMMAND",
                format!("{other:?} is not ADD, DEL, CHECK, STATUS, VERSION or GC"),
            )),
        }
    }

    fn version_json() -> String {
        serde_json::json!({
            "cniVersion": LATEST_VERSION,
            "supportedVersions": SUPPORTED_VERSIONS,
        })
        .to_string()
    }

    fn parse_config(stdin: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|err| {
            // A config that is JSON but has a wrongly typed key is invalid, not undecodable.
            let code = if err.is_data() {
                INVALID_CONFIG
            } else {
                DECODE_FAILURE
            };
            CniError::new(code, "invalid network configuration on stdin", err)
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                INCOMPATIBLE_VERSION,
                format!("CNI version {:?} is not supported", conf.cni_version),
                format!("weft-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        if conf.timeout_ms == 0 {
            return Err(CniError::new(
                INVALID_CONFIG,
                "invalid network configuration on stdin",
                "timeout_ms must be at least 1",
            ));
        }
        Ok(conf)
    }

    /// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
    fn parse_cni_args(args: &str) -> Result<BTreeMap<&str, &str>, CniError> {
        args.split(';')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                pair.split_once('=').ok_or_else(|| {
                    CniError::new(
                        INVALID_ENVIRONMENT,
                        "invalid CNI_ARGS",
                        format!("{pair:?} is not KEY=VALUE"),
                    )
                })
            })
            .collect()
    }

    /// The IPv4 addresses of a CNI result (`ips[].address`, in CIDR notation).
    fn result_ipv4s(result: &RawValue) -> Result<Vec<Ipv4Addr>, CniError> {
        #[derive(Deserialize)]
        struct CniResult {
            #[serde(default)]
            ips: Vec<IpConfig>,
        }
        #[derive(Deserialize)]
        struct IpConfig {
            address: String,
        }
        let invalid = |err: &dyn Display| {
            CniError::new(INVALID_CONFIG, "prevResult is not a CNI result", err)
        };
        let parsed: CniResult = serde_json::from_str(result.get()).map_err(|e| invalid(&e))?;
        let mut ips = Vec::new();
        for ip in parsed.ips {
            let net: ipnet::IpNet = ip
                .address
                .parse()
                .map_err(|e| invalid(&format_args!("address {:?}: {e}", ip.address)))?;
            if let IpAddr::V4(v4) = net.addr() {
                if !ips.contains(&v4) {
                    ips.push(v4);
                }
            }
        }
        Ok(ips)
    }

    /// The request telling the agent about this invocation, with whatever the runtime gave.
    fn request_for(
        command: CniCommand,
        invocation: &Invocation,
        prev_result: Option<&RawValue>,
    ) -> Result<CniRequest, CniError> {
        let args = parse_cni_args(invocation.args.as_deref().unwrap_or_default())?;
        let arg = |key| args.get(key).map(|v| v.to_string()).unwrap_or_default();
        Ok(CniRequest {
            command,
            container_id: invocation.container_id.clone().unwrap_or_default(),
            netns: invocation.netns.clone().unwrap_or_default(),
            ifname: invocation.ifname.clone().unwrap_or_default(),
            pod_namespace: arg("K8S_POD_NAMESPACE"),
            pod_name: arg("K8S_POD_NAME"),
            pod_uid: arg("K8S_POD_UID"),
            ips: prev_result
                .map(result_ipv4s)
                .transpose()?
                .unwrap_or_default(),
        })
    }

    /// Asks the agent, within `timeout`; an error means the agent did not answer.
    async fn ask(
        socket: &Path,
        request: &CniRequest,
        timeout: Duration,
    ) -> anyhow::Result<CniResponse> {
        tokio::time::timeout(timeout, cni::request(socket, request))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the weft agent at {} did not answer within {timeout:?}",
                    socket.display()
                )
            })?
    }

    async fn add(invocation: &Invocation, conf: &NetConf) -> Result<String, CniError> {
        let prev_result = conf.prev_result.as_deref().ok_or_else(|| {
            CniError::new(
                NOT_CHAINED,
                "weft-cni must be chained after the pod network's plugin",
                "the configuration has no prevResult: list weft-cni after the primary plugin \
                 in the plugins of a .conflist",
            )
        })?;
        let request = request_for(CniCommand::Add, invocation, Some(prev_result))?;
        let missing: Vec<&str> = [
            ("CNI_CONTAINERID", &request.container_id),
            ("CNI_NETNS", &request.netns),
            ("CNI_IFNAME", &request.ifname),
            ("K8S_POD_NAMESPACE in CNI_ARGS", &request.pod_namespace),
            ("K8S_POD_NAME in CNI_ARGS", &request.pod_name),
            ("K8S_POD_UID in CNI_ARGS", &request.pod_uid),
        ]
        .into_iter()
        .filter(|(_, value)| value.is_empty())
        .map(|(name, _)| name)
        .collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                INVALID_ENVIRONMENT,
                "the runtime did not say which pod this is",
                format!("missing {}", missing.join(", ")),
            ));
        }
        match ask(&conf.agent_socket, &request, conf.timeout()).await {
            Ok(CniResponse::Enrolled | CniResponse::NotMeshed { .. }) => {}
            Ok(CniResponse::Error { error }) => {
                return Err(CniError::new(
                    AGENT_ERROR,
                    format!(
                        "the weft agent could not enroll pod {}/{}",
                        request.pod_namespace, request.pod_name
                    ),
                    error,
                ))
            }
            Err(unreachable) => agent_unreachable(conf, &request, &unreachable)?,
        }
        Ok(prev_result.get().to_owned())
    }

    async fn check(invocation: &Invocation, conf: &NetConf) -> Result<(), CniError> {
        let request = request_for(CniCommand::Check, invocation, conf.prev_result.as_deref())?;
        match ask(&conf.agent_socket, &request, conf.timeout()).await {
            Ok(CniResponse::Enrolled | CniResponse::NotMeshed { .. }) => Ok(()),
            Ok(CniResponse::Error { error }) => Err(CniError::new(
                AGENT_ERROR,
                format!(
                    "the weft agent's check of pod {}/{} failed",
                    request.pod_namespace, request.pod_name
                ),
                error,
            )),
            Err(unreachable) => agent_unreachable(conf, &request, &unreachable),
        }
    }

    /// Never fails: the runtime must be able to tear a pod down without the agent, whatever
    /// state the config, netns or agent are in.
    async fn del(invocation: &Invocation, stdin: &[u8]) {
        let conf = serde_json::from_slice::<NetConf>(stdin);
        let (socket, timeout, prev_result) = match &conf {
            Ok(conf) => (
                conf.agent_socket.clone(),
                conf.timeout().min(DEL_TIMEOUT),
                conf.prev_result.as_deref(),
            ),
            Err(err) => {
                warn(format_args!(
                    "DEL with an unreadable config ({err}); using defaults"
                ));
                (default_agent_socket(), DEL_TIMEOUT, None)
            }
        };
        let request = match request_for(CniCommand::Del, invocation, prev_result) {
            Ok(request) => request,
            Err(err) => {
                warn(format_args!(
                    "DEL not passed to the weft agent: {}: {}",
                    err.msg, err.details
                ));
                return;
            }
        };
        match ask(&socket, &request, timeout).await {
            Ok(CniResponse::Error { error }) => {
                warn(format_args!("the weft agent failed the DEL: {error}"))
            }
            Ok(_) => {}
            Err(err) => warn(format_args!("DEL not passed to the weft agent: {err:#}")),
        }
    }

    /// STATUS: ready when the agent's socket accepts a connection.
    async fn status(conf: &NetConf) -> Result<(), CniError> {
        let socket = &conf.agent_socket;
        let unavailable = |details: String| {
            CniError::new(NOT_AVAILABLE, "the weft agent is not available", details)
        };
        match tokio::time::timeout(conf.timeout(), tokio::net::UnixStream::connect(socket)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(unavailable(format!(
                "connecting to {}: {err}",
                socket.display()
            ))),
            Err(_) => Err(unavailable(format!(
                "{} did not accept within {:?}",
                socket.display(),
                conf.timeout()
            ))),
        }
    }

    /// With no answer from the agent, a pod of a namespace the agent last reported as meshed
    /// must not start uncaptured when `fail_closed`: the runtime retries it later. Any other pod
    /// starts, with a warning.
    fn agent_unreachable(
        conf: &NetConf,
        request: &CniRequest,
        unreachable: &anyhow::Error,
    ) -> Result<(), CniError> {
        let namespace = &request.pod_namespace;
        let meshed = if namespace.is_empty() {
            Ok(false)
        } else {
            cni::read_enrolled_namespaces(&conf.cni_dir)
                .map(|known| known.is_some_and(|known| known.contains(namespace)))
        };
        match meshed {
            Ok(true) if conf.fail_closed => Err(CniError::new(
                TRY_AGAIN_LATER,
                format!(
                    "try again later: the weft agent is unreachable and namespace {namespace} is meshed"
                ),
                format!("{unreachable:#}"),
            )),
            // The agent keeps the file whole (written by rename), so an unreadable one is
            // unexpected; without it nobody can tell whether the pod must be captured.
            Err(err) if conf.fail_closed => Err(CniError::new(
                TRY_AGAIN_LATER,
                "try again later: the weft agent is unreachable and its list of meshed namespaces cannot be read",
                format!("{unreachable:#}; {err:#}"),
            )),
            _ => {
                warn(format_args!(
                    "{unreachable:#}; pod {namespace}/{} goes on without the mesh",
                    request.pod_name
                ));
                Ok(())
            }
        }
    }

    /// Unstructured output for the runtime's log: CNI keeps stdout for the result.
    fn warn(message: std::fmt::Arguments<'_>) {
        eprintln!("{}: warning: {message}", super::PLUGIN_NAME);
    }

    #[cfg(test)]
    mod tests {
        use std::{
            collections::BTreeSet,
            sync::{Arc, Mutex},
        };

        use super::*;

        const PREV_RESULT: &str = "{\"cniVersion\":\"1.0.0\",  \"interfaces\":[{\"name\":\"eth0\",\"sandbox\":\"/var/run/netns/x\"}],\n\t\"ips\":[{\"interface\":0,\"address\":\"10.244.1.7/24\",\"gateway\":\"10.244.1.1\"},{\"address\":\"fd00::7/64\"},{\"address\":\"10.244.1.7/32\"}],\"zeta\":1.50,\"alpha\":1e3}";

        fn conf(extra: &str) -> String {
            format!(
                r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"weft-cni"{extra},"prevResult":{PREV_RESULT}}}"#
            )
        }

        fn pod_invocation(command: &str) -> Invocation {
            Invocation {
                command: command.into(),
                container_id: Some("c0ffee".into()),
                netns: Some("/var/run/netns/cni-1".into()),
                ifname: Some("eth0".into()),
                args: Some(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=uid-1"
                        .into(),
                ),
            }
        }

        /// A fake agent on a fresh socket answering `answer`; the requests it saw.
        fn fake_agent(dir: &Path, answer: CniResponse) -> Arc<Mutex<Vec<CniRequest>>> {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let recorded = Arc::clone(&seen);
            let listener = cni::bind(dir).unwrap();
            tokio::spawn(cni::serve(listener, move |request| {
                recorded.lock().unwrap().push(request);
                let answer = answer.clone();
                async move { answer }
            }));
            seen
        }

        #[test]
        fn config_defaults_and_overrides() {
            let defaults = parse_config(conf("").as_bytes()).unwrap();
            assert_eq!(defaults.agent_socket, Path::new("/var/run/weft/cni.sock"));
            assert!(defaults.fail_closed);
            assert_eq!(defaults.timeout(), Duration::from_secs(10));
            assert_eq!(defaults.cni_dir, Path::new("/var/run/weft"));
            let set = parse_config(
                conf(r#","agent_socket":"/run/w/s","fail_closed":false,"timeout_ms":250,"cni_dir":"/run/w""#)
                    .as_bytes(),
            )
            .unwrap();
            assert_eq!(set.agent_socket, Path::new("/run/w/s"));
            assert!(!set.fail_closed);
            assert_eq!(set.timeout(), Duration::from_millis(250));
            assert_eq!(set.cni_dir, Path::new("/run/w"));
        }

        #[test]
        fn config_errors_have_their_cni_codes() {
            let code = |stdin: &str| parse_config(stdin.as_bytes()).unwrap_err().code;
            assert_eq!(code("{not json"), DECODE_FAILURE);
            assert_eq!(code(&conf(r#","fail_closed":"yes""#)), INVALID_CONFIG);
            assert_eq!(code(&conf(r#","timeout_ms":0"#)), INVALID_CONFIG);
            assert_eq!(
                code(r#"{"cniVersion":"0.2.0","name":"n","type":"weft-cni"}"#),
                INCOMPATIBLE_VERSION
            );
            assert_eq!(
                code(r#"{"name":"n","type":"weft-cni"}"#),
                INCOMPATIBLE_VERSION
            );
            // The error JSON speaks the config's version when it can.
            let err = CniError::new(TRY_AGAIN_LATER, "m", "d");
            assert_eq!(
                error_json(&err, br#"{"cniVersion":"0.4.0"}"#),
                r#"{"cniVersion":"0.4.0","code":11,"msg":"m","details":"d"}"#
            );
            assert_eq!(
                error_json(&err, b"garbage"),
                r#"{"cniVersion":"1.1.0","code":11,"msg":"m","details":"d"}"#
            );
        }

        #[test]
        fn cni_args_are_parsed_and_pod_fields_taken() {
            let args = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;;K8S_POD_NAME=web=0")
                .unwrap();
            assert_eq!(args["K8S_POD_NAMESPACE"], "shop");
            assert_eq!(args["K8S_POD_NAME"], "web=0");
            assert!(parse_cni_args("").unwrap().is_empty());
            assert_eq!(
                parse_cni_args("K8S_POD_NAME").unwrap_err().code,
                INVALID_ENVIRONMENT
            );

            let prev = RawValue::from_string(PREV_RESULT.into()).unwrap();
            let request =
                request_for(CniCommand::Add, &pod_invocation("ADD"), Some(&prev)).unwrap();
            assert_eq!(
                (
                    request.pod_namespace.as_str(),
                    request.pod_name.as_str(),
                    request.pod_uid.as_str()
                ),
                ("shop", "web-0", "uid-1")
            );
            // IPv4 only, each once.
            assert_eq!(request.ips, vec![Ipv4Addr::new(10, 244, 1, 7)]);
            let bad = RawValue::from_string(r#"{"ips":[{"address":"nonsense"}]}"#.into()).unwrap();
            assert_eq!(result_ipv4s(&bad).unwrap_err().code, INVALID_CONFIG);
        }

        #[tokio::test]
        async fn add_passes_the_previous_result_through_byte_for_byte() {
            let dir = tempfile::tempdir().unwrap();
            let seen = fake_agent(dir.path(), CniResponse::Enrolled);
            let socket = cni::socket_path(dir.path());
            let stdin = conf(&format!(r#","agent_socket":{socket:?}"#));
            let out = execute(&pod_invocation("ADD"), stdin.as_bytes())
                .await
                .unwrap();
            assert_eq!(out.as_deref(), Some(PREV_RESULT));
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].command, CniCommand::Add);
            assert_eq!(seen[0].netns, "/var/run/netns/cni-1");
        }

        #[tokio::test]
        async fn add_fails_unchained_or_for_an_unknown_pod() {
            let unchained = r#"{"cniVersion":"1.0.0","name":"n","type":"weft-cni"}"#;
            let err = execute(&pod_invocation("ADD"), unchained.as_bytes())
                .await
                .unwrap_err();
            assert_eq!(err.code, NOT_CHAINED);
            let mut no_pod = pod_invocation("ADD");
            no_pod.args = Some("IgnoreUnknown=1;K8S_POD_NAME=web-0".into());
            let err = execute(&no_pod, conf("").as_bytes()).await.unwrap_err();
            assert_eq!(err.code, INVALID_ENVIRONMENT);
            assert!(err.details.contains("K8S_POD_NAMESPACE"), "{}", err.details);
            assert!(err.details.contains("K8S_POD_UID"), "{}", err.details);
        }

        #[tokio::test]
        async fn unreachable_agent_blocks_only_meshed_namespaces_when_failing_closed() {
            let dir = tempfile::tempdir().unwrap();
            let socket = cni::socket_path(dir.path());
            let settings = |fail_closed: bool| {
                format!(
                    r#","agent_socket":{socket:?},"cni_dir":{:?},"fail_closed":{fail_closed},"timeout_ms":300"#,
                    dir.path()
                )
            };
            let add = |settings: String| async move {
                execute(&pod_invocation("ADD"), conf(&settings).as_bytes()).await
            };
            // The agent never ran: no namespaces file, the pod starts.
            assert_eq!(
                add(settings(true)).await.unwrap().as_deref(),
                Some(PREV_RESULT)
            );
            cni::write_enrolled_namespaces(dir.path(), &BTreeSet::from(["shop".to_owned()]))
                .unwrap();
            assert_eq!(add(settings(true)).await.unwrap_err().code, TRY_AGAIN_LATER);
            assert_eq!(
                add(settings(false)).await.unwrap().as_deref(),
                Some(PREV_RESULT)
            );
            // A socket that accepts and never answers times out like a missing agent.
            let _silent = std::os::unix::net::UnixListener::bind(&socket).unwrap();
            assert_eq!(add(settings(true)).await.unwrap_err().code, TRY_AGAIN_LATER);
            cni::write_enrolled_namespaces(dir.path(), &BTreeSet::from(["bank".to_owned()]))
                .unwrap();
            assert_eq!(
                add(settings(true)).await.unwrap().as_deref(),
                Some(PREV_RESULT)
            );
            // CHECK follows the same rule.
            let check = execute(&pod_invocation("CHECK"), conf(&settings(true)).as_bytes()).await;
            assert_eq!(check, Ok(None));
        }

        #[tokio::test]
        async fn agent_errors_fail_add_and_check_but_never_del() {
            let dir = tempfile::tempdir().unwrap();
            let seen = fake_agent(
                dir.path(),
                CniResponse::Error {
                    error: "no certificate for sa web".into(),
                },
            );
            let stdin = conf(&format!(
                r#","agent_socket":{:?}"#,
                cni::socket_path(dir.path())
            ));
            for command in ["ADD", "CHECK"] {
                let err = execute(&pod_invocation(command), stdin.as_bytes())
                    .await
                    .unwrap_err();
                assert_eq!(err.code, AGENT_ERROR);
                assert_eq!(err.details, "no certificate for sa web");
            }
            // DEL succeeds with the agent failing it, and with nothing usable at all.
            assert_eq!(
                execute(&pod_invocation("DEL"), stdin.as_bytes()).await,
                Ok(None)
            );
            let bare = Invocation {
                command: "DEL".into(),
                ..Invocation::default()
            };
            assert_eq!(execute(&bare, b"").await, Ok(None));
            let commands: Vec<CniCommand> =
                seen.lock().unwrap().iter().map(|r| r.command).collect();
            assert_eq!(
                commands,
                [CniCommand::Add, CniCommand::Check, CniCommand::Del]
            );
        }

        #[tokio::test]
        async fn version_status_gc_and_unknown_commands() {
            let version = execute(&pod_invocation("VERSION"), b"").await.unwrap();
            assert_eq!(
                version.as_deref(),
                Some(
                    r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#
                )
            );
            assert_eq!(execute(&pod_invocation("GC"), b"{}").await, Ok(None));
            assert_eq!(
                execute(&pod_invocation("FROB"), b"{}")
                    .await
                    .unwrap_err()
                    .code,
                INVALID_ENVIRONMENT
            );
            let dir = tempfile::tempdir().unwrap();
            let stdin = format!(
                r#"{{"cniVersion":"1.1.0","name":"n","type":"weft-cni","agent_socket":{:?}}}"#,
                cni::socket_path(dir.path())
            );
            let invocation = pod_invocation("STATUS");
            let status = || execute(&invocation, stdin.as_bytes());
            assert_eq!(status().await.unwrap_err().code, NOT_AVAILABLE);
            let seen = fake_agent(dir.path(), CniResponse::Enrolled);
            assert_eq!(status().await, Ok(None));
            assert!(seen.lock().unwrap().is_empty(), "STATUS sends no request");
        }
    }
}

/// The installer: the binary into the CNI bin dir, weft-cni into the node's conflist.
mod install {
    use std::{
        fs,
        io::{ErrorKind, Write},
        ops::Range,
        os::unix::fs::PermissionsExt,
        path::{Path, PathBuf},
        time::Duration,
    };

    use anyhow::{bail, Context, Result};
    use serde::Deserialize;
    use serde_json::value::RawValue;
    use tokio::signal::unix::{signal, SignalKind};
    use tracing::{debug, info, warn};

    use super::{Dirs, PLUGIN_NAME};

    /// The entry appended to the conflist's plugins.
    const ENTRY: &str = r#"{"type": "weft-cni"}"#;
    /// How often `--watch` re-checks without a file event: inotify misses a conf dir that is
    /// itself replaced.
    const POLL_INTERVAL: Duration = Duration::from_secs(5);
    /// A rewrite is often several events (write, rename); one pass after they settle.
    const SETTLE: Duration = Duration::from_millis(200);
    /// Rounds of read-edit-compare before giving up on a file someone keeps rewriting.
    const EDIT_ATTEMPTS: usize = 3;

    #[derive(Debug, PartialEq)]
    enum Chained {
        Inserted(PathBuf),
        AlreadyThere(PathBuf),
        NoConfig,
    }

    pub fn install(dirs: &Dirs, watch: bool) -> Result<()> {
        install_binary(&dirs.cni_bin_dir)?;
        if watch {
            return tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the watch")?
                .block_on(watch_config(dirs));
        }
        if chain_into_config(&dirs.cni_conf_dir)? == Chained::NoConfig {
            bail!(
                "no CNI config (*.conflist or *.conf) in {}: install the pod network first, or \
                 use --watch to wait for it",
                dirs.cni_conf_dir.display()
            );
        }
        Ok(())
    }

    pub fn uninstall(dirs: &Dirs) -> Result<()> {
        let files = match config_files(&dirs.cni_conf_dir) {
            Ok(files) => files,
            Err(err) if is_not_found(&err) => Vec::new(),
            Err(err) => return Err(err),
        };
        for path in files.iter().filter(|p| has_extension(p, "conflist")) {
            if edit_file(path, remove_plugin)? {
                info!(path = %path.display(), "removed weft-cni from the CNI config");
            }
        }
        let binary = dirs.cni_bin_dir.join(PLUGIN_NAME);
        match fs::remove_file(&binary) {
            Ok(()) => info!(path = %binary.display(), "removed the weft-cni binary"),
            Err(err) if err.kind() == ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("removing {}", binary.display())),
        }
        Ok(())
    }

    fn is_not_found(err: &anyhow::Error) -> bool {
        err.downcast_ref::<std::io::Error>()
            .is_some_and(|err| err.kind() == ErrorKind::NotFound)
    }

    /// Copies the running executable to `<bin_dir>/weft-cni`, replacing it at once so the
    /// runtime never executes a partly written plugin.
    fn install_binary(bin_dir: &Path) -> Result<()> {
        fs::create_dir_all(bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
        let target = bin_dir.join(PLUGIN_NAME);
        let tmp = temporary_sibling(&target);
        let copied = fs::copy("/proc/self/exe", &tmp)
            .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)))
            .and_then(|()| fs::File::open(&tmp)?.sync_all())
            .and_then(|()| fs::rename(&tmp, &target));
        if let Err(err) = copied {
            let _ = fs::remove_file(&tmp);
            return Err(err).with_context(|| format!("installing {}", target.display()));
        }
        info!(path = %target.display(), "installed the weft-cni binary");
        Ok(())
    }

    /// Chains weft-cni into the config the runtime uses: the first `*.conflist` of `conf_dir`, or
    /// else the first `*.conf`, which becomes a conflist of the same stem.
    fn chain_into_config(conf_dir: &Path) -> Result<Chained> {
        let files = config_files(conf_dir)?;
        if let Some(conflist) = files.iter().find(|p| has_extension(p, "conflist")) {
            return Ok(if edit_file(conflist, insert_plugin)? {
                info!(path = %conflist.display(), "chained weft-cni into the CNI config");
                Chained::Inserted(conflist.clone())
            } else {
                Chained::AlreadyThere(conflist.clone())
            });
        }
        let Some(conf) = files.iter().find(|p| has_extension(p, "conf")) else {
            return Ok(Chained::NoConfig);
        };
        let text =
            fs::read_to_string(conf).with_context(|| format!("reading {}", conf.display()))?;
        let list = conf_to_conflist(&text).with_context(|| format!("in {}", conf.display()))?;
        let list = insert_plugin(&list)?.unwrap_or(list);
        let conflist = conf.with_extension("conflist");
        write_atomically(&conflist, &list, Some(conf))?;
        fs::remove_file(conf).with_context(|| format!("removing {}", conf.display()))?;
        info!(from = %conf.display(), path = %conflist.display(),
            "converted the CNI config to a conflist with weft-cni chained");
        Ok(Chained::Inserted(conflist))
    }

    /// Keeps weft-cni chained (and its binary present) until SIGTERM or SIGINT.
    async fn watch_config(dirs: &Dirs) -> Result<()> {
        let (notify_tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |_event| {
            let _ = notify_tx.send(());
        })
        .context("starting a file watcher")?;
        notify::Watcher::watch(
            &mut watcher,
            &dirs.cni_conf_dir,
            notify::RecursiveMode::NonRecursive,
        )
        .with_context(|| format!("watching {}", dirs.cni_conf_dir.display()))?;
        let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(conf_dir = %dirs.cni_conf_dir.display(), "watching the CNI config");
        let mut waiting = false;
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = changes.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while changes.try_recv().is_ok() {}
                }
                _ = poll.tick() => {}
            }
            match keep_installed(dirs) {
                Ok(Chained::NoConfig) if !waiting => {
                    waiting = true;
                    info!(conf_dir = %dirs.cni_conf_dir.display(),
                        "no CNI config yet; waiting for the pod network to write one");
                }
                Ok(chained) => {
                    waiting = chained == Chained::NoConfig;
                    debug!(?chained, "CNI config checked");
                }
                Err(err) => warn!(error = %format!("{err:#}"), "keeping weft-cni chained failed"),
            }
        }
        // Staying installed is deliberate: during a rolling upgrade the next version takes
        // over, and pods created meanwhile must still go through weft-cni.
        info!("stopping the watch; weft-cni stays installed");
        Ok(())
    }

    fn keep_installed(dirs: &Dirs) -> Result<Chained> {
        if !dirs.cni_bin_dir.join(PLUGIN_NAME).exists() {
            install_binary(&dirs.cni_bin_dir)?;
        }
        chain_into_config(&dirs.cni_conf_dir)
    }

    /// Regular files (or links to them) of `dir`, by name.
    fn config_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if fs::metadata(&path).is_ok_and(|meta| meta.is_file()) {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    fn has_extension(path: &Path, extension: &str) -> bool {
        path.extension().is_some_and(|ext| ext == extension)
    }

    /// Applies `edit` to the file; writes it (atomically) only when `edit` changes something and
    /// the file did not change meanwhile. Whether it wrote.
    fn edit_file(path: &Path, edit: fn(&str) -> Result<Option<String>>) -> Result<bool> {
        for _ in 0..EDIT_ATTEMPTS {
            let text =
                fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let Some(edited) = edit(&text).with_context(|| format!("in {}", path.display()))?
            else {
                return Ok(false);
            };
            // The pod network's installer may be rewriting the file right now: never put back
            // an older version of it.
            if fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
                write_atomically(path, &edited, Some(path))?;
                return Ok(true);
            }
        }
        bail!(
            "{} kept changing while weft-cni was being chained into it",
            path.display()
        )
    }

    /// Writes `text` to a temporary file and renames it to `path`, with the permissions of
    /// `like` when it exists. The temporary name has no config extension, so the runtime never
    /// reads it.
    fn write_atomically(path: &Path, text: &str, like: Option<&Path>) -> Result<()> {
        let tmp = temporary_sibling(path);
        let permissions = like
            .and_then(|like| fs::metadata(like).ok())
            .map(|m| m.permissions());
        let written = fs::File::create(&tmp)
            .and_then(|mut file| {
                file.write_all(text.as_bytes())?;
                if let Some(permissions) = permissions {
                    file.set_permissions(permissions)?;
                }
                file.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, path));
        if let Err(err) = written {
            let _ = fs::remove_file(&tmp);
            return Err(err).with_context(|| format!("writing {}", path.display()));
        }
        Ok(())
    }

    fn temporary_sibling(path: &Path) -> PathBuf {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
    }

    /// An element of a conflist's `plugins`: where its text is, and its `type`.
    struct Plugin {
        span: Range<usize>,
        kind: String,
    }

    /// Where the `plugins` array's `[` is in `text`, and its elements. Found through borrowed
    /// raw values, so edits touch only the bytes they must and the rest of the file stays as
    /// the pod network wrote it.
    fn locate_plugins(text: &str) -> Result<(usize, Vec<Plugin>)> {
        #[derive(Deserialize)]
        struct ConfList<'a> {
            #[serde(borrow)]
            plugins: &'a RawValue,
        }
        #[derive(Deserialize)]
        struct PluginType {
            #[serde(rename = "type")]
            kind: String,
        }
        let offset = |raw: &str| raw.as_ptr() as usize - text.as_ptr() as usize;
        let list: ConfList = serde_json::from_str(text).context("not a CNI conflist")?;
        let elements: Vec<&RawValue> =
            serde_json::from_str(list.plugins.get()).context("\"plugins\" is not a list")?;
        let plugins = elements
            .iter()
            .enumerate()
            .map(|(i, element)| {
                let PluginType { kind } = serde_json::from_str(element.get())
                    .with_context(|| format!("plugins[{i}] is not a plugin with a \"type\""))?;
                let start = offset(element.get());
                Ok(Plugin {
                    span: start..start + element.get().len(),
                    kind,
                })
            })
            .collect::<Result<_>>()?;
        Ok((offset(list.plugins.get()), plugins))
    }

    /// The conflist with weft-cni appended to its plugins, formatted like the entry before it;
    /// `None` when weft-cni is already there.
    fn insert_plugin(text: &str) -> Result<Option<String>> {
        let (open, plugins) = locate_plugins(text)?;
        if plugins.iter().any(|p| p.kind == PLUGIN_NAME) {
            return Ok(None);
        }
        let (at, separator) = match plugins.as_slice() {
            [] => (open + 1, String::new()),
            [only] => (
                only.span.end,
                format!(",{}", &text[open + 1..only.span.start]),
            ),
            [.., before, last] => (
                last.span.end,
                text[before.span.end..last.span.start].to_owned(),
            ),
        };
        Ok(Some(format!(
            "{}{separator}{ENTRY}{}",
            &text[..at],
            &text[at..]
        )))
    }

    /// The conflist without any weft-cni entry; `None` when it has none.
    fn remove_plugin(text: &str) -> Result<Option<String>> {
        let mut text = text.to_owned();
        let mut removed = false;
        loop {
            let (_, plugins) = locate_plugins(&text)?;
            let Some(i) = plugins.iter().position(|p| p.kind == PLUGIN_NAME) else {
                return Ok(removed.then_some(text));
            };
            // The entry goes with the separator before it (after it, when it is first).
            let cut = match (i.checked_sub(1), plugins.get(i + 1)) {
                (Some(before), _) => plugins[before].span.end..plugins[i].span.end,
                (None, Some(next)) => plugins[i].span.start..next.span.start,
                (None, None) => plugins[i].span.clone(),
            };
            text.replace_range(cut, "");
            removed = true;
        }
    }

    /// A single-plugin `.conf` as a conflist, the way libcni reads one: the list takes its
    /// `cniVersion` and `name`, and the conf, unchanged, is its only plugin.
    fn conf_to_conflist(conf: &str) -> Result<String> {
        #[derive(Deserialize)]
        struct Conf {
            #[serde(rename = "cniVersion")]
            cni_version: Option<String>,
            name: Option<String>,
            #[serde(rename = "type")]
            kind: String,
        }
        let parsed: Conf = serde_json::from_str(conf).context("not a CNI network config")?;
        if parsed.kind.is_empty() {
            bail!("the network config has an empty \"type\"");
        }
        let mut list = String::from("{\n");
        for (key, value) in [("cniVersion", &parsed.cni_version), ("name", &parsed.name)] {
            if let Some(value) = value {
                list.push_str(&format!(
                    "  \"{key}\": {},\n",
                    serde_json::to_string(value)?
                ));
            }
        }
        // Indenting after every newline is safe: a JSON string cannot hold a raw newline.
        list.push_str(&format!(
            "  \"plugins\": [\n    {}\n  ]\n}}\n",
            conf.trim().replace('\n', "\n    ")
        ));
        Ok(list)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "mtu": 1440,
      "ipam": {"type": "calico-ipam"}
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {"portMappings": true}
    }
  ],
  "zzz": 1.50
}
"#;

        #[test]
        fn cni_conflist_insertion_keeps_the_file_and_is_idempotent() {
            let inserted = insert_plugin(CALICO).unwrap().unwrap();
            let expected = CALICO.replace(
                "\"portMappings\": true}\n    }\n",
                "\"portMappings\": true}\n    },\n    {\"type\": \"weft-cni\"}\n",
            );
            assert_eq!(inserted, expected);
            assert_eq!(insert_plugin(&inserted).unwrap(), None);
            assert_eq!(remove_plugin(&inserted).unwrap().as_deref(), Some(CALICO));
            assert_eq!(remove_plugin(CALICO).unwrap(), None);

            let compact = r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"flannel"}]}"#;
            let inserted = insert_plugin(compact).unwrap().unwrap();
            assert_eq!(
                inserted,
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"flannel"},{"type": "weft-cni"}]}"#
            );
            assert_eq!(remove_plugin(&inserted).unwrap().as_deref(), Some(compact));
            let empty = r#"{"name":"n","plugins":[ ]}"#;
            let inserted = insert_plugin(empty).unwrap().unwrap();
            assert_eq!(
                inserted,
                r#"{"name":"n","plugins":[{"type": "weft-cni"} ]}"#
            );
            assert_eq!(remove_plugin(&inserted).unwrap().as_deref(), Some(empty));
            // weft-cni first (put there by hand) goes with the separator after it.
            let first = r#"{"plugins":[{"type":"weft-cni"}, {"type":"x"}]}"#;
            assert_eq!(
                remove_plugin(first).unwrap().as_deref(),
                Some(r#"{"plugins":[{"type":"x"}]}"#)
            );

            for broken in [
                "{",
                r#"{"name":"n"}"#,
                r#"{"plugins":{}}"#,
                r#"{"plugins":[1]}"#,
            ] {
                assert!(insert_plugin(broken).is_err(), "{broken}");
            }
        }

        #[test]
        fn cni_conf_becomes_a_conflist() {
            let conf = "{\n  \"cniVersion\": \"0.4.0\",\n  \"name\": \"mynet\",\n  \"type\": \"bridge\",\n  \"ipam\": {\"type\": \"host-local\", \"subnet\": \"10.22.0.0/16\"}\n}\n";
            let list = insert_plugin(&conf_to_conflist(conf).unwrap())
                .unwrap()
                .unwrap();
            assert_eq!(
                list,
                "{\n  \"cniVersion\": \"0.4.0\",\n  \"name\": \"mynet\",\n  \"plugins\": [\n    {\n      \"cniVersion\": \"0.4.0\",\n      \"name\": \"mynet\",\n      \"type\": \"bridge\",\n      \"ipam\": {\"type\": \"host-local\", \"subnet\": \"10.22.0.0/16\"}\n    },\n    {\"type\": \"weft-cni\"}\n  ]\n}\n"
            );
            let parsed: serde_json::Value = serde_json::from_str(&list).unwrap();
            assert_eq!(parsed["plugins"][0]["ipam"]["subnet"], "10.22.0.0/16");
            assert!(conf_to_conflist(r#"{"name":"n"}"#).is_err());
        }

        #[test]
        fn cni_config_dir_chaining_picks_the_first_conflist_or_converts_a_conf() {
            let dir = tempfile::tempdir().unwrap();
            let path = |name: &str| dir.path().join(name);
            assert_eq!(chain_into_config(dir.path()).unwrap(), Chained::NoConfig);

            fs::write(
                path("20-other.conf"),
                r#"{"cniVersion":"1.0.0","name":"o","type":"ptp"}"#,
            )
            .unwrap();
            fs::set_permissions(path("20-other.conf"), fs::Permissions::from_mode(0o600)).unwrap();
            assert_eq!(
                chain_into_config(dir.path()).unwrap(),
                Chained::Inserted(path("20-other.conflist"))
            );
            assert!(!path("20-other.conf").exists());
            let meta = fs::metadata(path("20-other.conflist")).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);

            fs::write(path("10-calico.conflist"), CALICO).unwrap();
            fs::write(path("05-ignored.json"), "{}").unwrap();
            assert_eq!(
                chain_into_config(dir.path()).unwrap(),
                Chained::Inserted(path("10-calico.conflist"))
            );
            assert_eq!(
                chain_into_config(dir.path()).unwrap(),
                Chained::AlreadyThere(path("10-calico.conflist"))
            );
            let names: Vec<String> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names.len(), 3, "no temporary files left: {names:?}");

            let bin = tempfile::tempdir().unwrap();
            install_binary(bin.path()).unwrap();
            let installed = bin.path().join(PLUGIN_NAME);
            assert_eq!(
                fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
                0o755
            );
            let dirs = Dirs {
                cni_bin_dir: bin.path().to_owned(),
                cni_conf_dir: dir.path().to_owned(),
            };
            uninstall(&dirs).unwrap();
            assert!(!installed.exists());
            assert_eq!(
                fs::read_to_string(path("10-calico.conflist")).unwrap(),
                CALICO
            );
            let other = fs::read_to_string(path("20-other.conflist")).unwrap();
            assert!(!other.contains("weft-cni"), "{other}");
        }
    }
}
