//! In-memory datasets: images kept as `u8`, texts as strings, labels optional.

/// A set of images of one size, stored as `u8` in HWC order (`h × w × c`
/// bytes per image), with optional labels.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageDataset {
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Channels: 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// All pixels, image after image, each HWC.
    pub pixels: Vec<u8>,
    /// One label per image, if the source has them.
    pub labels: Option<Vec<u32>>,
    /// Class names, indexed by label (may be empty when unknown).
    pub classes: Vec<String>,
    /// Where each image came from (its path inside an image folder); `None`
    /// where the row number is the only name (IDX, CIFAR).
    pub ids: Option<Vec<String>>,
}

impl ImageDataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.pixels.len().checked_div(self.image_len()).unwrap_or(0)
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per image.
    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// The pixels of image `i` (HWC).
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// The label of image `i`, if labelled.
    pub fn label(&self, i: usize) -> Option<u32> {
        self.labels.as_ref().and_then(|l| l.get(i).copied())
    }

    /// The name of image `i`: its path inside its folder, else its row number.
    pub fn id(&self, i: usize) -> String {
        self.ids
            .as_ref()
            .and_then(|ids| ids.get(i).cloned())
            .unwrap_or_else(|| i.to_string())
    }

    /// Number of classes (max label + 1, or the class-name count).
    pub fn num_classes(&self) -> usize {
        let from_labels = self
            .labels
            .as_ref()
            .and_then(|l| l.iter().max())
            .map_or(0, |m| *m as usize + 1);
        from_labels.max(self.classes.len())
    }

    /// A new dataset holding the images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> ImageDataset {
        let mut pixels = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
        }
        ImageDataset {
            height: self.height,
            width: self.width,
            channels: self.channels,
            pixels,
            labels: self.labels.as_ref().map(|l| indices.iter().map(|&i| l[i]).collect()),
            classes: self.classes.clone(),
            ids: self
                .ids
                .as_ref()
                .map(|v| indices.iter().map(|&i| v[i].clone()).collect()),
        }
    }
}

/// A train / test pair, as most image datasets ship.
#[derive(Debug, Clone)]
pub struct ImageSplits {
    /// Training images.
    pub train: ImageDataset,
    /// Test images, if the source has a test split.
    pub test: Option<ImageDataset>,
}

impl ImageSplits {
    /// Every image of both splits in one set (train, then test). With a test
    /// split, names get a `train/` or `test/` prefix (an image folder's
    /// path from its root); the test split's class names are matched to the
    /// training split's; labels are kept only where both splits have them.
    pub fn into_all(self) -> ImageDataset {
        let Some(test) = self.test else {
            return self.train;
        };
        let train = self.train;
        let n_train = train.len();
        let ids: Vec<String> = (0..n_train)
            .map(|i| format!("train/{}", train.id(i)))
            .chain((0..test.len()).map(|i| format!("test/{}", test.id(i))))
            .collect();
        let mut classes = train.classes.clone();
        let labels = match (&train.labels, &test.labels) {
            (Some(a), Some(b)) => {
                let mut all = a.clone();
                for &l in b {
                    let name = test.classes.get(l as usize);
                    let mapped = match name {
                        Some(n) if !classes.is_empty() => match classes.iter().position(|c| c == n) {
                            Some(i) => i as u32,
                            None => {
                                classes.push(n.clone());
                                (classes.len() - 1) as u32
                            }
                        },
                        _ => l,
                    };
                    all.push(mapped);
                }
                Some(all)
            }
            _ => None,
        };
        let mut pixels = train.pixels;
        pixels.extend(test.pixels);
        ImageDataset {
            height: train.height,
            width: train.width,
            channels: train.channels,
            pixels,
            labels,
            classes,
            ids: Some(ids),
        }
    }
}

/// A corpus of documents with optional labels (e.g. fortune categories).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TextDataset {
    /// The documents.
    pub docs: Vec<String>,
    /// One label per document, if the source has them.
    pub labels: Option<Vec<u32>>,
    /// Label names, indexed by label.
    pub classes: Vec<String>,
    /// The split each document belongs to, where the source says (a `split`
    /// field or column).
    pub splits: Option<Vec<Split>>,
}

/// The split a record belongs to, as a dataset's own `split` field names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training data (`train`, `training`).
    Train,
    /// Validation data (`validation`, `valid`, `val`, `dev`).
    Validation,
    /// Test data (`test`, `testing`).
    Test,
}

impl Split {
    /// Parses the usual names of splits (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Some(Self::Train),
            "validation" | "valid" | "val" | "dev" => Some(Self::Validation),
            "test" | "testing" => Some(Self::Test),
            _ => None,
        }
    }
}

impl TextDataset {
    /// Number of documents.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether there are no documents.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// A new corpus holding the documents at `indices`.
    pub fn select(&self, indices: &[usize]) -> TextDataset {
        TextDataset {
            docs: indices.iter().map(|&i| self.docs[i].clone()).collect(),
            labels: self.labels.as_ref().map(|l| indices.iter().map(|&i| l[i]).collect()),
            classes: self.classes.clone(),
            splits: self.splits.as_ref().map(|s| indices.iter().map(|&i| s[i]).collect()),
        }
    }
}

/// The Fashion-MNIST class names, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The CIFAR-10 class names, by label.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
