//! The datasets shipped in `datasets/`, verified against their recorded sha256.
//!
//! `datasets/SHA256SUMS` (the `sha256sum` format) lists every shipped file;
//! loading checks each file used and says clearly when one was changed or is missing.

use crate::dataset::{ImageSplits, TextDataset, FASHION_MNIST_CLASSES};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The workspace's `datasets/` folder: `$PRETEXT_DATASETS` if set, else found
/// by walking up from the current directory and from this crate's source folder.
///
/// # Errors
/// [`Error::Invalid`] when no `datasets/SHA256SUMS` is found.
pub fn datasets_dir() -> Result<PathBuf> {
    if let Ok(d) = std::env::var("PRETEXT_DATASETS") {
        return Ok(PathBuf::from(d));
    }
    let mut starts = vec![];
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    starts.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for s in starts {
        for dir in s.ancestors() {
            let cand = dir.join("datasets");
            if cand.join("SHA256SUMS").is_file() {
                return Ok(cand);
            }
        }
    }
    Err(Error::Invalid(
        "cannot find the shipped datasets/ folder (with SHA256SUMS); run from the pretext checkout, set PRETEXT_DATASETS, or pass --data".into(),
    ))
}

/// The sha256 of a file, as lowercase hex.
///
/// # Errors
/// [`Error::Io`].
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let digest = Sha256::digest(&bytes);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks `relative` (e.g. `fashion-mnist/train-labels-idx1-ubyte.gz`) inside
/// `root` against `root/SHA256SUMS`.
///
/// # Errors
/// [`Error::Shipped`] when the file is missing, unlisted or changed.
pub fn verify(root: &Path, relative: &str) -> Result<PathBuf> {
    let sums_path = root.join("SHA256SUMS");
    let sums = std::fs::read_to_string(&sums_path).map_err(|e| Error::io(&sums_path, e))?;
    let want = sums
        .lines()
        .filter_map(|l| l.split_once("  "))
        .find(|(_, f)| f.trim() == relative)
        .map(|(h, _)| h.trim().to_string())
        .ok_or_else(|| Error::Shipped {
            path: sums_path.clone(),
            reason: format!("{relative} is not listed"),
        })?;
    let path = root.join(relative);
    if !path.is_file() {
        return Err(Error::Shipped {
            path,
            reason: "shipped dataset file is missing; restore it with `git checkout -- datasets/`".into(),
        });
    }
    let got = sha256_file(&path)?;
    if got != want {
        return Err(Error::Shipped {
            path,
            reason: format!("changed since it was shipped (sha256 {got}, expected {want}); restore it with `git checkout -- datasets/`"),
        });
    }
    Ok(path)
}

/// The shipped Fashion-MNIST: 60,000 training and 10,000 test images, 28×28 grayscale.
///
/// # Errors
/// As [`verify`] and [`crate::idx::read_idx_images`].
pub fn fashion_mnist(root: &Path) -> Result<ImageSplits> {
    let f = |n: &str| verify(root, &format!("fashion-mnist/{n}"));
    let mut train = crate::idx::read_idx_images(
        &f("train-images-idx3-ubyte.gz")?,
        Some(&f("train-labels-idx1-ubyte.gz")?),
    )?;
    let mut test =
        crate::idx::read_idx_images(&f("t10k-images-idx3-ubyte.gz")?, Some(&f("t10k-labels-idx1-ubyte.gz")?))?;
    let classes: Vec<String> = FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
    train.classes = classes.clone();
    test.classes = classes;
    Ok(ImageSplits {
        train,
        test: Some(test),
    })
}

/// The shipped fortunes corpus, every file verified; `categories` selects files.
///
/// # Errors
/// As [`verify`] and [`crate::text::read_fortunes`].
pub fn fortunes(root: &Path, categories: Option<&[String]>) -> Result<TextDataset> {
    let sums_path = root.join("SHA256SUMS");
    let sums = std::fs::read_to_string(&sums_path).map_err(|e| Error::io(&sums_path, e))?;
    for (_, f) in sums.lines().filter_map(|l| l.split_once("  ")) {
        let f = f.trim();
        if let Some(name) = f.strip_prefix("fortunes/") {
            if name != "LICENSE" && categories.is_none_or(|c| c.iter().any(|x| x == name)) {
                verify(root, f)?;
            }
        }
    }
    crate::text::read_fortunes(&root.join("fortunes"), categories)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_and_missing_files_are_reported() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let root = d.path();
        std::fs::create_dir(root.join("x")).map_err(|e| Error::io("mkdir", e))?;
        std::fs::write(root.join("x/a"), b"hello").map_err(|e| Error::io("w", e))?;
        let h = sha256_file(&root.join("x/a"))?;
        assert_eq!(h, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        std::fs::write(root.join("SHA256SUMS"), format!("{h}  x/a\n{h}  x/b\n")).map_err(|e| Error::io("w", e))?;
        verify(root, "x/a")?;
        let err = verify(root, "x/b").expect_err("missing");
        assert!(err.to_string().contains("missing"), "{err}");
        std::fs::write(root.join("x/a"), b"hellO").map_err(|e| Error::io("w", e))?;
        let err = verify(root, "x/a").expect_err("changed");
        assert!(err.to_string().contains("changed since it was shipped"), "{err}");
        assert!(verify(root, "x/c")
            .expect_err("unlisted")
            .to_string()
            .contains("not listed"));
        Ok(())
    }
}
