//! The real processors: a thumbnail of a real image is a valid PNG of the
//! right size; HTML and Markdown come out sanitized.

use std::io::Cursor;

use bulkhead::policy::{ByteSize, HumanDuration};

use crate::common::{TestPolicy, load, policy, run, spec};

/// The thumbnailer with room for real images.
fn thumb_policy() -> TestPolicy {
    policy(bulkhead_tests::THUMBNAIL, "thumbnail")
        .memory(ByteSize::mib(256))
        .times(HumanDuration::secs(5), HumanDuration::secs(20))
        .params(&["width", "height", "input"])
}

/// A synthetic photo-like image (gradients and noise) encoded as `format`.
fn image(width: u32, height: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 251) as u8])
    });
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
    bytes
}

async fn thumbnail_of(input: &[u8], name: &str, w: &str, h: &str) -> image::DynamicImage {
    let module = load(bulkhead_tests::THUMBNAIL, &thumb_policy());
    let job = spec(&[(name, input)], &[("width", w), ("height", h)]);
    let (report, dir) = run(&module, &job).await;
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(report.outputs.len(), 1, "{:?}", report.outputs);
    assert_eq!(report.outputs[0].name, "thumbnail.png");
    let png = std::fs::read(dir.output_dir().join("thumbnail.png")).unwrap();
    assert_eq!(png.len() as u64, report.outputs[0].size);
    assert_eq!(image::guess_format(&png).unwrap(), image::ImageFormat::Png);
    image::load_from_memory(&png).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn png_thumbnail_fits_the_box_and_keeps_the_aspect_ratio() {
    let thumb = thumbnail_of(
        &image(640, 480, image::ImageFormat::Png),
        "photo.png",
        "128",
        "128",
    )
    .await;
    assert_eq!((thumb.width(), thumb.height()), (128, 96));
}

#[tokio::test(flavor = "multi_thread")]
async fn jpeg_input_gives_a_png_thumbnail() {
    let thumb = thumbnail_of(
        &image(300, 600, image::ImageFormat::Jpeg),
        "photo.jpg",
        "100",
        "100",
    )
    .await;
    assert_eq!((thumb.width(), thumb.height()), (50, 100));
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_input_is_a_clean_failure_with_a_message() {
    let module = load(bulkhead_tests::THUMBNAIL, &thumb_policy());
    let (report, _dir) = run(&module, &spec(&[("x.png", b"not an image")], &[])).await;
    assert!(!report.succeeded());
    assert_eq!(report.exit_code, Some(1));
    assert!(!report.stderr.text.is_empty());
    assert!(report.outputs.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn html_and_markdown_come_out_sanitized() {
    let module = load(
        bulkhead_tests::SANITIZE_HTML,
        &policy(bulkhead_tests::SANITIZE_HTML, "sanitize-html")
            .memory(ByteSize::mib(128))
            .params(&["input"]),
    );
    let html = br#"<p onclick="steal()">Hello <b>world</b><script>alert(1)</script><img src=x onerror=alert(2)></p>"#;
    let md = b"# Title\n\n[click](javascript:alert(3)) and <iframe src=evil></iframe> **bold**\n";
    let (report, dir) = run(
        &module,
        &spec(&[("page.html", html), ("notes.md", md)], &[]),
    )
    .await;
    assert!(report.succeeded(), "{report:#?}");
    let page = std::fs::read_to_string(dir.output_dir().join("page.html")).unwrap();
    assert!(page.contains("Hello <b>world</b>"), "{page}");
    for bad in ["<script", "onclick", "onerror", "alert(1)"] {
        assert!(!page.contains(bad), "{bad} survived: {page}");
    }
    let notes = std::fs::read_to_string(dir.output_dir().join("notes.html")).unwrap();
    assert!(
        notes.contains("<h1>Title</h1>") && notes.contains("<strong>bold</strong>"),
        "{notes}"
    );
    for bad in ["javascript:", "<iframe"] {
        assert!(!notes.contains(bad), "{bad} survived: {notes}");
    }
}
