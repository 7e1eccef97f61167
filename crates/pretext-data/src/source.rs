//! Finding data: `--data PATH` detection, and the shipped defaults.

use crate::cifar::{read_cifar, CifarKind};
use crate::dataset::{ImageDataset, ImageSplits, TextDataset};
use crate::idx::read_idx_images;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Image formats `--data` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageFormat {
    /// Detect from what is found.
    Auto,
    /// IDX files (MNIST family).
    Idx,
    /// CIFAR-10 binary batches.
    Cifar10,
    /// CIFAR-100 binary batches.
    Cifar100,
    /// A folder of images (class subfolders or flat).
    Folder,
}

fn find_first(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

fn idx_pair(dir: &Path, prefix: &str) -> Option<(PathBuf, Option<PathBuf>)> {
    let img = find_first(
        dir,
        &[
            &format!("{prefix}-images-idx3-ubyte.gz"),
            &format!("{prefix}-images-idx3-ubyte"),
            &format!("{prefix}-images.idx3-ubyte"),
        ],
    )?;
    let lab = find_first(
        dir,
        &[
            &format!("{prefix}-labels-idx1-ubyte.gz"),
            &format!("{prefix}-labels-idx1-ubyte"),
            &format!("{prefix}-labels.idx1-ubyte"),
        ],
    );
    Some((img, lab))
}

/// The images of a run: what the model learns from, and a labelled held-out
/// set for monitoring and evaluation.
#[derive(Debug, Clone)]
pub struct RunImages {
    /// Training images (shared with the batcher's workers).
    pub train: Arc<ImageDataset>,
    /// The labelled test split, or a seeded 10% of the training images when
    /// the source has no test split; `None` for unlabelled data.
    pub held_out: Option<ImageDataset>,
}

impl RunImages {
    /// The training batches of these images through `pipeline` (training
    /// settings: see [`crate::BatcherConfig::training`]).
    ///
    /// # Errors
    /// `train.batch_size` larger than the training set (a config error naming
    /// the key); the batcher's own errors.
    pub fn training_batches(
        &self,
        pipeline: crate::Pipeline,
        cfg: crate::BatcherConfig,
        device: &candle_core::Device,
    ) -> Result<crate::ImageBatcher> {
        if cfg.batch_size > self.train.len() {
            return Err(Error::Core(
                pretext_core::InvalidSetting::value(
                    "train.batch_size",
                    cfg.batch_size,
                    &format!("must be at most the {} training images", self.train.len()),
                )
                .into(),
            ));
        }
        crate::ImageBatcher::new(self.train.clone(), Arc::new(pipeline), cfg, device)
    }
}

impl RunImages {
    /// The images a probe evaluates on: labelled `data` (`probe --data`,
    /// split by [`crate::labelled::load_labelled_images`]; its test part as
    /// `held_out`) with its source, or the run's own images from `own`.
    ///
    /// # Errors
    /// Reader errors; unlabelled data; images with another channel count.
    pub fn for_probe(
        data: Option<&Path>,
        own: impl FnOnce() -> Result<RunImages>,
        format: ImageFormat,
        size: usize,
        channels: usize,
        seed: u64,
    ) -> Result<(RunImages, Option<crate::labelled::DataSource>)> {
        let Some(path) = data else {
            return Ok((own()?, None));
        };
        let l = crate::labelled::load_labelled_images(path, format, size, channels, seed)?;
        if l.train.channels != channels {
            return Err(Error::Channels {
                found: l.train.channels,
                expected: channels,
            });
        }
        Ok((
            RunImages {
                train: Arc::new(l.train),
                held_out: Some(l.test),
            },
            Some(l.source),
        ))
    }
}

/// Loads `path` (empty = the shipped Fashion-MNIST) and checks its channels.
/// When the source has no labelled test split, 10% of the labelled training
/// images (seeded by `seed`) are held out — and stay in the training set, as
/// pretraining uses no labels.
///
/// # Errors
/// Reader errors naming the file; [`Error::Invalid`] when the channels differ from `channels`.
pub fn load_run_images(path: &str, format: ImageFormat, size: usize, channels: usize, seed: u64) -> Result<RunImages> {
    let splits = if path.is_empty() {
        crate::shipped::fashion_mnist(&crate::shipped::datasets_dir()?)?
    } else {
        load_images(Path::new(path), format, (size, size), channels)?
    };
    if splits.train.channels != channels {
        return Err(Error::Channels {
            found: splits.train.channels,
            expected: channels,
        });
    }
    let held_out = match splits.test {
        Some(t) if t.labels.is_some() => Some(t),
        _ if splits.train.labels.is_some() => {
            let (_, va) = crate::subset::split(splits.train.len(), 0.1, seed)?;
            Some(splits.train.select(&va))
        }
        _ => None,
    };
    Ok(RunImages {
        train: Arc::new(splits.train),
        held_out,
    })
}

/// Loads images from `path`, detecting the format unless `format` says.
///
/// - a folder with `train-images-idx3-ubyte[.gz]` (and `t10k-…`): IDX, train and test;
/// - a folder with `data_batch_1.bin` … and `test_batch.bin`: CIFAR-10; with `train.bin`/`test.bin`: CIFAR-100;
/// - a folder with `train/` and `test/` subfolders of images: image folders, train and test;
/// - any other folder of images (class subfolders or flat): one unsplit set;
/// - a single IDX file (with its `labels` sibling if present) or CIFAR `.bin` file.
///
/// `size` and `channels` apply to image folders.
///
/// # Errors
/// [`Error::Invalid`] listing what was looked for when nothing matches; reader errors otherwise.
pub fn load_images(path: &Path, format: ImageFormat, size: (usize, usize), channels: usize) -> Result<ImageSplits> {
    if !path.exists() {
        return Err(Error::Invalid(format!("{}: no such file or folder", path.display())));
    }
    let folder_opts = crate_folder_opts(size, channels);
    if path.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let is_idx = name.contains("idx") || format == ImageFormat::Idx;
        if is_idx {
            let labels = path.with_file_name(
                name.replace("images-idx3", "labels-idx1")
                    .replace("images.idx3", "labels.idx1"),
            );
            let labels = (labels != path && labels.is_file()).then_some(labels);
            return Ok(ImageSplits {
                train: read_idx_images(path, labels.as_deref())?,
                test: None,
            });
        }
        if name.ends_with(".bin") || matches!(format, ImageFormat::Cifar10 | ImageFormat::Cifar100) {
            let kind = if format == ImageFormat::Cifar100 {
                CifarKind::Cifar100
            } else {
                CifarKind::Cifar10
            };
            return Ok(ImageSplits {
                train: read_cifar(&[path], kind)?,
                test: None,
            });
        }
        return Err(Error::Invalid(format!(
            "{}: not a recognised image data file (expected an IDX file such as train-images-idx3-ubyte.gz or a CIFAR .bin batch)",
            path.display()
        )));
    }
    let want = |f: ImageFormat| format == ImageFormat::Auto || format == f;
    if want(ImageFormat::Idx) {
        if let Some((ti, tl)) = idx_pair(path, "train") {
            let mut train = read_idx_images(&ti, tl.as_deref())?;
            let mut test = match idx_pair(path, "t10k").or_else(|| idx_pair(path, "test")) {
                Some((i, l)) => Some(read_idx_images(&i, l.as_deref())?),
                None => None,
            };
            let classes = idx_class_names(path, &ti)?;
            train.classes = classes.clone();
            if let Some(t) = test.as_mut() {
                t.classes = classes;
            }
            return Ok(ImageSplits { train, test });
        }
    }
    if want(ImageFormat::Cifar10) && path.join("data_batch_1.bin").is_file() {
        let batches: Vec<PathBuf> = (1..=5)
            .map(|i| path.join(format!("data_batch_{i}.bin")))
            .filter(|p| p.is_file())
            .collect();
        let refs: Vec<&Path> = batches.iter().map(PathBuf::as_path).collect();
        let train = read_cifar(&refs, CifarKind::Cifar10)?;
        let tp = path.join("test_batch.bin");
        let test = if tp.is_file() {
            Some(read_cifar(&[&tp], CifarKind::Cifar10)?)
        } else {
            None
        };
        return Ok(ImageSplits { train, test });
    }
    if want(ImageFormat::Cifar100) && path.join("train.bin").is_file() {
        let train = read_cifar(&[&path.join("train.bin")], CifarKind::Cifar100)?;
        let tp = path.join("test.bin");
        let test = if tp.is_file() {
            Some(read_cifar(&[&tp], CifarKind::Cifar100)?)
        } else {
            None
        };
        return Ok(ImageSplits { train, test });
    }
    if want(ImageFormat::Folder) {
        let (tr, te) = (path.join("train"), path.join("test"));
        if tr.is_dir() && te.is_dir() {
            return Ok(ImageSplits {
                train: read_folder(&tr, folder_opts)?,
                test: Some(read_folder(&te, folder_opts)?),
            });
        }
        return match read_folder(path, folder_opts) {
            Ok(train) => Ok(ImageSplits { train, test: None }),
            Err(Error::Invalid(_)) => Err(Error::Invalid(format!(
                "{}: no image data recognised. Looked for: train-images-idx3-ubyte[.gz] (IDX), data_batch_1.bin (CIFAR-10), \
                 train.bin (CIFAR-100), train/ and test/ folders, or image files (.png, .jpg, .jpeg, .bmp, .webp) \
                 directly inside or in class subfolders. Force a format with --set data.format=idx|cifar10|cifar100|folder",
                path.display()
            ))),
            Err(e) => Err(e),
        };
    }
    Err(Error::Invalid(format!("{}: no {format:?} data found", path.display())))
}

