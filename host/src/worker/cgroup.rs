//! A worker's memory ceiling (placeholder: no ceiling until written).

/// A per-worker memory cgroup.
#[derive(Debug)]
pub struct MemoryCeiling;

impl MemoryCeiling {
    /// Creates one named `name` limited to `bytes`.
    ///
    /// # Errors
    /// Why the host offers none.
    pub fn create(_name: &str, _bytes: u64) -> Result<Self, String> {
        Err("memory ceilings are not written yet".into())
    }

    /// Puts `pid` under it.
    ///
    /// # Errors
    /// Why not.
    pub fn add(&self, _pid: u32) -> Result<(), String> {
        Ok(())
    }

    /// Whether the kernel killed a process in it for memory.
    pub fn oom_killed(&self) -> bool {
        false
    }
}
