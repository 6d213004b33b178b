//! Compiles unfed/v1/*.proto with protox (pure Rust, no protoc on the machine).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "unfed/v1/common.proto",
        "unfed/v1/compute.proto",
        "unfed/v1/registry.proto",
        "unfed/v1/daemon.proto",
        "unfed/v1/vision.proto",
        "unfed/v1/mpc.proto",
        "unfed/v1/join.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
