//! What the CPU can do, as the kernels see it: its model and the
//! instruction-set flags that select kernels. Benchmarks print it and every
//! run records it in `trainer.json`, so a speed figure names its machine.

use serde::{Deserialize, Serialize};

/// The flags that select kernels, in the names `/proc/cpuinfo` uses.
pub const KERNEL_FLAGS: [&str; 6] = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"];

/// The CPU a process runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// The model name (`/proc/cpuinfo`'s `model name`; `unknown` elsewhere).
    pub model: String,
    /// Which of [`KERNEL_FLAGS`] it has.
    pub flags: Vec<String>,
    /// Logical cores available to this process.
    pub threads: usize,
}

impl CpuInfo {
    /// The CPU this process runs on.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let mut info = Self::from_cpuinfo(&cpuinfo);
        if info.flags.is_empty() {
            info.flags = detected_flags();
        }
        info.threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        info
    }

    /// The CPU this process runs on, detected once.
    pub fn current() -> &'static Self {
        static CURRENT: std::sync::OnceLock<CpuInfo> = std::sync::OnceLock::new();
        CURRENT.get_or_init(Self::detect)
    }

    /// The model and kernel flags of the first processor in a
    /// `/proc/cpuinfo` text.
    pub fn from_cpuinfo(text: &str) -> Self {
        let field = |name: &str| {
            text.lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let present: Vec<String> = field("flags").map_or_else(Vec::new, |f| {
            let have: Vec<&str> = f.split_whitespace().collect();
            KERNEL_FLAGS
                .iter()
                .filter(|k| have.contains(k))
                .map(|k| k.to_string())
                .collect()
        });
        Self {
            model: field("model name").unwrap_or_else(|| "unknown".into()),
            flags: present,
            threads: 1,
        }
    }

    /// Whether it has `flag` (one of [`KERNEL_FLAGS`]).
    pub fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// The line benchmarks print: `CPU: <model>, <n> threads; flags: avx2 fma avx512f …`.
    pub fn line(&self) -> String {
        let flags = if self.flags.is_empty() {
            "none of the kernel flags".to_string()
        } else {
            self.flags.join(" ")
        };
        format!("CPU: {}, {} threads; flags: {flags}", self.model, self.threads)
    }
}

/// The kernel flags the standard library detects (where `/proc/cpuinfo` is absent).
fn detected_flags() -> Vec<String> {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        let mut f = Vec::new();
        if std::arch::is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            f.push("fma");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            f.push("avx512_bf16");
        }
        f.into_iter().map(String::from).collect()
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_and_kernel_flags_come_from_cpuinfo() {
        let text = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse avx2 fma avx512f avx512bw avx512_bf16 amx_tile\n\nprocessor\t: 1\nmodel name\t: Other\n";
        let c = CpuInfo::from_cpuinfo(text);
        assert_eq!(c.model, "Intel(R) Xeon(R) Processor");
        assert_eq!(c.flags, ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]);
        assert!(c.has("avx512f") && !c.has("amx_bf16"));
        let none = CpuInfo::from_cpuinfo("model name: M\nflags: sse sse2\n");
        assert!(none.flags.is_empty());
        assert!(none.line().contains("none of the kernel flags"), "{}", none.line());
        assert_eq!(CpuInfo::from_cpuinfo("").model, "unknown");
    }

    #[test]
    fn this_machine_is_detected() {
        let c = CpuInfo::detect();
        assert!(c.threads >= 1);
        assert!(c.line().starts_with("CPU: "));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert!(c.has("avx512f"), "{c:?}");
        }
    }
}
