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
    for shared in ["pretext-data", "pretext-eval"] {
        let deps = deps_of(shared);
        for p in PARADIGMS {
            assert!(!deps.iter().any(|d| d == p), "{shared} depends on paradigm crate {p}");
        }
    }
    assert!(
        !deps_of("pretext-data").iter().any(|d| d == "pretext-eval"),
        "pretext-data must not depend on pretext-eval"
    );
}

#[test]
fn only_binaries_use_cli_crates() {
    let cli_only = ["clap", "anyhow", "indicatif", "tracing-subscriber", "toml", "hf-hub"];
    for lib in [
        "pretext-core",
        "pretext-data",
        "pretext-eval",
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
