//! The migrations are embedded at compile time (`refinery::embed_migrations!`
//! in src/database.rs); rebuild when one is added or changed.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
