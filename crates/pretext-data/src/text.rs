//! Text corpora: fortune files, plain text, JSONL and Parquet.
//!
//! - **fortune**: entries separated by a line holding only `%`; the category is
//!   the file name; backspace overstrike (`_\bx`, `x\bx`) is stripped.
//! - **plain text**: one document per line, or per blank-line-separated paragraph.
//! - **JSONL**: one JSON object per line with a named text field (and optional label field).
//! - **Parquet**: a named text column (and optional label column), as Hugging Face datasets store them.
//!
//! Non-UTF-8 bytes are an error naming the file and the byte offset.

use crate::dataset::TextDataset;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let off = e.utf8_error().valid_up_to();
        Error::format_at(path, format!("byte {off}"), "not valid UTF-8 text")
    })
}

/// Removes backspace overstrike: each `\x08` deletes itself and the character before it.
pub fn strip_overstrike(s: &str) -> String {
    if !s.contains('\u{8}') {
        return s.to_string();
    }
    let mut out: Vec<char> = Vec::with_capacity(s.len());
    for c in s.chars() {
        if c == '\u{8}' {
            out.pop();
        } else {
            out.push(c);
        }
    }
    out.into_iter().collect()
}

/// Splits fortune-file text into entries (trimmed, overstrike removed, empty ones dropped).
pub fn parse_fortunes(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut flush = |cur: &mut String| {
        let e = strip_overstrike(cur.trim());
        if !e.trim().is_empty() {
            out.push(e.trim().to_string());
        }
        cur.clear();
    };
    for line in text.lines() {
        if line.trim_end() == "%" {
            flush(&mut cur);
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    flush(&mut cur);
    out
}

/// Whether a file in a fortune directory is a fortune file (not an index or licence).
fn is_fortune_file(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let skip_ext = [".dat", ".u8", ".md", ".txt", ".json", ".gz"];
    p.is_file()
        && !name.starts_with('.')
        && !skip_ext.iter().any(|e| name.ends_with(e))
        && !["LICENSE", "README", "COPYING"].contains(&name.as_str())
}

/// Reads fortune files: a single file, or every fortune file of a directory
/// (sorted by name). Each entry is labelled with its file's category.
/// `categories` keeps only those files (in the order given).
///
/// # Errors
/// [`Error::Io`]; [`Error::Format`] for non-UTF-8; [`Error::Invalid`] when no entry is found.
pub fn read_fortunes(path: &Path, categories: Option<&[String]>) -> Result<TextDataset> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_fortune_file(p))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let name_of = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    let files: Vec<PathBuf> = match categories {
        Some(cats) => {
            let mut sel = Vec::new();
            for c in cats {
                match files.iter().find(|f| name_of(f) == *c) {
                    Some(f) => sel.push(f.clone()),
                    None => {
                        return Err(Error::Invalid(format!(
                            "{}: no fortune file named {c:?}",
                            path.display()
                        )))
                    }
                }
            }
            sel
        }
        None => files,
    };
    let mut ds = TextDataset {
        docs: Vec::new(),
        labels: Some(Vec::new()),
        ..Default::default()
    };
    for f in &files {
        let entries = parse_fortunes(&read_utf8(f)?);
        let label = ds.classes.len() as u32;
        ds.classes.push(name_of(f));
        if let Some(l) = ds.labels.as_mut() {
            l.extend(std::iter::repeat_n(label, entries.len()));
        }
        ds.docs.extend(entries);
    }
    if ds.docs.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: empty corpus (no fortune entries found)",
            path.display()
        )));
    }
    Ok(ds)
}

/// How plain text is cut into documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainSplit {
    /// One document per non-empty line.
    Lines,
    /// One document per blank-line-separated paragraph.
    Paragraphs,
}