/// SHA-256 of the shipped (Debian, upstream) Fashion-MNIST image files.
const FASHION_MNIST_IMAGES_SHA256: [&str; 2] = [
    "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
];

/// Class names of an IDX folder: its `classes.txt` (one name per line, in
/// label order), else Fashion-MNIST's when `images` is Fashion-MNIST's
/// (recognised by its SHA-256), else none (labels name themselves).
///
/// # Errors
/// An unreadable `classes.txt`.
fn idx_class_names(dir: &Path, images: &Path) -> Result<Vec<String>> {
    let names = dir.join("classes.txt");
    if names.is_file() {
        let text = std::fs::read_to_string(&names).map_err(|e| Error::io(&names, e))?;
        return Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect());
    }
    let sha = crate::shipped::sha256_file(images)?;
    if FASHION_MNIST_IMAGES_SHA256.contains(&sha.as_str()) {
        return Ok(crate::dataset::FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect());
    }
    Ok(Vec::new())
}

#[cfg(feature = "vision")]
fn crate_folder_opts(size: (usize, usize), channels: usize) -> crate::folder::FolderOptions {
    crate::folder::FolderOptions { size, channels }
}

#[cfg(feature = "vision")]
fn read_folder(path: &Path, opts: crate::folder::FolderOptions) -> Result<ImageDataset> {
    crate::folder::read_image_folder(path, opts)
}

