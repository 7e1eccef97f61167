//! In-memory datasets: images kept as `u8`, texts as strings, labels optional.

/// A set of images of one size, stored as `u8` in HWC order (`h × w × c`
/// bytes per image), with optional labels.
#[derive(Debug, Clone, PartialEq)]
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

/// A corpus of documents with optional labels (e.g. fortune categories).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TextDataset {
    /// The documents.
    pub docs: Vec<String>,
    /// One label per document, if the source has them.
    pub labels: Option<Vec<u32>>,
    /// Label names, indexed by label.
    pub classes: Vec<String>,
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