/// Reads a plain-text file as unlabelled documents.
///
/// # Errors
/// [`Error::Io`]; [`Error::Format`] for non-UTF-8; [`Error::Invalid`] when empty.
pub fn read_plain_text(path: &Path, split: PlainSplit) -> Result<TextDataset> {
    let text = read_utf8(path)?;
    let docs: Vec<String> = match split {
        PlainSplit::Lines => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        PlainSplit::Paragraphs => {
            let mut out = Vec::new();
            let mut cur: Vec<&str> = Vec::new();
            for line in text.lines() {
                if line.trim().is_empty() {
                    if !cur.is_empty() {
                        out.push(cur.join("\n"));
                        cur.clear();
                    }
                } else {
                    cur.push(line.trim_end());
                }
            }
            if !cur.is_empty() {
                out.push(cur.join("\n"));
            }
            out
        }
    };
    if docs.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: empty corpus (no non-blank text)",
            path.display()
        )));
    }
    Ok(TextDataset {
        docs,
        ..Default::default()
    })
}

/// Maps label values (strings or numbers, as text) to dense indices in sorted order.
fn index_labels(raw: Vec<String>) -> (Vec<u32>, Vec<String>) {
    let mut classes: Vec<String> = raw.clone();
    classes.sort_by(|a, b| match (a.parse::<i64>(), b.parse::<i64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    });
    classes.dedup();
    let idx: BTreeMap<&String, u32> = classes.iter().enumerate().map(|(i, c)| (c, i as u32)).collect();
    let labels = raw.iter().map(|r| idx[r]).collect();
    (labels, classes)
}

fn label_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The fields (JSONL) or columns (Parquet) a text table is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextFields<'a> {
    /// The text of each record (required).
    pub text: &'a str,
    /// Its label, where the records have one: a table without this field
    /// anywhere is unlabelled; one with it on some records only is an error.
    pub label: Option<&'a str>,
    /// Its split (`train`, `validation`, `test`), read the same way.
    pub split: Option<&'a str>,
}

impl<'a> TextFields<'a> {
    /// `text`, with the label in `label` (empty: none) and the split in `split`.
    pub fn new(text: &'a str, label: &'a str) -> Self {
        Self {
            text,
            label: (!label.is_empty()).then_some(label),
            split: Some("split"),
        }
    }
}

/// Values of an optional field or column, collected record by record: all
/// present, or all absent (then `None`).
struct Optional {
    name: String,
    values: Vec<Option<String>>,
}

impl Optional {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            values: Vec::new(),
        }
    }

    /// All values, or `None` where no record has one; an error naming the
    /// first record without a value when others have one.
    fn finish(self, path: &Path, what: &str, at: impl Fn(usize) -> String) -> Result<Option<Vec<String>>> {
        if self.values.iter().all(Option::is_none) {
            return Ok(None);
        }
        if let Some(i) = self.values.iter().position(Option::is_none) {
            let with = self.values.iter().filter(|v| v.is_some()).count();
            return Err(Error::format_at(
                path,
                at(i),
                format!(
                    "no {what} {:?}, which {with} other records have (give every record one, or none)",
                    self.name
                ),
            ));
        }
        Ok(Some(self.values.into_iter().flatten().collect()))
    }
}

/// Labels, class names and splits of a table's records.
type Annotations = (Option<Vec<u32>>, Vec<String>, Option<Vec<crate::dataset::Split>>);

