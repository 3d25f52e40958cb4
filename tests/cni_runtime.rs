//! A tiny CNI runtime for the tests, running a conflist's plugins the way containerd's libcni
//! does: each plugin is executed from CNI_PATH with CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS,
//! CNI_IFNAME, CNI_ARGS and CNI_PATH set and its config on stdin — its entry of the list with the
//! list's `name` and `cniVersion`, plus `prevResult`: on ADD the previous plugin's result, on
//! CHECK and DEL the cached result of the whole ADD. DEL runs the plugins in reverse order, and a
//! failing plugin stops the chain. A test binary includes it with `mod cni_runtime;`.
use std::{
    collections::HashMap,
    io::{ErrorKind, Read, Write},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

/// How long one plugin may run before the runtime gives up on it.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A conflist and where its plugins are.
pub struct Runtime {
    name: String,
    cni_version: String,
    plugins: Vec<Map<String, Value>>,
    cni_path: Vec<PathBuf>,
    /// The network namespace (under /var/run/netns) the plugins run in, as the runtime of a lab
    /// node would; `None`: the caller's.
    netns: Option<String>,
    /// The final ADD result per (container id, interface), as libcni caches it for CHECK/DEL.
    cache: HashMap<(String, String), String>,
}

/// One network attachment of a sandbox: the CNI_* variables of its invocations.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub args: String,
}

impl Attachment {
    /// A pod sandbox as containerd's CRI plugin attaches it: `eth0`, the pod in CNI_ARGS.
    pub fn pod(container_id: &str, netns: &Path, namespace: &str, name: &str, uid: &str) -> Self {
        Self {
            container_id: container_id.into(),
            netns: netns.into(),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};\
                 K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}"
            ),
        }
    }
}

/// One execution of a plugin.
#[derive(Debug)]
pub struct Invocation {
    /// The plugin's `type`.
    pub plugin: String,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Invocation {
    /// The CNI error JSON the plugin printed, when it failed.
    pub fn error(&self) -> Option<Value> {
        if self.status.success() {
            return None;
        }
        serde_json::from_str(&self.stdout).ok()
    }
}

/// The plugins one operation ran, in order; a failed one is the last.
#[derive(Debug)]
pub struct ChainRun {
    pub invocations: Vec<Invocation>,
    /// ADD only, when every plugin succeeded: the chain's result as libcni caches it.
    pub result: Option<String>,
}

impl ChainRun {
    pub fn succeeded(&self) -> bool {
        self.invocations.iter().all(|i| i.status.success())
    }

    /// The plugin that failed the operation.
    pub fn failure(&self) -> Option<&Invocation> {
        self.invocations.iter().find(|i| !i.status.success())
    }

    /// The (last) invocation of the plugin of `type`.
    pub fn invocation(&self, plugin: &str) -> Option<&Invocation> {
        self.invocations.iter().rev().find(|i| i.plugin == plugin)
    }
}

impl Runtime {
    /// The runtime of `conflist` (its text), finding plugins in `cni_path` in order.
    pub fn new(conflist: &str, cni_path: Vec<PathBuf>) -> Result<Self> {
        let list: Value = serde_json::from_str(conflist).context("conflist is not JSON")?;
        let text = |key: &str| {
            list[key]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("conflist without {key}"))
        };
        let plugins = list["plugins"]
            .as_array()
            .context("conflist without plugins")?
            .iter()
            .map(|p| p.as_object().cloned().context("a plugin is not an object"))
            .collect::<Result<_>>()?;
        Ok(Self {
            name: text("name")?,
            cni_version: text("cniVersion")?,
            plugins,
            cni_path,
            netns: None,
            cache: HashMap::new(),
        })
    }

    /// Runs the plugins inside the network namespace `netns` (a name under /var/run/netns).
    pub fn run_in(mut self, netns: &str) -> Self {
        self.netns = Some(netns.into());
        self
    }

    /// ADD: every plugin in order, each given the previous one's result.
    pub fn add(&mut self, attachment: &Attachment) -> Result<ChainRun> {
        let mut invocations = Vec::new();
        let mut prev_result: Option<String> = None;
        for plugin in &self.plugins {
            let stdin = self.plugin_config(plugin, prev_result.as_deref())?;
            let invocation = self.exec(plugin, "ADD", Some(attachment), &stdin)?;
            let succeeded = invocation.status.success();
            if succeeded {
                serde_json::from_str::<Value>(&invocation.stdout).with_context(|| {
                    format!(
                        "{}'s ADD result is not JSON: {:?}",
                        invocation.plugin, invocation.stdout
                    )
                })?;
                // libcni decodes the result and encodes it again: compact, fields in order.
                prev_result = Some(compact(&invocation.stdout));
            }
            invocations.push(invocation);
            if !succeeded {
                return Ok(ChainRun {
                    invocations,
                    result: None,
                });
            }
        }
        if let Some(result) = &prev_result {
            self.cache.insert(cache_key(attachment), result.clone());
        }
        Ok(ChainRun {
            invocations,
            result: prev_result,
        })
    }

    /// CHECK: every plugin in order, each given the cached ADD result.
    pub fn check(&self, attachment: &Attachment) -> Result<ChainRun> {
        let cached = self
            .cache
            .get(&cache_key(attachment))
            .context("CHECK needs the result of an ADD")?;
        self.run_each("CHECK", attachment, self.plugins.iter(), Some(cached))
    }

    /// DEL: every plugin in reverse order, given the cached ADD result if there is one; a
    /// successful DEL forgets it.
    pub fn del(&mut self, attachment: &Attachment) -> Result<ChainRun> {
        let key = cache_key(attachment);
        let cached = self.cache.get(&key).cloned();
        let run = self.run_each(
            "DEL",
            attachment,
            self.plugins.iter().rev(),
            cached.as_deref(),
        )?;
        if run.succeeded() {
            self.cache.remove(&key);
        }
        Ok(run)
    }

