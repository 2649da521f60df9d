//! The `framed` guest: a thumbnail framed in the submitting tenant's brand
//! colour, which it asks the internal `palette` service for.
//!
//! It shows plugin authors the whole of calling a service: one ordinary
//! `wasi:http` request to `http://palette/v1/palette` (see the `http_call`
//! crate). No token, no address: the host knows where `palette` lives,
//! checks that this module's policy names it, and attaches a short-lived
//! token carrying the identity of whoever submitted the job. The service
//! answers with that identity's colour.
//!
//! Input: one image in `/in`. Parameters: `--width=N`, `--height=N`
//! (default 128). Outputs: `/out/thumbnail.png` and `/out/palette.json`
//! (the service's answer). Exit codes: 0 success, 2 bad job, 1 the service
//! call or an output failed.

use std::process::ExitCode;

use bulkhead_guest_thumbnail::{DEFAULT_SIZE, MAX_SIZE, make_thumbnail};

const PALETTE_URL: &str = "http://palette/v1/palette";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, msg)) => {
            eprintln!("framed: {msg}");
            ExitCode::from(code)
        }
    }
}

fn run() -> Result<(), (u8, String)> {
    let (width, height) = parse_params()?;
    let input = only_input()?;
    let bytes = std::fs::read(&input).map_err(|e| (2, format!("cannot read {input}: {e}")))?;

    let answer = http_call::get(PALETTE_URL).map_err(|e| (1, format!("{PALETTE_URL}: {e}")))?;
    if answer.status != 200 {
        return Err((1, format!("{PALETTE_URL} answered {}", answer.status)));
    }
    let palette: serde_json::Value = serde_json::from_slice(&answer.body)
        .map_err(|e| (1, format!("{PALETTE_URL}: not JSON: {e}")))?;
    let colour = palette
        .get("frame")
        .and_then(serde_json::Value::as_str)
        .and_then(parse_colour)
        .ok_or_else(|| (1, format!("{PALETTE_URL}: no `frame` colour")))?;

    let png = make_thumbnail(&bytes, width, height).map_err(|e| (2, e))?;
    let framed = frame(&png, colour).map_err(|e| (1, e))?;
    std::fs::write("/out/thumbnail.png", framed)
        .map_err(|e| (1, format!("cannot write /out/thumbnail.png: {e}")))?;
    std::fs::write("/out/palette.json", &answer.body)
        .map_err(|e| (1, format!("cannot write /out/palette.json: {e}")))?;
    Ok(())
}

/// Paints a border, 1/16 of the shorter side (at least 2 px), in `colour`.
fn frame(png: &[u8], colour: [u8; 3]) -> Result<Vec<u8>, String> {
    let mut img = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .map_err(|e| format!("cannot decode the thumbnail: {e}"))?
        .to_rgba8();
    let (w, h) = img.dimensions();
    let border = (w.min(h) / 16).max(2);
    let [r, g, b] = colour;
    for (x, y, px) in img.enumerate_pixels_mut() {
        if x < border
            || y < border
            || x >= w.saturating_sub(border)
            || y >= h.saturating_sub(border)
        {
            *px = image::Rgba([r, g, b, 255]);
        }
    }
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| format!("cannot encode the framed thumbnail: {e}"))?;
    Ok(out.into_inner())
}

/// `#rrggbb`.
fn parse_colour(s: &str) -> Option<[u8; 3]> {
    let hex = s.strip_prefix('#')?;
    if hex.len() != 6 {
        return None;
    }
    let byte = |i: usize| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok();
    Some([byte(0)?, byte(2)?, byte(4)?])
}

fn parse_params() -> Result<(u32, u32), (u8, String)> {
    let (mut width, mut height) = (DEFAULT_SIZE, DEFAULT_SIZE);
    for arg in std::env::args().skip(1) {
        let Some((name, value)) = arg.strip_prefix("--").and_then(|p| p.split_once('=')) else {
            continue;
        };
        let n = value
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_SIZE).contains(n))
            .ok_or_else(|| (2, format!("--{name} must be 1..={MAX_SIZE}, got {value:?}")))?;
        match name {
            "width" => width = n,
            "height" => height = n,
            _ => return Err((2, format!("unknown parameter --{name}"))),
        }
    }
    Ok((width, height))
}

fn only_input() -> Result<String, (u8, String)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir("/in").map_err(|e| (2, format!("cannot list /in: {e}")))? {
        let entry = entry.map_err(|e| (2, format!("cannot list /in: {e}")))?;
        if entry.path().is_file() {
            files.push(entry.path().display().to_string());
        }
    }
    match files.len() {
        1 => Ok(files.remove(0)),
        n => Err((2, format!("expected one input file in /in, found {n}"))),
    }
}
