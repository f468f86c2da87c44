//! `cargo xtask k8s-build`: builds kube-apiserver, kube-controller-manager and kube-proxy from
//! the k8s.io/kubernetes module source on the Go module proxy, because no package registry these
//! machines reach ships those binaries. Results are cached per version under
//! `~/.cache/lbx/k8s/<version>/bin`.
//!
//! k8s.io/kubernetes points its staging modules (k8s.io/api, client-go, ...) at
//! `./staging/src/...` directories, which only exist in a git checkout. A throwaway main module
//! requires k8s.io/kubernetes and replaces each staging module with its published tag
//! (Kubernetes 1.x.y publishes them as v0.x.y), which makes the commands buildable with plain
//! `go build`.

use std::{
    collections::VecDeque,
    ffi::OsString,
    fmt, fs,
    io::{self, BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    str::FromStr,
    time::{Duration, Instant},
};

use lb_ebpf_build::find_on_path;

use crate::cmd::{self, CmdError};

/// Newest 1.34 patch release this machine's Go module proxy lets go build (checked 2026-11).
/// Its version list (`go list -m -versions`) stops at 1.34.4, yet it also serves 1.34.5 to
/// 1.34.12; 1.34.11 and 1.34.12 lack checksum-database entries for k8s.io/kubernetes itself,
/// so go refuses them, while 1.34.10's are complete for everything the build needs.
pub const DEFAULT_VERSION: &str = "1.34.10";

/// The commands we build, each from `k8s.io/kubernetes/cmd/<name>`. kubectl is built too so
/// `kubectl apply --dry-run=server -k deploy/` uses a client of the same release as the server.
pub const BINARIES: [&str; 4] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-proxy",
    "kubectl",
];

/// The arguments that make `name` print its version line.
fn version_args(name: &str) -> &'static [&'static str] {
    if name == "kubectl" {
        &["version", "--client"]
    } else {
        &["--version"]
    }
}

const KUBERNETES_MODULE: &str = "k8s.io/kubernetes";
/// Where k8s.io/kubernetes' go.mod points the modules it develops in-tree.
const STAGING_PREFIX: &str = "./staging/src/";
/// Module path of the throwaway main module; never published.
const BUILD_MODULE: &str = "lbx.local/k8s-build";
/// Packages whose version variables hack/lib/version.sh sets with `-X`; we do the same so
/// `--version` prints the real release instead of `v0.0.0-master`.
const VERSION_PACKAGES: [&str; 2] = [
    "k8s.io/client-go/pkg/version",
    "k8s.io/component-base/version",
];
/// Go's fallback when the machine has no usable `go` on PATH (the official tarball location).
const GO_FALLBACK: &str = "/usr/local/go/bin/go";
/// How many non-progress stderr lines of a failed go command we show.
const STDERR_TAIL_LINES: usize = 40;
/// How often the build prints a progress line while go keeps compiling.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "`{input}` is not a Kubernetes release version ({reason}); pass e.g. \
         `--version {DEFAULT_VERSION}`"
    )]
    BadVersion { input: String, reason: String },
    #[error("neither XDG_CACHE_HOME nor HOME is set; set HOME so the build has a cache directory")]
    NoCacheDir,
    #[error(
        "no Go toolchain: `go` is not on PATH and {GO_FALLBACK} does not exist; install Go \
         (e.g. the golang tarball into /usr/local/go) and retry"
    )]
    NoGo,
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Cmd {
        #[from]
        source: CmdError,
    },
    #[error("`{command}` failed ({status}); last lines of its stderr:\n{stderr_tail}\n{hint}")]
    Go {
        command: String,
        status: ExitStatus,
        stderr_tail: String,
        hint: String,
    },
    #[error(
        "{} does not look like k8s.io/kubernetes' go.mod ({reason}); the build recipe in \
         xtask/src/k8s.rs needs updating for this release",
        path.display()
    )]
    UnexpectedGoMod { path: PathBuf, reason: String },
    #[error(
        "go downloaded {module} but did not say where its go.mod is (it printed `{output}`); \
         run `go mod download -json {module}` to see why"
    )]
    NoGoModPath { module: String, output: String },
    #[error(
        "{} --version printed `{got}`, expected `{expected}`; delete {} and retry",
        binary.display(),
        binary.display()
    )]
    WrongVersion {
        binary: PathBuf,
        expected: String,
        got: String,
    },
}