#[cfg(not(feature = "vision"))]
fn crate_folder_opts(size: (usize, usize), channels: usize) -> (usize, usize, usize) {
    (size.0, size.1, channels)
}

#[cfg(not(feature = "vision"))]
fn read_folder(path: &Path, _opts: (usize, usize, usize)) -> Result<ImageDataset> {
    Err(Error::Invalid(format!(
        "{}: image folders need pretext-data's `vision` feature",
        path.display()
    )))
}

/// Text formats `--data` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TextFormat {
    /// Detect from the extension / folder.
    Auto,
    /// Fortune files (`%`-separated).
    Fortune,
    /// Plain text, one document per line.
    Lines,
    /// Plain text, one document per blank-line-separated paragraph.
    Paragraphs,
    /// JSON lines.
    Jsonl,
    /// Parquet.
    Parquet,
}

/// Loads a corpus from `path`: a folder → fortune files; `.jsonl` → JSONL;
/// `.parquet` → Parquet; `.txt` → lines; another file → fortune file.
/// `fields` name the JSONL fields or Parquet columns.
///
/// # Errors
/// Reader errors, naming the file.
pub fn load_text(path: &Path, format: TextFormat, fields: &crate::text::TextFields<'_>) -> Result<TextDataset> {
    if !path.exists() {
        return Err(Error::Invalid(format!("{}: no such file or folder", path.display())));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let format = match format {
        TextFormat::Auto if path.is_dir() => TextFormat::Fortune,
        TextFormat::Auto => match ext.as_str() {
            "jsonl" | "ndjson" => TextFormat::Jsonl,
            "parquet" => TextFormat::Parquet,
            "txt" | "text" => TextFormat::Lines,
            _ => TextFormat::Fortune,
        },
        f => f,
    };
    match format {
        TextFormat::Fortune | TextFormat::Auto => crate::text::read_fortunes(path, None),
        TextFormat::Lines => crate::text::read_plain_text(path, crate::text::PlainSplit::Lines),
        TextFormat::Paragraphs => crate::text::read_plain_text(path, crate::text::PlainSplit::Paragraphs),
        TextFormat::Jsonl => crate::text::read_jsonl(path, fields),
        #[cfg(feature = "text")]
        TextFormat::Parquet => crate::text::read_parquet(path, fields),
        #[cfg(not(feature = "text"))]
        TextFormat::Parquet => Err(Error::Invalid(format!(
            "{}: Parquet needs pretext-data's `text` feature",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idx::{write_idx_bytes, IdxArray};

    #[test]
    fn detects_idx_folders_and_reports_unknown_ones() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let w =
            |n: &str, a: IdxArray| std::fs::write(d.path().join(n), write_idx_bytes(&a)).map_err(|e| Error::io(n, e));
        w(
            "train-images-idx3-ubyte",
            IdxArray {
                dims: vec![3, 2, 2],
                data: vec![1; 12],
            },
        )?;
        w(
            "train-labels-idx1-ubyte",
            IdxArray {
                dims: vec![3],
                data: vec![0, 1, 2],
            },
        )?;
        w(
            "t10k-images-idx3-ubyte",
            IdxArray {
                dims: vec![1, 2, 2],
                data: vec![2; 4],
            },
        )?;
        let s = load_images(d.path(), ImageFormat::Auto, (2, 2), 1)?;
        assert!(s.train.classes.is_empty(), "no names without classes.txt");
        std::fs::write(d.path().join("classes.txt"), "cat\ndog\n\nemu\n").map_err(|e| Error::io("w", e))?;
        let named = load_images(d.path(), ImageFormat::Auto, (2, 2), 1)?;
        assert_eq!(named.train.classes, vec!["cat", "dog", "emu"]);
        assert_eq!(named.test.map(|t| t.classes.len()), Some(3));
        assert_eq!(s.train.len(), 3);
        assert_eq!(s.test.as_ref().map(|t| (t.len(), t.labels.is_none())), Some((1, true)));
        let single = load_images(&d.path().join("train-images-idx3-ubyte"), ImageFormat::Auto, (2, 2), 1)?;
        assert_eq!(single.train.labels, Some(vec![0, 1, 2]));
        let e = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        std::fs::write(e.path().join("notes.md"), "x").map_err(|e| Error::io("w", e))?;
        let err = load_images(e.path(), ImageFormat::Auto, (2, 2), 1).expect_err("nothing");
        assert!(
            err.to_string().contains("Looked for") && err.to_string().contains("data_batch_1.bin"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn detects_text_formats() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let j = d.path().join("c.jsonl");
        std::fs::write(&j, "{\"text\": \"a\"}\n").map_err(|e| Error::io(&j, e))?;
        let fields = crate::text::TextFields::new("text", "");
        assert_eq!(load_text(&j, TextFormat::Auto, &fields)?.docs, vec!["a"]);
        let t = d.path().join("c.txt");
        std::fs::write(&t, "x\ny\n").map_err(|e| Error::io(&t, e))?;
        assert_eq!(load_text(&t, TextFormat::Auto, &fields)?.len(), 2);
        assert_eq!(load_text(&t, TextFormat::Fortune, &fields)?.len(), 1);
        Ok(())
    }
}