    /// STATUS (CNI 1.1): every plugin in order, with its config and no attachment.
    pub fn status(&self) -> Result<ChainRun> {
        let mut invocations = Vec::new();
        for plugin in &self.plugins {
            let stdin = self.plugin_config(plugin, None)?;
            let invocation = self.exec(plugin, "STATUS", None, &stdin)?;
            let failed = !invocation.status.success();
            invocations.push(invocation);
            if failed {
                break;
            }
        }
        Ok(ChainRun {
            invocations,
            result: None,
        })
    }

    /// VERSION of the plugin of `type`.
    pub fn version(&self, plugin: &str) -> Result<Invocation> {
        let mut entry = Map::new();
        entry.insert("type".into(), plugin.into());
        let stdin = serde_json::json!({ "cniVersion": self.cni_version }).to_string();
        self.exec(&entry, "VERSION", None, &stdin)
    }

    fn run_each<'a>(
        &self,
        command: &str,
        attachment: &Attachment,
        plugins: impl Iterator<Item = &'a Map<String, Value>>,
        prev_result: Option<&str>,
    ) -> Result<ChainRun> {
        let mut invocations = Vec::new();
        for plugin in plugins {
            let stdin = self.plugin_config(plugin, prev_result)?;
            let invocation = self.exec(plugin, command, Some(attachment), &stdin)?;
            let failed = !invocation.status.success();
            invocations.push(invocation);
            if failed {
                break;
            }
        }
        Ok(ChainRun {
            invocations,
            result: None,
        })
    }

    /// The plugin's entry with the list's name and version and `prev_result`, encoded like Go
    /// encodes libcni's map: compact, keys sorted.
    fn plugin_config(
        &self,
        plugin: &Map<String, Value>,
        prev_result: Option<&str>,
    ) -> Result<String> {
        let mut fields: Vec<(String, String)> = plugin
            .iter()
            .filter(|(key, _)| !matches!(key.as_str(), "name" | "cniVersion" | "prevResult"))
            .map(|(key, value)| Ok((key.clone(), serde_json::to_string(value)?)))
            .collect::<Result<_>>()?;
        fields.push(("name".into(), serde_json::to_string(&self.name)?));
        fields.push((
            "cniVersion".into(),
            serde_json::to_string(&self.cni_version)?,
        ));
        if let Some(prev_result) = prev_result {
            fields.push(("prevResult".into(), prev_result.to_owned()));
        }
        fields.sort();
        let body = fields
            .iter()
            .map(|(key, value)| Ok(format!("{}:{value}", serde_json::to_string(key)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(format!("{{{}}}", body.join(",")))
    }

    fn find(&self, plugin: &str) -> Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|dir| dir.join(plugin))
            .find(|path| path.is_file())
            .with_context(|| format!("CNI plugin {plugin} not found in {:?}", self.cni_path))
    }

    fn exec(
        &self,
        plugin: &Map<String, Value>,
        command: &str,
        attachment: Option<&Attachment>,
        stdin: &str,
    ) -> Result<Invocation> {
        let kind = plugin["type"]
            .as_str()
            .context("a plugin without a type")?
            .to_owned();
        let path = self.find(&kind)?;
        let mut cmd = match &self.netns {
            Some(netns) => xtask::lab::command_in(netns, None, &path)?,
            None => Command::new(&path),
        };
        let cni_path = std::env::join_paths(&self.cni_path).context("CNI_PATH")?;
        cmd.env("CNI_COMMAND", command).env("CNI_PATH", cni_path);
        if let Some(attachment) = attachment {
            cmd.env("CNI_CONTAINERID", &attachment.container_id)
                .env("CNI_NETNS", &attachment.netns)
                .env("CNI_IFNAME", &attachment.ifname)
                .env("CNI_ARGS", &attachment.args);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", path.display()))?;
        let mut input = child.stdin.take().context("plugin stdin")?;
        let config = stdin.to_owned();
        // A plugin may exit without reading its stdin (VERSION does): that is no error.
        let writer = thread::spawn(move || match input.write_all(config.as_bytes()) {
            Err(err) if err.kind() != ErrorKind::BrokenPipe => Err(err),
            _ => Ok(()),
        });
        let stdout = read_all(child.stdout.take().context("plugin stdout")?);
        let stderr = read_all(child.stderr.take().context("plugin stderr")?);
        let deadline = Instant::now() + PLUGIN_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("{kind} {command} ran longer than {PLUGIN_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(10));
        };
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("stdin writer panicked"))?
            .context("writing the plugin's stdin")?;
        let joined = |reader: thread::JoinHandle<std::io::Result<String>>| {
            reader
                .join()
                .map_err(|_| anyhow::anyhow!("output reader panicked"))?
                .context("reading the plugin's output")
        };
        Ok(Invocation {
            plugin: kind,
            stdin: stdin.to_owned(),
            stdout: joined(stdout)?,
            stderr: joined(stderr)?,
            status,
        })
    }
}

/// Reads `pipe` to its end on a thread of its own, so a plugin that never ends cannot block.
fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<std::io::Result<String>> {
    thread::spawn(move || {
        let mut text = String::new();
        pipe.read_to_string(&mut text).map(|_| text)
    })
}

fn cache_key(attachment: &Attachment) -> (String, String) {
    (attachment.container_id.clone(), attachment.ifname.clone())
}

/// `json` without the whitespace between its tokens, everything else (key order, numbers) as
/// it is: how Go re-encodes a plugin's result, whose fields it keeps in their declared order.
pub fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}
