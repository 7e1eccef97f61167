//! The shipped datasets load, verify and have the documented sizes.

use pretext_data::shipped::{datasets_dir, fashion_mnist, fortunes};

#[test]
fn fashion_mnist_is_complete() -> pretext_data::Result<()> {
    let s = fashion_mnist(&datasets_dir()?)?;
    assert_eq!(
        (s.train.len(), s.train.height, s.train.width, s.train.channels),
        (60_000, 28, 28, 1)
    );
    let test = s.test.expect("test split");
    assert_eq!(test.len(), 10_000);
    let labels = s.train.labels.expect("labels");
    for c in 0..10u32 {
        assert_eq!(labels.iter().filter(|&&l| l == c).count(), 6_000, "class {c}");
    }
    assert_eq!(s.train.classes[9], "Ankle boot");
    Ok(())
}

#[test]
fn fashion_mnist_read_as_a_plain_idx_folder_keeps_its_class_names() -> pretext_data::Result<()> {
    // what `--data datasets/fashion-mnist` (or a copy of its files) reads
    let s = pretext_data::source::load_images(
        &datasets_dir()?.join("fashion-mnist"),
        pretext_data::source::ImageFormat::Auto,
        (28, 28),
        1,
    )?;
    assert_eq!(s.train.classes.len(), 10);
    assert_eq!(s.train.classes[7], "Sneaker");
    assert_eq!(s.test.map(|t| t.classes[0].clone()), Some("T-shirt/top".to_string()));
    Ok(())
}

#[test]
fn fortunes_have_the_probe_categories() -> pretext_data::Result<()> {
    let cats: Vec<String> = [
        "computers",
        "science",
        "politics",
        "love",
        "food",
        "sports",
        "law",
        "medicine",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ds = fortunes(&datasets_dir()?, Some(&cats))?;
    assert_eq!(ds.classes, cats);
    assert!(ds.len() > 3000, "{}", ds.len());
    assert!(ds.docs.iter().all(|d| !d.contains('\u{8}') && !d.trim().is_empty()));
    let all = fortunes(&datasets_dir()?, None)?;
    assert!(all.len() > 14_000, "{}", all.len());
    Ok(())
}
