//! Writing features out: one row per input with its row number, its name
//! (path or row) and its label where it has one, in Parquet (a
//! `list<float>` column, as Hugging Face datasets and vector stores take
//! it), NumPy `.npy` (the `n × d` matrix, with the rows beside it in
//! `<name>.rows.jsonl`) or JSON lines.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file formats of `embed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingFormat {
    /// Apache Parquet: columns `row` (int64), `id` (string), `label` (string,
    /// null where unlabelled), `embedding` (list of float32).
    Parquet,
    /// NumPy: a little-endian float32 `(n, d)` array; rows in `<stem>.rows.jsonl`.
    Npy,
    /// JSON lines: `{"row", "id", "label", "embedding"}` per input.
    Jsonl,
}

impl EmbeddingFormat {
    /// The file extension.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Parquet => "parquet",
            Self::Npy => "npy",
            Self::Jsonl => "jsonl",
        }
    }

    /// The format a file name asks for by its extension.
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "parquet" => Some(Self::Parquet),
            "npy" => Some(Self::Npy),
            "jsonl" | "ndjson" => Some(Self::Jsonl),
            _ => None,
        }
    }
}

/// Features of `n` inputs, `dim` each, with the inputs' names and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingRows {
    /// `n × dim` features, row-major.
    pub features: Vec<f32>,
    /// Size of one feature vector.
    pub dim: usize,
    /// The name of each input (path inside its folder, or row number).
    pub ids: Vec<String>,
    /// The class name of each input, where the data is labelled.
    pub labels: Option<Vec<String>>,
}

impl EmbeddingRows {
    /// Rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn check(&self) -> Result<()> {
        if self.dim == 0 || self.features.len() != self.ids.len() * self.dim {
            return Err(Error::Invalid(format!(
                "{} features do not make {} rows of {}",
                self.features.len(),
                self.ids.len(),
                self.dim
            )));
        }
        if self.labels.as_ref().is_some_and(|l| l.len() != self.ids.len()) {
            return Err(Error::Invalid("one label per row is needed".into()));
        }
        Ok(())
    }

    fn row_json(&self, i: usize) -> serde_json::Value {
        serde_json::json!({
            "row": i,
            "id": self.ids[i],
            "label": self.labels.as_ref().map(|l| l[i].clone()),
        })
    }
}

/// The files `write_embeddings` writes for `path` in `format`.
pub fn embedding_files(path: &Path, format: EmbeddingFormat) -> Vec<PathBuf> {
    match format {
        EmbeddingFormat::Npy => vec![path.to_path_buf(), rows_path(path)],
        _ => vec![path.to_path_buf()],
    }
}

fn rows_path(npy: &Path) -> PathBuf {
    npy.with_extension("rows.jsonl")
}

/// Writes `rows` to `path` in `format`; every file is written to a
/// temporary name and renamed, so none is ever half-written.
///
/// # Errors
/// Rows that do not fit together; I/O errors naming the file.
pub fn write_embeddings(path: &Path, format: EmbeddingFormat, rows: &EmbeddingRows) -> Result<()> {
    rows.check()?;
    match format {
        EmbeddingFormat::Jsonl => {
            let mut out = Vec::with_capacity(rows.features.len() * 12);
            #[derive(Serialize)]
            struct Line<'a> {
                row: usize,
                id: &'a str,
                label: Option<&'a str>,
                embedding: &'a [f32],
            }
            for i in 0..rows.len() {
                let line = Line {
                    row: i,
                    id: &rows.ids[i],
                    label: rows.labels.as_ref().map(|l| l[i].as_str()),
                    embedding: &rows.features[i * rows.dim..(i + 1) * rows.dim],
                };
                serde_json::to_writer(&mut out, &line)
                    .map_err(|e| Error::format(path, format!("writing JSON: {e}")))?;
                out.push(b'\n');
            }
            write(path, &out)
        }
        EmbeddingFormat::Npy => {
            let index: String = (0..rows.len()).map(|i| rows.row_json(i).to_string() + "\n").collect();
            write(&rows_path(path), index.as_bytes())?;
            write(path, &npy_bytes(&rows.features, rows.len(), rows.dim))
        }
        EmbeddingFormat::Parquet => write(path, &parquet_bytes(path, rows)?),
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    pretext_core::run::write_atomic(path, bytes).map_err(Error::Core)
}

