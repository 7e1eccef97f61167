//! What the CPU can do, as the kernels see it: its model and the
//! instruction-set flags that select kernels. Benchmarks print it and every
//! run records it in `trainer.json`, so a speed figure names its machine.
//!
//! It also chooses, once per process, which family of f32 kernels the
//! matrix products use ([`KernelSet`]): the widest the CPU has, or a narrower
//! one named by the `PRETEXT_KERNELS` environment variable.

use serde::{Deserialize, Serialize};

use crate::setting::InvalidSetting;

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
    /// The f32 kernels this process's products use (absent in records
    /// written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernels: Option<KernelSet>,
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
        info.kernels = Some(KernelSet::current());
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
            kernels: None,
        }
    }

    /// Whether it has `flag` (one of [`KERNEL_FLAGS`]).
    pub fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// The line benchmarks print:
    /// `CPU: <model>, <n> threads; flags: avx2 fma avx512f …; f32 kernels: avx512`.
    pub fn line(&self) -> String {
        let flags = if self.flags.is_empty() {
            "none of the kernel flags".to_string()
        } else {
            self.flags.join(" ")
        };
        let kernels = self
            .kernels
            .map_or(String::new(), |k| format!("; f32 kernels: {}", k.name()));
        format!("CPU: {}, {} threads; flags: {flags}{kernels}", self.model, self.threads)
    }
}

/// The environment variable that narrows the kernels a process uses:
/// `auto` (the default: the widest this CPU has), `avx512`, `avx2` or `portable`.
pub const KERNELS_ENV: &str = "PRETEXT_KERNELS";

/// Runs `f` on a worker of rayon's global pool and returns its result
/// (directly, where the calling thread is one already). The kernels' parallel
/// loops started from outside the pool hand their work to it and put the
/// calling thread to sleep until it is done — two thread wake-ups per loop;
/// started from a worker, the worker takes part in the loop instead. A
/// training step runs hundreds of such loops: on the AMD EPYC of 2026-12-05
/// (2 vCPUs) the conv VAE's step ran 4–14% faster and the MLP VAE's 18–23%
/// on the pool, the SimCLR step (fewer, longer loops) the same. `f` runs on
/// another thread: thread-local settings (the products' precision, a
/// data-parallel step's collective) must be made inside it.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

/// The environment variable that sizes candle's own pool of workers for its
/// element-wise ops ([`prepare_process`] sets it to 1 unless the user did).
pub const CANDLE_THREADS_ENV: &str = "CANDLE_NUM_THREADS";

/// The process-wide settings every pretext binary and bench makes first,
/// before any tensor exists:
///
/// - glibc's malloc keeps freed memory ([`crate::alloc::keep_freed_memory`]);
/// - rayon's global pool is started, its workers named `rayon-N` (thread names hold 15 bytes);
/// - candle's element-wise ops run on the calling thread
///   ([`CANDLE_THREADS_ENV`]` = 1`, unless already set). candle 0.11 keeps a
///   second pool of workers beside rayon's for its element-wise ops, and each
///   of them spins for up to 25,000 iterations after every op before it
///   sleeps. Our products and fused ops run on rayon's pool, so on a machine
///   with as many cores as threads those spinning workers take the cores
///   rayon's workers need next. With one thread candle's ops (gradient
///   sums, masks, casts — small, memory-bound passes) run inline. On the
///   AMD EPYC of 2026-12-05 (2 vCPUs) the BERT-mini MLM step ran 2–7% and
///   the SimCLR step 0–3% faster, three interleaved rounds each.
///
/// Call it at the top of `main`, while the process has one thread: it
/// changes the environment.
pub fn prepare_process() {
    crate::alloc::keep_freed_memory();
    if std::env::var_os(CANDLE_THREADS_ENV).is_none() {
        std::env::set_var(CANDLE_THREADS_ENV, "1");
    }
    // rayon's workers, named: started lazily by whichever thread first runs
    // a parallel loop (often the batch prefetcher), they would otherwise
    // carry that thread's name into `top` and `perf`. Same thread count as
    // rayon's default (`RAYON_NUM_THREADS`, else one per CPU); an error only
    // means the pool already exists.
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("rayon-{i}"))
        .build_global();
}

/// A family of f32 matrix-product kernels, from narrowest to widest.
///
/// Every product pretext computes itself (convolutions, linear layers,
/// attention, kNN, probes) runs the kernels of one family, chosen once per
/// process by [`KernelSet::current`]. The families give the same results up to
/// float rounding (the order of the sums differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelSet {
    /// Plain Rust, no vector instructions: any CPU.
    Portable,
    /// 256-bit AVX2 + FMA kernels (x86-64-v3).
    Avx2,
    /// 512-bit AVX-512F kernels (x86-64-v4).
    Avx512,
}

