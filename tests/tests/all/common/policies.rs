//! Test policies built from typed values: [`policy`] pins a built guest by
//! its digest and every other section starts at its default; the builder's
//! methods fill in the rest with the library's own types, and [`TestPolicy::text`]
//! is the TOML the library serializes from them. The presets below are the
//! policies the service tests serve.
//!
//! Self-contained (no `crate::` paths), so the benches can include it too.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bulkhead::policy::{
    Access, ByteSize, HumanDuration, Limits, ModuleName, ModuleSection, Network, POLICY_VERSION,
    ParamName, Policy, Run, Scope, ServiceName, Sha256Hex, Zone,
};

/// A policy under construction; see [`policy`].
#[derive(Clone, Debug)]
pub struct TestPolicy(Policy);

/// A policy for module `name`, pinned to the guest built at `guest`: no
/// scopes, default limits, no arguments, parameters or services.
pub fn policy(guest: &str, name: &str) -> TestPolicy {
    let wasm = std::fs::read(guest).unwrap_or_else(|e| panic!("reading guest {guest}: {e}"));
    TestPolicy(Policy {
        version: POLICY_VERSION,
        module: ModuleSection {
            name: ModuleName::new(name).unwrap(),
            sha256: Sha256Hex::digest(&wasm),
            zone: Zone::Untrusted,
            signed_by: Vec::new(),
        },
        access: Access::default(),
        limits: Limits::default(),
        run: Run::default(),
        network: Network::default(),
        source_sha256: None,
    })
}

impl TestPolicy {
    /// `[access] scopes`.
    pub fn scopes(mut self, scopes: &[&str]) -> Self {
        self.0.access.scopes = scopes.iter().map(|s| Scope::new(*s).unwrap()).collect();
        self
    }

    /// `[limits]`, changed by `f` from the defaults.
    pub fn limits(mut self, f: impl FnOnce(&mut Limits)) -> Self {
        f(&mut self.0.limits);
        self
    }

    /// `[module] zone`.
    pub fn zone(mut self, zone: Zone) -> Self {
        self.0.module.zone = zone;
        self
    }

    /// `[limits] memory`.
    pub fn memory(self, memory: ByteSize) -> Self {
        self.limits(|l| l.memory = memory)
    }

    /// `[limits] cpu_time` and `wall_time`.
    pub fn times(self, cpu: HumanDuration, wall: HumanDuration) -> Self {
        self.limits(|l| {
            l.cpu_time = cpu;
            l.wall_time = wall;
        })
    }

    /// `[run] args`.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.0.run.args = args.iter().map(|a| (*a).into()).collect();
        self
    }

    /// `[run] args` as entries: strings and groups
    /// ([`bulkhead::policy::ArgEntry`]).
    pub fn arg_entries(mut self, args: Vec<bulkhead::policy::ArgEntry>) -> Self {
        self.0.run.args = args;
        self
    }

    /// `[run] stdout`: keep stdout as `/out/<name>`.
    pub fn stdout_file(mut self, name: &str) -> Self {
        self.0.run.stdout = Some(name.to_owned());
        self
    }

    /// `[run] params`.
    pub fn params(mut self, params: &[&str]) -> Self {
        self.0.run.params = params.iter().map(|p| ParamName::new(*p).unwrap()).collect();
        self
    }

    /// `[run] env`.
    pub fn env(mut self, env: &[(&str, &str)]) -> Self {
        self.0.run.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self
    }

    /// `[network] services`.
    pub fn services(mut self, services: &[&str]) -> Self {
        self.0.network.services = services
            .iter()
            .map(|s| ServiceName::new(*s).unwrap())
            .collect();
        self
    }

    /// Requires a signature by one of `keys` (names in `[trust.keys]`).
    pub fn signed_by(mut self, keys: &[&str]) -> Self {
        self.0.module.signed_by = keys.iter().map(|k| (*k).to_owned()).collect();
        self
    }

    /// The module's name.
    pub fn name(&self) -> &str {
        self.0.module.name.as_str()
    }

    /// The policy as TOML, as a policy file holds it.
    pub fn text(&self) -> String {
        toml::to_string(&self.0).unwrap()
    }

    /// The policy as the host reads it: [`Self::text`] parsed and
    /// validated for a host declaring `declared`.
    pub fn parse_with(&self, declared: &[ServiceName]) -> Policy {
        let text = self.text();
        Policy::parse_with(&text, Path::new("test.toml"), declared)
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// [`Self::parse_with`] for a host declaring no services.
    pub fn parse(&self) -> Policy {
        self.parse_with(&[])
    }

    /// Writes the policy to `<dir>/<name>.toml`; returns that path.
    pub fn write_to(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(format!("{}.toml", self.name()));
        std::fs::write(&path, self.text()).unwrap();
        path
    }
}

/// `hello`, for tokens with `hello:run`.
pub fn hello() -> TestPolicy {
    policy(bulkhead_tests::HELLO, "hello").scopes(&["hello:run"])
}

/// The thumbnailer for tokens with `thumbnail:run`, with room for real
/// images: 256 MiB, `cpu` and `wall` time, and the parameters `params`.
pub fn thumbnail(cpu: u64, wall: u64, params: &[&str]) -> TestPolicy {
    policy(bulkhead_tests::THUMBNAIL, "thumbnail")
        .scopes(&["thumbnail:run"])
        .memory(ByteSize::mib(256))
        .times(HumanDuration::secs(cpu), HumanDuration::secs(wall))
        .params(params)
}

/// The hostile guest sleeping until its wall-time limit of `ms`, for
/// tokens with `hostile:run`.
pub fn sleeper(ms: u64) -> TestPolicy {
    policy(bulkhead_tests::HOSTILE, "hostile")
        .scopes(&["hostile:run"])
        .times(HumanDuration::millis(ms), HumanDuration::millis(ms))
        .args(&["sleep"])
}
