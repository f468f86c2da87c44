//! lb-user: loads the data plane, keeps its maps in step with Kubernetes, and answers
//! operator questions about it.
//!
//! Layers, top to bottom; a module imports only from layers below it:
//!
//! ```text
//!   k8s      Kubernetes objects (API server or manifest file) -> desired state
//!    |
//!   node     this node's running data plane: start-up, applies, pins, routes, signals
//!    |
//!   control  desired state -> map writes: model, Maglev, reconcile (make-before-break)
//!    |
//!   bpf      the embedded object, the map catalogue's handles, the data plane, pins,
//!    |       the explain sandbox
//!   lb-common (map catalogue, map types, reasons, hashes, checksums)
//!
//!   inspect  the operator view (counters, conntrack, targets, explain): beside the write
//!            path, it imports only bpf; nothing imports it
//! ```
//!
//! The binary (`main.rs`) wires the command line to `k8s` (agent, standalone) and
//! `inspect` (the operator CLI).

pub mod bpf;
pub mod control;
pub mod inspect;
pub mod k8s;
pub mod node;

/// The layering above, checked on the sources: a module names only modules of its own
/// layer or of the layers below it (doc comments aside).
#[cfg(test)]
mod layers {
    use std::path::Path;

    /// Each layer and the layers it may import.
    const ALLOWED: &[(&str, &[&str])] = &[
        ("k8s", &["k8s", "node", "control", "bpf"]),
        ("node", &["node", "control", "bpf"]),
        ("control", &["control", "bpf"]),
        ("bpf", &["bpf"]),
        ("inspect", &["inspect", "bpf"]),
    ];

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn layers_import_only_downwards() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let layers: Vec<&str> = ALLOWED.iter().map(|(l, _)| *l).collect();
        let mut violations = Vec::new();
        for (layer, allowed) in ALLOWED {
            let mut files = Vec::new();
            sources(&src.join(layer), &mut files);
            assert!(!files.is_empty(), "no sources in src/{layer}");
            for file in files {
                let text = std::fs::read_to_string(&file).unwrap();
                for (n, line) in text.lines().enumerate() {
                    let code = line.trim_start();
                    if code.starts_with("//") {
                        continue;
                    }
                    for other in &layers {
                        let named = code.contains(&format!("crate::{other}"))
                            || code.contains(&format!("lb_user::{other}"));
                        if named && !allowed.contains(other) {
                            violations.push(format!(
                                "{}:{}: {layer} imports {other}",
                                file.display(),
                                n + 1
                            ));
                        }
                    }
                }
            }
        }
        assert!(
            violations.is_empty(),
            "imports against the layering:\n{}",
            violations.join("\n")
        );
    }
}
