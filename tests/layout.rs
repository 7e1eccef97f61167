//! Invariants of the workspace layout (DESIGN.md): dependencies point one way.

use std::path::Path;

fn deps_of(krate: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("crates").join(krate).join("Cargo.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    for section in ["dependencies", "dev-dependencies"] {
        if let Some(toml::Value::Table(t)) = table.get(section) {
            out.extend(t.keys().cloned());
        }
    }
    out
}

const PARADIGMS: [&str; 3] = ["pretext-contrastive", "pretext-generative", "pretext-mlm"];

#[test]
fn paradigm_crates_never_depend_on_each_other() {
    for p in PARADIGMS {
        let deps = deps_of(p);
        for other in PARADIGMS.iter().filter(|o| **o != p) {
            assert!(!deps.iter().any(|d| d == other), "{p} depends on {other}");
        }
    }
}

#[test]
fn shared_crates_depend_only_downwards() {
    let core = deps_of("pretext-core");
    assert!(
        !core.iter().any(|d| d.starts_with("pretext-")),
        "pretext-core must be the leaf: {core:?}"
    );
    for shared in ["pretext-data", "pretext-eval", "pretext-vit"] {
        let deps = deps_of(shared);
        for p in PARADIGMS {
            assert!(!deps.iter().any(|d| d == p), "{shared} depends on paradigm crate {p}");
        }
    }
    assert!(
        !deps_of("pretext-data").iter().any(|d| d == "pretext-eval"),
        "pretext-data must not depend on pretext-eval"
    );
    let vit = deps_of("pretext-vit");
    assert!(
        vit.iter()
            .filter(|d| d.starts_with("pretext-"))
            .all(|d| d == "pretext-core"),
        "pretext-vit is a model on the core ops alone: {vit:?}"
    );
}

#[test]
fn only_binaries_use_cli_crates() {
    let cli_only = ["clap", "anyhow", "indicatif", "tracing-subscriber", "toml", "hf-hub"];
    for lib in [
        "pretext-core",
        "pretext-data",
        "pretext-eval",
        "pretext-vit",
        "pretext-contrastive",
        "pretext-generative",
        "pretext-mlm",
    ] {
        let deps = deps_of(lib);
        for c in cli_only {
            assert!(
                !deps.iter().any(|d| d == c),
                "{lib} uses {c}, which belongs to the binaries"
            );
        }
    }
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn custom_ops_are_written_once_against_the_fused_op_adapter() {
    // One home for ops: kernels implement `ops::fused::FusedOp`; only the
    // adapter implements candle's `CustomOp1/2/3`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    let adapter = root.join("crates/pretext-core/src/ops/fused.rs");
    assert!(files.contains(&adapter), "the adapter is at {}", adapter.display());
    let mut offenders = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let implements = ["CustomOp1 for", "CustomOp2 for", "CustomOp3 for"]
            .iter()
            .any(|p| text.contains(&format!("impl {p}")) || text.contains(&format!("impl<T: FusedOp> {p}")));
        if implements && *f != adapter {
            offenders.push(f.display().to_string());
        }
    }
    assert!(
        offenders.is_empty(),
        "candle custom ops outside ops::fused: {offenders:?}"
    );
    assert!(
        !root.join("crates/pretext-core/src/ops/resnet.rs").exists(),
        "pretext-core knows no models: the ResNet trunk belongs to pretext-contrastive"
    );
}
