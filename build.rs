//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so no system `protoc` is
//! needed), generates the tonic clients and servers, and writes the encoded file descriptor
//! set that gRPC reflection serves.

use std::path::PathBuf;

use prost::Message;

/// Every contract of the platform. Reflection and generated clients see exactly these.
const PROTOS: &[&str] = &[
    "proto/crm/v1/crm.proto",
    "proto/inventory/v1/inventory.proto",
    "proto/integration/v1/integration.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // One set per service, so each server's reflection lists only what it serves.
    for proto in PROTOS {
        let name = proto.split('/').nth(1).expect("proto/<service>/v1/<file>");
        let set = protox::compile([proto], ["proto"])?;
        std::fs::write(
            out_dir.join(format!("{name}_descriptor.bin")),
            set.encode_to_vec(),
        )?;
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(out_dir.join("mip_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
