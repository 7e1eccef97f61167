//! Labelled data for transfer (probe, fine-tuning): a train and a test part,
//! the data's own split where it has one (IDX `t10k`, CIFAR `test_batch`,
//! `train/` + `test/` folders, a `split` field or column) and a seeded,
//! stratified 80/20 split otherwise; where it came from, with a checksum.

use crate::dataset::{ImageDataset, ImageSplits, Split, TextDataset};
use crate::source::{ImageFormat, TextFormat};
use crate::text::TextFields;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The share of a labelled dataset without a test split of its own that is
/// held out for testing.
pub const TEST_FRACTION: f64 = 0.2;

/// Where labelled data came from and how it was split, as `eval.json` and a
/// classifier's `config.json` record it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSource {
    /// The path as given.
    pub path: String,
    /// SHA-256 of every file under the path (sorted by relative name; each
    /// name and its bytes hashed), so a report names the exact data.
    pub sha256: String,
    /// How train and test were separated: `own` (the data's split) or
    /// `stratified` (seeded, [`TEST_FRACTION`] of each class to test).
    pub split: String,
    /// Seed of a stratified split.
    pub seed: u64,
    /// Training items.
    pub n_train: usize,
    /// Test items.
    pub n_test: usize,
    /// Class names by label (label values where the data names none).
    pub classes: Vec<String>,
}

/// A labelled dataset ready for transfer.
#[derive(Debug, Clone)]
pub struct Labelled<T> {
    /// Training items (label subsets are drawn from them).
    pub train: T,
    /// Test items.
    pub test: T,
    /// Validation items where the data names some (a `split` of `validation`).
    pub validation: Option<T>,
    /// Where it came from.
    pub source: DataSource,
}

/// The SHA-256 of `path`: a file's name and bytes, or every file under a
/// folder in sorted order, each name (relative, `/`-separated) and its bytes.
///
/// # Errors
/// [`Error::Io`] naming the file that could not be read.
pub fn tree_sha256(path: &Path) -> Result<String> {
    let mut files = Vec::new();
    collect_files(path, &mut files)?;
    files.sort();
    let mut h = Sha256::new();
    for f in &files {
        let rel = f.strip_prefix(path).unwrap_or(f).to_string_lossy().replace('\\', "/");
        h.update(rel.as_bytes());
        h.update([0u8]);
        let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        std::io::copy(&mut file, &mut h).map_err(|e| Error::io(f, e))?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    for e in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let p = e.map_err(|e| Error::io(path, e))?.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else if p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// Class names of a dataset: its own, or the label values as text.
fn class_names(classes: &[String], n: usize) -> Vec<String> {
    if classes.len() >= n {
        classes.to_vec()
    } else {
        (0..n).map(|c| c.to_string()).collect()
    }
}

fn need_two_classes(path: &Path, labels: &[u32], classes: &[String]) -> Result<()> {
    let mut seen: Vec<u32> = labels.to_vec();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() < 2 {
        let name = seen
            .first()
            .map(|&c| classes.get(c as usize).cloned().unwrap_or_else(|| c.to_string()))
            .unwrap_or_default();
        return Err(Error::format(
            path,
            format!("only one class ({name:?}) in the labelled data; a classifier needs at least two"),
        ));
    }
    Ok(())
}

fn unlabelled(path: &Path, what: &str) -> Error {
    Error::format(
        path,
        format!(
            "{what} no labels; transfer needs labelled data: class subfolders of images, IDX images with their \
             labels file, CIFAR batches, or a text table with a label field (--set data.label_field=NAME)"
        ),
    )
}

/// Maps the labels of `test` onto the classes of `train` by name (two image
/// folders list their classes separately).
fn align_classes(path: &Path, train: &ImageDataset, test: &mut ImageDataset) -> Result<()> {
    if train.classes.is_empty() || test.classes.is_empty() || train.classes == test.classes {
        return Ok(());
    }
    let map: Vec<u32> = test
        .classes
        .iter()
        .map(|c| {
            train
                .classes
                .iter()
                .position(|t| t == c)
                .map(|i| i as u32)
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!(
                            "the test split has class {c:?}, which the training split lacks (it has {:?})",
                            train.classes
                        ),
                    )
                })
        })
        .collect::<Result<_>>()?;
    if let Some(l) = test.labels.as_mut() {
        for x in l.iter_mut() {
            *x = map[*x as usize];
        }
    }
    test.classes = train.classes.clone();
    Ok(())
}

