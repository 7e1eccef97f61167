//! Config files: defaults, then `--config FILE.toml`, then `--set key=value`.
//!
//! Overrides edit the parsed TOML before it is deserialised, so every key of
//! every section can be set from the command line and an unknown key is an
//! error that names it.

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;
use toml::{Table, Value};

/// Deep-merges `over` into `base`: tables merge key by key, other values replace.
pub fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Parses the value side of `--set key=value`: a TOML literal (`0.3`,
/// `true`, `[1, 2]`, `"text"`), or else the raw text as a string.
pub fn parse_value(text: &str) -> Value {
    let doc = format!("v = {text}");
    match doc.parse::<Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| Value::String(text.to_string())),
        Err(_) => Value::String(text.to_string()),
    }
}

/// Applies one `section.key=value` override to `table`.
///
/// # Errors
/// The override has no `=`, an empty key, or walks into a non-table value.
pub fn apply_override(table: &mut Table, spec: &str) -> Result<()> {
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {spec:?}: expected key=value, e.g. --set optim.lr=0.3"))?;
    let key = key.trim();
    let path: Vec<&str> = key.split('.').collect();
    if key.is_empty() || path.iter().any(|p| p.is_empty()) {
        bail!("--set {spec:?}: empty key");
    }
    let mut cur = table;
    for (i, part) in path.iter().enumerate() {
        if i + 1 == path.len() {
            cur.insert((*part).to_string(), parse_value(value.trim()));
            return Ok(());
        }
        let entry = cur
            .entry((*part).to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        cur = match entry {
            Value::Table(t) => t,
            other => bail!(
                "--set {spec:?}: {} is a {}, not a section",
                path[..=i].join("."),
                other.type_str()
            ),
        };
    }
    Ok(())
}

/// The resolved config: the typed value and its TOML text with every default written out.
#[derive(Debug, Clone)]
pub struct Resolved<T> {
    /// The config.
    pub config: T,
    /// `config.toml` as written into the run folder.
    pub toml: String,
}

/// Builds a config of type `T`: `defaults` (TOML text), then `file` merged
/// over it, then each `--set` override in order.
///
/// # Errors
/// Unreadable or invalid file (named), bad override, unknown key or wrong type.
pub fn resolve<T: DeserializeOwned + Serialize>(
    defaults: &str,
    file: Option<&Path>,
    overrides: &[String],
) -> Result<Resolved<T>> {
    let mut table: Table = defaults.parse().context("built-in default config")?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let over: Table = text
            .parse()
            .with_context(|| format!("parsing config {}", path.display()))?;
        merge(&mut table, over);
    }
    for spec in overrides {
        apply_override(&mut table, spec)?;
    }
    let config: T = Value::Table(table).try_into().map_err(|e: toml::de::Error| {
        let from = if overrides.is_empty() {
            String::new()
        } else {
            format!(" (after --set {})", overrides.join(" --set "))
        };
        anyhow!("invalid config{from}: {}", e.message())
    })?;
    let toml = toml::to_string_pretty(&config).context("serialising the resolved config")?;
    Ok(Resolved { config, toml })
}

/// `over` (TOML) merged over `base` (TOML), as TOML: a method's preset
/// over the built-in default, before `--config` and `--set` apply.
///
/// # Errors
/// Either text does not parse.
pub fn layered(base: &str, over: &str) -> Result<String> {
    let mut table: Table = base.parse().context("built-in default config")?;
    merge(&mut table, over.parse().context("built-in method preset")?);
    toml::to_string(&table).context("serialising the preset")
}

/// Every leaf of `table` as a `--set` override under `prefix`
/// (`model.encoder.widths=[32, 64]`).
pub fn flatten(prefix: &str, table: &Table, out: &mut Vec<String>) {
    for (k, v) in table {
        let key = format!("{prefix}.{k}");
        match v {
            Value::Table(t) => flatten(&key, t, out),
            other => out.push(format!("{key}={other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        optim: Optim,
        train: Train,
    }
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Optim {
        name: String,
        lr: f64,
    }
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Train {
        seed: u64,
        fracs: Vec<f64>,
    }

    const DEFAULTS: &str = "[optim]\nname = \"adamw\"\nlr = 0.001\n[train]\nseed = 0\nfracs = [0.01]\n";

    #[test]
    fn defaults_file_and_overrides_layer_in_order() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[optim]\nlr = 0.5\n")?;
        let r: Resolved<Cfg> = resolve(
            DEFAULTS,
            Some(&f),
            &[
                "train.seed=3".into(),
                "optim.name=lars".into(),
                "train.fracs=[0.1, 1.0]".into(),
            ],
        )?;
        assert_eq!(
            r.config.optim,
            Optim {
                name: "lars".into(),
                lr: 0.5
            }
        );
        assert_eq!(
            r.config.train,
            Train {
                seed: 3,
                fracs: vec![0.1, 1.0]
            }
        );
        // the resolved text parses back to the same config
        let back: Cfg = toml::from_str(&r.toml)?;
        assert_eq!(back, r.config);
        Ok(())
    }

    #[test]
    fn unknown_keys_and_bad_types_are_named() {
        let err = resolve::<Cfg>(DEFAULTS, None, &["optim.lrr=1".into()]).expect_err("unknown");
        assert!(format!("{err:#}").contains("lrr"), "{err:#}");
        let err = resolve::<Cfg>(DEFAULTS, None, &["train.seed=abc".into()]).expect_err("type");
        assert!(
            format!("{err:#}").contains("seed") || format!("{err:#}").contains("integer"),
            "{err:#}"
        );
        let err = resolve::<Cfg>(DEFAULTS, None, &["optim".into()]).expect_err("no =");
        assert!(format!("{err:#}").contains("key=value"), "{err:#}");
        let err = resolve::<Cfg>(DEFAULTS, None, &["optim.lr.x=1".into()]).expect_err("not a table");
        assert!(format!("{err:#}").contains("optim.lr"), "{err:#}");
    }

    #[test]
    fn missing_or_bad_file_is_named() -> Result<()> {
        let err = resolve::<Cfg>(DEFAULTS, Some(Path::new("/nonexistent/c.toml")), &[]).expect_err("missing");
        assert!(format!("{err:#}").contains("/nonexistent/c.toml"));
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, "[optim\n")?;
        let err = resolve::<Cfg>(DEFAULTS, Some(&f), &[]).expect_err("bad");
        assert!(format!("{err:#}").contains("bad.toml"));
        Ok(())
    }

    #[test]
    fn values_parse_as_toml_or_string() {
        assert_eq!(parse_value("0.3"), Value::Float(0.3));
        assert_eq!(parse_value("true"), Value::Boolean(true));
        assert_eq!(parse_value("simclr"), Value::String("simclr".into()));
        assert_eq!(parse_value("\"a b\""), Value::String("a b".into()));
    }
}
