//! Core of the `thumbnail` guest: decode an image, shrink it to fit a box,
//! encode it as PNG.
//!
//! Kept free of WASI-specific code so the very same function can be compiled
//! for the host and benchmarked natively against the sandboxed run.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat};

/// Default width and height of the bounding box, in pixels.
pub const DEFAULT_SIZE: u32 = 128;

/// Largest accepted width or height; bigger boxes are refused rather than
/// letting a job ask for a huge output buffer.
pub const MAX_SIZE: u32 = 4096;

/// Decodes `bytes` (format guessed from the content), scales the image down
/// to fit inside `width`×`height` keeping its aspect ratio, and returns it
/// encoded as PNG.
///
/// Images that already fit are not enlarged: a thumbnail never has more
/// pixels than its source. Errors are short lowercase messages meant to be
/// printed as they are.
pub fn make_thumbnail(bytes: &[u8], width: u32, height: u32) -> Result<Vec<u8>, String> {
    for (name, value) in [("width", width), ("height", height)] {
        if !(1..=MAX_SIZE).contains(&value) {
            return Err(format!(
                "{name} must be between 1 and {MAX_SIZE}, got {value}"
            ));
        }
    }
    let img = image::load_from_memory(bytes).map_err(|e| {
        format!(
            "cannot decode image: {}",
            one_lowercase_line(&e.to_string())
        )
    })?;

    let img = if img.width() > width || img.height() > height {
        // `thumbnail` keeps the aspect ratio and uses a fast area-averaging
        // filter, which is both quick and alias-free when shrinking.
        img.thumbnail(width, height)
    } else {
        img
    };

    // PNG cannot hold every pixel type `image` decodes to (e.g. 32-bit
    // float); 8 bits per channel is plenty for a thumbnail and keeps the
    // output small.
    let img = if img.color().has_alpha() {
        DynamicImage::ImageRgba8(img.to_rgba8())
    } else {
        DynamicImage::ImageRgb8(img.to_rgb8())
    };

    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)
        .map_err(|e| format!("cannot encode png: {}", one_lowercase_line(&e.to_string())))?;
    Ok(out.into_inner())
}

/// Library errors are capitalised sentences, sometimes multi-line; the guest
/// contract is one lowercase line on stderr.
fn one_lowercase_line(msg: &str) -> String {
    let mut line: String = msg.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(first) = line.chars().next() {
        let lower: String = first.to_lowercase().collect();
        line.replace_range(..first.len_utf8(), &lower);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GenericImageView, RgbImage};

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([x as u8, y as u8, 7])
        }));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn shrinks_keeping_aspect_ratio() {
        let thumb = make_thumbnail(&png(400, 200), 100, 100).unwrap();
        let img = image::load_from_memory(&thumb).unwrap();
        assert_eq!(img.dimensions(), (100, 50));
    }

    #[test]
    fn does_not_enlarge() {
        let thumb = make_thumbnail(&png(10, 20), 128, 128).unwrap();
        let img = image::load_from_memory(&thumb).unwrap();
        assert_eq!(img.dimensions(), (10, 20));
    }

    #[test]
    fn rejects_garbage_and_bad_sizes() {
        assert!(
            make_thumbnail(b"not an image", 10, 10)
                .unwrap_err()
                .starts_with("cannot decode image: ")
        );
        assert!(make_thumbnail(&png(4, 4), 0, 10).is_err());
        assert!(make_thumbnail(&png(4, 4), 10, 4097).is_err());
    }
}
