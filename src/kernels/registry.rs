//! The kernel registry: every CUDA source file of the crate's `cuda/` folder, embedded, in one list.
//!
//! **Adding a kernel file is one line.** Put the file in `cuda/` and add
//!
//! ```text
//!     MY_KERNEL => "my_kernel.cu",
//! ```
//!
//! to the `registry!` list below (alphabetical by file name, so parallel additions rarely touch the
//! same line). That line embeds the source (`include_str!`), names it `registry::MY_KERNEL` for the
//! code that launches it (`CudaKernels::load(registry::MY_KERNEL, "kernel_name")` with the `cuda`
//! feature), and puts it into [`ALL`], which everything that must see every kernel iterates:
//! `kernels::compile_all` (CI's NVRTC compile check, `tests/kernels.rs::nvrtc_compiles_every_kernel`,
//! which compiles these embedded copies for sm_80 and sm_90 and fails on any warning), and
//! `tests/kernels.rs::every_cuda_file_is_registered`, which fails when a `cuda/*.cu` file of the
//! source tree is missing here.
//!
//! The registry is not behind the `cuda` feature: it only holds text, so the registration check runs
//! in every build.

/// One embedded kernel source file of `cuda/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelFile {
    /// The file name in `cuda/` (`"pack.cu"`); names the source in messages and cache files.
    pub name: &'static str,
    /// The file's text, embedded at build time.
    pub source: &'static str,
}

/// The shared header every kernel file may `#include "common.cuh"`; supplied to each compilation
/// (it is not a kernel file, so it is not in [`ALL`]).
pub const COMMON_HEADER: KernelFile = KernelFile {
    name: "common.cuh",
    source: include_str!("../../cuda/common.cuh"),
};

macro_rules! registry {
    ($($id:ident => $file:literal,)*) => {
        $(
            #[doc = concat!("`cuda/", $file, "`.")]
            pub const $id: KernelFile = KernelFile {
                name: $file,
                source: include_str!(concat!("../../cuda/", $file)),
            };
        )*
        /// Every kernel file of `cuda/`, in file-name order.
        pub const ALL: &[KernelFile] = &[$($id),*];
    };
}

// One line per kernel file, alphabetical by file name (see the module docs).
registry! {
    AXPY => "axpy.cu",
    CAST => "cast.cu",
    DGC => "dgc.cu",
    LOCAL_SGD => "local_sgd.cu",
    PACK => "pack.cu",
    SCATTER_ADD => "scatter_add.cu",
    UNPACK => "unpack.cu",
}

/// The registered file called `name` (`"dgc.cu"`), if any.
pub fn find(name: &str) -> Option<KernelFile> {
    ALL.iter().copied().find(|f| f.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_sorted_and_sources_non_empty() {
        for w in ALL.windows(2) {
            assert!(w[0].name < w[1].name, "{} / {}", w[0].name, w[1].name);
        }
        for f in ALL {
            assert!(f.name.ends_with(".cu"), "{}", f.name);
            assert!(
                f.source.contains("__global__"),
                "{} defines no kernel",
                f.name
            );
            assert_eq!(find(f.name), Some(*f));
        }
        assert_eq!(find("common.cuh"), None);
        assert_eq!(find("missing.cu"), None);
    }
}
