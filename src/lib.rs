//! Wire API of workbroker: the generated code of the `workbroker.v1` protobuf
//! package (messages, `Broker` and `Admin` clients and servers) plus a few
//! hand-written helpers shared by the server and the SDK.

pub mod v1 {
    //! `workbroker.v1`: see `proto/workbroker/v1/*.proto` for the documented contract.
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("workbroker.v1");

    /// Encoded file descriptor set of every workbroker proto, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("workbroker_descriptor");
}

pub mod jobs {
    //! Typed payloads of the job kinds the worker SDK ships handlers for
    //! (`diff`, `sync`, `index`).
    pub mod v1 {
        //! `workbroker.jobs.v1`: see `proto/workbroker/jobs/v1/*.proto`.
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("workbroker.jobs.v1");
    }
}

pub mod names;
pub mod time;