/// A Kubernetes release `1.<minor>.<patch>`; pre-releases are refused because their staging
/// tags do not follow the v0.<minor>.<patch> rule exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeVersion {
    pub minor: u32,
    pub patch: u32,
}

impl KubeVersion {
    /// The k8s.io/kubernetes module version, e.g. `v1.34.4`.
    pub fn module_version(&self) -> String {
        format!("v{self}")
    }

    /// The tag of every staging module released with it, e.g. `v0.34.4`.
    pub fn staging_version(&self) -> String {
        format!("v0.{}.{}", self.minor, self.patch)
    }

    /// What `<binary> --version` prints for this release.
    pub fn version_line(&self) -> String {
        format!("Kubernetes {}", self.module_version())
    }
}

impl fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "1.{}.{}", self.minor, self.patch)
    }
}

impl FromStr for KubeVersion {
    type Err = K8sError;

    fn from_str(input: &str) -> Result<Self, K8sError> {
        let bad = |reason: &str| K8sError::BadVersion {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let digits = input.strip_prefix('v').unwrap_or(input);
        let parts: Vec<&str> = digits.split('.').collect();
        let [major, minor, patch] = parts[..] else {
            return Err(bad(
                "expected three dot-separated numbers, 1.<minor>.<patch>",
            ));
        };
        let number = |part: &str| -> Result<u32, K8sError> {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("each part must be a plain decimal number"));
            }
            part.parse().map_err(|_| bad("number too large"))
        };
        if number(major)? != 1 {
            return Err(bad("only Kubernetes 1.x is supported"));
        }
        Ok(Self {
            minor: number(minor)?,
            patch: number(patch)?,
        })
    }
}

/// What the build takes from k8s.io/kubernetes' go.mod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesGoMod {
    /// The `go` directive's version: the main module must declare at least this.
    pub go_version: String,
    /// `godebug` settings; they only take effect in the main module, so we copy them.
    pub godebug: Vec<String>,
    /// Module paths replaced with `./staging/src/<path>`, in file order.
    pub staging_modules: Vec<String>,
}

/// Extracts the go version, godebug settings and staging modules from a go.mod's text.
/// Errors name what is missing; `path` is only used in messages.
pub fn parse_kubernetes_go_mod(text: &str, path: &Path) -> Result<KubernetesGoMod, K8sError> {
    let unexpected = |reason: String| K8sError::UnexpectedGoMod {
        path: path.to_owned(),
        reason,
    };
    let mut go_version = None;
    let mut godebug = Vec::new();
    let mut staging_modules = Vec::new();
    for (verb, args) in directives(text) {
        match verb {
            "go" => go_version = Some(args.to_owned()),
            "godebug" => godebug.push(args.to_owned()),
            "replace" => {
                let Some((old, new)) = args.split_once("=>") else {
                    return Err(unexpected(format!("replace without `=>`: `{args}`")));
                };
                let old_path = old.split_whitespace().next().unwrap_or_default();
                let new_path = new.split_whitespace().next().unwrap_or_default();
                if let Some(dir) = new_path.strip_prefix(STAGING_PREFIX) {
                    if dir != old_path {
                        return Err(unexpected(format!(
                            "{old_path} is replaced with {new_path}, not {STAGING_PREFIX}{old_path}"
                        )));
                    }
                    staging_modules.push(old_path.to_owned());
                }
            }
            _ => {}
        }
    }
    let go_version = go_version.ok_or_else(|| unexpected("no `go` directive".to_owned()))?;
    if staging_modules.is_empty() {
        return Err(unexpected(format!(
            "no `replace` directive points at {STAGING_PREFIX}"
        )));
    }
    Ok(KubernetesGoMod {
        go_version,
        godebug,
        staging_modules,
    })
}

