//! Image folders: `root/<class>/<file>` (labelled) or a flat folder of images
//! (unlabelled). PNG, JPEG, BMP and WebP are decoded with the `image` crate
//! and resized to one size, grayscale or RGB.

use crate::dataset::ImageDataset;
use crate::{Error, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// File extensions read as images (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "webp", "gif"];

/// How to read an image folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolderOptions {
    /// Output height and width (images are resized with a triangle filter).
    pub size: (usize, usize),
    /// 1 = grayscale, 3 = RGB.
    pub channels: usize,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(dir, err)))
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

/// Image files with their class index (None in a flat folder), and the class names.
pub type ImageListing = (Vec<(PathBuf, Option<u32>)>, Vec<String>);

/// Lists the images of `root`: with class subfolders, returns (file, class
/// index) pairs and the class names (sorted); a flat folder gives no labels.
///
/// # Errors
/// [`Error::Io`]; [`Error::Invalid`] when no image is found (listing what was looked for).
pub fn list_images(root: &Path) -> Result<ImageListing> {
    let entries = sorted_entries(root)?;
    let subdirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
    let mut files = Vec::new();
    let mut classes = Vec::new();
    if !subdirs.is_empty() {
        for d in subdirs {
            let imgs: Vec<PathBuf> = sorted_entries(d)?
                .into_iter()
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            if imgs.is_empty() {
                continue;
            }
            let label = classes.len() as u32;
            classes.push(
                d.file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default(),
            );
            files.extend(imgs.into_iter().map(|p| (p, Some(label))));
        }
    }
    if files.is_empty() {
        files = entries
            .into_iter()
            .filter(|p| p.is_file() && is_image(p))
            .map(|p| (p, None))
            .collect();
        classes.clear();
    }
    if files.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no images found (looked for files ending in .{} directly inside, or in class subfolders)",
            root.display(),
            IMAGE_EXTENSIONS.join(", .")
        )));
    }
    Ok((files, classes))
}

/// Decodes one image file and resizes it to `opts` (HWC bytes).
///
/// # Errors
/// [`Error::Io`]; [`Error::Format`] naming the file when it does not decode.
pub fn load_image(path: &Path, opts: FolderOptions) -> Result<Vec<u8>> {
    Ok(load_image_noting_colour(path, opts)?.0)
}

/// As [`load_image`], and whether a colour image was turned grey (`opts.channels` = 1).
fn load_image_noting_colour(path: &Path, opts: FolderOptions) -> Result<(Vec<u8>, bool)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = image::load_from_memory(&bytes).map_err(|e| Error::format(path, format!("cannot decode image ({e})")))?;
    let (h, w) = opts.size;
    let img = if img.width() as usize != w || img.height() as usize != h {
        img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle)
    } else {
        img
    };
    let colour = opts.channels == 1 && img.color().has_color() && !is_grey(&img);
    Ok((
        match opts.channels {
            1 => img.to_luma8().into_raw(),
            _ => img.to_rgb8().into_raw(),
        },
        colour,
    ))
}

/// Whether an RGB-typed image holds only greys (saved as RGB, no colour in it).
fn is_grey(img: &image::DynamicImage) -> bool {
    img.to_rgb8().pixels().all(|p| p[0] == p[1] && p[1] == p[2])
}