/// Labelled images from splits read off `path` (see [`load_labelled_images`]).
///
/// # Errors
/// Unlabelled images; a single class; test classes the training split lacks.
pub fn labelled_images(path: &Path, splits: ImageSplits, seed: u64, sha256: String) -> Result<Labelled<ImageDataset>> {
    let ImageSplits { train, test } = splits;
    let labels = train
        .labels
        .clone()
        .ok_or_else(|| unlabelled(path, "the images have"))?;
    let (train, mut test, split) = match test {
        Some(t) => {
            if t.labels.is_none() {
                return Err(unlabelled(path, "the test split has"));
            }
            (train, t, "own")
        }
        None => {
            let (tr, te) = crate::subset::stratified_split(&labels, TEST_FRACTION, seed)?;
            (train.select(&tr), train.select(&te), "stratified")
        }
    };
    align_classes(path, &train, &mut test)?;
    let train_labels = train.labels.as_deref().unwrap_or_default();
    need_two_classes(path, train_labels, &train.classes)?;
    if test.is_empty() {
        return Err(Error::format(path, "no test images (every class has a single image)"));
    }
    let n = train.num_classes().max(test.num_classes());
    let source = DataSource {
        path: path.display().to_string(),
        sha256,
        split: split.into(),
        seed,
        n_train: train.len(),
        n_test: test.len(),
        classes: class_names(&train.classes, n),
    };
    Ok(Labelled {
        train,
        test,
        validation: None,
        source,
    })
}

/// Reads labelled images from `path` (any format [`crate::source::load_images`]
/// detects) and splits them for transfer.
///
/// # Errors
/// Reader errors naming the file; unlabelled images; a single class.
pub fn load_labelled_images(
    path: &Path,
    format: ImageFormat,
    size: usize,
    channels: usize,
    seed: u64,
) -> Result<Labelled<ImageDataset>> {
    let splits = crate::source::load_images(path, format, (size, size), channels)?;
    labelled_images(path, splits, seed, tree_sha256(path)?)
}

/// Reads a labelled text table or fortune folder from `path` and splits it
/// for transfer: its `split` field where it has one (records marked
/// `validation` become the validation part), else a seeded stratified split.
///
/// # Errors
/// Reader errors naming the file; unlabelled documents; a single class.
pub fn load_labelled_text(
    path: &Path,
    format: TextFormat,
    fields: &TextFields<'_>,
    seed: u64,
) -> Result<Labelled<TextDataset>> {
    let all = crate::source::load_text(path, format, fields)?;
    labelled_text(path, all, seed, tree_sha256(path)?)
}

