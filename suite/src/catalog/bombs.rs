//! The bundled generated-module attacks.

use crate::model::{Attack, AttackKind, Bomb, Class};

fn bomb(id: &str, class: Class, title: &str, b: Bomb) -> Attack {
    Attack {
        id: id.to_owned(),
        class,
        title: title.to_owned(),
        source: "bundled".to_owned(),
        kind: AttackKind::Bomb(b),
    }
}

/// The bundled generated-module attacks.
pub fn catalog() -> Vec<Attack> {
    use Class::{Exhaustion, Lateral};
    vec![
        bomb(
            "exhaust.oversized-module",
            Exhaustion,
            "hand the host a module one byte over its size limit",
            Bomb::Oversized,
        ),
        bomb(
            "exhaust.core-module",
            Exhaustion,
            "hand the host a core module instead of a component",
            Bomb::CoreModule,
        ),
        bomb(
            "exhaust.truncated-module",
            Exhaustion,
            "a component whose section claims to run past the end of the file",
            Bomb::Truncated,
        ),
        bomb(
            "exhaust.start-loop",
            Exhaustion,
            "a start function that loops forever during instantiation",
            Bomb::StartLoop,
        ),
        bomb(
            "exhaust.huge-initial-memory",
            Exhaustion,
            "declare a 1 GiB initial memory",
            Bomb::HugeMemory,
        ),
        bomb(
            "exhaust.many-memories",
            Exhaustion,
            "declare eight memories in one module",
            Bomb::ManyMemories,
        ),
        bomb(
            "exhaust.huge-table",
            Exhaustion,
            "declare a table of a million elements",
            Bomb::HugeTable,
        ),
        bomb(
            "exhaust.data-segment",
            Exhaustion,
            "a 32 MiB data segment into a one-page memory",
            Bomb::DataSegment,
        ),
        bomb(
            "exhaust.many-instances",
            Exhaustion,
            "forty core instances in one component",
            Bomb::ManyInstances,
        ),
        bomb(
            "exhaust.compile-many-functions",
            Exhaustion,
            "ten thousand functions to compile",
            Bomb::ManyFunctions,
        ),
        bomb(
            "exhaust.compile-deep-nesting",
            Exhaustion,
            "one function of 20,000 nested blocks",
            Bomb::DeepNesting,
        ),
        bomb(
            "exhaust.compile-many-locals",
            Exhaustion,
            "functions with 50,000 live locals each (register pressure)",
            Bomb::ManyLocals,
        ),
        bomb(
            "exhaust.compile-br-table",
            Exhaustion,
            "a br_table with 60,000 targets",
            Bomb::HugeBrTable,
        ),
        bomb(
            "lateral.ungranted-import",
            Lateral,
            "import a host interface no policy grants (`bulkhead:host/secrets`)",
            Bomb::UngrantedImport,
        ),
        bomb(
            "lateral.future-wasi",
            Lateral,
            "import an incompatible future WASI version (`wasi:cli/environment@0.3.0`)",
            Bomb::FutureWasi,
        ),
    ]
}
