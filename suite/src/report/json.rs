//! The report as JSON: [`SuiteReport`] serialized as is, so what a machine
//! reads is exactly what the table and page were drawn from.

use crate::SuiteReport;

/// Pretty-printed JSON.
pub fn render(report: &SuiteReport) -> String {
    serde_json::to_string_pretty(report).expect("a suite report serializes")
}

/// Reads a report back.
///
/// # Errors
/// Invalid JSON or a document of another shape.
pub fn parse(text: &str) -> Result<SuiteReport, serde_json::Error> {
    serde_json::from_str(text)
}
