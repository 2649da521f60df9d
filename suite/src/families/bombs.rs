//! Modules built to attack compilation and instantiation, generated here
//! with `wasm-encoder` rather than shipped: oversized uploads, core modules
//! and truncated binaries, start functions that never return, huge initial
//! memories and tables, many memories and instances, large data segments,
//! and code shaped to be expensive to compile. Each is a component
//! exporting `wasi:cli/run` where that matters, so the host has to deal
//! with it rather than refuse it for its kind.
//!
//! Held means: refused at load with a reason, or loaded within
//! [`COMPILE_BOUND`] and bounded host memory and then stopped by a limit
//! at instantiation or run time, with a concurrent job unharmed.

use std::time::{Duration, Instant};

use wasm_encoder::{
    Alias, BlockType, CanonicalFunctionSection, CodeSection, Component, ComponentAliasSection,
    ComponentExportKind, ComponentExportSection, ComponentImportSection, ComponentInstanceSection,
    ComponentTypeRef, ComponentTypeSection, ConstExpr, DataSection, ExportKind, ExportSection,
    Function, FunctionSection, InstanceSection, InstanceType, MemorySection, MemoryType, Module,
    ModuleArg, ModuleSection, PrimitiveValType, RefType, StartSection, TableSection, TableType,
    TypeSection, ValType,
};

use crate::harness::evidence::Sampler;
use crate::harness::observe::run_loaded;
use crate::harness::{self, Harness};
use crate::model::{Attack, AttackResult, Bomb, Check, Verdict, module_name, ms};
use bulkhead::policy::ByteSize;
use bulkhead::sandbox::{JobReport, LimitKind};

/// Longest a module may take to compile before the suite calls it a stall.
pub const COMPILE_BOUND: Duration = Duration::from_secs(60);
/// Most the host's resident memory may grow while compiling one module.
const COMPILE_RSS_BOUND: u64 = 1024 * 1024 * 1024;

/// A core module with a `run` export returning 0, customised by `f`.
struct CoreParts {
    types: TypeSection,
    funcs: FunctionSection,
    code: CodeSection,
    memories: MemorySection,
    tables: TableSection,
    start: Option<u32>,
    data: DataSection,
}

impl CoreParts {
    /// Type 0 is `() -> i32`, function 0 is `run` (returns 0: `ok`).
    fn new() -> Self {
        let mut types = TypeSection::new();
        types.ty().function([], [ValType::I32]);
        types.ty().function([], []);
        let mut funcs = FunctionSection::new();
        funcs.function(0);
        let mut code = CodeSection::new();
        let mut run = Function::new([]);
        run.instructions().i32_const(0).end();
        code.function(&run);
        Self {
            types,
            funcs,
            code,
            memories: MemorySection::new(),
            tables: TableSection::new(),
            start: None,
            data: DataSection::new(),
        }
    }

    /// Adds a function of type `ty` with `body`, returning its index.
    fn add(&mut self, ty: u32, body: &Function) -> u32 {
        let index = self.funcs.len();
        self.funcs.function(ty);
        self.code.function(body);
        index
    }

    fn module(&self) -> Module {
        let mut m = Module::new();
        m.section(&self.types);
        m.section(&self.funcs);
        if !self.tables.is_empty() {
            m.section(&self.tables);
        }
        if !self.memories.is_empty() {
            m.section(&self.memories);
        }
        let mut exports = ExportSection::new();
        exports.export("run", ExportKind::Func, 0);
        m.section(&exports);
        if let Some(start) = self.start {
            m.section(&StartSection {
                function_index: start,
            });
        }
        m.section(&self.code);
        if !self.data.is_empty() {
            m.section(&self.data);
        }
        m
    }
}

/// Wraps `core` in a component exporting `wasi:cli/run@0.2.0` whose `run`
/// is the module's `run`, instantiating the module `instances` times, with
/// `imports` (name, instance type) declared first.
fn component(core: &Module, instances: u32, imports: &[(&str, InstanceType)]) -> Vec<u8> {
    let mut c = Component::new();
    let mut types = ComponentTypeSection::new();
    for (_, ty) in imports {
        types.instance(ty);
    }
    if !imports.is_empty() {
        c.section(&types);
        let mut section = ComponentImportSection::new();
        for (i, (name, _)) in imports.iter().enumerate() {
            section.import(*name, ComponentTypeRef::Instance(i as u32));
        }
        c.section(&section);
    }
    let type_base = imports.len() as u32;
    c.section(&ModuleSection(core));
    let mut inst = InstanceSection::new();
    for _ in 0..instances.max(1) {
        inst.instantiate(0, Vec::<(&str, ModuleArg)>::new());
    }
    c.section(&inst);
    let mut aliases = ComponentAliasSection::new();
    aliases.alias(Alias::CoreInstanceExport {
        instance: 0,
        kind: ExportKind::Func,
        name: "run",
    });
    c.section(&aliases);
    let mut types = ComponentTypeSection::new();
    types.defined_type().result(None, None);
    types
        .function()
        .params(Vec::<(&str, wasm_encoder::ComponentValType)>::new())
        .result(Some(wasm_encoder::ComponentValType::Type(type_base)));
    c.section(&types);
    let mut canon = CanonicalFunctionSection::new();
    canon.lift(0, type_base + 1, []);
    c.section(&canon);
    let mut cinst = ComponentInstanceSection::new();
    cinst.export_items([("run", ComponentExportKind::Func, 0)]);
    c.section(&cinst);
    let mut exports = ComponentExportSection::new();
    exports.export(
        "wasi:cli/run@0.2.0",
        ComponentExportKind::Instance,
        imports.len() as u32,
        None,
    );
    c.section(&exports);
    c.finish()
}

