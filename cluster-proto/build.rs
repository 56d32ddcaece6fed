//! Generates the prost messages and tonic services from `proto/`. protoc comes from
//! `protoc-bin-vendored`, so a machine without protoc builds too.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // The vendored protoc unless the builder names one (PROTOC).
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY-free: build scripts are single-threaded; tonic-build reads PROTOC.
        std::env::set_var("PROTOC", protoc);
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .btree_map(".")
        // Payloads and snapshot chunks as `Bytes`: sliced and shared, not copied.
        .bytes(".")
        .compile_protos(
            &[
                "proto/petrel/cluster/v1/raft.proto",
                "proto/petrel/cluster/v1/state.proto",
                "proto/petrel/cluster/v1/forward.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