impl KernelSet {
    /// Every family, narrowest first.
    pub const ALL: [KernelSet; 3] = [KernelSet::Portable, KernelSet::Avx2, KernelSet::Avx512];

    /// Its name, as [`KERNELS_ENV`] and `trainer.json` spell it.
    pub fn name(self) -> &'static str {
        match self {
            KernelSet::Portable => "portable",
            KernelSet::Avx2 => "avx2",
            KernelSet::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run it (the instruction sets its kernels are
    /// compiled for are all detected).
    pub fn is_available(self) -> bool {
        crate::ops::gemm::kernels_available(self)
    }

    /// The widest family this CPU can run.
    pub fn widest() -> Self {
        Self::ALL
            .into_iter()
            .rev()
            .find(|k| k.is_available())
            .unwrap_or(KernelSet::Portable)
    }

    /// The family a [`KERNELS_ENV`] value asks for: `None` (or `auto`) is
    /// [`KernelSet::widest`]; a family this CPU cannot run is an error.
    pub fn requested(value: Option<&str>) -> Result<Self, InvalidSetting> {
        let value = value.map(str::trim).unwrap_or("auto");
        if value.is_empty() || value.eq_ignore_ascii_case("auto") {
            return Ok(Self::widest());
        }
        let Some(k) = Self::ALL.into_iter().find(|k| value.eq_ignore_ascii_case(k.name())) else {
            return Err(InvalidSetting::value(
                KERNELS_ENV,
                format!("{value:?}"),
                "must be one of auto, avx512, avx2, portable",
            ));
        };
        if !k.is_available() {
            return Err(InvalidSetting::new(
                KERNELS_ENV,
                format!(
                    "this CPU cannot run the {} kernels (the widest it has is {})",
                    k.name(),
                    Self::widest().name()
                ),
            ));
        }
        Ok(k)
    }

    /// The family named by the [`KERNELS_ENV`] environment variable.
    pub fn from_env() -> Result<Self, InvalidSetting> {
        Self::requested(std::env::var(KERNELS_ENV).ok().as_deref())
    }

    /// The family this process uses, chosen on first use from
    /// [`KernelSet::from_env`]. A value it refuses falls back to
    /// [`KernelSet::widest`] with a warning; the command-line tools check
    /// [`KernelSet::from_env`] first and refuse to start instead.
    pub fn current() -> Self {
        static CURRENT: std::sync::OnceLock<KernelSet> = std::sync::OnceLock::new();
        *CURRENT.get_or_init(|| {
            Self::from_env().unwrap_or_else(|e| {
                tracing::warn!("{e}; using the {} kernels", Self::widest().name());
                Self::widest()
            })
        })
    }
}

impl std::fmt::Display for KernelSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
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
    fn the_kernel_request_is_parsed_and_checked_against_the_cpu() {
        let widest = KernelSet::widest();
        assert!(widest.is_available() && KernelSet::Portable.is_available());
        assert_eq!(KernelSet::requested(None).unwrap(), widest);
        assert_eq!(KernelSet::requested(Some(" Auto ")).unwrap(), widest);
        assert_eq!(KernelSet::requested(Some("portable")).unwrap(), KernelSet::Portable);
        let bad = KernelSet::requested(Some("sse9")).unwrap_err();
        assert_eq!(bad.key, KERNELS_ENV);
        assert_eq!(bad.reason, "must be one of auto, avx512, avx2, portable, not \"sse9\"");
        for k in KernelSet::ALL {
            match KernelSet::requested(Some(k.name())) {
                Ok(got) => assert!(got == k && k <= widest),
                Err(e) => {
                    assert!(k > widest, "{k} refused on a CPU whose widest is {widest}");
                    assert!(e.reason.contains("cannot run the"), "{}", e.reason);
                }
            }
        }
        let json = serde_json::to_string(&KernelSet::Avx512).unwrap();
        assert_eq!(json, "\"avx512\"");
    }

    #[test]
    fn this_machine_is_detected() {
        let c = CpuInfo::detect();
        assert!(c.threads >= 1);
        assert!(c.line().starts_with("CPU: "));
        assert_eq!(c.kernels, Some(KernelSet::current()));
        assert!(c.line().ends_with(&format!("f32 kernels: {}", KernelSet::current())));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert!(c.has("avx512f"), "{c:?}");
        }
    }
}
