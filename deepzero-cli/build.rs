//! Nothing to build. The script exists for its build-dependency (see `Cargo.toml`): `syn` with
//! `visit-mut`, the one feature of a host crate that the `mpi` feature adds (through bindgen),
//! so that the `mpi` build and the plain one share every proc macro and what depends on them,
//! and CI's MPI test build recompiles only the MPI crates and ours instead of candle and tract.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
