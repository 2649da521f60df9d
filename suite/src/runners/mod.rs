//! The runners: which attacks run, and where (locally or against a service).

pub mod local;
pub mod remote;

use crate::catalog;
use crate::families::custom;
use crate::model::{Attack, NotRun, SuiteError, SuiteOptions};

/// Selects the attacks `options` ask for: the bundled catalog plus the
/// tester's, filtered by `only`.
///
/// # Errors
/// [`SuiteError::Setup`] for a bad custom manifest, or when nothing matches.
pub fn select(options: &SuiteOptions) -> Result<Vec<Attack>, SuiteError> {
    Ok(select_split(options)?.0)
}

/// As [`select`], also returning the attacks left out because they run
/// only locally (when `options.server` is set).
pub(crate) fn select_split(
    options: &SuiteOptions,
) -> Result<(Vec<Attack>, Vec<NotRun>), SuiteError> {
    let mut attacks = catalog::bundled();
    if let Some(dir) = &options.guests {
        attacks.extend(custom::load_dir(dir)?);
    }
    if let Some(only) = &options.only {
        attacks
            .retain(|a| a.id.contains(only.as_str()) || a.class.as_str().contains(only.as_str()));
    }
    let mut not_run = Vec::new();
    if options.server.is_some() {
        attacks.retain(|a| match a.local_only() {
            None => true,
            Some(reason) => {
                not_run.push(NotRun {
                    id: a.id.clone(),
                    class: a.class,
                    reason: format!("runs only locally: {reason}"),
                });
                false
            }
        });
    }
    if attacks.is_empty() {
        return Err(SuiteError::Setup(format!(
            "no attack matches `{}`",
            options.only.as_deref().unwrap_or("")
        )));
    }
    Ok((attacks, not_run))
}
