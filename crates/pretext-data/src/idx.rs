//! The IDX format of the MNIST family (plain or gzip-compressed).
//!
//! Layout: two zero bytes, a type byte (`0x08` = unsigned byte), the number
//! of dimensions, then each dimension as a big-endian `u32`, then the data.
//! Only unsigned-byte data is used by image datasets and read here.

use crate::dataset::ImageDataset;
use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// An IDX array of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions (e.g. `[60000, 28, 28]`).
    pub dims: Vec<usize>,
    /// The data, row-major.
    pub data: Vec<u8>,
}

/// Reads the bytes of `path`, gunzipping when the file starts with the gzip magic.
///
/// # Errors
/// [`Error::Io`]; [`Error::Format`] for a corrupt or truncated gzip stream.
pub fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("corrupt or truncated gzip data ({e})")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses IDX bytes that came from `path` (named in errors). Never panics.
///
/// # Errors
/// [`Error::Format`]: wrong magic, unsupported type, truncated or trailing data.
pub fn parse_idx(bytes: &[u8], path: &Path) -> Result<IdxArray> {
    if bytes.len() < 4 {
        return Err(Error::format(
            path,
            format!("truncated IDX header ({} bytes, need at least 4)", bytes.len()),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(Error::format(
            path,
            format!(
                "wrong magic {:02x} {:02x} {:02x} {:02x}: not an IDX file",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(Error::format(
            path,
            format!(
                "IDX element type 0x{:02x} is not supported (only 0x08, unsigned byte)",
                bytes[2]
            ),
        ));
    }
    let nd = bytes[3] as usize;
    if nd == 0 {
        return Err(Error::format(path, "IDX file with 0 dimensions"));
    }
    let header = 4 + 4 * nd;
    if bytes.len() < header {
        return Err(Error::format(
            path,
            format!(
                "truncated IDX header: {nd} dimensions need {header} bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    let mut dims = Vec::with_capacity(nd);
    let mut count: usize = 1;
    for d in 0..nd {
        let o = 4 + 4 * d;
        let v = u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize;
        dims.push(v);
        count = count
            .checked_mul(v)
            .ok_or_else(|| Error::format(path, format!("IDX dimensions {dims:?} overflow")))?;
    }
    let have = bytes.len() - header;
    if have < count {
        return Err(Error::format(
            path,
            format!("truncated: dimensions {dims:?} need {count} data bytes, file has {have}"),
        ));
    }
    if have > count {
        return Err(Error::format(
            path,
            format!(
                "{} unexpected bytes after the data of dimensions {dims:?}",
                have - count
            ),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Reads an IDX file (plain or `.gz`).
///
/// # Errors
/// As [`read_maybe_gzip`] and [`parse_idx`].
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    parse_idx(&read_maybe_gzip(path)?, path)
}

/// Serialises an IDX array of bytes (for tests and tools).
pub fn write_idx_bytes(arr: &IdxArray) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, arr.dims.len() as u8];
    for d in &arr.dims {
        out.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    out.extend_from_slice(&arr.data);
    out
}

/// Reads an image file (`n × h × w`) and, optionally, its label file (`n`).
///
/// # Errors
/// As [`read_idx`]; [`Error::Format`] when the image file is not 3-D, the
/// label file not 1-D, or their counts differ.
pub fn read_idx_images(images: &Path, labels: Option<&Path>) -> Result<ImageDataset> {
    let img = read_idx(images)?;
    if img.dims.len() != 3 {
        return Err(Error::format(
            images,
            format!("expected 3 dimensions (images × rows × columns), found {:?}", img.dims),
        ));
    }
    let labels = match labels {
        Some(lp) => {
            let l = read_idx(lp)?;
            if l.dims.len() != 1 {
                return Err(Error::format(
                    lp,
                    format!("expected 1 dimension (labels), found {:?}", l.dims),
                ));
            }
            if l.dims[0] != img.dims[0] {
                return Err(Error::format(
                    lp,
                    format!(
                        "{} labels for {} images in {}",
                        l.dims[0],
                        img.dims[0],
                        images.display()
                    ),
                ));
            }
            Some(l.data.iter().map(|&b| u32::from(b)).collect())
        }
        None => None,
    };
    Ok(ImageDataset {
        height: img.dims[1],
        width: img.dims[2],
        channels: 1,
        pixels: img.data,
        labels,
        classes: Vec::new(),
        ids: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> IdxArray {
        IdxArray {
            dims: vec![2, 3, 2],
            data: (0..12).collect(),
        }
    }

    #[test]
    fn round_trip_plain_and_gzip() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let bytes = write_idx_bytes(&sample());
        let plain = dir.path().join("x-idx3-ubyte");
        std::fs::write(&plain, &bytes).map_err(|e| Error::io(&plain, e))?;
        assert_eq!(read_idx(&plain)?, sample());
        let gz = dir.path().join("x-idx3-ubyte.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &bytes).map_err(|e| Error::io(&gz, e))?;
        std::fs::write(&gz, enc.finish().map_err(|e| Error::io(&gz, e))?).map_err(|e| Error::io(&gz, e))?;
        assert_eq!(read_idx(&gz)?, sample());
        Ok(())
    }

    #[test]
    fn images_with_labels() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let ip = dir.path().join("i");
        let lp = dir.path().join("l");
        std::fs::write(&ip, write_idx_bytes(&sample())).map_err(|e| Error::io(&ip, e))?;
        std::fs::write(
            &lp,
            write_idx_bytes(&IdxArray {
                dims: vec![2],
                data: vec![7, 3],
            }),
        )
        .map_err(|e| Error::io(&lp, e))?;
        let ds = read_idx_images(&ip, Some(&lp))?;
        assert_eq!((ds.len(), ds.height, ds.width, ds.channels), (2, 3, 2, 1));
        assert_eq!(ds.image(1), &[6, 7, 8, 9, 10, 11]);
        assert_eq!(ds.labels, Some(vec![7, 3]));
        std::fs::write(
            &lp,
            write_idx_bytes(&IdxArray {
                dims: vec![3],
                data: vec![1, 2, 3],
            }),
        )
        .map_err(|e| Error::io(&lp, e))?;
        let err = read_idx_images(&ip, Some(&lp)).expect_err("count mismatch");
        assert!(err.to_string().contains("3 labels for 2 images"), "{err}");
        Ok(())
    }

    #[test]
    fn bad_files_name_the_problem() {
        let p = Path::new("train-images-idx3-ubyte");
        let good = write_idx_bytes(&sample());
        let e = parse_idx(&good[..good.len() - 1], p)
            .expect_err("truncated")
            .to_string();
        assert!(e.contains("train-images-idx3-ubyte") && e.contains("truncated"), "{e}");
        let mut bad = good.clone();
        bad[0] = 0x1f;
        assert!(parse_idx(&bad, p)
            .expect_err("magic")
            .to_string()
            .contains("wrong magic"));
        let mut bad = good.clone();
        bad[2] = 0x0d;
        assert!(parse_idx(&bad, p).expect_err("type").to_string().contains("0x0d"));
        let mut bad = good.clone();
        bad.push(0);
        assert!(parse_idx(&bad, p)
            .expect_err("trailing")
            .to_string()
            .contains("unexpected bytes"));
        assert!(parse_idx(&good[..6], p)
            .expect_err("header")
            .to_string()
            .contains("truncated IDX header"));
        let huge = [0, 0, 8, 3, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255];
        assert!(parse_idx(&huge, p).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_idx(&bytes, Path::new("fuzz"));
        }

        #[test]
        fn parser_never_panics_on_plausible_headers(nd in 0u8..5, dims in proptest::collection::vec(0u32..6, 0..5), tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = vec![0, 0, 8, nd];
            for d in dims { b.extend_from_slice(&d.to_be_bytes()); }
            b.extend(tail);
            let _ = parse_idx(&b, Path::new("fuzz"));
        }
    }
}
