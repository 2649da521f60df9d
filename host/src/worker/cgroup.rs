//! A worker's memory ceiling (not yet written).
