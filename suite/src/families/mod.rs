//! The attack families: how each kind of attack runs and is judged. Each
//! depends only on the model and the harness, never on another family.

pub mod api;
pub mod artifacts;
pub mod bombs;
pub mod custom;
pub mod forge;
pub mod guest;
pub mod http;
pub mod second_wall;
pub mod sequence;
