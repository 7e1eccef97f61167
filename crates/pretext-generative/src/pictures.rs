//! Image grids as PNG: reconstructions, samples from the prior, latent
//! interpolations.

use std::io::Cursor;

/// Lays out `n` images `(c, h, w)` with values in [0, 1] (row-major, CHW,
/// concatenated) in rows of `cols`, each pixel drawn `scale`×`scale`, with a
/// 2-pixel grey gutter; returns PNG bytes.
///
/// # Errors
/// Sizes that do not fit, or an encoder failure.
pub fn grid_png(
    pixels: &[f32],
    n: usize,
    (c, h, w): (usize, usize, usize),
    cols: usize,
    scale: usize,
) -> Result<Vec<u8>, String> {
    if n == 0 || cols == 0 || scale == 0 || pixels.len() != n * c * h * w || !(c == 1 || c == 3) {
        return Err(format!(
            "cannot lay out {} values as {n} images of {c}×{h}×{w} in {cols} columns",
            pixels.len()
        ));
    }
    let rows = n.div_ceil(cols);
    let gap = 2;
    let (cw, ch) = (w * scale + gap, h * scale + gap);
    let (width, height) = ((cols * cw + gap) as u32, (rows * ch + gap) as u32);
    let mut img = image::RgbImage::from_pixel(width, height, image::Rgb([128, 128, 128]));
    let per = c * h * w;
    for k in 0..n {
        let (r, col) = (k / cols, k % cols);
        let src = &pixels[k * per..(k + 1) * per];
        for y in 0..h {
            for x in 0..w {
                let v = |ch_i: usize| (src[ch_i * h * w + y * w + x].clamp(0.0, 1.0) * 255.0).round() as u8;
                let px = if c == 1 {
                    let g = v(0);
                    [g, g, g]
                } else {
                    [v(0), v(1), v(2)]
                };
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (xx, yy) = (gap + col * cw + x * scale + dx, gap + r * ch + y * scale + dy);
                        img.put_pixel(xx as u32, yy as u32, image::Rgb(px));
                    }
                }
            }
        }
    }
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| format!("PNG encoding: {e}"))?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_places_each_image_in_its_cell() {
        // three 2×2 gray images: black, white, mid; two columns, scale 3
        let px = [0.0f32, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5];
        let png = grid_png(&px, 3, (1, 2, 2), 2, 3).expect("png");
        let img = image::load_from_memory(&png).expect("decodes").to_rgb8();
        // 2 columns × (2·3 + 2) + 2 = 18 wide; 2 rows → 18 high
        assert_eq!(img.dimensions(), (18, 18));
        assert_eq!(img.get_pixel(2, 2).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(10 + 5, 2 + 5).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(2, 10).0, [128, 128, 128]); // mid gray image (0.5 → 128)
        assert_eq!(img.get_pixel(0, 0).0, [128, 128, 128]); // gutter
        assert!(grid_png(&px, 4, (1, 2, 2), 2, 1).is_err());
    }
}