/// Reads a whole image folder (decoding in parallel).
///
/// # Errors
/// As [`list_images`] and [`load_image`]; [`Error::Invalid`] for bad options.
pub fn read_image_folder(root: &Path, opts: FolderOptions) -> Result<ImageDataset> {
    if opts.channels != 1 && opts.channels != 3 {
        return Err(Error::Invalid(format!(
            "image channels must be 1 or 3, not {}",
            opts.channels
        )));
    }
    if opts.size.0 == 0 || opts.size.1 == 0 {
        return Err(Error::Invalid(format!("image size {:?} must be positive", opts.size)));
    }
    let (files, classes) = list_images(root)?;
    let decoded: Vec<(Vec<u8>, bool)> = files
        .par_iter()
        .map(|(p, _)| load_image_noting_colour(p, opts))
        .collect::<Result<_>>()?;
    let greyed = decoded.iter().filter(|(_, colour)| *colour).count();
    if greyed > 0 {
        tracing::warn!(
            "{}: {greyed} of {} images are in colour and are read as grayscale (data.channels = 1); \
             to keep colour: --set data.channels=3 (and, for pretext-contrastive, --set model.encoder.in_channels=3)",
            root.display(),
            files.len()
        );
    }
    let decoded: Vec<Vec<u8>> = decoded.into_iter().map(|(px, _)| px).collect();
    let labels: Option<Vec<u32>> = files.iter().map(|(_, l)| *l).collect();
    let ids = files
        .iter()
        .map(|(p, _)| p.strip_prefix(root).unwrap_or(p).to_string_lossy().replace('\\', "/"))
        .collect();
    Ok(ImageDataset {
        height: opts.size.0,
        width: opts.size.1,
        channels: opts.channels,
        pixels: decoded.concat(),
        labels,
        classes,
        ids: Some(ids),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Result<()> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
        img.save(path).map_err(|e| Error::format(path, e.to_string()))
    }

    #[test]
    fn labelled_folder_round_trip() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        for (c, color) in [("cat", [200u8, 10, 10]), ("dog", [10, 10, 200])] {
            let d = dir.path().join(c);
            std::fs::create_dir(&d).map_err(|e| Error::io(&d, e))?;
            for i in 0..3 {
                write_png(&d.join(format!("{i}.png")), 4, 4, |_, _| color)?;
            }
        }
        std::fs::write(dir.path().join("cat/notes.txt"), "ignored").map_err(|e| Error::io("w", e))?;
        // a GIF among the PNGs decodes too
        let gif = dir.path().join("dog/3.gif");
        image::RgbImage::from_fn(4, 4, |_, _| image::Rgb([10, 10, 200]))
            .save(&gif)
            .map_err(|e| Error::format(&gif, e.to_string()))?;
        let ds = read_image_folder(
            dir.path(),
            FolderOptions {
                size: (4, 4),
                channels: 3,
            },
        )?;
        assert_eq!(ds.len(), 7);
        assert_eq!(ds.classes, vec!["cat", "dog"]);
        assert_eq!(ds.labels, Some(vec![0, 0, 0, 1, 1, 1, 1]));
        assert_eq!(&ds.image(0)[..3], &[200, 10, 10]);
        assert_eq!(&ds.image(5)[..3], &[10, 10, 200]);
        assert_eq!(ds.id(6), "dog/3.gif", "images are named by their path in the folder");
        assert_eq!(&ds.image(6)[..3], &[10, 10, 200]);
        // resize + grayscale
        let ds = read_image_folder(
            dir.path(),
            FolderOptions {
                size: (2, 3),
                channels: 1,
            },
        )?;
        assert_eq!((ds.height, ds.width, ds.channels, ds.image_len()), (2, 3, 1, 6));
        Ok(())
    }

    #[test]
    fn flat_folder_is_unlabelled() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        write_png(&dir.path().join("a.png"), 3, 2, |x, y| {
            [(x * 50) as u8, (y * 50) as u8, 0]
        })?;
        let ds = read_image_folder(
            dir.path(),
            FolderOptions {
                size: (2, 3),
                channels: 3,
            },
        )?;
        assert_eq!(ds.labels, None);
        assert_eq!(ds.image(0)[3..6], [50, 0, 0]);
        Ok(())
    }

    #[test]
    fn undecodable_and_empty_folders_are_named() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let err = read_image_folder(
            dir.path(),
            FolderOptions {
                size: (4, 4),
                channels: 1,
            },
        )
        .expect_err("empty");
        assert!(err.to_string().contains("no images found"), "{err}");
        let bad = dir.path().join("broken.png");
        std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").map_err(|e| Error::io(&bad, e))?;
        let err = read_image_folder(
            dir.path(),
            FolderOptions {
                size: (4, 4),
                channels: 1,
            },
        )
        .expect_err("bad");
        assert!(
            err.to_string().contains("broken.png") && err.to_string().contains("cannot decode"),
            "{err}"
        );
        Ok(())
    }
}
