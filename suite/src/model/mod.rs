//! The leaf of the suite: what an attack is, what a result is, and the
//! options and events around a run, as data. Nothing here depends on the
//! rest of the crate; everything else depends on it.
//!
//! - `result`: classes, checks, verdicts and the rules that judge them.
//! - `attack`: attacks, their kinds, guest runs and expectations, the
//!   embedded guests.
//! - `families`: the descriptor of each attack family.
//! - `services`: the bait services the lateral attacks are judged against.
//! - `options`: options, errors, progress and left-out attacks.
//! - `drill`: the second-wall drill's attacks and what it says on its
//!   channel.

mod attack;
pub mod drill;
mod families;
mod options;
mod result;
pub mod services;

pub use attack::{
    Attack, AttackKind, BUNDLED, Expect, GuestRun, HttpAttack, INPUT, Param, hello_wasm,
    hostile_wasm, lateral, lateral_wasm, module_name,
};
pub use drill::{DrillAttack, DrillLine, DrillOrder};
pub use families::{ApiAttack, Bomb, DirAttack, Forgery, HttpHeld};
pub use options::{NotRun, Progress, SUITE_SCOPE, SuiteError, SuiteOptions, Weakening};
pub use result::{AttackResult, Check, Class, Verdict, attempt_evidence, ms};
