//! `bulkhead token issue|list|revoke`, directly on the service's store.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub(crate) struct StoreArgs {
    /// The service's config file, to find its store (its database, or its
    /// data directory).
    #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
    config: Option<PathBuf>,
    /// The service's data directory [default: the config's, or ./data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

impl StoreArgs {
    /// The store the config names (its PostgreSQL database, or the SQLite
    /// file in its data directory), or the SQLite file in `--data-dir`.
    async fn open(&self) -> anyhow::Result<std::sync::Arc<dyn bulkhead::store::JobStore>> {
        let mut storage = match &self.config {
            Some(c) => bulkhead::config::ServeConfig::load(c)?.storage,
            None => bulkhead::config::ServeConfig::default().storage,
        };
        if let Some(d) = &self.data_dir {
            storage.data_dir = d.clone();
        }
        if storage.url.is_none() {
            let dir = &storage.data_dir;
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let shown = match &storage.url {
            Some(url) => format!("database {url}"),
            None => format!("{}", storage.data_dir.join("bulkhead.sqlite").display()),
        };
        storage
            .open_store()
            .await
            .with_context(|| format!("cannot open the store ({shown})"))
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Issue a token; prints the secret once.
    Issue {
        /// Tenant the token's jobs belong to.
        #[arg(long)]
        tenant: String,
        /// Who holds it.
        #[arg(long)]
        subject: String,
        /// A scope (repeatable), e.g. `thumbnail:run`.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Lifetime, e.g. `30 d`; none = no expiry.
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a token by id; takes effect on its next request.
    Revoke {
        /// The token's id (`tok_…`).
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub(crate) async fn token(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Issue {
            tenant,
            subject,
            scopes,
            ttl,
            store,
        } => {
            let store = store.open().await?;
            let request = bulkhead::api::IssueRequest {
                tenant,
                subject,
                scopes,
                ttl,
            };
            let (secret, record) =
                bulkhead::api::new_token(&request).map_err(anyhow::Error::msg)?;
            store.insert_token(&record).await?;
            eprintln!(
                "issued {} for tenant {} ({})",
                record.id,
                record.tenant,
                record.scopes.join(", ")
            );
            println!("{secret}");
        }
        TokenCommand::List { store } => {
            let store = store.open().await?;
            for t in store.list_tokens().await? {
                println!(
                    "{}  tenant={}  subject={}  scopes={}  expires={}  {}",
                    t.id,
                    t.tenant,
                    t.subject,
                    t.scopes.join(","),
                    t.expires_at.map_or("never".to_owned(), |e| e.to_string()),
                    if t.revoked { "REVOKED" } else { "active" }
                );
            }
        }
        TokenCommand::Revoke { id, store } => {
            let store = store.open().await?;
            if !store.revoke_token(&id).await? {
                bail!("no token `{id}`");
            }
            eprintln!("revoked {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