/// The bytes of `bomb`. `max_module_size` sizes [`Bomb::Oversized`].
pub fn build(bomb: Bomb, max_module_size: usize) -> Vec<u8> {
    let mut core = CoreParts::new();
    let mut instances = 1;
    let mut imports = Vec::new();
    match bomb {
        Bomb::Oversized => {
            // The size check comes before anything parses the bytes, so
            // what follows the component's header does not matter.
            let mut bytes = component(&core.module(), 1, &[]);
            bytes.resize(max_module_size + 1, 0);
            return bytes;
        }
        Bomb::CoreModule => return core.module().finish(),
        Bomb::Truncated => {
            let mut bytes = component(&core.module(), 1, &[]);
            // A custom section that claims a gigabyte.
            bytes.extend_from_slice(&[0, 0x80, 0x80, 0x80, 0x80, 0x04, 1, b'x']);
            return bytes;
        }
        Bomb::StartLoop => {
            let mut f = Function::new([]);
            f.instructions().loop_(BlockType::Empty).br(0).end().end();
            core.start = Some(core.add(1, &f));
        }
        Bomb::HugeMemory => {
            core.memories.memory(memory(16384, None));
        }
        Bomb::ManyMemories => {
            for _ in 0..8 {
                core.memories.memory(memory(1, Some(1)));
            }
        }
        Bomb::HugeTable => {
            core.tables.table(TableType {
                element_type: RefType::FUNCREF,
                table64: false,
                minimum: 1_000_000,
                maximum: None,
                shared: false,
            });
        }
        Bomb::DataSegment => {
            core.memories.memory(memory(1, Some(1)));
            core.data
                .active(0, &ConstExpr::i32_const(0), vec![0xAB; 32 * 1024 * 1024]);
        }
        Bomb::ManyInstances => instances = 40,
        Bomb::ManyFunctions => {
            for i in 0..10_000 {
                let mut f = Function::new([(4, ValType::I64)]);
                let mut s = f.instructions();
                for j in 0..24i64 {
                    s.local_get((j % 4) as u32)
                        .i64_const(i * 31 + j)
                        .i64_mul()
                        .local_set(((j + 1) % 4) as u32);
                }
                s.end();
                core.add(1, &f);
            }
        }
        Bomb::DeepNesting => {
            let mut f = Function::new([]);
            let mut s = f.instructions();
            for _ in 0..20_000 {
                s.block(BlockType::Empty);
            }
            for _ in 0..20_000 {
                s.end();
            }
            s.end();
            core.add(1, &f);
        }
        Bomb::ManyLocals => {
            for _ in 0..4 {
                let n = 50_000u32 - 8;
                let mut f = Function::new([(n, ValType::I64)]);
                let mut s = f.instructions();
                // Write every local, then read them all back: all live at
                // once across the function.
                for l in (0..n).step_by(7) {
                    s.i64_const(i64::from(l)).local_set(l);
                }
                s.i64_const(0);
                for l in (0..n).step_by(7) {
                    s.local_get(l).i64_add();
                }
                s.drop().end();
                core.add(1, &f);
            }
        }
        Bomb::HugeBrTable => {
            let mut f = Function::new([]);
            let mut s = f.instructions();
            s.block(BlockType::Empty)
                .i32_const(0)
                .br_table(std::iter::repeat_n(0u32, 60_000), 0)
                .end()
                .end();
            core.add(1, &f);
        }
        Bomb::UngrantedImport | Bomb::FutureWasi => {
            let mut ty = InstanceType::new();
            ty.ty()
                .function()
                .params(Vec::<(&str, wasm_encoder::ComponentValType)>::new())
                .result(Some(wasm_encoder::ComponentValType::Primitive(
                    PrimitiveValType::U32,
                )));
            let (name, func) = match bomb {
                Bomb::UngrantedImport => ("bulkhead:host/secrets@1.0.0", "get-secret"),
                _ => ("wasi:cli/environment@0.3.0", "get-environment-count"),
            };
            ty.export(func, ComponentTypeRef::Func(0));
            imports.push((name, ty));
        }
    }
    component(&core.module(), instances, &imports)
}