/// Labelled text from a corpus read off `path` (see [`load_labelled_text`]).
///
/// # Errors
/// Unlabelled documents; a single class; a split without test documents.
pub fn labelled_text(path: &Path, all: TextDataset, seed: u64, sha256: String) -> Result<Labelled<TextDataset>> {
    let labels = all
        .labels
        .clone()
        .ok_or_else(|| unlabelled(path, "the documents have"))?;
    let part = |s: Split| -> Vec<usize> {
        match &all.splits {
            Some(sp) => (0..all.len()).filter(|&i| sp[i] == s).collect(),
            None => Vec::new(),
        }
    };
    let own_test = part(Split::Test);
    let (train, test, validation, split) = if all.splits.is_some() && !own_test.is_empty() {
        let val = part(Split::Validation);
        let validation = (!val.is_empty()).then(|| all.select(&val));
        (
            all.select(&part(Split::Train)),
            all.select(&own_test),
            validation,
            "own",
        )
    } else {
        let pool: Vec<usize> = match &all.splits {
            Some(_) => part(Split::Train),
            None => (0..all.len()).collect(),
        };
        let pool_labels: Vec<u32> = pool.iter().map(|&i| labels[i]).collect();
        let (tr, te) = crate::subset::stratified_split(&pool_labels, TEST_FRACTION, seed)?;
        let pick = |v: &[usize]| all.select(&v.iter().map(|&k| pool[k]).collect::<Vec<_>>());
        (pick(&tr), pick(&te), None, "stratified")
    };
    if train.is_empty() {
        return Err(Error::format(
            path,
            "no training documents (every record is in another split)",
        ));
    }
    need_two_classes(path, train.labels.as_deref().unwrap_or_default(), &train.classes)?;
    if test.is_empty() {
        return Err(Error::format(
            path,
            "no test documents (every class has a single document)",
        ));
    }
    let n = all
        .classes
        .len()
        .max(labels.iter().max().map_or(0, |m| *m as usize + 1));
    let source = DataSource {
        path: path.display().to_string(),
        sha256,
        split: split.into(),
        seed,
        n_train: train.len(),
        n_test: test.len(),
        classes: class_names(&all.classes, n),
    };
    Ok(Labelled {
        train,
        test,
        validation,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(labels: Option<Vec<u32>>, classes: &[&str]) -> ImageDataset {
        let n = labels.as_ref().map_or(4, Vec::len);
        ImageDataset {
            height: 1,
            width: 1,
            channels: 1,
            pixels: (0..n as u8).collect(),
            labels,
            classes: classes.iter().map(|s| s.to_string()).collect(),
            ids: None,
        }
    }

    #[test]
    fn own_test_split_is_kept_and_classes_aligned_by_name() -> Result<()> {
        let train = images(Some(vec![0, 1, 0, 1]), &["cat", "dog"]);
        let test = images(Some(vec![0, 0]), &["dog"]);
        let l = labelled_images(
            Path::new("pets"),
            ImageSplits {
                train,
                test: Some(test),
            },
            0,
            "x".into(),
        )?;
        assert_eq!(l.source.split, "own");
        assert_eq!(
            l.test.labels,
            Some(vec![1, 1]),
            "dog is label 1 of the training classes"
        );
        assert_eq!(l.source.classes, vec!["cat", "dog"]);
        let bad = labelled_images(
            Path::new("pets"),
            ImageSplits {
                train: images(Some(vec![0, 1]), &["cat", "dog"]),
                test: Some(images(Some(vec![0]), &["emu"])),
            },
            0,
            "x".into(),
        )
        .expect_err("unknown class");
        assert!(bad.to_string().contains("\"emu\""), "{bad}");
        Ok(())
    }

    #[test]
    fn without_a_test_split_a_seeded_stratified_fifth_is_held_out() -> Result<()> {
        let labels: Vec<u32> = (0..50).map(|i| (i % 2) as u32).collect();
        let mk = || ImageSplits {
            train: ImageDataset {
                pixels: (0..50).collect(),
                ..images(Some(labels.clone()), &[])
            },
            test: None,
        };
        let a = labelled_images(Path::new("d"), mk(), 3, "x".into())?;
        let b = labelled_images(Path::new("d"), mk(), 3, "x".into())?;
        assert_eq!((a.train.len(), a.test.len()), (40, 10));
        assert_eq!(a.test.pixels, b.test.pixels);
        assert_eq!(a.test.labels.iter().flatten().filter(|&&l| l == 1).count(), 5);
        assert_eq!(a.source.split, "stratified");
        assert_eq!(a.source.classes, vec!["0", "1"]);
        let c = labelled_images(Path::new("d"), mk(), 4, "x".into())?;
        assert_ne!(a.test.pixels, c.test.pixels);
        Ok(())
    }

    #[test]
    fn unlabelled_and_single_class_data_are_refused_by_name() {
        let e = labelled_images(
            Path::new("photos"),
            ImageSplits {
                train: images(None, &[]),
                test: None,
            },
            0,
            "x".into(),
        )
        .expect_err("unlabelled");
        assert!(e.to_string().starts_with("photos: the images have no labels"), "{e}");
        let e = labelled_images(
            Path::new("cats"),
            ImageSplits {
                train: images(Some(vec![0, 0, 0]), &["cat"]),
                test: None,
            },
            0,
            "x".into(),
        )
        .expect_err("one class");
        assert!(e.to_string().contains("only one class (\"cat\")"), "{e}");
    }

    #[test]
    fn text_uses_its_split_column_and_its_validation_records() -> Result<()> {
        let all = TextDataset {
            docs: (0..6).map(|i| format!("d{i}")).collect(),
            labels: Some(vec![0, 1, 0, 1, 0, 1]),
            classes: vec!["neg".into(), "pos".into()],
            splits: Some(vec![
                Split::Train,
                Split::Train,
                Split::Validation,
                Split::Test,
                Split::Test,
                Split::Train,
            ]),
        };
        let l = labelled_text(Path::new("t.jsonl"), all.clone(), 0, "x".into())?;
        assert_eq!(l.train.docs, vec!["d0", "d1", "d5"]);
        assert_eq!(l.test.docs, vec!["d3", "d4"]);
        assert_eq!(l.validation.map(|v| v.docs), Some(vec!["d2".to_string()]));
        assert_eq!(l.source.split, "own");
        let plain = TextDataset { splits: None, ..all };
        let l = labelled_text(Path::new("t.jsonl"), plain, 0, "x".into())?;
        assert_eq!(
            (l.train.len(), l.test.len(), l.source.split.as_str()),
            (4, 2, "stratified")
        );
        Ok(())
    }

    #[test]
    fn the_checksum_covers_names_and_bytes() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let w = |n: &str, b: &str| std::fs::write(d.path().join(n), b).map_err(|e| Error::io(n, e));
        std::fs::create_dir(d.path().join("a")).map_err(|e| Error::io("a", e))?;
        w("a/x.png", "1")?;
        w("y.png", "2")?;
        let h1 = tree_sha256(d.path())?;
        assert_eq!(h1.len(), 64);
        assert_eq!(h1, tree_sha256(d.path())?);
        w("y.png", "3")?;
        let h2 = tree_sha256(d.path())?;
        assert_ne!(h1, h2);
        std::fs::rename(d.path().join("y.png"), d.path().join("z.png")).map_err(|e| Error::io("mv", e))?;
        assert_ne!(h2, tree_sha256(d.path())?);
        Ok(())
    }
}
