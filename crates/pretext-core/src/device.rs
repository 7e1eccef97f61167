//! Device selection: `cpu`, `cuda`, `cuda:N`.

use crate::{Error, Result};
use candle_core::Device;

/// A parsed device request, as written on the command line or in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (always available).
    Cpu,
    /// The CUDA GPU with this ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;

    /// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match t.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| Error::Device {
                    requested: s.to_string(),
                    reason: format!("{n:?} is not a GPU ordinal; write cuda:0, cuda:1, ..."),
                }),
                None => Err(Error::Device {
                    requested: s.to_string(),
                    reason: "unknown device; use `cpu`, `cuda` or `cuda:N`".into(),
                }),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device.
    ///
    /// # Errors
    /// [`Error::Device`] when the build lacks the `cuda` feature or the GPU
    /// cannot be opened.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => open_cuda(n, &self.to_string()),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize, requested: &str) -> Result<Device> {
    Device::new_cuda(n).map_err(|e| Error::Device {
        requested: requested.to_string(),
        reason: format!("cannot open the GPU: {e}"),
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_n: usize, requested: &str) -> Result<Device> {
    Err(Error::Device {
        requested: requested.to_string(),
        reason: "this build of pretext has no CUDA support; rebuild with `--features cuda` or use `--device cpu`"
            .into(),
    })
}

/// Parses and opens a device in one go: `select_device("cpu")`.
///
/// # Errors
/// See [`DeviceSpec::open`] and [`DeviceSpec::from_str`](std::str::FromStr).
pub fn select_device(spec: &str) -> Result<Device> {
    spec.parse::<DeviceSpec>()?.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() -> Result<()> {
        assert_eq!("cpu".parse::<DeviceSpec>()?, DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>()?, DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>()?, DeviceSpec::Cuda(3));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        Ok(())
    }

    #[test]
    fn cpu_always_opens() -> Result<()> {
        assert!(select_device("cpu")?.is_cpu());
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = select_device("cuda:0").expect_err("no cuda in this build");
        let msg = err.to_string();
        assert!(msg.contains("no CUDA support"), "{msg}");
        assert!(msg.contains("cuda:0"), "{msg}");
    }
}
