//! Compiles `proto/engram/v1/*.proto` with a vendored `protoc`, so a plain `cargo build`
//! needs nothing installed beyond the Rust toolchain.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let files = ["advisor", "audit", "common", "gateway", "signer"]
        .map(|name| proto_root.join(format!("engram/v1/{name}.proto")));

    // Pointing prost at the vendored binary (instead of setting PROTOC in the process
    // environment) keeps this build script free of `unsafe`.
    let mut prost_config = prost_build::Config::new();
    prost_config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    tonic_prost_build::configure()
        // Unimplemented RPCs answer UNIMPLEMENTED until a service overrides them, so a
        // service can register its contract before its logic lands without lying about it.
        .generate_default_stubs(true)
        .compile_with_config(
            prost_config,
            &files,
            &[proto_root, protoc_bin_vendored::include_path()?],
        )?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
