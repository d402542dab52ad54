//! The gRPC contracts of the Mini Integration Platform.
//!
//! `build.rs` compiles `proto/` into the modules below; this crate is the only place generated
//! code lives. Services convert these types into their own domain types at the edge.
//!
//! - [`crm::v1`]: customers and their change feed.
//! - [`inventory::v1`]: package requests.
//! - [`integration::v1`]: the integration service's admin API.
//!
//! Each package also has an `ErrorReason` enum (`error_reason.proto`): the
//! `google.rpc.ErrorInfo.reason` strings its service's errors carry are the names of its values.
//! - [`FILE_DESCRIPTOR_SET`]: every file above (and the well-known types they import), encoded,
//!   for gRPC reflection.
#![forbid(unsafe_code)]

/// Generated code is kept in one wrapped module so lints on it stay quiet.
mod generated {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]

    pub mod crm {
        pub mod v1 {
            tonic::include_proto!("crm.v1");
        }
    }
    pub mod inventory {
        pub mod v1 {
            tonic::include_proto!("inventory.v1");
        }
    }
    pub mod integration {
        pub mod v1 {
            tonic::include_proto!("integration.v1");
        }
    }
}

pub use generated::{crm, integration, inventory};

/// The encoded `FileDescriptorSet` of every contract.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mip_descriptor");

/// `crm/v1/crm.proto` and its imports, for the CRM server's reflection.
pub const CRM_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("crm_descriptor");

/// `inventory/v1/inventory.proto` and its imports, for the Inventory server's reflection.
pub const INVENTORY_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("inventory_descriptor");

/// `integration/v1/integration.proto` and its imports, for the integration server's reflection.
pub const INTEGRATION_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("integration_descriptor");

/// Fully-qualified names of every service the platform serves, in the order `mip all` starts them.
pub const SERVICE_NAMES: &[&str] = &[
    "crm.v1.CrmService",
    "inventory.v1.InventoryService",
    "integration.v1.IntegrationService",
];

/// Converts a `SystemTime` into a protobuf timestamp.
pub fn timestamp(time: std::time::SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn descriptor_set_decodes_and_names_every_service() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let services: Vec<String> = set
            .file
            .iter()
            .flat_map(|file| {
                let package = file.package().to_owned();
                file.service
                    .iter()
                    .map(move |service| format!("{package}.{}", service.name()))
            })
            .collect();
        for name in SERVICE_NAMES {
            assert!(
                services.iter().any(|s| s == name),
                "{name} missing from {services:?}"
            );
        }
    }

    #[test]
    fn each_service_set_holds_only_its_service() {
        for (set, name) in [
            (CRM_DESCRIPTOR_SET, "crm.v1.CrmService"),
            (INVENTORY_DESCRIPTOR_SET, "inventory.v1.InventoryService"),
            (
                INTEGRATION_DESCRIPTOR_SET,
                "integration.v1.IntegrationService",
            ),
        ] {
            let set = prost_types::FileDescriptorSet::decode(set).expect("set decodes");
            let services: Vec<String> = set
                .file
                .iter()
                .flat_map(|f| {
                    let package = f.package().to_owned();
                    f.service
                        .iter()
                        .map(move |s| format!("{package}.{}", s.name()))
                })
                .collect();
            assert_eq!(services, [name]);
            let package = name.split('.').take(2).collect::<Vec<_>>().join(".");
            assert!(
                set.file.iter().any(|f| f.package() == package
                    && f.enum_type.iter().any(|e| e.name() == "ErrorReason")),
                "{package}.ErrorReason is in the set, so reflection clients can read the reasons"
            );
            assert!(
                set.file
                    .iter()
                    .any(|f| f.name() == "google/protobuf/timestamp.proto"),
                "imports are included so reflection clients can resolve every type"
            );
        }
    }

    #[test]
    fn descriptor_set_keeps_proto_comments_for_generated_clients() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let crm = set
            .file
            .iter()
            .find(|f| f.name() == "crm/v1/crm.proto")
            .expect("crm.v1 present");
        let info = crm.source_code_info.as_ref().expect("source info kept");
        assert!(
            info.location
                .iter()
                .any(|l| l.leading_comments().contains("stores customers")),
            "service comment missing from the descriptor set"
        );
    }
}