/// A NumPy v1.0 `.npy` file of a little-endian float32 `(n, d)` array.
pub fn npy_bytes(values: &[f32], n: usize, d: usize) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {d}), }}");
    // magic (6) + version (2) + header length (2) + header, padded with
    // spaces to a multiple of 64 and ended by a newline
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + values.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(feature = "text")]
fn parquet_bytes(path: &Path, rows: &EmbeddingRows) -> Result<Vec<u8>> {
    use parquet::data_type::{ByteArray, ByteArrayType, FloatType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;
    let perr = |e: parquet::errors::ParquetError| Error::format(path, format!("writing Parquet: {e}"));
    let schema = Arc::new(
        parse_message_type(
            "message embeddings {
                REQUIRED INT64 row;
                REQUIRED BYTE_ARRAY id (UTF8);
                OPTIONAL BYTE_ARRAY label (UTF8);
                REQUIRED group embedding (LIST) {
                    REPEATED group list {
                        REQUIRED FLOAT element;
                    }
                }
            }",
        )
        .map_err(perr)?,
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .set_created_by(format!("pretext {}", env!("CARGO_PKG_VERSION")))
            .build(),
    );
    let mut buf = Vec::new();
    let mut w = SerializedFileWriter::new(&mut buf, schema, props).map_err(perr)?;
    let n = rows.len();
    // one row group per 65,536 rows keeps memory bounded for readers
    for start in (0..n).step_by(65_536) {
        let end = (start + 65_536).min(n);
        let mut rg = w.next_row_group().map_err(perr)?;
        let mut col = 0;
        while let Some(mut c) = rg.next_column().map_err(perr)? {
            match col {
                0 => {
                    let v: Vec<i64> = (start..end).map(|i| i as i64).collect();
                    c.typed::<Int64Type>().write_batch(&v, None, None).map_err(perr)?;
                }
                1 => {
                    let v: Vec<ByteArray> = rows.ids[start..end]
                        .iter()
                        .map(|s| ByteArray::from(s.as_str()))
                        .collect();
                    c.typed::<ByteArrayType>().write_batch(&v, None, None).map_err(perr)?;
                }
                2 => {
                    let (v, def): (Vec<ByteArray>, Vec<i16>) = match &rows.labels {
                        Some(l) => (
                            l[start..end].iter().map(|s| ByteArray::from(s.as_str())).collect(),
                            vec![1; end - start],
                        ),
                        None => (Vec::new(), vec![0; end - start]),
                    };
                    c.typed::<ByteArrayType>()
                        .write_batch(&v, Some(&def), None)
                        .map_err(perr)?;
                }
                _ => {
                    let d = rows.dim;
                    let values = &rows.features[start * d..end * d];
                    let def = vec![1i16; values.len()];
                    let rep: Vec<i16> = (0..values.len()).map(|k| i16::from(k % d != 0)).collect();
                    c.typed::<FloatType>()
                        .write_batch(values, Some(&def), Some(&rep))
                        .map_err(perr)?;
                }
            }
            c.close().map_err(perr)?;
            col += 1;
        }
        rg.close().map_err(perr)?;
    }
    w.close().map_err(perr)?;
    Ok(buf)
}

#[cfg(not(feature = "text"))]
fn parquet_bytes(path: &Path, _rows: &EmbeddingRows) -> Result<Vec<u8>> {
    Err(Error::Invalid(format!(
        "{}: Parquet needs pretext-data's `text` feature",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(labelled: bool) -> EmbeddingRows {
        EmbeddingRows {
            features: vec![0.5, -1.0, 2.25, 1e-8, 3.0, 4.0],
            dim: 2,
            ids: vec!["a/1.png".into(), "b/2.png".into(), "7".into()],
            labels: labelled.then(|| vec!["a".into(), "b".into(), "a".into()]),
        }
    }

    #[test]
    fn npy_header_is_aligned_and_the_data_little_endian() {
        let b = npy_bytes(&[1.0, -2.5, 3.0, 0.0, 0.0, 7.0], 2, 3);
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).expect("ascii");
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert!(header.ends_with('\n'));
        assert_eq!(&b[10 + hlen..10 + hlen + 8], &[0, 0, 128, 63, 0, 0, 32, 192]);
        assert_eq!(b.len(), 10 + hlen + 24);
    }

    #[test]
    fn jsonl_and_npy_rows_round_trip() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = d.path().join("e.jsonl");
        write_embeddings(&p, EmbeddingFormat::Jsonl, &rows(true))?;
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["id"], "b/2.png");
        assert_eq!(lines[1]["label"], "b");
        assert_eq!(
            lines[1]["embedding"][1].as_f64(),
            Some(1e-8),
            "written as the f32's shortest form"
        );
        let n = d.path().join("e.npy");
        write_embeddings(&n, EmbeddingFormat::Npy, &rows(false))?;
        let index = std::fs::read_to_string(d.path().join("e.rows.jsonl")).map_err(|e| Error::io("rows", e))?;
        assert_eq!(index.lines().nth(2), Some("{\"id\":\"7\",\"label\":null,\"row\":2}"));
        assert_eq!(
            embedding_files(&n, EmbeddingFormat::Npy)[1],
            d.path().join("e.rows.jsonl")
        );
        Ok(())
    }

    #[cfg(feature = "text")]
    #[test]
    fn parquet_has_the_rows_ids_labels_and_embedding_lists() -> Result<()> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        use parquet::record::{Field, ListAccessor};
        let d = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        for labelled in [true, false] {
            let p = d.path().join("e.parquet");
            write_embeddings(&p, EmbeddingFormat::Parquet, &rows(labelled))?;
            let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
            let r = SerializedFileReader::new(f).map_err(|e| Error::format(&p, e.to_string()))?;
            assert_eq!(r.metadata().file_metadata().num_rows(), 3);
            let rows: Vec<parquet::record::Row> = r
                .get_row_iter(None)
                .map_err(|e| Error::format(&p, e.to_string()))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::format(&p, e.to_string()))?;
            let cols: Vec<(String, Field)> = rows[2].get_column_iter().map(|(n, f)| (n.clone(), f.clone())).collect();
            assert_eq!(cols[0], ("row".to_string(), Field::Long(2)));
            assert_eq!(cols[1], ("id".to_string(), Field::Str("7".into())));
            let label = if labelled { Field::Str("a".into()) } else { Field::Null };
            assert_eq!(cols[2], ("label".to_string(), label));
            let Field::ListInternal(list) = &cols[3].1 else {
                panic!("embedding is not a list: {:?}", cols[3]);
            };
            assert_eq!(list.len(), 2);
            assert_eq!((list.get_float(0).ok(), list.get_float(1).ok()), (Some(3.0), Some(4.0)));
        }
        Ok(())
    }
}
