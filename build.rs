//! Compiles every `src/bpf/*.bpf.c` into a libbpf skeleton in OUT_DIR.

use std::env;
use std::fs;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const BPF_DIR: &str = "src/bpf";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed={BPF_DIR}");

    let sources = fs::read_dir(BPF_DIR).expect("src/bpf must exist");
    for entry in sources {
        let path = entry.expect("readable src/bpf entry").path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".bpf.c") else {
            continue;
        };
        let skel = out.join(format!("{stem}.skel.rs"));
        SkeletonBuilder::new()
            .source(&path)
            .clang_args([
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
                "-I",
                BPF_DIR,
            ])
            .build_and_generate(&skel)
            .unwrap_or_else(|e| {
                panic!("compiling {name} failed (is clang installed? run ./setup.sh): {e:#}")
            });
    }
}
