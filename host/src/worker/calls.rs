//! Outbound requests over the worker channel (not yet written).
