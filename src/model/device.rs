//! Choosing the compute device, and making CUDA reachable when it is there.
//!
//! Hazard: the linker drops libtorch_cuda (nothing references it directly), so without
//! [`load_cuda_backend`] torch reports no CUDA even on a GPU machine. It is loaded with
//! `dlopen` (RTLD_GLOBAL) before any CUDA query; the binary's rpath or
//! `LD_LIBRARY_PATH` must reach torch's `lib/`.

use std::ffi::CString;
use std::str::FromStr;
use std::sync::OnceLock;

use tch::Device;

/// `runtime.device`: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("`{other}` is not a device (use auto, cpu, cuda or cuda:N)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device `{requested}` was requested but CUDA is not available: {reason}")]
    CudaUnavailable { requested: String, reason: String },
    #[error("device `cuda:{index}` was requested but only {count} CUDA device(s) exist")]
    NoSuchGpu { index: usize, count: usize },
}

/// Loads libtorch_cuda once per process; `Err` says why it could not be loaded.
pub fn load_cuda_backend() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let name = CString::new("libtorch_cuda.so").expect("no interior NUL");
            // SAFETY: dlopen with a valid C string; the handle is kept for the process.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if handle.is_null() {
                // SAFETY: dlerror returns a thread-local C string or null.
                let err = unsafe { libc::dlerror() };
                let msg = if err.is_null() {
                    "unknown dlopen error".to_string()
                } else {
                    unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned()
                };
                return Err(format!("libtorch_cuda.so could not be loaded: {msg}"));
            }
            Ok(())
        })
        .clone()
}

/// Why CUDA is not usable, or `None` when it is.
fn cuda_problem() -> Option<String> {
    if let Err(e) = load_cuda_backend() {
        return Some(e);
    }
    if !tch::Cuda::is_available() {
        return Some("no CUDA driver or GPU found (libtorch_cuda loaded, torch sees no device)".into());
    }
    None
}

/// Turns the configured device into a torch device; `auto` prefers CUDA and logs when
/// it falls back to the CPU.
pub fn resolve(spec: DeviceSpec) -> Result<Device, DeviceError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => match cuda_problem() {
            None => Ok(Device::Cuda(0)),
            Some(reason) => {
                tracing::info!("device auto: using the CPU ({reason})");
                Ok(Device::Cpu)
            }
        },
        DeviceSpec::Cuda(index) => {
            if let Some(reason) = cuda_problem() {
                let requested = if index == 0 {
                    "cuda".into()
                } else {
                    format!("cuda:{index}")
                };
                return Err(DeviceError::CudaUnavailable { requested, reason });
            }
            let count = tch::Cuda::device_count() as usize;
            if index >= count {
                return Err(DeviceError::NoSuchGpu { index, count });
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// A short name for logs and the run summary: `cpu`, `cuda:0`.
pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn cpu_always_resolves_and_cuda_matches_availability() {
        assert_eq!(resolve(DeviceSpec::Cpu).unwrap(), Device::Cpu);
        let auto = resolve(DeviceSpec::Auto).unwrap();
        match resolve(DeviceSpec::Cuda(0)) {
            Ok(d) => assert_eq!(d, auto, "auto picks the GPU when cuda works"),
            Err(e) => {
                assert_eq!(auto, Device::Cpu);
                assert!(e.to_string().contains("CUDA is not available"), "{e}");
            }
        }
    }
}
