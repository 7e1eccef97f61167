//! CIFAR-10 and CIFAR-100 binary batches.
//!
//! CIFAR-10 records are 1 label byte + 3072 pixel bytes; CIFAR-100 records
//! are a coarse and a fine label byte + 3072 pixel bytes. Pixels are stored
//! channel-planar (1024 red, 1024 green, 1024 blue, each 32×32 row-major);
//! they are converted to HWC here.

use crate::dataset::{ImageDataset, CIFAR10_CLASSES};
use crate::{Error, Result};
use std::path::Path;

/// Which CIFAR variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarKind {
    /// 10 classes, one label byte per record.
    Cifar10,
    /// 100 classes, coarse + fine label bytes per record; the fine label is used.
    Cifar100,
}

const PIXELS: usize = 3 * 32 * 32;

impl CifarKind {
    /// Bytes per record.
    pub fn record_len(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1 + PIXELS,
            CifarKind::Cifar100 => 2 + PIXELS,
        }
    }
}

/// Parses CIFAR batch bytes from `path` (named in errors), appending to `out`. Never panics.
///
/// # Errors
/// [`Error::Format`]: empty, size not a multiple of the record size, label out of range.
pub fn parse_cifar(
    bytes: &[u8],
    kind: CifarKind,
    path: &Path,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    let rl = kind.record_len();
    if bytes.is_empty() {
        return Err(Error::format(path, "empty CIFAR batch file"));
    }
    if !bytes.len().is_multiple_of(rl) {
        return Err(Error::format(
            path,
            format!(
                "{} bytes is not a whole number of {rl}-byte {:?} records (truncated, or the wrong CIFAR variant)",
                bytes.len(),
                kind
            ),
        ));
    }
    let max_label = match kind {
        CifarKind::Cifar10 => 9,
        CifarKind::Cifar100 => 99,
    };
    for (r, rec) in bytes.chunks_exact(rl).enumerate() {
        let (label, px) = match kind {
            CifarKind::Cifar10 => (rec[0], &rec[1..]),
            CifarKind::Cifar100 => (rec[1], &rec[2..]),
        };
        if label > max_label {
            return Err(Error::format_at(
                path,
                format!("record {r}"),
                format!("label {label} out of range 0..={max_label}"),
            ));
        }
        labels.push(u32::from(label));
        for i in 0..1024 {
            pixels.extend_from_slice(&[px[i], px[1024 + i], px[2048 + i]]);
        }
    }
    Ok(())
}

/// Reads one or more CIFAR batch files into one dataset (32×32 RGB, labelled).
///
/// # Errors
/// [`Error::Io`], or as [`parse_cifar`]; [`Error::Invalid`] for an empty list.
pub fn read_cifar(files: &[&Path], kind: CifarKind) -> Result<ImageDataset> {
    if files.is_empty() {
        return Err(Error::Invalid("no CIFAR batch files given".into()));
    }
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| Error::io(*f, e))?;
        parse_cifar(&bytes, kind, f, &mut pixels, &mut labels)?;
    }
    Ok(ImageDataset {
        height: 32,
        width: 32,
        channels: 3,
        pixels,
        labels: Some(labels),
        classes: match kind {
            CifarKind::Cifar10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
            CifarKind::Cifar100 => Vec::new(),
        },
        ids: None,
    })
}

/// Writes CIFAR records (for tests and tools): `images` are HWC 32×32×3.
pub fn write_cifar_bytes(images: &[Vec<u8>], labels: &[u8], kind: CifarKind) -> Vec<u8> {
    let mut out = Vec::new();
    for (img, &l) in images.iter().zip(labels) {
        if kind == CifarKind::Cifar100 {
            out.push(l / 5);
        }
        out.push(l);
        for c in 0..3 {
            for i in 0..1024 {
                out.push(img[i * 3 + c]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn images(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|k| (0..PIXELS).map(|i| ((i * 7 + k * 13) % 256) as u8).collect())
            .collect()
    }

    #[test]
    fn round_trip_both_variants() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        for (kind, labels) in [
            (CifarKind::Cifar10, vec![3u8, 9]),
            (CifarKind::Cifar100, vec![42u8, 99]),
        ] {
            let p = dir.path().join(format!("{kind:?}.bin"));
            let imgs = images(2);
            std::fs::write(&p, write_cifar_bytes(&imgs, &labels, kind)).map_err(|e| Error::io(&p, e))?;
            let ds = read_cifar(&[&p, &p], kind)?;
            assert_eq!(ds.len(), 4);
            assert_eq!(ds.image(1), imgs[1].as_slice());
            assert_eq!(ds.image(2), imgs[0].as_slice());
            let want: Vec<u32> = labels.iter().chain(&labels).map(|&l| u32::from(l)).collect();
            assert_eq!(ds.labels, Some(want));
        }
        Ok(())
    }

    #[test]
    fn truncated_and_bad_labels() {
        let p = Path::new("data_batch_1.bin");
        let bytes = write_cifar_bytes(&images(2), &[1, 2], CifarKind::Cifar10);
        let (mut px, mut l) = (Vec::new(), Vec::new());
        let e = parse_cifar(&bytes[..bytes.len() - 5], CifarKind::Cifar10, p, &mut px, &mut l).expect_err("trunc");
        assert!(
            e.to_string().contains("data_batch_1.bin") && e.to_string().contains("not a whole number"),
            "{e}"
        );
        let mut bad = bytes.clone();
        bad[3073] = 200;
        let e = parse_cifar(&bad, CifarKind::Cifar10, p, &mut px, &mut l).expect_err("label");
        assert!(e.to_string().contains("record 1"), "{e}");
        assert!(parse_cifar(&[], CifarKind::Cifar10, p, &mut px, &mut l).is_err());
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..7000), c100 in any::<bool>()) {
            let kind = if c100 { CifarKind::Cifar100 } else { CifarKind::Cifar10 };
            let (mut px, mut l) = (Vec::new(), Vec::new());
            let _ = parse_cifar(&bytes, kind, Path::new("fuzz"), &mut px, &mut l);
        }
    }
}
