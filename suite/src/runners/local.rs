//! Running attacks locally: each attack dispatched to its family's runner
//! against one harness.

use std::time::Instant;

use crate::families::{api, artifacts, bombs, forge, guest, http, second_wall, sequence};
use crate::harness::Harness;
use crate::model::{Attack, AttackKind, AttackResult, Progress, SuiteError, SuiteOptions};

/// Runs every attack locally; also says where the guests ran.
pub async fn run(
    options: &SuiteOptions,
    attacks: &[Attack],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(String, Vec<AttackResult>), SuiteError> {
    let h = Harness::new(options).await?;
    let mut api = None;
    let mut results = Vec::new();
    for (index, attack) in attacks.iter().enumerate() {
        progress(Progress::Start {
            index,
            total: attacks.len(),
            id: &attack.id,
        });
        let started = Instant::now();
        let result = match &attack.kind {
            AttackKind::Guest(run) => guest::guest_attack(&h, attack, run, started).await,
            AttackKind::Sequence {
                writer,
                reader,
                readers,
            } => sequence::sequence_attack(&h, attack, writer, reader, *readers, started).await,
            AttackKind::Bomb(bomb) => bombs::run_local(&h, attack, bomb, started).await,
            AttackKind::Http(http) => http::http_attack(&h, attack, http, started).await,
            AttackKind::Dirs(d) => artifacts::run_local(&h, attack, *d, started).await,
            AttackKind::SecondWall(d) => second_wall::run_local(options, attack, *d, started).await,
            AttackKind::Forge(f) => {
                let target = forge::forge_target(&h, *f).await;
                forge::run(&target, attack, *f, started)
            }
            AttackKind::Api(a) => {
                if api.is_none() {
                    api = Some(
                        api::LocalService::start(&h.scratch, options.drill_program.clone()).await,
                    );
                }
                match api.as_ref().expect("just set") {
                    Ok(service) => api::run(&service.target(), attack, a, started).await,
                    Err(e) => AttackResult::judge(
                        attack,
                        Vec::new(),
                        String::new(),
                        Some(format!("cannot start the local service: {e}")),
                        0.0,
                    ),
                }
            }
        };
        progress(Progress::Done(&result));
        results.push(result);
    }
    if let Some(Ok(service)) = api {
        service.stop().await;
    }
    h.close();
    Ok((h.target.clone(), results))
}
