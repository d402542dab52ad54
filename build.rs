//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so no system `protoc` is
//! needed), generates the tonic clients and servers, and writes the encoded file descriptor
//! set that gRPC reflection serves.

use std::path::PathBuf;

use prost::Message;

/// Every contract of the platform, by service: its API, and the reasons its errors carry.
/// Reflection and generated clients see exactly these.
const SERVICES: &[(&str, &[&str])] = &[
    (
        "crm",
        &["proto/crm/v1/crm.proto", "proto/crm/v1/error_reason.proto"],
    ),
    (
        "inventory",
        &[
            "proto/inventory/v1/inventory.proto",
            "proto/inventory/v1/error_reason.proto",
        ],
    ),
    (
        "integration",
        &[
            "proto/integration/v1/integration.proto",
            "proto/integration/v1/error_reason.proto",
        ],
    ),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // One set per service, so each server's reflection lists only what it serves.
    for (name, files) in SERVICES {
        let set = protox::compile(*files, ["proto"])?;
        std::fs::write(
            out_dir.join(format!("{name}_descriptor.bin")),
            set.encode_to_vec(),
        )?;
    }
    let all = SERVICES.iter().flat_map(|(_, files)| files.iter());
    let fds = protox::compile(all, ["proto"])?;
    std::fs::write(out_dir.join("mip_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