/// A go.mod's directives as (verb, arguments), with `verb ( ... )` blocks flattened and
/// `//` comments dropped.
fn directives(text: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut block: Option<&str> = None;
    for raw in text.lines() {
        let line = raw.split_once("//").map_or(raw, |(code, _)| code).trim();
        if line.is_empty() {
            continue;
        }
        if let Some(verb) = block {
            if line == ")" {
                block = None;
            } else {
                out.push((verb, line));
            }
            continue;
        }
        let (verb, args) = line
            .split_once(char::is_whitespace)
            .map_or((line, ""), |(verb, args)| (verb, args.trim()));
        if args == "(" {
            block = Some(verb);
        } else if let Some(single) = args.strip_prefix('(').and_then(|a| a.strip_suffix(')')) {
            // `verb ( args )` on one line.
            out.push((verb, single.trim()));
        } else {
            out.push((verb, args));
        }
    }
    out
}

/// One `replace` line per staging module, pinning it to the release's published tag.
pub fn replace_lines(staging_modules: &[String], version: KubeVersion) -> Vec<String> {
    let tag = version.staging_version();
    staging_modules
        .iter()
        .map(|module| format!("{module} => {module} {tag}"))
        .collect()
}

/// The throwaway main module's go.mod.
pub fn render_go_mod(version: KubeVersion, kubernetes: &KubernetesGoMod) -> String {
    let mut out = format!(
        "// Generated by `cargo xtask k8s-build`; rewritten on every build.\n\
         module {BUILD_MODULE}\n\ngo {}\n",
        kubernetes.go_version
    );
    for setting in &kubernetes.godebug {
        out.push_str(&format!("\ngodebug {setting}\n"));
    }
    out.push_str(&format!(
        "\nrequire {KUBERNETES_MODULE} {}\n\nreplace (\n",
        version.module_version()
    ));
    for line in replace_lines(&kubernetes.staging_modules, version) {
        out.push_str(&format!("\t{line}\n"));
    }
    out.push_str(")\n");
    out
}

/// The `-ldflags` value: stripped binaries plus the version variables hack/lib/version.sh
/// sets. buildDate is the release's publication time, which keeps the link reproducible.
pub fn ldflags(version: KubeVersion, build_date: Option<&str>, commit: Option<&str>) -> String {
    let mut vars = vec![
        ("gitVersion", version.module_version()),
        ("gitMajor", "1".to_owned()),
        ("gitMinor", version.minor.to_string()),
        // The module is the published tag, unmodified.
        ("gitTreeState", "clean".to_owned()),
    ];
    if let Some(date) = build_date {
        vars.push(("buildDate", date.to_owned()));
    }
    if let Some(commit) = commit {
        vars.push(("gitCommit", commit.to_owned()));
    }
    let mut flags = String::from("-s -w");
    for package in VERSION_PACKAGES {
        for (key, value) in &vars {
            flags.push_str(&format!(" -X {package}.{key}={value}"));
        }
    }
    flags
}

/// Where one version's source module and binaries live.
#[derive(Debug, Clone)]
pub struct K8sCache {
    pub root: PathBuf,
}

impl K8sCache {
    /// `$XDG_CACHE_HOME/lbx/k8s/<version>`, else `~/.cache/lbx/k8s/<version>`.
    pub fn for_version(version: KubeVersion) -> Result<Self, K8sError> {
        let base = cmd::cache_base().ok_or(K8sError::NoCacheDir)?;
        Ok(Self {
            root: base.join("lbx").join("k8s").join(version.to_string()),
        })
    }

    pub fn src_dir(&self) -> PathBuf {
        self.root.join("src")
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.root.join("bin")
    }

    /// Path of one built command.
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir().join(name)
    }
}

