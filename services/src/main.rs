//! `bulkhead-example-service`: runs the palette or payments example service
//! against a Bulkhead host's JWKS. The binary's edge: the only place
//! `anyhow` is used in this crate.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bulkhead_services::{JwksSource, KeyRefresher, ServiceState, palette_router, payments_router};
use bulkhead_verify::{Verifier, VerifierConfig};
use clap::{Parser, ValueEnum};

/// Run an example internal service that accepts only Bulkhead call tokens.
///
/// Each request's verdict is logged (identity and the reason for a refusal,
/// never the token).
#[derive(Debug, Parser)]
#[command(name = "bulkhead-example-service", version)]
struct Args {
    /// Which service to run.
    service: Service,
    /// Address to listen on, e.g. 127.0.0.1:9001.
    #[arg(long)]
    listen: SocketAddr,
    /// The host's JWKS, e.g. http://127.0.0.1:8080/.well-known/jwks.json, or a file written by
    /// `bulkhead jwks` (file:///path/jwks.json) for `bulkhead run`.
    #[arg(long)]
    jwks_url: String,
    /// The issuer the host's tokens carry (`iss`).
    #[arg(long)]
    issuer: String,
    /// The audience to accept (`aud`); defaults to the service's name.
    #[arg(long)]
    audience: Option<String>,
    /// Clock skew tolerated on token times (at most 60s).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    leeway: Duration,
    /// How often to re-fetch the JWKS; a token with an unknown key id also
    /// triggers a fetch, at most once per 10 s.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    refresh: Duration,
    /// How long to keep retrying the first JWKS fetch (the host may still be
    /// starting).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    startup_timeout: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Service {
    Palette,
    Payments,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Self::Palette => "palette",
            Self::Payments => "payments",
        }
    }
}

/// Least time between two key fetches triggered by unknown key ids.
const ON_DEMAND_REFRESH: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let name = args.service.name();
    let config = VerifierConfig {
        issuer: args.issuer,
        audience: args.audience.unwrap_or_else(|| name.to_owned()),
        leeway: args.leeway,
    };
    let source = JwksSource::new(&args.jwks_url)?;
    let jwks = first_fetch(&source, args.startup_timeout).await?;
    let verifier = Arc::new(Verifier::new(config, &jwks).context("the host's key set")?);
    tracing::info!(
        service = name,
        issuer = %verifier.config().issuer,
        audience = %verifier.config().audience,
        keys = ?verifier.key_ids(),
        "keys loaded",
    );

    let refresher = Arc::new(KeyRefresher::new(
        source,
        Arc::clone(&verifier),
        ON_DEMAND_REFRESH,
    ));
    let _periodic = refresher.spawn_periodic(args.refresh);
    let state = ServiceState::new(verifier).with_refresher(refresher);
    let app = match args.service {
        Service::Palette => palette_router(state),
        Service::Payments => payments_router(state),
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(service = name, listen = %listener.local_addr()?, "listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")?;
    Ok(())
}

/// Fetches the key set, retrying every second for up to `timeout`.
async fn first_fetch(
    source: &JwksSource,
    timeout: Duration,
) -> anyhow::Result<bulkhead_verify::JwkSet> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match source.fetch().await {
            Ok(jwks) => return Ok(jwks),
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %error, "JWKS not available yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error).context("loading the host's key set"),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
