//! Installs what building and testing weft needs on a Debian machine, idempotently: the nightly
//! toolchain with rust-src, the LLVM matching the nightly, bpf-linker built against it, the lab
//! tools, and what validates the Kubernetes manifests offline (kubectl's kustomize and the Python
//! package kubernetes-validate). When everything is present it only inspects and returns.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::run;

const LAB_PACKAGES: &[&str] = &[
    "iproute2",
    "nginx-light",
    "curl",
    "bpftool",
    "iperf3",
    "procps",
    // The benchmark's HAProxy mTLS baseline; the lab tests capture wire traffic with tcpdump.
    "haproxy",
    "tcpdump",
    // The L7 tests' raw HTTP client (a perl script with Time::HiRes).
    "perl",
    // The admin page's tests render it headless (chromium.rs); screenshots need a font.
    "chromium",
    "fonts-dejavu-core",
    // The CNI plugins a pod network is made of (bridge, host-local, ... in /usr/lib/cni), for the
    // tests of weft's CNI plugin chained after them.
    "containernetworking-plugins",
];

/// Python package whose bundled Kubernetes JSON schemas validate deploy/ offline (tests/deploy.rs).
/// Pinned: each release ships the schemas of a window of Kubernetes versions, and the test names one.
const KUBERNETES_VALIDATE: (&str, &str) = ("kubernetes-validate==1.37.0", "kubernetes_validate");

pub fn ensure() -> Result<()> {
    ensure_nightly()?;
    let llvm_major = nightly_llvm_major()?;
    let mut packages: Vec<String> = LAB_PACKAGES.iter().map(|p| p.to_string()).collect();
    packages.extend([
        format!("llvm-{llvm_major}-dev"),
        format!("libpolly-{llvm_major}-dev"),
        "libzstd-dev".into(),
        "zlib1g-dev".into(),
    ]);
    // kubectl renders deploy/ (`kubectl kustomize`); machines may have it from another source
    // than Debian, whose package is only the fallback.
    if !succeeds(Command::new("kubectl").args(["version", "--client"])) {
        packages.push("kubernetes-client".into());
    }
    if !succeeds(Command::new("python3").args(["-m", "pip", "--version"])) {
        packages.extend(["python3".into(), "python3-pip".into()]);
    }
    ensure_debian_packages(&packages)?;
    ensure_bpf_linker(llvm_major)?;
    ensure_python_package(KUBERNETES_VALIDATE)?;
    Ok(())
}

/// Whether `cmd` runs and exits 0, its output discarded.
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs a PyPI package for `python3` unless `module` already imports.
fn ensure_python_package((package, module): (&str, &str)) -> Result<()> {
    if succeeds(Command::new("python3").args(["-c", &format!("import {module}")])) {
        return Ok(());
    }
    eprintln!("setup: installing the Python package {package}");
    let install = |extra: &[&str]| {
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(extra)
            .arg(package)
            .stdout(Stdio::inherit())
            .output()
            .context("running python3 -m pip")
    };
    let mut out = install(&[])?;
    // Debian's own python3 refuses pip installs outside a virtualenv (PEP 668); the package only
    // adds a module and a command, so installing it system-wide is what this machine wants.
    if !out.status.success() && is_externally_managed(&String::from_utf8_lossy(&out.stderr)) {
        out = install(&["--break-system-packages"])?;
    }
    if !out.status.success() {
        bail!(
            "python3 -m pip install {package} failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn is_externally_managed(pip_stderr: &str) -> bool {
    pip_stderr.contains("externally-managed-environment")
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_nightly() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain (needed to build eBPF programs)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly (for -Z build-std=core)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// The LLVM major version the nightly rustc was built with; bpf-linker must link the same one.
pub fn nightly_llvm_major() -> Result<u32> {
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    parse_llvm_major(&version).context("`rustc +nightly -vV` printed no LLVM version")
}

fn parse_llvm_major(rustc_version: &str) -> Option<u32> {
    rustc_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.trim().parse().ok())
}

fn ensure_debian_packages(packages: &[String]) -> Result<()> {
    let missing: Vec<&String> = packages
        .iter()
        .filter(|pkg| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output()
                .map(|out| !String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {missing:?}");
    // A fresh machine's unattended upgrades may hold the dpkg lock for a while: wait for it.
    let lock_wait = ["-o", "DPkg::Lock::Timeout=600"];
    run(Command::new("apt-get")
        .args(lock_wait)
        .args(["update", "-qq"]))?;
    // Packages such as nginx would start a service on the host; the lab starts its own instances.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let added_policy = !policy.exists()
        && fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok()
        && fs::set_permissions(policy, fs::Permissions::from_mode(0o755)).is_ok();
    let installed = run(Command::new("apt-get")
        .args(lock_wait)
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if added_policy {
        let _ = fs::remove_file(policy);
    }
    installed
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// The LLVM feature cargo recorded when it installed bpf-linker, if it did.
fn installed_bpf_linker_feature() -> Option<String> {
    let text = std::fs::read_to_string(cargo_home().join(".crates2.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let installs = json.get("installs")?.as_object()?;
    let (_, entry) = installs
        .iter()
        .find(|(key, _)| key.starts_with("bpf-linker "))?;
    entry
        .get("features")?
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str())
        .find(|f| f.starts_with("llvm-"))
        .map(str::to_owned)
}

fn ensure_bpf_linker(llvm_major: u32) -> Result<()> {
    let wanted = format!("llvm-{llvm_major}");
    let on_path = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path && installed_bpf_linker_feature().as_deref() == Some(wanted.as_str()) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker against LLVM {llvm_major} (takes a few minutes, once)");
    let prefix = format!("/usr/lib/llvm-{llvm_major}");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--locked",
            "--force",
        ])
        .args(["--no-default-features", "--features", &wanted])
        .env("LLVM_PREFIX", &prefix))
}

#[cfg(test)]
mod tests {
    use super::{is_externally_managed, parse_llvm_major};

    #[test]
    fn llvm_major_is_read_from_rustc_version() {
        let text = "rustc 1.97.0-nightly\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(text), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.97.0\n"), None);
    }

    #[test]
    fn pep_668_refusal_is_recognised() {
        let refusal = "error: externally-managed-environment\n\n× This environment is externally \
                       managed\n╰─> To install Python packages system-wide, try apt install";
        assert!(is_externally_managed(refusal));
        assert!(!is_externally_managed(
            "ERROR: No matching distribution found for x"
        ));
    }
}
