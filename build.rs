//! Compiles `proto/workbroker/v1/*.proto` into `OUT_DIR` with a pure-Rust
//! protobuf compiler (protox), so building needs no system `protoc`.

use std::path::PathBuf;

const PROTO_ROOT: &str = "proto";
const PROTO_FILES: &[&str] = &[
    "proto/workbroker/v1/job.proto",
    "proto/workbroker/v1/broker.proto",
    "proto/workbroker/v1/admin.proto",
    "proto/workbroker/jobs/v1/diff.proto",
    "proto/workbroker/jobs/v1/sync.proto",
    "proto/workbroker/jobs/v1/index.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let file_descriptors = protox::compile(PROTO_FILES, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("workbroker_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&file_descriptors))?;
    tonic_prost_build::configure()
        .build_client(std::env::var_os("CARGO_FEATURE_CLIENT").is_some())
        .build_server(std::env::var_os("CARGO_FEATURE_SERVER").is_some())
        .file_descriptor_set_path(&descriptor_path)
        .compile_fds(file_descriptors)?;
    Ok(())
}
