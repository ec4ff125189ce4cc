//! Generates the tonic client and server code from `proto/pushcluster.proto`.
//! protoc comes from the protoc-bin-vendored crate so a fresh machine needs no
//! system package for it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/pushcluster.proto");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/pushcluster.proto"], &["proto"])?;
    Ok(())
}