/// Builds the three binaries for `version` unless a previous build already did; returns the
/// bin directory.
pub fn run(version: KubeVersion) -> Result<PathBuf, K8sError> {
    let cache = K8sCache::for_version(version)?;
    println!(
        "k8s-build: Kubernetes {version} into {}",
        cache.bin_dir().display()
    );
    if verify_binaries(&cache, version).is_ok() {
        println!("k8s-build: ok (cached)");
        return Ok(cache.bin_dir());
    }
    let go = find_go()?;
    for dir in [cache.src_dir(), cache.bin_dir()] {
        fs::create_dir_all(&dir).map_err(|source| K8sError::Io {
            action: "create directory",
            path: dir.clone(),
            source,
        })?;
    }

    println!(
        "k8s-build: fetching {KUBERNETES_MODULE}@{} go.mod from the Go module proxy",
        version.module_version()
    );
    let module = module_info(&go, &cache, version)?;
    let text = fs::read_to_string(&module.go_mod).map_err(|source| K8sError::Io {
        action: "read",
        path: module.go_mod.clone(),
        source,
    })?;
    let kubernetes = parse_kubernetes_go_mod(&text, &module.go_mod)?;
    let go_mod_path = cache.src_dir().join("go.mod");
    fs::write(&go_mod_path, render_go_mod(version, &kubernetes)).map_err(|source| {
        K8sError::Io {
            action: "write",
            path: go_mod_path.clone(),
            source,
        }
    })?;
    println!(
        "k8s-build: wrote {} ({} staging modules pinned to {})",
        go_mod_path.display(),
        kubernetes.staging_modules.len(),
        version.staging_version()
    );

    let started = Instant::now();
    println!(
        "k8s-build: go build {} (a cold build takes about 5 minutes on 2 cores)",
        BINARIES.join(" ")
    );
    go_build(&go, &cache, version, &module)?;
    println!(
        "k8s-build: go build finished in {}",
        format_duration(started.elapsed())
    );

    verify_binaries(&cache, version)?;
    for name in BINARIES {
        let path = cache.binary(name);
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or_default();
        println!(
            "k8s-build: {} ({:.1} MiB)",
            path.display(),
            size as f64 / (1024.0 * 1024.0)
        );
    }
    println!("k8s-build: ok");
    Ok(cache.bin_dir())
}

/// `go` from PATH, else the official tarball location.
fn find_go() -> Result<PathBuf, K8sError> {
    find_on_path("go")
        .or_else(|| Some(PathBuf::from(GO_FALLBACK)).filter(|p| p.is_file()))
        .ok_or(K8sError::NoGo)
}

/// A go command with the environment every step shares: module mode that may update go.mod
/// and go.sum, no workspace file from the caller, static binaries. GOPROXY is left alone.
fn go_command(go: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(go);
    cmd.current_dir(dir)
        .env("GOFLAGS", "-mod=mod")
        .env("GOWORK", "off")
        .env("CGO_ENABLED", "0");
    cmd
}

/// What the module proxy says about the k8s.io/kubernetes release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// The release's go.mod in the module cache.
    pub go_mod: PathBuf,
    /// Publication time, RFC 3339 UTC; used as buildDate.
    pub build_date: Option<String>,
    /// The tagged commit, when the proxy records the module's origin.
    pub commit: Option<String>,
}

/// Template for `go list -m -f`: go.mod path, time and commit, `|`-separated.
const MODULE_INFO_TEMPLATE: &str = r#"{{.GoMod}}|{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}|{{with .Origin}}{{.Hash}}{{end}}"#;

/// Parses the output of `go list -m -f MODULE_INFO_TEMPLATE`; None when go named no go.mod.
pub fn parse_module_info(line: &str) -> Option<ModuleInfo> {
    let mut fields = line.trim().split('|').map(str::trim);
    let go_mod = fields.next().filter(|p| !p.is_empty())?;
    let mut optional = || fields.next().filter(|f| !f.is_empty()).map(str::to_owned);
    Some(ModuleInfo {
        go_mod: PathBuf::from(go_mod),
        build_date: optional(),
        commit: optional(),
    })
}

/// Downloads the k8s.io/kubernetes release into the module cache (`go list -m` alone does
/// not fetch its go.mod) and returns where its go.mod is, plus its time and commit.
fn module_info(go: &Path, cache: &K8sCache, version: KubeVersion) -> Result<ModuleInfo, K8sError> {
    let module = format!("{KUBERNETES_MODULE}@{}", version.module_version());
    let hint = format!(
        "the Go module proxy (`go env GOPROXY`) must serve {module}; its version list can be \
         incomplete, so try `go mod download -json {module}` to see what it answers"
    );
    // Run in the version directory, which has no go.mod, so a half-written one in src/ cannot
    // get in the way.
    go_stdout(
        go_command(go, &cache.root).args(["mod", "download", &module]),
        &hint,
    )?;
    let stdout = go_stdout(
        go_command(go, &cache.root).args(["list", "-m", "-f", MODULE_INFO_TEMPLATE, &module]),
        &hint,
    )?;
    parse_module_info(&stdout).ok_or(K8sError::NoGoModPath {
        module,
        output: stdout,
    })
}