/// Labels and splits from their raw values.
fn labels_and_splits(
    path: &Path,
    labels: Option<Vec<String>>,
    splits: Option<Vec<String>>,
    at: impl Fn(usize) -> String,
) -> Result<Annotations> {
    let (labels, classes) = match labels {
        Some(raw) => {
            let (l, c) = index_labels(raw);
            (Some(l), c)
        }
        None => (None, Vec::new()),
    };
    let splits = match splits {
        Some(raw) => Some(
            raw.iter()
                .enumerate()
                .map(|(i, v)| {
                    crate::dataset::Split::parse(v).ok_or_else(|| {
                        Error::format_at(
                            path,
                            at(i),
                            format!("split {v:?} is not one of train, validation (valid, val, dev), test"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };
    Ok((labels, classes, splits))
}

/// Reads JSONL: each non-blank line an object with string field
/// `fields.text`, and optionally `fields.label` (string or number) and
/// `fields.split`.
///
/// # Errors
/// [`Error::Format`] naming the file and line for non-JSON lines, missing or
/// non-string fields, a label or split on some lines only, an unknown split;
/// [`Error::Invalid`] when empty.
pub fn read_jsonl(path: &Path, fields: &TextFields<'_>) -> Result<TextDataset> {
    let text = read_utf8(path)?;
    let mut docs = Vec::new();
    let mut lines = Vec::new();
    let mut labels = Optional::new(fields.label.unwrap_or_default());
    let mut splits = Optional::new(fields.split.unwrap_or_default());
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("line {}", i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| Error::format_at(path, &at, format!("not JSON ({e})")))?;
        let t = v
            .get(fields.text)
            .ok_or_else(|| Error::format_at(path, &at, format!("no field {:?}", fields.text)))?
            .as_str()
            .ok_or_else(|| Error::format_at(path, &at, format!("field {:?} is not a string", fields.text)))?;
        docs.push(t.to_string());
        lines.push(i + 1);
        for (name, out) in [(fields.label, &mut labels), (fields.split, &mut splits)] {
            let Some(name) = name else { continue };
            let value =
                match v.get(name) {
                    None | Some(serde_json::Value::Null) => None,
                    Some(x) => Some(label_text(x).ok_or_else(|| {
                        Error::format_at(path, &at, format!("field {name:?} is not a string or number"))
                    })?),
                };
            out.values.push(value);
        }
    }
    if docs.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: empty corpus (no JSON lines)",
            path.display()
        )));
    }
    let at = |r: usize| format!("line {}", lines[r]);
    let labels = labels.finish(path, "field", at)?;
    let splits = splits.finish(path, "field", at)?;
    let (labels, classes, splits) = labels_and_splits(path, labels, splits, at)?;
    Ok(TextDataset {
        docs,
        labels,
        classes,
        splits,
    })
}

/// Reads a Parquet file's string column `fields.text`, and the string or
/// integer columns `fields.label` and `fields.split` where the file has them
/// (a file without the label column is unlabelled).
///
/// # Errors
/// [`Error::Format`] naming the file (and row) for unreadable files, a
/// missing text column, values of the wrong type, nulls; [`Error::Invalid`]
/// when empty.
#[cfg(feature = "text")]
pub fn read_parquet<'a>(path: &Path, fields: &TextFields<'a>) -> Result<TextDataset> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| Error::format(path, format!("not a readable Parquet file ({e})")))?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let names: Vec<String> = schema.columns().iter().map(|c| c.name().to_string()).collect();
    if !names.iter().any(|n| n == fields.text) {
        return Err(Error::format(
            path,
            format!("no column {:?} (columns: {names:?})", fields.text),
        ));
    }
    let present = |c: Option<&'a str>| c.filter(|c| names.iter().any(|n| n == c));
    let (label_column, split_column) = (present(fields.label), present(fields.split));
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| Error::format(path, format!("cannot read rows ({e})")))?;
    let value = |field: &Field, column: &str, at: &str| -> Result<Option<String>> {
        Ok(match field {
            Field::Str(s) => Some(s.clone()),
            Field::Int(i) => Some(i.to_string()),
            Field::Long(i) => Some(i.to_string()),
            Field::Short(i) => Some(i.to_string()),
            Field::Byte(i) => Some(i.to_string()),
            Field::UInt(i) => Some(i.to_string()),
            Field::ULong(i) => Some(i.to_string()),
            Field::Bool(b) => Some(b.to_string()),
            Field::Null => None,
            other => {
                return Err(Error::format_at(
                    path,
                    at,
                    format!("column {column:?} holds {other}, not a string or integer"),
                ))
            }
        })
    };
    let mut docs = Vec::new();
    let mut labels = Optional::new(label_column.unwrap_or_default());
    let mut splits = Optional::new(split_column.unwrap_or_default());
    for (r, row) in rows.enumerate() {
        let at = format!("row {r}");
        let row = row.map_err(|e| Error::format_at(path, &at, e.to_string()))?;
        let (mut text, mut label, mut split) = (None, None, None);
        for (name, field) in row.get_column_iter() {
            if name == fields.text {
                text = match field {
                    Field::Str(s) => Some(s.clone()),
                    Field::Null => None,
                    other => {
                        return Err(Error::format_at(
                            path,
                            &at,
                            format!("column {:?} holds {other}, not text", fields.text),
                        ))
                    }
                };
            } else if Some(name.as_str()) == label_column {
                label = value(field, name, &at)?;
            } else if Some(name.as_str()) == split_column {
                split = value(field, name, &at)?;
            }
        }
        let Some(t) = text else {
            return Err(Error::format_at(path, &at, format!("null in column {:?}", fields.text)));
        };
        docs.push(t);
        if label_column.is_some() {
            labels.values.push(label);
        }
        if split_column.is_some() {
            splits.values.push(split);
        }
    }
    if docs.is_empty() {
        return Err(Error::Invalid(format!("{}: empty corpus (no rows)", path.display())));
    }
    let at = |r: usize| format!("row {r}");
    let labels = labels.finish(path, "value in column", at)?;
    let splits = splits.finish(path, "value in column", at)?;
    let (labels, classes, splits) = labels_and_splits(path, labels, splits, at)?;
    Ok(TextDataset {
        docs,
        labels,
        classes,
        splits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> Result<tempfile::TempDir> {
        tempfile::tempdir().map_err(|e| Error::io("tmp", e))
    }

    fn write(p: &Path, b: impl AsRef<[u8]>) -> Result<()> {
        std::fs::write(p, b).map_err(|e| Error::io(p, e))
    }

    #[test]
    fn fortunes_split_and_strip_overstrike() -> Result<()> {
        let d = tmp()?;
        write(
            &d.path().join("science"),
            "E = mc^2\n%\nThe _\u{8}f_\u{8}a_\u{8}s_\u{8}t one.\n  -- B\u{8}Bo\u{8}ob\n%\n%\n",
        )?;
        write(&d.path().join("love"), "All you need.\n")?;
        write(&d.path().join("love.dat"), [0u8, 1, 2])?;
        let ds = read_fortunes(d.path(), None)?;
        assert_eq!(ds.classes, vec!["love", "science"]);
        assert_eq!(ds.docs, vec!["All you need.", "E = mc^2", "The fast one.\n  -- Bob"]);
        assert_eq!(ds.labels, Some(vec![0, 1, 1]));
        let only = read_fortunes(d.path(), Some(&["science".to_string()]))?;
        assert_eq!(only.docs.len(), 2);
        assert!(read_fortunes(d.path(), Some(&["sports".to_string()])).is_err());
        Ok(())
    }

    #[test]
    fn empty_and_non_utf8_are_errors() -> Result<()> {
        let d = tmp()?;
        let e = d.path().join("empty");
        write(&e, "%\n%\n")?;
        assert!(read_fortunes(&e, None)
            .expect_err("empty")
            .to_string()
            .contains("empty corpus"));
        let b = d.path().join("latin1.txt");
        write(&b, b"caf\xe9\n")?;
        let err = read_plain_text(&b, PlainSplit::Lines).expect_err("utf8");
        assert!(
            err.to_string().contains("latin1.txt") && err.to_string().contains("byte 3"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn plain_text_lines_and_paragraphs() -> Result<()> {
        let d = tmp()?;
        let p = d.path().join("c.txt");
        write(&p, "a b\nc\n\n\nd e\n")?;
        assert_eq!(read_plain_text(&p, PlainSplit::Lines)?.docs, vec!["a b", "c", "d e"]);
        assert_eq!(read_plain_text(&p, PlainSplit::Paragraphs)?.docs, vec!["a b\nc", "d e"]);
        Ok(())
    }

    #[test]
    fn jsonl_fields_labels_and_errors() -> Result<()> {
        let d = tmp()?;
        let p = d.path().join("c.jsonl");
        write(
            &p,
            "{\"text\": \"hi\", \"label\": \"pos\"}\n\n{\"text\": \"bye\", \"label\": \"neg\"}\n",
        )?;
        let ds = read_jsonl(&p, &TextFields::new("text", "label"))?;
        assert_eq!(ds.docs, vec!["hi", "bye"]);
        assert_eq!(ds.classes, vec!["neg", "pos"]);
        assert_eq!(ds.labels, Some(vec![1, 0]));
        write(&p, "{\"text\": \"hi\"}\n{\"txt\": \"x\"}\n")?;
        let err = read_jsonl(&p, &TextFields::new("text", "")).expect_err("field");
        assert!(
            err.to_string().contains("line 2") && err.to_string().contains("\"text\""),
            "{err}"
        );
        write(&p, "{\"text\": \"hi\"}\nnot json\n")?;
        let err = read_jsonl(&p, &TextFields::new("text", "")).expect_err("json");
        assert!(err.to_string().contains("c.jsonl (line 2)"), "{err}");
        Ok(())
    }

    #[test]
    fn jsonl_labels_and_splits_are_optional_but_all_or_none() -> Result<()> {
        let d = tmp()?;
        let p = d.path().join("c.jsonl");
        let fields = TextFields::new("text", "label");
        write(&p, "{\"text\": \"hi\"}\n{\"text\": \"bye\", \"id\": 7}\n")?;
        let ds = read_jsonl(&p, &fields)?;
        assert_eq!((ds.len(), ds.labels, ds.splits), (2, None, None));
        write(
            &p,
            "{\"text\": \"a\", \"label\": 1, \"split\": \"train\"}\n{\"text\": \"b\", \"label\": 0, \"split\": \"TEST\"}\n{\"text\": \"c\", \"label\": 1, \"split\": \"dev\"}\n",
        )?;
        let ds = read_jsonl(&p, &fields)?;
        assert_eq!(ds.labels, Some(vec![1, 0, 1]));
        assert_eq!(
            ds.splits,
            Some(vec![
                crate::dataset::Split::Train,
                crate::dataset::Split::Test,
                crate::dataset::Split::Validation
            ])
        );
        write(
            &p,
            "{\"text\": \"a\", \"label\": \"x\"}\n\n{\"text\": \"b\", \"label\": null}\n",
        )?;
        let err = read_jsonl(&p, &fields).expect_err("partial labels");
        assert!(
            err.to_string().contains("c.jsonl (line 3)") && err.to_string().contains("1 other records"),
            "{err}"
        );
        write(&p, "{\"text\": \"a\", \"split\": \"holdout\"}\n")?;
        let err = read_jsonl(&p, &fields).expect_err("split");
        assert!(err.to_string().contains("\"holdout\""), "{err}");
        Ok(())
    }

    #[cfg(feature = "text")]
    #[test]
    fn parquet_round_trip() -> Result<()> {
        use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;
        let d = tmp()?;
        let p = d.path().join("train.parquet");
        let perr = |e: parquet::errors::ParquetError| Error::format("write", e.to_string());
        let schema = Arc::new(
            parse_message_type("message s { REQUIRED BYTE_ARRAY text (UTF8); REQUIRED INT64 label; }").map_err(perr)?,
        );
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(parquet::basic::Compression::SNAPPY)
                .build(),
        );
        let file = std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
        let mut w = SerializedFileWriter::new(file, schema, props).map_err(perr)?;
        let mut rg = w.next_row_group().map_err(perr)?;
        if let Some(mut c) = rg.next_column().map_err(perr)? {
            let vals: Vec<ByteArray> = ["one", "two", "three"].iter().map(|s| ByteArray::from(*s)).collect();
            c.typed::<ByteArrayType>()
                .write_batch(&vals, None, None)
                .map_err(perr)?;
            c.close().map_err(perr)?;
        }
        if let Some(mut c) = rg.next_column().map_err(perr)? {
            c.typed::<Int64Type>()
                .write_batch(&[5, 1, 5], None, None)
                .map_err(perr)?;
            c.close().map_err(perr)?;
        }
        rg.close().map_err(perr)?;
        w.close().map_err(perr)?;
        let ds = read_parquet(&p, &TextFields::new("text", "label"))?;
        assert_eq!(ds.docs, vec!["one", "two", "three"]);
        assert_eq!(ds.classes, vec!["1", "5"]);
        assert_eq!(ds.labels, Some(vec![1, 0, 1]));
        let unlabelled = read_parquet(&p, &TextFields::new("text", "category"))?;
        assert_eq!((unlabelled.len(), unlabelled.labels), (3, None));
        let err = read_parquet(&p, &TextFields::new("content", "")).expect_err("column");
        assert!(err.to_string().contains("\"content\""), "{err}");
        let bad = d.path().join("bad.parquet");
        write(&bad, b"PAR1 garbage")?;
        assert!(read_parquet(&bad, &TextFields::new("text", ""))
            .expect_err("bad")
            .to_string()
            .contains("bad.parquet"));
        Ok(())
    }
}
