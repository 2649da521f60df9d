//! `bulkhead jwks`: the call-token keys a config's key ring publishes, as
//! the service serves them at `/.well-known/jwks.json`, for an internal
//! service to verify the tokens `bulkhead run` mints (no listener there).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct JwksArgs {
    /// The config whose key ring to publish (`[tokens] signing_key`, else `<data_dir>/keys`, created
    /// if missing).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Write the JWKS to this file (replaced atomically) instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

pub(crate) fn jwks(args: JwksArgs) -> anyhow::Result<ExitCode> {
    let config = bulkhead::config::ServeConfig::load(&args.config)?;
    let keys = config.key_ring()?;
    let text = serde_json::to_string_pretty(&keys.jwks())?;
    match &args.out {
        None => println!("{text}"),
        Some(path) => {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, format!("{text}\n"))
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