fn memory(minimum: u64, maximum: Option<u64>) -> MemoryType {
    MemoryType {
        minimum,
        maximum,
        memory64: false,
        shared: false,
        page_size_log2: None,
    }
}

/// Loads (and, if it loads, runs) one generated module locally.
pub async fn run_local(
    h: &Harness,
    attack: &Attack,
    bomb: &Bomb,
    started: Instant,
) -> AttackResult {
    let bytes = build(*bomb, h.fresh.max_module_size);
    let name = module_name(&attack.id);
    let text = h.base.policy_text(&name, &bytes, None, &h.weak_limits);
    // Compiling happens where the lane runs guests: its workers' memory
    // counts as the host's.
    let sampler = Sampler::start_with(Some(h.fresh.pids()));
    let load_started = Instant::now();
    let loaded = match harness::parse(&text) {
        Ok(policy) => h.fresh.load(policy, &bytes).await,
        Err(e) => Err(e),
    };
    let load_time = load_started.elapsed();
    let peaks = sampler.stop();
    let rss_growth = peaks.rss_peak.saturating_sub(peaks.rss_before);
    let mut checks = vec![Check::new(
        "compile",
        !peaks.blind && load_time <= COMPILE_BOUND && rss_growth <= COMPILE_RSS_BOUND,
        format!(
            "{} module {} in {:.0} ms (bound {} s); host resident memory grew {} (bound {})",
            ByteSize::bytes(bytes.len() as u64),
            if loaded.is_ok() { "loaded" } else { "refused" },
            load_time.as_secs_f64() * 1000.0,
            COMPILE_BOUND.as_secs(),
            ByteSize::bytes(rss_growth),
            ByteSize::bytes(COMPILE_RSS_BOUND)
        ),
    )];
    let module = match loaded {
        Err(e) => {
            // Refused: the host must still serve a job right after.
            checks.push(neighbour_check(h).await);
            let mut touched = h.canary.touched();
            touched.extend(h.bait.touched());
            checks.push(Check::new(
                "canary",
                touched.is_empty(),
                if touched.is_empty() {
                    "canaries and bait untouched".to_owned()
                } else {
                    touched.join("; ")
                },
            ));
            return AttackResult::judge(
                attack,
                checks,
                format!("refused at load: {e}"),
                None,
                ms(started),
            );
        }
        Ok(m) => m,
    };
    // Loaded: it must then be stopped at instantiation or run.
    let mut result = run_loaded(h, &h.fresh, attack, &module, started).await;
    let expect_limit = matches!(bomb, Bomb::StartLoop | Bomb::HugeMemory | Bomb::HugeTable);
    if let Some(report) = result.1.as_ref() {
        if expect_limit {
            let ok = report.limit.is_some() || report.failure.is_some();
            checks.push(Check::new(
                "outcome",
                ok,
                if ok {
                    describe(report)
                } else {
                    "instantiated and ran to completion".to_owned()
                },
            ));
        } else if matches!(
            bomb,
            Bomb::ManyMemories | Bomb::ManyInstances | Bomb::DataSegment
        ) {
            let ok = !report.succeeded();
            checks.push(Check::new("outcome", ok, describe(report)));
        } else {
            checks.push(Check::new("outcome", true, describe(report)));
        }
    }
    if let Some(report) = result.1.as_ref()
        && report.limit.is_none()
        && report.failure.is_none()
    {
        result.0.stopped_by = format!(
            "compiled in {:.0} ms, ran harmlessly",
            load_time.as_secs_f64() * 1000.0
        );
    }
    checks.append(&mut result.0.checks);
    result.0.checks = checks;
    result.0.verdict = if result.0.checks.iter().all(|c| c.passed) {
        result.0.verdict
    } else if result.0.verdict == Verdict::Error {
        Verdict::Error
    } else {
        Verdict::Breached
    };
    result.0
}

fn describe(report: &JobReport) -> String {
    match (&report.limit, &report.failure) {
        (Some(LimitKind::CpuTime), _) => {
            "stopped at instantiation by the cpu_time limit".to_owned()
        }
        (Some(l), _) => format!("stopped by the {l} limit"),
        (None, Some(f)) => format!("failed cleanly: {}", f.message),
        (None, None) => "ran and exited 0".to_owned(),
    }
}

async fn neighbour_check(h: &Harness) -> Check {
    let job = bulkhead::sandbox::JobSpec::new();
    match h
        .fresh
        .run(&h.fresh.neighbour, &job)
        .await
        .map(|f| f.report)
    {
        Ok(r) if r.succeeded() => {
            Check::new("neighbour", true, "a hello job right after succeeded")
        }
        Ok(r) => Check::new(
            "neighbour",
            false,
            format!("a hello job right after failed: {:?}", r.failure),
        ),
        Err(e) => Check::new(
            "neighbour",
            false,
            format!("a hello job right after was refused: {e}"),
        ),
    }
}