/// Runs a short go command, returning its stdout; a failure carries its stderr tail.
fn go_stdout(cmd: &mut Command, hint: &str) -> Result<String, K8sError> {
    let output = cmd::output(cmd)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(K8sError::Go {
            command: shell_line(cmd),
            status: output.status,
            hint: hint_for(&stderr, hint),
            stderr_tail: tail(stderr.lines(), STDERR_TAIL_LINES),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `go build -v`, printing a progress line now and then and keeping the stderr lines
/// that are not progress for the error message.
fn go_build(
    go: &Path,
    cache: &K8sCache,
    version: KubeVersion,
    module: &ModuleInfo,
) -> Result<(), K8sError> {
    // A trailing slash makes -o a directory for several packages.
    let mut out_dir = OsString::from(cache.bin_dir());
    out_dir.push("/");
    let mut cmd = go_command(go, &cache.src_dir());
    cmd.args(["build", "-v", "-trimpath", "-ldflags"])
        .arg(ldflags(
            version,
            module.build_date.as_deref(),
            module.commit.as_deref(),
        ))
        .arg("-o")
        .arg(out_dir)
        .args(
            BINARIES
                .iter()
                .map(|name| format!("{KUBERNETES_MODULE}/cmd/{name}")),
        )
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let command = shell_line(&cmd);
    println!("k8s-build: {command}");
    let mut child = cmd.spawn().map_err(|source| CmdError::Spawn {
        command: command.clone(),
        program: go.display().to_string(),
        source,
    })?;

    let started = Instant::now();
    let mut last_report = Instant::now();
    let (mut downloaded, mut compiled) = (0usize, 0usize);
    let mut kept: VecDeque<String> = VecDeque::with_capacity(STDERR_TAIL_LINES);
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("go: downloading ") {
                downloaded += 1;
            } else if !line.is_empty() && !line.contains(char::is_whitespace) {
                // -v names each package as it is built.
                compiled += 1;
            } else {
                if kept.len() == STDERR_TAIL_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                println!(
                    "k8s-build: {} elapsed, {downloaded} modules downloaded, {compiled} \
                     packages built",
                    format_duration(started.elapsed())
                );
            }
        }
    }
    let status = child.wait().map_err(|source| CmdError::Spawn {
        command: command.clone(),
        program: go.display().to_string(),
        source,
    })?;
    if status.success() {
        return Ok(());
    }
    let stderr_tail = tail(kept.iter().map(String::as_str), STDERR_TAIL_LINES);
    let hint = format!(
        "the Go module proxy must serve {KUBERNETES_MODULE} {} and every k8s.io staging \
         module at {}; if a package failed to compile, this Go ({}) may be too new or \
         too old for Kubernetes {version}",
        version.module_version(),
        version.staging_version(),
        go.display()
    );
    Err(K8sError::Go {
        command,
        status,
        hint: hint_for(&stderr_tail, &hint),
        stderr_tail,
    })
}

/// A specific hint when go refused a module because the checksum database (reached through
/// the proxy) has no entry for it: mirrors here hold only some releases' entries, and
/// turning verification off is not ours to decide.
fn hint_for(stderr: &str, general: &str) -> String {
    if stderr.contains("verifying")
        && (stderr.contains("/sumdb/") || stderr.contains("sum.golang.org"))
    {
        format!(
            "the proxy serves this release but not the checksum-database entries go needs to \
             verify it; build another release, e.g. `cargo xtask k8s-build --version \
             {DEFAULT_VERSION}`"
        )
    } else {
        general.to_owned()
    }
}

/// Checks that every binary exists and reports `version`; the first failure is the error.
fn verify_binaries(cache: &K8sCache, version: KubeVersion) -> Result<(), K8sError> {
    let expected = version.version_line();
    for name in BINARIES {
        let binary = cache.binary(name);
        if !binary.is_file() {
            return Err(K8sError::Io {
                action: "find",
                path: binary,
                source: io::ErrorKind::NotFound.into(),
            });
        }
        let output = cmd::output(Command::new(&binary).args(version_args(name)))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        // kubectl prints "Client Version: v1.34.10" and a Kustomize line.
        let got = stdout
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .trim_start_matches("Client Version: ")
            .to_owned();
        let want = expected.trim_start_matches("Kubernetes ");
        if !output.status.success() || (got != expected && got != want) {
            return Err(K8sError::WrongVersion {
                binary,
                expected,
                got,
            });
        }
    }
    Ok(())
}

/// The last `n` lines, joined, indented so they stand apart from our own message.
fn tail<'a>(lines: impl Iterator<Item = &'a str>, n: usize) -> String {
    let all: Vec<&str> = lines.collect();
    let start = all.len().saturating_sub(n);
    if all.len() == start {
        return "    (no output)".to_owned();
    }
    all[start..]
        .iter()
        .map(|line| format!("    {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The command as a shell line the reader can paste: arguments with spaces (the -ldflags
/// value) are single-quoted, unlike `cmd::describe`.
fn shell_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| {
            let arg = arg.to_string_lossy();
            if arg.contains(char::is_whitespace) {
                format!("'{}'", arg.replace('\'', r"'\''"))
            } else {
                arg.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    format!("{}m{:02}s", secs / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from k8s.io/kubernetes v1.34.4's go.mod.
    const KUBERNETES_GO_MOD: &str = "\
// This is a generated file. Do not edit directly.

module k8s.io/kubernetes

go 1.24.0

godebug default=go1.24

require (
\tgithub.com/blang/semver/v4 v4.0.0
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
)

require (
\tk8s.io/kms v0.0.0 // indirect
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go // the client
\tk8s.io/kms => ./staging/src/k8s.io/kms
)

replace github.com/example/fork => github.com/example/fork v1.2.3
";

    fn v(s: &str) -> KubeVersion {
        s.parse().unwrap()
    }

    #[test]
    fn version_parses_with_or_without_v() {
        assert_eq!(
            v("1.34.4"),
            KubeVersion {
                minor: 34,
                patch: 4
            }
        );
        assert_eq!(
            v("v1.35.12"),
            KubeVersion {
                minor: 35,
                patch: 12
            }
        );
        assert_eq!(v(DEFAULT_VERSION).to_string(), DEFAULT_VERSION);
    }

    #[test]
    fn version_rejects_non_releases() {
        for bad in [
            "",
            "1.34",
            "1.34.4.1",
            "2.0.0",
            "1.34.x",
            "1.34.4-rc.1",
            "1.-3.4",
            "1..4",
            "v",
        ] {
            assert!(
                matches!(bad.parse::<KubeVersion>(), Err(K8sError::BadVersion { .. })),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn staging_modules_use_v0_minor_patch() {
        let version = v("1.34.2");
        assert_eq!(version.module_version(), "v1.34.2");
        assert_eq!(version.staging_version(), "v0.34.2");
        assert_eq!(version.version_line(), "Kubernetes v1.34.2");
    }

    #[test]
    fn parses_staging_replace_block() {
        let parsed = parse_kubernetes_go_mod(KUBERNETES_GO_MOD, Path::new("go.mod")).unwrap();
        assert_eq!(
            parsed,
            KubernetesGoMod {
                go_version: "1.24.0".into(),
                godebug: vec!["default=go1.24".into()],
                staging_modules: vec![
                    "k8s.io/api".into(),
                    "k8s.io/client-go".into(),
                    "k8s.io/kms".into()
                ],
            }
        );
    }

    #[test]
    fn parses_single_line_and_block_godebug() {
        let text = "module m\ngo 1.25\ngodebug (\n\tdefault=go1.25\n\tx509sha1=1\n)\n\
                    replace k8s.io/api => ./staging/src/k8s.io/api\n";
        let parsed = parse_kubernetes_go_mod(text, Path::new("go.mod")).unwrap();
        assert_eq!(parsed.godebug, ["default=go1.25", "x509sha1=1"]);
        assert_eq!(parsed.staging_modules, ["k8s.io/api"]);
    }

    #[test]
    fn rejects_go_mod_without_staging_or_go_directive() {
        let no_staging = "module m\ngo 1.24\nreplace a => b v1.0.0\n";
        assert!(matches!(
            parse_kubernetes_go_mod(no_staging, Path::new("x")),
            Err(K8sError::UnexpectedGoMod { .. })
        ));
        let no_go = "module m\nreplace k8s.io/api => ./staging/src/k8s.io/api\n";
        assert!(matches!(
            parse_kubernetes_go_mod(no_go, Path::new("x")),
            Err(K8sError::UnexpectedGoMod { .. })
        ));
        let mismatched = "module m\ngo 1.24\nreplace k8s.io/api => ./staging/src/k8s.io/kms\n";
        assert!(matches!(
            parse_kubernetes_go_mod(mismatched, Path::new("x")),
            Err(K8sError::UnexpectedGoMod { .. })
        ));
    }

    #[test]
    fn replace_lines_pin_published_tags() {
        let modules = vec!["k8s.io/api".to_owned(), "k8s.io/kube-proxy".to_owned()];
        assert_eq!(
            replace_lines(&modules, v("1.34.2")),
            [
                "k8s.io/api => k8s.io/api v0.34.2",
                "k8s.io/kube-proxy => k8s.io/kube-proxy v0.34.2"
            ]
        );
    }

    #[test]
    fn renders_main_module() {
        let parsed = parse_kubernetes_go_mod(KUBERNETES_GO_MOD, Path::new("go.mod")).unwrap();
        let go_mod = render_go_mod(v("1.34.4"), &parsed);
        let expected = "\
// Generated by `cargo xtask k8s-build`; rewritten on every build.
module lbx.local/k8s-build

go 1.24.0

godebug default=go1.24

require k8s.io/kubernetes v1.34.4

replace (
\tk8s.io/api => k8s.io/api v0.34.4
\tk8s.io/client-go => k8s.io/client-go v0.34.4
\tk8s.io/kms => k8s.io/kms v0.34.4
)
";
        assert_eq!(go_mod, expected);
    }

    #[test]
    fn ldflags_set_version_in_both_packages() {
        let flags = ldflags(v("1.34.4"), Some("2026-02-10T12:53:36Z"), Some("26c8915"));
        assert!(flags.starts_with("-s -w "));
        for package in VERSION_PACKAGES {
            for var in [
                "gitVersion=v1.34.4",
                "gitMajor=1",
                "gitMinor=34",
                "gitTreeState=clean",
                "buildDate=2026-02-10T12:53:36Z",
                "gitCommit=26c8915",
            ] {
                assert!(flags.contains(&format!("-X {package}.{var}")), "{flags}");
            }
        }
        let bare = ldflags(v("1.34.4"), None, None);
        assert!(
            !bare.contains("buildDate") && !bare.contains("gitCommit"),
            "{bare}"
        );
    }

    #[test]
    fn shell_line_quotes_arguments_with_spaces() {
        let mut cmd = Command::new("go");
        cmd.args(["build", "-ldflags", "-s -w", "it's here"]);
        assert_eq!(
            shell_line(&cmd),
            r"go build -ldflags '-s -w' 'it'\''s here'"
        );
    }

    #[test]
    fn parses_module_info_line() {
        assert_eq!(
            parse_module_info(
                "/m/k8s.io/kubernetes/@v/v1.34.12.mod|2026-09-23T17:08:30Z|26c8915\n"
            ),
            Some(ModuleInfo {
                go_mod: "/m/k8s.io/kubernetes/@v/v1.34.12.mod".into(),
                build_date: Some("2026-09-23T17:08:30Z".into()),
                commit: Some("26c8915".into()),
            })
        );
        assert_eq!(
            parse_module_info("/m/v1.34.4.mod||\n"),
            Some(ModuleInfo {
                go_mod: "/m/v1.34.4.mod".into(),
                build_date: None,
                commit: None,
            })
        );
        // `go list -m` leaves GoMod empty when the go.mod was never downloaded.
        assert_eq!(parse_module_info("|2026-09-23T17:08:30Z|26c8915\n"), None);
    }

    #[test]
    fn sumdb_failures_get_their_own_hint() {
        let sumdb = "go: k8s.io/kubernetes@v1.34.12: verifying go.mod: k8s.io/kubernetes@v1.34.12/go.mod: \
                     reading https://proxy.golang.org/sumdb/sum.golang.org/lookup/k8s.io/kubernetes@v1.34.12: \
                     404 Not Found";
        assert!(hint_for(sumdb, "general").contains("checksum-database"));
        assert_eq!(hint_for("main.go:3: undefined: x", "general"), "general");
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail(["a", "b", "c"].into_iter(), 2), "    b\n    c");
        assert_eq!(tail(std::iter::empty(), 2), "    (no output)");
    }
}
