//! Rendering a [`SuiteReport`](super::SuiteReport): a plain aligned table
//! for terminals ([`table`]), JSON for machines ([`json`]), and a
//! self-contained HTML page for people ([`html`]). Guest-controlled text
//! (stdout excerpts, file names) only ever reaches them escaped.

pub mod html;
pub mod json;
pub mod table;

/// `text` with control characters (terminal escapes, NUL, CR...) shown as
/// `\u{..}` escapes, so guest output cannot drive a terminal or forge lines.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}
