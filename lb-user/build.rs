//! Builds the data plane's BPF object (lb-ebpf) and copies it into OUT_DIR, where
//! src/object.rs embeds it: an lb-user binary always carries the object it was compiled with.
//! The build itself lives in xtask/ebpf-build, shared with `cargo xtask build-ebpf`.

use std::{
    env,
    error::Error,
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use lb_ebpf_build::{Diagnostics, EbpfBuild};

/// File name src/object.rs includes from OUT_DIR.
const EMBEDDED_NAME: &str = "lb-ebpf.o";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            let mut cause = err.source();
            while let Some(inner) = cause {
                eprintln!("  caused by: {inner}");
                cause = inner.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let manifest_dir = env_path("CARGO_MANIFEST_DIR")?;
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", manifest_dir.display()))?;
    let build = EbpfBuild::new(workspace).diagnostics(Diagnostics::Capture);
    // Watching these (and nothing else) keeps the embedded object fresh without rebuilding
    // it when only lb-user's own sources change.
    for input in build.inputs() {
        println!("cargo::rerun-if-changed={}", input.display());
    }
    let object = build.run()?;
    let embedded = env_path("OUT_DIR")?.join(EMBEDDED_NAME);
    fs::copy(&object, &embedded).map_err(|err| {
        format!(
            "copying {} to {}: {err}",
            object.display(),
            embedded.display()
        )
    })?;
    Ok(())
}

fn env_path(name: &str) -> Result<PathBuf, String> {
    env::var_os(name)
        .map(PathBuf::from)
        .filter(|p| p != Path::new(""))
        .ok_or_else(|| format!("{name} is not set: build lb-user through cargo"))
}
